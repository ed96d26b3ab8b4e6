"""CRI: a pod with one container that exits at once, from creation to removal through the CRI
socket, next to the same work through our own API and `ctr run --rm`, interleaved in one run.

All three run /bin/true of the deterministic busybox test image. CRI (runtime.v1 stubs, native
runtime, the image imported through our Images API): RunPodSandbox, CreateContainer,
StartContainer, the exit learnt from the GetContainerEvents stream (one for the whole run, as the
kubelet's evented PLEG keeps), StopContainer, RemoveContainer, StopPodSandbox, RemovePodSandbox.
The same with the exit learnt by polling ContainerStatus every millisecond instead (the
kubelet's older PLEG lists every second) is `cri_polling`. Ours: Launch on native, Wait,
Destroy. ctr: `ctr run --rm` in a private containerd (as bench_containerd.py). Both of ours give
the workload a network namespace on the service's bridge: the pod gets it, and the pod's
container joins it. The pod is the kubelet's default (tests/integration/cri.py: no shared pid
namespace), so its namespaces are pinned, without a holder process. Target: CRI p50 <= 1.15 x
ours. Also timed: the pod alone (RunPodSandbox, StopPodSandbox, RemovePodSandbox), the p50
of every call, which say where the difference goes, and an empty call (Version): the CRI makes
7 calls (and, polling, its ContainerStatus polls) where ours makes 3, and `calls_floor` says what
those extra round trips cost by themselves.

Then, when critest is there ($CRITEST, else ../shared/cri/bin/critest), `critest --benchmark`
against the same service (critest_benchmark.py); without it, one line says why not.

Usage: python benchmarks/bench_cri.py [--runs 30] [--warmup 3] [--critest-samples 20]
(root; prints a summary on stderr and JSON on stdout; --critest-samples 0 skips critest)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.cri.api import cri
from adapter.images.busybox import REFERENCE
from benchmarks.bench_containerd import CTR_NAMESPACE, ctr_once
from benchmarks.common import p50_p90_ms
from benchmarks.critest_benchmark import (
    CritestRun,
    CritestTools,
    critest_registry,
    critest_tools,
    mirrors_config,
    run_critest_benchmark,
)
from tests.cgroup_roots import remove_cgroup_trees
from tests.conftest import ServiceProcess
from tests.images import busybox_oci_layout
from tests.integration.containerd_daemon import (
    ContainerdDaemon,
    containerd_available,
    import_image,
)
from tests.integration.cri import TIMEOUT, CriNode
from tests.integration.test_network import network_config
from tests.run_records import RunRecord, run_scoped_tempdir

TARGET_RATIO = 1.15
# The ways the same work is done, as the results name them.
CRI, OWN_API, CTR, CRI_POD_ONLY = "cri_pod_and_container", "own_api", "ctr_run_rm", "cri_pod_only"
CRI_POLLING = "cri_polling"  # the CRI's lifecycle, its exit learnt by polling ContainerStatus
EMPTY_RPC = "empty_rpc"  # one CRI Version call: what every call costs before any work
# The calls of one lifecycle besides the ContainerStatus polls: ours Launch, Wait, Destroy; the
# CRI's RunPodSandbox, CreateContainer, StartContainer, StopContainer, RemoveContainer,
# StopPodSandbox, RemovePodSandbox.
OWN_API_CALLS, CRI_CALLS = 3, 7
POLLS = "polls"  # a step that counts ContainerStatus calls, not seconds
TRUE = ["/bin/true"]
EXIT_POLL_SECONDS = 0.001

# One lifecycle's time per step: step name -> seconds.
Steps = dict[str, float]


class StepClock:
    """Times consecutive steps of one lifecycle; `total` is the sum."""

    def __init__(self) -> None:
        self.steps: Steps = {}
        self._last = time.perf_counter()

    def lap(self, step: str) -> None:
        now = time.perf_counter()
        self.steps[step] = now - self._last
        self._last = now

    def result(self) -> Steps:
        return {**self.steps, "total": sum(self.steps.values())}


# ---- the three ways of doing the same work ----


class ExitEvents:
    """One GetContainerEvents stream for the whole run, read by a thread: a container's
    STOPPED event, with its exit code, wakes whoever waits for that container."""

    def __init__(self, node: CriNode) -> None:
        self._stream = node.runtime.GetContainerEvents(cri.GetEventsRequest())
        self._exits: dict[str, int] = {}
        self._ended: BaseException | None = None
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="cri-events", daemon=True)
        self._reader.start()
        self._wait_live(node)

    def _read(self) -> None:
        try:
            for event in self._stream:
                if event.container_event_type != cri.CONTAINER_STOPPED_EVENT:
                    continue
                for status in event.containers_statuses:
                    if status.id == event.container_id:
                        with self._changed:
                            self._exits[status.id] = status.exit_code
                            self._changed.notify_all()
        except grpc.RpcError as exc:
            with self._changed:
                self._ended = exc
                self._changed.notify_all()

    def _wait_live(self, node: CriNode) -> None:
        """Until the stream shows a container's exit: from then on, no exit is missed."""
        pod_id = node.run_pod(node.pod_config("bench-cri-events-live"))
        container_id = node.create(pod_id, node.container_config(*TRUE, name="live"))
        node.start(container_id)
        self.wait_exit(container_id)
        node.runtime.RemovePodSandbox(
            cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=TIMEOUT
        )

    def wait_exit(self, container_id: str) -> int:
        with self._changed:
            if not self._changed.wait_for(
                lambda: container_id in self._exits or self._ended is not None, TIMEOUT
            ):
                raise RuntimeError(f"no exit event for CRI container {container_id}")
            if container_id not in self._exits:
                raise RuntimeError(f"the event stream ended: {self._ended}")
            return self._exits.pop(container_id)

    def close(self) -> None:
        self._stream.cancel()
        self._reader.join(timeout=TIMEOUT)


