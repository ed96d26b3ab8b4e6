"""The Logs RPC: a container's output read from its log files, so that a client over TCP sees
it as a client on this machine does (`containerizer logs`).

Two kinds of log: a CRI container's one file of timestamped records (`<RFC3339Nano> <stream>
<F|P> <text>`, written by its supervisor), or the sandbox's `stdout` and `stderr` files of every
other container (no timestamps), which the supervisor rotates by size (`stdout.1` the newest
rotated, read oldest first). Both are opened without following a symlink: the sandbox is the
workload's to write. Following polls for growth, reads on into the new file after a rotation,
and ends once the container has ended and the files say nothing more.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import re
import stat
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.core import errors
from adapter.core.containerizer import Containerizer
from adapter.core.model import State
from adapter.server import validation
from adapter.supervisor.launch_config import OUTPUT_FILES_LIMIT

POLL_SECONDS = 0.2
READ_CHUNK = 64 * 1024
TAIL_BLOCK = 64 * 1024
MAX_LINE = 1024 * 1024  # a longer "line" is cut: a reply stays far under gRPC's message limit
CRI_RECORD = re.compile(rb"(\S+) (stdout|stderr) ([FP]) (.*)", re.DOTALL)
NANOS_DIGITS = 9


@dataclass
class _Source:
    """One stream's log file being read: its path, stream (None: a CRI log naming its own),
    offset and, for the sandbox's files, the files rotated out of the stream that are still to
    be read before it (oldest first)."""

    path: Path
    stream: str | None
    fd: int = -1
    inode: int = 0
    pending: bytes = b""
    older: list[int] = field(default_factory=list)

    def open(self, sandbox: Path | None) -> bool:
        """False while the file does not exist (yet); an error when it is not a plain file of
        its own."""
        try:
            if sandbox is not None:  # the workload's directory: never through a link
                self.fd = _open_in(sandbox, self.path.name)
            else:
                self.fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as exc:
            raise errors.FailedPrecondition(f"log {self.path}: {exc.strerror}") from None
        info = os.fstat(self.fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            self.close()
            raise errors.FailedPrecondition(f"log {self.path}: not a regular file of its own")
        self.inode = info.st_ino
        return True

    def read_lines(self) -> list[bytes]:
        """Complete lines written since the last read: the rest of the older files first, then
        the current one's. A line cut by a rotation is whole again here."""
        data = self.pending
        while self.older and len(data) <= 4 * MAX_LINE:
            chunk = os.read(self.older[0], READ_CHUNK)
            data += chunk
            if not chunk:
                os.close(self.older.pop(0))
        while not self.older and self.fd >= 0 and (chunk := os.read(self.fd, READ_CHUNK)):
            data += chunk
            if len(data) > 4 * MAX_LINE:
                break
        lines = data.split(b"\n")
        self.pending = lines.pop()
        if len(self.pending) > MAX_LINE:
            lines.append(self.pending[:MAX_LINE])
            self.pending = b""
        return lines

    def rotated(self, sandbox: Path | None) -> bool:
        """Whether the path names another file now because ours was rotated: the kubelet
        renamed a CRI log; the supervisor renamed the sandbox's file to NAME.1 (or it has gone
        on past the last rotated name) and made a new one. What the workload swapped in while
        ours stayed where it moved it, or a link, is not a rotation: the supervisor still
        writes ours."""
        if sandbox is None:
            try:
                return os.stat(self.path).st_ino != self.inode
            except FileNotFoundError:
                return False
        with _Directory(sandbox) as directory:
            here = directory.lstat(self.path.name)
            if here is None or here.st_ino == self.inode or not stat.S_ISREG(here.st_mode):
                return False
            ours_moved = self.inode in directory.rotated_inodes(self.path.name)
            return ours_moved or os.fstat(self.fd).st_nlink == 0

    def reopen(self, sandbox: Path | None) -> None:
        """After a rotation: the next reads give the rest of the old file, then (the sandbox's
        files) those rotated after it, then the new file from its start."""
        old_inode = self.inode
        self.older.append(self.fd)
        self.fd = -1
        if not self.open(sandbox):  # not there again yet: the next pass looks again
            self.fd = self.older.pop()
            self.inode = old_inode
            return
        if sandbox is not None:
            with _Directory(sandbox) as directory:
                self.older += directory.rotated_after(self.path.name, old_inode, self.inode)

    def close(self) -> None:
        for fd in self.older:
            os.close(fd)
        self.older.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# O_NONBLOCK: a FIFO put there opens at once (and is then refused as not a file).
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def _open_in(directory: Path, name: str) -> int:
    dirfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return os.open(name, READ_FLAGS, dir_fd=dirfd)
    finally:
        os.close(dirfd)


