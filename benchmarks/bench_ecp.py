"""Time per External Containerizer Protocol call, as a Mesos agent pays it, next to the CLI.

Each ECP call is a fresh `containerizer-mesos COMMAND` process with a framed message on stdin,
exactly what the agent runs; each CLI call is a fresh `containerizer ...` process doing the same
operation over the same gRPC API; the in-process gRPC call shows what is left without a process
start. Operations: launch of /bin/true, wait for it, usage of a running sleeper.

The target: ECP `usage` (the agent polls it for every container), process start included, at
most 1.25x a bare `python -c pass` of the same interpreter, the two timed alternately in the
same run. Before the program became a pipe to the service's ECP socket it imported grpc and the
package: 110 ms p50 next to 41 ms for `python -c pass` on a 2-core machine (2.68x).

Floors are measured in the same run: `python -c pass` and `python -c "import grpc"`.

Usage: python benchmarks/bench_ecp.py [--iterations N]
Needs a running service: $CONTAINERIZER_ENDPOINT, or one is started here with
`containerizer serve --config <temp config>` (root, for the native runtime's cgroups).
Prints JSON. Child processes run with bytecode caching on, as an installed package does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.api.containerizer.v1 import containerizer_pb2_grpc as pb_grpc
from adapter.api.mesos import containerizer_pb2 as ecp
from adapter.api.mesos import mesos_pb2 as mesos

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import private_service

BIN = Path(sys.executable).parent
ECP = [str(BIN / "containerizer-mesos")]
CLI = [str(BIN / "containerizer")]
PYTHON_START = [sys.executable, "-c", "pass"]
USAGE_TARGET_RATIO = 1.25
# The same measurement before the program stopped importing grpc and the package.
BASELINE = {"usage_p50_ms": 110.0, "python_start_p50_ms": 41.0, "ratio": 2.68}


def child_environment(endpoint: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["CONTAINERIZER_ENDPOINT"] = endpoint
    return env


@contextlib.contextmanager
def running_service() -> Iterator[str]:
    """The endpoint of a service: the one named by the environment, or a private one (which
    removes its state and cgroups when it stops)."""
    existing = os.environ.get("CONTAINERIZER_ENDPOINT")
    if existing:
        yield existing
        return
    with private_service() as service:
        yield service.endpoint


def frame(message: Any) -> bytes:
    payload = message.SerializeToString()
    return struct.pack("=I", len(payload)) + payload


def timed(argv: list[str], env: dict[str, str], stdin: bytes = b"") -> float:
    """Milliseconds for one process, start to exit; a failure stops the benchmark."""
    started = time.perf_counter()
    result = subprocess.run(argv, input=stdin, capture_output=True, env=env, timeout=120)
    elapsed = (time.perf_counter() - started) * 1000
    if result.returncode != 0:
        raise SystemExit(f"bench_ecp: {' '.join(argv)} failed: {result.stderr.decode().strip()}")
    return elapsed


def true_launch(container_id: str, sandbox: Path) -> ecp.Launch:
    sandbox.mkdir(parents=True, exist_ok=True)
    launch = ecp.Launch(directory=str(sandbox))
    launch.container_id.value = container_id
    launch.executor_info.executor_id.value = container_id
    launch.executor_info.command.CopyFrom(mesos.CommandInfo(value="/bin/true", shell=False))
    return launch


def with_id(message: Any, container_id: str) -> Any:
    message.container_id.value = container_id
    return message


def bench_ecp(env: dict[str, str], sleeper: str, workdir: Path, n: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {"launch": [], "wait": [], "usage": []}
    for i in range(n):
        cid = f"bench-ecp-{i}-{uuid.uuid4().hex[:6]}"
        samples["launch"].append(
            timed([*ECP, "launch"], env, frame(true_launch(cid, workdir / cid)))
        )
        samples["wait"].append(timed([*ECP, "wait"], env, frame(with_id(ecp.Wait(), cid))))
        samples["usage"].append(timed([*ECP, "usage"], env, frame(with_id(ecp.Usage(), sleeper))))
    return samples


def bench_usage_start(env: dict[str, str], sleeper: str, n: int) -> dict[str, list[float]]:
    """ECP usage and a bare interpreter start, alternately, so both see the same machine."""
    usage = frame(with_id(ecp.Usage(), sleeper))
    samples: dict[str, list[float]] = {"usage": [], "python_start": []}
    for _ in range(n):
        samples["python_start"].append(timed(PYTHON_START, env))
        samples["usage"].append(timed([*ECP, "usage"], env, usage))
    return samples


def bench_cli(env: dict[str, str], sleeper: str, workdir: Path, n: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {"launch": [], "wait": [], "usage": []}
    for i in range(n):
        cid = f"bench-cli-{i}-{uuid.uuid4().hex[:6]}"
        (workdir / cid).mkdir(parents=True)
        run = [*CLI, "run", "--detach", "--id", cid, "--sandbox", str(workdir / cid), "/bin/true"]
        samples["launch"].append(timed(run, env))
        samples["wait"].append(timed([*CLI, "wait", cid], env))
        samples["usage"].append(timed([*CLI, "usage", sleeper], env))
    return samples


def bench_in_process(endpoint: str, sleeper: str, n: int) -> dict[str, list[float]]:
    """The same usage call without any process start: what the protocol itself costs."""
    samples: list[float] = []
    with grpc.insecure_channel(endpoint) as channel:
        stub = pb_grpc.ContainerizerStub(channel)
        for _ in range(n):
            started = time.perf_counter()
            stub.Usage(pb.UsageRequest(container_id=sleeper), timeout=30)
            samples.append((time.perf_counter() - started) * 1000)
    return {"usage": samples}


def floors(n: int) -> dict[str, dict[str, float]]:
    env = child_environment("")
    python = [sys.executable, "-c"]
    return {
        "python_start": summary([timed([*python, "pass"], env) for _ in range(n)]),
        "python_import_grpc": summary([timed([*python, "import grpc"], env) for _ in range(n)]),
    }


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p99 = (
        statistics.quantiles(ordered, n=100, method="inclusive")[98]
        if len(ordered) > 1
        else ordered[0]
    )
    return {
        "p50_ms": round(statistics.median(ordered), 1),
        "p99_ms": round(p99, 1),
        "min_ms": round(ordered[0], 1),
        "n": len(ordered),
    }


@contextlib.contextmanager
def sleeper_container(endpoint: str, workdir: Path) -> Iterator[str]:
    cid = f"bench-sleeper-{uuid.uuid4().hex[:6]}"
    (workdir / cid).mkdir(parents=True)
    with grpc.insecure_channel(endpoint) as channel:
        stub = pb_grpc.ContainerizerStub(channel)
        request = pb.LaunchRequest(
            container_id=cid,
            command=pb.CommandInfo(argv=["/bin/sleep", "3600"]),
            sandbox=str(workdir / cid),
        )
        stub.Launch(request, timeout=60)
        try:
            yield cid
        finally:
            with contextlib.suppress(grpc.RpcError):
                stub.Destroy(pb.DestroyRequest(container_id=cid), timeout=60)


def report(results: dict[str, dict[str, list[float]]], base: dict[str, Any]) -> dict[str, Any]:
    ops = {kind: {op: summary(s) for op, s in by_op.items()} for kind, by_op in results.items()}
    ratios = {
        f"{op}_ecp_over_cli_p50": round(ops["ecp"][op]["p50_ms"] / ops["cli"][op]["p50_ms"], 2)
        for op in ("launch", "wait", "usage")
    }
    start = ops["usage_start"]
    ratio = round(start["usage"]["p50_ms"] / start["python_start"]["p50_ms"], 2)
    return {
        **base,
        "ops": ops,
        "ratios": ratios,
        "usage_process": {
            "usage_p50_ms": start["usage"]["p50_ms"],
            "python_start_p50_ms": start["python_start"]["p50_ms"],
            "ratio_usage_over_python_start_p50": ratio,
            "baseline": BASELINE,
            "target_ratio": USAGE_TARGET_RATIO,
            "met": ratio <= USAGE_TARGET_RATIO,
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=30)
    n = parser.parse_args().iterations
    with running_service() as endpoint, tempfile.TemporaryDirectory(prefix="bench-ecp-") as tmp:
        workdir = Path(tmp)
        env = child_environment(endpoint)
        with sleeper_container(endpoint, workdir) as sleeper:
            # One untimed call each first: writes the bytecode caches, as an install would have.
            timed([*ECP, "containers"], env)
            timed([*CLI, "ps"], env)
            results = {
                "usage_start": bench_usage_start(env, sleeper, 3 * n),
                "ecp": bench_ecp(env, sleeper, workdir, n),
                "cli": bench_cli(env, sleeper, workdir, n),
                "grpc_in_process": bench_in_process(endpoint, sleeper, n),
            }
        base = {"endpoint": endpoint, "iterations": n, "cpus": os.cpu_count(), "floors": floors(n)}
        print(json.dumps(report(results, base), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
