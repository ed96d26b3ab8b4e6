"""Build isolators by their Mesos names, and the container-level cgroup operations a runtime
driver needs beside them (kill everything, read statistics, list existing cgroups).

    isolators = build_isolators(["cgroups/cpu", "cgroups/mem"], cgroups_root="containerizer")
    launch = await prepare_isolators(isolators, container_id, limits)   # join launch.cgroup_procs
    cgroups = container_cgroups(cgroups_root="containerizer")
    await cgroups.destroy(container_id); cgroups.statistics(container_id); cgroups.container_ids()
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from isolators.base import Isolator, LaunchInfo, Limitation, Limits, Statistics
from isolators.cgroups import files
from isolators.cgroups.accounting import read_statistics
from isolators.cgroups.cpu import CpuIsolator
from isolators.cgroups.destroy import destroy_cgroup_processes
from isolators.cgroups.errors import CgroupError
from isolators.cgroups.freezer import FreezerIsolator
from isolators.cgroups.hierarchy import Hierarchies
from isolators.cgroups.mem import MemIsolator
from isolators.cgroups.pids import PidsIsolator
from isolators.posix import PosixCpuIsolator, PosixMemIsolator

ISOLATOR_NAMES = ("cgroups/cpu", "cgroups/mem", "cgroups/pids", "posix/cpu", "posix/mem")

# Controllers whose per-container directories a container may have (v1 names).
ACCOUNTED_CONTROLLERS = ("cpu", "cpuacct", "memory", "pids", "freezer")


def _hierarchies(cgroups_root: str, hierarchy_override: str | None) -> Hierarchies:
    override = Path(hierarchy_override) if hierarchy_override else None
    return Hierarchies.discover(cgroups_root, override=override)


def build_isolators(
    names: list[str],
    *,
    cgroups_root: str = "containerizer",
    enable_cfs: bool = False,
    hierarchy_override: str | None = None,
    hierarchies: Hierarchies | None = None,
) -> list[Isolator]:
    """Isolators in the given order, plus cgroups/freezer last on v1 when any cgroups/* is
    used (the destroyer needs a freezer cgroup; last so recover() of the others can still
    freeze orphans before the freezer removes its own cgroups). `hierarchies`: the ones a
    caller already discovered (else discovered here from cgroups_root and the override)."""
    unknown = [name for name in names if name not in ISOLATOR_NAMES]
    if unknown:
        raise ValueError(
            f"unknown isolator(s) {', '.join(map(repr, unknown))}; "
            f"known: {', '.join(ISOLATOR_NAMES)}"
        )
    if not any(name.startswith("cgroups/") for name in names):
        hierarchies = None
    elif hierarchies is None:
        hierarchies = _hierarchies(cgroups_root, hierarchy_override)
    isolators: list[Isolator] = []
    for name in dict.fromkeys(names):
        if name == "cgroups/cpu":
            assert hierarchies is not None
            isolators.append(CpuIsolator(hierarchies, enable_cfs=enable_cfs))
        elif name == "cgroups/mem":
            assert hierarchies is not None
            isolators.append(MemIsolator(hierarchies))
        elif name == "cgroups/pids":
            assert hierarchies is not None
            isolators.append(PidsIsolator(hierarchies))
        elif name == "posix/cpu":
            isolators.append(PosixCpuIsolator())
        else:
            isolators.append(PosixMemIsolator())
    if hierarchies is not None and hierarchies.version == 1 and hierarchies.has("freezer"):
        isolators.append(FreezerIsolator(hierarchies))
    return isolators


async def prepare_isolators(
    isolators: Sequence[Isolator], container_id: str, limits: Limits
) -> LaunchInfo:
    """Run every prepare, merging the cgroup.procs paths the child must join before exec.
    If one fails, the ones already prepared are cleaned up before the error propagates."""
    merged = LaunchInfo()
    done: list[Isolator] = []
    try:
        for isolator in isolators:
            info = await isolator.prepare(container_id, limits)
            done.append(isolator)
            if info is not None:
                merged.cgroup_procs.extend(
                    p for p in info.cgroup_procs if p not in merged.cgroup_procs
                )
    except BaseException:
        # The one that failed may have half-created its state: clean it up too.
        for isolator in reversed(isolators[: len(done) + 1]):
            await isolator.cleanup(container_id)
        raise
    return merged


def limitation_at_exit(isolators: Sequence[Isolator], container_id: str) -> Limitation | None:
    """The first limit the container already hit, read from counters (Isolator.check). Called
    when it exits, it closes the race between the exit and an isolator's notification (an OOM
    kill is both); a cgroup already gone counts as no limitation."""
    for isolator in isolators:
        with contextlib.suppress(OSError, CgroupError):
            if (limitation := isolator.check(container_id)) is not None:
                return limitation
    return None


@dataclass(frozen=True)
class ContainerCgroups:
    """Container-level operations on `<mount>/<cgroups_root>/<id>` across all controllers."""

    hierarchies: Hierarchies

    def dirs(self, container_id: str) -> list[Path]:
        """The container's existing cgroup directories (one per controller on v1)."""
        candidates = self.hierarchies.container_dirs(container_id, ACCOUNTED_CONTROLLERS)
        return [d for d in candidates if d.is_dir()]

    async def destroy(self, container_id: str) -> None:
        """Kill every process of the container and wait until all have left its cgroups."""
        await destroy_cgroup_processes(self.hierarchies, container_id)

    def statistics(self, container_id: str) -> Statistics:
        """Mesos ResourceStatistics of the container, read from all its cgroups."""
        # Not self.dirs(): the reader skips a directory that does not exist by itself, so a
        # stat() of each one first would only repeat that work; and plain strings under roots
        # joined once, since Usage runs this per container and pathlib's joins cost more here
        # than the listing of a directory.
        relative = self.hierarchies.relative(container_id)
        return read_statistics(f"{mount}/{relative}" for mount in self._accounted_mounts)

    def pod_statistics(self, pod: str) -> Statistics:
        """Mesos ResourceStatistics of a pod's cgroup: the kernel's sums over its containers
        (cpu, memory), and their processes and threads counted in each container's cgroup
        (a cgroup's own lists name only its direct members)."""
        relative = self.hierarchies.pod_relative(pod)
        statistics = read_statistics(f"{mount}/{relative}" for mount in self._accounted_mounts)
        if self._accounted_mounts:
            pod_dir = Path(self._accounted_mounts[0]) / relative
            members = [pod_dir / name for name in files.children(pod_dir)]
            threads = "tasks" if self.hierarchies.version == 1 else "cgroup.threads"
            statistics["processes"] = sum(len(files.read_pids(m)) for m in members)
            statistics["threads"] = sum(len(files.read_pids(m, threads)) for m in members)
        return statistics

    @functools.cached_property
    def _accounted_mounts(self) -> tuple[str, ...]:
        """The mount of each accounted controller, in container_dirs' order and deduplicated
        (co-mounted controllers and v2 share one); mounts are fixed at discovery."""
        mounts = (
            self.hierarchies.mounts[c] for c in ACCOUNTED_CONTROLLERS if self.hierarchies.has(c)
        )
        return tuple(dict.fromkeys(str(mount) for mount in mounts))

    def container_ids(self) -> set[str]:
        """Ids that have a cgroup under `<cgroups_root>` (or a pod's cgroup there) in any
        controller (orphan search)."""
        roots = {self.hierarchies.root(c) for c in ACCOUNTED_CONTROLLERS if self.hierarchies.has(c)}
        return {name for root in roots for name in self.hierarchies.children(root)}


def container_cgroups(
    *, cgroups_root: str = "containerizer", hierarchy_override: str | None = None
) -> ContainerCgroups:
    """The cgroup operations for containers under `cgroups_root` (discovers the hierarchy)."""
    return ContainerCgroups(_hierarchies(cgroups_root, hierarchy_override))
