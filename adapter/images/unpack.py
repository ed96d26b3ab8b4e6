"""Apply image layers to a root filesystem directory, refusing every write outside it.

A layer is a tar stream of changes (OCI image-spec layer.md): files, directories, links, and
whiteouts (`.wh.NAME` deletes NAME from the layers below, `.wh..wh..opq` empties its directory of
what the layers below put there). We write it ourselves instead of using tarfile's extraction,
because a layer is hostile input and because whiteouts are not tar semantics.

What is refused, with the layer digest and the entry name (the whole rootfs is then discarded):
- absolute names and names with a `..` component;
- a name whose directory part goes through a symlink that is absolute or climbs out of the rootfs
  (relative links that stay inside are followed, as the kernel will inside the container);
- hard links whose target is outside the rootfs or not yet in it;
- character and block devices (a container gets its /dev from the runtime, never from an image);
- more bytes or entries than the node allows one image (counted as they are written: a tar
  header's size, a sparse map or a compression ratio says nothing about what a layer will cost).

How nothing can reach outside: every path is walked one component at a time from a descriptor of
the rootfs, each directory opened with O_NOFOLLOW relative to its parent, so a symlink is never
followed by the kernel, only by `DirectoryWalk` under the rules above. Every write and every
metadata change then goes through that parent descriptor (`*at` calls) or through a descriptor of
the entry itself opened with O_NOFOLLOW: chown, chmod and utime can never land on what a symlink
points to. A symlink's own metadata is set with the no-follow calls, and it never gets a mode.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import os
import shutil
import stat
import tarfile
import threading
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from adapter.core.errors import InvalidArgument
from adapter.images.image import GZIP_LAYER_TYPES, Descriptor
from adapter.images.layout import CHUNK, Cancelled

WHITEOUT_PREFIX = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"
MAX_SYMLINK_HOPS = 40  # the kernel's MAXSYMLINKS
NEW_DIRECTORY_MODE = 0o755
DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Opens an entry we just made (a file, directory or fifo) to set its metadata: never a symlink,
# and O_NONBLOCK so a fifo opens without a writer.
ENTRY_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# Directory descriptors kept open between entries (tar members come grouped by directory).
CACHED_DIRECTORIES = 64


@dataclass(frozen=True)
class UnpackLimits:
    """What one image may write when unpacked (config `[images]`)."""

    max_bytes: int
    max_entries: int


class UnpackBudget:
    """Bytes and entries one image has written so far, across its layers; `stop` (set from the
    event loop when the caller goes away) ends the unpack at the next entry or chunk."""

    def __init__(self, limits: UnpackLimits, stop: threading.Event | None = None) -> None:
        self.limits = limits
        self.stop = stop or threading.Event()
        self.written_bytes = 0
        self.entries = 0

    def add_entry(self) -> str | None:
        """Count one entry; the reason it is refused, or None."""
        self.check_stop()
        self.entries += 1
        if self.entries > self.limits.max_entries:
            return (
                f"makes the image hold more than {self.limits.max_entries} entries, this node's "
                "limit (images.max_entries)"
            )
        return None

    def add_bytes(self, count: int) -> str | None:
        """Count bytes written; the reason the entry is refused, or None."""
        self.check_stop()
        self.written_bytes += count
        return self.bytes_refusal() if self.written_bytes > self.limits.max_bytes else None

    def bytes_refusal(self) -> str:
        return (
            f"makes the image unpack to more than {self.limits.max_bytes} bytes, this node's "
            "limit (images.max_unpacked_bytes)"
        )

    def check_stop(self) -> None:
        if self.stop.is_set():
            raise Cancelled("the unpack was cancelled")


class HashingReader:
    """A read-only stream that hashes what passes through (the layer's diff_id)."""

    def __init__(self, source: BinaryIO) -> None:
        self.source = source
        self.hasher = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size)
        self.hasher.update(data)
        return data

    def drain(self) -> str:
        """Read what the tar reader left (end-of-archive padding) and return the digest."""
        while self.read(CHUNK):
            pass
        return "sha256:" + self.hasher.hexdigest()


class ReadCounter:
    """Reports how many bytes of the layer blob were read (the unpack's progress)."""

    def __init__(self, source: BinaryIO, on_read: Callable[[int], None] | None) -> None:
        self.source = source
        self.on_read = on_read

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size)
        if self.on_read is not None and data:
            self.on_read(len(data))
        return data


