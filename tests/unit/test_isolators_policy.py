"""Mesos arithmetic, and what the isolators write, against fake v1 and v2 cgroup trees."""

from __future__ import annotations

from pathlib import Path

import pytest

from isolators.base import Limits
from isolators.cgroups.cpu import CpuIsolator, cfs_quota_us, cpu_shares, cpu_weight
from isolators.cgroups.freezer import FreezerIsolator
from isolators.cgroups.hierarchy import Hierarchies
from isolators.cgroups.mem import MemIsolator
from isolators.cgroups.pids import PidsIsolator
from isolators.registry import build_isolators

MiB = 1024 * 1024

CPU_CASES = [  # cpus, shares, quota_us, v2 weight
    (0.1, 102, 10_000, 4),
    (0.5, 512, 50_000, 20),
    (1, 1024, 100_000, 39),
    (2.5, 2560, 250_000, 98),
    (100.5, 102_912, 10_050_000, 3926),
]


@pytest.mark.parametrize(("cpus", "shares", "quota", "weight"), CPU_CASES)
def test_cpu_arithmetic(cpus: float, shares: int, quota: int, weight: int) -> None:
    assert cpu_shares(cpus) == shares
    assert cfs_quota_us(cpus) == quota
    assert cpu_weight(shares) == weight


def test_cpu_minimums() -> None:
    assert cpu_shares(0.001) == 2
    assert cfs_quota_us(0.001) == 1000
    assert cpu_weight(2) == 1
    assert cpu_weight(262144) == 10000


