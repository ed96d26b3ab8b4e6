"""Bridge networking on the docker runtime: the node's network isolator joined through a sandbox
container, on a private dockerd, beside the native runtime on one bridge of the service's own
(name and /24 unique per service, so xdist workers run side by side). Traffic stays on loopback
and on our bridge's addresses; every assertion is on what the kernel (links, namespaces,
nftables, tc), dockerd or the workload reports."""

# Fixtures are imported from tests.docker_fixtures and injected by name, which ruff reads as
# redefinition; a conftest `pytest_plugins` line would make both the imports and this go away.
# ruff: noqa: F811

from __future__ import annotations

import contextlib
import ipaddress
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.api.containerizer.v1 import containerizer_pb2_grpc as pb_grpc
from adapter.runtimes.docker.handle import LABEL_CONTAINER_ID, LABEL_OWNER, LABEL_ROLE, ROLE_SANDBOX
from isolators.network.veth import host_veth_name
from tests.docker_fixtures import (  # noqa: F401  (fixtures, injected by parameter name)
    PrivateDockerd,
    busybox_image,
    dockerd,
)
from tests.integration.api import destroy, scalar, usage, wait
from tests.integration.test_network import (
    container_state,
    etc_dirs,
    free_port,
    network_service,
    node_state,
)
from tests.integration.test_network_runtimes import get, qdisc, stdout_of

pytestmark = pytest.mark.integration
BUSYBOX = "/bin/busybox"
HTTPD = "mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 8080 -h /www"


class DockerNetworkNode:
    """A service with the docker (private dockerd) and native runtimes on a bridge of its own."""

    def __init__(self, workdir: Path, daemon: PrivateDockerd, image: str) -> None:
        self.daemon = daemon
        self.image = image
        self.service = network_service(
            workdir,
            extra=f'[runtimes.native]\n[runtimes.docker]\nendpoint = "{daemon.endpoint}"\n',
        )
        self.bridge: str = self.service.bridge  # type: ignore[attr-defined]
        self.subnet: str = self.service.subnet  # type: ignore[attr-defined]
        self.before = node_state(self.bridge)

    def stub(self) -> pb_grpc.ContainerizerStub:
        return self.service.stub()

    def launch(
        self,
        container_id: str,
        shell: str,
        *,
        runtime: str = "docker",
        mode: str = "",
        mappings: tuple[str, ...] = (),
        resources: tuple[pb.Resource, ...] = (),
    ) -> pb.LaunchResponse:
        return self.stub().Launch(
            pb.LaunchRequest(
                container_id=container_id,
                command=pb.CommandInfo(shell=shell),
                resources=list(resources),
                container=pb.ContainerInfo(
                    runtime=runtime,
                    image=self.image if runtime == "docker" else "",
                    network=pb.NetworkInfo(mode=mode, port_mappings=list(mappings)),
                ),
            ),
            timeout=120,
        )

    def docker_containers(self, container_id: str | None = None) -> list[Any]:
        """This service's containers in dockerd (workloads and sandboxes), of one id or all."""
        labels = [f"{LABEL_OWNER}={self.service.state_dir}"]
        if container_id is not None:
            labels.append(f"{LABEL_CONTAINER_ID}={container_id}")
        client = self.daemon.client()
        try:
            return list(client.containers.list(all=True, filters={"label": labels}))
        finally:
            client.close()

    def container_state(self) -> dict[str, object]:
        return container_state(self.bridge)

    def etc_dirs(self) -> list[str]:
        return etc_dirs(self.service.state_dir, self.bridge)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            if self.service.process and self.service.process.poll() is None:
                self.service.destroy_all()
        self.service.stop()
        self.service.remove_cgroup_roots()


def stop_and_check_nothing_is_left(node: DockerNetworkNode) -> None:
    node.stop()
    leftovers = node.docker_containers()
    for container in leftovers:
        container.remove(force=True)
    assert [c.name for c in leftovers] == []
    assert node_state(node.bridge) == node.before


