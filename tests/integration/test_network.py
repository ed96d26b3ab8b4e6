"""Network isolation end to end on the native runtime: real namespaces, veths, our bridge, tc and
nftables. Traffic stays on loopback and on our own bridge's addresses. Every service here has its
own bridge name and subnet, so xdist workers run side by side."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.api.containerizer.v1 import containerizer_pb2_grpc as pb_grpc
from isolators.network.isolator import NetworkIsolator
from isolators.network.model import NetworkConfig, NetworkRequest
from isolators.network.netns import netns_name, netns_path, netns_prefix
from tests.conftest import ServiceProcess, require, require_root, serving
from tests.integration.api import destroy, scalar, usage, wait
from tests.run_records import run_scoped_bridge

pytestmark = pytest.mark.integration
BUSYBOX = "/bin/busybox"


def network_config() -> tuple[str, str]:
    """A bridge name and a /24 that no other worker (nor the host) uses."""
    bridge = run_scoped_bridge()  # named with the run id: a killed run's bridge is swept
    used = _host_networks()
    while True:
        subnet = ipaddress.IPv4Network(
            f"10.{random.randint(200, 249)}.{random.randint(0, 255)}.0/24"
        )
        if not any(subnet.overlaps(net) for net in used):
            return bridge, str(subnet)


def _host_networks() -> list[ipaddress.IPv4Network]:
    routes = json.loads(
        subprocess.run(["ip", "-j", "route"], capture_output=True, text=True, check=True).stdout
    )
    return [
        ipaddress.IPv4Network(r["dst"]) for r in routes if r["dst"] != "default" and "/" in r["dst"]
    ]


def network_service(workdir: Path, extra: str = "") -> ServiceProcess:
    require_root()
    require(os.path.exists(BUSYBOX), "needs busybox-static at /bin/busybox")
    bridge, subnet = network_config()
    process = ServiceProcess(
        workdir, extra_config=f'[network]\nbridge = "{bridge}"\nsubnet = "{subnet}"\n{extra}'
    )
    process.bridge, process.subnet = bridge, subnet  # type: ignore[attr-defined]
    return process


# A removed container's host-side veth is detached at once and deleted by the kernel ~30 ms
# after its namespace, or by the service 2 s after the cleanup when someone holds the namespace.
DETACHED_LINK_GRACE_SECONDS = 3.0


def _links() -> list[dict[str, Any]]:
    links: list[dict[str, Any]] = json.loads(
        subprocess.run(
            ["ip", "-j", "-d", "link"], capture_output=True, text=True, check=True
        ).stdout
    )
    return links


def _detached_links(bridge: str, links: list[dict[str, Any]]) -> list[str]:
    """Host sides of `bridge` (by their ifalias) on no bridge: removed containers' ones."""
    prefix = f"containerizer {bridge} "
    return [
        link["ifname"]
        for link in links
        if "master" not in link and link.get("ifalias", "").startswith(prefix)
    ]


def settled_links(bridge: str) -> list[dict[str, Any]]:
    """The host's links once the detached host sides of `bridge` are gone, or after the grace
    period: one still there then is a leak, and shows in what the caller compares."""
    deadline = time.monotonic() + DETACHED_LINK_GRACE_SECONDS
    links = _links()
    while _detached_links(bridge, links) and time.monotonic() < deadline:
        time.sleep(0.02)
        links = _links()
    return links


def node_state(bridge: str) -> dict[str, object]:
    """What of ours the host shows: links on or named like our bridge, namespaces, nft table."""
    links = settled_links(bridge)
    ours = sorted(
        link["ifname"]
        for link in links
        if bridge in (link["ifname"], link.get("master")) or bridge in link.get("ifalias", "")
    )
    namespaces = (
        sorted(n for n in os.listdir("/run/netns") if n.startswith(bridge + "."))
        if os.path.isdir("/run/netns")
        else []
    )
    table = subprocess.run(
        ["nft", "list", "table", "inet", "containerizer_" + bridge.replace("-", "_")],
        capture_output=True,
        text=True,
    )
    return {
        "links": ours,
        "netns": namespaces,
        "nft": table.stdout if table.returncode == 0 else "",
    }


