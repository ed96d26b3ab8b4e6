"""Kill every process of a container's cgroups, reliably.

Killing pids one by one races with fork: a process can fork between the read of cgroup.procs
and the kill. Freezing first stops that, and SIGKILL reaches frozen, stopped (SIGSTOP) and
ptraced tasks alike; it takes effect once the cgroup is thawed. v2 kernels >= 5.14 offer
cgroup.kill, which does the whole thing atomically in the kernel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path

from isolators.cgroups import files
from isolators.cgroups.errors import CgroupFileError, DestroyError
from isolators.cgroups.hierarchy import Hierarchies

log = logging.getLogger(__name__)

ROUNDS = 60
FREEZE_TIMEOUT = 0.5


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def _pause(round_number: int) -> None:
    """Short, growing sleeps: exiting tasks usually leave within a millisecond or two, but a
    large address space takes longer to tear down. 60 rounds sum to about 3.5 s."""
    await asyncio.sleep(min(0.002 * (round_number + 1), 0.1))


def _is_frozen(cgroup: Path, *, v2: bool) -> bool:
    """v1: freezer.state reads FROZEN (not FREEZING); v2: cgroup.events has "frozen 1"."""
    if v2:
        return files.read_kv(cgroup / "cgroup.events").get("frozen") == 1
    return files.read_text(cgroup / "freezer.state").strip() == "FROZEN"


async def _wait_frozen(cgroup: Path, *, v2: bool, timeout: float = FREEZE_TIMEOUT) -> bool:
    """Poll until frozen; False on timeout or if the cgroup vanished. The caller kills anyway:
    SIGKILL stays queued for tasks that are still freezing and acts on thaw."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            if _is_frozen(cgroup, v2=v2):
                return True
        except FileNotFoundError:
            return False
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.001)


async def _freeze_kill_thaw(cgroup: Path, *, v2: bool) -> None:
    """Freeze, SIGKILL everything listed, thaw; repeat until cgroup.procs is empty."""
    control, frozen, thawed = (
        ("cgroup.freeze", "1", "0") if v2 else ("freezer.state", "FROZEN", "THAWED")
    )
    pids = files.read_pids(cgroup)
    for round_number in range(ROUNDS):
        if not pids:
            return
        try:
            files.write(cgroup / control, frozen)
            if not await _wait_frozen(cgroup, v2=v2):
                log.debug("%s did not freeze within %.1fs; killing anyway", cgroup, FREEZE_TIMEOUT)
            _kill(files.read_pids(cgroup))
        finally:
            if cgroup.is_dir():
                files.write(cgroup / control, thawed)
        await _pause(round_number)
        pids = files.read_pids(cgroup)
    raise DestroyError(f"{cgroup / 'cgroup.procs'} still lists pids {pids} after {ROUNDS} rounds")


async def _kill_until_empty(cgroup: Path) -> None:
    """Without a freezer (a controller directory holding strays, or v2 with cgroup.kill):
    kill what is listed until nothing is."""
    kill_file = cgroup / "cgroup.kill"
    use_kill_file = kill_file.exists()
    for round_number in range(ROUNDS):
        pids = files.read_pids(cgroup)
        if not pids:
            return
        if use_kill_file:
            files.write(kill_file, "1")
        else:
            _kill(pids)
        await _pause(round_number)
    pids = files.read_pids(cgroup)
    if pids:
        raise DestroyError(
            f"{cgroup / 'cgroup.procs'} still lists pids {pids} after {ROUNDS} rounds"
        )


async def destroy_cgroup_processes(hierarchies: Hierarchies, container_id: str) -> None:
    """Kill every process in the container's cgroups and wait until they have all left.

    v1: freezer first (freeze/kill/thaw), then a sweep of the other controllers' directories
    for processes that joined only some of them. v2: cgroup.kill if the kernel has it, else
    freeze/kill/thaw with cgroup.freeze. Raises DestroyError if processes remain.
    """
    dirs = [d for d in hierarchies.container_dirs(container_id) if d.is_dir()]
    if hierarchies.version == 1 and hierarchies.has("freezer"):
        freezer = hierarchies.path("freezer", container_id)
        if freezer.is_dir():
            await _freeze_kill_thaw(freezer, v2=False)
    elif hierarchies.version == 2:
        for cgroup in dirs:
            if not (cgroup / "cgroup.kill").exists() and (cgroup / "cgroup.freeze").exists():
                await _freeze_kill_thaw(cgroup, v2=True)
    for cgroup in dirs:
        try:
            await _kill_until_empty(cgroup)
        except CgroupFileError:
            if cgroup.is_dir():
                raise
