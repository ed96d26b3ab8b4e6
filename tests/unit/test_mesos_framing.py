"""containerizer-mesos in-process: framing, arguments, endpoints, and every bad input refused
before the service is contacted (no service exists here: constructing one fails the test)."""

from __future__ import annotations

import io
import re
import struct

import pytest

from adapter.api.mesos import containerizer_pb2 as ecp
from adapter.api.mesos import mesos_pb2 as mesos
from adapter.clients.mesos import program as mesos_ecp
from tests.unit.test_mesos_translate import command_task_launch, shell_command


def frame(payload: bytes) -> bytes:
    return struct.pack("=I", len(payload)) + payload


class NoService:
    """Stands in for mesos_ecp.Service: bad input must never reach the service."""

    def __init__(self, endpoint: str) -> None:
        raise AssertionError(f"the service was contacted at {endpoint}")


@pytest.fixture
def no_service(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mesos_ecp, "Service", NoService)


def run(
    argv: list[str], stdin: bytes, environ: dict[str, str] | None = None
) -> tuple[int, bytes, str]:
    stdout, stderr = io.BytesIO(), io.StringIO()
    code = mesos_ecp.run(argv, io.BytesIO(stdin), stdout, stderr, environ or {})
    return code, stdout.getvalue(), stderr.getvalue()


# ---- framing ----


def test_frame_is_native_uint32_length_then_payload() -> None:
    out = io.BytesIO()
    mesos_ecp.write_frame(out, b"abc")
    assert out.getvalue() == struct.pack("=I", 3) + b"abc"
    assert mesos_ecp.FRAME_HEADER.size == 4


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
    ("endpoint", "target"),
    [
        ("/run/c.sock", "unix:/run/c.sock"),
        ("unix:/run/c.sock", "unix:/run/c.sock"),
        ("unix:///run/c.sock", "unix:///run/c.sock"),
        ("localhost:7070", "localhost:7070"),
    ],
)
def test_endpoint_forms(endpoint: str, target: str) -> None:
    assert mesos_ecp.grpc_target(endpoint) == target


def test_help_goes_to_stdout_and_exits_zero() -> None:
    code, out, err = run(["--help"], b"")
    assert code == 0 and b"usage: containerizer-mesos" in out and err == ""


# ---- bad input end to end (in-process): one line, exit 2, nothing sent ----


def launch_bytes(launch: ecp.Launch) -> bytes:
    return frame(launch.SerializeToString())


BAD_INPUTS = {
    "truncated header": (["launch"], b"\x01\x00", "truncated frame"),
    "length beyond the bytes": (
        ["launch"],
        struct.pack("=I", 4096) + b"\x0a\x00",
        "announces 4096",
    ),
    "over 64 MiB": (["usage"], struct.pack("=I", 2**31), "exceeds the limit"),
    "garbage in a frame": (["wait"], frame(b"\xff\xfe\xfd\xfc"), "cannot decode"),
    "garbage, no frame": (
        ["destroy"],
        b"\x00garbage\x00garbage",
        "exceeds the limit|cannot decode",
    ),
    "no container id": (
        ["launch"],
        launch_bytes(command_task_launch("", shell_command("true"))),
        "no container_id",
    ),
    "no command": (
        ["launch"],
        launch_bytes(command_task_launch("abc", mesos.CommandInfo())),
        "has no command",
    ),
    "unknown command": (["frobnicate"], b"", "unknown command 'frobnicate'"),
    "no command word": ([], b"", "no command given"),
    "empty stdin": (["wait"], b"", "no input"),
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
    def broken(call: mesos_ecp.Call) -> None:
        raise RuntimeError("something\nmultiline")

    monkeypatch.setitem(mesos_ecp.COMMANDS, "containers", broken)
    code, _, err = run(["containers"], b"")
    assert code == mesos_ecp.EXIT_FAILURE
    assert (
        err
        == "containerizer-mesos: containers: internal error: RuntimeError: something multiline\n"
    )
