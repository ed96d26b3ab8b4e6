"""How a container's end is reported, against the real service and native runtime: a destroy
a crash interrupted, a destroy after a pids limit, the termination message, a disk request on
native; and that a service's cgroups go with it even after a crash."""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psutil
import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.api.containerizer.v1 import containerizer_pb2_grpc as pb_grpc
from tests.cgroup_roots import hierarchy_mounts
from tests.conftest import BIN, CGROUP_MOUNT, ServiceProcess
from tests.integration.api import destroy, launch, wait

pytestmark = pytest.mark.integration

CRASH_CONTAINERS = 64


def checkpoint_destroys_in_flight(service: ServiceProcess) -> dict[str, str]:
    """After the kill: the Destroys the crash cut off before their checkpoint (records still
    RUNNING) are checkpointed DESTROYING, as a kill a moment later would have left them; that
    makes the interrupted case certain, however far the real destroys had got. Returns every
    container's state as the restart will find it."""
    database = sqlite3.connect(service.state_dir / "state.db")
    try:
        states = {}
        for cid, text in database.execute("SELECT container_id, record FROM containers"):
            record = json.loads(text)
            if record["state"] == "RUNNING":
                record["state"] = "DESTROYING"
                database.execute(
                    "UPDATE containers SET record = ? WHERE container_id = ?",
                    (json.dumps(record), cid),
                )
            states[cid] = record["state"]
        database.commit()
    finally:
        database.close()
    return states


class DestroyingCounter:
    """Follows the Events stream on a channel of its own; `reached` is set once `target`
    containers have been checkpointed DESTROYING."""

    def __init__(self, endpoint: str, target: int) -> None:
        self.reached = threading.Event()
        self._target = target
        self._channel = grpc.insecure_channel(endpoint)
        self._stream = pb_grpc.ContainerizerStub(self._channel).Events(pb.EventsRequest())
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        destroying: set[str] = set()
        with contextlib.suppress(grpc.RpcError):
            for event in self._stream:
                if event.state == pb.DESTROYING:
                    destroying.add(event.container_id)
                if len(destroying) >= self._target:
                    self.reached.set()

    def close(self) -> None:
        self._stream.cancel()
        self._channel.close()
        self._thread.join(timeout=10)


