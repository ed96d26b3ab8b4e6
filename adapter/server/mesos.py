"""The service's end of `containerizer-mesos`: the ECP socket, where every ECP call is handled.

A Mesos agent starts `containerizer-mesos` once per call and polls `usage` for every container,
so that program (adapter/clients/mesos/program.py) is a pipe of the standard library alone.
Decoding and checking the agent's messages, translating them into containerizer.v1 calls on the
same servicer the gRPC API uses (one validation, one error mapping) and translating the answers
back all happen here, in the long-running service where protobuf is already loaded.

The socket is `NAME.mesos.sock` beside the API socket `NAME.sock`, created 0600 like it: root's
only. One call per connection:

    program -> service  COMMAND "\\n"
                        launch only: a frame of the agent's environment, NUL-separated
                        NAME=VALUE entries (the executor's environment is derived from it)
                        launch, update, usage, wait, destroy: the agent's frame as it came
    service -> program  "EXIT STDERR_BYTES STDOUT_BYTES\\n", then the lines for the agent's log
                        and the framed reply (usage, wait, containers); then it closes

A frame is Mesos': a native-endian uint32 length, then that many bytes, at most 64 MiB. EXIT is
the program's exit status: 0 handled, 1 refused by the service, 2 bad input (then nothing
reached a container). A `wait` whose program goes away is abandoned, and a stopping service
abandons pending waits without an answer, so their programs reconnect to the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Protocol

import grpc

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.api.mesos import containerizer_pb2 as ecp
from adapter.clients.mesos import translate
from adapter.clients.mesos.program import (
    COMMANDS,
    EXIT_FAILURE,
    FRAME_HEADER_BYTES,
    PROG,
    EcpError,
    bad_input,
    check_payload,
    ecp_socket_path,
    frame,
    frame_length,
)

log = logging.getLogger(__name__)

# Port ranges are forwarded once the service takes them (the network issue); until then its
# validation refuses a `ports` resource, so they are dropped with a warning (host network).
FORWARD_PORTS = False
# The program sends its whole request at once; a client that stalls longer is not one of ours.
REQUEST_TIMEOUT_SECONDS = 30.0
# What a call other than `wait` gets to finish when the service stops, as gRPC calls do.
SHUTDOWN_GRACE_SECONDS = 2.0


class ContainerizerApi(Protocol):
    """The containerizer.v1 calls the ECP makes: the gRPC servicer (ContainerizerService), or a
    fake in tests. Each takes a request and a context whose `abort` raises."""

    def Launch(self, request: Any, context: Any) -> Awaitable[Any]: ...
    def Update(self, request: Any, context: Any) -> Awaitable[Any]: ...
    def Usage(self, request: Any, context: Any) -> Awaitable[Any]: ...
    def Wait(self, request: Any, context: Any) -> Awaitable[Any]: ...
    def Destroy(self, request: Any, context: Any) -> Awaitable[Any]: ...
    def Containers(self, request: Any, context: Any) -> Awaitable[Any]: ...


class InProcessContext:
    """The part of a gRPC context the servicer uses on a failed call: `abort`, which raises the
    status as the program's one line (exit 1)."""

    async def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        raise EcpError(f"{code.name}: {details}")


CONTEXT = InProcessContext()


class ProgramGone(Exception):
    """The program closed its connection before its call was answered."""


@dataclass
class EcpCall:
    """One call: the agent's message in, the lines for its log and the framed reply out."""

    command: str = ""
    message: bytes = b""
    environment: dict[str, str] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    reply: bytes = b""

    @property
    def prefix(self) -> str:
        return f"{PROG}: {self.command}: " if self.command in COMMANDS else f"{PROG}: "

    def warn(self, warnings: Any) -> None:
        for warning in warnings:
            self.say(f"warning: {warning}")

    def say(self, text: str) -> None:
        """One line for the agent's log, whatever line breaks the text had."""
        self.lines.append(self.prefix + " ".join(text.split()))

    def answer(self, exit_code: int) -> bytes:
        stderr = "".join(line + "\n" for line in self.lines).encode()
        stdout = self.reply if exit_code == 0 else b""
        return f"{exit_code} {len(stderr)} {len(stdout)}\n".encode() + stderr + stdout


# ---- reading a call ----


