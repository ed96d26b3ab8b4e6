"""Every runtime this service knows, listed once: its name, its Options (what its
`[runtimes.<name>]` table parses into), its driver class and the optional extra of the package
its Python binding comes from.

The config, request validation, the CLI and `build_driver` read RUNTIMES; a new runtime is one
entry here and a package beside the others. A driver module is imported only when a node builds
that runtime, so a node pays only for the runtimes it uses and needs only their bindings; the
options modules are imported with this one and so import nothing heavier than the standard
library.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

from adapter.core.errors import ConfigError
from adapter.runtimes.containerd.options import ContainerdOptions
from adapter.runtimes.docker.options import DockerOptions
from adapter.runtimes.libvirt.options import LibvirtOptions
from adapter.runtimes.lxc.options import LxcOptions
from adapter.runtimes.native.options import NativeOptions
from adapter.runtimes.table import RuntimeTable

if TYPE_CHECKING:  # the services import every shared service; a driver gets them when built
    from adapter.core.services import Services
    from adapter.runtimes.base import Driver

RuntimeOptions = NativeOptions | ContainerdOptions | LxcOptions | LibvirtOptions | DockerOptions


@dataclass(frozen=True)
class Binding:
    """A Python package a runtime's driver imports that is an optional extra of ours."""

    module: str
    extra: str  # pip install 'containerizer-adapter[<extra>]'


@dataclass(frozen=True)
class RuntimeEntry:
    name: str
    options: type[RuntimeOptions]
    driver: str  # "module:Class", imported when the runtime is built
    binding: Binding | None = None


# In the order `compare` measures them by default.
RUNTIMES: dict[str, RuntimeEntry] = {
    entry.name: entry
    for entry in (
        RuntimeEntry("native", NativeOptions, "adapter.runtimes.native.driver:NativeDriver"),
        RuntimeEntry(
            "containerd", ContainerdOptions, "adapter.runtimes.containerd.driver:ContainerdDriver"
        ),
        RuntimeEntry("lxc", LxcOptions, "adapter.runtimes.lxc.driver:LxcDriver"),
        RuntimeEntry(
            "libvirt",
            LibvirtOptions,
            "adapter.runtimes.libvirt.driver:LibvirtDriver",
            Binding("libvirt", "libvirt"),
        ),
        RuntimeEntry(
            "docker",
            DockerOptions,
            "adapter.runtimes.docker.driver:DockerDriver",
            Binding("docker", "docker"),
        ),
    )
}
RUNTIME_NAMES = tuple(RUNTIMES)


def parse_options(name: str, values: object, *, source: str, state_dir: Path) -> RuntimeOptions:
    """The Options of runtime `name` from its table `values` in the config file `source` (for
    messages) of a node whose state is in `state_dir`."""
    where = f"{source}: runtimes.{name}"
    entry = RUNTIMES.get(name)
    if entry is None:
        raise ConfigError(f"{where}: unknown runtime; available: {sorted(RUNTIMES)}")
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where}: expected a table")
    table = RuntimeTable(cast(Mapping[str, object], values), where, state_dir)
    options = entry.options.parse(table)
    table.refuse_unread()
    return options


def build_driver(name: str, options: RuntimeOptions, services: Services) -> Driver:
    """The driver of a configured runtime, with its own Options and the service's shared
    services."""
    entry = RUNTIMES.get(name)
    if entry is None:
        raise ValueError(f"no driver for runtime {name!r}")
    if not isinstance(options, entry.options):
        raise TypeError(f"runtime {name!r} takes {entry.options.__name__}, not {options!r}")
    if entry.binding is not None:
        _require(name, entry.binding)
    module, _, class_name = entry.driver.partition(":")
    driver_class = getattr(importlib.import_module(module), class_name)
    return cast("Driver", driver_class(options, services))


def _require(runtime: str, binding: Binding) -> None:
    """The runtime's Python binding is an optional extra of the package: name it when absent,
    rather than fail with an ImportError deep in the driver."""
    if importlib.util.find_spec(binding.module) is None:
        raise ConfigError(
            f"runtimes.{runtime}: needs the Python package {binding.module!r}, not installed:"
            f" pip install 'containerizer-adapter[{binding.extra}]'"
        )
