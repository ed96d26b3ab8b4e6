"""Benchmark: one node at scale on the native runtime, through the API of a private service.

- 200 containers, Containers plus one Usage per container, one call at a time, next to one `cat`
  of the same cgroup files in the same run (target: <= 1.5 x cat; baseline 246 ms);
- 1,000 idle containers: the service's RSS (target <= 150 MiB), Containers plus one Usage per
  container with every call in flight (target <= 600 ms), and an empty RPC's cost beside it;
- a storm of 100 concurrent launches on top of them: p99 launch latency (target <= 1 s), none
  failing.

    .venv/bin/python benchmarks/bench_scale.py [--idle 1000] [--storm 100]   (root; prints JSON)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a plain checkout

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.api.containerizer.v1 import containerizer_pb2_grpc as pb_grpc
from benchmarks.common import Service, private_service, summary_ms

ROUNDS = 5
# The files the accounting reader opens for a container, as `cat` is given them.
ACCOUNTED_SUFFIXES = (".stat", ".usage_in_bytes", ".limit_in_bytes", ".procs", ".max", ".shares")


def launch_request(container_id: str) -> pb.LaunchRequest:
    return pb.LaunchRequest(
        container_id=container_id, command=pb.CommandInfo(argv=["sleep", "3600"])
    )


def launch_all(stub: pb_grpc.ContainerizerStub, ids: list[str], workers: int) -> list[float]:
    """Launch every id with `workers` calls in flight; each launch's seconds."""

    def launch(container_id: str) -> float:
        started = time.perf_counter()
        stub.Launch(launch_request(container_id), timeout=120)
        return time.perf_counter() - started

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(launch, ids))


def destroy_all(stub: pb_grpc.ContainerizerStub, ids: list[str]) -> None:
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda cid: stub.Destroy(pb.DestroyRequest(container_id=cid)), ids))


def median_seconds(rounds: list[float]) -> float:
    return sorted(rounds)[len(rounds) // 2]


def one_at_a_time(stub: pb_grpc.ContainerizerStub, ids: list[str]) -> float:
    rounds = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        stub.Containers(pb.ContainersRequest(), timeout=30)
        for cid in ids:
            stub.Usage(pb.UsageRequest(container_id=cid), timeout=30)
        rounds.append(time.perf_counter() - started)
    return median_seconds(rounds)


def all_in_flight(stub: pb_grpc.ContainerizerStub, ids: list[str]) -> float:
    rounds = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        stub.Containers(pb.ContainersRequest(), timeout=30)
        calls = [stub.Usage.future(pb.UsageRequest(container_id=cid), timeout=60) for cid in ids]
        for call in calls:
            call.result()
        rounds.append(time.perf_counter() - started)
    return median_seconds(rounds)


def empty_rpc_seconds(stub: pb_grpc.ContainerizerStub) -> float:
    """The cost of a call that does nothing on the service's side: a Status of an unknown id
    is answered by the servicer's first lookup (NOT_FOUND)."""
    samples = []
    for _ in range(200):
        started = time.perf_counter()
        with contextlib.suppress(grpc.RpcError):
            stub.Status(pb.StatusRequest(container_id="no-such-container"), timeout=10)
        samples.append(time.perf_counter() - started)
    return sorted(samples)[len(samples) // 2]


def cat_seconds(service: Service, ids: list[str]) -> float:
    wanted = set(ids)
    paths = [
        str(path)
        for path in Path("/sys/fs/cgroup").glob(f"*/{service.cgroups_root}/*/*")
        if path.parent.name in wanted and path.name.endswith(ACCOUNTED_SUFFIXES)
    ]
    rounds = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        subprocess.run(["cat", *paths], stdout=subprocess.DEVNULL, check=False)
        rounds.append(time.perf_counter() - started)
    return median_seconds(rounds)


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def run(idle: int, storm: int) -> dict[str, object]:
    with private_service() as service:
        stub = service.stub()
        ids = [f"idle-{n}" for n in range(idle)]
        started = time.perf_counter()
        launch_all(stub, ids, workers=16)
        launch_all_s = time.perf_counter() - started
        time.sleep(1)
        rss_mib = psutil.Process(service.process.pid).memory_info().rss / (1 << 20)
        first_200 = ids[:200]
        sequential_200, cat_200 = one_at_a_time(stub, first_200), cat_seconds(service, first_200)
        in_flight_all, cat_all = all_in_flight(stub, ids), cat_seconds(service, ids)
        empty = empty_rpc_seconds(stub)
        storm_ids = [f"storm-{n}" for n in range(storm)]
        failures = 0
        try:
            storm_latencies = launch_all(stub, storm_ids, workers=storm)
        except Exception as exc:  # a failed launch is the result, not the benchmark's end
            failures, storm_latencies = 1, []
            print(f"storm: a launch failed: {exc}", file=sys.stderr)
        destroy_all(stub, storm_ids + ids)
    return {
        "benchmark": "scale",
        "usage_200_one_call_at_a_time": {
            "baseline_ms": 246,
            "ours_ms": ms(sequential_200),
            "cat_same_files_ms": ms(cat_200),
            "empty_rpc_x_201_ms": ms(empty * 201),
            "ratio_vs_cat": round(sequential_200 / cat_200, 2),
            "target_ratio": 1.5,
        },
        "idle": {
            "containers": idle,
            "launch_all_s": round(launch_all_s, 1),
            "service_rss_mib": round(rss_mib, 1),
            "target_rss_mib": 150,
            "containers_and_usage_in_flight_ms": ms(in_flight_all),
            "target_in_flight_ms": 600,
            "cat_same_files_ms": ms(cat_all),
            "empty_rpc_ms": round(empty * 1000, 3),
        },
        "storm": {
            "launches": storm,
            "failed": failures,
            **(summary_ms(storm_latencies) if storm_latencies else {}),
            "target_p99_ms": 1000,
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--storm", type=int, default=100)
    args = parser.parse_args()
    print(json.dumps(run(args.idle, args.storm), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
