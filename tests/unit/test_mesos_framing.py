"""containerizer-mesos in-process: framing, arguments, endpoints, and every bad input the program
can see refused before the service is contacted (no service exists here: an exchange with one
fails the test). What only decoding can find is refused by the service: test_mesos_endpoint.py."""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import struct
import tempfile
import threading
from collections.abc import Iterator

import pytest

from adapter.clients.mesos import program as mesos_ecp


def frame(payload: bytes) -> bytes:
    return struct.pack("=I", len(payload)) + payload


def no_exchange(path: str, request: bytes, timeout: float | None) -> tuple[int, bytes, bytes]:
    """Stands in for mesos_ecp.exchange: bad input must never reach the service."""
    raise AssertionError(f"the service was contacted at {path}")


@pytest.fixture
def no_service(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mesos_ecp, "exchange", no_exchange)


def run(
    argv: list[str], stdin: bytes, environ: dict[str, str] | None = None
) -> tuple[int, bytes, str]:
    stdout, stderr = io.BytesIO(), io.StringIO()
    code = mesos_ecp.run(argv, io.BytesIO(stdin), stdout, stderr, environ or {})
    return code, stdout.getvalue(), stderr.getvalue()


# ---- framing ----


def test_frame_is_native_uint32_length_then_payload() -> None:
    assert mesos_ecp.frame(b"abc") == struct.pack("=I", 3) + b"abc"
    assert mesos_ecp.FRAME_HEADER_BYTES == 4


def test_read_frame_reads_exactly_one_frame() -> None:
    stream = io.BytesIO(frame(b"hello") + b"trailing bytes are not ours")
    assert mesos_ecp.read_frame(stream, "X") == b"hello"
    assert stream.read() == b"trailing bytes are not ours"


def test_empty_frame_is_an_empty_message() -> None:
    assert mesos_ecp.read_frame(io.BytesIO(frame(b"")), "X") == b""


