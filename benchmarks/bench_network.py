"""Benchmark: network isolation on the native runtime, against the direct tools in the same run.

1. Launch latency (Launch RPC until RUNNING) in modes host, none and bridge: ratio bridge/host.
2. Container-to-container TCP throughput over our bridge, against two plain namespaces joined
   by one veth pair made with `ip` (the direct tool). The same Python sender and receiver run in
   both; target ratio >= 0.95. Also the CPU the two spend per GB moved: on a machine shared with
   other work, the containers' processes (one cgroup, one share of the CPU) and the plain ones
   (two tasks of the root cgroup) are not scheduled alike, and CPU per byte shows what the
   path itself costs.

Needs root. Starts a private `containerizer serve` (own state, socket, bridge and subnet), prints
JSON, and removes everything it created, also when interrupted.

    .venv/bin/python benchmarks/bench_network.py [--launches 20] [--megabytes 3000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a plain checkout

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from tests.conftest import ServiceProcess

PORT = 5201
RECEIVER = f"""
import resource, socket, time
server = socket.socket(); server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("0.0.0.0", {PORT})); server.listen(1)
connection, _ = server.accept(); total = 0; start = None
while chunk := connection.recv(1 << 20):
    start = start or time.perf_counter(); total += len(chunk)
cpu = resource.getrusage(resource.RUSAGE_SELF)
print(total, time.perf_counter() - start, cpu.ru_utime + cpu.ru_stime, flush=True)
"""
SENDER = """
import resource, socket, sys, time
for _ in range(100):
    try:
        connection = socket.create_connection((sys.argv[1], {port}), timeout=5); break
    except OSError:
        time.sleep(0.05)
block = bytes(1 << 18)
for _ in range(int(sys.argv[2]) * 4):
    connection.sendall(block)
