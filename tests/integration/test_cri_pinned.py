"""The kubelet's default pod (each container its own pid namespace) has no holder process: its
network, UTS and IPC namespaces are pinned by bind mounts in the service's run directory, its
containers join them, and the pins go with the pod. A pod that shares its pid namespace keeps
a holder process (its pid 1)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.cri.api import cri
from tests.integration.cri import (
    TIMEOUT,
    CriNode,
    cri_service,
    kubelet_default_linux,
    running_cri_node,
)

pytestmark = pytest.mark.integration

SYSCTLS = {"kernel.shmmni": "1013", "net.ipv4.ip_unprivileged_port_start": "81"}


def _pins(node: CriNode, pod_id: str) -> list[str]:
    """Mount points of the service's mount namespace under the pod's run directory."""
    run_dir = str(node.service.state_dir / "native" / pod_id)
    with open("/proc/self/mountinfo") as mountinfo:
        return [line.split()[4] for line in mountinfo if line.split()[4].startswith(run_dir)]


def node_sandbox(node: CriNode, container_id: str) -> str:
    reply = node.service.stub().Status(pb.StatusRequest(container_id=container_id), timeout=10)
    return str(reply.sandbox)


def _core_pid(node: CriNode, container_id: str) -> int:
    reply = node.service.stub().Status(pb.StatusRequest(container_id=container_id), timeout=10)
    return int(reply.pid)


def _processes_naming(text: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any(text in argument for argument in process.info["cmdline"] or ()):
            found.append(process)
    return found


def _namespace(node: CriNode, container_id: str, kind: str) -> str:
    reply = node.exec_sync(container_id, "readlink", f"/proc/self/ns/{kind}")
    return reply.stdout.decode().strip()


def test_the_kubelets_default_pod_is_pinned_and_shared_by_its_containers(
    cri_node: CriNode,
) -> None:
    host_shmmni = Path("/proc/sys/kernel/shmmni").read_text()
    linux = kubelet_default_linux()
    linux.sysctls.update(SYSCTLS)
    pod_id = cri_node.run_pod(cri_node.pod_config(hostname="pinned-host", linux=linux))
    try:
        assert _core_pid(cri_node, pod_id) == 0, "no holder process"
        assert _processes_naming(pod_id) == [], "nothing runs for the pod itself"
        assert sorted(Path(p).name for p in _pins(cri_node, pod_id)) == ["ipc", "uts"]
        sandbox = node_sandbox(cri_node, pod_id)
        assert not os.path.lexists(sandbox), "no process, no sandbox"
        first = cri_node.run(pod_id, cri_node.container_config("sleep", "611"))
        second = cri_node.run(pod_id, cri_node.container_config("sleep", "612"))
        for kind in ("net", "uts", "ipc"):
            pod = cri_node.pod_namespace(pod_id, kind)
            assert _namespace(cri_node, first, kind) == _namespace(cri_node, second, kind) == pod
        assert _namespace(cri_node, first, "pid") != _namespace(cri_node, second, "pid")
        assert cri_node.exec_sync(first, "hostname").stdout.strip() == b"pinned-host"
        for key, value in SYSCTLS.items():
            path = "/proc/sys/" + key.replace(".", "/")
            assert cri_node.exec_sync(second, "cat", path).stdout.strip() == value.encode(), key
        assert Path("/proc/sys/kernel/shmmni").read_text() == host_shmmni, "the host's is kept"
        processes = cri_node.exec_sync(second, "ps", "-o", "args").stdout
        assert b"sleep 612" in processes and b"sleep 611" not in processes, processes
    finally:
        cri_node.runtime.StopPodSandbox(
            cri.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=TIMEOUT
        )
    try:
        assert _pins(cri_node, pod_id) == [], "a stopped pod holds no namespace"
        assert list(Path("/run/netns").glob(f"*.{pod_id}")) == []
        with pytest.raises(grpc.RpcError) as error:
            cri_node.create(pod_id, cri_node.container_config("true"))
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        cri_node.remove_pod(pod_id)
    assert not (cri_node.service.state_dir / "native" / pod_id).exists()


def test_a_pod_that_shares_its_pid_namespace_has_a_holder_process(cri_node: CriNode) -> None:
    pod_id = cri_node.run_pod(cri_node.shared_pid_pod_config())
    try:
        holder = _core_pid(cri_node, pod_id)
        assert holder > 0
        assert _pins(cri_node, pod_id) == []
        assert os.path.isdir(node_sandbox(cri_node, pod_id)), "a holder process has a sandbox"
        shared = cri.LinuxContainerConfig(
            security_context=cri.LinuxContainerSecurityContext(
                namespace_options=cri.NamespaceOption(pid=cri.POD)
            )
        )
        container = cri_node.run(pod_id, cri_node.container_config("sleep", "613", linux=shared))
        assert _namespace(cri_node, container, "pid") == cri_node.pod_namespace(pod_id, "pid")
        processes = cri_node.exec_sync(container, "ps", "-o", "args").stdout
        assert b"sleep infinity" in processes, processes
    finally:
        cri_node.remove_pod(pod_id)
    assert not psutil.pid_exists(holder) or psutil.Process(holder).status() == "zombie"


def test_a_sysctl_of_the_hosts_namespaces_is_refused_and_leaves_nothing(
    cri_node: CriNode,
) -> None:
    def pods_and_pins() -> tuple[list[str], list[str]]:
        listed = cri_node.runtime.ListPodSandbox(cri.ListPodSandboxRequest(), timeout=TIMEOUT)
        return sorted(pod.id for pod in listed.items), _pins(cri_node, "")

    before = pods_and_pins()
    linux = kubelet_default_linux()
    linux.sysctls.update({"kernel.hostname": "x"})
    with pytest.raises(grpc.RpcError) as error:
        cri_node.run_pod(cri_node.pod_config(linux=linux))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sysctls" in (error.value.details() or "")
    assert pods_and_pins() == before


@pytest.fixture(scope="module")
def host_network_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CriNode]:
    """A CRI service whose node allows the host's network."""
    workdir = tmp_path_factory.mktemp("cri-host-network")
    with running_cri_node(cri_service(workdir, allow_host=True), workdir) as node:
        yield node


def test_a_host_network_pod_pins_only_its_ipc_namespace(host_network_node: CriNode) -> None:
    cri_node = host_network_node
    options = cri.NamespaceOption(network=cri.NODE, pid=cri.CONTAINER)
    linux = cri.LinuxPodSandboxConfig(
        security_context=cri.LinuxSandboxSecurityContext(namespace_options=options)
    )
    pod_id = cri_node.run_pod(cri_node.pod_config(linux=linux))
    try:
        assert [Path(p).name for p in _pins(cri_node, pod_id)] == ["ipc"]
        container = cri_node.run(pod_id, cri_node.container_config("sleep", "614"))
        for kind in ("net", "uts"):
            assert _namespace(cri_node, container, kind) == os.readlink(f"/proc/self/ns/{kind}")
        assert _namespace(cri_node, container, "ipc") == cri_node.pod_namespace(pod_id, "ipc")
        assert _namespace(cri_node, container, "ipc") != os.readlink("/proc/self/ns/ipc")
    finally:
        cri_node.remove_pod(pod_id)
    assert _pins(cri_node, pod_id) == []
