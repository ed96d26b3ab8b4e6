"""A launch's LinuxOptions (what a CRI container asks beyond a Mesos launch) in an LXC container.

Two parties set a container up here: LXC, on the host's side, before the container's init runs;
then our supervisor, that init, inside the container. So what needs the host's paths is LXC's:

    namespaces   lxc.namespace.share.KIND = the file of the pod's namespace; the host's
                 by lxc.namespace.keep. LXC then makes no namespace of that kind (no network of
                 its own when the pod's is joined) and does not set the hostname of a UTS
                 namespace it did not make. The supervisor, told `--ns KIND=host`, stays in
                 what LXC joined rather than nest a namespace of its own.
    mounts       lxc.mount.entry binds of the host paths (recursive, read-only on request,
                 rprivate or rslave), the pod's /etc files read-only, the CRI log's directory.
                 LXC makes every mount of the container a slave of the host's before it mounts
                 anything, so a bidirectional (rshared) volume is a clone the host's namespace
                 makes instead, moved in by a mount hook (shared_mounts.py).
    read-only    a mount hook remounts the rootfs read-only once LXC has made every mount
    root         point in it (a rootfs mounted read-only would leave LXC none to make them).

The rest is the supervisor's, as for the native runtime (adapter/runtimes/native/linux.py): the
capabilities and seccomp program, masked and read-only paths, the user and groups, the CRI log
file it writes and reopens. Its nested mount namespace stays a slave of LXC's when a volume
propagates, so host mounts reach the workload, and an rshared volume stays a peer of the host's.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from adapter.core.errors import FailedPrecondition, InvalidArgument
from adapter.core.model import HOST_NAMESPACE, NAMESPACE_KINDS, PROPAGATIONS, LaunchSpec, Mount
from adapter.core.services import SeccompFilter
from adapter.runtimes.lxc import shared_mounts
from adapter.runtimes.lxc.config import LxcConfig
from adapter.runtimes.lxc.rootfs import resolve_in_root
from adapter.supervisor import linux as supervised
from adapter.supervisor.launch_config import JOINABLE_NAMESPACES, Enforcement

# Where the service's own files are bound into a container: the supervisor, its run directory,
# the CRI log's directory. Hidden from the workload (a masked path): they are the service's.
SERVICE_DIRECTORY = ".containerizer"
LOG_TARGET = f"{SERVICE_DIRECTORY}/log"
# Namespaces our supervisor joins or keeps (the network one is LXC's alone).
SUPERVISOR_KINDS = JOINABLE_NAMESPACES
# Once LXC has mounted everything (and made every mount point), before the pivot_root. LXC
# appends the container's name and the hook's type as arguments: the shell's $0 and $1 here.
READ_ONLY_ROOT_HOOK = "/bin/sh -c 'exec /bin/mount -o bind,remount,ro \"$LXC_ROOTFS_MOUNT\"'"
LXC_PROPAGATION = {"private": "rprivate", "rslave": "rslave"}


def set_namespaces(config: LxcConfig, spec: LaunchSpec) -> None:
    """Share each namespace the launch joins; keep the host's where it asks for them."""
    kept: list[str] = []
    for kind, path in spec.linux.namespaces:
        if kind not in NAMESPACE_KINDS:
            raise InvalidArgument("linux.namespaces", f"{kind!r} is not one of {NAMESPACE_KINDS}")
        if path == HOST_NAMESPACE:
            kept.append(kind)
        elif kind == "user":
            # LXC enters a shared user namespace before the others, and the pod's network
            # namespace, which the host's user namespace owns, is then out of its reach.
            raise FailedPrecondition(
                "lxc runtime: a container cannot join its pod's user namespace (LXC joins it"
                " before the pod's network namespace); run the pod's containers on native"
            )
        elif os.path.isabs(path):
            config.set(f"lxc.namespace.share.{kind}", path, field="linux.namespaces")
        else:
            raise InvalidArgument("linux.namespaces", f"{kind}: {path!r} is not absolute")
    if kept:
        # keep is a deny list: every kind it leaves out is made anew, the user namespace too
        # (which the launch's id mapping asks for: lxc.idmap).
        own_user = spec.id_mapping is not None and spec.linux.namespace("user") is None
        config.set("lxc.namespace.keep", " ".join([*([] if own_user else ["user"]), *kept]))


def joins_network(spec: LaunchSpec) -> bool:
    """The launch joins a network namespace (a pod's or the host's): none is made for it."""
    return spec.linux.namespace("net") is not None


def own_pid_namespace(spec: LaunchSpec) -> bool:
    return spec.linux.namespace("pid") is None


def supervisor_namespaces(spec: LaunchSpec) -> tuple[tuple[str, str], ...]:
    """Inside the container the supervisor already is in each namespace LXC joined or kept."""
    return tuple(
        (kind, HOST_NAMESPACE) for kind, _ in spec.linux.namespaces if kind in SUPERVISOR_KINDS
    )


