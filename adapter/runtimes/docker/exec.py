"""A command in a running docker container: ExecSync and the streaming Exec, on Docker's exec API.

The command runs as the workload does: the container's user, environment and working directory
(from its inspect, so this holds after our restart too), never privileged; runc enters the
container's namespaces and cgroups and applies its capabilities, seccomp filter and
no_new_privs. So it is in the container's pid namespace and cgroups, and a destroy kills it.

What Docker does not do, this module does:
- Docker never ends an exec whose client went away. Each session learns the command's host pid
  (exec inspect's Pid), checked to be in the container's cgroup, and kills it and its descendants
  on timeout, cancel or close; psutil refuses to signal a pid reused by another process since.
- A command that never ran (not found, not executable) gets no exit code of its own: Docker
  reports 126 with Pid 0 and writes the OCI runtime's message where the output would be. That
  is ExecNotStarted, with the message, as under the supervisor.
- A terminal's size: the start waits for the first read, write or wait, so that a size given
  before it (the client's first request) goes with the start: from API 1.42 (Docker 23) as the
  console's size from the start; before, as a resize sent beside the start, which dockerd holds
  until the command runs and applies a moment after (a command that reads its size at once may
  still see 0x0 there, as under `docker exec -t` against that daemon).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import psutil

from adapter.core.errors import ContainerizerError, FailedPrecondition, InvalidArgument
from adapter.core.model import ExecResult
from adapter.runtimes.docker import handle as names
from adapter.runtimes.docker.client import DockerEngine, Inspect
from adapter.runtimes.docker.streams import STDERR, STDOUT, Connection, FrameReader
from adapter.supervisor.exec import (
    DRAIN_GRACE_S,
    MAX_OUTPUT_BYTES,
    TIMED_OUT_EXIT_CODE,
    ExecNotStarted,
)

log = logging.getLogger(__name__)

OUTPUT_QUEUE_CHUNKS = 16  # per stream: a reader that falls behind holds the command back
NOT_STARTED_MESSAGE_BYTES = 4096
PID_POLL_FIRST_S = 0.005
PID_POLL_MAX_S = 0.1
# How long an exec may take to start before its pid is given up for (a command that never ran
# may keep no exit code in dockerd's inspect).
PID_WAIT_S = 30.0
EXIT_POLLS = 50  # an ended stream's exit code shows within a few inspects
MAX_TERMINAL_SIDE = 65535
# Tasks that must run to their end though nobody awaits them (a kill after a close).
_BACKGROUND: set[asyncio.Task[Any]] = set()


def _in_background(coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
    task = asyncio.ensure_future(coroutine)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)
    return task


@dataclass(frozen=True)
class ExecTarget:
    """A running container to exec in, and the process settings its workload has."""

    docker_id: str
    cgroup: str  # the container's cgroup (memory or unified), as its init reported it
    user: str
    environment: tuple[str, ...]
    working_dir: str

    @classmethod
    def of(cls, inspect: Inspect, cgroup: str) -> ExecTarget:
        state = inspect.get("State") or {}
        if not state.get("Running") or state.get("Paused"):
            raise FailedPrecondition(
                f"docker container {str(inspect.get('Id', ''))[:12]} is not running"
            )
        config = inspect.get("Config") or {}
        return cls(
            docker_id=str(inspect["Id"]),
            cgroup=cgroup,
            user=str(config.get("User") or ""),
            environment=tuple(str(entry) for entry in config.get("Env") or ()),
            working_dir=str(config.get("WorkingDir") or ""),
        )


async def open_exec(
    engine: DockerEngine, target: ExecTarget, argv: tuple[str, ...], *, tty: bool, stdin: bool
) -> DockerExecSession:
    """A created exec of argv, started by its session's first read, write or wait."""
    if not argv:
        raise InvalidArgument("cmd", "the command is empty")
    exec_id = await engine.exec_create(
        target.docker_id, argv, tty=tty, stdin=stdin, user=target.user,
        environment=target.environment, working_dir=target.working_dir,
    )  # fmt: skip
    return DockerExecSession(engine, exec_id, target.cgroup, argv[0], tty=tty, stdin=stdin)


async def exec_sync(
    engine: DockerEngine, target: ExecTarget, argv: tuple[str, ...], timeout: float | None
) -> ExecResult:
    """argv to its end, or until `timeout` seconds pass (then it is killed with what it
    started); output kept up to MAX_OUTPUT_BYTES a stream. Cancelled: killed too."""
    if timeout is not None and timeout <= 0:
        raise InvalidArgument("timeout", f"must be positive seconds or none, got {timeout}")
    session = await open_exec(engine, target, argv, tty=False, stdin=False)
    outputs = {stream: bytearray() for stream in (STDOUT, STDERR)}
    captures = [asyncio.ensure_future(_capture(session, s, outputs[s])) for s in outputs]
    try:
        done, _ = await asyncio.wait(captures, timeout=timeout)
        timed_out = len(done) < len(captures)
        if timed_out:
            await session.terminate()
            await asyncio.wait(captures, timeout=DRAIN_GRACE_S)
        code = TIMED_OUT_EXIT_CODE if timed_out else await session.wait()
    finally:
        for capture in captures:
            capture.cancel()
        session.close()
    return ExecResult(code, bytes(outputs[STDOUT]), bytes(outputs[STDERR]), timed_out)


