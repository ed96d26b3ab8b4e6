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

This module is the front: the handshake (accept or refuse, the subprotocol, the ports) and the
two services. The connection is websocket_connection.py's, the channel protocols spoken over it
websocket_channels.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from http import HTTPStatus

from websockets.datastructures import Headers
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol

from adapter.streaming.portforward import Connector
from adapter.streaming.remotecommand import (
    ExecOptions,
    ExecStreams,
    Runner,
    exit_status,
    run_until_client_leaves,
)
from adapter.streaming.upgrade import HttpError, UpgradeRequest
from adapter.streaming.websocket_channels import (
    ERROR,
    STDERR,
    STDOUT,
    TUNNELED_PORT_FORWARD,
    V1,
    V4,
    V5,
    ExecChannels,
    serve_port_channels,
    serve_tunnel,
)
from adapter.streaming.websocket_connection import Outbound, WebSocket, WebSocketLimits

__all__ = [
    "TUNNELED_PORT_FORWARD",
    "V1",
    "V4",
    "V5",
    "WebSocketLimits",
    "is_websocket_request",
    "serve_exec_websocket",
    "serve_port_forward_websocket",
]

log = logging.getLogger(__name__)

EXEC_PROTOCOLS = (V5, V4, V1)
PORT_FORWARD_PROTOCOLS = (TUNNELED_PORT_FORWARD, V4)
MAX_PORTS = 127  # two channels each, numbered below the close signal


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
        channels = ExecChannels(options, websocket.subprotocol, limits)
        websocket.start(channels.on_message)
        streams = ExecStreams(
            stdin=channels.stdin,
            stdout=Outbound(websocket, STDOUT) if options.stdout else None,
            stderr=Outbound(websocket, STDERR) if options.stderr else None,
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
            await serve_tunnel(websocket, connect)
        else:
            await serve_port_channels(websocket, connect, ports)


# ---- the handshake ----


async def _accept(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    request: UpgradeRequest,
    subprotocol: str,
    limits: WebSocketLimits,
) -> WebSocket | None:
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
    return WebSocket(reader, writer, protocol, subprotocol, limits)


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