def apply_layer(
    blob: Path,
    layer: Descriptor,
    diff_id: str,
    rootfs: Path,
    budget: UnpackBudget,
    on_read: Callable[[int], None] | None = None,
) -> None:
    """Apply one layer blob to `rootfs`; InvalidArgument when it is hostile, corrupt or over
    the budget. The blob is read once: decompressed, hashed and applied in one stream."""
    with open(blob, "rb") as raw:
        stream: BinaryIO = ReadCounter(raw, on_read)  # type: ignore[assignment]
        if layer.media_type in GZIP_LAYER_TYPES:
            stream = gzip.GzipFile(fileobj=stream, mode="rb")  # type: ignore[assignment]
        hashing = HashingReader(stream)
        root_fd = os.open(rootfs, DIRECTORY_FLAGS)
        try:
            with tarfile.open(fileobj=hashing, mode="r|") as archive:  # type: ignore[call-overload]
                applier = LayerApplier(root_fd, layer.digest, budget)
                try:
                    for member in archive:
                        applier.apply(member, archive)
                    applier.finish()
                finally:
                    applier.close()
            actual = hashing.drain()
        except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
            raise InvalidArgument(
                "image", f"layer {layer.digest}: not a readable tar: {exc}"
            ) from exc
        finally:
            os.close(root_fd)
    if actual != diff_id:
        raise InvalidArgument(
            "image",
            f"layer {layer.digest}: uncompressed content is {actual}, the config says {diff_id}",
        )


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


