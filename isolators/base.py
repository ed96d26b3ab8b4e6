"""The Isolator protocol, with Mesos' verb set (mesos: include/mesos/slave/isolator.hpp).

Every verb is a no-op by default so an isolator overrides only what it needs; `cleanup` is
idempotent. This package imports nothing from `adapter/`, so it has its own small types.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

# Keys are mesos.ResourceStatistics field names (cpus_user_time_secs, mem_rss_bytes, ...).
Statistics = dict[str, float | int]


@dataclass(frozen=True)
class Limits:
    """The limits an isolator enforces. None means unlimited."""

    cpus: float | None = None
    mem_bytes: int | None = None
    pids: int | None = None


@dataclass(frozen=True)
class Limitation:
    """A limit the container hit; the containerizer ends it with the matching reason."""

    resource: str  # "mem", "pids", "disk"
    message: str


@dataclass
class LaunchInfo:
    """What `prepare` asks of the launcher, applied in the child before the workload's first
    instruction: join these cgroups (paths of `cgroup.procs` files)."""

    cgroup_procs: list[str] = field(default_factory=list)


class Isolator:
    """Default no-op isolator. Subclasses override what they need."""

    name = "noop"

    async def recover(self, known: set[str]) -> None:
        """Re-attach to the given containers after a restart; remove what belongs to none."""

    async def prepare(self, container_id: str, limits: Limits) -> LaunchInfo | None:
        """Create per-container state before the launch (e.g. the cgroup)."""
        return None

    async def isolate(self, container_id: str, pid: int) -> None:
        """Called once the container's init process exists (host pid)."""

    async def watch(self, container_id: str) -> Limitation:
        """Resolves when the container hits a limit; never resolves if it does not."""
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    def check(self, container_id: str) -> Limitation | None:
        """A limit already hit, read from counters. Called when the container exits, to close the
        race between the exit and `watch`'s notification (an OOM kill is both)."""
        return None

    async def update(self, container_id: str, limits: Limits) -> None:
        """Change the limits of a running container."""

    async def usage(self, container_id: str) -> Statistics:
        return {}

    async def cleanup(self, container_id: str) -> None:
        """Release everything held for the container. Idempotent."""
