"""The OCI runtime spec (config.json) of a container, built from a LaunchSpec and its image.

It is built as data and serialised with json, never pasted together. Limits are the one value
every runtime translates (adapter/core/limits.py), and linux.cgroupsPath puts
the container at `/<cgroups_root>/<container_id>` in every controller, where the shared accounting
reader finds it. What runs (argv, environment, working directory, user) is the one image/request
merge (adapter/core/workload.py); who runs it is the service's resolution of the image's
passwd and group files (adapter/core/identity.py), passed in as numbers.

Confinement is adapter/core/confinement.py's policy, translated for runc and crun: the default
capability set (held only by uid 0; any other uid starts with none, as under Docker), the seccomp
allow-list, no_new_privs for non-root users and on request, masked and read-only kernel paths, a
cgroup namespace whose cgroupfs is mounted read-only, /sys read-only, a /dev tmpfs holding only
the runtime's default devices, and a device cgroup that denies everything else. `privileged`
turns these off: every capability, no filter, nothing masked, /sys and cgroupfs writable and the
device cgroup open.

Network: the network isolator made the container's namespace before the spec is written; the
spec joins it by path (`linux.namespaces` network entry with `path`), or has no network entry
for the host's network. Its /etc/hosts and /etc/resolv.conf are bind-mounted read-only: the
files live in the service's state, and a writable bind would let the container grow them there.

A CRI container's LinuxOptions (the pod's namespaces, volumes, read-only root, capability
changes, seccomp profile, extra masked paths, the pod's /etc files) are translated by linux.py.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapter.core.confinement import Confinement, confinement_of
from adapter.core.limits import Limits
from adapter.core.model import Identity, LaunchSpec
from adapter.core.workload import SANDBOX_IN_CONTAINER, Workload, merge
from adapter.images.image import Image
from adapter.runtimes.containerd import linux as pod

OCI_VERSION = "1.0.2-dev"
SPEC_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
RESOURCES_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
SANDBOX_PATH = SANDBOX_IN_CONTAINER
NAMESPACES = ("pid", "ipc", "uts", "mount", "cgroup")
SYSTEM_MOUNT_OPTIONS = ("nosuid", "noexec", "nodev")


@dataclass(frozen=True)
class Network:
    """How the container gets its network. `netns_path`: join the isolator's namespace; None and
    `host`: the host's namespace; neither: a fresh one from runc with only loopback."""

    netns_path: str | None = None
    host: bool = False
    etc_files: dict[str, Path] = field(default_factory=dict)  # path in the container -> file

    def namespace(self) -> list[dict[str, str]]:
        if self.netns_path is not None:
            return [{"type": "network", "path": self.netns_path}]
        return [] if self.host else [{"type": "network"}]

    def mounts(self) -> list[dict[str, Any]]:
        return [
            _mount(target, "bind", str(source), ["rbind", "ro", "nosuid", "nodev", "noexec"])
            for target, source in sorted(self.etc_files.items())
        ]


def _mount(destination: str, kind: str, source: str, options: list[str]) -> dict[str, Any]:
    return {"destination": destination, "type": kind, "source": source, "options": options}


def default_mounts(sandbox: str, *, privileged: bool = False) -> list[dict[str, Any]]:
    """/proc, a /dev tmpfs (runc and crun create only their default devices in it), /sys and
    cgroupfs read-only unless privileged, and the sandbox."""
    access = "rw" if privileged else "ro"
    return [
        _mount("/proc", "proc", "proc", [*SYSTEM_MOUNT_OPTIONS]),
        _mount("/dev", "tmpfs", "tmpfs", ["nosuid", "strictatime", "mode=755", "size=65536k"]),
        _mount(
            "/dev/pts",
            "devpts",
            "devpts",
            ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        ),
        _mount("/dev/shm", "tmpfs", "shm", ["nosuid", "noexec", "nodev", "mode=1777"]),
        _mount("/dev/mqueue", "mqueue", "mqueue", [*SYSTEM_MOUNT_OPTIONS]),
        _mount("/sys", "sysfs", "sysfs", [*SYSTEM_MOUNT_OPTIONS, access]),
        _mount("/sys/fs/cgroup", "cgroup", "cgroup", [*SYSTEM_MOUNT_OPTIONS, "relatime", access]),
        _mount(SANDBOX_PATH, "bind", sandbox, ["rbind", "rw"]),
    ]


def process_capabilities(
    confinement: Confinement, uid: int, held: Collection[str] | None = None
) -> dict[str, list[str]]:
    """The bounding set always; effective, permitted and inheritable only for uid 0, as Docker
    does: a non-root user holds nothing, not even an inheritable set that a binary with
    inheritable file capabilities could turn into permitted ones. No ambient set, so nothing
    survives a non-root user's execve. Only capabilities in `held` (None: all) are named: a
    privileged container gets everything the node has (confinement.held_capabilities)."""
    bounding = [name for name in confinement.capabilities if held is None or name in held]
    given = bounding if uid == 0 else []
    return {
        "bounding": bounding,
        "effective": list(given),
        "permitted": list(given),
        "inheritable": list(given),
    }


