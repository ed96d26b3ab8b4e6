"""In-memory state of the containerd driver: the containers it knows, the CRI logs among their
outputs, and the OOM kills containerd announced on its events stream.

The events stream is one Subscribe per driver, filtered to our namespace and the `/tasks/oom`
topic, reconnected when containerd restarts. An OOM can also happen while we are not subscribed
(the service was down); the driver therefore also reads the cgroup's counter at exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import grpc

from adapter.api.containerd.events import task_pb2
from adapter.api.containerd.services.events.v1 import events_pb2
from adapter.runtimes.containerd.client import ContainerdClient
from adapter.runtimes.containerd.handle import ContainerdHandle

log = logging.getLogger(__name__)
OOM_TOPIC = "/tasks/oom"
# containerd marshals events with its own type URLs, without `type.googleapis.com/`: compare the
# URL to the message's full name and decode the bytes, as Any.Unpack would refuse it.
OOM_TYPE_URL = task_pb2.TaskOOM.DESCRIPTOR.full_name
RESUBSCRIBE_DELAY = 1.0


class ContainerdState:
    def __init__(self) -> None:
        self.handles: dict[str, ContainerdHandle] = {}
        self.log_paths: dict[str, str] = {}  # a CRI container's log, which reopen waits for
        self._oom_killed: set[str] = set()  # containerd ids
        # Tasks whose exit a Wait returned (containerd ids): stopped, and with a private pid
        # namespace or the shim's kill of the rest at init's exit, nothing of them runs.
        self._exited: set[str] = set()
        self._subscriber: asyncio.Task[None] | None = None

    def mark_exited(self, containerd_id: str) -> None:
        self._exited.add(containerd_id)

    def exited(self, containerd_id: str) -> bool:
        return containerd_id in self._exited

    def forget_exit(self, containerd_id: str) -> None:
        self._exited.discard(containerd_id)

    def oom_killed(self, containerd_id: str) -> bool:
        return containerd_id in self._oom_killed

    def clear_oom(self, containerd_id: str) -> None:
        self._oom_killed.discard(containerd_id)

    def subscribe(self, client: ContainerdClient, on_oom: Callable[[str], Awaitable[None]]) -> None:
        """Start following OOM events, once; `on_oom(containerd_id)` ends the container
        (Mesos semantics: a container that hits its memory limit is terminated)."""
        if self._subscriber is None or self._subscriber.done():
            self._subscriber = asyncio.create_task(self._follow_oom_events(client, on_oom))

    async def _follow_oom_events(
        self, client: ContainerdClient, on_oom: Callable[[str], Awaitable[None]]
    ) -> None:
        ours = f'namespace=="{client.namespace}",topic=="{OOM_TOPIC}"'
        while True:
            try:
                stream = client.events.Subscribe(
                    events_pb2.SubscribeRequest(filters=[ours]), metadata=client.metadata()
                )
                async for envelope in stream:
                    if envelope.event.type_url == OOM_TYPE_URL:
                        oom = task_pb2.TaskOOM.FromString(envelope.event.value)
                        log.info("containerd: OOM kill in %s", oom.container_id)
                        self._oom_killed.add(oom.container_id)
                        await on_oom(oom.container_id)
            except grpc.aio.AioRpcError as exc:
                log.debug("containerd events stream ended: %s", exc.details())
            await asyncio.sleep(RESUBSCRIBE_DELAY)

    async def close(self) -> None:
        if self._subscriber is not None:
            self._subscriber.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._subscriber
