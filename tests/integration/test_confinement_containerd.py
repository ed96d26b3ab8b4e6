"""The default confinement of containerd workloads, attacked from inside against the real kernel.

Our service, a private containerd and its runc shim, with runc and with crun as the OCI runtime.
crun refuses a hybrid cgroup host (v1 controllers plus a cgroup2 mount with a controller of its
own); so crun's containerd runs in a mount namespace of its own without that cgroup2 mount, a
v1-only view of the same kernel, where crun applies our spec like runc does. The workload image
is the busybox test image plus a setuid-root busybox, a syscall prober, and an Entrypoint and Cmd
of its own (tests/images.py). Every assertion is on what the kernel shows inside the container
or on the host.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.core.confinement import (
    ALL_CAPABILITIES,
    DEFAULT_CAPABILITIES,
    MASKED_PATHS,
    READONLY_PATHS,
    Confinement,
    capability_mask,
)
from tests.cgroup_roots import run_scoped_name
from tests.conftest import CGROUP_MOUNT, ServiceProcess, require, require_root
from tests.images import (
    IMAGE_CMD,
    IMAGE_ENTRYPOINT,
    SETUID_PROBE,
    SYSCALL_PROBE,
    build_syscall_probe,
    confinement_entries,
    tar_bytes,
    write_commanded_oci_layout,
)
from tests.integration.api import wait
from tests.integration.containerd_daemon import (
    SHARED,
    ContainerdDaemon,
    containerd_available,
    containerd_config,
    import_image,
)

pytestmark = pytest.mark.integration
CONFINED = "localhost/ctz-confined:1"
UNIFIED = CGROUP_MOUNT / "unified"
# Run containerd where /sys/fs/cgroup/unified is not mounted (see the module docstring).
WITHOUT_CGROUP2 = (
    "unshare", "--mount", "--propagation", "private",
    "sh", "-c", f'umount -l {UNIFIED} && exec "$@"', "sh",
)  # fmt: skip
OUTPUT_SECONDS = 60


@dataclass
class Runtime:
    """A service whose containerd runtime uses `binary`, on its own containerd namespace."""

    service: ServiceProcess
    daemon: ContainerdDaemon
    namespace: str
    binary: str

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.service.destroy_all()
        self.service.stop()
        self.daemon.remove_namespace(self.namespace)
        self.service.remove_cgroup_roots()


def crun_needs_a_v1_view() -> bool:
    unified = UNIFIED / "cgroup.controllers"
    return unified.is_file() and bool(unified.read_text().strip())


@pytest.fixture(scope="session")
def confined_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require(shutil.which("gcc") is not None, "gcc missing: apt-get install gcc libc6-dev")
    workdir = tmp_path_factory.mktemp("confined-image")
    layer = tar_bytes(confinement_entries(build_syscall_probe(workdir)))
    return write_commanded_oci_layout(workdir / "confined.tar", [layer], CONFINED)


@pytest.fixture(scope="session")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ContainerdDaemon]:
    require_root()
    missing = containerd_available()
    require(missing is None, str(missing))
    daemon = SHARED.acquire(lambda: tmp_path_factory.mktemp("containerd"))
    yield daemon
    SHARED.release()


@pytest.fixture(scope="module")
def crun_containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ContainerdDaemon]:
    require_root()
    missing = containerd_available()
    require(missing is None, str(missing))
    require(shutil.which("crun") is not None, "crun is not installed (Debian package crun)")
    launcher = WITHOUT_CGROUP2 if crun_needs_a_v1_view() else ()
    daemon = ContainerdDaemon(tmp_path_factory.mktemp("containerd-crun"), launcher)
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()


def start_runtime(
    tmp: Path,
    daemon: ContainerdDaemon,
    image: Path,
    *,
    binary: str = "runc",
    allow_privileged: bool = False,
) -> Runtime:
    namespace = run_scoped_name("ctz")
    config = containerd_config(daemon, namespace, "" if binary == "runc" else binary)
    if allow_privileged:
        config = "allow_privileged = true\n" + config
    runtime = Runtime(ServiceProcess(tmp, config), daemon, namespace, binary)
    runtime.service.start()
    try:
        assert import_image(runtime.service.endpoint, image) == [CONFINED]
    except BaseException:
        runtime.stop()
        raise
    return runtime


@pytest.fixture(scope="module")
def runc_runtime(
    tmp_path_factory: pytest.TempPathFactory, containerd: ContainerdDaemon, confined_image: Path
) -> Iterator[Runtime]:
    runtime = start_runtime(tmp_path_factory.mktemp("runc"), containerd, confined_image)
    yield runtime
    runtime.stop()


@pytest.fixture(scope="module")
def crun_runtime(
    tmp_path_factory: pytest.TempPathFactory,
    crun_containerd: ContainerdDaemon,
    confined_image: Path,
) -> Iterator[Runtime]:
    runtime = start_runtime(
        tmp_path_factory.mktemp("crun"), crun_containerd, confined_image, binary="crun"
    )
    yield runtime
    runtime.stop()


@pytest.fixture(params=["runc", "crun"])
def runtime(request: pytest.FixtureRequest) -> Runtime:
    found: Runtime = request.getfixturevalue(f"{request.param}_runtime")
    return found


def run(
    service: ServiceProcess,
    container_id: str,
    command: pb.CommandInfo,
    *,
    privileged: bool = False,
    no_new_privileges: bool = False,
) -> tuple[pb.Termination, str]:
    """Launch in the confined image, wait for the end; the termination and the stdout."""
    stub = service.stub()
    reply = stub.Launch(
        pb.LaunchRequest(
            container_id=container_id,
            command=command,
            container=pb.ContainerInfo(runtime="containerd", image=CONFINED),
            privileged=privileged,
            no_new_privileges=no_new_privileges,
        ),
        timeout=60,
    )
    termination = wait(stub, container_id, timeout=OUTPUT_SECONDS)
    print((Path(reply.status.sandbox) / "stderr").read_text())  # shown when a test fails
    return termination, (Path(reply.status.sandbox) / "stdout").read_text()


def fields(output: str) -> dict[str, str]:
    """`Key: value` lines (the last of a key wins), as /proc/self/status and the probe print."""
    found = {}
    for line in output.splitlines():
        key, separator, value = line.partition(":")
        if separator:
            found[key.strip()] = value.strip()
    return found


def mount_options(output: str) -> dict[str, str]:
    """`mountinfo: <point> <options>` lines (MOUNTS): mount point -> its options."""
    found = {}
    for line in output.splitlines():
        if line.startswith("mountinfo: "):
            _, point, options = line.split(" ", 2)
            found[point] = options
    return found


def masked_on_this_host() -> list[str]:
    """The masked paths this kernel has (a mask over a path that does not exist is moot). A
    runtime masks a file by binding /dev/null over it and a directory with an empty read-only
    tmpfs: either way the path is a mount point in the container."""
    return [path for path in MASKED_PATHS if Path(path).exists()]


def mask_text(names: tuple[str, ...]) -> str:
    return f"{capability_mask(names):016x}"


def full_mask_text() -> str:
    """Every capability the node has: its bounding set (the service's is the test's)."""
    bounding = int(fields(Path("/proc/self/status").read_text())["CapBnd"], 16)
    return f"{capability_mask(ALL_CAPABILITIES) & bounding:016x}"


MOUNTS = """awk '{print "mountinfo: " $5 " " $6}' /proc/self/mountinfo"""
STATUS = "grep -E '^(Uid|CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status"
# The cgroup v1 release_agent escape: mount a named hierarchy, point its release_agent at a
# script in the container's overlay upper directory (a host path), and let a cgroup empty.
ESCAPE = """
mkdir -p /tmp/c
mount -t cgroup -o none,name=x cgroup /tmp/c; echo "mount-rc: $?"
upper=$(sed -n 's/.*upperdir=\\([^,]*\\).*/\\1/p' /proc/mounts | head -n 1)
echo "upper: $upper"
printf '#!/bin/sh\\necho escaped > %s\\n' "$MARKER" > /agent && chmod +x /agent
for hierarchy in /tmp/c /sys/fs/cgroup/*; do
  [ -f "$hierarchy/cgroup.procs" ] || continue
  echo "hierarchy: $hierarchy"
  if echo "$upper/agent" > "$hierarchy/release_agent"; then echo "wrote: $hierarchy"; fi
  mkdir "$hierarchy/x" && echo 1 > "$hierarchy/x/notify_on_release" &&
    sh -c "echo \\$\\$ > $hierarchy/x/cgroup.procs" && echo "joined: $hierarchy"
done
cat /proc/self/cgroup
echo "done: escape"
"""


def test_cgroup_release_agent_escape_fails_and_the_host_is_untouched(
    runtime: Runtime, container_id: str, tmp_path: Path
) -> None:
    marker = tmp_path / "escaped"
    command = pb.CommandInfo(
        shell=f"{ESCAPE}\n{STATUS}",
        environment=[pb.EnvironmentVariable(name="MARKER", value=str(marker))],
    )
    termination, output = run(runtime.service, container_id, command)
    assert termination.reason == pb.EXITED and "done: escape" in output, output
    assert fields(output)["mount-rc"] != "0"
    assert "wrote:" not in output and "joined:" not in output, output
    assert fields(output)["upper"].startswith("/"), output  # it found its host path
    # The container's cgroups are the roots of its own cgroup namespace.
    cgroup_lines = [line for line in output.splitlines() if line[:1].isdigit() and ":/" in line]
    assert cgroup_lines and all(line.endswith(":/") for line in cgroup_lines), output
    assert fields(output)["Seccomp"] == "2"  # a filter is installed (the runtime took it)
    time.sleep(0.5)  # a release agent runs asynchronously once the cgroup empties
    assert not marker.exists()


ROOT_PROBE = f"""
{STATUS}
unshare -m true; echo "unshare-m-rc: $?"
unshare -U true; echo "unshare-U-rc: $?"
{SYSCALL_PROBE} keyctl unshare-user unshare-mount mount
echo "dev: $(ls /dev | tr '\\n' ' ')"
mkdir /sys/fs/cgroup/memory/probe; echo "cgroup-mkdir-rc: $?"
echo "keys-bytes: $(cat /proc/keys | wc -c)"
{MOUNTS}
"""


def test_root_holds_the_default_set_behind_seccomp_and_read_only_kernel_paths(
    runtime: Runtime, container_id: str
) -> None:
    termination, output = run(runtime.service, container_id, pb.CommandInfo(shell=ROOT_PROBE))
    assert termination.reason == pb.EXITED, output
    status = fields(output)
    default = mask_text(DEFAULT_CAPABILITIES)
    assert (status["CapEff"], status["CapPrm"], status["CapBnd"]) == (default,) * 3
    assert status["CapInh"] == default and status["CapAmb"] == "0" * 16
    assert (status["NoNewPrivs"], status["Seccomp"]) == ("0", "2")  # root: NNP only on request
    assert status["unshare-m-rc"] != "0" and status["unshare-U-rc"] != "0"
    for call in ("keyctl", "unshare-user", "unshare-mount", "mount"):
        assert status[call] == "Operation not permitted", output
    mounts = mount_options(output)
    assert "/proc/keys" in masked_on_this_host() and status["keys-bytes"] == "0"
    assert all(path in mounts for path in masked_on_this_host()), mounts
    assert set(status["dev"].split()) <= {
        "core", "fd", "full", "mqueue", "null", "ptmx", "pts", "random", "shm", "stderr",
        "stdin", "stdout", "tty", "urandom", "zero",
    }  # fmt: skip
    assert status["cgroup-mkdir-rc"] != "0"
    read_only = [path for path in READONLY_PATHS if Path(path).exists()]
    assert "/proc/sys" in read_only
    for point in (*read_only, "/sys"):
        assert mounts[point].split(",")[0] == "ro", (point, mounts)
    # Every cgroupfs is read-only (runc's tmpfs holding them is the container's own).
    cgroupfs = [point for point in mounts if point.startswith("/sys/fs/cgroup/")]
    assert cgroupfs and all(mounts[point].split(",")[0] == "ro" for point in cgroupfs), mounts


def test_root_gets_no_new_privs_on_request(runc_runtime: Runtime, container_id: str) -> None:
    command = pb.CommandInfo(shell=STATUS)
    _, output = run(runc_runtime.service, container_id, command, no_new_privileges=True)
    assert fields(output)["NoNewPrivs"] == "1"


# The attack: a setuid-root binary in the image makes itself root and runs a shell (INSIDE).
SETUID_SHELL = f"""
{SETUID_PROBE} root-shell "$INSIDE"
echo "uid-after: $(id -u)"
{STATUS}
"""
INSIDE = (
    'echo "setuid-uid: $(id -u)"; set -- $(grep CapEff /proc/self/status); echo "setuid-CapEff: $2"'
)


def test_a_setuid_root_binary_gives_nothing_back_to_nobody(
    runc_runtime: Runtime, container_id: str
) -> None:
    inside = pb.EnvironmentVariable(name="INSIDE", value=INSIDE)
    command = pb.CommandInfo(shell=SETUID_SHELL, user="nobody", environment=[inside])
    termination, output = run(runc_runtime.service, container_id, command)
    assert termination.reason == pb.EXITED, output
    status = fields(output)
    assert (status["setuid-uid"], status["setuid-CapEff"]) == ("65534", "0" * 16), output
    assert status["uid-after"] == "65534"
    assert status["CapEff"] == status["CapPrm"] == status["CapInh"] == "0" * 16
    assert status["NoNewPrivs"] == "1"


def test_privileged_is_refused_unless_the_node_allows_it(
    runc_runtime: Runtime,
    containerd: ContainerdDaemon,
    confined_image: Path,
    container_id: str,
    tmp_path: Path,
) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        run(runc_runtime.service, container_id, pb.CommandInfo(shell="true"), privileged=True)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "allow_privileged" in str(refused.value.details())
    assert container_id not in containerd.lines(
        "containers", "ls", "-q", namespace=runc_runtime.namespace
    )
    allowed = start_runtime(tmp_path, containerd, confined_image, allow_privileged=True)
    try:
        probe = f"{STATUS}\n{SYSCALL_PROBE} keyctl\n{MOUNTS}"
        command = pb.CommandInfo(shell=probe)
        termination, output = run(allowed.service, container_id, command, privileged=True)
        assert termination.reason == pb.EXITED, output
    finally:
        allowed.stop()
    status = fields(output)
    assert status["CapEff"] == status["CapBnd"] == full_mask_text()
    assert status["Seccomp"] == "0" and status["keyctl"] == "allowed"
    mounts = mount_options(output)
    assert not any(path in mounts for path in masked_on_this_host()), mounts
    assert mounts["/sys"].split(",")[0] == "rw"


def test_an_empty_command_runs_the_images_entrypoint_and_cmd(
    runtime: Runtime, container_id: str
) -> None:
    termination, output = run(runtime.service, container_id, pb.CommandInfo())
    assert termination.reason == pb.EXITED and termination.exit_code == 0
    assert output == " ".join((*IMAGE_ENTRYPOINT[1:], *IMAGE_CMD)) + "\n"


def test_runtimes_reports_the_confinement(runc_runtime: Runtime) -> None:
    stub = runc_runtime.service.stub()
    runtimes = {r.name: r for r in stub.Runtimes(pb.RuntimesRequest(), timeout=30).runtimes}
    assert runtimes["containerd"].healthy
    assert runtimes["containerd"].confinement == Confinement().summary()
