"""A launch's LinuxOptions (what a CRI container asks beyond a Mesos launch) as the supervisor's
options: the confinement with its capability changes and seccomp profile, the namespaces it
joins, the files bound in, its log file."""

from __future__ import annotations

import asyncio
import dataclasses

from adapter.core.confinement import Confinement, confinement_of
from adapter.core.model import HOST_NAMESPACE, LaunchSpec
from adapter.core.services import SeccompFilter
from adapter.supervisor.launch_config import Enforcement
from adapter.supervisor.seccomp import load_localhost_profile

UNCONFINED = "unconfined"
# Namespaces the supervisor joins by --ns (the network one goes by --netns).
JOINED_KINDS = ("ipc", "uts", "pid", "user")


async def seccomp_program(spec: LaunchSpec, policy: Confinement, filters: SeccompFilter) -> bytes:
    """The BPF program for the launch; b"" (no filter) when it asks to be unconfined. A node's
    own profile is compiled off the event loop: libseccomp takes long on large ones."""
    profile = spec.linux.seccomp
    if profile == UNCONFINED:
        return b""
    path = spec.linux.localhost_seccomp()
    if path is not None:
        field = "linux.security_context.seccomp.localhost_ref"
        return await asyncio.to_thread(
            load_localhost_profile, path, field, capabilities=policy.capabilities
        )
    return filters.bpf(policy.capabilities)


async def enforcement(spec: LaunchSpec, filters: SeccompFilter, *, own_root: bool) -> Enforcement:
    policy = confinement_of(spec)
    bpf = b"" if policy.privileged else await seccomp_program(spec, policy, filters)
    base = Enforcement.of(policy, bpf, own_root=own_root, cgroup_namespace=own_root)
    if policy.privileged or not own_root:
        return base
    # The CRI's lists add to ours: a workload is never given less than the default.
    masked = (*base.masked_paths, *(spec.linux.masked_paths or ()))
    readonly = (*base.readonly_paths, *(spec.linux.readonly_paths or ()))
    return dataclasses.replace(
        base,
        masked_paths=tuple(dict.fromkeys(masked)),
        readonly_paths=tuple(dict.fromkeys(readonly)),
    )


def joined_namespaces(spec: LaunchSpec) -> tuple[tuple[str, str], ...]:
    return tuple((kind, path) for kind, path in spec.linux.namespaces if kind in JOINED_KINDS)


def joined_netns(spec: LaunchSpec) -> str | None:
    """The network namespace the launch joins (None for the host's), when it joins one: then
    the launch's own network is not prepared."""
    path = spec.linux.namespace("net")
    return None if path in (None, HOST_NAMESPACE) else path


def hostname(spec: LaunchSpec) -> str:
    return spec.linux.hostname or spec.container_id[:63]
