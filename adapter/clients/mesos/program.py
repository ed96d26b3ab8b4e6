"""`containerizer-mesos`: the Mesos External Containerizer Protocol program.

A Mesos 0.19-0.27 agent started with `--isolation=external --containerizer_path=PROGRAM` runs
`PROGRAM COMMAND` once per call, writes the input message on our stdin and reads the reply from
our stdout, each framed as a native-endian uint32 length followed by the serialized message:

    launch < Launch    update < Update    usage < Usage > ResourceStatistics
    wait < Wait > Termination    destroy < Destroy    containers > Containers    recover

The agent pays one process start per call and polls `usage` for every container, so this
program is a pipe and imports nothing but the standard library (no grpc, no protobuf, no other
module of the package): it refuses a frame it can see is bad (its length prefix, the 64 MiB
cap), hands the command and the frame to the service's ECP socket, and copies the answer back:
the framed reply to stdout, the lines for the agent's log to stderr, the exit status. Decoding,
translation and every check of the message itself happen in the service
(adapter/server/mesos.py, which also describes the exchange on the socket). Every container
lives in the service, never here, so the agent and this program can restart at will.

Endpoint: $CONTAINERIZER_ENDPOINT, else `--endpoint`, else the default socket. It names the
service's API socket (the program talks to the ECP socket beside it, `NAME.mesos.sock` for
`NAME.sock`) or the ECP socket itself. A 0.2x agent runs the program with an environment of its
own making (MESOS_* variables only), so a non-default endpoint reaches it through a wrapper
script (see the README). Exit status 0 when the call was handled; 2 for bad input (nothing
reaches a container); 1 when the service refused the call or could not be reached. Either way
one line on stderr (the agent appends it to the sandbox's stderr file), never a traceback.
"""

from __future__ import annotations

# `_socket` is the C module under `socket`: importing `socket` itself (its enums, `selectors`)
# costs some 2 ms of every call, more than the whole exchange with the service.
import _socket
import os
import sys
import time

# Typing names only: `typing` is not loaded at start-up and importing it costs every call.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import BinaryIO, NoReturn, TextIO

PROG = "containerizer-mesos"
ENDPOINT_ENV = "CONTAINERIZER_ENDPOINT"
DEFAULT_ENDPOINT = "unix:///run/containerizer/containerizer.sock"
ECP_SOCKET_SUFFIX = ".mesos.sock"
FRAME_HEADER_BYTES = 4  # Mesos' framing: uint32 length in host byte order
MAX_FRAME_BYTES = 64 * 1024 * 1024
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
# command -> (the message the agent sends on stdin, if any; seconds to wait for the service's
# answer). Calls that answer from memory get 30 s; launch (an image pull) and wait (the
# workload) may legitimately take long, destroy as long as a stubborn container takes to die.
COMMANDS: dict[str, tuple[str, float | None]] = {
    "launch": ("mesos.containerizer.Launch", None),
    "update": ("mesos.containerizer.Update", 30.0),
    "usage": ("mesos.containerizer.Usage", 30.0),
    "wait": ("mesos.containerizer.Wait", None),
    "destroy": ("mesos.containerizer.Destroy", 120.0),
    "containers": ("", 30.0),
    "recover": ("", 30.0),
}
# `recover` runs when the agent starts, maybe alongside the service at boot: wait for it this long.
RECOVER_TIMEOUT_SECONDS = 30.0
# A blocked `wait` survives a service restart for this long instead of failing the executor.
WAIT_RECONNECT_SECONDS = 60.0
RETRY_PAUSE_SECONDS = 0.2
# A wait that was lost after running this long had been established: its loss starts a new outage.
WAIT_ESTABLISHED_SECONDS = 1.0
USAGE_TEXT = (
    f"usage: {PROG} [--endpoint ENDPOINT] COMMAND | --version\n"
    f"commands: {', '.join(COMMANDS)}\n"
    "ENDPOINT: the service's socket, as a path or unix:PATH (the ECP socket beside it is used),\n"
    f"or the ECP socket itself (*{ECP_SOCKET_SUFFIX}); ${ENDPOINT_ENV} wins over --endpoint;\n"
    f"default {DEFAULT_ENDPOINT}\n"
)


