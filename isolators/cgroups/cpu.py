"""cgroups/cpu: CPU shares (always) and CFS bandwidth (when enabled), with Mesos' arithmetic.

On v1 the isolator also owns the cpuacct cgroup (co-mounted or not) so usage can be accounted.
"""

from __future__ import annotations

from isolators.base import Limits
from isolators.cgroups import files
from isolators.cgroups.hierarchy import Hierarchies
from isolators.cgroups.isolator import CgroupIsolator

CPU_SHARES_PER_CPU = 1024
MIN_CPU_SHARES = 2
CFS_PERIOD_US = 100_000
MIN_CFS_QUOTA_US = 1_000


def cpu_shares(cpus: float) -> int:
    """Mesos: 1024 shares per cpu, at least the kernel minimum of 2."""
    return max(int(CPU_SHARES_PER_CPU * cpus), MIN_CPU_SHARES)


def cfs_quota_us(cpus: float) -> int:
    """Mesos: quota = period x cpus, at least 1 ms (the kernel rejects smaller quotas)."""
    return max(int(CFS_PERIOD_US * cpus), MIN_CFS_QUOTA_US)


def cpu_weight(shares: int) -> int:
    """v1 shares [2, 262144] -> v2 weight [1, 10000], the conversion runc and systemd use."""
    return 1 + ((shares - 2) * 9999) // 262142


class CpuIsolator(CgroupIsolator):
    name = "cgroups/cpu"
    controllers = ("cpu", "cpuacct")
    v2_controllers = ("cpu",)

    def __init__(self, hierarchies: Hierarchies, *, enable_cfs: bool = False) -> None:
        super().__init__(hierarchies)
        self.enable_cfs = enable_cfs

    async def apply(self, container_id: str, limits: Limits, *, initial: bool) -> None:
        if limits.cpus is None:
            return
        cgroup = self.cgroup("cpu", container_id)
        shares = cpu_shares(limits.cpus)
        if self.hierarchies.version == 1:
            files.write(f"{cgroup}/cpu.shares", shares)
            if self.enable_cfs:
                files.write(f"{cgroup}/cpu.cfs_period_us", CFS_PERIOD_US)
                files.write(f"{cgroup}/cpu.cfs_quota_us", cfs_quota_us(limits.cpus))
            return
        files.write(f"{cgroup}/cpu.weight", cpu_weight(shares))
        quota = str(cfs_quota_us(limits.cpus)) if self.enable_cfs else "max"
        files.write(f"{cgroup}/cpu.max", f"{quota} {CFS_PERIOD_US}")
