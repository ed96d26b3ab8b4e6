"""The WebSocket side of Kubernetes' streaming protocols (adapter/streaming/websocket.py):
exec and attach over v5/v4/channel.k8s.io, port-forward over channels and over tunneled SPDY.

The clients are the `websockets` library's, over loopback TCP to a server that reads the
request head as the CRI streaming server does; they behave as client-go's WebSocket executor
does (one binary message per write, the channel in the first byte, [255, n] to close n)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from adapter.streaming import (
    Connection,
    ExecOptions,
    ExecStreams,
    Headers,
    Role,
    Stream,
    TerminalSize,
    UpgradeRequest,
    WebSocketLimits,
    is_websocket_request,
    read_request,
    serve_exec_websocket,
    serve_port_forward_websocket,
)
from adapter.streaming.websocket import TUNNELED_PORT_FORWARD, V1, V4, V5
from adapter.streaming.websocket_connection import Inbound

Pipe = tuple[asyncio.StreamReader, asyncio.StreamWriter]
Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter, UpgradeRequest], Awaitable[object]]
LIMITS = WebSocketLimits(close_timeout=2.0)
ALL = ExecOptions(stdin=True, stdout=True, stderr=True, tty=False)
TTY = ExecOptions(stdin=True, stdout=True, stderr=False, tty=True)
STDIN, STDOUT, STDERR, ERROR, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255


@dataclass
class Served:
    port: int
    outcomes: asyncio.Queue[object]

    def url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    async def outcome(self) -> object:
        """What the serve function returned for the next connection (raised: re-raised)."""
        outcome = await asyncio.wait_for(self.outcomes.get(), 10)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


@contextlib.asynccontextmanager
async def streaming_server(serve: Serve) -> AsyncIterator[Served]:
    """A loopback server that reads the request head, then hands the connection to `serve`."""
    outcomes: asyncio.Queue[object] = asyncio.Queue()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await read_request(reader)
            outcomes.put_nowait(await serve(reader, writer, request))
        except Exception as exc:
            outcomes.put_nowait(exc)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield Served(server.sockets[0].getsockname()[1], outcomes)
    finally:
        server.close()
        await server.wait_closed()


def exec_server(options: ExecOptions, run: Callable[[ExecStreams], Awaitable[int]]) -> Serve:
    async def serve(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: UpgradeRequest
    ) -> object:
        return await serve_exec_websocket(reader, writer, request, options, run, limits=LIMITS)

    return serve


def client(served: Served, path: str, *protocols: str) -> connect:
    return connect(
        served.url(path),
        subprotocols=[Subprotocol(p) for p in protocols] or None,
        compression=None,
        proxy=None,
        open_timeout=5,
    )


async def received(websocket: ClientConnection) -> tuple[list[bytes], int | None]:
    """Every message until the server closes, and the close code it sent."""
    messages: list[bytes] = []
    try:
        while True:
            message = await asyncio.wait_for(websocket.recv(), 10)
            assert isinstance(message, bytes)
            messages.append(message)
    except ConnectionClosed as closed:
        return messages, closed.rcvd.code if closed.rcvd else None


def by_channel(messages: list[bytes]) -> dict[int, bytes]:
    channels: dict[int, bytes] = {}
    for message in messages:
        channels[message[0]] = channels.get(message[0], b"") + message[1:]
    return channels


async def echo_then_exit(code: int, streams: ExecStreams) -> int:
    assert streams.stdin is not None and streams.stdout is not None
    while chunk := await streams.stdin.read(65536):
        await streams.stdout.write(chunk)
    if streams.stderr is not None:
        await streams.stderr.write(b"to stderr")
    return code


# ---- exec ----


async def test_exec_echoes_stdin_and_reports_a_non_zero_exit_code() -> None:
    async with streaming_server(exec_server(ALL, lambda s: echo_then_exit(3, s))) as served:
        async with client(served, "/exec/t", V5, V4) as websocket:
            assert websocket.subprotocol == V5
            payload = b"hello, " * 40_000  # several messages' worth
            for start in range(0, len(payload), 32 * 1024):
                await websocket.send(bytes([STDIN]) + payload[start : start + 32 * 1024])
            await websocket.send(bytes([CLOSE, STDIN]))
            messages, code = await received(websocket)
        assert await served.outcome() == 3
    assert messages[0] == bytes([STDOUT])  # the empty "ready" message comes first
    channels = by_channel(messages)
    assert channels[STDOUT] == payload and channels[STDERR] == b"to stderr"
    assert json.loads(channels[ERROR]) == {
        "metadata": {},
        "status": "Failure",
        "message": "command terminated with non-zero exit code: exit status 3",
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": "3"}]},
    }
    assert code == 1000  # client-go reads every channel until a normal close


async def test_a_finished_command_is_a_success_status_and_a_failed_runner_an_internal_error() -> (
    None
):
    async def broken(streams: ExecStreams) -> int:
        raise RuntimeError("no such process")

    async with (
        streaming_server(exec_server(ALL, lambda s: echo_then_exit(0, s))) as served,
        client(served, "/exec/t", V5) as websocket,
    ):
        await websocket.send(bytes([CLOSE, STDIN]))
        messages, _ = await received(websocket)
    assert json.loads(by_channel(messages)[ERROR]) == {"metadata": {}, "status": "Success"}

    async with streaming_server(exec_server(ALL, broken)) as served:
        async with client(served, "/exec/t", V4) as websocket:
            messages, code = await received(websocket)
        assert await served.outcome() is None
    status = json.loads(by_channel(messages)[ERROR])
    assert status["reason"] == "InternalError" and status["code"] == 500
    assert "no such process" in status["message"] and code == 1000


async def test_a_tty_session_follows_resizes() -> None:
    sizes: list[TerminalSize] = []

    async def follow(streams: ExecStreams) -> int:
        assert streams.tty and streams.stderr is None and streams.stdout is not None
        async for size in streams.resizes():
            sizes.append(size)
            if len(sizes) == 3:
                break
        await streams.stdout.write(b"resized")
        return 0

    async with streaming_server(exec_server(TTY, follow)) as served:
        async with client(served, "/exec/t", V5) as websocket:
            await websocket.send(bytes([RESIZE]) + b'{"Width":80,"Height":24}\n')
            await websocket.send(
                bytes([RESIZE]) + b'{"width":100,"height":40}{"Width":1,"Height":2}'
            )
            messages, code = await received(websocket)
        assert await served.outcome() == 0
    assert sizes == [TerminalSize(80, 24), TerminalSize(100, 40), TerminalSize(1, 2)]
    assert by_channel(messages)[STDOUT] == b"resized" and code == 1000


@pytest.mark.parametrize(
    ("offered", "chosen"),
    [((V5, V4), V5), ((V4, V5), V4), ((V4,), V4), (("v9.channel.k8s.io", V1), V1)],
)
async def test_the_clients_preferred_subprotocol_is_chosen(
    offered: tuple[str, ...], chosen: str
) -> None:
    async def finish(streams: ExecStreams) -> int:
        return 0

    async with (
        streaming_server(exec_server(ALL, finish)) as served,
        client(served, "/exec/t", *offered) as websocket,
    ):
        assert websocket.subprotocol == chosen
        _, code = await received(websocket)
        assert code == 1000


async def test_no_common_subprotocol_is_refused_before_the_upgrade() -> None:
    async with streaming_server(exec_server(ALL, lambda s: echo_then_exit(0, s))) as served:
        with pytest.raises(InvalidStatus) as refused:
            async with client(served, "/exec/t", "v9.channel.k8s.io"):
                pass
        assert refused.value.response.status_code == 403
        assert await served.outcome() is None


@pytest.mark.parametrize("protocols", [(V1,), ()])
@pytest.mark.parametrize(
    ("code", "expected"),
    [(3, b"command terminated with non-zero exit code: exit status 3"), (0, None)],
)
async def test_older_protocols_carry_only_a_failures_text(
    protocols: tuple[str, ...], code: int, expected: bytes | None
) -> None:
    async def exit_with_code(streams: ExecStreams) -> int:
        return code

    async with (
        streaming_server(exec_server(ALL, exit_with_code)) as served,
        client(served, "/exec/t", *protocols) as websocket,
    ):
        assert websocket.subprotocol == (protocols[0] if protocols else None)
        messages, close_code = await received(websocket)
    assert by_channel(messages).get(ERROR) == expected and close_code == 1000


async def test_v4_ignores_the_close_signal_and_v5_takes_data_after_it_as_an_error() -> None:
    async def read_two(streams: ExecStreams) -> int:
        assert streams.stdin is not None and streams.stdout is not None
        received = b""
        while len(received) < 2 and (chunk := await streams.stdin.read(1)):
            received += chunk
        if received != b"ab":  # v5: stdin ended after "a"; the client's error ends us
            await asyncio.Event().wait()
        await streams.stdout.write(received)
        return 0

    async with streaming_server(exec_server(ALL, read_two)) as served:
        async with client(served, "/exec/t", V4) as websocket:
            for message in (b"\x00a", bytes([CLOSE, STDIN]), b"\x00b"):
                await websocket.send(message)
            messages, code = await received(websocket)
        assert await served.outcome() == 0
        assert by_channel(messages)[STDOUT] == b"ab" and code == 1000

        async with client(served, "/exec/t", V5) as websocket:
            for message in (b"\x00a", bytes([CLOSE, STDIN]), b"\x00b"):
                await websocket.send(message)
            _, code = await received(websocket)
        assert await served.outcome() is None  # the runner never finished: it was cancelled
        assert code == 1002


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("text", 1003),  # every message of these protocols is binary
        (bytes([7]) + b"x", 1002),  # no such channel
        (bytes([STDOUT]) + b"x", 1002),  # a channel only the server writes
        (bytes([CLOSE, STDIN, STDOUT]), 1002),  # a close signal names one channel
        (bytes([CLOSE, 9]), 1002),
        (bytes([RESIZE]) + b'{"Width": -1, "Height": 2}', 1002),
        (bytes([RESIZE]) + b'{"Width": 1', 1002),  # half a size
        (bytes([RESIZE]) + b"garbage", 1002),
        (bytes([STDIN]) + b"x" * 70_000, 1009),  # over the limit of these tests' server
    ],
)
async def test_a_malformed_message_closes_the_connection_and_cancels_the_runner(
    message: bytes | str, code: int
) -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def wait_forever(streams: ExecStreams) -> int:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return 0

    async def serve(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: UpgradeRequest
    ) -> object:
        limits = WebSocketLimits(max_message=64 * 1024, close_timeout=2.0)
        return await serve_exec_websocket(reader, writer, request, TTY, wait_forever, limits=limits)

    async with streaming_server(serve) as served:
        async with client(served, "/exec/t", V5) as websocket:
            await asyncio.wait_for(started.wait(), 10)
            await websocket.send(message)
            _, received_code = await received(websocket)
        assert await served.outcome() is None
    assert received_code == code and cancelled.is_set()


async def test_the_runner_is_cancelled_when_the_client_goes_away() -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def wait_forever(streams: ExecStreams) -> int:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return 0

    async with streaming_server(exec_server(ALL, wait_forever)) as served:
        async with client(served, "/exec/t", V5):
            await asyncio.wait_for(started.wait(), 10)
        assert await served.outcome() is None
    assert cancelled.is_set()

    async with streaming_server(exec_server(ALL, wait_forever)) as served:
        _, writer = await raw_upgrade(served.port, "/exec/t", V5)
        writer.transport.abort()  # gone without a closing handshake
        assert await served.outcome() is None


async def test_a_channels_buffer_is_bounded_until_it_is_read() -> None:
    inbound = Inbound(bound=8)
    await inbound.deliver(b"12345678")
    blocked = asyncio.create_task(inbound.deliver(b"9"))
    await asyncio.sleep(0.05)
    assert not blocked.done()  # the socket is not read meanwhile
    assert await inbound.read(4) == b"1234"
    await asyncio.wait_for(blocked, 5)
    assert await inbound.read() == b"56789"
    inbound.close()
    assert await inbound.read() == b""


async def test_plain_http_and_spdy_requests_are_not_websocket() -> None:
    def request(*headers: tuple[str, str]) -> UpgradeRequest:
        return UpgradeRequest("GET", "/exec/t", tuple((k.lower(), v) for k, v in headers))

    assert is_websocket_request(
        request(("Connection", "keep-alive, Upgrade"), ("Upgrade", "WebSocket"))
    )
    assert not is_websocket_request(request(("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1")))
    assert not is_websocket_request(request(("Upgrade", "websocket")))


@pytest.mark.parametrize(
    "headers",
    [
        ("Sec-WebSocket-Version: 8",),  # only 13 exists
        ("Sec-WebSocket-Key: short",),
    ],
)
async def test_the_library_checks_the_handshake(headers: tuple[str, ...]) -> None:
    async with streaming_server(exec_server(ALL, lambda s: echo_then_exit(0, s))) as served:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        replaced = {line.split(":")[0] for line in headers}
        lines = [
            line for line in handshake_lines("/exec/t", V5) if line.split(":")[0] not in replaced
        ]
        writer.write(("\r\n".join([*lines, *headers]) + "\r\n\r\n").encode())
        assert (await reader.readline()).startswith(b"HTTP/1.1 400")
        writer.close()
        assert await served.outcome() is None


# ---- port-forward over channels ----


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


def port_forward_server(
    connect: Callable[[int], Awaitable[Pipe]] = connect_loopback, ports: tuple[int, ...] = ()
) -> Serve:
    async def serve(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: UpgradeRequest
    ) -> object:
        await serve_port_forward_websocket(
            reader, writer, request, connect, ports=ports, limits=LIMITS
        )
        return "served"

    return serve


async def test_port_forward_channels_through_a_loopback_echo_server(echo_port: int) -> None:
    async with streaming_server(port_forward_server()) as served:
        async with client(served, f"/portforward/t?port={echo_port}", V4) as websocket:
            announced = echo_port.to_bytes(2, "little")
            assert await websocket.recv() == bytes([0]) + announced  # data channel
            assert await websocket.recv() == bytes([1]) + announced  # error channel
            echoed = b""
            payload = b"ping " * 50_000
            await websocket.send(bytes([0]) + payload)
            while len(echoed) < len(payload):
                message = await asyncio.wait_for(websocket.recv(), 10)
                assert isinstance(message, bytes) and message[0] == 0
                echoed += message[1:]
            assert echoed == payload
        assert await served.outcome() == "served"


async def test_port_forward_takes_the_ports_of_the_cri_request(echo_port: int) -> None:
    async def refuse(port: int) -> Pipe:
        raise ConnectionRefusedError(f"nothing listens on {port}")

    async with streaming_server(port_forward_server(refuse, ports=(5000, 5001))) as served:
        async with client(served, "/portforward/t", V4) as websocket:
            messages, code = await received(websocket)
        assert await served.outcome() == "served"
    channels = by_channel(messages)
    assert (
        channels[1]
        == (5000).to_bytes(2, "little") + b"error forwarding port 5000: nothing listens on 5000"
    )
    assert channels[3].endswith(b"nothing listens on 5001")
    assert code == 1000  # with its last pair, the session ends


async def test_port_forward_ends_when_the_port_hangs_up() -> None:
    async def answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"bye")
        writer.close()

    server = await asyncio.start_server(answer_once, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with (
            streaming_server(port_forward_server()) as served,
            client(served, f"/portforward/t?port={port}", V4) as websocket,
        ):
            messages, code = await received(websocket)
    finally:
        server.close()
        await server.wait_closed()
    assert by_channel(messages)[0] == port.to_bytes(2, "little") + b"bye" and code == 1000


@pytest.mark.parametrize("query", ["", "?port=0", "?port=http", "?port=80,65536"])
async def test_port_forward_without_valid_ports_is_refused(query: str) -> None:
    async with streaming_server(port_forward_server()) as served:
        with pytest.raises(InvalidStatus) as refused:
            async with client(served, f"/portforward/t{query}", V4):
                pass
        assert refused.value.response.status_code == 400
        assert await served.outcome() == "served"


async def test_port_forward_refuses_messages_on_its_error_channels(echo_port: int) -> None:
    async with streaming_server(port_forward_server()) as served:
        async with client(served, f"/portforward/t?port={echo_port}", V4) as websocket:
            await websocket.send(bytes([1]) + b"x")
            _, code = await received(websocket)
        assert await served.outcome() == "served"
    assert code == 1002


# ---- port-forward through tunneled SPDY ----


def handshake_lines(path: str, *protocols: str) -> list[str]:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Connection: Upgrade",
        "Upgrade: websocket",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    return lines + ([f"Sec-WebSocket-Protocol: {', '.join(protocols)}"] if protocols else [])


async def raw_upgrade(port: int, path: str, *protocols: str) -> Pipe:
    """The handshake by hand: the library's client refuses the tunnel's subprotocol name."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(("\r\n".join(handshake_lines(path, *protocols)) + "\r\n\r\n").encode())
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ")
    if protocols:
        assert f"Sec-WebSocket-Protocol: {protocols[0]}".encode() in head
    return reader, writer


