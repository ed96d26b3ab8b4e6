"""Attacks on the metrics listener (adapter/server/metrics_http.py) over real loopback sockets:
a bind off loopback, a slowloris request, a huge request line, a client that never reads a
large answer. The service's loop keeps answering others meanwhile, and a stuck client is
dropped after the request timeout."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from adapter.core.config import parse_config
from adapter.core.errors import ConfigError
from adapter.server import metrics_http
from adapter.server.metrics_http import MetricsEndpoint

pytestmark = pytest.mark.integration

BIG_ANSWER = b"# metric\n" * (4 << 20)  # 36 MiB: far more than the socket buffers


@pytest.mark.parametrize(
    "address", ["0.0.0.0:9101", "[::]:9101", "10.0.0.5:9101", "example.com:9101", ":9101"]
)
def test_a_metrics_listener_off_loopback_is_refused(address: str) -> None:
    with pytest.raises(ConfigError, match="metrics_listen"):
        parse_config({"metrics_listen": address})


@pytest.mark.parametrize("address", ["127.0.0.1:9101", "[::1]:9101", "localhost:0"])
def test_a_loopback_metrics_listener_is_accepted(address: str) -> None:
    assert parse_config({"metrics_listen": address}).metrics_listen == address


async def healthz(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return answer


def closed_by_peer(sock: socket.socket, within: float) -> bool:
    """Whether the server ends the connection within `within` seconds (reading what comes)."""
    sock.settimeout(0.2)
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if sock.recv(1 << 20) == b"":
                return True
        except TimeoutError:
            continue
        except ConnectionResetError:
            return True
    return False


async def serving(monkeypatch: pytest.MonkeyPatch) -> tuple[MetricsEndpoint, int]:
    monkeypatch.setattr(metrics_http, "REQUEST_TIMEOUT_SECONDS", 1.0)

    async def scrape() -> bytes:
        return BIG_ANSWER

    endpoint = MetricsEndpoint(scrape)
    endpoint.ready = True
    address = await endpoint.start("127.0.0.1:0")
    return endpoint, int(address.rpartition(":")[2])


def test_slowloris_and_huge_request_lines_neither_block_nor_linger(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def attack() -> None:
        endpoint, port = await serving(monkeypatch)
        loop = asyncio.get_running_loop()
        slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(50)]
        for sock in slow:
            sock.sendall(b"GET /metr")  # and nothing more
        huge = socket.create_connection(("127.0.0.1", port))
        huge.sendall(b"GET /" + b"a" * (64 << 10))
        try:
            started = time.monotonic()
            assert (await healthz(port)).startswith(b"HTTP/1.1 200 OK")
            assert time.monotonic() - started < 1.0  # answered while they hang
            assert await loop.run_in_executor(None, closed_by_peer, huge, 1.0)
            assert await loop.run_in_executor(None, closed_by_peer, slow[0], 5.0)
        finally:
            for sock in [*slow, huge]:
                sock.close()
            await endpoint.close()

    asyncio.run(attack())


def test_a_client_that_never_reads_its_answer_is_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """It asks for a 36 MiB answer and reads nothing: the server gives up on it after the
    timeout instead of holding the connection and the answer forever."""

    async def attack() -> None:
        endpoint, port = await serving(monkeypatch)
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            await asyncio.sleep(0.5)
            assert (await healthz(port)).startswith(b"HTTP/1.1 200 OK")
            await asyncio.sleep(2)  # past the timeout, having read nothing
            received = await loop.run_in_executor(None, drain, sock)
            assert received < len(BIG_ANSWER)  # dropped: the rest was never sent
        finally:
            sock.close()
            await endpoint.close()

    asyncio.run(attack())


def drain(sock: socket.socket) -> int:
    sock.settimeout(2)
    total = 0
    try:
        while chunk := sock.recv(1 << 20):
            total += len(chunk)
    except (TimeoutError, ConnectionResetError):
        pass
    return total
