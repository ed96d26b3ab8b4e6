"""SPDY/3.1 sessions over an asyncio StreamReader/StreamWriter pair: streams, half-close, reset,
PING, GOAWAY and the two levels of flow control (per stream, and per connection since 3.1).

One task reads frames for the whole connection; applications use Stream objects (spdy_stream.py)
from any task.
Frames are encoded and written in one synchronous step, so the order of header blocks on the
wire is always the order of the shared compression stream.

Flow control and the peers that ignore it
-----------------------------------------
Kubernetes' clients (client-go, crictl, critest, kubelet) speak SPDY through moby/spdystream,
which neither sends WINDOW_UPDATE nor honours ours. A strict sender would stall such a client
after 64 KiB; a strict receiver would reset its streams. So by default (`peer_flow_control=None`)
a connection enforces the peer's windows only once the peer has shown it does flow control
(it sent SETTINGS with INITIAL_WINDOW_SIZE, or any WINDOW_UPDATE); until then TCP backpressure
is the only limit. Receiving is bounded either way: a peer that overruns a stream's window is
reset if it does flow control, and otherwise simply not read from until that stream's reader
catches up, so no stream ever buffers more than its window plus one 64 KiB read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from types import TracebackType

from adapter.streaming.frames import (
    DEFAULT_MAX_HEADER_BLOCK,
    DEFAULT_WINDOW,
    FLAG_FIN,
    FLAG_UNIDIRECTIONAL,
    FRAME_HEADER_BYTES,
    MAX_WINDOW,
    ControlFrame,
    Frame,
    FrameDecoder,
    FrameEncoder,
    FrameHeader,
    GoAwayFrame,
    GoAwayStatus,
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
)
from adapter.streaming.spdy_stream import ConnectionClosed, Pulse, Stream, StreamReset

log = logging.getLogger(__name__)

_READ_CHUNK = 64 * 1024  # DATA payloads move into their stream at most this much at a time
_WRITE_CHUNK = 32 * 1024  # largest DATA frame we send


class Role(Enum):
    """Which end of the TCP connection we are: it fixes the parity of ids each side uses."""

    CLIENT = 1  # opens odd streams, sends odd pings
    SERVER = 0  # opens even streams, sends even pings


@dataclass(frozen=True)
class Limits:
    receive_window: int = DEFAULT_WINDOW  # per stream; advertised in our first SETTINGS
    max_streams: int = 128  # streams the peer may have open at once; more are refused
    max_control_frame: int = DEFAULT_MAX_HEADER_BLOCK  # compressed control frame payload
    max_header_block: int = DEFAULT_MAX_HEADER_BLOCK  # decompressed header block
    peer_flow_control: bool | None = None  # None: enforce once the peer shows it does it
    close_timeout: float = 5.0  # after our GOAWAY, how long the peer has to hang up


class Connection:
    """One SPDY/3.1 session. Use as `async with Connection(reader, writer, role=...)`:
    entering sends our SETTINGS and starts reading; leaving closes gracefully (close())."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        role: Role,
        limits: Limits | None = None,
    ) -> None:
        self.limits = limits or Limits()
        self.role = role
        self.pulse = Pulse()
        self.peer_initial_window = DEFAULT_WINDOW
        self.session_send_window = DEFAULT_WINDOW
        self.error: ProtocolError | None = None
        self._reader, self._writer = reader, writer
        self._encoder = FrameEncoder()
        self._decoder = FrameDecoder(self.limits.max_header_block)
        self._streams: dict[int, Stream] = {}
        self._incoming: asyncio.Queue[Stream] = asyncio.Queue()
        self._next_stream_id = 1 if role is Role.CLIENT else 2
        self._next_ping_id = self._next_stream_id
        self._pings: dict[int, asyncio.Future[None]] = {}
        self._last_peer_stream = 0
        self._peer_does_flow_control = False
        self._session_uncredited = 0
        self._goaway_sent = self._goaway_received = self._closing = False
        self._finished = asyncio.Event()
        self._reader_task: asyncio.Task[None] | None = None
        self._handlers: dict[type, Callable[..., object]] = {
            SynStreamFrame: self._on_syn_stream,
            SynReplyFrame: self._on_syn_reply,
            RstStreamFrame: self._on_rst_stream,
            SettingsFrame: self._on_settings,
            PingFrame: self._on_ping,
            GoAwayFrame: self._on_goaway,
            HeadersFrame: self._on_headers,
            WindowUpdateFrame: self._on_window_update,
        }

    async def __aenter__(self) -> Connection:
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if isinstance(exc, asyncio.CancelledError):
            await self.abort()  # shutting down: no time to wait for the peer
        else:
            await self.close()

    async def start(self) -> None:
        self._reader_task = asyncio.create_task(self._read_frames(), name="spdy-reader")
        window = Setting(SettingId.INITIAL_WINDOW_SIZE, self.limits.receive_window)
        with contextlib.suppress(ConnectionClosed):
            await self.send(SettingsFrame((window,)))

    @property
    def closed(self) -> bool:
        return self._finished.is_set()

    async def wait_closed(self) -> None:
        """Returns once the connection is gone (peer hung up, protocol error, or close())."""
        await self._finished.wait()

    async def accept(self) -> Stream | None:
        """The next stream the peer opens; None once the connection has ended, or once the
        peer's GOAWAY has promised no more streams and those it opened before are taken."""
        while not self.closed:
            if not self._incoming.empty():
                return self._incoming.get_nowait()
            if self._goaway_received:
                return None
            await self.pulse.wait()
        return None

    async def open_stream(
        self, headers: Headers, *, fin: bool = False, timeout: float = 30.0
    ) -> Stream:
        """Open a stream (SYN_STREAM) and wait for the peer's SYN_REPLY."""
        if self.closed or self._goaway_sent or self._goaway_received:
            raise ConnectionClosed("the connection is closed or going away")
        stream = Stream(self, self._next_stream_id, headers, incoming=False, local_closed=fin)
        self._next_stream_id += 2
        self._streams[stream.id] = stream
        await self.send(SynStreamFrame(stream.id, headers, flags=FLAG_FIN if fin else 0))
        try:
            async with asyncio.timeout(timeout):
                while stream.reply_headers is None:
                    stream.raise_if_reset()
                    await self.pulse.wait()
        except TimeoutError:
            await stream.reset(RstStatus.CANCEL)
            raise
        return stream

    async def ping(self, timeout: float = 10.0) -> None:
        """Send a PING and wait for the peer to echo it."""
        ping_id, self._next_ping_id = self._next_ping_id, self._next_ping_id + 2
        answer = asyncio.get_running_loop().create_future()
        self._pings[ping_id] = answer
        try:
            await self.send(PingFrame(ping_id))
            await asyncio.wait_for(answer, timeout)
        finally:
            self._pings.pop(ping_id, None)

    async def close(self, status: GoAwayStatus = GoAwayStatus.OK) -> None:
        """GOAWAY, then give the peer `close_timeout` to hang up before we do. Waiting lets a
        peer read everything we sent before the socket goes: closing first could reset it.
        A peer that sent its own GOAWAY is closing too, and waits for us: we hang up."""
        if self._reader_task is None:
            self._writer.close()
            return
        self._closing = True
        self.pulse.wake()
        with contextlib.suppress(TimeoutError):  # a peer that reads nothing must not hold us
            async with asyncio.timeout(self.limits.close_timeout):
                await self._send_goaway(status)
                while not (self.closed or self._goaway_received):
                    await self.pulse.wait()
        await self._stop_reading(flush=True)

    async def abort(self) -> None:
        """Drop the connection at once: no GOAWAY, no waiting; unfinished streams end reset."""
        self._closing = True
        if self._reader_task is None:
            self._writer.transport.abort()
            return
        await self._stop_reading(flush=False)

    # ---- used by streams ----

    async def send(self, frame: Frame) -> None:
        if self.closed or self._writer.is_closing():
            raise ConnectionClosed("the connection is closed")
        self._writer.write(self._encoder.encode(frame))
        try:
            await self._writer.drain()
        except ConnectionError as exc:
            raise ConnectionClosed(f"the connection is closed: {exc}") from exc

    def sendable(self, stream: Stream, wanted: int) -> int:
        size = min(wanted, _WRITE_CHUNK)
        if self._enforces_peer_windows():
            size = min(size, stream.send_window, self.session_send_window)
        return size

    def _enforces_peer_windows(self) -> bool:
        setting = self.limits.peer_flow_control
        return self._peer_does_flow_control if setting is None else setting

    def credit_session_later(self, size: int) -> None:
        self._session_uncredited += size

    async def send_credits(self, updates: list[Frame]) -> None:
        if self._session_uncredited >= DEFAULT_WINDOW // 2:
            updates.append(WindowUpdateFrame(0, self._session_uncredited))
            self._session_uncredited = 0
        with contextlib.suppress(ConnectionClosed):
            for frame in updates:
                await self.send(frame)

    def forget_if_finished(self, stream: Stream) -> None:
        if stream.finished and self._streams.get(stream.id) is stream:
            del self._streams[stream.id]
        self.pulse.wake()

    # ---- the reader task ----

    async def _read_frames(self) -> None:
        try:
            while (header := await self._read_header()) is not None:
                if header.control:
                    await self._on_control(header)
                else:
                    await self._on_data(header)
        except ProtocolError as exc:
            log.warning("SPDY protocol error, closing the connection: %s", exc)
            self.error = exc
            await self._last_goaway(GoAwayStatus.PROTOCOL_ERROR)
        except (ConnectionError, ConnectionClosed, asyncio.IncompleteReadError):
            pass  # the peer went away, perhaps mid-frame: same outcome as a hang-up
        except Exception:  # a bug here must end this connection, not the server around it
            log.exception("SPDY connection failed")
            await self._last_goaway(GoAwayStatus.INTERNAL_ERROR)
        finally:
            self._finish()

    async def _read_header(self) -> FrameHeader | None:
        try:
            raw = await self._reader.readexactly(FRAME_HEADER_BYTES)
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise
            return None
        return FrameHeader.parse(raw)

    async def _on_control(self, header: FrameHeader) -> None:
        if header.length > self.limits.max_control_frame:
            raise ProtocolError(f"control frame of {header.length} bytes is over the limit")
        payload = await self._reader.readexactly(header.length)
        frame = self._decoder.decode_control(header, payload)
        if frame is not None:
            await self._dispatch(frame)

    async def _dispatch(self, frame: ControlFrame) -> None:
        outcome = self._handlers[type(frame)](frame)
        if asyncio.iscoroutine(outcome):
            await outcome
        self.pulse.wake()

    async def _on_data(self, header: FrameHeader) -> None:
        stream = self._streams.get(header.stream_id)
        remaining = header.length
        while remaining:
            chunk = await self._reader.readexactly(min(remaining, _READ_CHUNK))
            remaining -= len(chunk)
            if stream is None or self._closing or not stream.deliver(chunk):
                self.credit_session_later(len(chunk))  # dropped: the session window still counts
                continue
            self.pulse.wake()
            if stream.overran_window() and self._enforces_peer_windows():
                await stream.reset(RstStatus.FLOW_CONTROL_ERROR)
            while stream.needs_room() and not self._closing:
                await self.pulse.wait()
        await self.send_credits([])
        await self._after_data(header, stream)

    async def _after_data(self, header: FrameHeader, stream: Stream | None) -> None:
        if stream is None:
            if not self._was_opened(header.stream_id):
                await self.send(RstStreamFrame(header.stream_id, RstStatus.INVALID_STREAM))
        elif stream.remote_closed and not stream.finished:
            await stream.reset(RstStatus.STREAM_ALREADY_CLOSED)
        elif header.flags & FLAG_FIN:
            stream.remote_fin()

    def _was_opened(self, stream_id: int) -> bool:
        if stream_id % 2 == self.role.value % 2:
            return stream_id < self._next_stream_id
        return stream_id <= self._last_peer_stream

    async def _on_syn_stream(self, frame: SynStreamFrame) -> None:
        if frame.stream_id % 2 == self.role.value % 2 or frame.stream_id <= self._last_peer_stream:
            raise ProtocolError(f"SYN_STREAM with id {frame.stream_id} out of sequence")
        self._last_peer_stream = frame.stream_id
        if self._goaway_sent:
            return  # section 2.6.6: after GOAWAY new streams are ignored
        if sum(s.incoming for s in self._streams.values()) >= self.limits.max_streams:
            await self.send(RstStreamFrame(frame.stream_id, RstStatus.REFUSED_STREAM))
            return
        stream = Stream(
            self,
            frame.stream_id,
            frame.headers,
            incoming=True,
            local_closed=bool(frame.flags & FLAG_UNIDIRECTIONAL),
            remote_closed=bool(frame.flags & FLAG_FIN),
        )
        self._streams[stream.id] = stream
        self._incoming.put_nowait(stream)

    async def _on_syn_reply(self, frame: SynReplyFrame) -> None:
        stream = self._streams.get(frame.stream_id)
        if stream is None:
            return
        if stream.incoming or stream.reply_headers is not None:
            await stream.reset(RstStatus.STREAM_IN_USE)
            return
        stream.reply_headers = frame.headers
        if frame.flags & FLAG_FIN:
            stream.remote_fin()

    def _on_rst_stream(self, frame: RstStreamFrame) -> None:
        stream = self._streams.get(frame.stream_id)
        if stream is not None:
            message = f"stream {frame.stream_id} reset by the peer: {frame.status.name}"
            stream.mark_reset(StreamReset(message, frame.status), keep_input=True)

    def _on_settings(self, frame: SettingsFrame) -> None:
        window = frame.value(SettingId.INITIAL_WINDOW_SIZE)
        if window is None:
            return
        if window > MAX_WINDOW:
            raise ProtocolError(f"SETTINGS INITIAL_WINDOW_SIZE {window} is over 2^31-1")
        self._peer_does_flow_control = True
        delta, self.peer_initial_window = window - self.peer_initial_window, window
        for stream in self._streams.values():  # section 2.6.8: open streams move by the delta
            stream.grow_send_window(delta)

    async def _on_ping(self, frame: PingFrame) -> None:
        if frame.ping_id % 2 != self.role.value % 2:
            await self.send(frame)  # the peer's ping: echo it
        elif (answer := self._pings.get(frame.ping_id)) is not None and not answer.done():
            answer.set_result(None)

    def _on_goaway(self, frame: GoAwayFrame) -> None:
        self._goaway_received = True
        for stream in list(self._streams.values()):
            if not stream.incoming and stream.id > frame.last_good_stream_id:
                message = f"stream {stream.id} was not processed before GOAWAY"
                stream.mark_reset(StreamReset(message, RstStatus.REFUSED_STREAM))

    def _on_headers(self, frame: HeadersFrame) -> None:
        stream = self._streams.get(frame.stream_id)
        if stream is not None:
            stream.headers = Headers({**stream.headers, **frame.headers})
            if frame.flags & FLAG_FIN:
                stream.remote_fin()

    async def _on_window_update(self, frame: WindowUpdateFrame) -> None:
        self._peer_does_flow_control = True
        if frame.stream_id == 0:
            self.session_send_window += frame.delta
            if self.session_send_window > MAX_WINDOW:
                raise ProtocolError("WINDOW_UPDATE takes the connection window over 2^31-1")
            return
        stream = self._streams.get(frame.stream_id)
        if stream is not None and not stream.grow_send_window(frame.delta):
            await stream.reset(RstStatus.FLOW_CONTROL_ERROR)

    async def _last_goaway(self, status: GoAwayStatus) -> None:
        """Best effort (section 2.4.1): a peer that does not read cannot keep us waiting."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.limits.close_timeout):
                await self._send_goaway(status)

    async def _send_goaway(self, status: GoAwayStatus) -> None:
        if self._goaway_sent:
            return
        self._goaway_sent = True
        with contextlib.suppress(ConnectionClosed):
            await self.send(GoAwayFrame(self._last_peer_stream, status))

    def _finish(self) -> None:
        """The reader is done: every unfinished stream ends, waiters wake, the socket closes."""
        for stream in list(self._streams.values()):
            stream.mark_reset(
                StreamReset(f"stream {stream.id}: connection closed"), keep_input=True
            )
        for answer in self._pings.values():
            if not answer.done():
                answer.set_exception(ConnectionClosed("the connection closed before the PONG"))
        self._finished.set()
        self._writer.close()
        self.pulse.wake()

    async def _stop_reading(self, *, flush: bool) -> None:
        """End the reader task, then release the socket: after at most `close_timeout` for
        what we wrote to drain when `flush`, at once otherwise."""
        task = self._reader_task
        if task is not None and not task.done():
            task.cancel()
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if flush:
            with contextlib.suppress(TimeoutError, ConnectionError):
                async with asyncio.timeout(self.limits.close_timeout):
                    await self._writer.wait_closed()
        self._writer.transport.abort()  # a no-op once the socket is closed
