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
  header's size, a sparse map or a compression ratio says nothing about what a layer will cost;
  only a large file of an uncompressed layer, copied by the kernel on a thread of its own while
  the next entries are made, is counted whole as it is handed over: its size is then exactly
  what the kernel copies from the blob).

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
import functools
import os
import shutil
import stat
import tarfile
import threading
import zlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from adapter.core.errors import InvalidArgument
from adapter.images.directory_walk import DIRECTORY_FLAGS, NEW_DIRECTORY_MODE, DirectoryWalk
from adapter.images.image import GZIP_LAYER_TYPES, Descriptor
from adapter.images.inflate import InflatingReader
from adapter.images.layout import CHUNK, TAR_STREAM_BUFFER, Cancelled
from adapter.images.tar_headers import LayerTarInfo

WHITEOUT_PREFIX = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"
# Opens an entry we just made (a file, directory or fifo) to set its metadata: never a symlink,
# and O_NONBLOCK so a fifo opens without a writer.
ENTRY_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# An uncompressed layer's files from this size on are copied by a thread of their own while
# the next entries are made (the kernel copies, so both go at once); a smaller copy is over
# before handing it over would pay. At most BACKGROUND_COPIES wait, each holding its file open.
BACKGROUND_COPY_SIZE = 1 << 18
BACKGROUND_COPIES = 8


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


def apply_layer(
    blob: Path,
    layer: Descriptor,
    diff_id: str,
    rootfs: Path | int,
    budget: UnpackBudget,
    on_read: Callable[[int], None] | None = None,
) -> list[tuple[str, ...]]:
    """Apply one layer blob to `rootfs` (a directory, or a descriptor of one: the caller's,
    left open) and return the directories it made opaque (real components under `rootfs`);
    InvalidArgument when it is hostile, corrupt or over
    the budget. `blob` holds exactly `layer.digest` (staged and stored blobs are verified on
    the way in), so an uncompressed layer's diff_id is its digest and it is applied in place,
    its files copied by the kernel; a compressed one is read once: inflated, hashed and
    applied in one stream."""
    compressed = layer.media_type in GZIP_LAYER_TYPES
    if not compressed and layer.digest != diff_id:
        raise _diff_id_mismatch(layer, layer.digest, diff_id)
    with open(blob, "rb") as raw:
        root_fd = os.dup(rootfs) if isinstance(rootfs, int) else os.open(rootfs, DIRECTORY_FLAGS)
        try:
            if compressed:
                inflating = InflatingReader(raw, on_read)
                try:
                    opaque = _apply_stream(inflating, root_fd, layer, budget)
                    actual = inflating.drain()
                finally:
                    inflating.close()
                if actual != diff_id:
                    raise _diff_id_mismatch(layer, actual, diff_id)
            else:
                opaque = _apply_in_place(raw, root_fd, layer, budget, on_read)
        except (tarfile.TarError, EOFError, zlib.error) as exc:
            raise InvalidArgument(
                "image", f"layer {layer.digest}: not a readable tar: {exc}"
            ) from exc
        finally:
            os.close(root_fd)
    return opaque


def _diff_id_mismatch(layer: Descriptor, actual: str, diff_id: str) -> InvalidArgument:
    return InvalidArgument(
        "image",
        f"layer {layer.digest}: uncompressed content is {actual}, the config says {diff_id}",
    )


def _apply_stream(
    source: InflatingReader, root_fd: int, layer: Descriptor, budget: UnpackBudget
) -> list[tuple[str, ...]]:
    with tarfile.open(  # type: ignore[call-overload]
        fileobj=source, mode="r|", bufsize=TAR_STREAM_BUFFER, tarinfo=LayerTarInfo
    ) as archive:
        applier = LayerApplier(root_fd, layer.digest, budget, StreamData(archive))
        _apply_members(archive, applier)
        return applier.opaque_directories


def _apply_in_place(
    raw: BinaryIO,
    root_fd: int,
    layer: Descriptor,
    budget: UnpackBudget,
    on_read: Callable[[int], None] | None,
) -> list[tuple[str, ...]]:
    with tarfile.open(fileobj=raw, mode="r:", tarinfo=LayerTarInfo) as archive:
        data = InPlaceData(archive, raw.fileno())
        done = 0

        def applied(_: tarfile.TarInfo) -> None:  # progress: how far into the blob we are
            nonlocal done
            if on_read is not None and archive.offset > done:
                on_read(archive.offset - done)
                done = archive.offset

        applier = LayerApplier(root_fd, layer.digest, budget, data)
        _apply_members(archive, applier, applied)
        if on_read is not None and layer.size > done:
            on_read(layer.size - done)  # the end-of-archive blocks
        return applier.opaque_directories


