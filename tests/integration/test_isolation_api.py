"""The native runtime's isolation through the API: limits enforced, limitations reported, usage
measured. Live updates are the conformance suite's (tests/conformance)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from tests.conftest import ServiceProcess
from tests.integration.api import destroy, launch, usage, wait

pytestmark = pytest.mark.integration
MIB = 1024 * 1024


def cgroup_file(service: ServiceProcess, controller: str, cid: str, name: str) -> str:
    return Path(f"/sys/fs/cgroup/{controller}/{service.cgroups_root}/{cid}/{name}").read_text()


def test_memory_limit_ends_with_limitation(service: ServiceProcess, container_id: str) -> None:
    stub = service.stub()
    launch(stub, container_id, "head -c 200m /dev/zero | tail > /dev/null; sleep 300", mem=64)
    termination = wait(stub, container_id)
    assert termination.reason == pb.LIMITATION_MEMORY
    assert termination.killed and list(termination.limited_resources) == ["mem"]
    assert "64" in termination.message  # the limit is named
    assert not [p for p in service.leftover_cgroups() if p.name == container_id]


def test_touched_memory_shows_in_usage(service: ServiceProcess, container_id: str) -> None:
    stub = service.stub()
    launch(stub, container_id, 'held=$(head -c 220m /dev/zero | tr "\\0" x); sleep 300', mem=512)
    deadline = time.monotonic() + 15
    peak = 0
    while time.monotonic() < deadline and peak < 200 * MIB:
        peak = max(peak, usage(stub, container_id).mem_rss_bytes)
        time.sleep(0.1)
    assert peak >= 200 * MIB
    destroy(stub, container_id)


def test_busy_loop_accounts_user_time(service: ServiceProcess, container_id: str) -> None:
    stub = service.stub()
    launch(stub, container_id, "while :; do :; done", cpus=1)
    time.sleep(1)
    stats = usage(stub, container_id)
    assert stats.cpus_user_time_secs >= 0.1
    assert stats.cpus_system_time_secs < stats.cpus_user_time_secs
    assert stats.cpus_limit == 1 and stats.processes >= 1
    destroy(stub, container_id)


def test_urandom_accounts_system_time(service: ServiceProcess, container_id: str) -> None:
    stub = service.stub()
    launch(stub, container_id, "cat /dev/urandom > /dev/null", cpus=1)
    time.sleep(1)
    stats = usage(stub, container_id)
    assert stats.cpus_system_time_secs > stats.cpus_user_time_secs
    destroy(stub, container_id)


def test_cfs_quota_holds_half_a_cpu(tmp_path: Path) -> None:
    service = ServiceProcess(tmp_path, extra_config="cgroups_enable_cfs = true")
    service.start()
    try:
        stub = service.stub()
        launch(stub, "half", "while :; do :; done", cpus=0.5)
        time.sleep(0.3)
        before = usage(stub, "half")
        time.sleep(1)
        after = usage(stub, "half")
        used = (after.cpus_user_time_secs + after.cpus_system_time_secs) - (
            before.cpus_user_time_secs + before.cpus_system_time_secs
        )
        wall = after.timestamp - before.timestamp
        assert 0.3 <= used / wall <= 0.6
        assert after.cpus_nr_periods > 0  # CFS is on; the upper bound above shows the cap
        assert cgroup_file(service, "cpu", "half", "cpu.cfs_quota_us").strip() == "50000"
        destroy(stub, "half")
    finally:
        service.stop()
        service.remove_cgroup_roots()


def test_fork_bomb_is_contained(service: ServiceProcess, container_id: str) -> None:
    stub = service.stub()
    # `exec`: a forked sleep could be refused once the bomb fills the limit, and the container
    # would end by itself before the destroy this test is about.
    launch(stub, container_id, "bomb() { bomb | bomb & }; bomb; exec sleep 300", pids=50)
    deadline = time.monotonic() + 15  # until the bomb has run into the limit at least once
    while time.monotonic() < deadline:
        if cgroup_file(service, "pids", container_id, "pids.events").split()[1] != "0":
            break
        time.sleep(0.1)
    assert int(cgroup_file(service, "pids", container_id, "pids.current")) <= 50
    termination = destroy(stub, container_id)
    # Refused forks kill nothing: it ended because it was destroyed, the limit is noted.
    assert termination.reason == pb.DESTROYED
    assert "Task limit reached: pids.max 50" in termination.message
    assert list(termination.limited_resources) == ["pids"]
    assert not [p for p in service.leftover_cgroups() if p.name == container_id]


def test_destroy_with_a_member_traced_from_the_host(
    service: ServiceProcess, container_id: str
) -> None:
    """A member under a tracer does not hold up destroy. The tracer is the host's: a confined
    workload may not ptrace (seccomp, no SYS_PTRACE). A stopped member is the conformance
    suite's ("destroy")."""
    stub = service.stub()
    launch(stub, container_id, "sleep 301 & sleep 300")
    time.sleep(0.5)
    members = cgroup_file(service, "pids", container_id, "cgroup.procs").split()
    tracee = next(
        p for p in members if Path(f"/proc/{p}/cmdline").read_bytes() == b"sleep\x00301\x00"
    )
    tracer = subprocess.Popen(
        ["strace", "-p", tracee, "-o", "/dev/null"], stderr=subprocess.DEVNULL
    )
    try:
        time.sleep(0.5)
        statuses = [Path(f"/proc/{pid}/status").read_text() for pid in members]
        assert any("TracerPid:\t0\n" not in status for status in statuses)
        termination = destroy(stub, container_id)
    finally:
        tracer.kill()
        tracer.wait()
    assert termination.reason == pb.DESTROYED
    assert not [p for p in service.leftover_cgroups() if p.name == container_id]
