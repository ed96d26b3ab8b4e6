"""A sandbox the caller names, kept nosuid,nodev while its container lives and handed back with
nothing in it that gives a host user privilege.

The default sandboxes lie under the sandbox root's own nosuid,nodev mount (state_dir.py). A
caller-named one (a Mesos executor's run directory, any API caller's) lies on the caller's
filesystem, typically mounted without nosuid. A workload without a user namespace is host root
there: it can leave a set-uid-root copy of a shell, a file with file capabilities (CAP_SETFCAP is
in the default set) or a device node (CAP_MKNOD), and open the directory to every user (it owns
it). So:

- `guard`, at launch before the workload's first instruction: the sandbox becomes a nosuid,nodev
  bind mount of its own (state_dir.mount_nosuid), unless its filesystem is mounted so already.
- `release`, once nothing of the container runs: what the workload could have planted is
  stripped — every regular file loses its set-uid and set-gid bits and its security.capability
  xattr; every device node becomes root's with no permission bits — and only then is the bind
  unmounted.

The walk of `release` runs on a detached, non-recursive clone of the mount (open_tree), while
the mount everyone else sees is read-only: a host user the workload opened a directory to cannot
move a file out of the walk's way, and no mount below the sandbox is in the clone, so the walk
cannot leave the sandbox's own mount. It follows no symlink: each directory is opened relative
to its parent with O_NOFOLLOW, and a file is changed through an O_PATH descriptor checked to be
the very inode listed, never by a path. It holds two descriptors at any depth (the top's and the
current directory's: climbing back is `..`, checked against the directory it came from) and
recurses nowhere, so a nest 10k deep and 100k files are one loop. Anything that stops it leaves
the mount in place, nosuid and writable again: the host stays safe, and the error names the path.

What no mount closes: a descriptor (or working directory) on the sandbox directory itself taken
before the mount was made reaches the files below it past the mount. A caller whose sandbox
other users can reach before the launch should not rely on the mount alone.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from adapter.core.errors import LaunchFailed
from adapter.core.model import LaunchSpec
from adapter.core.sandbox import is_default_sandbox
from adapter.core.state_dir import (
    KEPT_FLAGS,
    MNT_DETACH,
    MS_BIND,
    MS_NODEV,
    MS_NOSUID,
    MS_RDONLY,
    MS_REMOUNT,
    mount_nosuid,
)
from isolators.cgroups.hierarchy import unescape_mountinfo

log = logging.getLogger(__name__)

DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
SETID_BITS = stat.S_ISUID | stat.S_ISGID
CAPABILITY_XATTR = "security.capability"
# open_tree(2): 428 on every architecture since Linux 5.2 (alpha and ia64 aside).
SYS_OPEN_TREE = 428
OPEN_TREE_CLONE, AT_EMPTY_PATH = 1, 0x1000
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class SandboxChanged(OSError):
    """Something in the sandbox changed under the walk (only a way in that bypasses the mount
    can do that): the walk stops and the mount stays."""


@dataclass
class Stripped:
    """What a release looked at and changed."""

    entries: int = 0
    files: int = 0  # regular files that lost set-id bits or file capabilities
    devices: int = 0  # device nodes made root's with no permission bits

    def __str__(self) -> str:
        return (
            f"{self.files} files lost set-id bits or file capabilities, {self.devices} device"
            f" nodes were closed, of {self.entries} entries"
        )


def mount_point(sandbox: str) -> str:
    """Where the sandbox's own mount goes: its path with every symlink resolved, as the kernel
    lists the mount (and as `release` looks for it)."""
    return os.path.realpath(sandbox)


def mount_point_of(spec: LaunchSpec, sandbox_root: Path | None, *, runs: bool) -> str:
    """Where a launch's caller-named sandbox gets its own nosuid,nodev mount; "": none. The
    default sandbox has the sandbox root's (serve.py), a launch that runs nothing (a pod's
    pinned holder) has no sandbox, and a core without a sandbox root (the core's unit tests)
    mounts nothing."""
    if sandbox_root is None or not runs or is_default_sandbox(spec, sandbox_root):
        return ""
    return mount_point(spec.sandbox)


def guard(sandbox: str, point: str) -> bool:
    """Make the sandbox (at `point`, its mount_point) a nosuid,nodev mount of its own, unless
    its filesystem is mounted so already; True if this made the mount. LaunchFailed naming the
    sandbox when it cannot: nothing is mounted then."""
    try:
        return mount_nosuid(Path(point))
    except OSError as exc:
        raise LaunchFailed(f"sandbox {sandbox}: cannot mount it nosuid,nodev: {exc}") from exc


async def hand_back(container_id: str, sandbox: str, point: str) -> bool:
    """`release` off the event loop (a big sandbox takes a while), logged; whether no mount of
    ours is left at `point`. A failure is logged with what is left to do."""
    try:
        stripped = await asyncio.to_thread(release, point)
    except OSError as exc:
        log.error(
            "sandbox %s of %s keeps its nosuid mount at %s (unmount it once it is stripped): %s",
            sandbox,
            container_id,
            point,
            exc,
        )
        return False
    if stripped is not None and (stripped.files or stripped.devices):
        log.warning("sandbox %s of %s: %s", sandbox, container_id, stripped)
    return True


def release(point: str) -> Stripped | None:
    """Undo `guard` once nothing of the container can write the sandbox again: strip it, then
    unmount. None: no mount of ours is at `point` (never made, or a crash came after the
    unmount), and nothing was touched. OSError: the mount stays, nosuid and writable."""
    try:
        top = os.open(point, DIRECTORY_FLAGS)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return None
        raise
    try:
        if not _is_guard_mount(top, point):
            return None
        kept = _kept_flags(top)
        _remount(top, kept)  # writable, should an earlier release have stopped while frozen
        clone = _clone(top)  # writable, and seen by no one else
        try:
            _remount(top, kept | MS_RDONLY)  # frozen for everyone else while the walk runs
            try:
                stripped = strip_privileges(clone)
            except BaseException:
                with suppress(OSError):  # else it stays read-only, and nosuid all the same
                    _remount(top, kept)
                raise
        finally:
            os.close(clone)
        _unmount(top)
        return stripped
    finally:
        os.close(top)


def strip_privileges(top: int) -> Stripped:
    """Strip every regular file and device node below the directory `top` (a descriptor, O_PATH
    or not, left open) of what gives privilege; directories on other mounts are not entered."""
    stripped = Stripped()
    mount_id = _mount_id(top)
    current = os.open(".", DIRECTORY_FLAGS, dir_fd=top)  # readable: `top` may be O_PATH
    try:
        path = [_Directory(_identity(os.fstat(current)), "", _scan(current, stripped))]
        while path:
            here = path[-1]
            if not here.subdirectories:
                path.pop()
                if path:
                    current = _climb(current, path, here.name)
                continue
            name = here.subdirectories.pop()
            child = _enter(current, name, mount_id)
            if child is None:
                continue
            os.close(current)
            current = child
            path.append(_Directory(_identity(os.fstat(current)), name, _scan(current, stripped)))
    finally:
        os.close(current)
    return stripped


@dataclass
class _Directory:
    """A directory on the walk's path: what `..` must be when the walk climbs back to it, and
    the names of its subdirectories not visited yet."""

    identity: tuple[int, int]
    name: str
    subdirectories: list[str]


def _scan(directory: int, stripped: Stripped) -> list[str]:
    """Strip the directory's files; the names of its subdirectories."""
    subdirectories = []
    with os.scandir(directory) as entries:
        for entry in entries:
            stripped.entries += 1
            try:
                if entry.is_dir(follow_symlinks=False):
                    subdirectories.append(entry.name)
                else:
                    _disarm(directory, entry.name, entry.stat(follow_symlinks=False), stripped)
            except FileNotFoundError:
                continue  # gone since the listing
    return subdirectories


def _disarm(directory: int, name: str, info: os.stat_result, stripped: Stripped) -> None:
    kind = stat.S_IFMT(info.st_mode)
    if kind == stat.S_IFREG:
        capable = _has_file_capabilities(directory, name)
        if not (info.st_mode & SETID_BITS or capable):
            return
        with _same_inode(directory, name, info) as (target, now):
            if capable:
                _remove_file_capabilities(target)
            if now.st_mode & SETID_BITS:
                os.chmod(target, stat.S_IMODE(now.st_mode) & ~SETID_BITS)
        stripped.files += 1
    elif kind in (stat.S_IFCHR, stat.S_IFBLK):
        if (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, 0, 0):
            return
        with _same_inode(directory, name, info) as (target, _):
            os.chown(target, 0, 0)  # its owner could give the permissions back
            os.chmod(target, 0)
        stripped.devices += 1


def _has_file_capabilities(directory: int, name: str) -> bool:
    """Whether the entry (not what a symlink names) has a security.capability xattr."""
    try:
        names = os.listxattr(f"/proc/self/fd/{directory}/{name}", follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.ENOENT):
            return False  # no xattrs on this filesystem, or gone
        raise
    return CAPABILITY_XATTR in names


def _remove_file_capabilities(target: str) -> None:
    try:
        os.removexattr(target, CAPABILITY_XATTR)
    except OSError as exc:
        if exc.errno != errno.ENODATA:
            raise


@contextmanager
def _same_inode(
    directory: int, name: str, info: os.stat_result
) -> Iterator[tuple[str, os.stat_result]]:
    """A path that names exactly the inode listed as `name` (through an O_PATH descriptor: no
    device is opened, no symlink followed) and its status now; SandboxChanged if `name` is
    another file by now."""
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
    try:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino, stat.S_IFMT(now.st_mode)) != (
            info.st_dev,
            info.st_ino,
            stat.S_IFMT(info.st_mode),
        ):
            raise SandboxChanged(errno.ESTALE, f"{name} was replaced while it was stripped")
        yield f"/proc/self/fd/{fd}", now
    finally:
        os.close(fd)