def container_state(bridge: str) -> dict[str, object]:
    """`node_state` without the bridge itself, which stays while the service runs."""
    state = node_state(bridge)
    links = state["links"]
    assert isinstance(links, list)
    state["links"] = [link for link in links if link != bridge]
    return state


def etc_dirs(state_dir: Path, bridge: str) -> list[str]:
    """The network isolator's per-container /etc files directories still on disk."""
    root = state_dir / "network" / f"{bridge}.etc"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


@pytest.fixture(scope="session")
def net_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    process = network_service(tmp_path_factory.mktemp("network"))
    before = node_state(process.bridge)  # type: ignore[attr-defined]
    yield from serving(process)
    assert node_state(process.bridge) == before  # type: ignore[attr-defined]


def launch(
    stub: pb_grpc.ContainerizerStub,
    container_id: str,
    shell: str,
    *,
    mode: str = "",
    mappings: tuple[str, ...] = (),
    resources: tuple[pb.Resource, ...] = (),
    timeout: float = 30,
) -> pb.LaunchResponse:
    return stub.Launch(
        pb.LaunchRequest(
            container_id=container_id,
            command=pb.CommandInfo(shell=shell),
            resources=list(resources),
            container=pb.ContainerInfo(
                network=pb.NetworkInfo(mode=mode, port_mappings=list(mappings))
            ),
        ),
        timeout=timeout,
    )


def free_port() -> int:
    return random.randint(20000, 45000)


def test_bridge_containers_reach_each_other_and_none_cannot(
    net_service: ServiceProcess, container_id: str
) -> None:
    stub = net_service.stub()
    target = launch(stub, f"{container_id}-t", "sleep 1000").status.ip_address
    assert ipaddress.IPv4Address(target) in ipaddress.IPv4Network(net_service.subnet)  # type: ignore[attr-defined]
    ping = f"{BUSYBOX} ping -c 2 -W 2 {target}"
    launch(stub, f"{container_id}-b", ping)
    launch(stub, f"{container_id}-n", ping, mode="none")
    assert wait(stub, f"{container_id}-b").exit_code == 0
    assert wait(stub, f"{container_id}-n").exit_code != 0
    none_status = stub.Status(pb.StatusRequest(container_id=f"{container_id}-n"), timeout=10)
    assert none_status.ip_address == ""
    for suffix in ("t", "b", "n"):
        destroy(stub, f"{container_id}-{suffix}")


def test_mapped_port_reaches_http_server(
    net_service: ServiceProcess, container_id: str, tmp_path: Path
) -> None:
    stub = net_service.stub()
    (tmp_path / "index.html").write_text(container_id)
    port = free_port()
    launch(
        stub,
        container_id,
        f"{BUSYBOX} httpd -f -p 8080 -h {tmp_path}",
        mappings=(f"{port}:8080/tcp",),
    )
    body = _get(f"http://127.0.0.1:{port}/index.html")
    assert body == container_id
    statistics = usage(stub, container_id)
    assert statistics.net_rx_packets > 0 and statistics.net_tx_bytes > len(container_id)
    destroy(stub, container_id)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=2)


def _get(url: str, attempts: int = 50) -> str:
    for _ in range(attempts):
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as reply:
            return reply.read().decode()
        time.sleep(0.1)
    raise AssertionError(f"{url} never answered")


def test_second_container_on_same_host_port_is_refused(
    net_service: ServiceProcess, container_id: str
) -> None:
    stub = net_service.stub()
    port = free_port()
    launch(stub, f"{container_id}-1", "sleep 1000", mappings=(f"{port}:80",))
    with pytest.raises(grpc.RpcError) as refused:
        launch(stub, f"{container_id}-2", "sleep 1000", mappings=(f"{port}:81/tcp",))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert str(port) in (refused.value.details() or "")
    prefix = netns_prefix(net_service.bridge, net_service.state_dir)  # type: ignore[attr-defined]
    assert not netns_path(prefix, f"{container_id}-2").exists()
    launch(stub, f"{container_id}-3", "sleep 1000", mappings=(f"{port}:80/udp",))  # other protocol
    for suffix in ("1", "3"):
        destroy(stub, f"{container_id}-{suffix}")


