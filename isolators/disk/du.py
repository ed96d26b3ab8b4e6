"""disk/du: what directory trees hold on disk, counted as coreutils `du -s -x -B1` counts (Mesos'
disk/du runs `du`), by containerizer-du (supervisor/containerizer-du.c), a walker built for this
that does less work per entry than du (bench_disk.py compares them).

What a pass counts: allocated bytes (a sparse file counts what it holds, not its length), a file
with several hard links counted once (across all the roots), a symlink counted itself and never
followed (a root that is one included), no other filesystem entered, a missing root nothing.
The walk never resolves a path below a root: each directory is opened relative to its parent's
descriptor with O_NOFOLLOW and counted through that descriptor, so a workload swapping a
directory for a symlink mid-walk makes the walker count the symlink, never follow it; and it has
no depth limit (beyond a few dozen open levels it climbs back with `..`, checking the device and
inode recorded on the way down, as du's fts does, not with a descriptor per level).

The trees are a workload's, the roots are ours: the sandbox and the runtime's writable layer,
whose parents the workload cannot change.

A container can create millions of files: a pass that outlives its time budget is killed and
reported partial, with its time; its count is unknown (the walker prints only at the end).
Where the walker is not built (a checkout without `make install`), coreutils du counts the same.
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

WALKER_NAME = "containerizer-du"
DU = shutil.which("du") or "/usr/bin/du"
# The walker's (and du's) status when some entries could not be read (gone since the listing,
# swapped for a symlink): what it could read is still counted.
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
        *counting_command(), "--", *roots,
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


@functools.cache
def counting_command() -> tuple[str, ...]:
    """The walker installed next to the Python running us (the venv's bin dir, where `make
    install` builds it, as it does the supervisor), else on $PATH; else coreutils du."""
    beside_python = os.path.join(os.path.dirname(sys.executable), WALKER_NAME)
    if os.access(beside_python, os.X_OK) and os.path.isfile(beside_python):
        return (beside_python,)
    on_path = shutil.which(WALKER_NAME)
    return (on_path,) if on_path is not None else (DU, "-s", "-x", "-B1")


def _total(output: bytes) -> int:
    """The sum of the output's lines: the walker's one (`BYTES`), or du's (`BYTES<tab>ROOT`, one
    per root it could read)."""
    return sum(int(line.split(b"\t", 1)[0]) for line in output.splitlines() if line.strip())
