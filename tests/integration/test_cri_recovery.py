"""CRI pods and containers across a `kill -9` of the service: they come back with the same ids,
states, exit codes, times and log paths, what ended during the outage is reported as it ended,
and what a crash (or a caller's deadline) interrupted halfway is either listed (and removable)
or gone without a trace. `containerizer ps` shows the pods' holders and containers."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.cri.api import cri
from isolators.network import netns
from tests.conftest import BIN
from tests.integration.cri import TIMEOUT, CriNode, cri_service, running_cri_node

pytestmark = pytest.mark.integration

NANOS = 1_000_000_000
# A workload that writes a numbered line to its log every 0.1 s, for as long as it runs.
TICKER = ("sh", "-c", "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.1; done")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CriNode]:
    """A CRI service of this module's own, killed and restarted by its tests."""
    workdir = tmp_path_factory.mktemp("cri-recovery")
    with running_cri_node(cri_service(workdir), workdir) as cri_node:
        yield cri_node


def crash(node: CriNode) -> None:
    node.service.kill()


def come_back(node: CriNode) -> None:
    node.service.start()
    node.reconnect()


def pod_status(node: CriNode, pod_id: str) -> cri.PodSandboxStatus:
    reply = node.runtime.PodSandboxStatus(
        cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id), timeout=TIMEOUT
    )
    status: cri.PodSandboxStatus = reply.status
    return status


def core_pid(node: CriNode, container_id: str) -> int:
    """The host pid of a pod's holder or a container's init, from the core's API."""
    reply = node.service.stub().Status(pb.StatusRequest(container_id=container_id), timeout=10)
    return int(reply.pid)


def cgroup_pids(node: CriNode, container_id: str) -> set[int]:
    """Every process in the container's cgroups."""
    pids: set[int] = set()
    for procs in Path("/sys/fs/cgroup").glob(
        f"*/{node.service.cgroups_root}/_pods/*/{container_id}/cgroup.procs"
    ):
        with contextlib.suppress(OSError):
            pids.update(int(line) for line in procs.read_text().split())
    return pids


def service_processes(node: CriNode) -> list[psutil.Process]:
    """Processes that belong to the service's workloads: supervisors name their status file,
    under the service's state directory, on their command line."""
    state_dir = str(node.service.state_dir)
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any(state_dir in argument for argument in process.info["cmdline"] or ()):
            found.append(process)
    return found


def service_netns(node: CriNode) -> list[str]:
    bridge = tomllib.loads(node.service.config_path.read_text())["network"]["bridge"]
    prefix = netns.netns_prefix(bridge, node.service.state_dir)
    return sorted(netns.names_with_prefix(prefix + "."))


def assert_nothing_left(node: CriNode, *pids: int) -> None:
    """No pod, container, process, cgroup, network namespace or pod file of the service's."""
    deadline = time.monotonic() + 10
    while True:
        alive = [pid for pid in pids if psutil.pid_exists(pid)] + service_processes(node)
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert alive == []
    assert node.runtime.ListPodSandbox(cri.ListPodSandboxRequest(), timeout=TIMEOUT).items == []
    containers = node.runtime.ListContainers(cri.ListContainersRequest(), timeout=TIMEOUT)
    assert list(containers.containers) == []
    assert list(node.service.stub().Containers(pb.ContainersRequest(), timeout=10).containers) == []
    assert node.service.leftover_cgroups() == []
    assert service_netns(node) == []
    with open("/proc/self/mountinfo") as mountinfo:  # the sandboxes' nosuid mount aside
        state_dir, sandboxes = str(node.service.state_dir), f" {node.service.state_dir}/sandboxes "
        left = [line for line in mountinfo if state_dir in line and sandboxes not in line]
        assert left == [], "a pin is left"
    pods_dir = node.service.state_dir / "cri" / "pods"
    assert not pods_dir.exists() or list(pods_dir.iterdir()) == []
    for room in ("sandboxes", "native"):
        directory = node.service.state_dir / room
        assert not directory.exists() or list(directory.iterdir()) == []


