"""Run one more process inside a running container of the supervisor (CRI ExecSync, later Exec).

`containerizer-supervisor --exec-in PID` does the work: it opens the namespaces of the
container's init (host pid PID, the SupervisorHandle's child), checks that PID is still the
process that started at the given start time, joins the container's cgroups and namespaces,
forks (a pid namespace applies to children only), and the child confines itself with the
workload's own code (bounding set, user, no_new_privs, seccomp) and execs the command. So the
process is in the container's cgroups and pid namespace: a destroy, which kills the cgroups (or
the init, whose pid namespace dies with it), kills it too.

The supervisor exits as a shell does: with the command's status, 128 + n when signal n ended it,
126 when something failed before the exec (a line `containerizer-supervisor: <step>: <reason>`
on stderr), 127 when the command was not found. Its configuration (the command's argv and
environment may hold secrets, and a command line is readable by every local user) comes through
a memfd passed as `--config-fd N` with N above 2, because 0, 1 and 2 are the command's own
stdin, stdout and stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from adapter.core.errors import FailedPrecondition, InvalidArgument, LaunchFailed
from adapter.core.model import Identity
from adapter.supervisor.client import _feed
from adapter.supervisor.launch_config import Enforcement, _serialize, environment_with_home
from adapter.supervisor.processes import ProcessRef

# What ExecSync keeps of each stream; the rest is read and dropped, so that a command writing
# without end never blocks on a full pipe nor fills the service's memory.
MAX_OUTPUT_BYTES = 16 << 20
# How long the output may still flow once the supervisor has exited: a process the command left
# running in the container may hold the pipes open for as long as it lives.
DRAIN_GRACE_S = 1.0
TIMED_OUT_EXIT_CODE = -1
_READ_CHUNK = 64 << 10


@dataclass(frozen=True)
class ExecConfig:
    """One command to run in a running container, confined as its workload: the container's
    enforcement, cgroups and identity (`identity` None: root with the supervisor's groups)."""

    target_pid: int  # host pid of the container's init: SupervisorHandle.child_pid
    target_start_time: int  # SupervisorHandle.child_start_time: a reused pid is refused
    argv: Sequence[str]
    enforcement: Enforcement
    env: Sequence[tuple[str, str]] = ()
    cwd: str | None = None  # inside the container; its root when None
    identity: Identity | None = None
    cgroup_procs: Sequence[str] = ()  # the container's cgroup.procs files, host paths
    # The command gets a terminal of the container's own, as its stdin, stdout, stderr and
    # controlling terminal; the supervisor relays it to its own stdin and stdout.
    tty: bool = False

    def encode(self, report_fd: int | None = None, resize_fd: int | None = None) -> bytes:
        """The supervisor's configuration: `--exec-in` first (it tells the supervisor's mode
        before anything else is parsed), then the options, `--`, the command. A string with a
        NUL could not be told apart from two: InvalidArgument naming its field."""
        if not self.argv:
            raise InvalidArgument("cmd", "the command is empty")
        parts: list[tuple[str | bytes, str]] = [
            ("--exec-in", ""),
            (str(self.target_pid), ""),
            ("--exec-start-time", ""),
            (str(self.target_start_time), ""),
        ]
        if report_fd is not None:
            parts += [("--exec-report-fd", ""), (str(report_fd), "")]
        if resize_fd is not None:
            parts += [("--resize-fd", ""), (str(resize_fd), "")]
        for path in self.cgroup_procs:
            parts += [("--cgroup-procs", ""), (path, "cgroup_procs")]
        if self.cwd is not None:
            parts += [("--cwd", ""), (self.cwd, "working_dir")]
        if self.tty:
            parts += [("--tty", "")]
        parts += [(part, "identity") for part in _identity_options(self.identity)]
        for key, value in environment_with_home(self.env, self.identity):
            if not key or "=" in key:
                raise InvalidArgument("envs", f"name {key!r} is empty or has '='")
            parts += [("--env", ""), (f"{key}={value}", "envs")]
        parts += [(part, "confinement") for part in _process_enforcement(self.enforcement).parts()]
        parts += [("--", ""), *((word, "cmd") for word in self.argv)]
        return _serialize(parts)


def _identity_options(identity: Identity | None) -> list[str]:
    """--uid, --gid and --groups: numbers only, resolved by the service (never by a name
    service inside the image, which would run the image's code as host root)."""
    if identity is None:
        return []
    groups = ",".join(str(gid) for gid in identity.groups)
    return ["--uid", str(identity.uid), "--gid", str(identity.gid), "--groups", groups]


def _process_enforcement(enforcement: Enforcement) -> Enforcement:
    """What applies to a process: the masked and read-only paths and the cgroup namespace were
    made with the container's mount namespace, which the command joins as it is."""
    return dataclasses.replace(
        enforcement, masked_paths=(), readonly_paths=(), cgroup_namespace=False
    )


@dataclass(frozen=True)
class ExecResult:
    """How the command ended. `exit_code` is its status, 128 + n when signal n ended it (a
    destroy of the container: 137), 126 when it could not be started and 127 when it was not
    found (the reason on stderr), or TIMED_OUT_EXIT_CODE (-1) with `timed_out` when the timeout
    ended it: it has no status of its own then. Each stream holds at most MAX_OUTPUT_BYTES."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool = False


def _check_running(config: ExecConfig) -> None:
    """The supervisor checks again, atomically; this gives the common case a clear error."""
    if not ProcessRef(config.target_pid, config.target_start_time).is_alive():
        raise FailedPrecondition(
            f"the container is not running (its init, pid {config.target_pid}, has ended)"
        )


def _config_file(payload: bytes) -> int:
    """A memfd holding the configuration, at offset 0: the supervisor reads it to EOF, and
    nothing has to be fed to it while it runs."""
    fd = os.memfd_create("containerizer-exec-config", os.MFD_CLOEXEC)
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _command(binary: str, config_fd: int) -> list[str]:
    return [binary, "--config-fd", str(config_fd)]


async def exec_process(
    binary: str, config: ExecConfig, *, report_fd: int | None = None, resize_fd: int | None = None
) -> asyncio.subprocess.Process:
    """The supervisor running `config`, with its stdin, stdout and stderr as pipes (streaming
    Exec; with `config.tty` the terminal's output comes on stdout, and "COLUMNS ROWS" lines
    written to `resize_fd`'s other end set its size), in a session of its own:
    os.killpg(process.pid, SIGKILL) ends it and the command. Its `wait()` returns once the pipes
    are closed too, which a process the command left running may delay: read them as they
    come."""
    payload = config.encode(report_fd=report_fd, resize_fd=resize_fd)
    _check_running(config)
    config_fd = _config_file(payload)
    passed = tuple(fd for fd in (config_fd, report_fd, resize_fd) if fd is not None)
    try:
        return await asyncio.create_subprocess_exec(
            *_command(binary, config_fd),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            pass_fds=passed, start_new_session=True,
        )  # fmt: skip
    except OSError as exc:
        raise LaunchFailed(f"cannot run {binary}: {exc}") from exc
    finally:
        os.close(config_fd)


async def exec_sync(
    binary: str, config: ExecConfig, *, timeout: float | None, stdin: bytes = b""
) -> ExecResult:
    """Run the command to its end, with `stdin` as its input, and return its status and output.
    `timeout` (seconds, None for none) ends the supervisor's whole process group with SIGKILL:
    the command and what it started there, unless that left the group. A cancelled call kills
    them too; nothing is left running or unreaped."""
    if timeout is not None and timeout <= 0:
        raise InvalidArgument("timeout", f"must be positive seconds or none, got {timeout}")
    report_read, report_write = os.pipe2(os.O_CLOEXEC)
    try:
        payload = config.encode(report_fd=report_write)
        _check_running(config)
        config_fd = _config_file(payload)
        try:
            running = _ExecRun.start(_command(binary, config_fd), (config_fd, report_write), stdin)
        finally:
            os.close(config_fd)
    except BaseException:
        os.close(report_read)
        raise
    finally:
        os.close(report_write)  # the supervisor's copy alone keeps it open
    try:
        timed_out = not await running.exited(timeout)
        if timed_out:
            running.kill_group()
            await running.exited(None)
        await running.drain(DRAIN_GRACE_S)
    except BaseException:
        os.close(report_read)
        raise
    finally:
        await running.release()
    code = running.returncode()
    raise_if_not_started(report_read, config.argv[0])
    return ExecResult(
        exit_code=TIMED_OUT_EXIT_CODE if timed_out else code,
        stdout=bytes(running.stdout.data),
        stderr=bytes(running.stderr.data),
        timed_out=timed_out,
    )


class ExecNotStarted(FailedPrecondition):
    """The command never ran: its exec failed (not found, not executable) or the container could
    not be joined. Not an exit code: a command that ran may itself exit 126 or 127."""


def raise_if_not_started(report_fd: int, command: str) -> None:
    """Read what the supervisor reported (it has exited: the pipe is at EOF) and close it."""
    try:
        report = os.read(report_fd, 4096)
    finally:
        os.close(report_fd)
    if report.startswith(b"error "):
        reason = report[len(b"error ") :].decode("utf-8", "replace").strip()
        raise ExecNotStarted(f"{command!r} did not run: {reason}")


class _Capture:
    """One output pipe, read whenever the loop finds it readable, keeping at most `limit`
    bytes: what comes after is read and dropped, so the writer never blocks on a full pipe."""

    def __init__(self, fd: int, limit: int) -> None:
        self._fd = fd
        self._limit = limit
        self.data = bytearray()
        self._loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = self._loop.create_future()
        os.set_blocking(fd, False)
        self._loop.add_reader(fd, self._read)

    def _read(self) -> None:
        try:
            chunk = os.read(self._fd, _READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self.close()
            return
        room = self._limit - len(self.data)
        if room > 0:
            self.data += chunk[:room]

    def close(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1
        if not self.closed.done():
            self.closed.set_result(None)


class _ExecRun:
    """The supervisor of one ExecSync: its pipes, its stdin feeder, and a pidfd that says when
    it has exited (readable at exit: no thread, no polling) without reaping it."""

    def __init__(
        self, process: subprocess.Popen[bytes], stdin: int, stdout: int, stderr: int, data: bytes
    ) -> None:
        self._process = process
        self._pidfd = os.pidfd_open(process.pid)  # not yet reaped: it names this process
        self.stdout = _Capture(stdout, MAX_OUTPUT_BYTES)
        self.stderr = _Capture(stderr, MAX_OUTPUT_BYTES)
        self._stdin = stdin
        self._has_exited = False
        # A command that never reads its input must not keep us waiting: cancelled at the end.
        self._feeder = asyncio.ensure_future(self._feed_stdin(data))

    @classmethod
    def start(cls, argv: list[str], pass_fds: tuple[int, ...], data: bytes) -> _ExecRun:
        """Spawn `argv` in a new session (its process group is what a timeout kills), with
        pipes as its stdin, stdout and stderr and `pass_fds` passed on."""
        stdin_read, stdin_write = os.pipe2(os.O_CLOEXEC)
        stdout_read, stdout_write = os.pipe2(os.O_CLOEXEC)
        stderr_read, stderr_write = os.pipe2(os.O_CLOEXEC)
        try:
            process = subprocess.Popen(
                argv, stdin=stdin_read, stdout=stdout_write, stderr=stderr_write,
                pass_fds=pass_fds, start_new_session=True,
            )  # fmt: skip
        except OSError as exc:
            for fd in (stdin_write, stdout_read, stderr_read):
                os.close(fd)
            raise LaunchFailed(f"cannot run {argv[0]}: {exc}") from exc
        finally:
            for fd in (stdin_read, stdout_write, stderr_write):
                os.close(fd)
        return cls(process, stdin_write, stdout_read, stderr_read, data)

    async def _feed_stdin(self, data: bytes) -> None:
        """Write the command's input, then close it: EOF tells the command there is no more."""
        fd, self._stdin = self._stdin, -1  # _feed closes it, even when cancelled
        await _feed(fd, data)

    async def exited(self, timeout: float | None) -> bool:
        """Whether the supervisor exited within `timeout` seconds (None: waits for it)."""
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[None] = loop.create_future()

        def on_exit() -> None:
            if not exited.done():
                exited.set_result(None)

        loop.add_reader(self._pidfd, on_exit)
        try:
            await asyncio.wait_for(exited, timeout)
        except TimeoutError:
            return False
        finally:
            loop.remove_reader(self._pidfd)
        self._has_exited = True
        return True

    def kill_group(self) -> None:
        """SIGKILL to its process group: the supervisor and the command (and what the command
        started without leaving the group). The group's id is the supervisor's pid, which
        cannot have been reused: the supervisor is not reaped yet."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._process.pid, signal.SIGKILL)

    async def drain(self, grace: float) -> None:
        """Give the output up to `grace` seconds more to reach EOF."""
        await asyncio.wait([self.stdout.closed, self.stderr.closed], timeout=grace)

    async def release(self) -> None:
        """Close our ends and reap the supervisor, killing it first if it still runs (a
        cancelled call). The reap is shielded: a second cancel does not leave a zombie."""
        self._feeder.cancel()
        if self._stdin >= 0:  # the feeder never started
            os.close(self._stdin)
            self._stdin = -1
        self.stdout.close()
        self.stderr.close()
        await asyncio.shield(self._reap())

    async def _reap(self) -> None:
        if not self._has_exited:
            self.kill_group()
            await self.exited(None)
        self._process.wait()  # it has exited: this waitpid does not block
        os.close(self._pidfd)

    def returncode(self) -> int:
        """The supervisor's exit status; a supervisor killed by signal n (a destroy that killed
        the container's cgroups) reads as a shell would say it, 128 + n."""
        code = self._process.returncode
        assert code is not None
        return 128 - code if code < 0 else code