@pytest.fixture(scope="session")
def docker_node(
    tmp_path_factory: pytest.TempPathFactory, dockerd: PrivateDockerd, busybox_image: str
) -> Iterator[DockerNetworkNode]:
    node = DockerNetworkNode(tmp_path_factory.mktemp("docker-network"), dockerd, busybox_image)
    node.service.start()
    yield node
    stop_and_check_nothing_is_left(node)


def split_by_role(containers: list[Any]) -> tuple[list[Any], list[Any]]:
    """(workloads, sandboxes)"""
    sandboxes = [c for c in containers if c.labels.get(LABEL_ROLE) == ROLE_SANDBOX]
    return [c for c in containers if c not in sandboxes], sandboxes


def test_docker_container_on_the_bridge_reaches_a_native_one(
    docker_node: DockerNetworkNode, container_id: str
) -> None:
    native = docker_node.launch(f"{container_id}-n", "sleep 1000", runtime="native")
    target = native.status.ip_address
    script = (
        "hostname > $MESOS_SANDBOX/hostname; cat /etc/hosts > $MESOS_SANDBOX/hosts;"
        f" ls /sys/class/net; ping -c 2 -W 2 {target} >/dev/null && echo reached"
    )
    pinger = docker_node.launch(f"{container_id}-d", script)
    address = pinger.status.ip_address
    assert ipaddress.IPv4Address(address) in ipaddress.IPv4Network(docker_node.subnet)
    assert address != target
    stub = docker_node.stub()
    assert wait(stub, f"{container_id}-d").exit_code == 0
    assert stdout_of(pinger).split() == ["eth0", "lo", "reached"]
    sandbox = Path(pinger.status.sandbox)
    hostname = f"{container_id}-d"[:63]
    assert (sandbox / "hostname").read_text() == f"{hostname}\n"
    assert f"{address}\t{hostname}\n" in (sandbox / "hosts").read_text()
    destroy(stub, f"{container_id}-n")
    destroy(stub, f"{container_id}-d")
    assert docker_node.docker_containers(f"{container_id}-d") == []


def test_http_server_answers_on_its_mapped_host_port_and_destroy_leaves_nothing(
    docker_node: DockerNetworkNode, container_id: str
) -> None:
    stub = docker_node.stub()
    before = docker_node.container_state()
    port = free_port()
    docker_node.launch(container_id, HTTPD, mappings=(f"{port}:8080/tcp",))
    assert get(f"http://127.0.0.1:{port}/index.html") == f"{container_id[:63]}\n"
    workloads, sandboxes = split_by_role(docker_node.docker_containers(container_id))
    assert len(workloads) == 1 and len(sandboxes) == 1
    host_config = workloads[0].attrs["HostConfig"]
    assert host_config["NetworkMode"] == f"container:{sandboxes[0].id}"
    assert not host_config.get("PortBindings")  # our nftables forward, not Docker's -p
    statistics = usage(stub, container_id)
    assert statistics.net_rx_packets > 0 and statistics.net_tx_bytes > len(container_id)
    assert statistics.mem_total_bytes > 0  # the cgroup numbers are still there
    with pytest.raises(grpc.RpcError) as taken:
        docker_node.launch(f"{container_id}-2", "sleep 1000", mappings=(f"{port}:80",))
    assert taken.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert str(port) in (taken.value.details() or "")
    assert docker_node.docker_containers(f"{container_id}-2") == []
    destroy(stub, container_id)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=2)
    assert docker_node.docker_containers(container_id) == []
    assert docker_node.container_state() == before
    assert container_id not in docker_node.etc_dirs()


def test_bandwidth_is_shaped_and_updated_live(
    docker_node: DockerNetworkNode, container_id: str
) -> None:
    stub = docker_node.stub()
    docker_node.launch(container_id, "sleep 1000", resources=(scalar("network_bandwidth", 5),))
    veth = host_veth_name(docker_node.bridge, container_id)
    assert "rate 5Mbit" in qdisc(veth)
    stub.Update(
        pb.UpdateRequest(container_id=container_id, resources=[scalar("network_bandwidth", 40)]),
        timeout=10,
    )
    assert "rate 40Mbit" in qdisc(veth)
    destroy(stub, container_id)