class EcpError(Exception):
    """One line for stderr, and the exit status that goes with it."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(" ".join(message.split()))
        self.exit_code = exit_code


class ServiceUnreachable(EcpError):
    """No answer: the socket is missing or refuses, or the service left before answering."""


def bad_input(message: str) -> EcpError:
    return EcpError(message, EXIT_BAD_INPUT)


# ---- framing: what can be checked without decoding ----


def frame_length(header: bytes, expected: str) -> int:
    """The length a frame's header announces; refused when missing, short or over the cap."""
    if not header:
        raise bad_input(f"no input: expected a length-prefixed {expected} on stdin")
    if len(header) < FRAME_HEADER_BYTES:
        raise bad_input(f"truncated frame: {len(header)} of {FRAME_HEADER_BYTES} length bytes")
    length = int.from_bytes(header, sys.byteorder)
    if length > MAX_FRAME_BYTES:
        raise bad_input(f"frame of {length} bytes exceeds the limit of {MAX_FRAME_BYTES} bytes")
    return length


def check_payload(length: int, payload: bytes) -> None:
    if len(payload) < length:
        raise bad_input(f"truncated frame: header announces {length} bytes, got {len(payload)}")


def read_frame(stream: BinaryIO, expected: str) -> bytes:
    """Read exactly one length-prefixed message and nothing more; returns the payload.

    The agent keeps its end of our stdin open after writing, so reading to EOF could block
    forever; a short read is a truncated frame."""
    length = frame_length(_read_exactly(stream, FRAME_HEADER_BYTES), expected)
    payload = _read_exactly(stream, length)
    check_payload(length, payload)
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


def frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(FRAME_HEADER_BYTES, sys.byteorder) + payload


# ---- arguments and endpoint ----


def parse_arguments(argv: Sequence[str], environ: Mapping[str, str]) -> tuple[str, str]:
    """`[--endpoint E | --endpoint=E] COMMAND` -> (command, endpoint); hand-parsed, as argparse
    would cost start-up time on every call the agent makes."""
    endpoint, command, args = "", "", list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            return "help", ""
        if arg == "--version":
            return "version", ""
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


def ecp_socket_path(endpoint: str) -> str:
    """A socket path, `unix:PATH` or `unix:///PATH` -> the ECP socket's absolute path: the
    API socket `NAME.sock` has its ECP socket `NAME.mesos.sock` beside it."""
    if endpoint.startswith("unix://"):
        path = endpoint[len("unix://") :]
    elif endpoint.startswith("unix:"):
        path = endpoint[len("unix:") :]
    elif endpoint.startswith(("/", ".")) or ":" not in endpoint:
        path = endpoint
    else:
        raise bad_input(
            f"endpoint {endpoint!r}: host:port is not supported; {PROG} runs on the service's"
            " node and talks to its Unix socket (a path or unix:PATH)"
        )
    path = os.path.abspath(path)
    if path.endswith(ECP_SOCKET_SUFFIX):
        return path
    return path.removesuffix(".sock") + ECP_SOCKET_SUFFIX


# ---- the exchange with the service ----


def request_bytes(command: str, stdin: BinaryIO, environ: Mapping[str, str]) -> bytes:
    """The command line, the agent's environment for a launch (the service derives the
    executor's environment from it), then the agent's frame, checked, as it came."""
    request = [command.encode() + b"\n"]
    if command == "launch":
        variables = "\0".join(f"{name}={value}" for name, value in environ.items())
        request.append(frame(variables.encode("utf-8", "surrogateescape")))
    message = COMMANDS[command][0]
    if message:
        request.append(frame(read_frame(stdin, message)))
    return b"".join(request)


def exchange(path: str, request: bytes, timeout: float | None) -> tuple[int, bytes, bytes]:
    """One call on the ECP socket -> (exit status, stderr bytes, stdout bytes)."""
    connection = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        try:
            connection.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:  # not up (yet, or again)
            raise ServiceUnreachable(f"service not reachable at {path}: {exc.strerror}") from None
        except OSError as exc:  # permission denied: the socket is root's
            raise EcpError(f"service not reachable at {path}: {exc.strerror or exc}") from None
        try:
            connection.sendall(request)
            return _read_answer(connection, path, timeout)
        except TimeoutError:
            raise EcpError(f"no answer from the service at {path} in {timeout:g} s") from None
        except OSError as exc:  # a reset or a broken pipe: the service went away mid-call
            raise ServiceUnreachable(f"the service at {path} left mid-call: {exc}") from None
    finally:
        connection.close()


