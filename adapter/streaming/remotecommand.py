"""The server side of Kubernetes' remotecommand protocol (exec and attach) over SPDY/3.1.

The client opens one SPDY stream per channel, each named by its `streamType` header: `error`
always, then `stdin`, `stdout`, `stderr` as asked, and `resize` for a terminal (v3 and later).
The server waits for exactly those, runs the command, half-closes stdout/stderr, and reports the
outcome on the error stream:

- v4.channel.k8s.io: a JSON metav1.Status. Success; or Failure with reason NonZeroExitCode and
  the exit code as the message of an `ExitCode` cause; or Failure/InternalError (code 500).
- v3, v2 and channel.k8s.io: the failure message as text, nothing on success.

A terminal has no separate stderr (its output is all on stdout), so `tty` with `stderr` is
refused; resize messages are JSON objects {"Width": w, "Height": h}, one after another.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from adapter.core.errors import InvalidArgument
from adapter.streaming.frames import RstStatus
from adapter.streaming.spdy import Connection, Limits, Role
from adapter.streaming.spdy_stream import Stream, StreamReset
from adapter.streaming.upgrade import UpgradeRequest, accept_upgrade

log = logging.getLogger(__name__)

PROTOCOL_V4 = "v4.channel.k8s.io"
PROTOCOL_V3 = "v3.channel.k8s.io"
PROTOCOL_V2 = "v2.channel.k8s.io"
PROTOCOL_V1 = "channel.k8s.io"
PROTOCOLS = (PROTOCOL_V4, PROTOCOL_V3, PROTOCOL_V2, PROTOCOL_V1)
_RESIZING_PROTOCOLS = frozenset({PROTOCOL_V4, PROTOCOL_V3})
STREAM_TYPE_HEADER = "streamtype"
DEFAULT_STREAM_TIMEOUT = 30.0  # kubelet's DefaultStreamCreationTimeout
_MAX_RESIZE_BACKLOG = 4096  # one message is ~30 bytes; more unparsed than this is garbage


@dataclass(frozen=True)
class ExecOptions:
    """Which channels the session has, as the exec/attach request asked for them."""

    stdin: bool
    stdout: bool
    stderr: bool
    tty: bool

    def __post_init__(self) -> None:
        if self.tty and self.stderr:
            raise InvalidArgument("stderr", "a terminal has no separate stderr; ask for tty alone")
        if not (self.stdin or self.stdout or self.stderr):
            raise InvalidArgument("stdin", "at least one of stdin, stdout and stderr is needed")

    def stream_types(self, protocol: str) -> frozenset[str]:
        wanted = {"error"}
        wanted |= {name for name in ("stdin", "stdout", "stderr") if getattr(self, name)}
        if self.tty and protocol in _RESIZING_PROTOCOLS:
            wanted.add("resize")
        return frozenset(wanted)


@dataclass(frozen=True)
class TerminalSize:
    width: int
    height: int


class ExecInput(Protocol):
    """A channel the client writes: a SPDY stream, or a WebSocket channel
    (websocket_connection.py)."""

    async def read(self, max_bytes: int = -1) -> bytes:
        """Up to `max_bytes` (all buffered when negative); b"" once the client closed it."""
        ...


class ExecOutput(Protocol):
    """A channel the client reads."""

    async def write(self, data: bytes) -> None: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class ExecStreams:
    """What the command runner gets, whichever transport carries the session (SPDY here,
    WebSocket in websocket.py). stdin: read() until b"" (the client closed it). stdout,
    stderr: write() and close(); both are closed for the runner when it returns, and writes
    raise StreamReset once the client is gone. resizes(): the terminal's new sizes."""

    stdin: ExecInput | None
    stdout: ExecOutput | None
    stderr: ExecOutput | None
    tty: bool
    resize: ExecInput | None = None

    async def resizes(self) -> AsyncIterator[TerminalSize]:
        """Each size the client reports, until it closes the channel or sends garbage (then
        resizing stops, as in the kubelet). Nothing for a session without a terminal."""
        if self.resize is None:
            return
        pending = b""
        while True:
            try:
                chunk = await self.resize.read(1024)
            except StreamReset:
                return
            if not chunk:
                return
            sizes, rest = parse_sizes(pending + chunk)
            for size in sizes:
                yield size
            if rest is None:
                log.warning("resize stream sent a malformed size; ignoring further resizes")
                return
            pending = rest


def parse_sizes(pending: bytes) -> tuple[list[TerminalSize], bytes | None]:
    """Complete JSON objects at the front of `pending`, and what is left (None: garbage)."""
    decoder, text = json.JSONDecoder(), pending.decode("utf-8", "replace")
    sizes: list[TerminalSize] = []
    offset = 0
    while True:
        while offset < len(text) and text[offset].isspace():
            offset += 1
        if offset == len(text):
            return sizes, b""
        try:
            value, offset = decoder.raw_decode(text, offset)
        except json.JSONDecodeError:
            rest = text[offset:].encode()
            return sizes, (rest if len(rest) <= _MAX_RESIZE_BACKLOG else None)
        size = _terminal_size(value)
        if size is None:
            return sizes, None
        sizes.append(size)


def _terminal_size(value: object) -> TerminalSize | None:
    """client-go's TerminalSize: uint16 Width and Height (Go matches the names in any case)."""
    if not isinstance(value, dict):
        return None
    fields = {str(key).lower(): number for key, number in value.items()}
    width, height = fields.get("width", 0), fields.get("height", 0)
    for number in (width, height):
        if not isinstance(number, int) or isinstance(number, bool) or not 0 <= number <= 0xFFFF:
            return None
    return TerminalSize(width, height)


