"""One launch as containerizer-supervisor reads it: LaunchConfig (with its Filesystem and
Enforcement), every option checked and encoded for the supervisor's config pipe.

The encoding is NUL-terminated strings, except the seccomp program, a blob after
`--seccomp LEN`; a value that cannot be encoded, or a request the supervisor must refuse (a
sysctl of the host's namespaces, a namespace joined twice), is InvalidArgument naming its field.
client.py writes the bytes into the pipe and reads the handshake.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from adapter.core.confinement import Confinement, capability_mask
from adapter.core.errors import InvalidArgument
from adapter.core.model import HOST_NAMESPACE, PROPAGATIONS, Identity, IdMapping, Mount

# Namespaces the supervisor joins (--ns) instead of making its own; net goes by `netns`.
JOINABLE_NAMESPACES = ("ipc", "uts", "pid", "user")
SYSCTL_KEY = re.compile(r"[a-z0-9_]+(\.[a-z0-9_*-]+)+")
# Sysctls of the ipc namespace (kernel.shm*, kernel.msg*, kernel.sem, fs.mqueue.*) and of the
# network namespace (net.*): the only ones a container may set, in namespaces not the host's.
IPC_SYSCTL = re.compile(r"kernel\.(shm.*|msg.*|sem)|fs\.mqueue\..+")
NET_SYSCTL = re.compile(r"net\..+")
OUTPUT_FILES_LIMIT = 100  # the rotated files a stream may keep (the supervisor's limit)


@dataclass(frozen=True)
class Filesystem:
    """What the workload sees as its files: by default the host's, else an overlay of a
    read-only image rootfs (rootfs_lower) with upper/ and work/ under rootfs_dir, mounted at
    rootfs_dir/merged inside the container's mount namespace (read-only with read_only_root);
    plus host paths bound in. `mounts` (CRI volumes) may propagate: rslave lets host mounts
    under the source reach the container, rshared also the container's reach the host."""

    rootfs_lower: str | None = None
    rootfs_dir: str | None = None
    binds: tuple[tuple[str, str], ...] = ()  # (host path, absolute path inside)
    read_only_binds: tuple[tuple[str, str], ...] = ()
    mounts: tuple[Mount, ...] = ()
    read_only_root: bool = False

    def options(self) -> list[str]:
        options = []
        if self.rootfs_lower is not None and self.rootfs_dir is not None:
            options += ["--rootfs-lower", self.rootfs_lower, "--rootfs-dir", self.rootfs_dir]
            options += ["--read-only-root"] if self.read_only_root else []
        elif self.read_only_root:
            raise InvalidArgument("linux.read_only_rootfs", "needs an image")
        for source, target in self.binds:
            options += ["--bind", source, "--to", target]
        for source, target in self.read_only_binds:
            options += ["--bind", source, "--to", target, "--read-only"]
        for mount in self.mounts:
            options += _mount_options(mount)
        return options


def _mount_options(mount: Mount) -> list[str]:
    if mount.propagation not in PROPAGATIONS:
        raise InvalidArgument(
            "linux.mounts", f"propagation {mount.propagation!r} is not one of {PROPAGATIONS}"
        )
    if not os.path.isabs(mount.container_path):
        raise InvalidArgument("linux.mounts", f"{mount.container_path!r} is not absolute")
    options = ["--bind", mount.host_path, "--to", mount.container_path]
    options += ["--read-only"] if mount.read_only else []
    if mount.propagation != "private":
        options += ["--propagation", mount.propagation]
    return options


@dataclass(frozen=True)
class Enforcement:
    """What the supervisor enforces on one workload (adapter/core/confinement.py's policy as its
    options). `privileged` turns all of it off but a requested no_new_privs."""

    privileged: bool = False
    capabilities: int = 0  # the bounding set, and root's effective/permitted/inheritable sets
    no_new_privileges: bool = False  # for root too (always set for any other user)
    seccomp_bpf: bytes = b""  # adapter/supervisor/seccomp.py's program; b"": no filter
    masked_paths: tuple[str, ...] = ()
    readonly_paths: tuple[str, ...] = ()
    cgroup_namespace: bool = False  # with a read-only cgroupfs; needs an image rootfs

    @classmethod
    def of(
        cls,
        policy: Confinement,
        seccomp_bpf: bytes,
        *,
        own_root: bool,
        cgroup_namespace: bool = False,
        readonly_paths: tuple[str, ...] = (),
    ) -> Enforcement:
        """The enforcement of `policy`. Masked and read-only paths need a root filesystem of
        the container's own (a workload on the host's keeps the host's view, as in Mesos)."""
        if policy.privileged:
            return cls(privileged=True, no_new_privileges=policy.no_new_privileges)
        return cls(
            capabilities=capability_mask(policy.capabilities),
            no_new_privileges=policy.no_new_privileges,
            seccomp_bpf=seccomp_bpf,
            masked_paths=policy.masked_paths if own_root else (),
            readonly_paths=(*policy.readonly_paths, *readonly_paths) if own_root else (),
            cgroup_namespace=cgroup_namespace,
        )

    def parts(self) -> list[str | bytes]:
        """Options as strings, the seccomp program as its raw bytes."""
        if self.privileged:
            return ["--privileged", *(["--no-new-privs"] if self.no_new_privileges else [])]
        parts: list[str | bytes] = ["--capabilities", hex(self.capabilities)]
        parts += ["--seccomp", str(len(self.seccomp_bpf)), self.seccomp_bpf]
        parts += ["--no-new-privs"] if self.no_new_privileges else []
        for path in self.masked_paths:
            parts += ["--masked-path", path]
        for path in self.readonly_paths:
            parts += ["--readonly-path", path]
        return [*parts, *(["--cgroupns"] if self.cgroup_namespace else [])]


