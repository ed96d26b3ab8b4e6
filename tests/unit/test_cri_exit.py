"""A CRI container is EXITED as soon as the core knows its exit, before the core's cleanup of it
ends, on a runtime whose exit comes with the output all written (native's); on another, once the
cleanup is done. StopContainer and RemoveContainer return only once that cleanup is done."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from adapter.core.containerizer import Containerizer
from adapter.core.errors import NotFound
from adapter.core.model import (
    Capabilities,
    Exit,
    Fingerprint,
    LaunchSpec,
    Resources,
    State,
    Statistics,
)
from adapter.core.state import StateStore
from adapter.cri.api import cri
from adapter.cri.runtime import CriRuntime, CriRuntimeService
from adapter.cri.store import EXITED, RUNNING, Pod
from adapter.runtimes.base import Checkpointed, Launched

IMAGE = "localhost/busybox:latest"
DIGEST = "sha256:" + "ab" * 32


class SlowCleanupDriver:
    """Containers run until the test ends them; their cleanup waits for `cleanup_may_end`."""

    name = "native"

    def __init__(self) -> None:
        self.exits: dict[str, asyncio.Future[Exit]] = {}
        self.cleanup_may_end = asyncio.Event()
        self.cleaned_up: list[str] = []
        self.usage_asked: list[str] = []
        # As native: `wait` returns once the output is all written (a shim's log relay ends
        # only with the cleanup's task deletion).
        self.output_complete_at_exit = True

    async def fingerprint(self) -> Fingerprint:
        capabilities = Capabilities(output_complete_at_exit=self.output_complete_at_exit)
        return Fingerprint(self.name, "1", True, capabilities=capabilities)

    async def start(self, spec: LaunchSpec) -> Launched:
        self.exits[spec.container_id] = asyncio.get_running_loop().create_future()
        return Launched(handle={}, pid=4242)

    def finish(self, container_id: str, exit_: Exit) -> None:
        self.exits[container_id].set_result(exit_)

    async def wait(self, container_id: str) -> Exit:
        return await self.exits[container_id]

    async def signal(self, container_id: str, signal: int) -> None:
        if not self.exits[container_id].done():
            self.finish(container_id, Exit(signal=signal))

    async def kill_all(self, container_id: str) -> None:
        await self.signal(container_id, 9)

    async def cleanup(self, container_id: str) -> None:
        await self.cleanup_may_end.wait()
        self.cleaned_up.append(container_id)

    async def update(self, container_id: str, resources: Resources) -> None:
        pass

    async def usage(self, container_id: str) -> Statistics:
        self.usage_asked.append(container_id)
        return {"cpus_user_time_secs": 1.5}

    async def recover(self, checkpointed: list[Checkpointed], known_ids: set[str]) -> None:
        pass

    async def close(self) -> None:
        pass


@dataclass
class Node:
    driver: SlowCleanupDriver
    core: Containerizer
    runtime: CriRuntime
    service: CriRuntimeService
    pod_id: str


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    driver = SlowCleanupDriver()
    pod_cgroups = SimpleNamespace(place=lambda spec: None, unplace=lambda container_id: None)
    core = Containerizer(
        {"native": driver},  # type: ignore[dict-item]
        StateStore(tmp_path / "state.db"),
        default_runtime="native",
        sandbox_root=tmp_path / "sandboxes",
        pod_cgroups=pod_cgroups,  # type: ignore[arg-type]
    )
    await core.recover()
    image = SimpleNamespace(
        reference=IMAGE, config=SimpleNamespace(digest=DIGEST), entrypoint=(), cmd=("sh",)
    )
    images = SimpleNamespace(list=lambda: [image], get=lambda reference, field: image)
    runtime = CriRuntime(core, images, tmp_path, bridge=False)  # type: ignore[arg-type]
    # A pod whose one container brings its namespaces: no holder process to fake.
    pod = Pod(
        id="p" * 64,
        config=pod_config().SerializeToString(),
        runtime_handler="native",
        created_at=time.time_ns(),
        holder_runtime="",
    )
    runtime.pods.records[pod.id] = pod
    yield Node(driver, core, runtime, CriRuntimeService(runtime), pod.id)
    driver.cleanup_may_end.set()
    await runtime.close()
    await core.close()


def pod_config() -> cri.PodSandboxConfig:
    return cri.PodSandboxConfig(metadata=cri.PodSandboxMetadata(name="p", namespace="ns"))


async def started(node: Node) -> str:
    config = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="c"),
        image=cri.ImageSpec(image=IMAGE),
        command=["sh", "-c", "exit 3"],
    )
    container_id = node.runtime.containers.create(node.pod_id, config).id
    await node.runtime.containers.start(container_id)
    return container_id


async def status(node: Node, container_id: str) -> cri.ContainerStatus:
    request = cri.ContainerStatusRequest(container_id=container_id)
    return (await node.service.ContainerStatus(request, None)).status


async def exited_in_cleanup(node: Node) -> str:
    """A started container whose process ended with 3, while the core cleans it up."""
    container_id = await started(node)
    node.driver.finish(container_id, Exit(exit_code=3))
    for _ in range(100):  # a few turns of the loop: the core's watcher checkpoints the exit
        if node.runtime.containers.get(container_id).state != RUNNING:
            break
        await asyncio.sleep(0)
    return container_id


async def test_exited_as_soon_as_the_core_knows_the_exit(node: Node) -> None:
    container_id = await exited_in_cleanup(node)
    shown = await status(node, container_id)
    assert shown.state == cri.CONTAINER_EXITED
    assert (shown.exit_code, shown.reason) == (3, "Error")
    assert shown.started_at <= shown.finished_at
    assert node.core.status(container_id).state is State.RUNNING  # still cleaning up
    listed = await node.service.ListContainers(cri.ListContainersRequest(), None)
    assert [c.state for c in listed.containers] == [cri.CONTAINER_EXITED]
    stats = await node.service.ContainerStats(
        cri.ContainerStatsRequest(container_id=container_id), None
    )
    assert stats.stats.cpu.usage_core_nano_seconds.value == 0
    assert node.driver.usage_asked == []  # nothing of an exited container is accounted


async def test_stop_and_remove_wait_for_the_cleanup(node: Node) -> None:
    container_id = await exited_in_cleanup(node)
    stop = asyncio.create_task(node.runtime.containers.stop(container_id, 10))
    remove = asyncio.create_task(node.runtime.containers.remove(container_id))
    await asyncio.sleep(0.05)
    assert not stop.done() and not remove.done()
    node.driver.cleanup_may_end.set()
    await asyncio.wait_for(asyncio.gather(stop, remove), 5)
    assert node.driver.cleaned_up == [container_id]
    with pytest.raises(NotFound):
        node.core.status(container_id)  # the core's record went with RemoveContainer
    assert container_id not in node.runtime.containers.records


async def test_a_stop_given_up_by_its_caller_still_sees_the_cleanup_end(node: Node) -> None:
    container_id = await exited_in_cleanup(node)
    pods = node.runtime.pods  # the address its one container had (a VM's)
    pods.records[node.pod_id] = pods.records[node.pod_id].evolve(ip="10.0.0.9")
    stop = asyncio.create_task(node.runtime.containers.stop(container_id, 0))
    await asyncio.sleep(0.05)  # waiting for the cleanup
    stop.cancel()
    node.driver.cleanup_may_end.set()
    await asyncio.wait_for(node.core.wait(container_id), 5)
    await asyncio.sleep(0.05)
    # The pod's one container is gone, and with it the pod's address.
    assert pods.get(node.pod_id).ip == ""


async def test_stop_of_a_running_container_ends_it(node: Node) -> None:
    container_id = await started(node)
    node.driver.cleanup_may_end.set()
    await asyncio.wait_for(node.runtime.containers.stop(container_id, 10), 5)
    shown = await status(node, container_id)
    assert (shown.state, shown.exit_code) == (cri.CONTAINER_EXITED, 128 + 15)  # its SIGTERM
    assert node.core.status(container_id).state is State.TERMINATED


async def test_a_vm_pods_next_container_starts_once_the_last_ones_cleanup_is_done(
    node: Node,
) -> None:
    """A pod without a holder is its one container: its address is the last one's until that
    one's cleanup releases it."""
    first = await exited_in_cleanup(node)
    second = await started_after(node, first)
    await asyncio.sleep(0.05)
    assert not second.done()
    node.driver.cleanup_may_end.set()
    await asyncio.wait_for(second, 5)
    assert node.driver.cleaned_up == [first]
    running = [c.state for c in node.runtime.containers.of_pod(node.pod_id)]
    assert sorted(running) == [EXITED, RUNNING]


async def started_after(node: Node, first: str) -> asyncio.Task[None]:
    config = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="next"), image=cri.ImageSpec(image=IMAGE)
    )
    second = node.runtime.containers.create(node.pod_id, config).id
    assert second != first
    return asyncio.create_task(node.runtime.containers.start(second))


async def test_on_a_runtime_whose_output_ends_at_the_cleanup_exited_waits_for_it(
    node: Node,
) -> None:
    node.driver.output_complete_at_exit = False
    container_id = await started(node)
    node.driver.finish(container_id, Exit(exit_code=3))
    await asyncio.sleep(0.05)
    assert (await status(node, container_id)).state == cri.CONTAINER_RUNNING  # log incomplete
    node.driver.cleanup_may_end.set()
    await asyncio.wait_for(node.core.wait(container_id), 5)
    await asyncio.sleep(0.05)
    shown = await status(node, container_id)
    assert (shown.state, shown.exit_code) == (cri.CONTAINER_EXITED, 3)
