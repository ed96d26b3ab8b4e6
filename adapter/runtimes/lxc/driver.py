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
native runtime) goes through lxc-start's stdin, which `lxc-start -F` hands to the container's
init: the command, its environment and the user are on no command line. The handshake line of
the supervisor (its stdout is lxc-start's, `lxc.console.path = none`) tells us when the workload
has exec'd, or why it could not.

Confinement is the supervisor's too, as for the native runtime (adapter/core/confinement.py): the
bounding set of its init and the workload cut to the default capabilities, the seccomp filter,
no_new_privs for non-root users, masked and read-only kernel paths in the nested /proc it
mounts. LXC itself gives the cgroup namespace and its read-only cgroupfs (`cgroup:ro:force`:
without `force` LXC leaves that to an init that holds CAP_SYS_ADMIN, as ours does), a
read-only /sys, and a minimal /dev (lxc.autodev).

Cgroups: `lxc.cgroup.dir.container = <cgroups_root>/<id>` puts the container exactly where the
shared accounting reader and the isolators look; limits are lxc.cgroup.* (v1) / lxc.cgroup2.*
(v2) keys translated from the one Limits value (adapter/core/limits.py), and live updates go
through the isolators' update(). The monitor gets a cgroup of its own,
`<cgroups_root>.lxc-monitor.<id>`, at the hierarchy root (LXC removes it when the monitor ends).

Network: when the node has a [network] table or the request names a mode or port mappings, the
node's shared network isolator (adapter/core/network.py) makes the container's namespace first (mode
none or bridge: veth on our bridge, address, port forwards, rate) and the container joins it with
`lxc.net.0.type = none` + `lxc.namespace.share.net = <path>`: LXC then creates no network of its
own, and refuses to start if the path is gone rather than fall back to the host's. Mode host is
`lxc.net.0.type = none` alone. Its /etc/hosts and /etc/resolv.conf are read-only bind mounts of
the isolator's files. Otherwise `runtimes.lxc.network` applies as before (LXC's own `empty`
namespace by default, or `veth` onto an operator's bridge).

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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapter.core.confinement import Confinement
from adapter.core.errors import ConfigError, FailedPrecondition, LaunchFailed, NotFound
from adapter.core.identity import workload_identity
from adapter.core.model import (
    Capabilities,
    ExecResult,
    Exit,
    Fingerprint,
    Identity,
    LaunchSpec,
    Resources,
    Statistics,
)
from adapter.core.services import Services
from adapter.core.workload import Workload, merge
from adapter.images import Image
from adapter.runtimes.base import Checkpointed, Launched
from adapter.runtimes.lxc import linux, userns
from adapter.runtimes.lxc.config import LxcConfig, cgroup_keys, set_isolator_network
from adapter.runtimes.lxc.handle import LxcHandle, find_container_processes
from adapter.runtimes.lxc.options import LxcOptions
from adapter.runtimes.lxc.rootfs import (
    RUN_TARGET,
    SANDBOX_TARGET,
    SUPERVISOR_TARGET,
    BaseRootfs,
    Lower,
    resolve_in_root,
)
from adapter.supervisor import client as protocol
from adapter.supervisor.children import Child as Monitor
from adapter.supervisor.exec import ExecConfig, exec_sync
from adapter.supervisor.processes import ProcessRef, read_status, start_time, supervised_exit
from adapter.supervisor.session import ExecSession
from isolators.base import Isolator, Limitation
from isolators.cgroups import files
from isolators.cgroups.accounting import read_statistics
from isolators.cgroups.cpu import CpuIsolator
from isolators.cgroups.errors import CgroupError
from isolators.cgroups.hierarchy import cgroup_mount_points
from isolators.cgroups.locate import cgroup_dirs_of, distinct
from isolators.cgroups.mem import MemIsolator
from isolators.cgroups.pids import PidsIsolator
from isolators.network.model import Attachment
from isolators.registry import ACCOUNTED_CONTROLLERS, ContainerCgroups, limitation_at_exit

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 15.0
EXIT_AFTER_KILL_TIMEOUT_S = 10.0
SMALL_TREE_ENTRIES = 64  # a container directory up to this size is removed without a thread
SANDBOX_IN_CONTAINER = "/" + SANDBOX_TARGET
# /proc/sys, /sys and the cgroupfs (in the container's cgroup namespace) read-only; without
# `force` LXC would leave the cgroupfs to an init holding CAP_SYS_ADMIN, as ours does.
CONFINED_MOUNTS = "proc:mixed sys:ro cgroup:ro:force"
# In a user namespace of its own, beside a network namespace it does not own, /sys is the
# host's, bound read-only (userns.py says why).
USER_NAMESPACE_MOUNTS = "proc:mixed cgroup:ro:force"
PRIVILEGED_MOUNTS = "proc:rw sys:rw cgroup:rw:force"


@dataclass
class _Container:
    """One container this driver watches."""

    handle: LxcHandle
    spec: LaunchSpec  # what was launched: an exec runs as its workload
    monitor_process: Monitor | None  # None after a restart: not our child
    exit_task: asyncio.Task[None]
    watch_task: asyncio.Task[None] | None = None
    limitation: Limitation | None = None


class LxcDriver:
    name = "lxc"

    def __init__(self, options: LxcOptions, services: Services) -> None:
        node = services.node
        self._lxcpath = node.state_dir / "lxc" / "containers"
        self._rootfs = BaseRootfs(node.state_dir, services.images)
        self._options = options
        self._network = options.network_type
        self._network_link = options.network_link
        self._node_network = services.network
        if options.network is not None and self._node_network.chooses_all:
            raise ConfigError(
                f"{node.where(self.name)}.network: the node's [network] table chooses the"
                " containers' network; remove this key"
            )
        self._node = node
        self._cgroups_root = node.cgroups_root
        self._cgroups: ContainerCgroups = services.cgroups
        self._hierarchies = self._cgroups.hierarchies
        self._cgroup_mounts = cgroup_mount_points() or tuple(set(self._hierarchies.mounts.values()))
        self._mem = MemIsolator(self._hierarchies) if self._hierarchies.has("memory") else None
        self._isolators: list[Isolator] = [
            CpuIsolator(self._hierarchies, enable_cfs=node.enable_cfs)
        ]
        self._isolators += [self._mem] if self._mem else []
        if self._hierarchies.has("pids"):
            self._isolators.append(PidsIsolator(self._hierarchies))
        self._containers: dict[str, _Container] = {}
        self._starting: dict[str, Monitor] = {}
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

    def _container_dir(self, container_id: str) -> Path:
        return self._lxcpath / container_id

    async def writable_dirs(self, container_id: str) -> tuple[str, ...]:
        """The upper directory of its rootfs overlay (rootfs.py), under our lxcpath."""
        upper = self._container_dir(container_id) / "delta0"
        return (str(upper),) if upper.is_dir() else ()

    def _config(
        self, spec: LaunchSpec, lower: Lower, supervisor: str
    ) -> tuple[LxcConfig, linux.ContainerView]:
        """The container's config, its network aside (that comes once the request is checked);
        what the supervisor needs to know of it."""
        cid, directory = spec.container_id, self._container_dir(spec.container_id)
        config = LxcConfig()
        hostname = linux.hostname(spec)
        if hostname is not None:  # LXC sets it in a UTS namespace of its own only
            config.set("lxc.uts.name", hostname, field="linux.hostname")
        config.set("lxc.rootfs.path", lower.rootfs_path(directory / "delta0"), field="image")
        mapping = spec.id_mapping
        own_sysfs = mapping is None or self._own_network(spec)
        if mapping is not None:  # LXC makes the namespace and mounts the rootfs inside it
            config.set("lxc.idmap", f"u 0 {mapping.uid_start} {mapping.size}")
            config.set("lxc.idmap", f"g 0 {mapping.gid_start} {mapping.size}")
            # The overlay's own xattrs (opaque directories) as a user namespace reads them.
            config.set("lxc.rootfs.options", "userxattr")
        if not own_sysfs:
            sysfs = str(directory / userns.MOUNTS / "sys")
            target = resolve_in_root(lower.view, "sys", "image")
            config.mount(sysfs, target, "rbind,create=dir", field="user_namespace")
        config.set("lxc.mount.auto", _auto_mounts(spec, own_sysfs))
        config.set("lxc.autodev", 1)
        config.set("lxc.console.path", "none")  # the init's stdio is lxc-start's: the handshake
        config.set("lxc.tty.max", 0)
        config.set("lxc.pty.max", 0)
        config.set("lxc.apparmor.profile", "unconfined")  # the supervisor mounts a nested /proc
        config.set("lxc.log.file", str(directory / "lxc.log"), field="container_id")
        config.set("lxc.log.level", "WARN")
        cgroup = self._hierarchies.relative(cid)
        config.set("lxc.cgroup.dir.container", cgroup, field="container_id")
        config.set("lxc.cgroup.dir.monitor", self._monitor_cgroup(cid), field="container_id")
        limits = self._node.limits(spec.resources)
        for key, value in cgroup_keys(limits, version=self._hierarchies.version):
            config.set(key, value, field="resources")
        sandbox = spec.sandbox
        if mapping is not None:  # their clones, which the namespace's root can reach
            supervisor, sandbox = (str(directory / userns.MOUNTS / name) for name in userns.BOUND)
        own_mounts = (
            (supervisor, SUPERVISOR_TARGET, "bind,ro,create=file", "supervisor"),
            (str(directory / "run"), RUN_TARGET, "bind,create=dir", "container_id"),
            (sandbox, SANDBOX_TARGET, "bind,create=dir", "sandbox"),
        )
        for source, target, options, field in own_mounts:
            config.mount(source, resolve_in_root(lower.view, target, field), options, field=field)
        return config, linux.set_linux_options(config, spec, lower.view)

    def _set_network(
        self, config: LxcConfig, spec: LaunchSpec, network: Attachment | None, lower: Path
    ) -> None:
        """A pod's (or the host's) namespace when the launch joins one (linux.py shares it);
        the isolator's (or the host's) when it made one; else the runtime's own."""
        cid = spec.container_id
        if linux.joins_network(spec):
            config.set("lxc.net.0.type", "none")
        elif network is not None:
            # Where the rootfs resolves them: an image's /etc/resolv.conf may be a symlink.
            etc_files = {
                resolve_in_root(lower, target, "network"): source
                for target, source in self._node_network.etc_files(cid, cid[:63]).items()
            }
            set_isolator_network(config, network, etc_files)
        else:
            config.set("lxc.net.0.type", self._network)
            if self._network == "veth":
                link = str(self._network_link)
                config.set("lxc.net.0.link", link, field="runtimes.lxc.network_link")
                config.set("lxc.net.0.flags", "up")

    def _monitor_cgroup(self, container_id: str) -> str:
        return f"{self._cgroups_root}.lxc-monitor.{container_id}"

    async def _launch_config(
        self, spec: LaunchSpec, workload: Workload, identity: Identity, view: linux.ContainerView
    ) -> protocol.LaunchConfig:
        """The supervisor's configuration, in the container's paths: it runs as the init."""
        mounts = view.propagating_mounts
        return protocol.LaunchConfig(
            status_file=f"/{RUN_TARGET}/status",
            sandbox=SANDBOX_IN_CONTAINER,
            argv=workload.argv,
            enforcement=await linux.enforcement(spec, self._seccomp_filter),
            env=workload.environment,
            cwd=workload.working_dir,
            identity=identity,
            hostname=linux.hostname(spec),
            filesystem=protocol.Filesystem(mounts=mounts) if mounts else None,
            log_file=view.log_file,
            namespaces_joined=linux.supervisor_namespaces(spec),
            sysctls=spec.linux.sysctls,
            output_max_size=self._node.log_max_size,
            output_max_files=self._node.log_max_files,
        )

    async def start(self, spec: LaunchSpec) -> Launched:
        cid = spec.container_id
        supervisor = self._supervisor()
        directory = self._container_dir(cid)
        await self._remove_leftovers(cid)
        try:
            # The sandbox as the container sees it, with or without an image: its own root.
            workload = merge(
                spec.command, self._image(spec.image), host_sandbox=SANDBOX_IN_CONTAINER
            )
            # The user is the container root's: the busybox base's or the image's /etc files.
            async with self._rootfs.lower(spec.image) as lower:
                identity = await workload_identity(workload.user, spec.linux, lower.view)
                own_network = self._own_network(spec)
                lower = await userns.prepare(spec, lower, directory, supervisor, own_network)
                config, view = self._config(spec, lower, supervisor)
                payload = (await self._launch_config(spec, workload, identity, view)).encode()
                network = await self._prepare_network(spec)
                self._set_network(config, spec, network, lower.view)
            (directory / "delta0").mkdir(parents=True)
            (directory / "run").mkdir()
            userns.give_to_namespace_root(spec, directory)
            (directory / "config").write_text(config.render())
            process, config_fd = self._start_monitor(cid)
            handle = await self._handshake(cid, process, config_fd, payload, workload.argv[0])
        except protocol.SpawnError as exc:
            raise protocol.launch_error(cid, exc) from exc
        self._attach(handle, spec, self._starting.pop(cid, None))
        address = network.address if network is not None else None
        return Launched(
            handle=handle.to_json(), pid=handle.workload_init.pid, ip_address=address or ""
        )

    def _own_network(self, spec: LaunchSpec) -> bool:
        """LXC makes the container's network namespace (in its user namespace, if any)."""
        return not linux.joins_network(spec) and not self._node_network.chooses(spec)

    async def _prepare_network(self, spec: LaunchSpec) -> Attachment | None:
        """The isolator's attachment, or None when LXC's own network applies (see above) or
        the launch joins a pod's namespace."""
        if linux.joins_network(spec) or not self._node_network.chooses(spec):
            return None
        return await self._node_network.prepare(spec)

    def _start_monitor(self, cid: str) -> tuple[Monitor, int]:
        """lxc-start, the supervisor as the init; its config pipe's write end to feed."""
        init = ["/" + SUPERVISOR_TARGET, *protocol.CONFIG_ARGUMENTS]
        command = ["lxc-start", "-F", "-P", str(self._lxcpath), "-n", cid, "--", *init]
        log_file = self._container_dir(cid) / "lxc-start.log"
        monitor, config_fd = protocol.start_configured(command, log_file)
        self._starting[cid] = monitor
        return monitor, config_fd

    async def _handshake(
        self, cid: str, process: Monitor, config_fd: int, payload: bytes, workload: str
    ) -> LxcHandle:
        """Feed the supervisor its configuration, read its handshake and find the container's
        processes on the host."""
        try:
            line = await asyncio.wait_for(
                protocol.handshake(process, config_fd, payload), HANDSHAKE_TIMEOUT_S
            )
        except TimeoutError:
            raise LaunchFailed(
                f"lxc: {cid!r} did not start within {HANDSHAKE_TIMEOUT_S} s"
            ) from None
        if not line:
            raise LaunchFailed(f"lxc: launch of {cid!r} failed: {self._lxc_errors(cid)}")
        _, workload_init_start, init_start = protocol.parse_handshake(line, workload)
        monitor_start = start_time(process.pid) or 0
        procs = self._hierarchies.container_dirs(cid)[0] / "cgroup.procs"
        init, workload_init = find_container_processes(
            procs, process.pid, init_start, workload_init_start
        )
        # A workload that already ended took its processes along: pid 0 records "gone".
        init = init or ProcessRef(0, init_start)
        found = cgroup_dirs_of(init.pid, self._hierarchies) if init.pid else {}
        dirs = distinct(d for c, d in found.items() if c in ACCOUNTED_CONTROLLERS)
        return LxcHandle(
            name=cid,
            lxcpath=str(self._lxcpath),
            monitor=ProcessRef(process.pid, monitor_start),
            init=init,
            workload_init=workload_init or ProcessRef(0, workload_init_start),
            status_file=str(self._container_dir(cid) / "run" / "status"),
            cgroup_dirs=tuple(map(str, dirs or self._hierarchies.container_dirs(cid))),
        )

    def _lxc_errors(self, cid: str) -> str:
        """Why lxc-start ended without a handshake: the ERROR lines it logged."""
        directory = self._container_dir(cid)
        lines: list[str] = []
        for name in ("lxc-start.log", "lxc.log"):
            with contextlib.suppress(OSError):
                text = (directory / name).read_text()
                lines += [line for line in text.splitlines() if "ERROR" in line]
        return "; ".join(lines[-3:]) or "lxc-start exited before the container started"

    # ---- watching --------------------------------------------------------------------------

    def _attach(self, handle: LxcHandle, spec: LaunchSpec, process: Monitor | None) -> None:
        container = _Container(handle, spec, process, asyncio.create_task(handle.init.wait()))
        if self._mem is not None and handle.init.is_alive():
            container.watch_task = asyncio.create_task(self._watch_memory(container))
        self._containers[handle.name] = container

    async def _watch_memory(self, container: _Container) -> None:
        """Mesos semantics: a container that hits its memory limit is ended, with the reason."""
        assert self._mem is not None
        cid = container.handle.name
        try:
            limitation = await self._mem.watch(cid)
        except (OSError, CgroupError):
            return  # the cgroup went away: the container has ended
        container.limitation = limitation
        log.info("%s hit a limit: %s", cid, limitation.message)
        container.handle.workload_init.send(9)

    async def wait(self, container_id: str) -> Exit:
        container = self._containers.get(container_id)
        if container is None:
            return Exit(lost=True, message="the lxc runtime has no record of this container")
        await asyncio.shield(container.exit_task)
        limitation = container.limitation or limitation_at_exit(self._isolators, container_id)
        status = read_status(Path(container.handle.status_file))
        return supervised_exit(
            status, limitation, "the container's init ended without recording a status"
        )

    async def signal(self, container_id: str, signal: int) -> None:
        container = self._containers.get(container_id)
        if container is None:
            raise NotFound(f"lxc runtime: no running container {container_id!r}")
        container.handle.workload_init.send(signal)

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
        container = self._containers.get(container_id)
        if container is None:
            raise NotFound(f"lxc runtime: no running container {container_id!r}")
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
        container = self._containers.get(container_id)
        if container is None:
            raise NotFound(f"lxc runtime: no running container {container_id!r}")
        if not container.handle.init.send(signal.SIGUSR1):
            raise FailedPrecondition(f"lxc runtime: the supervisor of {container_id!r} is gone")
        log_path = container.spec.linux.log_path
        if log_path and not await protocol.log_reopened(log_path):
            raise FailedPrecondition(
                f"lxc runtime: {container_id!r} did not reopen {log_path} within"
                f" {protocol.REOPEN_TIMEOUT_S:g} s"
            )

    async def update(self, container_id: str, resources: Resources) -> None:
        if container_id not in self._containers:
            raise NotFound(f"lxc runtime: no running container {container_id!r}")
        limits = self._node.limits(resources).for_isolators()
        for isolator in self._isolators:
            await isolator.update(container_id, limits)

    async def usage(self, container_id: str) -> Statistics:
        container = self._containers.get(container_id)
        if container is None:
            statistics = self._cgroups.statistics(container_id)
        else:
            dirs = (Path(d) for d in container.handle.cgroup_dirs if Path(d).is_dir())
            statistics = read_statistics(dirs)
        return statistics

    # ---- kill_all, cleanup, recovery -------------------------------------------------------------

    async def kill_all(self, container_id: str) -> None:
        """SIGKILL to the workload, so the supervisor records it; the whole cgroup only if the
        supervisor itself does not end, or for a container that never got that far. In a
        pid namespace not its own (a pod's) the workload's init is not its namespace's pid 1,
        whose end would take the rest along: the cgroup's kill ends what it leaves."""
        container = self._containers.get(container_id)
        if container is None:
            if self._cgroups.dirs(container_id):
                await self._cgroups.destroy(container_id)
            return
        container.handle.workload_init.send(signal.SIGKILL)
        await _wait_for(asyncio.shield(container.exit_task))
        stuck = container.handle.init.is_alive()  # the supervisor itself
        if stuck or not linux.own_pid_namespace(container.spec):
            await self._cgroups.destroy(container_id)

    async def cleanup(self, container_id: str) -> None:
        """Let LXC tear the container down, then remove whatever is left: processes, cgroups,
        the container directory."""
        container = self._containers.pop(container_id, None)
        process = self._starting.pop(container_id, None)
        if container is not None:
            process = process or container.monitor_process
            container.exit_task.cancel()  # done already, unless the exit never came
            if container.watch_task is not None:
                container.watch_task.cancel()
        await self._stop_monitor(container_id, container, process)
        await self._remove_container(container_id)

    async def _stop_monitor(
        self,
        container_id: str,
        container: _Container | None,
        process: Monitor | None,
    ) -> None:
        """Wait for LXC's monitor to finish its teardown; force it if it does not."""
        if process is not None:
            finished = await _wait_for(process.wait())
        elif container is not None:
            finished = await _wait_for(container.handle.monitor.wait())
        else:  # nothing of ours watches it: only a container directory says it may exist
            finished = not self._container_dir(container_id).is_dir()
        if finished:
            return
        await self._lxc_tool("lxc-stop", "-k", "-n", container_id)
        if process is not None and process.returncode is None:
            process.kill()
            await process.wait()
        elif container is not None:
            container.handle.monitor.send(9)

    async def _remove_leftovers(self, container_id: str) -> None:
        """What a previous container of this id left. The full removal costs about a
        millisecond on every launch, so it runs only when something is there: the container's
        directory is created before any resource of it but its network attachment (and
        removed after all of them), so with no directory and no cgroup only the network can
        be left."""
        if self._container_dir(container_id).exists() or self._cgroups.dirs(container_id):
            await self._remove_container(container_id)
        else:
            await self._node_network.cleanup(container_id)

    async def _remove_container(self, container_id: str) -> None:
        """Remove the container's cgroups (LXC does so at a clean stop; not after a kill -9 of
        its monitor, nor where its teardown met processes a kill had not ended yet), its
        monitor cgroup and its directory (config, overlay, status)."""
        if self._cgroups.dirs(container_id):
            await self._cgroups.destroy(container_id)
        for isolator in self._isolators:
            await isolator.cleanup(container_id)
        for cgroup in self._leftover_cgroups(container_id):
            await files.remove(cgroup)
        await self._node_network.cleanup(container_id)  # its processes are gone: links first
        userns.unmount_all(self._container_dir(container_id))
        await _remove_tree(self._container_dir(container_id))

    def _leftover_cgroups(self, container_id: str) -> list[Path]:
        """The container's and its monitor's cgroups still there, each looked at once: LXC makes
        both in every hierarchy, the named and unified ones too, and the accounted ones are
        among those unless a cgroups_hierarchy override put them elsewhere."""
        names = (self._hierarchies.relative(container_id), self._monitor_cgroup(container_id))
        swept = (mount / name.lstrip("/") for mount in self._cgroup_mounts for name in names)
        candidates = [*self._hierarchies.container_dirs(container_id), *swept]
        return [cgroup for cgroup in dict.fromkeys(candidates) if cgroup.is_dir()]

    async def _lxc_tool(self, tool: str, *args: str) -> None:
        with contextlib.suppress(OSError):
            process = await asyncio.create_subprocess_exec(
                tool, "-P", str(self._lxcpath), *args, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            await _wait_for(process.wait())

    async def recover(self, checkpointed: list[Checkpointed], known_ids: set[str]) -> None:
        for entry in checkpointed:
            if not entry.handle:
                continue
            try:
                handle = LxcHandle.from_json(entry.handle)
            except ValueError:
                log.exception("lxc: cannot re-attach %s", entry.spec.container_id)
                continue
            self._attach(handle, entry.spec, None)
        if not self._lxcpath.is_dir():
            return
        for directory in sorted(self._lxcpath.iterdir()):
            if directory.name not in known_ids:
                log.info("lxc: removing unknown container %s", directory)
                await self._lxc_tool("lxc-stop", "-k", "-n", directory.name)
                await self._remove_container(directory.name)

    async def close(self) -> None:
        for container in self._containers.values():
            container.exit_task.cancel()
            if container.monitor_process is not None:
                container.monitor_process.close()
            if container.watch_task is not None:
                container.watch_task.cancel()
        self._containers.clear()


def _auto_mounts(spec: LaunchSpec, own_sysfs: bool) -> str:
    """`own_sysfs`: a sysfs of the container's network namespace can be mounted."""
    if spec.privileged:
        return PRIVILEGED_MOUNTS
    return CONFINED_MOUNTS if own_sysfs else USER_NAMESPACE_MOUNTS


def _is_small_tree(directory: Path, limit: int = SMALL_TREE_ENTRIES) -> bool:
    """True if `directory` holds at most `limit` entries in all (stops counting beyond)."""
    count = 0
    for _, subdirs, names in os.walk(directory):
        count += len(subdirs) + len(names)
        if count > limit:
            return False
    return True


async def _remove_tree(directory: Path) -> None:
    """Remove a container directory. What LXC leaves there is a handful of entries (config,
    logs, the status file, an empty overlay): removed in place, that is a fraction of the
    thread hop a removal in a worker thread costs on every exit. A workload that filled its
    overlay gets the thread, so a big tree never blocks the event loop."""
    if not directory.exists():
        return
    if _is_small_tree(directory):
        shutil.rmtree(directory, ignore_errors=True)
    else:
        await asyncio.to_thread(shutil.rmtree, directory, True)


async def _wait_for(awaitable: Any, timeout: float = EXIT_AFTER_KILL_TIMEOUT_S) -> bool:
    """True if `awaitable` finished within `timeout`."""
    try:
        await asyncio.wait_for(awaitable, timeout)
    except TimeoutError:
        return False
    return True
