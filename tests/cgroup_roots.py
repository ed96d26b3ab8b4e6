"""Cgroup roots the tests create: names that tell this run's roots from any other run's, and
removal of a whole tree in every hierarchy. Plain functions (no fixtures): conftest imports them
before any plugin is registered, and benchmarks use them too."""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from pathlib import Path

from isolators.cgroups import files

CGROUP_MOUNT = Path("/sys/fs/cgroup")
# One id per test run, shared by its xdist workers (started by the controller, they inherit its
# environment). Every cgroup root the run creates carries it, so the end-of-run check finds this
# run's leftovers and never those of a concurrent run.
RUN_ID = os.environ.setdefault("CTZ_TEST_RUN_ID", uuid.uuid4().hex[:8])


def run_scoped_name(prefix: str = "ctz-test") -> str:
    """A fresh cgroup root (or containerd namespace) name that belongs to this run."""
    return f"{prefix}-{RUN_ID}-{uuid.uuid4().hex[:8]}"


def hierarchy_mounts() -> list[Path]:
    """Every cgroup hierarchy under /sys/fs/cgroup: one per v1 controller (or co-mounted set),
    named ones such as systemd, the v2 unified one; or /sys/fs/cgroup itself on a v2-only host."""
    if (CGROUP_MOUNT / "cgroup.procs").exists():
        return [CGROUP_MOUNT]
    mounts: dict[Path, Path] = {}
    for entry in sorted(CGROUP_MOUNT.iterdir()):
        if entry.is_dir() and (entry / "cgroup.procs").exists():
            mounts.setdefault(entry.resolve(), entry)  # cpu and cpu,cpuacct may be one mount
    return list(mounts.values())


def run_cgroup_roots(run_id: str = RUN_ID) -> list[Path]:
    """The top-level cgroups a run (this one by default) created that still exist, in every
    hierarchy."""
    return [p for mount in hierarchy_mounts() for p in mount.glob(f"*-{run_id}-*") if p.is_dir()]


def tree_pids(*patterns: str) -> set[int]:
    """The processes in the top-level cgroups matching `patterns` or below them, in every
    hierarchy."""
    tops = [p for mount in hierarchy_mounts() for pattern in patterns for p in mount.glob(pattern)]
    pids: set[int] = set()
    for cgroup in (Path(d) for top in tops for d, _, _ in os.walk(top)):
        with contextlib.suppress(OSError):
            pids.update(files.read_pids(cgroup))
    return pids


def remove_cgroup_trees(*patterns: str, timeout: float = 10.0) -> list[Path]:
    """Remove the top-level cgroups matching `patterns` (globs, e.g. "root" and "root.*") with
    everything below them, in every hierarchy, deepest first. Processes still in them are the
    caller's own leftovers (a failed test): they are thawed and killed first. Returns what could
    not be removed before `timeout`."""
    tops = [p for mount in hierarchy_mounts() for pattern in patterns for p in mount.glob(pattern)]
    deadline = time.monotonic() + timeout
    while True:
        nested = [Path(d) for top in tops if top.is_dir() for d, _, _ in os.walk(top)]
        nested.sort(key=lambda cgroup: len(cgroup.parts), reverse=True)
        for cgroup in nested:
            _thaw_and_kill(cgroup)
        left = [cgroup for cgroup in nested if not _rmdir(cgroup)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)  # rmdir answers EBUSY until the killed tasks are released


def _thaw_and_kill(cgroup: Path) -> None:
    # A frozen task cannot die: thaw (v1 freezer, v2 cgroup.freeze) before the SIGKILL.
    for name, thawed in (("freezer.state", "THAWED"), ("cgroup.freeze", "0")):
        with contextlib.suppress(OSError):
            (cgroup / name).write_text(thawed)
    # v2 (Linux 5.14+) kills the whole tree at once, a task forking meanwhile included; v1
    # has no such file, so the caller's loop kills again whatever was forked between reads.
    with contextlib.suppress(OSError):
        (cgroup / "cgroup.kill").write_text("1")
    with contextlib.suppress(OSError):
        for pid in files.read_pids(cgroup):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _rmdir(cgroup: Path) -> bool:
    try:
        cgroup.rmdir()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True
