"""containerizer-mesos as the agent runs it — one subprocess per call, framed bytes in and out —
against the service's real ECP socket (adapter/server/mesos.py) in front of a fake
containerizer.v1 servicer, so the whole path from the agent's bytes to the API requests is
exercised and every request can be inspected. The real service is driven by
tests/integration/test_mesos_ecp.py."""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.api.mesos import containerizer_pb2 as ecp
from adapter.api.mesos import mesos_pb2 as mesos
from adapter.clients.mesos.program import ecp_socket_path
from adapter.server.mesos import EcpEndpoint
from tests.unit.test_mesos_translate import (
    command_task_launch,
    executor_launch,
    scalar,
    shell_command,
)

SCRIPT = Path(sys.executable).parent / "containerizer-mesos"
PROGRAM = (
    [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "adapter.clients.mesos.program"]
)


class FakeService:
    """Answers like the service's servicer would, and records every request."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, Any]] = []
        self.release_wait = threading.Event()
        self.release_wait.set()

    def methods(self) -> list[str]:
        return [name for name, _ in self.requests]

    async def Launch(self, request: pb.LaunchRequest, context: Any) -> pb.LaunchResponse:
        self.requests.append(("Launch", request))
        if request.container_id == "duplicate":
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS, "container duplicate already exists"
            )
        status = pb.ContainerStatus(container_id=request.container_id, state=pb.RUNNING)
        if request.container_id == "fails":
            status.state = pb.TERMINATED
            status.termination.reason = pb.LAUNCH_FAILED
            status.termination.message = "exec: no such file"
        return pb.LaunchResponse(status=status, warnings=["mem raised to 32 MiB"])

    async def Update(self, request: pb.UpdateRequest, context: Any) -> pb.UpdateResponse:
        self.requests.append(("Update", request))
        return pb.UpdateResponse()

    async def Usage(self, request: pb.UsageRequest, context: Any) -> pb.UsageResponse:
        self.requests.append(("Usage", request))
        if request.container_id == "missing":
            await context.abort(grpc.StatusCode.NOT_FOUND, "container 'missing' not found")
        statistics = pb.ResourceStatistics(
            cpus_limit=0.5, mem_limit_bytes=64 << 20, mem_rss_bytes=1 << 20, processes=3
        )
        return pb.UsageResponse(statistics=statistics)

    async def Wait(self, request: pb.WaitRequest, context: Any) -> pb.WaitResponse:
        self.requests.append(("Wait", request))
        deadline = time.monotonic() + 30
        while not self.release_wait.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if request.container_id == "sleeper":
            termination = pb.Termination(signal=9, status=9, killed=True, reason=pb.DESTROYED)
        else:
            termination = pb.Termination(exit_code=3, status=768, reason=pb.EXITED)
        return pb.WaitResponse(termination=termination)

    async def Destroy(self, request: pb.DestroyRequest, context: Any) -> pb.DestroyResponse:
        self.requests.append(("Destroy", request))
        return pb.DestroyResponse()

    async def Containers(
        self, request: pb.ContainersRequest, context: Any
    ) -> pb.ContainersResponse:
        self.requests.append(("Containers", request))
        return pb.ContainersResponse(
            containers=[
                pb.ContainerStatus(container_id="running", state=pb.RUNNING),
                pb.ContainerStatus(container_id="done", state=pb.TERMINATED),
                pb.ContainerStatus(container_id="going", state=pb.DESTROYING),
            ]
        )


class Served:
    """The ECP socket of a service whose API socket would be `socket`, on a loop of its own."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket
        self.endpoint = f"unix:{socket}"
        self.fake = FakeService()
        self.ecp = EcpEndpoint(self.fake, Path(ecp_socket_path(str(socket))))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self._on_loop(self.ecp.start())
        self.serving = True

    def _on_loop(self, work: Any) -> None:
        asyncio.run_coroutine_threadsafe(work, self.loop).result(timeout=30)

    def go_away(self) -> None:
        """What a stopping service does: pending calls are abandoned, the socket removed."""
        if self.serving:
            self.serving = False
            self._on_loop(self.ecp.close())

    def stop(self) -> None:
        self.fake.release_wait.set()
        self.go_away()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="ecp-", dir="/tmp"))  # short: sun_path is 108 bytes
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def served(socket_dir: Path) -> Iterator[Served]:
    instance = Served(socket_dir / "fake.sock")
    yield instance
    instance.stop()


