"""One open WebSocket of Kubernetes' streaming protocols (websocket.py is the front): the
connection over the `websockets` library's sans-I/O ServerProtocol and the asyncio streams the
server already has (WebSocket: binary messages out, whole messages in, the closing handshake),
and one channel's ends (Inbound: what the client writes on it, bounded; Outbound: what it
reads). With them the limits they honour (WebSocketLimits) and the error that closes a
connection breaking the protocol (Malformed), raised here and by the channels' routing
(websocket_channels.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType

from websockets.frames import CloseCode, Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol

from adapter.streaming.spdy_stream import StreamReset

log = logging.getLogger(__name__)

CHUNK = 32 * 1024  # the most read from the socket, or sent in one message, at a time


@dataclass(frozen=True)
class WebSocketLimits:
    max_message: int = 1 << 20  # a larger message closes the connection (1009)
    max_buffered: int = 256 * 1024  # per channel the client writes; past it the socket waits
    close_timeout: float = 5.0  # after our close frame, how long the client has to answer


class Malformed(Exception):
    """A message that breaks the protocol: the connection closes with `code`."""

    def __init__(self, reason: str, code: CloseCode = CloseCode.PROTOCOL_ERROR) -> None:
        super().__init__(reason)
        self.code = code


class WebSocket:
    """One open WebSocket: binary messages out, whole messages in (each awaited by
    `on_message` before the socket is read again: a slow consumer slows the client down),
    the closing handshake. Use as `async with`: leaving closes it, at once when cancelled."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        protocol: ServerProtocol,
        subprotocol: str,
        limits: WebSocketLimits,
    ) -> None:
        self.subprotocol = subprotocol
        self.limits = limits
        self._reader, self._writer = reader, writer
        self._protocol = protocol
        self._fragments: list[bytes] = []
        self._ended = asyncio.Event()
        self._receiver: asyncio.Task[None] | None = None

    async def __aenter__(self) -> WebSocket:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if isinstance(exc, asyncio.CancelledError):
            await self._drop()
        else:
            await self._close()

    def start(self, on_message: Callable[[bytes], Awaitable[None]]) -> None:
        self._receiver = asyncio.create_task(self._receive(on_message), name="websocket-reader")

    async def wait_ended(self) -> None:
        """Returns once the client is gone: it closed, hung up or broke the protocol."""
        await self._ended.wait()

    async def send(self, message: bytes) -> None:
        """One binary message; ConnectionError once the connection is closing or gone."""
        if self._protocol.state is not State.OPEN or self._writer.is_closing():
            raise ConnectionResetError("the WebSocket connection is closed")
        self._protocol.send_binary(message)
        await self._flush()

    async def _flush(self) -> None:
        for data in self._protocol.data_to_send():
            if data:
                self._writer.write(data)
            elif self._writer.can_write_eof():
                self._writer.write_eof()  # the library's cue: the server hangs up first
        await self._writer.drain()

    async def _receive(self, on_message: Callable[[bytes], Awaitable[None]]) -> None:
        try:
            while not self._protocol.eof_sent:
                data = await self._reader.read(CHUNK)
                if not data:
                    self._protocol.receive_eof()
                    break
                self._protocol.receive_data(data)
                events = self._protocol.events_received()
                await self._flush()  # pongs, the echo of a close, a framing error's close
                for frame in events:
                    if isinstance(frame, Frame):
                        await self._on_frame(frame, on_message)
        except Malformed as exc:
            log.warning("closing a WebSocket streaming connection: %s", exc)
            self._protocol.fail(exc.code, str(exc)[:120])
            with contextlib.suppress(ConnectionError):
                await self._flush()
        except ConnectionError:
            pass  # the client went away, or (a tunnel) what it talked to did
        except Exception:  # a bug here must end this connection, not the server around it
            log.exception("WebSocket streaming connection failed")
            self._protocol.fail(CloseCode.INTERNAL_ERROR)
            with contextlib.suppress(ConnectionError):
                await self._flush()
        finally:
            failure = self._protocol.parser_exc
            if failure is not None:  # EOF mid-session: the client hung up without closing
                level = logging.INFO if isinstance(failure, EOFError) else logging.WARNING
                log.log(level, "WebSocket streaming connection failed: %s", failure)
            self._ended.set()

    async def _on_frame(self, frame: Frame, on_message: Callable[[bytes], Awaitable[None]]) -> None:
        if frame.opcode is Opcode.TEXT:
            raise Malformed(
                "a text message; these protocols are binary", CloseCode.UNSUPPORTED_DATA
            )
        if frame.opcode not in (Opcode.BINARY, Opcode.CONT):
            return  # ping, pong, close: the protocol object has answered them
        self._fragments.append(bytes(frame.data))  # the library bounds a message's size
        if frame.fin:
            message = b"".join(self._fragments)
            self._fragments.clear()
            await on_message(message)

    async def _close(self) -> None:
        """Our close frame, then the client's answer for at most close_timeout; then the
        socket goes. A client that neither reads nor answers cannot hold us longer."""
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(self.limits.close_timeout):
                if self._protocol.state is State.OPEN:
                    self._protocol.send_close(CloseCode.NORMAL_CLOSURE)
                    await self._flush()
                if self._receiver is not None:
                    await self._ended.wait()
                self._writer.close()
                await self._writer.wait_closed()
        await self._drop()

    async def _drop(self) -> None:
        if self._receiver is not None:
            self._receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._receiver
        self._ended.set()
        self._writer.transport.abort()  # a no-op once the socket is closed


