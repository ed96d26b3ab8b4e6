"""Streaming Engine API responses (an exec's hijacked connection, a followed log) read and written
by the event loop, not by a thread held per stream.

The SDK makes the request and reads the response headers (on the engine's executor, like every
call); then `take_connection` takes the connection over: a duplicate of its socket, made
non-blocking, plus whatever http.client had already read past the headers into its buffer (the
first output of a command or a log often arrives in the same read as the headers, and dropping
it would lose output). From there the event loop reads it with `sock_recv`: 500 followed logs
cost 500 idle sockets and no thread.

Two body encodings reach us: an exec's upgraded connection is raw to its end, a log is HTTP/1.1
chunked. Inside either, a container or exec without a terminal multiplexes its streams in
Docker's frames: an 8-byte header (stream: 1 stdout, 2 stderr; three zero bytes; the payload's
length, big-endian) before each payload.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

from adapter.core.errors import Unavailable

READ_CHUNK = 64 * 1024
FRAME_HEADER_BYTES = 8
STDOUT = 1
STDERR = 2
# A chunk-size line is a few hex digits; a longer one is not HTTP from dockerd.
MAX_CHUNK_LINE = 1024


def take_connection(response: Any) -> Connection:
    """The connection under the SDK's streaming `response` (headers read, status checked), ours
    from now on; the response is closed. Blocking: run it where the SDK call ran."""
    # http.client reads through a buffered reader of the socket; both are the SDK's own path to
    # it (docker's APIClient._get_raw_response_socket uses the same attributes).
    buffered = response.raw._fp.fp
    connection = buffered.raw._sock
    try:
        connection.setblocking(False)
        # At most what the buffer holds, or one non-blocking read: never waits.
        early = bytes(buffered.peek())
        buffered.read(len(early))
        ours = connection.dup()
    except OSError as exc:
        raise Unavailable(f"docker: cannot take over a stream's connection: {exc}") from exc
    finally:
        response.close()
    chunked = response.headers.get("Transfer-Encoding", "").lower() == "chunked"
    return Connection(ours, early, chunked=chunked)


class Connection:
    """One streaming response's connection: its body as it comes (de-chunked), and the request
    side for an exec's input. Closing it is the owner's; a read after its end returns b""."""

    def __init__(self, sock: socket.socket, early: bytes, *, chunked: bool) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._buffer = bytearray(early)
        self._chunked = chunked
        self._chunk_left = 0  # bytes of the current chunk not yet returned
        self._ended = False
        self._cut_short = False

    @property
    def complete(self) -> bool:
        """Whether the body has ended as the server ends it: a chunked body with its last
        chunk, a raw one at EOF, and neither with the connection broken."""
        return self._ended and not self._cut_short

    async def read(self) -> bytes:
        """The next piece of the body; b"" at its end (or when the connection broke)."""
        if self._ended:
            return b""
        try:
            data = await (self._next_chunk_piece() if self._chunked else self._next_raw())
        except (ConnectionError, EOFError):
            data, self._cut_short = b"", True
        if not data:
            self._ended = True
        return data

    async def _next_raw(self) -> bytes:
        if self._buffer:
            data = bytes(self._buffer)
            self._buffer.clear()
            return data
        return await asyncio.get_running_loop().sock_recv(self._sock, READ_CHUNK)

    async def _next_chunk_piece(self) -> bytes:
        if self._chunk_left == 0:
            line = await self._take_line()
            self._chunk_left = int(line.split(b";", 1)[0].strip() or b"0", 16)
            if self._chunk_left == 0:
                return b""  # the last chunk; trailers, if any, are not ours to read
        if not self._buffer and not await self._fill():
            raise EOFError("the connection ended inside a chunk")
        piece = bytes(self._buffer[: self._chunk_left])
        del self._buffer[: len(piece)]
        self._chunk_left -= len(piece)
        if self._chunk_left == 0:
            await self._take_exactly(2)  # the CRLF closing the chunk
        return piece

    async def _take_line(self) -> bytes:
        while (end := self._buffer.find(b"\r\n")) < 0:
            if len(self._buffer) > MAX_CHUNK_LINE or not await self._fill():
                raise EOFError("no chunk size line")
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 2]
        return line

    async def _take_exactly(self, count: int) -> bytes:
        while len(self._buffer) < count:
            if not await self._fill():
                raise EOFError("the connection ended early")
        taken = bytes(self._buffer[:count])
        del self._buffer[:count]
        return taken

    async def _fill(self) -> bool:
        data = await asyncio.get_running_loop().sock_recv(self._sock, READ_CHUNK)
        self._buffer += data
        return bool(data)

    async def send(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self._sock, data)

    def shut_write(self) -> None:
        """End of input: dockerd closes the exec's stdin on a half-closed connection."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        """Close the socket. The readers and writers the loop had for it are removed first (a
        cancelled sock_recv then leaves them alone), so a socket opened later with the same
        descriptor number is not touched."""
        if self._sock.fileno() < 0:
            return
        with contextlib.suppress(RuntimeError):  # no loop runs here: none has it registered
            loop = asyncio.get_running_loop()
            loop.remove_reader(self._sock)
            loop.remove_writer(self._sock)
        self._sock.close()


class FrameReader:
    """Docker's multiplexed frames from a connection's body."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._buffer = bytearray()

    async def next(self) -> tuple[int, bytes] | None:
        """(stream, payload) of the next frame; None at the end of the body."""
        header = await self._take(FRAME_HEADER_BYTES)
        if header is None:
            return None
        payload = await self._take(int.from_bytes(header[4:8], "big"))
        return None if payload is None else (header[0], payload)

    async def _take(self, count: int) -> bytes | None:
        while len(self._buffer) < count:
            data = await self._connection.read()
            if not data:
                return None  # a frame cut short by the end: nothing complete to give
            self._buffer += data
        taken = bytes(self._buffer[:count])
        del self._buffer[:count]
        return taken