def cri_once(node: CriNode, name: str, events: ExitEvents | None) -> Steps:
    """The CRI's lifecycle; its exit from `events`, or from ContainerStatus polls without."""
    runtime = node.runtime
    clock = StepClock()
    pod_id = node.run_pod(node.pod_config(name))
    clock.lap("RunPodSandbox")
    container_id = node.create(pod_id, node.container_config(*TRUE, name=name))
    clock.lap("CreateContainer")
    node.start(container_id)
    clock.lap("StartContainer")
    if events is not None:
        exit_code, polls = events.wait_exit(container_id), 0
        clock.lap("the exit event")
    else:
        exit_code, polls = wait_exited(node, container_id)
        clock.lap("ContainerStatus until EXITED")
    runtime.StopContainer(cri.StopContainerRequest(container_id=container_id), timeout=TIMEOUT)
    clock.lap("StopContainer")
    runtime.RemoveContainer(cri.RemoveContainerRequest(container_id=container_id), timeout=TIMEOUT)
    clock.lap("RemoveContainer")
    runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=TIMEOUT)
    clock.lap("StopPodSandbox")
    runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=TIMEOUT)
    clock.lap("RemovePodSandbox")
    if exit_code != 0:
        raise RuntimeError(f"CRI container {container_id} exited {exit_code}")
    return {**clock.result(), POLLS: polls}


def wait_exited(node: CriNode, container_id: str) -> tuple[int, int]:
    """The exit code, once ContainerStatus says EXITED, and how many calls that took."""
    deadline = time.monotonic() + TIMEOUT
    polls = 0
    while True:
        status = node.status(container_id)
        polls += 1
        if status.state == cri.CONTAINER_EXITED:
            return int(status.exit_code), polls
        if time.monotonic() > deadline:
            raise RuntimeError(f"CRI container {container_id} did not exit: {status}")
        time.sleep(EXIT_POLL_SECONDS)


def pod_once(node: CriNode, name: str) -> Steps:
    clock = StepClock()
    pod_id = node.run_pod(node.pod_config(name))
    clock.lap("RunPodSandbox")
    node.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=TIMEOUT)
    clock.lap("StopPodSandbox")
    node.runtime.RemovePodSandbox(
        cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=TIMEOUT
    )
    clock.lap("RemovePodSandbox")
    return clock.result()


