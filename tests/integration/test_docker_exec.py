"""The docker runtime's exec and live output, on a private dockerd: `containerizer exec` (output,
exit code, stdin, a terminal and its size), a command that never ran, the exec'd process inside
the container (pid namespace, cgroup, confinement) and ended by its destroy, ExecSync's timeout
(the driver in this process: ExecSync reaches a docker container through nothing else), and
`containerizer logs -f` while the container runs, also across a restart of the service."""

# Fixtures are imported from tests.docker_fixtures and injected by name, which ruff reads as
# redefinition; a conftest `pytest_plugins` line would make both the imports and this go away.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import struct
import subprocess
import termios
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import grpc
import psutil
import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.core.model import Command, LaunchSpec, Resources
from adapter.core.sandbox import prepare_outputs
from adapter.runtimes.docker.driver import DockerDriver
from adapter.runtimes.docker.options import DockerOptions
from adapter.runtimes.registry import parse_options
from adapter.supervisor.exec import TIMED_OUT_EXIT_CODE, ExecNotStarted
from tests.cgroup_roots import remove_cgroup_trees, run_scoped_name
from tests.conftest import BIN, ServiceProcess
from tests.docker_fixtures import (  # noqa: F401  (fixtures, injected by parameter name)
    PrivateDockerd,
    busybox_image,
    docker_registry,
    docker_service,
    dockerd,
    fresh_docker_service,
)
from tests.integration.api import destroy, wait
from tests.integration.processes import memory_cgroup, pid_namespace, read_until, wait_for_process
from tests.integration.test_docker import launch_docker
from tests.services import node_services

pytestmark = pytest.mark.integration


def cli(service: ServiceProcess, *args: str) -> list[str]:
    return [str(BIN / "containerizer"), "--endpoint", service.endpoint, *args]


@pytest.fixture
def sleeper(docker_service: ServiceProcess, busybox_image: str, container_id: str) -> Iterator[str]:
    launch_docker(docker_service.stub(), container_id, "exec sleep 600", busybox_image)
    try:
        yield container_id
    finally:
        destroy(docker_service.stub(), container_id)


def test_exec_output_exit_code_and_the_workloads_settings(
    docker_service: ServiceProcess, sleeper: str
) -> None:
    script = "echo out; echo err >&2; id -u; pwd; echo $MESOS_SANDBOX; exit 4"
    done = subprocess.run(
        cli(docker_service, "exec", sleeper, "--", "sh", "-c", script),
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 4, done.stderr
    assert done.stdout == b"out\n0\n/mnt/mesos/sandbox\n/mnt/mesos/sandbox\n"
    assert done.stderr == b"err\n"


def test_exec_interactive_passes_stdin_to_its_end(
    docker_service: ServiceProcess, sleeper: str
) -> None:
    done = subprocess.run(
        cli(docker_service, "exec", "-i", sleeper, "--", "sh", "-c", "tr a-z A-Z; echo done"),
        input=b"hello\nworld\n",
        capture_output=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout) == (0, b"HELLO\nWORLD\ndone\n")


def _set_size(fd: int, columns: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))


def test_exec_with_a_terminal_has_our_size_and_follows_a_resize(
    docker_service: ServiceProcess, sleeper: str
) -> None:
    master, slave = os.openpty()
    _set_size(master, 123, 45)
    process = subprocess.Popen(
        cli(docker_service, "exec", "-it", sleeper, "--", "sh"),
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    try:
        read_until(master, b"# ")  # the prompt: the shell runs
        os.write(master, b"tty\n")
        assert b"/dev/pts/" in read_until(master, b"/dev/pts/")
        _until_size(master, b"45 123")
        _set_size(master, 100, 30)
        process.send_signal(signal.SIGWINCH)  # its terminal is not its controlling one
        _until_size(master, b"30 100")
        os.write(master, b"exit 3\n")
        assert process.wait(timeout=30) == 3
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)


