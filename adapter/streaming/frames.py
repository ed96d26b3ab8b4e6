"""SPDY/3.1 frames on the wire: the 8-byte frame header, every control frame the streaming
protocols use, and the zlib-compressed name/value header block.

Written from the SPDY Protocol Draft 3 (chromium.org/spdy/spdy-protocol/spdy-protocol-draft3,
published as draft-mbelshe-httpbis-spdy-00) plus the 3.1 change: WINDOW_UPDATE on stream 0
adjusts a connection-wide window. CREDENTIAL (removed in 3.1) and unknown control frame types
are read and ignored, as section 2.2.1 asks of a recipient.

Everything a peer sends is checked here before it is used: lengths against the frame type, the
version, stream ids, and the header block against a decompressed-size limit, so that a zlib bomb
costs at most that limit. Any violation raises ProtocolError, which the connection turns into
GOAWAY and a closed socket.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum

VERSION = 3
FRAME_HEADER_BYTES = 8
MAX_STREAM_ID = 0x7FFFFFFF
MAX_WINDOW = 0x7FFFFFFF
MAX_FRAME_LENGTH = 0xFFFFFF  # the 24-bit length field
DEFAULT_WINDOW = 64 * 1024  # section 2.6.8: every window starts at 64 KiB
DEFAULT_MAX_HEADER_BLOCK = 1024 * 1024  # decompressed; far above what any k8s client sends

FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02
FLAG_SETTINGS_CLEAR = 0x01


class FrameType(IntEnum):
    SYN_STREAM = 1
    SYN_REPLY = 2
    RST_STREAM = 3
    SETTINGS = 4
    PING = 6
    GOAWAY = 7
    HEADERS = 8
    WINDOW_UPDATE = 9


class RstStatus(IntEnum):
    PROTOCOL_ERROR = 1
    INVALID_STREAM = 2
    REFUSED_STREAM = 3
    UNSUPPORTED_VERSION = 4
    CANCEL = 5
    INTERNAL_ERROR = 6
    FLOW_CONTROL_ERROR = 7
    STREAM_IN_USE = 8
    STREAM_ALREADY_CLOSED = 9
    INVALID_CREDENTIALS = 10
    FRAME_TOO_LARGE = 11


class GoAwayStatus(IntEnum):
    OK = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2


class SettingId(IntEnum):
    UPLOAD_BANDWIDTH = 1
    DOWNLOAD_BANDWIDTH = 2
    ROUND_TRIP_TIME = 3
    MAX_CONCURRENT_STREAMS = 4
    CURRENT_CWND = 5
    DOWNLOAD_RETRANS_RATE = 6
    INITIAL_WINDOW_SIZE = 7
    CLIENT_CERTIFICATE_VECTOR_SIZE = 8


class ProtocolError(Exception):
    """The peer broke SPDY/3.1 in a way that ends the whole connection (a session error)."""


# The zlib dictionary every header compression context starts from: SPDY Protocol Draft 3,
# section 2.6.10.1 "Compression". The spec lists it as a byte array; it is the tokens below, each
# prefixed by its 32-bit big-endian length, followed by the untagged tail. 1423 bytes, Adler-32
# 0xe3c6a7c2 (the DICTID real peers put in their first header block; the unit tests check both).
_DICTIONARY_TOKEN_LIST = (
    "options,head,post,put,delete,trace,accept,accept-charset,accept-encoding,accept-language,"
    "accept-ranges,age,allow,authorization,cache-control,connection,content-base,"
    "content-encoding,content-language,content-length,content-location,content-md5,"
    "content-range,content-type,date,etag,expect,expires,from,host,if-match,if-modified-since,"
    "if-none-match,if-range,if-unmodified-since,last-modified,location,max-forwards,pragma,"
    "proxy-authenticate,proxy-authorization,range,referer,retry-after,server,te,trailer,"
    "transfer-encoding,upgrade,user-agent,vary,via,warning,www-authenticate,method,get,status,"
    "200 OK,version,HTTP/1.1,url,public,set-cookie,keep-alive,origin"
)
_DICTIONARY_TAIL = (
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505"
    "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request"
    "401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented"
    "503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 "
    "Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,image/gif,"
    "application/xml,application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age="
    "gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
)
HEADER_DICTIONARY = (
    b"".join(
        struct.pack(">I", len(token)) + token.encode()
        for token in _DICTIONARY_TOKEN_LIST.split(",")
    )
    + _DICTIONARY_TAIL.encode()
)


class Headers(Mapping[str, tuple[str, ...]]):
    """A name/value header block: lower-case ASCII names, each with one or more values (SPDY
    joins several values of one name with NUL). Values are kept as latin-1 text, so any byte
    a peer sends round-trips."""

    __slots__ = ("_fields",)

    def __init__(self, fields: Mapping[str, str | Sequence[str]] | None = None) -> None:
        self._fields: dict[str, tuple[str, ...]] = {}
        for name, value in (fields or {}).items():
            values = (value,) if isinstance(value, str) else tuple(value)
            _check_field(name.lower(), values)
            self._fields[name.lower()] = values

    def __getitem__(self, name: str) -> tuple[str, ...]:
        return self._fields[name.lower()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __repr__(self) -> str:
        return f"Headers({self._fields!r})"

    def first(self, name: str) -> str | None:
        """The first value of `name`, or None when absent (names match in any case)."""
        values = self._fields.get(name.lower())
        return values[0] if values else None


def _check_field(name: str, values: tuple[str, ...]) -> None:
    """Our own headers must be what a peer would accept; a bad one is a bug in the caller."""
    if not name or not name.isascii() or "\0" in name:
        raise ValueError(f"header name {name!r}: must be non-empty ASCII without NUL")
    if not values or any("\0" in value for value in values):
        raise ValueError(f"header {name!r}: needs at least one value, none containing NUL")
    if len(values) > 1 and not all(values):
        raise ValueError(f"header {name!r}: several values must each be non-empty")


@dataclass(frozen=True)
class DataFrame:
    stream_id: int
    data: bytes
    flags: int = 0


@dataclass(frozen=True)
class SynStreamFrame:
    stream_id: int
    headers: Headers
    associated_stream_id: int = 0
    priority: int = 0
    flags: int = 0


@dataclass(frozen=True)
class SynReplyFrame:
    stream_id: int
    headers: Headers
    flags: int = 0


@dataclass(frozen=True)
class RstStreamFrame:
    stream_id: int
    status: RstStatus


@dataclass(frozen=True)
class Setting:
    id: int
    value: int
    flags: int = 0


@dataclass(frozen=True)
class SettingsFrame:
    settings: tuple[Setting, ...] = ()
    flags: int = 0

    def value(self, setting_id: SettingId) -> int | None:
        """Section 2.6.4: when an id repeats, only its first value counts."""
        return next((s.value for s in self.settings if s.id == setting_id), None)


@dataclass(frozen=True)
class PingFrame:
    ping_id: int


@dataclass(frozen=True)
class GoAwayFrame:
    last_good_stream_id: int
    status: GoAwayStatus = GoAwayStatus.OK


@dataclass(frozen=True)
class HeadersFrame:
    stream_id: int
    headers: Headers
    flags: int = 0


@dataclass(frozen=True)
class WindowUpdateFrame:
    stream_id: int  # 0: the connection-wide window (SPDY/3.1)
    delta: int


ControlFrame = (
    SynStreamFrame
    | SynReplyFrame
    | RstStreamFrame
    | SettingsFrame
    | PingFrame
    | GoAwayFrame
    | HeadersFrame
    | WindowUpdateFrame
)
Frame = DataFrame | ControlFrame


@dataclass(frozen=True)
class FrameHeader:
    """The common 8 bytes: for a control frame `kind` is its type, for data `stream_id` is set."""

    control: bool
    kind: int
    stream_id: int
    flags: int
    length: int

    @classmethod
    def parse(cls, raw: bytes) -> FrameHeader:
        first, flags_and_length = struct.unpack(">II", raw)
        flags, length = flags_and_length >> 24, flags_and_length & MAX_FRAME_LENGTH
        if not first & 0x80000000:
            if first == 0:
                raise ProtocolError("DATA frame on stream 0")
            return cls(False, 0, first, flags, length)
        version = (first >> 16) & 0x7FFF
        if version != VERSION:
            raise ProtocolError(f"SPDY version {version} is not 3")
        return cls(True, first & 0xFFFF, 0, flags, length)


class HeaderCompressor:
    """One zlib stream for every header block sent on a connection (section 2.6.10.1), flushed
    with Z_SYNC_FLUSH after each block so the peer can decode it on its own."""

    def __init__(self) -> None:
        # A 2 KiB window, as the spec suggests for small header blocks: less memory per stream.
        self._zlib = zlib.compressobj(
            zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, 11, 1, zdict=HEADER_DICTIONARY
        )

    def compress(self, block: bytes) -> bytes:
        return self._zlib.compress(block) + self._zlib.flush(zlib.Z_SYNC_FLUSH)


class HeaderDecompressor:
    """The receiving side: one zlib stream per connection, never inflating more than `limit`
    bytes for one block, so a compressed bomb is refused after `limit` bytes of work."""

    def __init__(self, limit: int = DEFAULT_MAX_HEADER_BLOCK) -> None:
        self._zlib = zlib.decompressobj(zdict=HEADER_DICTIONARY)
        self._limit = limit

    def decompress(self, data: bytes) -> bytes:
        try:
            block = self._zlib.decompress(data, self._limit + 1)
        except zlib.error as exc:
            raise ProtocolError(f"header block does not decompress: {exc}") from exc
        if len(block) > self._limit or self._zlib.unconsumed_tail:
            raise ProtocolError(f"header block inflates beyond {self._limit} bytes")
        if self._zlib.eof or self._zlib.unused_data:
            raise ProtocolError("header block ended the connection's compression stream")
        return block


def encode_header_block(headers: Headers) -> bytes:
    parts = [struct.pack(">I", len(headers))]
    for name, values in headers.items():
        raw_name, raw_value = name.encode("ascii"), "\0".join(values).encode("latin-1")
        parts += [struct.pack(">I", len(raw_name)), raw_name]
        parts += [struct.pack(">I", len(raw_value)), raw_value]
    return b"".join(parts)


def decode_header_block(block: bytes) -> Headers:
    """Parse a decompressed block, refusing what section 2.6.10 forbids: empty, upper-case or
    repeated names, and values with empty NUL-separated parts."""
    cursor = _Cursor(block, "header block")
    count = cursor.u32()
    if count > len(block) // 8:  # every pair takes at least two 4-byte lengths
        raise ProtocolError(f"header block claims {count} pairs in {len(block)} bytes")
    fields: dict[str, tuple[str, ...]] = {}
    for _ in range(count):
        raw_name, raw_value = cursor.take(cursor.u32()), cursor.take(cursor.u32())
        name = raw_name.decode("latin-1")
        if not raw_name or not raw_name.isascii() or raw_name.lower() != raw_name:
            raise ProtocolError(f"header name {name!r} is empty, not ASCII or not lower case")
        if b"\0" in raw_name or name in fields:
            raise ProtocolError(f"header name {name!r} contains NUL or repeats")
        values = tuple(raw_value.decode("latin-1").split("\0"))
        if len(values) > 1 and not all(values):
            raise ProtocolError(f"header {name!r} has an empty value between NULs")
        fields[name] = values
    cursor.finish()
    return Headers(fields)


class _Cursor:
    """Bounds-checked reading of a payload; running off its end is a ProtocolError."""

    def __init__(self, data: bytes, what: str) -> None:
        self._data, self._offset, self._what = data, 0, what

    def take(self, size: int) -> bytes:
        end = self._offset + size
        if end > len(self._data):
            raise ProtocolError(f"{self._what} is truncated ({len(self._data)} bytes)")
        chunk, self._offset = self._data[self._offset : end], end
        return chunk

    def u32(self) -> int:
        value: int = struct.unpack(">I", self.take(4))[0]
        return value

    def remaining(self) -> int:
        return len(self._data) - self._offset

    def stream_id(self) -> int:
        return self.u32() & MAX_STREAM_ID  # the top bit is reserved

    def rest(self) -> bytes:
        return self.take(len(self._data) - self._offset)

    def finish(self) -> None:
        if self._offset != len(self._data):
            raise ProtocolError(f"{self._what} has {len(self._data) - self._offset} extra bytes")


@dataclass
class FrameEncoder:
    """Serialises frames for one direction of one connection. Frames must be written in the
    order they are encoded: header blocks share one compression stream."""

    _compressor: HeaderCompressor = field(default_factory=HeaderCompressor)

    def encode(self, frame: Frame) -> bytes:
        if isinstance(frame, DataFrame):
            _check_stream_id(frame.stream_id, "DATA")
            return _header(frame.stream_id, frame.flags, len(frame.data)) + frame.data
        kind, flags, payload = self._control_payload(frame)
        return _header(0x80000000 | VERSION << 16 | kind, flags, len(payload)) + payload

    def _control_payload(self, frame: ControlFrame) -> tuple[FrameType, int, bytes]:
        match frame:
            case SynStreamFrame():
                _check_stream_id(frame.stream_id, "SYN_STREAM")
                if not 0 <= frame.priority <= 7:
                    raise ValueError(f"SYN_STREAM priority {frame.priority} is outside 0..7")
                fixed = struct.pack(
                    ">IIBB", frame.stream_id, frame.associated_stream_id, frame.priority << 5, 0
                )
                return FrameType.SYN_STREAM, frame.flags, fixed + self._block(frame.headers)
            case SynReplyFrame() | HeadersFrame():
                _check_stream_id(frame.stream_id, type(frame).__name__)
                kind = (
                    FrameType.SYN_REPLY if isinstance(frame, SynReplyFrame) else FrameType.HEADERS
                )
                return (
                    kind,
                    frame.flags,
                    struct.pack(">I", frame.stream_id) + self._block(frame.headers),
                )
            case RstStreamFrame():
                return FrameType.RST_STREAM, 0, struct.pack(">II", frame.stream_id, frame.status)
            case SettingsFrame():
                entries = b"".join(
                    struct.pack(">II", s.flags << 24 | s.id, s.value) for s in frame.settings
                )
                return (
                    FrameType.SETTINGS,
                    frame.flags,
                    struct.pack(">I", len(frame.settings)) + entries,
                )
            case PingFrame():
                return FrameType.PING, 0, struct.pack(">I", frame.ping_id)
            case GoAwayFrame():
                payload = struct.pack(">II", frame.last_good_stream_id, frame.status)
                return FrameType.GOAWAY, 0, payload
            case WindowUpdateFrame():
                return FrameType.WINDOW_UPDATE, 0, struct.pack(">II", frame.stream_id, frame.delta)

    def _block(self, headers: Headers) -> bytes:
        return self._compressor.compress(encode_header_block(headers))


def _header(first_word: int, flags: int, length: int) -> bytes:
    if length > MAX_FRAME_LENGTH:
        raise ValueError(f"frame payload of {length} bytes exceeds the 24-bit length field")
    return struct.pack(">II", first_word, flags << 24 | length)


def _check_stream_id(stream_id: int, what: str) -> None:
    if not 0 < stream_id <= MAX_STREAM_ID:
        raise ValueError(f"{what}: stream id {stream_id} is outside 1..2^31-1")


class FrameDecoder:
    """Parses control frame payloads for one direction of one connection (it owns that
    direction's header decompression stream). DATA payloads are not buffered here: the
    connection moves them straight into their stream."""

    def __init__(self, max_header_block: int = DEFAULT_MAX_HEADER_BLOCK) -> None:
        self._decompressor = HeaderDecompressor(max_header_block)

    def decode(self, raw: bytes) -> Frame | None:
        """Exactly one whole frame (header and payload), as a codec round trip needs."""
        header = FrameHeader.parse(raw[:FRAME_HEADER_BYTES])
        payload = raw[FRAME_HEADER_BYTES:]
        if len(payload) != header.length:
            raise ProtocolError(f"frame says {header.length} bytes, carries {len(payload)}")
        if not header.control:
            return DataFrame(header.stream_id, payload, header.flags)
        return self.decode_control(header, payload)

    def decode_control(self, header: FrameHeader, payload: bytes) -> ControlFrame | None:
        """The frame, or None for a type SPDY/3.1 tells a recipient to ignore."""
        cursor = _Cursor(payload, _frame_name(header.kind))
        match header.kind:
            case FrameType.SYN_STREAM:
                stream_id, associated = cursor.stream_id(), cursor.stream_id()
                priority = cursor.take(2)[0] >> 5
                headers = self._headers(cursor)
                _require_stream(stream_id, "SYN_STREAM")
                return SynStreamFrame(stream_id, headers, associated, priority, header.flags)
            case FrameType.SYN_REPLY | FrameType.HEADERS:
                stream_id = cursor.stream_id()
                headers = self._headers(cursor)
                _require_stream(stream_id, _frame_name(header.kind))
                if header.kind == FrameType.SYN_REPLY:
                    return SynReplyFrame(stream_id, headers, header.flags)
                return HeadersFrame(stream_id, headers, header.flags)
            case FrameType.RST_STREAM:
                return _decode_rst_stream(cursor)
            case FrameType.SETTINGS:
                return _decode_settings(cursor, header.flags)
            case FrameType.PING:
                frame: ControlFrame = PingFrame(cursor.u32())
            case FrameType.GOAWAY:
                frame = _decode_goaway(cursor)
            case FrameType.WINDOW_UPDATE:
                frame = _decode_window_update(cursor)
            case _:
                return None
        cursor.finish()
        return frame

    def _headers(self, cursor: _Cursor) -> Headers:
        # Decompress even when the frame is then refused: the stream is shared with later frames.
        return decode_header_block(self._decompressor.decompress(cursor.rest()))


def _frame_name(kind: int) -> str:
    return FrameType(kind).name if kind in FrameType._value2member_map_ else f"type {kind}"


def _require_stream(stream_id: int, what: str) -> None:
    if stream_id == 0:
        raise ProtocolError(f"{what} on stream 0")


def _decode_rst_stream(cursor: _Cursor) -> RstStreamFrame:
    stream_id, status = cursor.stream_id(), cursor.u32()
    cursor.finish()
    _require_stream(stream_id, "RST_STREAM")
    if status not in RstStatus._value2member_map_:
        raise ProtocolError(f"RST_STREAM status {status} is not defined")
    return RstStreamFrame(stream_id, RstStatus(status))


def _decode_settings(cursor: _Cursor, flags: int) -> SettingsFrame:
    count = cursor.u32()
    if count * 8 != cursor.remaining():
        raise ProtocolError(f"SETTINGS claims {count} entries in {cursor.remaining()} bytes")
    settings = []
    for _ in range(count):
        flags_and_id, value = cursor.u32(), cursor.u32()
        settings.append(Setting(flags_and_id & 0xFFFFFF, value, flags_and_id >> 24))
    return SettingsFrame(tuple(settings), flags)


def _decode_goaway(cursor: _Cursor) -> GoAwayFrame:
    last_good, status = cursor.stream_id(), cursor.u32()
    if status not in GoAwayStatus._value2member_map_:
        # An unknown status still means "going away": keep the frame, read it as an error.
        return GoAwayFrame(last_good, GoAwayStatus.INTERNAL_ERROR)
    return GoAwayFrame(last_good, GoAwayStatus(status))


def _decode_window_update(cursor: _Cursor) -> WindowUpdateFrame:
    stream_id, delta = cursor.stream_id(), cursor.u32() & MAX_WINDOW
    if delta == 0:
        raise ProtocolError("WINDOW_UPDATE with a delta of 0 (the legal range is 1..2^31-1)")
    return WindowUpdateFrame(stream_id, delta)