def empty_rpc_once(node: CriNode) -> Steps:
    """The median of five Version calls: a call's round trip through both gRPC stacks."""
    samples = []
    for _ in range(5):
        started = time.perf_counter()
        node.runtime.Version(cri.VersionRequest(), timeout=TIMEOUT)
        samples.append(time.perf_counter() - started)
    return {"total": statistics.median(samples)}


def own_api_once(service: ServiceProcess, container_id: str) -> Steps:
    stub = service.stub()
    clock = StepClock()
    stub.Launch(
        pb.LaunchRequest(
            container_id=container_id,
            command=pb.CommandInfo(argv=TRUE),
            container=pb.ContainerInfo(
                runtime="native", image=REFERENCE, network=pb.NetworkInfo(mode="bridge")
            ),
        ),
        timeout=TIMEOUT,
    )
    clock.lap("Launch")
    termination = stub.Wait(pb.WaitRequest(container_id=container_id), timeout=TIMEOUT)
    clock.lap("Wait")
    stub.Destroy(pb.DestroyRequest(container_id=container_id), timeout=TIMEOUT)
    clock.lap("Destroy")
    if termination.termination.exit_code != 0:
        raise RuntimeError(f"{container_id}: {termination.termination}")
    return clock.result()


def ctr_run_once(daemon: ContainerdDaemon, container_id: str) -> Steps:
    return {"total": ctr_once(daemon, container_id)}


# ---- measuring ----


def measure(
    node: CriNode, events: ExitEvents, daemon: ContainerdDaemon, runs: int, warmup: int
) -> dict[str, list[Steps]]:
    """Each way `runs` times after `warmup` untimed rounds, interleaved so that the machine's
    drift (a noisy 2-core host) falls on every way alike, in an order shuffled every round: what
    one way leaves the kernel to finish (a namespace and its veth pair going, ~30 ms under the
    rtnl lock) must not always fall on the same next way's launch."""
    ways: dict[str, Callable[[str], Steps]] = {
        CRI: lambda name: cri_once(node, name, events),
        CRI_POLLING: lambda name: cri_once(node, name, None),
        OWN_API: lambda name: own_api_once(node.service, name),
        CTR: lambda name: ctr_run_once(daemon, name),
        CRI_POD_ONLY: lambda name: pod_once(node, name),
        EMPTY_RPC: lambda name: empty_rpc_once(node),
    }
    samples: dict[str, list[Steps]] = defaultdict(list)
    order = list(ways)
    shuffler = random.Random(20261202)  # the same orders in every run of the benchmark
    for n in range(warmup + runs):
        shuffler.shuffle(order)
        for way in order:
            steps = ways[way](f"bench-cri-{way.replace('_', '-')}-{n}")
            if n >= warmup:
                samples[way].append(steps)
    return samples


