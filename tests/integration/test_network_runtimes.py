"""Network isolation on the containerd and LXC runtimes, beside the native one: one service runs
all three on one bridge of its own (name and /24 unique per service, so xdist workers run side by
side), with a private containerd. Traffic stays on loopback and on our bridge's addresses. Every
assertion is on what the kernel (links, namespaces, nftables, tc) or the workload reports."""

from __future__ import annotations

import contextlib
import ipaddress
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.api.containerizer.v1 import containerizer_pb2_grpc as pb_grpc
from isolators.network.veth import host_veth_name
from tests.cgroup_roots import run_scoped_name
from tests.conftest import ServiceProcess, require, require_root
from tests.images import REFERENCE, busybox_oci_layout
from tests.integration.api import destroy, scalar, usage, wait
from tests.integration.containerd_daemon import (
    SHARED,
    ContainerdDaemon,
    containerd_available,
    containerd_config,
    import_image,
)
from tests.integration.test_lxc import require_lxc
from tests.integration.test_network import (
    container_state,
    etc_dirs,
    free_port,
    network_config,
    node_state,
)

pytestmark = pytest.mark.integration
BUSYBOX = "/bin/busybox"
# An HTTP server inside the busybox image, serving the container's id from its own root.
HTTPD = "mkdir -p /www && hostname > /www/index.html && exec /bin/busybox httpd -f -p 8080 -h /www"


@pytest.fixture(scope="session")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ContainerdDaemon]:
    require_root()
    missing = containerd_available()
    require(missing is None, str(missing))
    daemon = SHARED.acquire(lambda: tmp_path_factory.mktemp("containerd"))
    yield daemon
    SHARED.release()


class NetworkNode:
    """A service with the native, containerd and LXC runtimes on one bridge of its own."""

    def __init__(self, workdir: Path, daemon: ContainerdDaemon) -> None:
        require_lxc()
        self.daemon = daemon
        self.bridge, self.subnet = network_config()
        self.namespace = run_scoped_name("ctz")
        network = f'[network]\nbridge = "{self.bridge}"\nsubnet = "{self.subnet}"\n'
        runtimes = containerd_config(daemon, self.namespace) + "[runtimes.lxc]\n"
        self.service = ServiceProcess(workdir, extra_config=network + runtimes)
        self.before = node_state(self.bridge)
        self.image_tarball = busybox_oci_layout(workdir)

    def start(self) -> None:
        self.service.start()
        assert import_image(self.service.endpoint, self.image_tarball) == [REFERENCE]

    def stub(self) -> pb_grpc.ContainerizerStub:
        return self.service.stub()

    def stop(self) -> None:
        """Destroy what runs, stop the service, remove its containerd namespace and cgroups."""
        with contextlib.suppress(Exception):
            if self.service.process and self.service.process.poll() is None:
                self.service.destroy_all()
        self.service.stop()
        self.daemon.remove_namespace(self.namespace)
        self.service.remove_cgroup_roots()

    def state(self) -> dict[str, object]:
        return node_state(self.bridge)

    def container_state(self) -> dict[str, object]:
        return container_state(self.bridge)

    def etc_dirs(self) -> list[str]:
        return etc_dirs(self.service.state_dir, self.bridge)


@pytest.fixture(scope="session")
def node(
    tmp_path_factory: pytest.TempPathFactory, containerd: ContainerdDaemon
) -> Iterator[NetworkNode]:
    node = NetworkNode(tmp_path_factory.mktemp("network-runtimes"), containerd)
    node.start()
    yield node
    node.stop()
    assert node.state() == node.before


def launch(
    stub: pb_grpc.ContainerizerStub,
    container_id: str,
    shell: str,
    runtime: str,
    *,
    image: str = REFERENCE,
    mode: str = "",
    mappings: tuple[str, ...] = (),
    resources: tuple[pb.Resource, ...] = (),
) -> pb.LaunchResponse:
    """`image` defaults to the busybox image; "" runs LXC on its busybox base (native: the host)."""
    return stub.Launch(
        pb.LaunchRequest(
            container_id=container_id,
            command=pb.CommandInfo(shell=shell),
            resources=list(resources),
            container=pb.ContainerInfo(
                runtime=runtime,
                image=image,
                network=pb.NetworkInfo(mode=mode, port_mappings=list(mappings)),
            ),
        ),
        timeout=60,
    )