async def read_call(reader: asyncio.StreamReader, call: EcpCall) -> None:
    """The command, the agent's environment for a launch, the agent's message: each checked
    here too, whatever the program checked, since anything root runs may connect."""
    try:
        line = await reader.readuntil(b"\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        raise bad_input("no command line on the ECP socket") from None
    command = line[:-1].decode("utf-8", "replace")
    if command not in COMMANDS:
        raise bad_input(f"unknown command {command!r}; expected one of {', '.join(COMMANDS)}")
    call.command = command
    environment = await read_frame(reader, "agent environment") if command == "launch" else b""
    expected = COMMANDS[command][0]
    if expected:
        call.message = await read_frame(reader, expected)
    # Decoded once all is read: an answer never leaves a request half-read behind it.
    call.environment = agent_environment(environment)


async def read_frame(reader: asyncio.StreamReader, expected: str) -> bytes:
    length = frame_length(await _read_up_to(reader, FRAME_HEADER_BYTES), expected)
    payload = await _read_up_to(reader, length)
    check_payload(length, payload)
    return payload


async def _read_up_to(reader: asyncio.StreamReader, size: int) -> bytes:
    try:
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError as exc:
        return exc.partial


def agent_environment(data: bytes) -> dict[str, str]:
    environment: dict[str, str] = {}
    for entry in data.split(b"\0") if data else []:
        name, _, value = entry.partition(b"=")
        try:
            environment[name.decode()] = value.decode()
        except UnicodeDecodeError:
            raise bad_input(f"environment variable {name!r} is not UTF-8") from None
    return environment


@contextlib.contextmanager
def refusing_bad_messages() -> Iterator[None]:
    """What decoding or translating the agent's message finds wrong is bad input: exit 2."""
    try:
        yield
    except translate.BadMessage as exc:
        raise bad_input(str(exc)) from None
    except UnicodeDecodeError as exc:  # proto2 hands a string that is not UTF-8 over as bytes
        raise bad_input(f"a string in the message is not UTF-8: {exc}") from None


def parse(kind: type[Any], call: EcpCall) -> Any:
    """The agent's message, decoded and checked for a container id."""
    with refusing_bad_messages():
        message = translate.parse(kind, call.message)
        translate.container_id(message)
    return message


# ---- the calls ----


async def launch(api: ContainerizerApi, call: EcpCall) -> None:
    """Start the container and answer once it runs; `wait` reaps it later."""
    message = parse(ecp.Launch, call)
    with refusing_bad_messages():
        translated = translate.launch_request(message, call.environment, ports=FORWARD_PORTS)
    call.warn(translated.warnings)
    response = await api.Launch(translated.request, CONTEXT)
    call.warn(response.warnings)
    termination = response.status.termination
    if response.status.state == pb.TERMINATED and termination.reason == pb.LAUNCH_FAILED:
        cid = translated.request.container_id
        raise EcpError(f"container {cid} failed to start: {termination.message}")


async def update(api: ContainerizerApi, call: EcpCall) -> None:
    """Apply the container's new total resources, live."""
    message = parse(ecp.Update, call)
    with refusing_bad_messages():
        translated = translate.update_request(message, ports=FORWARD_PORTS)
    call.warn(translated.warnings)
    response = await api.Update(translated.request, CONTEXT)
    call.warn(response.warnings)


async def usage(api: ContainerizerApi, call: EcpCall) -> None:
    """Reply with the statistics: already a mesos.ResourceStatistics on the wire."""
    request = pb.UsageRequest(container_id=parse(ecp.Usage, call).container_id.value)
    response = await api.Usage(request, CONTEXT)
    call.reply = frame(translate.usage_statistics(response.statistics, time.time()))


async def wait(api: ContainerizerApi, call: EcpCall) -> None:
    """Block until the container terminates, then reply with its Termination."""
    request = pb.WaitRequest(container_id=parse(ecp.Wait, call).container_id.value)
    response = await api.Wait(request, CONTEXT)
    call.reply = frame(translate.termination(response.termination).SerializeToString())


async def destroy(api: ContainerizerApi, call: EcpCall) -> None:
    """Kill every process of the container; the pending `wait` then reports it."""
    request = pb.DestroyRequest(container_id=parse(ecp.Destroy, call).container_id.value)
    await api.Destroy(request, CONTEXT)


async def containers(api: ContainerizerApi, call: EcpCall) -> None:
    """Reply with every container the service knows that has not terminated."""
    statuses: list[Any] = []
    token = ""
    while True:  # page by page, as the API bounds each reply's size
        page = await api.Containers(pb.ContainersRequest(page_token=token), CONTEXT)
        statuses.extend(page.containers)
        token = page.next_page_token
        if not token:
            break
    call.reply = frame(translate.containers(statuses).SerializeToString())


async def recover(api: ContainerizerApi, call: EcpCall) -> None:
    """The service recovered its containers before opening this socket: answering at all says
    so. One container proves it answers from its recovered state; the agent asks for the
    list, however long, with `containers` next."""
    await api.Containers(pb.ContainersRequest(page_size=1), CONTEXT)


HANDLERS: dict[str, Callable[[ContainerizerApi, EcpCall], Awaitable[None]]] = {
    "launch": launch,
    "update": update,
    "usage": usage,
    "wait": wait,
    "destroy": destroy,
    "containers": containers,
    "recover": recover,
}


# ---- the socket ----


async def answer(api: ContainerizerApi, reader: asyncio.StreamReader, call: EcpCall) -> bytes:
    """Read one call from `reader`, handle it, and return the answer's bytes."""
    try:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_SECONDS):
                await read_call(reader, call)
        except TimeoutError:
            raise bad_input(f"no complete request in {REQUEST_TIMEOUT_SECONDS:g} s") from None
        if call.command == "wait":
            await _unless_program_leaves(HANDLERS["wait"](api, call), reader)
        else:
            await HANDLERS[call.command](api, call)
        return call.answer(0)
    except EcpError as exc:
        call.say(str(exc))
        return call.answer(exc.exit_code)
    except ProgramGone:
        raise
    except Exception as exc:  # the agent gets one line, the service log the traceback
        log.exception("%s %s failed", PROG, call.command)
        call.say(f"internal error: {type(exc).__name__}: {exc}")
        return call.answer(EXIT_FAILURE)


