"""Hierarchy discovery from mountinfo text (three layouts), the override, and path safety."""

from __future__ import annotations

from pathlib import Path

import pytest

from isolators.cgroups.errors import HierarchyError
from isolators.cgroups.hierarchy import Hierarchies, parse_mountinfo

V1_SEPARATE = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""

V1_COMOUNTED = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
24 22 0:20 / /sys/fs/cgroup ro,nosuid shared:3 - tmpfs tmpfs ro,mode=755
25 24 0:22 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct
26 24 0:23 / /sys/fs/cgroup/memory rw,nosuid,relatime shared:10 - cgroup cgroup rw,memory
27 24 0:24 / /sys/fs/cgroup/freezer rw,nosuid,relatime shared:11 - cgroup cgroup rw,freezer
28 24 0:25 / /sys/fs/cgroup/unified rw,nosuid,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate
29 24 0:26 / /sys/fs/cgroup/net\\040cls rw,relatime - cgroup cgroup rw,net_cls,net_prio
"""


def v2_mountinfo(mount: Path) -> str:
    return (
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        f"35 24 0:30 / {mount} rw,nosuid,relatime shared:9 - cgroup2 cgroup2 "
        "rw,nsdelegate,memory_recursiveprot\n"
    )


def test_v1_one_mount_per_controller(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(V1_SEPARATE)
    hierarchies = Hierarchies.discover("ctz", mountinfo=mountinfo)
    assert hierarchies.version == 1
    assert hierarchies.path("cpu", "c1") == Path("/sys/fs/cgroup/cpu/ctz/c1")
    assert hierarchies.path("cpuacct", "c1") == Path("/sys/fs/cgroup/cpuacct/ctz/c1")
    assert hierarchies.path("memory", "c1") == Path("/sys/fs/cgroup/memory/ctz/c1")
    assert not hierarchies.has("systemd") and not hierarchies.has("name=systemd")
    assert hierarchies.container_dirs("c1", ("cpu", "cpuacct")) == [
        Path("/sys/fs/cgroup/cpu/ctz/c1"),
        Path("/sys/fs/cgroup/cpuacct/ctz/c1"),
    ]


def test_v1_comounted_controllers_share_a_directory() -> None:
    mounts = parse_mountinfo(V1_COMOUNTED)
    assert mounts.v1["cpu"] == mounts.v1["cpuacct"] == Path("/sys/fs/cgroup/cpu,cpuacct")
    assert mounts.v1["net_cls"] == Path("/sys/fs/cgroup/net cls")  # \040 unescaped
    assert mounts.v2 == Path("/sys/fs/cgroup/unified")
    hierarchies = Hierarchies(1, "ctz", dict(mounts.v1))
    assert hierarchies.container_dirs("c1", ("cpu", "cpuacct")) == [
        Path("/sys/fs/cgroup/cpu,cpuacct/ctz/c1")
    ]


def test_pure_v2_uses_one_directory_for_every_controller(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(v2_mountinfo(tmp_path))
    hierarchies = Hierarchies.discover("a/b", mountinfo=mountinfo)
    assert hierarchies.version == 2
    expected = tmp_path / "a" / "b" / "c1"
    assert {hierarchies.path(c, "c1") for c in ("cpu", "memory", "pids")} == {expected}
    assert hierarchies.container_dirs("c1") == [expected]
    assert not hierarchies.has("freezer")


def test_v2_delegation_enables_missing_controllers(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    (tmp_path / "cgroup.subtree_control").write_text("memory\n")
    (tmp_path / "ctz").mkdir()
    (tmp_path / "ctz" / "cgroup.subtree_control").write_text("")
    hierarchies = Hierarchies.discover("ctz", override=tmp_path)
    hierarchies.enable_v2_controllers(("cpu", "memory"))
    # A real kernel file keeps the set; a fake one holds what was written last.
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+cpu"
    assert (tmp_path / "ctz" / "cgroup.subtree_control").read_text() == "+cpu +memory"


def test_override_directory_with_v1_layout(tmp_path: Path) -> None:
    for name in ("cpu,cpuacct", "memory", "freezer", "unrelated"):
        (tmp_path / name).mkdir()
    hierarchies = Hierarchies.discover("ctz", override=tmp_path)
    assert hierarchies.version == 1
    assert hierarchies.path("cpuacct", "x") == tmp_path / "cpu,cpuacct" / "ctz" / "x"
    assert sorted(hierarchies.mounts) == ["cpu", "cpuacct", "freezer", "memory"]


def test_override_without_cgroups_is_refused(tmp_path: Path) -> None:
    with pytest.raises(HierarchyError, match=str(tmp_path)):
        Hierarchies.discover("ctz", override=tmp_path)


def test_no_cgroup_mount_is_an_error(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n")
    with pytest.raises(HierarchyError, match="no cgroup mount"):
        Hierarchies.discover(mountinfo=mountinfo)


def test_unmounted_controller_is_named_in_the_error(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(V1_COMOUNTED)
    with pytest.raises(HierarchyError, match="'pids'"):
        Hierarchies.discover(mountinfo=mountinfo).path("pids", "c1")


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "../x", "x\0"])
def test_path_refuses_components_that_escape(bad: str) -> None:
    hierarchies = Hierarchies(1, "ctz", {"cpu": Path("/sys/fs/cgroup/cpu")})
    with pytest.raises(ValueError, match="container id"):
        hierarchies.path("cpu", bad)


@pytest.mark.parametrize("bad", ["", "/", "a/../b", ".."])
def test_cgroups_root_must_stay_below_the_mount(tmp_path: Path, bad: str) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(V1_SEPARATE)
    with pytest.raises(ValueError, match="cgroups_root"):
        Hierarchies.discover(bad, mountinfo=mountinfo)