V1_FILES = {
    "cpu": {"cpu.shares": "1024", "cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "-1"},
    "cpuacct": {"cpuacct.stat": "user 0\nsystem 0\n"},
    "memory": {
        "memory.limit_in_bytes": "9223372036854771712",
        "memory.soft_limit_in_bytes": "9223372036854771712",
        "memory.usage_in_bytes": str(50 * MiB),
        "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n",
        "memory.max_usage_in_bytes": str(60 * MiB),
        "cgroup.event_control": "",
    },
    "pids": {"pids.max": "max", "pids.events": "max 0\n"},
    "freezer": {"freezer.state": "THAWED"},
}


def fake_v1(base: Path, root: str, container_id: str) -> Hierarchies:
    for controller, contents in V1_FILES.items():
        cgroup = base / controller / root / container_id
        cgroup.mkdir(parents=True)
        for name, text in {**contents, "cgroup.procs": ""}.items():
            (cgroup / name).write_text(text)
    return Hierarchies.discover(root, override=base)


def fake_v2(base: Path, root: str, container_id: str) -> Hierarchies:
    base.mkdir(exist_ok=True)
    (base / "cgroup.controllers").write_text("cpu memory pids\n")
    (base / "cgroup.subtree_control").write_text("")
    cgroup = base / root / container_id
    cgroup.mkdir(parents=True)
    (base / root / "cgroup.subtree_control").write_text("")
    files = {
        "cpu.weight": "100", "cpu.max": "max 100000", "memory.max": "max", "memory.low": "0",
        "memory.current": str(50 * MiB), "memory.peak": str(60 * MiB), "pids.max": "max",
        "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n",
        "pids.events": "max 0\n", "cgroup.procs": "",
    }  # fmt: skip
    for name, text in files.items():
        (cgroup / name).write_text(text)
    return Hierarchies.discover(root, override=base)


def read(path: Path) -> str:
    return path.read_text().strip()


@pytest.mark.parametrize(("cpus", "shares", "quota", "weight"), CPU_CASES)
async def test_cpu_writes_v1(
    tmp_path: Path, cpus: float, shares: int, quota: int, weight: int
) -> None:
    hierarchies = fake_v1(tmp_path, "ctz", "c1")
    info = await CpuIsolator(hierarchies, enable_cfs=True).prepare("c1", Limits(cpus=cpus))
    cgroup = tmp_path / "cpu" / "ctz" / "c1"
    assert (read(cgroup / "cpu.shares"), read(cgroup / "cpu.cfs_quota_us")) == (
        str(shares),
        str(quota),
    )
    assert read(cgroup / "cpu.cfs_period_us") == "100000"
    assert info is not None and info.cgroup_procs == [
        str(cgroup / "cgroup.procs"),
        str(tmp_path / "cpuacct" / "ctz" / "c1" / "cgroup.procs"),
    ]


@pytest.mark.parametrize(("cpus", "shares", "quota", "weight"), CPU_CASES)
async def test_cpu_writes_v2(
    tmp_path: Path, cpus: float, shares: int, quota: int, weight: int
) -> None:
    hierarchies = fake_v2(tmp_path, "ctz", "c1")
    cgroup = tmp_path / "ctz" / "c1"
    info = await CpuIsolator(hierarchies, enable_cfs=True).prepare("c1", Limits(cpus=cpus))
    assert (read(cgroup / "cpu.weight"), read(cgroup / "cpu.max")) == (
        str(weight),
        f"{quota} 100000",
    )
    assert info is not None and info.cgroup_procs == [str(cgroup / "cgroup.procs")]
    assert read(tmp_path / "cgroup.subtree_control") == "+cpu"
    await CpuIsolator(hierarchies, enable_cfs=False).update("c1", Limits(cpus=cpus))
    assert read(cgroup / "cpu.max") == "max 100000"


async def test_cpu_without_cfs_leaves_quota_alone(tmp_path: Path) -> None:
    hierarchies = fake_v1(tmp_path, "ctz", "c1")
    await CpuIsolator(hierarchies).prepare("c1", Limits(cpus=2))
    assert read(tmp_path / "cpu" / "ctz" / "c1" / "cpu.cfs_quota_us") == "-1"


@pytest.mark.parametrize(("mib", "written"), [(1, 50), (32, 50), (100, 100), (4096, 4096)])
async def test_mem_update_v1_clamps_a_decrease_to_usage(
    tmp_path: Path, mib: int, written: int
) -> None:
    hierarchies = fake_v1(tmp_path, "ctz", "c1")
    cgroup = tmp_path / "memory" / "ctz" / "c1"
    (cgroup / "memory.limit_in_bytes").write_text(str(8192 * MiB))
    await MemIsolator(hierarchies).update("c1", Limits(mem_bytes=mib * MiB))
    # usage is 50 MiB: lowering stops there (Mesos' 32 MiB floor is the caller's).
    assert read(cgroup / "memory.limit_in_bytes") == str(written * MiB)
    assert read(cgroup / "memory.soft_limit_in_bytes") == str(written * MiB)


async def test_mem_v2_limits_watch_and_check(tmp_path: Path) -> None:
    hierarchies = fake_v2(tmp_path, "ctz", "c1")
    cgroup = tmp_path / "ctz" / "c1"
    mem = MemIsolator(hierarchies)
    await mem.prepare("c1", Limits(mem_bytes=32 * MiB))
    assert read(cgroup / "memory.max") == read(cgroup / "memory.low") == str(32 * MiB)
    assert mem.check("c1") is None
    (cgroup / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    limitation = await mem.watch("c1")
    assert limitation.resource == "mem"
    assert str(32 * MiB) in limitation.message and str(60 * MiB) in limitation.message
    assert mem.check("c1") == limitation


async def test_mem_v1_check_reads_oom_kill(tmp_path: Path) -> None:
    hierarchies = fake_v1(tmp_path, "ctz", "c1")
    cgroup = tmp_path / "memory" / "ctz" / "c1"
    mem = MemIsolator(hierarchies)
    assert mem.check("c1") is None
    (cgroup / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    limitation = mem.check("c1")
    assert limitation is not None and limitation.resource == "mem"
    assert str(60 * MiB) in limitation.message


@pytest.mark.parametrize("fake", [fake_v1, fake_v2])
async def test_pids_limit_and_check(tmp_path: Path, fake: type) -> None:
    hierarchies = fake(tmp_path, "ctz", "c1")
    pids = PidsIsolator(hierarchies)
    await pids.prepare("c1", Limits(pids=50))
    events = hierarchies.path("pids", "c1") / "pids.events"
    assert read(events.parent / "pids.max") == "50"
    assert pids.check("c1") is None
    events.write_text("max 7\n")
    limitation = pids.check("c1")
    assert limitation is not None and limitation.resource == "pids" and "50" in limitation.message
    await pids.update("c1", Limits(pids=None))
    assert read(events.parent / "pids.max") == "max"


def test_registry_adds_freezer_on_v1_only(tmp_path: Path) -> None:
    fake_v1(tmp_path / "v1", "ctz", "c1")
    fake_v2(tmp_path / "v2", "ctz", "c1")
    names = ["cgroups/cpu", "cgroups/mem", "cgroups/pids"]
    v1 = build_isolators(names, cgroups_root="ctz", hierarchy_override=str(tmp_path / "v1"))
    assert [i.name for i in v1] == [*names, "cgroups/freezer"]
    assert isinstance(v1[-1], FreezerIsolator)
    v2 = build_isolators(names, cgroups_root="ctz", hierarchy_override=str(tmp_path / "v2"))
    assert [i.name for i in v2] == names
    assert [i.name for i in build_isolators(["posix/cpu", "posix/mem"])] == [
        "posix/cpu",
        "posix/mem",
    ]


def test_registry_names_an_unknown_isolator() -> None:
    with pytest.raises(ValueError, match=r"'cgroups/bogus'.*known: cgroups/cpu"):
        build_isolators(["cgroups/cpu", "cgroups/bogus"])
