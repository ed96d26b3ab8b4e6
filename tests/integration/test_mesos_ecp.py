"""containerizer-mesos driven exactly as a Mesos agent drives it, against the real service.

One subprocess per call, the input message framed on stdin (and stdin left as the agent leaves
it), the reply read from stdout and decoded with the generated Mesos messages. The `service`
fixture (tests/conftest.py) is a real `containerizer serve`; `fresh_service` is a private one
for the test that kills it.
"""

from __future__ import annotations

import os
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import grpc
import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.api.containerizer.v1 import containerizer_pb2_grpc as pb_grpc
from adapter.api.mesos import containerizer_pb2 as ecp
from adapter.api.mesos import mesos_pb2 as mesos
from adapter.clients.mesos.program import ecp_socket_path
from tests.unit.test_mesos_translate import (
    command_task_launch,
    executor_launch,
    ports,
    scalar,
    shell_command,
)

pytestmark = pytest.mark.integration

SCRIPT = Path(sys.executable).parent / "containerizer-mesos"
PROGRAM = (
    [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "adapter.clients.mesos.program"]
)
MIB = 1024 * 1024


class Service(Protocol):
    endpoint: str

    def restart(self) -> None: ...


class Agent:
    """What the agent does: run the program once per call with framed messages."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint

    def run(self, command: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        env = {**os.environ, "CONTAINERIZER_ENDPOINT": self.endpoint}
        return subprocess.run(
            [*PROGRAM, command], input=stdin, capture_output=True, env=env, timeout=120
        )

    def ok(self, command: str, message: Any | None = None) -> bytes:
        result = self.run(command, frame(message) if message is not None else b"")
        assert result.returncode == 0, f"{command}: {result.stderr.decode()}"
        return result.stdout

    def launch(self, launch: ecp.Launch) -> None:
        assert self.ok("launch", launch) == b""  # returns once running, prints nothing

    def usage(self, container_id: str) -> mesos.ResourceStatistics:
        reply = mesos.ResourceStatistics.FromString(
            unframe(self.ok("usage", with_id(ecp.Usage(), container_id)))
        )
        assert reply.IsInitialized()
        return reply

    def wait(self, container_id: str) -> ecp.Termination:
        return ecp.Termination.FromString(
            unframe(self.ok("wait", with_id(ecp.Wait(), container_id)))
        )

    def destroy(self, container_id: str) -> None:
        self.ok("destroy", with_id(ecp.Destroy(), container_id))

    def containers(self) -> list[str]:
        reply = ecp.Containers.FromString(unframe(self.ok("containers")))
        return [container.value for container in reply.containers]


def frame(message: Any) -> bytes:
    payload = message.SerializeToString()
    return struct.pack("=I", len(payload)) + payload


def unframe(data: bytes) -> bytes:
    (length,) = struct.unpack("=I", data[:4])
    assert len(data) == 4 + length, "exactly one frame on stdout"
    return data[4:]


def with_id(message: Any, container_id: str) -> Any:
    message.container_id.value = container_id
    return message


@pytest.fixture
def agent(service: Service) -> Agent:
    return Agent(service.endpoint)


@pytest.fixture
def sandbox(tmp_path: Path) -> str:
    """The agent creates the run's directory before calling launch."""
    directory = tmp_path / "runs" / "run-1"
    directory.mkdir(parents=True)
    return str(directory)


def known_to_service(endpoint: str, container_id: str) -> bool:
    with grpc.insecure_channel(endpoint) as channel:
        try:
            pb_grpc.ContainerizerStub(channel).Status(
                pb.StatusRequest(container_id=container_id), timeout=10
            )
            return True
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return False
            raise


def test_shell_command_task_gets_the_executor_environment(
    agent: Agent, container_id: str, sandbox: str
) -> None:
    script = (
        'test "$MESOS_EXECUTOR_ID" = T1 && test "$MESOS_FRAMEWORK_ID" = F1'
        f' && test "$MESOS_DIRECTORY" = "{sandbox}" && test "$MESOS_CHECKPOINT" = 1'
        ' && test "$MESOS_SLAVE_PID" = "slave(1)@10.0.0.5:5051" && test "$GREETING" = hi'
    )
    agent.launch(
        command_task_launch(container_id, shell_command(script, GREETING="hi"), directory=sandbox)
    )
    termination = agent.wait(container_id)
    assert (termination.killed, termination.status) == (False, 0), termination.message


