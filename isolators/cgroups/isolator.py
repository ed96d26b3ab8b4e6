"""What every cgroup isolator does the same way: create its cgroups in prepare, hand their
cgroup.procs paths to the launcher, remove them in cleanup, and clear orphans in recover.

Subclasses set `controllers` (v1 controllers whose directories they own) and implement
`apply` (the policy: which values to write for a Limits).
"""

from __future__ import annotations

import logging
from pathlib import Path

from isolators.base import Isolator, LaunchInfo, Limits, Statistics
from isolators.cgroups import files
from isolators.cgroups.accounting import read_statistics
from isolators.cgroups.destroy import destroy_cgroup_processes
from isolators.cgroups.hierarchy import Hierarchies

log = logging.getLogger(__name__)


class CgroupIsolator(Isolator):
    """Base of cgroups/* isolators. On v2 all of them share the container's one directory."""

    controllers: tuple[str, ...] = ()
    # Controllers an isolator needs enabled in cgroup.subtree_control on v2.
    v2_controllers: tuple[str, ...] = ()

    def __init__(self, hierarchies: Hierarchies) -> None:
        self.hierarchies = hierarchies
        # Mounts as text (fixed at discovery): the paths of a launch are joined as strings,
        # pathlib's joins cost more than the cgroup work itself. Each controller's, and this
        # isolator's distinct ones in container_dirs' order (co-mounted controllers share one).
        self._mount_of = {name: str(mount) for name, mount in hierarchies.mounts.items()}
        self._own_mounts = tuple(
            dict.fromkeys(self._mount_of[c] for c in self.controllers if c in self._mount_of)
        )

    def dirs(self, container_id: str) -> list[Path]:
        """This isolator's cgroup directories for the container (one on v2)."""
        return self.hierarchies.container_dirs(container_id, self.controllers)

    def dir_names(self, container_id: str) -> list[str]:
        """dirs() as strings."""
        relative = self.hierarchies.relative(container_id)
        return [f"{mount}/{relative}" for mount in self._own_mounts]

    def cgroup(self, controller: str, container_id: str) -> str:
        """Hierarchies.path() as a string: the container's directory of one controller."""
        mount = self._mount_of.get(controller)
        if mount is None:  # not mounted: the error that says what is
            return str(self.hierarchies.path(controller, container_id))
        return f"{mount}/{self.hierarchies.relative(container_id)}"

    def roots(self) -> list[Path]:
        """`<mount>/<cgroups_root>` of each of this isolator's controllers, deduplicated."""
        roots: list[Path] = []
        for controller in self.controllers:
            if self.hierarchies.has(controller):
                root = self.hierarchies.root(controller)
                if root not in roots:
                    roots.append(root)
        return roots

    async def prepare(self, container_id: str, limits: Limits) -> LaunchInfo | None:
        self.hierarchies.enable_v2_controllers(self.v2_controllers)
        dirs = self.dir_names(container_id)
        for cgroup in dirs:
            files.create(cgroup)
        await self.apply(container_id, limits, initial=True)
        return LaunchInfo(cgroup_procs=[f"{cgroup}/cgroup.procs" for cgroup in dirs])

    async def apply(self, container_id: str, limits: Limits, *, initial: bool) -> None:
        """Write the limits (policy). `initial` is True from prepare, False from update."""

    async def update(self, container_id: str, limits: Limits) -> None:
        await self.apply(container_id, limits, initial=False)

    async def usage(self, container_id: str) -> Statistics:
        return read_statistics(d for d in self.dirs(container_id) if d.is_dir())

    async def cleanup(self, container_id: str) -> None:
        for cgroup in self.dir_names(container_id):
            await files.remove(cgroup)

    def existing_ids(self) -> set[str]:
        """Container ids that have a cgroup under our root in any of our controllers."""
        return {name for root in self.roots() for name in self.hierarchies.children(root)}

    async def recover(self, known: set[str]) -> None:
        """Re-attach to known containers; kill and remove cgroups nobody knows about."""
        existing = self.existing_ids()
        for container_id in sorted(existing - known):
            await destroy_cgroup_processes(self.hierarchies, container_id)
            await self.cleanup(container_id)
            for cgroup in self.dirs(container_id):
                log.info("%s: removed orphan cgroup %s", self.name, cgroup)
        for container_id in sorted(existing & known):
            await self.reattach(container_id)

    async def reattach(self, container_id: str) -> None:
        """Rebuild in-memory state for a container that survived a restart."""
