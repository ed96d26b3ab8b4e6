"""Helpers shared by the cgroup isolator tests: a private cgroup root, and a process that joins
the cgroups before it runs (the launcher's job in the real driver)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from isolators.cgroups import files
from isolators.cgroups.hierarchy import Hierarchies
from isolators.registry import ContainerCgroups
from tests.cgroup_roots import remove_cgroup_trees, run_scoped_name


@pytest.fixture
async def cgroups_root() -> AsyncIterator[str]:
    root = run_scoped_name()
    yield root
    hierarchies = Hierarchies.discover(root)
    cgroups = ContainerCgroups(hierarchies)
    for container_id in cgroups.container_ids():
        await cgroups.destroy(container_id)
    left = await asyncio.to_thread(remove_cgroup_trees, root)
    assert left == [], f"cgroups left behind: {left}"


async def start(cgroup_procs: list[str], script: str) -> asyncio.subprocess.Process:
    """sh joins the cgroups, then runs `script`."""
    join = " ".join(f"echo $$ > {path};" for path in cgroup_procs)
    process = await asyncio.create_subprocess_exec(
        "sh", "-c", f"{join} {script}", stderr=asyncio.subprocess.DEVNULL
    )
    procs = Path(cgroup_procs[-1])
    while process.pid not in files.read_pids(procs.parent) and process.returncode is None:
        await asyncio.sleep(0.005)
    return process
