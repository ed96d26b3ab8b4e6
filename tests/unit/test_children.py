"""The long-lived child wrapper (adapter/supervisor/children.py: LXC monitors, supervisors)
against real processes: the handshake line, the exit status through the pidfd, shared and
cancelled waits, kill, reaping; and the LXC container-directory removal for small and large
trees."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from adapter.runtimes.lxc.teardown import SMALL_TREE_ENTRIES, remove_tree
from adapter.supervisor.children import Child as Monitor


def _is_zombie_or_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except FileNotFoundError:
        return True


async def test_first_line_then_exit_status_and_reaped(tmp_path: Path) -> None:
    script = "printf 'ok 1 2 3\\nmore\\n'; sleep 0.2; exit 7"
    monitor = Monitor.start(["/bin/sh", "-c", script], tmp_path / "errors.log")
    assert await asyncio.wait_for(monitor.readline(), 10) == b"ok 1 2 3\n"
    assert monitor.returncode is None
    waits = [asyncio.create_task(monitor.wait()) for _ in range(2)]
    assert await asyncio.wait_for(asyncio.gather(*waits), 10) == [7, 7]
    assert monitor.returncode == 7
    assert not os.path.exists(f"/proc/{monitor.pid}")  # reaped: no zombie left


async def test_eof_without_newline_returns_what_came(tmp_path: Path) -> None:
    monitor = Monitor.start(["/bin/sh", "-c", "printf partial"], tmp_path / "errors.log")
    assert await asyncio.wait_for(monitor.readline(), 10) == b"partial"
    assert await asyncio.wait_for(monitor.wait(), 10) == 0


async def test_cancelled_wait_leaves_the_process_waitable_and_kill_ends_it(tmp_path: Path) -> None:
    monitor = Monitor.start(["/bin/sleep", "30"], tmp_path / "errors.log")
    assert not await _finished_within(monitor.wait(), 0.1)  # cancelled by the timeout
    monitor.kill()
    assert await asyncio.wait_for(monitor.wait(), 10) == -9
    assert _is_zombie_or_gone(monitor.pid) and not os.path.exists(f"/proc/{monitor.pid}")


async def test_stderr_goes_to_the_log(tmp_path: Path) -> None:
    log = tmp_path / "errors.log"
    monitor = Monitor.start(["/bin/sh", "-c", "echo oops >&2"], log)
    await asyncio.wait_for(monitor.wait(), 10)
    assert log.read_text() == "oops\n"


async def _finished_within(awaitable: object, timeout: float) -> bool:
    try:
        await asyncio.wait_for(awaitable, timeout)  # type: ignore[arg-type]
    except TimeoutError:
        return False
    return True


async def test_remove_tree_small_and_large(tmp_path: Path) -> None:
    small, large = tmp_path / "small", tmp_path / "large"
    (small / "delta0").mkdir(parents=True)
    (small / "config").write_text("x")
    (large / "delta0").mkdir(parents=True)
    for index in range(SMALL_TREE_ENTRIES + 10):
        (large / "delta0" / f"f{index}").write_text("x")
    await remove_tree(small)
    await remove_tree(large)
    await remove_tree(tmp_path / "absent")
    assert not small.exists() and not large.exists()
