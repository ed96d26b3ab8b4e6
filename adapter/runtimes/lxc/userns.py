"""Mounts the service makes for an LXC container with `lxc.idmap` (a user namespace of its
own): its image layers idmapped into its id range, the host's /sys, and the service's own
binds (the supervisor, the sandbox) made reachable.

Such a container mounts its overlay rootfs from inside its user namespace, as its root (the
range's first host uid). The image's layers are owned by host ids from 0, which that namespace
does not map: their files would be nobody's there, and the container's root could not change
its /etc. So each layer is bound read-only through an idmapped mount that shows host id N as
the range's start + N (mount_setattr MOUNT_ATTR_IDMAP), made by the service as host root before
lxc-start, under the container's directory; LXC stacks those instead. The overlay itself cannot
be idmapped (overlayfs refuses it), and LXC's `lxc.rootfs.options = idmap=container` takes a
directory rootfs only.

/sys: a user namespace may mount sysfs only over a network namespace it owns, and one the
container joins (the network isolator's, the host's) is the host's user namespace's. So then the
host's /sys, alone (none of the mounts below it) and read-only, is cloned here and bound in by
LXC, as the native runtime's supervisor does (its /sys/class/net shows the host's interfaces).

The service's binds: LXC mounts them from inside the user namespace too, as its root, which
must be able to walk to the source, and the sandbox's parents may be closed to it (0700). A
clone of each, attached under the container's directory, is what LXC binds instead, so only
the lxcpath must be searchable by every user.

The mounts belong to the container's directory (under `MOUNTS`): `unmount_all` detaches them
before the directory is removed (a removal must not walk into the sandbox), at cleanup and,
after a crash, when recovery removes what is left; it raises rather than leave one there.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import stat
from dataclasses import replace
from pathlib import Path

from adapter.core import userns as core_userns
from adapter.core.errors import FailedPrecondition, LaunchFailed
from adapter.core.model import IdMapping, LaunchSpec
from adapter.core.sandbox import OUTPUTS, open_output
from adapter.runtimes.lxc.rootfs import Lower
from adapter.supervisor.children import Child

START_TIMEOUT_S = 10.0
MOUNTS = "mounts"  # in the container's directory: layer-0..layer-<n-1>, sys, BOUND
BOUND = ("supervisor", "sandbox")  # the service's binds, cloned
# x86_64 and aarch64 share these numbers (the generic syscall table since Linux 5.2).
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
OPEN_TREE_CLONE = 1
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
MOUNT_ATTR_IDMAP = 0x100000
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _check(result: int, what: str) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return result


async def user_namespace(mapping: IdMapping) -> int:
    """A descriptor of a user namespace with `mapping`: what an idmapped mount takes. Made by
    a short-lived child (`unshare --user`), whose namespace the descriptor keeps alive."""
    child = Child.start(["unshare", "--user", "--", "/bin/sh", "-c", "echo; exec sleep 60"])
    try:
        if await asyncio.wait_for(child.readline(), START_TIMEOUT_S) != b"\n":
            raise LaunchFailed("user_namespace: unshare --user did not start")
        for name, start in (("uid_map", mapping.uid_start), ("gid_map", mapping.gid_start)):
            Path(f"/proc/{child.pid}/{name}").write_text(f"0 {start} {mapping.size}\n")
        return os.open(f"/proc/{child.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        child.kill()
        await child.wait()


def mount_layers(layers: tuple[Path, ...], directory: Path, userns_fd: int) -> tuple[Path, ...]:
    """Each layer bound read-only at directory/layer-<index>, its ids shown through
    `userns_fd`'s mapping; the mount points, in the layers' order. `directory` is the
    service's (the container's MOUNTS)."""
    directory.mkdir(exist_ok=True)
    mounted = []
    for index, layer in enumerate(layers):
        point = directory / f"layer-{index}"
        # A layer is one directory of the image store: no mounts below it to take along.
        _attach_clone(layer, point, MOUNT_ATTR_IDMAP | MOUNT_ATTR_RDONLY, userns_fd)
        mounted.append(point)
    return tuple(mounted)


def mount_sysfs(directory: Path) -> Path:
    """The host's /sys alone, read-only, at directory/sys (see above)."""
    directory.mkdir(exist_ok=True)
    point = directory / "sys"
    flags = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC
    _attach_clone(Path("/sys"), point, flags, 0)
    return point


def mount_bind(source: Path, directory: Path, name: str) -> Path:
    """What a plain bind of `source` would show (not the mounts below it), at directory/name."""
    point = directory / name
    _attach_clone(source, point, 0, 0)
    return point