def _enter(directory: int, name: str, mount_id: int) -> int | None:
    """The subdirectory `name` opened, or None: gone, no longer a directory (a symlink is not
    followed), or another mount."""
    try:
        child = os.open(name, DIRECTORY_FLAGS, dir_fd=directory)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None
        raise
    try:
        elsewhere = _mount_id(child) != mount_id
    except OSError:
        os.close(child)
        raise
    if elsewhere:
        os.close(child)
        return None
    return child


def _climb(current: int, path: list[_Directory], name: str) -> int:
    """The parent of `current` (its `name`; closed here), checked to be the directory the walk
    came down from: `path[-1]`."""
    parent = os.open("..", DIRECTORY_FLAGS, dir_fd=current)
    try:
        moved = _identity(os.fstat(parent)) != path[-1].identity
    except OSError:
        os.close(parent)
        raise
    if moved:
        os.close(parent)
        where = "/".join([*(directory.name for directory in path[1:]), name])
        raise SandboxChanged(errno.ESTALE, f"{where}: moved while it was being stripped")
    os.close(current)
    return parent


def _identity(info: os.stat_result) -> tuple[int, int]:
    return info.st_dev, info.st_ino


def _mount_id(fd: int) -> int:
    """The id of the mount `fd` is on (/proc/self/mountinfo's first field)."""
    with open(f"/proc/self/fdinfo/{fd}") as fdinfo:
        for line in fdinfo:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    raise OSError(errno.ENOTSUP, "/proc/self/fdinfo shows no mnt_id")


