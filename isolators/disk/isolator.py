"""The disk isolator: a container's disk usage (its sandbox and writable layer), and its limit.

Two modes, chosen per container at `prepare` (Mesos' disk/xfs and disk/du):
    quota    every directory is on one filesystem that enforces project quotas: the directories
             get a project id of their own and the project a hard limit. A write past it fails
             with EDQUOT; the container lives on. Usage is the project's (one quotactl).
    du       otherwise: a `du` pass at most every `interval` seconds; `watch` resolves with a
             Limitation once usage exceeds the limit, and the caller kills the container.

A du pass has a time budget; one that runs out is partial (its count unknown), logged, and
the next pass gets twice the budget, up to MAX_BUDGET, so a tree of millions of files is still
measured, in bounded time per pass.

The project id of a sandbox is on the directory itself, so after a restart `recover` re-derives
which ids are in use from the directories of the running containers; nothing else is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from isolators.base import Limitation, Statistics
from isolators.disk import du, quota

log = logging.getLogger(__name__)

MIB = 1024 * 1024
# How long one du pass may take before it is killed and said partial.
PASS_BUDGET = 2.0
# The most a pass may take after partial ones doubled its budget.
MAX_BUDGET = 60.0


@dataclass(frozen=True)
class Mode:
    """How a container's disk is enforced: "quota", "du", or "" (no limit: measured only);
    for du with a limit, why no quota could be used."""

    name: str
    why_not_quota: str = ""


@dataclass
class _Disk:
    roots: tuple[str, ...]
    limit_bytes: int | None
    budget: float
    project: int | None = None  # quota mode: the project charged for every root
    used_bytes: int = 0  # the last complete du pass's
    last_pass: du.Pass | None = None
    measured_at: float = 0.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class DiskIsolator:
    name = "disk"

    def __init__(self, *, interval: float = 15.0, budget: float = PASS_BUDGET) -> None:
        self.interval = interval
        self.budget = budget
        self._disks: dict[str, _Disk] = {}

    def mode(self, container_id: str) -> str:
        disk = self._disks.get(container_id)
        return "" if disk is None else "quota" if disk.project is not None else "du"

    async def prepare(
        self, container_id: str, roots: Sequence[str], limit_bytes: int | None
    ) -> Mode:
        """Start accounting `roots` (existing directories); with a limit, enforce it by quota
        where the filesystem can, else by measurement (the Mode says why)."""
        await self.cleanup(container_id)
        disk = _Disk(tuple(roots), limit_bytes, self.budget)
        self._disks[container_id] = disk
        if limit_bytes is None:
            return Mode("")
        disk.project, why = await asyncio.to_thread(self._claim_project, disk.roots, limit_bytes)
        return Mode("quota") if disk.project is not None else Mode("du", why)

    async def recover(
        self, container_id: str, roots: Sequence[str], limit_bytes: int | None
    ) -> str:
        """Account a container launched before a restart: a project id found on its first
        directory (ours by range) is its quota, else it is measured."""
        disk = _Disk(tuple(roots), limit_bytes, self.budget)
        self._disks[container_id] = disk
        if roots and limit_bytes is not None:
            disk.project = await asyncio.to_thread(_recorded_project, roots[0])
        return self.mode(container_id)

    async def update(self, container_id: str, limit_bytes: int | None) -> None:
        disk = self._disks.get(container_id)
        if disk is None:
            return
        disk.limit_bytes = limit_bytes
        if disk.project is not None:
            await asyncio.to_thread(_set_limit, disk.roots[0], disk.project, limit_bytes or 0)

    async def usage(self, container_id: str) -> Statistics:
        """disk_used_bytes (and disk_limit_bytes with a limit); {} for an unknown container.
        A du measurement younger than the interval is reused, never walked again."""
        disk = self._disks.get(container_id)
        if disk is None:
            return {}
        used = await self._used(disk, fresh=False)
        statistics: Statistics = {"disk_used_bytes": used}
        if disk.limit_bytes is not None:
            statistics["disk_limit_bytes"] = disk.limit_bytes
        return statistics

    async def watch(self, container_id: str) -> Limitation:
        """Resolves when a measured container's usage exceeds its limit; never in quota mode
        (the kernel refuses the write instead) or without a limit."""
        while True:
            disk = self._disks.get(container_id)
            if disk is not None and disk.project is None and disk.limit_bytes is not None:
                used = await self._used(disk, fresh=True)
                if disk.limit_bytes is not None and used > disk.limit_bytes:
                    return Limitation("disk", _exceeded(used, disk.limit_bytes))
            await asyncio.sleep(self.interval)

    async def cleanup(self, container_id: str) -> None:
        """Release the project (its limit cleared, its id taken off the files, so the id is
        free). Idempotent."""
        disk = self._disks.pop(container_id, None)
        if disk is None:
            return
        async with disk.lock:
            if disk.project is not None:
                await asyncio.to_thread(_release_project, disk.roots, disk.project)

    def last_pass(self, container_id: str) -> du.Pass | None:
        """The last du pass (its time, whether it completed), None in quota mode."""
        disk = self._disks.get(container_id)
        return None if disk is None else disk.last_pass

    async def _used(self, disk: _Disk, *, fresh: bool) -> int:
        if disk.project is not None:
            return await asyncio.to_thread(_project_usage, disk.roots[0], disk.project)
        async with disk.lock:
            stale = time.monotonic() - disk.measured_at >= self.interval
            if disk.last_pass is None or fresh or stale:
                await self._measure(disk)
            return disk.used_bytes

    async def _measure(self, disk: _Disk) -> None:
        """One du pass; out of budget, the usage stays the last complete pass's."""
        measured = await du.measure(disk.roots, disk.budget)
        disk.last_pass, disk.measured_at = measured, time.monotonic()
        if measured.used_bytes is not None:
            disk.used_bytes, disk.budget = measured.used_bytes, self.budget
            return
        log.warning(
            "disk/du of %s: partial pass, stopped after %.2f s; next budget %.0f s",
            disk.roots,
            measured.seconds,
            min(disk.budget * 2, MAX_BUDGET),
        )
        disk.budget = min(disk.budget * 2, MAX_BUDGET)

    def _claim_project(self, roots: tuple[str, ...], limit_bytes: int) -> tuple[int | None, str]:
        """A free project id given to `roots` with the limit; or None (measure instead) and
        why: they are not all on one filesystem that enforces project quotas."""
        fds = [quota.open_directory(root) for root in roots]
        try:
            if not fds or len({os.fstat(fd).st_dev for fd in fds}) != 1:
                return None, "the sandbox and the writable layer are on different filesystems"
            why = quota.why_no_project_quota(fds[0])
            if why:
                return None, why
            taken = {d.project for d in self._disks.values() if d.project is not None}
            for project in quota.PROJECT_IDS:
                if project not in taken and quota.is_unused(fds[0], project):
                    quota.set_limit(fds[0], project, limit_bytes)
                    for fd in fds:
                        quota.assign_project(fd, project)
                    return project, ""
            return None, f"every project id of {quota.PROJECT_IDS} is in use"
        finally:
            for fd in fds:
                os.close(fd)


