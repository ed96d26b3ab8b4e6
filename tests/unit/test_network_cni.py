"""CNI plugin execution with fake plugins (shell scripts): each plugin's stdin and environment,
chaining, DEL order, errors and timeouts; config selection; result parsing; the config keys."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

from adapter.core.config import load_config
from adapter.core.errors import ConfigError
from isolators.network import cni
from isolators.network.model import NetworkConfigError, NetworkUnavailable, PortMapping

RESULT = {
    "cniVersion": "1.0.0",
    "interfaces": [
        {"name": "br0"},
        {"name": "veth1", "mac": "aa"},
        {"name": "eth0", "sandbox": "/run/netns/x"},
    ],
    "ips": [
        {"address": "10.9.0.5/24", "gateway": "10.9.0.1", "interface": 1},
        {"address": "fd00::5/64", "gateway": "fd00::1", "interface": 1},
    ],
    "routes": [{"dst": "0.0.0.0/0"}],
    "dns": {"nameservers": ["10.9.0.53"], "search": ["svc"]},
}


def fake_plugin(directory: Path, name: str, body: str) -> None:
    """A plugin that logs its command, environment and stdin to <directory>/calls, then `body`."""
    path = directory / name
    path.write_text(
        "#!/bin/sh\nin=$(cat)\n"
        f'printf "%s\\n" "{name} $CNI_COMMAND $CNI_CONTAINERID $CNI_IFNAME $CNI_NETNS $CNI_PATH'
        f' $in" >> {directory}/calls\n{body}\n'
    )
    path.chmod(0o755)


def calls(directory: Path) -> list[tuple[list[str], dict[str, object]]]:
    lines = (directory / "calls").read_text().splitlines()
    return [(line.split(" ", 6)[:6], json.loads(line.split(" ", 6)[6])) for line in lines if line]


def network(*plugins: dict[str, object]) -> cni.NetworkList:
    return cni.NetworkList.from_json(
        {"cniVersion": "1.0.0", "name": "net1", "plugins": list(plugins)}, "test"
    )


def invocation(**kwargs: object) -> cni.Invocation:
    return cni.Invocation("c1", Path("/run/netns/x"), **kwargs)  # type: ignore[arg-type]


def test_add_chains_results_and_offers_only_declared_capabilities(tmp_path: Path) -> None:
    fake_plugin(tmp_path, "first", f"echo '{json.dumps(RESULT)}'")
    fake_plugin(tmp_path, "second", 'echo "$in" | sed "s/.*prevResult.://; s/}$//"')
    chain = network(
        {"type": "first", "bridge": "b0", "capabilities": {"portMappings": True}},
        {"type": "second", "capabilities": {"bandwidth": True}},
    )
    run = invocation(port_mappings=(PortMapping(8080, 80),), bandwidth_mbit=2.0)
    result = asyncio.run(cni.add((tmp_path,), chain, run))
    (first_env, first_in), (_, second_in) = calls(tmp_path)
    assert first_env == ["first", "ADD", "c1", "eth0", "/run/netns/x", str(tmp_path)]
    assert first_in["name"] == "net1" and first_in["cniVersion"] == "1.0.0"
    assert first_in["runtimeConfig"] == {
        "portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]
    }
    assert "prevResult" not in first_in and "capabilities" not in first_in
    assert second_in["prevResult"] == RESULT
    assert second_in["runtimeConfig"]["bandwidth"]["ingressRate"] == 2_000_000  # type: ignore[index]
    assert result == RESULT


def test_del_runs_in_reverse_with_the_cached_result_and_tries_every_plugin(
    tmp_path: Path,
) -> None:
    fake_plugin(tmp_path, "first", "exit 0")
    fake_plugin(tmp_path, "second", 'echo \'{"code": 11, "msg": "busy", "details": "d"}\'; exit 1')
    chain = network({"type": "first"}, {"type": "second"})
    with pytest.raises(cni.CniError) as failed:
        asyncio.run(cni.delete((tmp_path,), chain, invocation(), RESULT))
    assert "'second' DEL failed (code 11): busy (d)" in str(failed.value)
    assert [(env[0], env[1]) for env, _ in calls(tmp_path)] == [("second", "DEL"), ("first", "DEL")]
    assert all(stdin["prevResult"] == RESULT for _, stdin in calls(tmp_path))


def test_a_plugin_that_hangs_is_killed_at_the_timeout(tmp_path: Path) -> None:
    fake_plugin(tmp_path, "slow", "exec sleep 100")
    conf = cni.plugin_config(network({"type": "slow"}), {"type": "slow"}, invocation(), None)
    with pytest.raises(cni.CniError, match=re.escape("no answer within 0.2 s")):
        asyncio.run(cni.run_plugin((tmp_path,), "ADD", conf, invocation(), timeout=0.2))


def test_plugin_types_are_file_names_found_only_in_the_bin_dirs(tmp_path: Path) -> None:
    with pytest.raises(NetworkConfigError, match=re.escape("plugins[0].type")):
        network({"type": "../../bin/sh"})
    with pytest.raises(NetworkConfigError, match=re.escape("not found in network.bin_dir")):
        cni.find_plugin((tmp_path,), "bridge")


def test_the_first_config_by_file_name_or_the_one_named(tmp_path: Path) -> None:
    for file, name in (("20-b.conflist", "b"), ("10-a.conflist", "a")):
        (tmp_path / file).write_text(
            json.dumps({"cniVersion": "1.0.0", "name": name, "plugins": [{"type": "bridge"}]})
        )
    (tmp_path / "30-c.conf").write_text(
        json.dumps({"cniVersion": "0.4.0", "name": "c", "type": "ptp"})
    )
    assert cni.load_network(tmp_path, None).name == "a"
    single = cni.load_network(tmp_path, "c")
    assert single.plugins == ({"type": "ptp"},) and single.cni_version == "0.4.0"
    with pytest.raises(NetworkConfigError, match="named 'd'"):
        cni.load_network(tmp_path, "d")


def test_result_gives_addresses_routes_dns_and_the_host_interface() -> None:
    parsed = cni.parse_result(RESULT)
    assert parsed.addresses == ("10.9.0.5/24", "fd00::5/64")
    assert str(parsed.ipv4) == "10.9.0.5/24" and parsed.gateways == ("10.9.0.1", "fd00::1")
    assert parsed.host_interface == "veth1" and parsed.nameservers == ("10.9.0.53",)
    assert parsed.routes == (("0.0.0.0/0", ""),)


def test_cni_refuses_runtimes_that_make_their_own_link(tmp_path: Path) -> None:
    from isolators.network.cni_isolator import CniIsolator
    from isolators.network.model import NetworkConfig, NetworkRequest

    isolator = CniIsolator(NetworkConfig(tmp_path, enabled=True, backend="cni"))
    with pytest.raises(NetworkUnavailable, match="backend 'bridge'"):
        asyncio.run(isolator.prepare("c1", NetworkRequest("bridge"), own_link=True))


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ('backend = "flannel"', "network.backend"),
        ('conf_dir = "net.d"', "network.conf_dir"),
        ('cni_network = "a/b"', "network.cni_network"),
    ],
)
def test_bad_cni_keys_are_named(tmp_path: Path, line: str, key: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f"version = 1\n[network]\n{line}\n")
    with pytest.raises(ConfigError, match=key):
        load_config(path)


def test_cni_keys_are_read(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('version = 1\n[network]\nbackend = "cni"\ncni_network = "k8s-pod-network"\n')
    options = load_config(path).network
    assert (options.backend, options.conf_dir, options.bin_dir) == (
        "cni", "/etc/cni/net.d", "/usr/lib/cni",
    )  # fmt: skip
    assert options.cni_network == "k8s-pod-network"
