"""Host processes named by pid *and* start time, and the supervisor's status file.

Shared by every driver that runs containerizer-supervisor (native, LXC): pids are reused, so a
process is known by (pid, start time — field 22 of /proc/PID/stat), and nothing is signalled or
waited for unless the start time still matches. Waiting works whether or not the process is our
child (a pidfd becomes readable at exit: no polling).

Status file, as the supervisor writes it (temp file + rename):
    exited <code> | signaled <signo>
    finished <unix time>
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapter.core.model import Exit
from isolators.base import Limitation

log = logging.getLogger(__name__)

_STATUS_PATTERN = re.compile(r"(exited|signaled) (\d{1,3})\nfinished (\d+(?:\.\d+)?)\n?")
_NOT_RUNNING_STATES = frozenset({"Z", "X", "x"})


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) from /proc/PID/stat; None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            data = stat_file.read()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: fields 3.. follow the last ')'.
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        return fields[0].decode("ascii"), int(fields[1]), int(fields[19])
    except (IndexError, ValueError, UnicodeDecodeError):
        return None


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat: what tells a process apart from a later one with its pid."""
    stat = proc_stat(pid)
    return None if stat is None else stat[2]


@dataclass(frozen=True)
class ProcessRef:
    """One host process. pid 0 means "already gone when we looked"."""

    pid: int
    start_time: int

    def is_alive(self) -> bool:
        """It runs (not a zombie) and is still the process that started at start_time."""
        stat = proc_stat(self.pid) if self.pid > 0 else None
        return (
            stat is not None and stat[2] == self.start_time and stat[0] not in _NOT_RUNNING_STATES
        )

    def send(self, signo: int) -> bool:
        """Signal it if it is still the one named; check and send go through one pidfd, so a
        pid reused in between is never hit. True if the signal was sent."""
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
        """Resolve once it has exited. The start time is checked after opening the pidfd, so
        the pidfd is known to name this process and not a reused pid."""
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

            def on_exit() -> None:
                if not exited.done():
                    exited.set_result(None)

            loop.add_reader(pidfd, on_exit)
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
        """From `to_json`; anything else raises ValueError naming the key."""
        if (
            not isinstance(value, list)
            or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        ):
            raise ValueError(f"handle: {key!r} must be [pid, start_time], got {value!r}")
        return cls(value[0], value[1])


@dataclass(frozen=True)
class ExitStatus:
    """How a workload ended, as its supervisor recorded it: exactly one of exit_code and
    signal is set."""

    exit_code: int | None
    signal: int | None
    finished_at: float  # unix time


def read_status(path: str | Path) -> ExitStatus | None:
    """The recorded status, or None when there is none: no file means the supervisor died
    without recording (the caller reports LOST); an unreadable or garbled file is logged."""
    try:
        with open(path, encoding="ascii") as status_file:
            text = status_file.read()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("status file %s is unreadable: %s", path, exc)
        return None
    match = _STATUS_PATTERN.fullmatch(text)
    if match is None:
        log.warning("status file %s does not parse: %r", path, text[:200])
        return None
    kind, number, finished = match.group(1), int(match.group(2)), float(match.group(3))
    if kind == "exited":
        return ExitStatus(exit_code=number, signal=None, finished_at=finished)
    return ExitStatus(exit_code=None, signal=number, finished_at=finished)


def supervised_exit(
    status: ExitStatus | None, limitation: Limitation | None, lost_message: str
) -> Exit:
    """How a supervised container ended, for the core: its recorded status with the limit it
    hit, or lost when nothing was recorded."""
    if status is None:
        return Exit(lost=True, message=lost_message)
    return Exit(
        exit_code=status.exit_code,
        signal=status.signal,
        limitation=limitation.resource if limitation else None,
        limitation_message=limitation.message if limitation else "",
        finished_at=status.finished_at,
    )
