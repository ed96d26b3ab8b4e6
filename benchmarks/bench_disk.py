"""Benchmark: one disk/du pass (isolators/disk/du.py: the containerizer-du walker run by the
isolator under its time budget, on an event loop) over a 100,000-file tree against `du -s` run
directly on the same tree in the same run, both with a warm cache, interleaved (each first every
other time). Prints JSON with the p50s of the wall time and `ratio` (ours / du's; the target is
<= 1.0), and, as `cpu`, the p50s of the CPU time (user + system) each pass's process spent:
on a host other work keeps busy the wall time waits for the CPU, the CPU time does not.
Removes its tree.

    .venv/bin/python benchmarks/bench_disk.py [--files 100000] [--repeat 15]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a plain checkout

from benchmarks.common import p50_p90_ms, ratio
from isolators.disk.du import counting_command, measure
from isolators.disk.isolator import PASS_BUDGET

FILES_PER_DIRECTORY = 1000


def make_tree(root: Path, files: int) -> None:
    """`files` one-byte files, FILES_PER_DIRECTORY to a directory (a sandbox of small files)."""
    for index in range(files):
        directory = root / f"d{index // FILES_PER_DIRECTORY}"
        if index % FILES_PER_DIRECTORY == 0:
            directory.mkdir()
        (directory / f"f{index}").write_bytes(b"x")


def run(files: int, repeat: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="ctz-bench-disk-", dir="/var/tmp") as tmp:
        root = Path(tmp)
        make_tree(root, files)
        du = ["du", "-s", "-x", str(root)]
        # One event loop, as in the service: a pass is a coroutine on it.
        loop = asyncio.new_event_loop()
        loop.run_until_complete(measure([str(root)]))  # warm the cache for both
        subprocess.run(du, check=True, stdout=subprocess.DEVNULL)
        ours: list[float] = []
        theirs: list[float] = []
        ours_cpu: list[float] = []
        theirs_cpu: list[float] = []
        used: int | None = 0

        def one_pass() -> None:
            nonlocal used
            cpu_before, started = children_cpu_seconds(), time.perf_counter()
            result = loop.run_until_complete(measure([str(root)], budget=PASS_BUDGET))
            ours.append(time.perf_counter() - started)
            ours_cpu.append(children_cpu_seconds() - cpu_before)
            used = result.used_bytes

        def one_du() -> None:
            cpu_before, started = children_cpu_seconds(), time.perf_counter()
            subprocess.run(du, check=True, stdout=subprocess.DEVNULL)
            theirs.append(time.perf_counter() - started)
            theirs_cpu.append(children_cpu_seconds() - cpu_before)

        for index in range(repeat):  # each first every other time: no bias by position
            for step in (one_pass, one_du) if index % 2 else (one_du, one_pass):
                step()
        loop.close()
        du_kib = int(
            subprocess.run(du, check=True, capture_output=True, text=True).stdout.split()[0]
        )
    disk_du, du_s = p50_p90_ms(ours), p50_p90_ms(theirs)
    disk_du_cpu, du_s_cpu = p50_p90_ms(ours_cpu), p50_p90_ms(theirs_cpu)
    return {
        "files": files,
        "compared": f"disk/du running {Path(counting_command()[0]).name} vs du -s -x",
        "used_bytes": used,
        "du_bytes": du_kib * 1024,
        "disk_du_pass": disk_du,
        "du_s": du_s,
        "ratio": ratio(disk_du, du_s),
        "cpu": {
            "disk_du_pass": disk_du_cpu,
            "du_s": du_s_cpu,
            "ratio": ratio(disk_du_cpu, du_s_cpu),
        },
    }


def children_cpu_seconds() -> float:
    """User + system time of the children reaped so far (a pass's, once it has ended)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=15)
    arguments = parser.parse_args()
    print(json.dumps(run(arguments.files, arguments.repeat), indent=2))


if __name__ == "__main__":
    main()
