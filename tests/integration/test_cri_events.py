"""GetContainerEvents against a real service, through the CRI socket: a pod's and its containers'
lifecycle events in order, each with the pod's status and its containers' at that moment; a
stopped container and a failed start are STOPPED; streams are independent, one its client
cancels goes, and a stopping service ends them."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from adapter.cri.api import cri
from tests.integration.cri import TIMEOUT, CriNode

pytestmark = pytest.mark.integration

CREATED = cri.CONTAINER_CREATED_EVENT
STARTED = cri.CONTAINER_STARTED_EVENT
STOPPED = cri.CONTAINER_STOPPED_EVENT
DELETED = cri.CONTAINER_DELETED_EVENT


class EventStream:
    """One GetContainerEvents call, read in a thread: its events in order, and how it ended."""

    def __init__(self, node: CriNode) -> None:
        self.call = node.runtime.GetContainerEvents(cri.GetEventsRequest())
        self.events: list[cri.ContainerEventResponse] = []
        self.error: grpc.RpcError | None = None
        self.ended = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for event in self.call:
                with self._changed:
                    self.events.append(event)
                    self._changed.notify_all()
        except grpc.RpcError as exc:
            self.error = exc
        finally:
            with self._changed:
                self.ended = True
                self._changed.notify_all()

    def of(self, *ids: str) -> list[cri.ContainerEventResponse]:
        with self._changed:
            return [e for e in self.events if e.container_id in ids]

    def seen(self, container_id: str, event_type: int, timeout: float = TIMEOUT) -> bool:
        def arrived() -> bool:
            return self.ended or any(
                e.container_event_type == event_type for e in self.of(container_id)
            )

        with self._changed:
            self._changed.wait_for(arrived, timeout)
        return any(e.container_event_type == event_type for e in self.of(container_id))

    def wait_for(self, container_id: str, event_type: int) -> cri.ContainerEventResponse:
        """`container_id`'s last event of `event_type`, once it has come."""
        if not self.seen(container_id, event_type):
            raise AssertionError(
                f"no {cri.ContainerEventType.Name(event_type)} of {container_id}"
                f" (ended: {self.ended}, {self.error}): {kinds(self.of(container_id))}"
            )
        return [e for e in self.of(container_id) if e.container_event_type == event_type][-1]

    def finished(self) -> bool:
        """Whether the call ends (by itself: it is not cancelled here)."""
        with self._changed:
            return self._changed.wait_for(lambda: self.ended, TIMEOUT)

    def cancel(self) -> None:
        self.call.cancel()
        self._reader.join(TIMEOUT)
        assert not self._reader.is_alive(), "the stream did not end once cancelled"


def kinds(received: list[cri.ContainerEventResponse]) -> list[str]:
    return [cri.ContainerEventType.Name(e.container_event_type) for e in received]


def live(node: CriNode, *streams: EventStream) -> None:
    """Once every stream is subscribed: a throwaway pod's removal has reached them all. (The
    call is sent in the background: a pod removed before it arrived is tried again.)"""
    deadline = time.monotonic() + TIMEOUT
    while True:
        pod_id = node.run_pod()
        node.remove_pod(pod_id)
        if all(stream.seen(pod_id, DELETED, timeout=1) for stream in streams):
            return
        for stream in streams:
            assert not stream.ended, f"the stream ended: {stream.error}"
        assert time.monotonic() < deadline, "the streams never saw a pod's removal"


@contextlib.contextmanager
def event_stream(node: CriNode) -> Iterator[EventStream]:
    """A live stream, cancelled at the end."""
    stream = EventStream(node)
    try:
        live(node, stream)
        yield stream
    finally:
        stream.cancel()


def own_status(event: cri.ContainerEventResponse) -> cri.ContainerStatus | None:
    """The status of the event's container among the event's containers' statuses."""
    found = [s for s in event.containers_statuses if s.id == event.container_id]
    assert len(found) <= 1, event
    return found[0] if found else None


def test_a_pod_and_its_container_that_exits_in_order_with_their_statuses(
    cri_node: CriNode,
) -> None:
    with event_stream(cri_node) as stream:
        config = cri_node.pod_config()
        before = time.time_ns()
        pod_id = cri_node.run_pod(config)
        container_id = ""
        try:
            container_id = cri_node.run(pod_id, cri_node.container_config("sh", "-c", "exit 3"))
            stream.wait_for(container_id, STOPPED)
            cri_node.runtime.RemoveContainer(
                cri.RemoveContainerRequest(container_id=container_id), timeout=TIMEOUT
            )
        finally:
            cri_node.remove_pod(pod_id)
        stream.wait_for(pod_id, DELETED)
        after = time.time_ns()
    received = stream.of(pod_id, container_id)
    assert [(e.container_id, e.container_event_type) for e in received] == [
        (pod_id, CREATED),
        (pod_id, STARTED),
        (container_id, CREATED),
        (container_id, STARTED),
        (container_id, STOPPED),
        (container_id, DELETED),
        (pod_id, STOPPED),
        (pod_id, DELETED),
    ], kinds(received)
    for event in received:
        pod = event.pod_sandbox_status
        assert (pod.id, pod.metadata.uid, pod.metadata.name) == (
            pod_id,
            config.metadata.uid,
            config.metadata.name,
        )
        assert before <= event.created_at <= after
    # Each status as it was when the event was sent.
    pod_states = [e.pod_sandbox_status.state for e in received]
    assert pod_states == [cri.SANDBOX_READY] * 6 + [cri.SANDBOX_NOTREADY] * 2
    container_states = [
        (status.state, status.exit_code) if (status := own_status(e)) else None
        for e in received
        if e.container_id == container_id
    ]
    assert container_states == [
        (cri.CONTAINER_CREATED, 0),
        (cri.CONTAINER_RUNNING, 0),
        (cri.CONTAINER_EXITED, 3),
        None,  # deleted: no longer among the pod's containers
    ]
    pod_containers = [[s.id for s in e.containers_statuses] for e in stream.of(pod_id)]
    assert pod_containers == [[], [], [], []], "created before it, removed before the pod stopped"


