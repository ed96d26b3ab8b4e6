"""disk/xfs-like enforcement: project quotas on XFS, or on ext4 made with `-O project,quota`.

A sandbox gets a project id of its own (FS_IOC_FSSETXATTR, with PROJINHERIT on directories so
everything created below inherits it) and a hard block limit for that project. The kernel then
refuses a write past the limit with EDQUOT, and the project's usage is one quotactl away, so no
tree is walked to measure it.

quotactl is called through ctypes as quotactl_fd(2) (Linux 5.14+): it takes a descriptor of a
directory on the filesystem, so the block device (a loop device, a device-mapper name) never
has to be found. The generic Q_GETQUOTA / Q_SETQUOTA commands serve both XFS and ext4. ctypes
rather than xfs_quota / setquota: one syscall per operation, no process per container, no
parsing of another tool's output, and no package to install.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass

FS_IOC_FSGETXATTR = 0x801C581F
FS_IOC_FSSETXATTR = 0x401C5820
FS_XFLAG_PROJINHERIT = 0x00000200
_FSXATTR = struct.Struct("=IIIII8x")  # xflags, extsize, nextents, projid, cowextsize

SYS_QUOTACTL_FD = 443  # x86_64 and every architecture of the unified syscall table
Q_GETQUOTA = 0x800007
Q_SETQUOTA = 0x800008
PRJQUOTA = 2
QIF_BLIMITS = 1
QIF_DQBLKSIZE = 1024  # the unit of dqb_bhardlimit

# Project ids this service hands out: one per sandbox with a quota. Others are left alone.
PROJECT_IDS = range(70_000, 80_000)
_OPEN_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Reopening an O_PATH handle through its /proc/self/fd link (a link: no O_NOFOLLOW there).
_REOPEN_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_OPEN_FILE = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class QuotaError(OSError):
    """A project quota could not be read or set (errno: quotactl's)."""


class _Dqblk(ctypes.Structure):
    _fields_ = [
        ("dqb_bhardlimit", ctypes.c_uint64),
        ("dqb_bsoftlimit", ctypes.c_uint64),
        ("dqb_curspace", ctypes.c_uint64),
        ("dqb_ihardlimit", ctypes.c_uint64),
        ("dqb_isoftlimit", ctypes.c_uint64),
        ("dqb_curinodes", ctypes.c_uint64),
        ("dqb_btime", ctypes.c_uint64),
        ("dqb_itime", ctypes.c_uint64),
        ("dqb_valid", ctypes.c_uint32),
    ]


_libc = ctypes.CDLL(None, use_errno=True)


def _quotactl(directory_fd: int, command: int, project: int, block: _Dqblk) -> None:
    qcmd = (command << 8) | PRJQUOTA
    if _libc.syscall(SYS_QUOTACTL_FD, directory_fd, qcmd, project, ctypes.byref(block)) != 0:
        code = ctypes.get_errno()
        raise QuotaError(code, f"quotactl project {project}: {os.strerror(code)}")


def _project_block(directory_fd: int, project: int) -> _Dqblk:
    block = _Dqblk()
    _quotactl(directory_fd, Q_GETQUOTA, project, block)
    return block


def open_directory(path: str) -> int:
    """A descriptor of the directory `path` (not through a symlink at its last component)."""
    return os.open(path, _OPEN_DIRECTORY)


def why_no_project_quota(directory_fd: int) -> str:
    """Why the filesystem of `directory_fd` does not enforce project quotas, or "" when it does:
    XFS mounted with prjquota (pquota), or ext4 with the project and quota features mounted
    with prjquota (a kernel without CONFIG_QUOTA and CONFIG_QFMT_V2 refuses that mount)."""
    device = os.fstat(directory_fd).st_dev
    mount = _mount_of(os.major(device), os.minor(device))
    where = f"{mount.point} ({mount.fstype})"
    if "pqnoenforce" in mount.options:
        return f"{where} counts project usage but does not enforce it (pqnoenforce)"
    if not mount.options & {"prjquota", "pquota"}:
        return f"project quotas are not enabled on {where}: not mounted with prjquota"
    try:
        _project_block(directory_fd, 0)
    except QuotaError as exc:
        return f"project quotas are not usable on {where}: {exc.strerror}"
    return ""


@dataclass(frozen=True)
class _Mount:
    point: str
    fstype: str
    options: frozenset[str]  # the mount's and the superblock's


def _mount_of(major: int, minor: int) -> _Mount:
    """The mount with this device number, from /proc/self/mountinfo."""
    wanted = f"{major}:{minor}"
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields, _, filesystem = line.partition(" - ")
            own, described = fields.split(), filesystem.split()
            if len(own) > 5 and own[2] == wanted and len(described) > 2:
                options = {*own[5].split(","), *described[2].split(",")}
                return _Mount(own[4], described[0], frozenset(options))
    return _Mount(f"device {wanted}", "unknown", frozenset())


def project_of(directory_fd: int) -> int:
    attributes = _FSXATTR.unpack(fcntl.ioctl(directory_fd, FS_IOC_FSGETXATTR, bytes(28)))
    return int(attributes[3])


def _set_project(fd: int, project: int, *, inherit: bool) -> None:
    xflags, extsize, nextents, _, cowextsize = _FSXATTR.unpack(
        fcntl.ioctl(fd, FS_IOC_FSGETXATTR, bytes(28))
    )
    if inherit:
        xflags |= FS_XFLAG_PROJINHERIT
    else:
        xflags &= ~FS_XFLAG_PROJINHERIT
    fcntl.ioctl(
        fd, FS_IOC_FSSETXATTR, _FSXATTR.pack(xflags, extsize, nextents, project, cowextsize)
    )


def assign_project(directory_fd: int, project: int) -> None:
    """Give the tree under `directory_fd` (directories and regular files; symlinks, which carry
    no data, are left) the project id; 0 with PROJINHERIT cleared hands it back. Opened
    relative to the parents, never through a symlink, never opening anything but a directory
    or a regular file."""
    for fd, is_directory in _tree(directory_fd):
        _set_project(fd, project, inherit=is_directory and project != 0)


@dataclass
class _Level:
    """A directory of the walk's current path: who it is, and the names still to visit."""

    identity: tuple[int, int]  # (st_dev, st_ino)
    names: list[str]


def _tree(root_fd: int) -> Iterator[tuple[int, bool]]:
    """Descriptors of the directories and regular files under root_fd (itself first), on its
    device, each valid until the next one; a regular file with several links is left.

    Depth first, holding one directory descriptor whatever the tree's shape (a hundred
    thousand subdirectories, or ten thousand levels, would otherwise cost one each): going back
    up opens ".." and checks it is the directory the walk came down from, so a directory the
    workload moves meanwhile never leads the walk out of the tree (OSError ESTALE instead)."""
    device = os.fstat(root_fd).st_dev
    yield root_fd, True
    current = os.dup(root_fd)
    levels = [_Level(_identity(current), os.listdir(current))]
    try:
        while levels:
            if not levels[-1].names:
                levels.pop()
                if levels:
                    current = _back_up(current, levels[-1].identity)
                continue
            fd = _open_entry(current, levels[-1].names.pop(), device)
            if fd is None:
                continue
            is_directory = stat.S_ISDIR(os.fstat(fd).st_mode)
            try:
                yield fd, is_directory
                if is_directory:
                    levels.append(_Level(_identity(fd), os.listdir(fd)))
                    current, fd = fd, current  # the old current is closed below
            finally:
                os.close(fd)
    finally:
        os.close(current)


def _identity(fd: int) -> tuple[int, int]:
    info = os.fstat(fd)
    return info.st_dev, info.st_ino


def _back_up(directory: int, expected: tuple[int, int]) -> int:
    """The parent of `directory` (which is closed), if it is still `expected`."""
    try:
        parent = os.open("..", _OPEN_DIRECTORY, dir_fd=directory)
    finally:
        os.close(directory)
    if _identity(parent) != expected:
        os.close(parent)
        raise OSError(errno.ESTALE, "a directory of the tree was moved during the walk")
    return parent


def _open_entry(parent: int, name: str, device: int) -> int | None:
    """`name` opened for the ioctl if it is a directory or a regular file with one link on
    `device`, else None. Opened O_PATH first, which opens nothing (no device's or FIFO's open
    runs, whatever was swapped in under the name); only the inode that handle pins is then
    reopened, through /proc/self/fd, once its type is known."""
    try:
        handle = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    except OSError:
        return None
    try:
        info = os.fstat(handle)
        if info.st_dev != device:
            return None
        if stat.S_ISDIR(info.st_mode):
            return os.open(f"/proc/self/fd/{handle}", _REOPEN_DIRECTORY)
        if stat.S_ISREG(info.st_mode) and info.st_nlink == 1:
            # A file with several links may be a file outside the tree (a host file): its
            # inode's project is not ours to change. New links inherit it (PROJINHERIT) anyway.
            return os.open(f"/proc/self/fd/{handle}", _OPEN_FILE)
        return None
    except OSError:
        return None
    finally:
        os.close(handle)


def set_limit(directory_fd: int, project: int, limit_bytes: int) -> None:
    """The project's hard block limit (0: none), rounded up to the quota's 1 KiB unit."""
    block = _Dqblk(dqb_valid=QIF_BLIMITS)
    block.dqb_bhardlimit = -(-limit_bytes // QIF_DQBLKSIZE)
    block.dqb_bsoftlimit = block.dqb_bhardlimit
    _quotactl(directory_fd, Q_SETQUOTA, project, block)


def used_bytes(directory_fd: int, project: int) -> int:
    return int(_project_block(directory_fd, project).dqb_curspace)


def is_unused(directory_fd: int, project: int) -> bool:
    """No file on this filesystem is charged to the project (so it is free to hand out)."""
    try:
        block = _project_block(directory_fd, project)
    except QuotaError as exc:
        if exc.errno in (errno.ESRCH, errno.ENOENT):  # no record of the project: unused
            return True
        raise
    return bool(block.dqb_curspace == 0 and block.dqb_curinodes == 0)
