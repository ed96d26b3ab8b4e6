"""cgroups/pids: cap the number of tasks (processes and threads) with pids.max."""

from __future__ import annotations

from isolators.base import Limitation, Limits
from isolators.cgroups import files
from isolators.cgroups.isolator import CgroupIsolator


class PidsIsolator(CgroupIsolator):
    name = "cgroups/pids"
    controllers = ("pids",)
    v2_controllers = ("pids",)

    async def apply(self, container_id: str, limits: Limits, *, initial: bool) -> None:
        value = "max" if limits.pids is None else str(limits.pids)
        files.write(f"{self.cgroup('pids', container_id)}/pids.max", value)

    def check(self, container_id: str) -> Limitation | None:
        """pids.events "max N" counts forks refused at the limit (v1 has it too since 4.x)."""
        cgroup = self.cgroup("pids", container_id)
        try:
            refused = files.read_kv(f"{cgroup}/pids.events").get("max", 0)
            if refused <= 0:
                return None  # the usual answer, without reading the limit
            limit = files.read_text(f"{cgroup}/pids.max").strip()
        except FileNotFoundError:
            return None
        return Limitation(
            "pids", f"Task limit reached: pids.max {limit}, {refused} fork(s) refused"
        )
