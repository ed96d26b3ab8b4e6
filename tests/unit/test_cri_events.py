"""GetContainerEvents' hub (adapter/cri/events.py): an event is built only for subscribers, once,
with its pod's status and every container's of that pod; a subscriber that falls behind its
limit is ended; closing ends every subscription."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from adapter.cri import events
from adapter.cri.api import cri
from adapter.cri.events import ContainerEvents
from adapter.cri.runtime import CriRuntimeService
from adapter.cri.store import CREATED, EXITED, POD_NOTREADY, RUNNING, Container, Pod

IMAGE = "localhost/busybox:latest"
DIGEST = "sha256:" + "ab" * 32


def pod_record(pod_id: str = "pod-1", state: str = "SANDBOX_READY") -> Pod:
    config = cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name="web", namespace="shop", uid=f"uid-{pod_id}"),
        labels={"app": "web"},
    )
    return Pod(
        id=pod_id,
        config=config.SerializeToString(),
        runtime_handler="native",
        created_at=1_700_000_000_000_000_000,
        state=state,
        ip="10.88.0.7",
    )


def container_record(
    container_id: str, pod_id: str = "pod-1", state: str = RUNNING, exit_code: int = 0
) -> Container:
    config = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name=f"name-{container_id}"),
        image=cri.ImageSpec(image=IMAGE),
    )
    return Container(
        id=container_id,
        pod_id=pod_id,
        config=config.SerializeToString(),
        image_ref=IMAGE,
        image_id=DIGEST,
        created_at=1_700_000_001_000_000_000,
        state=state,
        exit_code=exit_code,
    )


class Containers:
    """The hub's `containers_of`: the records by pod, and every pod it was asked about."""

    def __init__(self, records: Iterable[Container] = ()) -> None:
        self.records = list(records)
        self.asked: list[str] = []

    def __call__(self, pod_id: str) -> list[Container]:
        self.asked.append(pod_id)
        return [c for c in self.records if c.pod_id == pod_id]


# Only against a hang: what is awaited is there already, or is woken by what the test does.
GUARD = 10


async def received(subscription: events.Subscription) -> cri.ContainerEventResponse | None:
    return await asyncio.wait_for(subscription.next(), GUARD)


async def ended(subscription: events.Subscription) -> bool:
    """Whether nothing is queued for `subscription` before its end (ended here)."""
    subscription.end()
    return await received(subscription) is None


async def test_nothing_is_built_while_nobody_listens() -> None:
    def containers_of(pod_id: str) -> list[Container]:
        raise AssertionError(f"containers of {pod_id} asked for without subscribers")

    hub = ContainerEvents(containers_of)
    assert hub.subscribers == 0
    hub.publish("c-1", events.STARTED, pod_record())
    hub.publish("pod-1", events.DELETED, pod_record())


async def test_every_subscriber_gets_the_event_with_the_pods_status_and_all_its_containers() -> (
    None
):
    containers = Containers(
        [
            container_record("c-run", state=RUNNING),
            container_record("c-done", state=EXITED, exit_code=3),
            container_record("c-new", state=CREATED),
            container_record("c-other", pod_id="pod-2"),
        ]
    )
    hub = ContainerEvents(containers)
    with hub.subscribe() as first, hub.subscribe() as second:
        assert hub.subscribers == 2
        before = time.time_ns()
        hub.publish("c-done", events.STOPPED, pod_record())
        after = time.time_ns()
        one, other = await received(first), await received(second)
    assert containers.asked == ["pod-1"], "built once for both"
    assert one is not None
    assert one == other
    assert (one.container_id, one.container_event_type) == ("c-done", cri.CONTAINER_STOPPED_EVENT)
    assert before <= one.created_at <= after
    pod = one.pod_sandbox_status
    assert (pod.id, pod.metadata.name, pod.metadata.uid) == ("pod-1", "web", "uid-pod-1")
    assert (pod.state, pod.network.ip, pod.created_at) == (
        cri.SANDBOX_READY,
        "10.88.0.7",
        1_700_000_000_000_000_000,
    )
    assert dict(pod.labels) == {"app": "web"}
    statuses = {s.id: (s.state, s.exit_code, s.metadata.name) for s in one.containers_statuses}
    assert statuses == {
        "c-run": (cri.CONTAINER_RUNNING, 0, "name-c-run"),
        "c-done": (cri.CONTAINER_EXITED, 3, "name-c-done"),
        "c-new": (cri.CONTAINER_CREATED, 0, "name-c-new"),
    }


async def test_a_pods_own_event_carries_its_state_at_that_moment() -> None:
    hub = ContainerEvents(Containers())
    with hub.subscribe() as subscription:
        hub.publish("pod-1", events.STOPPED, pod_record(state=POD_NOTREADY))
        event = await received(subscription)
    assert event is not None
    assert (event.container_id, event.container_event_type) == (
        "pod-1",
        cri.CONTAINER_STOPPED_EVENT,
    )
    assert event.pod_sandbox_status.state == cri.SANDBOX_NOTREADY
    assert list(event.containers_statuses) == []


