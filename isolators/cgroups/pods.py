"""Pod cgroups: `<cgroups_root>/_pods/<pod>` in every controller a container's cgroups use.

A pod's cgroup holds the cgroups of the containers placed in it (Hierarchies.place), so the
kernel enforces the pod-level limits written here on all of them together, and its accounting
files are the sums over them. The limits follow the containers' arithmetic (cpu.py, the core's
memory floor): shares always, CFS quota when enabled, a hard memory limit, a pids limit.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from isolators.base import Limits
from isolators.cgroups import files
from isolators.cgroups.cpu import CFS_PERIOD_US, cfs_quota_us, cpu_shares, cpu_weight
from isolators.cgroups.hierarchy import PODS_DIR, Hierarchies

# What a container's cgroups may use (isolators/registry.py ACCOUNTED_CONTROLLERS): its
# parent must exist in each of them.
POD_CONTROLLERS = ("cpu", "cpuacct", "memory", "pids", "freezer")
V2_CONTROLLERS = ("cpu", "memory", "pids")


def pod_dirs(hierarchies: Hierarchies, pod: str) -> list[Path]:
    return hierarchies.dirs_at(hierarchies.pod_relative(pod), POD_CONTROLLERS)


def create_pod(hierarchies: Hierarchies, pod: str, limits: Limits, *, enable_cfs: bool) -> None:
    """Make the pod's cgroups (an existing one is reused) and write its limits."""
    hierarchies.enable_v2_controllers(V2_CONTROLLERS)
    for cgroup in pod_dirs(hierarchies, pod):
        files.create(cgroup)
    if hierarchies.version == 2:
        _delegate_v2(hierarchies, pod)
    _write_limits(hierarchies, pod, limits, enable_cfs=enable_cfs)


def _delegate_v2(hierarchies: Hierarchies, pod: str) -> None:
    """v2: a container's cgroup gets the controllers' files only once every parent between our
    root and it (`_pods`, then the pod) enables them."""
    mount = hierarchies.mounts[V2_CONTROLLERS[0]]
    wanted = [c for c in V2_CONTROLLERS if hierarchies.has(c)]
    pods_dir = mount / hierarchies.cgroups_root / PODS_DIR
    for level in (pods_dir, pods_dir / pod):
        control = level / "cgroup.subtree_control"
        enabled = set(files.read_text(control).split())
        missing = [c for c in wanted if c not in enabled]
        if missing:
            files.write(control, " ".join(f"+{c}" for c in missing))


def _write_limits(hierarchies: Hierarchies, pod: str, limits: Limits, *, enable_cfs: bool) -> None:
    relative = hierarchies.pod_relative(pod)
    v1 = hierarchies.version == 1
    if limits.cpus is not None and hierarchies.has("cpu"):
        cgroup = hierarchies.mounts["cpu"] / relative
        shares = cpu_shares(limits.cpus)
        quota = cfs_quota_us(limits.cpus) if enable_cfs else None
        if v1:
            files.write(cgroup / "cpu.shares", shares)
            if quota is not None:
                files.write(cgroup / "cpu.cfs_period_us", CFS_PERIOD_US)
                files.write(cgroup / "cpu.cfs_quota_us", quota)
        else:
            files.write(cgroup / "cpu.weight", cpu_weight(shares))
            files.write(cgroup / "cpu.max", f"{quota or 'max'} {CFS_PERIOD_US}")
    if limits.mem_bytes is not None and hierarchies.has("memory"):
        cgroup = hierarchies.mounts["memory"] / relative
        files.write(cgroup / ("memory.limit_in_bytes" if v1 else "memory.max"), limits.mem_bytes)
    if limits.pids is not None and hierarchies.has("pids"):
        files.write(hierarchies.mounts["pids"] / relative / "pids.max", limits.pids)


async def remove_pod(hierarchies: Hierarchies, pod: str) -> None:
    """Remove the pod's cgroups; its containers' are gone by then (a container still in one
    makes this fail with EBUSY, named)."""
    for cgroup in pod_dirs(hierarchies, pod):
        await files.remove(cgroup)
        # The last pod takes `_pods` with it. No pod is made meanwhile: making one awaits
        # nothing between its mkdir of `_pods` and of the pod (create_pod is synchronous).
        with contextlib.suppress(OSError):
            cgroup.parent.rmdir()


def pod_ids(hierarchies: Hierarchies) -> set[str]:
    """The pods that have a cgroup in any controller."""
    roots = {hierarchies.root(c) for c in POD_CONTROLLERS if hierarchies.has(c)}
    return {name for root in roots for name in files.children(root / PODS_DIR)}
