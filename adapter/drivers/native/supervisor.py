"""Spawning and re-attaching to containerizer-supervisor, the C program that reaps each workload.

The service must survive `kill -9` while its containers keep running, and a Python process per
container would blow the 3 MiB-per-container budget. So every workload is forked by a small
supervisor (supervisor/containerizer-supervisor.c) that waits for it and writes its exit status
atomically to a status file. A restarted service finds the supervisor again from the
SupervisorHandle it checkpointed (plain JSON), waits for it through a pidfd and reads the file.

A pid alone is never trusted: pids are reused, so a handle carries the start time (field 22 of
/proc/PID/stat) of the supervisor and of the workload, and nothing is signalled or waited for
unless that start time still matches.

Handshake (the supervisor's stdout, one line, read here during spawn):
    ok <child_pid> <child_start_time> <supervisor_start_time>
    error <step>: <reason>
Status file: see adapter/processes.py, which reads it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from adapter.children import Child
from adapter.errors import FailedPrecondition, LaunchFailed
from adapter.processes import ExitStatus, ProcessRef, read_status

log = logging.getLogger(__name__)

SUPERVISOR_NAME = "containerizer-supervisor"
HANDSHAKE_TIMEOUT_S = 10.0


class SpawnError(LaunchFailed):
    """The supervisor did not start the workload. `step` names where it failed (args, exec,
    user, cgroup, cwd, stdout, namespaces, handshake, ...) and `reason` says why."""

    def __init__(self, message: str, *, step: str = "supervisor", reason: str = "") -> None:
        super().__init__(message)
        self.step = step
        self.reason = reason or message


@dataclass(frozen=True)
class SupervisorHandle:
    """Everything needed to find one container's supervisor again after a service restart."""

    supervisor_pid: int
    supervisor_start_time: int  # /proc/PID/stat field 22, clock ticks since boot
    child_pid: int  # host pid of the workload (pid 1 of its pid namespace)
    child_start_time: int
    status_file: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

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


# --- spawning and waiting -------------------------------------------------------------------------


@dataclass(frozen=True)
class Filesystem:
    """What the workload sees as its files: by default the host's, else an overlay of a
    read-only image rootfs (rootfs_lower) with upper/ and work/ under rootfs_dir, mounted at
    rootfs_dir/merged inside the container's mount namespace; plus host paths bound in."""

    rootfs_lower: str | None = None
    rootfs_dir: str | None = None
    binds: tuple[tuple[str, str], ...] = ()  # (host path, absolute path inside)
    read_only_binds: tuple[tuple[str, str], ...] = ()

    def arguments(self) -> list[str]:
        arguments = []
        if self.rootfs_lower is not None and self.rootfs_dir is not None:
            arguments += ["--rootfs-lower", self.rootfs_lower, "--rootfs-dir", self.rootfs_dir]
        for source, target in self.binds:
            arguments += ["--bind", source, "--to", target]
        for source, target in self.read_only_binds:
            arguments += ["--bind", source, "--to", target, "--read-only"]
        return arguments


def _command_line(
    binary: str,
    *,
    status_file: str,
    stdout: str,
    stderr: str,
    argv: Sequence[str],
    env: Sequence[tuple[str, str]],
    cgroup_procs: Sequence[str],
    cwd: str | None,
    user: str | None,
    hostname: str | None,
    namespaces: bool,
    netns: str | None = None,
    filesystem: Filesystem | None = None,
) -> list[str]:
    """The supervisor's argv. Paths are made absolute because the supervisor leaves our cwd."""
    if not argv:
        raise ValueError("argv: the workload command is empty")
    for key, _ in env:
        if not key or "=" in key:
            raise ValueError(f"env: variable name {key!r} is empty or contains '='")
    command = [binary, "--status-file", os.path.abspath(status_file)]
    command += ["--stdout", os.path.abspath(stdout), "--stderr", os.path.abspath(stderr)]
    for path in cgroup_procs:
        command += ["--cgroup-procs", path]
    for option, value in (
        ("--cwd", cwd), ("--user", user), ("--hostname", hostname), ("--netns", netns)
    ):  # fmt: skip
        if value is not None:
            command += [option, value]
    for key, value in env:
        command += ["--env", f"{key}={value}"]
    if not namespaces:
        command.append("--no-namespaces")
    if filesystem is not None:
        command += filesystem.arguments()
    return [*command, "--", *argv]


