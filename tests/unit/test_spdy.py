"""SPDY/3.1 (adapter/streaming): the frame codec, header compression against plain zlib and
against frames a real implementation produced, flow control at both levels, and every kind of
malformed input ending the connection with GOAWAY instead of an exception or unbounded memory.

Connections run over socketpairs; where the test needs to misbehave or watch exact frames,
the far end is a RawPeer that writes and reads frames by hand."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import tracemalloc
import zlib
from collections.abc import AsyncIterator

import pytest

from adapter.streaming.frames import (
    FLAG_FIN,
    FLAG_UNIDIRECTIONAL,
    HEADER_DICTIONARY,
    DataFrame,
    Frame,
    FrameDecoder,
    FrameEncoder,
    FrameHeader,
    GoAwayFrame,
    GoAwayStatus,
    HeaderCompressor,
    HeaderDecompressor,
    Headers,
    HeadersFrame,
    PingFrame,
    ProtocolError,
    RstStatus,
    RstStreamFrame,
    Setting,
    SettingId,
    SettingsFrame,
    SynReplyFrame,
    SynStreamFrame,
    WindowUpdateFrame,
    decode_header_block,
    encode_header_block,
)
from adapter.streaming.spdy import Connection, Limits, Role
from adapter.streaming.spdy_stream import StreamReset

Pipe = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def socket_pipe() -> tuple[Pipe, Pipe]:
    left, right = socket.socketpair()
    return await asyncio.open_connection(sock=left), await asyncio.open_connection(sock=right)


class RawPeer:
    """The far end, speaking frames by hand with its own compression contexts."""

    def __init__(self, pipe: Pipe) -> None:
        self.reader, self.writer = pipe
        self.encoder, self.decoder = FrameEncoder(), FrameDecoder()

    def send(self, *frames: Frame) -> None:
        for frame in frames:
            self.writer.write(self.encoder.encode(frame))

    async def frame(self, timeout: float = 5.0) -> Frame | None:
        """The next frame (control frames of ignored types skipped), or None at EOF."""
        async with asyncio.timeout(timeout):
            while True:
                try:
                    raw = await self.reader.readexactly(8)
                except asyncio.IncompleteReadError:
                    return None
                length = FrameHeader.parse(raw).length
                frame = self.decoder.decode(raw + await self.reader.readexactly(length))
                if frame is not None:
                    return frame

    async def next(self, kind: type[Frame], timeout: float = 5.0) -> Frame:
        """The next frame of `kind`, skipping the others (SETTINGS, window updates...)."""
        while True:
            frame = await self.frame(timeout)
            assert frame is not None, f"connection ended before a {kind.__name__}"
            if isinstance(frame, kind):
                return frame

    async def data(self, stream_id: int, size: int) -> bytes:
        received = b""
        while len(received) < size:
            frame = await self.next(DataFrame)
            assert isinstance(frame, DataFrame) and frame.stream_id == stream_id
            received += frame.data
        return received

    async def quiet(self, seconds: float = 0.2) -> list[Frame]:
        """Frames that arrive within `seconds` (a way to show that nothing more is sent)."""
        frames: list[Frame] = []
        with pytest.raises(TimeoutError):
            while (frame := await self.frame(seconds)) is not None:
                frames.append(frame)
        return frames

    async def hang_up(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


@pytest.fixture
async def server_and_peer() -> AsyncIterator[tuple[Connection, RawPeer]]:
    server_end, peer_end = await socket_pipe()
    server = Connection(*server_end, role=Role.SERVER, limits=Limits(close_timeout=1.0))
    await server.start()
    peer = RawPeer(peer_end)
    yield server, peer
    await peer.hang_up()
    await server.close()


@pytest.fixture
async def client_and_server() -> AsyncIterator[tuple[Connection, Connection]]:
    server_end, client_end = await socket_pipe()
    server = Connection(*server_end, role=Role.SERVER, limits=Limits(close_timeout=1.0))
    client = Connection(*client_end, role=Role.CLIENT, limits=Limits(close_timeout=1.0))
    await server.start()
    await client.start()
    yield client, server
    await client.abort()
    await server.close()


def syn(stream_id: int, flags: int = 0, **headers: str) -> SynStreamFrame:
    return SynStreamFrame(stream_id, Headers(headers), flags=flags)


# ---- the dictionary and the codec ----


def test_dictionary_is_the_spdy3_one() -> None:
    """Length and Adler-32 as published; real peers name the latter as DICTID in their blocks."""
    assert len(HEADER_DICTIONARY) == 1423
    assert zlib.adler32(HEADER_DICTIONARY) == 0xE3C6A7C2
    assert HEADER_DICTIONARY.startswith(b"\x00\x00\x00\x07options\x00\x00\x00\x04head")
    assert HEADER_DICTIONARY.endswith(b"utf-,*,enq=0.")


EVERY_FRAME: list[Frame] = [
    DataFrame(1, b"payload"),
    DataFrame(0x7FFFFFFF, b"", FLAG_FIN),
    SynStreamFrame(3, Headers({"streamtype": "stdout", "port": "80"}), 1, 7, FLAG_FIN),
    SynStreamFrame(5, Headers(), flags=FLAG_UNIDIRECTIONAL),
    SynReplyFrame(3, Headers({"multi": ["a", "b"], "empty": ""}), FLAG_FIN),
    RstStreamFrame(9, RstStatus.FLOW_CONTROL_ERROR),
    SettingsFrame((Setting(SettingId.INITIAL_WINDOW_SIZE, 1 << 20), Setting(4, 100, 1)), 1),
    SettingsFrame(),
    PingFrame(0xFFFFFFFF),
    GoAwayFrame(7, GoAwayStatus.PROTOCOL_ERROR),
    GoAwayFrame(0, GoAwayStatus.OK),
    HeadersFrame(3, Headers({"x": "y"}), FLAG_FIN),
    WindowUpdateFrame(0, 0x7FFFFFFF),
    WindowUpdateFrame(3, 1),
]


@pytest.mark.parametrize("frame", EVERY_FRAME, ids=lambda frame: type(frame).__name__)
def test_every_frame_round_trips(frame: Frame) -> None:
    assert FrameDecoder().decode(FrameEncoder().encode(frame)) == frame


def test_header_blocks_share_one_compression_context_per_direction() -> None:
    encoder, decoder = FrameEncoder(), FrameDecoder()
    frames = [SynStreamFrame(i, Headers({"streamtype": "stdin", "n": str(i)})) for i in (1, 3, 5)]
    wire = [encoder.encode(frame) for frame in frames]
    assert [decoder.decode(raw) for raw in wire] == frames
    # Later blocks refer back to earlier ones: on their own they cannot be decoded.
    assert len(wire[2]) < len(wire[0])
    with pytest.raises(ProtocolError):
        FrameDecoder().decode(wire[2])


def test_compressed_block_is_plain_zlib_with_the_dictionary() -> None:
    headers = Headers({"streamtype": "error", "requestid": "0", "port": "8080"})
    compressed = HeaderCompressor().compress(encode_header_block(headers))
    cmf, flg, dict_id = struct.unpack(">BBI", compressed[:6])
    assert cmf & 0x0F == 8 and flg & 0x20  # deflate, and a preset dictionary...
    assert dict_id == zlib.adler32(HEADER_DICTIONARY)  # ...named by its Adler-32
    independent = zlib.decompressobj(zdict=HEADER_DICTIONARY)
    assert independent.decompress(compressed) == encode_header_block(headers)
    assert compressed.endswith(b"\x00\x00\xff\xff")  # Z_SYNC_FLUSH after every block


# SYN_STREAM and SYN_REPLY as Chromium's SPDY/3 framer serialises them (its framer unit test,
# net/spdy/spdy_framer_test.cc): stream 1, priority 4, headers bar: foo and foo: bar.
CHROMIUM_SYN_STREAM = bytes.fromhex(
    "80030001000000370000000100000000800038eae3c6a7c202e50e50c24b4a04e50b6680004acbcf07082010"
    "95969f0fa200022829b108208000000000ffff"
)
CHROMIUM_SYN_REPLY = bytes.fromhex(
    "8003000200000031000000013"
    "8eae3c6a7c202e50e50c24b4a04e50b6680004acbcf0708201095969f0f"
    "a200022829b108208000000000ffff"
)


def test_decodes_header_blocks_a_real_implementation_compressed() -> None:
    frame = FrameDecoder().decode(CHROMIUM_SYN_STREAM)
    assert frame == SynStreamFrame(1, Headers({"bar": "foo", "foo": "bar"}), priority=4)
    reply = FrameDecoder().decode(CHROMIUM_SYN_REPLY)
    assert reply == SynReplyFrame(1, Headers({"bar": "foo", "foo": "bar"}))


def test_header_names_are_lower_case_and_values_nul_joined() -> None:
    block = encode_header_block(Headers({"StreamType": "stdout", "Multi": ["a", "b"]}))
    assert b"streamtype" in block and b"a\x00b" in block
    assert decode_header_block(block)["MULTI"] == ("a", "b")
    with pytest.raises(ValueError):
        Headers({"": "x"})
    with pytest.raises(ValueError):
        Headers({"x": ["a", ""]})


def raw_block(*pairs: tuple[bytes, bytes], count: int | None = None) -> bytes:
    parts = [struct.pack(">I", len(pairs) if count is None else count)]
    for name, value in pairs:
        parts += [struct.pack(">I", len(name)), name, struct.pack(">I", len(value)), value]
    return b"".join(parts)


@pytest.mark.parametrize(
    "block",
    [
        raw_block((b"Upper", b"x")),
        raw_block((b"", b"x")),
        raw_block((b"dup", b"1"), (b"dup", b"2")),
        raw_block((b"x", b"a\x00\x00b")),
        raw_block((b"x", b"a\x00")),
        raw_block((b"x", b"y"), count=2),
        raw_block((b"x", b"y"), count=0x7FFFFFFF),
        raw_block((b"x", b"y")) + b"trailing",
        b"\x00\x00",
    ],
)
def test_malformed_header_blocks_are_protocol_errors(block: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_header_block(block)


@pytest.mark.parametrize(
    "raw",
    [
        bytes.fromhex("8002000600000004") + b"\0\0\0\1",  # SPDY/2
        bytes.fromhex("0000000000000001") + b"x",  # DATA on stream 0
        bytes.fromhex("8003000300000004") + b"\0\0\0\1",  # RST_STREAM too short
        bytes.fromhex("800300030000000800000001") + b"\0\0\0\0",  # RST_STREAM status 0
        bytes.fromhex("8003000600000008") + b"\0" * 8,  # PING too long
        bytes.fromhex("800300090000000800000001") + b"\0\0\0\0",  # WINDOW_UPDATE of 0
        bytes.fromhex("800300040000000c00000002") + b"\0" * 8,  # SETTINGS count mismatch
        bytes.fromhex("800300020000000400000001"),  # SYN_REPLY without a header block
    ],
)
def test_malformed_frames_are_protocol_errors(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        FrameDecoder().decode(raw)


def test_unknown_control_frame_types_are_ignored() -> None:
    credential = bytes.fromhex("8003000a00000004") + b"\0\0\0\0"  # removed in SPDY/3.1
    assert FrameDecoder().decode(credential) is None


def zlib_bomb(inflated: int) -> bytes:
    """A header block (one pair) of `inflated` zero bytes, compressed without building it."""
    compressor = zlib.compressobj(zdict=HEADER_DICTIONARY)
    parts = [compressor.compress(struct.pack(">III", 1, 1, inflated) + b"x")]
    parts.append(compressor.compress(struct.pack(">I", inflated - 13)))
    zeros = bytes(1 << 20)
    for _ in range(inflated >> 20):
        parts.append(compressor.compress(zeros))
    return b"".join(parts) + compressor.flush(zlib.Z_SYNC_FLUSH)


def test_a_zlib_bomb_inflates_no_further_than_the_limit() -> None:
    bomb = zlib_bomb(64 << 20)
    assert len(bomb) < 128 * 1024  # 64 MiB of zeros compresses to almost nothing
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match="beyond"):
            HeaderDecompressor(limit=1 << 20).decompress(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


# ---- sessions ----


async def test_streams_carry_headers_and_data_both_ways(
    client_and_server: tuple[Connection, Connection],
) -> None:
    client, server = client_and_server

    async def echo() -> None:
        stream = await server.accept()
        assert stream is not None and stream.headers.first("StreamType") == "stdin"
        await stream.reply(Headers({"ok": "1"}))
        while chunk := await stream.read():
            await stream.write(chunk.upper())
        await stream.close()

    echoing = asyncio.create_task(echo())
    stream = await client.open_stream(Headers({"streamtype": "stdin"}))
    assert stream.reply_headers == Headers({"ok": "1"})
    await stream.write(b"hello " * 1000)
    await stream.close()
    received = b""
    while chunk := await stream.read():
        received += chunk
    assert received == b"HELLO " * 1000
    await echoing
    assert stream.finished and stream.at_eof()


async def test_pings_are_answered_both_ways(
    client_and_server: tuple[Connection, Connection],
) -> None:
    client, server = client_and_server
    await client.ping(timeout=5)
    await server.ping(timeout=5)


async def test_a_writer_blocks_at_the_window_and_resumes_on_window_update(
    server_and_peer: tuple[Connection, RawPeer],
) -> None:
    server, peer = server_and_peer
    peer.send(SettingsFrame((Setting(SettingId.INITIAL_WINDOW_SIZE, 65536),)), syn(1))
    stream = await server.accept()
    assert stream is not None
    writing = asyncio.create_task(stream.write(b"x" * 100_000))
    assert len(await peer.data(1, 65536)) == 65536
    assert not [f for f in await peer.quiet() if isinstance(f, DataFrame)]
    assert not writing.done()
    peer.send(WindowUpdateFrame(1, 50_000))  # the stream may send more; the connection may not
    assert not [f for f in await peer.quiet() if isinstance(f, DataFrame)]
    peer.send(WindowUpdateFrame(0, 50_000))
    assert len(await peer.data(1, 100_000 - 65536)) == 100_000 - 65536
    await asyncio.wait_for(writing, 5)


async def test_settings_initial_window_size_is_honoured(
    server_and_peer: tuple[Connection, RawPeer],
) -> None:
    server, peer = server_and_peer
    peer.send(SettingsFrame((Setting(SettingId.INITIAL_WINDOW_SIZE, 1000),)), syn(1))
    stream = await server.accept()
    assert stream is not None
    writing = asyncio.create_task(stream.write(b"y" * 5000))
    assert await peer.data(1, 1000) == b"y" * 1000
    assert not [f for f in await peer.quiet() if isinstance(f, DataFrame)]
    peer.send(SettingsFrame((Setting(SettingId.INITIAL_WINDOW_SIZE, 5000),)))  # +4000 each
    assert await peer.data(1, 4000) == b"y" * 4000
    await asyncio.wait_for(writing, 5)


async def test_a_peer_without_flow_control_is_not_stalled(
    server_and_peer: tuple[Connection, RawPeer],
) -> None:
    """moby/spdystream (client-go, crictl) never sends WINDOW_UPDATE: writes must not stop."""
    server, peer = server_and_peer
    peer.send(syn(1))
    stream = await server.accept()
    assert stream is not None
    writing = asyncio.create_task(stream.write(b"z" * 300_000))
    assert len(await peer.data(1, 300_000)) == 300_000
    await asyncio.wait_for(writing, 5)


async def test_consumed_data_is_credited_with_window_updates(
    server_and_peer: tuple[Connection, RawPeer],
) -> None:
    server, peer = server_and_peer
    peer.send(syn(1), DataFrame(1, b"a" * 40_000))
    stream = await server.accept()
    assert stream is not None
    assert await stream.read() == b"a" * 40_000
    updates: dict[int, int] = {}
    while len(updates) < 2:
        frame = await peer.next(WindowUpdateFrame)
        assert isinstance(frame, WindowUpdateFrame)
        updates[frame.stream_id] = frame.delta
    assert updates == {1: 40_000, 0: 40_000}


async def test_a_flow_controlled_peer_overrunning_the_window_is_reset(
    server_and_peer: tuple[Connection, RawPeer],
) -> None:
    server, peer = server_and_peer
    peer.send(SettingsFrame((Setting(SettingId.INITIAL_WINDOW_SIZE, 65536),)), syn(1))
    peer.send(DataFrame(1, b"a" * 65536), DataFrame(1, b"b"))
    reset = await peer.next(RstStreamFrame)
    assert reset == RstStreamFrame(1, RstStatus.FLOW_CONTROL_ERROR)
    assert not server.closed


async def test_a_peer_ignoring_windows_is_slowed_down_not_buffered(
    server_and_peer: tuple[Connection, RawPeer],
) -> None:
    """Without flow control from the peer, TCP backpressure bounds what a stream buffers."""
    server, peer = server_and_peer
    payload = bytes(range(256)) * 4096 * 4  # 4 MiB
    peer.send(syn(1))
    for offset in range(0, len(payload), 32768):
        peer.send(DataFrame(1, payload[offset : offset + 32768]))
    peer.send(DataFrame(1, b"", FLAG_FIN))
    stream = await server.accept()
    assert stream is not None
    with pytest.raises(TimeoutError):  # the server stopped reading: the peer cannot finish
        await asyncio.wait_for(peer.writer.drain(), 0.5)
    received = bytearray()
    while chunk := await stream.read():
        received += chunk
    assert received == payload
    await asyncio.wait_for(peer.writer.drain(), 5)


async def test_streams_reset_by_the_peer_raise(
    server_and_peer: tuple[Connection, RawPeer],
) -> None:
    server, peer = server_and_peer
    peer.send(syn(1), DataFrame(1, b"before"), RstStreamFrame(1, RstStatus.CANCEL))
    stream = await server.accept()
    assert stream is not None
    assert await stream.read() == b"before"  # what came first is still delivered
    with pytest.raises(StreamReset) as reset:
        await stream.read()
    assert reset.value.status is RstStatus.CANCEL
    with pytest.raises(StreamReset):
        await stream.write(b"after")


async def test_unidirectional_streams_get_no_reply_and_take_no_writes(
    server_and_peer: tuple[Connection, RawPeer],
) -> None:
    server, peer = server_and_peer
    peer.send(syn(1, FLAG_UNIDIRECTIONAL), DataFrame(1, b"one way", FLAG_FIN))
    stream = await server.accept()
    assert stream is not None
    await stream.reply()
    assert await stream.read() == b"one way"
    with pytest.raises(StreamReset):
        await stream.write(b"back")
    assert not [f for f in await peer.quiet() if isinstance(f, SynReplyFrame)]


async def test_data_for_a_stream_never_opened_is_refused(
    server_and_peer: tuple[Connection, RawPeer],
) -> None:
    server, peer = server_and_peer
    peer.send(DataFrame(41, b"who?"))
    assert await peer.next(RstStreamFrame) == RstStreamFrame(41, RstStatus.INVALID_STREAM)
    assert not server.closed


async def test_streams_beyond_the_limit_are_refused() -> None:
    server_end, peer_end = await socket_pipe()
    limits = Limits(max_streams=2, close_timeout=0.5)
    async with Connection(*server_end, role=Role.SERVER, limits=limits) as server:
        peer = RawPeer(peer_end)
        peer.send(syn(1), syn(3), syn(5))
        assert await peer.next(RstStreamFrame) == RstStreamFrame(5, RstStatus.REFUSED_STREAM)
        accepted = [await server.accept(), await server.accept()]
        assert [stream.id for stream in accepted if stream is not None] == [1, 3]
        await peer.hang_up()


async def test_close_sends_goaway_and_waits_for_the_peer_to_hang_up(
    server_and_peer: tuple[Connection, RawPeer],
) -> None:
    server, peer = server_and_peer
    peer.send(syn(1), syn(3))
    accepted = [await server.accept(), await server.accept()]
    assert [stream.id for stream in accepted if stream is not None] == [1, 3]
    closing = asyncio.create_task(server.close())
    assert await peer.next(GoAwayFrame) == GoAwayFrame(3, GoAwayStatus.OK)
    peer.send(syn(5))  # after GOAWAY, new streams are ignored
    await asyncio.sleep(0.1)
    assert not closing.done()
    await peer.hang_up()
    await asyncio.wait_for(closing, 5)
    assert server.closed
    assert await server.accept() is None


async def test_close_gives_up_on_a_peer_that_never_hangs_up() -> None:
    server_end, peer_end = await socket_pipe()
    server = Connection(*server_end, role=Role.SERVER, limits=Limits(close_timeout=0.2))
    await server.start()
    await asyncio.wait_for(server.close(), 5)
    assert server.closed
    peer = RawPeer(peer_end)
    assert await peer.next(GoAwayFrame) == GoAwayFrame(0, GoAwayStatus.OK)
    assert await peer.frame() is None
    await peer.hang_up()


async def test_a_peer_that_stops_reading_cannot_hold_the_connection() -> None:
    server_end, peer_end = await socket_pipe()
    server = Connection(*server_end, role=Role.SERVER, limits=Limits(close_timeout=0.3))
    await server.start()
    peer = RawPeer(peer_end)
    peer.send(syn(1))
    stream = await server.accept()
    assert stream is not None
    writing = asyncio.create_task(stream.write(bytes(16 << 20)))  # far beyond socket buffers
    await asyncio.sleep(0.2)
    assert not writing.done()  # stuck: the peer reads nothing...
    peer.writer.write(bytes.fromhex("8002000600000004") + b"\0\0\0\1")  # ...then misbehaves
    await asyncio.wait_for(server.wait_closed(), 5)  # the GOAWAY it will not read is skipped
    await asyncio.wait_for(server.close(), 5)  # and so is the flush of what we wrote
    with pytest.raises(StreamReset):
        await asyncio.wait_for(writing, 5)
    await peer.hang_up()


async def test_a_peer_hanging_up_ends_streams_and_accept(
    server_and_peer: tuple[Connection, RawPeer],
) -> None:
    server, peer = server_and_peer
    peer.send(syn(1))
    stream = await server.accept()
    assert stream is not None
    await peer.hang_up()
    with pytest.raises(StreamReset):
        await asyncio.wait_for(stream.read(), 5)
    with pytest.raises(StreamReset):  # not ConnectionClosed: streams report a reset
        await stream.write(b"too late")
    assert await server.accept() is None
    await asyncio.wait_for(server.wait_closed(), 5)
    assert server.error is None


def syn_with_block(stream_id: int, compressed_block: bytes) -> bytes:
    payload = struct.pack(">IIBB", stream_id, 0, 0, 0) + compressed_block
    return struct.pack(">II", 0x80030001, len(payload)) + payload


def frames(*frames: Frame) -> bytes:
    encoder = FrameEncoder()
    return b"".join(encoder.encode(frame) for frame in frames)


MALFORMED_SESSIONS = {
    "spdy2 frame": bytes.fromhex("8002000600000004") + b"\0\0\0\1",
    "control frame over the limit": bytes.fromhex("8003000100200000"),
    "header block that is not zlib": syn_with_block(1, b"junk"),
    "header block over 1 MiB": syn_with_block(
        1, HeaderCompressor().compress(raw_block((b"x", b"y" * (1 << 20))))
    ),
    "zlib bomb": syn_with_block(1, zlib_bomb(256 << 20)),
    "server-parity stream id": frames(syn(2)),
    "stream ids going backwards": frames(syn(3), syn(1)),
    "window update of 0": bytes.fromhex("800300090000000800000001") + b"\0\0\0\0",
    "settings with a bad count": bytes.fromhex("800300040000000c00000002") + b"\0" * 8,
    "window over 2^31-1": FrameEncoder().encode(WindowUpdateFrame(0, 0x7FFFFFFF)),
}


@pytest.mark.parametrize("raw", MALFORMED_SESSIONS.values(), ids=MALFORMED_SESSIONS.keys())
async def test_malformed_input_ends_the_connection_with_goaway(
    server_and_peer: tuple[Connection, RawPeer], raw: bytes
) -> None:
    server, peer = server_and_peer
    peer.writer.write(raw)
    goaway = await peer.next(GoAwayFrame, timeout=10)
    assert isinstance(goaway, GoAwayFrame) and goaway.status is GoAwayStatus.PROTOCOL_ERROR
    assert await peer.frame() is None  # and the server hung up
    await asyncio.wait_for(server.wait_closed(), 5)
    assert isinstance(server.error, ProtocolError)
    assert await server.accept() is None
