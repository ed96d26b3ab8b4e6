"""Attach to a container's first process through its supervisor's socket, for real (root,
namespaces, cgroup v1): containerizer-supervisor --attach-socket [--stdin [--stdin-once]]
[--tty], driven through adapter.supervisor.attach, and the native runtime's attach."""

from __future__ import annotations

import asyncio
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from adapter.core.errors import FailedPrecondition, InvalidArgument, NotFound
from adapter.core.model import Command, LaunchSpec, LinuxOptions, Resources
from adapter.runtimes.native.driver import NativeDriver
from adapter.runtimes.native.options import NativeOptions
from adapter.supervisor import client as supervisor
from adapter.supervisor.attach import HEADER, STDERR, STDOUT, AttachSession
from adapter.supervisor.client import SpawnError, SupervisorHandle
from tests.integration import test_supervisor
from tests.integration.cgroup_helpers import cgroups_root  # noqa: F401 (a fixture)
from tests.integration.test_supervisor import Box, wait_until
from tests.integration.test_supervisor_cri import lines_of, log_path, vm_rss_kib
from tests.services import node_services

# Fixtures shared with test_supervisor.py: the supervisor built from this checkout (once per
# session), the default enforcement, and a box (sandbox and status file) per test.
binary = test_supervisor.binary
enforcement = test_supervisor.enforcement
box = test_supervisor.box

pytestmark = pytest.mark.integration

TEN_MIB = 10 << 20
SYSTEM_PYTHON = "/usr/bin/python3"  # readable by other users, unlike the service's
NOBODY = 65534


def socket_of(box: Box) -> Path:
    """The socket in a directory of its own, root's and 0700, as the native runtime makes it."""
    directory = box.root / "run"
    directory.mkdir(mode=0o700, exist_ok=True)
    return directory / "attach"


async def spawn(box: Box, argv: list[str], **options: object) -> SupervisorHandle:
    return await box.spawn(argv, attach_socket=str(socket_of(box)), **options)


async def end(box: Box, handle: SupervisorHandle) -> None:
    """Kill what is left of the container (its init, and so its pid namespace) and reap."""
    supervisor.kill(handle, signal.SIGKILL)  # a no-op once the init is gone
    await box.supervisors.wait_exit(handle)


async def read_until(session: AttachSession, wanted: bytes, stream: int = STDOUT) -> bytes:
    """What came on `stream` up to and including `wanted`; fails at the output's end."""
    received = b""
    while wanted not in received:
        chunk = await asyncio.wait_for(session.read(stream), 10)
        assert chunk, f"the output ended before {wanted!r}; got {received[-200:]!r}"
        received += chunk
    return received


async def read_to_end(session: AttachSession, stream: int = STDOUT) -> bytes:
    received = b""
    while chunk := await asyncio.wait_for(session.read(stream), 10):
        received += chunk
    return received


# --- input, output, detach ----------------------------------------------------------------------


async def test_attached_input_reaches_sh_and_its_answer_comes_back_and_is_logged(box: Box) -> None:
    log = log_path(box)
    handle = await spawn(box, ["sh"], stdin=True, log_file=str(log))
    session = await AttachSession.connect(socket_of(box))
    try:
        assert (session.stdin, session.tty) == (True, False)
        await session.write(b"echo hello; echo oops >&2\n")
        assert await read_until(session, b"hello\n") == b"hello\n"
        assert await read_until(session, b"oops\n", STDERR) == b"oops\n"
        await wait_until(lambda: "oops" in lines_of(log, "stderr"))
        assert lines_of(log) == ["hello"]
    finally:
        session.close()
        await end(box, handle)


async def test_detach_then_attach_again_keeps_the_same_input(box: Box) -> None:
    handle = await spawn(box, ["sh"], stdin=True)
    try:
        first = await AttachSession.connect(socket_of(box))
        await first.write(b"x=kept; echo one\n")
        await read_until(first, b"one\n")
        first.close_stdin()  # without stdin_once this ends only the first session's input
        first.close()
        second = await AttachSession.connect(socket_of(box))
        await second.write(b"echo $x two\n")
        assert await read_until(second, b"two\n") == b"kept two\n"
        second.close()
        assert supervisor.is_alive(handle)
    finally:
        await end(box, handle)


