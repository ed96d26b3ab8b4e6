"""The CNI network backend end to end on the native runtime, with Debian's real plugins (bridge,
host-local, portmap, bandwidth) from a private conf dir. Each service has its own CNI network:
a bridge named with the run id (so a killed run's is swept), a /24 no one else uses, and a
private host-local data dir."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.cri.api import cri
from isolators.network.cni_isolator import CniIsolator
from isolators.network.model import Attachment, NetworkConfig, NetworkRequest, PortMapping
from isolators.network.netns import netns_prefix
from tests.conftest import ServiceProcess, require, require_root
from tests.integration.api import destroy, scalar, usage, wait
from tests.integration.cri import TIMEOUT, CriNode
from tests.integration.test_network import (
    BUSYBOX,
    _get,
    free_port,
    launch,
    network_config,
)
from tests.run_records import run_scoped_bridge

pytestmark = pytest.mark.integration
CNI_BIN = Path("/usr/lib/cni")
PLUGINS = ("bridge", "host-local", "portmap", "bandwidth")


def write_conflist(directory: Path, bridge: str, subnet: str, data_dir: Path) -> str:
    """A CNI network of this test's own; its name."""
    name = f"ctz-test-{uuid.uuid4().hex[:8]}"
    directory.mkdir(parents=True, exist_ok=True)
    conflist = {
        "cniVersion": "1.0.0",
        "name": name,
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": subnet}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(data_dir),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
            {"type": "bandwidth", "capabilities": {"bandwidth": True}},
        ],
    }
    (directory / "10-test.conflist").write_text(json.dumps(conflist))
    return name


class CniService(ServiceProcess):
    """A service with `[network] backend = "cni"` on a CNI network of its own."""

    def __init__(self, workdir: Path, extra: str = "") -> None:
        require_root()
        require(os.path.exists(BUSYBOX), "needs busybox-static at /bin/busybox")
        require(
            all((CNI_BIN / p).is_file() for p in PLUGINS),
            "needs Debian's containernetworking-plugins",
        )
        self.bridge = run_scoped_bridge()  # ours: names our namespaces and checkpoint
        self.cni_bridge, self.subnet = network_config()
        self.conf_dir, self.ipam_dir = workdir / "net.d", workdir / "ipam"
        self.network = write_conflist(self.conf_dir, self.cni_bridge, self.subnet, self.ipam_dir)
        super().__init__(
            workdir,
            extra_config=(
                f'{extra}[network]\nbackend = "cni"\nbridge = "{self.bridge}"\n'
                f'conf_dir = "{self.conf_dir}"\ncni_network = "{self.network}"\n'
            ),
        )

    def isolator_config(self) -> NetworkConfig:
        return NetworkConfig(
            state_dir=self.state_dir,
            enabled=True,
            bridge=self.bridge,
            default_mode="bridge",
            allow_host=False,
            backend="cni",
            cni_conf_dir=self.conf_dir,
            cni_network=self.network,
        )

    def checkpoint(self) -> dict[str, dict[str, object]]:
        path = self.state_dir / "network" / f"{self.bridge}.json"
        containers: dict[str, dict[str, object]] = json.loads(path.read_text())["containers"]
        return containers

    def node_state(self) -> dict[str, object]:
        """What the network shows on the host besides the CNI bridge itself: its ports, our
        namespaces, portmap's iptables rules naming this network, host-local's leases."""
        links = json.loads(_run("ip", "-j", "link"))
        nat = _run("iptables-save", "-t", "nat")
        leases = self.ipam_dir / self.network
        return {
            "ports": sorted(i["ifname"] for i in links if i.get("master") == self.cni_bridge),
            "netns": sorted(
                n for n in os.listdir("/run/netns") if n.startswith(self.bridge + ".")
            ) if os.path.isdir("/run/netns") else [],
            "iptables": [line for line in nat.splitlines() if self.network in line],
            "leases": sorted(
                p.name for p in leases.iterdir() if p.name[0].isdigit() and p.name.count(".") == 3
            ) if leases.is_dir() else [],
        }  # fmt: skip

    def remove_network(self) -> None:
        """The CNI bridge belongs to the network, not to the service: the test's goes with it."""
        subprocess.run(["ip", "link", "delete", self.cni_bridge], capture_output=True)


def _run(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def _qdisc(link: str) -> str:
    return _run("tc", "qdisc", "show", "dev", link)


@pytest.fixture(scope="module")
def cni_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CniService]:
    process = CniService(tmp_path_factory.mktemp("cni"))
    process.start()
    yield process
    with contextlib.suppress(Exception):
        process.destroy_all()
    left = process.node_state()
    process.stop()
    process.remove_cgroup_roots()
    process.remove_network()
    assert left == {"ports": [], "netns": [], "iptables": [], "leases": []}


