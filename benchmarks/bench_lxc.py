"""Benchmark: the full lifecycle of `/bin/true` in an LXC container through our service (Launch,
Wait, Destroy over gRPC) against `lxc-execute` of the same command on the same busybox rootfs,
in the same run, one of each in turn. Needs root, LXC and the static supervisor; prints JSON;
removes everything it created (service, containers, cgroups, temporary directories) even when
interrupted.

    .venv/bin/python benchmarks/bench_lxc.py [--runs 100] [--warmup 5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a plain checkout

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from tests.conftest import ServiceProcess


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def summary(samples: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(percentile(samples, 0.5), 2),
        "p99_ms": round(percentile(samples, 0.99), 2),
        "mean_ms": round(statistics.fmean(samples), 2),
    }


def timed_in_turn(
    functions: tuple[Callable[[int], None], ...], runs: int, warmup: int
) -> list[list[float]]:
    """Milliseconds per run of each function, the functions called one after the other in
    each run, so that all see the same machine state (a shared machine's other work moves
    every side's samples, not one side's)."""
    samples: list[list[float]] = [[] for _ in functions]
    for index in range(warmup + runs):
        for function, times in zip(functions, samples, strict=True):
            start = time.perf_counter()
            function(index)
            if index >= warmup:
                times.append((time.perf_counter() - start) * 1000)
    return samples


def through_service(service: ServiceProcess) -> Callable[[int], None]:
    stub = service.stub()

    def lifecycle(index: int) -> None:
        cid = f"bench-{index}"
        stub.Launch(
            pb.LaunchRequest(container_id=cid, command=pb.CommandInfo(argv=["/bin/true"])),
            timeout=30,
        )
        reply = stub.Wait(pb.WaitRequest(container_id=cid), timeout=30)
        assert reply.termination.exit_code == 0, reply
        stub.Destroy(pb.DestroyRequest(container_id=cid), timeout=30)  # acknowledge: gone

    return lifecycle


def direct_lxc_execute(workdir: Path, base: Path, cgroups_root: str) -> Callable[[int], None]:
    """lxc-execute of the same command on the same base, with the same isolation settings,
    in a fresh writable overlay each run (as our launch gets)."""
    lxcpath = workdir / "direct"

    def lifecycle(index: int) -> None:
        name = f"direct-{index}"
        directory = lxcpath / name
        (directory / "delta0").mkdir(parents=True)
        (directory / "config").write_text(
            f"lxc.uts.name = {name}\nlxc.rootfs.path = overlay:{base}:{directory / 'delta0'}\n"
            "lxc.net.0.type = empty\nlxc.apparmor.profile = unconfined\nlxc.autodev = 1\n"
            "lxc.mount.auto = proc:mixed sys:ro\nlxc.console.path = none\n"
            f"lxc.cgroup.dir.container = {cgroups_root}/{name}\n"
            f"lxc.cgroup.dir.monitor = {cgroups_root}.lxc-monitor.{name}\n"
        )
        command = ["lxc-execute", "-P", str(lxcpath), "-n", name, "--", "/bin/true"]
        subprocess.run(command, check=True, timeout=30)
        shutil.rmtree(directory)

    return lifecycle


def run(runs: int, warmup: int) -> dict[str, object]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-lxc-"))
    service = ServiceProcess(workdir, extra_config='default_runtime = "lxc"\n[runtimes.lxc]\n')
    try:
        service.start()
        lifecycle = through_service(service)
        lifecycle(warmup + runs)  # the first launch builds the busybox base both sides run on
        base = next((service.state_dir / "lxc" / "bases").glob("busybox-*"))
        direct = direct_lxc_execute(workdir, base, service.cgroups_root)
        ours, theirs = timed_in_turn((lifecycle, direct), runs, warmup)
    finally:
        service.destroy_all()
        service.stop()
        service.remove_cgroup_roots()
        shutil.rmtree(workdir, ignore_errors=True)
    ours_summary, direct_summary = summary(ours), summary(theirs)
    return {
        "benchmark": "lxc lifecycle of /bin/true",
        "runs": runs,
        "service": ours_summary,
        "lxc_execute": direct_summary,
        "ratio_p50": round(ours_summary["p50_ms"] / direct_summary["p50_ms"], 2),
        "ratio_p99": round(ours_summary["p99_ms"] / direct_summary["p99_ms"], 2),
        "target_ratio": 1.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps(run(args.runs, args.warmup), indent=2))


if __name__ == "__main__":
    main()