def get(url: str, attempts: int = 100) -> str:
    for _ in range(attempts):
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as reply:
            return str(reply.read().decode())
        time.sleep(0.1)
    raise AssertionError(f"{url} never answered")


def stdout_of(reply: pb.LaunchResponse) -> str:
    return (Path(reply.status.sandbox) / "stdout").read_text()


def qdisc(link: str) -> str:
    return subprocess.run(
        ["tc", "qdisc", "show", "dev", link], capture_output=True, text=True, check=True
    ).stdout


def test_containerd_lxc_and_native_containers_reach_each_other(
    node: NetworkNode, container_id: str
) -> None:
    stub = node.stub()
    before = node.container_state()
    targets = {
        "containerd": launch(stub, f"{container_id}-c", "sleep 1000", "containerd"),
        "lxc": launch(stub, f"{container_id}-l", "sleep 1000", "lxc", image=""),
        "native": launch(stub, f"{container_id}-n", "sleep 1000", "native", image=""),
    }
    addresses = {name: reply.status.ip_address for name, reply in targets.items()}
    assert len(set(addresses.values())) == 3
    assert all(
        ipaddress.IPv4Address(a) in ipaddress.IPv4Network(node.subnet) for a in addresses.values()
    )
    for runtime, image in (("containerd", REFERENCE), ("lxc", ""), ("native", "")):
        others = [address for name, address in addresses.items() if name != runtime]
        pings = " && ".join(f"{BUSYBOX} ping -c 1 -W 2 {address}" for address in others)
        launch(stub, f"{container_id}-{runtime}-ping", pings, runtime, image=image)
        assert wait(stub, f"{container_id}-{runtime}-ping").exit_code == 0, runtime
    for name, reply in targets.items():
        statistics = usage(stub, reply.status.container_id)
        assert statistics.net_rx_packets >= 2 and statistics.net_tx_packets >= 2, name
        destroy(stub, reply.status.container_id)
    for runtime in ("containerd", "lxc", "native"):
        destroy(stub, f"{container_id}-{runtime}-ping")
    assert node.container_state() == before
    assert not [d for d in node.etc_dirs() if d.startswith(container_id)]


@pytest.mark.parametrize("runtime", ["containerd", "lxc"])
def test_mode_none_has_only_loopback(node: NetworkNode, container_id: str, runtime: str) -> None:
    stub = node.stub()
    target = launch(stub, f"{container_id}-t", "sleep 1000", runtime).status.ip_address
    script = f"ls /sys/class/net; {BUSYBOX} ping -c 1 -W 1 {target} >/dev/null 2>&1; echo $?"
    reply = launch(stub, container_id, script, runtime, mode="none")
    assert reply.status.ip_address == ""
    assert wait(stub, container_id).exit_code == 0
    interfaces, ping_status = stdout_of(reply).split()
    assert interfaces == "lo" and ping_status != "0"
    destroy(stub, f"{container_id}-t")
    destroy(stub, container_id)