def _attach_clone(source: Path, point: Path, attributes: int, userns_fd: int) -> None:
    """A clone of the mount at `source` (not of those below it), with `attributes`, attached
    at `point`, new, a directory or a file as `source` is."""
    if source.is_dir():
        point.mkdir()
    else:
        point.touch(mode=0o444, exist_ok=False)
    flags = OPEN_TREE_CLONE | os.O_CLOEXEC
    tree = _check(_libc.syscall(SYS_OPEN_TREE, AT_FDCWD, os.fsencode(source), flags), str(source))
    try:
        if attributes:
            attr = _MountAttr(attributes, 0, 0, userns_fd)
            size = ctypes.sizeof(attr)
            at = AT_EMPTY_PATH
            result = _libc.syscall(SYS_MOUNT_SETATTR, tree, b"", at, ctypes.byref(attr), size)
            _check(result, f"mount attributes of {source}")
        result = _libc.syscall(
            SYS_MOVE_MOUNT, tree, b"", AT_FDCWD, os.fsencode(point), MOVE_MOUNT_F_EMPTY_PATH
        )
        _check(result, f"attach {source} at {point}")
    finally:
        os.close(tree)


def unmount_all(container_dir: Path) -> None:
    """Detach every mount the service made for the container (a mount point with nothing
    mounted is passed by), so that removing the directory never walks into one."""
    directory = container_dir / MOUNTS
    try:
        points = [entry.path for entry in _entries(directory)]
    except (FileNotFoundError, NotADirectoryError):
        return
    for point in points:
        if _libc.umount2(os.fsencode(point), MNT_DETACH) < 0:
            code = ctypes.get_errno()
            if code not in (errno.EINVAL, errno.ENOENT):
                raise OSError(code, f"umount {point}: {os.strerror(code)}")


def _entries(directory: Path) -> list[os.DirEntry[str]]:
    with os.scandir(directory) as entries:
        return list(entries)


async def prepare(
    spec: LaunchSpec, lower: Lower, container_dir: Path, supervisor: str, own_network: bool
) -> Lower:
    """In a user namespace: the layers as its root sees them, clones of the supervisor and the
    sandbox and, without a network namespace of its own (`own_network`), the host's /sys,
    under the container's directory (see above). LXC binds a volume as that root: its parents
    must be searchable by every user (refused, naming it, if not)."""
    mapping = spec.id_mapping
    if mapping is None:
        return lower
    for index, volume in enumerate(spec.linux.mounts):
        if not searchable_by_all(Path(volume.host_path).parent):
            raise FailedPrecondition(
                f"linux.mounts[{index}].host_path: {volume.host_path} is out of reach of a"
                " user namespace's root: each directory above it must be searchable by"
                " every user (o+x)"
            )
    mounts = container_dir / MOUNTS
    mounts.mkdir(parents=True)
    if not own_network:
        mount_sysfs(mounts)
    for source, name in zip((supervisor, spec.sandbox), BOUND, strict=True):
        mount_bind(Path(source), mounts, name)
    userns = await user_namespace(mapping)
    try:
        layers = mount_layers(lower.layers, mounts, userns)
    finally:
        os.close(userns)
    return replace(lower, layers=layers)


def give_to_namespace_root(spec: LaunchSpec, container_dir: Path) -> None:
    """The overlay's upper and work directories, the run directory (the status file), the
    sandbox and its outputs are written by the namespace's root: our supervisor runs as
    that root, and opens the outputs inside."""
    mapping = spec.id_mapping
    if mapping is None:
        return
    (container_dir / "work").mkdir()  # LXC's overlay workdir, which it would make as root
    core_userns.give_directories(
        mapping, *(container_dir / part for part in ("delta0", "work", "run"))
    )
    core_userns.give_to_namespace_root(spec)
    for name in OUTPUTS:  # the core made them, as root; opened without following a link
        output = open_output(spec.sandbox, name)
        try:
            os.fchown(output, mapping.host_uid(0), mapping.host_gid(0))
        finally:
            os.close(output)


def searchable_by_all(path: Path) -> bool:
    """Every existing directory from `path` up to / lets any user through (o+x): what an
    unprivileged container's root needs to reach its rootfs and binds."""
    for directory in (path, *path.parents):
        try:
            mode = directory.stat().st_mode
        except FileNotFoundError:
            continue  # made by us later, 0755
        if not mode & stat.S_IXOTH:
            return False
    return True