@contextlib.asynccontextmanager
async def tunneled_spdy(port: int) -> AsyncIterator[Connection]:
    """client-go's SPDY-over-WebSocket dialer: SPDY bytes in binary messages, both ways."""
    reader, writer = await raw_upgrade(port, "/portforward/t", TUNNELED_PORT_FORWARD)
    framing = ClientProtocol(parse_uri("ws://127.0.0.1/"), state=State.OPEN)
    ours, theirs = socket.socketpair()
    pipe_reader, pipe_writer = await asyncio.open_connection(sock=ours)

    async def from_server() -> None:
        while data := await reader.read(65536):
            framing.receive_data(data)
            for event in framing.events_received():
                if isinstance(event, Frame) and event.opcode in (Opcode.BINARY, Opcode.CONT):
                    pipe_writer.write(event.data)
            await pipe_writer.drain()
        pipe_writer.write_eof()

    async def to_server() -> None:
        while chunk := await pipe_reader.read(65536):
            framing.send_binary(chunk)
            for data in framing.data_to_send():
                writer.write(data)
            await writer.drain()

    pumps = [asyncio.create_task(from_server()), asyncio.create_task(to_server())]
    spdy_reader, spdy_writer = await asyncio.open_connection(sock=theirs)
    try:
        async with Connection(spdy_reader, spdy_writer, role=Role.CLIENT) as connection:
            yield connection
            await connection.abort()
    finally:
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        for closing in (pipe_writer, writer):
            closing.close()


