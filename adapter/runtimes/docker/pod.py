"""A docker container in a CRI pod: LaunchSpec.linux as Engine API fields.

Docker joins only another Docker container's namespaces (`NetworkMode`, `IpcMode`, `PidMode` =
`container:<id>`), never a /proc path. So a pod on this runtime has a Docker container as its
holder (Capabilities.pod_holder: the CRI launches the holder here too), and a pod's container
names the holder's namespaces by /proc/<holder pid>/ns/<kind>, as on every runtime. The driver
turns that pid into the holder's docker id by asking which container *of its own* has that init
pid: the path is never followed, and a pid that is no container of ours is refused.

UTS: Docker has no `container:` UTS mode. A container in another's network (`container:<id>`)
gets that container's hostname (Docker copies it) in a UTS namespace of its own, which is what a
pod's UTS sharing gives its containers: the pod's hostname. So a joined UTS namespace is accepted
only together with the same holder's network. A user namespace by path is refused.

The holder's image: a launch without an image (the holder's: `sleep infinity`) runs
`HOLDER_REPOSITORY`, a one-layer image of the host's static busybox that the driver imports into
the daemon itself: no registry, no pause image.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from adapter.core.errors import FailedPrecondition, InvalidArgument
from adapter.core.model import HOST_NAMESPACE, LaunchSpec, LinuxOptions
from adapter.images.busybox import BUSYBOX_BINARY, busybox_layer

HOLDER_REPOSITORY = "containerizer/host-busybox"
HOLDER_APPLETS = ("sh", "sleep")
NAMESPACE_PATH = re.compile(r"/proc/([1-9][0-9]{0,9})/ns/(net|ipc|uts|pid|user)")
FIELD = "linux.namespaces"
DOCKER_PROPAGATION = {"private": "rprivate", "rslave": "rslave", "rshared": "rshared"}

# A container of ours by its init's host pid: its inspect (raises FailedPrecondition if none).
FindByPid = Callable[[int], Awaitable[dict[str, Any]]]


def holder_source() -> tuple[object, ...]:
    """What tells the holder image's source apart without reading it: the busybox binary's
    device, inode, size, mtime and ctime (a replaced or rewritten binary changes them)."""
    found = BUSYBOX_BINARY.stat()
    return (found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns, found.st_ctime_ns)


def holder_rootfs() -> tuple[bytes, str]:
    """The holder image's root filesystem (a tar) and its tag, which names the content: a
    changed busybox binary makes another image instead of reusing a stale one."""
    rootfs = busybox_layer(applets=HOLDER_APPLETS)
    return rootfs, hashlib.sha256(rootfs).hexdigest()[:16]


@dataclass(frozen=True)
class PodModes:
    """Docker's namespace fields for a launch (HostConfig), and the network it joins."""

    host_config: dict[str, str]
    network_mode: str | None = None  # "container:<id>" or "host" when joined; None: its own


NO_POD = PodModes({})  # a launch that joins nothing


def _holder_pid(path: str, kind: str) -> int:
    match = NAMESPACE_PATH.fullmatch(path)
    if match is None or match.group(2) != kind:
        raise InvalidArgument(FIELD, f"{kind}: {path[:80]!r} is not /proc/<pid>/ns/{kind}")
    return int(match.group(1))


async def namespace_modes(linux: LinuxOptions, find: FindByPid) -> PodModes:
    """Docker's modes for the namespaces a launch joins or shares with the host; a kind that
    Docker cannot express is FailedPrecondition naming it."""
    fields: dict[str, str] = {}
    network_mode: str | None = None
    holder_net: str | None = None
    for kind, path in linux.namespaces:
        if path == HOST_NAMESPACE:
            if kind == "user":
                raise FailedPrecondition(f"{FIELD}: user: docker cannot share the host's")
            fields[_MODE_FIELDS[kind]] = "host"
            network_mode = "host" if kind == "net" else network_mode
            continue
        if kind in ("user", "uts"):
            if kind == "user":
                raise FailedPrecondition(f"{FIELD}: user: docker cannot join a user namespace")
            continue  # checked below, against the network
        holder = await find(_holder_pid(path, kind))
        mode = f"container:{holder['Id']}"
        if kind == "net":
            # A holder in bridge mode is itself in its network sandbox's namespace: join that.
            own = str(holder.get("HostConfig", {}).get("NetworkMode") or "")
            mode = own if own.startswith("container:") else mode
            network_mode, holder_net = mode, str(holder["Id"])
        fields[_MODE_FIELDS[kind]] = mode
    uts = linux.namespace("uts")
    if uts not in (None, HOST_NAMESPACE):
        holder = await find(_holder_pid(uts, "uts"))
        if holder_net != holder["Id"]:
            raise FailedPrecondition(
                f"{FIELD}: uts: docker shares a hostname only with the container whose network"
                " it joins"
            )
    return PodModes(fields, network_mode)


_MODE_FIELDS = {"net": "NetworkMode", "ipc": "IpcMode", "pid": "PidMode", "uts": "UTSMode"}


def pod_fields(spec: LaunchSpec, modes: PodModes) -> dict[str, Any]:
    """HostConfig fields of the pod options besides namespaces: sysctls, volumes, IPC that the
    pod's containers may join, the root filesystem's access, extra groups."""
    linux = spec.linux
    fields: dict[str, Any] = {
        key: value for key, value in modes.host_config.items() if key != "NetworkMode"
    }
    if linux.pod and linux.namespace("ipc") is None:
        fields["IpcMode"] = "shareable"  # a pod's holder: its containers join its IPC
    if linux.sysctls:
        fields["Sysctls"] = dict(linux.sysctls)
    if linux.read_only_rootfs:
        fields["ReadonlyRootfs"] = True
    if linux.supplementary_groups:
        fields["GroupAdd"] = [str(gid) for gid in linux.supplementary_groups]
    return fields


def pod_mounts(linux: LinuxOptions, network_mounts: tuple[dict[str, Any], ...]) -> list[Any]:
    """Engine API Mounts: the volumes, then the pod's /etc files, read-only, which replace the
    network's files at the same place (Docker refuses two mounts at one target)."""
    volumes = [
        {
            "Type": "bind",
            "Source": mount.host_path,
            "Target": mount.container_path,
            "ReadOnly": mount.read_only,
            "BindOptions": {"Propagation": DOCKER_PROPAGATION[mount.propagation]},
        }
        for mount in linux.mounts
    ]
    pod_files = {target: source for source, target in linux.etc_files}
    etc = [
        {"Type": "bind", "Source": source, "Target": target, "ReadOnly": True}
        for target, source in sorted(pod_files.items())
    ]
    kept = [mount for mount in network_mounts if mount["Target"] not in pod_files]
    return [*volumes, *kept, *etc]


def docker_user(spec: LaunchSpec) -> str | None:
    """Docker's `user`: the request's user, with the CRI's primary group when it names one."""
    user = spec.command.user
    if user is not None and spec.linux.group is not None:
        return f"{user.partition(':')[0]}:{spec.linux.group}"
    return user
