"""LXC driver parts that need no LXC: the config writer, the cgroup keys, the handshake, the
handle, the status file and the busybox base."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapter.core.errors import InvalidArgument
from adapter.core.limits import Limits
from adapter.core.model import Resources
from adapter.runtimes.lxc.config import LxcConfig, cgroup_keys, fstab_escape
from adapter.runtimes.lxc.handle import LxcHandle
from adapter.runtimes.lxc.rootfs import COMPLETE_MARKER, build_busybox_base
from adapter.supervisor.processes import ProcessRef, read_status

MIB = 1024 * 1024


@pytest.mark.parametrize("bad", ["a\nlxc.mount.entry = / x none bind 0 0", "a\rb", "a\x00b", " a"])
def test_a_value_that_could_end_its_line_is_refused_naming_the_field(bad: str) -> None:
    config = LxcConfig()
    with pytest.raises(InvalidArgument) as error:
        config.set("lxc.uts.name", bad, field="container_id")
    assert error.value.field == "container_id"
    assert config.render() == ""


def test_keys_are_ours_only() -> None:
    with pytest.raises(ValueError):
        LxcConfig().set("lxc.uts.name = x\nlxc.net.0.type", "none")
    with pytest.raises(ValueError):
        LxcConfig().set("mount.entry", "x")


def test_mount_entries_escape_whitespace_and_backslashes() -> None:
    config = LxcConfig()
    config.mount("/srv/a b\nlxc.x = y\\", "mnt/sandbox", "bind,create=dir", field="sandbox")
    assert config.render() == (
        "lxc.mount.entry = /srv/a\\040b\\012lxc.x\\040=\\040y\\134 mnt/sandbox none"
        " bind,create=dir 0 0\n"
    )
    assert fstab_escape("/plain/path") == "/plain/path"


def test_cgroup_keys_use_the_isolators_arithmetic_on_v1() -> None:
    limits = Limits.of(Resources(cpus=0.5, mem_mib=10, pids=7), enable_cfs=True)
    keys = dict(cgroup_keys(limits, version=1))
    assert keys == {
        "lxc.cgroup.cpu.shares": "512",
        "lxc.cgroup.cpu.cfs_period_us": "100000",
        "lxc.cgroup.cpu.cfs_quota_us": "50000",
        "lxc.cgroup.memory.limit_in_bytes": str(32 * MIB),  # the Mesos floor
        "lxc.cgroup.memory.soft_limit_in_bytes": str(32 * MIB),
        "lxc.cgroup.pids.max": "7",
    }
    assert cgroup_keys(Limits.of(Resources(), enable_cfs=True), version=1) == []


def test_cgroup_keys_on_v2() -> None:
    keys = dict(cgroup_keys(Limits.of(Resources(cpus=1, mem_mib=64), enable_cfs=False), version=2))
    assert keys == {
        "lxc.cgroup2.cpu.weight": "39",
        "lxc.cgroup2.cpu.max": "max 100000",
        "lxc.cgroup2.memory.max": str(64 * MIB),
        "lxc.cgroup2.memory.low": str(64 * MIB),
    }


def test_handle_round_trip_and_refusal() -> None:
    handle = LxcHandle(
        name="c1",
        lxcpath="/var/lib/x/lxc/containers",
        monitor=ProcessRef(10, 100),
        init=ProcessRef(11, 101),
        workload_init=ProcessRef(0, 102),
        status_file="/var/lib/x/lxc/containers/c1/run/status",
        cgroup_dirs=("/sys/fs/cgroup/memory/r/c1",),
    )
    assert LxcHandle.from_json(handle.to_json()) == handle
    broken = {**handle.to_json(), "init": [11, True]}
    with pytest.raises(ValueError, match="'init'"):
        LxcHandle.from_json(broken)
    assert not ProcessRef(0, 102).is_alive() and not ProcessRef(0, 102).send(9)


def test_status_file(tmp_path: Path) -> None:
    status = tmp_path / "status"
    assert read_status(status) is None
    status.write_text("signaled 9\nfinished 12.5\n")
    recorded = read_status(status)
    assert recorded is not None and (recorded.exit_code, recorded.signal) == (None, 9)
    status.write_text("exited 143\nfinished 12.5\n")
    recorded = read_status(status)
    assert recorded is not None and (recorded.exit_code, recorded.signal) == (143, None)
    status.write_text("exited\n")
    assert read_status(status) is None


def test_busybox_base_is_built_once(tmp_path: Path) -> None:
    if not Path("/bin/busybox").is_file():
        pytest.skip("/bin/busybox missing (Debian: busybox-static)")
    base = build_busybox_base(tmp_path)
    assert (base / COMPLETE_MARKER).is_file()
    assert (base / "bin/sh").readlink() == Path("/bin/busybox")
    assert "nobody:x:65534" in (base / "etc/passwd").read_text()
    assert (base / "tmp").stat().st_mode & 0o7777 == 0o1777
    assert build_busybox_base(tmp_path) == base
    assert [p.name for p in tmp_path.iterdir()] == [base.name]  # no build leftovers
