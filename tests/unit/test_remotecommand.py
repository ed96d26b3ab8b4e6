"""Kubernetes' streaming protocols (adapter/streaming): the HTTP/1.1 upgrade and subprotocol
negotiation, exec/attach sessions (remotecommand v4 down to channel.k8s.io) and port-forward.

The client side is built from the package's own SPDY client and behaves as client-go does: it
offers protocols in preference order, opens `error` first and then each channel, one at a time,
waiting for each reply, and hangs up once stdout, stderr and the error stream have ended."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from http import HTTPStatus

import pytest

from adapter.core.errors import InvalidArgument
from adapter.streaming import (
    Connection,
    ExecOptions,
    ExecStreams,
    Headers,
    HttpError,
    Limits,
    Role,
    Stream,
    StreamReset,
    TerminalSize,
    UpgradeRefused,
    UpgradeRequest,
    read_request,
    request_upgrade,
    serve_exec,
    serve_port_forward,
)
from adapter.streaming.upgrade import negotiate

Pipe = tuple[asyncio.StreamReader, asyncio.StreamWriter]
V4, V3, V2, V1 = "v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io", "channel.k8s.io"
CLIENT_GO_PROTOCOLS = (V4, V3, V2, V1)
LIMITS = Limits(close_timeout=2.0)


async def socket_pipe() -> tuple[Pipe, Pipe]:
    left, right = socket.socketpair()
    return await asyncio.open_connection(sock=left), await asyncio.open_connection(sock=right)


def request_bytes(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def parse(raw: bytes) -> UpgradeRequest:
    reader = asyncio.StreamReader()
    reader.feed_data(raw)
    reader.feed_eof()
    return await read_request(reader)


# ---- the request head and negotiation ----


async def test_the_upgrade_request_is_parsed() -> None:
    request = await parse(
        request_bytes(
            "POST /exec/abc?command=sh&tty=1 HTTP/1.1",
            "Host: 127.0.0.1:10010",
            "Connection: Upgrade",
            "Upgrade: SPDY/3.1",
            f"X-Stream-Protocol-Version: {V4}",
            f"x-stream-protocol-version: {V3}, {V2}",
            "Content-Length: 0",
        )
    )
    assert request.method == "POST" and request.path == "/exec/abc"
    assert request.query() == {"command": ["sh"], "tty": ["1"]}
    assert negotiate(request, (V2, V3)) == V3  # the client's order of preference decides


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (request_bytes("GET /exec/x"), HTTPStatus.BAD_REQUEST),
        (request_bytes("GET /exec/x HTTP/1.0"), HTTPStatus.BAD_REQUEST),
        (request_bytes("G@T /exec/x HTTP/1.1"), HTTPStatus.BAD_REQUEST),
        (request_bytes("GET /exec/x HTTP/1.1", "Bad Name: x"), HTTPStatus.BAD_REQUEST),
        (request_bytes("GET /exec/x HTTP/1.1", "A: b", " folded"), HTTPStatus.BAD_REQUEST),
        (request_bytes("GET /exec/x HTTP/1.1", "Content-Length: 5"), HTTPStatus.BAD_REQUEST),
        (request_bytes("GET /x HTTP/1.1", "Transfer-Encoding: chunked"), HTTPStatus.BAD_REQUEST),
        (request_bytes("GET /x HTTP/1.1", *[f"H{i}: {'v' * 90}" for i in range(200)]), 431),
        (b"\r\n\r\n", HTTPStatus.BAD_REQUEST),
    ],
)
async def test_malformed_or_oversized_heads_are_refused(raw: bytes, status: int) -> None:
    with pytest.raises(HttpError) as refused:
        await parse(raw)
    assert refused.value.status == status
    assert refused.value.response().startswith(f"HTTP/1.1 {status} ".encode())


async def test_a_client_hanging_up_mid_head_is_not_a_request() -> None:
    with pytest.raises(asyncio.IncompleteReadError):
        await parse(b"POST /exec/x HTTP/1.1\r\nHost: x")


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        (["Upgrade: SPDY/3.1", f"X-Stream-Protocol-Version: {V4}"], HTTPStatus.BAD_REQUEST),
        (["Connection: Upgrade", "Upgrade: h2c", f"X-Stream-Protocol-Version: {V4}"], 400),
        (["Connection: Upgrade", "Upgrade: SPDY/3.1"], HTTPStatus.BAD_REQUEST),
        (["Connection: Upgrade", "Upgrade: SPDY/3.1", "X-Stream-Protocol-Version: v5"], 403),
    ],
)
async def test_negotiation_failures(headers: list[str], status: int) -> None:
    request = await parse(request_bytes("POST /exec/x HTTP/1.1", *headers))
    with pytest.raises(HttpError) as refused:
        negotiate(request, CLIENT_GO_PROTOCOLS)
    assert refused.value.status == status
    if status == 403:  # the client learns what the server accepts
        assert ("X-Accepted-Stream-Protocol-Versions", V4) in refused.value.headers


def test_exec_options_follow_the_kubelet_rules() -> None:
    with pytest.raises(InvalidArgument) as tty_and_stderr:
        ExecOptions(stdin=False, stdout=True, stderr=True, tty=True)
    assert tty_and_stderr.value.field == "stderr"
    with pytest.raises(InvalidArgument):
        ExecOptions(stdin=False, stdout=False, stderr=False, tty=False)
    tty = ExecOptions(stdin=True, stdout=True, stderr=False, tty=True)
    assert tty.stream_types(V4) == {"error", "stdin", "stdout", "resize"}
    assert tty.stream_types(V2) == {"error", "stdin", "stdout"}  # no resizing before v3


# ---- exec sessions ----


class ExecClient:
    """client-go's remotecommand client, reduced to what the tests need."""

    def __init__(self, connection: Connection, protocol: str, streams: dict[str, Stream]) -> None:
        self.connection, self.protocol, self.streams = connection, protocol, streams

    @classmethod
    @contextlib.asynccontextmanager
    async def session(
        cls, pipe: Pipe, kinds: tuple[str, ...], protocols: tuple[str, ...] = CLIENT_GO_PROTOCOLS
    ) -> AsyncIterator[ExecClient]:
        protocol = await request_upgrade(*pipe, "/exec/token", protocols)
        async with Connection(*pipe, role=Role.CLIENT, limits=LIMITS) as connection:
            streams = {}
            for kind in kinds:  # one at a time, each waiting for its reply
                streams[kind] = await connection.open_stream(Headers({"streamType": kind}))
            yield cls(connection, protocol, streams)

    async def output(self, kind: str) -> bytes:
        received = b""
        while chunk := await self.streams[kind].read():
            received += chunk
        return received


