"""The process destroyer and recover() on real cgroups: fork bombs, stopped and ptraced
members, and orphans left from a previous run."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from isolators.base import Limits
from isolators.cgroups import files
from isolators.registry import (
    build_isolators,
    container_cgroups,
    prepare_isolators,
)
from tests.integration.cgroup_helpers import start

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="cgroup isolators need root"),
]

CGROUPS = ["cgroups/cpu", "cgroups/mem", "cgroups/pids"]

# Attach with PTRACE_ATTACH and never resume: the tracee sits in ptrace-stop ("t").
PTRACE_ATTACH_SCRIPT = """
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
if libc.ptrace(16, int(sys.argv[1]), None, None) != 0:
    sys.exit(f"PTRACE_ATTACH failed: errno {ctypes.get_errno()}")
time.sleep(600)
"""


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"condition not met within {timeout}s")


async def test_fork_bomb_is_contained_and_destroyed(cgroups_root: str) -> None:
    isolators = build_isolators(CGROUPS, cgroups_root=cgroups_root)
    cgroups = container_cgroups(cgroups_root=cgroups_root)
    launch = await prepare_isolators(isolators, "bomb", Limits(cpus=1, pids=50))
    pids_dir = cgroups.hierarchies.path("pids", "bomb")
    assert (pids_dir / "pids.max").read_text().strip() == "50"
    # `exec sleep`: a fork of the outer shell itself, refused at the limit, would end it early.
    process = await start(launch.cgroup_procs, "bomb() { bomb | bomb & }; bomb; exec sleep 600")
    pids_check = next(i for i in isolators if i.name == "cgroups/pids")
    await until(lambda: pids_check.check("bomb") is not None)
    for _ in range(20):
        assert int((pids_dir / "pids.current").read_text()) <= 50
        await asyncio.sleep(0.02)
    limitation = pids_check.check("bomb")
    assert limitation is not None and limitation.resource == "pids"
    await cgroups.destroy("bomb")
    assert all(files.read_pids(d) == [] for d in cgroups.dirs("bomb"))
    assert await process.wait() == -9
    for isolator in isolators:
        await isolator.cleanup("bomb")
        await isolator.cleanup("bomb")  # idempotent
    assert cgroups.dirs("bomb") == [] and cgroups.container_ids() == set()


async def test_destroy_kills_a_stopped_member(cgroups_root: str) -> None:
    isolators = build_isolators(CGROUPS, cgroups_root=cgroups_root)
    cgroups = container_cgroups(cgroups_root=cgroups_root)
    launch = await prepare_isolators(isolators, "c1", Limits(cpus=1))
    process = await start(launch.cgroup_procs, "sleep 600 & exec sleep 600")
    os.kill(process.pid, signal.SIGSTOP)
    await until(lambda: proc_status(process.pid)["State"].startswith("T"))
    await cgroups.destroy("c1")
    assert await process.wait() == -9
    assert all(files.read_pids(d) == [] for d in cgroups.dirs("c1"))
    for isolator in isolators:
        await isolator.cleanup("c1")
    assert cgroups.dirs("c1") == []


async def test_destroy_without_pidfds_still_kills_everything(
    cgroups_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kernel before 5.3 has no pidfd_open: the destroyer waits with sleeps instead."""
    isolators = build_isolators(CGROUPS, cgroups_root=cgroups_root)
    cgroups = container_cgroups(cgroups_root=cgroups_root)
    launch = await prepare_isolators(isolators, "c1", Limits(cpus=1))
    process = await start(launch.cgroup_procs, "sleep 600 & sleep 601 & exec sleep 602")
    await until(lambda: len(files.read_pids(cgroups.dirs("c1")[0])) == 3)

    def no_pidfds(pid: int, flags: int = 0) -> int:
        raise OSError(errno.ENOSYS, "pidfd_open")

    monkeypatch.setattr(os, "pidfd_open", no_pidfds)
    await cgroups.destroy("c1")
    monkeypatch.undo()
    assert all(files.read_pids(d) == [] for d in cgroups.dirs("c1"))
    assert await process.wait() == -9
    for isolator in isolators:
        await isolator.cleanup("c1")
    assert cgroups.dirs("c1") == []


@pytest.mark.parametrize("tracer", ["strace", "ptrace-attach"])
async def test_destroy_kills_a_ptraced_member(cgroups_root: str, tracer: str) -> None:
    if tracer == "strace" and shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    isolators = build_isolators(CGROUPS, cgroups_root=cgroups_root)
    cgroups = container_cgroups(cgroups_root=cgroups_root)
    launch = await prepare_isolators(isolators, "c1", Limits(cpus=1))
    process = await start(launch.cgroup_procs, "exec sleep 600")
    argv = (
        ["strace", "-o", "/dev/null", "-p", str(process.pid)]
        if tracer == "strace"
        else [sys.executable, "-c", PTRACE_ATTACH_SCRIPT, str(process.pid)]
    )
    tracing = await asyncio.create_subprocess_exec(*argv, stderr=asyncio.subprocess.DEVNULL)
    try:
        await until(lambda: proc_status(process.pid)["TracerPid"] == str(tracing.pid))
        if tracer == "ptrace-attach":  # left in ptrace-stop, the hardest state to freeze
            await until(lambda: proc_status(process.pid)["State"].startswith("t"))
        await cgroups.destroy("c1")
        assert all(files.read_pids(d) == [] for d in cgroups.dirs("c1"))
    finally:
        if tracing.returncode is None:
            tracing.kill()
        await tracing.wait()
    assert await process.wait() == -9
    for isolator in isolators:
        await isolator.cleanup("c1")
    assert cgroups.dirs("c1") == []


async def test_recover_removes_unknown_cgroups_and_their_processes(
    cgroups_root: str, caplog: pytest.LogCaptureFixture
) -> None:
    cgroups = container_cgroups(cgroups_root=cgroups_root)
    h = cgroups.hierarchies
    controllers = ("cpu", "cpuacct", "memory", "pids", "freezer")
    processes = {}
    for cid in ("known", "orphan"):  # as a previous run of the service would have left them
        dirs = h.container_dirs(cid, controllers)
        for cgroup in dirs:
            files.create(cgroup)
        processes[cid] = await start([str(d / "cgroup.procs") for d in dirs], "exec sleep 600")
    isolators = build_isolators(CGROUPS, cgroups_root=cgroups_root)
    with caplog.at_level(logging.INFO, logger="isolators"):
        for isolator in isolators:
            await isolator.recover({"known"})
    assert await processes["orphan"].wait() == -9
    assert cgroups.container_ids() == {"known"}
    assert cgroups.dirs("orphan") == []
    removed = [r.getMessage() for r in caplog.records if "removed orphan cgroup" in r.getMessage()]
    assert len(removed) == len(h.container_dirs("orphan", controllers))
    assert processes["known"].returncode is None
    assert len(cgroups.dirs("known")) == len(h.container_dirs("known", controllers))
    await cgroups.destroy("known")
    assert await processes["known"].wait() == -9
    for isolator in isolators:
        await isolator.cleanup("known")
    assert cgroups.container_ids() == set()