def test_destroys_a_crash_interrupted_end_destroyed(fresh_service: ServiceProcess) -> None:
    """Concurrent Destroys, kill -9 of the service while they run, restart: every container
    ends DESTROYED, none LOST (once the restart's destroy of an interrupted one had run, the
    runtime no longer knew it, and the watcher that asked only then read that as "lost")."""
    stub = fresh_service.stub()
    ids = [f"crash-destroy-{n}" for n in range(CRASH_CONTAINERS)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda cid: launch(stub, cid, "sleep 300"), ids))
    # Half are destroyed through the API, concurrently; the kill comes once half of those are
    # checkpointed DESTROYING. The other half stand for Destroys checkpointed at the moment of
    # the kill (see checkpoint_destroys_in_flight): at least that many are certainly cut off.
    live = ids[: CRASH_CONTAINERS // 2]
    counter = DestroyingCounter(fresh_service.endpoint, len(live) // 2)
    time.sleep(0.2)  # the stream is subscribed before the first Destroy
    destroyer = grpc.insecure_channel(fresh_service.endpoint)
    pool = ThreadPoolExecutor(len(live))
    try:
        for cid in live:
            pool.submit(_destroy_ignoring_the_crash, pb_grpc.ContainerizerStub(destroyer), cid)
        assert counter.reached.wait(timeout=60), "the Destroys never reached DESTROYING"
        fresh_service.kill()
    finally:
        counter.close()
        pool.shutdown(wait=True)
        destroyer.close()
    states = checkpoint_destroys_in_flight(fresh_service)
    interrupted = {cid for cid, state in states.items() if state == "DESTROYING"}
    assert len(interrupted) >= CRASH_CONTAINERS // 2, states

    fresh_service.start()
    stub = fresh_service.stub()
    reasons = {}
    for cid in ids:
        ended = wait(stub, cid)
        reasons[cid] = f"{pb.Reason.Name(ended.reason)}: {ended.message}"
        if cid in interrupted:
            assert ended.killed and ended.message.startswith("destroyed: "), ended.message
    assert {cid: r for cid, r in reasons.items() if not r.startswith("DESTROYED")} == {}
    assert fresh_service.leftover_cgroups() == []


def _destroy_ignoring_the_crash(stub: pb_grpc.ContainerizerStub, container_id: str) -> None:
    with contextlib.suppress(grpc.RpcError):  # the service is killed under most of them
        destroy(stub, container_id)


def test_a_destroy_after_the_pids_limit_was_hit_is_destroyed(
    service: ServiceProcess, container_id: str
) -> None:
    """Forks refused at pids.max kill nothing: the container ended because it was destroyed."""
    stub = service.stub()
    # The subshell forks until refused and gives up; the container's shell goes on, fork-free.
    script = "(for i in $(seq 16); do sleep 300 & done); exec sleep 300"
    launch(stub, container_id, script, pids=8)
    events = CGROUP_MOUNT / "pids" / service.cgroups_root / container_id / "pids.events"
    _wait_for(lambda: events.is_file() and "max 0" not in events.read_text())
    termination = destroy(stub, container_id)
    assert termination.reason == pb.DESTROYED, termination.message
    assert termination.killed and termination.signal == signal.SIGKILL
    assert list(termination.limited_resources) == ["pids"]
    assert termination.message.startswith("destroyed: killed by signal 9 (SIGKILL); ")
    assert "Task limit reached: pids.max 8" in termination.message


def test_the_termination_says_what_happened_once(
    service: ServiceProcess, container_id: str
) -> None:
    stub = service.stub()
    ids = {how: f"{container_id}-{how}" for how in ("code", "term", "destroyed")}
    launch(stub, ids["code"], "exit 3")
    launch(stub, ids["term"], "sleep 300")
    launch(stub, ids["destroyed"], "sleep 300")
    stub.Kill(pb.KillRequest(container_id=ids["term"], signal=signal.SIGTERM), timeout=10)
    messages = {
        "code": wait(stub, ids["code"]).message,
        "term": wait(stub, ids["term"]).message,
        "destroyed": destroy(stub, ids["destroyed"]).message,
    }
    assert messages == {
        "code": "exited with code 3",
        "term": "killed by signal 15 (SIGTERM)",
        "destroyed": "destroyed: killed by signal 9 (SIGKILL)",
    }
    cli = subprocess.run(
        [str(BIN / "containerizer"), "--endpoint", service.endpoint, "wait", ids["term"]],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.stdout == f"{ids['term']}: killed by signal 15 (SIGTERM)\n", cli.stderr


def test_a_disk_request_on_native_is_accepted_and_not_said_to_be_unenforced(
    service: ServiceProcess, container_id: str
) -> None:
    """Mesos agents always send disk; native enforces it (the disk isolator, whose limits
    tests/integration/test_disk_isolator.py tests), so neither the reply nor `runtimes` says it
    is not enforced there."""
    stub = service.stub()
    reply = launch(stub, container_id, "true", disk=1)
    assert not [w for w in reply.warnings if "disk" in w]
    wait(stub, container_id)
    destroy(stub, container_id)
    runtimes = stub.Runtimes(pb.RuntimesRequest(), timeout=60).runtimes
    native = [r for r in runtimes if r.name == "native"]
    assert native and not native[0].message.endswith("disk: not enforced")


def test_a_crashed_service_cgroups_are_removed_with_what_runs_in_them(tmp_path: Path) -> None:
    """What a fixture does after a failed test: the service died (kill -9), its container
    still runs in its cgroups, and a root named after its root exists (libvirt's partition).
    Removing the service's roots leaves no directory of them in any hierarchy."""
    service = ServiceProcess(tmp_path)
    service.start()
    try:
        reply = launch(service.stub(), "still-running", "sleep 300")
        partition = CGROUP_MOUNT / "memory" / f"{service.cgroups_root}.partition" / "machine"
        partition.mkdir(parents=True)
    finally:
        service.kill()
    workload = psutil.Process(reply.status.pid)
    service.remove_cgroup_roots()
    names = (service.cgroups_root, f"{service.cgroups_root}.partition")
    assert [m / n for m in hierarchy_mounts() for n in names if (m / n).exists()] == []
    workload.wait(timeout=10)  # killed: it was left in the cgroups


def _wait_for(condition: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
