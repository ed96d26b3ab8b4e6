"""The HTTP/1.1 exchange before SPDY: reading the upgrade request, negotiating the subprotocol
through `X-Stream-Protocol-Version`, and answering 101 Switching Protocols (or an error).

The rules are Kubernetes' (apimachinery httpstream.Handshake and spdy.UpgradeResponse): the
client lists the subprotocols it speaks, most preferred first, in one or more
`X-Stream-Protocol-Version` headers (values may also be comma-separated); the first one the
server supports wins. None in common is 403 with `X-Accepted-Stream-Protocol-Versions`; a request
without the header, or without `Connection: Upgrade` and `Upgrade: SPDY/3.1`, is 400.

The request head is read with a hard bound (16 KiB), so a client cannot make us buffer more.
A client side (request_upgrade) exists for tests and tools.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

MAX_HEAD_BYTES = 16 * 1024
SPDY_31 = "SPDY/3.1"
PROTOCOL_HEADER = "X-Stream-Protocol-Version"
ACCEPTED_PROTOCOLS_HEADER = "X-Accepted-Stream-Protocol-Versions"
_TOKEN_CHARS = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


class HttpError(Exception):
    """A request we answer with an HTTP error instead of upgrading: `status`, a one-line
    `message` for the body, and headers to add (the accepted protocols on a 403)."""

    def __init__(
        self, status: HTTPStatus, message: str, headers: Sequence[tuple[str, str]] = ()
    ) -> None:
        super().__init__(message)
        self.status = status
        self.headers = tuple(headers)

    def response(self) -> bytes:
        return error_response(self.status, str(self), self.headers)


@dataclass(frozen=True)
class UpgradeRequest:
    """The request head: method, request-target as sent, and the header fields in order
    (names lower-cased; values stripped, latin-1 text)."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]

    def values(self, name: str) -> list[str]:
        wanted = name.lower()
        return [value for key, value in self.headers if key == wanted]

    def first(self, name: str) -> str | None:
        found = self.values(name)
        return found[0] if found else None

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.target).query, keep_blank_values=True)


async def read_request(reader: asyncio.StreamReader) -> UpgradeRequest:
    """Read and parse one request head; raises HttpError (400/431) for anything malformed,
    and asyncio.IncompleteReadError if the client hangs up first."""
    lines = await _read_head(reader, "request")
    method, target, version = _split_request_line(lines[0])
    headers = _parse_fields(lines[1:])
    request = UpgradeRequest(method, target, headers)
    if (
        request.first("transfer-encoding") is not None
        or (request.first("content-length") or "0") != "0"
    ):
        raise HttpError(HTTPStatus.BAD_REQUEST, "an upgrade request carries no body")
    if version != "HTTP/1.1":
        raise HttpError(HTTPStatus.BAD_REQUEST, f"{version} cannot upgrade; HTTP/1.1 is needed")
    return request


async def _read_head(reader: asyncio.StreamReader, what: str) -> list[str]:
    """Lines up to the blank line, at most MAX_HEAD_BYTES in all."""
    lines: list[str] = []
    total = 0
    while True:
        try:
            raw = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as exc:
            raise HttpError(
                HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"{what} line too long"
            ) from exc
        total += len(raw)
        if total > MAX_HEAD_BYTES:
            raise HttpError(
                HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                f"{what} head over {MAX_HEAD_BYTES} bytes",
            )
        line = raw.rstrip(b"\r\n").decode("latin-1")
        if not line:
            if not lines:
                raise HttpError(HTTPStatus.BAD_REQUEST, f"{what} starts with an empty line")
            return lines
        lines.append(line)


def _split_request_line(line: str) -> tuple[str, str, str]:
    parts = line.split(" ")
    if len(parts) != 3 or not parts[0] or not set(parts[0]) <= _TOKEN_CHARS:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"malformed request line {line[:80]!r}")
    method, target, version = parts
    if not target or not target.isprintable() or not target.isascii():
        raise HttpError(HTTPStatus.BAD_REQUEST, f"malformed request target {target[:80]!r}")
    return method, target, version


def _parse_fields(lines: Sequence[str]) -> tuple[tuple[str, str], ...]:
    fields: list[tuple[str, str]] = []
    for line in lines:
        name, colon, value = line.partition(":")
        # No whitespace before the colon and no folded continuation lines (RFC 9112 5.1, 5.2).
        if not colon or not name or not set(name) <= _TOKEN_CHARS:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"malformed header line {line[:80]!r}")
        fields.append((name.lower(), value.strip(" \t")))
    return tuple(fields)