def _apply_members(
    archive: tarfile.TarFile,
    applier: LayerApplier,
    applied: Callable[[tarfile.TarInfo], None] | None = None,
) -> None:
    try:
        for member in archive:
            applier.apply(member)
            if applied is not None:
                applied(member)
        applier.finish()
    finally:
        applier.close()


class StreamData:
    """File contents read from the tar stream (a compressed layer)."""

    def __init__(self, archive: tarfile.TarFile) -> None:
        self.archive = archive

    def in_background(self, member: tarfile.TarInfo) -> bool:
        return False  # the stream is read in order, by the thread that reads the entries

    def copy(self, member: tarfile.TarInfo, out: int, count: Callable[[int], None]) -> None:
        source = self.archive.extractfile(member)
        while source is not None and (chunk := source.read(CHUNK)):
            count(len(chunk))
            _write_all(out, chunk)


class InPlaceData:
    """File contents copied straight from the blob file by the kernel (an uncompressed layer,
    read in place): copy_file_range, or sendfile where the rootfs is on another filesystem."""

    def __init__(self, archive: tarfile.TarFile, descriptor: int) -> None:
        self.archive, self.descriptor = archive, descriptor
        self.kernel_copy = True

    def in_background(self, member: tarfile.TarInfo) -> bool:
        """Whether `member` is worth copying on another thread: a large file read at its own
        offset (the holes of a sparse one are read through the archive, in order)."""
        return member.sparse is None and member.size >= BACKGROUND_COPY_SIZE

    def copy(self, member: tarfile.TarInfo, out: int, count: Callable[[int], None]) -> None:
        if member.sparse is not None:  # holes: tarfile knows where the data lies
            StreamData(self.archive).copy(member, out, count)
            return
        offset, left = member.offset_data, member.size
        while left:
            copied = self.copy_chunk(out, offset, min(left, CHUNK))
            if copied == 0:
                raise tarfile.ReadError("unexpected end of data")
            count(copied)
            offset += copied
            left -= copied

    def copy_chunk(self, out: int, offset: int, size: int) -> int:
        if self.kernel_copy:
            try:
                return os.copy_file_range(self.descriptor, out, size, offset)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                self.kernel_copy = False
        return os.sendfile(out, self.descriptor, offset, size)


def _write_all(out: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(out, view) :]


class BackgroundCopies:
    """Files whose contents a thread of their own copies while the next entries are made. Each
    copy owns its file's descriptor (and closes it); whoever needs the files complete (a hard
    link, which may name one and set its metadata; the end of the layer) calls `wait`."""

    def __init__(self) -> None:
        self.copier: ThreadPoolExecutor | None = None  # started by the first large file
        self.pending: deque[Future[None]] = deque()

    def submit(self, copy: Callable[[], None]) -> None:
        """Queue `copy`; when this raises (an earlier copy's failure), it was not queued."""
        if len(self.pending) >= BACKGROUND_COPIES:
            self.pending.popleft().result()
        if self.copier is None:
            self.copier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layer-copy")
        self.pending.append(self.copier.submit(copy))

    def wait(self) -> None:
        """Wait for every copy; then raise the first failure, if any."""
        failure: BaseException | None = None
        while self.pending:
            try:
                self.pending.popleft().result()
            except BaseException as exc:  # raised below, once all have ended
                failure = failure or exc
        if failure is not None:
            raise failure

    def close(self) -> None:
        """End the copier once its copies have ended (a failure is the caller's already)."""
        with contextlib.suppress(Exception):
            self.wait()
        if self.copier is not None:
            self.copier.shutdown()


