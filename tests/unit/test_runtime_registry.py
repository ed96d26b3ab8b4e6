"""The runtime registry (adapter/runtimes/registry.py): each runtime's name listed once, each
runtime's table parsed by its own Options, and every place that names runtimes or network modes
reading the one list."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.clients.cli.client import CliError
from adapter.clients.cli.main import build_parser
from adapter.clients.compare.workloads import DEFAULT_RUNTIMES
from adapter.core.config import parse_config
from adapter.core.errors import ConfigError, InvalidArgument
from adapter.core.model import NETWORK_MODES
from adapter.runtimes.libvirt.options import LibvirtOptions
from adapter.runtimes.native.options import NativeOptions
from adapter.runtimes.registry import RUNTIME_NAMES, RUNTIMES, build_driver, parse_options
from adapter.server import validation
from isolators.network.model import MODES
from tests.services import node_services


def parse(name: str, table: dict[str, object], state_dir: Path) -> object:
    return parse_options(name, table, source="/etc/node.toml", state_dir=state_dir)


@pytest.mark.parametrize("name", RUNTIME_NAMES)
def test_an_empty_table_gives_the_runtimes_defaults(name: str, tmp_path: Path) -> None:
    options = parse(name, {}, tmp_path)
    assert isinstance(options, RUNTIMES[name].options)
    if isinstance(options, LibvirtOptions):  # the one default that lives in the state directory
        assert options.kernel == tmp_path / "libvirt" / "kernel" / "vmlinuz"
    else:
        assert options == RUNTIMES[name].options()


@pytest.mark.parametrize("name", RUNTIME_NAMES)
def test_an_unknown_key_is_named_with_the_known_ones(name: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as refused:
        parse(name, {"colour": "red"}, tmp_path)
    message = str(refused.value)
    assert message.startswith(f"/etc/node.toml: runtimes.{name}.colour: unknown key; known keys:")
    known = [field.name for field in dataclasses.fields(RUNTIMES[name].options)]
    assert all(key in message for key in known)


def test_values_are_typed_as_toml_writes_them(tmp_path: Path) -> None:
    options = parse("libvirt", {"kvm_probe_timeout": 3, "memory_mib": 512}, tmp_path)
    assert isinstance(options, LibvirtOptions)
    assert (options.kvm_probe_timeout, options.memory_mib) == (3.0, 512)
    with pytest.raises(ConfigError, match=r"runtimes\.libvirt\.kvm_probe_timeout: expected float"):
        parse("libvirt", {"kvm_probe_timeout": True}, tmp_path)
    with pytest.raises(ConfigError, match=r"runtimes\.native\.supervisor: expected str, got 7"):
        parse("native", {"supervisor": 7}, tmp_path)


def test_a_driver_is_built_only_from_its_own_options(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="LxcOptions"):
        build_driver("lxc", NativeOptions(), node_services(tmp_path))
    with pytest.raises(ValueError, match="warp"):
        build_driver("warp", NativeOptions(), node_services(tmp_path))


def test_config_validation_cli_and_compare_name_the_registrys_runtimes() -> None:
    assert DEFAULT_RUNTIMES == RUNTIME_NAMES == ("native", "containerd", "lxc", "libvirt", "docker")
    with pytest.raises(
        ConfigError, match=re.escape(f"default_runtime: expected one of {sorted(RUNTIMES)}")
    ):
        parse_config({"default_runtime": "warp"})
    request = pb.LaunchRequest(container_id="c", container=pb.ContainerInfo(runtime="warp"))
    with pytest.raises(InvalidArgument, match=re.escape(f"known: {sorted(RUNTIMES)}")):
        validation.launch_spec(request, default_runtime="native", default_sandbox="/s")
    with pytest.raises(CliError, match="invalid choice: 'warp'"):
        build_parser().parse_args(["run", "--runtime", "warp", "--", "true"])


def test_every_layer_knows_the_same_network_modes() -> None:
    """isolators/ imports nothing of adapter/, so it keeps its own list: the two must agree."""
    assert MODES == NETWORK_MODES
    with pytest.raises(
        ConfigError, match=re.escape(f"default_mode: expected one of {list(NETWORK_MODES)}")
    ):
        parse_config({"network": {"default_mode": "overlay"}})
    with pytest.raises(CliError, match="invalid choice: 'overlay'"):
        build_parser().parse_args(["run", "--network", "overlay", "--", "true"])
