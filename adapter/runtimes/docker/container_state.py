"""Our Docker containers as dockerd's inspect shows them: their exit as ours, their end, the
sandbox they mount; stopping one (only one labelled as ours), and removing its cgroups after;
and Tracked, the driver's record of one it watches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal as signals
from dataclasses import dataclass, field
from pathlib import Path

from adapter.core.errors import FailedPrecondition, NotFound
from adapter.core.model import Exit
from adapter.runtimes.docker import handle as names
from adapter.runtimes.docker.client import DockerEngine, Inspect
from adapter.runtimes.docker.handle import DockerHandle
from adapter.runtimes.docker.output import OutputTarget
from isolators.cgroups.hierarchy import Hierarchies
from isolators.cgroups.pods import pod_dirs

log = logging.getLogger(__name__)

STOP_TIMEOUT_SECONDS = 30.0
SIGNAL_MAX = int(signals.SIGRTMAX)


@dataclass
class Tracked:
    """A container this driver watches; `died` is set on each `die` event (or stream gap)."""

    handle: DockerHandle
    sandbox: Path
    died: asyncio.Event = field(default_factory=asyncio.Event)
    pid: int = 0  # the init's host pid at launch; 0 after a recovery (nobody asks then)

    def output(self) -> OutputTarget:
        handle = self.handle
        return OutputTarget(
            handle.docker_id,
            self.sandbox,
            handle.stdout_offset,
            handle.stderr_offset,
            handle.log_path,
        )


def exit_from_inspect(inspect: Inspect) -> Exit:
    """Docker's final state of a container -> our Exit (driver.py's docstring says why 128+n
    is signal n)."""
    state = inspect["State"]
    code = int(state.get("ExitCode", 0))
    signal = code - 128 if 128 < code <= 128 + SIGNAL_MAX else None
    limitation, limitation_message = None, ""
    if state.get("OOMKilled"):
        limit = inspect.get("HostConfig", {}).get("Memory") or "unknown"
        limitation = "mem"
        limitation_message = f"Memory limit exceeded: limit {limit} bytes (Docker: OOMKilled)"
    return Exit(
        exit_code=None if signal is not None else code,
        signal=signal,
        limitation=limitation,
        limitation_message=limitation_message,
        message=str(state.get("Error") or ""),
    )


def has_ended(inspect: Inspect) -> bool:
    return inspect["State"].get("Status") in ("exited", "dead")


def sandbox_of(inspect: Inspect) -> Path | None:
    """The host directory mounted at /mnt/mesos/sandbox: the container says where its output
    goes, so cleanup needs nothing but the container, even after our restart."""
    for mount in inspect.get("Mounts") or []:
        if mount.get("Destination") == names.SANDBOX_MOUNT and mount.get("Source"):
            return Path(mount["Source"])
    return None


async def stop_owned(engine: DockerEngine, owner: str, target: str) -> Inspect | None:
    """Kill a container of `owner`'s and wait until it is stopped; its final inspect, or None
    when there is no such container."""
    try:
        inspect = await engine.inspect(target)
    except NotFound:
        return None
    labels = inspect.get("Config", {}).get("Labels") or {}
    if labels.get(names.LABEL_OWNER) != owner:
        raise FailedPrecondition(f"docker container {target!r} is not ours; not removing it")
    if not has_ended(inspect):
        docker_id = str(inspect["Id"])
        with contextlib.suppress(FailedPrecondition):
            await engine.kill(docker_id, int(signals.SIGKILL))
        await engine.wait_stopped(docker_id, STOP_TIMEOUT_SECONDS)
        inspect = await engine.inspect(docker_id)
    return inspect


async def remove_cgroups(hierarchies: Hierarchies, container_id: str) -> None:
    """Docker removes its leaf cgroup asynchronously to the API reply: retry briefly."""
    relative = hierarchies.relative(container_id)
    for _ in range(50):
        if not names.remove_parent_cgroups(relative):
            pod = hierarchies.pods.get(container_id)
            if pod is not None:  # the core keeps the pod's cgroup where it limits it
                names.remove_pod_directories(relative, set(pod_dirs(hierarchies, pod)))
            return
        await asyncio.sleep(0.02)
    log.warning("docker: cgroups of %s are still busy; recovery will retry", container_id)
