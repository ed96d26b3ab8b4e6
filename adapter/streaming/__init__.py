"""Kubernetes' streaming protocols, for the CRI streaming server: exec, attach and port-forward
over HTTP/1.1 upgraded to SPDY/3.1, as the kubelet, crictl and critest (client-go) speak them,
or to WebSocket, as newer clients do.

Layers, each usable on its own:

    frames.py         SPDY/3.1 frame codec; zlib header blocks with the SPDY/3 dictionary
    spdy.py           Connection and Stream: one SPDY/3.1 session over asyncio streams
    upgrade.py        the HTTP/1.1 request head (bounded), subprotocol negotiation, 101 / errors
    remotecommand.py  exec and attach: v4/v3/v2.channel.k8s.io and channel.k8s.io
    portforward.py    portforward.k8s.io
    websocket.py      the same over WebSocket: v5/v4.channel.k8s.io, SPDY/3.1+portforward.k8s.io
                      (the handshake and the services), websocket_connection.py (one open
                      WebSocket, its channels' ends), websocket_channels.py (the channel
                      protocols: exec, port-forward over channels or tunneled SPDY)

A streaming server runs one task per accepted TCP connection, reads the request head, finds
the cached CRI request by the token in its path, and hands the connection over:

    async def handle(reader, writer):
        try:
            request = await read_request(reader)
        except HttpError as exc:                      # malformed or over 16 KiB: 400/431
            writer.write(exc.response())
            writer.close()
            return
        except asyncio.IncompleteReadError:           # the client hung up first
            writer.close()
            return
        kind, token = parse(request.path)             # e.g. /exec/<token>; unknown: answer
        ...                                           # HttpError(HTTPStatus.NOT_FOUND, ...)
        if kind in ("exec", "attach"):
            options = ExecOptions(stdin=..., stdout=..., stderr=..., tty=...)

            async def run(streams: ExecStreams) -> int:
                # Start the process; copy streams.stdin (read() until b"") to it and its
                # output to streams.stdout / streams.stderr (write()); follow
                # `async for size in streams.resizes()` for a tty; return the exit code
                # (attach: 0). Cancelled when the client goes away: kill the process there.
                ...

            await serve_exec(reader, writer, request, options, run)
        else:
            async def connect(port: int) -> tuple[StreamReader, StreamWriter]:
                ...                                   # a connection inside the sandbox netns

            await serve_port_forward(reader, writer, request, connect)

serve_exec and serve_port_forward own the connection from then on and close it before they
return; neither raises for anything the client does. The status the exec client receives
(Success; Failure/NonZeroExitCode with the code; InternalError when `run` raises) is described
in remotecommand.py. Flow control toward client-go peers, which ignore SPDY windows, is
described in spdy.py.

A request with `Upgrade: websocket` (is_websocket_request) goes to serve_exec_websocket and
serve_port_forward_websocket instead, with the same runner and connect: the runner's streams
are then WebSocket channels (ExecInput, ExecOutput), and port-forward over channels takes its
ports from the caller (the CRI request) or the URL's query.
"""

from adapter.streaming.frames import Headers, ProtocolError, RstStatus
from adapter.streaming.portforward import Connector, serve_port_forward
from adapter.streaming.remotecommand import (
    ExecInput,
    ExecOptions,
    ExecOutput,
    ExecStreams,
    Runner,
    TerminalSize,
    serve_exec,
)
from adapter.streaming.spdy import Connection, Limits, Role
from adapter.streaming.spdy_stream import ConnectionClosed, Stream, StreamReset
from adapter.streaming.upgrade import (
    HttpError,
    UpgradeRefused,
    UpgradeRequest,
    read_request,
    request_upgrade,
)
from adapter.streaming.websocket import (
    WebSocketLimits,
    is_websocket_request,
    serve_exec_websocket,
    serve_port_forward_websocket,
)

__all__ = [
    "Connection",
    "ConnectionClosed",
    "Connector",
    "ExecInput",
    "ExecOptions",
    "ExecOutput",
    "ExecStreams",
    "Headers",
    "HttpError",
    "Limits",
    "ProtocolError",
    "Role",
    "RstStatus",
    "Runner",
    "Stream",
    "StreamReset",
    "TerminalSize",
    "UpgradeRefused",
    "UpgradeRequest",
    "WebSocketLimits",
    "is_websocket_request",
    "read_request",
    "request_upgrade",
    "serve_exec",
    "serve_exec_websocket",
    "serve_port_forward",
    "serve_port_forward_websocket",
]
