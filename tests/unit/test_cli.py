"""`containerizer` against a real in-process gRPC server backed by a fake servicer.

The fake keeps containers in a dict and plays a tiny script named by the command's argv[0]:
  exit N     writes "hello" / "oops", then (while the CLI follows) "bye", and exits with N
  signal N   is killed by signal N on hitting its memory limit
  sleep      runs until killed or destroyed
  fail       never starts (LAUNCH_FAILED)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Iterator
from concurrent import futures
from importlib import metadata
from pathlib import Path
from typing import Any

import grpc
import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.api.containerizer.v1 import containerizer_pb2_grpc as pb_grpc
from adapter.clients.cli import client as cli_client
from adapter.clients.cli import main as cli
from adapter.clients.cli import run as cli_run
from adapter.clients.cli.format import size_mib

MIB = 1024 * 1024
# How long the `exit` workload keeps running after Launch, so `run` has something to follow.
WORKLOAD_SECONDS = 0.2
# The CLI's own failures (and a workload that never ran) exit as `docker run` does: never 1 or 2,
# which a workload may return itself.
CLI_FAILURE = 125


class FakeContainer:
    def __init__(self, status: pb.ContainerStatus, argv: list[str]) -> None:
        self.status = status
        self.argv = argv
        self.ended = threading.Event()

    def end(self, termination: pb.Termination) -> None:
        if self.ended.is_set():
            return
        termination.finished_at = time.time()
        self.status.termination.CopyFrom(termination)
        self.status.state = pb.TERMINATED
        self.status.pid = 0
        self.ended.set()


class FakeContainerizer(pb_grpc.ContainerizerServicer):
    def __init__(self, root: Path) -> None:
        self.root = root
        self.endpoint = ""  # set by the fixture once the server listens
        self.containers: dict[str, FakeContainer] = {}
        self.launches: list[pb.LaunchRequest] = []
        self.updates: list[pb.UpdateRequest] = []
        self.kills: list[pb.KillRequest] = []
        self.usage_calls = 0
        self.usage_answers_before_exit: int | None = None

    def find(self, container_id: str, context: Any) -> FakeContainer:
        if container_id not in self.containers:
            context.abort(grpc.StatusCode.NOT_FOUND, f"container {container_id!r} not found")
        return self.containers[container_id]

    def Launch(self, request: pb.LaunchRequest, context: Any) -> pb.LaunchResponse:
        self.launches.append(request)
        if " " in request.container_id:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"container_id: {request.container_id!r} may only contain letters, digits, _.-",
            )
        argv = list(request.command.argv) or request.command.shell.split()
        sandbox = Path(request.sandbox or self.root / request.container_id)
        sandbox.mkdir(parents=True, exist_ok=True)
        status = pb.ContainerStatus(
            container_id=request.container_id,
            runtime=request.container.runtime or "native",
            state=pb.RUNNING,
            pid=4242,
            launched_at=time.time() - 75,
            image=request.container.image,
            sandbox=str(sandbox),
            resources=request.resources,
            labels=request.labels,
        )
        container = FakeContainer(status, argv)
        self.containers[request.container_id] = container
        self.start_workload(container, sandbox)
        warnings = [
            "mem: raised to the 32 MiB minimum"
            for r in request.resources
            if r.name == "mem" and r.scalar.value < 32
        ]
        return pb.LaunchResponse(status=status, warnings=warnings)

    def start_workload(self, container: FakeContainer, sandbox: Path) -> None:
        program = container.argv[0]
        if program == "exit":
            (sandbox / "stdout").write_bytes(b"hello\n")
            (sandbox / "stderr").write_bytes(b"oops\n")
        elif program == "signal":
            (sandbox / "stdout").write_bytes(b"dying\n")
            container.end(
                pb.Termination(
                    signal=int(container.argv[1]),
                    status=int(container.argv[1]),
                    killed=True,
                    reason=pb.LIMITATION_MEMORY,
                    message="killed by signal 9 (SIGKILL); memory limit exceeded",
                    limited_resources=["mem"],
                )
            )
        elif program == "fail":
            container.end(pb.Termination(reason=pb.LAUNCH_FAILED, message="exec: no such file"))

    def Wait(self, request: pb.WaitRequest, context: Any) -> pb.WaitResponse:
        container = self.find(request.container_id, context)
        if container.argv[0] == "exit" and not container.ended.is_set():
            time.sleep(WORKLOAD_SECONDS)
            with open(Path(container.status.sandbox) / "stdout", "ab") as stdout:
                stdout.write(b"bye\n")
            code = int(container.argv[1])
            container.end(pb.Termination(exit_code=code, status=code << 8, reason=pb.EXITED))
        container.ended.wait(timeout=10)
        return pb.WaitResponse(termination=container.status.termination)

    def Kill(self, request: pb.KillRequest, context: Any) -> pb.KillResponse:
        container = self.find(request.container_id, context)
        self.kills.append(request)
        container.end(pb.Termination(signal=request.signal, status=request.signal, killed=True))
        container.status.termination.reason = pb.EXITED
        return pb.KillResponse()

    def Destroy(self, request: pb.DestroyRequest, context: Any) -> pb.DestroyResponse:
        container = self.find(request.container_id, context)
        container.end(pb.Termination(signal=9, status=9, killed=True, reason=pb.DESTROYED))
        return pb.DestroyResponse(termination=container.status.termination)

    def Status(self, request: pb.StatusRequest, context: Any) -> pb.ContainerStatus:
        if request.container_id == "slow":
            time.sleep(1)
        return self.find(request.container_id, context).status

    def Containers(self, request: pb.ContainersRequest, context: Any) -> pb.ContainersResponse:
        return pb.ContainersResponse(containers=[c.status for c in self.containers.values()])

    def Usage(self, request: pb.UsageRequest, context: Any) -> pb.UsageResponse:
        container = self.find(request.container_id, context)
        self.usage_calls += 1
        if self.usage_calls == self.usage_answers_before_exit:
            container.end(pb.Termination(exit_code=0, reason=pb.EXITED))
        if container.ended.is_set():
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"container {request.container_id!r} has terminated",
            )
        statistics = pb.ResourceStatistics(
            timestamp=time.time(),
            processes=3,
            cpus_user_time_secs=1.5,
            cpus_limit=2.0,
            mem_rss_bytes=12 * MIB,
            mem_limit_bytes=64 * MIB,
            disk_used_bytes=0,  # measured zero: shown, unlike the unset net_* fields
        )
        return pb.UsageResponse(statistics=statistics)

    def Update(self, request: pb.UpdateRequest, context: Any) -> pb.UpdateResponse:
        self.find(request.container_id, context)
        self.updates.append(request)
        warnings = [
            "mem: raised to the 32 MiB minimum"
            for r in request.resources
            if r.name == "mem" and r.scalar.value < 32
        ]
        return pb.UpdateResponse(warnings=warnings)

    def Runtimes(self, request: pb.RuntimesRequest, context: Any) -> pb.RuntimesResponse:
        return pb.RuntimesResponse(
            runtimes=[
                pb.RuntimeInfo(
                    name="native",
                    version="0.1.0",
                    healthy=True,
                    is_default=True,
                    capabilities=pb.Capabilities(live_update=True, oom_detection=True),
                ),
                pb.RuntimeInfo(
                    name="containerd",
                    healthy=False,
                    message="dial unix /run/containerd/containerd.sock: no such file",
                ),
            ]
        )


@pytest.fixture
def service(tmp_path: Path) -> Iterator[FakeContainerizer]:
    # Unix socket paths are limited to ~108 bytes: pytest's tmp_path can be longer.
    socket_dir = tempfile.mkdtemp(prefix="cz-cli-", dir="/tmp")
    servicer = FakeContainerizer(tmp_path / "sandboxes")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_ContainerizerServicer_to_server(servicer, server)
    endpoint = f"unix:{socket_dir}/containerizer.sock"
    server.add_insecure_port(endpoint)
    server.start()
    servicer.endpoint = endpoint
    try:
        yield servicer
    finally:
        for container in servicer.containers.values():
            container.ended.set()
        server.stop(grace=None).wait()
        shutil.rmtree(socket_dir, ignore_errors=True)


class Cli:
    """Runs `containerizer --endpoint <fake> ...` and returns (exit status, stdout, stderr)."""

    def __init__(self, service: FakeContainerizer, capsys: pytest.CaptureFixture[str]) -> None:
        self.service = service
        self.capsys = capsys

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = cli.main(["--endpoint", self.service.endpoint, *argv])
        out, err = self.capsys.readouterr()
        assert "Traceback" not in err
        return code, out, err

    def launch(self, container_id: str, *command: str) -> None:
        code, _, err = self("run", "--detach", "--id", container_id, "--", *command)
        assert code == 0, err


@pytest.fixture
def run_cli(service: FakeContainerizer, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(service, capsys)


def assert_one_error_line(err: str, *fragments: str) -> None:
    assert err.startswith("containerizer: ")
    assert err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err


# ---- run ----


def test_run_streams_output_and_exits_with_the_workload_code(run_cli: Cli) -> None:
    code, out, err = run_cli("run", "--", "exit", "3")
    assert code == 3
    assert out == "hello\nbye\n"
    assert err == "oops\n"


def test_run_shell_is_sent_as_shell(run_cli: Cli, service: FakeContainerizer) -> None:
    code, out, _ = run_cli("run", "--shell", "exit 0")
    assert code == 0
    assert out == "hello\nbye\n"
    assert service.launches[-1].command.shell == "exit 0"
    assert list(service.launches[-1].command.argv) == []


def test_run_killed_by_signal_exits_128_plus_signal(run_cli: Cli) -> None:
    code, out, err = run_cli("run", "--", "signal", "9")
    assert code == 128 + 9
    assert out == "dying\n"
    assert_one_error_line(err, "killed by signal 9 (SIGKILL)", "LIMITATION_MEMORY (mem)")


def test_run_launch_failed_exits_125_with_the_message(run_cli: Cli) -> None:
    code, _, err = run_cli("run", "--", "fail")
    assert code == CLI_FAILURE
    assert_one_error_line(err, "LAUNCH_FAILED", "exec: no such file")


def test_run_sends_every_launch_flag(run_cli: Cli, service: FakeContainerizer) -> None:
    code, out, _ = run_cli(
        "run", "--detach", "--id", "web", "--runtime", "lxc", "--image", "alpine:3",
        "--cpus", "1.5", "--mem", "1G", "--disk", "512K", "--pids", "10",
        "--env", "A=1", "--env", "EMPTY=", "--label", "team=infra",
        "--user", "nobody", "--workdir", "/srv", "--sandbox", "rel/box",
        "--", "sleep", "-c", "--cpus",
    )  # fmt: skip
    assert (code, out) == (0, "web\n")
    request = service.launches[-1]
    assert list(request.command.argv) == ["sleep", "-c", "--cpus"]
    resources = {r.name: (r.type, r.scalar.value) for r in request.resources}
    assert resources == {
        "cpus": (pb.Value.SCALAR, 1.5),
        "mem": (pb.Value.SCALAR, 1024.0),
        "disk": (pb.Value.SCALAR, 0.5),
        "pids": (pb.Value.SCALAR, 10.0),
    }
    assert [(e.name, e.value) for e in request.command.environment] == [("A", "1"), ("EMPTY", "")]
    assert dict(request.labels) == {"team": "infra"}
    assert (request.container.runtime, request.container.image) == ("lxc", "alpine:3")
    assert (request.command.user, request.command.working_dir) == ("nobody", "/srv")
    assert Path(request.sandbox).is_absolute() and request.sandbox.endswith("rel/box")


def test_run_detach_generates_an_id_and_prints_warnings(run_cli: Cli) -> None:
    code, out, err = run_cli("run", "-d", "--mem", "16", "--", "sleep")
    assert code == 0
    assert out.startswith("ctr-") and len(out.strip()) == len("ctr-") + 12
    int(out.strip()[4:], 16)
    assert err == "warning: mem: raised to the 32 MiB minimum\n"


def test_run_detach_json(run_cli: Cli) -> None:
    code, out, _ = run_cli("run", "--detach", "--json", "--id", "j1", "--", "sleep")
    assert code == 0
    assert json.loads(out)["status"]["container_id"] == "j1"
    assert json.loads(out)["status"]["state"] == "RUNNING"


def test_run_ctrl_c_destroys_the_container(
    run_cli: Cli, service: FakeContainerizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_run, "follow_until_exit", interrupted)
    code, _, err = run_cli("run", "--id", "c1", "--", "sleep")
    assert code == 130
    assert "destroying container c1" in err
    assert service.containers["c1"].status.termination.reason == pb.DESTROYED


def test_run_needs_exactly_one_command(run_cli: Cli) -> None:
    code, _, err = run_cli("run", "--cpus", "1")
    assert code == CLI_FAILURE
    assert_one_error_line(err, "--shell")
    code, _, err = run_cli("run", "--shell", "true", "--", "true")
    assert code == CLI_FAILURE


# ---- flag validation on the client ----


@pytest.mark.parametrize(
    ("text", "mib"),
    [("64M", 64), ("1G", 1024), ("100", 100), ("512K", 0.5), ("1.5GiB", 1536), ("2t", 2 << 20)],
)
def test_size_units(text: str, mib: float) -> None:
    assert size_mib(text) == mib


@pytest.mark.parametrize("garbage", ["lots", "12X", "-5M", "0", "1..2G", ""])
def test_garbage_size_is_a_usage_error_naming_the_flag(run_cli: Cli, garbage: str) -> None:
    code, _, err = run_cli("run", f"--mem={garbage}", "--", "sleep")
    assert code == CLI_FAILURE
    assert_one_error_line(err, "--mem", repr(garbage))


def test_env_without_equals_is_a_usage_error_naming_the_flag(run_cli: Cli) -> None:
    code, _, err = run_cli("run", "--env", "NOVALUE", "--", "sleep")
    assert code == CLI_FAILURE
    assert_one_error_line(err, "--env", "NAME=VALUE", "'NOVALUE'")


def test_unknown_subcommand_is_a_usage_error(run_cli: Cli) -> None:
    code, _, err = run_cli("frobnicate")
    assert code == CLI_FAILURE
    assert_one_error_line(err, "frobnicate")


def test_help_exits_zero(run_cli: Cli) -> None:
    code, out, _ = run_cli("run", "--help")
    assert code == 0
    assert "--mem" in out


# ---- reading commands ----


def test_ps_table_is_aligned(run_cli: Cli) -> None:
    run_cli.launch("a", "sleep")
    run_cli.launch("a-much-longer-container-id", "sleep")
    run_cli("run", "--id", "done", "--", "signal", "15")
    code, out, _ = run_cli("ps")
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == ["ID", "RUNTIME", "STATE", "PID", "AGE/EXIT", "IMAGE", "POD"]
    for column in ("RUNTIME", "STATE", "PID", "AGE/EXIT", "IMAGE", "POD"):
        start = header.index(column)
        for row in rows:
            assert row[start - 2 : start] == "  " and row[start] != " ", (column, row)
    by_id = {row.split()[0]: row.split() for row in rows}
    assert by_id["a"] == ["a", "native", "RUNNING", "4242", "1m15s", "-", "-"]
    assert by_id["done"][2:5] == ["TERMINATED", "-", "SIGTERM"]


def test_ps_shows_the_pod_of_cri_containers_and_marks_its_holder(run_cli: Cli) -> None:
    pod = ("--label", "io.kubernetes.pod.namespace=shop", "--label", "io.kubernetes.pod.name=web")
    for container_id, role in (("holder", "sandbox"), ("app", "container")):
        code, _, err = run_cli(
            "run", "--detach", "--id", container_id, *pod,
            "--label", f"io.containerizer.cri.role={role}", "--", "sleep",
        )  # fmt: skip
        assert code == 0, err
    run_cli.launch("plain", "sleep")
    code, out, _ = run_cli("ps")
    assert code == 0
    header, *rows = out.splitlines()
    start = header.index("POD")
    pods = {row.split()[0]: row[start:] for row in rows}
    assert pods == {"holder": "shop/web (sandbox)", "app": "shop/web", "plain": "-"}


def test_ps_json(run_cli: Cli) -> None:
    run_cli.launch("a", "sleep")
    code, out, _ = run_cli("ps", "--json")
    assert code == 0
    containers = json.loads(out)["containers"]
    assert [c["container_id"] for c in containers] == ["a"]
    assert containers[0]["state"] == "RUNNING"


def test_global_json_flag_before_the_subcommand(run_cli: Cli) -> None:
    run_cli.launch("a", "sleep")
    code, out, _ = run_cli("--json", "ps")
    assert code == 0
    assert json.loads(out)["containers"][0]["container_id"] == "a"


def test_ps_json_without_containers_has_the_same_shape(run_cli: Cli) -> None:
    code, out, _ = run_cli("ps", "--json")
    assert (code, json.loads(out)) == (0, {"containers": []})


# Every command, with "{}" where the connection flags go when given after the subcommand.
EVERY_COMMAND = [
    ("run", "{}", "--", "true"), ("ps", "{}"), ("status", "c", "{}"), ("usage", "c", "{}"),
    ("update", "c", "--cpus", "1", "{}"), ("kill", "c", "{}"), ("destroy", "c", "{}"),
    ("wait", "c", "{}"), ("runtimes", "{}"), ("images", "import", "f.tar", "{}"),
    ("images", "pull", "r", "{}"), ("images", "ls", "{}"), ("images", "rm", "r", "{}"),
    ("compare", "{}"),
]  # fmt: skip
CONNECTION_FLAGS = ("--json", "--endpoint", "/x.sock", "--timeout", "3")


@pytest.mark.parametrize("command", EVERY_COMMAND, ids=lambda c: "-".join(c[:2]))
@pytest.mark.parametrize("place", ["before", "after"])
def test_global_flags_work_before_and_after_every_subcommand(
    command: tuple[str, ...], place: str
) -> None:
    flags = list(CONNECTION_FLAGS)
    if place == "before":
        argv = flags + [word for word in command if word != "{}"]
    else:
        argv = [part for word in command for part in (flags if word == "{}" else [word])]
    args = cli.build_parser().parse_args(argv)
    assert (args.json, args.endpoint, args.timeout) == (True, "/x.sock", 3.0)


def test_kill_and_update_print_their_reply_with_json(
    run_cli: Cli, service: FakeContainerizer
) -> None:
    run_cli.launch("k1", "sleep")
    code, out, err = run_cli("update", "k1", "--mem", "16M", "--json")
    assert (code, json.loads(out)) == (0, {"warnings": ["mem: raised to the 32 MiB minimum"]})
    assert err == "warning: mem: raised to the 32 MiB minimum\n"
    code, out, _ = run_cli("kill", "k1", "--json", "--signal", "KILL")
    assert (code, json.loads(out)) == (0, {})
    assert service.kills[-1].signal == 9


def test_status(run_cli: Cli) -> None:
    run_cli("run", "--id", "s1", "--mem", "64M", "--cpus", "0.5", "--", "exit", "0")
    code, out, _ = run_cli("status", "s1")
    assert code == 0
    assert "State:" in out and "TERMINATED" in out
    assert "cpus=0.5 mem=64.0 MiB" in out
    assert "Termination: exited with code 0\n" in out
    code, out, _ = run_cli("status", "--json", "s1")
    assert json.loads(out)["termination"]["exit_code"] == 0


def test_status_of_unknown_container_is_one_line(run_cli: Cli) -> None:
    code, out, err = run_cli("status", "nope")
    assert (code, out) == (CLI_FAILURE, "")
    assert err == "containerizer: container 'nope' not found\n"


def test_usage_table_shows_only_measured_statistics(run_cli: Cli) -> None:
    run_cli.launch("u1", "sleep")
    code, out, _ = run_cli("usage", "u1")
    assert code == 0
    rows = {line.split()[0]: line.split(maxsplit=1)[1] for line in out.splitlines()}
    assert rows["STATISTIC"] == "VALUE"
    assert rows["processes"] == "3"
    assert rows["cpus_user_time_secs"] == "1.500 s"
    assert rows["mem_rss_bytes"] == "12.0 MiB"
    assert rows["mem_limit_bytes"] == "64.0 MiB"
    assert rows["disk_used_bytes"] == "0 B"
    assert "net_rx_bytes" not in rows and "threads" not in rows


def test_usage_json(run_cli: Cli) -> None:
    run_cli.launch("u1", "sleep")
    code, out, _ = run_cli("usage", "--json", "u1")
    statistics = json.loads(out)
    assert code == 0
    # Numbers, although proto3's JSON mapping writes 64-bit integers as strings.
    assert statistics["mem_rss_bytes"] == 12 * MIB
    assert statistics["disk_used_bytes"] == 0
    assert "net_rx_bytes" not in statistics


def test_usage_watch_repeats_until_the_container_ends(
    run_cli: Cli, service: FakeContainerizer
) -> None:
    run_cli.launch("u1", "sleep")
    service.usage_answers_before_exit = 3
    code, out, err = run_cli("usage", "u1", "--watch", "--interval", "0.01", "--json")
    assert code == CLI_FAILURE
    assert [json.loads(line)["processes"] for line in out.splitlines()] == [3, 3]
    assert_one_error_line(err, "has terminated")


def test_runtimes_table_and_json(run_cli: Cli) -> None:
    code, out, _ = run_cli("runtimes")
    assert code == 0
    header, native, containerd = out.splitlines()
    assert header.split() == ["NAME", "DEFAULT", "HEALTHY", "VERSION", "MESSAGE", "CAPABILITIES"]
    assert native.split() == ["native", "*", "yes", "0.1.0", "-", "live_update,oom_detection"]
    assert containerd.split()[:3] == ["containerd", "no", "-"]
    assert containerd.index("no") == header.index("HEALTHY")
    code, out, _ = run_cli("runtimes", "--json")
    assert [r["name"] for r in json.loads(out)["runtimes"]] == ["native", "containerd"]


# ---- commands that change things ----


def test_update_sends_resources_and_prints_warnings(
    run_cli: Cli, service: FakeContainerizer
) -> None:
    run_cli.launch("u1", "sleep")
    code, out, err = run_cli("update", "u1", "--cpus", "2", "--mem", "16M", "--pids", "5")
    assert (code, out) == (0, "")
    assert err == "warning: mem: raised to the 32 MiB minimum\n"
    resources = {r.name: r.scalar.value for r in service.updates[-1].resources}
    assert resources == {"cpus": 2.0, "mem": 16.0, "pids": 5.0}


def test_update_without_resources_is_a_usage_error(run_cli: Cli) -> None:
    code, _, err = run_cli("update", "u1")
    assert code == CLI_FAILURE
    assert_one_error_line(err, "--cpus")


@pytest.mark.parametrize(("flag", "number"), [("KILL", 9), ("sigkill", 9), ("9", 9), ("HUP", 1)])
def test_kill_signal_names_and_numbers(
    run_cli: Cli, service: FakeContainerizer, flag: str, number: int
) -> None:
    run_cli.launch("k1", "sleep")
    code, _, _ = run_cli("kill", "k1", "--signal", flag)
    assert code == 0
    assert service.kills[-1].signal == number


def test_kill_defaults_to_term_and_rejects_unknown_signals(
    run_cli: Cli, service: FakeContainerizer
) -> None:
    run_cli.launch("k1", "sleep")
    assert run_cli("kill", "k1")[0] == 0
    assert service.kills[-1].signal == 15
    code, _, err = run_cli("kill", "k1", "--signal", "BOGUS")
    assert code == CLI_FAILURE
    assert_one_error_line(err, "--signal", "'BOGUS'")


def test_destroy_prints_the_termination(run_cli: Cli) -> None:
    run_cli.launch("d1", "sleep")
    code, out, _ = run_cli("destroy", "d1")
    assert code == 0
    assert out == "d1: destroyed: killed by signal 9 (SIGKILL)\n"


def test_wait_prints_the_termination_and_exits_like_the_workload(run_cli: Cli) -> None:
    run_cli.launch("w1", "exit", "7")
    code, out, _ = run_cli("wait", "w1")
    assert code == 7
    assert out == "w1: exited with code 7\n"
    code, out, _ = run_cli("wait", "--json", "w1")
    assert code == 7
    assert json.loads(out)["termination"]["exit_code"] == 7


def test_wait_for_a_signalled_container(run_cli: Cli) -> None:
    run_cli.launch("w2", "sleep")
    run_cli("kill", "w2", "--signal", "TERM")
    code, out, _ = run_cli("wait", "w2")
    assert code == 128 + 15
    assert out == "w2: killed by signal 15 (SIGTERM)\n"


# ---- errors ----


def test_server_side_invalid_argument_is_one_line(run_cli: Cli) -> None:
    code, out, err = run_cli("run", "--id", "bad id", "--", "sleep")
    assert (code, out) == (CLI_FAILURE, "")
    assert err == "containerizer: container_id: 'bad id' may only contain letters, digits, _.-\n"


def test_unreachable_service_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    socket_dir = tempfile.mkdtemp(prefix="cz-cli-", dir="/tmp")
    try:
        code = cli.main(["--endpoint", f"{socket_dir}/absent.sock", "ps"])
    finally:
        shutil.rmtree(socket_dir)
    out, err = capsys.readouterr()
    assert (code, out) == (CLI_FAILURE, "")
    assert_one_error_line(err, f"cannot reach the service at unix:{socket_dir}/absent.sock")
    assert "containerizer serve" in err and "Traceback" not in err


def test_deadline_names_the_timeout_flag(run_cli: Cli) -> None:
    run_cli.launch("slow", "sleep")
    code, _, err = run_cli("--timeout", "0.1", "status", "slow")
    assert code == CLI_FAILURE
    assert_one_error_line(err, "within 0.1s", "--timeout")


def test_endpoint_comes_from_the_environment(
    service: FakeContainerizer,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(cli_client.ENDPOINT_ENV, service.endpoint)
    assert cli.main(["runtimes"]) == 0
    assert "native" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("endpoint", "target"),
    [
        ("/run/c.sock", "unix:/run/c.sock"),
        ("unix:///run/c.sock", "unix:///run/c.sock"),
        ("localhost:7000", "localhost:7000"),
    ],
)
def test_endpoint_forms(endpoint: str, target: str) -> None:
    assert cli_client.grpc_target(endpoint) == target


def test_serve_runs_the_server_with_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str | None] = []

    def run_server(config_path: str | None) -> int:
        calls.append(config_path)
        return 3

    fake_server = types.ModuleType("adapter.server.serve")
    fake_server.run_server = run_server  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "adapter.server.serve", fake_server)
    assert cli.main(["serve", "--config", "/etc/containerizer.toml"]) == 3
    assert cli.main(["serve"]) == 3
    assert calls == ["/etc/containerizer.toml", None]


def test_version_is_the_installed_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"containerizer {metadata.version('containerizer-adapter')}\n"


def test_a_workload_exit_1_is_not_a_cli_failure(run_cli: Cli) -> None:
    assert run_cli("run", "--", "exit", "1")[0] == 1
    code, _, err = run_cli("run", "--bogus-flag", "--", "exit", "1")
    assert code == CLI_FAILURE
    assert_one_error_line(err, "--bogus-flag")


@pytest.mark.parametrize("argv", [["images", "import"], ["images", "import", "x.tar", "--busybox"]])
def test_images_import_takes_a_file_or_busybox(run_cli: Cli, argv: list[str]) -> None:
    code, _, err = run_cli(*argv)
    assert code == CLI_FAILURE
    assert_one_error_line(err, "FILE or --busybox")


def test_command_modules_import_no_circle_and_ps_loads_no_compare_code(
    service: FakeContainerizer,
) -> None:
    """cli_images and cli_compare build on cli_client, never on cli; `ps` pays for neither the
    compare runner nor matplotlib nor the image store."""
    script = f"""
import sys
import adapter.clients.cli.compare, adapter.clients.cli.images
assert "adapter.clients.cli.main" not in sys.modules, "a command module imports cli.main"
from adapter.clients.cli import main as cli
assert cli.main(["--endpoint", {service.endpoint!r}, "ps"]) == 0
heavy = ("matplotlib", "psutil", "adapter.clients.compare.runner", "adapter.images.store")
assert not [name for name in sys.modules if name.startswith(heavy)], sorted(sys.modules)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
