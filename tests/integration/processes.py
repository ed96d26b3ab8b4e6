"""Helpers for tests that look at processes from the host: a process found by its command
line, its pid namespace and memory cgroup, and a terminal read until some output shows."""

from __future__ import annotations

import os
import select
import time
from pathlib import Path

import psutil


def wait_for_process(cmdline: list[str], timeout: float = 20) -> psutil.Process:
    """The first process whose command line is exactly `cmdline`, once there is one."""
    deadline = time.monotonic() + timeout
    while True:
        found = [
            process
            for process in psutil.process_iter(["cmdline"])
            if process.info["cmdline"] == cmdline
        ]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"{cmdline} never ran"
        time.sleep(0.05)


def pid_namespace(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/pid")


def memory_cgroup(pid: int) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return path
    raise AssertionError(f"pid {pid} has no memory cgroup")


def read_until(fd: int, wanted: bytes, timeout: float = 20) -> bytes:
    """What `fd` (a pty's master) gives until `wanted` is among it."""
    seen = b""
    deadline = time.monotonic() + timeout
    while wanted not in seen:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"{wanted!r} not seen in {seen!r}"
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            try:
                seen += os.read(fd, 4096)
            except OSError:
                break
    return seen