def linux_confinement(
    spec: LaunchSpec, confinement: Confinement, localhost_seccomp: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The `linux` keys that confine: seccomp, masked and read-only paths, the device cgroup."""
    devices = [{"allow": confinement.privileged, "access": "rwm"}]
    result: dict[str, Any] = {
        **pod.confined_paths(spec, confinement),
        "resources": {"devices": devices},
    }
    profile = pod.seccomp(spec, confinement, localhost_seccomp)
    if profile is not None:
        result["seccomp"] = profile
    return result


def linux_resources(limits: Limits) -> dict[str, Any]:
    """linux.resources of `limits`; what is not requested is left unlimited."""
    result: dict[str, Any] = {}
    if limits.cpu_shares is not None:
        cpu: dict[str, Any] = {"shares": limits.cpu_shares}
        if limits.cfs_quota_us is not None:
            cpu.update(quota=limits.cfs_quota_us, period=limits.cfs_period_us)
        result["cpu"] = cpu
    if limits.mem_bytes is not None:
        result["memory"] = {"limit": limits.mem_bytes, "reservation": limits.mem_bytes}
    if limits.pids is not None:
        result["pids"] = {"limit": limits.pids}
    return result


def runtime_spec(
    spec: LaunchSpec,
    image: Image,
    *,
    cgroups_root: str,
    limits: Limits,
    identity: Identity,
    network: Network | None = None,
    held: Collection[str] | None = None,
    localhost_seccomp: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The config.json for `spec` in `image`, run as `identity` (resolved by the service from
    the image's files), naming only capabilities in `held` (see process_capabilities);
    `localhost_seccomp` is the node's profile when the launch names one (linux.py)."""
    network = network or Network()
    workload = merge(spec.command, image, host_sandbox=spec.sandbox)
    confinement = confinement_of(spec)
    linux = linux_confinement(spec, confinement, localhost_seccomp)
    linux["resources"].update(linux_resources(limits))
    linux["cgroupsPath"] = f"/{cgroups_root}/{spec.container_id}"
    linux["namespaces"] = pod.namespaces(spec.linux, NAMESPACES) + network.namespace()
    linux.update(user_namespace(spec, linux["namespaces"]))
    if spec.linux.sysctls:
        linux["sysctl"] = dict(spec.linux.sysctls)
    propagation = pod.rootfs_propagation(spec.linux.mounts)
    if propagation is not None:
        linux["rootfsPropagation"] = propagation
    document: dict[str, Any] = {
        "ociVersion": OCI_VERSION,
        "process": process_section(workload, identity, confinement, held),
        "root": {"path": "rootfs", "readonly": spec.linux.read_only_rootfs},
        "mounts": [
            *default_mounts(spec.sandbox, privileged=spec.privileged),
            *network.mounts(),
            *pod.volume_mounts(spec.linux.mounts),
        ],
        "linux": linux,
    }
    if pod.owns_uts(spec.linux):
        document["hostname"] = spec.linux.hostname or spec.container_id[:63]
    return document


def user_namespace(spec: LaunchSpec, namespaces: list[dict[str, str]]) -> dict[str, Any]:
    """With an id mapping: runc makes the user namespace first (it owns the others) and maps
    it, or joins a pod's by path; the snapshot's files are the mapping's (remap.py)."""
    mapping = spec.id_mapping
    if mapping is None:
        return {}
    joined = spec.linux.namespace("user")
    entry = {"type": "user", "path": joined} if joined else {"type": "user"}
    return {
        "namespaces": [*namespaces, entry],
        "uidMappings": [{"containerID": 0, "hostID": mapping.uid_start, "size": mapping.size}],
        "gidMappings": [{"containerID": 0, "hostID": mapping.gid_start, "size": mapping.size}],
    }


def process_section(
    workload: Workload,
    identity: Identity,
    confinement: Confinement,
    held: Collection[str] | None = None,
) -> dict[str, Any]:
    """`process`: what runs, as whom, holding what. HOME comes from the user's passwd entry
    when the environment sets none, as the native runtime's supervisor does."""
    user: dict[str, Any] = {"uid": identity.uid, "gid": identity.gid}
    if identity.groups:
        user["additionalGids"] = list(identity.groups)
    environment = workload.environment_lines()
    if identity.home and all(name != "HOME" for name, _ in workload.environment):
        environment.append(f"HOME={identity.home}")
    return {
        "terminal": False,
        "user": user,
        "args": list(workload.argv),
        "env": environment,
        "cwd": workload.working_dir,
        "capabilities": process_capabilities(confinement, identity.uid, held),
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        "noNewPrivileges": confinement.no_new_privs_for(identity.uid == 0),
    }


def encode(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()
