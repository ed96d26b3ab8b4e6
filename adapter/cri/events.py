"""GetContainerEvents: the CRI's lifecycle events, which the kubelet's evented PLEG reads
instead of listing every container each second.

A container's every CRI state is an event: CREATED, STARTED, STOPPED (exited, also when its
start failed), DELETED. So is a pod's, with the pod's id as the container id, as containerd sends
them: CREATED and STARTED once it is ready, STOPPED, DELETED. Each event carries the pod's status
and the statuses of all its containers at that moment: the kubelet keeps them in its cache as
they come, and ignores an event without the pod's status.

Each subscriber has a bounded queue. One that falls QUEUE_LIMIT events behind is ended with
RESOURCE_EXHAUSTED: a stream that skipped events would leave the kubelet's cache wrong without
its knowing, an ended one makes it list again. Nothing is built while nobody listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeAlias

from adapter.cri import convert
from adapter.cri.api import cri
from adapter.cri.store import Container, Pod

QUEUE_LIMIT = 4096

EventType: TypeAlias = cri.ContainerEventType.ValueType

CREATED = cri.CONTAINER_CREATED_EVENT
STARTED = cri.CONTAINER_STARTED_EVENT
STOPPED = cri.CONTAINER_STOPPED_EVENT
DELETED = cri.CONTAINER_DELETED_EVENT

# The end of a subscription: the service stops, or the subscriber fell behind.
_END = None


class Subscription:
    def __init__(self, limit: int) -> None:
        self._queue: asyncio.Queue[cri.ContainerEventResponse | None] = asyncio.Queue()
        self._limit = limit
        self.overflowed = False

    def offer(self, event: cri.ContainerEventResponse) -> None:
        if self.overflowed:
            return
        if self._queue.qsize() >= self._limit:
            self.overflowed = True
            self._queue.put_nowait(_END)  # past the limit by one: the end must get through
            return
        self._queue.put_nowait(event)

    def end(self) -> None:
        self._queue.put_nowait(_END)

    async def next(self) -> cri.ContainerEventResponse | None:
        """The next event, or None at the end (see `overflowed`)."""
        return await self._queue.get()


class ContainerEvents:
    def __init__(
        self,
        containers_of: Callable[[str], Iterable[Container]],
        limit: int = QUEUE_LIMIT,
    ) -> None:
        self._containers_of = containers_of  # pod id -> its containers, as they are now
        self._limit = limit
        self._subscribers: set[Subscription] = set()

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[Subscription]:
        subscription = Subscription(self._limit)
        self._subscribers.add(subscription)
        try:
            yield subscription
        finally:
            self._subscribers.discard(subscription)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def publish(self, container_id: str, event_type: EventType, pod: Pod) -> None:
        """`container_id`'s event (a pod's own id for the pod's), with `pod`'s status and its
        containers' as they are now."""
        if not self._subscribers:
            return
        event = cri.ContainerEventResponse(
            container_id=container_id,
            container_event_type=event_type,
            created_at=time.time_ns(),
            pod_sandbox_status=convert.pod_status(pod),
            containers_statuses=[convert.container_status(c) for c in self._containers_of(pod.id)],
        )
        for subscription in self._subscribers:
            subscription.offer(event)

    def close(self) -> None:
        for subscription in self._subscribers:
            subscription.end()
