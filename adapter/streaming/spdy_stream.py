"""One SPDY/3.1 stream as applications use it (read, write, half-close, reset), and the two
errors stream and connection operations raise.

The stream keeps its own buffer and both of its flow-control windows; everything that touches
the wire goes through its Connection (spdy.py), whose reader task hands it DATA and FIN.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from adapter.streaming.frames import (
    FLAG_FIN,
    MAX_WINDOW,
    DataFrame,
    Frame,
    Headers,
    RstStatus,
    RstStreamFrame,
    SynReplyFrame,
    WindowUpdateFrame,
)

if TYPE_CHECKING:
    from adapter.streaming.spdy import Connection


class StreamReset(Exception):
    """The stream ended abnormally: reset by either side (`status`), or the connection ended
    before the stream finished (`status` None). The only error Stream methods raise."""

    def __init__(self, message: str, status: RstStatus | None = None) -> None:
        super().__init__(message)
        self.status = status


class ConnectionClosed(Exception):
    """The connection is closed, or going away, so no new stream can be opened on it."""


class Pulse:
    """Wakes every current waiter; waiters re-check their own condition. One per connection:
    streams are few, and a missed wake-up is worse than a spurious one."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def wake(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self) -> None:
        await self._event.wait()


class Stream:
    """One SPDY stream. read() returns b"" once the peer half-closed; write() and close() send
    DATA and FIN; reset() abandons it. A stream the peer opened (Connection.accept) must be
    answered with reply() or reset(); write() and close() reply on their own if needed."""

    def __init__(
        self,
        connection: Connection,
        stream_id: int,
        headers: Headers,
        *,
        incoming: bool,
        local_closed: bool = False,
        remote_closed: bool = False,
    ) -> None:
        self.id = stream_id
        self.headers = headers
        self.reply_headers: Headers | None = None
        self.incoming = incoming
        self._connection = connection
        self._buffer = bytearray()
        # A unidirectional stream the peer opened is closed on our side and gets no reply.
        self._replied = not incoming or local_closed
        self._local_closed = local_closed
        self._remote_closed = remote_closed
        self._reset: StreamReset | None = None
        self._send_window = connection.peer_initial_window
        self._receive_window = connection.limits.receive_window
        self._uncredited = 0

    @property
    def remote_closed(self) -> bool:
        return self._remote_closed

    @property
    def finished(self) -> bool:
        return self._reset is not None or (self._local_closed and self._remote_closed)

    def at_eof(self) -> bool:
        return self._remote_closed and not self._buffer

    async def reply(self, headers: Headers | None = None, *, fin: bool = False) -> None:
        """Accept a stream the peer opened (SYN_REPLY). Idempotent."""
        if self._replied:
            return
        self.raise_if_reset()
        self._replied = True
        await self._send(SynReplyFrame(self.id, headers or Headers(), FLAG_FIN if fin else 0))
        if fin:
            self._local_closed = True
            self._connection.forget_if_finished(self)

    async def read(self, max_bytes: int = -1) -> bytes:
        """Up to `max_bytes` (all buffered when negative); b"" at the peer's FIN. Data that
        arrived before a reset by the peer is still returned; then StreamReset is raised."""
        while not self._buffer:
            if self._remote_closed or max_bytes == 0:
                return b""
            self.raise_if_reset()
            await self._connection.pulse.wait()
        size = len(self._buffer) if max_bytes < 0 else min(max_bytes, len(self._buffer))
        chunk = bytes(self._buffer[:size])
        del self._buffer[:size]
        self._connection.pulse.wake()  # the reader task may be waiting for room in the buffer
        await self._credit(size)
        return chunk

    async def write(self, data: bytes) -> None:
        """Send `data`, in frames no larger than the windows allow when they are enforced."""
        if not self._replied:
            await self.reply()
        view = memoryview(data)
        while view:
            self._raise_if_unwritable()
            size = self._connection.sendable(self, len(view))
            if size <= 0:
                await self._connection.pulse.wait()
                continue
            chunk, view = bytes(view[:size]), view[size:]
            self._send_window -= size
            self._connection.session_send_window -= size
            await self._send(DataFrame(self.id, chunk))

    async def close(self) -> None:
        """Half-close our side (FIN). Idempotent; a no-op on a reset stream."""
        if self._local_closed or self._reset is not None:
            return
        if not self._replied:
            await self.reply(fin=True)
            return
        self._local_closed = True
        await self._send(DataFrame(self.id, b"", FLAG_FIN))
        self._connection.forget_if_finished(self)

    async def reset(self, status: RstStatus = RstStatus.CANCEL) -> None:
        """Abandon the stream both ways (RST_STREAM); buffered input is dropped."""
        if self.finished:
            return
        self.mark_reset(StreamReset(f"stream {self.id} reset by us", status))
        with contextlib.suppress(ConnectionClosed):
            await self._connection.send(RstStreamFrame(self.id, status))

    # ---- called by the connection's reader task ----

    def deliver(self, chunk: bytes) -> bool:
        """Take received DATA; False when the stream cannot take it (dropped by the caller)."""
        if self._reset is not None or self._remote_closed:
            return False
        self._receive_window -= len(chunk)
        self._buffer += chunk
        return True

    def overran_window(self) -> bool:
        return self._receive_window < 0

    def needs_room(self) -> bool:
        """True while the reader task should stop reading: more buffered than the window."""
        return self._reset is None and len(self._buffer) > self._connection.limits.receive_window

    def remote_fin(self) -> None:
        self._remote_closed = True
        self._connection.forget_if_finished(self)

    def mark_reset(self, reason: StreamReset, *, keep_input: bool = False) -> None:
        if self._reset is None:
            self._reset = reason
            if not keep_input:
                self._connection.credit_session_later(len(self._buffer))
                self._buffer.clear()
        self._connection.forget_if_finished(self)

    def grow_send_window(self, delta: int) -> bool:
        """False if the window would pass 2^31-1 (a flow control error)."""
        self._send_window += delta
        return self._send_window <= MAX_WINDOW

    @property
    def send_window(self) -> int:
        return self._send_window

    async def _send(self, frame: Frame) -> None:
        """Stream operations report a lost connection as what it is for them: a reset."""
        try:
            await self._connection.send(frame)
        except ConnectionClosed as exc:
            raise StreamReset(f"stream {self.id}: connection closed") from exc

    def raise_if_reset(self) -> None:
        if self._reset is not None:
            raise self._reset

    def _raise_if_unwritable(self) -> None:
        self.raise_if_reset()
        if self._local_closed:
            raise StreamReset(f"stream {self.id}: write after close (FIN already sent)")

    async def _credit(self, size: int) -> None:
        """Return consumed bytes to the peer's windows, in batches of half a window."""
        self._uncredited += size
        self._connection.credit_session_later(size)
        window = self._connection.limits.receive_window
        updates: list[Frame] = []
        if not self._remote_closed and self._reset is None and self._uncredited >= window // 2:
            updates.append(WindowUpdateFrame(self.id, self._uncredited))
            self._receive_window += self._uncredited
            self._uncredited = 0
        await self._connection.send_credits(updates)