def negotiate(request: UpgradeRequest, server_protocols: Sequence[str]) -> str:
    """The subprotocol to speak: the client's most preferred one the server supports."""
    if not _has_token(request.values("connection"), "upgrade") or not _has_token(
        request.values("upgrade"), SPDY_31.lower()
    ):
        raise HttpError(
            HTTPStatus.BAD_REQUEST, "unable to upgrade: missing upgrade headers in request"
        )
    offered = _comma_values(request.values(PROTOCOL_HEADER))
    if not offered:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"unable to upgrade: {PROTOCOL_HEADER} is required")
    chosen = next((protocol for protocol in offered if protocol in server_protocols), None)
    if chosen is None:
        raise HttpError(
            HTTPStatus.FORBIDDEN,
            f"unable to upgrade: unable to negotiate protocol: client supports {offered}, "
            f"server accepts {list(server_protocols)}",
            [(ACCEPTED_PROTOCOLS_HEADER, protocol) for protocol in server_protocols],
        )
    return chosen


def _has_token(values: Iterable[str], token: str) -> bool:
    return any(token in value.lower() for value in values)


def _comma_values(values: Iterable[str]) -> list[str]:
    return [part.strip(" ") for value in values for part in value.split(",") if part.strip(" ")]


def switching_protocols(protocol: str) -> bytes:
    """The 101 response that hands the connection to SPDY/3.1 speaking `protocol`."""
    return (
        "HTTP/1.1 101 Switching Protocols\r\n"
        "Connection: Upgrade\r\n"
        f"Upgrade: {SPDY_31}\r\n"
        f"{PROTOCOL_HEADER}: {protocol}\r\n"
        "\r\n"
    ).encode("latin-1")


def error_response(
    status: HTTPStatus, message: str, headers: Sequence[tuple[str, str]] = ()
) -> bytes:
    body = (message.replace("\r", " ").replace("\n", " ") + "\n").encode("utf-8")
    head = [
        f"HTTP/1.1 {status.value} {status.phrase}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in headers),
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


async def accept_upgrade(
    writer: asyncio.StreamWriter, request: UpgradeRequest, server_protocols: Sequence[str]
) -> str | None:
    """Negotiate and answer: 101 and the chosen protocol, or the error response and None (the
    caller then closes the connection). None too if the client hung up meanwhile."""
    try:
        protocol = negotiate(request, server_protocols)
    except HttpError as exc:
        return await _answer(writer, exc.response(), None)
    return await _answer(writer, switching_protocols(protocol), protocol)


async def _answer(
    writer: asyncio.StreamWriter, response: bytes, protocol: str | None
) -> str | None:
    writer.write(response)
    try:
        await writer.drain()
    except ConnectionError:
        return None
    return protocol


class UpgradeRefused(Exception):
    """The server answered the upgrade request with something other than 101."""

    def __init__(self, status: int, headers: tuple[tuple[str, str], ...]) -> None:
        super().__init__(f"upgrade refused with HTTP {status}")
        self.status = status
        self.headers = headers


async def request_upgrade(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    target: str,
    protocols: Sequence[str],
    *,
    host: str = "localhost",
) -> str:
    """The client side, as client-go sends it: POST, one protocol header per offered protocol.
    Returns the protocol the server chose; raises UpgradeRefused otherwise."""
    head = [
        f"POST {target} HTTP/1.1",
        f"Host: {host}",
        "Connection: Upgrade",
        f"Upgrade: {SPDY_31}",
    ]
    head += [f"{PROTOCOL_HEADER}: {protocol}" for protocol in protocols]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
    await writer.drain()
    lines = await _read_head(reader, "response")
    status_parts = lines[0].split(" ", 2)
    headers = _parse_fields(lines[1:])
    status = int(status_parts[1]) if len(status_parts) > 1 and status_parts[1].isdigit() else 0
    chosen = next((value for name, value in headers if name == PROTOCOL_HEADER.lower()), "")
    if status != HTTPStatus.SWITCHING_PROTOCOLS or chosen not in protocols:
        raise UpgradeRefused(status, headers)
    return chosen
