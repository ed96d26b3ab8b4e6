"""The composition root's record (adapter/core/services.py): built once per service from its
config, nothing shared through the process, and what a runtime gets of the node."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from adapter.core import services as services_module
from adapter.core.config import ImagesOptions, parse_config
from adapter.core.errors import ConfigError, FailedPrecondition, Unavailable
from adapter.core.model import Resources
from adapter.core.services import EventLoopBinding, NodeSettings, SeccompFilter
from adapter.runtimes.registry import build_driver
from tests.services import node_services


def test_a_runtime_gets_the_node_settings_it_needs(tmp_path: Path) -> None:
    source = tmp_path / "node.toml"
    config = parse_config(
        {
            "state_dir": str(tmp_path / "state"),
            "cgroups_root": "ctz",
            "cgroups_enable_cfs": True,
            "isolators": ["posix/cpu"],
        },
        source,
    )
    node = NodeSettings.of(config)
    assert (node.state_dir, node.cgroups_root, node.enable_cfs, node.isolators) == (
        tmp_path / "state",
        "ctz",
        True,
        ("posix/cpu",),
    )
    assert node.where("lxc") == f"{source}: runtimes.lxc"
    assert node.limits(Resources(cpus=0.5)).cfs_quota_us == 50_000  # the node's CFS setting
    assert NodeSettings.of(parse_config({})).where("docker") == "<config>: runtimes.docker"


def test_each_service_builds_its_own_services(tmp_path: Path) -> None:
    """A second service of the same state directory in this process (a restart) starts from
    services of its own, with its own config, never the first one's."""
    first = node_services(tmp_path, images=ImagesOptions(max_entries=10))
    second = node_services(tmp_path, images=ImagesOptions(max_entries=20))
    assert second.images is not first.images
    assert (first.images.options.max_entries, second.images.options.max_entries) == (10, 20)
    assert second.network.isolator is not first.network.isolator
    assert second.supervisors is not first.supervisors


def test_cgroups_are_discovered_once_at_first_use(tmp_path: Path) -> None:
    (tmp_path / "cgroups" / "memory").mkdir(parents=True)
    services = node_services(tmp_path / "state", cgroups_hierarchy=str(tmp_path / "cgroups"))
    assert services.cgroups is services.cgroups
    assert services.cgroups.hierarchies.mounts == {"memory": tmp_path / "cgroups" / "memory"}


def test_a_runtime_table_error_names_the_config_file(tmp_path: Path) -> None:
    source = tmp_path / "node.toml"
    with pytest.raises(ConfigError, match=rf"{source}: runtimes.lxc.network: expected one of"):
        parse_config({"runtimes": {"lxc": {"network": "bogus"}}}, source)
    # What only the node's services can tell is checked when the driver is built.
    config = parse_config(
        {
            "state_dir": str(tmp_path),
            "default_runtime": "lxc",
            "network": {},
            "runtimes": {"lxc": {"network": "none"}},
        },
        source,
    )
    services = services_module.build_services(config)
    with pytest.raises(ConfigError, match=rf"{source}: runtimes.lxc.network: the node's"):
        build_driver("lxc", config.runtimes["lxc"], services)


def test_the_seccomp_program_is_compiled_once_and_a_failure_is_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int] = []

    class Program:
        bpf = b"\x06\x00\x00\x00\x00\x00\xff\x7f"

    def build_program(allowed: tuple[str, ...]) -> Program:
        calls.append(1)
        if len(calls) == 1:
            raise FailedPrecondition("seccomp: libseccomp.so.2 not found")
        return Program()

    monkeypatch.setattr(services_module, "build_program", build_program)
    program = SeccompFilter()
    with pytest.raises(FailedPrecondition):
        program.bpf()
    assert program.bpf() == program.bpf() == Program.bpf
    assert len(calls) == 2


def test_libvirt_events_are_bound_to_one_loop() -> None:
    """libvirt takes one event implementation per process: registered once, and a connection
    from another asyncio loop is refused rather than silently never seeing an event."""
    binding = EventLoopBinding()
    registered: list[asyncio.AbstractEventLoop] = []

    async def bind() -> None:
        binding.bind(registered.append)

    first = asyncio.new_event_loop()
    second = asyncio.new_event_loop()
    try:
        first.run_until_complete(bind())
        first.run_until_complete(bind())
        assert registered == [first]
        with pytest.raises(Unavailable, match="another asyncio loop"):
            second.run_until_complete(bind())
        assert registered == [first]
    finally:
        first.close()
        second.close()
