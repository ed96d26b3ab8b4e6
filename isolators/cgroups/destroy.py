"""Kill every process of a container's cgroups, reliably.

Killing pids one by one races with fork: a process can fork between the read of cgroup.procs
and the kill. Freezing first stops that, and SIGKILL reaches frozen, stopped (SIGSTOP) and
ptraced tasks alike; it takes effect once the cgroup is thawed. v2 kernels >= 5.14 offer
cgroup.kill, which does the whole thing atomically in the kernel.

The killed processes are held by pidfds (Linux 5.3+), opened while their cgroup is frozen: a
frozen process cannot exit, so its pid cannot be reused before the pidfd names it, and the
signal sent through the pidfd reaches the member that was listed (the same holds only mostly
for a cgroup that did not freeze in time, as it did for kill by pid). A pidfd becomes readable
when its process has exited, so the wait for the exits ends when they happened; a sleep would
either outlast them (the event loop sleeps in whole milliseconds) or end before the teardown
of a large address space. Without pidfd_open, short growing sleeps instead.

Callers: the native runtime's kill_all (after the end of the container's pid namespace, when
it has one of its own: then this usually finds the cgroups empty), LXC's kill and teardown, and
the recovery of cgroups nobody knows (CgroupIsolator.recover).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
from collections.abc import AsyncIterator, Collection
from pathlib import Path
from types import TracebackType

from isolators.cgroups import files
from isolators.cgroups.errors import CgroupFileError, DestroyError
from isolators.cgroups.hierarchy import Hierarchies

log = logging.getLogger(__name__)

ROUNDS = 60
FREEZE_TIMEOUT = 0.5
# The pidfds one round holds at most: the rest of a fork bomb's members are killed by pid
# (frozen, they cannot have been replaced) and found by the next read if still there.
HELD_PIDS = 128
# Checks of the freezer's state that only yield to the event loop before the first sleep: a
# sleeping task freezes within microseconds of the write, the shortest sleep takes 1 ms.
FREEZE_SPINS = 50


def _round_timeout(round_number: int) -> float:
    """How long one round waits for the exits of what it killed: growing, since a large
    address space takes longer to tear down. 60 rounds sum to about 3.5 s."""
    return min(0.002 * (round_number + 1), 0.1)


async def _readable(pidfds: Collection[int], timeout: float) -> None:
    """Until every pidfd is readable (its process has exited) or `timeout` has passed."""
    loop = asyncio.get_running_loop()
    waiting = set(pidfds)
    all_exited: asyncio.Future[None] = loop.create_future()

    def exited(pidfd: int) -> None:
        loop.remove_reader(pidfd)
        waiting.discard(pidfd)
        if not waiting and not all_exited.done():
            all_exited.set_result(None)

    try:
        for pidfd in pidfds:
            loop.add_reader(pidfd, exited, pidfd)
        await asyncio.wait([all_exited], timeout=timeout)
    finally:
        for pidfd in pidfds:
            loop.remove_reader(pidfd)


class _Members:
    """The processes a cgroup listed, up to HELD_PIDS of them held by pidfds: the kill reaches
    the process listed, and its exit is seen as it happens. The pidfds close with the `with`."""

    def __init__(self) -> None:
        self.pids: list[int] = []
        self._pidfds: dict[int, int] = {}
        self._unheld = False  # some pid still runs but got no pidfd: the wait sleeps

    def hold(self, pids: list[int]) -> None:
        self.pids = pids
        for pid in pids[:HELD_PIDS]:
            try:
                self._pidfds[pid] = os.pidfd_open(pid)
            except ProcessLookupError:
                continue  # gone already
            except OSError as exc:  # ENOSYS before Linux 5.3; EMFILE: wait for those held
                self._unheld = not self._pidfds
                if exc.errno not in (errno.ENOSYS, errno.EMFILE, errno.ENFILE):
                    log.debug("pidfd_open(%d): %s", pid, exc)
                break

    def __enter__(self) -> _Members:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for pidfd in self._pidfds.values():
            os.close(pidfd)
        self._pidfds.clear()

    def kill(self) -> None:
        for pid in self.pids:
            pidfd = self._pidfds.get(pid)
            with contextlib.suppress(ProcessLookupError):
                if pidfd is None:
                    os.kill(pid, signal.SIGKILL)
                else:
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)

    async def exited(self, timeout: float) -> None:
        """Until the held processes have exited, or `timeout`; a sleep of `timeout` if none
        could be held. The caller reads the cgroup again for what is left."""
        if self._pidfds:
            await _readable(self._pidfds.values(), timeout)
        elif self._unheld:
            await asyncio.sleep(timeout)


def _is_frozen(cgroup: Path, *, v2: bool) -> bool:
    """v1: freezer.state reads FROZEN (not FREEZING); v2: cgroup.events has "frozen 1"."""
    if v2:
        return files.read_kv(cgroup / "cgroup.events").get("frozen") == 1
    return files.read_text(cgroup / "freezer.state").strip() == "FROZEN"


async def _wait_frozen(cgroup: Path, *, v2: bool, timeout: float = FREEZE_TIMEOUT) -> bool:
    """Until frozen; False on timeout or if the cgroup vanished. The caller kills anyway:
    SIGKILL stays queued for tasks that are still freezing and acts on thaw."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    checks = 0
    while True:
        try:
            if _is_frozen(cgroup, v2=v2):
                return True
        except FileNotFoundError:
            return False
        if loop.time() > deadline:
            return False
        checks += 1
        await asyncio.sleep(0 if checks <= FREEZE_SPINS else 0.001)


@contextlib.asynccontextmanager
async def _frozen(cgroup: Path, *, v2: bool) -> AsyncIterator[None]:
    """The cgroup frozen for the block (or still freezing after FREEZE_TIMEOUT), thawed after
    it whatever happened."""
    control, frozen, thawed = (
        ("cgroup.freeze", "1", "0") if v2 else ("freezer.state", "FROZEN", "THAWED")
    )
    try:
        files.write(cgroup / control, frozen)
        if not await _wait_frozen(cgroup, v2=v2):
            log.debug("%s did not freeze within %.1fs; killing anyway", cgroup, FREEZE_TIMEOUT)
        yield
    finally:
        if cgroup.is_dir():
            files.write(cgroup / control, thawed)


async def _freeze_kill_thaw(cgroup: Path, *, v2: bool) -> None:
    """Freeze, SIGKILL everything listed, thaw, wait for the exits; repeat until cgroup.procs
    is empty."""
    pids = files.read_pids(cgroup)
    for round_number in range(ROUNDS):
        if not pids:
            return
        with _Members() as members:
            async with _frozen(cgroup, v2=v2):
                members.hold(files.read_pids(cgroup))
                members.kill()
            await members.exited(_round_timeout(round_number))
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
        with _Members() as members:
            members.hold(pids)
            if use_kill_file:
                files.write(kill_file, "1")
            else:
                members.kill()
            await members.exited(_round_timeout(round_number))
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
