"""Attacks by a workload on the disk isolator's walks over its sandbox (isolators/disk/), on the
real kernel: symlinks to / and /etc (also swapped in for a directory mid-walk), a FIFO, a hard
link to a file outside the tree, a directory 10,000 levels deep, a tree too big to measure in
the budget. The project-id walk runs on a loop-mounted XFS (project ids are settable there
without quota accounting): it must change nothing outside the tree."""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from isolators.disk import du, quota
from tests.conftest import require_root
from tests.integration.test_disk_walker import chain
from tests.run_records import remove_tree, run_scoped_tempdir

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
DEPTH = 10_000
PROJECT = 70_123


def deep(root: Path, depth: int) -> None:
    """root/d/d/.../d (depth levels) with a 1 MiB file at the bottom."""
    chain(root, depth, MIB)


@pytest.fixture
def deep_tree_dir() -> Iterator[Path]:
    """A directory of this run, not under pytest's temporary root (whose clean-up recurses and
    fails 10,000 levels down): removed by coreutils' rm after the test, or by the sweep of a
    run killed before that."""
    directory = run_scoped_tempdir("ctz-deep")
    yield directory
    remove_tree(directory)


def hostile_tree(root: Path, outside: Path) -> None:
    root.mkdir()
    (root / "data").write_bytes(b"y" * MIB)
    os.symlink("/", root / "to-root")
    os.symlink("/etc", root / "to-etc")
    os.symlink(outside, root / "to-outside")
    os.mkfifo(root / "fifo")
    os.link(outside, root / "hard-link")


def test_du_follows_no_symlink_and_survives_a_fifo_and_10000_levels(deep_tree_dir: Path) -> None:
    outside = deep_tree_dir / "host-file"
    outside.write_bytes(b"h" * MIB)
    sandbox = deep_tree_dir / "sandbox"
    hostile_tree(sandbox, outside)
    deep(sandbox, DEPTH)
    measured = asyncio.run(du.measure([str(sandbox)], budget=60))
    assert measured.complete
    assert measured.used_bytes is not None
    # data + the deep leaf + the hard-linked file (counted: its blocks are in the tree too)
    # + 10,000 directories: nothing of / or /etc.
    assert 3 * MIB <= measured.used_bytes < 3 * MIB + DEPTH * 8192


def test_du_never_follows_a_directory_swapped_for_a_symlink_mid_walk(tmp_path: Path) -> None:
    """The workload keeps swapping a big directory for a symlink to / (and back) while it
    is measured: no pass ever counts what the link points at."""
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    (sandbox / "keep").write_bytes(b"k" * MIB)
    stop = threading.Event()

    def swap() -> None:
        while not stop.is_set():
            wide = sandbox / "wide"
            wide.mkdir()
            for index in range(200):
                (wide / str(index)).mkdir()
            subprocess.run(["rm", "-rf", str(wide)], check=True)
            os.symlink("/", wide)
            os.unlink(wide)

    swapper = threading.Thread(target=swap)
    swapper.start()
    try:
        for _ in range(30):
            measured = asyncio.run(du.measure([str(sandbox)], budget=30))
            assert measured.used_bytes is not None
            assert measured.used_bytes < 20 * MIB
    finally:
        stop.set()
        swapper.join()


def test_a_tree_too_big_for_the_budget_is_cut_off_in_time(tmp_path: Path) -> None:
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    for top in range(100):
        directory = sandbox / str(top)
        directory.mkdir()
        for name in range(2000):
            (directory / str(name)).touch()
    budget = 0.02
    measured = asyncio.run(du.measure([str(sandbox)], budget=budget))
    assert not measured.complete
    assert measured.seconds < budget + 1.0


