"""CRI pods on the docker runtime (runtime_handler "docker"), against a real service and the
suite's private dockerd: the pod's holder is a docker container (Docker joins only its own
containers' namespaces), and the pod's containers join it by `container:<id>`."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator

import grpc
import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.cri.api import cri
from tests.conftest import ServiceProcess
from tests.docker_fixtures import PrivateDockerd, build_busybox_image, dockerd
from tests.integration.cri import TIMEOUT, CriNode, import_busybox
from tests.integration.test_network import network_config

__all__ = ["dockerd"]  # the shared session fixture, used by name
pytestmark = pytest.mark.integration

HANDLER = "docker"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, dockerd: PrivateDockerd) -> Iterator[CriNode]:
    workdir = tmp_path_factory.mktemp("cri-docker")
    bridge, subnet = network_config()
    service = ServiceProcess(
        workdir,
        extra_config=(
            f'cri_socket = "{workdir / "cri.sock"}"\n'
            f'[network]\nbridge = "{bridge}"\nsubnet = "{subnet}"\n'
            f'[runtimes.native]\n[runtimes.docker]\nendpoint = "{dockerd.endpoint}"\n'
        ),
    )
    service.start()
    cri_node = CriNode(service)
    try:
        # The same image by the same name in our store (CRI's ImageService) and in dockerd.
        import_busybox(service, workdir)
        build_busybox_image(dockerd, cri_node.image)
        yield cri_node
    finally:
        with contextlib.suppress(Exception):
            if service.process is None or service.process.poll() is not None:
                service.start()
            cri_node.reconnect()
            cri_node.remove_all_pods()
        cri_node.close()
        with contextlib.suppress(Exception):
            service.destroy_all()
        service.stop()
        service.remove_cgroup_roots()


@contextlib.contextmanager
def docker_pod(node: CriNode, **fields: object) -> Iterator[str]:
    pod_id = node.run_pod(node.pod_config("", **fields), runtime_handler=HANDLER)
    try:
        yield pod_id
    finally:
        node.remove_pod(pod_id)


def _record(node: CriNode, container_id: str) -> pb.ContainerStatus:
    status: pb.ContainerStatus = node.service.stub().Status(
        pb.StatusRequest(container_id=container_id), timeout=TIMEOUT
    )
    return status


def _ours(daemon: PrivateDockerd, node: CriNode) -> list[str]:
    """Names of the docker containers this service owns (labelled with its state dir)."""
    client = daemon.client()
    try:
        label = f"org.containerizer.state-dir={node.service.state_dir}"
        return [c.name for c in client.containers.list(all=True, filters={"label": label})]
    finally:
        client.close()


def _reachable(node: CriNode, client: str, port: int) -> cri.ExecSyncResponse:
    deadline = time.monotonic() + 10
    while True:
        reply = node.exec_sync(client, "sh", "-c", f"echo | nc 127.0.0.1 {port}")
        if reply.exit_code == 0 or time.monotonic() > deadline:
            return reply
        time.sleep(0.1)


def _pod_ip(node: CriNode, pod_id: str) -> str:
    reply = node.runtime.PodSandboxStatus(
        cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id), timeout=TIMEOUT
    )
    return str(reply.status.network.ip)


def test_containers_share_the_docker_holders_network_ipc_and_hostname(
    node: CriNode, dockerd: PrivateDockerd
) -> None:
    with docker_pod(node, hostname="docker-pod") as pod_id:
        server = node.run(pod_id, node.container_config("httpd", "-f", "-p", "8080"))
        client = node.run(pod_id, node.container_config("sleep", "600"))
        assert {_record(node, c).runtime for c in (pod_id, server, client)} == {HANDLER}
        # One network: localhost reaches the other container, and both have the pod's address.
        reply = _reachable(node, client, 8080)
        assert reply.exit_code == 0, reply.stderr
        address = _pod_ip(node, pod_id)
        assert address
        for container in (server, client):
            addresses = node.exec_sync(container, "ip", "-4", "-o", "addr").stdout.decode()
            assert f"{address}/" in addresses, addresses
        # One IPC namespace and the pod's hostname.
        for kind in ("net", "ipc"):
            links = {
                node.exec_sync(c, "readlink", f"/proc/self/ns/{kind}").stdout
                for c in (server, client)
            }
            assert len(links) == 1, (kind, links)
        assert node.exec_sync(client, "hostname").stdout.strip() == b"docker-pod"
        # Placed in the pod's cgroup, as on every runtime.
        pod_cgroup = node.pod_cgroup(pod_id)
        assert any(pod_cgroup.glob(f"{client}/*/cgroup.procs")), list(pod_cgroup.iterdir())
        assert node.status(server).state == cri.CONTAINER_RUNNING
    # Stop and remove leave nothing: no docker container of ours, no pod cgroup.
    assert _ours(dockerd, node) == []
    assert not node.pod_cgroup(pod_id).exists()
    # Nothing below our root but the (empty) directory of pods, in every hierarchy.
    leftovers = []
    for path in node.service.leftover_cgroups():
        below = [child for child in path.iterdir() if child.is_dir()]
        leftovers += below if path.name == "_pods" else [path]
    assert leftovers == []


def test_a_container_pid_namespace_of_its_own(node: CriNode) -> None:
    own = cri.LinuxContainerConfig(
        security_context=cri.LinuxContainerSecurityContext(
            namespace_options=cri.NamespaceOption(pid=cri.CONTAINER)
        )
    )
    with docker_pod(node) as pod_id:
        container = node.run(pod_id, node.container_config("sleep", "601", linux=own))
        processes = node.exec_sync(container, "ps", "-o", "args").stdout
        assert b"sleep 601" in processes and b"sleep infinity" not in processes, processes
        shared = node.run(pod_id, node.container_config("sleep", "603"))
        processes = node.exec_sync(shared, "ps", "-o", "args").stdout
        assert b"sleep infinity" in processes, processes  # the pod's: the holder is in sight


def test_pod_and_containers_come_back_after_kill_9(node: CriNode, dockerd: PrivateDockerd) -> None:
    with docker_pod(node) as pod_id:
        first = node.run(pod_id, node.container_config("sleep", "600"))
        node.service.kill()
        node.service.start()
        node.reconnect()
        assert node.status(first).state == cri.CONTAINER_RUNNING
        # The holder is found again among the driver's own containers: a new container joins it.
        second = node.run(pod_id, node.container_config("sleep", "602"))
        links = {node.exec_sync(c, "readlink", "/proc/self/ns/net").stdout for c in (first, second)}
        assert len(links) == 1, links
    assert _ours(dockerd, node) == []


def test_status_says_how_each_handler_runs_pods(node: CriNode) -> None:
    reply = node.runtime.Status(cri.StatusRequest(verbose=True), timeout=TIMEOUT)
    handlers = json.loads(reply.info["config"])["runtimeHandlers"]
    assert "its own container" in handlers[HANDLER]
    assert "a native process" in handlers["native"]


def test_a_stopped_pod_takes_no_containers(node: CriNode) -> None:
    with docker_pod(node) as pod_id:
        node.runtime.StopPodSandbox(
            cri.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=TIMEOUT
        )
        with pytest.raises(grpc.RpcError) as error:
            node.create(pod_id, node.container_config("sleep", "1"))
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