@dataclass(frozen=True)
class CriBenchmark:
    lifecycles: dict[str, dict[str, float]]  # way -> n, p50_ms, p90_ms of the whole lifecycle
    per_call_p50_ms: dict[str, dict[str, float]]  # way -> step -> p50 in ms
    polls: float  # median ContainerStatus calls until EXITED
    critest: CritestRun | str  # str: why it did not run

    @classmethod
    def of(cls, samples: dict[str, list[Steps]], critest: CritestRun | str) -> CriBenchmark:
        lifecycles = {
            way: p50_p90_ms([run["total"] for run in runs]) for way, runs in samples.items()
        }
        per_call = {
            way: {
                step: p50_p90_ms([run[step] for run in runs])["p50_ms"]
                for step in runs[0]
                if step not in ("total", POLLS)
            }
            for way, runs in samples.items()
            if len(runs[0]) > 1  # ctr is one process: no steps to show
        }
        polls = statistics.median(run[POLLS] for run in samples[CRI_POLLING])
        return cls(lifecycles, per_call, polls, critest)

    def ratio(self, way: str, other: str, key: str = "p50_ms") -> float:
        """p50 (or `key`) of `way` over `other`'s."""
        return round(self.lifecycles[way][key] / self.lifecycles[other][key], 3)

    def target(self) -> str:
        met = self.ratio(CRI, OWN_API) <= TARGET_RATIO
        return f"{'met' if met else 'missed'} (CRI / own API p50 <= {TARGET_RATIO})"

    def calls_floor(self) -> dict[str, object]:
        """What the CRI's extra calls cost by themselves: (its calls - ours) x an empty call's
        round trip, as a share of our API's lifecycle, and the ratio the CRI would have without
        them (with its exit from the event stream)."""
        rpc = self.lifecycles[EMPTY_RPC]["p50_ms"]
        extra = (CRI_CALLS - OWN_API_CALLS) * rpc
        own, cri_ms = self.lifecycles[OWN_API]["p50_ms"], self.lifecycles[CRI]["p50_ms"]
        return {
            "empty_rpc_p50_ms": rpc,
            "calls_per_lifecycle": {
                "own_api": OWN_API_CALLS,
                "cri": CRI_CALLS,
                "cri_polling": CRI_CALLS + self.polls,
            },
            "extra_calls_ms": round(extra, 2),
            "extra_calls_share_of_own_api": round(extra / own, 3),
            "ratio_cri_without_extra_calls": round((cri_ms - extra) / own, 3),
        }

    def as_json(self) -> dict[str, object]:
        return {
            "benchmark": "cri",
            "lifecycle": self.lifecycles,
            "ratio_cri_vs_own_api_p50": self.ratio(CRI, OWN_API),
            "ratio_cri_vs_own_api_p90": self.ratio(CRI, OWN_API, "p90_ms"),
            "ratio_cri_polling_vs_own_api_p50": self.ratio(CRI_POLLING, OWN_API),
            "ratio_cri_vs_ctr_run_rm_p50": self.ratio(CRI, CTR),
            "ratio_target": self.target(),
            "per_call_p50_ms": self.per_call_p50_ms,
            "calls_floor": self.calls_floor(),
            "critest_benchmark": (
                self.critest if isinstance(self.critest, str) else asdict(self.critest)
            ),
        }

    def report(self) -> str:
        """The headline numbers, for a reader."""
        lines = ["CRI benchmark (a noisy 2-core machine: compare numbers of one run only)"]
        for way, numbers in self.lifecycles.items():
            lines.append(
                f"  {way:22} p50 {numbers['p50_ms']:7.2f} ms  p90 {numbers['p90_ms']:7.2f} ms"
            )
        lines.append(f"  CRI / own API p50 {self.ratio(CRI, OWN_API)}: target {self.target()}")
        lines.append(
            f"  CRI polling ContainerStatus / own API p50 {self.ratio(CRI_POLLING, OWN_API)}"
        )
        lines.append(f"  CRI / ctr run --rm p50 {self.ratio(CRI, CTR)}")
        floor = self.calls_floor()
        lines.append(
            f"  the CRI's {CRI_CALLS} calls against our {OWN_API_CALLS}, at"
            f" {floor['empty_rpc_p50_ms']} ms a round trip: {floor['extra_calls_ms']} ms,"
            f" {floor['extra_calls_share_of_own_api']:.1%} of our lifecycle; CRI / own API"
            f" without them {floor['ratio_cri_without_extra_calls']}"
        )
        for way, steps in self.per_call_p50_ms.items():
            lines.append(
                f"  {way} p50 per call (ms): " + ", ".join(f"{s} {ms}" for s, ms in steps.items())
            )
        if isinstance(self.critest, str):
            lines.append(f"critest --benchmark: {self.critest}")
            return "\n".join(lines)
        lines.append(f"critest --benchmark (exit {self.critest.exit_code}):")
        lines.extend(f"  {line}" for line in self.critest.summary)
        for operation, numbers in self.critest.operations.items():
            lines.append(
                f"  {operation:32} p50 {numbers['p50_ms']:7.2f} ms  p90 {numbers['p90_ms']:7.2f} ms"
            )
        return "\n".join(lines)


