"""containerizer-supervisor's two CRI modes for real (root, namespaces, cgroup v1): the container
log in the kubelet's format (--log-file) and a command run inside a running container
(--exec-in), driven through adapter.supervisor.client and adapter.supervisor.exec."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import os
import re
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest

from adapter.core.confinement import DEFAULT_CAPABILITIES, capability_mask
from adapter.core.errors import FailedPrecondition, InvalidArgument
from adapter.core.model import Identity
from adapter.supervisor import client as supervisor
from adapter.supervisor.client import SpawnError, SupervisorHandle
from adapter.supervisor.exec import (
    MAX_OUTPUT_BYTES,
    TIMED_OUT_EXIT_CODE,
    ExecConfig,
    ExecNotStarted,
    ExecResult,
    exec_process,
    exec_sync,
)
from adapter.supervisor.launch_config import Enforcement
from adapter.supervisor.session import ExecSession
from isolators.cgroups.hierarchy import Hierarchies
from isolators.registry import ContainerCgroups
from tests.integration import test_supervisor
from tests.integration.test_supervisor import Box, wait_until

# Fixtures shared with test_supervisor.py: the supervisor built from this checkout (once per
# session), the default enforcement, and a box (sandbox and status file) per test.
binary = test_supervisor.binary
enforcement = test_supervisor.enforcement
box = test_supervisor.box

pytestmark = pytest.mark.integration

RECORD = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z) (stdout|stderr) ([FP]) (.*)")
CONTAINER_CONTROLLERS = ("freezer", "pids", "memory")
CONTAINER_ID = "c"


def cri_time(moment: datetime.datetime) -> str:
    """A time as the log writes it (fixed width: comparable as text)."""
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{moment.microsecond:06d}000Z"


def now() -> str:
    return cri_time(datetime.datetime.now(datetime.UTC))


def records(log: Path) -> list[tuple[str, str, str, str]]:
    """(time, stream, tag, content) of each record; every line must be one."""
    text = log.read_bytes().decode()
    assert text == "" or text.endswith("\n")
    parsed = []
    for line in text.split("\n")[:-1]:
        match = RECORD.fullmatch(line)
        assert match is not None, f"not a CRI log record: {line[:120]!r}"
        time, stream, tag, content = match.groups()
        parsed.append((time, stream, tag, content))
    return parsed


def lines_of(log: Path, stream: str = "stdout") -> list[str]:
    return [content for _, name, _, content in records(log) if name == stream]


def log_path(box: Box) -> Path:
    """The kubelet's layout: a directory of its own (made by the caller) per container."""
    directory = box.root / "logs"
    directory.mkdir(exist_ok=True)
    return directory / "0.log"


def vm_rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])


# --- the CRI log --------------------------------------------------------------------------------


async def test_log_has_both_streams_as_records_with_ordered_times(box: Box) -> None:
    log = log_path(box)
    before = now()
    script = "echo one; echo two >&2; echo; echo 'three  spaced '; echo four >&2"
    status = await box.run(["sh", "-c", script], log_file=str(log))
    after = now()
    assert status is not None and status.exit_code == 0
    entries = records(log)
    assert [(tag, text) for _, name, tag, text in entries if name == "stdout"] == [
        ("F", "one"),
        ("F", ""),
        ("F", "three  spaced "),
    ]
    assert lines_of(log, "stderr") == ["two", "four"]
    times = [time for time, _, _, _ in entries]
    assert times == sorted(times)
    assert before <= times[0] and times[-1] <= after
    assert not box.stdout.exists() and not box.stderr.exists()  # the sandbox's files are unused


async def test_a_40_kib_line_is_cut_into_partial_records(box: Box) -> None:
    log = log_path(box)
    script = "head -c 40960 /dev/zero | tr '\\0' a; echo; echo next"
    status = await box.run(["sh", "-c", script], log_file=str(log))
    assert status is not None and status.exit_code == 0
    shape = [(tag, len(text), set(text)) for _, _, tag, text in records(log)]
    assert shape == [
        ("P", 16384, {"a"}),
        ("P", 16384, {"a"}),
        ("F", 8192, {"a"}),
        ("F", 4, {"n", "e", "x", "t"}),
    ]


