"""The accounting reader on fake v1 and v2 cgroup directories, and the posix fallback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from isolators.base import Limits
from isolators.cgroups.accounting import read_statistics
from isolators.posix import PosixCpuIsolator, PosixMemIsolator

HZ = os.sysconf("SC_CLK_TCK")
MiB = 1024 * 1024


def write_tree(base: Path, tree: dict[str, dict[str, str]]) -> list[Path]:
    dirs = []
    for name, contents in tree.items():
        directory = base / name
        directory.mkdir(parents=True)
        for file_name, text in contents.items():
            (directory / file_name).write_text(text)
        dirs.append(directory)
    return dirs


V1_TREE = {
    "cpu": {
        "cpu.stat": "nr_periods 40\nnr_throttled 7\nthrottled_time 1500000000\n"
        "nr_bursts 0\nburst_time 0\n",
        "cpu.cfs_quota_us": "50000",
        "cpu.cfs_period_us": "100000",
        "cpu.shares": "512",
        "cgroup.procs": "10\n11\n",
        "tasks": "10\n11\n12\n",
    },
    "cpuacct": {"cpuacct.stat": f"user {3 * HZ}\nsystem {HZ // 2}\n", "cgroup.procs": "10\n"},
    "memory": {
        "memory.usage_in_bytes": str(300 * MiB),
        "memory.stat": f"cache 1\nrss 2\ntotal_cache {50 * MiB}\ntotal_rss {200 * MiB}\n"
        f"total_mapped_file {10 * MiB}\ntotal_swap 0\n",
        "memory.limit_in_bytes": str(512 * MiB),
        "memory.soft_limit_in_bytes": "9223372036854771712",
    },
}


def test_v1_directories(tmp_path: Path) -> None:
    stats = read_statistics(write_tree(tmp_path, V1_TREE))
    assert isinstance(stats.pop("timestamp"), float)
    assert stats == {
        "cpus_user_time_secs": 3.0,
        "cpus_system_time_secs": (HZ // 2) / HZ,
        "cpus_nr_periods": 40,
        "cpus_nr_throttled": 7,
        "cpus_throttled_time_secs": 1.5,
        "cpus_limit": 0.5,
        "mem_total_bytes": 300 * MiB,
        "mem_rss_bytes": 200 * MiB,
        "mem_anon_bytes": 200 * MiB,
        "mem_file_bytes": 50 * MiB,
        "mem_cache_bytes": 50 * MiB,
        "mem_mapped_file_bytes": 10 * MiB,
        "mem_swap_bytes": 0,
        "mem_limit_bytes": 512 * MiB,  # the unlimited soft limit is left out
        "processes": 2,
        "threads": 3,
    }
    assert isinstance(stats["cpus_user_time_secs"], float)
    assert isinstance(stats["processes"], int)


def test_v1_shares_give_the_limit_without_quota(tmp_path: Path) -> None:
    tree = {"cpu": {**V1_TREE["cpu"], "cpu.cfs_quota_us": "-1"}}
    assert read_statistics(write_tree(tmp_path, tree))["cpus_limit"] == 0.5


V2_TREE = {
    "c1": {
        "cpu.stat": "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n"
        "nr_periods 10\nnr_throttled 4\nthrottled_usec 250000\n",
        "cpu.max": "150000 100000",
        "cpu.weight": "39",
        "memory.current": str(210 * MiB),
        "memory.stat": f"anon {200 * MiB}\nfile {8 * MiB}\nfile_mapped {2 * MiB}\n",
        "memory.swap.current": "4096",
        "memory.max": str(256 * MiB),
        "memory.low": str(256 * MiB),
        "cgroup.procs": "1\n2\n3\n",
        "cgroup.threads": "1\n2\n3\n4\n",
    }
}


def test_v2_directory(tmp_path: Path) -> None:
    stats = read_statistics(write_tree(tmp_path, V2_TREE))
    stats.pop("timestamp")
    assert stats == {
        "cpus_user_time_secs": 2.0,
        "cpus_system_time_secs": 0.5,
        "cpus_nr_periods": 10,
        "cpus_nr_throttled": 4,
        "cpus_throttled_time_secs": 0.25,
        "cpus_limit": 1.5,
        "mem_total_bytes": 210 * MiB,
        "mem_rss_bytes": 200 * MiB,
        "mem_anon_bytes": 200 * MiB,
        "mem_file_bytes": 8 * MiB,
        "mem_cache_bytes": 8 * MiB,
        "mem_mapped_file_bytes": 2 * MiB,
        "mem_swap_bytes": 4096,
        "mem_limit_bytes": 256 * MiB,
        "mem_soft_limit_bytes": 256 * MiB,
        "processes": 3,
        "threads": 4,
    }


def test_v2_weight_gives_the_limit_without_max(tmp_path: Path) -> None:
    tree = {"c1": {**V2_TREE["c1"], "cpu.max": "max 100000", "memory.max": "max"}}
    stats = read_statistics(write_tree(tmp_path, tree))
    assert stats["cpus_limit"] == pytest.approx(1.0, abs=0.03)  # one weight step ~ 26 shares
    assert "mem_limit_bytes" not in stats


def test_missing_files_and_directories_are_skipped(tmp_path: Path) -> None:
    stats = read_statistics([tmp_path / "gone", *write_tree(tmp_path, {"empty": {}})])
    assert list(stats) == ["timestamp"]


def test_a_file_given_as_a_directory_is_skipped(tmp_path: Path) -> None:
    (not_a_directory := tmp_path / "cgroup.procs").write_text("1\n")
    stats = read_statistics([not_a_directory, str(write_tree(tmp_path, V2_TREE)[0])])
    assert stats["processes"] == 3 and stats["mem_total_bytes"] == 210 * MiB


async def test_posix_isolators_walk_the_process_tree() -> None:
    cpu, mem = PosixCpuIsolator(), PosixMemIsolator()
    for isolator in (cpu, mem):
        assert await isolator.prepare("c1", Limits(cpus=1.5, mem_bytes=64 * MiB)) is None
        await isolator.isolate("c1", os.getpid())
    cpu_stats, mem_stats = await cpu.usage("c1"), await mem.usage("c1")
    assert cpu_stats["processes"] >= 1 and cpu_stats["threads"] >= 1
    assert cpu_stats["cpus_user_time_secs"] > 0 and cpu_stats["cpus_limit"] == 1.5
    assert mem_stats["mem_rss_bytes"] > MiB and mem_stats["mem_limit_bytes"] == 64 * MiB
    for isolator in (cpu, mem):
        await isolator.cleanup("c1")
        await isolator.cleanup("c1")  # idempotent
    after_cleanup = await cpu.usage("c1")
    assert after_cleanup["processes"] == 0 and "cpus_limit" not in after_cleanup