def test_cni_gives_an_address_and_none_gives_loopback_only(
    cni_service: CniService, container_id: str
) -> None:
    stub = cni_service.stub()
    target = launch(stub, f"{container_id}-t", "sleep 1000").status.ip_address
    assert target.rsplit(".", 1)[0] == cni_service.subnet.rsplit(".", 1)[0]
    ping = f"{BUSYBOX} ping -c 2 -W 2 {target}"
    launch(stub, f"{container_id}-b", ping)
    launch(stub, f"{container_id}-n", f"{BUSYBOX} ip -o addr; {ping}", mode="none")
    assert wait(stub, f"{container_id}-b").exit_code == 0
    assert wait(stub, f"{container_id}-n").exit_code != 0
    none_status = stub.Status(pb.StatusRequest(container_id=f"{container_id}-n"), timeout=10)
    assert none_status.ip_address == ""
    assert cni_service.checkpoint()[f"{container_id}-t"]["cni_result"]
    for suffix in ("t", "b", "n"):
        destroy(stub, f"{container_id}-{suffix}")
    assert not [c for c in cni_service.checkpoint() if c.startswith(container_id)]


def test_cni_containers_have_their_loopback_up(cni_service: CniService, container_id: str) -> None:
    """Brought up by the service whether or not the chain has the `loopback` plugin (this
    chain has not), in mode bridge and in mode none."""
    stub = cni_service.stub()
    ping = f"{BUSYBOX} ping -c 1 -W 2 127.0.0.1"
    launch(stub, f"{container_id}-b", ping)
    launch(stub, f"{container_id}-n", ping, mode="none")
    assert wait(stub, f"{container_id}-b").exit_code == 0
    assert wait(stub, f"{container_id}-n").exit_code == 0
    for suffix in ("b", "n"):
        destroy(stub, f"{container_id}-{suffix}")


def test_cni_port_mapping_reaches_127_0_0_1_and_del_removes_it(
    cni_service: CniService, container_id: str, tmp_path: Path
) -> None:
    stub = cni_service.stub()
    (tmp_path / "index.html").write_text(container_id)
    port = free_port()
    launch(
        stub, container_id, f"{BUSYBOX} httpd -f -p 8080 -h {tmp_path}",
        mappings=(f"{port}:8080/tcp",),
    )  # fmt: skip
    assert any(container_id in line for line in cni_service.node_state()["iptables"])  # type: ignore[attr-defined]
    assert _get(f"http://127.0.0.1:{port}/index.html") == container_id
    statistics = usage(stub, container_id)
    assert statistics.net_rx_packets > 0 and statistics.net_tx_bytes > len(container_id)
    destroy(stub, container_id)
    assert not any(container_id in line for line in cni_service.node_state()["iptables"])  # type: ignore[attr-defined]
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=2)


def test_cni_bandwidth_is_shaped_on_the_host_side_veth(
    cni_service: CniService, container_id: str
) -> None:
    stub = cni_service.stub()
    launch(stub, container_id, "sleep 1000", resources=(scalar("network_bandwidth", 5),))
    veth = cni_service.checkpoint()[container_id]["host_veth"]
    assert isinstance(veth, str) and "tbf" in _qdisc(veth) and "rate 5Mbit" in _qdisc(veth)
    with pytest.raises(grpc.RpcError) as refused:
        stub.Update(
            pb.UpdateRequest(
                container_id=container_id, resources=[scalar("network_bandwidth", 50)]
            ),
            timeout=10,
        )
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    destroy(stub, container_id)
    assert veth not in _run("ip", "-o", "link")


def test_cni_counters_grow_with_traffic(cni_service: CniService, container_id: str) -> None:
    stub = cni_service.stub()
    target = launch(stub, f"{container_id}-t", "sleep 1000").status.ip_address
    before = usage(stub, f"{container_id}-t")
    launch(stub, f"{container_id}-p", f"{BUSYBOX} ping -c 5 -i 0.1 -s 1000 -W 2 {target}")
    assert wait(stub, f"{container_id}-p").exit_code == 0
    after = usage(stub, f"{container_id}-t")
    assert after.net_rx_packets >= before.net_rx_packets + 5
    assert after.net_tx_bytes >= before.net_tx_bytes + 5 * 1000
    for suffix in ("t", "p"):
        destroy(stub, f"{container_id}-{suffix}")