async def start_server(
    pipe: Pipe,
    options: ExecOptions,
    run: Callable[[ExecStreams], Awaitable[int]],
    stream_timeout: float = 30.0,
) -> asyncio.Task[int | None]:
    async def serve() -> int | None:
        request = await read_request(pipe[0])
        return await serve_exec(
            *pipe, request, options, run, stream_timeout=stream_timeout, limits=LIMITS
        )

    return asyncio.create_task(serve())


async def echo_then_exit(code: int, streams: ExecStreams) -> int:
    assert streams.stdin is not None and streams.stdout is not None
    while chunk := await streams.stdin.read():
        await streams.stdout.write(chunk)
    if streams.stderr is not None:
        await streams.stderr.write(b"to stderr")
    return code


ALL = ExecOptions(stdin=True, stdout=True, stderr=True, tty=False)


async def test_exec_echoes_stdin_and_reports_a_non_zero_exit_code() -> None:
    server_pipe, client_pipe = await socket_pipe()
    serving = await start_server(server_pipe, ALL, lambda s: echo_then_exit(3, s))
    async with ExecClient.session(client_pipe, ("error", "stdin", "stdout", "stderr")) as client:
        assert client.protocol == V4
        await client.streams["stdin"].write(b"hello, " * 20_000)  # beyond one 64 KiB window
        await client.streams["stdin"].close()
        assert await client.output("stdout") == b"hello, " * 20_000
        assert await client.output("stderr") == b"to stderr"
        status = json.loads(await client.output("error"))
    assert status == {
        "metadata": {},
        "status": "Failure",
        "message": "command terminated with non-zero exit code: exit status 3",
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": "3"}]},
    }
    assert await asyncio.wait_for(serving, 10) == 3


async def test_exec_success_is_a_success_status() -> None:
    server_pipe, client_pipe = await socket_pipe()
    options = ExecOptions(stdin=True, stdout=True, stderr=False, tty=False)
    serving = await start_server(server_pipe, options, lambda s: echo_then_exit(0, s))
    async with ExecClient.session(client_pipe, ("error", "stdin", "stdout")) as client:
        await client.streams["stdin"].close()
        assert await client.output("stdout") == b""
        assert json.loads(await client.output("error")) == {"metadata": {}, "status": "Success"}
    assert await asyncio.wait_for(serving, 10) == 0


