"""Crash safety: kill -9 of the service while containers run, exit and are orphaned."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from tests.conftest import ServiceProcess
from tests.integration.api import destroy, launch, wait

pytestmark = pytest.mark.integration


def test_twenty_containers_survive_a_crash(fresh_service: ServiceProcess) -> None:
    stub = fresh_service.stub()
    # 5 exit while the service is down (each with its own code), 15 keep running.
    for n in range(5):
        launch(stub, f"exits-{n}", f"sleep 1; exit {10 + n}")
    for n in range(15):
        launch(stub, f"runs-{n}", "sleep 300")
    pids = {s.container_id: s.pid for s in stub.Containers(pb.ContainersRequest()).containers}
    fresh_service.kill()
    time.sleep(2)  # the five exit now, with nobody but their supervisors watching
    fresh_service.start()
    stub = fresh_service.stub()

    statuses = {s.container_id: s for s in stub.Containers(pb.ContainersRequest()).containers}
    assert len(statuses) == 20
    for n in range(5):
        termination = wait(stub, f"exits-{n}")
        assert (termination.reason, termination.exit_code) == (pb.EXITED, 10 + n)
    for n in range(15):
        cid = f"runs-{n}"
        assert statuses[cid].state == pb.RUNNING
        assert psutil.pid_exists(pids[cid])
        termination = destroy(stub, cid)
        assert termination.reason == pb.DESTROYED and termination.signal == signal.SIGKILL
    assert fresh_service.leftover_cgroups() == []
    assert not any(
        (p.info["cmdline"] or [])[:2] == ["sleep", "300"] and _in_cgroup(p.pid, fresh_service)
        for p in psutil.process_iter(["cmdline"])
    )


def _in_cgroup(pid: int, service: ServiceProcess) -> bool:
    try:
        return service.cgroups_root in Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return False


def test_sigterm_leaves_containers_running(fresh_service: ServiceProcess) -> None:
    stub = fresh_service.stub()
    reply = launch(stub, "keeps-running", "sleep 300")
    fresh_service.stop()
    assert psutil.pid_exists(reply.status.pid)
    fresh_service.start()
    stub = fresh_service.stub()
    status = stub.Status(pb.StatusRequest(container_id="keeps-running"), timeout=10)
    assert status.state == pb.RUNNING and status.pid == reply.status.pid
    stub.Usage(pb.UsageRequest(container_id="keeps-running"), timeout=10)
    assert destroy(stub, "keeps-running").reason == pb.DESTROYED


def test_lost_container_and_orphans_are_cleaned(fresh_service: ServiceProcess) -> None:
    stub = fresh_service.stub()
    reply = launch(stub, "will-be-lost", "sleep 300")
    fresh_service.kill()
    # The supervisor dies without writing a status (as after a node-level kill), and the
    # workload with it; also a cgroup with a process that no checkpoint knows appears.
    handle_pid = _supervisor_of(reply.status.pid)
    os.kill(handle_pid, signal.SIGKILL)
    os.kill(reply.status.pid, signal.SIGKILL)
    orphan = Path(f"/sys/fs/cgroup/pids/{fresh_service.cgroups_root}/orphan-x")
    orphan.mkdir()
    stray = subprocess.Popen(
        ["sh", "-c", f"echo $$ > {orphan}/cgroup.procs; exec sleep 300"],
        start_new_session=True,
    )
    time.sleep(0.3)
    fresh_service.start()
    termination = wait(fresh_service.stub(), "will-be-lost")
    assert termination.reason == pb.LOST
    assert stray.wait(timeout=10) == -signal.SIGKILL
    assert not orphan.exists()


def _supervisor_of(child_pid: int) -> int:
    parent = psutil.Process(child_pid).ppid()
    assert "containerizer-supervisor" in psutil.Process(parent).name()
    return parent
