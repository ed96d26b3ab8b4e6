"""The cgroup accounting reader: Mesos ResourceStatistics from any cgroup directory.

It takes directories, not container ids, so the same code reads our cgroups, containerd's,
LXC's or libvirt's: every runtime is measured by one code path. Each directory is listed once
and only the v1 and v2 files it holds are opened: a file that is missing is skipped (a
controller not mounted there, an older kernel), so the caller may pass every directory it knows
of. Listing first is what keeps that cheap: on v1 most probes of a controller's directory are
for another controller's files, and a failed open costs as much as the listing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path

from isolators.base import Statistics
from isolators.cgroups import files

USER_HZ = os.sysconf("SC_CLK_TCK")
CFS_PERIOD_US_DEFAULT = 100_000


class _Directory:
    """One cgroup directory and the names of the files it holds, listed once per reading."""

    def __init__(self, path: str, names: set[str]) -> None:
        self.path = path
        self.names = names

    @classmethod
    def scan(cls, path: str | Path) -> _Directory | None:
        """None when the directory is gone (or is not one): it is skipped, like a file."""
        text_path = os.fspath(path)
        try:
            return cls(text_path, set(os.listdir(text_path)))
        except (FileNotFoundError, NotADirectoryError):
            return None

    def file(self, name: str) -> str:
        return f"{self.path}/{name}"

    def read(self, name: str) -> str | None:
        """The file's content, None if the directory does not hold it (or it just went away
        with the cgroup)."""
        if name not in self.names:
            return None
        try:
            return files.read_text(self.file(name))
        except (FileNotFoundError, NotADirectoryError):
            return None


def _cpu(directory: _Directory, stats: Statistics) -> None:
    """cpuacct.stat (v1, USER_HZ ticks) or cpu.stat usec fields (v2); throttling from cpu.stat
    (v1 throttled_time in ns, v2 throttled_usec)."""
    if (text := directory.read("cpuacct.stat")) is not None:
        ticks = files.parse_kv(directory.file("cpuacct.stat"), text)
        stats["cpus_user_time_secs"] = ticks.get("user", 0) / USER_HZ
        stats["cpus_system_time_secs"] = ticks.get("system", 0) / USER_HZ
    if (text := directory.read("cpu.stat")) is not None:
        cpu = files.parse_kv(directory.file("cpu.stat"), text)
        if "user_usec" in cpu:
            stats["cpus_user_time_secs"] = cpu["user_usec"] / 1e6
            stats["cpus_system_time_secs"] = cpu.get("system_usec", 0) / 1e6
        if "nr_periods" in cpu:
            stats["cpus_nr_periods"] = cpu["nr_periods"]
            stats["cpus_nr_throttled"] = cpu.get("nr_throttled", 0)
        if "throttled_usec" in cpu:
            stats["cpus_throttled_time_secs"] = cpu["throttled_usec"] / 1e6
        elif "throttled_time" in cpu:
            stats["cpus_throttled_time_secs"] = cpu["throttled_time"] / 1e9


def _cpu_limit(directory: _Directory, stats: Statistics) -> None:
    """cpus_limit: the CFS quota when one is set, else the share weight (shares / 1024)."""
    if (quota := directory.read("cpu.cfs_quota_us")) is not None:
        quota_us = files.parse_int(directory.file("cpu.cfs_quota_us"), quota)
        period = directory.read("cpu.cfs_period_us")
        period_us = int(period) if period else CFS_PERIOD_US_DEFAULT
        if quota_us > 0:
            stats["cpus_limit"] = quota_us / period_us
        elif (shares := directory.read("cpu.shares")) is not None:
            stats["cpus_limit"] = int(shares) / 1024
    elif (cpu_max := directory.read("cpu.max")) is not None:
        quota_text, _, period_text = cpu_max.strip().partition(" ")
        if quota_text != "max":
            stats["cpus_limit"] = int(quota_text) / int(period_text or CFS_PERIOD_US_DEFAULT)
        elif (weight := directory.read("cpu.weight")) is not None:
            stats["cpus_limit"] = (2 + ((int(weight) - 1) * 262142) // 9999) / 1024


def _memory_v1(directory: _Directory, stats: Statistics) -> None:
    if (usage := directory.read("memory.usage_in_bytes")) is None:
        return
    stats["mem_total_bytes"] = int(usage)
    if (text := directory.read("memory.stat")) is not None:
        mem = files.parse_kv(directory.file("memory.stat"), text)
        for key, source in (
            ("mem_rss_bytes", "total_rss"),
            ("mem_anon_bytes", "total_rss"),
            ("mem_file_bytes", "total_cache"),
            ("mem_cache_bytes", "total_cache"),
            ("mem_mapped_file_bytes", "total_mapped_file"),
            ("mem_swap_bytes", "total_swap"),
            # Not in mesos.ResourceStatistics: for cAdvisor's working set (usage - inactive file).
            ("mem_inactive_file_bytes", "total_inactive_file"),
        ):
            if source in mem:
                stats[key] = mem[source]
    _limit(directory, "memory.limit_in_bytes", "mem_limit_bytes", stats)
    _limit(directory, "memory.soft_limit_in_bytes", "mem_soft_limit_bytes", stats)


def _memory_v2(directory: _Directory, stats: Statistics) -> None:
    if (current := directory.read("memory.current")) is None:
        return
    stats["mem_total_bytes"] = int(current)
    if (text := directory.read("memory.stat")) is not None:
        mem = files.parse_kv(directory.file("memory.stat"), text)
        for key, source in (
            ("mem_rss_bytes", "anon"),
            ("mem_anon_bytes", "anon"),
            ("mem_file_bytes", "file"),
            ("mem_cache_bytes", "file"),
            ("mem_mapped_file_bytes", "file_mapped"),
            ("mem_inactive_file_bytes", "inactive_file"),
        ):
            if source in mem:
                stats[key] = mem[source]
    if (swap := directory.read("memory.swap.current")) is not None:
        stats["mem_swap_bytes"] = int(swap)
    _limit(directory, "memory.max", "mem_limit_bytes", stats)
    _limit(directory, "memory.low", "mem_soft_limit_bytes", stats)


def _limit(directory: _Directory, name: str, key: str, stats: Statistics) -> None:
    """Unlimited ("max", or v1's huge sentinel) is reported by leaving the key out."""
    if (text := directory.read(name)) is None:
        return
    value = text.strip()
    if value != "max" and (number := int(value)) < files.V1_UNLIMITED:
        stats[key] = number


def _tasks(directory: _Directory, stats: Statistics) -> None:
    """processes / threads from the first directory that lists them (v1 repeats them in every
    controller's directory)."""
    if "processes" in stats:
        return
    procs = directory.read("cgroup.procs")
    if procs is None:
        return
    stats["processes"] = len(procs.split())
    threads = directory.read("tasks")
    if threads is None:
        threads = directory.read("cgroup.threads")
    if threads is not None:
        stats["threads"] = len(threads.split())


def read_statistics(paths: Iterable[str | Path]) -> Statistics:
    """Statistics keyed by mesos.ResourceStatistics field names, plus "timestamp".

    `paths` are the container's cgroup directories: one per controller on v1, one on v2.
    """
    stats: Statistics = {"timestamp": time.time()}
    for path in paths:
        if (directory := _Directory.scan(path)) is None:
            continue
        _cpu(directory, stats)
        _cpu_limit(directory, stats)
        _memory_v1(directory, stats)
        _memory_v2(directory, stats)
        _tasks(directory, stats)
    return stats
