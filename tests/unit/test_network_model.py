"""Network isolator policy without namespaces: IPAM, port mappings, nft rendering, checkpoint,
request checks, and the API-edge validation of network fields."""

from __future__ import annotations

import ipaddress
import math
import os
from pathlib import Path

import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.core.config import parse_config
from adapter.core.errors import ConfigError, InvalidArgument
from adapter.server import validation
from isolators.network import ports, state
from isolators.network.ipam import AddressPool
from isolators.network.isolator import NetworkIsolator
from isolators.network.model import (
    Attachment,
    InvalidNetworkRequest,
    NetworkConfig,
    NetworkRequest,
    NetworkUnavailable,
    PortConflict,
    PortMapping,
)

SUBNET = ipaddress.IPv4Network("10.210.3.0/29")  # hosts .1-.6: gateway .1, containers .2-.6


def test_pool_skips_gateway_and_moves_on_after_the_last_address() -> None:
    pool = AddressPool(SUBNET)
    first = pool.allocate([])
    assert str(first) == "10.210.3.2" and str(pool.gateway) == "10.210.3.1"
    second = pool.allocate([first], after=first)
    assert str(second) == "10.210.3.3"
    # .2 is free again, but the cursor continues after .3 rather than reusing .2 at once.
    assert str(pool.allocate([second], after=second)) == "10.210.3.4"


def test_pool_wraps_around_and_reports_exhaustion() -> None:
    pool = AddressPool(SUBNET)
    used = [ipaddress.IPv4Address(f"10.210.3.{n}") for n in (2, 3, 4, 6)]
    assert str(pool.allocate(used, after=ipaddress.IPv4Address("10.210.3.6"))) == "10.210.3.5"
    with pytest.raises(NetworkUnavailable, match="no free address"):
        pool.allocate([*used, ipaddress.IPv4Address("10.210.3.5")])


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    attachment = Attachment(
        "c1", "bridge", netns_path="/run/netns/b.c1", address="10.210.3.2", prefix_len=29,
        gateway="10.210.3.1", host_veth="vzabc", port_mappings=(PortMapping(30000, 80, "udp"),),
        bandwidth_mbit=12.5,
    )  # fmt: skip
    path = tmp_path / "network" / "b.json"
    state.save(path, state.NetworkState({"c1": attachment}, "10.210.3.2"))
    loaded = state.load(path)
    assert loaded.attachments == {"c1": attachment} and loaded.last_address == "10.210.3.2"
    assert state.load(tmp_path / "absent.json").attachments == {}