async def test_a_subscription_leaves_the_hub_with_its_block() -> None:
    containers = Containers([container_record("c-1")])
    hub = ContainerEvents(containers)
    with hub.subscribe() as staying:
        with hub.subscribe() as leaving:
            assert hub.subscribers == 2
        assert hub.subscribers == 1
        hub.publish("c-1", events.STARTED, pod_record())
        event = await received(staying)
        assert event is not None and event.container_id == "c-1"
        assert await ended(leaving), "an event reached a subscription that had left"
    assert hub.subscribers == 0
    hub.publish("c-1", events.STOPPED, pod_record())
    assert containers.asked == ["pod-1"], "nothing built once the last one left"
    assert await ended(staying)


async def test_a_subscriber_that_falls_behind_its_limit_is_ended() -> None:
    hub = ContainerEvents(Containers(), limit=2)
    with hub.subscribe() as behind, hub.subscribe() as reading:
        for number in range(1, 5):
            hub.publish(f"c-{number}", events.CREATED, pod_record())
            if number == 2:
                assert not behind.overflowed, "two unread events are within the limit"
            event = await received(reading)
            assert event is not None and event.container_id == f"c-{number}"
        assert behind.overflowed
        read = [await received(behind) for _ in range(3)]
        assert [e.container_id if e else None for e in read] == ["c-1", "c-2", None]
        hub.publish("c-5", events.CREATED, pod_record())
        assert await ended(behind), "events queued after the overflow"
        assert not reading.overflowed, "one that keeps up goes on"
        event = await received(reading)
        assert event is not None and event.container_id == "c-5"


async def test_close_ends_every_subscription() -> None:
    hub = ContainerEvents(Containers())
    with hub.subscribe() as unread, hub.subscribe() as waiting:
        pending = asyncio.create_task(received(waiting))
        hub.publish("c-1", events.DELETED, pod_record())
        assert (await pending) is not None
        pending = asyncio.create_task(received(waiting))
        await asyncio.sleep(0)  # the reader waits for the next event
        hub.close()
        assert await pending is None, "a waiting reader is woken by the end"
        event = await received(unread)
        assert event is not None and event.container_id == "c-1", "queued events come first"
        assert await received(unread) is None
        assert not unread.overflowed and not waiting.overflowed


class Aborted(Exception):
    pass


class StreamContext:
    """The part of grpc.aio's ServicerContext that GetContainerEvents uses."""

    def __init__(self) -> None:
        self.written: list[cri.ContainerEventResponse] = []
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    async def write(self, message: cri.ContainerEventResponse) -> None:
        self.written.append(message)

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise Aborted


async def subscribed(hub: ContainerEvents) -> None:
    """Once the RPC's task has subscribed (it does at its first step)."""
    for _ in range(10):
        if hub.subscribers:
            return
        await asyncio.sleep(0)
    raise AssertionError("the RPC did not subscribe")


def service(hub: ContainerEvents) -> CriRuntimeService:
    runtime: Any = SimpleNamespace(events=hub, pods=None, containers=None)
    return CriRuntimeService(runtime)


async def test_the_rpc_streams_until_the_end_and_leaves_the_hub() -> None:
    hub = ContainerEvents(Containers())
    context = StreamContext()
    rpc = asyncio.create_task(service(hub).GetContainerEvents(cri.GetEventsRequest(), context))
    await subscribed(hub)
    hub.publish("c-1", events.CREATED, pod_record())
    hub.close()
    await asyncio.wait_for(rpc, GUARD)
    assert [e.container_id for e in context.written] == ["c-1"]
    assert context.aborted is None
    assert hub.subscribers == 0


async def test_the_rpc_of_a_subscriber_that_fell_behind_ends_with_resource_exhausted() -> None:
    hub = ContainerEvents(Containers(), limit=2)
    context = StreamContext()
    rpc = asyncio.create_task(service(hub).GetContainerEvents(cri.GetEventsRequest(), context))
    await subscribed(hub)
    for number in range(3):  # published before the stream reads any
        hub.publish(f"c-{number}", events.CREATED, pod_record())
    with pytest.raises(Aborted):
        await asyncio.wait_for(rpc, GUARD)
    assert [e.container_id for e in context.written] == ["c-0", "c-1"]
    assert context.aborted is not None
    assert context.aborted[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert hub.subscribers == 0


async def test_a_cancelled_rpc_leaves_the_hub() -> None:
    hub = ContainerEvents(Containers())
    rpc = asyncio.create_task(
        service(hub).GetContainerEvents(cri.GetEventsRequest(), StreamContext())
    )
    await subscribed(hub)
    rpc.cancel()  # as grpc.aio does when the client goes
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(rpc, GUARD)
    assert hub.subscribers == 0
