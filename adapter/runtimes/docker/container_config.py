"""A launch as Docker Engine API create-container arguments: the workload, our labels, the
node's limits as HostConfig fields, the sandbox mount, confinement and the pod's namespaces.

Data, never text: the sandbox path goes into a Mounts entry, not a "src:dst" bind string.
"""

from __future__ import annotations

from typing import Any

from adapter.core.limits import Limits
from adapter.core.model import LaunchSpec
from adapter.runtimes.docker import handle as names
from adapter.runtimes.docker import pod
from adapter.runtimes.docker.confinement import NodeCapabilities, confinement_fields
from adapter.runtimes.docker.images import DockerImage
from adapter.runtimes.docker.network import PreparedNetwork


def resource_fields(limits: Limits) -> dict[str, int]:
    """`limits` as Engine API HostConfig/update fields."""
    fields: dict[str, int] = {}
    if limits.cpu_shares is not None:
        fields["CpuShares"] = limits.cpu_shares
    if limits.cfs_quota_us is not None:
        fields["CpuPeriod"] = limits.cfs_period_us
        fields["CpuQuota"] = limits.cfs_quota_us
    if limits.mem_bytes is not None:
        limit = limits.mem_bytes
        # Swap equal to memory: the limit is hard, as the native runtime's is.
        fields.update(Memory=limit, MemorySwap=limit, MemoryReservation=limit)
    if limits.pids is not None:
        fields["PidsLimit"] = limits.pids
    return fields


def container_config(
    spec: LaunchSpec,
    image: DockerImage,
    network: PreparedNetwork,
    modes: pod.PodModes,
    localhost: dict[str, Any] | None,
    *,
    owner: str,
    limits: Limits,
    cgroup_parent: str,
    node_capabilities: NodeCapabilities,
) -> dict[str, Any]:
    """create_container keyword arguments; `owner` labels the container ours, host_config is
    Engine API JSON."""
    argv = spec.command.resolved_argv()
    working_dir = spec.command.working_dir or image.config.get("WorkingDir")
    labels = dict(spec.labels)
    labels.update({names.LABEL_CONTAINER_ID: spec.container_id, names.LABEL_OWNER: owner})
    host_config: dict[str, Any] = {
        **resource_fields(limits),
        "CgroupParent": cgroup_parent,
        "Mounts": [
            {"Type": "bind", "Source": spec.sandbox, "Target": names.SANDBOX_MOUNT},
            *pod.pod_mounts(spec.linux, network.etc_mounts),
        ],
        "NetworkMode": network.network_mode,
        "Init": True,
        "LogConfig": {"Type": "json-file", "Config": {}},
        **confinement_fields(
            spec, str(image.config.get("User") or ""), node_capabilities, localhost
        ),
        **pod.pod_fields(spec, modes),
    }
    environment = [f"{key}={value}" for key, value in spec.command.environment]
    environment.append(f"MESOS_SANDBOX={names.SANDBOX_MOUNT}")
    return {
        "image": image.reference,
        # None, not []: an empty Entrypoint would drop the image's own.
        "entrypoint": argv[:1] or None,
        "command": argv[1:] or None,
        "environment": environment,
        "user": pod.docker_user(spec),
        # Docker takes a hostname only for a container in a network namespace of its own.
        "hostname": (spec.linux.hostname or None) if network.network_mode == "none" else None,
        "tty": spec.linux.tty,
        "stdin_open": spec.linux.stdin,
        "working_dir": working_dir or names.SANDBOX_MOUNT,
        "labels": labels,
        "detach": True,
        "host_config": host_config,
    }
