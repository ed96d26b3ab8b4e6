"""The CRI log file as every runtime writes it (the supervisor's open_log_file, the containerd
log relay, the docker output copy, the libvirt guest output copy): never through a symlink, a
FIFO at the path failing at once instead of hanging the open, appended to, and checked to be a
regular file of its own.

The records are the supervisor's (supervisor/containerizer-supervisor.c, emit_records):
`<RFC3339Nano, UTC> <stdout|stderr> <F|P> <content>\\n`, F ending a line, P each 16 KiB piece of
a longer one; an unfinished line waits for its end, or is written once its stream has ended. The
time is when the service read the output. ReopenContainerLog opens the path again after the
kubelet renamed the file.
"""

from __future__ import annotations

import os
import stat
import time

from adapter.core.errors import FailedPrecondition, InvalidArgument

# What the relay opens the log with (the supervisor's open_log_file): never through a symlink,
# and a FIFO at the path fails at once instead of hanging the open.
LOG_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

LINE_MAX = 16 * 1024  # the supervisor's LOG_LINE_MAX: longer lines are cut into P records
STDOUT, STDERR = 1, 2  # the streams by their file descriptor numbers, as Docker numbers them
STREAM_NAMES = {STDOUT: b"stdout", STDERR: b"stderr"}


def check_log_file(log_path: str) -> None:
    """Create the log as it will be opened, so that a log that cannot be written fails the
    launch here, with the reason (containerd's shim cannot tell a relay's failure from its
    readiness)."""
    field = "linux.log_path"
    try:
        fd = os.open(log_path, LOG_FLAGS, 0o640)
    except OSError as exc:
        raise InvalidArgument(field, f"{log_path}: cannot open the log: {exc.strerror}") from exc
    try:
        info = os.fstat(fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        raise InvalidArgument(field, f"{log_path}: not a regular file of its own")


def timestamp(now_ns: int) -> bytes:
    """RFC 3339 in UTC with nanoseconds, as Go's RFC3339Nano but with every digit kept."""
    seconds, nanos = divmod(now_ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)).encode() + b".%09dZ" % nanos


def records(
    stream: int, pending: bytearray, now_ns: int, *, at_end: bool, last_tag: bytes = b"F"
) -> tuple[bytes, int]:
    """The records of what `pending` holds, taken from it, and how many bytes they consumed.
    What stays is an unfinished line of at most LINE_MAX bytes; `at_end`, it is written too,
    tagged `last_tag`: F when its stream has ended, P when the line goes on in a later record."""
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
        out += prefix + last_tag + b" " + pending[start:] + b"\n"
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


class CriLogFile:
    """One container's log file, written by the service from the output it copies."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = open_log(path)

    def reopen(self) -> None:
        """A new file at the path (the kubelet moved the old one away)."""
        fd = open_log(self.path)
        os.close(self.fd)
        self.fd = fd

    def write(
        self, stream: int, pending: bytearray, *, at_end: bool = False, last_tag: bytes = b"F"
    ) -> int:
        """Write the records of `pending` (see records()); the bytes of it they consumed."""
        data, consumed = records(stream, pending, time.time_ns(), at_end=at_end, last_tag=last_tag)
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError:
            pass  # a full disk: the records are dropped, as the supervisor drops them
        return consumed

    def close(self) -> None:
        os.close(self.fd)
