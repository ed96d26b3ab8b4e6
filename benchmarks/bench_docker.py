"""Docker runtime: lifecycle of /bin/true in a busybox image through our API, next to
`docker run --rm` of the same image and command, against the same private dockerd in one run.

Ours: Launch (until RUNNING) and Launch-until-Wait-returns (the container is removed and its
output copied by then), then Destroy to acknowledge. Direct: `docker run --rm --init --network
none IMAGE /bin/true` with Debian's docker CLI: the same init, network and removal. Target: our
lifecycle p50 no slower than the CLI (ratio <= 1.0). Runs alternate, ours then the CLI's, so
both see the same load.

Usage: python benchmarks/bench_docker.py [--runs 50]   (root; prints JSON)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from benchmarks.common import Service, private_service, ratio, summary_ms
from tests.docker_fixtures import (
    DOCKER_CLI,
    PrivateDockerd,
    build_busybox_image,
    docker_service_config,
    private_dockerd,
)

WARMUP = 3


def our_lifecycle(service: Service, image: str, cid: str) -> tuple[float, float]:
    """(launch, lifecycle) seconds of one container through the API."""
    stub = service.stub()
    request = pb.LaunchRequest(
        container_id=cid,
        command=pb.CommandInfo(argv=["/bin/true"]),
        container=pb.ContainerInfo(runtime="docker", image=image),
    )
    start = time.perf_counter()
    stub.Launch(request, timeout=60)
    launched = time.perf_counter()
    termination = stub.Wait(pb.WaitRequest(container_id=cid), timeout=60).termination
    done = time.perf_counter()
    stub.Destroy(pb.DestroyRequest(container_id=cid), timeout=60)  # acknowledge
    if termination.exit_code != 0:
        raise RuntimeError(f"{cid} ended {termination}")
    return launched - start, done - start


def docker_run_rm(daemon: PrivateDockerd, image: str) -> float:
    argv = [str(DOCKER_CLI), "-H", daemon.endpoint, "run", "--rm", "--init", "--network", "none"]
    start = time.perf_counter()
    subprocess.run([*argv, image, "/bin/true"], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def compare(
    daemon: PrivateDockerd, service: Service, image: str, runs: int
) -> dict[str, list[float]]:
    """Alternate ours and the CLI run by run, so both see the same machine load."""
    samples: dict[str, list[float]] = {"launch": [], "lifecycle": [], "docker_run_rm": []}
    for n in range(-WARMUP, runs):
        launch, lifecycle = our_lifecycle(service, image, f"bench-docker-{n + WARMUP}")
        direct = docker_run_rm(daemon, image)
        if n >= 0:
            samples["launch"].append(launch)
            samples["lifecycle"].append(lifecycle)
            samples["docker_run_rm"].append(direct)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    with private_dockerd() as daemon:
        image = build_busybox_image(daemon)
        with private_service(docker_service_config(daemon, None)) as service:
            samples = compare(daemon, service, image, args.runs)
        storage_driver = daemon.storage_driver
    ours_lifecycle = summary_ms(samples["lifecycle"])
    direct_lifecycle = summary_ms(samples["docker_run_rm"])
    print(
        json.dumps(
            {
                "runtime": "docker",
                "storage_driver": storage_driver,
                "workload": f"{image} /bin/true",
                "ours_launch": summary_ms(samples["launch"]),
                "ours_lifecycle": ours_lifecycle,
                "docker_run_rm": direct_lifecycle,
                "ratio_lifecycle_p50_vs_docker_run": ratio(ours_lifecycle, direct_lifecycle),
                "ratio_lifecycle_p99_vs_docker_run": ratio(
                    ours_lifecycle, direct_lifecycle, "p99_ms"
                ),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
