"""cgroups/mem: hard and soft memory limits and OOM notification.

The limit is written as given: Mesos' 32 MiB floor is the caller's policy (the adapter's core
applies it once, for every runtime), not a rule of the kernel.

v1 announces an OOM through an eventfd registered in cgroup.event_control against
memory.oom_control; the fd is added to the event loop with add_reader (no thread, no poll).
The kernel also signals that eventfd when the cgroup is removed, so a wake-up counts as an OOM
only while the cgroup still exists. v2 has no such notification: watch() polls memory.events.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass

from isolators.base import Limitation, Limits
from isolators.cgroups import files
from isolators.cgroups.errors import CgroupFileError
from isolators.cgroups.hierarchy import Hierarchies
from isolators.cgroups.isolator import CgroupIsolator

V2_POLL_INTERVAL = 0.1


@dataclass
class _OomWatch:
    """A v1 OOM registration: the eventfd, the memory.oom_control fd it is bound to, and the
    future watch() awaits."""

    eventfd: int
    control_fd: int
    future: asyncio.Future[Limitation]

    def close(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.remove_reader(self.eventfd)
        os.close(self.eventfd)
        os.close(self.control_fd)
        if not self.future.done():
            self.future.cancel()


class MemIsolator(CgroupIsolator):
    name = "cgroups/mem"
    controllers = ("memory",)
    v2_controllers = ("memory",)

    def __init__(self, hierarchies: Hierarchies) -> None:
        super().__init__(hierarchies)
        self._watches: dict[str, _OomWatch] = {}

    def _cgroup(self, container_id: str) -> str:
        return self.cgroup("memory", container_id)

    async def apply(self, container_id: str, limits: Limits, *, initial: bool) -> None:
        if limits.mem_bytes is not None:
            self._write_limit(self._cgroup(container_id), limits.mem_bytes)
        if initial and self.hierarchies.version == 1:
            self._register_oom(container_id)

    def _write_limit(self, cgroup: str, limit: int) -> None:
        """Raising applies at once. Lowering never goes below current usage: the kernel would
        reclaim or refuse (EBUSY), so clamp to usage and let the soft limit push back."""
        v1 = self.hierarchies.version == 1
        hard, soft, usage_file = (
            ("memory.limit_in_bytes", "memory.soft_limit_in_bytes", "memory.usage_in_bytes")
            if v1
            else ("memory.max", "memory.low", "memory.current")
        )
        current = files.read_limit(f"{cgroup}/{hard}")
        if current is not None and limit < current:
            limit = max(limit, files.read_int(f"{cgroup}/{usage_file}"))
        files.write(f"{cgroup}/{hard}", limit)
        files.write(f"{cgroup}/{soft}", limit)

    def _register_oom(self, container_id: str) -> None:
        """eventfd + memory.oom_control fd written to cgroup.event_control."""
        if container_id in self._watches:
            return
        cgroup = self._cgroup(container_id)
        loop = asyncio.get_running_loop()
        eventfd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            control_fd = os.open(f"{cgroup}/memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            os.close(eventfd)
            raise
        watch = _OomWatch(eventfd, control_fd, loop.create_future())
        try:
            files.write(f"{cgroup}/cgroup.event_control", f"{eventfd} {control_fd}")
        except Exception:
            watch.close(loop)
            raise
        loop.add_reader(eventfd, self._on_oom_event, container_id)
        self._watches[container_id] = watch

    def _on_oom_event(self, container_id: str) -> None:
        watch = self._watches.get(container_id)
        if watch is None:
            return
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(watch.eventfd)
        cgroup = self._cgroup(container_id)
        if not os.path.isdir(cgroup):  # removal also signals the eventfd
            watch.close(asyncio.get_running_loop())
            del self._watches[container_id]
            return
        if not watch.future.done():
            watch.future.set_result(self._limitation(cgroup))

    def _limitation(self, cgroup: str) -> Limitation:
        """The message Mesos gives: the limit and the peak usage that hit it."""
        v1 = self.hierarchies.version == 1
        limit_file, peak_file = (
            ("memory.limit_in_bytes", "memory.max_usage_in_bytes")
            if v1
            else ("memory.max", "memory.peak")
        )
        try:
            limit: object = files.read_limit(f"{cgroup}/{limit_file}")
            peak: object = files.read_int(f"{cgroup}/{peak_file}")
        except (OSError, CgroupFileError):
            limit, peak = "unknown", "unknown"
        return Limitation(
            "mem", f"Memory limit exceeded: limit {limit} bytes, max usage {peak} bytes"
        )

    def _oom_kills(self, cgroup: str) -> int:
        name = "memory.oom_control" if self.hierarchies.version == 1 else "memory.events"
        try:
            return files.read_kv(f"{cgroup}/{name}").get("oom_kill", 0)
        except FileNotFoundError:
            return 0

    async def watch(self, container_id: str) -> Limitation:
        """Resolves with Limitation("mem") on OOM. cleanup() cancels a pending watch."""
        if self.hierarchies.version == 1:
            self._register_oom(container_id)
            return await self._watches[container_id].future
        cgroup = self._cgroup(container_id)
        while self._oom_kills(cgroup) == 0:
            await asyncio.sleep(V2_POLL_INTERVAL)
        return self._limitation(cgroup)

    def check(self, container_id: str) -> Limitation | None:
        cgroup = self._cgroup(container_id)
        return self._limitation(cgroup) if self._oom_kills(cgroup) > 0 else None

    async def reattach(self, container_id: str) -> None:
        if self.hierarchies.version == 1:
            self._register_oom(container_id)

    async def cleanup(self, container_id: str) -> None:
        watch = self._watches.pop(container_id, None)
        if watch is not None:
            watch.close(asyncio.get_running_loop())
        await super().cleanup(container_id)