async def test_with_stdin_once_the_first_detach_ends_the_input(box: Box) -> None:
    handle = await spawn(box, ["sh"], stdin=True, stdin_once=True)
    session = await AttachSession.connect(socket_of(box))
    await session.write(b"echo once\n")
    await read_until(session, b"once\n")
    session.close()  # it gave input: its detach is the end of it, and sh reads EOF
    status = await asyncio.wait_for(box.supervisors.wait_exit(handle), 10)
    assert status is not None and status.exit_code == 0
    assert box.stdout.read_text() == "once\n"  # without a CRI log: the sandbox's file
    assert not socket_of(box).exists()  # removed by the supervisor when the workload ended
    with pytest.raises(FailedPrecondition, match="no supervisor serves it"):
        await AttachSession.connect(socket_of(box))


async def test_close_stdin_with_stdin_once_lets_the_rest_of_the_output_come(box: Box) -> None:
    """The kubelet's way (critest's attach): write, end the input, read to the end."""
    handle = await spawn(box, ["sh"], stdin=True, stdin_once=True)
    session = await AttachSession.connect(socket_of(box))
    await session.write(b"sleep 0.2; echo last words\n")
    session.close_stdin()
    assert await read_to_end(session) == b"last words\n"
    assert await read_to_end(session, STDERR) == b""
    await asyncio.wait_for(session.wait(), 10)
    session.close()
    status = await box.supervisors.wait_exit(handle)
    assert status is not None and status.exit_code == 0


async def test_without_stdin_a_client_attaches_for_output_only(box: Box) -> None:
    script = "while [ ! -e go ]; do sleep 0.01; done; echo out; echo err >&2"
    handle = await spawn(box, ["sh", "-c", script], cwd=str(box.root))
    session = await AttachSession.connect(socket_of(box))
    assert (session.stdin, session.tty) == (False, False)
    await session.write(b"ignored\n")  # nobody reads it: dropped, nothing blocks
    (box.root / "go").touch()
    assert await read_to_end(session) == b"out\n"
    assert await read_to_end(session, STDERR) == b"err\n"
    session.close()
    status = await box.supervisors.wait_exit(handle)
    assert status is not None and status.exit_code == 0
    assert (box.stdout.read_text(), box.stderr.read_text()) == ("out\n", "err\n")


async def test_output_while_nobody_is_attached_still_reaches_the_log(box: Box) -> None:
    log = log_path(box)
    handle = await spawn(
        box, ["sh", "-c", "echo early; read line; echo $line"], stdin=True, log_file=str(log)
    )
    try:
        await wait_until(lambda: log.exists() and lines_of(log) == ["early"])
        session = await AttachSession.connect(socket_of(box))
        await session.write(b"late\n")
        assert await read_to_end(session) == b"late\n"  # only what came since it attached
        session.close()
        assert lines_of(log) == ["early", "late"]
    finally:
        await end(box, handle)


async def test_a_session_asking_for_stdout_only_drops_stderr(box: Box) -> None:
    handle = await spawn(box, ["sh"], stdin=True, stdin_once=True)
    session = await AttachSession.connect(socket_of(box), stderr=False)
    await session.write(b"head -c 4000000 /dev/zero >&2; echo done\n")
    session.close_stdin()
    assert await read_to_end(session) == b"done\n"
    assert await session.read(STDERR) == b""
    session.close()
    await box.supervisors.wait_exit(handle)


# --- clients that cannot hold the workload up -------------------------------------------------


