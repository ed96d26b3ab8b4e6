"""CRI containers: created (a record here only), started (a launch through the core into the
pod's namespaces), exited (the core's termination, kept here until RemoveContainer).

The core keeps a container from its launch to its destroy; the CRI's container lives longer on
both sides (created before it starts, kept after it ends), so this module keeps the CRI record.
A started container is EXITED as soon as the core has checkpointed its exit (an observer of the
core's events), while the core still cleans up (cgroups, mounts, sandbox): the CRI's EXITED says
that its process ended, and that its log is complete, so this holds on a runtime whose exit comes
with the output all written (`output_complete_at_exit`: native's supervisor); on another one (a
shim's log relay ends with the task's deletion) it is EXITED once the cleanup is done. A watcher
per started container awaits the end of that cleanup, which StopContainer and RemoveContainer
wait for: after them, nothing of the container runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path

from adapter.core.containerizer import Containerizer
from adapter.core.errors import ContainerizerError, FailedPrecondition, NotFound
from adapter.core.events import Event
from adapter.core.model import (
    ExecResult,
    LaunchSpec,
    LinuxOptions,
    NetworkSettings,
    Reason,
    State,
    Termination,
)
from adapter.cri import events, translate
from adapter.cri.api import cri
from adapter.cri.pods import LABEL_POD, LABEL_ROLE, Pods, find, new_id
from adapter.cri.store import CREATED, EXITED, RUNNING, Container, CriStore, Pod
from adapter.images.store import ImageStore

log = logging.getLogger(__name__)

# A start that fails leaves the container exited, as containerd reports it.
START_ERROR_EXIT_CODE = 128


@dataclass(frozen=True)
class ImageChoice:
    reference: str  # what the store runs
    image_id: str  # the config digest, the CRI's image_ref


class CriContainers:
    def __init__(
        self,
        core: Containerizer,
        store: CriStore,
        pods: Pods,
        images: ImageStore,
        container_events: events.ContainerEvents,
    ) -> None:
        self.core = core
        self.store = store
        self.pods = pods
        self.images = images
        self.events = container_events
        self.records: dict[str, Container] = {c.id: c for c in store.load(Container)}
        # container id -> the task awaiting the core's end of it (the exit and its cleanup)
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # runtime -> whether its exit comes with the output all written (its capabilities,
        # asked before it starts or re-watches a container here)
        self._output_at_exit: dict[str, bool] = {}
        core.event_hub.observe(self._on_core_event)

    def get(self, container_id: str) -> Container:
        return find(self.records, container_id, "container")

    def of_pod(self, pod_id: str) -> list[Container]:
        return [c for c in self.records.values() if c.pod_id == pod_id]

    def _lock(self, container_id: str) -> asyncio.Lock:
        return self._locks.setdefault(container_id, asyncio.Lock())

    # ---- lifecycle ----

    def create(self, pod_id: str, config: cri.ContainerConfig) -> Container:
        translate.check_container_config(config)
        pod = self.pods.get(pod_id)
        if pod.holder_runtime:
            self.pods.namespace_files(pod)  # the pod must be ready now
        else:
            self.pods.check_ready(pod)
            self._check_alone(pod)
        choice = self._image(config.image.image)
        directory = pod.pod_config().log_directory
        log_path = os.path.join(directory, config.log_path) if directory and config.log_path else ""
        container = Container(
            id=new_id(),
            pod_id=pod.id,
            config=config.SerializeToString(),
            image_ref=choice.reference,
            image_id=choice.image_id,
            created_at=time.time_ns(),
            log_path=log_path,
        )
        self._put(container)
        return container

    def _check_alone(self, pod: Pod) -> None:
        """A pod without a holder is its one container (a VM). One that has ended may be
        followed by another (the kubelet's restart, or an init container's successor)."""
        for other in self.of_pod(pod.id):
            if other.state != EXITED:
                raise FailedPrecondition(
                    f"runtime_handler {pod.runtime_handler!r} runs one container per pod (a VM);"
                    f" pod {pod.id} already has {other.id}"
                )

    def _image(self, wanted: str) -> ImageChoice:
        """By reference, or by image id as the kubelet passes it (ImageStatus' id)."""
        bare = wanted.removeprefix("sha256:")
        for image in self.images.list():
            if wanted == image.reference or (
                len(bare) == 64 and image.config.digest.endswith(bare)
            ):
                return ImageChoice(image.reference, image.config.digest)
        image = self.images.get(wanted, "config.image.image")  # normalised forms, or NotFound
        return ImageChoice(image.reference, image.config.digest)

    async def start(self, container_id: str) -> None:
        async with self._lock(self.get(container_id).id):
            container = self.get(container_id)  # as it is now that no other start runs
            if container.state != CREATED:
                raise FailedPrecondition(f"container {container.id!r} is not in the created state")
            await self._predecessor_gone(container)
            try:
                spec = self._launch_spec(container)
                await self._learn_output_at_exit(spec.runtime)
                log.debug("starting %s as %s", container.id, spec)
                started_at = time.time_ns()  # the workload may end before launch returns
                record = await self.core.launch(spec)
            except ContainerizerError as exc:
                self._put(
                    container.evolve(
                        state=EXITED,
                        finished_at=time.time_ns(),
                        exit_code=START_ERROR_EXIT_CODE,
                        reason="StartError",
                        message=str(exc),
                    )
                )
                raise
            self._put(container.evolve(state=RUNNING, started_at=started_at))
            self.pods.container_started(self.pods.get(container.pod_id), record)
            self._watch(container.id)

    async def _predecessor_gone(self, container: Container) -> None:
        """A pod without a holder is its one container (a VM): the one it follows is EXITED,
        but its cleanup, which releases the pod's address, must be done before this starts."""
        if self.pods.get(container.pod_id).holder_runtime:
            return
        for other in self.of_pod(container.pod_id):
            watcher = self._watchers.get(other.id)
            if other.id != container.id and watcher is not None:
                await asyncio.shield(watcher)

    def _launch_spec(self, container: Container) -> LaunchSpec:
        pod = self.pods.get(container.pod_id)
        pod_config = pod.pod_config()
        config = container.container_config()
        image = self.images.get(container.image_ref, "config.image.image")
        security = config.linux.security_context
        if container.log_path:
            Path(container.log_path).parent.mkdir(parents=True, exist_ok=True)
        for mount in config.mounts:  # as containerd does: a missing host path is made a directory
            os.makedirs(mount.host_path, exist_ok=True)
        sandbox_root = self.core.sandbox_root or self.pods.root
        alone = not pod.holder_runtime  # the pod's one container: the pod's network is its own
        network = translate.pod_network(pod_config, bridge=self.pods.bridge) if alone else None
        return LaunchSpec(
            container_id=container.id,
            command=translate.container_command(config, image),
            resources=translate.container_resources(
                config.linux.resources, "config.linux.resources"
            ),
            runtime=pod.runtime_handler,
            sandbox=str(sandbox_root / container.id),
            image=container.image_ref,
            labels=(
                (LABEL_ROLE, "container"),
                (LABEL_POD, pod.id),
                ("io.kubernetes.pod.name", pod_config.metadata.name),
                ("io.kubernetes.pod.namespace", pod_config.metadata.namespace),
                ("io.kubernetes.container.name", config.metadata.name),
            ),
            privileged=security.privileged,
            no_new_privileges=security.no_new_privs,
            network=network or NetworkSettings(),
            linux=self._in_pod_user_namespace(
                pod,
                translate.container_options(
                    config,
                    pod_config,
                    pod_namespaces=None if alone else self.pods.namespace_files(pod),
                    pod_id=pod.id,
                    pod_files=self.pods.files(pod.id),
                    log_path=container.log_path,
                ),
            ),
            id_mapping=self.pods.holder_id_mapping(pod),
        )

    def _in_pod_user_namespace(self, pod: Pod, linux: LinuxOptions) -> LinuxOptions:
        """A pod's containers share its holder's user namespace (and so its mapping)."""
        if self.pods.holder_id_mapping(pod) is None:
            return linux
        user = ("user", self.pods.namespace_files(pod)["user"])
        return replace(linux, namespaces=(*linux.namespaces, user))

    async def _learn_output_at_exit(self, runtime: str) -> None:
        if runtime not in self._output_at_exit:
            capabilities = await self.core.capabilities(runtime)
            self._output_at_exit[runtime] = capabilities.output_complete_at_exit

    def _on_core_event(self, event: Event) -> None:
        """A started container's exit, once the core has checkpointed it (before its cleanup),
        on a runtime whose output is all written by then. Called inside the core's checkpoint,
        which must go on: a failure to record it here is logged, and the watcher records the
        exit once the cleanup is done."""
        if event.termination is None or not self._output_at_exit.get(event.runtime, False):
            return
        container = self.records.get(event.container_id)
        if container is None or container.state != RUNNING:
            return
        try:
            self._put(exited(container, event.termination))
        except Exception:
            log.exception("CRI container %s: its exit could not be recorded yet", container.id)

    def _watch(self, container_id: str) -> None:
        watcher = asyncio.create_task(self._await_end(container_id))
        self._watchers[container_id] = watcher
        watcher.add_done_callback(lambda _: self._watchers.pop(container_id, None))

    async def _await_end(self, container_id: str) -> None:
        """The core's end of the container: its exit (recorded here if the observer has not)
        and its cleanup."""
        try:
            termination = await self.core.wait(container_id)
        except NotFound:
            termination = Termination(
                reason=Reason.LOST,
                message="the container's record is gone",
                finished_at=time.time(),
            )
        container = self.records.get(container_id)
        if container is None:
            return
        if container.state == RUNNING:
            self._put(exited(container, termination))
        self.pods.container_ended(container.pod_id)

    async def stop(self, container_id: str, timeout: int) -> None:
        """SIGTERM, then after `timeout` seconds SIGKILL of every process (the core's destroy).
        Returns once nothing of the container runs: an exited one's cleanup is waited for."""
        container = self.get(container_id)
        if container.state == RUNNING:
            await self._end(container.id, timeout)
        watcher = self._watchers.get(container.id)
        if watcher is not None:  # shielded: a caller that goes away must not cancel it
            await asyncio.shield(watcher)

    async def _end(self, container_id: str, timeout: int) -> None:
        if timeout > 0:
            with contextlib.suppress(ContainerizerError):
                await self.core.kill(container_id, signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.core.wait(container_id)), timeout)
        if not self._exit_known(container_id):
            with contextlib.suppress(NotFound):
                await self.core.destroy(container_id)

    def _exit_known(self, container_id: str) -> bool:
        try:
            return self.core.status(container_id).termination is not None
        except NotFound:
            return True  # the core's record is gone: nothing of it is left to stop

    async def remove(self, container_id: str) -> None:
        try:
            container = self.get(container_id)
        except NotFound:
            return  # removing what is gone is no error in the CRI
        await self.stop(container.id, 0)
        with contextlib.suppress(NotFound):
            await self.core.destroy(container.id)  # forgets the terminated record
        self.records.pop(container.id, None)
        self._locks.pop(container.id, None)
        self.store.delete(container)
        self._publish(container, events.DELETED)

    async def exec_sync(self, container_id: str, argv: list[str], timeout: int) -> ExecResult:
        container = self.get(container_id)
        if container.state != RUNNING:
            raise FailedPrecondition(f"container {container.id!r} is not running")
        return await self.core.exec_sync(container.id, tuple(argv), float(timeout) or None)

    async def recover(self) -> None:
        """Re-watch started containers; one whose core record is gone or ended gets its exit."""
        for container in list(self.records.values()):
            if container.state != RUNNING:
                continue
            try:
                record = self.core.status(container.id)
            except NotFound:
                self._put(
                    exited(
                        container,
                        Termination(reason=Reason.LOST, message="lost while the service was down"),
                    )
                )
                continue
            if record.termination is not None:  # the exit was checkpointed before the restart
                self._put(exited(container, record.termination))
            if record.state is not State.TERMINATED:
                with contextlib.suppress(ContainerizerError):  # unknown: EXITED at the cleanup
                    await self._learn_output_at_exit(record.spec.runtime)
                self._watch(container.id)

    async def close(self) -> None:
        for watcher in self._watchers.values():
            watcher.cancel()
        self._watchers.clear()

    def _put(self, container: Container) -> None:
        """Stored first: a record that could not be written is not shown either. A new state
        is an event."""
        previous = self.records.get(container.id)
        if previous == container:
            return
        self.store.put(container)
        self.records[container.id] = container
        if previous is None or previous.state != container.state:
            self._publish(container, EVENT_OF_STATE[container.state])

    def _publish(self, container: Container, event_type: events.EventType) -> None:
        pod = self.pods.records.get(container.pod_id)
        if pod is not None:
            self.events.publish(container.id, event_type, pod)


EVENT_OF_STATE = {CREATED: events.CREATED, RUNNING: events.STARTED, EXITED: events.STOPPED}


def exited(container: Container, termination: Termination) -> Container:
    if termination.signal is not None:
        code = 128 + termination.signal
    else:
        code = termination.exit_code if termination.exit_code is not None else 255
    if termination.reason is Reason.LIMITATION_MEMORY:
        reason = "OOMKilled"
    elif code == 0:
        reason = "Completed"
    else:
        reason = "Error"
    finished = termination.finished_at or time.time()
    # The supervisor records the exit to the millisecond: never before the start we recorded.
    finished_at = max(int(finished * 1_000_000_000), container.started_at)
    return container.evolve(
        state=EXITED,
        finished_at=finished_at,
        exit_code=code,
        reason=reason,
        message=termination.message,
    )
