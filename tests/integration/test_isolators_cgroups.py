"""cgroup isolators on the real hierarchy: limits written, accounting, OOM, updates.

Each test uses its own cgroups root (ctz-test-<uuid>) so xdist workers never collide, and the
fixture kills and removes whatever the test left.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from isolators.base import Isolator, Limits, Statistics
from isolators.registry import (
    ContainerCgroups,
    build_isolators,
    container_cgroups,
    prepare_isolators,
)
from tests.integration.cgroup_helpers import start

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="cgroup isolators need root"),
]

MiB = 1024 * 1024
CGROUPS = ["cgroups/cpu", "cgroups/mem", "cgroups/pids"]


async def stats_until(
    cgroups: ContainerCgroups, cid: str, done: Callable[[Statistics], bool], timeout: float
) -> Statistics:
    deadline = time.monotonic() + timeout
    while True:
        stats = cgroups.statistics(cid)
        if done(stats) or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.02)


async def finish(
    isolators: list[Isolator],
    cgroups: ContainerCgroups,
    cid: str,
    *procs: asyncio.subprocess.Process,
) -> None:
    await cgroups.destroy(cid)
    for process in procs:
        await process.wait()
    for isolator in isolators:
        await isolator.cleanup(cid)
    assert cgroups.dirs(cid) == []


def read(path: Path) -> str:
    return path.read_text().strip()


async def test_files_match_the_arithmetic_and_follow_updates(cgroups_root: str) -> None:
    isolators = build_isolators(CGROUPS, cgroups_root=cgroups_root, enable_cfs=True)
    cgroups = container_cgroups(cgroups_root=cgroups_root)
    h = cgroups.hierarchies
    await prepare_isolators(isolators, "c1", Limits(cpus=2.5, mem_bytes=100 * MiB, pids=50))
    cpu, mem, pids = h.path("cpu", "c1"), h.path("memory", "c1"), h.path("pids", "c1")
    assert read(cpu / "cpu.shares") == "2560"
    assert read(cpu / "cpu.cfs_period_us") == "100000"
    assert read(cpu / "cpu.cfs_quota_us") == "250000"
    assert read(mem / "memory.limit_in_bytes") == str(100 * MiB)
    assert read(mem / "memory.soft_limit_in_bytes") == str(100 * MiB)
    assert read(pids / "pids.max") == "50"
    assert h.path("cpuacct", "c1").is_dir() and h.path("freezer", "c1").is_dir()
    for isolator in isolators:
        await isolator.update("c1", Limits(cpus=4, mem_bytes=200 * MiB, pids=None))
    assert (read(cpu / "cpu.shares"), read(cpu / "cpu.cfs_quota_us")) == ("4096", "400000")
    assert read(mem / "memory.limit_in_bytes") == str(200 * MiB)
    assert read(pids / "pids.max") == "max"
    await finish(isolators, cgroups, "c1")


async def test_lowering_memory_stops_at_usage(cgroups_root: str) -> None:
    isolators = build_isolators(["cgroups/mem"], cgroups_root=cgroups_root)
    cgroups = container_cgroups(cgroups_root=cgroups_root)
    launch = await prepare_isolators(isolators, "c1", Limits(mem_bytes=256 * MiB))
    hog = f"exec {sys.executable} -c \"x = b'a' * (100 << 20); import time; time.sleep(60)\""
    process = await start(launch.cgroup_procs, hog)
    await stats_until(cgroups, "c1", lambda s: s.get("mem_rss_bytes", 0) >= 100 * MiB, 10)
    await isolators[0].update("c1", Limits(mem_bytes=32 * MiB))
    limit = int(read(cgroups.hierarchies.path("memory", "c1") / "memory.limit_in_bytes"))
    assert 100 * MiB <= limit < 256 * MiB
    assert process.returncode is None
    await finish(isolators, cgroups, "c1", process)


async def test_busy_loop_is_user_time(cgroups_root: str) -> None:
    isolators = build_isolators(["cgroups/cpu"], cgroups_root=cgroups_root)
    cgroups = container_cgroups(cgroups_root=cgroups_root)
    launch = await prepare_isolators(isolators, "c1", Limits(cpus=1))
    process = await start(launch.cgroup_procs, "while :; do :; done")
    stats = await stats_until(cgroups, "c1", lambda s: s["cpus_user_time_secs"] >= 0.1, 1.0)
    assert stats["cpus_user_time_secs"] >= 0.1
    assert stats["cpus_system_time_secs"] < 0.05
    assert stats["processes"] == 1 and stats["cpus_limit"] == 1.0
    await finish(isolators, cgroups, "c1", process)


async def test_urandom_is_system_time(cgroups_root: str) -> None:
    isolators = build_isolators(["cgroups/cpu"], cgroups_root=cgroups_root)
    cgroups = container_cgroups(cgroups_root=cgroups_root)
    launch = await prepare_isolators(isolators, "c1", Limits(cpus=1))
    process = await start(launch.cgroup_procs, "exec cat /dev/urandom > /dev/null")
    stats = await stats_until(cgroups, "c1", lambda s: s["cpus_system_time_secs"] >= 0.3, 3.0)
    assert stats["cpus_system_time_secs"] > 2 * stats["cpus_user_time_secs"]
    await finish(isolators, cgroups, "c1", process)


async def test_cfs_quota_caps_half_a_cpu(cgroups_root: str) -> None:
    isolators = build_isolators(["cgroups/cpu"], cgroups_root=cgroups_root, enable_cfs=True)
    cgroups = container_cgroups(cgroups_root=cgroups_root)
    launch = await prepare_isolators(isolators, "c1", Limits(cpus=0.5))
    process = await start(launch.cgroup_procs, "while :; do :; done")
    before = cgroups.statistics("c1")
    await asyncio.sleep(1.0)
    after = cgroups.statistics("c1")

    def used(s: Statistics) -> float:
        return s["cpus_user_time_secs"] + s["cpus_system_time_secs"]

    wall = after["timestamp"] - before["timestamp"]
    assert 0.3 * wall <= used(after) - used(before) <= 0.6 * wall
    # CFS is accounting periods; whether it also throttled depends on how much CPU the loop got
    # from a loaded 2-core machine (under xdist it may get less than its quota): the upper bound
    # above is what shows the cap.
    assert after["cpus_nr_periods"] > 0 and after["cpus_limit"] == 0.5
    await finish(isolators, cgroups, "c1", process)


async def test_oom_kill_resolves_watch_and_check(cgroups_root: str) -> None:
    isolators = build_isolators(["cgroups/mem"], cgroups_root=cgroups_root)
    mem = isolators[0]
    cgroups = container_cgroups(cgroups_root=cgroups_root)
    launch = await prepare_isolators(isolators, "c1", Limits(mem_bytes=64 * MiB))
    watch = asyncio.create_task(mem.watch("c1"))
    assert mem.check("c1") is None
    process = await start(
        launch.cgroup_procs, f"exec {sys.executable} -c \"x = b'a' * (200 << 20)\""
    )
    limitation = await asyncio.wait_for(watch, 10)
    assert limitation.resource == "mem" and str(64 * MiB) in limitation.message
    assert await process.wait() == -9
    assert mem.check("c1") == limitation
    await finish(isolators, cgroups, "c1")


async def test_touching_200_mib_is_rss(cgroups_root: str) -> None:
    isolators = build_isolators(["cgroups/mem"], cgroups_root=cgroups_root)
    cgroups = container_cgroups(cgroups_root=cgroups_root)
    launch = await prepare_isolators(isolators, "c1", Limits(mem_bytes=512 * MiB))
    hog = f"exec {sys.executable} -c \"x = b'a' * (200 << 20); import time; time.sleep(60)\""
    process = await start(launch.cgroup_procs, hog)
    stats = await stats_until(cgroups, "c1", lambda s: s.get("mem_rss_bytes", 0) >= 200 * MiB, 10)
    assert stats["mem_rss_bytes"] >= 200 * MiB and stats["mem_anon_bytes"] >= 200 * MiB
    assert stats["mem_total_bytes"] >= stats["mem_rss_bytes"]
    assert stats["mem_limit_bytes"] == stats["mem_soft_limit_bytes"] == 512 * MiB
    await finish(isolators, cgroups, "c1", process)


async def test_one_pass_statistics_equal_the_isolators_readings(cgroups_root: str) -> None:
    """The native driver reads ContainerCgroups.statistics once instead of merging every cgroup
    isolator's usage(): both must report the same numbers for an idle container."""
    isolators = build_isolators(CGROUPS, cgroups_root=cgroups_root, enable_cfs=True)
    cgroups = container_cgroups(cgroups_root=cgroups_root)
    launch = await prepare_isolators(isolators, "c1", Limits(cpus=0.5, mem_bytes=64 * MiB))
    process = await start(launch.cgroup_procs, "exec sleep 60")
    merged: Statistics = {}
    for isolator in isolators:
        merged.update(await isolator.usage("c1"))
    one_pass = cgroups.statistics("c1")
    # The same keys; counters may tick between the two reads, the limits and counts may not.
    assert set(one_pass) == set(merged)
    stable = ("cpus_limit", "mem_limit_bytes", "mem_soft_limit_bytes", "processes", "threads")
    assert {k: one_pass[k] for k in stable} == {k: merged[k] for k in stable}
    assert one_pass["processes"] == 1 and one_pass["cpus_limit"] == 0.5
    assert one_pass["mem_limit_bytes"] == 64 * MiB
    await finish(isolators, cgroups, "c1", process)
