"""In-memory state of the LXC driver: the containers it watches, and the monitors of launches
not finished yet (so a cleanup during a launch finds them).

Watching a container is waiting for its init (the supervisor) to end, and, where the memory
controller is there, for the memory limit to be hit: Mesos semantics, a container that hits its
limit is ended, with the reason. Nothing here survives a restart of the service: recovery
attaches again from the checkpointed handles (handle.py).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from adapter.core.errors import NotFound
from adapter.core.model import LaunchSpec
from adapter.runtimes.lxc.handle import LxcHandle
from adapter.supervisor.children import Child as Monitor
from isolators.base import Limitation
from isolators.cgroups.errors import CgroupError
from isolators.cgroups.mem import MemIsolator

log = logging.getLogger(__name__)


@dataclass
class WatchedContainer:
    """One container this driver watches."""

    handle: LxcHandle
    spec: LaunchSpec  # what was launched: an exec runs as its workload
    monitor_process: Monitor | None  # None after a restart: not our child
    exit_task: asyncio.Task[None]
    watch_task: asyncio.Task[None] | None = None
    limitation: Limitation | None = None


class LxcState:
    def __init__(self, mem: MemIsolator | None) -> None:
        self.containers: dict[str, WatchedContainer] = {}
        self.starting: dict[str, Monitor] = {}  # lxc-start of a launch not finished yet
        self._mem = mem

    def attach(self, handle: LxcHandle, spec: LaunchSpec, process: Monitor | None) -> None:
        container = WatchedContainer(handle, spec, process, asyncio.create_task(handle.init.wait()))
        if self._mem is not None and handle.init.is_alive():
            container.watch_task = asyncio.create_task(self._watch_memory(container))
        self.containers[handle.name] = container

    async def _watch_memory(self, container: WatchedContainer) -> None:
        """Mesos semantics: a container that hits its memory limit is ended, with the reason."""
        assert self._mem is not None
        cid = container.handle.name
        try:
            limitation = await self._mem.watch(cid)
        except (OSError, CgroupError):
            return  # the cgroup went away: the container has ended
        container.limitation = limitation
        log.info("%s hit a limit: %s", cid, limitation.message)
        container.handle.workload_init.send(9)

    def running(self, container_id: str) -> WatchedContainer:
        """The container, or NotFound naming it."""
        container = self.containers.get(container_id)
        if container is None:
            raise NotFound(f"lxc runtime: no running container {container_id!r}")
        return container

    def forget(self, container_id: str) -> tuple[WatchedContainer | None, Monitor | None]:
        """Stop watching the container; what there was of it: its record, and its monitor
        (ours, whether its launch finished or not; None after a restart)."""
        container = self.containers.pop(container_id, None)
        process = self.starting.pop(container_id, None)
        if container is not None:
            process = process or container.monitor_process
            container.exit_task.cancel()  # done already, unless the exit never came
            if container.watch_task is not None:
                container.watch_task.cancel()
        return container, process

    def close(self) -> None:
        for container in self.containers.values():
            container.exit_task.cancel()
            if container.monitor_process is not None:
                container.monitor_process.close()
            if container.watch_task is not None:
                container.watch_task.cancel()
        self.containers.clear()
