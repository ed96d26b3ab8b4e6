"""The channel protocols spoken over one WebSocket (websocket_connection.py) once the handshake
(websocket.py) has chosen the subprotocol: the subprotocols' names and the channel numbers;
exec and attach (ExecChannels routes the client's messages: stdin, resizes, close signals);
port-forward over channels (serve_port_channels: a data and an error channel per port); and
port-forward through tunneled SPDY (serve_tunnel: the client's SPDY session carried in binary
messages, served by portforward.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Sequence

from adapter.streaming.portforward import Connector, end_forwarding, forward_ports
from adapter.streaming.remotecommand import ExecOptions, parse_sizes
from adapter.streaming.spdy import Connection, Role
from adapter.streaming.spdy_stream import StreamReset
from adapter.streaming.websocket_connection import (
    CHUNK,
    Inbound,
    Malformed,
    Outbound,
    WebSocket,
    WebSocketLimits,
)

log = logging.getLogger(__name__)

V5 = "v5.channel.k8s.io"
V4 = "v4.channel.k8s.io"
V1 = "channel.k8s.io"
TUNNELED_PORT_FORWARD = "SPDY/3.1+portforward.k8s.io"
STDIN, STDOUT, STDERR, ERROR, RESIZE = range(5)
CLOSE_SIGNAL = 255


# ---- exec and attach ----


def _close_signal_target(data: bytes, channels: int) -> int:
    if len(data) != 1 or data[0] >= channels:
        raise Malformed(f"a close signal names one channel below {channels}")
    return data[0]


class ExecChannels:
    """Routes an exec client's messages: stdin, resizes, close signals."""

    def __init__(self, options: ExecOptions, subprotocol: str, limits: WebSocketLimits) -> None:
        self.stdin = Inbound(limits.max_buffered) if options.stdin else None
        self.resize = Inbound(limits.max_buffered) if options.tty else None
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
            raise Malformed(f"a message on channel {channel}, which this session does not read")

    def _on_close_signal(self, channel: int) -> None:
        if not self._honours_close:
            return  # v4 has no close signal; client-go sends it anyway, the kubelet ignores it
        target = {STDIN: self.stdin, RESIZE: self.resize}.get(channel)
        if target is not None:  # closing a channel the client reads (client-go's Reset): no-op
            target.close()

    async def _on_resize(self, data: bytes) -> None:
        sizes, rest = parse_sizes(data)
        if not sizes or rest != b"":
            raise Malformed('a resize message holds whole {"Width", "Height"} objects')
        if self.resize is not None:  # without a terminal sizes mean nothing; the kubelet
            await self.resize.deliver(data)  # takes them from any session too

    def abandon(self) -> None:
        for channel in (self.stdin, self.resize):
            if channel is not None:
                channel.abandon()


# ---- port-forward over channels ----


async def serve_port_channels(
    websocket: WebSocket, connect: Connector, ports: Sequence[int]
) -> None:
    inputs = [Inbound(websocket.limits.max_buffered) for _ in ports]

    async def on_message(message: bytes) -> None:
        if not message:
            return  # no channel byte, nothing to route
        channel, data = message[0], message[1:]
        if channel == CLOSE_SIGNAL:
            _close_signal_target(data, 2 * len(ports))  # v4: well-formed, then ignored
        elif channel % 2 == 0 and channel // 2 < len(ports):
            await inputs[channel // 2].deliver(data)
        else:
            raise Malformed(f"a message on channel {channel}, which this session does not read")

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
    websocket: WebSocket, ports: Sequence[int], inputs: list[Inbound], connect: Connector
) -> None:
    pairs = (_forward_pair(websocket, i, port, inputs[i], connect) for i, port in enumerate(ports))
    for failure in await asyncio.gather(*pairs, return_exceptions=True):
        if isinstance(failure, Exception):  # a bug in one pair must not end the server
            log.error("port-forward pair failed: %s", failure, exc_info=failure)


async def _forward_pair(
    websocket: WebSocket, index: int, port: int, inbound: Inbound, connect: Connector
) -> None:
    """One port's connection: its bytes both ways on the data channel, a failure to connect
    as text on the error channel. Ends when the port hangs up or the client goes."""
    data, error = Outbound(websocket, 2 * index), Outbound(websocket, 2 * index + 1)
    try:
        target_reader, target_writer = await connect(port)
    except Exception as exc:  # whatever the caller raises is the client's error message
        with contextlib.suppress(StreamReset):
            await error.write(f"error forwarding port {port}: {exc}".encode())
        return
    upstream = asyncio.create_task(_client_to_port(inbound, target_writer))
    try:
        with contextlib.suppress(ConnectionError, StreamReset):
            while chunk := await target_reader.read(CHUNK):
                await data.write(chunk)
    finally:
        await end_forwarding(upstream, target_writer)


async def _client_to_port(inbound: Inbound, target: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):  # the port hung up: its reader sees that too
        while chunk := await inbound.read(CHUNK):
            target.write(chunk)
            await target.drain()


# ---- port-forward through tunneled SPDY ----


async def serve_tunnel(websocket: WebSocket, connect: Connector) -> None:
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


async def _out_of_spdy(pipe: asyncio.StreamReader, websocket: WebSocket) -> None:
    with contextlib.suppress(ConnectionError):
        while chunk := await pipe.read(CHUNK):
            await websocket.send(chunk)


async def _eof_when_ended(websocket: WebSocket, pipe: asyncio.StreamWriter) -> None:
    await websocket.wait_ended()
    with contextlib.suppress(ConnectionError, RuntimeError):
        pipe.write_eof()