@pytest.mark.parametrize(
    ("network", "resources", "field"),
    [
        (pb.NetworkInfo(mode="vlan"), (), "container.network.mode"),
        (pb.NetworkInfo(port_mappings=["8080"]), (), "port_mappings[0]"),
        (pb.NetworkInfo(port_mappings=["0:80"]), (), "port_mappings[0]"),
        (pb.NetworkInfo(port_mappings=["30000:70000/tcp"]), (), "port_mappings[0]"),
        (pb.NetworkInfo(port_mappings=["30000:80/sctp"]), (), "port_mappings[0]"),
        (pb.NetworkInfo(port_mappings=["80:80"]), (), "container.network.port_mappings"),
        (pb.NetworkInfo(), (scalar("network_bandwidth", 0),), "network_bandwidth"),
        (pb.NetworkInfo(), (scalar("network_bandwidth", float("nan")),), "network_bandwidth"),
        (pb.NetworkInfo(mode="none", port_mappings=["30001:80"]), (), "port_mappings"),
    ],
)
def test_bad_network_input_is_refused_and_creates_nothing(
    net_service: ServiceProcess, container_id: str, network: pb.NetworkInfo,
    resources: tuple[pb.Resource, ...], field: str,
) -> None:  # fmt: skip
    stub = net_service.stub()
    before = node_state(net_service.bridge)  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as refused:
        stub.Launch(
            pb.LaunchRequest(
                container_id=container_id, command=pb.CommandInfo(shell="sleep 1000"),
                resources=list(resources), container=pb.ContainerInfo(network=network),
            ),
            timeout=30,
        )  # fmt: skip
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (refused.value.details() or "")
    assert node_state(net_service.bridge) == before  # type: ignore[attr-defined]


def test_host_mode_needs_the_config_to_allow_it(
    net_service: ServiceProcess, container_id: str
) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        launch(net_service.stub(), container_id, "true", mode="host")
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "allow_host" in (refused.value.details() or "")


TRANSFER_MBIT = 20.0


def _measured_mbit(
    stub: pb_grpc.ContainerizerStub, container_id: str, server: str, size: int
) -> float:
    """Download `size` bytes from `server` inside container `container_id` and time it there."""
    script = (
        f"s=$(cut -d' ' -f1 /proc/uptime); {BUSYBOX} wget -q -O /dev/null http://{server}:8080/blob"
        f" && e=$(cut -d' ' -f1 /proc/uptime) && echo $s $e"
    )
    reply = launch(
        stub, container_id, script, resources=(scalar("network_bandwidth", TRANSFER_MBIT),)
    )
    assert wait(stub, container_id).exit_code == 0
    start, end = map(float, (Path(reply.status.sandbox) / "stdout").read_text().split())
    destroy(stub, container_id)
    return size * 8 / (end - start) / 1e6


def test_bandwidth_limit_holds_between_two_containers(
    net_service: ServiceProcess, container_id: str, tmp_path: Path
) -> None:
    stub = net_service.stub()
    size = int(TRANSFER_MBIT * 1e6 / 8 * 3)  # three seconds at the limit
    (tmp_path / "blob").write_bytes(os.urandom(size))
    server = launch(stub, f"{container_id}-s", f"{BUSYBOX} httpd -f -p 8080 -h {tmp_path}")
    address = server.status.ip_address
    time.sleep(0.3)
    measured = _measured_mbit(stub, f"{container_id}-c", address, size)
    assert TRANSFER_MBIT * 0.8 <= measured <= TRANSFER_MBIT * 1.2, measured
    destroy(stub, f"{container_id}-s")


