"""Destroy on the native runtime kills every process in the container's cgroups. Its init, pid 1
of the container's own pid namespace, goes first (the kernel ends the namespace with it); what
joined the cgroups from outside that namespace is left to the cgroup sweep after it, which must
still kill it, a fork bomb included. A fork bomb inside the namespace is test_isolation_api's."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from isolators.cgroups import files
from tests.conftest import ServiceProcess
from tests.integration.api import destroy, launch

pytestmark = pytest.mark.integration

FORK_BOMB = "bomb() { bomb | bomb & }; bomb; exec sleep 600"


def container_cgroups(service: ServiceProcess, container_id: str) -> list[Path]:
    return [p for p in service.leftover_cgroups() if p.name == container_id]


@pytest.fixture
def host_process() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Host processes a test starts, killed at its end if the test left them running."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


def join_from_host(
    cgroups: list[Path], script: str, started: list[subprocess.Popen[bytes]]
) -> subprocess.Popen[bytes]:
    """A host shell (in the host's pid namespace, not the container's) that writes itself into
    every cgroup of the container, then runs `script`; returned once the cgroups list it."""
    join = " ".join(f"echo $$ > {cgroup / 'cgroup.procs'};" for cgroup in cgroups)
    process = subprocess.Popen(["sh", "-c", f"{join} {script}"], stderr=subprocess.DEVNULL)
    started.append(process)
    deadline = time.monotonic() + 10
    while not all(process.pid in files.read_pids(cgroup) for cgroup in cgroups):
        assert process.poll() is None and time.monotonic() < deadline, "did not join"
        time.sleep(0.01)
    return process


def test_destroy_kills_a_host_process_that_joined_the_cgroups(
    service: ServiceProcess, container_id: str, host_process: list[subprocess.Popen[bytes]]
) -> None:
    stub = service.stub()
    launch(stub, container_id, "sleep 300")
    cgroups = container_cgroups(service, container_id)
    outsider = join_from_host(cgroups, "exec sleep 600", host_process)
    termination = destroy(stub, container_id)
    assert termination.reason == pb.DESTROYED and termination.killed
    assert outsider.wait(timeout=10) == -signal.SIGKILL
    assert container_cgroups(service, container_id) == []  # none could go with a member left


def test_destroy_kills_a_fork_bomb_that_joined_from_the_host(
    service: ServiceProcess, container_id: str, host_process: list[subprocess.Popen[bytes]]
) -> None:
    stub = service.stub()
    launch(stub, container_id, "sleep 300", pids=40)
    cgroups = container_cgroups(service, container_id)
    pids_cgroup = next(c for c in cgroups if (c / "pids.events").exists())
    outsider = join_from_host(cgroups, FORK_BOMB, host_process)
    deadline = time.monotonic() + 15  # until the bomb has run into the container's limit
    while files.read_kv(pids_cgroup / "pids.events").get("max", 0) == 0:
        assert time.monotonic() < deadline, "the fork bomb never reached the pids limit"
        time.sleep(0.05)
    termination = destroy(stub, container_id)
    assert termination.reason == pb.DESTROYED
    assert outsider.wait(timeout=10) == -signal.SIGKILL
    assert container_cgroups(service, container_id) == []