# ---- the service, containerd and critest's registry ----


@contextlib.contextmanager
def cri_node(workdir: Path, tarball: Path, extra_config: str) -> Iterator[CriNode]:
    """A private service with a CRI socket and a bridge, the busybox image imported; at the end
    every pod and container is removed, the service stopped and its cgroups and bridge gone."""
    bridge, subnet = network_config()
    workdir.mkdir()
    service = ServiceProcess(
        workdir,
        extra_config=(
            f'cri_socket = "{workdir / "cri.sock"}"\n{extra_config}'
            f'[network]\nbridge = "{bridge}"\nsubnet = "{subnet}"\n'
        ),
    )
    node = CriNode(service)
    try:
        service.start()
        import_image(service.endpoint, tarball)
        yield node
    finally:
        with contextlib.suppress(Exception):
            node.remove_all_pods()
        node.close()
        with contextlib.suppress(Exception):
            service.destroy_all()
        service.stop()
        service.remove_cgroup_roots()
        remove_leftover_bridge(bridge)


def remove_leftover_bridge(bridge: str) -> None:
    """The service removes its bridge when it stops with nothing on it; say so if it did not."""
    shown = subprocess.run(["ip", "link", "show", bridge], capture_output=True, check=False)
    if shown.returncode == 0:
        print(f"bench_cri: the service left bridge {bridge}; removing it", file=sys.stderr)
        subprocess.run(["ip", "link", "del", bridge], check=False)


@contextlib.contextmanager
def containerd_with_busybox(workdir: Path, tarball: Path) -> Iterator[ContainerdDaemon]:
    workdir.mkdir()
    daemon = ContainerdDaemon(workdir)
    try:
        daemon.start()
        daemon.ctr("images", "import", str(tarball), namespace=CTR_NAMESPACE)
        yield daemon
    finally:
        daemon.stop()
        remove_cgroup_trees(CTR_NAMESPACE)  # `ctr run` tasks live at /<namespace>/<id>


def critest_mirrors(stack: contextlib.ExitStack, tools: CritestTools | str, workdir: Path) -> str:
    """The service's mirror config for critest's images ("" without critest)."""
    if isinstance(tools, str):
        return ""
    return mirrors_config(stack.enter_context(critest_registry(tools, workdir)))


def critest_result(
    tools: CritestTools | str, node: CriNode, workdir: Path, samples: int
) -> CritestRun | str:
    if isinstance(tools, str):
        return f"skipped: {tools}"
    workdir.mkdir()
    result = run_critest_benchmark(tools, node.cri_socket, workdir, samples)
    node.remove_all_pods()  # what a failed spec left
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--critest-samples", type=int, default=20)
    args = parser.parse_args()
    missing = containerd_available()  # root, and containerd for `ctr run`
    if missing is not None:
        print(json.dumps({"benchmark": "cri", "error": missing}))
        return 1
    tools = critest_tools() if args.critest_samples > 0 else "--critest-samples 0"
    workdir = run_scoped_tempdir("ctz-bench-cri")
    # A run of its own (tests/run_records.py): a test session that starts meanwhile spares its
    # bridge and namespaces instead of sweeping them as orphans, and one that starts after this
    # benchmark was killed sweeps what it left.
    record = RunRecord([workdir])
    try:
        with contextlib.ExitStack() as stack:
            tarball = busybox_oci_layout(workdir)
            mirrors = critest_mirrors(stack, tools, workdir / "registry")
            node = stack.enter_context(cri_node(workdir / "service", tarball, mirrors))
            daemon = stack.enter_context(containerd_with_busybox(workdir / "containerd", tarball))
            events = ExitEvents(node)
            stack.callback(events.close)
            samples = measure(node, events, daemon, args.runs, args.warmup)
            critest = critest_result(tools, node, workdir / "critest", args.critest_samples)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        record.release()
    result = CriBenchmark.of(samples, critest)
    print(result.report(), file=sys.stderr)  # stdout carries the JSON, for run_all.py
    print(json.dumps(result.as_json(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