class LayerApplier:
    def __init__(
        self, root_fd: int, digest: str, budget: UnpackBudget, data: StreamData | InPlaceData
    ) -> None:
        self.digest = digest
        self.budget = budget
        self.data = data
        self.directories = DirectoryWalk(root_fd, self.refuse)
        self.written: set[tuple[str, ...]] = set()  # entries of this layer: whiteouts spare them
        self.directory_times: list[tuple[tuple[str, ...], str, int]] = []
        # Directories an opaque whiteout emptied of the layers below (layers.py marks them).
        self.opaque_directories: list[tuple[str, ...]] = []
        self.set_owner = os.geteuid() == 0
        self.copies = BackgroundCopies()

    def refuse(self, name: str, why: str) -> InvalidArgument:
        return InvalidArgument("image", f"layer {self.digest}: entry {name!r} {why}")

    def close(self) -> None:
        self.copies.close()
        self.directories.forget()
        self.directories.release()

    def apply(self, member: tarfile.TarInfo) -> None:
        over_budget = self.budget.add_entry()
        if over_budget:
            raise self.refuse(member.name, over_budget)
        try:
            self.apply_entry(member)
        finally:
            self.directories.release()

    def apply_entry(self, member: tarfile.TarInfo) -> None:
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
            try:  # most names are new: the kernel's EEXIST tells us, no stat before each
                self.create(parent_fd, parent, leaf, member)
            except FileExistsError:
                self.make_room(parent_fd, leaf, member)
                self.create(parent_fd, parent, leaf, member)

    def create(
        self,
        parent_fd: int,
        parent: tuple[str, ...],
        leaf: str,
        member: tarfile.TarInfo,
    ) -> None:
        """Make `leaf`; FileExistsError, before anything is changed, when a name is in the way
        (a directory over a directory is not: they merge)."""
        if member.ischr() or member.isblk():
            raise self.refuse(member.name, "is a device node; images may not carry devices")
        if member.isreg():
            self.write_file(parent_fd, leaf, member)
        elif member.isdir():
            self.make_directory(parent_fd, leaf)
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

    @staticmethod
    def make_directory(parent_fd: int, leaf: str) -> None:
        """A directory merges with a directory; anything else there is in the way."""
        try:
            os.mkdir(leaf, NEW_DIRECTORY_MODE, dir_fd=parent_fd)
        except FileExistsError:
            existing = os.stat(leaf, dir_fd=parent_fd, follow_symlinks=False)
            if not stat.S_ISDIR(existing.st_mode):
                raise

    def finish(self) -> None:
        """Directory mtimes last: writing their children changed them."""
        self.copies.wait()
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
        symlink itself (linkat without AT_SYMLINK_FOLLOW) and, like the symlink, gets no mode.
        The files being copied are complete first: the link may name one, and its metadata is
        then the link's, set after the copy's."""
        self.copies.wait()
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

    def write_file(self, parent_fd: int, leaf: str, member: tarfile.TarInfo) -> None:
        if self.budget.written_bytes + member.size > self.budget.limits.max_bytes:
            # Too big already by its header: no need to write it to know. (A file is never
            # longer than its header says, so this also bounds what the kernel copies.)
            raise self.refuse(member.name, self.budget.bytes_refusal())
        descriptor = os.open(leaf, NEW_FILE_FLAGS, 0o600, dir_fd=parent_fd)
        if not self.data.in_background(member):
            self.fill(descriptor, member, functools.partial(self.count_bytes, member.name))
            return
        try:
            # Counted whole now: the check above lets it in, and the copy writes no more.
            self.count_bytes(member.name, member.size)
            self.copies.submit(functools.partial(self.fill, descriptor, member, self.stopped))
        except BaseException:  # not handed over: the descriptor is still ours
            os.close(descriptor)
            raise

    def fill(self, descriptor: int, member: tarfile.TarInfo, count: Callable[[int], None]) -> None:
        """Copy `member`'s contents into the new file, set its metadata and close it."""
        try:
            self.data.copy(member, descriptor, count)
            self.set_metadata(descriptor, member)
        finally:
            os.close(descriptor)

    def stopped(self, _: int) -> None:
        """A background copy's check between chunks: the unpack may have been cancelled."""
        self.budget.check_stop()

    def count_bytes(self, name: str, written: int) -> None:
        over_budget = self.budget.add_bytes(written)
        if over_budget:
            raise self.refuse(name, over_budget)

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
        self.opaque_directories.append(parent)
        for child in os.listdir(parent_fd):
            if (*parent, child) not in self.written:
                self.remove(parent_fd, child)

    def whiteout(self, parent_fd: int, parent: tuple[str, ...], hidden: str, name: str) -> None:
        if hidden in ("", ".", "..") or hidden.startswith(WHITEOUT_PREFIX):
            raise self.refuse(name, "is a malformed whiteout")
        if (*parent, hidden) not in self.written:  # a whiteout hides the layers below, not this one
            self.remove(parent_fd, hidden)