def _until_size(master: int, size: bytes, timeout: float = 20) -> None:
    """Ask `stty size` until it says `size`. Docker before API 1.42 applies a terminal's size a
    moment after the command started (see adapter/runtimes/docker/exec.py)."""
    output = b""
    deadline = time.monotonic() + timeout
    while size not in output:
        assert time.monotonic() < deadline, f"the size {size!r} never showed: {output!r}"
        os.write(master, b"stty size\n")
        output += read_until(master, b"# ", timeout=5)
        time.sleep(0.1)


def test_a_command_that_cannot_start_is_failed_precondition(
    docker_service: ServiceProcess, sleeper: str
) -> None:
    start = pb.ExecStart(container_id=sleeper, argv=["no-such-binary"])
    replies = docker_service.stub().Exec(iter([pb.ExecRequest(start=start)]), timeout=60)
    with pytest.raises(grpc.RpcError) as refused:
        for reply in replies:
            assert reply.WhichOneof("output") != "exit_code"
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = refused.value.details() or ""
    assert "'no-such-binary' did not run" in details and "not found" in details


def test_the_exec_is_inside_the_container_confined_and_ends_with_it(
    docker_service: ServiceProcess, busybox_image: str, container_id: str
) -> None:
    stub = docker_service.stub()
    launch_docker(stub, container_id, "exec sleep 600", busybox_image)
    compared = "grep -E '^(CapEff|CapBnd|Seccomp|NoNewPrivs)' /proc/$1/status"
    settings = subprocess.run(
        cli(docker_service, "exec", container_id, "--", "sh", "-c", f"{compared}", "-", "self"),
        capture_output=True,
        timeout=60,
    )
    workload = subprocess.run(
        cli(docker_service, "exec", container_id, "--", "sh", "-c", f"{compared}", "-", "1"),
        capture_output=True,
        timeout=60,
    )
    assert settings.stdout == workload.stdout and b"Seccomp:\t2" in settings.stdout
    marker = f"{900 + int.from_bytes(os.urandom(2), 'big') / 1000:.3f}"  # a unique duration
    process = subprocess.Popen(
        cli(docker_service, "exec", container_id, "--", "sleep", marker),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        exec_process = wait_for_process(["sleep", marker])
        init = stub.Status(pb.StatusRequest(container_id=container_id), timeout=10).pid
        assert pid_namespace(exec_process.pid) == pid_namespace(init)
        assert memory_cgroup(exec_process.pid) == memory_cgroup(init)
        assert docker_service.cgroups_root in memory_cgroup(init)
        destroy(stub, container_id)
        assert process.wait(timeout=30) != 0
        assert not exec_process.is_running()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# ---- ExecSync, through the driver ----

Scenario = Callable[[DockerDriver, str], Awaitable[None]]


def run_in_a_docker_container(
    dockerd: PrivateDockerd, image: str, workdir: Path, scenario: Scenario
) -> None:
    """`scenario(driver, container id)` with a container running `sleep 600` under a driver of
    this process; the container, its cgroups and the driver are released after."""
    options = parse_options(
        "docker", {"endpoint": dockerd.endpoint}, source="<test>", state_dir=workdir
    )
    assert isinstance(options, DockerOptions)
    cgroups_root = run_scoped_name()
    services = node_services(
        workdir / "state", cgroups_root=cgroups_root, runtimes={"docker": options}
    )
    sandbox = workdir / "sandbox"
    sandbox.mkdir()
    prepare_outputs(str(sandbox))
    spec = LaunchSpec(
        container_id="exec-sync",
        command=Command(shell="exec sleep 600"),
        resources=Resources(cpus=0.5, mem_mib=64),
        runtime="docker",
        sandbox=str(sandbox),
        image=image,
    )

    async def main() -> None:
        driver = DockerDriver(options, services)
        try:
            await driver.start(spec)
            await scenario(driver, spec.container_id)
        finally:
            await driver.kill_all(spec.container_id)
            await asyncio.wait_for(driver.wait(spec.container_id), 60)
            await driver.cleanup(spec.container_id)
            await driver.close()

    try:
        asyncio.run(main())
    finally:
        remove_cgroup_trees(cgroups_root)


def test_exec_sync_output_timeout_and_a_command_that_never_ran(
    dockerd: PrivateDockerd, busybox_image: str, tmp_path: Path
) -> None:
    marker = f"{900 + int.from_bytes(os.urandom(2), 'big') / 1000:.3f}"

    async def scenario(driver: DockerDriver, container_id: str) -> None:
        result = await driver.exec_sync(
            container_id, ("sh", "-c", "echo out; echo err >&2; exit 5"), 30
        )
        assert (result.exit_code, result.stdout, result.stderr, result.timed_out) == (
            5,
            b"out\n",
            b"err\n",
            False,
        )
        started = time.monotonic()
        script = f"sleep {marker} & echo waiting; wait"
        result = await driver.exec_sync(container_id, ("sh", "-c", script), 1.0)
        assert result.timed_out and result.exit_code == TIMED_OUT_EXIT_CODE
        assert result.stdout == b"waiting\n"
        assert time.monotonic() - started < 30  # bounds under a loaded CI machine, not speed
        deadline = time.monotonic() + 30
        while _running(["sleep", marker]):  # killed with the shell that started it
            assert time.monotonic() < deadline, "the timed-out command's child still runs"
            await asyncio.sleep(0.05)
        with pytest.raises(ExecNotStarted, match="executable file not found"):
            await driver.exec_sync(container_id, ("no-such-binary",), 30)

    run_in_a_docker_container(dockerd, busybox_image, tmp_path, scenario)


def _running(cmdline: list[str]) -> bool:
    return any(
        process.info["cmdline"] == cmdline and process.info["status"] != psutil.STATUS_ZOMBIE
        for process in psutil.process_iter(["cmdline", "status"])
    )


# ---- live output ----


# The workload waits for the test to create `done` in its sandbox (its working directory): the
# output below is seen while it runs however slow the node is.
UNTIL_DONE = "while [ ! -e done ]; do sleep 0.05; done"


def test_logs_follow_shows_lines_while_the_container_runs(
    docker_service: ServiceProcess, busybox_image: str, container_id: str
) -> None:
    stub = docker_service.stub()
    shell = f"echo first; echo oops >&2; {UNTIL_DONE}; echo second"
    reply = launch_docker(stub, container_id, shell, busybox_image)
    follower = subprocess.Popen(
        cli(docker_service, "logs", "-f", container_id),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert follower.stdout is not None
        assert follower.stdout.readline() == b"first\n"  # it runs: this came live
        (Path(reply.status.sandbox) / "done").touch()
        out, err = follower.communicate(timeout=60)
        assert (follower.returncode, out, err) == (0, b"second\n", b"oops\n")
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.communicate()
        destroy(stub, container_id)


def test_output_resumes_after_a_restart_without_a_line_twice(
    fresh_docker_service: ServiceProcess, busybox_image: str, container_id: str
) -> None:
    service = fresh_docker_service
    count = "i=0; while [ $i -lt 30 ]; do i=$((i+1)); echo line$i; echo err$i >&2; sleep 0.1; done"
    reply = launch_docker(service.stub(), container_id, f"{count}; {UNTIL_DONE}", busybox_image)
    sandbox = Path(reply.status.sandbox)
    _until_in_file(sandbox / "stdout", b"line3\n")
    service.kill()
    time.sleep(1)  # it writes on while nobody copies
    service.start()
    _until_in_file(sandbox / "stdout", b"line30\n")  # copied again, while it still runs
    _until_in_file(sandbox / "stderr", b"err30\n")
    (sandbox / "done").touch()
    assert wait(service.stub(), container_id).exit_code == 0
    assert (sandbox / "stdout").read_text().splitlines() == [f"line{i}" for i in range(1, 31)]
    assert (sandbox / "stderr").read_text().splitlines() == [f"err{i}" for i in range(1, 31)]
    destroy(service.stub(), container_id)


def _until_in_file(path: Path, wanted: bytes, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while wanted not in path.read_bytes():
        assert time.monotonic() < deadline, f"{wanted!r} never reached {path}"
        time.sleep(0.05)