def frame(message: Any) -> bytes:
    payload = message.SerializeToString()
    return struct.pack("=I", len(payload)) + payload


def unframe(data: bytes) -> bytes:
    (length,) = struct.unpack("=I", data[:4])
    assert len(data) == 4 + length, "exactly one frame on stdout"
    return data[4:]


def ecp_call(
    endpoint: str, command: str, stdin: bytes = b"", **kwargs: Any
) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "CONTAINERIZER_ENDPOINT": endpoint}
    return subprocess.run(
        [*PROGRAM, command], input=stdin, capture_output=True, env=env, timeout=60, **kwargs
    )


def test_launch_sends_the_translated_request_and_returns(served: Served) -> None:
    launch = command_task_launch(
        "c1", shell_command("exit 3"), [scalar("cpus", 1), scalar("mem", 64)]
    )
    result = ecp_call(served.endpoint, "launch", frame(launch))
    assert result.returncode == 0, result.stderr
    assert result.stdout == b""
    assert b"warning: mem raised to 32 MiB" in result.stderr  # the service's adjustments, logged
    [(method, request)] = served.fake.requests
    assert method == "Launch"
    assert request.container_id == "c1"
    assert request.command.shell == "exit 3"
    assert {r.name: r.scalar.value for r in request.resources} == pytest.approx(
        {"cpus": 1.1, "mem": 96}
    )
    env = {v.name: v.value for v in request.command.environment}
    assert env["MESOS_EXECUTOR_ID"] == "T1" and env["MESOS_CHECKPOINT"] == "1"


def test_launch_refused_by_the_service_is_one_line_exit_1(served: Served) -> None:
    result = ecp_call(
        served.endpoint, "launch", frame(executor_launch("duplicate", shell_command("true")))
    )
    assert result.returncode == 1
    assert (
        result.stderr
        == b"containerizer-mesos: launch: ALREADY_EXISTS: container duplicate already exists\n"
    )


def test_launch_that_failed_to_start_is_an_error(served: Served) -> None:
    result = ecp_call(
        served.endpoint, "launch", frame(executor_launch("fails", shell_command("x")))
    )
    assert result.returncode == 1
    assert b"failed to start: exec: no such file" in result.stderr


def test_usage_replies_with_mesos_resource_statistics(served: Served) -> None:
    usage = ecp.Usage()
    usage.container_id.value = "c1"
    result = ecp_call(served.endpoint, "usage", frame(usage))
    assert result.returncode == 0, result.stderr
    statistics = mesos.ResourceStatistics.FromString(unframe(result.stdout))
    assert statistics.IsInitialized()  # timestamp present, as Mesos requires
    assert statistics.cpus_limit == 0.5
    assert statistics.mem_limit_bytes == 64 << 20
    assert statistics.processes == 3
    assert abs(statistics.timestamp - time.time()) < 60


def test_usage_of_an_unknown_container_fails_with_the_status(served: Served) -> None:
    usage = ecp.Usage()
    usage.container_id.value = "missing"
    result = ecp_call(served.endpoint, "usage", frame(usage))
    assert result.returncode == 1
    assert result.stdout == b""
    assert result.stderr.startswith(b"containerizer-mesos: usage: NOT_FOUND: ")


@pytest.mark.parametrize(("cid", "killed", "status"), [("exits", False, 768), ("sleeper", True, 9)])
def test_wait_replies_with_the_termination(
    served: Served, cid: str, killed: bool, status: int
) -> None:
    wait = ecp.Wait()
    wait.container_id.value = cid
    result = ecp_call(served.endpoint, "wait", frame(wait))
    assert result.returncode == 0, result.stderr
    termination = ecp.Termination.FromString(unframe(result.stdout))
    assert (termination.killed, termination.status) == (killed, status)
    assert termination.message  # Mesos requires one; derived when the service gave none


