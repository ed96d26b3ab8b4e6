"""A guest's output as its CRI log (`linux.log_path`), copied from the sandbox's `stdout` and
`stderr` as they grow.

The guest's ttyS1 and ttyS2 are host files that libvirt has written for QEMU: by virtlogd (the
default, `stdio_handler = "logd"`: QEMU writes into a pipe, virtlogd into the file) or by QEMU
itself. Both files stay as they are; a follower per guest reads what was appended to each and
writes it to the CRI log as records (adapter/runtimes/crilog.py): lines, 16 KiB pieces of longer
ones as P records, the last unfinished line at the end. Reads are bounded (CHUNK at a time, and
at most an unfinished line of 16 KiB held), so a guest printing gigabytes costs the service time,
never memory. A short poll finds the growth: a serial port is slow, a stat per poll cheap.

virtlogd rotates a file that reached its max_size: `stdout` becomes `stdout.0`, `stdout.0`
becomes `stdout.1`, ..., and a new `stdout` goes on. The follower keeps its file open; a
different file at the name means the writer has moved on (it renames a file only after its last
write to it), so the follower reads its file to the end and goes on with the file named after
it. A line cut by a rotation is written as a P record first, so that a position lies in one file.

Complete before the exit is reported: virtlogd writes what QEMU left in the pipe after QEMU has
gone, so once the guest stopped the follower copies until both files have been still for QUIET_S
(their mtime, which also serves a guest that ended while the service was down), writes the
unfinished lines, and only then does the driver's `wait` return the exit.

No record twice and none lost after our restart: where each stream's copy stands (its file's
inode and the offset up to which records were written) is kept in the run directory, rewritten
after each write; the restarted follower finds that file again among the rotated names and goes
on at the offset. An unfinished line counts once written, so it is read again.

What the follower reads is opened relative to the sandbox directory (opened without following a
link), with O_NOFOLLOW and O_NONBLOCK, and must be a regular file with one link; the CRI log is
opened as every runtime opens it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
from dataclasses import dataclass

from adapter.core.errors import ContainerizerError, FailedPrecondition
from adapter.core.model import Exit
from adapter.runtimes.crilog import STDERR, STDOUT, CriLogFile

log = logging.getLogger(__name__)

POLL_S = 0.1
QUIET_S = 0.5  # still this long after the guest stopped: the writer has written everything
STILL_BOUND_S = 5.0  # after the stop, a file that keeps changing is copied this long at most
CHUNK = 64 * 1024
MAX_ROTATED = 100  # rotated names looked at (virtlogd keeps max_backups of them, 3 by default)
POSITIONS_NAME = "cri-log-positions"
STREAM_FILES = {STDOUT: "stdout", STDERR: "stderr"}
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


@dataclass(frozen=True)
class Position:
    inode: int = 0  # 0: none recorded yet, the stream's file from its start
    offset: int = 0


class Positions:
    """Both streams' positions in one file of the run directory, rewritten in place by one
    pwrite of a fixed size: a crash of the service leaves the old positions or the new."""

    LINE = "{:020d} {:020d} {:020d} {:020d}\n"
    SIZE = 4 * 21

    def __init__(self, run_dir: str) -> None:
        path = os.path.join(run_dir, POSITIONS_NAME)
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        self.fd = os.open(path, flags, 0o600)

    def load(self) -> dict[int, Position]:
        words = os.pread(self.fd, self.SIZE, 0).split()
        if len(words) == 4 and all(word.isdigit() for word in words):
            numbers = [int(word) for word in words]
            return {STDOUT: Position(*numbers[:2]), STDERR: Position(*numbers[2:])}
        return {STDOUT: Position(), STDERR: Position()}

    def save(self, out: Position, err: Position) -> None:
        line = self.LINE.format(out.inode, out.offset, err.inode, err.offset)
        os.pwrite(self.fd, line.encode("ascii"), 0)

    def close(self) -> None:
        os.close(self.fd)


def _regular_inode(directory: int, name: str) -> int | None:
    """The inode of the regular file at `name` (itself, never what a link names), or None."""
    try:
        info = os.stat(name, dir_fd=directory, follow_symlinks=False)
    except OSError:
        return None
    return info.st_ino if stat.S_ISREG(info.st_mode) else None


def _open_regular(directory: int, name: str) -> int | None:
    """A read-only fd of the regular file of its own at `name`, or None (missing, or a link,
    a FIFO, a directory, a hard link to another file)."""
    try:
        fd = os.open(name, READ_FLAGS, dir_fd=directory)
    except OSError:
        return None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        return None
    return fd


class SerialFile:
    """One stream's file, read from `offset` on, followed across the writer's rotations.
    `where` names the sandbox in messages."""

    def __init__(self, directory: int, name: str, position: Position, where: str) -> None:
        self.directory = directory
        self.name = name
        self.where = where
        self.fd: int | None = None
        self.inode = position.inode
        self.offset = position.offset

    def _files(self) -> list[tuple[str, int]]:
        """The stream's files (name, inode), newest first: `stdout`, then the rotated ones."""
        files = []
        for index in range(-1, MAX_ROTATED):
            name = self.name if index < 0 else f"{self.name}.{index}"
            inode = _regular_inode(self.directory, name)
            if inode is None:
                if index < 0:
                    continue  # between a rotation's rename and the new file
                break
            files.append((name, inode))
        return files

    def _take(self, name: str, offset: int, inode: int | None = None) -> bool:
        """Read `name` from `offset` on, if it is a file of its own (and the file `inode`)."""
        fd = _open_regular(self.directory, name)
        if fd is None:
            return False
        opened = os.fstat(fd).st_ino
        if inode is not None and opened != inode:
            os.close(fd)  # renamed since it was looked up: the caller tries again later
            return False
        if self.fd is not None:
            os.close(self.fd)
        self.fd, self.inode, self.offset = fd, opened, offset
        return True

    def resume(self) -> None:
        """Open the file of the position: without one the stream's first, else wherever
        rotations moved it; when it is gone (rotated away while the service was down), the
        oldest file left, said in the log."""
        if not self.inode:
            self._take(self.name, 0)
            return
        files = self._files()
        for name, inode in files:
            if inode == self.inode:
                self._take(name, self.offset, inode)
                return
        if files:
            log.warning("libvirt: %s/%s rotated away before it was copied", self.where, self.name)
            name, inode = files[-1]
            self._take(name, 0, inode)

    def read(self) -> bytes:
        """The next bytes of the stream, at most CHUNK; b"" when there are none yet."""
        if self.fd is None:
            self.resume()
            if self.fd is None:
                return b""
        data = os.pread(self.fd, CHUNK, self.offset)
        self.offset += len(data)
        return data

    def rotated(self) -> bool:
        """Whether another file has taken the name: ours then holds all it ever will."""
        if self.fd is None:
            return False
        current = _regular_inode(self.directory, self.name)
        return current is not None and current != self.inode

    def next_file(self) -> None:
        """Go on with the file rotated after ours (read to its end). It is opened by name and
        must be the file the look-up found there, else a later call tries again."""
        files = self._files()
        inodes = [inode for _, inode in files]
        index = inodes.index(self.inode) if self.inode in inodes else len(files)
        if index == len(files):
            log.warning("libvirt: part of %s/%s rotated away uncopied", self.where, self.name)
        if index > 0:
            name, inode = files[index - 1]
            self._take(name, 0, inode)

    def still(self, quiet_s: float) -> bool:
        """Whether the stream's file has not changed for `quiet_s` (or there is none), and no
        other has taken its name."""
        if self.fd is None:
            return True
        return not self.rotated() and time.time() - os.fstat(self.fd).st_mtime >= quiet_s

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _open_directory(sandbox: str) -> int:
    try:
        return os.open(sandbox, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise FailedPrecondition(f"sandbox {sandbox}: {exc.strerror} (not a directory?)") from None


class GuestOutput:
    """One guest's copy: its two streams, its CRI log and where the copy stands."""

    def __init__(self, log_path: str, sandbox: str, run_dir: str) -> None:
        with contextlib.ExitStack() as opened:
            self._directory = _open_directory(sandbox)
            opened.callback(os.close, self._directory)
            try:
                self._positions = Positions(run_dir)
            except OSError as exc:
                raise FailedPrecondition(f"libvirt: {run_dir}: {exc.strerror}") from None
            opened.callback(self._positions.close)
            self.cri_log = CriLogFile(log_path)
            opened.callback(self.cri_log.close)
            saved = self._positions.load()
            self._files = {
                stream: SerialFile(self._directory, name, saved[stream], sandbox)
                for stream, name in STREAM_FILES.items()
            }
            for file in self._files.values():
                opened.callback(file.close)
                file.resume()
            self._pending = {stream: bytearray() for stream in STREAM_FILES}
            self._save()  # the files' inodes from the start: found again after any rotation
            self._release = opened.pop_all()
        self.closed = False

    async def follow(self, stopped: asyncio.Future[Exit]) -> None:
        """Copy while the guest runs; once it has stopped, until its files are complete, then
        end its unfinished lines. A cancelled `stopped` (the service stops) ends the copy where
        it stands: the next start goes on from there."""
        stopped_at: float | None = None
        while not stopped.cancelled():
            if stopped_at is None and stopped.done():
                stopped_at = time.monotonic()
            await self.copy()
            if stopped_at is not None and self._complete(stopped_at):
                await self.copy()
                self.finish()
                return
            if stopped_at is None:
                await asyncio.wait([stopped], timeout=POLL_S)
            else:
                await asyncio.sleep(POLL_S)

    def _complete(self, stopped_at: float) -> bool:
        if time.monotonic() - stopped_at >= STILL_BOUND_S:
            return True
        return all(file.still(QUIET_S) for file in self._files.values())

    async def copy(self) -> None:
        """Records of what both files gained, to their ends, across rotations."""
        for stream, file in self._files.items():
            while True:
                rotated = file.rotated()  # checked first: then ours is complete once read
                await self._copy_file(stream, file)
                if not rotated:
                    break
                # The line the rotation cut goes on in the next file: a P record ends this one.
                self._write(stream, at_end=True, last_tag=b"P")
                file.next_file()
                self._save()

    async def _copy_file(self, stream: int, file: SerialFile) -> None:
        pending = self._pending[stream]
        while data := file.read():
            pending += data
            self._write(stream)
            await asyncio.sleep(0)  # a guest printing fast does not hold the event loop

    def _write(self, stream: int, *, at_end: bool = False, last_tag: bytes = b"F") -> None:
        if self.cri_log.write(stream, self._pending[stream], at_end=at_end, last_tag=last_tag):
            self._save()

    def _save(self) -> None:
        out, err = (
            Position(self._files[stream].inode, self._files[stream].offset - len(pending))
            for stream, pending in self._pending.items()
        )
        self._positions.save(out, err)

    def finish(self) -> None:
        """The guest has ended and its output is copied: its unfinished lines as records."""
        for stream in STREAM_FILES:
            self._write(stream, at_end=True)
        self.close()

    def reopen(self) -> None:
        if self.closed:
            raise FailedPrecondition(
                f"the CRI log {self.cri_log.path} is written no more (the guest has ended)"
            )
        self.cri_log.reopen()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._release.close()


class GuestOutputs:
    """The driver's followers, by container id: one task each, kept until cleanup."""

    def __init__(self) -> None:
        self._followers: dict[str, tuple[GuestOutput, asyncio.Task[None]]] = {}

    def follow(self, container_id: str, output: GuestOutput, stopped: asyncio.Future[Exit]) -> None:
        previous = self._followers.pop(container_id, None)
        if previous is not None:  # suspended at an await: cancelled, it touches no file again
            previous[1].cancel()
            previous[0].close()
        task = asyncio.ensure_future(_follow(container_id, output, stopped))
        self._followers[container_id] = (output, task)

    async def drained(self, container_id: str) -> None:
        """Once the guest's output is all in its CRI log (at once without a follower)."""
        follower = self._followers.get(container_id)
        if follower is not None:
            await asyncio.wait([follower[1]])  # a cancelled waiter leaves the follower be

    def reopen(self, container_id: str) -> None:
        """ReopenContainerLog: the CRI log's path opened again (the kubelet renamed the file)."""
        follower = self._followers.get(container_id)
        if follower is None:
            raise FailedPrecondition(
                f"libvirt runtime: {container_id!r} has no CRI log being written"
            )
        follower[0].reopen()

    async def stop(self, container_id: str) -> None:
        """Stop following, copying nothing more."""
        follower = self._followers.pop(container_id, None)
        if follower is not None:
            output, task = follower
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            output.close()

    async def close(self) -> None:
        """The service stops: every copy stops where it stands (the next start goes on)."""
        for container_id in list(self._followers):
            await self.stop(container_id)


async def _follow(container_id: str, output: GuestOutput, stopped: asyncio.Future[Exit]) -> None:
    try:
        await output.follow(stopped)
    except (ContainerizerError, OSError) as exc:
        log.warning("libvirt: the CRI log of %s is not written on: %s", container_id, exc)
        output.close()
