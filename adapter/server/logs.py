"""The Logs RPC: a container's output read from its log files, so that a client over TCP sees
it as a client on this machine does (`containerizer logs`).

Two kinds of log: a CRI container's one file of timestamped records (`<RFC3339Nano> <stream>
<F|P> <text>`, written by its supervisor), or the sandbox's `stdout` and `stderr` files of every
other container (no timestamps). Both are opened without following a symlink: the sandbox is
the workload's to write. Following polls for growth, reopens a CRI log renamed by rotation, and
ends once the container has ended and the files say nothing more.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import re
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.core import errors
from adapter.core.containerizer import Containerizer
from adapter.core.model import State
from adapter.server import validation

POLL_SECONDS = 0.2
READ_CHUNK = 64 * 1024
TAIL_BLOCK = 64 * 1024
MAX_LINE = 1024 * 1024  # a longer "line" is cut: a reply stays far under gRPC's message limit
CRI_RECORD = re.compile(rb"(\S+) (stdout|stderr) ([FP]) (.*)", re.DOTALL)
NANOS_DIGITS = 9


@dataclass
class _Source:
    """One log file being read: its path, stream (None: a CRI log naming its own) and offset."""

    path: Path
    stream: str | None
    fd: int = -1
    inode: int = 0
    pending: bytes = b""

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
        """Complete lines written since the last read."""
        data = self.pending
        while chunk := os.read(self.fd, READ_CHUNK):
            data += chunk
            if len(data) > 4 * MAX_LINE:
                break
        lines = data.split(b"\n")
        self.pending = lines.pop()
        if len(self.pending) > MAX_LINE:
            lines.append(self.pending[:MAX_LINE])
            self.pending = b""
        return lines

    def rotated(self) -> bool:
        """Whether the path names another file now (the kubelet renamed ours)."""
        try:
            return os.stat(self.path).st_ino != self.inode
        except FileNotFoundError:
            return False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _open_in(directory: Path, name: str) -> int:
    dirfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        # O_NONBLOCK: a FIFO put there opens at once (and is then refused as not a file).
        return os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dirfd
        )
    finally:
        os.close(dirfd)


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
        opened = [source for source in sources if source.open(sandbox)]
        backlog: list[pb.LogEntry] = []
        for source in opened:
            backlog += _entries(source, source.read_lines())
        if spec.linux.log_path:
            backlog.sort(key=lambda entry: entry.timestamp)  # stable: file order within a time
        backlog = [entry for entry in backlog if entry.timestamp >= request.since]
        for entry in _tail(backlog, request.tail_lines):
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
            if sandbox is None and source.rotated():
                source.close()  # the next pass reads the new file from its start
        if ended:
            return
        await asyncio.sleep(POLL_SECONDS)


def _ended(core: Containerizer, container_id: str) -> bool:
    try:
        return core.status(container_id).state is State.TERMINATED
    except errors.NotFound:
        return True