async def read_all(stream: Stream) -> bytes:
    received = b""
    while chunk := await stream.read():
        received += chunk
    return received


async def test_port_forward_through_tunneled_spdy(echo_port: int) -> None:
    async with streaming_server(port_forward_server()) as served:
        async with tunneled_spdy(served.port) as connection:
            headers = {"port": str(echo_port), "requestID": "0"}
            error = await connection.open_stream(Headers({**headers, "streamType": "error"}))
            await error.close()
            data = await connection.open_stream(Headers({**headers, "streamType": "data"}))
            payload = b"ping " * 50_000

            async def send() -> None:
                await data.write(payload)
                await data.close()  # the echo server answers the rest, then hangs up

            echoed, _ = await asyncio.gather(read_all(data), send())
            assert echoed == payload and await read_all(error) == b""
        assert await served.outcome() == "served"


async def test_a_tunnel_carries_only_binary_messages() -> None:
    async with streaming_server(port_forward_server()) as served:
        reader, writer = await raw_upgrade(served.port, "/portforward/t", TUNNELED_PORT_FORWARD)
        framing = ClientProtocol(parse_uri("ws://127.0.0.1/"), state=State.OPEN)
        framing.send_text(b"hello")
        for data in framing.data_to_send():
            writer.write(data)
        framing.receive_data(await reader.read())  # everything, up to the server's EOF
        closes = [
            e
            for e in framing.events_received()
            if isinstance(e, Frame) and e.opcode is Opcode.CLOSE
        ]
        writer.close()
        assert await served.outcome() == "served"
    assert framing.close_rcvd is not None and framing.close_rcvd.code == 1003 and closes
