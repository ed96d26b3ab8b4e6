"""How the containerd and LXC drivers attach to the network isolator's namespace, without a
runtime: the OCI spec's network entry and bind mounts, the LXC keys, and when the isolator
decides at all (adapter/core/network.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapter.core.config import parse_config
from adapter.core.errors import FailedPrecondition, InvalidArgument
from adapter.core.limits import Limits
from adapter.core.model import (
    Command,
    Identity,
    LaunchSpec,
    NetworkSettings,
    PortMapping,
    Resources,
)
from adapter.core.network import RuntimeNetwork
from adapter.images.image import Descriptor, Image
from adapter.runtimes.containerd import spec as oci
from adapter.runtimes.lxc.config import LxcConfig, set_isolator_network
from isolators.network.model import Attachment

NETNS = "/run/netns/ctz0.web-1"
ETC = {"/etc/hosts": Path("/state/hosts"), "/etc/resolv.conf": Path("/state/resolv.conf")}


def _spec(mode: str = "", mappings: tuple[PortMapping, ...] = ()) -> LaunchSpec:
    return LaunchSpec(
        container_id="web-1",
        command=Command(shell="true"),
        resources=Resources(),
        runtime="containerd",
        sandbox="/sandboxes/web-1",
        image="localhost/busybox:latest",
        network=NetworkSettings(mode=mode, port_mappings=mappings),
    )


def _document(network: oci.Network) -> dict[str, object]:
    blob = Descriptor("application/octet-stream", "sha256:" + "0" * 64, 1)
    image = Image("localhost/busybox:latest", blob, blob, (blob,), (), ("sh",), (), "", "")
    return oci.runtime_spec(
        _spec(), image, cgroups_root="ctz", limits=Limits(), identity=Identity(), network=network
    )


def _network_entries(document: dict[str, object]) -> list[dict[str, str]]:
    linux = document["linux"]
    assert isinstance(linux, dict)
    return [n for n in linux["namespaces"] if n["type"] == "network"]


def test_oci_spec_joins_the_isolators_namespace_and_binds_its_files_read_only() -> None:
    document = _document(oci.Network(netns_path=NETNS, etc_files=ETC))
    assert _network_entries(document) == [{"type": "network", "path": NETNS}]
    mounts = document["mounts"]
    assert isinstance(mounts, list)
    binds = {m["destination"]: m for m in mounts if m["destination"].startswith("/etc/")}
    assert {d: m["source"] for d, m in binds.items()} == {
        "/etc/hosts": "/state/hosts",
        "/etc/resolv.conf": "/state/resolv.conf",
    }
    assert all(m["type"] == "bind" and "ro" in m["options"] for m in binds.values())


def test_oci_spec_host_network_has_no_network_namespace_and_default_is_a_fresh_one() -> None:
    assert _network_entries(_document(oci.Network(host=True))) == []
    assert _network_entries(_document(oci.Network())) == [{"type": "network"}]


def test_lxc_joins_the_namespace_by_path_with_escaped_binds() -> None:
    config = LxcConfig()
    attachment = Attachment("web-1", "bridge", netns_path=NETNS, address="10.88.0.2")
    set_isolator_network(config, attachment, {"/etc/hosts": Path("/state dir/hosts")})
    assert config.get("lxc.net.0.type") == ["none"]
    assert config.get("lxc.namespace.share.net") == [NETNS]
    assert config.get("lxc.mount.entry") == [
        "/state\\040dir/hosts etc/hosts none bind,ro,create=file 0 0"
    ]


def test_lxc_host_mode_shares_the_hosts_namespace() -> None:
    config = LxcConfig()
    set_isolator_network(config, Attachment("web-1", "host"), {})
    assert config.entries == [("lxc.net.0.type", "none")]


def test_a_namespace_path_that_could_end_the_line_is_refused() -> None:
    with pytest.raises(InvalidArgument):
        set_isolator_network(
            LxcConfig(), Attachment("web-1", "none", netns_path="/run/netns/x\nlxc.a = b"), {}
        )


def test_the_isolator_decides_with_a_network_table_or_a_request(tmp_path: Path) -> None:
    plain = RuntimeNetwork(parse_config({"state_dir": str(tmp_path / "a")}))
    assert not plain.chooses(_spec())
    assert plain.chooses(_spec(mode="none"))
    assert plain.chooses(_spec(mappings=(PortMapping(30000, 80),)))
    table = {"state_dir": str(tmp_path / "b"), "network": {"bridge": "ctzunit0"}}
    assert RuntimeNetwork(parse_config(table)).chooses(_spec())


def test_isolator_errors_become_ours_before_anything_exists(tmp_path: Path) -> None:
    network = RuntimeNetwork(parse_config({"state_dir": str(tmp_path)}))
    with pytest.raises(InvalidArgument) as mapped:
        network.check(_spec(mode="none", mappings=(PortMapping(30000, 80),)))
    assert mapped.value.field == "container.network.port_mappings"
    with pytest.raises(FailedPrecondition):  # no [network] table: no bridge mode
        network.check(_spec(mode="bridge"))
    assert not (tmp_path / "network").exists()