def hostname(spec: LaunchSpec) -> str | None:
    """The hostname of a UTS namespace of the container's own; None when it joins one."""
    if spec.linux.namespace("uts") is not None:
        return None
    return spec.linux.hostname or spec.container_id[:63]


def set_mounts(config: LxcConfig, spec: LaunchSpec, lower: Path) -> tuple[Mount, ...]:
    """The volumes and the pod's /etc files; returns the volumes that propagate, as the
    supervisor binds them again (each onto itself) to keep its own namespace joined to them."""
    propagating: list[Mount] = []
    shared: list[str] = []  # source, target, ...: the hook's arguments
    for index, mount in enumerate(spec.linux.mounts):
        field = f"linux.mounts[{index}]"
        if mount.propagation not in PROPAGATIONS:
            raise InvalidArgument(f"{field}.propagation", f"{mount.propagation!r} is not known")
        target = _target(mount.container_path, lower, f"{field}.container_path")
        directory = os.path.isdir(mount.host_path)
        if mount.propagation == "rshared":
            shared += [mount.host_path, target]
        else:
            config.mount(mount.host_path, target, _bind_options(mount, directory), field=field)
        if mount.propagation != "private" and directory:
            inside = "/" + target
            propagating.append(Mount(inside, inside, mount.read_only, mount.propagation))
    if shared:
        # The source is cloned in the service's mount namespace: LXC's monitor, and so the
        # container, started from its view of the host's mounts.
        host = f"/proc/{os.getpid()}/ns/mnt"
        command = [sys.executable, "-I", "-S", shared_mounts.__file__, host]
        config.set("lxc.hook.mount", shlex.join(command + shared), field="linux.mounts")
    for source, inside in spec.linux.etc_files:
        target = _target(inside, lower, "linux.etc_files")
        config.mount(source, target, "bind,ro,create=file", field="linux.etc_files")
    return tuple(propagating)


def _target(path: str, lower: Path, field: str) -> str:
    """A mount target inside the rootfs: not the root, not the service's own directory."""
    if not os.path.isabs(path):
        raise InvalidArgument(field, f"{path!r} is not absolute")
    target = resolve_in_root(lower, path, field)
    if not target or target.split("/")[0] == SERVICE_DIRECTORY:
        raise InvalidArgument(field, f"{path!r} is the container's root or the service's own")
    return target


def _bind_options(mount: Mount, directory: bool) -> str:
    options = ["rbind", "create=dir" if directory else "create=file"]
    options += ["ro"] if mount.read_only else []
    return ",".join([*options, LXC_PROPAGATION[mount.propagation]])


def set_read_only_root(config: LxcConfig, spec: LaunchSpec) -> None:
    if spec.linux.read_only_rootfs:
        config.set("lxc.hook.mount", READ_ONLY_ROOT_HOOK)


def set_log_directory(config: LxcConfig, spec: LaunchSpec, lower: Path) -> str | None:
    """Bind the CRI log's directory in; the log file's path inside, or None without one.
    The supervisor opens (and at rotation reopens) it by that path."""
    if not spec.linux.log_path:
        return None
    directory, name = os.path.split(spec.linux.log_path)
    target = resolve_in_root(lower, LOG_TARGET, "linux.log_path")
    config.mount(directory, target, "bind,create=dir", field="linux.log_path")
    return f"/{LOG_TARGET}/{name}"


async def enforcement(spec: LaunchSpec, filters: SeccompFilter) -> Enforcement:
    """The native runtime's enforcement of the launch, as the supervisor applies it inside LXC:
    LXC makes the cgroup namespace and mounts its cgroupfs (read-only here too), and the
    service's directory is hidden from the workload."""
    base = await supervised.enforcement(spec, filters, own_root=True)
    if base.privileged:
        return base
    return dataclasses.replace(
        base,
        cgroup_namespace=False,
        masked_paths=(*base.masked_paths, f"/{SERVICE_DIRECTORY}"),
        readonly_paths=(*base.readonly_paths, "/sys/fs/cgroup"),
    )


@dataclass(frozen=True)
class ContainerView:
    """What the supervisor needs of what LXC mounts: the CRI log file's path inside (None
    without one), the volumes that propagate, to bind again."""

    log_file: str | None = None
    propagating_mounts: tuple[Mount, ...] = ()


def set_linux_options(config: LxcConfig, spec: LaunchSpec, lower: Path) -> ContainerView:
    """Every LXC key of the launch's LinuxOptions (the network's type aside: the driver's)."""
    set_namespaces(config, spec)
    propagating_mounts = set_mounts(config, spec, lower)
    set_read_only_root(config, spec)
    return ContainerView(set_log_directory(config, spec, lower), propagating_mounts)
