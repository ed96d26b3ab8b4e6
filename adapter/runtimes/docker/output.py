"""A docker container's output in its sandbox's `stdout` and `stderr` as it comes, complete at
its end, resumed after our restart without a line twice.

Docker's json-file log driver keeps a container's whole output until the container is removed.
While the container runs, a follower per container reads it through the Engine API (a followed
logs stream, read by the event loop: no thread is held per container, see streams.py) and appends
each frame to the sandbox file of its stream; a stream that breaks (dockerd restarting) is
followed again. At cleanup, after the container stopped, the follower is stopped and the rest of
the log is copied once more: dockerd 20.10 may end a followed stream before the container's last
output (a line without its newline, flushed at the exit) reached it.

No line twice, by offsets: the handle records the sizes of the two files when the container was
created (a relaunch into a used sandbox appends after what is there). Whatever is in a file beyond
that size is this container's output, copied already; each (re)started copy asks for the log
from its start and skips that many bytes of the stream. A byte-exact mark needs no state of its
own, survives a crash between two writes, and costs a replay of the log on each restart (Docker
reads its json-file from the start for any `since` too). A workload that writes to these files
itself (it can: the sandbox is its own) only disturbs its own output.

The files are opened as every runtime opens them (adapter/core/sandbox.py): never through a link.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from adapter.core.errors import ContainerizerError, FailedPrecondition, NotFound
from adapter.core.sandbox import open_output
from adapter.runtimes.docker.client import DockerEngine
from adapter.runtimes.docker.streams import STDERR, STDOUT, FrameReader

log = logging.getLogger(__name__)

STREAM_FILES = {STDOUT: "stdout", STDERR: "stderr"}
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 10.0


@dataclass(frozen=True)
class OutputTarget:
    """Where a container's output goes, and what of the files precedes it."""

    docker_id: str
    sandbox: Path
    stdout_offset: int = 0  # the size of `stdout` when the container was created
    stderr_offset: int = 0

    def offset(self, stream: int) -> int:
        return self.stdout_offset if stream == STDOUT else self.stderr_offset


def output_sizes(sandbox: Path) -> tuple[int, int]:
    """The sizes of the sandbox's `stdout` and `stderr` now (created when missing)."""
    sizes = []
    for name in STREAM_FILES.values():
        fd = open_output(str(sandbox), name)
        try:
            sizes.append(os.fstat(fd).st_size)
        finally:
            os.close(fd)
    return sizes[0], sizes[1]


class _Sink:
    """One sandbox file, appended to after `skip` bytes of its stream that it already holds."""

    def __init__(self, target: OutputTarget, stream: int) -> None:
        self.fd = open_output(str(target.sandbox), STREAM_FILES[stream])
        self.skip = max(0, os.fstat(self.fd).st_size - target.offset(stream))

    def write(self, data: bytes) -> None:
        cut = min(self.skip, len(data))
        self.skip -= cut
        view = memoryview(data)[cut:]
        while view:
            view = view[os.write(self.fd, view) :]


async def copy_output(engine: DockerEngine, target: OutputTarget, *, follow: bool) -> bool:
    """Append what of the container's log the files lack; with `follow`, as it comes, until
    dockerd ends the stream. Whether the stream ended as dockerd ends it (not cut short)."""
    sinks: dict[int, _Sink] = {}
    try:
        for stream in STREAM_FILES:
            sinks[stream] = _Sink(target, stream)
        connection = await engine.logs(target.docker_id, follow=follow)
        try:
            frames = FrameReader(connection)
            while (frame := await frames.next()) is not None:
                stream, payload = frame
                if stream in sinks:
                    sinks[stream].write(payload)
            return connection.complete
        finally:
            connection.close()
    finally:
        for sink in sinks.values():
            os.close(sink.fd)


class OutputFollowers:
    """One follower task per running container of the driver."""

    def __init__(self, engine: DockerEngine) -> None:
        self._engine = engine
        self._followers: dict[str, asyncio.Task[None]] = {}

    def follow(self, container_id: str, target: OutputTarget) -> None:
        current = self._followers.get(container_id)
        if current is None or current.done():
            self._followers[container_id] = asyncio.ensure_future(self._follow(target))

    async def _follow(self, target: OutputTarget) -> None:
        """Copy while the container runs: until dockerd ends the stream of a stopped container,
        the container is gone, or its files are refused."""
        backoff = RETRY_FIRST_S
        failures = 0
        while True:
            try:
                complete = await copy_output(self._engine, target, follow=True)
                if complete and not await self._running(target.docker_id):
                    return
                failures = 0
            except NotFound:
                return
            except FailedPrecondition as exc:  # a link or FIFO where a file should be
                log.warning("docker: output of %s is not copied: %s", target.docker_id[:12], exc)
                return
            except (ContainerizerError, OSError) as exc:  # dockerd away; retried while it runs
                failures += 1
                level = logging.WARNING if failures == 1 else logging.DEBUG
                log.log(level, "docker: following the output of %s: %s", target.docker_id, exc)
            await asyncio.sleep(backoff)
            backoff = RETRY_FIRST_S if failures == 0 else min(backoff * 2, RETRY_MAX_S)

    async def _running(self, docker_id: str) -> bool:
        inspect = await self._engine.inspect(docker_id)
        return bool((inspect.get("State") or {}).get("Running"))

    async def finish(self, container_id: str, target: OutputTarget) -> None:
        """Once the container has stopped: its output complete in the files (what the follower
        did not copy is copied now). Files that are refused (the workload swapped them for
        links) are left as they are, said in the log."""
        await self.stop(container_id)
        try:
            await copy_output(self._engine, target, follow=False)
        except FailedPrecondition as exc:
            log.warning("docker: output of %s not copied: %s", container_id, exc)

    async def stop(self, container_id: str) -> None:
        """Stop following, copying nothing more."""
        follower = self._followers.pop(container_id, None)
        if follower is not None:
            await _cancel(follower)

    async def close(self) -> None:
        """Stop following (the service stops; the next start resumes by the offsets)."""
        followers = list(self._followers.values())
        self._followers.clear()
        for follower in followers:
            await _cancel(follower)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
