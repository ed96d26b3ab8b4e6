"""containerizer-du, disk/du's walker (supervisor/containerizer-du.c), on the real kernel: it
counts what `du -s -x -B1` counts (allocated bytes, hard links once across the roots, symlinks
themselves, no other filesystem), a missing root as nothing, an unreadable directory as itself
with exit 1 and the rest counted; it walks 2,500 levels with a few dozen descriptors, and never
follows a directory swapped for a symlink, nor a `..` that a rename mid-walk made lead outside."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from isolators.disk.du import SOME_UNREADABLE, WALKER_NAME, counting_command
from tests.conftest import require_root
from tests.run_records import remove_tree, run_scoped_tempdir

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
# Without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH root obeys a directory's mode like anyone.
WITHOUT_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A directory of this run, not under pytest's temporary root (whose clean-up recurses and
    fails thousands of levels down): removed by coreutils' rm after the test, or, with what is
    mounted below it, by the sweep of a run killed before that."""
    directory = run_scoped_tempdir("ctz-walker")
    yield directory
    remove_tree(directory)


def walker() -> str:
    command = counting_command()
    assert Path(command[0]).name == WALKER_NAME, f"{WALKER_NAME} is not built: make install"
    return command[0]


def walk(*roots: Path, prefix: tuple[str, ...] = (), max_descriptors: int = 0) -> tuple[int, int]:
    """The walker's exit status and total over `roots`."""

    def limit_descriptors() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max_descriptors, max_descriptors))

    done = subprocess.run(
        [*prefix, walker(), "--", *map(str, roots)],
        capture_output=True, text=True, check=False,
        preexec_fn=limit_descriptors if max_descriptors else None,
    )  # fmt: skip
    assert done.stderr == ""
    return done.returncode, int(done.stdout)


def du(*roots: Path, prefix: tuple[str, ...] = ()) -> tuple[int, int]:
    """coreutils du's exit status and total over `roots`."""
    done = subprocess.run(
        [*prefix, "du", "-s", "-x", "-B1", "--", *map(str, roots)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return done.returncode, sum(int(line.split("\t")[0]) for line in done.stdout.splitlines())


def write(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))


def allocated(*paths: Path) -> int:
    return sum(os.lstat(path).st_blocks * 512 for path in paths)


def mixed_tree(root: Path) -> None:
    """Files of many sizes, empty and nested directories, a sparse file, hard links, symlinks
    (to a directory, to a file, dangling), a FIFO and a socket."""
    for index in range(40):
        write(root / f"dir{index % 7}" / f"sub{index % 3}" / f"file{index}", index * 1531)
    (root / "empty" / "deeper").mkdir(parents=True)
    with (root / "sparse").open("wb") as file:
        file.seek(50 * MIB)
        file.write(b"end")
    os.link(root / "dir1" / "sub1" / "file1", root / "hard-link")
    os.link(root / "dir1" / "sub1" / "file1", root / "dir2" / "hard-link")
    os.symlink("/usr", root / "to-usr")
    os.symlink(root / "dir3", root / "to-dir3")
    os.symlink("nowhere", root / "dangling")
    os.mkfifo(root / "fifo")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(root / "socket"))


def test_the_total_is_du_s_x_b1s_on_a_mixed_tree(tmp_path: Path) -> None:
    mixed_tree(tmp_path / "tree")
    assert walk(tmp_path / "tree") == du(tmp_path / "tree")


def test_a_sparse_file_counts_its_allocated_bytes(tmp_path: Path) -> None:
    with (tmp_path / "sparse").open("wb") as file:
        file.truncate(100 * MIB)
        file.write(os.urandom(MIB))
    assert walk(tmp_path) == (0, allocated(tmp_path, tmp_path / "sparse"))
    assert allocated(tmp_path / "sparse") < 2 * MIB


def test_hard_links_count_once_in_a_tree_and_across_roots(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    write(one / "data", MIB)
    os.link(one / "data", one / "again")
    two.mkdir()
    os.link(one / "data", two / "third")
    expected = allocated(one, two, one / "data")
    assert walk(one, two) == (0, expected)
    assert walk(two, one) == (0, expected)
    assert walk(one, two) == du(one, two)


def test_roots_given_twice_or_nested_count_once(tmp_path: Path) -> None:
    write(tmp_path / "inner" / "data", MIB)
    alone = walk(tmp_path)
    assert walk(tmp_path, tmp_path) == alone
    assert walk(tmp_path / "inner", tmp_path) == alone


def test_a_symlink_counts_itself_and_is_never_followed(tmp_path: Path) -> None:
    write(tmp_path / "outside" / "big", 4 * MIB)
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "to-dir").symlink_to(tmp_path / "outside")
    (tree / "to-file").symlink_to(tmp_path / "outside" / "big")
    expected = allocated(tree, tree / "to-dir", tree / "to-file")
    assert walk(tree) == (0, expected)
    assert walk(tree / "to-dir") == (0, allocated(tree / "to-dir"))  # a root too


