"""Pod cgroups on a fake v1 tree: where a placed container's cgroups are, what a pod's limits
write, what the orphan search finds, and that removing the last pod leaves no `_pods`."""

from __future__ import annotations

from pathlib import Path

import pytest

from isolators.base import Limits
from isolators.cgroups import pods
from isolators.cgroups.hierarchy import PODS_DIR, Hierarchies
from isolators.cgroups.isolator import CgroupIsolator

CONTROLLERS = ("cpu", "cpuacct", "memory", "pids", "freezer")


def fake_tree(base: Path) -> Hierarchies:
    for controller in CONTROLLERS:
        (base / controller).mkdir(parents=True)
    return Hierarchies.discover("ctz", override=base)


def test_a_placed_container_nests_in_its_pod(tmp_path: Path) -> None:
    hierarchies = fake_tree(tmp_path)
    assert hierarchies.relative("c1") == "ctz/c1"
    hierarchies.place("c1", "p1")
    assert hierarchies.relative("c1") == f"ctz/{PODS_DIR}/p1/c1"
    assert hierarchies.path("memory", "c1") == tmp_path / "memory" / "ctz" / PODS_DIR / "p1" / "c1"
    assert tmp_path / "cpu" / "ctz" / PODS_DIR / "p1" / "c1" in hierarchies.container_dirs("c1")
    hierarchies.unplace("c1")
    assert hierarchies.relative("c1") == "ctz/c1"


@pytest.mark.parametrize("bad", ["", "..", "a/b", "x\0"])
def test_a_pod_id_that_would_leave_its_directory_is_refused(tmp_path: Path, bad: str) -> None:
    hierarchies = fake_tree(tmp_path)
    with pytest.raises(ValueError, match="pod id"):
        hierarchies.place("c1", bad)


def test_pod_limits_are_written_with_the_mesos_arithmetic(tmp_path: Path) -> None:
    hierarchies = fake_tree(tmp_path)
    cgroup = f"ctz/{PODS_DIR}/p1"
    for controller, name in (
        ("cpu", "cpu.shares"),
        ("cpu", "cpu.cfs_period_us"),
        ("cpu", "cpu.cfs_quota_us"),
        ("memory", "memory.limit_in_bytes"),
        ("pids", "pids.max"),
    ):  # the files the kernel makes with a cgroup
        (tmp_path / controller / cgroup).mkdir(parents=True, exist_ok=True)
        (tmp_path / controller / cgroup / name).touch()
    limits = Limits(cpus=1.5, mem_bytes=96 << 20, pids=50)
    pods.create_pod(hierarchies, "p1", limits, enable_cfs=True)
    assert (tmp_path / "cpu" / cgroup / "cpu.shares").read_text() == "1536"
    assert (tmp_path / "cpu" / cgroup / "cpu.cfs_quota_us").read_text() == "150000"
    assert (tmp_path / "memory" / cgroup / "memory.limit_in_bytes").read_text() == str(96 << 20)
    assert (tmp_path / "pids" / cgroup / "pids.max").read_text() == "50"
    assert pods.pod_ids(hierarchies) == {"p1"}


def test_no_limits_write_nothing(tmp_path: Path) -> None:
    hierarchies = fake_tree(tmp_path)
    pods.create_pod(hierarchies, "p1", Limits(), enable_cfs=True)
    assert list((tmp_path / "memory" / "ctz" / PODS_DIR / "p1").iterdir()) == []


def test_orphan_search_finds_containers_in_pods_and_places_them(tmp_path: Path) -> None:
    """A container found in a pod's cgroup (after a restart) is placed there, so its cgroups
    can be destroyed; `_pods` itself is never taken for a container."""
    hierarchies = fake_tree(tmp_path)
    (tmp_path / "memory" / "ctz" / "flat").mkdir(parents=True)
    (tmp_path / "memory" / "ctz" / PODS_DIR / "p1" / "nested").mkdir(parents=True)
    found = hierarchies.children(hierarchies.root("memory"))
    assert found == {"flat": "", "nested": "p1"}
    assert hierarchies.relative("nested") == f"ctz/{PODS_DIR}/p1/nested"

    class Memory(CgroupIsolator):
        controllers = ("memory",)

    assert Memory(hierarchies).existing_ids() == {"flat", "nested"}


async def test_removing_the_last_pod_removes_the_pods_directory(tmp_path: Path) -> None:
    hierarchies = fake_tree(tmp_path)
    pods.create_pod(hierarchies, "p1", Limits(), enable_cfs=False)
    pods.create_pod(hierarchies, "p2", Limits(), enable_cfs=False)
    await pods.remove_pod(hierarchies, "p1")
    assert (tmp_path / "memory" / "ctz" / PODS_DIR / "p2").is_dir()
    await pods.remove_pod(hierarchies, "p2")
    await pods.remove_pod(hierarchies, "p2")  # idempotent
    for controller in CONTROLLERS:
        assert not (tmp_path / controller / "ctz" / PODS_DIR).exists()
