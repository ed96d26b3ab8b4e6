"""Pods' cgroups, as the core keeps them: `<cgroups_root>/_pods/<pod>` with the pod-level
limits (the same Mesos arithmetic as a container's: core/limits.py), and the containers a launch
places in a pod (LaunchSpec.linux.pod) nested below it, so every runtime that puts a container at
its cgroup path (native, LXC, containerd) puts it in the pod, and accounting finds it there.

The core places a container before its runtime starts it and again at recovery from the
checkpointed launch; the front end that made a pod (the CRI) creates and removes its cgroup.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from adapter.core.errors import FailedPrecondition
from adapter.core.model import LaunchSpec, Resources, Statistics
from isolators.cgroups import pods
from isolators.cgroups.errors import CgroupError, HierarchyError
from isolators.cgroups.hierarchy import Hierarchies

if TYPE_CHECKING:  # services imports the runtimes' shared parts; the core needs only the type
    from adapter.core.services import Services


class PodCgroups:
    def __init__(self, services: Services) -> None:
        self._services = services

    @property
    def _hierarchies(self) -> Hierarchies:
        try:
            return self._services.cgroups.hierarchies
        except HierarchyError as exc:
            raise FailedPrecondition(f"pod cgroups: {exc}") from exc

    def place(self, spec: LaunchSpec) -> None:
        """The launch's cgroups nest in its pod's (if it names one) from now on."""
        if spec.linux.pod:
            self._hierarchies.place(spec.container_id, spec.linux.pod)

    def unplace(self, container_id: str) -> None:
        with contextlib.suppress(FailedPrecondition):
            self._hierarchies.unplace(container_id)

    def create(self, pod: str, resources: Resources) -> None:
        """The pod's cgroup with its limits (none given: unlimited, still accounted)."""
        limits = self._services.node.limits(resources)
        try:
            pods.create_pod(
                self._hierarchies,
                pod,
                limits.for_isolators(),
                enable_cfs=self._services.node.enable_cfs,
            )
        except (CgroupError, OSError) as exc:
            raise FailedPrecondition(f"pod {pod!r}: cannot make its cgroup: {exc}") from exc

    async def remove(self, pod: str) -> None:
        """Idempotent; the pod's containers have been cleaned up before."""
        await pods.remove_pod(self._hierarchies, pod)

    def statistics(self, pod: str) -> Statistics:
        """The kernel's sums over the pod's containers (and its holder)."""
        return dict(self._services.cgroups.pod_statistics(pod))

    def existing(self) -> set[str]:
        """Pods that have a cgroup (for the front end's sweep of pods it no longer knows)."""
        try:
            return pods.pod_ids(self._hierarchies)
        except FailedPrecondition:
            return set()
