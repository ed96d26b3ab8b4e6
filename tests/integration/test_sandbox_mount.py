"""The default sandbox root as a nosuid,nodev mount of its own (adapter/core/state_dir.py): made
once, kept while a sandbox is there, and never an operator's own filesystem unmounted."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from adapter.core.state_dir import is_mount_point, is_nosuid, mount_nosuid, unmount_nosuid
from tests.conftest import require_root
from tests.run_records import unmount_below

pytestmark = pytest.mark.integration


@pytest.fixture
def root(tmp_path: Path) -> Path:
    require_root()
    directory = tmp_path / "sandboxes"
    directory.mkdir()
    yield directory
    unmount_below(tmp_path)


def test_made_once_kept_while_a_sandbox_is_there(root: Path) -> None:
    assert not is_nosuid(root)
    assert mount_nosuid(root) is True
    assert is_mount_point(root) and is_nosuid(root)
    assert mount_nosuid(root) is False, "a second start finds it in place"
    (root / "one").mkdir()
    unmount_nosuid(root)
    assert is_mount_point(root), "a sandbox is there: the mount stays"
    (root / "one").rmdir()
    unmount_nosuid(root)
    assert not is_mount_point(root) and not is_nosuid(root)


def test_an_operators_nosuid_filesystem_is_used_as_it_is_and_left_mounted(root: Path) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "-o", "nosuid,nodev", "tmpfs", str(root)], check=True)
    assert mount_nosuid(root) is False
    unmount_nosuid(root)
    assert is_mount_point(root), "the operator's filesystem is not ours to unmount"