async def _unless_program_leaves(handling: Awaitable[None], reader: asyncio.StreamReader) -> None:
    """A wait may last as long as the workload: when its program is gone (the agent killed it,
    or gave up), stop waiting for nobody. The program sends nothing after its request, so
    anything read, end of file included, means it has left."""
    task = asyncio.ensure_future(handling)
    left = asyncio.ensure_future(reader.read(1))
    try:
        await asyncio.wait({task, left}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            raise ProgramGone
        await task
    finally:
        for pending in (task, left):
            pending.cancel()
        await asyncio.wait({task, left})


def bind_private_socket(path: Path) -> socket.socket:
    """A Unix socket at `path`, 0600 from the start (the umask covers the bind), replacing a
    stale one a crashed run left."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        listener.bind(str(path))
    except OSError:
        listener.close()
        raise
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    return listener


class EcpEndpoint:
    """The ECP socket: one `containerizer-mesos` call per connection, answered through `api`."""

    def __init__(self, api: ContainerizerApi, socket_path: Path) -> None:
        self.api = api
        self.socket_path = socket_path
        self._server: asyncio.Server | None = None
        self._calls: dict[asyncio.Task[Any], EcpCall] = {}

    async def start(self) -> None:
        listener = bind_private_socket(self.socket_path)
        self._server = await asyncio.start_unix_server(self._serve_connection, sock=listener)

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        call = self._calls[task] = EcpCall()
        try:
            writer.write(await answer(self.api, reader, call))
            await writer.drain()
        except (ProgramGone, ConnectionError):
            pass  # nobody to answer
        finally:
            del self._calls[task]
            writer.close()

    async def close(self) -> None:
        """Stop listening; give calls in progress a grace period, except waits, which are
        abandoned at once (their programs reconnect to the next service); remove the socket."""
        if self._server is not None:
            self._server.close()
        waits = [task for task, call in self._calls.items() if call.command == "wait"]
        for task in waits:
            task.cancel()
        if self._calls:
            await asyncio.wait(list(self._calls), timeout=SHUTDOWN_GRACE_SECONDS)
        for task in list(self._calls):
            task.cancel()
        if self._calls:
            await asyncio.wait(list(self._calls))
        if self._server is not None:
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()


async def start_ecp_endpoint(
    api: ContainerizerApi, api_socket: Path, configured: Path | None = None
) -> EcpEndpoint:
    """The ECP socket, serving: the config's `mesos_socket`, else the one beside the API
    socket `api_socket`, where the program looks for it by default."""
    endpoint = EcpEndpoint(api, configured or Path(ecp_socket_path(str(api_socket))))
    await endpoint.start()
    log.info("Mesos ECP socket on %s", endpoint.socket_path)
    return endpoint
