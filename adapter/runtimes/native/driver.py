"""The native runtime ("native"; Mesos' MesosContainerizer): our isolators plus a supervisor.

Launch: every isolator prepares (cgroups created, limits written), then the C supervisor forks
the workload, which joins the cgroups and new pid/mount/uts/ipc namespaces before its first
instruction. The supervisor, not this service, reaps the workload and records its status
durably, so an exit while the service is down is not lost. kill_all kills the init of a pid
namespace of the container's own first (the kernel kills the rest of the namespace), then sweeps
the cgroups through the freezer for anything else.

Attach: every launch gets an attach socket in its run directory, so the supervisor carries the
workload's output (to the sandbox's files, or the CRI log) and serves it, and with linux.stdin
the workload's stdin, to clients that attach at any time, also after a restart of the service.

A CRI pod's holder (`linux.hold_only`) whose namespaces need no process (no shared pid namespace,
no user namespace) is pinned instead (pinned.py): its network, UTS and IPC namespaces held by
bind mounts in its run directory, no supervisor, no cgroups; it "runs" until kill_all and its
cleanup lets the namespaces go.

Network: the shared network isolator prepares the container's namespace (mode none or bridge)
first, so a bad request fails before anything else exists; the supervisor's child joins it
(--netns) before its other namespaces. Host mode passes no --netns.

Confinement (adapter/core/confinement.py) is the supervisor's: the default capabilities, the seccomp
filter (compiled once per service: adapter/supervisor/seccomp.py), no_new_privs for non-root users;
with an image also masked and read-only kernel paths, a read-only /sys and a cgroup namespace with a
read-only cgroupfs. A launch without an image keeps the host's filesystem, as in Mesos 0.18.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
from pathlib import Path
from typing import Any

from adapter.core.confinement import Confinement
from adapter.core.errors import FailedPrecondition, NotFound
from adapter.core.identity import HostIdentities, workload_identity
from adapter.core.model import (
    HOST_NAMESPACE,
    Capabilities,
    ExecResult,
    Exit,
    Fingerprint,
    Identity,
    LaunchSpec,
    Resources,
    Statistics,
)
from adapter.core.sandbox import remove_directory
from adapter.core.services import Services
from adapter.core.userns import give_to_namespace_root, own_id_mapping
from adapter.core.workload import SANDBOX_IN_CONTAINER, Workload, merge
from adapter.images.image import Image
from adapter.runtimes.base import Checkpointed, Launched
from adapter.runtimes.native import pinned
from adapter.runtimes.native.options import NativeOptions
from adapter.supervisor import client as supervisor
from adapter.supervisor import linux
from adapter.supervisor.attach import AttachSession
from adapter.supervisor.exec import ExecConfig, exec_sync
from adapter.supervisor.launch_config import Filesystem, LaunchConfig, check_sysctl
from adapter.supervisor.processes import ProcessRef, supervised_exit
from adapter.supervisor.session import ExecSession
from isolators.base import Isolator, Limitation
from isolators.cgroups.isolator import CgroupIsolator
from isolators.registry import (
    ContainerCgroups,
    build_isolators,
    limitation_at_exit,
    prepare_isolators,
)

log = logging.getLogger(__name__)

# How many (image, user) identities are kept: far more than the images and users a node runs.
IMAGE_IDENTITIES_KEPT = 256

# An image's identity cache key: (manifest digest, user, group, supplementary groups).
ImageIdentityKey = tuple[str, str | None, int | None, tuple[int, ...]]

# The supervisor's attach socket in the container's run directory (root's, 0700): every launch
# has one, so a client can attach to the workload's stdio whenever it runs.
ATTACH_SOCKET = "attach"
# How long kill_all waits for a pid namespace to end after its init's SIGKILL: a slower end (a
# large address space to tear down, a task in uninterruptible sleep) gets the cgroup sweep.
NAMESPACE_END_TIMEOUT = 1.0
# The signals that end a pinned hold, as they would end a holder process.
ENDING_SIGNALS = frozenset({signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


class _Running:
    """One container this driver watches: its supervisor, exit and limitation tasks."""

    def __init__(
        self,
        handle: supervisor.SupervisorHandle,
        exit_task: asyncio.Task[Any],
        spec: LaunchSpec | None = None,
    ) -> None:
        self.handle = handle
        self.spec = spec  # what was launched: an exec runs as its workload
        self.exit_task = exit_task
        self.limitation: Limitation | None = None
        self.watch_task: asyncio.Task[None] | None = None


async def _end_pid_namespace(handle: supervisor.SupervisorHandle) -> None:
    """SIGKILL to the container's init, pid 1 of its pid namespace, and the wait for its end:
    the kernel kills every other process of the namespace and ends the init only once they
    all have, so the init's pidfd turning readable means the namespace is empty. After
    NAMESPACE_END_TIMEOUT the wait is given up (the cgroup sweep, which comes next, kills
    what is left either way)."""
    init = ProcessRef(handle.child_pid, handle.child_start_time)
    if init.send(signal.SIGKILL):
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(init.wait(), NAMESPACE_END_TIMEOUT)


def _make_run_dir(path: str) -> None:
    """An empty directory of root's only (its files are ours) for the container: a previous
    container's of the same id is removed first."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        shutil.rmtree(path, ignore_errors=True)
        os.mkdir(path, 0o700)
    except FileNotFoundError:  # the first launch: the runtime's directory is made too
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.mkdir(path, 0o700)


