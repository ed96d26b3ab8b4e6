"""Native runtime: Launch latency and full lifecycle of /bin/true, next to the direct tools.

Ours: Launch (until RUNNING) and Launch-until-Wait-returns over a warm gRPC channel.
Direct tools in the same run: `unshare --fork --pid --mount --uts --ipc /bin/true` (the same
namespaces, no cgroups, no status record) and `lxc-execute` of the same command on the host's
root filesystem. The three are interleaved, one of each in turn, so that all see the same
machine state (other work on a shared machine moves every sample, not one side's).
Targets (2-core machine): lifecycle p50 no slower than lxc-execute; service RSS
with 500 idle containers under 150 MiB; at most 3 MiB per container for its supervision.

Usage: python benchmarks/bench_native.py [--runs 200] [--idle 500]   (root; prints JSON)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.api.containerizer.v1 import containerizer_pb2_grpc as pb_grpc
from benchmarks.common import Service, private_service, ratio, summary_ms

TRUE = pb.CommandInfo(argv=["/bin/true"])
LXC_CONFIG = "lxc.uts.name = bench\nlxc.net.0.type = empty\nlxc.rootfs.path = dir:/\n"


UNSHARE = ["unshare", "--fork", "--pid", "--mount", "--uts", "--ipc", "/bin/true"]


@dataclass
class Samples:
    """Seconds per run: ours until RUNNING and until Wait returned, and the direct tools'."""

    launches: list[float] = field(default_factory=list)
    lifecycles: list[float] = field(default_factory=list)
    unshare: list[float] = field(default_factory=list)
    lxc_execute: list[float] = field(default_factory=list)


def lifecycle_once(stub: pb_grpc.ContainerizerStub, cid: str, samples: Samples) -> None:
    start = time.perf_counter()
    stub.Launch(pb.LaunchRequest(container_id=cid, command=TRUE), timeout=30)
    launched = time.perf_counter()
    stub.Wait(pb.WaitRequest(container_id=cid), timeout=30)
    done = time.perf_counter()
    stub.Destroy(pb.DestroyRequest(container_id=cid), timeout=30)  # acknowledge
    samples.launches.append(launched - start)
    samples.lifecycles.append(done - start)


def lifecycle(service: Service, runs: int) -> tuple[list[float], list[float]]:
    stub, samples = service.stub(), Samples()
    for n in range(runs):
        lifecycle_once(stub, f"bench-true-{n}", samples)
    return samples.launches, samples.lifecycles


def direct_once(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def interleaved(service: Service, runs: int, lxc_argv: list[str] | None) -> Samples:
    """One lifecycle of ours, one `unshare` and one `lxc-execute` in turn, `runs` times."""
    stub, samples = service.stub(), Samples()
    for n in range(runs):
        lifecycle_once(stub, f"bench-true-{n}", samples)
        samples.unshare.append(direct_once(UNSHARE))
        if lxc_argv is not None:
            samples.lxc_execute.append(direct_once(lxc_argv))
    return samples


@contextlib.contextmanager
def lxc_execute_argv() -> Iterator[list[str] | None]:
    """The lxc-execute command on the host's root (None without LXC), its config in a
    temporary directory for as long as the context lasts."""
    if shutil.which("lxc-execute") is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="bench-lxc-") as tmp:
        config = Path(tmp) / "bench.conf"
        config.write_text(LXC_CONFIG)
        yield ["lxc-execute", "-n", "bench", "-P", tmp, "-f", str(config), "--", "/bin/true"]