class _Directory:
    """The sandbox, opened without following a link; every name in it is looked up relative to
    it and never followed, because the workload may put a link anywhere in it."""

    def __init__(self, path: Path) -> None:
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            self.fd = -1  # removed with its container: nothing is in it

    def __enter__(self) -> _Directory:
        return self

    def __exit__(self, *_: object) -> None:
        if self.fd >= 0:
            os.close(self.fd)

    def lstat(self, name: str) -> os.stat_result | None:
        if self.fd < 0:
            return None
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def rotated_inodes(self, name: str) -> list[int]:
        """The inodes at NAME.1, NAME.2, ... up to the first name that is not there."""
        inodes = []
        for k in range(1, OUTPUT_FILES_LIMIT):
            found = self.lstat(f"{name}.{k}")
            if found is None:
                break
            inodes.append(found.st_ino)
        return inodes

    def rotated_files(self, name: str) -> list[tuple[int, int]]:
        """The files rotated out of a stream, newest first (NAME.1, NAME.2, ... up to the first
        name that is not there), opened: (fd, inode). What else the workload put at such a
        name (a link, a directory, a FIFO) is not its output and is passed over."""
        files: list[tuple[int, int]] = []
        for k in range(1, OUTPUT_FILES_LIMIT):
            try:
                opened = self._open_file(f"{name}.{k}")
            except FileNotFoundError:
                break
            if opened is not None:
                files.append(opened)
        return files

    def _open_file(self, name: str) -> tuple[int, int] | None:
        """(fd, inode) of the regular file of its own at `name`; None for anything else, which
        is never opened (a FIFO would block, a device could act); FileNotFoundError for
        nothing."""
        if self.fd < 0:
            raise FileNotFoundError(name)
        if not stat.S_ISREG(os.stat(name, dir_fd=self.fd, follow_symlinks=False).st_mode):
            return None
        try:
            fd = os.open(name, READ_FLAGS, dir_fd=self.fd)
        except FileNotFoundError:
            raise
        except OSError:  # swapped for a link since it was looked at
            return None
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode) and info.st_nlink == 1:
            return fd, info.st_ino
        os.close(fd)
        return None

    def rotated_after(self, name: str, old_inode: int, current_inode: int) -> list[int]:
        """The files rotated out after the one with `old_inode`, oldest first, opened; all of
        them when that one has gone past the last name. `current_inode` (the file being read
        as the stream's current one) is left out."""
        newer: list[int] = []
        files = self.rotated_files(name)
        for index, (fd, inode) in enumerate(files):
            if inode == old_inode:
                for rest, _ in files[index:]:
                    os.close(rest)
                break
            if inode == current_inode:
                os.close(fd)
            else:
                newer.append(fd)
        return newer[::-1]


def parse_cri_timestamp(text: bytes) -> float:
    """Seconds since the epoch of an RFC 3339 time with up to nanoseconds (and a zone)."""
    value = text.decode("ascii", "replace")
    match = re.fullmatch(r"(.+?T\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", value)
    if match is None:
        return 0.0
    seconds, fraction, zone = match.groups()
    zone = "+00:00" if zone == "Z" else zone
    moment = datetime.datetime.fromisoformat(seconds + zone)
    digits = (fraction or "0")[:NANOS_DIGITS]
    return float(moment.timestamp() + int(digits) / 10 ** len(digits))


def _entries(source: _Source, lines: list[bytes]) -> list[pb.LogEntry]:
    entries = []
    for line in lines:
        if source.stream is not None:
            entries.append(pb.LogEntry(stream=source.stream, data=line + b"\n"))
            continue
        match = CRI_RECORD.fullmatch(line)
        if match is None:
            continue  # not a record (a torn write at a crash)
        stamp, stream, tag, text = match.groups()
        entries.append(
            pb.LogEntry(
                stream=stream.decode(),
                data=text + (b"\n" if tag == b"F" else b""),
                timestamp=parse_cri_timestamp(stamp),
            )
        )
    return entries