def test_mode_none_is_dockers_own_and_needs_no_sandbox(
    docker_node: DockerNetworkNode, container_id: str
) -> None:
    stub = docker_node.stub()
    before = docker_node.container_state()
    reply = docker_node.launch(container_id, "sleep 1000", mode="none")
    assert reply.status.ip_address == ""
    workloads, sandboxes = split_by_role(docker_node.docker_containers(container_id))
    assert sandboxes == [] and workloads[0].attrs["HostConfig"]["NetworkMode"] == "none"
    assert docker_node.container_state() == before
    destroy(stub, container_id)
    listing = docker_node.launch(f"{container_id}-ls", "ls /sys/class/net", mode="none")
    assert wait(stub, f"{container_id}-ls").exit_code == 0
    assert stdout_of(listing) == "lo\n"
    destroy(stub, f"{container_id}-ls")


def test_bad_network_input_creates_nothing(
    docker_node: DockerNetworkNode, container_id: str
) -> None:
    before = docker_node.container_state()
    with pytest.raises(grpc.RpcError) as refused:
        docker_node.launch(container_id, "true", mode="none", mappings=("30001:80",))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "port_mappings" in (refused.value.details() or "")
    with pytest.raises(grpc.RpcError) as host:
        docker_node.launch(container_id, "true", mode="host")
    assert host.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "allow_host" in (host.value.details() or "")
    with pytest.raises(grpc.RpcError) as bandwidth:
        docker_node.launch(container_id, "true", resources=(scalar("network_bandwidth", 0),))
    assert bandwidth.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert docker_node.container_state() == before
    assert docker_node.docker_containers(container_id) == []


def test_kill_9_and_restart_keep_the_address_and_mapped_port(
    tmp_path: Path, dockerd: PrivateDockerd, busybox_image: str, container_id: str
) -> None:
    node = DockerNetworkNode(tmp_path, dockerd, busybox_image)
    node.service.start()
    try:
        port = free_port()
        served = node.launch(f"{container_id}-h", HTTPD, mappings=(f"{port}:8080",))
        sleeper = node.launch(f"{container_id}-s", "sleep 1000")
        served_ids = {c.id for c in node.docker_containers(f"{container_id}-h")}
        node.service.kill()
        client = dockerd.client()
        try:  # a sandbox without a workload, as a crash between the two would leave it
            orphan = client.containers.create(
                busybox_image,
                ["sleep", "300"],
                labels={
                    LABEL_CONTAINER_ID: f"{container_id}-orphan",
                    LABEL_OWNER: str(node.service.state_dir),
                    LABEL_ROLE: ROLE_SANDBOX,
                },
                network_mode="none",
            )
            orphan.start()
        finally:
            client.close()
        node.service.start()
        stub = node.stub()
        for reply in (served, sleeper):
            status = stub.Status(
                pb.StatusRequest(container_id=reply.status.container_id), timeout=10
            )
            assert status.state == pb.RUNNING
            assert status.ip_address == reply.status.ip_address
        assert get(f"http://127.0.0.1:{port}/index.html") == f"{container_id}-h"[:63] + "\n"
        assert {c.id for c in node.docker_containers(f"{container_id}-h")} == served_ids
        assert node.docker_containers(f"{container_id}-orphan") == []
        ping = f"ping -c 1 -W 2 {sleeper.status.ip_address}"
        third = node.launch(f"{container_id}-p", ping)
        assert third.status.ip_address not in (
            served.status.ip_address,
            sleeper.status.ip_address,
        )
        assert wait(stub, f"{container_id}-p").exit_code == 0
        assert usage(stub, f"{container_id}-s").net_rx_packets > 0
        node.service.destroy_all()
        assert node.etc_dirs() == []
    finally:
        stop_and_check_nothing_is_left(node)