def _parse_handshake(line: bytes, workload: str) -> tuple[int, int, int]:
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
        f"launching {workload!r}: unexpected supervisor handshake {text!r}", step="handshake"
    )


async def _abandon(process: Child) -> None:
    """Kill a supervisor whose launch went wrong, with the workload it may have forked (both in
    the supervisor's own process group), and reap it."""
    process.kill_group()
    await process.wait()


async def _wait_foreign(handle: SupervisorHandle) -> None:
    """Wait for a supervisor that is not our child (spawned before a restart)."""
    await ProcessRef(handle.supervisor_pid, handle.supervisor_start_time).wait()


# The supervisors this process spawned and has not yet waited for, by (pid, start time). Being
# our children, they must be reaped by us. The registry is module-level because "our children"
# is a fact about the process, not an object.
_children: dict[tuple[int, int], Child] = {}


async def spawn(
    binary: str,
    *,
    status_file: str,
    stdout: str,
    stderr: str,
    argv: Sequence[str],
    env: Sequence[tuple[str, str]] = (),
    cgroup_procs: Sequence[str] = (),
    cwd: str | None = None,
    user: str | None = None,
    hostname: str | None = None,
    namespaces: bool = True,
    netns: str | None = None,
    filesystem: Filesystem | None = None,
    handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
) -> SupervisorHandle:
    """Start a supervisor for `argv` and return once the workload has exec'd.

    Raises SpawnError naming the failed step; by then the supervisor has been reaped and no
    status file was written. The supervisor runs in its own session, so it outlives us.
    """
    command = _command_line(
        binary, status_file=status_file, stdout=stdout, stderr=stderr, argv=argv, env=env,
        cgroup_procs=cgroup_procs, cwd=cwd, user=user, hostname=hostname, namespaces=namespaces,
        netns=netns, filesystem=filesystem,
    )  # fmt: skip
    try:
        process = Child.start(command)
    except LaunchFailed as exc:
        raise SpawnError(str(exc), step="supervisor") from exc
    child_pid, child_start, supervisor_start = await _read_handshake(
        process, argv[0], handshake_timeout
    )
    _children[(process.pid, supervisor_start)] = process
    return SupervisorHandle(
        supervisor_pid=process.pid,
        supervisor_start_time=supervisor_start,
        child_pid=child_pid,
        child_start_time=child_start,
        status_file=os.path.abspath(status_file),
    )


async def _read_handshake(process: Child, workload: str, timeout: float) -> tuple[int, int, int]:
    """The parsed `ok` line. On anything else the supervisor (and whatever it forked) is killed
    and reaped before SpawnError is raised; a cancelled spawn leaves nothing behind either."""
    try:
        line = await asyncio.wait_for(process.readline(), timeout)
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
        parsed = _parse_handshake(line, workload)
    except SpawnError as exc:
        if exc.step == "handshake":
            await _abandon(process)
        else:
            await process.wait()  # it exits by itself after an error line
        raise
    process.close_stdout()  # the supervisor writes nothing after the handshake
    return parsed


async def wait_exit(handle: SupervisorHandle) -> ExitStatus | None:
    """Resolve once the handle's supervisor has exited, whether or not it is our child, and
    return what it recorded; None means it recorded nothing (the caller reports LOST)."""
    key = (handle.supervisor_pid, handle.supervisor_start_time)
    process = _children.get(key)
    if process is not None:
        code = await process.wait()
        _children.pop(key, None)
        if code != 0:
            log.warning("supervisor %d exited with status %d", handle.supervisor_pid, code)
    else:
        await _wait_foreign(handle)
    return read_status(handle.status_file)
