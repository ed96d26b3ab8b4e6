"""The cgroup accounting reader: Mesos ResourceStatistics from any cgroup directory.

It takes directories, not container ids, so the same code reads our cgroups, containerd's,
LXC's or libvirt's: every runtime is measured by one code path. Each directory is probed for
the v1 and the v2 files; a file that is missing is skipped (a controller not mounted there, an
older kernel), so the caller may pass every directory it knows of.
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


def _read(directory: Path, name: str) -> str | None:
    try:
        return files.read_text(directory / name)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _cpu(directory: Path, stats: Statistics) -> None:
    """cpuacct.stat (v1, USER_HZ ticks) or cpu.stat usec fields (v2); throttling from cpu.stat
    (v1 throttled_time in ns, v2 throttled_usec)."""
    if (text := _read(directory, "cpuacct.stat")) is not None:
        ticks = files.parse_kv(directory / "cpuacct.stat", text)
        stats["cpus_user_time_secs"] = ticks.get("user", 0) / USER_HZ
        stats["cpus_system_time_secs"] = ticks.get("system", 0) / USER_HZ
    if (text := _read(directory, "cpu.stat")) is not None:
        cpu = files.parse_kv(directory / "cpu.stat", text)
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


def _cpu_limit(directory: Path, stats: Statistics) -> None:
    """cpus_limit: the CFS quota when one is set, else the share weight (shares / 1024)."""
    if (quota := _read(directory, "cpu.cfs_quota_us")) is not None:
        quota_us = files.parse_int(directory / "cpu.cfs_quota_us", quota)
        period = _read(directory, "cpu.cfs_period_us")
        period_us = int(period) if period else CFS_PERIOD_US_DEFAULT
        if quota_us > 0:
            stats["cpus_limit"] = quota_us / period_us
        elif (shares := _read(directory, "cpu.shares")) is not None:
            stats["cpus_limit"] = int(shares) / 1024
    elif (cpu_max := _read(directory, "cpu.max")) is not None:
        quota_text, _, period_text = cpu_max.strip().partition(" ")
        if quota_text != "max":
            stats["cpus_limit"] = int(quota_text) / int(period_text or CFS_PERIOD_US_DEFAULT)
        elif (weight := _read(directory, "cpu.weight")) is not None:
            stats["cpus_limit"] = (2 + ((int(weight) - 1) * 262142) // 9999) / 1024


def _memory_v1(directory: Path, stats: Statistics) -> None:
    if (usage := _read(directory, "memory.usage_in_bytes")) is None:
        return
    stats["mem_total_bytes"] = int(usage)
    if (text := _read(directory, "memory.stat")) is not None:
        mem = files.parse_kv(directory / "memory.stat", text)
        for key, source in (
            ("mem_rss_bytes", "total_rss"),
            ("mem_anon_bytes", "total_rss"),
            ("mem_file_bytes", "total_cache"),
            ("mem_cache_bytes", "total_cache"),
            ("mem_mapped_file_bytes", "total_mapped_file"),
            ("mem_swap_bytes", "total_swap"),
        ):
            if source in mem:
                stats[key] = mem[source]
    _limit(directory, "memory.limit_in_bytes", "mem_limit_bytes", stats)
    _limit(directory, "memory.soft_limit_in_bytes", "mem_soft_limit_bytes", stats)


def _memory_v2(directory: Path, stats: Statistics) -> None:
    if (current := _read(directory, "memory.current")) is None:
        return
    stats["mem_total_bytes"] = int(current)
    if (text := _read(directory, "memory.stat")) is not None:
        mem = files.parse_kv(directory / "memory.stat", text)
        for key, source in (
            ("mem_rss_bytes", "anon"),
            ("mem_anon_bytes", "anon"),
            ("mem_file_bytes", "file"),
            ("mem_cache_bytes", "file"),
            ("mem_mapped_file_bytes", "file_mapped"),
        ):
            if source in mem:
                stats[key] = mem[source]
    if (swap := _read(directory, "memory.swap.current")) is not None:
        stats["mem_swap_bytes"] = int(swap)
    _limit(directory, "memory.max", "mem_limit_bytes", stats)
    _limit(directory, "memory.low", "mem_soft_limit_bytes", stats)


def _limit(directory: Path, name: str, key: str, stats: Statistics) -> None:
    """Unlimited ("max", or v1's huge sentinel) is reported by leaving the key out."""
    if (text := _read(directory, name)) is None:
        return
    value = text.strip()
    if value != "max" and (number := int(value)) < files.V1_UNLIMITED:
        stats[key] = number


def _tasks(directory: Path, stats: Statistics) -> None:
    """processes / threads from the first directory that lists them (v1 repeats them in every
    controller's directory)."""
    if "processes" in stats:
        return
    procs = _read(directory, "cgroup.procs")
    if procs is None:
        return
    stats["processes"] = len(procs.split())
    threads = _read(directory, "tasks")
    if threads is None:
        threads = _read(directory, "cgroup.threads")
    if threads is not None:
        stats["threads"] = len(threads.split())


def read_statistics(paths: Iterable[Path]) -> Statistics:
    """Statistics keyed by mesos.ResourceStatistics field names, plus "timestamp".

    `paths` are the container's cgroup directories: one per controller on v1, one on v2.
    """
    stats: Statistics = {"timestamp": time.time()}
    for directory in paths:
        _cpu(directory, stats)
        _cpu_limit(directory, stats)
        _memory_v1(directory, stats)
        _memory_v2(directory, stats)
        _tasks(directory, stats)
    return stats
