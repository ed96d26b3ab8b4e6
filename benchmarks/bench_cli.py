"""`containerizer ps` as a user pays it, process start included, next to `python -c "import grpc"`.

Every CLI command talks gRPC, so importing grpc is its floor; what `ps` may add on top is the
protobuf runtime, its own modules and one RPC. Of grpc and protobuf it loads only what it uses
(neither grpc's asyncio API nor protobuf's pure-Python messages: adapter/clients/cli/client.py),
which the floor loads in full, so the ratio may come out below 1. The two are timed alternately
in the same run, as whole processes (wall clock, and the CPU time the kernel charged them,
steadier on a busy machine). Target: `ps` p50 at most 1.15x the floor's. Before the CLI imported
only what a command needs it loaded every subcommand's modules (compare, images, the runtime
registry) and tore grpc down at exit: 206 ms p50 next to 130 ms for `import grpc` on a 2-core
machine (1.58x); before it left those two modules out and connected while loading the stubs,
84 ms next to 73 ms (1.16x).

Usage: python benchmarks/bench_cli.py [--iterations N]
Needs a running service: $CONTAINERIZER_ENDPOINT, or a private one is started here (root).
Prints JSON. Child processes run with bytecode caching on, as an installed package does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import BIN, private_service, ratio, summary_ms

PS = [str(BIN / "containerizer"), "ps"]
IMPORT_GRPC = [sys.executable, "-c", "import grpc"]
TARGET_RATIO = 1.15
BASELINE = {"ps_p50_ms": 206.0, "import_grpc_p50_ms": 130.0, "ratio": 1.58}


@contextlib.contextmanager
def running_service() -> Iterator[str]:
    """The endpoint named by the environment, or a private service's."""
    existing = os.environ.get("CONTAINERIZER_ENDPOINT")
    if existing:
        yield existing
        return
    with private_service() as service:
        yield service.endpoint


def child_environment(endpoint: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["CONTAINERIZER_ENDPOINT"] = endpoint
    return env


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall, CPU) seconds of one process, start to exit; a failure stops the benchmark."""
    cpu_before = children_cpu_seconds()
    started = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, env=env, timeout=60)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"bench_cli: {' '.join(argv)} failed: {result.stderr.decode().strip()}")
    return wall, children_cpu_seconds() - cpu_before


def measure(env: dict[str, str], n: int) -> dict[str, dict[str, list[float]]]:
    """Both commands, alternately, so both see the same machine."""
    samples: dict[str, dict[str, list[float]]] = {
        name: {"wall": [], "cpu": []} for name in ("ps", "import_grpc")
    }
    for _ in range(n):
        for name, argv in (("import_grpc", IMPORT_GRPC), ("ps", PS)):
            wall, cpu = timed(argv, env)
            samples[name]["wall"].append(wall)
            samples[name]["cpu"].append(cpu)
    return samples


def report(samples: dict[str, dict[str, list[float]]]) -> dict[str, object]:
    wall = {name: summary_ms(by_kind["wall"]) for name, by_kind in samples.items()}
    cpu = {name: summary_ms(by_kind["cpu"]) for name, by_kind in samples.items()}
    wall_ratio = ratio(wall["ps"], wall["import_grpc"])
    return {
        "wall": wall,
        "cpu": cpu,
        "ps_process": {
            "ps_p50_ms": wall["ps"]["p50_ms"],
            "import_grpc_p50_ms": wall["import_grpc"]["p50_ms"],
            "ratio_ps_over_import_grpc_p50": wall_ratio,
            "ratio_ps_over_import_grpc_cpu_p50": ratio(cpu["ps"], cpu["import_grpc"]),
            "baseline": BASELINE,
            "target_ratio": TARGET_RATIO,
            "met": wall_ratio <= TARGET_RATIO,
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=40)
    n = parser.parse_args().iterations
    with running_service() as endpoint:
        env = child_environment(endpoint)
        timed(PS, env)  # untimed: writes the bytecode caches, as an install would have
        result = {"endpoint": endpoint, "iterations": n, "cpus": os.cpu_count()}
        print(json.dumps({**result, **report(measure(env, n))}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