def raw_client(path: Path) -> socket.socket:
    """A client that connects and reads its HELLO, then nothing more."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(str(path))
    assert client.recv(HEADER.size + 1) == b"\x05\x00\x00\x00\x01\x01"  # HELLO: stdin open
    return client


async def test_a_client_that_never_reads_does_not_stall_the_workload(box: Box) -> None:
    handle = await spawn(
        box, ["sh", "-c", "read go; head -c 10485760 /dev/zero; read done"], stdin=True
    )
    stalled = await asyncio.to_thread(raw_client, socket_of(box))
    try:
        driver = await AttachSession.connect(socket_of(box), stdout=False, stderr=False)
        await driver.write(b"go\n")
        await wait_until(lambda: box.stdout.stat().st_size == TEN_MIB, timeout=20)
        # Dropped once its queue was full: the supervisor kept no more than bounded buffers.
        assert vm_rss_kib(handle.supervisor_pid) < 3 * 1024
        received = await asyncio.to_thread(drain, stalled)
        assert 0 < received < TEN_MIB  # dropped before the end
        await driver.write(b"done\n")
        status = await asyncio.wait_for(box.supervisors.wait_exit(handle), 10)
        assert status is not None and status.exit_code == 0
        driver.close()
    finally:
        stalled.close()
        await end(box, handle)


def drain(client: socket.socket) -> int:
    """Bytes read until EOF (the supervisor closed this client)."""
    total = 0
    client.settimeout(10)
    while chunk := client.recv(1 << 16):
        total += len(chunk)
    return total


async def test_a_ninth_client_is_refused_and_the_eight_keep_working(box: Box) -> None:
    handle = await spawn(box, ["sh"], stdin=True)
    sessions = [await AttachSession.connect(socket_of(box)) for _ in range(8)]
    try:
        with pytest.raises(FailedPrecondition, match="8 clients are attached"):
            await AttachSession.connect(socket_of(box))
        await sessions[0].write(b"echo to all\n")
        for session in sessions:
            await read_until(session, b"to all\n")
    finally:
        for session in sessions:
            session.close()
        await end(box, handle)


async def test_a_client_sending_garbage_is_dropped_alone(box: Box) -> None:
    handle = await spawn(box, ["sh"], stdin=True)
    try:
        garbage = await asyncio.to_thread(raw_client, socket_of(box))
        garbage.sendall(HEADER.pack(99, 0))
        assert await asyncio.to_thread(drain, garbage) == 0
        garbage.close()
        session = await AttachSession.connect(socket_of(box))
        await session.write(b"echo still here\n")
        await read_until(session, b"still here\n")
        session.close()
    finally:
        await end(box, handle)


# --- who may attach ------------------------------------------------------------------------------


# Run as root in the test's directory, then as nobody: connect to run/attach from there.
CONNECT_AS_NOBODY = """
import os, socket
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    client.connect("run/attach")
except OSError as error:
    print(type(error).__name__)
else:
    client.settimeout(5)
    print("hello" if client.recv(16) else "closed")
"""


def connect_as_nobody(box: Box) -> str:
    process = subprocess.run(
        [SYSTEM_PYTHON, "-c", CONNECT_AS_NOBODY],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        cwd=box.root,
    )
    return process.stdout.strip()


async def test_the_socket_is_closed_to_other_users(box: Box) -> None:
    handle = await spawn(box, ["sh"], stdin=True)
    path = socket_of(box)
    try:
        info, directory = path.stat(), path.parent.stat()
        assert stat.S_ISSOCK(info.st_mode) and (info.st_uid, info.st_mode & 0o777) == (0, 0o600)
        assert (directory.st_uid, directory.st_mode & 0o777) == (0, 0o700)
        box.root.chmod(0o755)
        assert await asyncio.to_thread(connect_as_nobody, box) == "PermissionError"
        # Even with the way opened, the supervisor serves none but its own user.
        path.parent.chmod(0o711)
        path.chmod(0o666)
        assert await asyncio.to_thread(connect_as_nobody, box) == "closed"
    finally:
        await end(box, handle)


async def test_a_socket_directory_open_to_others_is_refused(box: Box) -> None:
    socket_of(box).parent.chmod(0o755)
    with pytest.raises(SpawnError) as caught:
        await spawn(box, ["true"])
    assert caught.value.step == "attach-socket" and "0700" in caught.value.reason
    assert not box.status_file.exists()


def test_stdin_and_tty_need_an_attach_socket(box: Box) -> None:
    for option, field in (("stdin", "linux.stdin"), ("tty", "linux.tty")):
        with pytest.raises(InvalidArgument) as caught:
            box.config(["sh"], **{option: True}).encode()
        assert caught.value.field == field
    with pytest.raises(InvalidArgument) as caught:
        box.config(["sh"], attach_socket="/run/x/attach", stdin_once=True).encode()
    assert caught.value.field == "linux.stdin_once"


# --- a restarted service --------------------------------------------------------------------------


ATTACH_FROM_ANOTHER_PROCESS = """
import asyncio, sys
from adapter.supervisor.attach import AttachSession

async def main():
    session = await AttachSession.connect(sys.argv[1])
    await session.write(b"echo from a fresh process\\n")
    received = b""
    while b"fresh process\\n" not in received:
        received += await session.read()
    session.close()
    sys.stdout.write(received.decode())

