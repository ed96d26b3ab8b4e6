"""Benchmark: statistics of 200 containers through the accounting reader, against one `cat` of
the same cgroup files in the same run. Needs root and cgroups; prints JSON; removes everything
it created (processes and cgroups) even when interrupted.

    .venv/bin/python benchmarks/bench_usage.py [--containers 200] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a plain checkout

from isolators.base import Limits
from isolators.cgroups import files
from isolators.cgroups.accounting import read_statistics
from isolators.registry import (
    build_isolators,
    container_cgroups,
    prepare_isolators,
)

READER_FILES = (  # what read_statistics opens on v1 (and v2), for the `cat` comparison
    "cpuacct.stat", "cpu.stat", "cpu.cfs_quota_us", "cpu.cfs_period_us", "cpu.shares",
    "cpu.max", "cpu.weight", "memory.usage_in_bytes", "memory.stat", "memory.limit_in_bytes",
    "memory.soft_limit_in_bytes", "memory.current", "memory.max", "memory.low",
    "memory.swap.current", "cgroup.procs", "tasks", "cgroup.threads",
)  # fmt: skip


def timed(function: Callable[[], object], repeat: int) -> list[float]:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


async def run(count: int, repeat: int) -> dict[str, object]:
    root = f"ctz-bench-{uuid.uuid4().hex[:10]}"
    isolators = build_isolators(["cgroups/cpu", "cgroups/mem", "cgroups/pids"], cgroups_root=root)
    cgroups = container_cgroups(cgroups_root=root)
    ids = [f"c{i}" for i in range(count)]
    sleepers: list[subprocess.Popen[bytes]] = []
    try:
        for cid in ids:
            launch = await prepare_isolators(isolators, cid, Limits(cpus=0.1, mem_bytes=64 << 20))
            join = " ".join(f"echo $$ > {path};" for path in launch.cgroup_procs)
            sleepers.append(subprocess.Popen(["sh", "-c", f"{join} exec sleep 600"]))
        for cid, sleeper in zip(ids, sleepers, strict=True):
            while sleeper.pid not in files.read_pids(cgroups.dirs(cid)[-1]):
                time.sleep(0.001)
        dirs = {cid: cgroups.dirs(cid) for cid in ids}
        paths = [str(d / n) for cid in ids for d in dirs[cid] for n in READER_FILES]
        existing = [p for p in paths if Path(p).exists()]
        reader_ms = timed(lambda: [read_statistics(dirs[cid]) for cid in ids], repeat)
        by_id_ms = timed(lambda: [cgroups.statistics(cid) for cid in ids], repeat)
        cat_ms = timed(lambda: subprocess.run(["cat", *existing], capture_output=True), repeat)
        sample = cgroups.statistics(ids[0])
    finally:
        for cid in ids:
            await cgroups.destroy(cid)
        for sleeper in sleepers:
            sleeper.wait()
        for cid in ids:
            for isolator in isolators:
                await isolator.cleanup(cid)
        for mount in set(cgroups.hierarchies.mounts.values()):
            await files.remove(mount / root)
    reader, cat = statistics.median(reader_ms), statistics.median(cat_ms)
    return {
        "containers": count,
        "cgroup_version": cgroups.hierarchies.version,
        "files_per_container": len(existing) / count,
        "read_statistics_ms": {"median": reader, "min": min(reader_ms)},
        "statistics_by_id_ms": {"median": statistics.median(by_id_ms), "min": min(by_id_ms)},
        "cat_ms": {"median": cat, "min": min(cat_ms)},
        "ratio_reader_to_cat": reader / cat,
        "target_ms": 200,
        "within_target": statistics.median(by_id_ms) < 200,
        "sample_keys": sorted(sample),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--containers", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.containers, args.repeat)), indent=2))


if __name__ == "__main__":
    main()
