"""A pod's cgroup: `<cgroups_root>/_pods/<pod>` with the pod-level limits (the pod's resources
plus its overhead), the holder's and every container's cgroups nested in it, the pod's statistics
read from it, and nothing of it left after the pod is removed or after a crash."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from adapter.cri.api import cri
from tests.integration.cri import TIMEOUT, CriNode

MIB = 1024 * 1024
MEMORY = Path("/sys/fs/cgroup/memory")
CPU = Path("/sys/fs/cgroup/cpu")


def pod_cgroup(node: CriNode, pod_id: str, controller: Path = MEMORY) -> Path:
    return node.pod_cgroup(pod_id, controller)


def limited_pod(node: CriNode, memory: int, overhead: int, cpu_quota: int = 0) -> str:
    return node.run_pod(node.limited_pod_config(memory, overhead, cpu_quota))


def test_pod_cgroup_holds_its_containers_with_the_pod_limits(cri_node: CriNode) -> None:
    pod_id = limited_pod(cri_node, memory=96 * MIB, overhead=32 * MIB, cpu_quota=50_000)
    try:
        cgroup = pod_cgroup(cri_node, pod_id)
        assert int((cgroup / "memory.limit_in_bytes").read_text()) == 128 * MIB
        assert int((pod_cgroup(cri_node, pod_id, CPU) / "cpu.shares").read_text()) == 512
        container_id = cri_node.run(pod_id, cri_node.container_config("sleep", "600"))
        # The holder (its container id is the pod's) and the container nest in the pod.
        assert (cgroup / pod_id).is_dir()
        procs = (cgroup / container_id / "cgroup.procs").read_text().split()
        assert procs, "the container's processes are in its cgroup inside the pod's"
        assert not (MEMORY / cri_node.service.cgroups_root / container_id).exists()
        stats = cri_node.runtime.PodSandboxStats(
            cri.PodSandboxStatsRequest(pod_sandbox_id=pod_id), timeout=TIMEOUT
        ).stats
        assert stats.linux.memory.working_set_bytes.value > 0
        assert stats.linux.process.process_count.value >= 2  # the holder and the sleep
    finally:
        cri_node.remove_pod(pod_id)
    assert not pod_cgroup(cri_node, pod_id).exists()
    assert not pod_cgroup(cri_node, pod_id, CPU).exists()


def test_the_pod_limit_binds_containers_that_have_none(cri_node: CriNode) -> None:
    """Two containers without limits of their own share the pod's 64 MiB: one that takes more
    is killed by the kernel's OOM killer, and the CRI says OOMKilled."""
    pod_id = limited_pod(cri_node, memory=64 * MIB, overhead=0)
    try:
        cri_node.run(pod_id, cri_node.container_config("sleep", "600"))
        hog = cri_node.run(
            pod_id,
            cri_node.container_config(
                "sh", "-c", "head -c 200000000 /dev/zero | tail -c 150000000 >/dev/null"
            ),
        )
        status = cri_node.wait_exited(hog, timeout=60)
        assert status.reason == "OOMKilled", status
    finally:
        cri_node.remove_pod(pod_id)


def test_a_pod_without_resources_is_accounted_but_unlimited(cri_node: CriNode) -> None:
    pod_id = cri_node.run_pod()
    try:
        limit = int((pod_cgroup(cri_node, pod_id) / "memory.limit_in_bytes").read_text())
        assert limit > 1 << 50  # the kernel's "no limit"
    finally:
        cri_node.remove_pod(pod_id)


def test_bad_pod_resources_name_the_field(cri_node: CriNode) -> None:
    config = cri_node.pod_config(
        linux=cri.LinuxPodSandboxConfig(
            resources=cri.LinuxContainerResources(memory_limit_in_bytes=-5)
        )
    )
    with pytest.raises(grpc.RpcError) as raised:
        cri_node.run_pod(config)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "config.linux.resources.memory_limit_in_bytes" in str(raised.value.details())
