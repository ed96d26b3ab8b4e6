"""Directories inside an image's rootfs, walked one O_NOFOLLOW open at a time.

The one place a layer's names are resolved to directories (unpack.py's module docstring gives
the rules): the kernel never follows a symlink here; a relative one that stays inside the rootfs
is followed by `DirectoryWalk` itself, anything else is refused naming the entry.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import deque
from collections.abc import Callable

from adapter.core.errors import InvalidArgument

MAX_SYMLINK_HOPS = 40  # the kernel's MAXSYMLINKS
NEW_DIRECTORY_MODE = 0o755
DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Directory descriptors kept open between entries (tar members come grouped by directory).
CACHED_DIRECTORIES = 64


class DirectoryWalk:
    """Directories inside the rootfs, reached one O_NOFOLLOW open at a time from the rootfs's
    descriptor. The descriptors of recent directories are kept, keyed by the name's components;
    anything that removes from the rootfs calls `forget`, since a removal is the only way a
    name can start to mean another directory."""

    def __init__(self, root_fd: int, refuse: Callable[[str, str], InvalidArgument]) -> None:
        self.root_fd = root_fd
        self.refuse = refuse
        self.cache: dict[tuple[str, ...], tuple[int, tuple[str, ...]]] = {}
        # Forgotten descriptors stay open until the entry that forgot them is done with them.
        self.retired: list[int] = []

    def open(
        self, parts: tuple[str, ...], name: str, create: bool = True
    ) -> tuple[int, tuple[str, ...]]:
        """(descriptor, real components) of the directory `parts` names, created when missing
        (with `create`). The descriptor belongs to the walk and stays open until `release`."""
        if not parts:
            return self.root_fd, ()
        cached = self.cache.get(parts)
        if cached is None:
            if len(self.cache) >= CACHED_DIRECTORIES:
                self.forget()
            cached = self.cache[parts] = self.walk(parts, name, create)
        return cached

    def forget(self) -> None:
        self.retired.extend(descriptor for descriptor, _ in self.cache.values())
        self.cache.clear()

    def release(self) -> None:
        """Close what `forget` retired: call between entries, when no descriptor is in use."""
        for descriptor in self.retired:
            os.close(descriptor)
        self.retired.clear()

    def walk(self, parts: tuple[str, ...], name: str, create: bool) -> tuple[int, tuple[str, ...]]:
        opened: list[tuple[str, int]] = []  # the real path walked so far, one open directory each
        pending = deque(parts)
        hops = 0
        try:
            while pending:
                part = pending.popleft()
                if part == "..":  # only link targets bring these
                    if not opened:
                        raise self.refuse(name, "goes through a symlink that leaves the rootfs")
                    os.close(opened.pop()[1])
                    continue
                parent = opened[-1][1] if opened else self.root_fd
                descriptor = self.step(parent, part, name, create)
                if descriptor is None:  # a symlink that stays inside: walk its target instead
                    hops += 1
                    if hops > MAX_SYMLINK_HOPS:
                        raise self.refuse(name, "goes through too many symlinks")
                    pending.extendleft(reversed(self.symlink_target(parent, part, name)))
                    continue
                opened.append((part, descriptor))
            resolved = tuple(part for part, _ in opened)
            last = opened.pop()[1] if opened else os.dup(self.root_fd)
            return last, resolved
        finally:
            for _, descriptor in opened:
                os.close(descriptor)

    def step(self, parent: int, part: str, name: str, create: bool) -> int | None:
        """A descriptor of directory `part` in `parent`, or None when it is a symlink."""
        try:
            return os.open(part, DIRECTORY_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise self.refuse(
                    name, "points to a path that does not exist in the layers"
                ) from None
            os.mkdir(part, NEW_DIRECTORY_MODE, dir_fd=parent)
            return os.open(part, DIRECTORY_FLAGS, dir_fd=parent)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
        if stat.S_ISLNK(os.stat(part, dir_fd=parent, follow_symlinks=False).st_mode):
            return None
        raise self.refuse(name, f"needs {part!r} to be a directory")

    def symlink_target(self, parent: int, part: str, name: str) -> list[str]:
        target = os.readlink(part, dir_fd=parent)
        if target.startswith("/"):
            raise self.refuse(name, f"goes through the absolute symlink {part} -> {target}")
        return [piece for piece in target.split("/") if piece not in ("", ".")]
