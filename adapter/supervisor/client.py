"""The client of containerizer-supervisor, the C program that confines and reaps each workload.

The service must survive `kill -9` while its containers keep running, and a Python process per
container would blow the 3 MiB-per-container budget. So every workload is forked by a small
supervisor (supervisor/containerizer-supervisor.c) that waits for it and writes its exit status
atomically to a status file. A restarted service finds the supervisor again from the
SupervisorHandle it checkpointed (plain JSON), waits for it through a pidfd and reads the file.
The native runtime spawns the supervisor itself; the LXC runtime runs its static build as the
container's init. Both build its configuration and read its handshake here.

A pid alone is never trusted: pids are reused, so a handle carries the start time (field 22 of
/proc/PID/stat) of the supervisor and of the workload, and nothing is signalled or waited for
unless that start time still matches.

Configuration: the supervisor's argv is only `--config-fd 0`. Its options (NUL-separated
strings, the seccomp program as a length-prefixed blob; see LaunchConfig.encode) come through a
pipe on its stdin that we write and close, because a command line is readable by every local
user through /proc/PID/cmdline and the workload's argv and environment hold secrets.

Handshake (the supervisor's stdout, one line, read here during spawn):
    ok <child_pid> <child_start_time> <supervisor_start_time>
    error <step>: <reason>
Status file: see adapter/supervisor/processes.py, which reads it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapter.core.confinement import Confinement, capability_mask
from adapter.core.errors import (
    ContainerizerError,
    FailedPrecondition,
    InvalidArgument,
    LaunchFailed,
)
from adapter.core.model import HOST_NAMESPACE, PROPAGATIONS, Identity, IdMapping, Mount
from adapter.supervisor.children import Child
from adapter.supervisor.processes import ExitStatus, ProcessRef, read_status

log = logging.getLogger(__name__)

SUPERVISOR_NAME = "containerizer-supervisor"
HANDSHAKE_TIMEOUT_S = 10.0
CONFIG_ARGUMENTS = ("--config-fd", "0")
# Steps of a failed launch that the request caused (a binary, user or working directory that is
# not there; a sandbox the workload tampered with): the caller's to fix, not the node's.
REQUEST_STEPS = frozenset({"exec", "user", "cwd", "sandbox", "stdout", "stderr"})
# Namespaces the supervisor joins (--ns) instead of making its own; net goes by `netns`.
JOINABLE_NAMESPACES = ("ipc", "uts", "pid", "user")
SYSCTL_KEY = re.compile(r"[a-z0-9_]+(\.[a-z0-9_*-]+)+")
# Sysctls of the ipc namespace (kernel.shm*, kernel.msg*, kernel.sem, fs.mqueue.*) and of the
# network namespace (net.*): the only ones a container may set, in namespaces not the host's.
IPC_SYSCTL = re.compile(r"kernel\.(shm.*|msg.*|sem)|fs\.mqueue\..+")
NET_SYSCTL = re.compile(r"net\..+")
OUTPUT_FILES_LIMIT = 100  # the rotated files a stream may keep (the supervisor's limit)


class SpawnError(LaunchFailed):
    """The supervisor did not start the workload. `step` names where it failed (args, exec,
    user, cgroup, cwd, stdout, namespaces, handshake, ...) and `reason` says why."""

    def __init__(self, message: str, *, step: str = "supervisor", reason: str = "") -> None:
        super().__init__(message)
        self.step = step
        self.reason = reason or message


def launch_error(container_id: str, error: SpawnError) -> ContainerizerError:
    """What a driver raises for a failed spawn: FailedPrecondition when the request caused it
    (the launch still ends LAUNCH_FAILED), LaunchFailed (internal) otherwise."""
    message = f"launch of {container_id!r} failed: {error}"
    if error.step in REQUEST_STEPS:
        return FailedPrecondition(message)
    return LaunchFailed(message)


@dataclass(frozen=True)
class SupervisorHandle:
    """Everything needed to find one container's supervisor again after a service restart."""

    supervisor_pid: int
    supervisor_start_time: int  # /proc/PID/stat field 22, clock ticks since boot
    child_pid: int  # host pid of the workload (pid 1 of its pid namespace)
    child_start_time: int
    status_file: str

    def to_json(self) -> dict[str, Any]:
        # Field by field: asdict's deep copy is slow, and this is on every launch's path.
        return {
            "supervisor_pid": self.supervisor_pid,
            "supervisor_start_time": self.supervisor_start_time,
            "child_pid": self.child_pid,
            "child_start_time": self.child_start_time,
            "status_file": self.status_file,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SupervisorHandle:
        """Rebuild from `to_json` output; a checkpoint that does not fit raises ValueError
        naming the key, rather than producing a handle that signals the wrong process."""
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            value = data.get(field.name)
            expected: type = str if field.name == "status_file" else int
            if not isinstance(value, expected) or isinstance(value, bool):
                raise ValueError(
                    f"supervisor handle: {field.name!r} must be {expected.__name__}, got {value!r}"
                )
            values[field.name] = value
        return cls(**values)


# --- processes, by pid and start time -----------------------------------------------------------


def is_alive(handle: SupervisorHandle) -> bool:
    """Whether the handle's supervisor still runs (a reused pid is somebody else)."""
    return ProcessRef(handle.supervisor_pid, handle.supervisor_start_time).is_alive()


def kill(handle: SupervisorHandle, signo: int) -> None:
    """Send `signo` to the container's init (which forwards it to the workload) if it is still
    the process the handle names; else no-op."""
    ProcessRef(handle.child_pid, handle.child_start_time).send(signo)


# How long a supervisor may take to open its CRI log again after SIGUSR1.
REOPEN_TIMEOUT_S = 5.0


async def log_reopened(path: str, timeout: float = REOPEN_TIMEOUT_S) -> bool:
    """Whether `path` exists again (itself: a link is not followed) within `timeout` seconds:
    the kubelet reads the new file as soon as ReopenContainerLog returns."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while not os.path.lexists(path):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)
    return True


def reopen_log(handle: SupervisorHandle) -> bool:
    """Have the supervisor of a launch with `log_file` open a new file at its path (the kubelet
    renamed the old one: rotation). False if that supervisor is gone."""
    return ProcessRef(handle.supervisor_pid, handle.supervisor_start_time).send(signal.SIGUSR1)


# --- locating the binary --------------------------------------------------------------------------


def find_supervisor(configured: str | None) -> str:
    """The supervisor binary: the configured path, else the one installed next to the Python
    running us (the venv's bin dir, where the install step builds it), else on $PATH."""
    if configured:
        if os.access(configured, os.X_OK) and os.path.isfile(configured):
            return configured
        raise FailedPrecondition(
            f"supervisor binary {configured!r} (configured) does not exist or is not executable"
        )
    beside_python = os.path.join(os.path.dirname(sys.executable), SUPERVISOR_NAME)
    if os.access(beside_python, os.X_OK) and os.path.isfile(beside_python):
        return beside_python
    on_path = shutil.which(SUPERVISOR_NAME)
    if on_path is not None:
        return on_path
    raise FailedPrecondition(
        f"{SUPERVISOR_NAME} not found: looked at {beside_python} and on PATH "
        f"({os.environ.get('PATH', '')}); build it with "
        f"`make -C supervisor BIN={beside_python}` or configure its path"
    )


# --- the configuration ----------------------------------------------------------------------------


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
        for key, value in self._environment():
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

    def _environment(self) -> list[tuple[str, str]]:
        """The workload's environment, with HOME from the identity when it sets none."""
        environment = list(self.env)
        home = self.identity.home if self.identity is not None else ""
        if home and all(key != "HOME" for key, _ in environment):
            environment.append(("HOME", home))
        return environment

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
            _check_sysctl(key, host_ipc=host_ipc, own_network=own_network)
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


def _check_sysctl(key: str, *, host_ipc: bool, own_network: bool) -> None:
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


# --- the configuration pipe and the handshake -----------------------------------------------------


def start_configured(command: Sequence[str], errors_log: Path | None = None) -> tuple[Child, int]:
    """Start `command` (the supervisor, or lxc-start running it) with a pipe as its stdin;
    return it and the pipe's write end, for `handshake`. The write end is close-on-exec so
    that no other child inherits it and keeps the pipe from reaching EOF."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        return Child.start(list(command), errors_log, stdin=read_end), write_end
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _feed(fd: int, payload: bytes) -> None:
    """Write `payload` into the pipe and close it. A reader that stopped reading has failed,
    and says why in its handshake (or by exiting): not an error here."""
    os.set_blocking(fd, False)
    loop = asyncio.get_running_loop()
    remaining = memoryview(payload)
    try:
        while remaining:
            try:
                remaining = remaining[os.write(fd, remaining) :]
            except BlockingIOError:
                writable: asyncio.Future[None] = loop.create_future()
                loop.add_writer(fd, _resolve, writable)
                try:
                    await writable
                finally:
                    loop.remove_writer(fd)
    except BrokenPipeError:
        pass
    finally:
        os.close(fd)


async def handshake(process: Child, config_fd: int, payload: bytes) -> bytes:
    """Feed the configuration, then read the one handshake line (b"" at EOF). The caller
    bounds the wait."""
    await _feed(config_fd, payload)
    return await process.readline()


def parse_handshake(line: bytes, workload: str) -> tuple[int, int, int]:
    """(child pid, child start time, supervisor start time) from an `ok` line; SpawnError from an
    `error <step>: <reason>` line or anything else."""
    text = line.decode("utf-8", "replace").rstrip("\n")
    if text.startswith("error "):
        step, _, reason = text[len("error ") :].partition(": ")
        raise SpawnError(f"launching {workload!r}: {step}: {reason}", step=step, reason=reason)
    words = text.split()
    if len(words) == 4 and words[0] == "ok" and all(word.isdigit() for word in words[1:]):
        return int(words[1]), int(words[2]), int(words[3])
    raise SpawnError(
        f"launching {workload!r}: unexpected supervisor handshake {text[:200]!r}", step="handshake"
    )


# --- spawning and waiting -------------------------------------------------------------------------


async def _abandon(process: Child) -> None:
    """Kill a supervisor whose launch went wrong, with the workload it may have forked (both in
    the supervisor's own process group), and reap it."""
    process.kill_group()
    await process.wait()


async def _wait_foreign(handle: SupervisorHandle) -> None:
    """Wait for a supervisor that is not our child (spawned before a restart)."""
    await ProcessRef(handle.supervisor_pid, handle.supervisor_start_time).wait()


class Supervisors:
    """The supervisors this service spawned and has not yet waited for, by (pid, start time).

    Being our children, they must be reaped by us, through the Child that started them; a
    supervisor spawned before a restart is not our child and is waited for by pid and start
    time. One registry per service (adapter/core/services.py), shared by whatever spawns.
    """

    def __init__(self) -> None:
        self._children: dict[tuple[int, int], Child] = {}

    async def spawn(
        self,
        binary: str,
        config: LaunchConfig,
        *,
        handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
    ) -> SupervisorHandle:
        """Start a supervisor for `config` and return once the workload has exec'd.

        Raises SpawnError naming the failed step; by then the supervisor has been reaped and no
        status file was written. The supervisor runs in its own session, so it outlives us.
        """
        payload = config.encode()
        try:
            process, config_fd = start_configured([binary, *CONFIG_ARGUMENTS])
        except LaunchFailed as exc:
            raise SpawnError(str(exc), step="supervisor") from exc
        child_pid, child_start, supervisor_start = await _read_handshake(
            process, config_fd, payload, config.argv[0], handshake_timeout
        )
        self._children[(process.pid, supervisor_start)] = process
        return SupervisorHandle(
            supervisor_pid=process.pid,
            supervisor_start_time=supervisor_start,
            child_pid=child_pid,
            child_start_time=child_start,
            status_file=os.path.abspath(config.status_file),
        )

    async def wait_exit(self, handle: SupervisorHandle) -> ExitStatus | None:
        """Resolve once the handle's supervisor has exited, whether or not it is our child, and
        return what it recorded; None means it recorded nothing (the caller reports LOST)."""
        key = (handle.supervisor_pid, handle.supervisor_start_time)
        process = self._children.get(key)
        if process is not None:
            code = await process.wait()
            self._children.pop(key, None)
            if code != 0:
                log.warning("supervisor %d exited with status %d", handle.supervisor_pid, code)
        else:
            await _wait_foreign(handle)
        return read_status(handle.status_file)


async def _read_handshake(
    process: Child, config_fd: int, payload: bytes, workload: str, timeout: float
) -> tuple[int, int, int]:
    """The parsed `ok` line. On anything else the supervisor (and whatever it forked) is killed
    and reaped before SpawnError is raised; a cancelled spawn leaves nothing behind either."""
    try:
        async with asyncio.timeout(timeout):  # not wait_for: no task of its own per launch
            line = await handshake(process, config_fd, payload)
    except TimeoutError:
        await _abandon(process)
        raise SpawnError(
            f"launching {workload!r}: supervisor did not answer within {timeout} s",
            step="handshake",
        ) from None
    except BaseException:
        await _abandon(process)
        raise
    if not line:
        code = await process.wait()
        raise SpawnError(
            f"launching {workload!r}: supervisor exited with status {code} before the handshake",
            step="supervisor",
        )
    try:
        parsed = parse_handshake(line, workload)
    except SpawnError as exc:
        if exc.step == "handshake":
            await _abandon(process)
        else:
            await process.wait()  # it exits by itself after an error line
        raise
    process.close_stdout()  # the supervisor writes nothing after the handshake
    return parsed