connection.close()
cpu = resource.getrusage(resource.RUSAGE_SELF)
print(cpu.ru_utime + cpu.ru_stime, flush=True)
""".replace("{port}", str(PORT))


def launch(stub: object, cid: str, argv: list[str], mode: str) -> pb.LaunchResponse:
    request = pb.LaunchRequest(
        container_id=cid,
        command=pb.CommandInfo(argv=argv),
        container=pb.ContainerInfo(network=pb.NetworkInfo(mode=mode)),
    )
    return stub.Launch(request, timeout=60)  # type: ignore[attr-defined, no-any-return]


def launch_latency(service: ServiceProcess, count: int) -> dict[str, float]:
    stub = service.stub()
    medians = {}
    for mode in ("host", "none", "bridge"):
        samples = []
        for index in range(count):
            cid = f"lat-{mode}-{index}"
            start = time.perf_counter()
            launch(stub, cid, ["sleep", "60"], mode)
            samples.append((time.perf_counter() - start) * 1000)
            stub.Destroy(pb.DestroyRequest(container_id=cid), timeout=60)
            stub.Destroy(pb.DestroyRequest(container_id=cid), timeout=60)  # acknowledge
        medians[f"launch_{mode}_ms_median"] = round(statistics.median(samples), 2)
    medians["launch_ratio_bridge_vs_host"] = round(
        medians["launch_bridge_ms_median"] / medians["launch_host_ms_median"], 3
    )
    return medians


@dataclass(frozen=True)
class Transfer:
    """One transfer: throughput, and the CPU the sender and receiver spent per GB moved (the
    network stack's work runs in their system time), which shares of a busy machine move
    much less than throughput."""

    mbit: float
    cpu_s_per_gb: float


def _transfer(receiver_output: str, sender_output: str) -> Transfer:
    total, seconds, receiver_cpu = receiver_output.split()
    sender_cpu = float(sender_output.split()[-1])
    return Transfer(
        mbit=int(total) * 8 / float(seconds) / 1e6,
        cpu_s_per_gb=(float(receiver_cpu) + sender_cpu) / (int(total) / 1e9),
    )


def containers_throughput(service: ServiceProcess, workdir: Path, megabytes: int) -> Transfer:
    stub = service.stub()
    (workdir / "receiver.py").write_text(RECEIVER)
    (workdir / "sender.py").write_text(SENDER)
    receiver = launch(stub, "tput-rx", [sys.executable, str(workdir / "receiver.py")], "bridge")
    sender = launch(
        stub,
        "tput-tx",
        [sys.executable, str(workdir / "sender.py"), receiver.status.ip_address, str(megabytes)],
        "bridge",
    )
    for cid in ("tput-rx", "tput-tx"):
        stub.Wait(pb.WaitRequest(container_id=cid), timeout=600)
    transfer = _transfer(
        (Path(receiver.status.sandbox) / "stdout").read_text(),
        (Path(sender.status.sandbox) / "stdout").read_text(),
    )
    for cid in ("tput-rx", "tput-tx"):
        stub.Destroy(pb.DestroyRequest(container_id=cid), timeout=60)
    return transfer


def plain_veth_throughput(
    workdir: Path, megabytes: int, cpu_groups: tuple[Path, Path] | None = None
) -> Transfer:
    """The same transfer between two namespaces joined by one veth, made with `ip` directly;
    with `cpu_groups`, receiver and sender each run in one of those cpu cgroups."""
    tag = uuid.uuid4().hex[:6]
    a, b = f"bench-{tag}-a", f"bench-{tag}-b"
    ip = ["ip"]
    try:
        for name in (a, b):
            subprocess.run([*ip, "netns", "add", name], check=True)
        subprocess.run(
            [
                *ip,
                "link",
                "add",
                f"vb{tag}a",
                "netns",
                a,
                "type",
                "veth",
                "peer",
                "name",
                f"vb{tag}b",
                "netns",
                b,
            ],
            check=True,
        )
        for name, link, address in (
            (a, f"vb{tag}a", "10.199.0.1/30"),
            (b, f"vb{tag}b", "10.199.0.2/30"),
        ):
            subprocess.run([*ip, "-n", name, "addr", "add", address, "dev", link], check=True)
            subprocess.run([*ip, "-n", name, "link", "set", link, "up"], check=True)
            subprocess.run([*ip, "-n", name, "link", "set", "lo", "up"], check=True)
        receiver = subprocess.Popen(
            [*ip, "netns", "exec", b, sys.executable, str(workdir / "receiver.py")],
            stdout=subprocess.PIPE,
            text=True,
        )
        sender = subprocess.Popen(
            [
                *ip,
                "netns",
                "exec",
                a,
                sys.executable,
                str(workdir / "sender.py"),
                "10.199.0.2",
                str(megabytes),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        if cpu_groups is not None:  # `ip netns exec` execs Python: these pids are the two
            for group, process in zip(cpu_groups, (receiver, sender), strict=True):
                (group / "cgroup.procs").write_text(str(process.pid))
        sent, _ = sender.communicate(timeout=600)
        output, _ = receiver.communicate(timeout=600)
        return _transfer(output, sent)
    finally:
        for name in (a, b):
            subprocess.run([*ip, "netns", "del", name], check=False)


def cpu_groups_like_ours(service: ServiceProcess) -> tuple[Path, Path] | None:
    """Two cpu cgroups under one top-level group, as the service places two containers (its
    cgroups root, one group each): CFS then gives the plain pair the same share of a busy
    machine as ours. Named `<cgroups_root>.plain`, so the service's cgroup sweep removes them.
    None without a cgroup v1 cpu hierarchy."""
    cpu = Path("/sys/fs/cgroup/cpu")
    if not (cpu / "cpu.shares").is_file():
        return None
    groups = (
        cpu / f"{service.cgroups_root}.plain" / "rx",
        cpu / f"{service.cgroups_root}.plain" / "tx",
    )
    for group in groups:
        group.mkdir(parents=True, exist_ok=True)
    return groups


def throughput(
    service: ServiceProcess, workdir: Path, megabytes: int, repeat: int
) -> dict[str, object]:
    """Ours, the plain pair, and the plain pair in cgroups placed like ours, in turn, so drift
    on a small shared machine hits all alike; the medians, and the median of each round's own
    ratio (the same-run ratio)."""
    groups = cpu_groups_like_ours(service)
    ours, plain, plain_grouped = [], [], []
    for _ in range(repeat):
        ours.append(containers_throughput(service, workdir, megabytes))
        plain.append(plain_veth_throughput(workdir, megabytes))
        if groups is not None:
            plain_grouped.append(plain_veth_throughput(workdir, megabytes, groups))
    results = _compare(ours, plain, "")
    if plain_grouped:
        results.update(_compare(ours, plain_grouped, "_cgroups_like_ours"))
    return results


def _compare(ours: list[Transfer], plain: list[Transfer], suffix: str) -> dict[str, object]:
    ours_mbit = statistics.median(t.mbit for t in ours)
    plain_mbit = statistics.median(t.mbit for t in plain)
    ours_cpu = statistics.median(t.cpu_s_per_gb for t in ours)
    plain_cpu = statistics.median(t.cpu_s_per_gb for t in plain)
    rounds = zip(ours, plain, strict=True)
    return {
        "throughput_containers_mbit": round(ours_mbit, 1),
        f"throughput_plain_veth{suffix}_mbit": round(plain_mbit, 1),
        f"throughput_ratio{suffix}": round(ours_mbit / plain_mbit, 3),
        f"throughput_ratio{suffix}_median_of_rounds": round(
            statistics.median(o.mbit / p.mbit for o, p in rounds), 3
        ),
        "cpu_s_per_gb_containers": round(ours_cpu, 3),
        f"cpu_s_per_gb_plain_veth{suffix}": round(plain_cpu, 3),
        # plain / ours, read like the throughput ratio: below 1, our path costs more CPU per byte.
        f"cpu_efficiency_ratio{suffix}": round(plain_cpu / ours_cpu, 3),
        f"throughput_runs{suffix}_mbit": [
            [round(o.mbit), round(p.mbit)] for o, p in zip(ours, plain, strict=True)
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launches", type=int, default=20)
    parser.add_argument("--megabytes", type=int, default=3000)
    parser.add_argument(
        "--repeat",
        type=int,
        default=9,
        help="throughput runs of each kind (its rounds vary by 15 percent here)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-network-") as tmp:
        workdir = Path(tmp)
        bridge = f"ctz-b{uuid.uuid4().hex[:6]}"
        service = ServiceProcess(
            workdir,
            extra_config=f'[network]\nbridge = "{bridge}"\nsubnet = "10.198.77.0/24"\n'
            "allow_host = true\n",
        )
        service.start()
        try:
            results: dict[str, object] = {"launches_per_mode": args.launches}
            results.update(launch_latency(service, args.launches))
            results.update(megabytes=args.megabytes, throughput_runs=args.repeat)
            results.update(throughput(service, workdir, args.megabytes, args.repeat))
            # when the target was set; the target: our bridge vs the plain veth pair
            results["baseline_throughput_ratio"] = 0.88
            results["target_throughput_ratio"] = 0.95
            print(json.dumps(results, indent=2))
        finally:
            service.destroy_all()
            service.stop()
            service.remove_cgroup_roots()


if __name__ == "__main__":
    main()
