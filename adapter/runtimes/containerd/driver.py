"""The containerd runtime ("containerd"): OCI and Docker images run by containerd's runc shim.

Launch: a lease (so nothing is collected while we build), the image loaded from our store and
unpacked to snapshots (content.py), an active snapshot for the container, a container record with
the OCI spec (spec.py), and a task whose stdout/stderr go to the sandbox files: through our
sandbox relay, which rotates them by size (logs.py), or appended by the shim itself (task.py).
The shim, not this service, reaps the workload and keeps its exit status until the task is
deleted, so a container survives a restart of the service and one that exited meanwhile still
reports its status: the task is deleted only by cleanup, after the core has checkpointed the exit.

Network: the node's shared network isolator (adapter/core/network.py) makes the container's
namespace (mode none or bridge: veth on our bridge, address, port forwards, rate) before the
container record exists, and the OCI spec joins it by path; mode host leaves the network entry out.
A launch that names no mode on a node without a [network] table keeps what runc gives: a fresh
namespace with only loopback, nothing of the isolator's. Cleanup releases the network last,
whatever containerd answered, so a container never holds an address it no longer uses.

Pods (CRI): a pod's container honours LaunchSpec.linux (linux.py): it joins the namespaces of
the pod's holder (a native container) by path, so it gets no network of its own; its CRI log
is written by our log relay, which the shim runs as the task's logging binary (logs.py); and
ExecSync runs one more process of the task (exec.py). What the service and the shim share by
path (the relay's pid file, ExecSync's FIFOs) lives in a run directory per container
(rundir.py).

This module is the Runtime's verbs and the launch's order; the containerd calls of a container's
life are task.py's, what recovery removes recovery.py's, the in-memory state state.py's.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from google.protobuf import empty_pb2  # type: ignore[import-untyped, unused-ignore]

from adapter.api.containerd.services.leases.v1 import leases_pb2
from adapter.api.containerd.services.snapshots.v1 import snapshots_pb2
from adapter.core.confinement import Confinement
from adapter.core.errors import (
    AlreadyExists,
    ContainerizerError,
    FailedPrecondition,
    InvalidArgument,
    LaunchFailed,
    NotFound,
    Unavailable,
)
from adapter.core.identity import workload_identity
from adapter.core.model import (
    HOST_NAMESPACE,
    Capabilities,
    ExecResult,
    Exit,
    Fingerprint,
    IdMapping,
    LaunchSpec,
    Resources,
    Statistics,
)
from adapter.core.services import Services
from adapter.core.userns import give_to_namespace_root
from adapter.core.workload import merge
from adapter.images.image import Image
from adapter.runtimes.base import Checkpointed, ExecSession, Launched
from adapter.runtimes.containerd import exec as execs
from adapter.runtimes.containerd import linux as pod
from adapter.runtimes.containerd import logs, recovery
from adapter.runtimes.containerd import spec as oci
from adapter.runtimes.containerd.client import ContainerdClient
from adapter.runtimes.containerd.content import ImageLoader
from adapter.runtimes.containerd.handle import CONTAINER_LABEL, ContainerdHandle
from adapter.runtimes.containerd.options import ContainerdOptions
from adapter.runtimes.containerd.remap import RemappedSnapshots
from adapter.runtimes.containerd.rundir import RunDirectories
from adapter.runtimes.containerd.state import ContainerdState
from adapter.runtimes.containerd.task import Tasks
from adapter.runtimes.crilog import check_log_file
from adapter.supervisor.client import REOPEN_TIMEOUT_S, log_reopened
from adapter.supervisor.oci_seccomp import launch_profile
from isolators.cgroups.mem import MemIsolator
from isolators.cgroups.pids import PidsIsolator
from isolators.registry import limitation_at_exit

log = logging.getLogger(__name__)
FINGERPRINT_TIMEOUT = 3.0
RELEASE_TIMEOUT = 5.0


class ContainerdDriver:
    name = "containerd"

    def __init__(self, options: ContainerdOptions, services: Services) -> None:
        self._options = options
        self._address = options.address
        self._namespace = options.namespace
        self._runtime = options.runtime
        self._snapshotter = options.snapshotter
        self._node = services.node
        self._cgroups = services.cgroups
        # Only its check() is used: the OOM counter of the container's memory cgroup.
        # Limits hit, read from the container's own cgroups when it ends: OOM kills (also the
        # ones while the service was down) and forks refused at pids.max.
        self._limit_counters = (
            MemIsolator(self._cgroups.hierarchies),
            PidsIsolator(self._cgroups.hierarchies),
        )
        self._store = services.images
        self._client_instance: ContainerdClient | None = None
        self._loader: ImageLoader | None = None
        self._remapped: RemappedSnapshots | None = None  # parents owned by a userns's ids
        self._state = ContainerdState()
        self._network = services.network
        self._run_dirs = RunDirectories(services.node.state_dir / "containerd")
        self._tasks = Tasks(self._connect, options, services, self._state, self._run_dirs)
        self._releases: set[asyncio.Task[None]] = set()  # of streaming Exec sessions ended

    @property
    def _client(self) -> ContainerdClient:
        return self._connect()

    def _connect(self) -> ContainerdClient:
        """Created on first use, inside the event loop that will use it."""
        if self._client_instance is None:
            self._client_instance = ContainerdClient(self._address, self._namespace)
            self._loader = ImageLoader(self._client_instance, self._store.blob_path)
            self._remapped = RemappedSnapshots(self._client_instance)
        return self._client_instance

    def _handle(self, container_id: str) -> ContainerdHandle:
        handle = self._state.handles.get(container_id)
        if handle is None:
            handle = ContainerdHandle.for_container(
                container_id, self._namespace, self._snapshotter
            )
        return handle

    def _known(self, container_id: str) -> ContainerdHandle:
        handle = self._state.handles.get(container_id)
        if handle is None:
            raise NotFound(f"containerd runtime: no running container {container_id!r}")
        return handle

    # ---- fingerprint ----

    async def fingerprint(self) -> Fingerprint:
        capabilities = Capabilities(
            images=True,
            live_update=True,
            oom_detection=True,
            pid_namespace=True,
            recover=True,
            network_isolation=True,
            pods=True,
            user_namespace=True,
            disk_enforced=True,
        )
        try:
            binary = self._options.runtime_binary_path()
            reply = await self._client.call(
                self._client.version.Version,
                empty_pb2.Empty(),
                "version",
                timeout=FINGERPRINT_TIMEOUT,
            )
        except ContainerizerError as exc:
            return Fingerprint(self.name, "", False, str(exc), capabilities)
        message = (
            f"containerd {reply.version} at {self._address}, namespace {self._namespace},"
            f" runtime {self._runtime}{f' ({binary})' if binary else ''},"
            f" snapshotter {self._snapshotter}"
        )
        return Fingerprint(
            self.name,
            reply.version,
            True,
            message,
            capabilities,
            confinement=Confinement().summary(),
        )

    # ---- launch ----

    async def start(self, spec: LaunchSpec) -> Launched:
        if not spec.image:
            raise InvalidArgument(
                "container.image",
                "the containerd runtime runs images: name an imported image, e.g."
                " localhost/busybox:latest",
            )
        image = self._store.get(spec.image, "container.image")
        # Bad input fails here, before containerd holds anything: an empty command and bare
        # image, an unknown user, a bad seccomp profile or network request, an unusable log.
        workload = merge(spec.command, image, host_sandbox=spec.sandbox)
        async with self._store.view(image.reference) as rootfs:  # the image's /etc files
            identity = await workload_identity(workload.user, spec.linux, rootfs)
        seccomp = await launch_profile(spec)
        if pod.joined_network(spec.linux) is None and self._network.chooses(spec):
            self._network.check(spec)
        if spec.linux.log_path:
            check_log_file(spec.linux.log_path)
        handle = self._handle(spec.container_id)
        self._state.clear_oom(handle.containerd_id)
        self._state.forget_exit(handle.containerd_id)
        await self._create_lease(handle)
        self._state.handles[spec.container_id] = handle
        self._run_dirs.make(spec.container_id)
        try:
            network = await self._prepare_network(spec)
            give_to_namespace_root(spec)
            mounts = await self._prepare_rootfs(handle, image, spec.id_mapping)
            process = (identity, seccomp)
            await self._tasks.create_container(handle, spec, image, process, network.oci)
            pid = await self._tasks.start_task(handle, spec, mounts, identity)
        except ContainerizerError as exc:
            if type(exc) is ContainerizerError:  # a runtime failure with no better class
                raise LaunchFailed(f"launch of {spec.container_id!r} failed: {exc}") from exc
            raise
        self._state.subscribe(self._client, self._tasks.end_after_oom)
        return Launched(handle=handle.to_json(), pid=pid, ip_address=network.address)

    async def _prepare_network(self, spec: LaunchSpec) -> _PreparedNetwork:
        """The isolator's network, or a pod's (or the host's) joined: the pod's holder has the
        address, and its /etc files come with the launch."""
        joined = pod.joined_network(spec.linux)
        if joined is not None:
            host = joined == HOST_NAMESPACE
            etc_files = pod.etc_files(spec.linux)
            return _PreparedNetwork(oci.Network(None if host else joined, host, etc_files), "")
        if not self._network.chooses(spec):
            return _PreparedNetwork(oci.Network(), "")
        attachment = await self._network.prepare(spec)
        etc_files = self._network.etc_files(spec.container_id, spec.container_id[:63])
        return _PreparedNetwork(
            oci.Network(attachment.netns_path, attachment.mode == "host", etc_files),
            attachment.address or "",
        )

    async def _create_lease(self, handle: ContainerdHandle) -> None:
        request = leases_pb2.CreateRequest(
            id=handle.lease_id, labels={CONTAINER_LABEL: handle.container_id}
        )
        try:
            await self._client.call(self._client.leases.Create, request, "create lease")
        except AlreadyExists:
            # A leftover of a launch or destroy that did not finish: clear it and retry.
            await self.kill_all(handle.container_id)
            await self.cleanup(handle.container_id)
            await self._client.call(self._client.leases.Create, request, "create lease")

    async def _prepare_rootfs(
        self, handle: ContainerdHandle, image: Image, mapping: IdMapping | None
    ) -> Any:
        assert self._loader is not None
        try:
            return await self._prepare_snapshot(handle, image, mapping)
        except NotFound:
            # The image's snapshots went from containerd since we last loaded it (removed
            # from outside): load it again, once.
            self._loader.forget(image.reference)
            return await self._prepare_snapshot(handle, image, mapping)

    async def _prepare_snapshot(
        self, handle: ContainerdHandle, image: Image, mapping: IdMapping | None
    ) -> Any:
        assert self._loader is not None and self._remapped is not None
        top = await self._loader.ensure_unpacked(image, handle.snapshotter, handle.lease_id)
        if mapping is not None:  # the image's files owned by the container's ids
            top = await self._remapped.parent(
                top,
                mapping,
                snapshotter=handle.snapshotter,
                config_digest=image.config.digest,
                lease=handle.lease_id,
            )
        prepared = await self._client.call(
            self._client.snapshots.Prepare,
            snapshots_pb2.PrepareSnapshotRequest(
                snapshotter=handle.snapshotter, key=handle.snapshot_key, parent=top
            ),
            f"prepare snapshot {handle.snapshot_key}",
            lease=handle.lease_id,
        )
        return prepared.mounts

    # ---- wait, signal, exec ----

    async def wait(self, container_id: str) -> Exit:
        handle = self._state.handles.get(container_id)
        if handle is None:
            return Exit(lost=True, message="the containerd runtime has no record of it")
        exit_ = await self._tasks.wait(handle)
        return exit_ if exit_.lost else self._with_limitation(handle, exit_)

    def _with_limitation(self, handle: ContainerdHandle, exit_: Exit) -> Exit:
        """A limit the container hit: an OOM kill, from the events stream or the cgroup's
        oom_kill counter (which also counts the ones while the service was down), or forks
        refused at its pids limit."""
        limitation = limitation_at_exit(self._limit_counters, handle.container_id)
        if limitation is None and self._state.oom_killed(handle.containerd_id):
            message = "Memory limit exceeded: containerd reported an OOM kill"
            return Exit(exit_.exit_code, exit_.signal, "mem", message)
        if limitation is None:
            return exit_
        return Exit(exit_.exit_code, exit_.signal, limitation.resource, limitation.message)

    async def signal(self, container_id: str, signal: int) -> None:
        await self._tasks.signal(self._known(container_id), signal)

    async def exec_sync(
        self, container_id: str, argv: tuple[str, ...], timeout: float | None
    ) -> ExecResult:
        """One more process of the task, confined as its workload (exec.py)."""
        session = self._exec(container_id, tty=False, stdin=False)
        return await execs.exec_sync(session, argv, timeout)

    async def exec_stream(
        self, container_id: str, argv: tuple[str, ...], *, tty: bool
    ) -> ExecSession:
        session = self._exec(container_id, tty=tty, stdin=True)
        try:
            await session.start(argv)
        except BaseException:
            await asyncio.shield(session.release())
            raise
        return session

    def _exec(self, container_id: str, *, tty: bool, stdin: bool) -> execs.TaskExec:
        handle = self._known(container_id)
        return execs.TaskExec(
            self._client,
            handle.containerd_id,
            self._run_dirs.path(container_id),
            tty=tty,
            stdin=stdin,
            background=self._releases,
        )

    async def reopen_log(self, container_id: str) -> None:
        self._known(container_id)
        logs.reopen(self._run_dirs.path(container_id), container_id)
        log_path = self._state.log_paths.get(container_id, "")
        if log_path and not await log_reopened(log_path):
            raise FailedPrecondition(
                f"containerd runtime: {container_id!r} did not reopen {log_path} within"
                f" {REOPEN_TIMEOUT_S:g} s"
            )

    async def writable_dirs(self, container_id: str) -> tuple[str, ...]:
        """The container's snapshot's upper directory, from the mounts containerd gives for the
        snapshot (never from a path inside the container): in the snapshotter's root."""
        handle = self._known(container_id)
        reply = await self._client.call(
            self._client.snapshots.Mounts,
            snapshots_pb2.MountsRequest(snapshotter=handle.snapshotter, key=handle.snapshot_key),
            f"mounts of snapshot {handle.snapshot_key}",
        )
        return writable_dirs_of(reply.mounts)

    # ---- update, usage ----

    async def update(self, container_id: str, resources: Resources) -> None:
        handle = self._known(container_id)
        await self._tasks.update(handle, self._node.limits(resources))

    async def usage(self, container_id: str) -> Statistics:
        """The shared accounting reader on the cgroups runc made at linux.cgroupsPath."""
        self._known(container_id)
        if not self._cgroups.dirs(container_id):
            raise NotFound(f"containerd runtime: {container_id!r} has no cgroup (not running)")
        return self._cgroups.statistics(container_id)

    # ---- kill_all, cleanup, recovery ----

    async def kill_all(self, container_id: str) -> None:
        """SIGKILL to every process of the task; no task, or a stopped one, is no error."""
        await self._tasks.kill_all(self._handle(container_id).containerd_id)

    async def cleanup(self, container_id: str) -> None:
        """Delete task, container, snapshot, lease; each step tolerates what an earlier,
        interrupted cleanup already removed."""
        try:
            await self._tasks.delete(self._handle(container_id))
        finally:
            await self._network.cleanup(container_id)
        # After the task's deletion: the shim has then ended the log relay, which writes here.
        self._run_dirs.remove(container_id)
        self._state.log_paths.pop(container_id, None)

    async def recover(self, checkpointed: list[Checkpointed], known_ids: set[str]) -> None:
        for entry in checkpointed:
            cid = entry.spec.container_id
            if entry.spec.linux.log_path:
                self._state.log_paths[cid] = entry.spec.linux.log_path
            if entry.handle:
                self._state.handles[cid] = ContainerdHandle.from_json(cid, entry.handle)
            else:
                self._state.handles[cid] = self._handle(cid)
        try:
            for orphan in await recovery.orphans(self._client, known_ids):
                log.info("containerd: removing orphan container %s", orphan)
                await self.kill_all(orphan)
                await self.cleanup(orphan)
            self._run_dirs.remove_orphans(known_ids)
            stored = {image.reference for image in self._store.list()}
            await recovery.remove_images_not_in(self._client, stored, self._loader)
        except Unavailable as exc:
            # The other runtimes must keep working; fingerprint reports containerd unhealthy.
            log.warning("containerd recovery skipped: %s", exc)
            return
        self._state.subscribe(self._client, self._tasks.end_after_oom)

    async def close(self) -> None:
        if self._releases:  # ended Exec sessions whose processes are being deleted
            await asyncio.wait(self._releases, timeout=RELEASE_TIMEOUT)
        await self._state.close()
        if self._client_instance is not None:
            await self._client_instance.close()


@dataclass(frozen=True)
class _PreparedNetwork:
    oci: oci.Network
    address: str  # "" without an address of its own


def writable_dirs_of(mounts: Any) -> tuple[str, ...]:
    """Where a snapshot's mounts write: overlayfs' `upperdir=`, or a writable bind's source
    (a snapshot without parent on the native snapshotter)."""
    found: list[str] = []
    for mount in mounts:
        options = list(mount.options)
        if mount.type == "overlay":
            found += [o.removeprefix("upperdir=") for o in options if o.startswith("upperdir=")]
        elif mount.type == "bind" and "ro" not in options:
            found.append(mount.source)
    return tuple(path for path in found if path.startswith("/"))
