"""What the benchmarks share: a private `containerizer serve`, percentiles, JSON output."""

from __future__ import annotations

import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.api.containerizer.v1 import containerizer_pb2_grpc as pb_grpc
from tests.cgroup_roots import remove_cgroup_trees
from tests.run_records import unmount_below

BIN = Path(sys.executable).parent


@dataclass
class Service:
    endpoint: str
    process: subprocess.Popen[bytes]
    workdir: Path
    cgroups_root: str

    def stub(self) -> pb_grpc.ContainerizerStub:
        return pb_grpc.ContainerizerStub(grpc.insecure_channel(self.endpoint))


@contextlib.contextmanager
def private_service(extra_config: str = "") -> Iterator[Service]:
    """A service with its own state, socket and cgroup root under a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="ctz-bench-", dir="/tmp") as tmp:
        workdir = Path(tmp)
        cgroups_root = f"ctz-bench-{workdir.name[-8:]}"
        socket = workdir / "containerizer.sock"
        config = workdir / "containerizer.toml"
        config.write_text(
            f'version = 1\nstate_dir = "{workdir / "state"}"\nsocket = "{socket}"\n'
            f'cgroups_root = "{cgroups_root}"\n{extra_config}\n'
        )
        with (workdir / "service.log").open("wb") as log:
            process = subprocess.Popen(
                [str(BIN / "containerizer"), "serve", "--config", str(config)],
                stdout=log, stderr=log, start_new_session=True,
            )  # fmt: skip
        service = Service(f"unix:{socket}", process, workdir, cgroups_root)
        try:
            _wait_until_serving(service)
            yield service
        finally:
            _destroy_all(service)
            process.terminate()
            process.wait(timeout=30)
            unmount_below(workdir)  # the sandboxes' nosuid mount, kept while sandboxes remain
            remove_cgroup_trees(cgroups_root, f"{cgroups_root}.*")


def _wait_until_serving(service: Service) -> None:
    stub = service.stub()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with contextlib.suppress(grpc.RpcError):
            stub.Containers(pb.ContainersRequest(), timeout=1)
            return
        if service.process.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"service did not start: {(service.workdir / 'service.log').read_text()}")


def _destroy_all(service: Service) -> None:
    stub = service.stub()
    with contextlib.suppress(grpc.RpcError):
        for status in stub.Containers(pb.ContainersRequest(), timeout=10).containers:
            with contextlib.suppress(grpc.RpcError):
                stub.Destroy(pb.DestroyRequest(container_id=status.container_id), timeout=60)


def summary_ms(samples: list[float]) -> dict[str, float]:
    """p50/p95/p99/mean in milliseconds of samples given in seconds."""
    ordered = sorted(samples)
    return {
        "n": len(ordered),
        "p50_ms": _pick_ms(ordered, 0.50),
        "p95_ms": _pick_ms(ordered, 0.95),
        "p99_ms": _pick_ms(ordered, 0.99),
        "mean_ms": round(statistics.fmean(ordered) * 1000, 2),
    }


def p50_p90_ms(samples: list[float]) -> dict[str, float]:
    """n, p50 and p90 in milliseconds of samples given in seconds (p90: the tail of a few
    dozen samples, where p99 would be the maximum)."""
    ordered = sorted(samples)
    return {"n": len(ordered), "p50_ms": _pick_ms(ordered, 0.50), "p90_ms": _pick_ms(ordered, 0.90)}


def _pick_ms(ordered: list[float], q: float) -> float:
    """The q-quantile of sorted seconds, in milliseconds (nearest rank, no interpolation)."""
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)


def ratio(ours: dict[str, float], theirs: dict[str, float], key: str = "p50_ms") -> float:
    return round(ours[key] / theirs[key], 3) if theirs[key] else float("inf")
