"""Lifecycle events: a bounded ring of the recent ones, each reader's bounded queue, observers.

A reader that falls behind is never dropped from silently: once its queue is full, the events it
cannot take are counted, and it receives a Missed(count) where they would have been, then the
events that came after. Observers (metrics, the service log) are called synchronously on every
event: they never miss one.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from adapter.core.model import State, Termination

# How many recent events `since` can replay; at a few hundred bytes each, a few MB at most.
RING_EVENTS = 10_000
# How many events one reader may fall behind before it is told it missed some.
READER_QUEUE_EVENTS = 10_000


@dataclass(frozen=True)
class Event:
    timestamp: float
    container_id: str
    state: State
    termination: Termination | None = None
    runtime: str = ""


@dataclass(frozen=True)
class Missed:
    """In a reader's stream where `count` events were dropped because it fell behind."""

    count: int


Observer = Callable[[Event], None]


class _Reader:
    """One subscriber's queue: events, and at most one Missed at its tail, counting up. Only
    the events of `container_id` (None: all) are queued or counted as missed."""

    def __init__(self, limit: int, container_id: str | None) -> None:
        self.limit = limit
        self.container_id = container_id
        self.items: collections.deque[Event | Missed] = collections.deque()
        self.ready = asyncio.Event()
        self.queued_events = 0

    def offer(self, event: Event) -> None:
        if self.container_id not in (None, event.container_id):
            return
        if self.queued_events < self.limit:
            self.items.append(event)
            self.queued_events += 1
        elif self.items and isinstance(self.items[-1], Missed):
            self.items[-1] = Missed(self.items[-1].count + 1)
        else:
            self.items.append(Missed(1))
        self.ready.set()

    async def take(self) -> Event | Missed:
        while not self.items:
            self.ready.clear()
            await self.ready.wait()
        item = self.items.popleft()
        if isinstance(item, Event):
            self.queued_events -= 1
        return item


class EventHub:
    """Where the core publishes its lifecycle events."""

    def __init__(self, ring: int = RING_EVENTS, reader_queue: int = READER_QUEUE_EVENTS) -> None:
        self._recent: collections.deque[Event] = collections.deque(maxlen=ring)
        self._readers: set[_Reader] = set()
        self._observers: list[Observer] = []
        self._reader_queue = reader_queue

    def observe(self, observer: Observer) -> None:
        self._observers.append(observer)

    def publish(self, event: Event) -> None:
        self._recent.append(event)
        for observer in self._observers:
            observer(event)
        for reader in self._readers:
            reader.offer(event)

    async def follow(
        self, container_id: str | None = None, since: float | None = None
    ) -> AsyncIterator[Event | Missed]:
        """The events from now on; with `since`, first the kept ones at or after that time. The
        replay and the subscription happen without a suspension between: none falls between."""
        reader = _Reader(self._reader_queue, container_id)
        if since is not None:
            for event in self._recent:
                if event.timestamp >= since:
                    reader.offer(event)
        self._readers.add(reader)
        try:
            while True:
                yield await reader.take()
        finally:
            self._readers.discard(reader)
