"""What the LXC driver needs to find one container again after a restart of the service.

Three processes make a running LXC container here (host pids, each with its start time because
pids are reused and nothing is signalled unless the start time still matches):

    monitor         `lxc-start -F`: LXC's monitor; it tears the container down when init ends
    init            pid 1 of the container: a static containerizer-supervisor, which reaps the
                    workload and writes its exact exit status to the status file
    workload_init   the supervisor's own init (pid 1 of a nested pid namespace) that forwards
                    signals to the workload: what `kill` signals

The status file lives in the container's directory on the host (bind-mounted into the
container), so it is there for a service that restarts after the container ended. Its format is
the supervisor's: `exited <code>` or `signaled <signo>`, then `finished <unix time>`. (The
native driver reads the same format; drivers do not import each other, so the few lines that
parse it are repeated here.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_STATUS_PATTERN = re.compile(r"(exited|signaled) (\d{1,3})\nfinished (\d+(?:\.\d+)?)\n?")
_NOT_RUNNING_STATES = frozenset({"Z", "X", "x"})


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time) from /proc/PID/stat; None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            data = stat_file.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2 :].split()  # comm may hold spaces and parentheses
    try:
        return fields[0].decode("ascii"), int(fields[19])
    except (IndexError, ValueError, UnicodeDecodeError):
        return None


def start_time(pid: int) -> int | None:
    stat = _proc_stat(pid)
    return None if stat is None else stat[1]


@dataclass(frozen=True)
class ProcessRef:
    """One host process, told apart from a later one with the same pid by its start time.
    pid 0 means "already gone when we looked"."""

    pid: int
    start_time: int

    def is_alive(self) -> bool:
        if self.pid <= 0:
            return False
        stat = _proc_stat(self.pid)
        return (
            stat is not None and stat[1] == self.start_time and stat[0] not in _NOT_RUNNING_STATES
        )

    def send(self, signo: int) -> bool:
        """Signal the process if it is still the one named; the pidfd makes check and send one
        step, so a pid reused in between is never hit. True if the signal was sent."""
        if self.pid <= 0:
            return False
        try:
            pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return False
        try:
            if start_time(self.pid) != self.start_time:
                return False
            signal.pidfd_send_signal(pidfd, signo)
            return True
        except ProcessLookupError:
            return False
        finally:
            os.close(pidfd)

    async def wait(self) -> None:
        """Resolve once the process has exited, whether or not it is our child: a pidfd becomes
        readable at exit (no polling). The start time is checked after opening the pidfd, so
        the pidfd is known to name this process."""
        if self.pid <= 0:
            return
        try:
            pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return
        try:
            if start_time(self.pid) != self.start_time:
                return
            loop = asyncio.get_running_loop()
            exited: asyncio.Future[None] = loop.create_future()

            def on_readable() -> None:
                if not exited.done():
                    exited.set_result(None)

            loop.add_reader(pidfd, on_readable)
            try:
                await exited
            finally:
                loop.remove_reader(pidfd)
        finally:
            os.close(pidfd)

    def to_json(self) -> list[int]:
        return [self.pid, self.start_time]

    @classmethod
    def from_json(cls, value: Any, key: str) -> ProcessRef:
        if (
            not isinstance(value, list)
            or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        ):
            raise ValueError(f"lxc handle: {key!r} must be [pid, start_time], got {value!r}")
        return cls(value[0], value[1])


@dataclass(frozen=True)
class RecordedExit:
    """How the workload ended, as the in-container supervisor recorded it."""

    exit_code: int | None
    signal: int | None
    finished_at: float


def read_status(path: Path) -> RecordedExit | None:
    """The recorded status, or None when there is none (the supervisor died unrecorded)."""
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("lxc: status file %s is unreadable: %s", path, exc)
        return None
    match = _STATUS_PATTERN.fullmatch(text)
    if match is None:
        log.warning("lxc: status file %s does not parse: %r", path, text[:200])
        return None
    kind, number, finished = match.group(1), int(match.group(2)), float(match.group(3))
    if kind == "exited":
        return RecordedExit(exit_code=number, signal=None, finished_at=finished)
    return RecordedExit(exit_code=None, signal=number, finished_at=finished)


@dataclass(frozen=True)
class LxcHandle:
    """Checkpointed by the core as JSON after launch."""

    name: str
    lxcpath: str
    monitor: ProcessRef
    init: ProcessRef
    workload_init: ProcessRef
    status_file: str
    cgroup_dirs: tuple[str, ...]  # the real cgroup directories, as read from /proc/PID/cgroup

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "lxcpath": self.lxcpath,
            "monitor": self.monitor.to_json(),
            "init": self.init.to_json(),
            "workload_init": self.workload_init.to_json(),
            "status_file": self.status_file,
            "cgroup_dirs": list(self.cgroup_dirs),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LxcHandle:
        """Rebuild from `to_json`; a checkpoint that does not fit raises ValueError naming the
        key rather than producing a handle that signals the wrong process."""
        texts = {}
        for key in ("name", "lxcpath", "status_file"):
            if not isinstance(data.get(key), str):
                raise ValueError(f"lxc handle: {key!r} must be a string, got {data.get(key)!r}")
            texts[key] = data[key]
        dirs = data.get("cgroup_dirs")
        if not isinstance(dirs, list) or not all(isinstance(d, str) for d in dirs):
            raise ValueError(f"lxc handle: 'cgroup_dirs' must be a list of paths, got {dirs!r}")
        return cls(
            name=texts["name"],
            lxcpath=texts["lxcpath"],
            monitor=ProcessRef.from_json(data.get("monitor"), "monitor"),
            init=ProcessRef.from_json(data.get("init"), "init"),
            workload_init=ProcessRef.from_json(data.get("workload_init"), "workload_init"),
            status_file=texts["status_file"],
            cgroup_dirs=tuple(dirs),
        )


def _parent_and_start(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) from /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            data = stat_file.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        return int(fields[1]), int(fields[19])
    except (IndexError, ValueError):
        return None


def find_container_processes(
    cgroup_procs: Path, monitor_pid: int, init_start: int, workload_init_start: int
) -> tuple[ProcessRef | None, ProcessRef | None]:
    """Host (init, workload init) among the pids in `cgroup_procs`: the init is the monitor's
    child, the workload init the init's child, each with the start time the supervisor reported
    (start times are the same in every pid namespace; pids are not). None for one that has
    already exited."""
    try:
        pids = [int(line) for line in cgroup_procs.read_text().split()]
    except FileNotFoundError:
        return None, None
    stats = {pid: stat for pid in pids if (stat := _parent_and_start(pid)) is not None}

    def child(parent: int, started: int) -> ProcessRef | None:
        for pid, stat in stats.items():
            if stat == (parent, started):
                return ProcessRef(pid, started)
        return None

    init = child(monitor_pid, init_start)
    return init, child(init.pid, workload_init_start) if init else None


def cgroup_dirs_of(pid: int, mount_of: dict[str, Path]) -> tuple[str, ...]:
    """The cgroup directories of `pid` per /proc/PID/cgroup, for the controllers in `mount_of`
    (controller -> mount point; "" stands for the v2 unified hierarchy)."""
    dirs: list[str] = []
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                mount = mount_of.get(controller)
                if mount is not None:
                    directory = str(mount / path.lstrip("/"))
                    if directory not in dirs:
                        dirs.append(directory)
    return tuple(dirs)