async def _capture(session: DockerExecSession, stream: int, into: bytearray) -> None:
    """Read the stream to its end, keeping at most MAX_OUTPUT_BYTES (the rest is dropped, so
    the command is never held back by a full buffer)."""
    while chunk := await session.read(stream):
        into += chunk[: max(0, MAX_OUTPUT_BYTES - len(into))]


class DockerExecSession:
    """One exec with its input and output open (the ExecSession protocol of runtimes/base.py).
    With a terminal the output is raw and all of it stdout; without, frames demultiplexed into
    one queue per stream."""

    def __init__(
        self,
        engine: DockerEngine,
        exec_id: str,
        cgroup: str,
        command: str,
        *,
        tty: bool,
        stdin: bool,
    ) -> None:
        self._engine = engine
        self._exec_id = exec_id
        self._cgroup = cgroup
        self._command = command
        self._tty = tty
        self._stdin_open = stdin
        self._size: tuple[int, int] | None = None
        self._starting: asyncio.Task[Connection] | None = None
        self._connection: Connection | None = None
        self._queues = {s: asyncio.Queue[bytes](OUTPUT_QUEUE_CHUNKS) for s in (STDOUT, STDERR)}
        self._ended = {STDOUT: False, STDERR: tty}  # with a terminal, stderr has nothing
        self._pump: asyncio.Task[None] | None = None
        self._pid_watch: asyncio.Task[None] | None = None
        self._resizer: asyncio.Task[None] | None = None
        self._process: psutil.Process | None = None
        self._kill_requested = False
        self._closed = False
        self._head = bytearray()  # the first output: Docker's message when it never ran

    @property
    def tty(self) -> bool:
        return self._tty

    # ---- start ----

    async def _started(self) -> Connection:
        """The connection, starting the exec on first use. Raises what the start raised."""
        if self._starting is None:
            self._starting = _in_background(self._start())
        return await asyncio.shield(self._starting)

    async def _start(self) -> Connection:
        if self._kill_requested or self._closed:
            raise ExecNotStarted(f"{self._command!r} did not run: ended before it started")
        if self._size is not None:
            self._apply_size()  # sent beside the start: dockerd holds it until the command runs
        connection = await self._engine.exec_start(self._exec_id, tty=self._tty, size=self._size)
        self._connection = connection
        self._pid_watch = _in_background(self._watch_pid())
        if self._closed:  # closed while it started: the watch kills it, nobody reads
            connection.close()
            return connection
        if not self._stdin_open:
            connection.shut_write()
        self._pump = asyncio.ensure_future(self._demultiplex(connection))
        return connection

    async def _watch_pid(self) -> None:
        """Learn the command's host pid (dockerd sets it once the command runs), so that it can
        be killed; kill it at once when that was asked meanwhile."""
        delay = PID_POLL_FIRST_S
        deadline = asyncio.get_running_loop().time() + PID_WAIT_S
        try:
            while True:
                inspect = await self._engine.exec_inspect(self._exec_id)
                pid = int(inspect.get("Pid") or 0)
                # Not running and no exit code yet: dockerd answered the start's upgrade before
                # the command began (a loaded host): ask again, or its pid is never learnt and a
                # timeout cannot kill what it started.
                ended = not inspect.get("Running") and inspect.get("ExitCode") is not None
                if pid or ended or asyncio.get_running_loop().time() > deadline:
                    break
                await asyncio.sleep(delay)
                delay = min(delay * 2, PID_POLL_MAX_S)
        except ContainerizerError as exc:
            log.warning("docker exec %s: its pid is unknown, it cannot be killed: %s", self, exc)
            return
        self._process = _container_process(pid, self._cgroup) if pid else None
        if self._kill_requested:
            self._kill_process()

    # ---- input and output ----

    async def write(self, data: bytes) -> None:
        try:
            connection = await self._started()
        except ContainerizerError:
            return  # the start failed: wait() says why
        if self._stdin_open:
            with contextlib.suppress(OSError):  # the command has ended
                await connection.send(data)

    def close_stdin(self) -> None:
        """EOF for the command's input; with a terminal, as under the supervisor, ^D is the
        caller's to send (closing would end the terminal's output too)."""
        if self._tty or not self._stdin_open:
            return
        self._stdin_open = False
        if self._connection is not None:
            self._connection.shut_write()

    async def read(self, stream: int = STDOUT) -> bytes:
        """The next chunk of stdout (1) or stderr (2), b"" at its end."""
        if self._ended.get(stream, True):
            return b""
        try:
            await self._started()
        except ContainerizerError:
            self._ended[stream] = True
            return b""
        chunk = await self._queues[stream].get()
        if not chunk:
            self._ended[stream] = True
        return chunk

    async def _demultiplex(self, connection: Connection) -> None:
        """The output into its queues, then b"" into each: the end."""
        try:
            await self._pump_output(connection)
        except OSError as exc:  # the connection broke: the end of what can be read
            log.debug("docker exec %s: output ended: %s", self, exc)
        except asyncio.CancelledError:  # closed: nobody waits for room in a queue any more
            for queue in self._open_queues():
                with contextlib.suppress(asyncio.QueueFull):
                    queue.put_nowait(b"")
            raise
        for queue in self._open_queues():
            await queue.put(b"")

    async def _pump_output(self, connection: Connection) -> None:
        if self._tty:
            while chunk := await connection.read():
                await self._deliver(STDOUT, chunk)
            return
        frames = FrameReader(connection)
        while (frame := await frames.next()) is not None:
            stream, payload = frame
            if stream in self._queues and payload:
                await self._deliver(stream, payload)

    def _open_queues(self) -> list[asyncio.Queue[bytes]]:
        """The queues a reader may wait on (with a terminal, stderr ends at once)."""
        return [self._queues[STDOUT]] if self._tty else list(self._queues.values())

    async def _deliver(self, stream: int, chunk: bytes) -> None:
        room = NOT_STARTED_MESSAGE_BYTES - len(self._head)
        if stream == STDOUT and room > 0:
            self._head += chunk[:room]
        await self._queues[stream].put(chunk)

    # ---- terminal ----

    def resize(self, columns: int, rows: int) -> None:
        if not self._tty or not (
            0 < columns <= MAX_TERMINAL_SIDE and 0 < rows <= MAX_TERMINAL_SIDE
        ):
            return
        self._size = (columns, rows)
        if self._starting is not None:
            self._apply_size()

    def _apply_size(self) -> None:
        """One resize in flight at a time, ending at the latest size asked (resizes that raced
        on the executor could land out of order)."""
        if self._resizer is None or self._resizer.done():
            self._resizer = asyncio.ensure_future(self._resize_to_latest())

    async def _resize_to_latest(self) -> None:
        applied = None
        while self._size is not None and self._size != applied:
            applied = self._size
            try:
                await self._engine.exec_resize(self._exec_id, *applied)
            except ContainerizerError as exc:  # it ended meanwhile
                log.debug("docker exec %s: resize: %s", self._exec_id, exc)

    # ---- end ----

    async def wait(self) -> int:
        """The exit code once the output has ended; ExecNotStarted when it never ran."""
        await self._started()
        if self._pump is not None:
            await asyncio.shield(self._pump)
        inspect = await self._engine.exec_inspect(self._exec_id)
        for _ in range(EXIT_POLLS):  # the exit is recorded beside the end of the output
            if not inspect.get("Running"):
                break
            await asyncio.sleep(PID_POLL_MAX_S)
            inspect = await self._engine.exec_inspect(self._exec_id)
        code = inspect.get("ExitCode")
        if not inspect.get("Pid"):
            message = self._head.decode("utf-8", "replace").strip() or f"exit code {code}"
            raise ExecNotStarted(f"{self._command!r} did not run: {message}")
        if inspect.get("Running") or code is None:
            raise FailedPrecondition(f"docker exec {self}: its output ended, but no exit code")
        return int(code)

    def kill(self) -> None:
        """Kill the command and its descendants: now when its pid is known, else as soon as it
        is (or never start it)."""
        self._kill_requested = True
        self._kill_process()

    async def terminate(self) -> None:
        """kill(), and return once the pid was learnt and signalled (or is unknowable)."""
        self.kill()
        with contextlib.suppress(ContainerizerError):
            await self._started()
        if self._pid_watch is not None:
            await asyncio.shield(self._pid_watch)

    def _kill_process(self) -> None:
        if self._process is not None:
            _kill_tree(self._process)

    def close(self) -> None:
        """Kill it (Docker would leave it running) and close the connection."""
        self._closed = True
        self.kill()
        for task in (self._pump, self._resizer):
            if task is not None:
                task.cancel()
        if self._connection is not None:
            self._connection.close()

    def __str__(self) -> str:
        return f"{self._exec_id[:12]} ({self._command})"


def _container_process(pid: int, cgroup: str) -> psutil.Process | None:
    """The process `pid` if it is in the container's cgroup; psutil keeps its start time, so a
    later kill cannot reach another process that reused the pid."""
    try:
        process = psutil.Process(pid)
        if names.cgroup_of_process(pid) != cgroup or not process.is_running():
            return None
    except psutil.Error:
        return None
    return process


def _kill_tree(process: psutil.Process) -> None:
    """SIGKILL to the process and its descendants (listed first, so none escapes by the
    parent's death); psutil checks each is still the process it listed."""
    try:
        victims = [process, *process.children(recursive=True)]
    except psutil.Error:
        victims = [process]
    for victim in victims:
        with contextlib.suppress(psutil.Error):
            victim.kill()