def idle_memory(service: Service, count: int) -> dict[str, float]:
    """Launch `count` idle containers; measure the service and the supervisors' memory."""
    stub = service.stub()

    def start(n: int) -> None:
        stub.Launch(
            pb.LaunchRequest(
                container_id=f"idle-{n}", command=pb.CommandInfo(argv=["sleep", "3600"])
            ),
            timeout=60,
        )

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(start, range(count)))
    launch_seconds = time.perf_counter() - started
    time.sleep(1)
    supervisors = [
        p for p in psutil.process_iter(["name"]) if p.info["name"] == "containerizer-supervisor"
    ]
    # Each container has two supervising processes: the supervisor and the container's init.
    rss = sum(p.memory_info().rss for p in supervisors)
    pss = sum(p.memory_full_info().pss for p in supervisors)
    service_process = psutil.Process(service.process.pid)
    service_rss = service_process.memory_info().rss
    service_threads = service_process.num_threads()
    usage_all = containers_and_usage(service, [f"idle-{n}" for n in range(min(count, 200))])
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(
            pool.map(
                lambda n: stub.Destroy(pb.DestroyRequest(container_id=f"idle-{n}"), timeout=60),
                range(count),
            )
        )
    destroy_seconds = time.perf_counter() - started
    mib = 1024 * 1024
    return {
        "containers": count,
        "launch_all_s": round(launch_seconds, 2),
        "destroy_all_s": round(destroy_seconds, 2),
        "service_rss_mib": round(service_rss / mib, 1),
        "service_threads": service_threads,
        "supervision_rss_per_container_mib": round(rss / count / mib, 2),
        "supervision_pss_per_container_mib": round(pss / count / mib, 2),
        "containers_and_usage_200": usage_all,
    }


def containers_and_usage(service: Service, ids: list[str]) -> dict[str, float]:
    """Issue 3's target: Containers plus one Usage per container, for 200 running containers,
    through the API (under 200 ms here), next to `cat` of the same cgroup files."""
    stub = service.stub()
    sequential, concurrent = [], []
    for _ in range(5):
        started = time.perf_counter()
        stub.Containers(pb.ContainersRequest(), timeout=30)
        for cid in ids:
            stub.Usage(pb.UsageRequest(container_id=cid), timeout=30)
        sequential.append(time.perf_counter() - started)
        started = time.perf_counter()
        stub.Containers(pb.ContainersRequest(), timeout=30)
        calls = [stub.Usage.future(pb.UsageRequest(container_id=cid), timeout=30) for cid in ids]
        for call in calls:
            call.result()
        concurrent.append(time.perf_counter() - started)
    files = [
        str(path)
        for cid in ids
        for path in Path("/sys/fs/cgroup").glob(f"*/{service.cgroups_root}/{cid}/*")
        if path.name.endswith((".stat", ".usage_in_bytes", ".limit_in_bytes", ".procs", ".max"))
    ]
    cat = []
    for _ in range(5):
        started = time.perf_counter()
        subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=False)
        cat.append(time.perf_counter() - started)
    one_by_one, in_flight, theirs = (sorted(x)[2] for x in (sequential, concurrent, cat))
    return {
        "containers": len(ids),
        "api_one_call_at_a_time_ms": round(one_by_one * 1000, 1),
        "api_all_calls_in_flight_ms": round(in_flight * 1000, 1),
        "cat_same_files_ms": round(theirs * 1000, 1),
        "ratio_in_flight_vs_cat": round(in_flight / theirs, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--idle", type=int, default=500)
    args = parser.parse_args()
    with private_service() as service, lxc_execute_argv() as lxc_argv:
        interleaved(service, 10, lxc_argv)  # warm-up: page cache, channel, sqlite, lxc
        samples = interleaved(service, args.runs, lxc_argv)
        memory = idle_memory(service, args.idle) if args.idle else {}
    ours, unshare = summary_ms(samples.lifecycles), summary_ms(samples.unshare)
    lxc = summary_ms(samples.lxc_execute) if samples.lxc_execute else None
    result = {
        "benchmark": "native",
        "launch_until_running": summary_ms(samples.launches),
        "lifecycle_true": ours,
        "unshare_true": unshare,
        "lxc_execute_true": lxc or "lxc-execute not installed",
        "ratio_lifecycle_vs_unshare_p50": ratio(ours, unshare),
        "ratio_lifecycle_vs_lxc_execute_p50": ratio(ours, lxc) if lxc else None,
        "idle_memory": memory,
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