def test_wait_survives_a_service_restart(socket_dir: Path) -> None:
    first = Served(socket_dir / "fake.sock")
    first.fake.release_wait.clear()
    wait = ecp.Wait()
    wait.container_id.value = "exits"
    env = {**os.environ, "CONTAINERIZER_ENDPOINT": first.endpoint}
    process = subprocess.Popen(
        [*PROGRAM, "wait"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert process.stdin is not None
    process.stdin.write(frame(wait))
    process.stdin.flush()  # and keep it open, as the agent does
    deadline = time.monotonic() + 20
    while "Wait" not in first.fake.methods() and time.monotonic() < deadline:
        time.sleep(0.02)
    first.go_away()  # the service goes away mid-wait
    second = Served(socket_dir / "fake.sock")
    try:
        out, err = process.communicate(timeout=30)
        first.fake.release_wait.set()
        assert process.returncode == 0, err
        assert ecp.Termination.FromString(unframe(out)).status == 768
        assert second.fake.methods() == ["Wait"]
    finally:
        first.stop()
        second.stop()


def test_destroy_and_update_call_the_service(served: Served) -> None:
    destroy = ecp.Destroy()
    destroy.container_id.value = "sleeper"
    assert ecp_call(served.endpoint, "destroy", frame(destroy)).returncode == 0
    update = ecp.Update(resources=[scalar("cpus", 2), scalar("gpus", 1)])
    update.container_id.value = "sleeper"
    result = ecp_call(served.endpoint, "update", frame(update))
    assert result.returncode == 0, result.stderr
    assert b"warning: Update: ignored resource 'gpus'" in result.stderr
    assert served.fake.methods() == ["Destroy", "Update"]
    assert served.fake.requests[0][1].container_id == "sleeper"
    assert [r.name for r in served.fake.requests[1][1].resources] == ["cpus"]


def test_containers_lists_the_ones_not_terminated_without_reading_stdin(served: Served) -> None:
    # The agent sends nothing and keeps stdin open: reading it would hang.
    env = {**os.environ, "CONTAINERIZER_ENDPOINT": served.endpoint}
    with subprocess.Popen(
        [*PROGRAM, "containers"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    ) as process:
        assert process.stdout is not None
        out = process.stdout.read()
        assert process.wait(timeout=30) == 0
    reply = ecp.Containers.FromString(unframe(out))
    assert [c.value for c in reply.containers] == ["running", "going"]


def test_recover_checks_the_service_and_prints_nothing(served: Served) -> None:
    result = ecp_call(served.endpoint, "recover")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
    assert served.fake.methods() == ["Containers"]


def test_bad_input_launches_nothing(served: Served) -> None:
    no_command = command_task_launch("c9", mesos.CommandInfo())
    for command, stdin in [
        ("launch", frame(no_command)),
        ("launch", b"\x10\x00\x00\x00short"),
        ("launch", b"\xff" * 64),
        ("unknown", b""),
    ]:
        result = ecp_call(served.endpoint, command, stdin)
        assert result.returncode == 2
        assert result.stderr.count(b"\n") == 1 and b"Traceback" not in result.stderr
    assert served.fake.requests == []


def test_unreachable_service_is_one_line(socket_dir: Path) -> None:
    result = ecp_call(f"unix:{socket_dir}/absent.sock", "containers")
    assert result.returncode == 1
    assert result.stderr.startswith(b"containerizer-mesos: containers: service not reachable at ")
    assert result.stderr.count(b"\n") == 1


def test_endpoint_flag_is_used_without_the_environment_variable(served: Served) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CONTAINERIZER_ENDPOINT"}
    result = subprocess.run(
        [*PROGRAM, "--endpoint", str(served.socket), "recover"],
        capture_output=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def imported_modules(argv: list[str], **kwargs: Any) -> set[str]:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", *argv], capture_output=True, timeout=60, **kwargs
    )
    assert result.returncode == 0, result.stderr
    lines = result.stderr.decode().splitlines()
    return {line.rpartition("|")[2].strip() for line in lines if line.startswith("import time:")}


def test_the_program_imports_the_standard_library_only(served: Served) -> None:
    # The agent starts it for every call and polls usage for every container: grpc, protobuf
    # or any other part of the package would multiply what each call costs.
    program = [str(SCRIPT)] if SCRIPT.exists() else ["-m", "adapter.clients.mesos.program"]
    usage = ecp.Usage()
    usage.container_id.value = "c1"
    env = {**os.environ, "CONTAINERIZER_ENDPOINT": served.endpoint}
    loaded = imported_modules([*program, "usage"], input=frame(usage), env=env)
    at_start = imported_modules(["-c", "pass"])
    ours = {"adapter", "adapter.clients", "adapter.clients.mesos", "adapter.clients.mesos.program"}
    added = loaded - at_start - ours
    assert ours <= loaded
    assert {name for name in added if name.split(".")[0] not in sys.stdlib_module_names} == set()
    assert served.fake.methods() == ["Usage"]
