"""The core: container registry, lifecycle state machine, runtime routing, terminations, recovery.

LAUNCHING -> RUNNING -> (DESTROYING) -> TERMINATED. Every transition is checkpointed before it is
acknowledged. A watcher task per running container awaits the runtime's `wait`, turns the raw Exit
into a Termination (the policy lives here, once), checkpoints it, lets the runtime clean up, and
only then wakes waiters, so a Wait that returns means nothing of the container is left.

Destroy is Mesos' order, here and nowhere else: kill every process (`kill_all`), wait for the exit
(the watcher), then `cleanup`. A runtime's record of a container so outlives its exit until the
cleanup, and no runtime keeps exits for a `wait` that comes after. A failed launch is rolled back
once, here: `kill_all` and `cleanup` of whatever the runtime had made.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from adapter.core import sandbox_guard
from adapter.core.disk import DiskAccounting, not_enforced_warning, with_disk_note
from adapter.core.errors import (
    AlreadyExists,
    ContainerizerError,
    FailedPrecondition,
    LaunchFailed,
    NotFound,
)
from adapter.core.events import Event, EventHub, Missed
from adapter.core.model import (
    Capabilities,
    ExecResult,
    Fingerprint,
    LaunchSpec,
    Reason,
    Resources,
    State,
    Statistics,
    Termination,
)
from adapter.core.network import RuntimeNetwork
from adapter.core.pod_cgroups import PodCgroups
from adapter.core.sandbox import is_default_sandbox, make_sandbox, remove_directory
from adapter.core.state import ContainerRecord, QuarantinedRecord, StateStore
from adapter.core.termination import await_exit, termination_of
from adapter.core.userns import IdRangeAllocator, user_namespace_for
from adapter.runtimes.base import (
    Attaches,
    AttachSession,
    Checkpointed,
    ExecSession,
    Executes,
    ReopensLogs,
    Runtime,
    StreamsExec,
    holds_without_process,
)
from isolators.cgroups.warm import AttachWarmer

log = logging.getLogger(__name__)


@dataclass
class Container:
    record: ContainerRecord
    terminated: asyncio.Event = field(default_factory=asyncio.Event)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    destroy_requested: bool = False
    # Set once kill_all returned: from then on the exit has EXIT_AFTER_KILL_TIMEOUT to show.
    killed: asyncio.Event = field(default_factory=asyncio.Event)
    watcher: asyncio.Task[None] | None = None


class Containerizer:
    def __init__(
        self,
        drivers: dict[str, Runtime],
        store: StateStore,
        *,
        default_runtime: str,
        termination_retention: float = 3600.0,
        sandbox_root: Path | None = None,
        allow_privileged: bool = False,
        network: RuntimeNetwork | None = None,
        user_namespaces: IdRangeAllocator | None = None,
        user_namespace_default: bool = False,
        disk: DiskAccounting | None = None,
        pod_cgroups: PodCgroups | None = None,
        attach_warmer: AttachWarmer | None = None,
    ) -> None:
        self.drivers = drivers
        # Starts the wait of a launch's first cgroup attach as the launch begins
        # (isolators/cgroups/warm.py): it passes while the launch prepares.
        self._attach_warmer = attach_warmer
        # Pods' cgroups, and the placement of a pod's containers in them (LaunchSpec.linux.pod).
        self.pod_cgroups = pod_cgroups
        # Every container's disk usage, and its disk request enforced where the runtime shows
        # all the container writes (None: disk is neither measured nor enforced).
        self.disk = disk
        # The host id ranges of user-namespaced containers, held from launch to termination
        # and re-derived from the checkpoints at recovery; None: no host ids configured.
        self.user_namespaces = user_namespaces
        self.user_namespace_default = user_namespace_default
        self._runtime_capabilities: dict[str, Capabilities] = {}
        # The node's network isolator, shared by every runtime: each runtime attaches its
        # containers its own way (a namespace path, a sandbox container, a tap device), the core
        # does the rest once for all: bandwidth updates, counters, recovery, shutdown.
        self.network = network
        self.allow_privileged = allow_privileged
        self.default_runtime = default_runtime
        # Sandboxes we created (under this root) are ours to remove once the record goes;
        # a sandbox the caller named is the caller's data and is never deleted.
        self.sandbox_root = sandbox_root
        self._store = store
        self._retention = termination_retention
        self._containers: dict[str, Container] = {}
        # Lifecycle events: the recent ones kept for `since`, readers, metrics and the log.
        self.event_hub = EventHub()
        self._pruner: asyncio.Task[None] | None = None

    # ---- lifecycle ----

    async def launch(self, spec: LaunchSpec, warnings: tuple[str, ...] = ()) -> ContainerRecord:
        if self._attach_warmer is None:
            return await self._launch(spec, warnings)
        # Its first cgroup attach waits for no grace period (isolators/cgroups/warm.py).
        with self._attach_warmer.kept_warm():
            return await self._launch(spec, warnings)

    async def _launch(self, spec: LaunchSpec, warnings: tuple[str, ...]) -> ContainerRecord:
        driver = self._driver(spec.runtime)
        if spec.privileged and not self.allow_privileged:
            raise FailedPrecondition(
                "privileged: this node does not allow privileged containers"
                " (set allow_privileged = true in its config to permit them)"
            )
        existing = self._containers.get(spec.container_id)
        if existing is not None and existing.record.state is not State.TERMINATED:
            raise AlreadyExists(f"container {spec.container_id!r} already exists")
        enforced = self.disk is not None and self.disk.enforces(driver)
        if spec.resources.disk_mib is not None and not enforced:
            warnings = (*warnings, not_enforced_warning(spec))
        spec, userns_warnings = await self._with_user_namespace(spec, driver)
        warnings = (*warnings, *userns_warnings)
        record = ContainerRecord(
            spec=spec,
            state=State.LAUNCHING,
            launched_at=time.time(),
            handle={},
            warnings=warnings,
            sandbox_owned=is_default_sandbox(spec, self.sandbox_root),
            sandbox_mount=sandbox_guard.mount_point_of(  # checkpointed before it is made
                spec, self.sandbox_root, runs=not holds_without_process(driver, spec)
            ),
        )
        container = Container(record)
        self._containers[spec.container_id] = container
        async with container.lock:
            self._checkpoint(container, record)
            try:
                if not holds_without_process(driver, spec):  # what runs has a sandbox
                    make_sandbox(spec.sandbox)
                    self._guard_sandbox(container)
                if spec.linux.pod:
                    self._pod_cgroups().place(spec)
                launched = await driver.start(spec)
                if self.disk is not None:
                    warnings += await self.disk.prepare(spec, driver)
            except ContainerizerError as exc:
                await self._fail_launch(container, driver, str(exc))
                raise
            except asyncio.CancelledError:
                # The caller went away (an RPC deadline): a launch left halfway would stay
                # LAUNCHING, its processes unowned, until the next restart.
                await self._fail_launch(container, driver, "the launch was cancelled")
                raise
            except Exception as exc:
                log.exception("launch of %s failed", spec.container_id)
                await self._fail_launch(container, driver, f"internal error: {exc}")
                raise LaunchFailed(f"launch of {spec.container_id!r} failed: {exc}") from exc
            running = container.record.evolve(
                state=State.RUNNING,
                handle=launched.handle,
                pid=launched.pid,
                warnings=warnings + launched.warnings,
                ip_address=launched.ip_address,
            )
            self._checkpoint(container, running)
            container.watcher = asyncio.create_task(self._watch(container, driver))
            self._watch_disk(container, driver)
        return running

    async def _with_user_namespace(
        self, spec: LaunchSpec, driver: Runtime
    ) -> tuple[LaunchSpec, tuple[str, ...]]:
        """The spec with its id mapping when it gets a user namespace (adapter/core/userns.py
        decides); a mapping the core's own callers set (a pod's container, sharing its holder's)
        is also held under this container's id: the range stays in use while any container in
        it runs, whichever ends first (a pod's holder may)."""
        if spec.id_mapping is not None:
            if self.user_namespaces is not None:
                self.user_namespaces.reserve(spec.container_id, spec.id_mapping)
            return spec, ()
        if spec.user_namespace is False:
            return spec, ()
        if spec.user_namespace is None and not self.user_namespace_default:
            return spec, ()
        return user_namespace_for(
            spec, driver.name, await self.capabilities(driver.name), self.user_namespaces
        )

    async def capabilities(self, runtime: str) -> Capabilities:
        """The runtime's capabilities, asked once: fingerprints are not free (a daemon's)."""
        driver = self._driver(runtime)
        capabilities = self._runtime_capabilities.get(driver.name)
        if capabilities is None:
            fingerprint = await driver.fingerprint()
            capabilities = fingerprint.capabilities
            if fingerprint.healthy:
                self._runtime_capabilities[driver.name] = capabilities
        return capabilities

    async def _fail_launch(self, container: Container, driver: Runtime, message: str) -> None:
        """The one rollback of a launch: whatever the runtime made is killed and released."""
        container_id = container.record.container_id
        steps = [driver.kill_all, driver.cleanup]
        if self.disk is not None:
            steps.append(self.disk.cleanup)
        failed = []
        for step in steps:  # cleanup even if the kill failed
            try:
                await step(container_id)
            except Exception:
                failed.append(step)
                log.exception(
                    "%s after the failed launch of %s failed", step.__name__, container_id
                )
        if driver.cleanup not in failed:  # nothing of the workload runs (see _watch)
            await self._release_sandbox(container)
        termination = Termination(
            reason=Reason.LAUNCH_FAILED, message=message, finished_at=time.time()
        )
        self._terminate(container, termination)

    async def _watch(self, container: Container, driver: Runtime) -> None:
        container_id = container.record.container_id
        exit_ = await await_exit(driver, container_id, container.killed)
        termination = termination_of(
            exit_,
            destroy_requested=container.destroy_requested,
            disk_limitation=container.record.disk_limitation,
        )
        # Checkpoint the status first: a crash during cleanup must not lose it.
        self._checkpoint(container, container.record.evolve(termination=termination))
        # Under the container's lock: a Destroy in flight may still be in kill_all, and a
        # runtime's removal must not run beside its own kill (containerd's shim closes under it).
        async with container.lock:
            try:
                await driver.cleanup(container_id)
            except Exception:
                log.exception("cleanup of %s failed", container_id)
            else:
                # Here, not before the cleanup nor at _forget: a runtime's cleanup returns only
                # once nothing of the container is left (a cgroup that still holds a process
                # cannot be removed), so nothing can write the sandbox again; and the record is
                # not TERMINATED yet, so no new launch may take the sandbox meanwhile.
                await self._release_sandbox(container)
            await self._cleanup_disk(container_id)
        self._terminate(container, termination)

    def _watch_disk(self, container: Container, driver: Runtime) -> None:
        """Mesos' disk/du: a container measured past its disk limit is killed, and ends
        LIMITATION_DISK with the numbers."""
        if self.disk is None:
            return

        async def limited(message: str) -> None:
            async with container.lock:
                if container.record.state is not State.RUNNING:
                    return
                # Checkpointed before the kill: a restart between the kill and the exit
                # still ends the container LIMITATION_DISK.
                record = container.record.evolve(disk_limitation=message)
                self._checkpoint(container, record, publish=False)
                await driver.kill_all(container.record.container_id)
                container.killed.set()

        self.disk.watch(container.record.container_id, limited)

    async def _cleanup_disk(self, container_id: str) -> None:
        if self.disk is None:
            return
        try:
            await self.disk.cleanup(container_id)
        except Exception:
            log.exception("disk cleanup of %s failed", container_id)

    def _terminate(self, container: Container, termination: Termination) -> None:
        record = container.record.evolve(state=State.TERMINATED, termination=termination, pid=0)
        self._checkpoint(container, record)
        # Only now: the runtime's cleanup ran, so nothing of the container uses its ids.
        if self.user_namespaces is not None:
            self.user_namespaces.release(record.container_id)
        container.terminated.set()

    async def destroy(self, container_id: str) -> Termination:
        """Kill and release a running container; for a terminated one, acknowledge it: its
        record is dropped and its termination returned one last time."""
        container = self._get(container_id)
        async with container.lock:
            record = container.record
            if record.state is State.TERMINATED:
                assert record.termination is not None
                self._forget(container_id)
                return record.termination
            container.destroy_requested = True
            self._checkpoint(container, record.evolve(state=State.DESTROYING))
            await self._driver(record.spec.runtime).kill_all(container_id)
            container.killed.set()
        return await self.wait(container_id)

    async def wait(self, container_id: str) -> Termination:
        container = self._get(container_id)
        await container.terminated.wait()
        termination = container.record.termination
        assert termination is not None
        return termination

    async def kill(self, container_id: str, signal: int) -> None:
        container = self._running(container_id)
        await self._driver(container.record.spec.runtime).signal(container_id, signal)

    async def exec_sync(
        self, container_id: str, argv: tuple[str, ...], timeout: float | None
    ) -> ExecResult:
        container = self._running(container_id)
        runtime = self._driver(container.record.spec.runtime)
        if not isinstance(runtime, Executes):
            raise FailedPrecondition(
                f"runtime {runtime.name!r} cannot run a command in a container"
            )
        self._warm_cgroup_attach()  # the command joins the container's cgroups
        return await runtime.exec_sync(container_id, argv, timeout)

    async def exec_stream(
        self, container_id: str, argv: tuple[str, ...], *, tty: bool
    ) -> ExecSession:
        container = self._running(container_id)
        runtime = self._driver(container.record.spec.runtime)
        if not isinstance(runtime, StreamsExec):
            raise FailedPrecondition(
                f"runtime {runtime.name!r} cannot run an interactive command in a container"
            )
        self._warm_cgroup_attach()
        return await runtime.exec_stream(container_id, argv, tty=tty)

    async def attach(
        self, container_id: str, *, stdout: bool = True, stderr: bool = True
    ) -> AttachSession:
        container = self._running(container_id)
        runtime = self._driver(container.record.spec.runtime)
        if not isinstance(runtime, Attaches):
            raise FailedPrecondition(f"runtime {runtime.name!r} cannot attach to a container")
        return await runtime.attach(container_id, stdout=stdout, stderr=stderr)

    async def reopen_log(self, container_id: str) -> None:
        container = self._running(container_id)
        runtime = self._driver(container.record.spec.runtime)
        if not isinstance(runtime, ReopensLogs):
            raise FailedPrecondition(f"runtime {runtime.name!r} keeps no CRI log to reopen")
        await runtime.reopen_log(container_id)

    async def update(self, container_id: str, resources: Resources) -> None:
        container = self._running(container_id)
        async with container.lock:
            record = container.record
            merged = record.spec.resources.merged(resources)
            await self._driver(record.spec.runtime).update(container_id, merged)
            if self.network is not None:
                await self.network.update(container_id, merged)
            if self.disk is not None:
                await self.disk.update(container_id, merged, self._driver(record.spec.runtime))
            spec = LaunchSpec(**{**record.spec.__dict__, "resources": merged})
            self._checkpoint(container, container.record.evolve(spec=spec), publish=False)

    async def usage(self, container_id: str) -> Statistics:
        container = self._running(container_id)
        statistics = await self._driver(container.record.spec.runtime).usage(container_id)
        if self.network is not None:
            statistics.update(await self.network.usage(container_id))
        if self.disk is not None:  # a runtime's own figures (a VM's disk) come first
            for key, value in (await self.disk.usage(container_id)).items():
                statistics.setdefault(key, value)
        statistics.setdefault("timestamp", time.time())
        return statistics

    def status(self, container_id: str) -> ContainerRecord:
        return self._get(container_id).record

    def containers(self) -> list[ContainerRecord]:
        return [container.record for container in self._containers.values()]

    async def runtimes(self) -> list[Fingerprint]:
        fingerprints = await asyncio.gather(*(d.fingerprint() for d in self.drivers.values()))
        return [with_disk_note(fingerprint) for fingerprint in fingerprints]

    def events(
        self, container_id: str | None = None, since: float | None = None
    ) -> AsyncIterator[Event | Missed]:
        return self.event_hub.follow(container_id, since)

    # ---- recovery and shutdown ----

    async def recover(self) -> None:
        """Rebuild the registry from checkpoints, re-attach drivers, and resume watching."""
        records = self._store.load_all()
        # A quarantined (unreadable) record's container is still known: its processes stay.
        known_ids = {record.container_id for record in records} | set(self.quarantined_ids())
        for record in records:
            container = Container(record)
            self._containers[record.container_id] = container
            if record.state is State.TERMINATED:
                container.terminated.set()
            elif record.spec.id_mapping is not None:
                self._reserve_ids(record)
        if self.pod_cgroups is not None:  # before the runtimes: they find their cgroups there
            for record in records:
                self.pod_cgroups.place(record.spec)
        if self.network is not None:  # before the runtimes: they find their attachments loaded
            await self.network.recover(known_ids)
        for name, driver in self.drivers.items():
            alive = [
                Checkpointed(r.spec, r.handle)
                for r in records
                if r.spec.runtime == name and r.state in (State.RUNNING, State.DESTROYING)
            ]
            await driver.recover(alive, known_ids)
        for record in records:
            await self._resume(self._containers[record.container_id])
        self._prune()
        self._pruner = asyncio.create_task(self._prune_periodically())
        log.info("recovered %d container records", len(records))

    def _reserve_ids(self, record: ContainerRecord) -> None:
        """A live container keeps its range across the restart, even one the config no longer
        maps (it is still in use on the host)."""
        assert record.spec.id_mapping is not None
        if self.user_namespaces is None:
            log.warning(
                "%s runs in a user namespace but this node now maps no host ids",
                record.container_id,
            )
            return
        self.user_namespaces.reserve(record.container_id, record.spec.id_mapping)

    async def _resume(self, container: Container) -> None:
        record = container.record
        driver = self.drivers.get(record.spec.runtime)
        if driver is None:
            if record.state is not State.TERMINATED:
                # Its processes may run on: its sandbox, if caller-named, keeps its mount.
                message = f"runtime {record.spec.runtime!r} is no longer configured"
                self._terminate(
                    container, Termination(Reason.LOST, message=message, finished_at=time.time())
                )
            return
        if record.state is State.TERMINATED:
            return  # TERMINATED is checkpointed only after the cleanup ran
        if self.disk is not None:  # its project id is found on its directories
            await self.disk.recover(record.spec, driver)
        if record.state is State.LAUNCHING:
            await self._fail_launch(container, driver, "the service restarted during launch")
            return
        if record.termination is not None:  # exit checkpointed, cleanup interrupted
            try:
                await driver.cleanup(record.container_id)
            except Exception:
                log.exception("cleanup of %s after the restart failed", record.container_id)
            else:
                await self._release_sandbox(container)  # see _watch
            await self._cleanup_disk(record.container_id)
            self._terminate(container, record.termination)
            return
        container.destroy_requested = record.state is State.DESTROYING
        if container.destroy_requested:
            container.watcher = asyncio.create_task(self._finish_destroy(container, driver))
        else:
            container.watcher = asyncio.create_task(self._watch(container, driver))
            self._watch_disk(container, driver)

    async def _finish_destroy(self, container: Container, driver: Runtime) -> None:
        """A Destroy the restart interrupted, in a live Destroy's order: the watcher is waiting
        on the exit before kill_all, so it sees the container's own exit."""
        watcher = asyncio.create_task(self._watch(container, driver))
        await asyncio.sleep(0)  # one loop turn: the watcher is now inside the runtime's wait
        async with container.lock:
            try:
                await driver.kill_all(container.record.container_id)
            except Exception:
                log.exception(
                    "destroy of %s after the restart failed", container.record.container_id
                )
            container.killed.set()
        await watcher

    async def close(self) -> None:
        """Stop watching; containers keep running and are recovered at the next start."""
        tasks = [c.watcher for c in self._containers.values() if c.watcher is not None]
        if self._pruner is not None:
            tasks.append(self._pruner)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for driver in self.drivers.values():
            await driver.close()
        if self.network is not None:
            await self.network.close()
        if self.disk is not None:
            await self.disk.close()
        if self._attach_warmer is not None:
            self._attach_warmer.close()
        self._store.close()

    # ---- helpers ----

    def _warm_cgroup_attach(self) -> None:
        if self._attach_warmer is not None:
            self._attach_warmer.warm()

    def _driver(self, runtime: str) -> Runtime:
        try:
            return self.drivers[runtime]
        except KeyError:
            raise FailedPrecondition(
                f"runtime {runtime!r} is not configured on this node;"
                f" configured: {sorted(self.drivers)}"
            ) from None

    def _get(self, container_id: str) -> Container:
        try:
            return self._containers[container_id]
        except KeyError:
            raise NotFound(f"unknown container {container_id!r}") from None

    def _running(self, container_id: str) -> Container:
        container = self._get(container_id)
        if container.record.state is not State.RUNNING:
            raise FailedPrecondition(
                f"container {container_id!r} is {container.record.state.value}, not RUNNING"
            )
        return container

    def _checkpoint(
        self, container: Container, record: ContainerRecord, publish: bool = True
    ) -> None:
        self._store.put(record)
        container.record = record
        if publish:
            self.event_hub.publish(
                Event(
                    time.time(),
                    record.container_id,
                    record.state,
                    record.termination,
                    runtime=record.spec.runtime,
                )
            )

    def _pod_cgroups(self) -> PodCgroups:
        if self.pod_cgroups is None:
            raise FailedPrecondition("linux.pod: this service keeps no pod cgroups")
        return self.pod_cgroups

    def _forget(self, container_id: str) -> None:
        self._store.delete(container_id)
        if self.pod_cgroups is not None:
            self.pod_cgroups.unplace(container_id)
        container = self._containers.pop(container_id, None)
        if container is not None and container.record.sandbox_owned:
            remove_directory(container.record.spec.sandbox)

    def _guard_sandbox(self, container: Container) -> None:
        """The sandbox's mount, made before the workload's first instruction. Its place is
        checkpointed already: a crash from here on leaves a record that says what to undo."""
        record = container.record
        if record.sandbox_mount and not sandbox_guard.guard(
            record.spec.sandbox, record.sandbox_mount
        ):
            self._checkpoint(container, record.evolve(sandbox_mount=""), publish=False)

    async def _release_sandbox(self, container: Container) -> None:
        """The sandbox handed back stripped, its mount undone (sandbox_guard.release), once
        nothing of the workload can write it. A failure keeps the mount: nosuid, the host stays
        safe, and the log says what is left."""
        record = container.record
        if record.sandbox_mount and await sandbox_guard.hand_back(
            record.container_id, record.spec.sandbox, record.sandbox_mount
        ):
            self._checkpoint(container, record.evolve(sandbox_mount=""), publish=False)

    def quarantined(self) -> list[QuarantinedRecord]:
        """Records found damaged at start, set aside with the reason."""
        return self._store.quarantined()

    def quarantined_ids(self) -> list[str]:
        return [entry.container_id for entry in self._store.quarantined()]

    def _prune(self) -> None:
        horizon = time.time() - self._retention
        for container in list(self._containers.values()):
            termination = container.record.termination
            terminated = container.record.state is State.TERMINATED
            if terminated and termination is not None and termination.finished_at < horizon:
                self._forget(container.record.container_id)

    async def _prune_periodically(self) -> None:
        while True:
            await asyncio.sleep(max(1.0, min(self._retention, 60.0)))
            self._prune()