def test_update_changes_the_rate_of_a_running_container(
    net_service: ServiceProcess, container_id: str
) -> None:
    stub = net_service.stub()
    reply = launch(stub, container_id, "sleep 1000", resources=(scalar("network_bandwidth", 5),))
    veth = _host_veth(net_service.bridge, container_id)  # type: ignore[attr-defined]
    assert "rate 5Mbit" in _qdisc(veth)
    stub.Update(
        pb.UpdateRequest(container_id=container_id, resources=[scalar("network_bandwidth", 50)]),
        timeout=10,
    )
    assert "rate 50Mbit" in _qdisc(veth)
    assert any(
        r.name == "network_bandwidth" and r.scalar.value == 50
        for r in stub.Status(pb.StatusRequest(container_id=container_id), timeout=10).resources
    )
    assert reply.status.ip_address
    destroy(stub, container_id)


def _host_veth(bridge: str, container_id: str) -> str:
    from isolators.network.veth import host_veth_name

    return host_veth_name(bridge, container_id)


def _qdisc(link: str) -> str:
    return subprocess.run(
        ["tc", "qdisc", "show", "dev", link], capture_output=True, text=True
    ).stdout


def test_counters_grow_with_traffic(net_service: ServiceProcess, container_id: str) -> None:
    stub = net_service.stub()
    target = launch(stub, f"{container_id}-t", "sleep 1000").status.ip_address
    before = usage(stub, f"{container_id}-t")
    launch(stub, f"{container_id}-p", f"{BUSYBOX} ping -c 5 -i 0.1 -s 1000 -W 2 {target}")
    assert wait(stub, f"{container_id}-p").exit_code == 0
    after = usage(stub, f"{container_id}-t")
    assert after.net_rx_packets >= before.net_rx_packets + 5
    assert after.net_tx_packets >= before.net_tx_packets + 5
    assert after.net_rx_bytes >= before.net_rx_bytes + 5 * 1000
    assert after.net_tx_bytes >= before.net_tx_bytes + 5 * 1000
    for field in ("net_rx_errors", "net_rx_dropped", "net_tx_errors", "net_tx_dropped"):
        assert after.HasField(field)
    destroy(stub, f"{container_id}-t")


def test_hundred_launches_leave_nothing_behind(
    net_service: ServiceProcess, container_id: str
) -> None:
    stub = net_service.stub()
    bridge = net_service.bridge  # type: ignore[attr-defined]
    # The bridge is made by the first launch of the service and stays: take the "before" with it.
    launch(stub, f"{container_id}-warm", "true")
    destroy(stub, f"{container_id}-warm")
    before = node_state(bridge)
    addresses = set()
    for index in range(100):
        reply = launch(stub, f"{container_id}-{index}", "sleep 1000")
        addresses.add(reply.status.ip_address)
        destroy(stub, f"{container_id}-{index}")
        stub.Destroy(pb.DestroyRequest(container_id=f"{container_id}-{index}"), timeout=10)
    assert len(addresses) == 100  # the IPAM cursor moves on: no address reused at once
    assert node_state(bridge) == before
    state = json.loads((net_service.state_dir / "network" / f"{bridge}.json").read_text())
    assert not [c for c in state["containers"] if c.startswith(container_id)]