def _read_answer(
    connection: _socket.socket, path: str, timeout: float | None
) -> tuple[int, bytes, bytes]:
    """The service's answer, `EXIT ERR_BYTES OUT_BYTES\\n` and both, read until complete."""
    deadline = None if timeout is None else time.monotonic() + timeout
    received = b""
    sizes: tuple[int, int, int] | None = None
    while sizes is None or len(received) < sizes[1] + sizes[2]:
        if deadline is not None:
            connection.settimeout(max(0.001, deadline - time.monotonic()))
        chunk = connection.recv(65536)
        if not chunk:
            raise ServiceUnreachable(f"the service at {path} left before answering")
        received += chunk
        if sizes is None and b"\n" in received:
            header, _, received = received.partition(b"\n")
            sizes = _answer_sizes(header, path)
    code, stderr_size, stdout_size = sizes
    return code, received[:stderr_size], received[stderr_size : stderr_size + stdout_size]


def _answer_sizes(header: bytes, path: str) -> tuple[int, int, int]:
    try:
        code, stderr_size, stdout_size = (int(field) for field in header.split())
    except ValueError:
        raise EcpError(
            f"the service at {path} answered {header[:80]!r}, not an ECP answer"
        ) from None
    return code, stderr_size, stdout_size


def call_with_retries(
    command: str, path: str, request: bytes, timeout: float | None
) -> tuple[int, bytes, bytes]:
    """`wait` rides out a service restart of up to a minute, `recover` waits up to 30 s for the
    service to come up; every other call fails at once when the service is away."""
    if command not in ("wait", "recover"):
        return exchange(path, request, timeout)
    give_up = time.monotonic() + RECOVER_TIMEOUT_SECONDS if command == "recover" else None
    while True:
        started = time.monotonic()
        try:
            return exchange(path, request, timeout)
        except ServiceUnreachable:
            now = time.monotonic()
            if give_up is None or (command == "wait" and now - started > WAIT_ESTABLISHED_SECONDS):
                give_up = now + WAIT_RECONNECT_SECONDS  # a new outage, not a retry failing
            if now + RETRY_PAUSE_SECONDS >= give_up:
                raise
            time.sleep(RETRY_PAUSE_SECONDS)


# ---- one call ----


def run(
    argv: Sequence[str],
    stdin: BinaryIO,
    stdout: BinaryIO,
    stderr: TextIO,
    environ: Mapping[str, str],
) -> int:
    """One protocol call; returns the exit status. Every failure is one line on stderr."""
    command = ""
    try:
        command, endpoint = parse_arguments(argv, environ)
        if command == "help":
            stdout.write(USAGE_TEXT.encode())
            return 0
        if command == "version":
            stdout.write(f"{PROG} {_package_version()}\n".encode())
            return 0
        if command not in COMMANDS:
            raise bad_input(f"unknown command {command!r}; expected one of {', '.join(COMMANDS)}")
        path = ecp_socket_path(endpoint)
        request = request_bytes(command, stdin, environ)
        timeout = COMMANDS[command][1]
        code, service_stderr, service_stdout = call_with_retries(command, path, request, timeout)
        stderr.write(service_stderr.decode("utf-8", "replace"))
        stdout.write(service_stdout)
        return code
    except EcpError as exc:
        print(f"{_prefix(command)}{exc}", file=stderr)
        return exc.exit_code
    except Exception as exc:  # the agent must get one line, whatever broke
        detail = " ".join(str(exc).split())
        print(f"{_prefix(command)}internal error: {type(exc).__name__}: {detail}", file=stderr)
        return EXIT_FAILURE


def _package_version() -> str:
    from importlib import metadata  # only when asked: every other call starts without it

    try:
        return metadata.version("containerizer-adapter")
    except metadata.PackageNotFoundError:
        return "unknown (not installed as a package)"


def _prefix(command: str) -> str:
    return f"{PROG}: {command}: " if command in COMMANDS else f"{PROG}: "


def main() -> NoReturn:
    """Run one call, then leave without interpreter teardown, which does nothing useful here
    once the reply is flushed."""
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