class LayerApplier:
    def __init__(self, root_fd: int, digest: str, budget: UnpackBudget) -> None:
        self.digest = digest
        self.budget = budget
        self.directories = DirectoryWalk(root_fd, self.refuse)
        self.written: set[tuple[str, ...]] = set()  # entries of this layer: whiteouts spare them
        self.directory_times: list[tuple[tuple[str, ...], str, int]] = []
        self.set_owner = os.geteuid() == 0

    def refuse(self, name: str, why: str) -> InvalidArgument:
        return InvalidArgument("image", f"layer {self.digest}: entry {name!r} {why}")

    def close(self) -> None:
        self.directories.forget()
        self.directories.release()

    def apply(self, member: tarfile.TarInfo, archive: tarfile.TarFile) -> None:
        over_budget = self.budget.add_entry()
        if over_budget:
            raise self.refuse(member.name, over_budget)
        try:
            self.apply_entry(member, archive)
        finally:
            self.directories.release()

    def apply_entry(self, member: tarfile.TarInfo, archive: tarfile.TarFile) -> None:
        parts = self.components(member.name)
        if not parts:
            return  # the rootfs itself ("./"): its mode is the runtime's business
        parent_fd, parent = self.directories.open(parts[:-1], member.name)
        leaf = parts[-1]
        if leaf == OPAQUE_WHITEOUT:
            self.opaque(parent_fd, parent)
        elif leaf.startswith(WHITEOUT_PREFIX):
            self.whiteout(parent_fd, parent, leaf[len(WHITEOUT_PREFIX) :], member.name)
        else:
            self.written.add((*parent, leaf))
            self.make_room(parent_fd, leaf, member)
            self.create(parent_fd, parent, leaf, member, archive)

    def create(
        self,
        parent_fd: int,
        parent: tuple[str, ...],
        leaf: str,
        member: tarfile.TarInfo,
        archive: tarfile.TarFile,
    ) -> None:
        if member.ischr() or member.isblk():
            raise self.refuse(member.name, "is a device node; images may not carry devices")
        if member.isreg():
            self.write_file(parent_fd, leaf, member, archive)
        elif member.isdir():
            with contextlib.suppress(FileExistsError):  # a directory merges with a directory
                os.mkdir(leaf, NEW_DIRECTORY_MODE, dir_fd=parent_fd)
            self.set_metadata_through(parent_fd, leaf, member, times=False)
            self.directory_times.append((parent, leaf, int(member.mtime)))
        elif member.issym():
            os.symlink(member.linkname, leaf, dir_fd=parent_fd)
            self.set_symlink_metadata(parent_fd, leaf, member)
        elif member.islnk():
            self.hard_link(parent_fd, leaf, member)
        elif member.isfifo():
            os.mkfifo(leaf, 0o600, dir_fd=parent_fd)
            self.set_metadata_through(parent_fd, leaf, member)
        else:
            raise self.refuse(member.name, f"has an unsupported tar type {member.type!r}")

    def finish(self) -> None:
        """Directory mtimes last: writing their children changed them."""
        for parent, leaf, mtime in reversed(self.directory_times):
            # A later entry of the layer may have removed it: then it has no time to keep.
            with contextlib.suppress(FileNotFoundError, InvalidArgument):
                parent_fd, _ = self.directories.open(parent, leaf, create=False)
                os.utime(leaf, (mtime, mtime), dir_fd=parent_fd, follow_symlinks=False)
            self.directories.release()

    def components(self, name: str) -> tuple[str, ...]:
        if name.startswith("/"):
            raise self.refuse(name, "is an absolute path")
        parts = tuple(part for part in name.split("/") if part not in ("", "."))
        if ".." in parts:
            raise self.refuse(name, "has a '..' component")
        return parts

    def hard_link(self, parent_fd: int, leaf: str, member: tarfile.TarInfo) -> None:
        """Link to an existing non-directory inside the rootfs. A link to a symlink links the
        symlink itself (linkat without AT_SYMLINK_FOLLOW) and, like the symlink, gets no mode."""
        if member.linkname.startswith("/") or ".." in member.linkname.split("/"):
            raise self.refuse(member.name, f"is a hard link to {member.linkname!r}, outside")
        parts = self.components(member.linkname)
        if not parts:
            raise self.refuse(member.name, "is a hard link to the rootfs itself")
        target_fd, _ = self.directories.open(parts[:-1], member.name, create=False)
        try:
            target = os.stat(parts[-1], dir_fd=target_fd, follow_symlinks=False)
        except FileNotFoundError:
            raise self.refuse(
                member.name, f"is a hard link to {member.linkname!r}, which is missing"
            ) from None
        if stat.S_ISDIR(target.st_mode):
            raise self.refuse(member.name, "is a hard link to a directory")
        os.link(parts[-1], leaf, src_dir_fd=target_fd, dst_dir_fd=parent_fd, follow_symlinks=False)
        if stat.S_ISLNK(target.st_mode):
            self.set_symlink_metadata(parent_fd, leaf, member)
        else:
            self.set_metadata_through(parent_fd, leaf, member)

    def make_room(self, parent_fd: int, leaf: str, member: tarfile.TarInfo) -> None:
        """A later layer replaces what is there, except that a directory merges with a directory."""
        try:
            existing = os.stat(leaf, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if not (member.isdir() and stat.S_ISDIR(existing.st_mode)):
            self.remove(parent_fd, leaf, existing)

    def remove(self, parent_fd: int, leaf: str, existing: os.stat_result | None = None) -> None:
        """Remove `leaf` (a tree: without following links, through descriptors) from its parent."""
        try:
            existing = existing or os.stat(leaf, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        self.directories.forget()  # a cached directory may be (under) what goes
        if stat.S_ISDIR(existing.st_mode):
            shutil.rmtree(leaf, dir_fd=parent_fd)
        else:
            os.unlink(leaf, dir_fd=parent_fd)

    def write_file(
        self, parent_fd: int, leaf: str, member: tarfile.TarInfo, archive: tarfile.TarFile
    ) -> None:
        if self.budget.written_bytes + member.size > self.budget.limits.max_bytes:
            # Too big already by its header: no need to write it to know.
            raise self.refuse(member.name, self.budget.bytes_refusal())
        source = archive.extractfile(member)
        descriptor = os.open(leaf, NEW_FILE_FLAGS, 0o600, dir_fd=parent_fd)
        try:
            with open(descriptor, "wb", closefd=False) as out:
                while source is not None and (chunk := source.read(CHUNK)):
                    over_budget = self.budget.add_bytes(len(chunk))
                    if over_budget:
                        raise self.refuse(member.name, over_budget)
                    out.write(chunk)
            self.set_metadata(descriptor, member)
        finally:
            os.close(descriptor)

    def set_metadata_through(
        self, parent_fd: int, leaf: str, member: tarfile.TarInfo, times: bool = True
    ) -> None:
        """Owner, mode and times of `leaf` through a descriptor of it opened without following:
        `leaf` is what we just made, and if it is not, the open fails instead of following."""
        descriptor = os.open(leaf, ENTRY_FLAGS, dir_fd=parent_fd)
        try:
            self.set_metadata(descriptor, member, times)
        finally:
            os.close(descriptor)

    def set_metadata(self, descriptor: int, member: tarfile.TarInfo, times: bool = True) -> None:
        # chown before chmod: chown clears the set-id bits that the mode may carry.
        if self.set_owner:
            os.fchown(descriptor, member.uid, member.gid)
        os.fchmod(descriptor, stat.S_IMODE(member.mode))
        if times:
            os.utime(descriptor, (member.mtime, member.mtime))

    def set_symlink_metadata(self, parent_fd: int, leaf: str, member: tarfile.TarInfo) -> None:
        """A symlink's owner and times, never what it points to; symlinks have no mode."""
        if self.set_owner:
            os.chown(leaf, member.uid, member.gid, dir_fd=parent_fd, follow_symlinks=False)
        os.utime(leaf, (member.mtime, member.mtime), dir_fd=parent_fd, follow_symlinks=False)

    def opaque(self, parent_fd: int, parent: tuple[str, ...]) -> None:
        for child in os.listdir(parent_fd):
            if (*parent, child) not in self.written:
                self.remove(parent_fd, child)

    def whiteout(self, parent_fd: int, parent: tuple[str, ...], hidden: str, name: str) -> None:
        if hidden in ("", ".", "..") or hidden.startswith(WHITEOUT_PREFIX):
            raise self.refuse(name, "is a malformed whiteout")
        if (*parent, hidden) not in self.written:  # a whiteout hides the layers below, not this one
            self.remove(parent_fd, hidden)
