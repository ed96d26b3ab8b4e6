"""A runtime whose Python binding (an optional extra of the package) is not installed is refused
at start with the package and the extra to install, not an ImportError deep in a driver."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from adapter.core.errors import ConfigError
from adapter.runtimes.registry import build_driver, parse_options
from tests.services import node_services


@pytest.mark.parametrize(("runtime", "module"), [("docker", "docker"), ("libvirt", "libvirt")])
def test_a_runtime_without_its_binding_names_the_extra(
    runtime: str, module: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_find_spec = importlib.util.find_spec

    def without_binding(name: str, *args: Any) -> Any:
        return None if name == module else real_find_spec(name, *args)

    options = parse_options(runtime, {}, source="<config>", state_dir=tmp_path)
    monkeypatch.setattr(importlib.util, "find_spec", without_binding)
    with pytest.raises(ConfigError) as refused:
        build_driver(runtime, options, node_services(tmp_path))
    message = str(refused.value)
    assert f"runtimes.{runtime}" in message
    assert f"containerizer-adapter[{runtime}]" in message
