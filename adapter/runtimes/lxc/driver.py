"""The LXC runtime ("lxc"): LXC 5 containers under a private lxcpath in our state directory.

Tools, not bindings: each container is run by `lxc-start -F` (foreground), spawned directly
from the event loop (adapter/supervisor/children.py: vfork + exec, its exit seen through a pidfd).
Debian's python3-lxc exists only for the system Python, a pip binding
needs lxc-dev and a compiler, and either one forks inside our process from a library that is
not fork-safe under asyncio; the monitor process `lxc-start -F` is what LXC forks anyway, so
spawning it ourselves costs one exec (a few ms) and leaves no LXC code in the service. Every
other lxc-* call is off the hot path (`lxc-stop -k` only for orphans and stuck containers).

Exit status. `lxc-execute` reports a signal death as 128+n (its init.lxc cannot tell them
apart) and `lxc-start` does not report the status at all. So the container's init is our own
containerizer-supervisor, a static build bind-mounted read-only into the container: it forks
the workload under a nested signal-forwarding init, waits for it, and writes the exact status
(`exited N` / `signaled N`) to a status file in the container's directory on the host. It
outlives a `kill -9` of the service, and the file outlives the container.

    lxc-start -F (monitor, host)
      └─ supervisor (pid 1 of the container)      -> <lxcpath>/<id>/run/status
           └─ supervisor's init (nested pid ns)   <- kill() signals go here, forwarded
                └─ workload (stdout/stderr -> the sandbox, bound at /mnt/mesos/sandbox)

The supervisor's configuration (adapter/supervisor/client.py builds it, as for the
native runtime) goes through lxc-start's stdin, and its handshake line through lxc-start's
stdout (monitor.py).

Confinement is the supervisor's too, as for the native runtime (adapter/core/confinement.py): the
bounding set of its init and the workload cut to the default capabilities, the seccomp filter,
no_new_privs for non-root users, masked and read-only kernel paths in the nested /proc it
mounts. LXC itself gives the cgroup namespace, a read-only cgroupfs and /sys, and a minimal
/dev (container_config.py says which keys).

Cgroups: the container's are exactly where the shared accounting reader and the isolators look,
its limits LXC's cgroup keys (container_config.py); live updates go through the isolators'
update(). The monitor's own cgroup LXC removes when the monitor ends.

Network: when the node has a [network] table or the request names a mode or port mappings, the
node's shared network isolator (adapter/core/network.py) makes the container's namespace first (mode
none or bridge: veth on our bridge, address, port forwards, rate) and the container joins it;
otherwise `runtimes.lxc.network` applies (container_config.py).

User namespaces (`LaunchSpec.id_mapping`): LXC's own, `lxc.idmap = u|g 0 START SIZE`. LXC then
mounts the rootfs and every bind from inside the namespace, as its root, so what it mounts is
prepared for that root by the service first (userns.py): the image's layers idmapped into the
range, the host's /sys (a sysfs mount needs a network namespace the user namespace owns), and
clones of our binds; the overlay's upper, work and run directories and the sandbox are the
namespace root's. Those are host mounts in the container's directory, detached before it is
removed (also by recovery). Through LXC rather than our supervisor's --userns: LXC mounts the
overlay before our supervisor runs, and an overlay cannot be idmapped afterwards. A container
of a pod gets none (`no_pod_user_namespace`): LXC enters a shared user namespace before the
pod's other namespaces, which the host's user namespace owns, and a pid namespace of the pod's
leaves it no /proc to mount.

Pods (CRI, `Capabilities.pods`): a container of a pod joins its holder's namespaces through LXC
and gets its volumes, /etc files, read-only root and log directory from LXC's config, the rest
from the supervisor as on the native runtime (linux.py). ExecSync runs the supervisor's exec
mode on the host against the workload's init; ReopenContainerLog signals the supervisor.

This module is the Runtime's verbs; the package's other parts: container_config.py (the LXC
config and the supervisor's), monitor.py (lxc-start and the handshake), state.py (the
containers watched), teardown.py (stopping and removing, also at recovery), handle.py (what is
checkpointed), rootfs.py, userns.py, linux.py (a pod's options), config.py (the file's syntax).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
from pathlib import Path

from adapter.core.confinement import Confinement
from adapter.core.errors import ConfigError, FailedPrecondition
from adapter.core.identity import workload_identity
from adapter.core.model import (
    Capabilities,
    ExecResult,
    Exit,
    Fingerprint,
    LaunchSpec,
    Resources,
    Statistics,
)
from adapter.core.services import Services
from adapter.core.workload import merge
from adapter.images import Image
from adapter.runtimes.base import Checkpointed, Launched
from adapter.runtimes.lxc import linux, userns
from adapter.runtimes.lxc.container_config import SANDBOX_IN_CONTAINER, ContainerConfigs
from adapter.runtimes.lxc.handle import LxcHandle
from adapter.runtimes.lxc.monitor import LxcStart
from adapter.runtimes.lxc.options import LxcOptions
from adapter.runtimes.lxc.rootfs import BaseRootfs
from adapter.runtimes.lxc.state import LxcState
from adapter.runtimes.lxc.teardown import Teardown, finished_within
from adapter.supervisor import client as protocol
from adapter.supervisor.exec import ExecConfig, exec_sync
from adapter.supervisor.processes import read_status, supervised_exit
from adapter.supervisor.session import ExecSession
from isolators.base import Isolator
from isolators.cgroups.accounting import read_statistics
from isolators.cgroups.cpu import CpuIsolator
from isolators.cgroups.mem import MemIsolator
from isolators.cgroups.pids import PidsIsolator
from isolators.network.model import Attachment
from isolators.registry import limitation_at_exit

log = logging.getLogger(__name__)


class LxcDriver:
    name = "lxc"

    def __init__(self, options: LxcOptions, services: Services) -> None:
        node = services.node
        self._lxcpath = node.state_dir / "lxc" / "containers"
        self._rootfs = BaseRootfs(node.state_dir, services.images)
        self._options = options
        self._network = options.network_type
        self._node_network = services.network
        if options.network is not None and self._node_network.chooses_all:
            raise ConfigError(
                f"{node.where(self.name)}.network: the node's [network] table chooses the"
                " containers' network; remove this key"
            )
        self._node = node
        self._cgroups = services.cgroups
        hierarchies = self._cgroups.hierarchies
        self._mem = MemIsolator(hierarchies) if hierarchies.has("memory") else None
        self._isolators: list[Isolator] = [CpuIsolator(hierarchies, enable_cfs=node.enable_cfs)]
        self._isolators += [self._mem] if self._mem else []
        if hierarchies.has("pids"):
            self._isolators.append(PidsIsolator(hierarchies))
        self._state = LxcState(self._mem)
        self._configs = ContainerConfigs(self._lxcpath, options, services)
        self._lxc_start = LxcStart(self._lxcpath, hierarchies)
        self._teardown = Teardown(self._lxcpath, services, self._isolators)
        self._images = services.images
        self._seccomp_filter = services.seccomp

    # ---- discovery -------------------------------------------------------------------------

    def _supervisor(self) -> str:
        return self._options.static_supervisor()

    def _seccomp(self) -> bytes:
        return self._seccomp_filter.bpf()

    def _image(self, reference: str | None) -> Image | None:
        return None if reference is None else self._images.get(reference)

    async def fingerprint(self) -> Fingerprint:
        capabilities = Capabilities(
            images=True,
            live_update=True,
            oom_detection=self._mem is not None,
            pid_namespace=True,
            recover=True,
            network_isolation=True,
            pods=True,
            disk_enforced=True,
            user_namespace=userns.searchable_by_all(self._lxcpath),
            no_pod_user_namespace=True,  # linux.py says why
        )
        try:
            supervisor = self._supervisor()
            self._seccomp()
            version = await self._lxc_version()
        except (FailedPrecondition, OSError) as exc:
            return Fingerprint(self.name, "", False, str(exc), capabilities)
        network = "the node's [network]" if self._node_network.chooses_all else self._network
        message = f"lxcpath {self._lxcpath}; network {network}; supervisor {supervisor}"
        summary = Confinement().summary()
        return Fingerprint(self.name, version, True, message, capabilities, confinement=summary)

    async def _lxc_version(self) -> str:
        if shutil.which("lxc-start") is None:
            raise FailedPrecondition("lxc-start not found on PATH: install Debian's lxc")
        process = await asyncio.create_subprocess_exec(
            "lxc-start", "--version", stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL, stdin=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        out, _ = await process.communicate()
        return out.decode(errors="replace").strip()

    # ---- launch ----------------------------------------------------------------------------

    async def writable_dirs(self, container_id: str) -> tuple[str, ...]:
        """The upper directory of its rootfs overlay (rootfs.py), under our lxcpath."""
        upper = self._lxcpath / container_id / "delta0"
        return (str(upper),) if upper.is_dir() else ()

    async def start(self, spec: LaunchSpec) -> Launched:
        cid = spec.container_id
        supervisor = self._supervisor()
        directory = self._lxcpath / cid
        await self._teardown.remove_leftovers(cid)
        try:
            # The sandbox as the container sees it, with or without an image: its own root.
            workload = merge(
                spec.command, self._image(spec.image), host_sandbox=SANDBOX_IN_CONTAINER
            )
            # The user is the container root's: the busybox base's or the image's /etc files.
            async with self._rootfs.lower(spec.image) as lower:
                identity = await workload_identity(workload.user, spec.linux, lower.view)
                own_network = self._configs.own_network(spec)
                lower = await userns.prepare(spec, lower, directory, supervisor, own_network)
                config, view = self._configs.lxc_config(spec, lower, supervisor)
                launch = await self._configs.supervisor_config(spec, workload, identity, view)
                payload = launch.encode()
                network = await self._prepare_network(spec)
                self._configs.set_network(config, spec, network, lower.view)
            (directory / "delta0").mkdir(parents=True)
            (directory / "run").mkdir()
            # Root's alone without a user namespace: root in the container is host root then,
            # and may leave setuid-root files in its writable layer, delta0, and open delta0 to
            # everyone. (With one, the namespace's root, which mounts the rootfs, must pass, and
            # what it leaves is set-id to an unprivileged host id of its range.)
            if spec.id_mapping is None:
                directory.chmod(0o700)
            userns.give_to_namespace_root(spec, directory)
            (directory / "config").write_text(config.render())
            process, config_fd = self._lxc_start.spawn(cid)
            self._state.starting[cid] = process
            handle = await self._lxc_start.handshake(
                cid, process, config_fd, payload, workload.argv[0]
            )
        except protocol.SpawnError as exc:
            raise protocol.launch_error(cid, exc) from exc
        self._state.attach(handle, spec, self._state.starting.pop(cid, None))
        address = network.address if network is not None else None
        return Launched(
            handle=handle.to_json(), pid=handle.workload_init.pid, ip_address=address or ""
        )

    async def _prepare_network(self, spec: LaunchSpec) -> Attachment | None:
        """The isolator's attachment, or None when LXC's own network applies (see above) or
        the launch joins a pod's namespace."""
        if linux.joins_network(spec) or not self._node_network.chooses(spec):
            return None
        return await self._node_network.prepare(spec)

    # ---- running ---------------------------------------------------------------------------

    async def wait(self, container_id: str) -> Exit:
        container = self._state.containers.get(container_id)
        if container is None:
            return Exit(lost=True, message="the lxc runtime has no record of this container")
        await asyncio.shield(container.exit_task)
        limitation = container.limitation or limitation_at_exit(self._isolators, container_id)
        status = read_status(Path(container.handle.status_file))
        return supervised_exit(
            status, limitation, "the container's init ended without recording a status"
        )

    async def signal(self, container_id: str, signal: int) -> None:
        self._state.running(container_id).handle.workload_init.send(signal)

    async def exec_sync(
        self, container_id: str, argv: tuple[str, ...], timeout: float | None
    ) -> ExecResult:
        config = await self._exec_config(container_id, argv, tty=False)
        result = await exec_sync(self._supervisor(), config, timeout=timeout)
        return ExecResult(result.exit_code, result.stdout, result.stderr, result.timed_out)

    async def exec_stream(
        self, container_id: str, argv: tuple[str, ...], *, tty: bool
    ) -> ExecSession:
        config = await self._exec_config(container_id, argv, tty=tty)
        return await ExecSession.start(self._supervisor(), config)

    async def _exec_config(
        self, container_id: str, argv: tuple[str, ...], *, tty: bool
    ) -> ExecConfig:
        """The command in the container's namespaces and cgroups, as its workload: the same
        identity, environment and confinement, recomputed from the launch's spec. The
        supervisor that joins it runs on the host, so its static build serves here too."""
        container = self._state.running(container_id)
        spec, handle = container.spec, container.handle
        workload = merge(spec.command, self._image(spec.image), host_sandbox=SANDBOX_IN_CONTAINER)
        async with self._rootfs.lower(spec.image) as lower:
            identity = await workload_identity(workload.user, spec.linux, lower.view)
        return ExecConfig(
            target_pid=handle.workload_init.pid,
            target_start_time=handle.workload_init.start_time,
            argv=argv,
            enforcement=await linux.enforcement(spec, self._seccomp_filter),
            env=workload.environment,
            cwd=workload.working_dir,
            identity=identity,
            cgroup_procs=[str(Path(d) / "cgroup.procs") for d in handle.cgroup_dirs],
            tty=tty,
        )

    async def reopen_log(self, container_id: str) -> None:
        """SIGUSR1 to the supervisor (the container's init): it reopens the CRI log by path,
        a moment later. The kubelet reads the new file as soon as the call returns: so it
        returns once the file is there."""
        container = self._state.running(container_id)
        if not container.handle.init.send(signal.SIGUSR1):
            raise FailedPrecondition(f"lxc runtime: the supervisor of {container_id!r} is gone")
        log_path = container.spec.linux.log_path
        if log_path and not await protocol.log_reopened(log_path):
            raise FailedPrecondition(
                f"lxc runtime: {container_id!r} did not reopen {log_path} within"
                f" {protocol.REOPEN_TIMEOUT_S:g} s"
            )

    async def update(self, container_id: str, resources: Resources) -> None:
        self._state.running(container_id)
        limits = self._node.limits(resources).for_isolators()
        for isolator in self._isolators:
            await isolator.update(container_id, limits)

    async def usage(self, container_id: str) -> Statistics:
        container = self._state.containers.get(container_id)
        if container is None:
            statistics = self._cgroups.statistics(container_id)
        else:
            dirs = (Path(d) for d in container.handle.cgroup_dirs if Path(d).is_dir())
            statistics = read_statistics(dirs)
        return statistics

    # ---- kill_all, cleanup, recovery -------------------------------------------------------

    async def kill_all(self, container_id: str) -> None:
        """SIGKILL to the workload, so the supervisor records it; the whole cgroup only if the
        supervisor itself does not end, or for a container that never got that far. In a
        pid namespace not its own (a pod's) the workload's init is not its namespace's pid 1,
        whose end would take the rest along: the cgroup's kill ends what it leaves."""
        container = self._state.containers.get(container_id)
        if container is None:
            if self._cgroups.dirs(container_id):
                await self._cgroups.destroy(container_id)
            return
        container.handle.workload_init.send(signal.SIGKILL)
        await finished_within(asyncio.shield(container.exit_task))
        stuck = container.handle.init.is_alive()  # the supervisor itself
        if stuck or not linux.own_pid_namespace(container.spec):
            await self._cgroups.destroy(container_id)

    async def cleanup(self, container_id: str) -> None:
        """Let LXC tear the container down, then remove whatever is left: processes, cgroups,
        the container directory."""
        container, process = self._state.forget(container_id)
        await self._teardown.stop_monitor(container_id, container, process)
        await self._teardown.remove_container(container_id)

    async def recover(self, checkpointed: list[Checkpointed], known_ids: set[str]) -> None:
        for entry in checkpointed:
            if not entry.handle:
                continue
            try:
                handle = LxcHandle.from_json(entry.handle)
            except ValueError:
                log.exception("lxc: cannot re-attach %s", entry.spec.container_id)
                continue
            self._state.attach(handle, entry.spec, None)
        await self._teardown.remove_unknown(known_ids)

    async def close(self) -> None:
        self._state.close()