def test_kill_9_and_restart_keep_addresses_and_leak_nothing(
    tmp_path: Path, container_id: str
) -> None:
    service = network_service(tmp_path)
    bridge = service.bridge  # type: ignore[attr-defined]
    before = node_state(bridge)
    service.start()
    try:
        stub = service.stub()
        port = free_port()
        (tmp_path / "index.html").write_text("still here")
        first = launch(
            stub,
            f"{container_id}-1",
            f"{BUSYBOX} httpd -f -p 8080 -h {tmp_path}",
            mappings=(f"{port}:8080",),
        )
        second = launch(stub, f"{container_id}-2", "sleep 1000")
        service.kill()
        # What a crash mid-launch leaves: a namespace and a veth on the bridge nobody checkpointed.
        orphan = netns_name(netns_prefix(bridge, service.state_dir), "orphan")
        subprocess.run(["ip", "netns", "add", orphan], check=True)
        subprocess.run(
            [
                "ip",
                "link",
                "add",
                "vzorphan",
                "master",
                bridge,
                "type",
                "veth",
                "peer",
                "name",
                "vzorphan-p",
            ],
            check=True,
        )
        # And a host side that a cleanup detached and the dead service never deleted.
        subprocess.run(
            ["ip", "link", "add", "vzdetached", "type", "veth", "peer", "name", "vzdetached-p"],
            check=True,
        )
        subprocess.run(
            ["ip", "link", "set", "vzdetached", "alias", f"containerizer {bridge} gone"], check=True
        )
        service.start()
        stub = service.stub()
        for reply in (first, second):
            status = stub.Status(
                pb.StatusRequest(container_id=reply.status.container_id), timeout=10
            )
            assert status.state == pb.RUNNING and status.ip_address == reply.status.ip_address
        assert not Path(f"/run/netns/{orphan}").exists()
        assert "vzorphan" not in node_state(bridge)["links"]
        assert _link("vzdetached") is None
        third = launch(stub, f"{container_id}-3", "sleep 1000").status.ip_address
        assert third not in (first.status.ip_address, second.status.ip_address)
        assert _get(f"http://127.0.0.1:{port}/index.html") == "still here"
        service.destroy_all()
    finally:
        service.stop()
        service.remove_cgroup_roots()
    assert node_state(bridge) == before


def _link(name: str) -> dict[str, Any] | None:
    found = subprocess.run(["ip", "-j", "-d", "link", "show", name], capture_output=True, text=True)
    if found.returncode != 0:
        return None
    link: dict[str, Any] = json.loads(found.stdout)[0]
    return link


@contextlib.contextmanager
def namespace_held(service: ServiceProcess, container_id: str) -> Iterator[None]:
    """A process outside the service holding the container's network namespace open."""
    prefix = netns_prefix(service.bridge, service.state_dir)  # type: ignore[attr-defined]
    path = netns_path(prefix, container_id)
    holder = subprocess.Popen(["nsenter", f"--net={path}", "sleep", "60"])
    try:
        deadline = time.monotonic() + 5
        while os.readlink(f"/proc/{holder.pid}/ns/net") == os.readlink("/proc/self/ns/net"):
            assert time.monotonic() < deadline, "nsenter never entered the namespace"
            time.sleep(0.01)
        yield
    finally:
        holder.kill()
        holder.wait()


def test_held_namespace_leaves_its_veth_detached_and_down_then_deleted(
    net_service: ServiceProcess, container_id: str
) -> None:
    """Destroy detaches the host side at once, whoever holds the namespace; the kernel cannot
    delete a pair whose namespace lives on, so the service deletes it after a while."""
    stub = net_service.stub()
    bridge = net_service.bridge  # type: ignore[attr-defined]
    veth = _host_veth(bridge, container_id)
    launch(stub, container_id, "sleep 1000")
    with namespace_held(net_service, container_id):
        destroy(stub, container_id)
        detached = _link(veth)
        assert detached is not None, "the held namespace keeps the pair"
        assert "master" not in detached and "UP" not in detached["flags"]
        time.sleep(0.5)
        assert _link(veth) is not None  # not the kernel's doing: the namespace is alive
        deadline = time.monotonic() + DETACHED_LINK_GRACE_SECONDS
        while _link(veth) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _link(veth) is None
    assert container_state(bridge)["links"] == []


def test_stop_deletes_the_detached_veth_of_a_held_namespace(
    tmp_path: Path, container_id: str
) -> None:
    service = network_service(tmp_path)
    bridge = service.bridge  # type: ignore[attr-defined]
    before = node_state(bridge)
    service.start()
    try:
        stub = service.stub()
        launch(stub, container_id, "sleep 1000")
        with namespace_held(service, container_id):
            destroy(stub, container_id)
            assert _link(_host_veth(bridge, container_id)) is not None
            service.stop()
            assert _link(_host_veth(bridge, container_id)) is None
    finally:
        service.stop()
        service.remove_cgroup_roots()
    assert node_state(bridge) == before