def test_a_stopped_container_is_stopped_once(cri_node: CriNode) -> None:
    with event_stream(cri_node) as stream:
        pod_id = cri_node.run_pod()
        try:
            container_id = cri_node.run(pod_id, cri_node.container_config("sleep", "1000"))
            stream.wait_for(container_id, STARTED)
            cri_node.runtime.StopContainer(
                cri.StopContainerRequest(container_id=container_id, timeout=0), timeout=TIMEOUT
            )
            stopped = own_status(stream.wait_for(container_id, STOPPED))
        finally:
            cri_node.remove_pod(pod_id)
        stream.wait_for(pod_id, DELETED)
    assert stopped is not None
    assert (stopped.state, stopped.exit_code) == (cri.CONTAINER_EXITED, 137)
    assert kinds(stream.of(container_id)) == [
        "CONTAINER_CREATED_EVENT",
        "CONTAINER_STARTED_EVENT",
        "CONTAINER_STOPPED_EVENT",
        "CONTAINER_DELETED_EVENT",
    ]


def test_a_running_pod_removed_at_once_is_stopped_then_deleted(cri_node: CriNode) -> None:
    """RemovePodSandbox without StopPodSandbox first: its container and the pod are stopped,
    and every event after that says so (the DELETED ones too)."""
    with event_stream(cri_node) as stream:
        pod_id = cri_node.run_pod()
        container_id = cri_node.run(pod_id, cri_node.container_config("sleep", "1000"))
        stream.wait_for(container_id, STARTED)
        cri_node.runtime.RemovePodSandbox(
            cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=TIMEOUT
        )
        deleted = stream.wait_for(pod_id, DELETED)
    assert kinds(stream.of(pod_id)) == [
        "CONTAINER_CREATED_EVENT",
        "CONTAINER_STARTED_EVENT",
        "CONTAINER_STOPPED_EVENT",
        "CONTAINER_DELETED_EVENT",
    ]
    assert kinds(stream.of(container_id))[-2:] == [
        "CONTAINER_STOPPED_EVENT",
        "CONTAINER_DELETED_EVENT",
    ]
    assert deleted.pod_sandbox_status.state == cri.SANDBOX_NOTREADY
    assert list(deleted.containers_statuses) == []


def test_a_failed_start_is_stopped_with_its_error(cri_node: CriNode) -> None:
    with event_stream(cri_node) as stream:
        pod_id = cri_node.run_pod()
        try:
            container_id = cri_node.create(pod_id, cri_node.container_config("/no/such/command"))
            with pytest.raises(grpc.RpcError):
                cri_node.start(container_id)
            stopped = own_status(stream.wait_for(container_id, STOPPED))
        finally:
            cri_node.remove_pod(pod_id)
        stream.wait_for(pod_id, DELETED)
    assert stopped is not None
    assert (stopped.state, stopped.reason) == (cri.CONTAINER_EXITED, "StartError")
    assert stopped.exit_code != 0
    assert "/no/such/command" in stopped.message
    assert kinds(stream.of(container_id)) == [
        "CONTAINER_CREATED_EVENT",
        "CONTAINER_STOPPED_EVENT",  # never started
        "CONTAINER_DELETED_EVENT",
    ]


def test_two_streams_get_the_same_events(cri_node: CriNode) -> None:
    with event_stream(cri_node) as first, event_stream(cri_node) as second:
        pod_id = cri_node.run_pod()
        try:
            container_id = cri_node.run(pod_id, cri_node.container_config("true"))
            first.wait_for(container_id, STOPPED)
        finally:
            cri_node.remove_pod(pod_id)
        first.wait_for(pod_id, DELETED)
        second.wait_for(pod_id, DELETED)
    received = first.of(pod_id, container_id)
    assert len(received) == 8, kinds(received)
    assert received == second.of(pod_id, container_id), "the same events, times and statuses"


def test_a_stream_its_client_cancels_goes_and_the_others_go_on(cri_node: CriNode) -> None:
    with event_stream(cri_node) as staying:
        leaving = EventStream(cri_node)
        try:
            live(cri_node, leaving)
        finally:
            leaving.cancel()
        assert leaving.error is not None
        assert leaving.error.code() == grpc.StatusCode.CANCELLED
        pod_id = cri_node.run_pod()
        cri_node.remove_pod(pod_id)
        staying.wait_for(pod_id, DELETED)
        assert leaving.of(pod_id) == []
        with event_stream(cri_node) as new:  # live: it has seen a pod's removal
            assert not new.ended and not staying.ended
    version = cri_node.runtime.Version(cri.VersionRequest(), timeout=TIMEOUT)
    assert version.runtime_api_version == "v1"


def test_a_stopping_service_ends_the_streams_it_serves(cri_node: CriNode) -> None:
    """Cleanly, before the server stops: an open stream (the kubelet's) would hold the server's
    grace, and be cancelled at its end."""
    stream = EventStream(cri_node)
    try:
        live(cri_node, stream)
        cri_node.service.stop()
        assert stream.finished(), "the stream did not end"
        assert (stream.ended, stream.error) == (True, None)
    finally:
        stream.cancel()
        if cri_node.service.process is None or cri_node.service.process.poll() is not None:
            cri_node.service.start()
            cri_node.reconnect()
