"""`containerizer-mesos`: the Mesos External Containerizer Protocol program.

A Mesos 0.19-0.27 agent started with `--isolation=external --containerizer_path=PROGRAM` runs
`PROGRAM COMMAND` once per call, writes the input message on our stdin and reads the reply from
our stdout, each framed as a native-endian uint32 length followed by the serialized message:

    launch < Launch    update < Update    usage < Usage > ResourceStatistics
    wait < Wait > Termination    destroy < Destroy    containers > Containers    recover

This program is a thin, short-lived client of the running service: every container lives in the
service, never here, so the agent and this program can restart at will. The agent pays one
process start per call and polls `usage`, so only a few standard modules are imported up front;
grpc and the generated messages are imported by the commands that use them, `usage` does without
the protobuf runtime, and the process leaves without interpreter teardown.

Endpoint: $CONTAINERIZER_ENDPOINT, else `--endpoint`, else the default socket. A 0.2x agent runs
the program with an environment of its own making (MESOS_* variables only), so a non-default
endpoint reaches it through a wrapper script (see the README). Exit status 0 when the call was
handled; 2 for bad input (unknown command, a frame or message that cannot be used), nothing sent
to the service; 1 when the call failed. Either way one line on stderr (the agent appends it to
the sandbox's stderr file), never a traceback.
"""

from __future__ import annotations

import os
import struct
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn, TextIO

if TYPE_CHECKING:
    from adapter.api.containerizer.v1 import containerizer_pb2 as pb