def ps_pods(node: CriNode) -> dict[str, str]:
    """container id -> its POD cell in `containerizer ps`."""
    listing = subprocess.run(
        [str(BIN / "containerizer"), "--endpoint", node.service.endpoint, "ps"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    header, *rows = listing.splitlines()
    return {row.split()[0]: row[header.index("POD") :] for row in rows}


def grows(path: Path, timeout: float = 5) -> bool:
    size = path.stat().st_size
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.1)
        if path.stat().st_size > size:
            return True
    return False


def remove(node: CriNode, pod_id: str) -> None:
    for container in node.runtime.ListContainers(
        cri.ListContainersRequest(filter=cri.ContainerFilter(pod_sandbox_id=pod_id)),
        timeout=TIMEOUT,
    ).containers:
        node.runtime.StopContainer(
            cri.StopContainerRequest(container_id=container.id, timeout=2), timeout=TIMEOUT
        )
        node.runtime.RemoveContainer(
            cri.RemoveContainerRequest(container_id=container.id), timeout=TIMEOUT
        )
    node.remove_pod(pod_id)


# ---- running pods and containers ----


def test_running_pod_and_container_come_back_and_go_cleanly(node: CriNode) -> None:
    pod_id = node.run_pod()
    container_id = node.run(pod_id, node.container_config(*TICKER))
    before_pod = pod_status(node, pod_id)
    before = node.status(container_id)
    pids = {core_pid(node, pod_id), core_pid(node, container_id)} - {0}  # 0: pinned, no holder
    log_path = Path(before.log_path)
    crash(node)
    assert grows(log_path), "the supervisor keeps writing the log while the service is down"
    come_back(node)
    after_pod = pod_status(node, pod_id)
    assert after_pod == before_pod
    assert after_pod.state == cri.SANDBOX_READY
    after = node.status(container_id)
    assert after == before
    assert after.state == cri.CONTAINER_RUNNING
    reply = node.exec_sync(container_id, "sh", "-c", "echo still here")
    assert (reply.exit_code, reply.stdout) == (0, b"still here\n")
    assert grows(log_path), "the same file is still written after the restart"
    pod_name = f"test/{before_pod.metadata.name}"
    assert ps_pods(node) == {pod_id: f"{pod_name} (sandbox)", container_id: pod_name}
    assert b"tick" in log_path.read_bytes().splitlines()[-1]
    node.runtime.StopContainer(
        cri.StopContainerRequest(container_id=container_id, timeout=2), timeout=TIMEOUT
    )
    stopped = node.status(container_id)
    assert stopped.state == cri.CONTAINER_EXITED
    assert stopped.exit_code in (128 + signal.SIGTERM, 128 + signal.SIGKILL)
    node.runtime.RemovePodSandbox(
        cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=TIMEOUT
    )
    assert_nothing_left(node, *pids)


def test_exit_during_the_outage_is_reported_with_its_code_and_time(node: CriNode) -> None:
    pod_id = node.run_pod()
    try:
        container_id = node.run(pod_id, node.container_config("sh", "-c", "sleep 2; exit 5"))
        crashed_at = time.time_ns()
        crash(node)
        time.sleep(3)  # the container exits while nobody watches
        restarted_at = time.time_ns()
        come_back(node)
        status = node.wait_exited(container_id)
        assert (status.exit_code, status.reason) == (5, "Error")
        assert crashed_at < status.finished_at < restarted_at
        assert status.started_at < crashed_at
    finally:
        remove(node, pod_id)
    assert_nothing_left(node)


def test_container_exited_before_the_crash_keeps_its_status(node: CriNode) -> None:
    pod_id = node.run_pod()
    try:
        failed = node.run(pod_id, node.container_config("sh", "-c", "echo bye; exit 3"))
        done = node.run(pod_id, node.container_config("true"))
        before = {c: node.wait_exited(c) for c in (failed, done)}
        crash(node)
        come_back(node)
        after = {c: node.status(c) for c in (failed, done)}
        assert after == before
        assert (after[failed].exit_code, after[failed].reason) == (3, "Error")
        assert (after[done].exit_code, after[done].reason) == (0, "Completed")
        assert b"bye" in Path(after[failed].log_path).read_bytes()
    finally:
        remove(node, pod_id)
    assert_nothing_left(node)


def test_pod_whose_holder_died_during_the_outage_is_not_ready(node: CriNode) -> None:
    pod_id = node.run_pod(node.shared_pid_pod_config())
    container_id = node.run(pod_id, node.container_config("sleep", "600"))
    holder = core_pid(node, pod_id)
    assert holder > 0, "a pod that shares its pid namespace has a holder process"
    crash(node)
    holder_processes = cgroup_pids(node, pod_id) | {holder}
    for pid in holder_processes:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    come_back(node)
    deadline = time.monotonic() + 10
    while pod_status(node, pod_id).state != cri.SANDBOX_NOTREADY:
        assert time.monotonic() < deadline, "the pod is still ready without its holder"
        time.sleep(0.1)
    with pytest.raises(grpc.RpcError) as error:  # no new container in a pod without namespaces
        node.create(pod_id, node.container_config("true"))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    node.runtime.StopContainer(
        cri.StopContainerRequest(container_id=container_id, timeout=2), timeout=TIMEOUT
    )
    assert node.status(container_id).state == cri.CONTAINER_EXITED
    node.runtime.RemoveContainer(
        cri.RemoveContainerRequest(container_id=container_id), timeout=TIMEOUT
    )
    node.remove_pod(pod_id)
    assert_nothing_left(node, *holder_processes)


def test_pod_whose_holder_is_killed_while_the_service_runs_is_not_ready(node: CriNode) -> None:
    pod_id = node.run_pod(node.shared_pid_pod_config())
    try:
        holder = core_pid(node, pod_id)
        assert holder > 0, "a pod that shares its pid namespace has a holder process"
        os.kill(holder, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pod_status(node, pod_id).state != cri.SANDBOX_NOTREADY:
            assert time.monotonic() < deadline, "the pod is still ready without its holder"
            time.sleep(0.1)
    finally:
        node.remove_pod(pod_id)
    assert_nothing_left(node)


def test_pinned_pod_comes_back_with_its_namespaces(node: CriNode) -> None:
    pod_id = node.run_pod(node.pod_config(hostname="pinned-back"))
    try:
        first = node.run(pod_id, node.container_config("sleep", "600"))
        kinds = ("net", "uts", "ipc")
        before = {kind: node.pod_namespace(pod_id, kind) for kind in kinds}
        crash(node)
        come_back(node)
        assert pod_status(node, pod_id).state == cri.SANDBOX_READY
        assert {kind: node.pod_namespace(pod_id, kind) for kind in kinds} == before
        second = node.run(pod_id, node.container_config("sleep", "601"))
        for container in (first, second):
            for kind in kinds:
                inside = node.exec_sync(container, "readlink", f"/proc/self/ns/{kind}").stdout
                assert inside.decode().strip() == before[kind], (container, kind)
        assert node.exec_sync(second, "hostname").stdout.strip() == b"pinned-back"
    finally:
        remove(node, pod_id)
    assert_nothing_left(node)


def test_pinned_pod_whose_pins_went_during_the_outage_is_not_ready(node: CriNode) -> None:
    pod_id = node.run_pod()
    run_dir = node.service.state_dir / "native" / pod_id
    crash(node)
    for kind in ("uts", "ipc"):
        subprocess.run(["umount", "-l", str(run_dir / kind)], check=True, timeout=10)
    come_back(node)
    deadline = time.monotonic() + 10
    while pod_status(node, pod_id).state != cri.SANDBOX_NOTREADY:
        assert time.monotonic() < deadline, "the pod is still ready without its namespaces"
        time.sleep(0.1)
    holder = node.service.stub().Status(pb.StatusRequest(container_id=pod_id), timeout=10)
    assert holder.termination.reason == pb.LOST, holder.termination
    with pytest.raises(grpc.RpcError) as error:
        node.create(pod_id, node.container_config("true"))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    node.remove_pod(pod_id)
    assert_nothing_left(node)


def test_created_container_survives_and_starts_after_the_restart(node: CriNode) -> None:
    pod_id = node.run_pod()
    try:
        container_id = node.create(pod_id, node.container_config("sleep", "600"))
        before = node.status(container_id)
        crash(node)
        come_back(node)
        assert node.status(container_id) == before
        assert before.state == cri.CONTAINER_CREATED
        node.start(container_id)
        assert node.status(container_id).state == cri.CONTAINER_RUNNING
        assert node.exec_sync(container_id, "true").exit_code == 0
    finally:
        remove(node, pod_id)
    assert_nothing_left(node)


# ---- a crash in the middle of RunPodSandbox ----


@pytest.mark.parametrize("delay", [0.0, 0.01, 0.03, 0.06, 0.1, 0.2, 0.4])
def test_crash_during_run_pod_sandbox_leaks_nothing(node: CriNode, delay: float) -> None:
    """Whatever the moment of the crash: the pod is listed and removable, or nothing of it
    remains (holder, supervisor, cgroup, network namespace, files, core record)."""
    call = node.runtime.RunPodSandbox.future(
        cri.RunPodSandboxRequest(config=node.pod_config()), timeout=TIMEOUT
    )
    time.sleep(delay)
    crash(node)
    with contextlib.suppress(grpc.RpcError):
        call.result()
    come_back(node)
    listed = node.runtime.ListPodSandbox(cri.ListPodSandboxRequest(), timeout=TIMEOUT).items
    assert len(listed) <= 1
    for pod in listed:
        node.remove_pod(pod.id)
    assert_nothing_left(node)


@pytest.mark.parametrize("deadline", [0.01, 0.03, 0.06, 0.1])
def test_run_pod_sandbox_given_up_by_its_caller_leaks_nothing(
    node: CriNode, deadline: float
) -> None:
    """A kubelet's deadline that passes in the middle of the holder's launch: the launch is
    undone (or, if it finished, the pod is listed and removable), never left launching."""
    with contextlib.suppress(grpc.RpcError):
        node.runtime.RunPodSandbox(
            cri.RunPodSandboxRequest(config=node.pod_config()), timeout=deadline
        )
    settled = time.monotonic() + 10
    while True:
        states = {
            status.state
            for status in node.service.stub()
            .Containers(pb.ContainersRequest(), timeout=10)
            .containers
        }
        if states <= {pb.RUNNING} or time.monotonic() > settled:
            break
        time.sleep(0.1)
    assert states <= {pb.RUNNING}, "a launch the caller gave up on was left halfway"
    listed = node.runtime.ListPodSandbox(cri.ListPodSandboxRequest(), timeout=TIMEOUT).items
    assert [pod.state for pod in listed] in ([], [cri.SANDBOX_READY])
    for pod in listed:
        node.remove_pod(pod.id)
    assert_nothing_left(node)


def test_pod_containers_survive_a_crash_and_orphan_pod_cgroups_go(node: CriNode) -> None:
    """After kill -9 and a restart the pod's containers are still found (and accounted) in the
    pod's cgroup, not swept as orphans; a pod cgroup no record names is removed."""
    pod_id = node.run_pod(node.limited_pod_config(memory=96 << 20, overhead=0))
    stray = node.pod_cgroup("f" * 64)
    try:
        container_id = node.run(pod_id, node.container_config("sleep", "600"))
        stray.mkdir(parents=True)
        node.service.kill()
        node.service.start()
        node.reconnect()
        assert node.status(container_id).state == cri.CONTAINER_RUNNING
        procs = (node.pod_cgroup(pod_id) / container_id / "cgroup.procs").read_text()
        assert procs.split()
        deadline = time.monotonic() + 10
        while stray.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not stray.exists()
    finally:
        if stray.exists():
            stray.rmdir()
        node.remove_pod(pod_id)
    assert not node.pod_cgroup(pod_id).exists()
