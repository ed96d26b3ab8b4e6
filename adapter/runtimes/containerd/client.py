"""The connection to containerd: one warm grpc.aio channel, the namespace and lease headers, and
the mapping of containerd's gRPC status codes to our error classes (by code, never by text).

containerd scopes every call by the `containerd-namespace` header, and protects what a call creates
from its garbage collector by the `containerd-lease` header.
"""

from __future__ import annotations

from typing import Any

import grpc

from adapter.api.containerd.services.containers.v1 import containers_pb2_grpc
from adapter.api.containerd.services.content.v1 import content_pb2_grpc
from adapter.api.containerd.services.diff.v1 import diff_pb2_grpc
from adapter.api.containerd.services.events.v1 import events_pb2_grpc
from adapter.api.containerd.services.images.v1 import images_pb2_grpc
from adapter.api.containerd.services.leases.v1 import leases_pb2_grpc
from adapter.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc
from adapter.api.containerd.services.tasks.v1 import tasks_pb2_grpc
from adapter.api.containerd.services.version.v1 import version_pb2_grpc
from adapter.core.errors import (
    AlreadyExists,
    ContainerizerError,
    FailedPrecondition,
    NotFound,
    Unavailable,
)

NAMESPACE_HEADER = "containerd-namespace"
LEASE_HEADER = "containerd-lease"
DEFAULT_TIMEOUT = 60.0
# Large enough for a content.Write chunk plus framing; containerd's own default is 16 MiB.
MAX_MESSAGE = 16 * 1024 * 1024

_ERRORS: dict[grpc.StatusCode, type[ContainerizerError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
}


def _stub(factory: Any, channel: grpc.aio.Channel) -> Any:
    """The generated stub classes are untyped; their methods are used as Any."""
    return factory(channel)


def socket_target(address: str) -> str:
    """containerd's config names a socket path; gRPC wants a unix: target."""
    return address if address.startswith("unix:") else f"unix:{address}"


class ContainerdClient:
    """The services of one containerd, scoped to one namespace."""

    def __init__(self, address: str, namespace: str) -> None:
        self.address = address
        self.namespace = namespace
        self._channel = grpc.aio.insecure_channel(
            socket_target(address),
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.max_send_message_length", MAX_MESSAGE),
            ],
        )
        self.containers = _stub(containers_pb2_grpc.ContainersStub, self._channel)
        self.content = _stub(content_pb2_grpc.ContentStub, self._channel)
        self.diff = _stub(diff_pb2_grpc.DiffStub, self._channel)
        self.events = _stub(events_pb2_grpc.EventsStub, self._channel)
        self.images = _stub(images_pb2_grpc.ImagesStub, self._channel)
        self.leases = _stub(leases_pb2_grpc.LeasesStub, self._channel)
        self.snapshots = _stub(snapshots_pb2_grpc.SnapshotsStub, self._channel)
        self.tasks = _stub(tasks_pb2_grpc.TasksStub, self._channel)
        self.version = _stub(version_pb2_grpc.VersionStub, self._channel)

    def metadata(self, lease: str | None = None) -> tuple[tuple[str, str], ...]:
        headers = ((NAMESPACE_HEADER, self.namespace),)
        return (*headers, (LEASE_HEADER, lease)) if lease else headers

    async def call(
        self,
        method: Any,
        request: Any,
        what: str,
        *,
        lease: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> Any:
        """One unary RPC; containerd's status becomes our error class, naming `what`."""
        try:
            return await method(request, metadata=self.metadata(lease), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise self.error(exc, what) from exc

    def error(self, exc: grpc.aio.AioRpcError, what: str) -> ContainerizerError:
        code = exc.code()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return Unavailable(
                f"containerd at {self.address} is unreachable ({what}): {exc.details()};"
                " is containerd running and is runtimes.containerd.address right?"
            )
        cls = _ERRORS.get(code, ContainerizerError)
        return cls(f"containerd: {what}: {exc.details()}")

    async def close(self) -> None:
        await self._channel.close()
