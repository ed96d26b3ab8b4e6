"""The docker runtime's stream decoding, on a socket pair: bytes http.client had already read,
chunked bodies (frames split across chunks and reads), the end as dockerd makes it and a body cut
short, and a connection taken over from a real requests response."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

import requests

from adapter.runtimes.docker.streams import Connection, FrameReader, take_connection

T = TypeVar("T")


def frame(stream: int, payload: bytes) -> bytes:
    return bytes([stream, 0, 0, 0]) + len(payload).to_bytes(4, "big") + payload


def chunked(*pieces: bytes, last: bool = True) -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces)
    return body + (b"0\r\n\r\n" if last else b"")


def run(scenario: Callable[[socket.socket, socket.socket], Awaitable[T]]) -> T:
    ours, peer = socket.socketpair()

    async def main() -> T:
        try:
            return await scenario(ours, peer)
        finally:
            peer.close()

    return asyncio.run(main())


async def all_frames(connection: Connection) -> list[tuple[int, bytes]]:
    """Every frame to the end of the body; a decoding fault shows as a timeout, not a hang."""

    async def read() -> list[tuple[int, bytes]]:
        reader = FrameReader(connection)
        frames = []
        while (item := await reader.next()) is not None:
            frames.append(item)
        return frames

    return await asyncio.wait_for(read(), 10)


def test_chunked_frames_split_anywhere_and_the_early_bytes_first() -> None:
    data = frame(1, b"out\n") + frame(2, b"err\n") + frame(1, b"x" * 70_000)
    body = chunked(data[:3], data[3:13], data[13:])

    async def scenario(ours: socket.socket, peer: socket.socket) -> list[tuple[int, bytes]]:
        connection = Connection(ours, body[:7], chunked=True)
        sender = asyncio.get_running_loop().run_in_executor(None, peer.sendall, body[7:])
        try:
            frames = await all_frames(connection)
            assert connection.complete
            return frames
        finally:
            await sender
            connection.close()

    assert run(scenario) == [(1, b"out\n"), (2, b"err\n"), (1, b"x" * 70_000)]


def test_a_body_cut_short_is_not_complete() -> None:
    async def scenario(ours: socket.socket, peer: socket.socket) -> tuple[bool, bytes]:
        connection = Connection(ours, b"", chunked=True)
        peer.sendall(chunked(frame(1, b"partial"), last=False) + b"5\r\nab")
        peer.close()
        try:
            frames = await all_frames(connection)
            return connection.complete, b"".join(payload for _, payload in frames)
        finally:
            connection.close()

    assert run(scenario) == (False, b"partial")


def test_a_raw_body_ends_at_eof_and_takes_input() -> None:
    async def scenario(ours: socket.socket, peer: socket.socket) -> tuple[bytes, bytes]:
        connection = Connection(ours, b"early ", chunked=False)
        try:
            await connection.send(b"input")
            connection.shut_write()
            received = peer.recv(100)
            assert peer.recv(100) == b""  # our side said end of input
            peer.sendall(b"late")
            peer.close()
            output = b""
            while piece := await connection.read():
                output += piece
            assert connection.complete
            return received, output
        finally:
            connection.close()

    assert run(scenario) == (b"input", b"early late")


def test_taking_over_a_response_keeps_what_was_read_past_the_headers() -> None:
    """The server sends the headers and the start of the body in one write, as dockerd does when
    output is waiting: those bytes sit in http.client's buffer and must come first."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    body = chunked(frame(1, b"first\n"), frame(2, b"second\n"))

    def serve() -> None:
        client, _ = listener.accept()
        with client:
            client.recv(65536)
            headers = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            client.sendall(headers + body[:20])
            client.sendall(body[20:])
            client.recv(1)  # until our side closes

    server = threading.Thread(target=serve)
    server.start()
    try:
        with requests.Session() as session:
            response = session.get(f"http://127.0.0.1:{port}/logs", stream=True, timeout=10)

            async def scenario() -> list[tuple[int, bytes]]:
                connection = take_connection(response)
                try:
                    return await all_frames(connection)
                finally:
                    connection.close()

            frames = asyncio.run(scenario())
    finally:
        server.join(timeout=10)
        listener.close()
    assert frames == [(1, b"first\n"), (2, b"second\n")]
