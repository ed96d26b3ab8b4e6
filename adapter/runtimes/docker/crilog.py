"""A docker container's CRI log: its output as the kubelet reads it, made from the same followed
log stream that otherwise fills the sandbox's files (output.py).

The records are the supervisor's for the other runtimes (supervisor/containerizer-supervisor.c,
emit_records): `<RFC3339Nano, UTC> <stdout|stderr> <F|P> <content>\\n`, F ending a line, P each
16 KiB piece of a longer one; an unfinished line waits for its end, or is written as an F once
the container has ended. The time is when the service read the output.

The file is opened as the supervisor opens it (adapter/runtimes/crilog.py's LOG_FLAGS): never
through a symlink, a regular file with one link, appended to. ReopenContainerLog opens the path
again after the kubelet renamed the file.

No line twice after our restart: a mark on the file (an xattr in the `trusted` namespace, out of
a workload's reach) holds the docker id and how many bytes of each stream the records hold so
far, rewritten after each write; a restarted copy asks for the log from its start and skips that
many bytes. An unfinished line counts once it is written, so it is read again. A file without
this container's mark (the kubelet rotated it while we were down) gets the stream from its
start: a repeat, never a loss.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time

from adapter.core.errors import FailedPrecondition
from adapter.runtimes.crilog import LOG_FLAGS
from adapter.runtimes.docker.streams import STDERR, STDOUT

LINE_MAX = 16 * 1024  # the supervisor's LOG_LINE_MAX: longer lines are cut into P records
MARK_XATTR = "trusted.containerizer.cri-log"  # "<docker id> <stdout bytes> <stderr bytes>"
STREAM_NAMES = {STDOUT: b"stdout", STDERR: b"stderr"}


def timestamp(now_ns: int) -> bytes:
    """RFC 3339 in UTC with nanoseconds, as Go's RFC3339Nano but with every digit kept."""
    seconds, nanos = divmod(now_ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)).encode() + b".%09dZ" % nanos


def records(stream: int, pending: bytearray, now_ns: int, *, at_end: bool) -> tuple[bytes, int]:
    """The records of what `pending` holds, taken from it, and how many bytes they consumed.
    What stays is an unfinished line of at most LINE_MAX bytes (nothing `at_end`)."""
    prefix = timestamp(now_ns) + b" " + STREAM_NAMES[stream] + b" "
    out = bytearray()
    start = 0
    while True:
        newline = pending.find(b"\n", start)
        length = (newline if newline >= 0 else len(pending)) - start
        if length > LINE_MAX:
            out += prefix + b"P " + pending[start : start + LINE_MAX] + b"\n"
            start += LINE_MAX
        elif newline >= 0:
            out += prefix + b"F " + pending[start:newline] + b"\n"
            start = newline + 1
        else:
            break
    if at_end and start < len(pending):
        out += prefix + b"F " + pending[start:] + b"\n"
        start = len(pending)
    del pending[:start]
    return bytes(out), start


def open_log(path: str) -> int:
    try:
        fd = os.open(path, LOG_FLAGS, 0o640)
    except OSError as exc:
        raise FailedPrecondition(f"CRI log {path}: {exc.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        raise FailedPrecondition(f"CRI log {path}: not a regular file of its own")
    return fd


class CriLog:
    """One container's log file and how much of each stream is in it."""

    def __init__(self, path: str, docker_id: str) -> None:
        self.path = path
        self.docker_id = docker_id
        self.fd = open_log(path)
        self.copied = self._marked()

    def _marked(self) -> dict[int, int]:
        try:
            words = os.getxattr(self.fd, MARK_XATTR).decode("ascii").split()
        except (OSError, UnicodeDecodeError):
            words = []
        if len(words) == 3 and words[0] == self.docker_id and all(w.isdigit() for w in words[1:]):
            return {STDOUT: int(words[1]), STDERR: int(words[2])}
        return {STDOUT: 0, STDERR: 0}

    def _mark(self) -> None:
        text = f"{self.docker_id} {self.copied[STDOUT]} {self.copied[STDERR]}"
        # A file system without trusted xattrs only costs a repeat after our restart.
        with contextlib.suppress(OSError):
            os.setxattr(self.fd, MARK_XATTR, text.encode("ascii"))

    def reopen(self) -> None:
        """A new file at the path (the kubelet moved the old one away), marked at once."""
        fd = open_log(self.path)
        os.close(self.fd)
        self.fd = fd
        self._mark()

    def write(self, stream: int, pending: bytearray, *, at_end: bool = False) -> None:
        data, consumed = records(stream, pending, time.time_ns(), at_end=at_end)
        if not consumed:
            return
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError:
            pass  # a full disk: the records are dropped, as the supervisor drops them
        self.copied[stream] += consumed
        self._mark()

    def close(self) -> None:
        os.close(self.fd)


class CriSink:
    """One stream of a copy of the container's log: the first `skip` bytes are in the file."""

    def __init__(self, log: CriLog, stream: int) -> None:
        self.log = log
        self.stream = stream
        self.skip = log.copied[stream]
        self.pending = bytearray()

    def write(self, data: bytes) -> None:
        cut = min(self.skip, len(data))
        self.skip -= cut
        if cut < len(data):
            self.pending += memoryview(data)[cut:]
            self.log.write(self.stream, self.pending)

    def finish(self) -> None:
        """The container has ended: its unfinished line is a full record."""
        self.log.write(self.stream, self.pending, at_end=True)
