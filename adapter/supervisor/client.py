"""The client of containerizer-supervisor, the C program that confines and reaps each workload.

The service must survive `kill -9` while its containers keep running, and a Python process per
container would blow the 3 MiB-per-container budget. So every workload is forked by a small
supervisor (supervisor/containerizer-supervisor.c) that waits for it and writes its exit status
atomically to a status file. A restarted service finds the supervisor again from the
SupervisorHandle it checkpointed (plain JSON), waits for it through a pidfd and reads the file.
The native runtime spawns the supervisor itself; the LXC runtime runs its static build as the
container's init. Both build its configuration and read its handshake here.

A pid alone is never trusted: pids are reused, so a handle carries the start time (field 22 of
/proc/PID/stat) of the supervisor and of the workload, and nothing is signalled or waited for
unless that start time still matches.

Configuration: the supervisor's argv is only `--config-fd 0`. Its options (NUL-separated
strings, the seccomp program as a length-prefixed blob; see launch_config.py) come through a
pipe on its stdin that we write and close, because a command line is readable by every local
user through /proc/PID/cmdline and the workload's argv and environment hold secrets.

Handshake (the supervisor's stdout, one line, read here during spawn):
    ok <child_pid> <child_start_time> <supervisor_start_time>
    error <step>: <reason>
Status file: see adapter/supervisor/processes.py, which reads it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapter.core.errors import (
    ContainerizerError,
    FailedPrecondition,
    LaunchFailed,
)
from adapter.supervisor.children import Child
from adapter.supervisor.launch_config import LaunchConfig
from adapter.supervisor.processes import ExitStatus, ProcessRef, read_status

log = logging.getLogger(__name__)

SUPERVISOR_NAME = "containerizer-supervisor"
HANDSHAKE_TIMEOUT_S = 10.0
CONFIG_ARGUMENTS = ("--config-fd", "0")
# Steps of a failed launch that the request caused (a binary, user or working directory that is
# not there; a sandbox the workload tampered with): the caller's to fix, not the node's.
REQUEST_STEPS = frozenset({"exec", "user", "cwd", "sandbox", "stdout", "stderr"})


class SpawnError(LaunchFailed):
    """The supervisor did not start the workload. `step` names where it failed (args, exec,
    user, cgroup, cwd, stdout, namespaces, handshake, ...) and `reason` says why."""

    def __init__(self, message: str, *, step: str = "supervisor", reason: str = "") -> None:
        super().__init__(message)
        self.step = step
        self.reason = reason or message


def launch_error(container_id: str, error: SpawnError) -> ContainerizerError:
    """What a driver raises for a failed spawn: FailedPrecondition when the request caused it
    (the launch still ends LAUNCH_FAILED), LaunchFailed (internal) otherwise."""
    message = f"launch of {container_id!r} failed: {error}"
    if error.step in REQUEST_STEPS:
        return FailedPrecondition(message)
    return LaunchFailed(message)


@dataclass(frozen=True)
class SupervisorHandle:
    """Everything needed to find one container's supervisor again after a service restart."""

    supervisor_pid: int
    supervisor_start_time: int  # /proc/PID/stat field 22, clock ticks since boot
    child_pid: int  # host pid of the workload (pid 1 of its pid namespace)
    child_start_time: int
    status_file: str

    def to_json(self) -> dict[str, Any]:
        # Field by field: asdict's deep copy is slow, and this is on every launch's path.
        return {
            "supervisor_pid": self.supervisor_pid,
            "supervisor_start_time": self.supervisor_start_time,
            "child_pid": self.child_pid,
            "child_start_time": self.child_start_time,
            "status_file": self.status_file,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SupervisorHandle:
        """Rebuild from `to_json` output; a checkpoint that does not fit raises ValueError
        naming the key, rather than producing a handle that signals the wrong process."""
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            value = data.get(field.name)
            expected: type = str if field.name == "status_file" else int
            if not isinstance(value, expected) or isinstance(value, bool):
                raise ValueError(
                    f"supervisor handle: {field.name!r} must be {expected.__name__}, got {value!r}"
                )
            values[field.name] = value
        return cls(**values)


# --- processes, by pid and start time -----------------------------------------------------------


def is_alive(handle: SupervisorHandle) -> bool:
    """Whether the handle's supervisor still runs (a reused pid is somebody else)."""
    return ProcessRef(handle.supervisor_pid, handle.supervisor_start_time).is_alive()


def kill(handle: SupervisorHandle, signo: int) -> None:
    """Send `signo` to the container's init (which forwards it to the workload) if it is still
    the process the handle names; else no-op."""
    ProcessRef(handle.child_pid, handle.child_start_time).send(signo)


# How long a supervisor may take to open its CRI log again after SIGUSR1.
REOPEN_TIMEOUT_S = 5.0


async def log_reopened(path: str, timeout: float = REOPEN_TIMEOUT_S) -> bool:
    """Whether `path` exists again (itself: a link is not followed) within `timeout` seconds:
    the kubelet reads the new file as soon as ReopenContainerLog returns."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while not os.path.lexists(path):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)
    return True


def reopen_log(handle: SupervisorHandle) -> bool:
    """Have the supervisor of a launch with `log_file` open a new file at its path (the kubelet
    renamed the old one: rotation). False if that supervisor is gone."""
    return ProcessRef(handle.supervisor_pid, handle.supervisor_start_time).send(signal.SIGUSR1)


# --- locating the binary --------------------------------------------------------------------------


def find_supervisor(configured: str | None) -> str:
    """The supervisor binary: the configured path, else the one installed next to the Python
    running us (the venv's bin dir, where the install step builds it), else on $PATH."""
    if configured:
        if os.access(configured, os.X_OK) and os.path.isfile(configured):
            return configured
        raise FailedPrecondition(
            f"supervisor binary {configured!r} (configured) does not exist or is not executable"
        )
    beside_python = os.path.join(os.path.dirname(sys.executable), SUPERVISOR_NAME)
    if os.access(beside_python, os.X_OK) and os.path.isfile(beside_python):
        return beside_python
    on_path = shutil.which(SUPERVISOR_NAME)
    if on_path is not None:
        return on_path
    raise FailedPrecondition(
        f"{SUPERVISOR_NAME} not found: looked at {beside_python} and on PATH "
        f"({os.environ.get('PATH', '')}); build it with "
        f"`make -C supervisor BIN={beside_python}` or configure its path"
    )


# --- the configuration pipe and the handshake -----------------------------------------------------


def start_configured(command: Sequence[str], errors_log: Path | None = None) -> tuple[Child, int]:
    """Start `command` (the supervisor, or lxc-start running it) with a pipe as its stdin;
    return it and the pipe's write end, for `handshake`. The write end is close-on-exec so
    that no other child inherits it and keeps the pipe from reaching EOF."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        return Child.start(list(command), errors_log, stdin=read_end), write_end
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _feed(fd: int, payload: bytes) -> None:
    """Write `payload` into the pipe and close it. A reader that stopped reading has failed,
    and says why in its handshake (or by exiting): not an error here."""
    os.set_blocking(fd, False)
    loop = asyncio.get_running_loop()
    remaining = memoryview(payload)
    try:
        while remaining:
            try:
                remaining = remaining[os.write(fd, remaining) :]
            except BlockingIOError:
                writable: asyncio.Future[None] = loop.create_future()
                loop.add_writer(fd, _resolve, writable)
                try:
                    await writable
                finally:
                    loop.remove_writer(fd)
    except BrokenPipeError:
        pass
    finally:
        os.close(fd)


async def handshake(process: Child, config_fd: int, payload: bytes) -> bytes:
    """Feed the configuration, then read the one handshake line (b"" at EOF). The caller
    bounds the wait."""
    await _feed(config_fd, payload)
    return await process.readline()


def parse_handshake(line: bytes, workload: str) -> tuple[int, int, int]:
    """(child pid, child start time, supervisor start time) from an `ok` line; SpawnError from an
    `error <step>: <reason>` line or anything else."""
    text = line.decode("utf-8", "replace").rstrip("\n")
    if text.startswith("error "):
        step, _, reason = text[len("error ") :].partition(": ")
        raise SpawnError(f"launching {workload!r}: {step}: {reason}", step=step, reason=reason)
    words = text.split()
    if len(words) == 4 and words[0] == "ok" and all(word.isdigit() for word in words[1:]):
        return int(words[1]), int(words[2]), int(words[3])
    raise SpawnError(
        f"launching {workload!r}: unexpected supervisor handshake {text[:200]!r}", step="handshake"
    )


# --- spawning and waiting -------------------------------------------------------------------------


async def _abandon(process: Child) -> None:
    """Kill a supervisor whose launch went wrong, with the workload it may have forked (both in
    the supervisor's own process group), and reap it."""
    process.kill_group()
    await process.wait()


async def _wait_foreign(handle: SupervisorHandle) -> None:
    """Wait for a supervisor that is not our child (spawned before a restart)."""
    await ProcessRef(handle.supervisor_pid, handle.supervisor_start_time).wait()


class Supervisors:
    """The supervisors this service spawned and has not yet waited for, by (pid, start time).

    Being our children, they must be reaped by us, through the Child that started them; a
    supervisor spawned before a restart is not our child and is waited for by pid and start
    time. One registry per service (adapter/core/services.py), shared by whatever spawns.
    """

    def __init__(self) -> None:
        self._children: dict[tuple[int, int], Child] = {}

    async def spawn(
        self,
        binary: str,
        config: LaunchConfig,
        *,
        handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
    ) -> SupervisorHandle:
        """Start a supervisor for `config` and return once the workload has exec'd.

        Raises SpawnError naming the failed step; by then the supervisor has been reaped and no
        status file was written. The supervisor runs in its own session, so it outlives us.
        """
        payload = config.encode()
        try:
            process, config_fd = start_configured([binary, *CONFIG_ARGUMENTS])
        except LaunchFailed as exc:
            raise SpawnError(str(exc), step="supervisor") from exc
        child_pid, child_start, supervisor_start = await _read_handshake(
            process, config_fd, payload, config.argv[0], handshake_timeout
        )
        self._children[(process.pid, supervisor_start)] = process
        return SupervisorHandle(
            supervisor_pid=process.pid,
            supervisor_start_time=supervisor_start,
            child_pid=child_pid,
            child_start_time=child_start,
            status_file=os.path.abspath(config.status_file),
        )

    async def wait_exit(self, handle: SupervisorHandle) -> ExitStatus | None:
        """Resolve once the handle's supervisor has exited, whether or not it is our child, and
        return what it recorded; None means it recorded nothing (the caller reports LOST)."""
        key = (handle.supervisor_pid, handle.supervisor_start_time)
        process = self._children.get(key)
        if process is not None:
            code = await process.wait()
            self._children.pop(key, None)
            if code != 0:
                log.warning("supervisor %d exited with status %d", handle.supervisor_pid, code)
        else:
            await _wait_foreign(handle)
        return read_status(handle.status_file)


async def _read_handshake(
    process: Child, config_fd: int, payload: bytes, workload: str, timeout: float
) -> tuple[int, int, int]:
    """The parsed `ok` line. On anything else the supervisor (and whatever it forked) is killed
    and reaped before SpawnError is raised; a cancelled spawn leaves nothing behind either."""
    try:
        async with asyncio.timeout(timeout):  # not wait_for: no task of its own per launch
            line = await handshake(process, config_fd, payload)
    except TimeoutError:
        await _abandon(process)
        raise SpawnError(
            f"launching {workload!r}: supervisor did not answer within {timeout} s",
            step="handshake",
        ) from None
    except BaseException:
        await _abandon(process)
        raise
    if not line:
        code = await process.wait()
        raise SpawnError(
            f"launching {workload!r}: supervisor exited with status {code} before the handshake",
            step="supervisor",
        )
    try:
        parsed = parse_handshake(line, workload)
    except SpawnError as exc:
        if exc.step == "handshake":
            await _abandon(process)
        else:
            await process.wait()  # it exits by itself after an error line
        raise
    process.close_stdout()  # the supervisor writes nothing after the handshake
    return parsed
