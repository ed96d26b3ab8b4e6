"""cgroups/freezer (v1 only): a freezer cgroup per container, so the destroyer can stop every
process before killing them (no fork can slip between reading cgroup.procs and SIGKILL).

The registry adds it whenever a cgroups/* isolator is used on v1; v2 has cgroup.freeze and
cgroup.kill in every cgroup.
"""

from __future__ import annotations

from isolators.cgroups.isolator import CgroupIsolator


class FreezerIsolator(CgroupIsolator):
    name = "cgroups/freezer"
    controllers = ("freezer",)