Runner = Callable[[ExecStreams], Awaitable[int]]


async def serve_exec(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    request: UpgradeRequest,
    options: ExecOptions,
    run: Runner,
    *,
    stream_timeout: float = DEFAULT_STREAM_TIMEOUT,
    limits: Limits | None = None,
) -> int | None:
    """Serve one exec (or attach) session on a connection whose request head has been read.

    Upgrades to SPDY, waits for the client's streams, awaits `run(streams)` for the exit code,
    reports it, and closes. Returns the exit code, or None when no command ran or it did not
    finish: refused upgrade, streams not opened within `stream_timeout`, or the client gone
    (then `run` is cancelled, so it must stop the process on CancelledError). An exception
    from `run` is reported to the client as an internal error, never raised from here.
    Attach is the same exchange: its runner returns 0 when the attach ends normally.
    """
    protocol = await accept_upgrade(writer, request, PROTOCOLS)
    if protocol is None:
        writer.close()
        return None
    async with Connection(reader, writer, role=Role.SERVER, limits=limits) as connection:
        channels = await _accept_channels(
            connection, options.stream_types(protocol), stream_timeout
        )
        if channels is None:
            return None
        streams = ExecStreams(
            stdin=channels.get("stdin"),
            stdout=channels.get("stdout"),
            stderr=channels.get("stderr"),
            tty=options.tty,
            resize=channels.get("resize"),
        )
        outcome = await run_until_client_leaves(connection.wait_closed, streams, run)
        if outcome is None:
            return None
        await _report(channels["error"], streams, outcome, protocol)
        return outcome if isinstance(outcome, int) else None


async def _accept_channels(
    connection: Connection, wanted: frozenset[str], timeout: float
) -> dict[str, Stream] | None:
    """Accept the streams named in `wanted`, refusing others and repeats. None if they do not
    all come within `timeout` (those that did are reset, so the client learns at once)."""
    channels: dict[str, Stream] = {}
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            while set(channels) != wanted:
                stream = await connection.accept()
                if stream is None:
                    break
                kind = stream.headers.first(STREAM_TYPE_HEADER)
                if kind not in wanted or kind in channels:
                    log.warning("refusing an unexpected %r stream in an exec session", kind)
                    await stream.reset(RstStatus.REFUSED_STREAM)
                    continue
                with contextlib.suppress(StreamReset):  # reset at once: it is simply not there
                    await stream.reply()
                    channels[kind] = stream
    if set(channels) == wanted:
        return channels
    log.warning("exec client opened %s of the %s streams", sorted(channels), sorted(wanted))
    for stream in channels.values():
        await stream.reset(RstStatus.CANCEL)
    return None


async def run_until_client_leaves(
    client_gone: Callable[[], Awaitable[None]], streams: ExecStreams, run: Runner
) -> int | Exception | None:
    """The runner's exit code or exception; None (runner cancelled) if `client_gone()`
    returned first: it returns once the client's connection has ended."""

    async def run_command() -> int:
        return await run(streams)

    runner = asyncio.create_task(run_command(), name="exec-runner")
    watch = asyncio.create_task(_wait(client_gone()), name="exec-client-watch")
    try:
        await asyncio.wait({runner, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not runner.done():
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await runner
    if runner.cancelled():
        return None
    failure = runner.exception()
    if failure is None:
        return runner.result()
    if not isinstance(failure, Exception):
        raise failure  # SystemExit and the like are not the client's business to hear about
    log.error("exec runner failed: %s", failure, exc_info=failure)
    return failure


async def _wait(event: Awaitable[None]) -> None:
    await event


async def _report(
    error_stream: Stream, streams: ExecStreams, outcome: int | Exception, protocol: str
) -> None:
    """Half-close the outputs, then write the status: the client reads both to their end."""
    try:
        for output in (streams.stdout, streams.stderr):
            if output is not None:
                await output.close()
        message = exit_status(outcome, structured=protocol == PROTOCOL_V4)
        if message:
            await error_stream.write(message)
        await error_stream.close()
    except StreamReset:
        log.info("exec client left before its status was written")


def exit_status(outcome: int | Exception, *, structured: bool) -> bytes:
    """What the error channel carries for `outcome` (an exit code, or the runner's failure):
    the v4 metav1.Status JSON when `structured`, else the older protocols' failure text."""
    return _status(outcome) if structured else _failure_text(outcome)


def _status(outcome: int | Exception) -> bytes:
    """The metav1.Status JSON of the v4 error stream."""
    status: dict[str, object] = {"metadata": {}, "status": "Success"}
    if isinstance(outcome, int) and 0 < outcome <= 255:
        status |= {
            "status": "Failure",
            "message": f"command terminated with non-zero exit code: exit status {outcome}",
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": str(outcome)}]},
        }
    elif not isinstance(outcome, int) or outcome != 0:
        cause = _internal_error(outcome)
        status |= {
            "status": "Failure",
            "message": f"Internal error occurred: {cause}",
            "reason": "InternalError",
            "details": {"causes": [{"message": cause}]},
            "code": 500,
        }
    return json.dumps(status, separators=(",", ":")).encode()


def _failure_text(outcome: int | Exception) -> bytes:
    """v1-v3 carry no status: only a failure's message, which the client turns into an error."""
    if outcome == 0:
        return b""
    if isinstance(outcome, int) and 0 < outcome <= 255:
        return f"command terminated with non-zero exit code: exit status {outcome}".encode()
    return f"Internal error occurred: {_internal_error(outcome)}".encode()


def _internal_error(outcome: int | Exception) -> str:
    if isinstance(outcome, int):
        return f"error executing command in container: exit code {outcome} is outside 0..255"
    return f"error executing command in container: {outcome}"