@dataclass(frozen=True)
class LaunchConfig:
    """One launch, as the supervisor reads it. Paths are the supervisor's view: the host's for
    the native runtime, the container's for LXC (where the supervisor is the container's init).
    The workload's stdout and stderr are `sandbox`/stdout and `sandbox`/stderr, or with
    `log_file` (CRI) records in that file, which the supervisor writes (reopen_log rotates).
    `attach_socket` (in a directory of root's, 0700) lets clients attach to the workload's stdio
    (adapter/supervisor/attach.py); the supervisor then writes the sandbox's files (or the log)
    itself. With `stdin` the workload's stdin stays open for the clients (ended by the first
    client's end of input with `stdin_once`), else it is /dev/null; `tty` makes a pty its
    stdio. Without `log_file`, the sandbox's files rotate at `output_max_size` bytes (0: never),
    each stream keeping `output_max_files` files (the node's log_max_size, log_max_files); the
    supervisor then writes them itself."""

    status_file: str
    sandbox: str
    argv: Sequence[str]
    enforcement: Enforcement
    env: Sequence[tuple[str, str]] = ()
    cgroup_procs: Sequence[str] = ()
    cwd: str | None = None
    identity: Identity | None = None  # None: root, with the supervisor's groups
    hostname: str | None = None  # for a UTS namespace of the container's own only
    namespaces: bool = True
    netns: str | None = None
    filesystem: Filesystem | None = None
    # (kind, path to join or HOST_NAMESPACE) for ipc, uts and pid: a pod's, or the host's
    namespaces_joined: tuple[tuple[str, str], ...] = ()
    sysctls: tuple[tuple[str, str], ...] = ()  # namespaced keys only
    log_file: str | None = None
    attach_socket: str | None = None
    stdin: bool = False
    stdin_once: bool = False
    tty: bool = False
    output_max_size: int = 0
    output_max_files: int = 1
    # A user namespace of the container's own mapping this host range (--userns); a pod's is
    # joined through namespaces_joined ("user", path) instead.
    id_mapping: IdMapping | None = None

    def encode(self) -> bytes:
        """The bytes for the supervisor's config pipe: NUL-terminated strings, except the blob
        after `--seccomp LEN`. Paths are made absolute because the supervisor leaves our cwd.
        A string with a NUL could not be told apart from two: InvalidArgument naming it."""
        if not self.argv:
            raise InvalidArgument("command", "the workload command is empty")
        parts: list[tuple[str | bytes, str]] = []
        for key, value in environment_with_home(self.env, self.identity):
            if not key or "=" in key:
                raise InvalidArgument("command.environment", f"name {key!r} is empty or has '='")
            parts += [("--env", ""), (f"{key}={value}", "command.environment")]
        options: list[tuple[str, str | None, str]] = [
            ("--status-file", os.path.abspath(self.status_file), "status_file"),
            ("--sandbox", os.path.abspath(self.sandbox), "sandbox"),
            ("--cwd", self.cwd, "command.working_dir"),
            ("--hostname", self.hostname, "container_id"),
            ("--netns", self.netns, "network"),
            ("--log-file", os.path.abspath(self.log_file) if self.log_file else None, "log_path"),
        ]
        options += [("--cgroup-procs", path, "resources") for path in self.cgroup_procs]
        for option, given, field in options:
            if given is not None:
                parts += [(option, ""), (given, field)]
        parts += [("--no-namespaces", "")] if not self.namespaces else []
        parts += self._attach_parts()
        parts += self._rotation_parts()
        parts += self._linux_parts()
        if self.filesystem is not None:
            parts += [(option, "container.image") for option in self.filesystem.options()]
        parts += [(part, "confinement") for part in self.enforcement.parts()]
        parts += [("--", ""), *((word, "command.argv") for word in self.argv)]
        return _serialize(parts)

    def _attach_parts(self) -> list[tuple[str | bytes, str]]:
        """--attach-socket, --stdin, --stdin-once and --tty, each with what it needs."""
        if self.attach_socket is None:
            for given, field in ((self.stdin, "linux.stdin"), (self.tty, "linux.tty")):
                if given:
                    raise InvalidArgument(field, "needs an attach socket")
            return []
        if self.stdin_once and not self.stdin:
            raise InvalidArgument("linux.stdin_once", "needs linux.stdin")
        parts: list[tuple[str | bytes, str]] = [
            ("--attach-socket", ""),
            (os.path.abspath(self.attach_socket), "attach_socket"),
        ]
        flags = (("--stdin", self.stdin), ("--stdin-once", self.stdin_once), ("--tty", self.tty))
        return parts + [(flag, "") for flag, given in flags if given]

    def _rotation_parts(self) -> list[tuple[str | bytes, str]]:
        """--output-max-size and --output-max-files; none with a CRI log (the kubelet rotates
        it) or a size of 0."""
        if self.output_max_size < 0:
            raise InvalidArgument("log_max_size", f"{self.output_max_size} is below 0")
        if not 1 <= self.output_max_files <= OUTPUT_FILES_LIMIT:
            raise InvalidArgument(
                "log_max_files", f"{self.output_max_files} is not from 1 to {OUTPUT_FILES_LIMIT}"
            )
        if self.log_file is not None or self.output_max_size == 0:
            return []
        words = ["--output-max-size", str(self.output_max_size)]
        words += ["--output-max-files", str(self.output_max_files)]
        return [(word, "") for word in words]

    def _linux_parts(self) -> list[tuple[str | bytes, str]]:
        """--uid --gid --groups, --ns and --sysctl, each checked."""
        parts: list[tuple[str | bytes, str]] = []
        if self.identity is not None:
            ids = self.identity
            words = ["--uid", str(ids.uid), "--gid", str(ids.gid), "--groups"]
            parts += [(word, "command.user") for word in words]
            parts += [(",".join(str(gid) for gid in ids.groups), "command.user")]
        joined = _checked_namespaces(self.namespaces_joined, self.namespaces)
        for kind, value in joined.items():
            parts += [("--ns", ""), (f"{kind}={value}", "linux.namespaces")]
        if self.id_mapping is not None:
            ranges = self.id_mapping
            mapping = f"{ranges.uid_start}:{ranges.gid_start}:{ranges.size}"
            parts += [("--userns", ""), (mapping, "user_namespace")]
        host_ipc = not self.namespaces or joined.get("ipc") == HOST_NAMESPACE
        own_network = self.namespaces and self.netns is not None
        for key, value in self.sysctls:
            check_sysctl(key, host_ipc=host_ipc, own_network=own_network)
            parts += [("--sysctl", ""), (f"{key}={value}", "linux.sysctls")]
        return parts