def test_cni_readiness_names_what_is_missing(cni_service: CniService, tmp_path: Path) -> None:
    isolator = CniIsolator(cni_service.isolator_config())
    assert isolator.ready() is None
    empty = CniIsolator(NetworkConfig(tmp_path, enabled=True, backend="cni", cni_conf_dir=tmp_path))
    assert str(tmp_path) in (empty.ready() or "")
    missing = CniIsolator(
        NetworkConfig(
            tmp_path, enabled=True, backend="cni", cni_conf_dir=cni_service.conf_dir,
            cni_bin_dirs=(tmp_path,),
        )
    )  # fmt: skip
    assert "portmap" in (missing.ready() or "")


def test_cni_after_kill_9_keeps_containers_and_dels_unknown_ones(
    tmp_path: Path, container_id: str
) -> None:
    service = CniService(tmp_path)
    service.start()
    try:
        stub = service.stub()
        port, orphan_port = free_port(), free_port()
        (tmp_path / "index.html").write_text("still here")
        first = launch(
            stub, f"{container_id}-1", f"{BUSYBOX} httpd -f -p 8080 -h {tmp_path}",
            mappings=(f"{port}:8080",),
        )  # fmt: skip
        service.kill()
        # What a crash after ADD but before the core's checkpoint leaves: a network nobody knows.
        orphan = asyncio.run(_prepare_orphan(service, {f"{container_id}-1"}, orphan_port))
        assert orphan.address and orphan.host_veth
        crashed = service.node_state()
        assert orphan.host_veth in crashed["ports"]  # type: ignore[operator]
        assert any("orphan" in line for line in crashed["iptables"])  # type: ignore[attr-defined]
        assert orphan.address in crashed["leases"]  # type: ignore[operator]
        service.start()
        stub = service.stub()
        status = stub.Status(pb.StatusRequest(container_id=f"{container_id}-1"), timeout=10)
        assert status.state == pb.RUNNING and status.ip_address == first.status.ip_address
        assert _get(f"http://127.0.0.1:{port}/index.html") == "still here"
        state = service.node_state()
        assert state["ports"] == [service.checkpoint()[f"{container_id}-1"]["host_veth"]]
        assert not any("orphan" in line for line in state["iptables"])  # type: ignore[attr-defined]
        assert state["leases"] == [first.status.ip_address]
        assert len(state["netns"]) == 1  # type: ignore[arg-type]
        service.destroy_all()
        assert service.node_state() == {"ports": [], "netns": [], "iptables": [], "leases": []}
    finally:
        service.stop()
        service.remove_cgroup_roots()
        service.remove_network()
    prefix = netns_prefix(service.bridge, service.state_dir)
    assert not [n for n in os.listdir("/run/netns") if n.startswith(prefix)]


async def _prepare_orphan(service: CniService, known: set[str], port: int) -> Attachment:
    isolator = CniIsolator(service.isolator_config())
    await isolator.recover(known)  # loads the checkpoint, as the service would
    request = NetworkRequest("bridge", port_mappings=(PortMapping(port, 80),))
    return await isolator.prepare("orphan", request)


def test_cri_pods_use_the_cni_network_and_status_reports_its_readiness(tmp_path: Path) -> None:
    service = CniService(tmp_path, extra=f'cri_socket = "{tmp_path / "cri.sock"}"\n')
    service.start()
    node = CriNode(service)
    try:
        pod_id = node.run_pod(node.pod_config())
        status = node.runtime.PodSandboxStatus(
            cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id), timeout=TIMEOUT
        ).status
        assert status.network.ip.rsplit(".", 1)[0] == service.subnet.rsplit(".", 1)[0]
        assert service.node_state()["leases"] == [status.network.ip]
        assert _network_ready(node) == (True, "")
        conflist = service.conf_dir / "10-test.conflist"
        conflist.rename(tmp_path / "away.conflist")
        ready, message = _network_ready(node)
        assert not ready and str(service.conf_dir) in message
        (tmp_path / "away.conflist").rename(conflist)
        node.remove_pod(pod_id)
        assert service.node_state() == {"ports": [], "netns": [], "iptables": [], "leases": []}
    finally:
        node.close()
        service.stop()
        service.remove_cgroup_roots()
        service.remove_network()


def _network_ready(node: CriNode) -> tuple[bool, str]:
    status = node.runtime.Status(cri.StatusRequest(), timeout=TIMEOUT).status
    condition = next(c for c in status.conditions if c.type == "NetworkReady")
    return condition.status, condition.message