class Trickle(io.RawIOBase):
    """A pipe that hands out one byte per read, as a slow writer would."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        chunk, self.data = self.data[:1], self.data[1:]
        return chunk


def test_read_frame_assembles_short_reads() -> None:
    assert mesos_ecp.read_frame(Trickle(frame(b"slowly")), "X") == b"slowly"  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("stdin", "message"),
    [
        (b"", "no input"),
        (b"\x05\x00", "truncated frame: 2 of 4"),
        (struct.pack("=I", 100) + b"only a few bytes", "announces 100 bytes, got 16"),
        (struct.pack("=I", 64 * 1024 * 1024 + 1), "exceeds the limit"),
        (b"GET / HTTP/1.1\r\n\r\n", "exceeds the limit"),
    ],
)
def test_bad_frames_are_refused(stdin: bytes, message: str) -> None:
    with pytest.raises(mesos_ecp.EcpError, match=message) as caught:
        mesos_ecp.read_frame(io.BytesIO(stdin), "mesos.containerizer.Launch")
    assert caught.value.exit_code == mesos_ecp.EXIT_BAD_INPUT


def test_a_frame_of_exactly_64_mib_is_allowed() -> None:
    payload = b"\x00" * mesos_ecp.MAX_FRAME_BYTES
    assert len(mesos_ecp.read_frame(io.BytesIO(frame(payload)), "X")) == len(payload)


# ---- arguments and endpoint ----


def test_endpoint_precedence_environment_then_flag_then_default() -> None:
    env = {"CONTAINERIZER_ENDPOINT": "unix:/env.sock"}
    assert mesos_ecp.parse_arguments(["--endpoint", "/flag.sock", "usage"], env) == (
        "usage",
        "unix:/env.sock",
    )
    assert mesos_ecp.parse_arguments(["--endpoint=/flag.sock", "usage"], {}) == (
        "usage",
        "/flag.sock",
    )
    assert mesos_ecp.parse_arguments(["usage"], {"CONTAINERIZER_ENDPOINT": ""}) == (
        "usage",
        mesos_ecp.DEFAULT_ENDPOINT,
    )


def test_endpoint_after_the_command_is_accepted() -> None:
    assert mesos_ecp.parse_arguments(["wait", "--endpoint", "h:1"], {}) == ("wait", "h:1")


@pytest.mark.parametrize(
    ("endpoint", "ecp_socket"),
    [
        ("/run/c.sock", "/run/c.mesos.sock"),
        ("unix:/run/c.sock", "/run/c.mesos.sock"),
        ("unix:///run/c.sock", "/run/c.mesos.sock"),
        ("/run/api", "/run/api.mesos.sock"),
        ("unix:/run/c.mesos.sock", "/run/c.mesos.sock"),
        ("c.sock", f"{os.getcwd()}/c.mesos.sock"),
    ],
)
def test_endpoint_forms_name_the_ecp_socket_beside_the_api_socket(
    endpoint: str, ecp_socket: str
) -> None:
    assert mesos_ecp.ecp_socket_path(endpoint) == ecp_socket


def test_a_tcp_endpoint_is_bad_input() -> None:
    with pytest.raises(mesos_ecp.EcpError, match="host:port is not supported") as caught:
        mesos_ecp.ecp_socket_path("localhost:7070")
    assert caught.value.exit_code == mesos_ecp.EXIT_BAD_INPUT


def test_help_goes_to_stdout_and_exits_zero() -> None:
    code, out, err = run(["--help"], b"")
    assert code == 0 and b"usage: containerizer-mesos" in out and err == ""


# ---- bad input end to end (in-process): one line, exit 2, nothing sent ----


BAD_INPUTS = {
    "truncated header": (["launch"], b"\x01\x00", "truncated frame"),
    "length beyond the bytes": (
        ["launch"],
        struct.pack("=I", 4096) + b"\x0a\x00",
        "announces 4096",
    ),
    "over 64 MiB": (["usage"], struct.pack("=I", 2**31), "exceeds the limit"),
    "garbage, no frame": (
        ["destroy"],
        b"\x00garbage\x00garbage",
        "exceeds the limit|cannot decode",
    ),
    "unknown command": (["frobnicate"], b"", "unknown command 'frobnicate'"),
    "no command word": ([], b"", "no command given"),
    "empty stdin": (["wait"], b"", "no input"),
    "a TCP endpoint": (["--endpoint", "10.0.0.1:7070", "usage"], frame(b""), "host:port"),
}


@pytest.mark.usefixtures("no_service")
@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_nothing_sent(case: str) -> None:
    argv, stdin, message = BAD_INPUTS[case]
    code, out, err = run(argv, stdin)
    assert code == mesos_ecp.EXIT_BAD_INPUT
    assert out == b""
    assert err.count("\n") == 1 and err.startswith("containerizer-mesos: ")
    assert "Traceback" not in err
    assert re.search(message, err), err


def test_an_internal_fault_is_still_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(path: str, request: bytes, timeout: float | None) -> tuple[int, bytes, bytes]:
        raise RuntimeError("something\nmultiline")

    monkeypatch.setattr(mesos_ecp, "exchange", broken)
    code, _, err = run(["containers"], b"")
    assert code == mesos_ecp.EXIT_FAILURE
    assert (
        err
        == "containerizer-mesos: containers: internal error: RuntimeError: something multiline\n"
    )


# ---- the exchange with the service's ECP socket ----


@pytest.fixture
def ecp_socket() -> Iterator[tuple[str, socket.socket]]:
    directory = tempfile.mkdtemp(prefix="ecp-", dir="/tmp")  # short: sun_path is 108 bytes
    path = os.path.join(directory, "c.mesos.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    yield path, listener
    listener.close()
    shutil.rmtree(directory, ignore_errors=True)


def answer_once(listener: socket.socket, reply: bytes, read: int) -> threading.Thread:
    """A service that reads `read` bytes of the request, sends `reply` and closes."""

    def serve() -> None:
        connection, _ = listener.accept()
        with connection:
            connection.recv(read)
            connection.sendall(reply)

    thread = threading.Thread(target=serve)
    thread.start()
    return thread


def test_an_answer_is_complete_even_when_the_service_resets_after_it(
    ecp_socket: tuple[str, socket.socket],
) -> None:
    # A service that closes with part of the request unread resets the connection after its
    # answer (Linux): what was answered still counts.
    path, listener = ecp_socket
    thread = answer_once(listener, b"2 9 3\nrefused\n\nabc", read=5)
    assert mesos_ecp.exchange(path, b"x" * 100_000, timeout=10) == (2, b"refused\n\n", b"abc")
    thread.join()


def test_a_service_that_leaves_mid_answer_is_unreachable(
    ecp_socket: tuple[str, socket.socket],
) -> None:
    path, listener = ecp_socket
    thread = answer_once(listener, b"0 0 10\nabc", read=100)
    with pytest.raises(mesos_ecp.ServiceUnreachable, match="left before answering"):
        mesos_ecp.exchange(path, b"wait\n", timeout=10)
    thread.join()


def test_a_service_that_does_not_answer_in_time_is_one_failure(
    ecp_socket: tuple[str, socket.socket],
) -> None:
    path, _ = ecp_socket  # listening, never accepting: the call queues and nobody answers
    with pytest.raises(mesos_ecp.EcpError, match=r"no answer from the service at .* in 0.2 s"):
        mesos_ecp.exchange(path, b"usage\n", timeout=0.2)
