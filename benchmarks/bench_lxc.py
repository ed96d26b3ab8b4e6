"""Benchmark: the full lifecycle of `/bin/true` in an LXC container through our service (Launch,
Wait, Destroy over gRPC) against `lxc-execute` of the same command on the same busybox rootfs,
in the same run, one of each in turn. Needs root, LXC and the static supervisor; prints JSON;
removes everything it created (service, containers, cgroups, temporary directories) even when
interrupted.

Beside wall-clock time it prints CPU time per lifecycle, which a loaded machine moves far less:
ours is the service process (its threads, and lxc-start with everything below it, reaped by
the service) plus this client's gRPC calls; lxc-execute's is its whole process tree plus this
process's own work for it (config file, directory removal).

    .venv/bin/python benchmarks/bench_lxc.py [--runs 100] [--warmup 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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


def own_and_children_cpu_ms() -> float:
    """CPU time of this process and of its children it has reaped."""
    own, children = (
        resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    return (own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime) * 1000


def process_cpu_ms(pid: int) -> tuple[float, float]:
    """CPU time of process `pid` (all its threads), and of the children it has reaped:
    utime + stime, cutime + cstime of /proc/PID/stat. Counted in clock ticks (10 ms): one
    run's sample is coarse, the mean over the runs is not."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    own, children = (int(a) + int(b) for a, b in (fields[11:13], fields[13:15]))
    tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
    return own * tick_ms, children * tick_ms


def timed_in_turn(
    functions: tuple[Callable[[int], None], ...],
    cpu_clocks: tuple[Callable[[], float], ...],
    runs: int,
    warmup: int,
) -> tuple[list[list[float]], list[list[float]]]:
    """Milliseconds per run of each function, wall-clock and on its CPU clock, the functions
    called one after the other in each run, so that all see the same machine state (a shared
    machine's other work moves every side's samples, not one side's)."""
    wall: list[list[float]] = [[] for _ in functions]
    cpu: list[list[float]] = [[] for _ in functions]
    for index in range(warmup + runs):
        for function, clock, walls, cpus in zip(functions, cpu_clocks, wall, cpu, strict=True):
            start, start_cpu = time.perf_counter(), clock()
            function(index)
            if index >= warmup:
                walls.append((time.perf_counter() - start) * 1000)
                cpus.append(clock() - start_cpu)
    return wall, cpu


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
    cpu_split: dict[str, float] = {}
    service = ServiceProcess(workdir, extra_config='default_runtime = "lxc"\n[runtimes.lxc]\n')
    try:
        service.start()
        lifecycle = through_service(service)
        lifecycle(warmup + runs)  # the first launch builds the busybox base both sides run on
        base = next((service.state_dir / "lxc" / "bases").glob("busybox-*"))
        direct = direct_lxc_execute(workdir, base, service.cgroups_root)
        assert service.process is not None
        service_pid = service.process.pid

        def service_and_client_cpu_ms() -> float:  # the service's tree, this client's calls
            return sum(process_cpu_ms(service_pid)) + time.process_time() * 1000

        clocks = (service_and_client_cpu_ms, own_and_children_cpu_ms)
        before = (*process_cpu_ms(service_pid), time.process_time() * 1000)
        (ours, theirs), (ours_cpu_ms, theirs_cpu_ms) = timed_in_turn(
            (lifecycle, direct), clocks, runs, warmup
        )
        after = (*process_cpu_ms(service_pid), time.process_time() * 1000)
        # Whole-run means (the client's includes its lxc-execute side: config, rmtree).
        names = ("service_mean_ms", "lxc_start_tree_mean_ms", "client_mean_ms")
        for name, first, last in zip(names, before, after, strict=True):
            cpu_split[name] = round((last - first) / (runs + warmup), 2)
    finally:
        service.destroy_all()
        service.stop()
        service.remove_cgroup_roots()
        shutil.rmtree(workdir, ignore_errors=True)
    ours_summary, direct_summary = summary(ours), summary(theirs)
    ours_cpu, direct_cpu = summary(ours_cpu_ms), summary(theirs_cpu_ms)
    return {
        "benchmark": "lxc lifecycle of /bin/true",
        "runs": runs,
        "service": ours_summary,
        "lxc_execute": direct_summary,
        "ratio_p50": round(ours_summary["p50_ms"] / direct_summary["p50_ms"], 2),
        "ratio_p99": round(ours_summary["p99_ms"] / direct_summary["p99_ms"], 2),
        "service_cpu": ours_cpu,
        "lxc_execute_cpu": direct_cpu,
        "cpu_ratio_mean": round(ours_cpu["mean_ms"] / direct_cpu["mean_ms"], 2),
        "service_cpu_split": cpu_split,
        "baseline_ratio": 1.20,  # the same lifecycle when this target was set
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
