"""The service's ECP socket (adapter/server/mesos.py) on its own: raw requests sent straight to
it, as anything root runs could send them, against a fake containerizer.v1 servicer that records
what reaches it. The program in front of it is tested in test_mesos_ecp_program.py."""

from __future__ import annotations

import asyncio
import re
import shutil
import stat
import struct
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.api.mesos import containerizer_pb2 as ecp
from adapter.api.mesos import mesos_pb2 as mesos
from adapter.core.config import parse_config
from adapter.core.errors import ConfigError
from adapter.server.mesos import EcpEndpoint, start_ecp_endpoint
from tests.unit.test_mesos_translate import command_task_launch, shell_command

MIB = 1024 * 1024


class RecordingApi:
    """Records every request; `wait` blocks until released, and notes when it was abandoned."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, Any]] = []
        self.wait_started = asyncio.Event()
        self.wait_abandoned = asyncio.Event()
        self.release_wait = asyncio.Event()

    async def Launch(self, request: Any, context: Any) -> pb.LaunchResponse:
        self.requests.append(("Launch", request))
        return pb.LaunchResponse(status=pb.ContainerStatus(state=pb.RUNNING))

    async def Update(self, request: Any, context: Any) -> pb.UpdateResponse:
        self.requests.append(("Update", request))
        return pb.UpdateResponse()

    async def Usage(self, request: Any, context: Any) -> pb.UsageResponse:
        self.requests.append(("Usage", request))
        return pb.UsageResponse(statistics=pb.ResourceStatistics(timestamp=1.0))

    async def Wait(self, request: Any, context: Any) -> pb.WaitResponse:
        self.requests.append(("Wait", request))
        self.wait_started.set()
        try:
            await self.release_wait.wait()
        except asyncio.CancelledError:
            self.wait_abandoned.set()
            raise
        return pb.WaitResponse(termination=pb.Termination(exit_code=0, status=0))

    async def Destroy(self, request: Any, context: Any) -> pb.DestroyResponse:
        self.requests.append(("Destroy", request))
        raise RuntimeError("a bug\nover two lines")

    async def Containers(self, request: Any, context: Any) -> pb.ContainersResponse:
        self.requests.append(("Containers", request))
        return pb.ContainersResponse()


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="ecp-", dir="/tmp"))  # short: sun_path is 108 bytes
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
async def served(socket_dir: Path) -> AsyncIterator[tuple[EcpEndpoint, RecordingApi]]:
    api = RecordingApi()
    endpoint = EcpEndpoint(api, socket_dir / "c.mesos.sock")
    await endpoint.start()
    yield endpoint, api
    api.release_wait.set()
    await endpoint.close()


def frame(payload: bytes) -> bytes:
    return struct.pack("=I", len(payload)) + payload


def message(value: Any) -> bytes:
    return frame(value.SerializeToString())


NO_ENVIRONMENT = frame(b"")


async def send(endpoint: EcpEndpoint, request: bytes) -> tuple[int, str, bytes]:
    """The whole request, then end of input; -> (exit status, stderr text, stdout bytes)."""
    reader, writer = await asyncio.open_unix_connection(str(endpoint.socket_path))
    writer.write(request)
    writer.write_eof()
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    header, _, body = answer.partition(b"\n")
    code, stderr_size, stdout_size = (int(field) for field in header.split())
    assert len(body) == stderr_size + stdout_size
    return code, body[:stderr_size].decode(), body[stderr_size:]


def launch(launch_message: ecp.Launch, environment: bytes = NO_ENVIRONMENT) -> bytes:
    return b"launch\n" + environment + message(launch_message)


BAD_REQUESTS = {
    "no command line": (b"", "no command line"),
    "unknown command": (b"frobnicate\n", "unknown command 'frobnicate'"),
    "truncated header": (b"launch\n" + NO_ENVIRONMENT + b"\x01\x00", "truncated frame: 2 of 4"),
    "length beyond the bytes": (b"wait\n" + struct.pack("=I", 100) + b"short", "announces 100"),
    "over 64 MiB": (b"usage\n" + struct.pack("=I", 64 * MIB + 1), "exceeds the limit"),
    "garbage in a frame": (b"wait\n" + frame(b"\xff\xfe\xfd\xfc"), "cannot decode"),
    "no container id": (launch(command_task_launch("", shell_command("true"))), "no container_id"),
    "no command": (launch(command_task_launch("abc", mesos.CommandInfo())), "has no command"),
    "a container id not UTF-8": (b"usage\n" + frame(b"\x0a\x03\x0a\x01\xff"), "not UTF-8"),
    "a command not UTF-8": (
        launch(command_task_launch("abc", shell_command("echo MARK"))).replace(
            b"MARK", b"\xff" * 4
        ),
        "not UTF-8",
    ),
    "an environment not UTF-8": (
        launch(command_task_launch("abc", shell_command("true")), frame(b"MESOS_X=\xff")),
        "MESOS_X.* not UTF-8",
    ),
}


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
async def test_bad_requests_straight_to_the_socket_are_refused_before_the_api(
    served: tuple[EcpEndpoint, RecordingApi], case: str
) -> None:
    endpoint, api = served
    request, pattern = BAD_REQUESTS[case]
    code, stderr, stdout = await send(endpoint, request)
    assert (code, stdout) == (2, b"")
    assert stderr.count("\n") == 1 and stderr.startswith("containerizer-mesos: "), stderr
    assert re.search(pattern, stderr), stderr
    assert api.requests == []


@pytest.mark.parametrize("cid", ["c", "4ed6a2d1-2f1b-4d5e-9c3a-1f2e3d4c5b6a", "x" * 300, "ünïcode"])
async def test_usage_asks_for_the_agents_container_and_answers_a_frame(
    served: tuple[EcpEndpoint, RecordingApi], cid: str
) -> None:
    endpoint, api = served
    usage = ecp.Usage()
    usage.container_id.value = cid
    # What a newer agent may add: fields this Usage does not know are ignored.
    unknown_fields = b"\x9a\x06\x03abc" + b"\x90\x06\x01" + b"\x1d\x00\x00\x80\x3f"
    code, stderr, stdout = await send(
        endpoint, b"usage\n" + frame(usage.SerializeToString() + unknown_fields)
    )
    assert (code, stderr) == (0, "")
    assert api.requests == [("Usage", pb.UsageRequest(container_id=cid))]
    (length,) = struct.unpack("=I", stdout[:4])
    assert len(stdout) == 4 + length
    assert mesos.ResourceStatistics.FromString(stdout[4:]).timestamp == 1.0


async def test_the_agents_environment_reaches_the_executors(
    served: tuple[EcpEndpoint, RecordingApi],
) -> None:
    endpoint, api = served
    environment = frame(b"MESOS_RECOVERY_TIMEOUT=15mins\0PATH=/agent/bin\0MESOS_EMPTY=")
    code, stderr, _ = await send(
        endpoint, launch(command_task_launch("c1", shell_command("true")), environment)
    )
    assert (code, stderr) == (0, "")
    [(method, request)] = api.requests
    variables = {variable.name: variable.value for variable in request.command.environment}
    assert method == "Launch"
    assert variables["MESOS_RECOVERY_TIMEOUT"] == "15mins"
    assert variables["MESOS_EMPTY"] == ""
    assert "PATH" not in variables  # the agent's own, not an executor's


async def test_an_unexpected_failure_is_one_line_exit_1(
    served: tuple[EcpEndpoint, RecordingApi],
) -> None:
    endpoint, _ = served
    destroy = ecp.Destroy()
    destroy.container_id.value = "c1"
    code, stderr, stdout = await send(endpoint, b"destroy\n" + message(destroy))
    assert (code, stdout) == (1, b"")
    assert (
        stderr
        == "containerizer-mesos: destroy: internal error: RuntimeError: a bug over two lines\n"
    )


async def test_the_socket_is_root_only_replaces_a_stale_one_and_goes_at_close(
    socket_dir: Path,
) -> None:
    path = socket_dir / "c.mesos.sock"
    path.write_text("left by a crashed run")
    endpoint = EcpEndpoint(RecordingApi(), path)
    await endpoint.start()
    mode = path.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    await endpoint.close()
    assert not path.exists()


async def start_wait(
    endpoint: EcpEndpoint, api: RecordingApi
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A program's `wait`, pending in the API; its connection kept open, as the program does."""
    wait = ecp.Wait()
    wait.container_id.value = "c1"
    reader, writer = await asyncio.open_unix_connection(str(endpoint.socket_path))
    writer.write(b"wait\n" + message(wait))
    await asyncio.wait_for(api.wait_started.wait(), timeout=5)
    return reader, writer