def test_exit_3_is_status_word_768(agent: Agent, container_id: str, sandbox: str) -> None:
    agent.launch(command_task_launch(container_id, shell_command("exit 3"), directory=sandbox))
    termination = agent.wait(container_id)
    assert (termination.killed, termination.status) == (False, 768)
    assert os.WIFEXITED(termination.status) and os.WEXITSTATUS(termination.status) == 3


def test_multi_process_executor_usage_matches_its_resources(
    agent: Agent, container_id: str, sandbox: str
) -> None:
    command = shell_command("sleep 300 & sleep 300 & wait")
    resources = [scalar("cpus", 0.5), scalar("mem", 64)]
    agent.launch(executor_launch(container_id, command, resources, directory=sandbox))
    try:
        statistics = agent.usage(container_id)
        assert statistics.cpus_limit == pytest.approx(0.5)
        assert statistics.mem_limit_bytes == 64 * MIB
        if statistics.HasField("processes"):
            assert statistics.processes >= 3
        assert abs(statistics.timestamp - time.time()) < 60
    finally:
        agent.destroy(container_id)
    assert agent.wait(container_id).killed


def test_destroy_a_sleeper_reports_killed_to_the_pending_wait(
    agent: Agent, container_id: str, sandbox: str
) -> None:
    agent.launch(command_task_launch(container_id, shell_command("sleep 300"), directory=sandbox))
    env = {**os.environ, "CONTAINERIZER_ENDPOINT": agent.endpoint}
    with subprocess.Popen(
        [*PROGRAM, "wait"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    ) as waiting:
        assert waiting.stdin is not None and waiting.stdout is not None
        waiting.stdin.write(frame(with_id(ecp.Wait(), container_id)))
        waiting.stdin.flush()
        time.sleep(0.3)  # let the wait be pending, as the agent's is
        agent.destroy(container_id)
        out, err = waiting.communicate(timeout=60)
        assert waiting.returncode == 0, err
    termination = ecp.Termination.FromString(unframe(out))
    assert termination.killed
    assert termination.HasField("status") and os.WIFSIGNALED(termination.status)


def test_a_task_offered_ports_still_launches(agent: Agent, container_id: str, sandbox: str) -> None:
    resources = [scalar("cpus", 0.5), scalar("mem", 64), ports((31000, 31009))]
    launch = command_task_launch(container_id, shell_command("exit 0"), resources, sandbox)
    result = agent.run("launch", frame(launch))
    assert result.returncode == 0, result.stderr
    assert b"'ports' not forwarded" in result.stderr
    assert agent.wait(container_id).status == 0


def test_containers_before_during_and_after(agent: Agent, container_id: str, sandbox: str) -> None:
    assert container_id not in agent.containers()
    agent.launch(command_task_launch(container_id, shell_command("sleep 300"), directory=sandbox))
    assert container_id in agent.containers()
    agent.destroy(container_id)
    agent.wait(container_id)
    assert container_id not in agent.containers()


def test_update_changes_the_limits_live(agent: Agent, container_id: str, sandbox: str) -> None:
    resources = [scalar("cpus", 0.5), scalar("mem", 64)]
    agent.launch(
        executor_launch(container_id, shell_command("sleep 300"), resources, directory=sandbox)
    )
    try:
        agent.ok(
            "update",
            ecp.Update(
                container_id=mesos.ContainerID(value=container_id),
                resources=[scalar("cpus", 1), scalar("mem", 128)],
            ),
        )
        statistics = agent.usage(container_id)
        assert statistics.cpus_limit == pytest.approx(1.0)
        assert statistics.mem_limit_bytes == 128 * MIB
    finally:
        agent.destroy(container_id)


def test_recover_after_a_service_restart_then_wait(
    fresh_service: Service, container_id: str, tmp_path: Path, sandbox: str
) -> None:
    agent = Agent(fresh_service.endpoint)
    gate = tmp_path / "go"
    script = f"while [ ! -e {gate} ]; do sleep 0.1; done; exit 7"
    agent.launch(command_task_launch(container_id, shell_command(script), directory=sandbox))
    fresh_service.restart()  # kill -9 and start again: the container keeps running
    result = agent.run("recover")  # from a fresh process, as a restarted agent does
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
    assert container_id in agent.containers()
    gate.touch()
    termination = agent.wait(container_id)
    assert (termination.killed, termination.status) == (False, 7 << 8)


def test_a_pending_wait_rides_out_a_service_restart(
    fresh_service: Service, container_id: str, tmp_path: Path, sandbox: str
) -> None:
    agent = Agent(fresh_service.endpoint)
    gate = tmp_path / "go"
    script = f"while [ ! -e {gate} ]; do sleep 0.1; done; exit 7"
    agent.launch(command_task_launch(container_id, shell_command(script), directory=sandbox))
    env = {**os.environ, "CONTAINERIZER_ENDPOINT": agent.endpoint}
    with subprocess.Popen(
        [*PROGRAM, "wait"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    ) as waiting:
        assert waiting.stdin is not None
        waiting.stdin.write(frame(with_id(ecp.Wait(), container_id)))
        waiting.stdin.flush()  # and keep it open, as the agent does
        time.sleep(0.5)  # let the wait be pending in the service
        fresh_service.restart()  # kill -9 and start again: the wait's connection is gone
        gate.touch()
        out, err = waiting.communicate(timeout=90)
        assert waiting.returncode == 0, err
    termination = ecp.Termination.FromString(unframe(out))
    assert (termination.killed, termination.status) == (False, 7 << 8)


# Runs the program as uid 65534 once Python and the program are loaded (the interpreter itself
# lives where that user may not read).
AS_NOBODY = (
    "import os, sys\n"
    "from adapter.clients.mesos import program\n"
    "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
    "program.main()\n"
)


def test_the_ecp_socket_is_root_only(agent: Agent, container_id: str, sandbox: str) -> None:
    path = Path(ecp_socket_path(agent.endpoint))
    status = path.stat()
    assert stat.S_ISSOCK(status.st_mode)
    assert (stat.S_IMODE(status.st_mode), status.st_uid) == (0o600, 0)
    launch = command_task_launch(container_id, shell_command("sleep 300"), directory=sandbox)
    result = subprocess.run(
        [sys.executable, "-c", AS_NOBODY, "launch"],
        input=frame(launch),
        capture_output=True,
        env={**os.environ, "CONTAINERIZER_ENDPOINT": agent.endpoint},
        timeout=60,
    )
    assert_one_line_failure(result)
    assert result.returncode == 1
    assert b"Permission denied" in result.stderr
    assert not known_to_service(agent.endpoint, container_id)


BAD_LAUNCHES = {
    "truncated frame": lambda launch: frame(launch)[:3],
    "length larger than the bytes": lambda launch: frame(launch)[:-5],
    "frame over 64 MiB": lambda launch: (
        struct.pack("=I", 64 * MIB + 1) + launch.SerializeToString()
    ),
    "garbage bytes": lambda launch: struct.pack("=I", 8) + b"\xff" * 8,
}


@pytest.mark.parametrize("case", BAD_LAUNCHES, ids=list(BAD_LAUNCHES))
def test_bad_frames_launch_nothing(
    agent: Agent, container_id: str, sandbox: str, case: str
) -> None:
    launch = command_task_launch(container_id, shell_command("sleep 300"), directory=sandbox)
    result = agent.run("launch", BAD_LAUNCHES[case](launch))
    assert_one_line_failure(result)
    assert not known_to_service(agent.endpoint, container_id)


def test_launch_without_command_or_container_id_launches_nothing(
    agent: Agent, container_id: str, sandbox: str
) -> None:
    no_command = command_task_launch(container_id, mesos.CommandInfo(), directory=sandbox)
    assert_one_line_failure(agent.run("launch", frame(no_command)))
    assert not known_to_service(agent.endpoint, container_id)
    before = agent.containers()
    no_id = command_task_launch("", shell_command("sleep 300"), directory=sandbox)
    assert_one_line_failure(agent.run("launch", frame(no_id)))
    assert agent.containers() == before


def test_unknown_command_word(agent: Agent) -> None:
    result = agent.run("frobnicate")
    assert_one_line_failure(result)
    assert b"unknown command 'frobnicate'" in result.stderr


def assert_one_line_failure(result: subprocess.CompletedProcess[bytes]) -> None:
    assert result.returncode != 0
    assert result.stdout == b""
    assert result.stderr.startswith(b"containerizer-mesos: ")
    assert result.stderr.count(b"\n") == 1, result.stderr
    assert b"Traceback" not in result.stderr
