"""Benchmark: native launch latency with the CNI backend against our own bridge, same run.

Two private services side by side: `[network] backend = "bridge"` and `backend = "cni"` with
Debian's plugins (bridge + host-local + portmap + bandwidth, the deploy/config/cni example's
chain) on a network of the benchmark's own. Launch (RPC until RUNNING) in mode bridge, launches
alternating between the two services so drift hits both alike. `ratio` = CNI p50 / bridge p50
without port mappings (target <= 1.3); `ratio_port_mapping` with one mapping each, where the
portmap plugin's iptables calls (~40-100 ms per ADD here) dominate. `ratio_floor`: what the
ratio would be if the CNI way cost nothing beyond its plugins (see `floor`). Needs root; removes
what it made.

    .venv/bin/python benchmarks/bench_cni.py [--launches 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a plain checkout

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.core.config import load_config
from adapter.core.network import RuntimeNetwork
from isolators.network import cni
from isolators.network.model import NetworkRequest
from tests.conftest import ServiceProcess
from tests.integration.test_network_cni import CNI_BIN, write_conflist

FIRST_PORT = 46000


def launch_ms(service: ServiceProcess, cid: str, port: int | None) -> float:
    stub = service.stub()
    mappings = [f"{port}:80/tcp"] if port is not None else []
    request = pb.LaunchRequest(
        container_id=cid,
        command=pb.CommandInfo(argv=["sleep", "60"]),
        container=pb.ContainerInfo(network=pb.NetworkInfo(mode="bridge", port_mappings=mappings)),
    )
    start = time.perf_counter()
    stub.Launch(request, timeout=60)
    elapsed = (time.perf_counter() - start) * 1000
    stub.Destroy(pb.DestroyRequest(container_id=cid), timeout=60)
    stub.Destroy(pb.DestroyRequest(container_id=cid), timeout=60)  # acknowledge
    return elapsed


def add_chain_alone_ms(workdir: Path, launches: int) -> float:
    """p50 of the plugin chain's ADD run by this process straight into a fresh namespace, with
    no service around it (the plugins' own cost: four Go programs started in turn), each DEL'd
    and its namespace removed after."""
    conflist = json.loads(next((workdir / "net.d").glob("*.conflist")).read_text())
    network = cni.NetworkList.from_json(conflist, "benchmark")
    bin_dirs = (CNI_BIN,)
    samples = []
    for index in range(launches + 1):
        namespace = f"ctz-bcni-{uuid.uuid4().hex[:8]}"
        subprocess.run(["ip", "netns", "add", namespace], check=True)
        invocation = cni.Invocation(container_id=namespace, netns=Path("/run/netns", namespace))
        try:
            start = time.perf_counter()
            result = asyncio.run(cni.add(bin_dirs, network, invocation))
            if index:  # the first one makes the bridge
                samples.append((time.perf_counter() - start) * 1000)
            asyncio.run(cni.delete(bin_dirs, network, invocation, result))
        finally:
            subprocess.run(["ip", "netns", "delete", namespace], check=False)
    return statistics.median(samples)


def services(workdir: Path) -> tuple[ServiceProcess, ServiceProcess, str]:
    """The bridge service, the CNI service and the CNI network's bridge (removed at the end)."""
    tag = uuid.uuid4().hex[:6]
    ours = ServiceProcess(
        workdir / "bridge",
        extra_config=f'[network]\nbridge = "ctz-b{tag}"\nsubnet = "10.198.78.0/24"\n',
    )
    cni_bridge = f"ctz-c{tag}"
    name = write_conflist(workdir / "net.d", cni_bridge, "10.198.79.0/24", workdir / "ipam")
    cni = ServiceProcess(
        workdir / "cni",
        extra_config=f'[network]\nbackend = "cni"\nbridge = "ctz-n{tag}"\n'
        f'conf_dir = "{workdir / "net.d"}"\ncni_network = "{name}"\n',
    )
    return ours, cni, cni_bridge


def compare(
    ours: ServiceProcess, cni: ServiceProcess, launches: int, *, mapped: bool
) -> dict[str, float]:
    """p50 launch of each service, alternating; the first launch of each (it makes the
    bridge) is not counted. `mapped`: with one port mapping (portmap's iptables calls)."""
    samples: dict[str, list[float]] = {"bridge": [], "cni": []}
    suffix = "_port_mapping" if mapped else ""
    for index in range(launches + 1):
        for kind, service in (("bridge", ours), ("cni", cni)):
            port = FIRST_PORT + index if mapped else None
            elapsed = launch_ms(service, f"lat-{kind}{suffix}-{index}", port)
            if index:
                samples[kind].append(elapsed)
    bridge, cni_p50 = statistics.median(samples["bridge"]), statistics.median(samples["cni"])
    return {
        f"launch_bridge{suffix}_p50_ms": round(bridge, 2),
        f"launch_cni{suffix}_p50_ms": round(cni_p50, 2),
        f"ratio{suffix}": round(cni_p50 / bridge, 3),
    }


def floor(
    ours: ServiceProcess, workdir: Path, launches: int, measured: dict[str, object]
) -> dict[str, float]:
    """What the CNI way cannot go under, measured in this process (no service, no RPC): the
    plugin chain's ADD, our bridge's whole network setup (namespace, veth, address,
    checkpoint) and a bare namespace with loopback (the CNI way's own part before its plugins).
    The floor is the ratio if the CNI way cost nothing beyond swapping our bridge setup for
    the bare namespace plus the chain: (bridge launch - bridge setup + namespace + chain) /
    bridge launch."""
    chain = add_chain_alone_ms(workdir, launches)
    bridge_setup = asyncio.run(isolator_prepare_ms(ours.config_path, "bridge", launches))
    bare_namespace = asyncio.run(isolator_prepare_ms(ours.config_path, "none", launches))
    bridge_launch = float(str(measured["launch_bridge_p50_ms"]))
    return {
        "cni_add_chain_alone_p50_ms": round(chain, 2),
        "our_bridge_setup_alone_p50_ms": round(bridge_setup, 2),
        "namespace_with_loopback_alone_p50_ms": round(bare_namespace, 2),
        "ratio_floor": round(
            (bridge_launch - bridge_setup + bare_namespace + chain) / bridge_launch, 3
        ),
    }


async def isolator_prepare_ms(config_path: Path, mode: str, launches: int) -> float:
    """p50 of our network isolator's prepare in `mode`, in this process, on the bridge service's
    own network config (its bridge, its state directory: the service is idle meanwhile)."""
    isolator = RuntimeNetwork(load_config(config_path)).isolator
    await isolator.recover(set())
    samples = []
    for index in range(launches + 1):
        container_id = f"bench-alone-{mode}-{index}"
        start = time.perf_counter()
        await isolator.prepare(container_id, NetworkRequest(mode=mode))
        if index:
            samples.append((time.perf_counter() - start) * 1000)
        await isolator.cleanup(container_id)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launches", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-cni-") as tmp:
        workdir = Path(tmp)
        for sub in ("bridge", "cni"):
            (workdir / sub).mkdir()
        ours, cni, cni_bridge = services(workdir)
        started: list[ServiceProcess] = []
        try:
            for service in (ours, cni):
                service.start()
                started.append(service)
            results: dict[str, object] = {"launches": args.launches}
            results.update(compare(ours, cni, args.launches, mapped=False))
            results.update(floor(ours, workdir, args.launches, results))
            results.update(compare(ours, cni, args.launches, mapped=True))
            print(json.dumps(results, indent=2))
        finally:
            for service in started:
                service.destroy_all()
                service.stop()
                service.remove_cgroup_roots()
            subprocess.run(["ip", "link", "delete", cni_bridge], capture_output=True)


if __name__ == "__main__":
    main()
