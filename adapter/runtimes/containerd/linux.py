"""A launch's LinuxOptions (what a CRI container asks beyond a Mesos launch) as OCI spec parts:
the namespaces it joins, its volumes, the CRI's masked and read-only paths on top of ours, and
its seccomp profile. adapter/runtimes/native/linux.py is the same translation for the supervisor.

A pod's container joins the holder's namespaces by path (`/proc/<holder pid>/ns/<kind>`),
which runc enters with setns and refuses when the file is not a namespace of that kind; "host"
leaves the kind out, so the container stays in the host's (the shim's) namespace.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from adapter.core.confinement import Confinement, oci_seccomp_profile
from adapter.core.model import HOST_NAMESPACE, LaunchSpec, LinuxOptions, Mount

UNCONFINED = "unconfined"
# Our namespace kinds (model.NAMESPACE_KINDS) by their OCI names; the network goes apart.
OCI_KINDS = {"pid": "pid", "ipc": "ipc", "uts": "uts"}
# A volume's propagation (model.PROPAGATIONS) as an OCI mount option, recursive as its rbind.
PROPAGATION_OPTIONS = {"private": "rprivate", "rslave": "rslave", "rshared": "rshared"}


def namespaces(linux: LinuxOptions, own: Iterable[str]) -> list[dict[str, str]]:
    """`own` kinds (OCI names) as fresh namespaces, except those the launch joins by path (a
    pod's) or shares with the host (left out)."""
    joined = {OCI_KINDS[kind]: path for kind, path in linux.namespaces if kind in OCI_KINDS}
    entries = []
    for kind in own:
        path = joined.get(kind)
        if path is None:
            entries.append({"type": kind})
        elif path != HOST_NAMESPACE:
            entries.append({"type": kind, "path": path})
    return entries


def owns_uts(linux: LinuxOptions) -> bool:
    """runc sets a hostname only in a UTS namespace of the container's own: a pod's is the
    holder's, named by the pod."""
    return linux.namespace("uts") is None


def joined_network(linux: LinuxOptions) -> str | None:
    """The network namespace the launch joins (a pod's path, or "host"); None: its own."""
    return linux.namespace("net")


def volume_mounts(mounts: Iterable[Mount]) -> list[dict[str, Any]]:
    """CRI volumes: recursive binds of host paths, with their propagation and access."""
    return [
        {
            "destination": mount.container_path,
            "type": "bind",
            "source": mount.host_path,
            "options": [
                "rbind",
                PROPAGATION_OPTIONS[mount.propagation],
                "ro" if mount.read_only else "rw",
            ],
        }
        for mount in mounts
    ]


def etc_files(linux: LinuxOptions) -> dict[str, Path]:
    """The pod's /etc files: their path in the container -> the host file."""
    return {target: Path(source) for source, target in linux.etc_files}


def rootfs_propagation(mounts: Iterable[Mount]) -> str | None:
    """As containerd's CRI: an rshared volume needs the container's mounts shared for its
    mounts to reach the host, an rslave one at least slave; None keeps runc's default."""
    kinds = {mount.propagation for mount in mounts}
    for kind in ("rshared", "rslave"):
        if kind in kinds:
            return kind
    return None


def confined_paths(spec: LaunchSpec, confinement: Confinement) -> dict[str, list[str]]:
    """maskedPaths and readonlyPaths: the CRI's lists add to ours (a workload never gets less
    than the default); privileged gets none, as under the native runtime."""
    if confinement.privileged:
        return {"maskedPaths": [], "readonlyPaths": []}
    masked = (*confinement.masked_paths, *(spec.linux.masked_paths or ()))
    readonly = (*confinement.readonly_paths, *(spec.linux.readonly_paths or ()))
    return {
        "maskedPaths": list(dict.fromkeys(masked)),
        "readonlyPaths": list(dict.fromkeys(readonly)),
    }


def seccomp(
    spec: LaunchSpec, confinement: Confinement, localhost: dict[str, Any] | None
) -> dict[str, Any] | None:
    """linux.seccomp: ours for the container's capabilities (widened for added ones), none for
    privileged or unconfined, or the node's profile (`localhost`, read by the caller)."""
    if not confinement.seccomp or spec.linux.seccomp == UNCONFINED:
        return None
    if spec.linux.localhost_seccomp() is not None:
        assert localhost is not None, "the caller reads the node's profile"
        return localhost
    return oci_seccomp_profile(confinement.capabilities)