async def test_a_failing_runner_is_an_internal_error_for_the_client() -> None:
    async def broken(streams: ExecStreams) -> int:
        raise RuntimeError("no such process")

    server_pipe, client_pipe = await socket_pipe()
    options = ExecOptions(stdin=False, stdout=True, stderr=False, tty=False)
    serving = await start_server(server_pipe, options, broken)
    async with ExecClient.session(client_pipe, ("error", "stdout")) as client:
        status = json.loads(await client.output("error"))
    assert status["status"] == "Failure" and status["reason"] == "InternalError"
    assert status["code"] == 500 and "no such process" in status["message"]
    assert await asyncio.wait_for(serving, 10) is None


@pytest.mark.parametrize(("code", "text"), [(0, b""), (7, b"exit status 7")])
async def test_older_protocols_get_the_failure_as_text(code: int, text: bytes) -> None:
    server_pipe, client_pipe = await socket_pipe()
    options = ExecOptions(stdin=True, stdout=True, stderr=False, tty=False)
    serving = await start_server(server_pipe, options, lambda s: echo_then_exit(code, s))
    kinds = ("error", "stdin", "stdout")
    async with ExecClient.session(client_pipe, kinds, protocols=(V2,)) as client:
        assert client.protocol == V2
        await client.streams["stdin"].close()
        error = await client.output("error")
    assert error.endswith(text) and (code != 0 or error == b"")
    assert await asyncio.wait_for(serving, 10) == code


async def test_a_terminal_session_receives_resizes() -> None:
    async def follow_resizes(streams: ExecStreams) -> int:
        assert streams.tty and streams.stderr is None and streams.stdout is not None
        sizes = [size async for size in streams.resizes()]
        await streams.stdout.write(json.dumps([[s.width, s.height] for s in sizes]).encode())
        return 0

    server_pipe, client_pipe = await socket_pipe()
    options = ExecOptions(stdin=False, stdout=True, stderr=False, tty=True)
    serving = await start_server(server_pipe, options, follow_resizes)
    async with ExecClient.session(client_pipe, ("error", "stdout", "resize")) as client:
        resize = client.streams["resize"]
        await resize.write(b'{"Width":80,"Height":24}\n{"width":1')  # split mid-message
        await resize.write(b'00,"height":40}\n')
        await resize.close()
        assert json.loads(await client.output("stdout")) == [[80, 24], [100, 40]]
    assert await asyncio.wait_for(serving, 10) == 0


async def test_a_malformed_resize_ends_resizing_not_the_session() -> None:
    sizes: list[TerminalSize] = []

    async def follow(streams: ExecStreams) -> int:
        sizes.extend([size async for size in streams.resizes()])
        return 0

    server_pipe, client_pipe = await socket_pipe()
    options = ExecOptions(stdin=False, stdout=True, stderr=False, tty=True)
    serving = await start_server(server_pipe, options, follow)
    async with ExecClient.session(client_pipe, ("error", "stdout", "resize")) as client:
        await client.streams["resize"].write(b'{"Width":80,"Height":24}{"Width":-1,"Height":2}')
        assert json.loads(await client.output("error"))["status"] == "Success"
    assert sizes == [TerminalSize(80, 24)]
    assert await asyncio.wait_for(serving, 10) == 0


async def test_a_refused_protocol_is_a_403_and_no_session() -> None:
    server_pipe, client_pipe = await socket_pipe()
    serving = await start_server(server_pipe, ALL, lambda s: echo_then_exit(0, s))
    with pytest.raises(UpgradeRefused) as refused:
        await request_upgrade(*client_pipe, "/exec/token", ("v5.channel.k8s.io",))
    assert refused.value.status == 403
    assert await asyncio.wait_for(serving, 10) is None
    client_pipe[1].close()


async def test_streams_not_opened_in_time_end_the_session() -> None:
    ran = False

    async def run(streams: ExecStreams) -> int:
        nonlocal ran
        ran = True
        return 0

    server_pipe, client_pipe = await socket_pipe()
    serving = await start_server(server_pipe, ALL, run, stream_timeout=0.3)
    async with ExecClient.session(client_pipe, ("error", "stdout")) as client:
        with pytest.raises(StreamReset):
            await client.output("error")
    assert await asyncio.wait_for(serving, 10) is None
    assert not ran


async def test_an_unexpected_stream_is_refused() -> None:
    server_pipe, client_pipe = await socket_pipe()
    options = ExecOptions(stdin=False, stdout=True, stderr=False, tty=False)
    serving = await start_server(server_pipe, options, lambda s: echo_then_exit(0, s))
    with pytest.raises(StreamReset):
        async with ExecClient.session(client_pipe, ("error", "stdin")):
            pass
    assert await asyncio.wait_for(serving, 10) is None


