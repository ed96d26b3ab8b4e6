"""disk/du measurement (containerizer-du): blocks counted as allocated, hard links once, symlinks
not followed, no depth limit, a pass out of budget partial; the isolator's budget and limit; the
core's disk limitation kept across a restart (a fake runtime)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from adapter.core.containerizer import Containerizer
from adapter.core.disk import DiskAccounting
from adapter.core.model import Exit, LaunchSpec, Reason, Resources
from adapter.core.state import StateStore
from isolators.disk import du
from isolators.disk.du import measure
from isolators.disk.isolator import DiskIsolator
from tests.unit.test_core import FakeDriver, make_spec

MIB = 1024 * 1024


def write(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))


def blocks_of(*paths: Path) -> int:
    return sum(os.lstat(p).st_blocks * 512 for p in paths)


async def used(*roots: Path) -> int:
    result = await measure([str(root) for root in roots])
    assert result.complete and result.used_bytes is not None
    return result.used_bytes


async def test_counts_allocated_blocks_of_files_and_directories(tmp_path: Path) -> None:
    write(tmp_path / "a" / "one", MIB)
    write(tmp_path / "b" / "two", 3000)
    expected = blocks_of(
        tmp_path, tmp_path / "a", tmp_path / "b", tmp_path / "a" / "one", tmp_path / "b" / "two"
    )
    assert await used(tmp_path) == expected


async def test_a_sparse_file_counts_what_it_holds(tmp_path: Path) -> None:
    with (tmp_path / "sparse").open("wb") as file:
        file.truncate(100 * MIB)
    assert await used(tmp_path) < MIB


async def test_hard_links_are_counted_once_even_across_roots(tmp_path: Path) -> None:
    write(tmp_path / "one" / "data", MIB)
    os.link(tmp_path / "one" / "data", tmp_path / "one" / "again")
    (tmp_path / "two").mkdir()
    os.link(tmp_path / "one" / "data", tmp_path / "two" / "third")
    expected = blocks_of(tmp_path / "one", tmp_path / "two", tmp_path / "one" / "data")
    assert await used(tmp_path / "one", tmp_path / "two") == expected


async def test_symlinks_are_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    write(outside / "big", 4 * MIB)
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "to-dir").symlink_to(outside)
    (tree / "to-file").symlink_to(outside / "big")
    assert await used(tree) < MIB


async def test_a_root_that_is_a_symlink_is_not_followed(tmp_path: Path) -> None:
    write(tmp_path / "real" / "big", MIB)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert await used(tmp_path / "link") < 4096 * 2


async def test_a_missing_root_counts_nothing_and_the_others_count(tmp_path: Path) -> None:
    write(tmp_path / "one" / "f", MIB)
    assert await used(tmp_path / "one", tmp_path / "gone") == await used(tmp_path / "one")


async def test_several_roots_add_up(tmp_path: Path) -> None:
    write(tmp_path / "one" / "f", MIB)
    write(tmp_path / "two" / "f", MIB)
    both = await used(tmp_path / "one", tmp_path / "two")
    assert both == await used(tmp_path / "one") + await used(tmp_path / "two")


async def test_data_far_below_the_root_is_counted(tmp_path: Path) -> None:
    """No depth limit: 600 levels (more than a descriptor per level would allow cheaply)."""
    deep = tmp_path
    for _ in range(600):
        fd = os.open(deep, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.mkdir("d", dir_fd=fd)
        finally:
            os.close(fd)
        deep = deep / "d"
    fd = os.open(deep, os.O_RDONLY | os.O_DIRECTORY)
    try:
        file = os.open("data", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd)
        os.write(file, os.urandom(2 * MIB))
        os.close(file)
    finally:
        os.close(fd)
    assert await used(tmp_path) >= 2 * MIB


async def test_a_pass_out_of_budget_is_partial_with_its_time(tmp_path: Path) -> None:
    for directory in range(20):
        for index in range(200):
            (tmp_path / f"d{directory}").mkdir(exist_ok=True)
            (tmp_path / f"d{directory}" / f"f{index}").write_bytes(b"x")
    partial = await measure([str(tmp_path)], budget=0.0)
    assert not partial.complete and partial.used_bytes is None
    assert 0.0 <= partial.seconds < 5


async def test_the_isolator_keeps_the_last_complete_count_and_doubles_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "f", MIB)
    isolator = DiskIsolator(interval=0.0, budget=30.0)
    await isolator.prepare("c", [str(tmp_path)], 10 * MIB)
    first = (await isolator.usage("c"))["disk_used_bytes"]
    assert first >= MIB

    async def out_of_budget(roots: list[str], budget: float | None = None) -> du.Pass:
        seen_budgets.append(budget)
        return du.Pass(None, budget or 0.0)

    seen_budgets: list[float | None] = []
    monkeypatch.setattr(du, "measure", out_of_budget)
    for _ in range(3):
        assert (await isolator.usage("c"))["disk_used_bytes"] == first
    assert seen_budgets == [30.0, 60.0, 60.0]  # doubled, up to MAX_BUDGET
    last = isolator.last_pass("c")
    assert last is not None and not last.complete
    await isolator.cleanup("c")


async def test_a_limit_exceeded_is_a_limitation_naming_the_numbers(tmp_path: Path) -> None:
    write(tmp_path / "f", 2 * MIB)
    isolator = DiskIsolator(interval=0.05)
    mode = await isolator.prepare("c", [str(tmp_path)], MIB)
    assert mode.name == "du" and "project quotas are not" in mode.why_not_quota
    limitation = await isolator.watch("c")
    assert limitation.resource == "disk"
    assert "exceeds the limit 1048576 bytes" in limitation.message
    await isolator.cleanup("c")


class LayeredDriver(FakeDriver):
    """A fake runtime that shows its writable layer (none): its disk requests are enforced."""

    async def writable_dirs(self, container_id: str) -> tuple[str, ...]:
        return ()


async def test_a_restart_between_the_disk_kill_and_the_exit_still_ends_limitation_disk(
    tmp_path: Path,
) -> None:
    store_path = tmp_path / "state.db"
    first = LayeredDriver()
    first.kill_exit = None  # the exit comes after the "crash"
    before = Containerizer(
        {"native": first},
        StateStore(store_path),
        default_runtime="native",
        disk=DiskAccounting(DiskIsolator(interval=0.05)),
    )
    await before.recover()
    spec = make_spec("full", tmp_path)
    spec = LaunchSpec(**{**spec.__dict__, "resources": Resources(disk_mib=1)})
    await before.launch(spec)
    write(Path(spec.sandbox) / "big", 2 * MIB)
    for _ in range(200):
        if first.killed_all:
            break
        await asyncio.sleep(0.05)
    assert first.killed_all == ["full"]
    await before.close()  # the service is gone before it saw the exit

    second = LayeredDriver()
    after = Containerizer(
        {"native": second},
        StateStore(store_path),
        default_runtime="native",
        disk=DiskAccounting(DiskIsolator(interval=0.05)),
    )
    await after.recover()
    second.finish("full", Exit(signal=9))
    termination = await after.wait("full")
    assert termination.reason is Reason.LIMITATION_DISK
    assert termination.limited_resources == ("disk",)
    assert "exceeds the limit 1048576 bytes" in termination.message
    await after.close()