def _checked_namespaces(joined: Sequence[tuple[str, str]], namespaces: bool) -> dict[str, str]:
    """kind -> path or HOST_NAMESPACE, each kind joinable and named once."""
    field = "linux.namespaces"
    checked: dict[str, str] = {}
    for kind, value in joined:
        if kind not in JOINABLE_NAMESPACES:
            raise InvalidArgument(field, f"{kind!r} is not one of {JOINABLE_NAMESPACES}")
        if kind in checked:
            raise InvalidArgument(field, f"{kind!r} is named twice")
        if value != HOST_NAMESPACE and not os.path.isabs(value):
            raise InvalidArgument(field, f"{kind}: {value!r} is neither an absolute path nor host")
        if not namespaces:
            raise InvalidArgument(field, f"{kind}: joining needs namespaces")
        checked[kind] = value
    return checked


def check_sysctl(key: str, *, host_ipc: bool, own_network: bool) -> None:
    """Only a namespaced key, and only in a namespace that is not the host's: a write to any
    other would change the node for every container on it."""
    field = "linux.sysctls"
    if SYSCTL_KEY.fullmatch(key) is None or ".." in key:
        raise InvalidArgument(field, f"{key!r} is not a sysctl name")
    if IPC_SYSCTL.fullmatch(key):
        if host_ipc:
            raise InvalidArgument(field, f"{key!r} would change the host's ipc namespace")
    elif NET_SYSCTL.fullmatch(key):
        if not own_network:
            raise InvalidArgument(field, f"{key!r} would change the host's network namespace")
    else:
        raise InvalidArgument(
            field,
            f"{key!r} is not namespaced: only kernel.shm*, kernel.msg*, kernel.sem, fs.mqueue.*"
            " and net.* may be set",
        )


def environment_with_home(
    env: Sequence[tuple[str, str]], identity: Identity | None
) -> list[tuple[str, str]]:
    """`env` with HOME from the identity when it sets none: a launch's and an exec's alike."""
    environment = list(env)
    home = identity.home if identity is not None else ""
    if home and all(key != "HOME" for key, _ in environment):
        environment.append(("HOME", home))
    return environment


def _serialize(parts: Sequence[tuple[str | bytes, str]]) -> bytes:
    encoded = bytearray()
    for part, field in parts:
        if isinstance(part, bytes):  # the seccomp program, counted by the string before it
            encoded += part
            continue
        if "\0" in part:
            raise InvalidArgument(field or "supervisor", f"{part[:64]!r} contains a NUL byte")
        encoded += part.encode("utf-8", "surrogateescape") + b"\0"
    return bytes(encoded)