def _is_guard_mount(top: int, point: str) -> bool:
    """Whether `top` is the root of a mount that `guard` made at `point`: listed there, nosuid
    and nodev, and a bind either of the filesystem of the directory above or over another mount
    at `point` (an operator's own filesystem mounted there, alone, is not ours to unmount)."""
    mounts = {}  # mount id -> (parent mount id, mount point, per-mount options)
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split(" ", 6)
            mounts[int(fields[0])] = (int(fields[1]), unescape_mountinfo(fields[4]), fields[5])
    found = mounts.get(_mount_id(top))
    if found is None:
        return False
    parent, where, options = found
    if where != point or not {"nosuid", "nodev"} <= set(options.split(",")):
        return False
    over_a_mount_at_point = parent in mounts and mounts[parent][1] == point
    return over_a_mount_at_point or os.fstat(top).st_dev == os.stat("..", dir_fd=top).st_dev


def _kept_flags(top: int) -> int:
    """The bind's flags other than read-only, as a remount must give them again."""
    flags = os.fstatvfs(top).f_flag
    kept = sum(mount_flag for st_flag, mount_flag in KEPT_FLAGS.items() if flags & st_flag)
    return (kept & ~MS_RDONLY) | MS_NOSUID | MS_NODEV


def _remount(top: int, flags: int) -> None:
    """Set the flags of the mount `top` is the root of (through its descriptor: no path)."""
    target = f"/proc/self/fd/{top}".encode()
    if _libc.mount(None, target, None, ctypes.c_ulong(MS_REMOUNT | MS_BIND | flags), None) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"remount of the sandbox mount: {os.strerror(error)}")


def _clone(top: int) -> int:
    """A detached copy of the mount `top` is the root of, without the mounts below it."""
    flags = OPEN_TREE_CLONE | os.O_CLOEXEC | AT_EMPTY_PATH
    fd = int(_libc.syscall(ctypes.c_long(SYS_OPEN_TREE), top, b"", ctypes.c_uint(flags)))
    if fd < 0:
        error = ctypes.get_errno()
        raise OSError(error, f"open_tree of the sandbox mount: {os.strerror(error)}")
    return fd


def _unmount(top: int) -> None:
    if _libc.umount2(f"/proc/self/fd/{top}".encode(), MNT_DETACH) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"unmount of the sandbox mount: {os.strerror(error)}")
