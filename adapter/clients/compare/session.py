"""The calls compare makes, and the containers it owns on one runtime.

Every container compare launches carries an owner label (this process' pid and start time) and
is remembered by its RuntimeSession, which removes it — Destroy, then Destroy again to drop the
retained termination, so the service's Containers list is left as it was found. A compare run
that was killed (kill -9, a crash) cannot clean up; the next run sweeps containers whose owner
process is gone (sweep_orphans).
"""

from __future__ import annotations

import contextlib
import itertools
import secrets
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from adapter.clients.compare.workloads import Workload

if TYPE_CHECKING:
    from adapter.api.containerizer.v1 import containerizer_pb2 as pb

OWNER_LABEL = "containerizer.compare/owner"
# Destroy answers NOT_FOUND once the record is gone; three calls cover running -> terminated
# -> forgotten with one to spare for a container that was still launching.
MAX_DESTROY_CALLS = 3
SANDBOX_POLL_SECONDS = 0.05


class RpcFailure(Exception):
    """A call the service refused or did not answer: the status code name and its details."""

    def __init__(self, method: str, code: str, details: str) -> None:
        super().__init__(f"{method}: {code}: {details}")
        self.code = code


class ServiceCalls:
    """Unary calls on one channel, each bounded by `timeout`; grpc errors become RpcFailure."""

    def __init__(self, stub: Any, timeout: float) -> None:
        self.stub = stub
        self.timeout = timeout

    def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        import grpc

        try:
            return getattr(self.stub, method)(request, timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            code = exc.code()
            raise RpcFailure(method, code.name, exc.details() or code.name) from None


def owner_token() -> str:
    """This process as an owner: pid and start time, so a recycled pid is not mistaken for us."""
    process = psutil.Process()
    return f"{process.pid}:{process.create_time():.2f}"


def owner_is_alive(token: str) -> bool:
    pid_text, _, started = token.partition(":")
    try:
        process = psutil.Process(int(pid_text))
        return f"{process.create_time():.2f}" == started
    except (ValueError, psutil.Error):
        return False


class RuntimeSession:
    """Launches workloads on one runtime and removes every container it launched."""

    def __init__(self, calls: ServiceCalls, runtime: str, image: str, owner: str) -> None:
        self.calls = calls
        self.runtime = runtime
        self.image = image
        self.owner = owner
        self.run_tag = secrets.token_hex(3)
        self._sequence = itertools.count()
        self._lock = threading.Lock()
        self._owned: set[str] = set()

    def id_prefix(self, purpose: str) -> str:
        """Every id of this session and purpose starts with this; the run tag keeps two compare
        runs against one service apart."""
        return f"compare-{self.runtime}-{self.run_tag}-{purpose}-"

    def new_id(self, purpose: str) -> str:
        return f"{self.id_prefix(purpose)}{next(self._sequence)}"

    def launch(self, workload: Workload, container_id: str = "") -> pb.ContainerStatus:
        container_id = container_id or self.new_id(workload.purpose)
        with self._lock:
            self._owned.add(container_id)
        request = workload.request(
            container_id, self.runtime, self.image, {OWNER_LABEL: self.owner}
        )
        status: pb.ContainerStatus = self.calls.call("Launch", request).status
        return status

    def wait(self, container_id: str, timeout: float | None = None) -> pb.Termination:
        from adapter.api.containerizer.v1 import containerizer_pb2 as pb

        request = pb.WaitRequest(container_id=container_id)
        termination: pb.Termination = self.calls.call("Wait", request, timeout).termination
        return termination

    def usage(self, container_id: str) -> pb.ResourceStatistics:
        from adapter.api.containerizer.v1 import containerizer_pb2 as pb

        request = pb.UsageRequest(container_id=container_id)
        statistics: pb.ResourceStatistics = self.calls.call("Usage", request).statistics
        return statistics

    def destroy(self, container_id: str) -> pb.Termination:
        """Kill a running container (or acknowledge an ended one); returns its termination."""
        from adapter.api.containerizer.v1 import containerizer_pb2 as pb

        request = pb.DestroyRequest(container_id=container_id)
        termination: pb.Termination = self.calls.call("Destroy", request).termination
        return termination

    def remove(self, container_id: str) -> None:
        """Destroy until the service no longer knows the container."""
        remove_container(self.calls, container_id)
        with self._lock:
            self._owned.discard(container_id)

    def remove_all(self) -> list[str]:
        """Remove whatever this session still owns; returns the ids that would not go."""
        with self._lock:
            owned = sorted(self._owned)
        stuck = []
        for container_id in owned:
            try:
                self.remove(container_id)
            except RpcFailure:
                stuck.append(container_id)
        return stuck


def remove_container(calls: ServiceCalls, container_id: str) -> None:
    from adapter.api.containerizer.v1 import containerizer_pb2 as pb

    for _ in range(MAX_DESTROY_CALLS):
        try:
            calls.call("Destroy", pb.DestroyRequest(container_id=container_id))
        except RpcFailure as exc:
            if exc.code == "NOT_FOUND":
                return
            raise
    raise RpcFailure("Destroy", "ABORTED", f"{container_id} is still listed after destroy")


def sweep_orphans(calls: ServiceCalls) -> list[str]:
    """Remove containers left by compare runs that died before cleaning up; returns their ids."""
    from adapter.api.containerizer.v1 import containerizer_pb2 as pb

    swept = []
    for status in calls.call("Containers", pb.ContainersRequest()).containers:
        owner = status.labels.get(OWNER_LABEL)
        if owner and not owner_is_alive(owner):
            with contextlib.suppress(RpcFailure):
                remove_container(calls, status.container_id)
                swept.append(status.container_id)
    return swept


def wait_for_output(sandbox: str, marker: str, deadline_seconds: float) -> str | None:
    """The workload's stdout once it contains `marker` (the sandbox is a host directory by the
    API's contract); None if the marker did not come in time or the file cannot be read."""
    if not sandbox:
        return None
    stdout = Path(sandbox) / "stdout"
    deadline = time.monotonic() + deadline_seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            text = stdout.read_text(errors="replace")
            if marker in text.split():
                return text
        time.sleep(SANDBOX_POLL_SECONDS)
    return None
