"""The Mesos limit arithmetic, done once into one `Limits` value that every runtime translates.

    cpu shares    1024 x cpus, at least 2 (the kernel's minimum)
    CFS quota     period x cpus, at least 1 ms (the kernel refuses less), period 100 ms; only
                  on a node that enables CFS (`cgroups_enable_cfs`), else no bandwidth limit
    memory        the requested memory, at least 32 MiB: the hard limit, and the soft limit
                  (reservation) with it
    pids          as requested

A runtime only translates the value: cgroup files (the native runtime's isolators, through
`for_isolators`), LXC's lxc.cgroup keys, the OCI spec's linux.resources, Docker's HostConfig,
libvirt's cputune. The cpu formulas are the cgroup isolators' own functions (isolators/ imports
nothing from adapter/, and its cpu isolator writes what they give for `cpus`), so every runtime
writes the same numbers. The 32 MiB floor is Mesos policy, not a kernel rule: it lives here only,
and the edge uses `memory_floor` to raise a request (and say so) before it is recorded.
"""

from __future__ import annotations

from dataclasses import dataclass

from adapter.core.model import MIB, Resources
from isolators import base as isolators
from isolators.cgroups.cpu import CFS_PERIOD_US, CPU_SHARES_PER_CPU, cfs_quota_us, cpu_shares

MIN_MEM_MIB = 32

__all__ = ["CFS_PERIOD_US", "CPU_SHARES_PER_CPU", "MIN_MEM_MIB", "Limits", "memory_floor"]


def memory_floor(mem_mib: float) -> float:
    """Mesos: a container's memory limit is never below 32 MiB."""
    return max(mem_mib, float(MIN_MEM_MIB))


@dataclass(frozen=True)
class Limits:
    """What the kernel enforces for a container's resources. None means unlimited."""

    cpus: float | None = None  # as requested: a VM's vCPU count, the isolators' input
    cpu_shares: int | None = None
    cfs_quota_us: int | None = None  # None: no bandwidth limit (CFS disabled, or no cpus)
    mem_bytes: int | None = None  # hard limit, and soft limit (reservation)
    pids: int | None = None
    cfs_period_us: int = CFS_PERIOD_US

    @classmethod
    def of(cls, resources: Resources, *, enable_cfs: bool) -> Limits:
        cpus, mem = resources.cpus, resources.mem_mib
        return cls(
            cpus=cpus,
            cpu_shares=None if cpus is None else cpu_shares(cpus),
            cfs_quota_us=cfs_quota_us(cpus) if cpus is not None and enable_cfs else None,
            mem_bytes=None if mem is None else int(memory_floor(mem) * MIB),
            pids=resources.pids,
        )

    def for_isolators(self) -> isolators.Limits:
        """The isolators' own type (they import nothing of ours): the cgroup cpu isolator
        derives the same shares and quota from `cpus` with the same functions."""
        return isolators.Limits(cpus=self.cpus, mem_bytes=self.mem_bytes, pids=self.pids)