@pytest.mark.parametrize("runtime", ["containerd", "lxc"])
def test_http_server_answers_on_its_mapped_host_port(
    node: NetworkNode, container_id: str, runtime: str
) -> None:
    stub = node.stub()
    before = node.container_state()
    port = free_port()
    script = (
        "cat /etc/hosts > $MESOS_SANDBOX/hosts; test -f /etc/resolv.conf && echo resolv;"
        " (echo x >> /etc/hosts) 2>/dev/null || echo read-only; " + HTTPD
    )
    reply = launch(stub, container_id, script, runtime, mappings=(f"{port}:8080/tcp",))
    assert get(f"http://127.0.0.1:{port}/index.html") == f"{container_id[:63]}\n"
    assert stdout_of(reply).split() == ["resolv", "read-only"]
    hosts = (Path(reply.status.sandbox) / "hosts").read_text()
    assert f"{reply.status.ip_address}\t{container_id[:63]}\n" in hosts
    statistics = usage(stub, container_id)
    assert statistics.net_rx_packets > 0 and statistics.net_tx_bytes > len(container_id)
    assert statistics.mem_total_bytes > 0  # the cgroup numbers are still there
    with pytest.raises(grpc.RpcError) as taken:
        launch(stub, f"{container_id}-2", "sleep 1000", runtime, mappings=(f"{port}:80",))
    assert taken.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert str(port) in (taken.value.details() or "")
    destroy(stub, container_id)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=2)
    assert node.container_state() == before


@pytest.mark.parametrize("runtime", ["containerd", "lxc"])
def test_bandwidth_is_shaped_and_updated_live(
    node: NetworkNode, container_id: str, runtime: str
) -> None:
    stub = node.stub()
    launch(stub, container_id, "sleep 1000", runtime, resources=(scalar("network_bandwidth", 5),))
    veth = host_veth_name(node.bridge, container_id)
    assert "rate 5Mbit" in qdisc(veth)
    stub.Update(
        pb.UpdateRequest(container_id=container_id, resources=[scalar("network_bandwidth", 40)]),
        timeout=10,
    )
    assert "rate 40Mbit" in qdisc(veth)
    destroy(stub, container_id)


@pytest.mark.parametrize("runtime", ["containerd", "lxc"])
def test_bad_network_input_creates_nothing(
    node: NetworkNode, container_id: str, runtime: str
) -> None:
    stub = node.stub()
    before = node.container_state()
    with pytest.raises(grpc.RpcError) as refused:
        launch(stub, container_id, "true", runtime, mode="none", mappings=("30001:80",))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "port_mappings" in (refused.value.details() or "")
    with pytest.raises(grpc.RpcError) as host:
        launch(stub, container_id, "true", runtime, mode="host")
    assert host.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "allow_host" in (host.value.details() or "")
    assert node.container_state() == before
    assert not (node.service.state_dir / "lxc" / "containers" / container_id).exists()
    if runtime == "containerd":
        listed = node.daemon.lines("containers", "ls", "-q", namespace=node.namespace)
        assert container_id not in listed


def test_kill_9_and_restart_keep_the_network_and_leak_nothing(
    tmp_path: Path, containerd: ContainerdDaemon, container_id: str
) -> None:
    node = NetworkNode(tmp_path, containerd)
    node.start()
    try:
        stub = node.stub()
        port = free_port()
        served = launch(stub, f"{container_id}-c", HTTPD, "containerd", mappings=(f"{port}:8080",))
        lxc = launch(stub, f"{container_id}-l", "sleep 1000", "lxc", image="")
        short = launch(stub, f"{container_id}-s", "sleep 1", "lxc", image="")
        node.service.kill()
        time.sleep(2)  # the short one exits while nobody watches
        node.service.start()
        stub = node.stub()
        for reply in (served, lxc):
            status = stub.Status(
                pb.StatusRequest(container_id=reply.status.container_id), timeout=10
            )
            assert status.state == pb.RUNNING
            assert status.ip_address == reply.status.ip_address
        assert wait(stub, f"{container_id}-s").exit_code == 0
        assert short.status.ip_address
        assert get(f"http://127.0.0.1:{port}/index.html") == f"{container_id}-c\n"
        ping = f"{BUSYBOX} ping -c 1 -W 2 {lxc.status.ip_address}"
        third = launch(stub, f"{container_id}-p", ping, "containerd")
        assert third.status.ip_address not in (
            served.status.ip_address,
            lxc.status.ip_address,
            short.status.ip_address,
        )
        assert wait(stub, f"{container_id}-p").exit_code == 0
        node.service.destroy_all()
        assert node.etc_dirs() == []
    finally:
        node.stop()
    assert node.state() == node.before
