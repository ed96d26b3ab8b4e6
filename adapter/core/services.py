"""What one service shares between its runtimes and servicers, built once by `serve` (the
composition root) and passed in: nothing is found through a module-level cache.

    node            the node settings a runtime needs (each runtime also gets its own table)
    images          the image store of <state_dir>/images: one per service, so the imports,
                    unpacks, removals and garbage collection of the Images API and of every
                    runtime see each other (a second store could take another's work in flight
                    for a crash's garbage)
    network         the node's network isolator (one bridge, one IPAM, one port table), as the
                    runtimes use it (adapter/core/network.py)
    cgroups         the cgroup hierarchies under cgroups_root, discovered at first use
    supervisors     the supervisors this service spawned, which it must reap
    seccomp         the supervisor's default seccomp programs, each compiled at first use:
                    one per capability set the native and LXC runtimes' workloads hold
    libvirt_events  which asyncio loop libvirt's event implementation is bound to
    user_namespaces the allocator of host id ranges for user namespaces (None: no host ids
                    configured), read once at start: /etc/subuid and /etc/subgid or a range
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from adapter.core.config import AgentConfig
from adapter.core.confinement import DEFAULT_CAPABILITIES, default_allowed
from adapter.core.errors import Unavailable
from adapter.core.limits import Limits
from adapter.core.model import Resources
from adapter.core.network import RuntimeNetwork
from adapter.core.userns import IdRangeAllocator
from adapter.images.store import ImageStore
from adapter.supervisor.client import Supervisors
from adapter.supervisor.seccomp import build_program
from isolators.registry import ContainerCgroups, container_cgroups


@dataclass(frozen=True)
class NodeSettings:
    """The node-level settings runtimes need, rather than the whole AgentConfig."""

    state_dir: Path
    cgroups_root: str
    cgroups_hierarchy: str | None  # a directory laid out like /sys/fs/cgroup, else the mounts
    enable_cfs: bool
    isolators: tuple[str, ...]  # the native runtime's
    source: str  # the config file, for error messages
    log_max_size: int  # a container's stdout/stderr files rotate at this size; 0: never
    log_max_files: int  # and each stream keeps this many (the current one included)

    @classmethod
    def of(cls, config: AgentConfig) -> NodeSettings:
        return cls(
            state_dir=config.state_dir,
            cgroups_root=config.cgroups_root,
            cgroups_hierarchy=config.cgroups_hierarchy,
            enable_cfs=config.cgroups_enable_cfs,
            isolators=config.isolators,
            source=str(config.source) if config.source else "<config>",
            log_max_size=config.log_max_size,
            log_max_files=config.log_max_files,
        )

    def where(self, runtime: str) -> str:
        """Where a runtime's table is, for a ConfigError: `<file>: runtimes.<name>`."""
        return f"{self.source}: runtimes.{runtime}"

    def limits(self, resources: Resources) -> Limits:
        """The Mesos arithmetic of `resources` on this node (adapter/core/limits.py)."""
        return Limits.of(resources, enable_cfs=self.enable_cfs)


class SeccompFilter:
    """The default seccomp allow-list as BPF for a container's capabilities (an added
    CAP_SYS_ADMIN, CAP_SYS_PTRACE, ... widens it: confinement.default_allowed), compiled once
    per distinct allow-list when it is first needed. A failure (no libseccomp) is raised each
    time it is asked for, so a fingerprint can report it. At most MAX_PROGRAMS are kept, the
    oldest dropped first: capability sets are few in practice, but they are the API's input."""

    MAX_PROGRAMS = 32

    def __init__(self) -> None:
        self._programs: dict[tuple[str, ...], bytes] = {}

    def bpf(self, capabilities: tuple[str, ...] = DEFAULT_CAPABILITIES) -> bytes:
        allowed = default_allowed(capabilities)
        program = self._programs.get(allowed)
        if program is None:
            program = build_program(allowed).bpf
            if len(self._programs) >= self.MAX_PROGRAMS:
                del self._programs[next(iter(self._programs))]
            self._programs[allowed] = program
        return program


class EventLoopBinding:
    """libvirt dispatches its events through one event implementation per process (it ignores a
    second registration), so the process truly has one binding: the asyncio loop it was given.
    The service owns this record of it, and refuses a connection from any other loop."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, register: Callable[[asyncio.AbstractEventLoop], None]) -> None:
        """Register the running loop with `register` the first time; later, check it is the
        same loop."""
        loop = asyncio.get_running_loop()
        if self._loop is None:
            register(loop)
            self._loop = loop
        elif self._loop is not loop:
            raise Unavailable("libvirt's event loop is bound to another asyncio loop")


@dataclass
class Services:
    node: NodeSettings
    images: ImageStore
    network: RuntimeNetwork
    supervisors: Supervisors = field(default_factory=Supervisors)
    seccomp: SeccompFilter = field(default_factory=SeccompFilter)
    libvirt_events: EventLoopBinding = field(default_factory=EventLoopBinding)
    user_namespaces: IdRangeAllocator | None = None

    @functools.cached_property
    def cgroups(self) -> ContainerCgroups:
        """Discovered at first use: a node whose runtimes use no cgroup never needs a mount.
        Raises the isolators' HierarchyError when there is none."""
        return container_cgroups(
            cgroups_root=self.node.cgroups_root, hierarchy_override=self.node.cgroups_hierarchy
        )


def build_services(config: AgentConfig) -> Services:
    """The services of a service with `config`, after its state directory is claimed."""
    return Services(
        node=NodeSettings.of(config),
        images=ImageStore(
            config.state_dir / "images",
            config.images,
            mirrors=dict(config.images.mirrors),
            registries=config.registry,
        ),
        network=RuntimeNetwork(config),
        user_namespaces=IdRangeAllocator.of(
            config.user_namespace, str(config.source) if config.source else "<config>"
        ),
    )
