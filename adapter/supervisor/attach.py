"""Attach to a container's first process: its stdin, stdout and stderr, at any time after it
started (CRI Attach, `kubectl attach`), through the unix socket its supervisor serves.

The supervisor (containerizer-supervisor --attach-socket, launched with a CRI log) holds the
workload's output pipes and the write end of its stdin, and outlives the service: so a restarted
service attaches the same way, to the same socket. Frames both ways are a type byte, the
payload's length (4 bytes, big-endian) and the payload. The supervisor first sends HELLO (whether
stdin is open, whether it is a terminal), then STDOUT and STDERR frames with what the workload
writes, and closes the connection once the workload has ended and its output was sent. A client
sends STDIN, CLOSE_STDIN (its input has ended: with `stdin_once` the workload's input ends too)
RESIZE (columns, rows) and STREAMS (which output it wants: the supervisor sends no other).

A client that reads too slowly is dropped by the supervisor (the workload and its log never wait
for it): a session that stops reading sees its output end early.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
from pathlib import Path

from adapter.core.errors import FailedPrecondition

STDOUT = 1
STDERR = 2
FRAME_STDIN = 0
FRAME_CLOSE_STDIN = 3
FRAME_RESIZE = 4
FRAME_HELLO = 5
FRAME_STREAMS = 6
HELLO_STDIN = 1
HELLO_TTY = 2
HEADER = struct.Struct(">BI")
RESIZE = struct.Struct(">HH")
FRAME_MAX = 32 * 1024  # the largest STDIN payload the supervisor takes
OUTPUT_FRAME_MAX = 1 << 20  # far above the supervisor's (one read of a pipe)
HELLO_TIMEOUT_S = 5.0
# Output chunks (up to 32 KiB each) kept per stream for a caller that has not read them yet;
# past that the session stops reading the socket, as a slow reader would.
QUEUED_CHUNKS = 64


class AttachSession:
    """One attachment; read the streams asked for (stdout, stderr) until b"", or close."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        hello: int,
        streams: frozenset[int],
    ) -> None:
        self._writer = writer
        self._hello = hello
        self._queues = {stream: asyncio.Queue[bytes](QUEUED_CHUNKS) for stream in streams}
        self._ended: set[int] = set()
        self._stdin_closed = False
        self._frames = asyncio.create_task(self._take_frames(reader))

    @classmethod
    async def connect(
        cls, socket_path: str | Path, *, stdout: bool = True, stderr: bool = True
    ) -> AttachSession:
        """Attach through the supervisor's socket; a stream not asked for is not sent.
        FailedPrecondition when no supervisor serves the socket (the container ended, or was
        launched without one) or it refused the attach (8 clients attached)."""
        reader, writer = await _open(Path(socket_path))
        try:
            hello = await asyncio.wait_for(_read_hello(reader), HELLO_TIMEOUT_S)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError) as exc:
            writer.close()
            raise FailedPrecondition(
                f"attach at {socket_path}: the supervisor refused it (the container is ending,"
                " or 8 clients are attached)"
            ) from exc
        except BaseException:
            writer.close()
            raise
        wanted = frozenset(s for s, asked in ((STDOUT, stdout), (STDERR, stderr)) if asked)
        if len(wanted) < 2:
            mask = sum(1 << (stream - STDOUT) for stream in wanted)
            writer.write(HEADER.pack(FRAME_STREAMS, 1) + bytes([mask]))
        return cls(reader, writer, hello, wanted)

    @property
    def tty(self) -> bool:
        return bool(self._hello & HELLO_TTY)

    @property
    def stdin(self) -> bool:
        """Whether the workload's stdin was open for input when the session attached."""
        return bool(self._hello & HELLO_STDIN)

    async def write(self, data: bytes) -> None:
        """Input for the workload; dropped when its stdin is not open (or the container ended)."""
        if self._stdin_closed or self._writer.is_closing():
            return
        for start in range(0, len(data), FRAME_MAX):
            chunk = data[start : start + FRAME_MAX]
            self._writer.write(HEADER.pack(FRAME_STDIN, len(chunk)) + chunk)
        with contextlib.suppress(ConnectionError):
            await self._writer.drain()

    def close_stdin(self) -> None:
        """This session's input has ended: with stdin_once, the workload's stdin closes (once
        it read what came before); without, only this session stops writing."""
        if not self._stdin_closed and not self._writer.is_closing():
            self._writer.write(HEADER.pack(FRAME_CLOSE_STDIN, 0))
        self._stdin_closed = True

    async def read(self, stream: int = STDOUT) -> bytes:
        """The next chunk of the workload's stdout (or stderr), b"" at its end: the workload
        ended, or this session was dropped. With a terminal everything comes on STDOUT and
        STDERR ends at once."""
        queue = self._queues.get(stream)
        if queue is None or stream in self._ended or (stream == STDERR and self.tty):
            return b""
        chunk = await queue.get()
        if not chunk:
            self._ended.add(stream)
        return chunk

    def resize(self, columns: int, rows: int) -> None:
        if self.tty and 0 < columns < 65536 and 0 < rows < 65536 and not self._writer.is_closing():
            self._writer.write(HEADER.pack(FRAME_RESIZE, RESIZE.size) + RESIZE.pack(columns, rows))

    async def wait(self) -> None:
        """Until the container's output has ended (all of it read by the caller, for the
        streams it asked for)."""
        await asyncio.shield(self._frames)

    def close(self) -> None:
        """Detach. With stdin_once, a session that wrote input ends the workload's stdin."""
        self._frames.cancel()
        self._writer.close()

    async def _take_frames(self, reader: asyncio.StreamReader) -> None:
        """Sort the output frames into the streams' queues until EOF, then end each."""
        try:
            while True:
                kind, length = HEADER.unpack(await reader.readexactly(HEADER.size))
                if length > OUTPUT_FRAME_MAX:
                    break  # not our supervisor's framing: nothing more of it can be trusted
                payload = await reader.readexactly(length)
                queue = self._queues.get(kind)
                if queue is not None and payload:
                    await queue.put(payload)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the workload's output ended, or this session was dropped
        for queue in self._queues.values():
            await queue.put(b"")


async def _open(path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect through the directory's fd: a socket path may be longer than sun_path's 108
    bytes, and the directory (root's, 0700) is resolved once."""
    try:
        directory = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise FailedPrecondition(f"attach at {path}: {exc.strerror}") from exc
    try:
        return await asyncio.open_unix_connection(f"/proc/self/fd/{directory}/{path.name}")
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise FailedPrecondition(
            f"attach at {path}: no supervisor serves it (the container has ended, or was"
            " launched without an attach socket)"
        ) from exc
    finally:
        os.close(directory)


async def _read_hello(reader: asyncio.StreamReader) -> int:
    kind, length = HEADER.unpack(await reader.readexactly(HEADER.size))
    payload = await reader.readexactly(length)
    if kind != FRAME_HELLO or length != 1:
        raise ConnectionError(f"unexpected first frame {kind} of {length} bytes")
    return payload[0]
