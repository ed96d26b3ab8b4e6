"""Runtime drivers, one module (or package) per runtime; see base.py for the contract."""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

from adapter.core.errors import ConfigError

if TYPE_CHECKING:  # importing the services would load every one of them with base.py
    from adapter.core.services import Services
    from adapter.runtimes.base import Driver


def build_driver(name: str, options: dict[str, Any], services: Services) -> Driver:
    """Instantiate the driver for a configured runtime with its own table (`options`) and the
    service's shared services. Imports are lazy so a node pays only for the runtimes it uses."""
    if name == "native":
        from adapter.runtimes.native.driver import NativeDriver

        return NativeDriver(options, services)
    if name == "lxc":
        from adapter.runtimes.lxc.driver import LxcDriver

        return LxcDriver(options, services)
    if name == "docker":
        _require("docker", "docker", "docker")
        from adapter.runtimes.docker.driver import DockerDriver

        return DockerDriver(options, services)
    if name == "containerd":
        from adapter.runtimes.containerd.driver import ContainerdDriver

        return ContainerdDriver(options, services)
    if name == "libvirt":
        _require("libvirt", "libvirt", "libvirt")
        from adapter.runtimes.libvirt.driver import LibvirtDriver

        return LibvirtDriver(options, services)
    raise ValueError(f"no driver for runtime {name!r}")


def _require(runtime: str, module: str, extra: str) -> None:
    """The runtime's Python binding is an optional extra of the package: name it when absent."""
    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"runtimes.{runtime}: needs the Python package {module!r}, not installed:"
            f" pip install 'containerizer-adapter[{extra}]'"
        )
