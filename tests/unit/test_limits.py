"""The Mesos limit arithmetic, computed once (adapter/core/limits.py), and every runtime's
translation of that one value: LXC keys, the OCI spec, Docker's fields, the native isolators."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapter.core.limits import Limits, memory_floor
from adapter.core.model import Resources
from adapter.runtimes.containerd.spec import linux_resources
from adapter.runtimes.docker.container_config import resource_fields
from adapter.runtimes.lxc.config import cgroup_keys
from isolators import base as isolators
from isolators.cgroups.cpu import CpuIsolator
from isolators.cgroups.hierarchy import Hierarchies
from isolators.cgroups.mem import MemIsolator
from isolators.cgroups.pids import PidsIsolator

MIB = 1024 * 1024


@pytest.mark.parametrize(
    ("cpus", "shares", "quota"),
    [(0.001, 2, 1_000), (0.1, 102, 10_000), (0.5, 512, 50_000), (2.5, 2560, 250_000)],
)
def test_cpu_shares_and_quota(cpus: float, shares: int, quota: int) -> None:
    with_cfs = Limits.of(Resources(cpus=cpus), enable_cfs=True)
    assert (with_cfs.cpu_shares, with_cfs.cfs_quota_us, with_cfs.cfs_period_us) == (
        shares,
        quota,
        100_000,
    )
    without = Limits.of(Resources(cpus=cpus), enable_cfs=False)
    assert (without.cpu_shares, without.cfs_quota_us) == (shares, None)


@pytest.mark.parametrize(
    ("mib", "expected"), [(1, 32 * MIB), (32, 32 * MIB), (100.5, int(100.5 * MIB)), (4096, 4 << 30)]
)
def test_memory_has_the_32_mib_floor(mib: float, expected: int) -> None:
    assert Limits.of(Resources(mem_mib=mib), enable_cfs=False).mem_bytes == expected
    assert int(memory_floor(mib) * MIB) == expected  # what the edge records and reports


def test_nothing_requested_is_unlimited() -> None:
    assert Limits.of(Resources(), enable_cfs=True) == Limits()
    assert Limits.of(Resources(pids=7), enable_cfs=True).pids == 7


def test_the_isolators_get_their_own_type_with_the_floor_applied() -> None:
    limits = Limits.of(Resources(cpus=1.5, mem_mib=8, pids=3), enable_cfs=True)
    assert limits.for_isolators() == isolators.Limits(cpus=1.5, mem_bytes=32 * MIB, pids=3)


def fake_v1_cgroups(base: Path, container_id: str) -> Hierarchies:
    files = {
        "cpu": {"cpu.shares": "1024", "cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "-1"},
        "memory": {
            "memory.limit_in_bytes": str(1 << 40),
            "memory.soft_limit_in_bytes": str(1 << 40),
            "memory.usage_in_bytes": str(MIB),
        },
        "pids": {"pids.max": "max"},
    }
    for controller, contents in files.items():
        cgroup = base / controller / "ctz" / container_id
        cgroup.mkdir(parents=True)
        for name, text in contents.items():
            (cgroup / name).write_text(text)
    return Hierarchies.discover("ctz", override=base)


async def test_every_runtime_enforces_the_same_numbers(tmp_path: Path) -> None:
    """shares, quota, period, memory (floored) and pids, as each runtime hands them over."""
    limits = Limits.of(Resources(cpus=0.5, mem_mib=16, pids=7), enable_cfs=True)
    expected = (512, 50_000, 100_000, 32 * MIB, 7)
    lxc = dict(cgroup_keys(limits, version=1))
    lxc_files = ("cpu.shares", "cpu.cfs_quota_us", "cpu.cfs_period_us", "memory.limit_in_bytes")
    lxc_numbers = tuple(int(lxc[f"lxc.cgroup.{name}"]) for name in (*lxc_files, "pids.max"))
    oci = linux_resources(limits)
    oci_numbers = (
        oci["cpu"]["shares"],
        oci["cpu"]["quota"],
        oci["cpu"]["period"],
        oci["memory"]["limit"],
        oci["pids"]["limit"],
    )
    docker = resource_fields(limits)
    docker_numbers = tuple(
        docker[key] for key in ("CpuShares", "CpuQuota", "CpuPeriod", "Memory", "PidsLimit")
    )
    hierarchies = fake_v1_cgroups(tmp_path, "c1")
    native = [CpuIsolator(hierarchies, enable_cfs=True), MemIsolator(hierarchies)]
    for isolator in [*native, PidsIsolator(hierarchies)]:
        await isolator.update("c1", limits.for_isolators())

    def written(controller: str, name: str) -> int:
        return int((tmp_path / controller / "ctz" / "c1" / name).read_text())

    native_numbers = (
        written("cpu", "cpu.shares"),
        written("cpu", "cpu.cfs_quota_us"),
        written("cpu", "cpu.cfs_period_us"),
        written("memory", "memory.limit_in_bytes"),
        written("pids", "pids.max"),
    )
    assert lxc_numbers == oci_numbers == docker_numbers == native_numbers == expected
