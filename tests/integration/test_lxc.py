"""The LXC runtime end to end: a real `containerizer serve` driving real LXC 5 containers."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from tests.conftest import ServiceProcess, require, require_root, serving, traversable_by_all
from tests.integration.api import destroy, launch, scalar, usage, wait

pytestmark = pytest.mark.integration

LXC_CONFIG = 'default_runtime = "lxc"\n[runtimes.lxc]\n'
STATIC_SUPERVISOR = Path(sys.executable).parent / "containerizer-supervisor-static"
MIB = 1024 * 1024


def require_lxc() -> None:
    require_root()
    require(shutil.which("lxc-start") is not None, "lxc-start not installed (Debian: lxc)")
    require(Path("/bin/busybox").is_file(), "/bin/busybox missing (Debian: busybox-static)")
    require(
        STATIC_SUPERVISOR.is_file(),
        f"{STATIC_SUPERVISOR} not built: make -C supervisor STATIC_BIN={STATIC_SUPERVISOR}",
    )


@pytest.fixture(scope="module")
def lxc_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """One LXC service per xdist worker (and module), with private state, socket and cgroups."""
    require_lxc()
    process = ServiceProcess(tmp_path_factory.mktemp("lxc-service"), extra_config=LXC_CONFIG)
    yield from serving(process)


def lxcpath(service: ServiceProcess) -> Path:
    return service.state_dir / "lxc" / "containers"


def lxc_ls(service: ServiceProcess) -> list[str]:
    listing = subprocess.run(
        ["lxc-ls", "-1", "-P", str(lxcpath(service))], capture_output=True, text=True, check=True
    )
    return listing.stdout.split()


def monitors(container_id: str) -> list[psutil.Process]:
    """LXC monitor processes (`lxc-start ... -n <id>`) of the container."""
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        cmdline = process.info["cmdline"] or []
        if process.info["name"] == "lxc-start" and container_id in cmdline:
            found.append(process)
    return found


def cgroup_file(service: ServiceProcess, controller: str, cid: str, name: str) -> str:
    return (Path("/sys/fs/cgroup") / controller / service.cgroups_root / cid / name).read_text()


def test_exit_code_output_and_the_container_view(
    lxc_service: ServiceProcess, container_id: str
) -> None:
    stub = lxc_service.stub()
    script = (
        'echo "out pid=$$ init=$(cat /proc/1/comm) host=$(hostname) sb=$MESOS_SANDBOX cwd=$(pwd)"'
        "; echo err >&2; ls /sys/class/net; exit 3"
    )
    reply = launch(stub, container_id, script)
    assert reply.status.state == pb.RUNNING
    termination = wait(stub, container_id)
    assert (termination.reason, termination.exit_code, termination.status) == (pb.EXITED, 3, 768)
    assert not termination.HasField("signal") and not termination.killed
    sandbox = Path(reply.status.sandbox)
    out = (sandbox / "stdout").read_text().splitlines()
    # Its own pid namespace under the supervisor's init; its own hostname; the sandbox bound in;
    # no network but loopback (lxc.net.0.type = empty).
    assert out[0] == (
        f"out pid=2 init=supervisor host={container_id[:63]}"
        " sb=/mnt/mesos/sandbox cwd=/mnt/mesos/sandbox"
    )
    assert out[1:] == ["lo"]
    assert (sandbox / "stderr").read_text() == "err\n"


@pytest.mark.parametrize(
    ("script", "exit_code", "signo"),
    [("kill -TERM $$; sleep 5", None, 15), ("exit 143", 143, None), ("kill -KILL $$", None, 9)],
)
def test_signal_deaths_and_high_exit_codes_are_told_apart(
    lxc_service: ServiceProcess,
    container_id: str,
    script: str,
    exit_code: int | None,
    signo: int | None,
) -> None:
    """lxc-execute would report all three as 128+n; our recorded status does not."""
    stub = lxc_service.stub()
    launch(stub, container_id, script)
    termination = wait(stub, container_id)
    assert termination.reason == pb.EXITED
    if signo is None:
        assert termination.exit_code == exit_code and not termination.HasField("signal")
    else:
        assert termination.signal == signo and not termination.HasField("exit_code")


def test_kill_delivers_signals(lxc_service: ServiceProcess, container_id: str) -> None:
    stub = lxc_service.stub()
    launch(stub, container_id, "trap 'exit 42' USR1; while :; do sleep 0.05; done")
    time.sleep(0.3)
    stub.Kill(pb.KillRequest(container_id=container_id, signal=10), timeout=10)
    assert wait(stub, container_id).exit_code == 42

    plain = f"{container_id}-plain"
    launch(stub, plain, "exec sleep 1000")  # no handler: SIGTERM still ends it (not pid 1)
    stub.Kill(pb.KillRequest(container_id=plain, signal=15), timeout=10)
    assert wait(stub, plain).signal == 15


def test_limits_in_cgroup_files_and_live_update(
    lxc_service: ServiceProcess, container_id: str
) -> None:
    stub = lxc_service.stub()
    launch(stub, container_id, "sleep 1000", cpus=0.5, mem=64, pids=50)
    assert cgroup_file(lxc_service, "cpu", container_id, "cpu.shares") == "512\n"
    assert cgroup_file(lxc_service, "memory", container_id, "memory.limit_in_bytes") == (
        f"{64 * MIB}\n"
    )
    assert cgroup_file(lxc_service, "pids", container_id, "pids.max") == "50\n"
    statistics = usage(stub, container_id)
    assert statistics.mem_limit_bytes == 64 * MIB and statistics.cpus_limit == 0.5
    assert statistics.processes >= 3  # supervisor, its init, the workload

    stub.Update(
        pb.UpdateRequest(
            container_id=container_id, resources=[scalar("cpus", 2), scalar("mem", 128)]
        ),
        timeout=10,
    )
    assert cgroup_file(lxc_service, "cpu", container_id, "cpu.shares") == "2048\n"
    assert cgroup_file(lxc_service, "memory", container_id, "memory.limit_in_bytes") == (
        f"{128 * MIB}\n"
    )
    assert usage(stub, container_id).mem_limit_bytes == 128 * MIB
    destroy(stub, container_id)


def test_nothing_from_the_request_can_add_an_lxc_key(
    lxc_service: ServiceProcess, container_id: str, tmp_path: Path
) -> None:
    """Environment, labels and the command never enter the LXC config; a sandbox path with a
    space or a newline is escaped inside its mount entry."""
    smuggled = "x\nlxc.mount.entry = /etc host-etc none bind,create=dir 0 0"
    sandbox = tmp_path / "sand box\nlxc.cgroup.devices.allow = a"
    stub = lxc_service.stub()
    stub.Launch(
        pb.LaunchRequest(
            container_id=container_id,
            command=pb.CommandInfo(
                shell='printf "%s|%s" "$SMUGGLED" "$(ls /host-etc 2>&1 | head -c 40)"; sleep 30',
                environment=[
                    pb.EnvironmentVariable(name="SMUGGLED", value=smuggled),
                    pb.EnvironmentVariable(name="lxc.cgroup.devices.allow", value="a"),
                ],
            ),
            labels={"lxc.apparmor.profile": "unconfined\nlxc.net.0.type = none"},
            sandbox=str(sandbox),
            # In a user namespace LXC binds a clone of the sandbox, not its path: none here.
            user_namespace=False,
        ),
        timeout=30,
    )
    config = (lxcpath(lxc_service) / container_id / "config").read_text()
    keys = [line.partition(" = ")[0] for line in config.splitlines()]
    assert all(key.startswith("lxc.") and " " not in key for key in keys)
    assert "lxc.cgroup.devices.allow" not in keys
    assert not [line for line in config.splitlines() if "host-etc" in line.split(" = ")[1]]
    assert keys.count("lxc.net.0.type") == 1 and "lxc.net.0.type = empty" in config
    assert "sand\\040box\\012lxc.cgroup.devices.allow" in config
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (sandbox / "stdout").read_text():
        time.sleep(0.05)
    value, _, listing = (sandbox / "stdout").read_text().partition("|")
    assert value == smuggled  # arrived verbatim, as a value
    assert "No such file" in listing  # and mounted nothing
    destroy(stub, container_id)


def test_unknown_image_fails_the_launch_cleanly(
    lxc_service: ServiceProcess, container_id: str
) -> None:
    stub = lxc_service.stub()
    with pytest.raises(Exception) as error:
        stub.Launch(
            pb.LaunchRequest(
                container_id=container_id,
                command=pb.CommandInfo(shell="true"),
                container=pb.ContainerInfo(image=f"localhost/missing-{uuid.uuid4().hex}:1"),
            ),
            timeout=30,
        )
    assert error.value.code().name == "NOT_FOUND"  # type: ignore[attr-defined]
    assert container_id not in lxc_ls(lxc_service)
    assert not (lxcpath(lxc_service) / container_id).exists()


def test_image_rootfs_through_the_image_store(
    lxc_service: ServiceProcess, container_id: str, tmp_path: Path
) -> None:
    """The image store's read-only rootfs is the overlay's lower layer: writes stay in the
    container and leave with it."""
    from adapter.images.store import ImageStore
    from tests.images import REFERENCE, busybox_oci_layout

    store = ImageStore(lxc_service.state_dir / "images")
    asyncio.run(store.import_tarball(busybox_oci_layout(tmp_path)))
    stub = lxc_service.stub()
    reply = stub.Launch(
        pb.LaunchRequest(
            container_id=container_id,
            command=pb.CommandInfo(shell="echo written > /etc/marker; cat /etc/marker"),
            container=pb.ContainerInfo(image=REFERENCE),
        ),
        timeout=60,
    )
    assert wait(stub, container_id).exit_code == 0
    assert (Path(reply.status.sandbox) / "stdout").read_text() == "written\n"
    layers = asyncio.run(store.layers(REFERENCE))
    assert layers and not any((layer / "etc/marker").exists() for layer in layers)
    destroy(stub, container_id)
    assert not (lxcpath(lxc_service) / container_id).exists()


def test_image_layers_stack_in_the_lxc_overlay(
    lxc_service: ServiceProcess, container_id: str, tmp_path: Path
) -> None:
    """Each layer its own lower directory: a file deleted and a directory made opaque above
    are gone in the container, the rest of the base is there."""
    import grpc

    from adapter.api.containerizer.v1 import images_pb2, images_pb2_grpc
    from tests.integration.test_native_images import layered_image

    layered_image(tmp_path)
    channel = grpc.insecure_channel(lxc_service.endpoint)
    images = images_pb2_grpc.ImagesStub(channel)
    request = images_pb2.ImportRequest(path=str(tmp_path / "layered.tar"))
    list(images.Import(request, timeout=60))
    channel.close()
    stub = lxc_service.stub()
    reply = stub.Launch(
        pb.LaunchRequest(
            container_id=container_id,
            command=pb.CommandInfo(shell="ls /etc /cache"),
            container=pb.ContainerInfo(image="localhost/layered:1"),
        ),
        timeout=60,
    )
    assert wait(stub, container_id).exit_code == 0
    listed = (Path(reply.status.sandbox) / "stdout").read_text().split()
    assert "passwd" in listed and "new" in listed
    assert "gone" not in listed and "old" not in listed
    destroy(stub, container_id)


def test_a_setuid_file_in_the_writable_layer_is_out_of_host_users_reach(
    lxc_service: ServiceProcess, container_id: str
) -> None:
    """Root in an LXC container without a user namespace is host root: a setuid-root file it
    leaves in its writable layer (delta0, which it may also open to everyone) must not be
    reachable by host users through the container's directory."""
    stub = lxc_service.stub()
    launch(stub, container_id, "chmod 755 / && sleep 600")
    try:
        directory = lxcpath(lxc_service) / container_id
        planted = directory / "delta0" / "planted"
        shutil.copyfile("/bin/true", planted)
        planted.chmod(0o4755)
        assert (directory.stat().st_mode & 0o777) == 0o700
        with traversable_by_all(directory.parent), pytest.raises(PermissionError):
            subprocess.run([str(planted)], user=65534, group=65534, extra_groups=[], check=False)
    finally:
        destroy(stub, container_id)
