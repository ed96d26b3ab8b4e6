"""The OCI runtime spec (config.json) of a container, built from a LaunchSpec and its image.

It is built as data and serialised with json, never pasted together. Limits use the same Mesos
arithmetic as the native isolators (imported from isolators/cgroups), and linux.cgroupsPath puts
the container at `/<cgroups_root>/<container_id>` in every controller, where the shared accounting
reader finds it. The defaults (mounts, capabilities, masked paths) are containerd's own defaults
for a non-privileged container.

Network: the network isolator made the container's namespace before the spec is written; the
spec joins it by path (`linux.namespaces` network entry with `path`), or has no network entry
for the host's network. Its /etc/hosts and /etc/resolv.conf are bind-mounted read-only: the
files live in the service's state, and a writable bind would let the container grow them there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapter.errors import InvalidArgument
from adapter.images.image import Image
from adapter.model import LaunchSpec, Resources
from isolators.cgroups.cpu import CFS_PERIOD_US, cfs_quota_us, cpu_shares
from isolators.cgroups.mem import memory_limit_bytes

OCI_VERSION = "1.0.2-dev"
SPEC_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
RESOURCES_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
SANDBOX_PATH = "/mnt/mesos/sandbox"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CAPABILITIES = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
]  # fmt: skip
MASKED_PATHS = [
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
    "/proc/scsi",
]  # fmt: skip
READONLY_PATHS = [
    "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
]  # fmt: skip
NAMESPACES = ("pid", "ipc", "uts", "mount")


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


def default_mounts(sandbox: str) -> list[dict[str, Any]]:
    return [
        _mount("/proc", "proc", "proc", ["nosuid", "noexec", "nodev"]),
        _mount("/dev", "tmpfs", "tmpfs", ["nosuid", "strictatime", "mode=755", "size=65536k"]),
        _mount(
            "/dev/pts",
            "devpts",
            "devpts",
            ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        ),
        _mount("/dev/shm", "tmpfs", "shm", ["nosuid", "noexec", "nodev", "mode=1777"]),
        _mount("/dev/mqueue", "mqueue", "mqueue", ["nosuid", "noexec", "nodev"]),
        _mount("/sys", "sysfs", "sysfs", ["nosuid", "noexec", "nodev", "ro"]),
        _mount(
            "/sys/fs/cgroup", "cgroup", "cgroup", ["nosuid", "noexec", "nodev", "relatime", "ro"]
        ),
        _mount(SANDBOX_PATH, "bind", sandbox, ["rbind", "rw"]),
    ]


def linux_resources(resources: Resources, *, enable_cfs: bool) -> dict[str, Any]:
    """linux.resources with Mesos' arithmetic; what is not requested is left unlimited."""
    result: dict[str, Any] = {}
    if resources.cpus is not None:
        cpu: dict[str, Any] = {"shares": cpu_shares(resources.cpus)}
        if enable_cfs:
            cpu.update(quota=cfs_quota_us(resources.cpus), period=CFS_PERIOD_US)
        result["cpu"] = cpu
    if resources.mem_bytes is not None:
        limit = memory_limit_bytes(resources.mem_bytes)
        result["memory"] = {"limit": limit, "reservation": limit}
    if resources.pids is not None:
        result["pids"] = {"limit": resources.pids}
    return result


def environment(spec: LaunchSpec, image: Image) -> list[str]:
    """The image's env, then the request's (which wins), then MESOS_SANDBOX; PATH if none."""
    merged = dict(image.env)
    merged.update(spec.command.environment)
    merged["MESOS_SANDBOX"] = SANDBOX_PATH
    merged.setdefault("PATH", DEFAULT_PATH)
    return [f"{name}={value}" for name, value in merged.items()]


def _lookup(table: str, name: str, field: str) -> tuple[int, int]:
    """uid and gid (or gid twice) of `name` in passwd/group text."""
    for line in table.splitlines():
        parts = line.split(":")
        if len(parts) >= 3 and parts[0] == name and parts[2].isdigit():
            gid = parts[3] if len(parts) > 3 and parts[3].isdigit() else parts[2]
            return int(parts[2]), int(gid)
    raise InvalidArgument(field, f"{name!r} is not in the image's /etc/passwd or /etc/group")


def resolve_user(user: str, passwd: str, group: str) -> tuple[int, int]:
    """`name`, `uid`, `name:group` or `uid:gid`, as Docker reads the image's USER, resolved
    against the image's /etc/passwd and /etc/group texts."""
    field = "command.user"
    name, _, group_name = user.partition(":")
    if name.isdigit():
        uid, gid = int(name), 0
        for line in passwd.splitlines():  # a numeric user still gets its primary group
            parts = line.split(":")
            if len(parts) > 3 and parts[2] == name and parts[3].isdigit():
                gid = int(parts[3])
    else:
        uid, gid = _lookup(passwd, name, field)
    if group_name:
        gid = int(group_name) if group_name.isdigit() else _lookup(group, group_name, field)[0]
    return uid, gid


def needs_user_tables(user: str) -> bool:
    """Whether resolving `user` needs the image's passwd/group (numeric ids do not)."""
    name, _, group_name = user.partition(":")
    return not (name.isdigit() and (not group_name or group_name.isdigit()))


def runtime_spec(
    spec: LaunchSpec,
    image: Image,
    *,
    cgroups_root: str,
    enable_cfs: bool,
    user: tuple[int, int],
    network: Network | None = None,
) -> dict[str, Any]:
    network = network or Network()
    capabilities = {kind: CAPABILITIES for kind in ("bounding", "effective", "permitted")}
    return {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": False,
            "user": {"uid": user[0], "gid": user[1]},
            "args": spec.command.resolved_argv(),
            "env": environment(spec, image),
            "cwd": spec.command.working_dir or image.working_dir or SANDBOX_PATH,
            "capabilities": capabilities,
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs"},
        "hostname": spec.container_id[:63],
        "mounts": default_mounts(spec.sandbox) + network.mounts(),
        "linux": {
            "resources": {
                "devices": [{"allow": False, "access": "rwm"}],
                **linux_resources(spec.resources, enable_cfs=enable_cfs),
            },
            "cgroupsPath": f"/{cgroups_root}/{spec.container_id}",
            "namespaces": [{"type": kind} for kind in NAMESPACES] + network.namespace(),
            "maskedPaths": MASKED_PATHS,
            "readonlyPaths": READONLY_PATHS,
        },
    }


def encode(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()
