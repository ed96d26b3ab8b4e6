"""Detached overlay mounts of an image's layer directories, made with the kernel's new mount API
(fsopen, fsconfig, fsmount; glibc 2.36 wraps them).

A detached mount is in no mount table: it is reached only through its descriptor (or
`/proc/self/fd/N`), and it goes when the descriptor closes, or with the process when it dies. So
the store can unpack a layer on top of the ones below it, or read an image's files through all
its layers, without mounting anything on the host that a crash could leave behind, and without a
mount namespace of its own (which a process with threads cannot unshare).

Layers are given one `lowerdir+` each (kernel 6.8+) rather than as one `lowerdir=a:b:c` string:
the string is bounded by a page, which a few dozen layers of long paths fill.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

FSOPEN_CLOEXEC = 0x1
FSMOUNT_CLOEXEC = 0x1
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
MOUNT_ATTR_RDONLY = 0x1
# On the upper directory of a layer being unpacked: the overlay marks a directory it made over
# one of the layers below as opaque in the trusted.* namespace; an overlay mounted in a user
# namespace (`userxattr`) reads the user.* one instead, so the store sets both.
OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")

DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
WHITEOUT_DEVICE = os.makedev(0, 0)  # a character device with this number hides a name below

_libc = ctypes.CDLL(None, use_errno=True)


def _checked(result: int, what: str) -> int:
    if result < 0:
        error = ctypes.get_errno()
        raise OSError(error, f"overlay {what}: {os.strerror(error)}")
    return result


class DetachedOverlay:
    """An overlay of `lowers` (topmost first) and, when given, a writable `upper` with its
    `work` directory (same filesystem); read-only without. Use as a context manager: `root` is
    a path to the merged tree, valid until the block ends; `descriptor` is its root directory.
    Without an upper the overlay needs two lowers; a single layer is its own merged tree."""

    def __init__(
        self, lowers: Sequence[Path], upper: Path | None = None, work: Path | None = None
    ) -> None:
        self.lowers, self.upper, self.work = tuple(lowers), upper, work
        self.descriptor = -1

    def __enter__(self) -> DetachedOverlay:
        if self.upper is None and len(self.lowers) == 1:
            self.descriptor = os.open(self.lowers[0], os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            return self
        context = _checked(_libc.fsopen(b"overlay", FSOPEN_CLOEXEC), "fsopen")
        try:
            for lower in self.lowers:
                self._set(context, "lowerdir+", lower)
            if self.upper is not None and self.work is not None:
                self._set(context, "upperdir", self.upper)
                self._set(context, "workdir", self.work)
            _checked(_libc.fsconfig(context, FSCONFIG_CMD_CREATE, None, None, 0), "create")
            flags = 0 if self.upper is not None else MOUNT_ATTR_RDONLY
            self.descriptor = _checked(_libc.fsmount(context, FSMOUNT_CLOEXEC, flags), "fsmount")
        finally:
            os.close(context)
        return self

    @staticmethod
    def _set(context: int, key: str, path: Path) -> None:
        _checked(
            _libc.fsconfig(context, FSCONFIG_SET_STRING, key.encode(), os.fsencode(path), 0),
            f"{key} {path}",
        )

    @property
    def root(self) -> Path:
        return Path(f"/proc/self/fd/{self.descriptor}")

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self.descriptor >= 0:
            os.close(self.descriptor)  # the last reference: the kernel unmounts it
            self.descriptor = -1


def mark_opaque(upper: Path, components: tuple[str, ...]) -> None:
    """Mark `upper`/components... opaque (when the layer kept it) and drop the whiteouts
    in it, which the mark makes redundant. Walked with O_NOFOLLOW from `upper`: the components
    are the real ones the unpacker resolved, and nothing here follows a link."""
    descriptor = _kept_directory(upper, components)
    if descriptor is None:
        return
    try:
        for name in OPAQUE_XATTRS:
            os.setxattr(descriptor, name, b"y")
        with os.scandir(descriptor) as entries:
            for entry in entries:
                info = entry.stat(follow_symlinks=False)
                if stat.S_ISCHR(info.st_mode) and info.st_rdev == WHITEOUT_DEVICE:
                    os.unlink(entry.name, dir_fd=descriptor)
    finally:
        os.close(descriptor)


def _kept_directory(upper: Path, components: tuple[str, ...]) -> int | None:
    """A descriptor of the directory `upper`/components..., or None when the layer removed it
    again after emptying it, or put a symlink or a file in its place (which O_NOFOLLOW |
    O_DIRECTORY refuses): then nothing is left to mark."""
    descriptor = os.open(upper, DIRECTORY_FLAGS)
    try:
        for part in components:
            inner = os.open(part, DIRECTORY_FLAGS, dir_fd=descriptor)
            os.close(descriptor)
            descriptor = inner
    except OSError as exc:
        os.close(descriptor)
        if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            raise
        return None
    return descriptor


def mirror_opaque_marks(upper: Path) -> None:
    """Mark every directory of `upper` that the overlay made opaque in both namespaces of
    OPAQUE_XATTRS, so that the layer stacks the same in a user namespace's overlay. Only
    directories are visited, and nothing is followed: the tree is ours, walked with lstat."""
    pending = [str(upper)]
    while pending:
        directory = pending.pop()
        with os.scandir(directory) as entries:
            pending.extend(e.path for e in entries if e.is_dir(follow_symlinks=False))
        if _opaque(directory):
            for name in OPAQUE_XATTRS:
                os.setxattr(directory, name, b"y", follow_symlinks=False)


def _opaque(directory: str) -> bool:
    try:
        names = os.listxattr(directory, follow_symlinks=False)
    except OSError:
        return False
    return any(name in names for name in OPAQUE_XATTRS)
