"""`containerizer exec` against a real service: output, exit codes, stdin, a working shell on a
terminal, the exec'd process inside the container and ended by its destroy, bad input."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator

import psutil
import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from tests.conftest import BIN, ServiceProcess
from tests.integration.api import destroy, launch
from tests.integration.processes import pid_namespace, read_until

pytestmark = pytest.mark.integration


def cli(service: ServiceProcess, *args: str) -> list[str]:
    return [str(BIN / "containerizer"), "--endpoint", service.endpoint, *args]


@pytest.fixture
def sleeper(service: ServiceProcess, container_id: str) -> Iterator[str]:
    launch(service.stub(), container_id, "exec sleep 600")
    try:
        yield container_id
    finally:
        destroy(service.stub(), container_id)


def test_exec_output_and_exit_code(service: ServiceProcess, sleeper: str) -> None:
    done = subprocess.run(
        cli(service, "exec", sleeper, "--", "sh", "-c", "echo out; echo err >&2; exit 4"),
        capture_output=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout, done.stderr) == (4, b"out\n", b"err\n")


def test_exec_interactive_passes_stdin(service: ServiceProcess, sleeper: str) -> None:
    done = subprocess.run(
        cli(service, "exec", "-i", sleeper, "--", "sh", "-c", "tr a-z A-Z"),
        input=b"hello\n",
        capture_output=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout) == (0, b"HELLO\n")


def test_exec_with_a_terminal_gives_a_working_shell(service: ServiceProcess, sleeper: str) -> None:
    master, slave = os.openpty()
    process = subprocess.Popen(
        cli(service, "exec", "-it", sleeper, "--", "sh"),
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    try:
        os.write(master, b"echo $((6*7)); tty\n")
        output = read_until(master, b"/dev/pts/")
        assert b"42" in output
        os.write(master, b"exit 3\n")
        assert process.wait(timeout=30) == 3
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)


def test_exec_runs_inside_the_container_and_ends_with_it(
    service: ServiceProcess, container_id: str
) -> None:
    launch(service.stub(), container_id, "exec sleep 600")
    marker = f"{900 + int.from_bytes(os.urandom(2), 'big') / 1000:.3f}"  # a unique duration
    process = subprocess.Popen(
        cli(service, "exec", container_id, "--", "sleep", marker),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not (found := _processes_named(marker)):
            assert time.monotonic() < deadline, "the exec'd command never ran"
            time.sleep(0.05)
        status = service.stub().Status(pb.StatusRequest(container_id=container_id))
        assert pid_namespace(found[0].pid) == pid_namespace(status.pid)
        destroy(service.stub(), container_id)
        assert process.wait(timeout=30) != 0
        assert not found[0].is_running()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _processes_named(name: str) -> list[psutil.Process]:
    return [
        process
        for process in psutil.process_iter(["cmdline"])
        if process.info["cmdline"] == ["sleep", name]
    ]


def test_exec_bad_input_is_one_line(service: ServiceProcess) -> None:
    unknown = subprocess.run(
        cli(service, "exec", "no-such-container", "--", "true"), capture_output=True, timeout=60
    )
    assert unknown.returncode == 125
    assert unknown.stderr.decode().count("\n") == 1 and b"no-such-container" in unknown.stderr
    empty = subprocess.run(cli(service, "exec", "x"), capture_output=True, timeout=60)
    assert empty.returncode == 125 and b"name the command" in empty.stderr
