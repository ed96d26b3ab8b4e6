"""The two configurations of one LXC container, from its LaunchSpec: LXC's config file (written
through config.py, which refuses any value that could add a key) and our supervisor's launch
configuration, which goes to the container's init through lxc-start's stdin.

Confinement: LXC gives the cgroup namespace and its read-only cgroupfs (`cgroup:ro:force`:
without `force` LXC leaves that to an init that holds CAP_SYS_ADMIN, as ours does), a read-only
/sys and a minimal /dev (lxc.autodev); the rest is the supervisor's (linux.enforcement).

Cgroups: `lxc.cgroup.dir.container = <cgroups_root>/<id>` puts the container exactly where the
shared accounting reader and the isolators look; limits are lxc.cgroup.* (v1) / lxc.cgroup2.*
(v2) keys translated from the one Limits value (adapter/core/limits.py). The monitor gets a
cgroup of its own, `<cgroups_root>.lxc-monitor.<id>` (monitor_cgroup), at the hierarchy root.

Network: a container the node's network isolator chose joins the namespace the isolator made
(`lxc.net.0.type = none` + `lxc.namespace.share.net = <path>`: LXC then creates no network of
its own, and refuses to start if the path is gone rather than fall back to the host's), with the
isolator's /etc/hosts and /etc/resolv.conf bound read-only. Mode host is `lxc.net.0.type = none`
alone. Otherwise `runtimes.lxc.network` applies (LXC's own `empty` namespace by default, or
`veth` onto an operator's bridge).

User namespaces (`LaunchSpec.id_mapping`): `lxc.idmap = u|g 0 START SIZE`, and the binds of the
supervisor and the sandbox are their clones under the container's directory, which the
namespace's root can reach (userns.py prepares them); without a network namespace of its own the
container gets the host's /sys, bound read-only.
"""

from __future__ import annotations

from pathlib import Path

from adapter.core.model import Identity, LaunchSpec
from adapter.core.services import Services
from adapter.core.workload import Workload
from adapter.runtimes.lxc import linux, userns
from adapter.runtimes.lxc.config import LxcConfig, cgroup_keys, set_isolator_network
from adapter.runtimes.lxc.options import LxcOptions
from adapter.runtimes.lxc.rootfs import (
    RUN_TARGET,
    SANDBOX_TARGET,
    SUPERVISOR_TARGET,
    Lower,
    resolve_in_root,
)
from adapter.supervisor.launch_config import Filesystem, LaunchConfig
from isolators.network.model import Attachment

SANDBOX_IN_CONTAINER = "/" + SANDBOX_TARGET
# /proc/sys, /sys and the cgroupfs (in the container's cgroup namespace) read-only; without
# `force` LXC would leave the cgroupfs to an init holding CAP_SYS_ADMIN, as ours does.
CONFINED_MOUNTS = "proc:mixed sys:ro cgroup:ro:force"
# In a user namespace of its own, beside a network namespace it does not own, /sys is the
# host's, bound read-only (userns.py says why).
USER_NAMESPACE_MOUNTS = "proc:mixed cgroup:ro:force"
PRIVILEGED_MOUNTS = "proc:rw sys:rw cgroup:rw:force"


def monitor_cgroup(cgroups_root: str, container_id: str) -> str:
    """The cgroup of the container's monitor (lxc-start), beside the containers' root."""
    return f"{cgroups_root}.lxc-monitor.{container_id}"


class ContainerConfigs:
    """Writes a container's LXC config and its supervisor's launch config; decides nothing
    else. One per driver, for every container under `lxcpath`."""

    def __init__(self, lxcpath: Path, options: LxcOptions, services: Services) -> None:
        self._lxcpath = lxcpath
        self._network = options.network_type
        self._network_link = options.network_link
        self._node = services.node
        self._node_network = services.network
        self._hierarchies = services.cgroups.hierarchies
        self._seccomp_filter = services.seccomp

    def own_network(self, spec: LaunchSpec) -> bool:
        """LXC makes the container's network namespace (in its user namespace, if any)."""
        return not linux.joins_network(spec) and not self._node_network.chooses(spec)

    def lxc_config(
        self, spec: LaunchSpec, lower: Lower, supervisor: str
    ) -> tuple[LxcConfig, linux.ContainerView]:
        """The container's config, its network aside (that comes once the request is checked);
        what the supervisor needs to know of it."""
        cid, directory = spec.container_id, self._lxcpath / spec.container_id
        config = LxcConfig()
        hostname = linux.hostname(spec)
        if hostname is not None:  # LXC sets it in a UTS namespace of its own only
            config.set("lxc.uts.name", hostname, field="linux.hostname")
        config.set("lxc.rootfs.path", lower.rootfs_path(directory / "delta0"), field="image")
        mapping = spec.id_mapping
        own_sysfs = mapping is None or self.own_network(spec)
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
        monitor = monitor_cgroup(self._node.cgroups_root, cid)
        config.set("lxc.cgroup.dir.monitor", monitor, field="container_id")
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

    def set_network(
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

    async def supervisor_config(
        self, spec: LaunchSpec, workload: Workload, identity: Identity, view: linux.ContainerView
    ) -> LaunchConfig:
        """The supervisor's configuration, in the container's paths: it runs as the init."""
        mounts = view.propagating_mounts
        return LaunchConfig(
            status_file=f"/{RUN_TARGET}/status",
            sandbox=SANDBOX_IN_CONTAINER,
            argv=workload.argv,
            enforcement=await linux.enforcement(spec, self._seccomp_filter),
            env=workload.environment,
            cwd=workload.working_dir,
            identity=identity,
            hostname=linux.hostname(spec),
            filesystem=Filesystem(mounts=mounts) if mounts else None,
            log_file=view.log_file,
            namespaces_joined=linux.supervisor_namespaces(spec),
            sysctls=spec.linux.sysctls,
            output_max_size=self._node.log_max_size,
            output_max_files=self._node.log_max_files,
        )


def _auto_mounts(spec: LaunchSpec, own_sysfs: bool) -> str:
    """`own_sysfs`: a sysfs of the container's network namespace can be mounted."""
    if spec.privileged:
        return PRIVILEGED_MOUNTS
    return CONFINED_MOUNTS if own_sysfs else USER_NAMESPACE_MOUNTS
