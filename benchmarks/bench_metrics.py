"""Benchmark: one Prometheus scrape of a service running N idle containers (default 500),
against reading the same containers' cgroup files once (the accounting reader, in this
process) and `cat` of them, in the same run. Target: scrape <= 1.5x the reading. Needs root;
prints JSON; the private service removes its containers and cgroups.

    .venv/bin/python benchmarks/bench_metrics.py [--containers 500] [--repeat 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a plain checkout

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from benchmarks.common import private_service
from isolators.cgroups.accounting import read_statistics
from tests.integration.test_security_edge import free_port

CGROUP_MOUNT = Path("/sys/fs/cgroup")
TARGET_RATIO = 1.5


def median_ms(function: Callable[[], object], repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        samples.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(samples), 2)


def scrape(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as reply:
        body: bytes = reply.read()
        return body


def launch_idle(stub: object, count: int) -> list[str]:
    ids = [f"metrics-{n}" for n in range(count)]

    def start(cid: str) -> None:
        request = pb.LaunchRequest(container_id=cid, command=pb.CommandInfo(argv=["sleep", "3600"]))
        stub.Launch(request, timeout=120)  # type: ignore[attr-defined]

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(start, ids))
    return ids


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--containers", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    with private_service(f'metrics_listen = "127.0.0.1:{port}"') as service:
        ids = launch_idle(service.stub(), args.containers)
        time.sleep(1)
        dirs = {cid: sorted(CGROUP_MOUNT.glob(f"*/{service.cgroups_root}/{cid}")) for cid in ids}
        files = [str(p) for paths in dirs.values() for d in paths for p in d.iterdir()]
        files = [f for f in files if f.endswith((".stat", "_bytes", ".procs", "tasks", "_us"))]
        scrape(url)  # warm-up: the channel, the page cache, the code paths
        reading = median_ms(lambda: [read_statistics(dirs[cid]) for cid in ids], args.repeat)
        scraping = median_ms(lambda: scrape(url), args.repeat)
        cat = median_ms(
            lambda: subprocess.run(["cat", *files], capture_output=True, check=False), args.repeat
        )
        size = len(scrape(url))
    ratio = round(scraping / reading, 2)
    result = {
        "benchmark": "metrics",
        "containers": args.containers,
        "scrape_ms": scraping,
        "read_cgroup_files_once_ms": reading,
        "cat_cgroup_files_ms": cat,
        "scrape_bytes": size,
        "ratio_scrape_vs_reading": ratio,
        "target_ratio": TARGET_RATIO,
        "met": ratio <= TARGET_RATIO,
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
