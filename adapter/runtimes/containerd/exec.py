"""ExecSync in a containerd container: one more process of its task (containerd's task Exec).

The process is the container's own `process` from the spec containerd keeps (user and groups,
environment, working directory, capabilities, no_new_privs) with the command's argv; runc
enters the container's namespaces and cgroups and loads the container's seccomp filter, so the
command is confined exactly as the workload. Its stdout and stderr are FIFOs in the container's
run directory: opened here for reading before the shim opens them for writing, each with a
writer of ours held until the process has started, so that no read sees an end of file before
the shim's writer exists. A command that never started (no such binary) is ExecNotStarted,
not an exit code; a timeout kills it; in every case the process is deleted from the task.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from google.protobuf import any_pb2  # type: ignore[import-untyped, unused-ignore]

from adapter.api.containerd.services.containers.v1 import containers_pb2
from adapter.api.containerd.services.tasks.v1 import tasks_pb2
from adapter.core.errors import ContainerizerError, FailedPrecondition, InvalidArgument, NotFound
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
STREAMS = ("stdout", "stderr")


async def exec_sync(
    client: ContainerdClient,
    containerd_id: str,
    run_dir: Path,
    argv: Sequence[str],
    timeout: float | None,
) -> ExecResult:
    """Run argv in the task `containerd_id` to its end, or until `timeout` seconds pass."""
    if not argv:
        raise InvalidArgument("cmd", "the command is empty")
    if timeout is not None and timeout <= 0:
        raise InvalidArgument("timeout", f"must be positive seconds or none, got {timeout}")
    process = await _process_spec(client, containerd_id, argv)
    run = _ExecRun(client, containerd_id, run_dir)
    try:
        await run.start(process, argv[0])
        timed_out = not await run.exited(timeout)
        if timed_out:
            await run.kill()
            await run.exited(None)
        status = run.status
        await run.drain(DRAIN_GRACE_S)
    finally:
        await asyncio.shield(run.release())
    return ExecResult(
        exit_code=TIMED_OUT_EXIT_CODE if timed_out else status,
        stdout=bytes(run.outputs[0].data),
        stderr=bytes(run.outputs[1].data),
        timed_out=timed_out,
    )


async def _process_spec(
    client: ContainerdClient, containerd_id: str, argv: Sequence[str]
) -> dict[str, Any]:
    """The container's process as containerd keeps it, running argv instead."""
    reply = await client.call(
        client.containers.Get,
        containers_pb2.GetContainerRequest(id=containerd_id),
        f"get container {containerd_id}",
    )
    process: dict[str, Any] = json.loads(reply.container.spec.value)["process"]
    return {**process, "args": list(argv), "terminal": False}


class _ExecRun:
    """One exec process of a task: its FIFOs, its id in the task, its exit status."""

    def __init__(self, client: ContainerdClient, containerd_id: str, run_dir: Path) -> None:
        self._client = client
        self._task = containerd_id
        self.exec_id = f"exec-{secrets.token_hex(8)}"
        self._paths = [run_dir / f"{self.exec_id}.{name}" for name in STREAMS]
        self.outputs: list[_FifoCapture] = []
        self._created = False
        self._exit: asyncio.Task[int] | None = None
        self.status = TIMED_OUT_EXIT_CODE

    async def start(self, process: dict[str, Any], command: str) -> None:
        keepers = self._open_fifos()
        try:
            await self._call(
                self._client.tasks.Exec,
                tasks_pb2.ExecProcessRequest(
                    container_id=self._task,
                    exec_id=self.exec_id,
                    stdout=str(self._paths[0]),
                    stderr=str(self._paths[1]),
                    spec=any_pb2.Any(type_url=PROCESS_TYPE_URL, value=json.dumps(process).encode()),
                ),
                "exec",
            )
            self._created = True
            try:
                await self._call(
                    self._client.tasks.Start,
                    tasks_pb2.StartRequest(container_id=self._task, exec_id=self.exec_id),
                    "start exec",
                )
            except (NotFound, FailedPrecondition):
                raise
            except ContainerizerError as exc:  # runc's exec failed: the command never ran
                raise ExecNotStarted(f"{command!r} did not run: {exc}") from exc
        finally:
            for fd in keepers:  # the shim's writers hold the FIFOs open from now on
                os.close(fd)

    def _open_fifos(self) -> list[int]:
        """The read ends (captured) and a write end of ours for each FIFO."""
        keepers: list[int] = []
        for path in self._paths:
            os.mkfifo(path, 0o600)
            reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            self.outputs.append(_FifoCapture(reader, MAX_OUTPUT_BYTES))
            keepers.append(os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC))
        return keepers

    async def exited(self, timeout: float | None) -> bool:
        """Whether the process ended within `timeout` seconds (None: waits for it)."""
        if self._exit is None:
            self._exit = asyncio.ensure_future(self._wait())
        try:
            self.status = await asyncio.wait_for(asyncio.shield(self._exit), timeout)
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

    async def kill(self) -> None:
        with contextlib.suppress(NotFound, FailedPrecondition):  # it ended meanwhile
            await self._call(
                self._client.tasks.Kill,
                tasks_pb2.KillRequest(
                    container_id=self._task, exec_id=self.exec_id, signal=SIGKILL
                ),
                "kill exec",
            )

    async def drain(self, grace: float) -> None:
        """The output up to its end, or `grace` seconds more: a process the command left
        running may hold the FIFOs open for as long as it lives."""
        await asyncio.wait([output.closed for output in self.outputs], timeout=grace)

    async def release(self) -> None:
        """Kill the process if it still runs (a cancelled call), delete it from the task (the
        shim then closes its ends), close ours and remove the FIFOs."""
        if self._created:
            if self._exit is None or not self._exit.done():
                await self.kill()
            if self._exit is not None:
                self._exit.cancel()
            with contextlib.suppress(ContainerizerError):
                await self._call(
                    self._client.tasks.DeleteProcess,
                    tasks_pb2.DeleteProcessRequest(container_id=self._task, exec_id=self.exec_id),
                    "delete exec",
                )
        for output in self.outputs:
            output.close()
        for path in self._paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    async def _call(self, method: Any, request: Any, what: str, **options: Any) -> Any:
        return await self._client.call(
            method, request, f"{what} {self.exec_id} in {self._task}", **options
        )


class _FifoCapture:
    """One FIFO, read whenever the loop finds it readable, keeping at most `limit` bytes: the
    rest is read and dropped, so that the shim never blocks on a full FIFO."""

    def __init__(self, fd: int, limit: int) -> None:
        self._fd = fd
        self._limit = limit
        self.data = bytearray()
        self._loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self._loop.add_reader(fd, self._read)

    def _read(self) -> None:
        try:
            chunk = os.read(self._fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:  # every writer closed: the shim's too
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
