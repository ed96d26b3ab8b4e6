"""Kubernetes' streaming protocols over WebSocket, for the clients that no longer speak SPDY
(client-go's WebSocket executor, crictl's `--transport websocket`, web terminals). The same
URLs serve both: a request with `Upgrade: websocket` comes here, any other goes to SPDY.

Exec and attach: binary messages, the first byte the channel, the rest the data: 0 stdin,
1 stdout, 2 stderr, 3 error, 4 resize (JSON {"Width", "Height"} objects, as over SPDY). The
subprotocol is the client's most preferred of:

    v5.channel.k8s.io   v4 and the close signal: [255, n] ends channel n (stdin's end reaches
                        the command)
    v4.channel.k8s.io   the error channel carries the metav1.Status JSON, as over SPDY; a close
                        signal is ignored, as the kubelet does (v4 has none)
    channel.k8s.io, or none at all: only a failure's text on the error channel

Port-forward:

    SPDY/3.1+portforward.k8s.io   the portforward.k8s.io SPDY session, its bytes carried in
                                  binary messages (kubectl 1.30+, crictl's websocket transport)
    v4.channel.k8s.io, or none    channels 2i (data) and 2i+1 (error) for the i-th port (of the
                                  CRI request, else the `port` query parameters), each opened by
                                  the server with the port (uint16, little-endian); the session
                                  ends with the last port's connection

The server writes an empty message on the first channel the client reads once it is ready (as
the kubelet does), and ends with a normal close (1000): client-go reads every channel until
then. A message that breaks the protocol (text, a channel the client does not write, a close
signal naming no channel, a resize that is not a size, one over the size limit) closes the
connection with 1003, 1002 or 1009, and the session ends as if the client had left.

The framing is the `websockets` library's sans-I/O ServerProtocol over the asyncio streams the
server already has (the request head was read before it was known to be a WebSocket).
Subprotocols are negotiated here: the library's parser refuses the tunnel's name (no token).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from types import TracebackType

from websockets.datastructures import Headers
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol

from adapter.streaming.portforward import Connector, forward_ports
from adapter.streaming.remotecommand import (
    ExecOptions,
    ExecStreams,
    Runner,
    exit_status,
    parse_sizes,
    run_until_client_leaves,
)
from adapter.streaming.spdy import Connection, Role
from adapter.streaming.spdy_stream import StreamReset
from adapter.streaming.upgrade import HttpError, UpgradeRequest

log = logging.getLogger(__name__)

V5 = "v5.channel.k8s.io"
V4 = "v4.channel.k8s.io"
V1 = "channel.k8s.io"
TUNNELED_PORT_FORWARD = "SPDY/3.1+portforward.k8s.io"
EXEC_PROTOCOLS = (V5, V4, V1)
PORT_FORWARD_PROTOCOLS = (TUNNELED_PORT_FORWARD, V4)
STDIN, STDOUT, STDERR, ERROR, RESIZE = range(5)
CLOSE_SIGNAL = 255
MAX_PORTS = 127  # two channels each, numbered below the close signal
_CHUNK = 32 * 1024


@dataclass(frozen=True)
class WebSocketLimits:
    max_message: int = 1 << 20  # a larger message closes the connection (1009)
    max_buffered: int = 256 * 1024  # per channel the client writes; past it the socket waits
    close_timeout: float = 5.0  # after our close frame, how long the client has to answer


class _Malformed(Exception):
    """A message that breaks the protocol: the connection closes with `code`."""

    def __init__(self, reason: str, code: CloseCode = CloseCode.PROTOCOL_ERROR) -> None:
        super().__init__(reason)
        self.code = code


def is_websocket_request(request: UpgradeRequest) -> bool:
    """An upgrade to WebSocket (else the client wants SPDY), as the kubelet tells them apart."""
    upgrade = {token.lower() for token in _tokens(request, "upgrade")}
    connection = {token.lower() for token in _tokens(request, "connection")}
    return "websocket" in upgrade and "upgrade" in connection


def _tokens(request: UpgradeRequest, name: str) -> list[str]:
    return [part.strip(" \t") for value in request.values(name) for part in value.split(",")]


# ---- the two services ----


async def serve_exec_websocket(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    request: UpgradeRequest,
    options: ExecOptions,
    run: Runner,
    *,
    limits: WebSocketLimits | None = None,
) -> int | None:
    """serve_exec's contract over WebSocket: upgrade, await `run(streams)` for the exit code,
    report it, close. The exit code, or None when no command ran or it did not finish (upgrade
    refused; the client gone or breaking the protocol: `run` is then cancelled). What `run`
    raises is reported to the client as an internal error, never raised from here."""
    limits = limits or WebSocketLimits()
    try:
        subprotocol = _choose(request, EXEC_PROTOCOLS)
    except HttpError as exc:
        await _refuse(writer, exc)
        return None
    websocket = await _accept(reader, writer, request, subprotocol, limits)
    if websocket is None:
        return None
    async with websocket:
        channels = _ExecChannels(options, websocket.subprotocol, limits)
        websocket.start(channels.on_message)
        streams = ExecStreams(
            stdin=channels.stdin,
            stdout=_Outbound(websocket, STDOUT) if options.stdout else None,
            stderr=_Outbound(websocket, STDERR) if options.stderr else None,
            tty=options.tty,
            resize=channels.resize,
        )
        try:
            await websocket.send(bytes([_first_output(options)]))  # "ready", as the kubelet says
        except ConnectionError:
            return None
        outcome = await run_until_client_leaves(websocket.wait_ended, streams, run)
        channels.abandon()
        if outcome is None:
            return None
        message = exit_status(outcome, structured=websocket.subprotocol in (V5, V4))
        if message:
            with contextlib.suppress(ConnectionError):
                await websocket.send(bytes([ERROR]) + message)
        return outcome if isinstance(outcome, int) else None


def _first_output(options: ExecOptions) -> int:
    if options.stdout:
        return STDOUT
    return STDERR if options.stderr else ERROR


async def serve_port_forward_websocket(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    request: UpgradeRequest,
    connect: Connector,
    *,
    ports: Sequence[int] = (),
    limits: WebSocketLimits | None = None,
) -> None:
    """serve_port_forward's contract over WebSocket: until the client hangs up (tunneled
    SPDY) or every port's connection has ended (channels). `ports`: the channels' ports, as
    the CRI request named them; empty: the request's `port` query parameters."""
    limits = limits or WebSocketLimits()
    try:
        subprotocol = _choose(request, PORT_FORWARD_PROTOCOLS)
        if subprotocol != TUNNELED_PORT_FORWARD:  # bad ports: refused before the upgrade
            ports = _channel_ports(request, ports)
    except HttpError as exc:
        await _refuse(writer, exc)
        return
    websocket = await _accept(reader, writer, request, subprotocol, limits)
    if websocket is None:
        return
    async with websocket:
        if subprotocol == TUNNELED_PORT_FORWARD:
            await _serve_tunnel(websocket, connect)
        else:
            await _serve_port_channels(websocket, connect, ports)


