"""The libvirt runtime end to end: a private libvirtd, QEMU (TCG here), real guests.

Guest boots are the expensive part (~4-5 s each under TCG), so the tests share one libvirtd and
one service per xdist worker, and each boot checks as much as it can: five boots in all.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.api.containerizer.v1 import containerizer_pb2_grpc as pb_grpc
from tests.conftest import ServiceProcess
from tests.integration.api import destroy, scalar, wait
from tests.integration.libvirtd import PrivateLibvirtd, libvirt_config, libvirtd

__all__ = ["libvirtd"]  # the shared session fixture, used by name

pytestmark = pytest.mark.integration

HOSTILE = "<a>&amp; \"q\" 'q' ]]> <!-- x --> </domain>\nline2 $(reboot) `id` %s \\"


def _service_config(daemon: PrivateLibvirtd, virt_type: str) -> str:
    return libvirt_config(daemon, virt_type) + "kvm_probe_timeout = 8.0\n"


def _start_service(workdir: Path, daemon: PrivateLibvirtd, virt_type: str) -> ServiceProcess:
    """virt_type "auto" runs the KVM probe (~8 s here, where KVM hangs): once per session."""
    process = ServiceProcess(workdir, extra_config=_service_config(daemon, virt_type))
    process.start()
    return process


@pytest.fixture(scope="session")
def vm_service(
    tmp_path_factory: pytest.TempPathFactory, libvirtd: PrivateLibvirtd
) -> Iterator[ServiceProcess]:
    process = _start_service(tmp_path_factory.mktemp("vm-service"), libvirtd, "auto")
    yield process
    try:
        process.destroy_all()
    finally:
        process.stop()


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
    assert "virt_type=qemu" in fingerprint.message  # KVM hangs on this host: the probe says so

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

    from adapter.drivers.libvirt.domain import METADATA_NAMESPACE, parse_metadata

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


def test_recovery_after_kill_9(libvirtd: PrivateLibvirtd, tmp_path: Path) -> None:
    service = _start_service(tmp_path, libvirtd, "qemu")
    try:
        stub = service.stub()
        _launch(stub, "ends-while-down", "exit 7")
        _launch(stub, "keeps-running", "sleep 1000")
        service.kill()  # kill -9: nobody listens to libvirt now
        _wait_for(lambda: "containerizer-ends-while-down" not in _domain_names(libvirtd))
        service.start()
        stub = service.stub()
        termination = wait(stub, "ends-while-down")
        assert (termination.reason, termination.exit_code) == (pb.EXITED, 7), termination.message
        status = stub.Status(pb.StatusRequest(container_id="keeps-running"), timeout=10)
        assert status.state == pb.RUNNING
        assert "containerizer-keeps-running" in _domain_names(libvirtd)
        stub.Usage(pb.UsageRequest(container_id="keeps-running"), timeout=30)
        assert destroy(stub, "keeps-running").reason == pb.DESTROYED
        names = _domain_names(libvirtd)
        assert not {"containerizer-ends-while-down", "containerizer-keeps-running"} & names
        assert list((service.state_dir / "libvirt" / "run").iterdir()) == []
    finally:
        service.stop()
        libvirtd.destroy_domains("containerizer-keeps-running")