async def test_output_without_a_final_newline_is_flushed_as_a_full_record(box: Box) -> None:
    log = log_path(box)
    status = await box.run(
        ["sh", "-c", "printf 'no newline'; printf 'err end' >&2"], log_file=str(log)
    )
    assert status is not None and status.exit_code == 0
    assert sorted((name, tag, text) for _, name, tag, text in records(log)) == [
        ("stderr", "F", "err end"),
        ("stdout", "F", "no newline"),
    ]


async def test_all_output_is_in_the_log_once_the_status_is_recorded(box: Box) -> None:
    log = log_path(box)
    handle = await box.spawn(["seq", "1", "100000"], log_file=str(log))
    await wait_until(box.status_file.exists, timeout=20)
    assert lines_of(log) == [str(number) for number in range(1, 100001)]
    status = await box.supervisors.wait_exit(handle)
    assert status is not None and status.exit_code == 0


async def test_sigusr1_after_a_rename_starts_a_new_file(box: Box) -> None:
    log, go = log_path(box), box.root / "go"
    script = f"echo before; while [ ! -e {go} ]; do sleep 0.01; done; echo after"
    handle = await box.spawn(["sh", "-c", script], log_file=str(log))
    await wait_until(lambda: log.exists() and "before" in log.read_text())
    rotated = log.with_name("0.log.20261201-235939")
    log.rename(rotated)
    assert supervisor.reopen_log(handle)
    await wait_until(log.exists)  # reopened: what comes next goes there
    go.touch()
    status = await box.supervisors.wait_exit(handle)
    assert status is not None and status.exit_code == 0
    assert (lines_of(rotated), lines_of(log)) == (["before"], ["after"])
    assert (log.stat().st_mode & 0o777, log.stat().st_nlink) == (0o640, 1)


async def test_reopen_of_a_supervisor_that_is_gone_reports_it(box: Box) -> None:
    handle = await box.spawn(["true"], log_file=str(log_path(box)))
    await box.supervisors.wait_exit(handle)
    assert not supervisor.reopen_log(handle)


async def test_supervisor_in_log_mode_still_ignores_termination_signals(box: Box) -> None:
    log = log_path(box)
    handle = await box.spawn(["sh", "-c", "seq 1 50000; exec sleep 30"], log_file=str(log))
    # Counted by newlines while it is written (a read beside a write may see half a record),
    # then every record checked once the last one is whole.
    await wait_until(lambda: log.exists() and log.read_bytes().count(b"\n") == 50000)
    assert len(lines_of(log)) == 50000
    for signo in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        os.kill(handle.supervisor_pid, signo)
    await asyncio.sleep(0.1)
    assert supervisor.is_alive(handle)
    assert vm_rss_kib(handle.supervisor_pid) < 3 * 1024  # fixed buffers: no growth with output
    supervisor.kill(handle, signal.SIGKILL)
    status = await box.supervisors.wait_exit(handle)
    assert status is not None and status.signal == signal.SIGKILL


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
async def test_a_link_at_the_log_path_is_refused(box: Box, link: str) -> None:
    host_file = box.root / "host-file"
    host_file.write_text("precious\n")
    log = log_path(box)
    if link == "symlink":
        log.symlink_to(host_file)
    else:
        os.link(host_file, log)
    with pytest.raises(SpawnError) as caught:
        await box.spawn(["echo", "overwritten"], log_file=str(log))
    assert caught.value.step == "log-file"
    expected = "Too many levels of symbolic links" if link == "symlink" else "of its own"
    assert str(log) in str(caught.value) and expected in caught.value.reason
    assert host_file.read_text() == "precious\n"
    assert not box.status_file.exists()


# --- exec into a running container ----------------------------------------------------------------


