"""The libvirt runtime end to end: a private libvirtd, QEMU (TCG here), real guests.

Guest boots are the expensive part (~4-5 s each under TCG), so the tests share one libvirtd and
one service per xdist worker, and each boot checks as much as it can: five boots in all. What
every runtime must do (exits, destroy, recovery after kill -9, ...) is the conformance suite's
(tests/conformance); here is what only libvirt has.

The host state these tests expect is a fresh one: the cpuset root's cgroup.clone_children 0, no
partition of ours left (each service's cgroups go when the daemon fixture ends), and whatever a
run killed halfway left is swept by the next (tests/integration/libvirtd.py).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.api.containerizer.v1 import containerizer_pb2_grpc as pb_grpc
from adapter.runtimes.libvirt import cgroups
from isolators.cgroups.hierarchy import MOUNTINFO, parse_mountinfo
from tests.cgroup_roots import hierarchy_mounts, remove_cgroup_trees, run_scoped_name
from tests.conftest import BIN, REPO, ServiceProcess, require, require_root
from tests.integration.api import destroy, scalar, wait
from tests.integration.libvirtd import KERNEL, PrivateLibvirtd, libvirt_service, libvirtd
from tests.run_records import sweep_dead_runs

__all__ = ["libvirtd"]  # the shared session fixture, used by name

pytestmark = pytest.mark.integration

HOSTILE = "<a>&amp; \"q\" 'q' ]]> <!-- x --> </domain>\nline2 $(reboot) `id` %s \\"


def _start_service(
    workdir: Path,
    daemon: PrivateLibvirtd,
    virt_type: str,
    extra_config: str = "",
    kernel: Path = KERNEL,
) -> ServiceProcess:
    process = libvirt_service(daemon, workdir, virt_type, extra_config, kernel)
    process.start()
    return process


@pytest.fixture(scope="session")
def vm_service(
    tmp_path_factory: pytest.TempPathFactory, libvirtd: PrivateLibvirtd
) -> Iterator[ServiceProcess]:
    process = _start_service(tmp_path_factory.mktemp("vm-service"), libvirtd, "qemu")
    yield process
    try:
        process.destroy_all()
    finally:
        process.stop()
        process.remove_cgroup_roots()


def _launch(
    stub: pb_grpc.ContainerizerStub,
    container_id: str,
    shell: str,
    *,
    environment: dict[str, str] | None = None,
    labels: dict[str, str] | None = None,
    **resources: float,
) -> pb.LaunchResponse:
    return stub.Launch(
        pb.LaunchRequest(
            container_id=container_id,
            command=pb.CommandInfo(
                shell=shell,
                environment=[
                    pb.EnvironmentVariable(name=k, value=v) for k, v in (environment or {}).items()
                ],
            ),
            resources=[scalar(name, value) for name, value in resources.items()],
            labels=labels or {},
        ),
        timeout=120,
    )


def _domain_names(daemon: PrivateLibvirtd) -> set[str]:
    import libvirt

    connection = libvirt.open(daemon.uri)
    try:
        return {domain.name() for domain in connection.listAllDomains()}
    finally:
        connection.close()


def _wait_for(condition: object, timeout: float = 120) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def _run_dir(service: ServiceProcess, container_id: str) -> Path:
    return service.state_dir / "libvirt" / "run" / container_id


def test_command_runs_in_a_guest_of_the_asked_size(
    vm_service: ServiceProcess, libvirtd: PrivateLibvirtd, container_id: str
) -> None:
    stub = vm_service.stub()
    runtimes = stub.Runtimes(pb.RuntimesRequest(), timeout=60).runtimes
    (fingerprint,) = [r for r in runtimes if r.name == "libvirt"]
    assert fingerprint.healthy, fingerprint.message
    assert "virt_type=qemu" in fingerprint.message

    reply = _launch(
        stub,
        container_id,
        "echo out; echo err >&2; grep MemTotal /proc/meminfo; nproc; exit 3",
        mem=200,
        cpus=1.5,
    )
    assert reply.status.state == pb.RUNNING and reply.status.pid > 0
    statistics = stub.Usage(pb.UsageRequest(container_id=container_id), timeout=30).statistics
    assert statistics.mem_limit_bytes == 200 * 1024 * 1024
    assert statistics.cpus_limit == 1.5  # the Mesos shares arithmetic, read from the cgroup
    assert statistics.cpus_user_time_secs + statistics.cpus_system_time_secs > 0

    termination = wait(stub, container_id, timeout=180)
    assert termination.reason == pb.EXITED, termination.message
    assert termination.exit_code == 3 and termination.status == 3 << 8
    sandbox = Path(reply.status.sandbox)
    out_lines = (sandbox / "stdout").read_text().splitlines()
    assert out_lines[0] == "out" and out_lines[-1] == "2"  # vCPUs: 1.5 rounded up
    mem_total_kib = int(out_lines[1].split()[1])
    assert 150 * 1024 < mem_total_kib <= 200 * 1024
    assert (sandbox / "stderr").read_text() == "err\n"
    assert f"containerizer-{container_id}" not in _domain_names(libvirtd)
    assert not _run_dir(vm_service, container_id).exists()


def test_hostile_ids_labels_and_environment(
    vm_service: ServiceProcess, libvirtd: PrivateLibvirtd
) -> None:
    import libvirt

    from adapter.runtimes.libvirt.domain import METADATA_NAMESPACE, parse_metadata

    container_id = f"x.-_{os.getpid()}-{time.time_ns() % 10**6}-"  # every character ids allow
    stub = vm_service.stub()
    _launch(
        stub,
        container_id,
        'printf "%s|" "$HOSTILE" "$SECOND"; sleep 1000',
        environment={"HOSTILE": HOSTILE, "SECOND": "a=b=c"},
        labels={HOSTILE.replace("\n", " "): HOSTILE, "plain": "]]>"},
    )
    connection = libvirt.open(libvirtd.uri)
    try:
        domain = connection.lookupByName(f"containerizer-{container_id}")
        metadata = parse_metadata(
            domain.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NAMESPACE)
        )
    finally:
        connection.close()
    assert metadata.container_id == container_id
    assert dict(metadata.labels) == {HOSTILE.replace("\n", " "): HOSTILE, "plain": "]]>"}
    sandbox = Path(stub.Status(pb.StatusRequest(container_id=container_id)).sandbox)
    expected = f"{HOSTILE}|a=b=c|"
    _wait_for(
        lambda: (sandbox / "stdout").exists() and (sandbox / "stdout").read_text() == expected
    )
    termination = destroy(stub, container_id)
    assert termination.reason == pb.DESTROYED and termination.killed


def test_destroy_mid_boot_leaves_nothing(
    vm_service: ServiceProcess, libvirtd: PrivateLibvirtd, container_id: str
) -> None:
    stub = vm_service.stub()
    reply = _launch(stub, container_id, "sleep 1000")
    cgroup_dirs = _domain_cgroups(reply.status.pid)
    assert cgroup_dirs and all(d.is_dir() for d in cgroup_dirs)
    termination = destroy(stub, container_id)  # the guest is still in its firmware or kernel
    assert termination.reason == pb.DESTROYED and termination.killed
    assert termination.signal == 9
    assert f"containerizer-{container_id}" not in _domain_names(libvirtd)
    assert not _run_dir(vm_service, container_id).exists()
    assert not any(d.exists() for d in cgroup_dirs)


def _domain_cgroups(qemu_pid: int) -> list[Path]:
    """The libvirt domain cgroup directories QEMU runs in (v1: one per controller)."""
    dirs = []
    for line in Path(f"/proc/{qemu_pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if ".libvirt-qemu" in path and controllers in ("memory", "pids", "freezer"):
            dirs.append(Path("/sys/fs/cgroup") / controllers / path.lstrip("/"))
    return dirs


def test_sigterm_is_an_acpi_shutdown_the_command_sees(
    vm_service: ServiceProcess, container_id: str
) -> None:
    stub = vm_service.stub()
    reply = _launch(
        stub,
        container_id,
        "trap 'echo got TERM; exit 42' TERM; echo ready; while :; do sleep 0.1; done",
    )
    stdout = Path(reply.status.sandbox) / "stdout"
    _wait_for(lambda: stdout.exists() and stdout.read_text() == "ready\n")
    time.sleep(0.5)  # acpid starts right before the command
    stub.Kill(pb.KillRequest(container_id=container_id, signal=15), timeout=30)
    termination = wait(stub, container_id, timeout=120)
    assert (termination.reason, termination.exit_code) == (pb.EXITED, 42), termination.message
    assert stdout.read_text() == "ready\ngot TERM\n"


def _libvirt_runtime(stub: pb_grpc.ContainerizerStub) -> pb.RuntimeInfo:
    runtimes = stub.Runtimes(pb.RuntimesRequest(), timeout=60).runtimes
    (runtime,) = [r for r in runtimes if r.name == "libvirt"]
    return runtime


def _decided_message(stub: pb_grpc.ContainerizerStub, *, deadline: float) -> str:
    """The libvirt runtime's message once the domain type is decided (or at the deadline)."""
    while True:
        message = _libvirt_runtime(stub).message
        if "virt_type=deciding" not in message or time.monotonic() > deadline:
            return message
        time.sleep(0.05)


