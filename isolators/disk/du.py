"""disk/du: what directory trees hold on disk, measured by coreutils `du` as Mesos' disk/du does.

`du -s -x -B1 -- ROOT...`: allocated bytes (a sparse file counts what it holds, not its length),
a file with several hard links counted once (across all the roots), a symlink counted itself
and never followed (du's default walk is physical, command-line arguments included), no other
filesystem entered. du's walk (gnulib fts, FTS_PHYSICAL with FTS_CWDFD) opens each directory
relative to its parent's descriptor with O_NOFOLLOW and checks the device and inode it listed,
so a workload swapping a directory for a symlink mid-walk makes du skip it, never follow it;
and it has no depth limit (it climbs back with `..` checked the same way, not with a descriptor
per level).

The trees are a workload's, the roots are ours: the sandbox and the runtime's writable layer,
whose parents the workload cannot change.

A container can create millions of files: a pass that outlives its time budget is killed and
reported partial, with its time; its count is unknown (du prints only at the end).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass

DU = shutil.which("du") or "/usr/bin/du"
# du's status when some entries could not be read (gone since the listing, swapped for a
# symlink): what it could read is still counted.
SOME_UNREADABLE = 1


@dataclass(frozen=True)
class Pass:
    """One measurement: the bytes, or None when the budget ran out first (or du failed)."""

    used_bytes: int | None
    seconds: float

    @property
    def complete(self) -> bool:
        return self.used_bytes is not None


async def measure(roots: Sequence[str], budget: float | None = None) -> Pass:
    """One du pass over `roots` (missing ones count nothing), at most `budget` seconds."""
    started = time.monotonic()
    if not roots:
        return Pass(0, 0.0)
    process = await asyncio.create_subprocess_exec(
        DU, "-s", "-x", "-B1", "--", *roots,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,  # names the workload chose: not for our log
    )  # fmt: skip
    try:
        output, _ = await asyncio.wait_for(process.communicate(), budget)
    except TimeoutError:
        return Pass(None, time.monotonic() - started)
    finally:
        if process.returncode is None:  # out of budget, or our caller cancelled
            process.kill()
            await process.wait()
    seconds = time.monotonic() - started
    if process.returncode not in (0, SOME_UNREADABLE):
        return Pass(None, seconds)
    return Pass(_total(output), seconds)


def _total(output: bytes) -> int:
    """The sum of du's lines (`BYTES<tab>ROOT`, one per root it could read)."""
    return sum(int(line.split(b"\t", 1)[0]) for line in output.splitlines() if line.strip())
