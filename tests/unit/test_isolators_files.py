"""The cgroup files mechanism on plain directories: creating a cgroup (and a v1 cpuset's
inherited CPUs), removing one with what is nested in it; and the removal of a sandbox or run
directory (adapter/core/sandbox.py), which follows no link a workload may have put there."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from adapter.core.sandbox import remove_directory
from isolators.cgroups import files
from isolators.cgroups.errors import CgroupFileError


def cpuset_level(directory: Path, cpus: str = "", mems: str = "") -> Path:
    """A v1 cpuset cgroup as the kernel shows it (a plain directory makes no files itself)."""
    directory.mkdir(exist_ok=True)
    (directory / "cgroup.clone_children").write_text("0\n")
    (directory / "cpuset.cpus").write_text(cpus)
    (directory / "cpuset.mems").write_text(mems)
    return directory


def test_create_makes_missing_parents_and_reuses_an_existing_cgroup(tmp_path: Path) -> None:
    cgroup = tmp_path / "root" / "c1"
    files.create(cgroup)
    files.create(str(cgroup))
    assert cgroup.is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(CgroupFileError, match="cannot create cgroup"):
        files.create(tmp_path / "file")


def test_a_cpuset_cgroup_inherits_its_parents_cpus_top_down(tmp_path: Path) -> None:
    mount = cpuset_level(tmp_path / "cpuset", "0-1\n", "0\n")
    ours = cpuset_level(mount / "ours")
    child = cpuset_level(ours / "c1", mems="0\n")  # a value already set is kept
    files.inherit_cpuset(child)
    assert [(d / "cpuset.cpus").read_text() for d in (ours, child)] == ["0-1", "0-1"]
    assert (child / "cpuset.mems").read_text() == "0\n"


def test_outside_a_cpuset_hierarchy_nothing_is_written(tmp_path: Path) -> None:
    memory = tmp_path / "memory" / "ours"
    memory.mkdir(parents=True)
    (memory / "cgroup.clone_children").write_text("0\n")
    files.inherit_cpuset(memory)
    assert sorted(os.listdir(memory)) == ["cgroup.clone_children"]


async def test_remove_takes_nested_cgroups_deepest_first(tmp_path: Path) -> None:
    (tmp_path / "c1" / "nested" / "deeper").mkdir(parents=True)
    (tmp_path / "c2").mkdir()
    await files.remove(tmp_path / "c1")
    await files.remove(str(tmp_path / "c2"))
    await files.remove(tmp_path / "missing")
    assert os.listdir(tmp_path) == []


def test_a_directory_goes_with_its_usual_files_and_anything_else(tmp_path: Path) -> None:
    usual, busy = tmp_path / "usual", tmp_path / "busy"
    for directory in (usual, busy):
        directory.mkdir()
        for name in ("stdout", "stderr"):
            (directory / name).write_text("out")
    (busy / "data" / "deep").mkdir(parents=True)
    (busy / "stderr").unlink()
    (busy / "stderr").mkdir()  # a workload's directory under an expected name
    remove_directory(str(usual))
    remove_directory(str(busy))
    remove_directory(str(tmp_path / "missing"))
    assert os.listdir(tmp_path) == []


def test_a_link_in_place_of_the_directory_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "host"
    target.mkdir()
    (target / "stdout").write_text("host file")
    (tmp_path / "sandbox").symlink_to(target)
    remove_directory(str(tmp_path / "sandbox"))
    assert (target / "stdout").read_text() == "host file"