def test_kvm_verdict_is_remembered_and_start_and_runtimes_never_wait_for_it(
    libvirtd: PrivateLibvirtd, tmp_path: Path, container_id: str
) -> None:
    """The KVM probe boots a guest (on this host it hangs until the probe's timeout): start
    and `runtimes` answer at once, a launch waits for the verdict, the next start reuses it."""
    probe_timeout = 6.0
    started = time.monotonic()
    service = _start_service(tmp_path, libvirtd, "auto", f"kvm_probe_timeout = {probe_timeout}\n")
    try:
        stub = service.stub()
        runtime = _libvirt_runtime(stub)
        assert time.monotonic() - started < probe_timeout, runtime.message
        assert runtime.healthy, runtime.message
        # What confines a workload here: a guest kernel of its own, and libvirt's hold on QEMU.
        assert "virtual machine" in runtime.confinement and "dac" in runtime.confinement
        reply = _launch(stub, container_id, "exit 0")  # waits for the verdict, then boots
        assert reply.status.state == pb.RUNNING
        assert wait(stub, container_id, timeout=180).exit_code == 0
        decided = _libvirt_runtime(stub).message
        assert "virt_type=kvm" in decided or "virt_type=qemu" in decided, decided
        verdict = json.loads((service.state_dir / "libvirt" / "virt-type.json").read_text())
        for part in ("host ", "qemu QEMU emulator version", "kvm /dev/kvm", "guest "):
            assert part in verdict["key"]

        service.stop()
        started = time.monotonic()
        service.start()
        remembered = _decided_message(service.stub(), deadline=started + 2 * probe_timeout)
        # Reading the remembered verdict asks `qemu --version` (the key), a moment; a probe
        # would be a guest boot and would not say "(cached probe)".
        assert "(cached probe)" in remembered and decided.split(" (")[0] in remembered
    finally:
        service.stop()
        service.remove_cgroup_roots()


