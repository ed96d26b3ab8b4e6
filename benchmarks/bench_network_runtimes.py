"""Benchmark: what the network isolator adds to a containerd and an LXC launch, against `ip`.

For each runtime, Launch latency (the RPC, until RUNNING) of the busybox image in mode none (a
namespace of the isolator's, loopback only) and mode bridge (plus veth on our bridge, address,
route): ratio bridge/none. The direct tool: the same bridge attachment made by `ip` commands
(netns add, veth into it on the same bridge, address, up, default route), timed in the same run;
`bridge_overhead_vs_ip` = (bridge p50 - none p50) / ip p50. Below 1 means our pyroute2 path
costs less than the shell tools it replaces.

Needs root, containerd, LXC and the static supervisor. Starts a private containerd and a private
`containerizer serve` (own state, socket, bridge and subnet), prints JSON, removes everything.

    .venv/bin/python benchmarks/bench_network_runtimes.py [--launches 15]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a plain checkout

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from benchmarks.common import ratio, summary_ms
from tests.conftest import ServiceProcess
from tests.images import REFERENCE, busybox_oci_layout
from tests.integration.containerd_daemon import (
    ContainerdDaemon,
    containerd_available,
    containerd_config,
    import_image,
)

SUBNET = "10.197.61.0/24"
GATEWAY = "10.197.61.1"


def launch_once(service: ServiceProcess, cid: str, runtime: str, mode: str) -> float:
    stub = service.stub()
    request = pb.LaunchRequest(
        container_id=cid,
        command=pb.CommandInfo(argv=["sleep", "60"]),
        container=pb.ContainerInfo(
            runtime=runtime, image=REFERENCE, network=pb.NetworkInfo(mode=mode)
        ),
    )
    start = time.perf_counter()
    stub.Launch(request, timeout=60)
    elapsed = time.perf_counter() - start
    stub.Destroy(pb.DestroyRequest(container_id=cid), timeout=60)
    stub.Destroy(pb.DestroyRequest(container_id=cid), timeout=60)  # the acknowledgement
    return elapsed


def ip_attachment_once(bridge: str, index: int) -> float:
    """What the isolator does for bridge mode, done with `ip`; removed afterwards (untimed)."""
    tag = uuid.uuid4().hex[:6]
    netns, host, inside = f"{bridge}-ip{tag}", f"vi{tag}", f"vc{tag}"
    commands = [
        ["ip", "netns", "add", netns],
        ["ip", "link", "add", host, "type", "veth", "peer", "name", inside, "netns", netns],
        ["ip", "link", "set", host, "master", bridge, "up"],
        ["ip", "-n", netns, "addr", "add", f"10.197.61.{200 + index % 50}/24", "dev", inside],
        ["ip", "-n", netns, "link", "set", inside, "up"],
        ["ip", "-n", netns, "link", "set", "lo", "up"],
        ["ip", "-n", netns, "route", "add", "default", "via", GATEWAY],
    ]
    start = time.perf_counter()
    try:
        for command in commands:
            subprocess.run(command, check=True, capture_output=True)
        return time.perf_counter() - start
    finally:
        subprocess.run(["ip", "link", "del", host], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", netns], check=False, capture_output=True)


def measure(service: ServiceProcess, bridge: str, launches: int) -> dict[str, object]:
    results: dict[str, object] = {"benchmark": "network_runtimes", "launches": launches}
    for runtime in ("containerd", "lxc"):  # the image unpacked, the bridge made, caches warm
        launch_once(service, f"warm-{runtime}", runtime, "bridge")
    ip_summary = summary_ms([ip_attachment_once(bridge, n) for n in range(launches)])
    results["ip_bridge_attachment"] = ip_summary
    for runtime in ("containerd", "lxc"):
        samples: dict[str, list[float]] = {"none": [], "bridge": []}
        for n in range(launches):  # interleaved, so both see the same machine state
            for mode, mode_samples in samples.items():
                mode_samples.append(launch_once(service, f"{runtime}-{mode}-{n}", runtime, mode))
        none, bridge_mode = summary_ms(samples["none"]), summary_ms(samples["bridge"])
        overhead = bridge_mode["p50_ms"] - none["p50_ms"]
        results[runtime] = {
            "launch_none": none,
            "launch_bridge": bridge_mode,
            "ratio_bridge_vs_none": ratio(bridge_mode, none),
            "bridge_overhead_p50_ms": round(overhead, 2),
            "bridge_overhead_vs_ip": round(overhead / ip_summary["p50_ms"], 3),
        }
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--launches", type=int, default=15)
    args = parser.parse_args()
    missing = containerd_available() or (
        None if shutil.which("lxc-start") else "lxc-start is not installed"
    )
    if missing is not None:
        print(json.dumps({"benchmark": "network_runtimes", "error": missing}))
        return 1
    with tempfile.TemporaryDirectory(prefix="ctz-bench-netrt-", dir="/tmp") as tmp:
        workdir = Path(tmp)
        daemon = ContainerdDaemon(workdir / "containerd")
        daemon.workdir.mkdir()
        bridge = f"ctz-r{uuid.uuid4().hex[:6]}"
        network = f'[network]\nbridge = "{bridge}"\nsubnet = "{SUBNET}"\n'
        (workdir / "service").mkdir()
        service: ServiceProcess | None = None
        try:
            daemon.start()
            service = ServiceProcess(
                workdir / "service",
                network + containerd_config(daemon, "bench-net") + "[runtimes.lxc]\n",
            )
            service.start()
            import_image(service.endpoint, busybox_oci_layout(workdir))
            result = measure(service, bridge, args.launches)
        finally:
            if service is not None and service.process is not None:
                service.destroy_all()
                service.stop()
                service.remove_cgroup_roots()
            daemon.stop()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