asyncio.run(main())
"""


async def test_a_fresh_process_attaches_to_a_container_it_did_not_launch(box: Box) -> None:
    handle = await spawn(box, ["sh"], stdin=True)
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            ATTACH_FROM_ANOTHER_PROCESS,
            str(socket_of(box)),
            stdout=asyncio.subprocess.PIPE,
            cwd=Path(__file__).parents[2],
        )
        output, _ = await asyncio.wait_for(process.communicate(), 30)
        assert output == b"from a fresh process\n"
        assert supervisor.is_alive(handle)  # a detach without stdin_once ends nothing
    finally:
        await end(box, handle)


# --- a terminal ---------------------------------------------------------------------------------


async def test_with_a_terminal_the_workload_has_it_sized_and_as_its_own(box: Box) -> None:
    log = log_path(box)
    handle = await spawn(box, ["sh"], stdin=True, tty=True, log_file=str(log))
    session = await AttachSession.connect(socket_of(box))
    try:
        assert (session.stdin, session.tty) == (True, True)
        session.resize(100, 30)
        await session.write(b"stty size; test -t 0 && test -t 2 && echo on a tty; tty\n")
        output = await read_until(session, b"on a tty\r\n")
        assert b"30 100\r\n" in output  # a terminal's output: CR LF
        assert await session.read(STDERR) == b""
        await wait_until(lambda: "on a tty\r" in lines_of(log))
        assert lines_of(log, "stderr") == []
    finally:
        session.close()
        await end(box, handle)


async def test_a_terminals_input_ended_with_stdin_once_hangs_it_up(box: Box) -> None:
    handle = await spawn(box, ["sh", "-i"], stdin=True, stdin_once=True, tty=True)
    session = await AttachSession.connect(socket_of(box))
    await session.write(b"echo typed\n")
    await read_until(session, b"typed\r\n")
    session.close_stdin()
    await asyncio.wait_for(read_to_end(session), 10)
    session.close()
    status = await asyncio.wait_for(box.supervisors.wait_exit(handle), 10)
    assert status is not None and status.signal == signal.SIGHUP


# --- the native runtime -------------------------------------------------------------------------


@pytest.fixture
async def native(
    binary: str,
    tmp_path: Path,
    cgroups_root: str,  # noqa: F811 (the fixture above)
) -> AsyncIterator[NativeDriver]:
    services = node_services(tmp_path / "state", cgroups_root=cgroups_root)
    driver = NativeDriver(NativeOptions(supervisor=binary), services)
    yield driver
    await driver.close()


def native_spec(
    tmp_path: Path, container_id: str, argv: tuple[str, ...], **linux: bool
) -> LaunchSpec:
    sandbox = tmp_path / container_id
    sandbox.mkdir()
    return LaunchSpec(
        container_id=container_id,
        command=Command(argv=argv),
        resources=Resources(),
        runtime="native",
        sandbox=str(sandbox),
        linux=LinuxOptions(**linux),
    )


async def destroy(driver: NativeDriver, container_id: str) -> None:
    await driver.kill_all(container_id)
    await asyncio.wait_for(driver.wait(container_id), 10)
    await driver.cleanup(container_id)


async def test_native_attach_to_a_container_launched_with_stdin(
    native: NativeDriver, tmp_path: Path
) -> None:
    spec = native_spec(tmp_path, "attach-stdin", ("sh",), stdin=True, stdin_once=True)
    await native.start(spec)
    try:
        session = await native.attach(spec.container_id)
        await session.write(b"echo through the runtime\n")
        session.close_stdin()
        assert await read_to_end(session) == b"through the runtime\n"
        session.close()
        exit_ = await asyncio.wait_for(native.wait(spec.container_id), 10)
        assert exit_.exit_code == 0
    finally:
        await destroy(native, spec.container_id)


async def test_native_attach_without_stdin_is_output_only(
    native: NativeDriver, tmp_path: Path
) -> None:
    spec = native_spec(tmp_path, "attach-output", ("sh", "-c", "sleep 0.5; echo late"))
    await native.start(spec)
    try:
        session = await native.attach(spec.container_id)
        assert not session.stdin
        assert await read_to_end(session) == b"late\n"
        session.close()
        assert (Path(spec.sandbox) / "stdout").read_text() == "late\n"
    finally:
        await destroy(native, spec.container_id)
    with pytest.raises(NotFound):
        await native.attach(spec.container_id)


def test_a_checkpointed_spec_keeps_the_attach_options(tmp_path: Path) -> None:
    spec = native_spec(tmp_path, "round-trip", ("sh",), stdin=True, stdin_once=True, tty=True)
    assert LaunchSpec.from_json(spec.to_json()) == spec
    older = spec.to_json()
    for key in ("stdin", "stdin_once", "tty"):
        del older["linux"][key]  # a checkpoint written before these existed
    assert LaunchSpec.from_json(older).linux == LinuxOptions()