def test_a_launch_libvirt_refuses_fails_at_once_with_libvirts_message(
    libvirtd: PrivateLibvirtd, tmp_path: Path, container_id: str
) -> None:
    """QEMU cannot start (a kernel file that is no kernel): libvirt refuses the domain and the
    launch fails within seconds through the CLI, with QEMU's words, leaving nothing behind."""
    not_a_kernel = tmp_path / "not-a-kernel"
    not_a_kernel.write_bytes(bytes(8192))  # QEMU: "linux kernel too old to load a ram disk"
    service = _start_service(tmp_path / "service", libvirtd, "qemu", kernel=not_a_kernel)
    try:
        cli = [str(BIN / "containerizer"), "--endpoint", service.endpoint]
        started = time.monotonic()
        completed = subprocess.run(
            [*cli, "run", "--id", container_id, "--", "true"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert time.monotonic() - started < 10, completed.stderr
        assert completed.returncode != 0
        assert "kernel too old" in completed.stderr, completed.stderr
        termination = wait(service.stub(), container_id)
        assert termination.reason == pb.LAUNCH_FAILED
        assert "kernel too old" in termination.message
        assert f"containerizer-{container_id}" not in _domain_names(libvirtd)
        assert not _run_dir(service, container_id).exists()
    finally:
        service.stop()
        service.remove_cgroup_roots()


def test_partitions_get_their_parents_cpus_and_memory_nodes(tmp_path: Path) -> None:
    """On cgroup v1 a new cpuset group is empty unless its parent's clone_children is 1, and
    no task can join an empty one (ENOSPC): QEMU could not join libvirt's group below ours."""
    require_root()
    cpuset = parse_mountinfo(MOUNTINFO.read_text()).v1.get("cpuset")
    require(cpuset is not None, "needs a cgroup v1 cpuset hierarchy")
    assert cpuset is not None
    root = run_scoped_name()
    outer = cpuset / f"{root}.partition"
    try:
        cgroups.ensure_partition(f"/{root}")
        # A fresh host's state, whatever this one's mount root says: the kernel copies nothing.
        (outer / "cgroup.clone_children").write_text("0")
        cgroups.ensure_partition(f"/{root}/inner")
        inner = outer / "inner.partition"
        for name in ("cpuset.cpus", "cpuset.mems"):
            expected = (cpuset / name).read_text().strip()
            assert expected and (inner / name).read_text().strip() == expected
        sleeper = subprocess.Popen(["sleep", "60"])
        try:
            (inner / "tasks").write_text(str(sleeper.pid))
            assert str(sleeper.pid) in (inner / "tasks").read_text().split()
        finally:
            sleeper.kill()
            sleeper.wait()
    finally:
        assert remove_cgroup_trees(root, f"{root}.*") == []


# A run of the fixtures killed halfway: a daemon, a service, a guest, then kill -9 of it all.
# It also ends, without any teardown, when its parent does (stdin closes).
PREVIOUS_RUN = r"""
import json, os, sys
from pathlib import Path
from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from tests.integration.libvirtd import PrivateLibvirtd, libvirt_service
workdir = Path(sys.argv[1])
daemon = PrivateLibvirtd(workdir / "libvirtd")
daemon.start()
service = libvirt_service(daemon, workdir / "service")
service.start()
request = pb.LaunchRequest(container_id="left", command=pb.CommandInfo(shell="sleep 1000"))
status = service.stub().Launch(request, timeout=120).status
left = {"qemu": status.pid, "daemon": daemon.process.pid, "service": service.process.pid}
print(json.dumps({**left, "cgroups_root": service.cgroups_root}), flush=True)
sys.stdin.read()
os._exit(1)
"""


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _cgroups_named(root: str) -> list[Path]:
    return [p for mount in hierarchy_mounts() for p in mount.glob(f"{root}*")]


def test_what_a_run_killed_halfway_left_is_swept_by_the_next(
    libvirtd: PrivateLibvirtd, tmp_path: Path
) -> None:
    previous_run = uuid.uuid4().hex[:8]  # a run of its own, as a killed earlier run would be
    with (tmp_path / "previous.err").open("wb") as errors:
        previous = subprocess.Popen(
            [sys.executable, "-c", PREVIOUS_RUN, str(tmp_path)],
            cwd=REPO,
            # A registry of its own: a concurrent run's sweep must not take the record first.
            env={
                **os.environ,
                "CTZ_TEST_RUN_ID": previous_run,
                "CONTAINERIZER_TEST_RUN_REGISTRY": str(tmp_path / "runs"),
            },
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors,
            start_new_session=True,
        )
    try:
        assert previous.stdout is not None
        ready, _, _ = select.select([previous.stdout], [], [], 120)
        line = previous.stdout.readline() if ready else b""
    finally:
        previous.kill()  # halfway: none of its teardown runs
        previous.wait()
        for pipe in (previous.stdin, previous.stdout):
            if pipe is not None:
                pipe.close()
    assert line, (tmp_path / "previous.err").read_text()
    left = json.loads(line)
    pids = [left["qemu"], left["daemon"], left["service"]]
    assert all(_alive(pid) for pid in pids) and _cgroups_named(left["cgroups_root"])

    swept = sweep_dead_runs(tmp_path / "runs")

    assert previous_run in [run.run_id for run in swept], swept
    assert not [pid for pid in pids if _alive(pid)]
    assert _cgroups_named(left["cgroups_root"]) == []
    assert libvirtd.record is not None and libvirtd.record.lock_path.exists()  # ours: alive
    _domain_names(libvirtd)  # and our daemon still answers
