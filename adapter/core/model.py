"""Plain domain types shared by the core and the drivers. Imports nothing of ours.

Everything here is immutable and JSON-able through `to_json` / `from_json`, because container
records are checkpointed as JSON by state.py.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

MIB = 1024 * 1024
CONTAINER_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


class State(enum.Enum):
    LAUNCHING = "LAUNCHING"
    RUNNING = "RUNNING"
    DESTROYING = "DESTROYING"
    TERMINATED = "TERMINATED"


class Reason(enum.Enum):
    EXITED = "EXITED"
    DESTROYED = "DESTROYED"
    LIMITATION_MEMORY = "LIMITATION_MEMORY"
    LIMITATION_PIDS = "LIMITATION_PIDS"
    LIMITATION_DISK = "LIMITATION_DISK"
    LAUNCH_FAILED = "LAUNCH_FAILED"
    LOST = "LOST"


@dataclass(frozen=True)
class Resources:
    """What a container may use. None means unlimited / not requested."""

    cpus: float | None = None
    mem_mib: float | None = None
    disk_mib: float | None = None
    pids: int | None = None
    network_bandwidth: float | None = None  # Mbit/s, shaped on the host side of the veth
    ports: tuple[tuple[int, int], ...] = ()  # Mesos `ports` ranges (inclusive), forwarded 1:1

    @property
    def mem_bytes(self) -> int | None:
        return None if self.mem_mib is None else int(self.mem_mib * MIB)

    def merged(self, other: Resources) -> Resources:
        """These resources with every value that `other` sets replaced."""
        return Resources(
            cpus=other.cpus if other.cpus is not None else self.cpus,
            mem_mib=other.mem_mib if other.mem_mib is not None else self.mem_mib,
            disk_mib=other.disk_mib if other.disk_mib is not None else self.disk_mib,
            pids=other.pids if other.pids is not None else self.pids,
            network_bandwidth=(
                other.network_bandwidth
                if other.network_bandwidth is not None
                else self.network_bandwidth
            ),
            ports=other.ports or self.ports,
        )

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Resources:
        """Checkpoints written before a field existed lack it: it takes its default."""
        values = dict(data)
        values["ports"] = tuple((int(b), int(e)) for b, e in values.get("ports", ()))
        return cls(**values)


@dataclass(frozen=True)
class Command:
    """Exactly one of `shell` and `argv` is set."""

    shell: str | None = None
    argv: tuple[str, ...] = ()
    environment: tuple[tuple[str, str], ...] = ()
    user: str | None = None
    working_dir: str | None = None

    def resolved_argv(self) -> list[str]:
        return ["/bin/sh", "-c", self.shell] if self.shell is not None else list(self.argv)


NETWORK_MODES = ("none", "host", "bridge")


@dataclass(frozen=True)
class PortMapping:
    host_port: int
    container_port: int
    protocol: str = "tcp"  # "tcp" or "udp"


@dataclass(frozen=True)
class NetworkSettings:
    """The network a launch asks for; mode "" means the node's default (config [network])."""

    mode: str = ""
    port_mappings: tuple[PortMapping, ...] = ()

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> NetworkSettings:
        if not data:
            return cls()
        mappings = tuple(PortMapping(**mapping) for mapping in data.get("port_mappings", ()))
        return cls(mode=data.get("mode", ""), port_mappings=mappings)


@dataclass(frozen=True)
class Identity:
    """Who a workload runs as, resolved to numbers by the service (adapter/core/identity.py),
    never by a name service inside an image. `home` is the passwd entry's, "" when none."""

    uid: int = 0
    gid: int = 0
    groups: tuple[int, ...] = ()
    home: str = ""


PROPAGATIONS = ("private", "rslave", "rshared")


@dataclass(frozen=True)
class Mount:
    """A host path bound into the container (a CRI volume)."""

    host_path: str
    container_path: str
    read_only: bool = False
    propagation: str = "private"  # one of PROPAGATIONS


# Namespaces a launch may join instead of creating its own (a pod's), or share with the host.
NAMESPACE_KINDS = ("net", "ipc", "uts", "pid", "user")
HOST_NAMESPACE = "host"


# LinuxOptions.seccomp naming a profile file of the node: "localhost/<absolute path>".
SECCOMP_LOCALHOST = "localhost/"