@dataclasses.dataclass
class Container:
    """A running container (`sleep`, under our init in its own namespaces) in cgroups of a
    run-scoped root, as the native runtime launches one."""

    box: Box
    handle: SupervisorHandle
    hierarchies: Hierarchies

    @property
    def cgroups(self) -> list[Path]:
        return [self.hierarchies.path(name, CONTAINER_ID) for name in CONTAINER_CONTROLLERS]

    def config(self, argv: list[str], **options: object) -> ExecConfig:
        return ExecConfig(
            target_pid=self.handle.child_pid,
            target_start_time=self.handle.child_start_time,
            argv=argv,
            enforcement=self.box.enforcement,
            cgroup_procs=[str(cgroup / "cgroup.procs") for cgroup in self.cgroups],
            **options,  # type: ignore[arg-type]
        )

    async def exec(
        self, argv: list[str], *, timeout: float = 20.0, stdin: bytes = b"", **options: object
    ) -> ExecResult:
        config = self.config(argv, **options)
        return await exec_sync(self.box.binary, config, timeout=timeout, stdin=stdin)


@pytest.fixture
async def container(box: Box, cgroups_root: str) -> AsyncIterator[Container]:
    hierarchies = Hierarchies.discover(cgroups_root)
    cgroups = [hierarchies.path(name, CONTAINER_ID) for name in CONTAINER_CONTROLLERS]
    for cgroup in cgroups:
        cgroup.mkdir(parents=True)
    procs = [str(cgroup / "cgroup.procs") for cgroup in cgroups]
    handle = await box.spawn(["sleep", "300"], cgroup_procs=procs)
    yield Container(box, handle, hierarchies)
    supervisor.kill(handle, signal.SIGKILL)
    await box.supervisors.wait_exit(handle)


def processes_with(argv: list[str]) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == argv]


def unique_sleep() -> list[str]:
    return ["sleep", f"1000.{uuid.uuid4().int % 10**9}"]


