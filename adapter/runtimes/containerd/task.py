"""One container's life in containerd, after its snapshot is prepared: the container record with
its OCI spec (spec.py), the task with its outputs, its exit, signals and live updates, and at the
end the deletion of everything its launch made (task, container record, snapshot, lease).

The shim, not this service, reaps the workload and keeps its exit status until the task is
deleted: so a Wait after a restart of the service still gets the status, and the task is deleted
only by cleanup, after the core has checkpointed the exit. Each step of the deletion tolerates
what an earlier, interrupted cleanup already removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from google.protobuf import any_pb2  # type: ignore[import-untyped, unused-ignore]

from adapter.api.containerd.runc.options import oci_pb2
from adapter.api.containerd.services.containers.v1 import containers_pb2
from adapter.api.containerd.services.leases.v1 import leases_pb2
from adapter.api.containerd.services.snapshots.v1 import snapshots_pb2
from adapter.api.containerd.services.tasks.v1 import tasks_pb2
from adapter.core.confinement import held_capabilities
from adapter.core.errors import ContainerizerError, FailedPrecondition, NotFound, Unavailable
from adapter.core.limits import Limits
from adapter.core.model import Exit, Identity, LaunchSpec
from adapter.core.sandbox import OUTPUTS
from adapter.core.services import Services
from adapter.core.userns import host_identity
from adapter.images.image import Image
from adapter.runtimes.containerd import logs
from adapter.runtimes.containerd import spec as oci
from adapter.runtimes.containerd.client import ContainerdClient
from adapter.runtimes.containerd.handle import CONTAINER_LABEL, ContainerdHandle
from adapter.runtimes.containerd.options import ContainerdOptions
from adapter.runtimes.containerd.rundir import RunDirectories
from adapter.runtimes.containerd.state import ContainerdState
from adapter.supervisor.client import find_supervisor

log = logging.getLogger(__name__)
RUNC_OPTIONS_TYPE_URL = oci_pb2.Options.DESCRIPTOR.full_name
EXIT_AFTER_KILL_TIMEOUT = 30.0
RECONNECT_DELAY = 1.0
DELETE_ATTEMPTS = 3
DELETE_RETRY_DELAY = 0.2
SIGKILL = 9
# The shim reports a death by signal N as 128 + N (the shell's convention); so does this driver.
SIGNAL_EXIT_BASE = 128


def exit_from_status(status: int) -> Exit:
    if SIGNAL_EXIT_BASE < status <= SIGNAL_EXIT_BASE + 64:
        return Exit(signal=status - SIGNAL_EXIT_BASE)
    return Exit(exit_code=status)


class Tasks:
    """The containers and tasks of one containerd namespace. `connect` gives the driver's
    client, which is made at first use, inside the event loop that will use it."""

    def __init__(
        self,
        connect: Callable[[], ContainerdClient],
        options: ContainerdOptions,
        services: Services,
        state: ContainerdState,
        run_dirs: RunDirectories,
    ) -> None:
        self._connect = connect
        self._options = options
        self._node = services.node
        self._hierarchies = services.cgroups.hierarchies
        self._held_capabilities = held_capabilities()
        self._state = state
        self._run_dirs = run_dirs

    @property
    def _client(self) -> ContainerdClient:
        return self._connect()

    # ---- creation ----

    async def create_container(
        self,
        handle: ContainerdHandle,
        spec: LaunchSpec,
        image: Image,
        process: tuple[Identity, dict[str, Any] | None],
        network: oci.Network,
    ) -> None:
        """`process`: who runs it, and the node's seccomp profile if the launch names one."""
        identity, localhost_seccomp = process
        document = oci.runtime_spec(
            spec,
            image,
            # The directory the container's cgroup is made in: ours, or its pod's there.
            cgroups_root=self._hierarchies.relative(spec.container_id).rpartition("/")[0],
            limits=self._node.limits(spec.resources),
            identity=identity,
            network=network,
            held=self._held_capabilities,
            localhost_seccomp=localhost_seccomp,
        )
        runtime = containers_pb2.Container.Runtime(name=self._options.runtime)
        binary = self._options.runtime_binary_path()
        if binary is not None:
            options = oci_pb2.Options(binary_name=binary)
            runtime.options.CopyFrom(
                any_pb2.Any(type_url=RUNC_OPTIONS_TYPE_URL, value=options.SerializeToString())
            )
        container = containers_pb2.Container(
            id=handle.containerd_id,
            labels={CONTAINER_LABEL: handle.container_id},
            image=image.reference,
            runtime=runtime,
            spec=any_pb2.Any(type_url=oci.SPEC_TYPE_URL, value=oci.encode(document)),
            snapshotter=handle.snapshotter,
            snapshot_key=handle.snapshot_key,
        )
        await self._client.call(
            self._client.containers.Create,
            containers_pb2.CreateContainerRequest(container=container),
            f"create container {handle.containerd_id}",
            lease=handle.lease_id,
        )

    async def start_task(
        self, handle: ContainerdHandle, spec: LaunchSpec, mounts: Any, identity: Identity
    ) -> int:
        """The task, on the prepared snapshot's `mounts`, started; its pid on the host."""
        outputs = self._task_outputs(spec, identity)
        await self._client.call(
            self._client.tasks.Create,
            tasks_pb2.CreateTaskRequest(
                container_id=handle.containerd_id,
                rootfs=mounts,
                stdout=outputs[0],
                stderr=outputs[1],
            ),
            f"create task {handle.containerd_id}",
        )
        reply = await self._client.call(
            self._client.tasks.Start,
            tasks_pb2.StartRequest(container_id=handle.containerd_id),
            f"start task {handle.containerd_id}",
        )
        return int(reply.pid)

    def _task_outputs(self, spec: LaunchSpec, identity: Identity) -> tuple[str, str]:
        """The task's stdout and stderr. A CRI log goes through our log relay, and the
        sandbox's files, when they rotate, through our sandbox relay: the shim runs either
        (logs.py), so the output keeps flowing while this service is down. Else they are
        plain paths of regular files the shim opens for append itself. The core made or
        checked the files just before start (core/sandbox.py): files, not what an earlier
        workload of this sandbox left there."""
        if spec.linux.log_path:
            self._state.log_paths[spec.container_id] = spec.linux.log_path
            relay = logs.relay_uri(
                find_supervisor(None),
                spec.linux.log_path,
                self._run_dirs.path(spec.container_id),
            )
            return relay, relay
        if self._node.log_max_size > 0:
            relay = logs.sandbox_relay_uri(
                find_supervisor(None),
                spec.sandbox,
                self._node.log_max_size,
                self._node.log_max_files,
                host_identity(identity, spec.id_mapping),
            )
            return relay, relay
        stdout, stderr = (str(Path(spec.sandbox) / name) for name in OUTPUTS)
        return stdout, stderr

    # ---- running ----

    async def wait(self, handle: ContainerdHandle) -> Exit:
        """The task's exit as the shim reports it; lost when containerd has no task for it."""
        while True:
            try:
                reply = await self._client.call(
                    self._client.tasks.Wait,
                    tasks_pb2.WaitRequest(container_id=handle.containerd_id),
                    f"wait for task {handle.containerd_id}",
                    timeout=None,
                )
                break
            except NotFound:
                return Exit(lost=True, message="containerd has no task for it any more")
            except Unavailable as exc:  # containerd restarts; its shims keep the container
                log.warning("%s; retrying the wait for %s", exc, handle.container_id)
                await asyncio.sleep(RECONNECT_DELAY)
        self._state.mark_exited(handle.containerd_id)
        return exit_from_status(reply.exit_status)

    async def signal(self, handle: ContainerdHandle, signal: int) -> None:
        await self._client.call(
            self._client.tasks.Kill,
            tasks_pb2.KillRequest(container_id=handle.containerd_id, signal=signal),
            f"kill task {handle.containerd_id}",
        )

    async def kill_all(self, containerd_id: str) -> None:
        """SIGKILL to every process of the task; no task, or a stopped one, is no error."""
        with contextlib.suppress(NotFound, FailedPrecondition):
            await self._client.call(
                self._client.tasks.Kill,
                tasks_pb2.KillRequest(container_id=containerd_id, signal=SIGKILL, all=True),
                f"kill task {containerd_id}",
            )

    async def end_after_oom(self, containerd_id: str) -> None:
        """The OOM killer may have hit a child, not the init: end the whole container."""
        with contextlib.suppress(ContainerizerError):
            await self._client.call(
                self._client.tasks.Kill,
                tasks_pb2.KillRequest(container_id=containerd_id, signal=SIGKILL, all=True),
                f"kill task {containerd_id} after an OOM kill",
            )

    async def update(self, handle: ContainerdHandle, limits: Limits) -> None:
        document = oci.linux_resources(limits)
        await self._client.call(
            self._client.tasks.Update,
            tasks_pb2.UpdateTaskRequest(
                container_id=handle.containerd_id,
                resources=any_pb2.Any(type_url=oci.RESOURCES_TYPE_URL, value=oci.encode(document)),
            ),
            f"update task {handle.containerd_id}",
        )

    # ---- deletion ----

    async def delete(self, handle: ContainerdHandle) -> None:
        """Delete task, container, snapshot, lease, and forget the container."""
        client = self._client
        await self._stopped(handle)
        ctr_id = handle.containerd_id
        steps: list[tuple[Any, Any, str]] = [
            (client.tasks.Delete, tasks_pb2.DeleteTaskRequest(container_id=ctr_id), "task"),
            (
                client.containers.Delete,
                containers_pb2.DeleteContainerRequest(id=ctr_id),
                "container",
            ),
            (
                client.snapshots.Remove,
                snapshots_pb2.RemoveSnapshotRequest(
                    snapshotter=handle.snapshotter, key=handle.snapshot_key
                ),
                "snapshot",
            ),
            (client.leases.Delete, leases_pb2.DeleteRequest(id=handle.lease_id), "lease"),
        ]
        for method, request, what in steps:
            await self._delete(method, request, f"delete {what} {ctr_id}")
        self._state.clear_oom(handle.containerd_id)
        self._state.forget_exit(handle.containerd_id)
        self._state.handles.pop(handle.container_id, None)

    async def _delete(self, method: Any, request: Any, what: str) -> None:
        """One step of cleanup; NotFound means an earlier cleanup did it. An error containerd
        gives no class is retried: the shim can exit while containerd deletes its task
        ("ttrpc: closed", containerd/containerd#8981), and a second Delete completes it."""
        for attempt in range(1, DELETE_ATTEMPTS + 1):
            try:
                await self._client.call(method, request, what)
                return
            except NotFound:
                return
            except ContainerizerError as exc:
                if type(exc) is not ContainerizerError or attempt == DELETE_ATTEMPTS:
                    raise
                log.warning("%s; retrying", exc)
                await asyncio.sleep(DELETE_RETRY_DELAY)

    async def _stopped(self, handle: ContainerdHandle) -> None:
        """containerd deletes only a stopped task: a half-started one is killed and reaped
        first. A task whose exit our Wait returned is stopped already; its kill would cost the
        shim a `runc kill --all` per cleanup."""
        if self._state.exited(handle.containerd_id):
            return
        task_id = handle.containerd_id
        await self.kill_all(task_id)
        with contextlib.suppress(NotFound):
            await self._client.call(
                self._client.tasks.Wait,
                tasks_pb2.WaitRequest(container_id=task_id),
                f"wait for task {task_id}",
                timeout=EXIT_AFTER_KILL_TIMEOUT,
            )
