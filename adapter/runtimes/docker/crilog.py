"""A docker container's CRI log: its output as the kubelet reads it, made from the same followed
log stream that otherwise fills the sandbox's files (output.py), in the records every runtime
writes (adapter/runtimes/crilog.py).

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

from adapter.runtimes.crilog import STDERR, STDOUT, CriLogFile

MARK_XATTR = "trusted.containerizer.cri-log"  # "<docker id> <stdout bytes> <stderr bytes>"


class CriLog(CriLogFile):
    """One container's log file and how much of each stream is in it."""

    def __init__(self, path: str, docker_id: str) -> None:
        super().__init__(path)
        self.docker_id = docker_id
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
        super().reopen()
        self._mark()

    def write(
        self, stream: int, pending: bytearray, *, at_end: bool = False, last_tag: bytes = b"F"
    ) -> int:
        consumed = super().write(stream, pending, at_end=at_end, last_tag=last_tag)
        if consumed:
            self.copied[stream] += consumed
            self._mark()
        return consumed


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