async def test_exec_returns_the_commands_output_and_exit_code(container: Container) -> None:
    result = await container.exec(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert result == ExecResult(exit_code=3, stdout=b"out\n", stderr=b"err\n", timed_out=False)


async def test_exec_gets_its_stdin_env_and_cwd(container: Container) -> None:
    script = "pwd; echo $GREETING; echo $PATH; cat"
    result = await container.exec(
        ["sh", "-c", script], stdin=b"from stdin", env=[("GREETING", "hi")], cwd="/tmp"
    )
    assert result.stdout.decode().split("\n") == [
        "/tmp",
        "hi",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "from stdin",
    ]
    assert (await container.exec(["pwd"])).stdout == b"/\n"  # the container's root by default


async def test_exec_runs_as_the_given_identity(container: Container) -> None:
    identity = Identity(uid=12345, gid=23456, groups=(23456, 34567), home="/home/someone")
    script = "id -u; id -g; id -G; echo $HOME"
    result = await container.exec(["sh", "-c", script], identity=identity)
    assert result.exit_code == 0
    assert result.stdout.split() == [b"12345", b"23456", b"23456", b"34567", b"/home/someone"]


async def test_exec_process_streams_stdin_and_stdout(container: Container) -> None:
    process = await exec_process(container.box.binary, container.config(["cat"]))
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write(b"line one\n")
    await process.stdin.drain()
    assert await asyncio.wait_for(process.stdout.readline(), 10) == b"line one\n"
    process.stdin.close()
    assert await asyncio.wait_for(process.wait(), 10) == 0


async def test_exec_is_in_the_containers_namespaces_and_cgroups(container: Container) -> None:
    kinds = ("pid", "mnt", "uts", "ipc", "net", "cgroup")
    links = " ".join(f"/proc/self/ns/{kind}" for kind in kinds)
    result = await container.exec(["sh", "-c", f"readlink {links}; echo $$; cat /proc/self/cgroup"])
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    workload = container.handle.child_pid
    assert lines[: len(kinds)] == [os.readlink(f"/proc/{workload}/ns/{kind}") for kind in kinds]
    assert os.readlink("/proc/self/ns/pid") != lines[0]  # a namespace of the container's own
    assert int(lines[len(kinds)]) < 10  # a pid of that namespace: init 1, the workload 2
    root = container.hierarchies.root("pids").name
    for controller in CONTAINER_CONTROLLERS:
        assert any(line.endswith(f":{controller}:/{root}/{CONTAINER_ID}") for line in lines), (
            f"not in the container's {controller} cgroup: {lines}"
        )


async def test_exec_is_confined_as_the_workload(container: Container) -> None:
    # personality() is outside the seccomp allow-list; on the host, setarch may call it.
    assert subprocess.run(["setarch", "x86_64", "true"], check=False).returncode == 0
    script = (
        "grep -e CapBnd -e CapEff -e Seccomp: -e NoNewPrivs /proc/self/status;"
        " setarch x86_64 true 2>/dev/null && echo personality allowed || echo personality refused"
    )
    result = await container.exec(["sh", "-c", script], identity=Identity(uid=65534, gid=65534))
    fields = dict(line.split(":\t") for line in result.stdout.decode().splitlines()[:-1])
    mask = f"{capability_mask(DEFAULT_CAPABILITIES):016x}"
    assert fields == {"CapBnd": mask, "CapEff": "0" * 16, "NoNewPrivs": "1", "Seccomp": "2"}
    assert result.stdout.decode().splitlines()[-1] == "personality refused"


@pytest.mark.parametrize(
    ("command", "reason"),
    [
        ("/nonexistent/cmd", "No such file or directory"),
        ("no-such-command-ctz", "No such file or directory"),
        ("{root}/data", "Permission denied"),  # there, but not executable
    ],
)
async def test_a_command_that_cannot_run_is_an_error_not_an_exit_code(
    container: Container, command: str, reason: str
) -> None:
    data = container.box.root / "data"
    data.write_text("not a program\n")
    data.chmod(0o644)
    command = command.format(root=container.box.root)
    with pytest.raises(ExecNotStarted, match=f"exec: {re.escape(command)}: {reason}"):
        await container.exec([command])


async def test_a_command_that_exits_127_itself_is_an_exit_code(container: Container) -> None:
    result = await container.exec(
        ["/bin/sh", "-c", "echo containerizer-supervisor: x >&2; exit 127"]
    )
    assert result.exit_code == 127


async def test_exec_past_its_timeout_is_killed(container: Container) -> None:
    sleep = unique_sleep()
    result = await container.exec(sleep, timeout=0.5)
    assert (result.timed_out, result.exit_code) == (True, TIMED_OUT_EXIT_CODE)
    await wait_until(lambda: processes_with(sleep) == [])
    assert supervisor.is_alive(container.handle)  # the container itself runs on


async def test_cancelled_exec_leaves_nothing_running(container: Container) -> None:
    sleep = unique_sleep()
    task = asyncio.create_task(container.exec(sleep))
    await wait_until(lambda: len(processes_with(sleep)) == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_until(lambda: processes_with(sleep) == [])


@pytest.mark.parametrize("destroy", ["kill the init", "kill the cgroups"])
async def test_destroying_the_container_ends_its_exec(container: Container, destroy: str) -> None:
    sleep = unique_sleep()
    task = asyncio.create_task(container.exec(sleep, timeout=60))
    await wait_until(lambda: len(processes_with(sleep)) == 1)
    if destroy == "kill the init":  # its pid namespace ends with it
        supervisor.kill(container.handle, signal.SIGKILL)
    else:
        await ContainerCgroups(container.hierarchies).destroy(CONTAINER_ID)
    result = await asyncio.wait_for(task, 10)
    assert (result.exit_code, result.timed_out) == (128 + signal.SIGKILL, False)
    await wait_until(lambda: processes_with(sleep) == [])


async def test_output_beyond_the_bound_is_dropped(container: Container) -> None:
    result = await container.exec(["sh", "-c", "head -c 20M /dev/zero; echo done >&2"])
    assert result.exit_code == 0
    assert (len(result.stdout), result.stderr) == (MAX_OUTPUT_BYTES, b"done\n")


async def test_exec_into_a_container_that_ended_is_refused(container: Container) -> None:
    supervisor.kill(container.handle, signal.SIGKILL)
    await container.box.supervisors.wait_exit(container.handle)
    with pytest.raises(FailedPrecondition, match="not running"):
        await container.exec(["true"])


async def test_supervisor_refuses_a_pid_that_is_not_the_containers_init(
    container: Container,
) -> None:
    """The check the client does is repeated by the supervisor, after it opened the namespaces:
    a pid reused in between would otherwise hand it another process's namespaces."""
    config = dataclasses.replace(
        container.config(["true"]), target_start_time=container.handle.child_start_time + 1
    )
    read_end, write_end = os.pipe()
    os.write(write_end, config.encode())
    os.close(write_end)
    try:
        result = subprocess.run(
            [container.box.binary, "--config-fd", str(read_end)],
            pass_fds=(read_end,), capture_output=True, check=False,
        )  # fmt: skip
    finally:
        os.close(read_end)
    assert result.returncode == 126
    assert result.stderr.startswith(b"containerizer-supervisor: container: init: not running")


def test_exec_config_encodes_exec_in_first_and_only_the_process_confinement(
    enforcement: Enforcement,
) -> None:
    with_paths = dataclasses.replace(
        enforcement, masked_paths=("/proc/kcore",), readonly_paths=("/proc/sys",)
    )
    config = ExecConfig(7, 8, ["true"], dataclasses.replace(with_paths, cgroup_namespace=True))
    words = config.encode().split(b"\0")
    assert words[:4] == [b"--exec-in", b"7", b"--exec-start-time", b"8"]
    assert not {b"--masked-path", b"--readonly-path", b"--cgroupns"} & set(words)
    with pytest.raises(InvalidArgument, match="cmd"):
        ExecConfig(7, 8, ["a\0b"], enforcement).encode()
    with pytest.raises(InvalidArgument, match="envs"):
        ExecConfig(7, 8, ["true"], enforcement, env=[("A=B", "c")]).encode()


# ---- the streaming exec (ExecSession) ----


async def _read_all(session: ExecSession, stream: int = 1) -> bytes:
    chunks = []
    while chunk := await session.read(stream):
        chunks.append(chunk)
    return b"".join(chunks)


async def test_session_pipes_stdin_to_the_command_and_returns_its_code(
    container: Container,
) -> None:
    session = await ExecSession.start(
        container.box.binary, container.config(["sh", "-c", "cat; echo err >&2; exit 3"])
    )
    try:
        await session.write(b"hello\n")
        session.close_stdin()
        stdout, stderr = await asyncio.gather(_read_all(session, 1), _read_all(session, 2))
        assert (stdout, stderr, await session.wait()) == (b"hello\n", b"err\n", 3)
    finally:
        session.close()


async def test_session_with_a_terminal_sees_a_tty_of_the_asked_size(container: Container) -> None:
    config = container.config(["sh", "-c", "read line; stty size; tty -s && echo tty"], tty=True)
    session = await ExecSession.start(container.box.binary, config)
    try:
        session.resize(100, 40)
        await session.write(b"go\n")
        output = await _read_all(session)
        assert b"40 100" in output and b"tty" in output, output
        assert await session.wait() == 0
    finally:
        session.close()


async def test_session_of_a_command_that_cannot_run_is_an_error(container: Container) -> None:
    session = await ExecSession.start(container.box.binary, container.config(["/no/such"]))
    try:
        await _read_all(session, 1)
        await _read_all(session, 2)
        with pytest.raises(ExecNotStarted, match="/no/such"):
            await session.wait()
    finally:
        session.close()


async def test_killed_session_leaves_nothing_running(container: Container) -> None:
    sleep = unique_sleep()
    session = await ExecSession.start(container.box.binary, container.config(sleep))
    try:
        await wait_until(lambda: processes_with(sleep) != [])
        session.kill()
        assert await session.wait() == -9  # the supervisor itself was killed with its group
        await wait_until(lambda: processes_with(sleep) == [])
    finally:
        session.close()