PROG = "containerizer-mesos"
ENDPOINT_ENV = "CONTAINERIZER_ENDPOINT"
DEFAULT_ENDPOINT = "unix:///run/containerizer/containerizer.sock"
FRAME_HEADER = struct.Struct("=I")  # Mesos' framing: uint32 length in host byte order
MAX_FRAME_BYTES = 64 * 1024 * 1024
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
METHOD_PREFIX = "/containerizer.v1.Containerizer/"
# Calls that answer from memory; launch and wait may legitimately take long (image pull, workload).
CALL_TIMEOUT_SECONDS = 30.0
DESTROY_TIMEOUT_SECONDS = 120.0
# `recover` runs when the agent starts, maybe alongside the service at boot: wait for it this long.
RECOVER_TIMEOUT_SECONDS = 30.0
# A blocked `wait` survives a service restart for this long instead of failing the executor.
WAIT_RECONNECT_SECONDS = 60.0
WAIT_RETRY_PAUSE_SECONDS = 0.2
# A Wait that failed after running this long had been established: its failure starts a new outage.
WAIT_ESTABLISHED_SECONDS = 1.0
# Port ranges are forwarded once the service takes them (the network issue); until then its
# validation refuses a `ports` resource, so they are dropped with a warning (host network).
FORWARD_PORTS = False
CHANNEL_OPTIONS = [
    ("grpc.enable_http_proxy", 0),  # node-local: never through an http_proxy
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
USAGE_TEXT = (
    f"usage: {PROG} [--endpoint ENDPOINT] COMMAND\n"
    "commands: launch, update, usage, wait, destroy, containers, recover\n"
    f"ENDPOINT: a socket path, unix:PATH or host:port; ${ENDPOINT_ENV} wins over --endpoint;\n"
    f"default {DEFAULT_ENDPOINT}\n"
)


class EcpError(Exception):
    """One line for stderr, and the exit status that goes with it."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE, rpc_code: str = "") -> None:
        super().__init__(" ".join(message.split()))
        self.exit_code = exit_code
        self.rpc_code = rpc_code  # the grpc status name when the service refused the call


def bad_input(message: str) -> EcpError:
    return EcpError(message, EXIT_BAD_INPUT)


# ---- framing ----


def read_frame(stream: BinaryIO, expected: str) -> bytes:
    """Read exactly one length-prefixed message and nothing more.

    The agent keeps its end of our stdin open after writing, so reading to EOF could block
    forever; a short read is a truncated frame."""
    header = _read_exactly(stream, FRAME_HEADER.size)
    if not header:
        raise bad_input(f"no input: expected a length-prefixed {expected} on stdin")
    if len(header) < FRAME_HEADER.size:
        raise bad_input(f"truncated frame: {len(header)} of {FRAME_HEADER.size} length bytes")
    (length,) = FRAME_HEADER.unpack(header)
    if length > MAX_FRAME_BYTES:
        raise bad_input(f"frame of {length} bytes exceeds the limit of {MAX_FRAME_BYTES} bytes")
    payload = _read_exactly(stream, length)
    if len(payload) < length:
        raise bad_input(f"truncated frame: header announces {length} bytes, got {len(payload)}")
    return payload


def _read_exactly(stream: BinaryIO, size: int) -> bytes:
    chunks: list[bytes] = []
    remaining = size
    while remaining > 0:
        chunk = stream.read(remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def write_frame(stream: BinaryIO, payload: bytes) -> None:
    stream.write(FRAME_HEADER.pack(len(payload)) + payload)
    stream.flush()


# ---- protobuf wire format, just enough for `usage` ----

WIRE_VARINT, WIRE_I64, WIRE_LEN, WIRE_I32 = 0, 1, 2, 5
# mesos.ResourceStatistics.timestamp: field 1, a double (I64); required by Mesos.
TIMESTAMP_TAG = bytes([1 << 3 | WIRE_I64])
DOUBLE = struct.Struct("<d")


def _varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while position < len(data) and shift < 64:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7
    raise ValueError("bad varint")


def wire_fields(data: bytes) -> dict[int, tuple[int, bytes | int]]:
    """Top-level fields of a serialized message: number -> (wire type, last value). Raises
    ValueError on anything that is not well-formed protobuf (groups included)."""
    fields: dict[int, tuple[int, bytes | int]] = {}
    position = 0
    while position < len(data):
        key, position = _varint(data, position)
        number, wire_type = key >> 3, key & 7
        value: bytes | int
        if number == 0:
            raise ValueError("field number 0")
        if wire_type == WIRE_VARINT:
            value, position = _varint(data, position)
        elif wire_type in (WIRE_I64, WIRE_I32):
            size = 8 if wire_type == WIRE_I64 else 4
            value, position = data[position : position + size], position + size
        elif wire_type == WIRE_LEN:
            length, position = _varint(data, position)
            value, position = data[position : position + length], position + length
        else:
            raise ValueError(f"wire type {wire_type}")
        if position > len(data):
            raise ValueError("field runs past the end")
        fields[number] = (wire_type, value)
    return fields


def _submessage(data: bytes, number: int) -> bytes | None:
    wire_type, value = wire_fields(data).get(number, (WIRE_LEN, None))
    if value is None:
        return None
    if wire_type != WIRE_LEN or not isinstance(value, bytes):
        raise ValueError(f"field {number} is not length-delimited")
    return value


def usage_request_bytes(usage: bytes) -> bytes:
    """mesos.containerizer.Usage{container_id{value}} -> containerizer.v1.UsageRequest bytes."""
    try:
        container = _submessage(usage, 1)
        value = _submessage(container, 1) if container is not None else None
        if value is not None:
            value.decode("utf-8")
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_input(
            f"cannot decode {len(usage)} bytes as mesos.containerizer.Usage: {exc}"
        ) from None
    if not value:
        raise bad_input("mesos.containerizer.Usage has no container_id.value")
    # UsageRequest.container_id is field 1, a string.
    return bytes([1 << 3 | WIRE_LEN]) + _encode_varint(len(value)) + value


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def statistics_from_usage_response(response: bytes, now: float | None = None) -> bytes:
    """UsageResponse{statistics = 1} -> the statistics' bytes, a mesos.ResourceStatistics; a
    timestamp is added when the service sent none (proto3 omits a zero; Mesos requires it)."""
    import time

    try:
        statistics = _submessage(response, 1) or b""
        has_timestamp = 1 in wire_fields(statistics)
    except ValueError as exc:
        raise EcpError(f"the service's UsageResponse cannot be decoded: {exc}") from None
    if has_timestamp:
        return statistics
    return TIMESTAMP_TAG + DOUBLE.pack(time.time() if now is None else now) + statistics


# ---- arguments and endpoint ----


def parse_arguments(argv: Sequence[str], environ: Mapping[str, str]) -> tuple[str, str]:
    """`[--endpoint E | --endpoint=E] COMMAND` -> (command, endpoint); hand-parsed, as argparse
    would cost start-up time on every call the agent makes."""
    endpoint, command, args = "", "", list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            return "help", ""
        if arg == "--endpoint":
            if not args:
                raise bad_input("--endpoint needs a value")
            endpoint = args.pop(0)
        elif arg.startswith("--endpoint="):
            endpoint = arg.partition("=")[2]
        elif arg.startswith("-") or command:
            raise bad_input(f"unexpected argument {arg!r}; usage: {PROG} [--endpoint E] COMMAND")
        else:
            command = arg
    if not command:
        raise bad_input(f"no command given; usage: {PROG} [--endpoint E] COMMAND")
    return command, environ.get(ENDPOINT_ENV) or endpoint or DEFAULT_ENDPOINT


def grpc_target(endpoint: str) -> str:
    """A socket path, `unix:PATH` (or `unix:///PATH`) or `host:port` -> a grpc target."""
    if endpoint.startswith(("/", ".")) or ":" not in endpoint:
        return "unix:" + os.path.abspath(endpoint)
    return endpoint


# ---- the service ----


class Service:
    """One channel for one call (two for a `wait` that outlives a service restart)."""

    def __init__(self, endpoint: str) -> None:
        import grpc

        self.target = grpc_target(endpoint)
        self.channel = grpc.insecure_channel(self.target, options=CHANNEL_OPTIONS)

    def call(
        self,
        method: str,
        request: Any,
        response_type: type[Any] | None,
        timeout: float | None,
        wait_for_ready: bool = False,
    ) -> Any:
        """A unary call by method name: the generated *_grpc module is not imported at all.
        `request` may be serialized bytes already; `response_type` None returns bytes."""
        import grpc

        stub = self.channel.unary_unary(
            METHOD_PREFIX + method,
            request_serializer=None if isinstance(request, bytes) else _serialize,
            response_deserializer=None if response_type is None else response_type.FromString,
        )
        try:
            return stub(request, timeout=timeout, wait_for_ready=wait_for_ready)
        except grpc.RpcError as exc:
            raise self.error(exc) from None

    def error(self, exc: Any) -> EcpError:
        """A failed call as one line that names the status, and the endpoint when it matters."""
        code, details = exc.code().name, exc.details() or ""
        if code == "UNAVAILABLE":
            message = f"service not reachable at {self.target}: {details or code}"
        elif code == "DEADLINE_EXCEEDED":
            message = f"no answer from the service at {self.target} in time: {details or code}"
        else:
            message = f"{code}: {details}"
        return EcpError(message, rpc_code=code)

    def ready(self, timeout: float) -> bool:
        """Whether a connection to the service can be made within `timeout` seconds."""
        import grpc

        future = grpc.channel_ready_future(self.channel)
        try:
            future.result(timeout=timeout)
            return True
        except grpc.FutureTimeoutError:
            future.cancel()
            return False

    def close(self) -> None:
        self.channel.close()


def _serialize(message: Any) -> bytes:
    payload: bytes = message.SerializeToString()
    return payload


# ---- the commands ----


class Call:
    """What one command needs: its streams, the agent's environment and the service."""

    def __init__(
        self, stdin: BinaryIO, stdout: BinaryIO, stderr: TextIO, environ: Mapping[str, str]
    ) -> None:
        self.stdin, self.stdout, self.stderr, self.environ = stdin, stdout, stderr, environ
        self.endpoint = DEFAULT_ENDPOINT
        self._service: Service | None = None

    @property
    def service(self) -> Service:
        if self._service is None:
            self._service = Service(self.endpoint)
        return self._service

    def read(self, kind: type[Any]) -> Any:
        """The command's input message, decoded and checked for a container id."""
        from adapter.clients.mesos import translate as mesos_translate

        payload = read_frame(self.stdin, kind.DESCRIPTOR.full_name)
        try:
            message = mesos_translate.parse(kind, payload)
            mesos_translate.container_id(message)
        except mesos_translate.BadMessage as exc:
            raise bad_input(str(exc)) from None
        return message

    def warn(self, command: str, warnings: Sequence[str]) -> None:
        for warning in warnings:
            print(f"{PROG}: {command}: warning: {warning}", file=self.stderr)

    def close(self) -> None:
        if self._service is not None:
            self._service.close()


def launch(call: Call) -> None:
    """Start the container and return once it runs; `wait` reaps it later."""
    from adapter.api.containerizer.v1 import containerizer_pb2 as pb
    from adapter.api.mesos import containerizer_pb2 as ecp
    from adapter.clients.mesos import translate as mesos_translate

    message = call.read(ecp.Launch)
    try:
        translated = mesos_translate.launch_request(message, call.environ, ports=FORWARD_PORTS)
    except mesos_translate.BadMessage as exc:
        raise bad_input(str(exc)) from None
    call.warn("launch", translated.warnings)
    response = call.service.call("Launch", translated.request, pb.LaunchResponse, None)
    call.warn("launch", response.warnings)
    termination = response.status.termination
    if response.status.state == pb.TERMINATED and termination.reason == pb.LAUNCH_FAILED:
        cid = message.container_id.value
        raise EcpError(f"container {cid} failed to start: {termination.message}")


def update(call: Call) -> None:
    """Apply the container's new total resources, live."""
    from adapter.api.containerizer.v1 import containerizer_pb2 as pb
    from adapter.api.mesos import containerizer_pb2 as ecp
    from adapter.clients.mesos import translate as mesos_translate

    translated = mesos_translate.update_request(call.read(ecp.Update), ports=FORWARD_PORTS)
    call.warn("update", translated.warnings)
    response = call.service.call(
        "Update", translated.request, pb.UpdateResponse, CALL_TIMEOUT_SECONDS
    )
    call.warn("update", response.warnings)


def usage(call: Call) -> None:
    """Reply with the statistics' bytes: already a mesos.ResourceStatistics on the wire.

    The agent polls this for every container, so it is the one call done without the protobuf
    runtime and the generated modules (a third of the start-up cost): the Usage in, the
    UsageRequest out and the UsageResponse back are each one or two fields, handled as bytes."""
    payload = read_frame(call.stdin, "mesos.containerizer.Usage")
    request = usage_request_bytes(payload)
    response = call.service.call("Usage", request, None, CALL_TIMEOUT_SECONDS)
    write_frame(call.stdout, statistics_from_usage_response(response))


def wait(call: Call) -> None:
    """Block until the container terminates, then reply with its Termination."""
    from adapter.api.containerizer.v1 import containerizer_pb2 as pb
    from adapter.api.mesos import containerizer_pb2 as ecp
    from adapter.clients.mesos import translate as mesos_translate

    request = pb.WaitRequest(container_id=call.read(ecp.Wait).container_id.value)
    response = _wait_across_restarts(call.service, request)
    reply = mesos_translate.termination(response.termination)
    write_frame(call.stdout, reply.SerializeToString())


def _wait_across_restarts(service: Service, request: pb.WaitRequest) -> pb.WaitResponse:
    """Wait without a deadline; if the service goes away meanwhile (a restart), reconnect and
    wait again rather than report a failure the agent would treat as the executor's end."""
    import time

    from adapter.api.containerizer.v1 import containerizer_pb2 as pb

    give_up: float | None = None
    while True:
        started = time.monotonic()
        try:
            response: pb.WaitResponse = service.call("Wait", request, pb.WaitResponse, None)
            return response
        except EcpError as exc:
            if exc.rpc_code != "UNAVAILABLE":
                raise
            now = time.monotonic()
            if give_up is None or now - started > WAIT_ESTABLISHED_SECONDS:
                give_up = now + WAIT_RECONNECT_SECONDS  # a new outage, not a retry failing
            if now >= give_up:
                raise
            time.sleep(WAIT_RETRY_PAUSE_SECONDS)
            if not service.ready(max(0.0, give_up - time.monotonic())):
                raise


def destroy(call: Call) -> None:
    """Kill every process of the container; the pending `wait` then reports it."""
    from adapter.api.containerizer.v1 import containerizer_pb2 as pb
    from adapter.api.mesos import containerizer_pb2 as ecp

    request = pb.DestroyRequest(container_id=call.read(ecp.Destroy).container_id.value)
    call.service.call("Destroy", request, pb.DestroyResponse, DESTROY_TIMEOUT_SECONDS)


def containers(call: Call) -> None:
    """Reply with every container the service knows that has not terminated."""
    from adapter.api.containerizer.v1 import containerizer_pb2 as pb
    from adapter.clients.mesos import translate as mesos_translate

    statuses: list[pb.ContainerStatus] = []
    token = ""
    while True:  # page by page: one reply holds only as many as fit its size bound
        request = pb.ContainersRequest(page_token=token)
        page = call.service.call("Containers", request, pb.ContainersResponse, CALL_TIMEOUT_SECONDS)
        statuses.extend(page.containers)
        token = page.next_page_token
        if not token:
            break
    reply = mesos_translate.containers(statuses)
    write_frame(call.stdout, reply.SerializeToString())


def recover(call: Call) -> None:
    """The service recovers its containers itself when it starts; here we only make sure it is
    up (waiting for it a while, as agent and service may start together) and knows its state.
    No stdin, no stdout, as the protocol says; the agent calls `containers` next."""
    from adapter.api.containerizer.v1 import containerizer_pb2 as pb

    # One container is enough to prove the service answers from its recovered state; the list
    # itself, however long, is what `containers` pages through next.
    request = pb.ContainersRequest(page_size=1)
    call.service.call(
        "Containers", request, pb.ContainersResponse, RECOVER_TIMEOUT_SECONDS, wait_for_ready=True
    )


COMMANDS: dict[str, Callable[[Call], None]] = {
    "launch": launch,
    "update": update,
    "usage": usage,
    "wait": wait,
    "destroy": destroy,
    "containers": containers,
    "recover": recover,
}


def run(
    argv: Sequence[str],
    stdin: BinaryIO,
    stdout: BinaryIO,
    stderr: TextIO,
    environ: Mapping[str, str],
) -> int:
    """One protocol call; returns the exit status. Every failure is one line on stderr."""
    command = ""
    call = Call(stdin, stdout, stderr, environ)
    try:
        command, call.endpoint = parse_arguments(argv, environ)
        if command == "help":
            stdout.write(USAGE_TEXT.encode())
            return 0
        handler = COMMANDS.get(command)
        if handler is None:
            raise bad_input(f"unknown command {command!r}; expected one of {', '.join(COMMANDS)}")
        handler(call)
        return 0
    except EcpError as exc:
        print(f"{_prefix(command)}{exc}", file=stderr)
        return exc.exit_code
    except Exception as exc:  # the agent must get one line, whatever broke
        detail = " ".join(str(exc).split())
        print(f"{_prefix(command)}internal error: {type(exc).__name__}: {detail}", file=stderr)
        return EXIT_FAILURE
    finally:
        call.close()


def _prefix(command: str) -> str:
    return f"{PROG}: {command}: " if command in COMMANDS else f"{PROG}: "


def main() -> NoReturn:
    """Run one call, then leave without interpreter teardown.

    Finalizing grpc and every imported module costs some 30 ms of the agent's time on each
    call and does nothing useful here: the channel is closed and the reply is flushed below."""
    try:
        code = run(sys.argv[1:], sys.stdin.buffer, sys.stdout.buffer, sys.stderr, os.environ)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        code = 130
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:  # the agent closed our stdout or stderr: nothing left to tell it
        code = code or EXIT_FAILURE
    os._exit(code)


if __name__ == "__main__":
    main()
