"""The cgroup attach warm-up: which file it writes, what it writes, and that a failure turns it
off instead of failing launches."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from isolators.cgroups.warm import AttachWarmer, OwnCgroup


def wait_for_writes(warmer: AttachWarmer, count: int) -> None:
    deadline = time.monotonic() + 5
    while warmer.writes < count:
        assert time.monotonic() < deadline, f"{warmer.writes} writes, wanted {count}"
        time.sleep(0.001)


V1_MOUNTS = (
    "30 25 0:26 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd\n"
    "31 25 0:27 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
    "32 25 0:28 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n"
    "33 25 0:29 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
)
V2_MOUNTS = "40 25 0:30 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"


def tables(tmp_path: Path, mounts: str, memberships: str) -> tuple[Path, Path]:
    (tmp_path / "mountinfo").write_text(mounts)
    (tmp_path / "cgroup").write_text(memberships)
    return tmp_path / "mountinfo", tmp_path / "cgroup"


def test_v1_prefers_pids_and_skips_named_hierarchies(tmp_path: Path) -> None:
    mountinfo, cgroup = tables(
        tmp_path,
        V1_MOUNTS,
        "5:memory:/agent/job\n4:pids:/agent\n1:name=systemd:/init.scope\n0::/agent\n",
    )
    expected = Path("/sys/fs/cgroup/pids/agent/cgroup.procs")
    assert OwnCgroup(mountinfo, cgroup).procs_file() == expected


def test_v1_takes_another_controller_when_pids_is_not_mounted(tmp_path: Path) -> None:
    mounts = V1_MOUNTS.replace("rw,pids", "rw,hugetlb")
    mountinfo, cgroup = tables(tmp_path, mounts, "5:memory:/job\n4:pids:/\n0::/\n")
    expected = Path("/sys/fs/cgroup/memory/job/cgroup.procs")
    assert OwnCgroup(mountinfo, cgroup).procs_file() == expected


def test_v2_only(tmp_path: Path) -> None:
    mountinfo, cgroup = tables(tmp_path, V2_MOUNTS, "0::/system.slice/containerizer.service\n")
    expected = Path("/sys/fs/cgroup/system.slice/containerizer.service/cgroup.procs")
    assert OwnCgroup(mountinfo, cgroup).procs_file() == expected


def test_no_tables_no_file(tmp_path: Path) -> None:
    assert OwnCgroup(tmp_path / "absent", tmp_path / "absent too").procs_file() is None
    mountinfo, cgroup = tables(tmp_path, "", "0::/\n")
    assert OwnCgroup(mountinfo, cgroup).procs_file() is None


def test_writes_zero_the_writer_itself(tmp_path: Path) -> None:
    """ "0" moves the writer, into the cgroup it is in: nothing moves, the lock is taken."""
    procs = tmp_path / "cgroup.procs"
    procs.write_text("")
    warmer = AttachWarmer(lambda: procs)
    try:
        warmer.warm()
        wait_for_writes(warmer, 1)
        warmer.warm()
        wait_for_writes(warmer, 2)
    finally:
        warmer.close()
    assert procs.read_text() == "0"
    assert not warmer.enabled  # closed
    warmer.warm()
    assert warmer.writes == 2


def test_a_file_it_cannot_write_turns_it_off_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    warmer = AttachWarmer(lambda: tmp_path / "no such cgroup" / "cgroup.procs")
    with caplog.at_level(logging.INFO, logger="isolators.cgroups.warm"):
        warmer.warm()
        assert warmer._thread is not None
        warmer._thread.join(timeout=5)
    assert not warmer.enabled
    assert "warm-up off" in caplog.text
    warmer.warm()  # off: a no-op, no thread, no error
    warmer.close()


def test_without_a_file_it_never_starts_a_thread() -> None:
    warmer = AttachWarmer(None)
    warmer.warm()
    assert warmer._thread is None
    warmer.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="writing cgroup.procs needs root")
def test_the_real_write_leaves_this_process_where_it_is() -> None:
    """On the host's own hierarchy: the write succeeds and moves nothing."""
    procs = OwnCgroup().procs_file()
    if procs is None:
        pytest.skip("no cgroup hierarchy mounted here")
    before = Path("/proc/self/cgroup").read_text()
    warmer = AttachWarmer(lambda: procs)
    try:
        warmer.warm()
        wait_for_writes(warmer, 1)
        assert warmer.enabled  # not turned off: the write succeeded
    finally:
        warmer.close()
    assert Path("/proc/self/cgroup").read_text() == before


def test_a_process_moved_since_is_written_where_it_is_now(tmp_path: Path) -> None:
    """The membership is read again before every write: a warm-up writes 0 to the cgroup the
    service is in now, never the one it was in (which would move it back)."""
    mountinfo, cgroup = tables(tmp_path, V1_MOUNTS, "4:pids:/before\n0::/\n")
    own = OwnCgroup(mountinfo, cgroup)
    assert own.procs_file() == Path("/sys/fs/cgroup/pids/before/cgroup.procs")
    cgroup.write_text("4:pids:/after\n0::/\n")
    assert own.procs_file() == Path("/sys/fs/cgroup/pids/after/cgroup.procs")

    before, after = tmp_path / "before.procs", tmp_path / "after.procs"
    before.write_text("")
    after.write_text("")
    where = [before]
    warmer = AttachWarmer(lambda: where[0])
    try:
        warmer.warm()
        wait_for_writes(warmer, 1)
        where[0] = after
        warmer.warm()
        wait_for_writes(warmer, 2)
    finally:
        warmer.close()
    assert before.read_text() == "0" and after.read_text() == "0"


def test_a_cgroup_that_cannot_be_found_turns_it_off(tmp_path: Path) -> None:
    warmer = AttachWarmer(lambda: None)
    warmer.warm()
    assert warmer._thread is not None
    warmer._thread.join(timeout=5)
    assert not warmer.enabled and warmer.writes == 0
    warmer.close()


def test_kept_warm_writes_again_while_held_and_stops_after(tmp_path: Path) -> None:
    """A launch that prepares longer than a grace period (a CNI chain) must still find the lock
    warm at its attach: the writes go on while it is held, and end with it."""
    procs = tmp_path / "cgroup.procs"
    procs.write_text("")
    warmer = AttachWarmer(lambda: procs)
    try:
        with warmer.kept_warm():
            wait_for_writes(warmer, 3)  # the first at once, then every KEEP_WARM_S
        time.sleep(0.05)  # a write under way when the hold ended may still land
        settled = warmer.writes
        time.sleep(0.05)
        assert warmer.writes == settled, "writes went on after the hold ended"
        with warmer.kept_warm(), warmer.kept_warm():  # two launches at once
            wait_for_writes(warmer, settled + 3)
    finally:
        warmer.close()