class NativeDriver:
    name = "native"

    def __init__(self, options: NativeOptions, services: Services) -> None:
        node = services.node
        self._host_identities = HostIdentities()
        # Resolved from an image's /etc files, which its layers fix for good (nobody writes to
        # a layer once it is in place): read once per image and user, not on every launch (a
        # detached overlay mounted, a thread hop and the reads, ~0.4 ms of the event loop's).
        self._image_identities: dict[ImageIdentityKey, Identity] = {}
        self._configured_binary = options.supervisor
        self._namespaces = options.namespaces
        self._run_dir = node.state_dir / "native"
        self._node = node
        names = list(node.isolators)
        self._cgroups: ContainerCgroups | None = (
            services.cgroups if any(n.startswith("cgroups/") for n in names) else None
        )
        self._isolators: list[Isolator] = build_isolators(
            names,
            enable_cfs=node.enable_cfs,
            hierarchies=self._cgroups.hierarchies if self._cgroups else None,
        )
        # The isolators that can report a limitation: Isolator.watch itself never resolves,
        # and a task per container for each of the others would only wait to be cancelled.
        self._watching = [i for i in self._isolators if type(i).watch is not Isolator.watch]
        self._running: dict[str, _Running] = {}
        # Pods' namespaces held by bind mounts (pinned.py): container id -> set at its end;
        # and those whose pins a restart found gone (their end was not seen).
        self._held: dict[str, asyncio.Event] = {}
        self._held_lost: set[str] = set()
        self._network = services.network
        self._images = services.images
        self._supervisors = services.supervisors
        self._seccomp_filter = services.seccomp

    def _binary(self) -> str:
        return supervisor.find_supervisor(self._configured_binary)

    def _seccomp(self) -> bytes:
        return self._seccomp_filter.bpf()

    async def fingerprint(self) -> Fingerprint:
        capabilities = Capabilities(
            live_update=self._cgroups is not None,
            oom_detection=any(i.name == "cgroups/mem" for i in self._isolators),
            pid_namespace=self._namespaces,
            recover=True,
            images=self._namespaces,
            network_isolation=True,
            pods=self._namespaces,
            user_namespace=self._namespaces,
            disk_enforced=True,
            output_complete_at_exit=True,  # the supervisor records the exit after the output
        )
        try:
            binary = self._binary()
            self._seccomp()
        except FailedPrecondition as exc:
            return Fingerprint(self.name, "", False, str(exc), capabilities)
        isolators = ", ".join(i.name for i in self._isolators) or "none"
        message = f"isolators: {isolators}; supervisor: {binary}"
        return Fingerprint(
            self.name, "1", True, message, capabilities, confinement=Confinement().summary()
        )

    async def start(self, spec: LaunchSpec) -> Launched:
        if self.holds_without_process(spec):
            return await self._hold(spec)
        cid = spec.container_id
        binary = self._binary()
        run_dir = f"{self._run_dir}/{cid}"  # text: pathlib's joins cost more on this path
        _make_run_dir(run_dir)
        try:
            netns, address = await self._prepare_network(spec)
            workload, filesystem, image = await self._workload(spec, run_dir)
            give_to_namespace_root(spec, Path(run_dir, "rootfs") if filesystem else None)
            enforcement = await linux.enforcement(
                spec, self._seccomp_filter, own_root=filesystem is not None
            )
            limits = self._node.limits(spec.resources).for_isolators()
            prepared = await prepare_isolators(self._isolators, cid, limits)
            config = LaunchConfig(
                status_file=f"{run_dir}/status",
                sandbox=spec.sandbox,
                argv=workload.argv,
                enforcement=enforcement,
                env=workload.environment,
                cgroup_procs=prepared.cgroup_procs,
                cwd=workload.working_dir,
                identity=await self._identity(workload.user, spec, image),
                hostname=linux.hostname(spec),
                namespaces=self._namespaces,
                netns=netns,
                filesystem=filesystem,
                log_file=spec.linux.log_path or None,
                namespaces_joined=linux.joined_namespaces(spec),
                sysctls=spec.linux.sysctls,
                attach_socket=f"{run_dir}/{ATTACH_SOCKET}",
                stdin=spec.linux.stdin,
                stdin_once=spec.linux.stdin_once,
                tty=spec.linux.tty,
                output_max_size=self._node.log_max_size,
                output_max_files=self._node.log_max_files,
                id_mapping=own_id_mapping(spec),
            )
            handle = await self._supervisors.spawn(binary, config)
            for isolator in self._isolators:
                await isolator.isolate(cid, handle.child_pid)
        except supervisor.SpawnError as exc:
            raise supervisor.launch_error(cid, exc) from exc
        self._attach(spec, handle)
        return Launched(handle=handle.to_json(), pid=handle.child_pid, ip_address=address)

    def holds_without_process(self, spec: LaunchSpec) -> bool:
        """A launch that only holds a pod's namespaces is pinned instead of run, unless its
        namespaces must be made in a user namespace (which a process must own)."""
        return spec.linux.hold_only and self._namespaces and own_id_mapping(spec) is None

    async def _hold(self, spec: LaunchSpec) -> Launched:
        """The pod's network, and its UTS and IPC namespaces (those it does not take from the
        host) pinned in the run directory; the handle names every namespace's file."""
        cid = spec.container_id
        run_dir = f"{self._run_dir}/{cid}"
        _make_run_dir(run_dir)
        self._held[cid] = asyncio.Event()  # from here on, cleanup removes what was made
        netns, address = await self._prepare_network(spec)
        for key, _ in spec.linux.sysctls:
            check_sysctl(
                key,
                host_ipc=spec.linux.namespace("ipc") == HOST_NAMESPACE,
                own_network=netns is not None,
            )
        kinds = [kind for kind in pinned.PINNABLE if spec.linux.namespace(kind) is None]
        try:
            paths = await pinned.pin(
                run_dir,
                kinds,
                hostname=linux.hostname(spec),
                sysctls=spec.linux.sysctls,
                network=netns,
            )
        except OSError as exc:
            raise supervisor.launch_error(cid, supervisor.SpawnError(str(exc))) from exc
        if netns is not None:
            paths["net"] = netns
        return Launched(handle={"pinned": paths}, pid=0, ip_address=address)

    async def _prepare_network(self, spec: LaunchSpec) -> tuple[str | None, str]:
        """(the network namespace to join or None for the host's, the container's address). A
        launch that joins a pod's namespace gets no network of its own."""
        if spec.linux.namespace("net") is not None:
            return linux.joined_netns(spec), ""
        network = await self._network.prepare(spec)
        return network.netns_path, network.address or ""

    async def _workload(
        self, spec: LaunchSpec, run_dir: str
    ) -> tuple[Workload, Filesystem | None, Image | None]:
        """What runs, and the files it sees: the host's, or an overlay of the image's layers
        with the sandbox and the network's /etc files bound in; and the image."""
        if spec.image is None:
            return merge(spec.command, None, host_sandbox=spec.sandbox), None, None
        if not self._namespaces:
            raise FailedPrecondition("native runtime: images need namespaces = true")
        image = self._images.get(spec.image)
        workload = merge(spec.command, image, host_sandbox=spec.sandbox)
        layers = await self._images.layers(spec.image)
        rootfs_dir = Path(run_dir, "rootfs")
        for part in ("upper", "work", "merged"):
            (rootfs_dir / part).mkdir(parents=True)
        # With a network of its own, the container's /etc/hosts and resolv.conf (none for the
        # host's network); the isolator owns and removes the files. A pod's container gets the
        # pod's files instead.
        if spec.linux.etc_files:
            etc_binds = spec.linux.etc_files
        else:
            etc_files = self._network.etc_files(spec.container_id, spec.container_id[:63])
            etc_binds = tuple((str(path), target) for target, path in etc_files.items())
        filesystem = Filesystem(
            ":".join(str(layer) for layer in layers),
            str(rootfs_dir),
            binds=((spec.sandbox, SANDBOX_IN_CONTAINER),),
            read_only_binds=etc_binds,
            mounts=spec.linux.mounts,
            read_only_root=spec.linux.read_only_rootfs,
        )
        return workload, filesystem, image

    async def _identity(self, user: str | None, spec: LaunchSpec, image: Image | None) -> Identity:
        """The workload's identity from its image's /etc files (read through its layers), or
        the host's. An unknown user raises, and is not kept."""
        if spec.image is None or image is None:
            return self._host_identities.resolve(user, spec.linux)
        linux = spec.linux
        key = (image.manifest.digest, user, linux.group, linux.supplementary_groups)
        identity = self._image_identities.get(key)
        if identity is None:
            async with self._images.view(spec.image) as root:
                identity = await workload_identity(user, linux, root)
            if len(self._image_identities) >= IMAGE_IDENTITIES_KEPT:  # the oldest goes
                del self._image_identities[next(iter(self._image_identities))]
            self._image_identities[key] = identity
        return identity

    def _attach(self, spec: LaunchSpec, handle: supervisor.SupervisorHandle) -> None:
        cid = spec.container_id
        exit_task = asyncio.create_task(self._supervisors.wait_exit(handle))
        running = _Running(handle, exit_task, spec)
        running.watch_task = asyncio.create_task(self._watch_limits(cid, running))
        self._running[cid] = running

    async def _watch_limits(self, cid: str, running: _Running) -> None:
        """Mesos semantics: a container that hits a limit is ended, with the limitation."""
        watches = [asyncio.create_task(i.watch(cid)) for i in self._watching]
        try:
            done, _ = await asyncio.wait(
                [*watches, running.exit_task], return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                if task is not running.exit_task and not task.exception():
                    running.limitation = task.result()
                    log.info("%s hit a limit: %s", cid, running.limitation.message)
                    await self.kill_all(cid)
                    break
        finally:
            for task in watches:
                task.cancel()

    async def wait(self, container_id: str) -> Exit:
        held = self._held.get(container_id)
        if held is not None:
            await held.wait()
            if container_id in self._held_lost:
                return Exit(lost=True, message="its pinned namespaces were gone at a restart")
            return Exit(signal=signal.SIGKILL, message="its pinned namespaces were let go")
        running = self._running.get(container_id)
        if running is None:
            return Exit(lost=True, message="the native runtime has no record of this container")
        status = await asyncio.shield(running.exit_task)
        limitation = running.limitation or limitation_at_exit(self._isolators, container_id)
        return supervised_exit(
            status, limitation, "the supervisor ended without recording an exit status"
        )

    async def signal(self, container_id: str, signal: int) -> None:
        held = self._held.get(container_id)
        if held is not None:  # no process: a signal that ends a process ends the hold
            if signal in ENDING_SIGNALS:
                held.set()
            return
        running = self._running.get(container_id)
        if running is None:
            raise NotFound(f"native runtime: no running container {container_id!r}")
        supervisor.kill(running.handle, signal)

    async def exec_sync(
        self, container_id: str, argv: tuple[str, ...], timeout: float | None
    ) -> ExecResult:
        """The command in the container's namespaces and cgroups, as its workload: the same
        identity, environment and confinement, recomputed from the launch's spec."""
        config = await self._exec_config(container_id, argv, tty=False)
        result = await exec_sync(self._binary(), config, timeout=timeout)
        return ExecResult(result.exit_code, result.stdout, result.stderr, result.timed_out)

    async def exec_stream(
        self, container_id: str, argv: tuple[str, ...], *, tty: bool
    ) -> ExecSession:
        config = await self._exec_config(container_id, argv, tty=tty)
        return await ExecSession.start(self._binary(), config)

    async def _exec_config(
        self, container_id: str, argv: tuple[str, ...], *, tty: bool
    ) -> ExecConfig:
        running = self._running.get(container_id)
        if running is None or running.spec is None:
            raise NotFound(f"native runtime: no running container {container_id!r}")
        spec = running.spec
        image = self._images.get(spec.image) if spec.image else None
        workload = merge(spec.command, image, host_sandbox=spec.sandbox)
        return ExecConfig(
            target_pid=running.handle.child_pid,
            target_start_time=running.handle.child_start_time,
            argv=argv,
            enforcement=await linux.enforcement(
                spec, self._seccomp_filter, own_root=image is not None
            ),
            env=workload.environment,
            cwd=workload.working_dir,
            identity=await self._identity(workload.user, spec, image),
            cgroup_procs=[str(d / "cgroup.procs") for d in self._cgroup_dirs(container_id)],
            tty=tty,
        )

    async def attach(
        self, container_id: str, *, stdout: bool = True, stderr: bool = True
    ) -> AttachSession:
        """The workload's stdio through its supervisor's socket (output only when the launch
        did not keep stdin open); the same after a restart of the service."""
        if container_id not in self._running:
            raise NotFound(f"native runtime: no running container {container_id!r}")
        socket_path = self._run_dir / container_id / ATTACH_SOCKET
        return await AttachSession.connect(socket_path, stdout=stdout, stderr=stderr)

    async def writable_dirs(self, container_id: str) -> tuple[str, ...]:
        """The upper directory of an image's overlay (an image-less launch writes the host's
        filesystem, measured by nobody, as in Mesos)."""
        upper = f"{self._run_dir}/{container_id}/rootfs/upper"
        return (upper,) if os.path.isdir(upper) else ()

    def _cgroup_dirs(self, container_id: str) -> list[Path]:
        return self._cgroups.dirs(container_id) if self._cgroups is not None else []

    async def reopen_log(self, container_id: str) -> None:
        running = self._running.get(container_id)
        if running is None:
            raise NotFound(f"native runtime: no running container {container_id!r}")
        if not supervisor.reopen_log(running.handle):
            raise FailedPrecondition(f"native runtime: the supervisor of {container_id!r} is gone")
        log_path = running.spec.linux.log_path if running.spec else ""
        if log_path and not await supervisor.log_reopened(log_path):
            raise FailedPrecondition(
                f"native runtime: {container_id!r} did not reopen {log_path} within"
                f" {supervisor.REOPEN_TIMEOUT_S:g} s"
            )

    async def kill_all(self, container_id: str) -> None:
        """Every process of the container killed, by the cgroup sweep (freezer, then each
        controller's directory). A container whose init is pid 1 of a pid namespace of its own
        loses its init first: the kernel then kills the rest of the namespace and refuses its
        forks, so the sweep finds at most what joined the cgroups from outside it. In a pod's
        or the host's pid namespace the init's end takes nothing along: the sweep comes first."""
        held = self._held.get(container_id)
        if held is not None:
            held.set()  # the namespaces go at cleanup, after the wait
            return
        running = self._running.get(container_id)
        if running is not None and self._own_pid_namespace(running):
            await _end_pid_namespace(running.handle)
        if self._cgroups is not None:
            await self._cgroups.destroy(container_id)
        if running is not None:  # without cgroups, the one kill (a pid namespace goes with it)
            supervisor.kill(running.handle, 9)

    def _own_pid_namespace(self, running: _Running) -> bool:
        """Whether the container's init is pid 1 of a pid namespace made for it (it is the
        workload itself without namespaces, and a member of a pod's or the host's pid namespace
        when the launch joined one)."""
        spec = running.spec
        return self._namespaces and spec is not None and spec.linux.namespace("pid") is None

    async def cleanup(self, container_id: str) -> None:
        if self._held.pop(container_id, None) is not None:
            self._held_lost.discard(container_id)
            run_dir = f"{self._run_dir}/{container_id}"
            pinned.unpin_directory(run_dir)
            await self._network.cleanup(container_id)
            remove_directory(run_dir, ())
            return
        running = self._running.pop(container_id, None)
        if running is not None:
            running.exit_task.cancel()  # done already, unless the exit never came
            if running.watch_task is not None:
                running.watch_task.cancel()
        for isolator in reversed(self._isolators):
            await isolator.cleanup(container_id)
        await self._network.cleanup(container_id)
        run_dir = f"{self._run_dir}/{container_id}"
        if running is None:
            # A launch this driver never saw through, perhaps a hold that a crash interrupted
            # before its handle was checkpointed: its pins, if any, go first (a mounted file
            # cannot be removed). A container that ran has none: no syscalls for it here.
            pinned.unpin_directory(run_dir)
        # What a run directory holds once its supervisor ended: the status file (the attach
        # socket goes with the supervisor); an image's rootfs is left to rmtree.
        remove_directory(run_dir, ("status", ATTACH_SOCKET))

    async def update(self, container_id: str, resources: Resources) -> None:
        if container_id in self._held:
            return  # nothing runs to limit
        if container_id not in self._running:
            raise NotFound(f"native runtime: no running container {container_id!r}")
        limits = self._node.limits(resources).for_isolators()
        for isolator in self._isolators:
            await isolator.update(container_id, limits)

    async def usage(self, container_id: str) -> Statistics:
        if container_id in self._held:
            return {}  # nothing runs to account
        # One pass over the container's cgroup directories for every cgroup isolator: reading
        # once per isolator probed each directory for every controller's files and re-counted
        # cgroup.procs and tasks each time.
        statistics = self._cgroups.statistics(container_id) if self._cgroups else {}
        for isolator in self._isolators:
            if not isinstance(isolator, CgroupIsolator):
                statistics.update(await isolator.usage(container_id))
        return statistics

    async def recover(self, checkpointed: list[Checkpointed], known_ids: set[str]) -> None:
        for isolator in self._isolators:
            await isolator.recover(known_ids)
        for entry in checkpointed:
            paths = entry.handle.get("pinned") if entry.handle else None
            if isinstance(paths, dict):
                self._held[entry.spec.container_id] = held = asyncio.Event()
                if not pinned.still_pinned(paths):  # gone with the host's mounts: it has ended
                    self._held_lost.add(entry.spec.container_id)
                    held.set()
            elif entry.handle:
                handle = supervisor.SupervisorHandle.from_json(entry.handle)
                self._attach(entry.spec, handle)
        if self._run_dir.is_dir():
            for run_dir in self._run_dir.iterdir():
                if run_dir.name not in known_ids:
                    log.info("native: removing orphan run directory %s", run_dir)
                    pinned.unpin_directory(str(run_dir))
                    shutil.rmtree(run_dir, ignore_errors=True)

    async def close(self) -> None:
        for running in self._running.values():
            running.exit_task.cancel()
            if running.watch_task is not None:
                running.watch_task.cancel()
        self._running.clear()