# ---- the handshake ----


async def _accept(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    request: UpgradeRequest,
    subprotocol: str,
    limits: WebSocketLimits,
) -> _WebSocket | None:
    """Answer the upgrade with the library's checks (GET, the key, the version): the open
    WebSocket, or None once its refusal is written or the client hung up meanwhile."""
    protocol = ServerProtocol(max_size=limits.max_message)
    headers = Headers([(k, v) for k, v in request.headers if k != "sec-websocket-protocol"])
    protocol.receive_data(Request(request.target, headers, request.method).serialize())
    for event in protocol.events_received():
        if isinstance(event, Request):
            response = protocol.accept(event)
            if response.status_code == HTTPStatus.SWITCHING_PROTOCOLS and subprotocol:
                response.headers["Sec-WebSocket-Protocol"] = subprotocol
            protocol.send_response(response)
    try:
        for data in protocol.data_to_send():
            writer.write(data)
        await writer.drain()
    except ConnectionError:
        return None
    if protocol.state is not State.OPEN:
        log.info("refused a WebSocket upgrade: %s", protocol.handshake_exc)
        return None
    return _WebSocket(reader, writer, protocol, subprotocol, limits)


def _choose(request: UpgradeRequest, supported: Sequence[str]) -> str:
    """The client's most preferred subprotocol we speak; "" when it offers none."""
    offered = [part for part in _tokens(request, "sec-websocket-protocol") if part]
    if not offered:
        return ""
    chosen = next((protocol for protocol in offered if protocol in supported), None)
    if chosen is None:
        raise HttpError(
            HTTPStatus.FORBIDDEN,
            f"unable to upgrade: unable to negotiate protocol: client supports {offered}, "
            f"server accepts {list(supported)}",
        )
    return chosen


