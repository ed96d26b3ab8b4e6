"""posix/cpu and posix/mem: accounting without cgroups, by walking the container's process tree.

The fallback where no cgroup can be used (Mesos' PosixCpuIsolator / PosixMemIsolator). It
isolates nothing; it only measures, and a process that daemonizes out of the tree escapes it.
"""

from __future__ import annotations

import time

import psutil

from isolators.base import Isolator, LaunchInfo, Limits, Statistics


def _tree(pid: int) -> list[psutil.Process]:
    """The init process and all its descendants still alive; [] once init is gone."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


class _PosixIsolator(Isolator):
    """Remembers each container's init pid (from isolate) and its limits (for *_limit keys)."""

    def __init__(self) -> None:
        self._pids: dict[str, int] = {}
        self._limits: dict[str, Limits] = {}

    async def prepare(self, container_id: str, limits: Limits) -> LaunchInfo | None:
        self._limits[container_id] = limits
        return None

    async def isolate(self, container_id: str, pid: int) -> None:
        self._pids[container_id] = pid

    async def update(self, container_id: str, limits: Limits) -> None:
        self._limits[container_id] = limits

    async def recover(self, known: set[str]) -> None:
        """Nothing outlives us here except pids, which the launcher re-reports via isolate."""

    async def cleanup(self, container_id: str) -> None:
        self._pids.pop(container_id, None)
        self._limits.pop(container_id, None)

    def _processes(self, container_id: str) -> list[psutil.Process]:
        pid = self._pids.get(container_id)
        return [] if pid is None else _tree(pid)


class PosixCpuIsolator(_PosixIsolator):
    name = "posix/cpu"

    async def usage(self, container_id: str) -> Statistics:
        user = system = 0.0
        processes = threads = 0
        for process in self._processes(container_id):
            try:
                with process.oneshot():
                    times = process.cpu_times()
                    threads += process.num_threads()
            except psutil.NoSuchProcess:
                continue
            user += times.user
            system += times.system
            processes += 1
        stats: Statistics = {
            "timestamp": time.time(),
            "cpus_user_time_secs": user,
            "cpus_system_time_secs": system,
            "processes": processes,
            "threads": threads,
        }
        limits = self._limits.get(container_id)
        if limits is not None and limits.cpus is not None:
            stats["cpus_limit"] = limits.cpus
        return stats


class PosixMemIsolator(_PosixIsolator):
    name = "posix/mem"

    async def usage(self, container_id: str) -> Statistics:
        rss = 0
        for process in self._processes(container_id):
            try:
                rss += process.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        stats: Statistics = {"timestamp": time.time(), "mem_rss_bytes": rss}
        limits = self._limits.get(container_id)
        if limits is not None and limits.mem_bytes is not None:
            stats["mem_limit_bytes"] = limits.mem_bytes
        return stats