def test_a_missing_root_counts_nothing_and_is_no_error(tmp_path: Path) -> None:
    write(tmp_path / "one" / "f", MIB)
    assert walk(tmp_path / "one", tmp_path / "gone") == walk(tmp_path / "one")
    assert walk(tmp_path / "gone") == (0, 0)


def test_another_filesystem_is_neither_counted_nor_entered(scratch: Path) -> None:
    """A tmpfs mounted in the tree: its root and its files are not counted (as du -x), unless
    it is the root given."""
    require_root()
    tree = scratch / "tree"
    write(tree / "data", MIB)
    mount_point = tree / "mounted"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "ctz-walker", mount_point], check=True)
    try:
        write(mount_point / "big", 4 * MIB)
        assert walk(tree) == (0, allocated(tree, tree / "data"))
        assert walk(tree) == du(tree)
        assert walk(mount_point) == du(mount_point)
        assert walk(mount_point)[1] >= 4 * MIB
    finally:
        subprocess.run(["umount", mount_point], check=True)


def test_an_unreadable_directory_counts_itself_exits_1_and_the_rest_counts(
    tmp_path: Path,
) -> None:
    require_root()
    write(tmp_path / "readable" / "data", MIB)
    write(tmp_path / "locked" / "hidden", MIB)
    (tmp_path / "locked").chmod(0)
    expected = allocated(tmp_path, tmp_path / "readable", tmp_path / "readable" / "data")
    expected += allocated(tmp_path / "locked")
    measured = walk(tmp_path, prefix=tuple(WITHOUT_DAC))
    assert measured == (SOME_UNREADABLE, expected)
    assert measured == du(tmp_path, prefix=tuple(WITHOUT_DAC))


def chain(root: Path, depth: int, leaf_bytes: int = 0) -> None:
    """root/d/d/.../d (depth levels), made through descriptors (the path is far longer than
    PATH_MAX), with a leaf file of `leaf_bytes` at the bottom."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir("d", dir_fd=fd)
        inner = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = inner
    leaf = os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    os.write(leaf, os.urandom(leaf_bytes))
    os.close(leaf)
    os.close(fd)


def test_a_tree_2500_levels_deep_is_walked_with_few_descriptors(scratch: Path) -> None:
    """With at most 100 descriptors (far fewer than levels) the walk reaches the bottom and
    climbs back: every level counted, and what lies beside the path too."""
    tree = scratch / "tree"
    tree.mkdir()
    chain(tree, 2500, leaf_bytes=MIB)
    write(tree / "beside", MIB)
    measured = walk(tree, max_descriptors=100)
    assert measured == (0, du(tree)[1])
    assert measured[1] >= 2 * MIB + 2500 * 4096


def test_a_directory_swapped_for_a_symlink_mid_walk_is_never_followed(tmp_path: Path) -> None:
    """The workload keeps swapping a wide directory for a symlink to / and back: every walk
    counts far less than / holds, whatever it met."""
    sandbox = tmp_path / "sandbox"
    write(sandbox / "keep", MIB)
    stop = threading.Event()

    def swap() -> None:
        wide = sandbox / "wide"
        while not stop.is_set():
            wide.mkdir()
            for index in range(200):
                (wide / str(index)).mkdir()
            subprocess.run(["rm", "-rf", str(wide)], check=True)
            wide.symlink_to("/")
            wide.unlink()

    swapper = threading.Thread(target=swap)
    swapper.start()
    try:
        for _ in range(40):
            status, total = walk(sandbox)
            assert status in (0, SOME_UNREADABLE)
            assert total < 4 * MIB
    finally:
        stop.set()
        swapper.join()


def test_a_rename_mid_walk_never_makes_the_climb_leave_the_tree(scratch: Path) -> None:
    """The walk climbs back from 150 levels through `..` (its descriptors of the upper levels
    are closed by then). The workload keeps moving level 40 out of the tree, beside directories
    of the names the walk has yet to enter at level 39, holding 1 MiB each: a climb that
    accepted the `..` it found would enter them. None is ever counted."""
    sandbox, outside = scratch / "sandbox", scratch / "outside"
    sandbox.mkdir()
    chain(sandbox, 150)
    level_39 = sandbox.joinpath(*["d"] * 39)
    for index in range(10):
        (level_39 / f"s{index}").mkdir()
        write(outside / f"s{index}" / "big", MIB)
    moving, moved = level_39 / "d", outside / "moved"
    stop = threading.Event()

    def move_back_and_forth() -> None:
        while not stop.is_set():
            os.rename(moving, moved)
            os.rename(moved, moving)

    mover = threading.Thread(target=move_back_and_forth)
    mover.start()
    try:
        for _ in range(100):
            status, total = walk(sandbox)
            assert status in (0, SOME_UNREADABLE)
            assert total < MIB
    finally:
        stop.set()
        mover.join()
    assert walk(sandbox) == du(sandbox)
