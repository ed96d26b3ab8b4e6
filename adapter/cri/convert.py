"""Our records as CRI messages: pods, containers, their statuses and statistics."""

from __future__ import annotations

import time
from collections.abc import Mapping

from adapter.core.model import Statistics
from adapter.cri.api import cri
from adapter.cri.store import Container, Pod

NANOS = 1_000_000_000


def pod_sandbox(pod: Pod) -> cri.PodSandbox:
    config = pod.pod_config()
    return cri.PodSandbox(
        id=pod.id,
        metadata=config.metadata,
        state=cri.PodSandboxState.Value(pod.state),
        created_at=pod.created_at,
        labels=config.labels,
        annotations=config.annotations,
        runtime_handler=pod.runtime_handler,
    )


def pod_status(pod: Pod) -> cri.PodSandboxStatus:
    config = pod.pod_config()
    options = config.linux.security_context.namespace_options
    return cri.PodSandboxStatus(
        id=pod.id,
        metadata=config.metadata,
        state=cri.PodSandboxState.Value(pod.state),
        created_at=pod.created_at,
        network=cri.PodSandboxNetworkStatus(ip=pod.ip),
        linux=cri.LinuxPodSandboxStatus(namespaces=cri.Namespace(options=options)),
        labels=config.labels,
        annotations=config.annotations,
        runtime_handler=pod.runtime_handler,
    )


def container(record: Container) -> cri.Container:
    config = record.container_config()
    return cri.Container(
        id=record.id,
        pod_sandbox_id=record.pod_id,
        metadata=config.metadata,
        image=config.image,
        image_ref=record.image_id,
        state=cri.ContainerState.Value(record.state),
        created_at=record.created_at,
        labels=config.labels,
        annotations=config.annotations,
    )


def container_status(record: Container) -> cri.ContainerStatus:
    config = record.container_config()
    mounts = [
        cri.Mount(
            container_path=m.container_path,
            host_path=m.host_path,
            readonly=m.readonly,
            propagation=m.propagation,
        )
        for m in config.mounts
    ]
    return cri.ContainerStatus(
        id=record.id,
        metadata=config.metadata,
        state=cri.ContainerState.Value(record.state),
        created_at=record.created_at,
        started_at=record.started_at,
        finished_at=record.finished_at,
        exit_code=record.exit_code,
        image=config.image,
        image_ref=record.image_id,
        reason=record.reason,
        message=record.message,
        labels=config.labels,
        annotations=config.annotations,
        mounts=mounts,
        log_path=record.log_path,
    )


def matches_labels(labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def container_stats(record: Container, statistics: Statistics) -> cri.ContainerStats:
    config = record.container_config()
    return cri.ContainerStats(
        attributes=cri.ContainerAttributes(
            id=record.id,
            metadata=config.metadata,
            labels=config.labels,
            annotations=config.annotations,
        ),
        cpu=cpu_usage(statistics),
        memory=memory_usage(statistics),
        writable_layer=cri.FilesystemUsage(
            timestamp=time.time_ns(),
            fs_id=cri.FilesystemIdentifier(mountpoint="/"),
            used_bytes=cri.UInt64Value(value=int(statistics.get("disk_used_bytes", 0))),
            inodes_used=cri.UInt64Value(value=0),
        ),
    )


def cpu_usage(statistics: Statistics) -> cri.CpuUsage:
    seconds = float(statistics.get("cpus_user_time_secs", 0)) + float(
        statistics.get("cpus_system_time_secs", 0)
    )
    return cri.CpuUsage(
        timestamp=time.time_ns(),
        usage_core_nano_seconds=cri.UInt64Value(value=int(seconds * NANOS)),
    )


def memory_usage(statistics: Statistics) -> cri.MemoryUsage:
    total = int(statistics.get("mem_total_bytes", 0))
    rss = int(statistics.get("mem_rss_bytes", 0))
    # cAdvisor's working set is usage less inactive file pages; without that split, the
    # anonymous memory plus mapped files is the closest count of what cannot be reclaimed.
    working_set = rss + int(statistics.get("mem_mapped_file_bytes", 0))
    return cri.MemoryUsage(
        timestamp=time.time_ns(),
        working_set_bytes=cri.UInt64Value(value=min(working_set, total) if total else working_set),
        usage_bytes=cri.UInt64Value(value=total),
        rss_bytes=cri.UInt64Value(value=rss),
    )


def pod_stats(
    pod: Pod, statistics: Statistics, containers: list[cri.ContainerStats]
) -> cri.PodSandboxStats:
    config = pod.pod_config()
    return cri.PodSandboxStats(
        attributes=cri.PodSandboxAttributes(
            id=pod.id,
            metadata=config.metadata,
            labels=config.labels,
            annotations=config.annotations,
        ),
        linux=cri.LinuxPodSandboxStats(
            cpu=cpu_usage(statistics),
            memory=memory_usage(statistics),
            process=cri.ProcessUsage(
                timestamp=time.time_ns(),
                process_count=cri.UInt64Value(value=int(statistics.get("processes", 0))),
            ),
            containers=containers,
        ),
    )