# ---- channels ----


class Inbound:
    """What the client sent on one channel, read like a SPDY stream: read() returns b"" once
    the client closed the channel (v5), or nobody reads it any more (abandon)."""

    def __init__(self, bound: int) -> None:
        self._buffer = bytearray()
        self._bound = bound
        self._closed_by_client = self._abandoned = False
        self._readable, self._room = asyncio.Event(), asyncio.Event()

    async def deliver(self, data: bytes) -> None:
        """Take `data` once there is room: the socket is not read meanwhile."""
        if self._closed_by_client:
            raise Malformed("data on a channel after its close signal")
        while len(self._buffer) >= self._bound and not self._abandoned:
            self._room.clear()
            await self._room.wait()
        if not self._abandoned:
            self._buffer += data
            self._readable.set()

    def close(self) -> None:
        self._closed_by_client = True
        self._readable.set()

    def abandon(self) -> None:
        self._abandoned = True
        self._buffer.clear()
        self._readable.set()
        self._room.set()

    async def read(self, max_bytes: int = -1) -> bytes:
        while not self._buffer and not (self._closed_by_client or self._abandoned):
            self._readable.clear()
            await self._readable.wait()
        size = len(self._buffer) if max_bytes < 0 else min(max_bytes, len(self._buffer))
        chunk = bytes(self._buffer[:size])
        del self._buffer[:size]
        self._room.set()
        return chunk


class Outbound:
    """A channel the client reads: each write is one message or more, behind the channel's
    byte. Writes raise StreamReset once the client is gone, as a SPDY stream's do."""

    def __init__(self, websocket: WebSocket, channel: int) -> None:
        self._websocket = websocket
        self._channel = channel
        self._closed = False

    async def write(self, data: bytes) -> None:
        if self._closed:
            raise StreamReset(f"channel {self._channel}: write after close")
        try:
            for start in range(0, len(data), CHUNK):
                await self._websocket.send(bytes([self._channel]) + data[start : start + CHUNK])
        except ConnectionError as exc:
            raise StreamReset(f"channel {self._channel}: the client is gone") from exc

    async def close(self) -> None:
        """The client learns the end of every channel from the connection's close."""
        self._closed = True