async def test_a_wait_whose_program_left_is_abandoned(
    served: tuple[EcpEndpoint, RecordingApi],
) -> None:
    endpoint, api = served
    _, writer = await start_wait(endpoint, api)
    writer.close()  # the agent killed the program
    await writer.wait_closed()
    await asyncio.wait_for(api.wait_abandoned.wait(), timeout=5)


async def test_a_stopping_service_leaves_pending_waits_unanswered_at_once(
    socket_dir: Path,
) -> None:
    api = RecordingApi()
    endpoint = EcpEndpoint(api, socket_dir / "c.mesos.sock")
    await endpoint.start()
    reader, writer = await start_wait(endpoint, api)
    started = time.monotonic()
    await endpoint.close()
    assert time.monotonic() - started < 1.0  # no grace period spent on a wait
    # End of file and no answer: the program reconnects to the next service and waits again.
    assert await asyncio.wait_for(reader.read(), timeout=5) == b""
    assert api.wait_abandoned.is_set()
    writer.close()
    await writer.wait_closed()


async def test_the_socket_is_beside_the_api_socket_unless_the_config_names_one(
    socket_dir: Path,
) -> None:
    assert parse_config({}).mesos_socket is None
    beside = await start_ecp_endpoint(RecordingApi(), socket_dir / "api.sock")
    elsewhere = socket_dir / "sub" / "agent.mesos.sock"
    configured = parse_config({"mesos_socket": str(elsewhere)}).mesos_socket
    named = await start_ecp_endpoint(RecordingApi(), socket_dir / "api.sock", configured)
    try:
        assert beside.socket_path == socket_dir / "api.mesos.sock"
        assert named.socket_path == elsewhere and stat.S_ISSOCK(elsewhere.stat().st_mode)
    finally:
        await beside.close()
        await named.close()


@pytest.mark.parametrize("value", ["relative.mesos.sock", "/run/agent.sock"])
def test_a_mesos_socket_the_program_could_not_name_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match=re.escape("mesos_socket: expected an absolute path")):
        parse_config({"mesos_socket": value})