async def test_the_runner_is_cancelled_when_the_client_goes_away() -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def wait_forever(streams: ExecStreams) -> int:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()  # where the real runner kills the process
            raise
        return 0

    server_pipe, client_pipe = await socket_pipe()
    serving = await start_server(server_pipe, ALL, wait_forever)
    async with ExecClient.session(client_pipe, ("error", "stdin", "stdout", "stderr")) as client:
        await asyncio.wait_for(started.wait(), 10)
        await client.connection.abort()
    assert await asyncio.wait_for(serving, 10) is None
    assert cancelled.is_set()


async def test_cancelling_a_session_cancels_the_runner_and_drops_the_client_at_once() -> None:
    """The service shutting down must not wait out the graceful close for each session."""
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def wait_forever(streams: ExecStreams) -> int:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()
        return 0

    server_pipe, client_pipe = await socket_pipe()
    serving = await start_server(server_pipe, ALL, wait_forever)
    async with ExecClient.session(client_pipe, ("error", "stdin", "stdout", "stderr")) as client:
        await asyncio.wait_for(started.wait(), 10)
        serving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(serving, LIMITS.close_timeout / 2)
        assert cancelled.is_set()
        with pytest.raises(StreamReset):
            await client.output("stdout")


# ---- port-forward ----


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


async def connect_loopback(port: int) -> Pipe:
    return await asyncio.open_connection("127.0.0.1", port)


@contextlib.asynccontextmanager
async def port_forward_session(
    connect: Callable[[int], Awaitable[Pipe]], stream_timeout: float = 30.0
) -> AsyncIterator[Connection]:
    server_pipe, client_pipe = await socket_pipe()

    async def serve() -> None:
        request = await read_request(server_pipe[0])
        await serve_port_forward(
            *server_pipe, request, connect, stream_timeout=stream_timeout, limits=LIMITS
        )

    serving = asyncio.create_task(serve())
    assert await request_upgrade(*client_pipe, "/portforward/t", ("portforward.k8s.io",))
    async with Connection(*client_pipe, role=Role.CLIENT, limits=LIMITS) as connection:
        yield connection
        await connection.abort()
    await asyncio.wait_for(serving, 10)


async def open_pair(connection: Connection, port: int, request_id: str) -> tuple[Stream, Stream]:
    """As client-go does: the error stream first (closed at once), then the data stream."""
    headers = {"port": str(port), "requestID": request_id}
    error = await connection.open_stream(Headers({**headers, "streamType": "error"}))
    await error.close()
    data = await connection.open_stream(Headers({**headers, "streamType": "data"}))
    return error, data


async def read_all(stream: Stream) -> bytes:
    received = b""
    while chunk := await stream.read():
        received += chunk
    return received


async def test_port_forward_through_a_loopback_echo_server(echo_port: int) -> None:
    async def exchange(error: Stream, data: Stream, message: bytes) -> tuple[bytes, bytes]:
        async def send() -> None:
            await data.write(message)
            await data.close()  # the echo server answers the rest, then hangs up

        echoed, _ = await asyncio.gather(read_all(data), send())  # both ways at once
        return echoed, await read_all(error)

    async with port_forward_session(connect_loopback) as connection:
        pairs = [await open_pair(connection, echo_port, str(n)) for n in range(3)]
        messages = [f"ping {n} ".encode() * 30_000 for n in range(3)]  # 3 x 210 KB at once
        results = await asyncio.gather(*map(exchange, *zip(*pairs, strict=True), messages))
        assert results == [(message, b"") for message in messages]


async def test_a_port_that_cannot_be_reached_is_reported_on_the_error_stream() -> None:
    async def refuse(port: int) -> Pipe:
        raise ConnectionRefusedError(f"nothing listens on {port}")

    async with port_forward_session(refuse) as connection:
        error, data = await open_pair(connection, 5000, "0")
        assert await read_all(error) == b"error forwarding port 5000: nothing listens on 5000"
        assert await read_all(data) == b""


@pytest.mark.parametrize("port", ["0", "65536", "http", None])
async def test_streams_without_a_valid_port_are_refused(port: str | None) -> None:
    async with port_forward_session(connect_loopback) as connection:
        headers = {"streamType": "data", "requestID": "1"} | ({"port": port} if port else {})
        with pytest.raises(StreamReset):
            await connection.open_stream(Headers(headers))


async def test_a_pair_left_incomplete_times_out_with_an_error() -> None:
    async with port_forward_session(connect_loopback, stream_timeout=0.3) as connection:
        headers = Headers({"port": "80", "requestID": "9", "streamType": "error"})
        error = await connection.open_stream(headers)
        assert b"timed out waiting for the streams of request 9" in await read_all(error)
