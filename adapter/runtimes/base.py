"""The Runtime protocol (also named Driver): one implementation per runtime, small and async.

A driver owns only the translation to its runtime. Validation, bookkeeping, checkpointing and the
lifecycle state machine live once, in core/containerizer.py. Methods raise adapter.core.errors
classes only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from adapter.core.model import ExecResult, Exit, Fingerprint, LaunchSpec, Resources, Statistics

# What a driver needs to find a container again after a restart of the service. It is
# checkpointed by the core as JSON, so it holds only JSON types.
Handle = dict[str, Any]


@dataclass(frozen=True)
class Checkpointed:
    """A container the core had checkpointed for this driver and has not seen terminate."""

    spec: LaunchSpec
    handle: Handle


@dataclass(frozen=True)
class Launched:
    handle: Handle
    pid: int  # host pid of the container's init process; 0 when the runtime hides it
    warnings: tuple[str, ...] = ()
    ip_address: str = ""  # the container's own address (bridge networking); "" if none


class Runtime(Protocol):
    """Destroy is the core's, in Mesos' order: kill_all, then wait for the exit, then cleanup.
    So a runtime keeps a container's record until cleanup, and needs no cache of exits."""

    name: str

    async def fingerprint(self) -> Fingerprint:
        """Version, health and capabilities; never raises."""
        ...

    async def start(self, spec: LaunchSpec) -> Launched:
        """Start the container and return once its workload runs. A failure raises (LaunchFailed
        or a more specific error) and leaves the release of what was made to the core, which
        then calls kill_all and cleanup."""
        ...

    async def wait(self, container_id: str) -> Exit:
        """Resolve once the container's init process has ended. Safe to call repeatedly."""
        ...

    async def signal(self, container_id: str, signal: int) -> None: ...

    async def kill_all(self, container_id: str) -> None:
        """Kill every process of the container. Idempotent; a container that has ended, was
        only half started or is unknown is no error."""
        ...

    async def cleanup(self, container_id: str) -> None:
        """Release everything the container holds and forget it. Idempotent, tolerates a
        half-started container; called only after wait resolved, after a failed start, or when
        the exit did not come within the core's bound after kill_all."""
        ...

    async def update(self, container_id: str, resources: Resources) -> None:
        """Apply the complete new resources (the old ones merged with the change)."""
        ...

    async def usage(self, container_id: str) -> Statistics: ...

    async def recover(self, checkpointed: list[Checkpointed], known_ids: set[str]) -> None:
        """Re-attach to `checkpointed` (so wait/usage/kill_all/cleanup work again) and remove
        what this runtime holds that `known_ids` (every checkpointed id, of every runtime) does
        not name."""
        ...

    async def close(self) -> None:
        """Release connections; running containers keep running."""
        ...


# Optional capabilities: a runtime declares one by implementing it; the core checks with
# isinstance and says clearly which runtime lacks it.


@runtime_checkable
class HoldsWithoutProcess(Protocol):
    def holds_without_process(self, spec: LaunchSpec) -> bool:
        """Whether this launch of a pod's holder (`linux.hold_only`) keeps the pod's namespaces
        without a process: then nothing of it runs, and it needs no sandbox."""
        ...


def holds_without_process(driver: Runtime, spec: LaunchSpec) -> bool:
    """Whether this launch runs nothing: a pod's holder whose runtime pins its namespaces."""
    return (
        spec.linux.hold_only
        and isinstance(driver, HoldsWithoutProcess)
        and driver.holds_without_process(spec)
    )


@runtime_checkable
class Executes(Protocol):
    async def exec_sync(
        self, container_id: str, argv: tuple[str, ...], timeout: float | None
    ) -> ExecResult:
        """Run argv inside the running container (its namespaces, cgroups and confinement) to
        its end, or until `timeout` seconds pass (then it is killed and timed_out set)."""
        ...


class ExecSession(Protocol):
    """A command running in a container with its input and output open (the streaming Exec).
    With a terminal, stdout carries everything and stderr is empty."""

    @property
    def tty(self) -> bool: ...

    async def write(self, data: bytes) -> None: ...

    def close_stdin(self) -> None: ...

    async def read(self, stream: int = 1) -> bytes:
        """The next chunk of stdout (1) or stderr (2); b"" at its end."""
        ...

    def resize(self, columns: int, rows: int) -> None: ...

    async def wait(self) -> int:
        """The exit code; raises (ExecNotStarted) when the command never ran."""
        ...

    def kill(self) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class StreamsExec(Protocol):
    async def exec_stream(
        self, container_id: str, argv: tuple[str, ...], *, tty: bool
    ) -> ExecSession:
        """Start argv inside the running container, as exec_sync does, with its input and
        output left open to the caller."""
        ...


class AttachSession(Protocol):
    """An attachment to a container's first process: its stdin (when the launch kept it
    open), stdout and stderr, as they come from now on. With a terminal, stdout carries
    everything and stderr is empty."""

    @property
    def tty(self) -> bool: ...

    async def write(self, data: bytes) -> None: ...

    def close_stdin(self) -> None:
        """This attachment's input has ended (with stdin_once, the workload's too)."""
        ...

    async def read(self, stream: int = 1) -> bytes:
        """The next chunk of stdout (1) or stderr (2); b"" at its end."""
        ...

    def resize(self, columns: int, rows: int) -> None: ...

    async def wait(self) -> None:
        """Until the container's output has ended."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class Attaches(Protocol):
    async def attach(
        self, container_id: str, *, stdout: bool = True, stderr: bool = True
    ) -> AttachSession:
        """Attach to the running container's first process; the streams not asked for are
        dropped."""
        ...


@runtime_checkable
class WritableLayers(Protocol):
    async def writable_dirs(self, container_id: str) -> tuple[str, ...]:
        """The host directories a container writes beside its sandbox (its image's writable
        layer), whose parents it cannot change; () when it has none. Asked once the container
        started, and again after a restart. A runtime that shows them has its disk requests
        enforced by the core's disk isolator."""
        ...


@runtime_checkable
class ReopensLogs(Protocol):
    async def reopen_log(self, container_id: str) -> None:
        """Reopen the container's CRI log file by its path (after the kubelet renamed it)."""
        ...


Driver = Runtime  # the name the registry and the services use
