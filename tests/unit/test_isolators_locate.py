"""Locating a process's cgroup directories (isolators/cgroups/locate.py) and every cgroup mount
(hierarchy.py): the one reader of /proc/PID/cgroup and the one of mountinfo, as the LXC, docker
and libvirt runtimes use them."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from isolators.cgroups.hierarchy import Hierarchies, cgroup_mount_points
from isolators.cgroups.locate import (
    UNIFIED,
    cgroup_dirs_of,
    dirs_in,
    parse_proc_cgroup,
    process_cgroups,
)
from isolators.registry import ACCOUNTED_CONTROLLERS

PROC_CGROUP = (
    "12:pids:/ctz/web-1\n"
    "4:cpu,cpuacct:/ctz/web-1/emulator\n"
    "3:memory:/ctz/web-1\n"
    "1:name=systemd:/system.slice/x.service\n"
    "0::/ctz/web-1\n"
)
MOUNTS = {c: Path(f"/cg/{c}") for c in ("cpu", "cpuacct", "memory", "devices")}


def test_each_controller_of_a_line_gets_its_path() -> None:
    assert parse_proc_cgroup(PROC_CGROUP) == {
        "pids": "/ctz/web-1",
        "cpu": "/ctz/web-1/emulator",
        "cpuacct": "/ctz/web-1/emulator",
        "memory": "/ctz/web-1",
        "name=systemd": "/system.slice/x.service",
        UNIFIED: "/ctz/web-1",
    }


def test_a_path_outside_the_services_cgroup_namespace_is_not_followed() -> None:
    assert parse_proc_cgroup("3:memory:/../../etc\n0::/ctz/a/../../b\n5:pids:relative\n") == {}


def test_v1_dirs_come_from_each_controllers_line_and_v2_from_the_unified_one() -> None:
    v1 = Hierarchies(version=1, cgroups_root="ctz", mounts=MOUNTS)
    assert dirs_in(v1, parse_proc_cgroup(PROC_CGROUP)) == {
        "cpu": Path("/cg/cpu/ctz/web-1/emulator"),
        "cpuacct": Path("/cg/cpuacct/ctz/web-1/emulator"),
        "memory": Path("/cg/memory/ctz/web-1"),
    }
    v2 = Hierarchies(version=2, cgroups_root="ctz", mounts=dict.fromkeys(MOUNTS, Path("/u")))
    assert set(dirs_in(v2, parse_proc_cgroup(PROC_CGROUP)).values()) == {Path("/u/ctz/web-1")}


def test_a_live_process_is_found_where_the_kernel_says_and_a_gone_one_nowhere() -> None:
    hierarchies = Hierarchies.discover("containerizer")
    dirs = cgroup_dirs_of(os.getpid(), hierarchies)
    assert "memory" in dirs
    for directory in dirs.values():
        assert str(os.getpid()) in (directory / "cgroup.procs").read_text().split()
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert process_cgroups(gone.pid) == {} and cgroup_dirs_of(gone.pid, hierarchies) == {}


def test_dirs_at_a_relative_path_per_controller() -> None:
    hierarchies = Hierarchies(version=1, cgroups_root="ctz", mounts=MOUNTS)
    assert hierarchies.dirs_at("/ctz/web-1/abc", ACCOUNTED_CONTROLLERS) == [
        Path("/cg/cpu/ctz/web-1/abc"),
        Path("/cg/cpuacct/ctz/web-1/abc"),
        Path("/cg/memory/ctz/web-1/abc"),
    ]
    unified = Hierarchies(version=2, cgroups_root="ctz", mounts=dict.fromkeys(MOUNTS, Path("/u")))
    assert unified.dirs_at("/ctz/web-1/abc", ACCOUNTED_CONTROLLERS) == [Path("/u/ctz/web-1/abc")]
    assert unified.container_dirs("web-1") == [Path("/u/ctz/web-1")]


def test_cgroup_mount_points_include_named_hierarchies(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"
        "40 31 0:37 / /sys/fs/cgroup/sys\\040temd rw - cgroup cgroup rw,name=systemd\n"
        "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
        "42 31 0:29 / /mnt/cpu-again rw - cgroup cgroup rw,cpu\n"
        "22 1 8:1 / / rw - ext4 /dev/root rw\n"
    )
    assert cgroup_mount_points(mountinfo) == (
        Path("/sys/fs/cgroup/cpu"),
        Path("/sys/fs/cgroup/sys temd"),
        Path("/sys/fs/cgroup/unified"),
        Path("/mnt/cpu-again"),
    )
    assert cgroup_mount_points(tmp_path / "absent") == ()
