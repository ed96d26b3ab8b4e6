"""Taking an LXC container apart: its monitor stopped (LXC's own teardown, forced if it does
not finish), then everything left removed: cgroups, the monitor's cgroup, the network
attachment, the user namespace's mounts and the container's directory.

Three callers: cleanup after a destroy or a failed launch, a launch that finds what an earlier
container of its id left, and recovery, for every container directory no checkpoint names.
Each step tolerates what an earlier, interrupted teardown already removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from adapter.core.services import Services
from adapter.runtimes.lxc import userns
from adapter.runtimes.lxc.container_config import monitor_cgroup
from adapter.runtimes.lxc.state import WatchedContainer
from adapter.supervisor.children import Child as Monitor
from isolators.base import Isolator
from isolators.cgroups import files
from isolators.cgroups.hierarchy import cgroup_mount_points

log = logging.getLogger(__name__)

EXIT_AFTER_KILL_TIMEOUT_S = 10.0
SMALL_TREE_ENTRIES = 64  # a container directory up to this size is removed without a thread


class Teardown:
    """Stops and removes the containers under `lxcpath`; `isolators` are the driver's, whose
    cleanup is part of the removal."""

    def __init__(self, lxcpath: Path, services: Services, isolators: list[Isolator]) -> None:
        self._lxcpath = lxcpath
        self._cgroups = services.cgroups
        self._hierarchies = self._cgroups.hierarchies
        self._cgroup_mounts = cgroup_mount_points() or tuple(set(self._hierarchies.mounts.values()))
        self._cgroups_root = services.node.cgroups_root
        self._node_network = services.network
        self._isolators = isolators

    def _container_dir(self, container_id: str) -> Path:
        return self._lxcpath / container_id

    async def stop_monitor(
        self,
        container_id: str,
        container: WatchedContainer | None,
        process: Monitor | None,
    ) -> None:
        """Wait for LXC's monitor to finish its teardown; force it if it does not."""
        if process is not None:
            finished = await finished_within(process.wait())
        elif container is not None:
            finished = await finished_within(container.handle.monitor.wait())
        else:  # nothing of ours watches it: only a container directory says it may exist
            finished = not self._container_dir(container_id).is_dir()
        if finished:
            return
        await self._lxc_tool("lxc-stop", "-k", "-n", container_id)
        if process is not None and process.returncode is None:
            process.kill()
            await process.wait()
        elif container is not None:
            container.handle.monitor.send(9)

    async def remove_leftovers(self, container_id: str) -> None:
        """What a previous container of this id left. The full removal costs about a
        millisecond on every launch, so it runs only when something is there: the container's
        directory is created before any resource of it but its network attachment (and
        removed after all of them), so with no directory and no cgroup only the network can
        be left."""
        if self._container_dir(container_id).exists() or self._cgroups.dirs(container_id):
            await self.remove_container(container_id)
        else:
            await self._node_network.cleanup(container_id)

    async def remove_container(self, container_id: str) -> None:
        """Remove the container's cgroups (LXC does so at a clean stop; not after a kill -9 of
        its monitor, nor where its teardown met processes a kill had not ended yet), its
        monitor cgroup and its directory (config, overlay, status)."""
        if self._cgroups.dirs(container_id):
            await self._cgroups.destroy(container_id)
        for isolator in self._isolators:
            await isolator.cleanup(container_id)
        for cgroup in self._leftover_cgroups(container_id):
            await files.remove(cgroup)
        await self._node_network.cleanup(container_id)  # its processes are gone: links first
        userns.unmount_all(self._container_dir(container_id))
        await remove_tree(self._container_dir(container_id))

    async def remove_unknown(self, known_ids: set[str]) -> None:
        """Recovery: every container under our lxcpath that `known_ids` does not name."""
        if not self._lxcpath.is_dir():
            return
        for directory in sorted(self._lxcpath.iterdir()):
            if directory.name not in known_ids:
                log.info("lxc: removing unknown container %s", directory)
                await self._lxc_tool("lxc-stop", "-k", "-n", directory.name)
                await self.remove_container(directory.name)

    def _leftover_cgroups(self, container_id: str) -> list[Path]:
        """The container's and its monitor's cgroups still there, each looked at once: LXC makes
        both in every hierarchy, the named and unified ones too, and the accounted ones are
        among those unless a cgroups_hierarchy override put them elsewhere."""
        names = (
            self._hierarchies.relative(container_id),
            monitor_cgroup(self._cgroups_root, container_id),
        )
        swept = (mount / name.lstrip("/") for mount in self._cgroup_mounts for name in names)
        candidates = [*self._hierarchies.container_dirs(container_id), *swept]
        return [cgroup for cgroup in dict.fromkeys(candidates) if cgroup.is_dir()]

    async def _lxc_tool(self, tool: str, *args: str) -> None:
        with contextlib.suppress(OSError):
            process = await asyncio.create_subprocess_exec(
                tool, "-P", str(self._lxcpath), *args, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            await finished_within(process.wait())


def _is_small_tree(directory: Path, limit: int = SMALL_TREE_ENTRIES) -> bool:
    """True if `directory` holds at most `limit` entries in all (stops counting beyond)."""
    count = 0
    for _, subdirs, names in os.walk(directory):
        count += len(subdirs) + len(names)
        if count > limit:
            return False
    return True


async def remove_tree(directory: Path) -> None:
    """Remove a container directory. What LXC leaves there is a handful of entries (config,
    logs, the status file, an empty overlay): removed in place, that is a fraction of the
    thread hop a removal in a worker thread costs on every exit. A workload that filled its
    overlay gets the thread, so a big tree never blocks the event loop."""
    if not directory.exists():
        return
    if _is_small_tree(directory):
        shutil.rmtree(directory, ignore_errors=True)
    else:
        await asyncio.to_thread(shutil.rmtree, directory, True)


async def finished_within(awaitable: Any, timeout: float = EXIT_AFTER_KILL_TIMEOUT_S) -> bool:
    """True if `awaitable` finished within `timeout`."""
    try:
        await asyncio.wait_for(awaitable, timeout)
    except TimeoutError:
        return False
    return True