@dataclass(frozen=True)
class LinuxOptions:
    """What a CRI container asks beyond a Mesos launch; the defaults are a plain launch.

    namespaces      kind -> the path of a namespace to join (the pod's: a pinned file, or
                    /proc/PID/ns/KIND of its holder process), or HOST_NAMESPACE; a kind not
                    named gets a namespace of its own
    group           the primary group (CRI run_as_group), overriding the user's
    supplementary_groups  added to the user's groups
    capabilities_add / capabilities_drop  changes to the default set ("ALL" allowed)
    seccomp         "" the runtime default, "unconfined", or "localhost/<absolute path>"
    masked_paths / readonly_paths  None: the default confinement's lists
    etc_files       host files bound read-only at /etc/<name> (the pod's hosts, resolv.conf,
                    hostname)
    log_path        the CRI log file (stdout and stderr in the CRI format) instead of the
                    sandbox's stdout and stderr
    stdin           the workload's stdin stays open for attached clients (else /dev/null)
    stdin_once      ... until the first attached client's input ends
    tty             a terminal as the workload's stdin, stdout and stderr
    pod             the pod whose cgroup holds the container's (pod-level limits and
                    accounting); "" for none
    hold_only       the launch only holds a pod's namespaces (its command never matters): a
                    runtime may pin them without a process (native: runtimes/native/pinned.py)
    """

    namespaces: tuple[tuple[str, str], ...] = ()
    group: int | None = None
    supplementary_groups: tuple[int, ...] = ()
    read_only_rootfs: bool = False
    capabilities_add: tuple[str, ...] = ()
    capabilities_drop: tuple[str, ...] = ()
    seccomp: str = ""
    masked_paths: tuple[str, ...] | None = None
    readonly_paths: tuple[str, ...] | None = None
    mounts: tuple[Mount, ...] = ()
    sysctls: tuple[tuple[str, str], ...] = ()
    hostname: str = ""
    etc_files: tuple[tuple[str, str], ...] = ()
    log_path: str = ""
    stdin: bool = False
    stdin_once: bool = False
    tty: bool = False
    pod: str = ""
    hold_only: bool = False

    def localhost_seccomp(self) -> str | None:
        """The node's seccomp profile file the launch names (`localhost/<path>`), if any."""
        prefix = SECCOMP_LOCALHOST
        return self.seccomp[len(prefix) :] if self.seccomp.startswith(prefix) else None

    def namespace(self, kind: str) -> str | None:
        """The path (or HOST_NAMESPACE) this launch joins for `kind`; None: its own."""
        return dict(self.namespaces).get(kind)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> LinuxOptions:
        if not data:
            return cls()
        values = dict(data)
        for key in ("namespaces", "sysctls", "etc_files"):
            values[key] = tuple((str(a), str(b)) for a, b in values.get(key, ()))
        for key in ("supplementary_groups",):
            values[key] = tuple(int(v) for v in values.get(key, ()))
        for key in ("capabilities_add", "capabilities_drop"):
            values[key] = tuple(values.get(key, ()))
        for key in ("masked_paths", "readonly_paths"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        values["mounts"] = tuple(Mount(**mount) for mount in values.get("mounts", ()))
        return cls(**values)


@dataclass(frozen=True)
class IdMapping:
    """A container's user namespace: its uids 0..size-1 are host uids uid_start.., its gids
    0..size-1 host gids gid_start.. (allocated by the core, adapter/core/userns.py)."""

    uid_start: int
    gid_start: int
    size: int

    def host_uid(self, uid: int) -> int:
        return self.uid_start + uid

    def host_gid(self, gid: int) -> int:
        return self.gid_start + gid

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> IdMapping | None:
        if not data:
            return None
        return cls(int(data["uid_start"]), int(data["gid_start"]), int(data["size"]))


@dataclass(frozen=True)
class LaunchSpec:
    container_id: str
    command: Command
    resources: Resources
    runtime: str
    sandbox: str
    image: str | None = None
    labels: tuple[tuple[str, str], ...] = ()
    network: NetworkSettings = field(default_factory=NetworkSettings)
    # The default confinement's explicit opt-out (node-allowed) and its no_new_privs request.
    privileged: bool = False
    no_new_privileges: bool = False
    linux: LinuxOptions = field(default_factory=LinuxOptions)
    # Asked for a user namespace of its own; None: the node's default decides.
    user_namespace: bool | None = None
    # The host range its user namespace maps, set by the core at launch (None: no namespace).
    id_mapping: IdMapping | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LaunchSpec:
        command = data["command"]
        return cls(
            container_id=data["container_id"],
            command=Command(
                shell=command["shell"],
                argv=tuple(command["argv"]),
                environment=tuple((k, v) for k, v in command["environment"]),
                user=command["user"],
                working_dir=command["working_dir"],
            ),
            resources=Resources.from_json(data["resources"]),
            runtime=data["runtime"],
            sandbox=data["sandbox"],
            image=data["image"],
            labels=tuple((k, v) for k, v in data["labels"]),
            network=NetworkSettings.from_json(data.get("network")),
            privileged=bool(data.get("privileged", False)),
            no_new_privileges=bool(data.get("no_new_privileges", False)),
            linux=LinuxOptions.from_json(data.get("linux")),
            user_namespace=data.get("user_namespace"),
            id_mapping=IdMapping.from_json(data.get("id_mapping")),
        )


@dataclass(frozen=True)
class Exit:
    """How a container's init process ended, as a driver saw it (no policy applied yet)."""

    exit_code: int | None = None
    signal: int | None = None
    # A limit the runtime or an isolator saw being hit, e.g. "mem" for an OOM kill.
    limitation: str | None = None
    limitation_message: str = ""
    # No status was recorded: the processes vanished while nobody watched.
    lost: bool = False
    message: str = ""
    # When it ended (unix time), if the runtime recorded it: an exit while the service was down
    # is seen only at recovery, which is not when it happened.
    finished_at: float | None = None

    @property
    def status(self) -> int:
        """The waitpid-style status word: exit code << 8, or the signal number."""
        if self.signal is not None:
            return self.signal & 0x7F
        return (self.exit_code or 0) << 8


@dataclass(frozen=True)
class ExecResult:
    """A command run to its end inside a running container (CRI ExecSync)."""

    exit_code: int
    stdout: bytes = b""
    stderr: bytes = b""
    timed_out: bool = False


@dataclass(frozen=True)
class Termination:
    reason: Reason
    exit_code: int | None = None
    signal: int | None = None
    status: int = 0
    killed: bool = False
    message: str = ""
    limited_resources: tuple[str, ...] = ()
    finished_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        # Field by field: asdict's deep copy cost more than the rest of a checkpoint.
        return {
            "reason": self.reason.value,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "status": self.status,
            "killed": self.killed,
            "message": self.message,
            "limited_resources": self.limited_resources,
            "finished_at": self.finished_at,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Termination:
        return cls(
            reason=Reason(data["reason"]),
            exit_code=data["exit_code"],
            signal=data["signal"],
            status=data["status"],
            killed=data["killed"],
            message=data["message"],
            limited_resources=tuple(data["limited_resources"]),
            finished_at=data["finished_at"],
        )


@dataclass(frozen=True)
class Capabilities:
    images: bool = False
    live_update: bool = False
    oom_detection: bool = False
    pid_namespace: bool = False
    recover: bool = False
    network_isolation: bool = False
    # A disk request is enforced (the core's disk isolator sees all the container writes).
    disk_enforced: bool = False
    # Runs CRI containers: joins a pod's namespaces and honours LaunchSpec.linux.
    pods: bool = False
    # Joins only namespaces of its own containers (docker: `container:<id>`), so a pod's holder
    # runs on this runtime too rather than on the native one.
    pod_holder: bool = False
    # A pod is one container of this runtime (a VM, which joins no namespaces): the pod has no
    # holder, and its one container gets the pod's network itself.
    single_container_pods: bool = False
    # Runs a container in a user namespace of its own (LaunchSpec.id_mapping).
    user_namespace: bool = False
    # Its containers cannot join a pod's user namespace (LXC enters a shared user namespace
    # before the pod's network namespace): a pod on it gets none, unless it asks (refused).
    no_pod_user_namespace: bool = False
    # Its `wait` returns once the workload's output is all written (the CRI log, the sandbox's
    # files), not only at its cleanup: the CRI shows such a container EXITED at its exit.
    output_complete_at_exit: bool = False


@dataclass(frozen=True)
class Fingerprint:
    name: str
    version: str
    healthy: bool
    message: str = ""
    capabilities: Capabilities = field(default_factory=Capabilities)
    # What a workload gets by default here (adapter/core/confinement.py's summary, as enforced).
    confinement: str = ""


# Statistics use Mesos' ResourceStatistics field names as keys, so every producer (isolators,
# drivers) can fill the part it knows and the core converts once.
Statistics = dict[str, float | int]


def is_valid_container_id(value: str) -> bool:
    return CONTAINER_ID_PATTERN.fullmatch(value) is not None


def is_finite_non_negative(value: float) -> bool:
    return math.isfinite(value) and value >= 0