def _tail(entries: list[pb.LogEntry], count: int) -> list[pb.LogEntry]:
    return entries[-count:] if count else entries


def _cri_backlog(source: _Source, request: pb.LogsRequest) -> list[pb.LogEntry]:
    """The CRI log's records in time order, from `since`, the last `tail_lines` of them."""
    if not source.open(None):
        return []
    backlog = _entries(source, source.read_lines())
    backlog.sort(key=lambda entry: entry.timestamp)  # stable: file order within a time
    backlog = [entry for entry in backlog if entry.timestamp >= request.since]
    return _tail(backlog, request.tail_lines)


def _sandbox_backlog(sandbox: Path, sources: list[_Source], tail: int) -> Iterator[pb.LogEntry]:
    """stdout's output, then stderr's (no timestamps to interleave them), each from its oldest
    rotated file on; with `tail`, only the last `tail` lines of all that. Each current file is
    left at its end for a follow."""
    opened = [source for source in sources if source.open(sandbox)]
    with _Directory(sandbox) as directory:
        for source in opened:
            for fd, inode in directory.rotated_files(source.path.name):
                if inode == source.inode:  # rotated since it was opened: read as the current
                    os.close(fd)
                else:
                    source.older.insert(0, fd)
    if not tail:
        for source in opened:
            while lines := source.read_lines():
                yield from _entries(source, lines)
        return
    chosen: list[list[bytes]] = []
    for source in reversed(opened):  # stderr's lines are the last ones
        chosen.insert(0, _last_lines(source, tail - sum(len(lines) for lines in chosen)))
    for source, lines in zip(opened, chosen, strict=True):
        yield from _entries(source, lines)


def _last_lines(source: _Source, count: int) -> list[bytes]:
    """The last `count` complete lines of one stream, read back from the end of its current
    file into the older ones, newest first. The current file is left at its end with its
    unfinished line pending, for a follow."""
    data, newlines, whole = b"", 0, True
    for fd in [source.fd, *reversed(source.older)]:
        position = os.fstat(fd).st_size
        if fd == source.fd:
            os.lseek(fd, position, os.SEEK_SET)
        while position > 0 and newlines <= count and len(data) <= (count + 1) * MAX_LINE:
            step = min(TAIL_BLOCK, position)
            position -= step
            block = os.pread(fd, step, position)
            newlines += block.count(b"\n")
            data = block + data
        if position > 0:
            whole = False  # data starts inside a line
            break
    for fd in source.older:
        os.close(fd)
    source.older.clear()
    lines = data.split(b"\n")
    source.pending = lines.pop()
    lines = lines if whole else lines[1:]
    return [line[:MAX_LINE] for line in lines[-count:]] if count else []


async def serve_logs(core: Containerizer, request: pb.LogsRequest) -> AsyncIterator[pb.LogEntry]:
    container_id = validation.container_id(request.container_id)
    spec = core.status(container_id).spec
    if spec.linux.log_path:
        sources = [_Source(Path(spec.linux.log_path), None)]
        sandbox = None
    else:
        if request.since:
            raise errors.InvalidArgument(
                "since", "this container's output has no timestamps (its sandbox's files)"
            )
        sandbox = Path(spec.sandbox)
        sources = [_Source(sandbox / "stdout", "stdout"), _Source(sandbox / "stderr", "stderr")]
    try:
        if sandbox is None:
            backlog: Iterable[pb.LogEntry] = _cri_backlog(sources[0], request)
        else:
            backlog = _sandbox_backlog(sandbox, sources, request.tail_lines)
        for entry in backlog:
            yield entry
        if request.follow:
            async for entry in _follow(core, container_id, sources, sandbox):
                yield entry
    finally:
        for source in sources:
            source.close()


async def _follow(
    core: Containerizer, container_id: str, sources: list[_Source], sandbox: Path | None
) -> AsyncIterator[pb.LogEntry]:
    while True:
        ended = _ended(core, container_id)
        for source in sources:
            if source.fd < 0 and not source.open(sandbox):
                continue
            for entry in _entries(source, source.read_lines()):
                yield entry
            if source.rotated(sandbox):
                source.reopen(sandbox)  # the next pass reads on into the new file
        if ended:
            return
        await asyncio.sleep(POLL_SECONDS)


def _ended(core: Containerizer, container_id: str) -> bool:
    try:
        return core.status(container_id).state is State.TERMINATED
    except errors.NotFound:
        return True
