"""The server side of Kubernetes' port-forward protocol (`portforward.k8s.io`) over SPDY/3.1.

Each forwarded connection is a pair of streams the client opens with the same `requestID`
header and a `port` header: `streamType: error` and `streamType: data`. Once both are there the
server connects to the port, copies bytes both ways on the data stream, and writes a connection
error, if any, as text on the error stream. The client hangs up its side of a pair only after
the error stream ends, so that stream is closed as soon as the port's side is done. A pair whose
second stream does not come within the timeout gets an error and is dropped. Many pairs share
one connection; each runs in its own task, all of them ended when the connection ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from adapter.streaming.frames import RstStatus
from adapter.streaming.spdy import Connection, Limits, Role
from adapter.streaming.spdy_stream import ConnectionClosed, Stream, StreamReset
from adapter.streaming.upgrade import UpgradeRequest, accept_upgrade

log = logging.getLogger(__name__)

PROTOCOL = "portforward.k8s.io"
PROTOCOLS = (PROTOCOL,)
PORT_HEADER = "port"
REQUEST_ID_HEADER = "requestid"
STREAM_TYPE_HEADER = "streamtype"
DEFAULT_STREAM_TIMEOUT = 30.0
_COPY_CHUNK = 32 * 1024

Connector = Callable[[int], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


async def serve_port_forward(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    request: UpgradeRequest,
    connect: Connector,
    *,
    stream_timeout: float = DEFAULT_STREAM_TIMEOUT,
    limits: Limits | None = None,
) -> None:
    """Serve one port-forward connection until the client hangs up.

    `connect(port)` opens the port inside the container (the caller resolves the container and
    its network namespace) and returns the connection's reader and writer; what it raises is
    written on the pair's error stream, prefixed with the port, and the client reports it.
    """
    if await accept_upgrade(writer, request, PROTOCOLS) is None:
        writer.close()
        return
    async with Connection(reader, writer, role=Role.SERVER, limits=limits) as connection:
        await forward_ports(connection, connect, stream_timeout=stream_timeout)


async def forward_ports(
    connection: Connection, connect: Connector, *, stream_timeout: float = DEFAULT_STREAM_TIMEOUT
) -> None:
    """Serve the client's stream pairs on a started SPDY connection until it ends: the
    session of serve_port_forward, or one tunneled through a WebSocket (websocket_channels.py)."""
    await _PortForwarder(connection, connect, stream_timeout).run()


@dataclass
class _Pair:
    request_id: str
    port: int
    error: Stream | None = None
    data: Stream | None = None
    expiry: asyncio.TimerHandle | None = None


class _PortForwarder:
    def __init__(self, connection: Connection, connect: Connector, timeout: float) -> None:
        self._connection = connection
        self._connect = connect
        self._timeout = timeout
        self._pairs: dict[str, _Pair] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        try:
            while (stream := await self._connection.accept()) is not None:
                with contextlib.suppress(StreamReset):  # that stream is gone, not the others
                    await self._admit(stream)
        finally:
            for pair in self._pairs.values():
                if pair.expiry is not None:
                    pair.expiry.cancel()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _admit(self, stream: Stream) -> None:
        """Check the headers (the kubelet's rules), reply, and file the stream in its pair."""
        kind = stream.headers.first(STREAM_TYPE_HEADER)
        port = _port(stream.headers.first(PORT_HEADER))
        if kind not in ("error", "data") or port is None:
            log.warning("refusing a port-forward stream: type %r, port %r", kind, port)
            await stream.reset(RstStatus.REFUSED_STREAM)
            return
        await stream.reply()
        request_id = stream.headers.first(REQUEST_ID_HEADER) or _legacy_request_id(stream, kind)
        pair = self._pairs.get(request_id)
        if pair is None:
            pair = self._pairs[request_id] = _Pair(request_id, port)
            pair.expiry = asyncio.get_running_loop().call_later(
                self._timeout, lambda: self._spawn(self._expire(pair))
            )
        if getattr(pair, kind) is not None:
            await _tell(pair.error, f"request {request_id}: {kind} stream already assigned")
            await stream.reset(RstStatus.PROTOCOL_ERROR)
            return
        setattr(pair, kind, stream)
        if pair.error is not None and pair.data is not None:
            del self._pairs[request_id]
            if pair.expiry is not None:
                pair.expiry.cancel()
            self._spawn(self._forward(pair, pair.error, pair.data))

    def _spawn(self, work: Awaitable[None]) -> None:
        async def supervised() -> None:
            try:
                await work
            except (StreamReset, ConnectionClosed):
                pass  # the client went away: nothing left to tell it
            except Exception:
                log.exception("port-forward pair failed")

        task = asyncio.create_task(supervised(), name="port-forward-pair")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _expire(self, pair: _Pair) -> None:
        if self._pairs.get(pair.request_id) is not pair:
            return
        del self._pairs[pair.request_id]
        await _fail(pair.error, f"timed out waiting for the streams of request {pair.request_id}")
        if pair.data is not None:
            await pair.data.reset(RstStatus.CANCEL)

    async def _forward(self, pair: _Pair, error: Stream, data: Stream) -> None:
        try:
            target_reader, target_writer = await self._connect(pair.port)
        except Exception as exc:  # whatever the caller raises is the client's error message
            await _fail(error, f"error forwarding port {pair.port}: {exc}")
            await data.close()
            return
        upstream = asyncio.create_task(_client_to_port(data, target_writer))
        try:
            await _port_to_client(target_reader, data)
            await error.close()  # the client waits for this before it hangs up its side
            await upstream
        finally:
            await end_forwarding(upstream, target_writer)
            with contextlib.suppress(StreamReset, ConnectionClosed):
                await error.close()
            await data.reset(RstStatus.CANCEL)  # a no-op once both sides closed it


async def end_forwarding(upstream: asyncio.Task[None], target: asyncio.StreamWriter) -> None:
    """One forwarded connection's end, whichever side ended it: the client-to-port copy stopped
    and the port's connection closed (SPDY's and WebSocket's port-forward alike)."""
    upstream.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await upstream
    target.close()
    with contextlib.suppress(ConnectionError):
        await target.wait_closed()


async def _client_to_port(data: Stream, target: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):  # the port hung up: its reader sees that too
        while chunk := await data.read(_COPY_CHUNK):
            target.write(chunk)
            await target.drain()
        if target.can_write_eof():
            target.write_eof()  # the client is done sending; the port may still answer


async def _port_to_client(target: asyncio.StreamReader, data: Stream) -> None:
    with contextlib.suppress(ConnectionError):
        while chunk := await target.read(_COPY_CHUNK):
            await data.write(chunk)
    await data.close()


async def _tell(error: Stream | None, message: str) -> None:
    if error is not None:
        with contextlib.suppress(StreamReset, ConnectionClosed):
            await error.write(message.encode())


async def _fail(error: Stream | None, message: str) -> None:
    """Report a pair's failure and end its error stream, which ends the pair for the client."""
    await _tell(error, message)
    if error is not None:
        with contextlib.suppress(StreamReset, ConnectionClosed):
            await error.close()


def _port(value: str | None) -> int | None:
    if value is None or not value.isdigit() or not 0 < int(value) <= 0xFFFF:
        return None
    return int(value)


def _legacy_request_id(stream: Stream, kind: str) -> str:
    """Clients older than the requestID header open error then data with consecutive odd ids;
    the kubelet pairs them by that, so we do too."""
    return str(stream.id if kind == "error" else stream.id - 2)
