"""Runtime drivers, one module (or package) per runtime; see base.py for the contract."""

from __future__ import annotations

from typing import Any

from adapter.core.config import AgentConfig
from adapter.runtimes.base import Driver


def build_driver(name: str, options: dict[str, Any], config: AgentConfig) -> Driver:
    """Instantiate the driver for a configured runtime. Imports are lazy so a node pays only for
    the runtimes it uses."""
    if name == "native":
        from adapter.runtimes.native.driver import NativeDriver

        return NativeDriver(config, options)
    if name == "lxc":
        from adapter.runtimes.lxc.driver import LxcDriver

        return LxcDriver(config, options)
    if name == "docker":
        from adapter.runtimes.docker.driver import DockerDriver

        return DockerDriver(config, options)
    if name == "containerd":
        from adapter.runtimes.containerd.driver import ContainerdDriver

        return ContainerdDriver(config, options)
    if name == "libvirt":
        from adapter.runtimes.libvirt.driver import LibvirtDriver

        return LibvirtDriver(config, options)
    raise ValueError(f"no driver for runtime {name!r}")