def _exceeded(used: int, limit: int) -> str:
    return f"disk usage {used} bytes ({used / MIB:.1f} MiB) exceeds the limit {limit} bytes" + (
        f" ({limit / MIB:.1f} MiB)"
    )


def _recorded_project(root: str) -> int | None:
    try:
        fd = quota.open_directory(root)
    except OSError:
        return None
    try:
        project = quota.project_of(fd)
        enforced = not quota.why_no_project_quota(fd)
    except OSError:
        return None
    finally:
        os.close(fd)
    return project if enforced and project in quota.PROJECT_IDS else None


def _set_limit(root: str, project: int, limit_bytes: int) -> None:
    fd = quota.open_directory(root)
    try:
        quota.set_limit(fd, project, limit_bytes)
    finally:
        os.close(fd)


def _project_usage(root: str, project: int) -> int:
    fd = quota.open_directory(root)
    try:
        return quota.used_bytes(fd, project)
    finally:
        os.close(fd)


def _release_project(roots: tuple[str, ...], project: int) -> None:
    for index, root in enumerate(roots):
        try:
            fd = quota.open_directory(root)
        except OSError:  # removed already: nothing is charged there any more
            continue
        try:
            if index == 0:
                with contextlib.suppress(OSError):
                    quota.set_limit(fd, project, 0)
            quota.assign_project(fd, 0)
        except OSError as exc:
            log.warning("disk: releasing project %d of %s: %s", project, root, exc)
        finally:
            os.close(fd)
