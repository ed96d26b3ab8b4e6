"""Docker runtime networking: what bridge mode (a sandbox container, its namespace adopted by our
network isolator, the workload joined to it) costs at launch, next to Docker's own bridge
networking for the same image and command, against one private dockerd in one run.

Ours: Launch latency (the RPC, until RUNNING) of `sleep 60` in the busybox image, mode none
(Docker's own empty namespace, no sandbox) and mode bridge; ratio bridge/none. Direct: `docker
run -d --init --network <a Docker bridge network> IMAGE sleep 60` with Debian's docker CLI (veth,
address and namespace made by Docker's libnetwork; its iptables are off, as in the suite), timed
until it returns with the container running. Ratio ours bridge / docker run: the target is <= 1.0
(not slower than what users would otherwise type). Runs interleave, so all see the same load;
removal is not timed.

Usage: python benchmarks/bench_docker_network.py [--launches 20]   (root; prints JSON)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from benchmarks.common import Service, private_service, ratio, summary_ms
from tests.docker_fixtures import DOCKER_CLI, PrivateDockerd, build_busybox_image, private_dockerd
from tests.integration.test_network import network_config

WARMUP = 2


def our_launch(service: Service, image: str, cid: str, mode: str) -> float:
    stub = service.stub()
    request = pb.LaunchRequest(
        container_id=cid,
        command=pb.CommandInfo(argv=["sleep", "60"]),
        container=pb.ContainerInfo(
            runtime="docker", image=image, network=pb.NetworkInfo(mode=mode)
        ),
    )
    start = time.perf_counter()
    stub.Launch(request, timeout=60)
    elapsed = time.perf_counter() - start
    stub.Destroy(pb.DestroyRequest(container_id=cid), timeout=60)
    stub.Destroy(pb.DestroyRequest(container_id=cid), timeout=60)  # the acknowledgement
    return elapsed


def docker(daemon: PrivateDockerd, *args: str) -> str:
    argv = [str(DOCKER_CLI), "-H", daemon.endpoint, *args]
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


def docker_run_bridge(daemon: PrivateDockerd, image: str, network: str) -> float:
    name = f"ctz-bench-{uuid.uuid4().hex[:8]}"
    start = time.perf_counter()
    docker(
        daemon, "run", "-d", "--init", "--name", name, "--network", network, image, "sleep", "60"
    )
    elapsed = time.perf_counter() - start
    docker(daemon, "rm", "-f", name)
    return elapsed


def measure(
    daemon: PrivateDockerd, service: Service, image: str, network: str, launches: int
) -> dict[str, object]:
    samples: dict[str, list[float]] = {"none": [], "bridge": [], "docker_run_bridge": []}
    for n in range(-WARMUP, launches):
        none = our_launch(service, image, f"bench-none-{n + WARMUP}", "none")
        bridge = our_launch(service, image, f"bench-bridge-{n + WARMUP}", "bridge")
        direct = docker_run_bridge(daemon, image, network)
        if n >= 0:
            samples["none"].append(none)
            samples["bridge"].append(bridge)
            samples["docker_run_bridge"].append(direct)
    none_ms, bridge_ms = summary_ms(samples["none"]), summary_ms(samples["bridge"])
    direct_ms = summary_ms(samples["docker_run_bridge"])
    return {
        "runtime": "docker",
        "benchmark": "docker_network",
        "launches": launches,
        "storage_driver": daemon.storage_driver,
        "ours_launch_none": none_ms,
        "ours_launch_bridge": bridge_ms,
        "docker_run_bridge": direct_ms,
        "ratio_bridge_vs_none": ratio(bridge_ms, none_ms),
        "ratio_bridge_p50_vs_docker_run": ratio(bridge_ms, direct_ms),
        "ratio_bridge_p99_vs_docker_run": ratio(bridge_ms, direct_ms, "p99_ms"),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--launches", type=int, default=20)
    args = parser.parse_args()
    bridge, subnet = network_config()
    _, docker_subnet = network_config()
    docker_network = f"ctz-bench-{uuid.uuid4().hex[:8]}"
    with private_dockerd() as daemon:
        image = build_busybox_image(daemon)
        docker(daemon, "network", "create", "--driver", "bridge", "--subnet", docker_subnet,
               docker_network)  # fmt: skip
        config = (
            'default_runtime = "docker"\n'
            f'[network]\nbridge = "{bridge}"\nsubnet = "{subnet}"\n'
            f'[runtimes.docker]\nendpoint = "{daemon.endpoint}"\n'
        )
        try:
            with private_service(config) as service:
                result = measure(daemon, service, image, docker_network, args.launches)
        finally:
            docker(daemon, "network", "rm", docker_network)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
