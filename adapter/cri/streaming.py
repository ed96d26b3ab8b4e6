"""The CRI's streaming server: Exec, Attach and PortForward answer with a URL here, and the
kubelet (or crictl, critest) then speaks Kubernetes' streaming protocols to it over HTTP
upgraded to SPDY/3.1 or, for the clients that ask for it, WebSocket (adapter/streaming/).

Each URL carries a single-use token for one request the CRI call checked (the container runs,
the command is not empty, the channels make sense); it expires after TOKEN_TTL seconds, as the
kubelet's own cache does. The server listens on loopback by default (`cri_streaming_address`):
what reaches it can run commands in containers, and the tokens are all that stands in the way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

from adapter.core.containerizer import Containerizer
from adapter.core.errors import ContainerizerError, InvalidArgument
from adapter.runtimes.base import AttachSession, ExecSession
from adapter.server.netns import open_connection
from adapter.streaming import portforward, remotecommand, websocket
from adapter.streaming.remotecommand import ExecOptions, ExecOutput, ExecStreams
from adapter.streaming.spdy_stream import StreamReset
from adapter.streaming.upgrade import HttpError, UpgradeRequest, error_response, read_request

log = logging.getLogger(__name__)

TOKEN_TTL = 60.0
MAX_PENDING = 1024  # tokens not yet used: a client asking for URLs it never opens is bounded
READ_CHUNK = 32 * 1024

SessionStarter = Callable[[], Awaitable[ExecSession]]
AttachStarter = Callable[[], Awaitable[AttachSession]]


@dataclass(frozen=True)
class _Pending:
    kind: str  # "exec", "attach" or "portforward"
    expires: float
    options: ExecOptions | None = None
    start: SessionStarter | None = None
    attach: AttachStarter | None = None
    netns: str | None = None  # portforward: the pod's network namespace (None: the host's)
    ports: tuple[int, ...] = ()


@dataclass
class StreamingServer:
    core: Containerizer
    host: str = "127.0.0.1"
    port: int = 0
    _pending: dict[str, _Pending] = field(default_factory=dict)
    _server: asyncio.Server | None = None
    _sessions: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    # ---- URLs, handed out by the CRI calls ----

    def exec_url(self, container_id: str, argv: tuple[str, ...], options: ExecOptions) -> str:
        async def start() -> ExecSession:
            return await self.core.exec_stream(container_id, argv, tty=options.tty)

        return self._url(_Pending("exec", time.monotonic() + TOKEN_TTL, options, start))

    def attach_url(self, container_id: str, options: ExecOptions) -> str:
        async def attach() -> AttachSession:
            return await self.core.attach(
                container_id, stdout=options.stdout, stderr=options.stderr
            )

        expires = time.monotonic() + TOKEN_TTL
        return self._url(_Pending("attach", expires, options, attach=attach))

    def port_forward_url(self, netns: str | None, ports: tuple[int, ...]) -> str:
        pending = _Pending("portforward", time.monotonic() + TOKEN_TTL, netns=netns, ports=ports)
        return self._url(pending)

    def _url(self, pending: _Pending) -> str:
        self._expire()
        if len(self._pending) >= MAX_PENDING:
            raise ContainerizerError("too many streaming requests waiting: try again")
        token = secrets.token_urlsafe(24)
        self._pending[token] = pending
        return f"{self.base_url}/{pending.kind}/{token}"

    def _expire(self) -> None:
        now = time.monotonic()
        for token in [t for t, p in self._pending.items() if p.expires < now]:
            del self._pending[token]

    def _take(self, target: str) -> _Pending:
        kind, _, token = urlsplit(target).path.strip("/").partition("/")
        self._expire()
        pending = self._pending.pop(token, None)
        if pending is None or pending.kind != kind:
            raise HttpError(HTTPStatus.NOT_FOUND, "unknown or expired streaming URL")
        return pending

    # ---- connections ----

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._sessions.add(task)
        try:
            request = await read_request(reader)
            await self._dispatch(reader, writer, request, self._take(request.target))
        except HttpError as exc:
            writer.write(exc.response())
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:
            log.exception("streaming connection failed")
            with contextlib.suppress(ConnectionError, RuntimeError):
                writer.write(error_response(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error"))
        finally:
            writer.close()
            self._sessions.discard(task)

    async def _dispatch(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        request: UpgradeRequest,
        pending: _Pending,
    ) -> None:
        """WebSocket when the client asks for it, SPDY otherwise; the same runner for both."""
        over_websocket = websocket.is_websocket_request(request)
        if pending.kind == "portforward":
            connect = self._connector(pending)
            if over_websocket:
                await websocket.serve_port_forward_websocket(
                    reader, writer, request, connect, ports=pending.ports
                )
            else:
                await portforward.serve_port_forward(reader, writer, request, connect)
            return
        assert pending.options is not None
        if pending.attach is not None:
            runner = _attach_runner(pending.attach)
        else:
            assert pending.start is not None
            runner = _runner(pending.start)
        if over_websocket:
            await websocket.serve_exec_websocket(reader, writer, request, pending.options, runner)
        else:
            await remotecommand.serve_exec(reader, writer, request, pending.options, runner)

    def _connector(
        self, pending: _Pending
    ) -> Callable[[int], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]:
        async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            if pending.ports and port not in pending.ports:
                raise InvalidArgument("port", f"{port} was not among the ports asked for")
            return await open_connection(pending.netns, port)

        return connect

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._sessions):
            task.cancel()
        self._pending.clear()


def _runner(start: SessionStarter) -> Callable[[ExecStreams], Awaitable[int]]:
    """The remotecommand runner: the session's output to the client's streams, the client's
    stdin and resizes to the session, and its exit code. Cancelled (the client went away), it
    kills the command."""

    async def run(streams: ExecStreams) -> int:
        session = await start()
        tasks = [asyncio.create_task(_pump_stdin(streams, session))]
        tasks.append(asyncio.create_task(_pump_resizes(streams, session)))
        try:
            await asyncio.gather(
                _pump_output(session, 1, streams.stdout), _pump_output(session, 2, streams.stderr)
            )
            return await session.wait()
        finally:
            for task in tasks:
                task.cancel()
            session.kill()
            session.close()

    return run


def _attach_runner(attach: AttachStarter) -> Callable[[ExecStreams], Awaitable[int]]:
    """Attach: the container's output from now on to the client, the client's input to the
    container. It ends when the container's output ends, or when the client's input does (the
    client is done; the container runs on): status 0 either way."""

    async def run(streams: ExecStreams) -> int:
        session = await attach()
        stdin = asyncio.create_task(_pump_stdin(streams, session))
        resizes = asyncio.create_task(_pump_resizes(streams, session))
        output = asyncio.gather(
            _pump_output(session, 1, streams.stdout), _pump_output(session, 2, streams.stderr)
        )
        waited: set[asyncio.Future[Any]] = {output}
        if streams.stdin is not None:
            waited.add(stdin)
        try:
            await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
            return 0
        finally:
            for task in (stdin, resizes, output):
                task.cancel()
            session.close()

    return run


async def _pump_stdin(streams: ExecStreams, session: ExecSession | AttachSession) -> None:
    """The client's input, then its end (also when the client resets the stream)."""
    try:
        if streams.stdin is not None:
            while data := await streams.stdin.read(READ_CHUNK):
                await session.write(data)
    except StreamReset:
        pass
    finally:
        session.close_stdin()


async def _pump_resizes(streams: ExecStreams, session: ExecSession | AttachSession) -> None:
    async for size in streams.resizes():
        session.resize(size.width, size.height)


async def _pump_output(
    session: ExecSession | AttachSession, which: int, target: ExecOutput | None
) -> None:
    """Everything the command writes on one stream; dropped when the client did not ask for it
    (reading it anyway keeps the command from blocking on a full pipe)."""
    while chunk := await session.read(which):
        if target is not None:
            await target.write(chunk)
