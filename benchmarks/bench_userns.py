"""User namespaces: launch-to-exit of /bin/true in the busybox image with one vs without, on the
native and containerd runtimes, in the same run.

One service (native and containerd on a private containerd whose state every user may search,
as runc needs for a user-namespaced root filesystem) with a [user_namespace] range; each sample
is Launch + Wait over a warm gRPC channel, then Destroy. The four kinds are interleaved so that
they see the same machine state. With a user namespace, native adds a clone into the namespace,
the maps and an idmapped mount of the image's rootfs; containerd adds the namespace in runc and,
once per image and mapping, the remapped snapshot (made in the warm-up: ranges are handed out
lowest first, so one container at a time always gets the same mapping). Target: ratio p50 with
/ without at most 1.1 on each runtime.

Usage: python benchmarks/bench_userns.py [--runs 30]   (root; prints JSON)
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from benchmarks.common import Service, private_service, ratio, summary_ms
from tests.images import REFERENCE, busybox_oci_layout
from tests.integration.containerd_daemon import (
    ContainerdDaemon,
    containerd_available,
    containerd_config,
    import_image,
)

NAMESPACE = "bench-userns"
USERNS = '[user_namespace]\nrange = "1800000000:6553600"\n'
TRUE = pb.CommandInfo(argv=["/bin/true"])
TARGET_RATIO = 1.1


def launch_to_exit(service: Service, container_id: str, runtime: str, userns: bool) -> float:
    stub = service.stub()
    start = time.perf_counter()
    stub.Launch(
        pb.LaunchRequest(
            container_id=container_id,
            command=TRUE,
            container=pb.ContainerInfo(runtime=runtime, image=REFERENCE),
            user_namespace=userns,
        ),
        timeout=60,
    )
    termination = stub.Wait(pb.WaitRequest(container_id=container_id), timeout=60).termination
    elapsed = time.perf_counter() - start
    stub.Destroy(pb.DestroyRequest(container_id=container_id), timeout=60)
    if termination.exit_code != 0:
        raise RuntimeError(f"{container_id}: {termination}")
    return elapsed


def measure(daemon: ContainerdDaemon, workdir: Path, runs: int) -> dict[str, object]:
    tarball = busybox_oci_layout(workdir)
    kinds = [(runtime, userns) for runtime in ("native", "containerd") for userns in (False, True)]
    samples: dict[tuple[str, bool], list[float]] = {kind: [] for kind in kinds}
    order_of_round = random.Random(18)  # the same orders every run
    with private_service(containerd_config(daemon, NAMESPACE) + USERNS) as service:
        import_image(service.endpoint, tarball)
        for runtime, userns in kinds:  # unpacks the image; makes the remapped snapshot
            launch_to_exit(service, f"warm-{runtime}-{userns}", runtime, userns)
        for n in range(runs):
            # Shuffled each round: a kind's sample must not always follow the same other kind
            # (a containerd destroy's work in the background falls on the next launch).
            order = order_of_round.sample(kinds, len(kinds))
            for runtime, userns in order:
                name = f"{runtime}-{'userns' if userns else 'plain'}-{n}"
                samples[runtime, userns].append(launch_to_exit(service, name, runtime, userns))
    result: dict[str, object] = {"benchmark": "userns", "target_ratio_p50": TARGET_RATIO}
    for runtime in ("native", "containerd"):
        plain, mapped = summary_ms(samples[runtime, False]), summary_ms(samples[runtime, True])
        result[runtime] = {
            "without": plain,
            "with_user_namespace": mapped,
            "ratio": ratio(mapped, plain),
            "ratio_p99": ratio(mapped, plain, "p99_ms"),
        }
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    missing = containerd_available()
    if missing is not None:
        print(json.dumps({"benchmark": "userns", "error": missing}))
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="ctz-bench-userns-", dir="/tmp"))
    workdir.chmod(0o711)  # runc walks to the task's rootfs as the namespace's root
    daemon = ContainerdDaemon(workdir)
    try:
        daemon.start()
        result = measure(daemon, workdir, args.runs)
    finally:
        daemon.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
