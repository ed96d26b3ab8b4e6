"""containerd runtime: launch-to-exit of /bin/true in the busybox image, ours vs `ctr run --rm`.

Both run against the same private containerd (own root, state and socket under /tmp), the same
image (the deterministic busybox test image: imported through our Images API for us, with
`ctr images import` for ctr, each into its own namespace), and the same snapshotter and shim.
Ours: Launch + Wait (which returns once task, container, snapshot and lease are deleted) +
Destroy (the acknowledgement), over a warm gRPC channel. ctr: one `ctr run --rm` process each.
Target: our p50 at most 1.0x ctr's (we keep a warm connection, ctr pays its start-up).
Then 20 launches in parallel, both ways: wall time until all have exited and been cleaned.

Usage: python benchmarks/bench_containerd.py [--runs 50] [--parallel 20]   (root; prints JSON)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from benchmarks.common import Service, private_service, ratio, summary_ms
from tests.cgroup_roots import remove_cgroup_trees
from tests.images import REFERENCE, busybox_oci_layout
from tests.integration.containerd_daemon import (
    ContainerdDaemon,
    containerd_available,
    containerd_config,
    import_image,
)

OUR_NAMESPACE = "bench"
CTR_NAMESPACE = "bench-ctr"
TRUE = pb.CommandInfo(argv=["/bin/true"])


def ours_once(service: Service, container_id: str) -> float:
    stub = service.stub()
    start = time.perf_counter()
    stub.Launch(
        pb.LaunchRequest(
            container_id=container_id,
            command=TRUE,
            container=pb.ContainerInfo(runtime="containerd", image=REFERENCE),
        ),
        timeout=60,
    )
    termination = stub.Wait(pb.WaitRequest(container_id=container_id), timeout=60).termination
    elapsed = time.perf_counter() - start
    stub.Destroy(pb.DestroyRequest(container_id=container_id), timeout=60)
    if termination.exit_code != 0:
        raise RuntimeError(f"{container_id}: {termination}")
    return elapsed


def ctr_once(daemon: ContainerdDaemon, container_id: str) -> float:
    argv = ["ctr", "--address", daemon.address, "--namespace", CTR_NAMESPACE]
    argv += ["run", "--rm", REFERENCE, container_id, "/bin/true"]
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def parallel_wall_time(count: int, run_one: object) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=count) as pool:
        list(pool.map(run_one, range(count)))  # type: ignore[arg-type]
    return time.perf_counter() - start


def measure(daemon: ContainerdDaemon, workdir: Path, runs: int, parallel: int) -> dict[str, object]:
    tarball = busybox_oci_layout(workdir)
    daemon.ctr("images", "import", str(tarball), namespace=CTR_NAMESPACE)
    with private_service(containerd_config(daemon, OUR_NAMESPACE)) as service:
        import_image(service.endpoint, tarball)
        ours_once(service, "warm-up")  # loads and unpacks the image into our namespace
        ctr_once(daemon, "warm-up")
        ours, theirs = [], []
        for n in range(runs):  # interleaved, so both see the same machine state
            ours.append(ours_once(service, f"bench-{n}"))
            theirs.append(ctr_once(daemon, f"bench-{n}"))
        ours_parallel = parallel_wall_time(parallel, lambda n: ours_once(service, f"par-{n}"))
        ctr_parallel = parallel_wall_time(parallel, lambda n: ctr_once(daemon, f"par-{n}"))
    ours_summary, ctr_summary = summary_ms(ours), summary_ms(theirs)
    return {
        "benchmark": "containerd",
        "launch_to_exit": {
            "ours": ours_summary,
            "ctr_run_rm": ctr_summary,
            "ratio_p50": ratio(ours_summary, ctr_summary),
            "ratio_p99": ratio(ours_summary, ctr_summary, "p99_ms"),
            "target_ratio_p50": 1.0,
        },
        f"parallel_{parallel}": {
            "ours_wall_ms": round(ours_parallel * 1000, 1),
            "ctr_wall_ms": round(ctr_parallel * 1000, 1),
            "ratio": round(ours_parallel / ctr_parallel, 3),
            "baseline_ratio": 1.12,  # before the launch path lost its per-image lock and RPCs
            "target_ratio": 1.0,
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--parallel", type=int, default=20)
    args = parser.parse_args()
    missing = containerd_available()
    if missing is not None:
        print(json.dumps({"benchmark": "containerd", "error": missing}))
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="ctz-bench-containerd-", dir="/tmp"))
    daemon = ContainerdDaemon(workdir)
    try:
        daemon.start()
        result = measure(daemon, workdir, args.runs, args.parallel)
    finally:
        daemon.stop()
        remove_cgroup_trees(CTR_NAMESPACE)  # `ctr run` tasks live at /<namespace>/<id>
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