@pytest.fixture
def xfs(tmp_path: Path) -> Iterator[Path]:
    """A loop-mounted XFS of the test's own, unmounted and detached afterwards."""
    require_root()
    image, mount_point = tmp_path / "xfs.img", tmp_path / "xfs"
    mount_point.mkdir()
    with image.open("wb") as file:
        file.truncate(320 * MIB)
    subprocess.run(["mkfs.xfs", "-q", str(image)], check=True)
    device = subprocess.run(
        ["losetup", "--find", "--show", str(image)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        subprocess.run(["mount", device, str(mount_point)], check=True)
        try:
            yield mount_point
        finally:
            subprocess.run(["umount", str(mount_point)], check=True)
    finally:
        subprocess.run(["losetup", "--detach", device], check=False)


def project_of(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        return quota.project_of(fd)
    finally:
        os.close(fd)


def test_the_project_walk_changes_nothing_outside_the_tree(xfs: Path) -> None:
    """Symlinks to /, /etc and a file beside the tree, a hard link to that file, a FIFO and
    10,000 levels: the tree's own files get the project, and back 0 on release; the file
    outside (reached by link and by hard link), / and /etc keep theirs."""
    outside = xfs / "host-file"
    outside.write_bytes(b"h" * 4096)
    sandbox = xfs / "sandbox"
    hostile_tree(sandbox, outside)
    deep(sandbox, DEPTH)
    fd = quota.open_directory(str(sandbox))
    try:
        quota.assign_project(fd, PROJECT)
        assert project_of(sandbox) == PROJECT
        assert project_of(sandbox / "data") == PROJECT
        assert project_of(outside) == 0  # neither through the symlink nor the hard link
        assert project_of(Path("/etc")) != PROJECT
        leaf = quota.open_directory(str(sandbox / "/".join(["d"] * 100)))
        try:
            assert quota.project_of(leaf) == PROJECT
        finally:
            os.close(leaf)
        other = 70_999
        _set(outside, other)  # a file of another project, hard-linked into this tree
        quota.assign_project(fd, 0)
        assert project_of(sandbox / "data") == 0
        assert project_of(outside) == other
    finally:
        os.close(fd)


def _set(path: Path, project: int) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        quota._set_project(fd, project, inherit=False)
    finally:
        os.close(fd)


def test_the_project_walk_refuses_a_symlink_as_its_root(xfs: Path) -> None:
    (xfs / "real").mkdir()
    os.symlink(xfs / "real", xfs / "link")
    with pytest.raises(OSError):
        quota.open_directory(str(xfs / "link"))


WIDE = 100_000


def test_the_project_walk_holds_few_descriptors_over_a_wide_and_deep_tree(xfs: Path) -> None:
    """100,000 subdirectories of one directory and 10,000 levels, walked with 256
    descriptors allowed: every directory gets the project, none is skipped for want of one."""
    sandbox = xfs / "sandbox"
    sandbox.mkdir()
    wide = sandbox / "wide"
    wide.mkdir()
    for index in range(WIDE):
        os.mkdir(wide / str(index))
    deep(sandbox, DEPTH)
    fd = quota.open_directory(str(sandbox))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        quota.assign_project(fd, PROJECT)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        os.close(fd)
    assert project_of(wide / "0") == PROJECT
    assert project_of(wide / str(WIDE - 1)) == PROJECT
    bottom = quota.open_directory(str(sandbox / "/".join(["d"] * 1000)))
    try:
        assert quota.project_of(bottom) == PROJECT
    finally:
        os.close(bottom)


def test_the_project_walk_never_opens_a_fifo_swapped_in_for_a_file(
    xfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The moment the walk has looked at a regular file (an lstat or fstat of it), the workload
    renames a FIFO over it. A writer blocked opening that FIFO is released only if the walk
    opens it (as it would a device node: its driver's open runs): it must stay blocked."""
    sandbox = xfs / "sandbox"
    sandbox.mkdir()
    target, spare = sandbox / "file", sandbox / "spare"
    target.write_bytes(b"f" * 4096)
    os.mkfifo(spare)
    watched = os.lstat(target).st_ino
    swapped = threading.Event()

    def swap_after(real: Callable[..., os.stat_result]) -> Callable[..., os.stat_result]:
        def looked_at(*args: Any, **kwargs: Any) -> os.stat_result:
            info = real(*args, **kwargs)
            if info.st_ino == watched and not swapped.is_set():
                swapped.set()
                os.rename(spare, target)
            return info

        return looked_at

    released = threading.Event()

    def writer() -> None:
        os.close(os.open(spare, os.O_WRONLY))  # blocks until some reader opens the FIFO
        released.set()

    blocked = threading.Thread(target=writer)
    blocked.start()
    time.sleep(0.3)
    fd = quota.open_directory(str(sandbox))
    try:
        monkeypatch.setattr(os, "lstat", swap_after(os.lstat))
        monkeypatch.setattr(os, "fstat", swap_after(os.fstat))
        quota.assign_project(fd, PROJECT)
        monkeypatch.undo()
        assert swapped.is_set()
        assert not released.wait(1.0), "the walk opened the FIFO swapped in for a file"
    finally:
        monkeypatch.undo()
        os.close(fd)
        reader = os.open(target, os.O_RDONLY | os.O_NONBLOCK)  # lets the writer go
        blocked.join()
        os.close(reader)
