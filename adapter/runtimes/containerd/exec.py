"""Commands in a running containerd container (CRI ExecSync and the streaming Exec): one more
process of its task, through containerd's task Exec.

The process is the container's own `process` from the spec containerd keeps (user and groups,
environment, working directory, capabilities, no_new_privs) with the command's argv; runc
enters the container's namespaces and cgroups and loads the container's seccomp filter, so the
command is confined exactly as the workload. Its stdin, stdout and stderr are FIFOs in the
container's run directory (with a terminal, stdout carries the terminal's output and there is
no stderr). Each output FIFO is opened here for reading before the shim opens it for writing,
with a writer of ours held until the process has started, so that no read sees an end of file
before the shim's writer exists. The shim holds the stdin FIFO so that it never reads an end of
file from it: the command's input ends with containerd's CloseIO, once the shim has read what
was written (CloseIO drops what the FIFO still holds). ExecSync gives no input at all.

A command that never started (no such binary) is ExecNotStarted, not an exit code. However a
session ends (its end, a timeout, a client gone), its process is killed if still running and
deleted from the task, and its FIFOs removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import secrets
import sys
import termios
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from google.protobuf import any_pb2  # type: ignore[import-untyped, unused-ignore]

from adapter.api.containerd.services.containers.v1 import containers_pb2
from adapter.api.containerd.services.tasks.v1 import tasks_pb2
from adapter.core.errors import ContainerizerError, InvalidArgument, NotFound
from adapter.core.model import ExecResult
from adapter.runtimes.containerd.client import ContainerdClient
from adapter.supervisor.exec import (
    DRAIN_GRACE_S,
    MAX_OUTPUT_BYTES,
    TIMED_OUT_EXIT_CODE,
    ExecNotStarted,
)

PROCESS_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"
SIGKILL = 9
READ_CHUNK = 64 << 10
STDOUT = 1
STDERR = 2
# How long a killed process may take to be reported ended before its deletion is tried anyway.
EXIT_AFTER_KILL_S = 30.0
# How long the shim gets to read the input written before its end, and how often it is checked.
INPUT_DRAIN_S = 5.0
INPUT_POLL_S = 0.01


async def exec_sync(session: TaskExec, argv: Sequence[str], timeout: float | None) -> ExecResult:
    """Run argv (no input, no terminal) to its end, or until `timeout` seconds pass."""
    if timeout is not None and timeout <= 0:
        raise InvalidArgument("timeout", f"must be positive seconds or none, got {timeout}")
    outputs = (bytearray(), bytearray())
    try:
        await session.start(argv)
        collectors = [
            asyncio.ensure_future(_collect(session, stream, output))
            for stream, output in zip((STDOUT, STDERR), outputs, strict=True)
        ]
        try:
            timed_out = not await session.exited(timeout)
            if timed_out:
                await session.stop()
                await session.exited(None)
            # A process the command left running may hold the FIFOs open as long as it lives.
            await asyncio.wait(collectors, timeout=DRAIN_GRACE_S)
        finally:
            for collector in collectors:
                collector.cancel()
        status = await session.wait()
    finally:
        await asyncio.shield(session.release())
    return ExecResult(
        exit_code=TIMED_OUT_EXIT_CODE if timed_out else status,
        stdout=bytes(outputs[0]),
        stderr=bytes(outputs[1]),
        timed_out=timed_out,
    )


async def _collect(session: TaskExec, stream: int, output: bytearray) -> None:
    """Everything on one stream, keeping MAX_OUTPUT_BYTES: the rest is read and dropped, so
    the shim never blocks on a full FIFO."""
    while chunk := await session.read(stream):
        output += chunk[: MAX_OUTPUT_BYTES - len(output)]


class TaskExec:
    """One exec process of a task, with its FIFOs; the runtime's ExecSession (base.py)."""

    def __init__(
        self,
        client: ContainerdClient,
        containerd_id: str,
        run_dir: Path,
        *,
        tty: bool = False,
        stdin: bool = True,
        background: set[asyncio.Task[None]],
    ) -> None:
        self._client = client
        self._task = containerd_id
        self._tty = tty
        self._background = background  # where close() leaves its release running
        self.exec_id = f"exec-{secrets.token_hex(8)}"
        names = ["stdin"] if stdin else []
        names += ["stdout"] if tty else ["stdout", "stderr"]
        self._paths = {name: run_dir / f"{self.exec_id}.{name}" for name in names}
        self._fds: dict[str, int] = {}
        self._created = False
        self._input_ended = False
        self._exit: asyncio.Future[int] | None = None
        self._released = False

    @property
    def tty(self) -> bool:
        return self._tty

    # ---- start ----

    async def start(self, argv: Sequence[str]) -> None:
        """Create and start the process; ExecNotStarted when runc could not run argv."""
        if not argv:
            raise InvalidArgument("cmd", "the command is empty")
        process = await self._process_spec(argv)
        keepers = self._open_fifos()
        try:
            await self._call(self._client.tasks.Exec, self._exec_request(process), "exec")
            self._created = True
            try:
                await self._call(
                    self._client.tasks.Start,
                    tasks_pb2.StartRequest(container_id=self._task, exec_id=self.exec_id),
                    "start exec",
                )
            except NotFound:
                raise
            except ContainerizerError as exc:  # runc's exec failed: the command never ran
                raise ExecNotStarted(f"{argv[0]!r} did not run: {exc}") from exc
        finally:
            for fd in keepers:  # the shim's writers hold the FIFOs open from now on
                os.close(fd)
        self._exit = asyncio.ensure_future(self._wait())

    async def _process_spec(self, argv: Sequence[str]) -> dict[str, Any]:
        """The container's process as containerd keeps it, running argv instead."""
        reply = await self._call(
            self._client.containers.Get,
            containers_pb2.GetContainerRequest(id=self._task),
            "get container",
        )
        process: dict[str, Any] = json.loads(reply.container.spec.value)["process"]
        return {**process, "args": list(argv), "terminal": self._tty}

    def _exec_request(self, process: dict[str, Any]) -> tasks_pb2.ExecProcessRequest:
        paths = {name: str(path) for name, path in self._paths.items()}
        return tasks_pb2.ExecProcessRequest(
            container_id=self._task,
            exec_id=self.exec_id,
            stdin=paths.get("stdin", ""),
            stdout=paths["stdout"],
            stderr=paths.get("stderr", ""),
            terminal=self._tty,
            spec=any_pb2.Any(type_url=PROCESS_TYPE_URL, value=json.dumps(process).encode()),
        )

    def _open_fifos(self) -> list[int]:
        """Our ends of the FIFOs; returns the output writers to close once it started."""
        keepers: list[int] = []
        for name, path in self._paths.items():
            os.mkfifo(path, 0o600)
            if name == "stdin":
                self._fds[name] = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
                continue
            self._fds[name] = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            keepers.append(os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC))
        return keepers

    # ---- input and output ----

    async def write(self, data: bytes) -> None:
        """Input for the command; dropped once its stdin was closed."""
        view = memoryview(data)
        while view and (fd := self._fds.get("stdin", -1)) >= 0:
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:
                await _ready(fd, writable=True)
            except BrokenPipeError:
                return

    def close_stdin(self) -> None:
        """EOF for the command's input (with a terminal, ^D is the caller's to send)."""
        if not self._tty and not self._input_ended and "stdin" in self._paths:
            self._input_ended = True
            self._spawn(self._end_input())

    async def _end_input(self) -> None:
        """Once the shim has read what the FIFO holds (or INPUT_DRAIN_S passed), CloseIO."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + INPUT_DRAIN_S
        while (fd := self._fds.get("stdin", -1)) >= 0 and _unread(fd) and loop.time() < deadline:
            await asyncio.sleep(INPUT_POLL_S)
        self._close_fd("stdin")
        request = tasks_pb2.CloseIORequest(
            container_id=self._task, exec_id=self.exec_id, stdin=True
        )
        await self._quietly(self._client.tasks.CloseIO, request, "close the input of exec")

    async def read(self, stream: int = STDOUT) -> bytes:
        """The next chunk of stdout (or stderr), b"" at its end."""
        name = "stdout" if stream == STDOUT else "stderr"
        while (fd := self._fds.get(name, -1)) >= 0:
            try:
                chunk = os.read(fd, READ_CHUNK)
            except BlockingIOError:
                await _ready(fd, writable=False)
                continue
            if chunk:
                return chunk
            self._close_fd(name)  # every writer closed: the shim's too
        return b""

    def resize(self, columns: int, rows: int) -> None:
        if self._tty and self._created and 0 < columns < 65536 and 0 < rows < 65536:
            request = tasks_pb2.ResizePtyRequest(
                container_id=self._task, exec_id=self.exec_id, width=columns, height=rows
            )
            self._spawn(self._quietly(self._client.tasks.ResizePty, request, "resize exec"))

    # ---- the end ----

    async def wait(self) -> int:
        """Its exit status, 128 + n when signal n ended it."""
        assert self._exit is not None, "start() first"
        return await asyncio.shield(self._exit)

    async def exited(self, timeout: float | None) -> bool:
        """Whether it ended within `timeout` seconds (None: waits for it)."""
        assert self._exit is not None, "start() first"
        try:
            await asyncio.wait_for(asyncio.shield(self._exit), timeout)
        except TimeoutError:
            return False
        return True

    async def _wait(self) -> int:
        reply = await self._call(
            self._client.tasks.Wait,
            tasks_pb2.WaitRequest(container_id=self._task, exec_id=self.exec_id),
            "wait for exec",
            timeout=None,
        )
        return int(reply.exit_status)

    async def stop(self) -> None:
        """SIGKILL, unless it has ended."""
        if self._created and not (self._exit is not None and self._exit.done()):
            request = tasks_pb2.KillRequest(
                container_id=self._task, exec_id=self.exec_id, signal=SIGKILL
            )
            await self._quietly(self._client.tasks.Kill, request, "kill exec")

    def kill(self) -> None:
        self._spawn(self.stop())

    def close(self) -> None:
        """Release it in the background: the caller (the streaming server) cannot wait."""
        self._spawn(self.release())

    async def release(self) -> None:
        """Kill it if it still runs, delete it from the task once it ended (the shim then
        closes its ends), close ours and remove the FIFOs. Idempotent."""
        if self._released:
            return
        self._released = True
        try:
            if self._created:
                await self.stop()
                if self._exit is not None:
                    with contextlib.suppress(TimeoutError, ContainerizerError):
                        await asyncio.wait_for(asyncio.shield(self._exit), EXIT_AFTER_KILL_S)
                    self._exit.cancel()
                request = tasks_pb2.DeleteProcessRequest(
                    container_id=self._task, exec_id=self.exec_id
                )
                await self._quietly(self._client.tasks.DeleteProcess, request, "delete exec")
        finally:
            for name in list(self._fds):
                self._close_fd(name)
            for path in self._paths.values():
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    # ---- helpers ----

    def _close_fd(self, name: str) -> None:
        fd = self._fds.get(name, -1)
        if fd >= 0:
            os.close(fd)
            self._fds[name] = -1

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _quietly(self, method: Any, request: Any, what: str) -> None:
        """A call whose failure changes nothing: the process ended, or the task is gone."""
        with contextlib.suppress(ContainerizerError):
            await self._call(method, request, what)

    async def _call(self, method: Any, request: Any, what: str, **options: Any) -> Any:
        return await self._client.call(
            method, request, f"{what} {self.exec_id} in {self._task}", **options
        )


def _unread(fd: int) -> int:
    """Bytes in the FIFO that nobody has read yet."""
    return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4), sys.byteorder)


async def _ready(fd: int, *, writable: bool) -> None:
    """Until `fd` is readable (or writable)."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    if writable:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        if writable:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)
