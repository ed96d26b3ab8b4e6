"""`containerizer attach` and `run -i/-t` against a real service: input to a container's first
process, its output from then on, a shell on a terminal, detaching without stopping it."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time

import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from tests.conftest import BIN, ServiceProcess
from tests.integration.api import destroy

pytestmark = pytest.mark.integration


def cli(service: ServiceProcess, *args: str) -> list[str]:
    return [str(BIN / "containerizer"), "--endpoint", service.endpoint, *args]


def test_attach_passes_input_and_detaching_keeps_the_container(
    service: ServiceProcess, container_id: str
) -> None:
    subprocess.run(
        cli(service, "run", "-i", "-d", "--id", container_id, "--", "sh"), check=True, timeout=60
    )
    try:
        attached = subprocess.Popen(
            cli(service, "attach", container_id),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert attached.stdin is not None and attached.stdout is not None
        attached.stdin.write(b"echo hello from $((40+2))\n")
        attached.stdin.flush()
        assert attached.stdout.readline() == b"hello from 42\n"
        attached.send_signal(signal.SIGINT)  # detach
        _, errors = attached.communicate(timeout=30)
        assert attached.returncode == 0, errors
        status = service.stub().Status(pb.StatusRequest(container_id=container_id))
        assert status.state == pb.RUNNING  # detaching leaves it running
        again = subprocess.run(
            cli(service, "attach", container_id), input=b"exit 7\n", capture_output=True, timeout=60
        )
        assert again.returncode == 0  # its output ended with it
        termination = service.stub().Wait(pb.WaitRequest(container_id=container_id), timeout=30)
        assert termination.termination.exit_code == 7
    finally:
        destroy(service.stub(), container_id)


def test_run_interactive_reads_our_stdin(service: ServiceProcess, container_id: str) -> None:
    try:
        done = subprocess.run(
            cli(
                service, "run", "-i", "--id", container_id, "--", "sh", "-c", "read x; echo got $x"
            ),
            input=b"abc\n",
            capture_output=True,
            timeout=60,
        )
        assert (done.returncode, done.stdout) == (0, b"got abc\n"), done.stderr
    finally:
        destroy(service.stub(), container_id)


def test_run_with_a_terminal_is_a_working_shell(service: ServiceProcess, container_id: str) -> None:
    master, slave = os.openpty()
    process = subprocess.Popen(
        cli(service, "run", "-i", "-t", "--id", container_id, "--", "sh"),
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    try:
        time.sleep(0.5)
        os.write(master, b"tty; echo $((6*7))\n")
        seen = b""
        deadline = time.monotonic() + 20
        while b"42" not in seen and time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                seen += os.read(master, 4096)
        assert b"/dev/pts/" in seen and b"42" in seen, seen
        os.write(master, b"exit 3\n")
        assert process.wait(timeout=30) == 3
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)
        destroy(service.stub(), container_id)


def test_attach_without_stdin_shows_output_until_the_end(
    service: ServiceProcess, container_id: str
) -> None:
    subprocess.run(
        cli(service, "run", "-d", "--id", container_id, "--", "sh", "-c",
            "sleep 1; echo late; echo oops >&2"),
        check=True, timeout=60,
    )  # fmt: skip
    try:
        done = subprocess.run(
            cli(service, "attach", "--no-stdin", container_id), capture_output=True, timeout=60
        )
        assert (done.returncode, done.stdout, done.stderr) == (0, b"late\n", b"oops\n")
    finally:
        destroy(service.stub(), container_id)
