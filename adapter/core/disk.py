"""The core's side of the disk isolator: which directories a container's disk is, its limit,
and the watch that ends a measured container past its limit (Mesos' disk/du behaviour).

A container's disk is its sandbox plus, where the runtime shows it (WritableLayers), the
writable layer of its image's root filesystem. Every container is accounted (its Usage carries
disk_used_bytes); one with a disk request also gets disk_limit_bytes and, on a runtime that
shows its writable layer, enforcement: a project quota where the filesystem has one, else the
watch here. A runtime whose writable layer is hidden (in a daemon's snapshot) gets accounting
of its sandbox only, and its launches keep the "not enforced" warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TypeGuard

from adapter.core.errors import ContainerizerError
from adapter.core.model import MIB, Fingerprint, LaunchSpec, Resources, Statistics
from adapter.runtimes.base import Runtime, WritableLayers
from isolators.disk.isolator import DiskIsolator

log = logging.getLogger(__name__)

# Called with the Limitation's message when a measured container exceeds its limit.
OnLimit = Callable[[str], Awaitable[None]]


def limit_bytes(resources: Resources) -> int | None:
    return None if resources.disk_mib is None else int(resources.disk_mib * MIB)


class DiskAccounting:
    def __init__(self, isolator: DiskIsolator) -> None:
        self.isolator = isolator
        self._watches: dict[str, asyncio.Task[None]] = {}
        self._said: set[str] = set()  # the reasons for measuring already logged
        # Runtime class -> whether it shows its writable layer: asked at every launch, and a
        # Protocol's isinstance inspects the class each time.
        self._shows_layers: dict[type, bool] = {}

    def enforces(self, driver: Runtime) -> TypeGuard[WritableLayers]:
        """Whether a disk request is enforced on this runtime: all it writes can be seen."""
        kind = type(driver)
        shows = self._shows_layers.get(kind)
        if shows is None:
            shows = self._shows_layers[kind] = isinstance(driver, WritableLayers)
        return shows

    async def _roots(self, spec: LaunchSpec, driver: Runtime) -> tuple[list[str], str]:
        """The sandbox, and the writable layer where the runtime can say; else why not (a
        daemon that is down, a storage driver without one): the sandbox alone is measured."""
        if not self.enforces(driver):
            return [spec.sandbox], ""
        try:
            layers = await driver.writable_dirs(spec.container_id)
        except ContainerizerError as exc:
            log.warning("%s: its writable layer is not measured: %s", spec.container_id, exc)
            return [spec.sandbox], str(exc)
        return [spec.sandbox, *layers], ""

    def _limit(self, spec: LaunchSpec, driver: Runtime) -> int | None:
        return limit_bytes(spec.resources) if self.enforces(driver) else None

    async def prepare(self, spec: LaunchSpec, driver: Runtime) -> tuple[str, ...]:
        """Once the runtime made the container's directories (its writable layer); the
        launch's warning when its disk request is enforced on its sandbox only."""
        (roots, unmeasured), limit = await self._roots(spec, driver), self._limit(spec, driver)
        mode = await self.isolator.prepare(spec.container_id, roots, limit)
        # How a limit is enforced is the operator's to know; that a container is measured,
        # every container's, is per-launch chatter.
        log.log(
            logging.INFO if mode.name else logging.DEBUG,
            "%s: disk %s over %s",
            spec.container_id,
            mode.name or "measured",
            roots,
        )
        if mode.why_not_quota and mode.why_not_quota not in self._said:
            self._said.add(mode.why_not_quota)  # once per cause, not once per container
            log.warning(
                "disk: no project quota (%s); disk limits are enforced by measurement every %g s",
                mode.why_not_quota,
                self.isolator.interval,
            )
        if limit is None or not unmeasured:
            return ()
        return (
            f"disk: {spec.resources.disk_mib:g} MiB requested, enforced on the sandbox only:"
            f" {unmeasured}",
        )

    async def recover(self, spec: LaunchSpec, driver: Runtime) -> None:
        (roots, _), limit = await self._roots(spec, driver), self._limit(spec, driver)
        await self.isolator.recover(spec.container_id, roots, limit)

    def watch(self, container_id: str, on_limit: OnLimit) -> None:
        """Measure the container every interval; past its limit, `on_limit` (once)."""
        self._watches[container_id] = asyncio.create_task(self._watch(container_id, on_limit))

    async def _watch(self, container_id: str, on_limit: OnLimit) -> None:
        limitation = await self.isolator.watch(container_id)
        log.info("%s hit a limit: %s", container_id, limitation.message)
        await on_limit(limitation.message)

    async def usage(self, container_id: str) -> Statistics:
        return dict(await self.isolator.usage(container_id))

    async def update(self, container_id: str, resources: Resources, driver: Runtime) -> None:
        limit = limit_bytes(resources) if self.enforces(driver) else None
        await self.isolator.update(container_id, limit)

    async def cleanup(self, container_id: str) -> None:
        """Stop the watch and release the isolator's hold (the project id). Idempotent."""
        task = self._watches.pop(container_id, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.isolator.cleanup(container_id)

    async def close(self) -> None:
        """Stop watching; the quotas stay, and recovery finds them on the directories."""
        tasks = list(self._watches.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._watches.clear()


def not_enforced_warning(spec: LaunchSpec) -> str:
    """The Launch warning for a disk request: accepted (Mesos agents always send disk) but not
    enforced by any runtime until a disk isolator exists."""
    return (
        f"disk: {spec.resources.disk_mib:g} MiB requested, but disk is not enforced on this node"
        f" (runtime {spec.runtime!r} has no disk isolator): the container may write more"
    )


def with_disk_note(fingerprint: Fingerprint) -> Fingerprint:
    if fingerprint.capabilities.disk_enforced:
        return fingerprint
    note = "disk: not enforced"
    message = f"{fingerprint.message}; {note}" if fingerprint.message else note
    return replace(fingerprint, message=message)