def test_a_removal_is_saved_whole_without_the_directory_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A removal's save syncs the file, not the directory: what a power loss can leave is
    either save, whole (recovery redoes a lost removal)."""
    path = tmp_path / "b.json"
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    attachment = Attachment("c1", "none", netns_path="/run/netns/b.c1")
    state.save(path, state.NetworkState({"c1": attachment}, None))
    assert len(synced) == 2  # the file, then the directory
    synced.clear()
    state.save(path, state.NetworkState({}, None), durable=False)
    assert len(synced) == 1  # the file only
    assert state.load(path).attachments == {}
    assert not (tmp_path / "b.json.tmp").exists()


def test_render_forwards_loopback_and_host_address_and_masquerades_loopback() -> None:
    commands = ports.render(
        bridge="ctz-x", subnet=SUBNET, host_address="192.0.2.9",
        forwards=[ports.Forward(30000, "tcp", "10.210.3.2", 80)], egress_nat=False,
    )  # fmt: skip
    rules = [c["add"]["rule"] for c in commands if "rule" in c.get("add", {})]
    output = [r for r in rules if r["chain"] == "output"]
    assert output[0]["expr"][0]["match"]["right"] == {"set": ["127.0.0.1", "192.0.2.9"]}
    assert output[0]["expr"][2] == {"dnat": {"family": "ip", "addr": "10.210.3.2", "port": 80}}
    assert [r["chain"] for r in rules] == ["output", "prerouting", "postrouting"]
    assert all(r["table"] == "containerizer_ctz_x" for r in rules)


def test_render_without_forwards_only_deletes_our_table() -> None:
    commands = ports.render(
        bridge="ctz-x", subnet=SUBNET, host_address=None, forwards=[], egress_nat=False
    )
    assert commands == [
        {"add": {"table": {"family": "inet", "name": "containerizer_ctz_x"}}},
        {"delete": {"table": {"family": "inet", "name": "containerizer_ctz_x"}}},
    ]


def _isolator(tmp_path: Path, **options: object) -> NetworkIsolator:
    config = NetworkConfig(
        state_dir=tmp_path, enabled=True, bridge="ctz-u", subnet=str(SUBNET),
        default_mode="bridge", allow_host=False, **options,  # type: ignore[arg-type]
    )  # fmt: skip
    return NetworkIsolator(config)


def test_request_checks(tmp_path: Path) -> None:
    isolator = _isolator(tmp_path)
    assert isolator.resolve("a", NetworkRequest()) == ("bridge", [])
    with pytest.raises(InvalidNetworkRequest, match="unknown mode"):
        isolator.resolve("a", NetworkRequest(mode="macvlan"))
    with pytest.raises(NetworkUnavailable, match="allow_host"):
        isolator.resolve("a", NetworkRequest(mode="host"))
    with pytest.raises(InvalidNetworkRequest, match="below 1024"):
        isolator.resolve("a", NetworkRequest(port_mappings=(PortMapping(80, 80),)))
    with pytest.raises(InvalidNetworkRequest, match="given twice"):
        isolator.resolve("a", NetworkRequest(port_mappings=(PortMapping(3000, 1),) * 2))
    for bandwidth in (0.0, -1.0, math.nan):
        with pytest.raises(InvalidNetworkRequest, match="network_bandwidth"):
            isolator.resolve("a", NetworkRequest(bandwidth_mbit=bandwidth))
    with pytest.raises(InvalidNetworkRequest, match="need network mode 'bridge'"):
        isolator.resolve("a", NetworkRequest(mode="none", port_mappings=(PortMapping(3000, 1),)))
    _, forwards = isolator.resolve("a", NetworkRequest(port_ranges=((31000, 31001),)))
    assert len(forwards) == 4 and PortMapping(31001, 31001, "udp") in forwards
    assert _isolator(tmp_path, allow_privileged_ports=True).resolve(
        "a", NetworkRequest(port_mappings=(PortMapping(80, 80),))
    )


def test_port_held_by_another_container_conflicts(tmp_path: Path) -> None:
    isolator = _isolator(tmp_path)
    mapping = PortMapping(30000, 80)
    holder = Attachment("holder", "bridge", address="10.210.3.2", port_mappings=(mapping,))
    isolator._state.attachments["holder"] = holder
    with pytest.raises(PortConflict, match=r"30000/tcp.*'holder'"):
        isolator.resolve("other", NetworkRequest(port_mappings=(PortMapping(30000, 8080),)))
    isolator.resolve("other", NetworkRequest(port_mappings=(PortMapping(30000, 8080, "udp"),)))


@pytest.mark.parametrize(
    ("text", "message"),
    [("8080", "HOST_PORT:CONTAINER_PORT"), ("a:b", "HOST_PORT"), ("0:80", "outside"),
     ("80:65536", "outside"), ("80:80/icmp", "tcp or udp"), ("-1:80", "HOST_PORT")],
)  # fmt: skip
def test_api_port_mapping_syntax(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message) as refused:
        validation.network(pb.NetworkInfo(port_mappings=[text]))
    assert refused.value.field == "container.network.port_mappings[0]"


def test_api_network_fields_and_resources() -> None:
    parsed = validation.network(pb.NetworkInfo(mode="bridge", port_mappings=["30000:80/udp"]))
    assert parsed.mode == "bridge" and parsed.port_mappings[0].protocol == "udp"
    with pytest.raises(InvalidArgument, match="unknown mode"):
        validation.network(pb.NetworkInfo(mode="overlay"))
    ports_resource = pb.Resource(
        name="ports", type=pb.Value.RANGES,
        ranges=pb.Value.Ranges(range=[pb.Value.Range(begin=31000, end=31002)]),
    )  # fmt: skip
    bandwidth = pb.Resource(name="network_bandwidth", scalar=pb.Value.Scalar(value=10))
    resources, _ = validation.resources([ports_resource, bandwidth])
    assert resources.ports == ((31000, 31002),) and resources.network_bandwidth == 10
    for value in (0.0, math.nan, -3.0):
        bad = pb.Resource(name="network_bandwidth", scalar=pb.Value.Scalar(value=value))
        with pytest.raises(InvalidArgument, match="network_bandwidth"):
            validation.resources([bad])
    out_of_range = pb.Resource(
        name="ports", type=pb.Value.RANGES,
        ranges=pb.Value.Ranges(range=[pb.Value.Range(begin=0, end=10)]),
    )  # fmt: skip
    with pytest.raises(InvalidArgument, match=r"resources\[ports\]"):
        validation.resources([out_of_range])


def test_config_network_table() -> None:
    assert parse_config({}).network.default_mode == "host"
    options = parse_config({"network": {"bridge": "ctz1", "subnet": "10.9.0.0/24"}}).network
    assert options.enabled and options.default_mode == "bridge" and not options.allow_host
    for table, key in [
        ({"bridge": "has.dot"}, "network.bridge"),
        ({"bridge": "sixteen-chars-xx"}, "network.bridge"),
        ({"subnet": "10.9.0.1/24"}, "network.subnet"),
        ({"default_mode": "vlan"}, "network.default_mode"),
        ({"default_mode": "host"}, "network.default_mode"),
        ({"host_address": "localhost"}, "network.host_address"),
        ({"mtu": 1500}, "network.mtu"),
    ]:
        with pytest.raises(ConfigError, match=key):
            parse_config({"network": table})