def _channel_ports(request: UpgradeRequest, ports: Sequence[int]) -> tuple[int, ...]:
    """`ports`, else the `port` query parameters (each may list several, comma-separated)."""
    values = [str(port) for port in ports] or [
        part for value in request.query().get("port", []) for part in value.split(",")
    ]
    if not values:
        raise HttpError(HTTPStatus.BAD_REQUEST, 'query parameter "port" is required')
    if len(values) > MAX_PORTS:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"port: at most {MAX_PORTS} ports at once")
    for value in values:
        if not value.isdigit() or not 0 < int(value) <= 0xFFFF:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"port: {value[:20]!r} is not in 1-65535")
    return tuple(int(value) for value in values)


async def _refuse(writer: asyncio.StreamWriter, refusal: HttpError) -> None:
    writer.write(refusal.response())
    with contextlib.suppress(ConnectionError):
        await writer.drain()


# ---- one connection ----


class _WebSocket:
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

    async def __aenter__(self) -> _WebSocket:
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
                data = await self._reader.read(_CHUNK)
                if not data:
                    self._protocol.receive_eof()
                    break
                self._protocol.receive_data(data)
                events = self._protocol.events_received()
                await self._flush()  # pongs, the echo of a close, a framing error's close
                for frame in events:
                    if isinstance(frame, Frame):
                        await self._on_frame(frame, on_message)
        except _Malformed as exc:
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
            raise _Malformed(
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


class _Inbound:
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
            raise _Malformed("data on a channel after its close signal")
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


class _Outbound:
    """A channel the client reads: each write is one message or more, behind the channel's
    byte. Writes raise StreamReset once the client is gone, as a SPDY stream's do."""

    def __init__(self, websocket: _WebSocket, channel: int) -> None:
        self._websocket = websocket
        self._channel = channel
        self._closed = False

    async def write(self, data: bytes) -> None:
        if self._closed:
            raise StreamReset(f"channel {self._channel}: write after close")
        try:
            for start in range(0, len(data), _CHUNK):
                await self._websocket.send(bytes([self._channel]) + data[start : start + _CHUNK])
        except ConnectionError as exc:
            raise StreamReset(f"channel {self._channel}: the client is gone") from exc

    async def close(self) -> None:
        """The client learns the end of every channel from the connection's close."""
        self._closed = True


def _close_signal_target(data: bytes, channels: int) -> int:
    if len(data) != 1 or data[0] >= channels:
        raise _Malformed(f"a close signal names one channel below {channels}")
    return data[0]


class _ExecChannels:
    """Routes an exec client's messages: stdin, resizes, close signals."""

    def __init__(self, options: ExecOptions, subprotocol: str, limits: WebSocketLimits) -> None:
        self.stdin = _Inbound(limits.max_buffered) if options.stdin else None
        self.resize = _Inbound(limits.max_buffered) if options.tty else None
        self._honours_close = subprotocol == V5

    async def on_message(self, message: bytes) -> None:
        if not message:
            return  # no channel byte, nothing to route: the kubelet skips these too
        channel, data = message[0], message[1:]
        if channel == CLOSE_SIGNAL:
            self._on_close_signal(_close_signal_target(data, RESIZE + 1))
        elif channel == STDIN and self.stdin is not None:
            await self.stdin.deliver(data)
        elif channel == RESIZE:
            await self._on_resize(data)
        else:
            raise _Malformed(f"a message on channel {channel}, which this session does not read")

    def _on_close_signal(self, channel: int) -> None:
        if not self._honours_close:
            return  # v4 has no close signal; client-go sends it anyway, the kubelet ignores it
        target = {STDIN: self.stdin, RESIZE: self.resize}.get(channel)
        if target is not None:  # closing a channel the client reads (client-go's Reset): no-op
            target.close()

    async def _on_resize(self, data: bytes) -> None:
        sizes, rest = parse_sizes(data)
        if not sizes or rest != b"":
            raise _Malformed('a resize message holds whole {"Width", "Height"} objects')
        if self.resize is not None:  # without a terminal sizes mean nothing; the kubelet
            await self.resize.deliver(data)  # takes them from any session too

    def abandon(self) -> None:
        for channel in (self.stdin, self.resize):
            if channel is not None:
                channel.abandon()


# ---- port-forward over channels ----


async def _serve_port_channels(
    websocket: _WebSocket, connect: Connector, ports: Sequence[int]
) -> None:
    inputs = [_Inbound(websocket.limits.max_buffered) for _ in ports]

    async def on_message(message: bytes) -> None:
        if not message:
            return  # no channel byte, nothing to route
        channel, data = message[0], message[1:]
        if channel == CLOSE_SIGNAL:
            _close_signal_target(data, 2 * len(ports))  # v4: well-formed, then ignored
        elif channel % 2 == 0 and channel // 2 < len(ports):
            await inputs[channel // 2].deliver(data)
        else:
            raise _Malformed(f"a message on channel {channel}, which this session does not read")

    websocket.start(on_message)
    try:
        for index, port in enumerate(ports):
            for channel in (2 * index, 2 * index + 1):
                await websocket.send(bytes([channel]) + port.to_bytes(2, "little"))
    except ConnectionError:
        return
    forwarding = asyncio.create_task(_forward_all(websocket, ports, inputs, connect))
    client_gone = asyncio.create_task(websocket.wait_ended())
    try:  # the kubelet too ends the session with the last pair
        await asyncio.wait({forwarding, client_gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        client_gone.cancel()
        forwarding.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await forwarding
        for inbound in inputs:
            inbound.abandon()


async def _forward_all(
    websocket: _WebSocket, ports: Sequence[int], inputs: list[_Inbound], connect: Connector
) -> None:
    pairs = (_forward_pair(websocket, i, port, inputs[i], connect) for i, port in enumerate(ports))
    for failure in await asyncio.gather(*pairs, return_exceptions=True):
        if isinstance(failure, Exception):  # a bug in one pair must not end the server
            log.error("port-forward pair failed: %s", failure, exc_info=failure)


async def _forward_pair(
    websocket: _WebSocket, index: int, port: int, inbound: _Inbound, connect: Connector
) -> None:
    """One port's connection: its bytes both ways on the data channel, a failure to connect
    as text on the error channel. Ends when the port hangs up or the client goes."""
    data, error = _Outbound(websocket, 2 * index), _Outbound(websocket, 2 * index + 1)
    try:
        target_reader, target_writer = await connect(port)
    except Exception as exc:  # whatever the caller raises is the client's error message
        with contextlib.suppress(StreamReset):
            await error.write(f"error forwarding port {port}: {exc}".encode())
        return
    upstream = asyncio.create_task(_client_to_port(inbound, target_writer))
    try:
        with contextlib.suppress(ConnectionError, StreamReset):
            while chunk := await target_reader.read(_CHUNK):
                await data.write(chunk)
    finally:
        upstream.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await upstream
        target_writer.close()
        with contextlib.suppress(ConnectionError):
            await target_writer.wait_closed()


async def _client_to_port(inbound: _Inbound, target: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):  # the port hung up: its reader sees that too
        while chunk := await inbound.read(_CHUNK):
            target.write(chunk)
            await target.drain()


# ---- port-forward through tunneled SPDY ----


async def _serve_tunnel(websocket: _WebSocket, connect: Connector) -> None:
    """The client's SPDY bytes arrive in binary messages, ours leave in them. A socket pair
    joins that to an ordinary SPDY connection (portforward.forward_ports): the kernel's
    buffers bound what is in flight each way, and SPDY sees the client's leaving as EOF."""
    ours, theirs = socket.socketpair()
    try:
        pipe_reader, pipe_writer = await asyncio.open_connection(sock=ours)
    except BaseException:
        ours.close()
        theirs.close()
        raise
    try:
        spdy_reader, spdy_writer = await asyncio.open_connection(sock=theirs)
    except BaseException:
        theirs.close()
        pipe_writer.close()
        raise

    async def into_spdy(message: bytes) -> None:
        pipe_writer.write(message)
        await pipe_writer.drain()

    websocket.start(into_spdy)
    outbound = asyncio.create_task(_out_of_spdy(pipe_reader, websocket), name="tunnel-out")
    hang_up = asyncio.create_task(_eof_when_ended(websocket, pipe_writer), name="tunnel-eof")
    try:
        async with Connection(spdy_reader, spdy_writer, role=Role.SERVER) as connection:
            await forward_ports(connection, connect)
    finally:
        hang_up.cancel()
        with contextlib.suppress(TimeoutError):  # what SPDY said last (its GOAWAY) goes out
            async with asyncio.timeout(websocket.limits.close_timeout):
                await asyncio.wait({outbound})
        outbound.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await outbound
        pipe_writer.close()
        spdy_writer.close()


async def _out_of_spdy(pipe: asyncio.StreamReader, websocket: _WebSocket) -> None:
    with contextlib.suppress(ConnectionError):
        while chunk := await pipe.read(_CHUNK):
            await websocket.send(chunk)


async def _eof_when_ended(websocket: _WebSocket, pipe: asyncio.StreamWriter) -> None:
    await websocket.wait_ended()
    with contextlib.suppress(ConnectionError, RuntimeError):
        pipe.write_eof()
