"""Image layers idmapped into a container's id range, for an LXC container with `lxc.idmap`.

Such a container mounts its overlay rootfs from inside its user namespace, as its root (the
range's first host uid). The image's layers are owned by host ids from 0, which that namespace
does not map: their files would be nobody's there, and the container's root could not change
its /etc. So each layer is bound read-only through an idmapped mount that shows host id N as
the range's start + N (mount_setattr MOUNT_ATTR_IDMAP), made by the service as host root before
lxc-start, under the container's directory; LXC stacks those instead. The overlay itself cannot
be idmapped (overlayfs refuses it), and LXC's `lxc.rootfs.options = idmap=container` takes a
directory rootfs only.

The mounts belong to the container's directory: `unmount_layers` removes them before the
directory is removed, at cleanup and, after a crash, when recovery removes what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
from pathlib import Path

from adapter.core.errors import LaunchFailed
from adapter.core.model import IdMapping
from adapter.supervisor.children import Child

START_TIMEOUT_S = 10.0
DIRECTORY = "idmapped"  # in the container's directory: one mount point per layer, 0..n-1
# x86_64 and aarch64 share these numbers (the generic syscall table since Linux 5.2).
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
OPEN_TREE_CLONE = 1
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
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
    """Each layer bound read-only at directory/<index>, its ids shown through `userns_fd`'s
    mapping; the mount points, in the layers' order. `directory` is new and the service's."""
    directory.mkdir()
    attr = _MountAttr(MOUNT_ATTR_IDMAP | MOUNT_ATTR_RDONLY, 0, 0, userns_fd)
    mounted = []
    for index, layer in enumerate(layers):
        point = directory / str(index)
        point.mkdir()
        # A layer is one directory of the image store: no mounts below it to take along.
        flags = OPEN_TREE_CLONE | os.O_CLOEXEC
        tree = _libc.syscall(SYS_OPEN_TREE, AT_FDCWD, os.fsencode(layer), flags)
        _check(tree, f"open_tree {layer}")
        try:
            size = ctypes.sizeof(attr)
            setattr_result = _libc.syscall(
                SYS_MOUNT_SETATTR, tree, b"", AT_EMPTY_PATH, ctypes.byref(attr), size
            )
            _check(setattr_result, f"idmapped mount of {layer}")
            moved = _libc.syscall(
                SYS_MOVE_MOUNT, tree, b"", AT_FDCWD, os.fsencode(point), MOVE_MOUNT_F_EMPTY_PATH
            )
            _check(moved, f"move_mount to {point}")
        finally:
            os.close(tree)
        mounted.append(point)
    return tuple(mounted)


def unmount_layers(container_dir: Path) -> None:
    """Detach every idmapped layer of the container (a mount point with nothing mounted is
    passed by), so that removing the directory never walks into a layer."""
    directory = container_dir / DIRECTORY
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(directory):
            if _libc.umount2(os.fsencode(entry.path), MNT_DETACH) < 0:
                code = ctypes.get_errno()
                if code not in (errno.EINVAL, errno.ENOENT):
                    raise OSError(code, f"umount {entry.path}: {os.strerror(code)}")