def test_same_id_relaunched_at_once_gets_a_working_network(
    net_service: ServiceProcess, container_id: str
) -> None:
    """A launch right after the destroy of the same id finds the old host side (same name) not
    yet deleted; every other round holds the old namespace so that it surely is still there."""
    stub = net_service.stub()
    bridge = net_service.bridge  # type: ignore[attr-defined]
    gateway = ipaddress.IPv4Network(net_service.subnet)[1]  # type: ignore[attr-defined]
    veth = _host_veth(bridge, container_id)
    with contextlib.ExitStack() as holders:
        for round_ in range(10):
            launch(stub, container_id, "sleep 1000")
            if round_ % 2:
                holders.enter_context(namespace_held(net_service, container_id))
            destroy(stub, container_id)
            if round_ % 2:
                assert _link(veth) is not None
            ping = f"{BUSYBOX} ping -c 1 -W 2 {gateway} && echo reached && exec sleep 1000"
            reply = launch(stub, container_id, ping)
            relaunched = _link(veth)
            assert relaunched is not None and relaunched.get("master") == bridge
            _wait_for_output(Path(reply.status.sandbox) / "stdout", "reached")
            destroy(stub, container_id)
    assert container_state(bridge)["links"] == []


def _wait_for_output(path: Path, text: str, seconds: float = 5) -> None:
    deadline = time.monotonic() + seconds
    while text not in (path.read_text() if path.exists() else ""):
        assert time.monotonic() < deadline, f"{path} never said {text!r}"
        time.sleep(0.02)


def _addresses(link: str) -> list[str]:
    shown = json.loads(
        subprocess.run(
            ["ip", "-j", "addr", "show", "dev", link], capture_output=True, text=True, check=True
        ).stdout
    )
    inet = [a for a in shown[0]["addr_info"] if a["family"] == "inet"]
    return [f"{a['local']}/{a['prefixlen']}" for a in inet]


def _master(link: str) -> str | None:
    shown = json.loads(
        subprocess.run(
            ["ip", "-j", "link", "show", "dev", link], capture_output=True, text=True, check=True
        ).stdout
    )
    master: str | None = shown[0].get("master")
    return master


async def test_a_bridge_deleted_between_two_attaches_is_made_again(tmp_path: Path) -> None:
    """The isolator remembers the bridge it made; one deleted behind its back (by an operator)
    is made again, address and all, by the next attach, whose veth lands on it."""
    require_root()
    require(os.path.exists(BUSYBOX), "needs busybox-static at /bin/busybox")
    name, subnet = network_config()
    config = NetworkConfig(
        state_dir=tmp_path, enabled=True, bridge=name, subnet=subnet,
        default_mode="bridge", allow_host=False,
    )  # fmt: skip
    isolator = NetworkIsolator(config)
    gateway = f"{config.gateway}/{config.network.prefixlen}"
    try:
        await isolator.prepare("first", NetworkRequest("bridge"))
        assert _addresses(name) == [gateway]
        subprocess.run(["ip", "link", "del", name], check=True)
        second = await isolator.prepare("second", NetworkRequest("bridge"))
        assert _addresses(name) == [gateway]
        assert second.host_veth is not None and _master(second.host_veth) == name
        route_localnet = Path(f"/proc/sys/net/ipv4/conf/{name}/route_localnet")
        assert route_localnet.read_text() == "1\n"
        assert second.netns_path is not None
        reached = subprocess.run(
            ["ip", "netns", "exec", Path(second.netns_path).name,
             BUSYBOX, "ping", "-c", "1", "-W", "2", str(config.gateway)],
            capture_output=True, text=True,
        )  # fmt: skip
        assert reached.returncode == 0, reached.stdout + reached.stderr
    finally:
        for container_id in ("first", "second"):
            await isolator.cleanup(container_id)
        await isolator.close()
        subprocess.run(["ip", "link", "del", name], capture_output=True)
