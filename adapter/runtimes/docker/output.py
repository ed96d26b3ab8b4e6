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

A CRI container (a `log_path`) has its output in that one file of records instead (crilog.py),
which ReopenContainerLog opens again.

Rotation by size (log_max_size, log_max_files), as the supervisor rotates for the other runtimes:
a file that reached the size becomes `stdout.1` (`stdout.1` becomes `stdout.2`, ...; the oldest
beyond the bound is removed) and a new `stdout` goes on. A file's size then no longer says what
was copied, so a file that a rotation made carries a mark (an xattr in the `trusted` namespace,
which a workload without CAP_SYS_ADMIN cannot set): the container's docker id and how many bytes
of its stream precede the file. Bytes copied = that base + the file's size; a file without this
container's mark is the one the container began in, and holds `size - offset` of them. The new
file is made and marked under a temporary name, then swapped with `stdout` in one
renameat2(RENAME_EXCHANGE): a crash leaves either the old file or the new, marked one at the
name, never none, so a restart neither loses nor repeats a byte.

The files are opened as every runtime opens them (adapter/core/sandbox.py): never through a link.
Everything a rotation does is by name relative to the sandbox directory opened with O_NOFOLLOW;
renames and unlinks act on a link itself, and a directory the workload put at a rotated name is
removed when empty and otherwise left as it is (its name is then skipped).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from adapter.core.errors import ContainerizerError, FailedPrecondition, NotFound
from adapter.core.sandbox import open_output
from adapter.runtimes.docker.client import DockerEngine
from adapter.runtimes.docker.crilog import CriLog, CriSink
from adapter.runtimes.docker.streams import STDERR, STDOUT, FrameReader

log = logging.getLogger(__name__)

STREAM_FILES = {STDOUT: "stdout", STDERR: "stderr"}
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 10.0
MARK_XATTR = "trusted.containerizer.docker-output"  # "<docker id> <bytes before this file>"
RENAME_EXCHANGE = 2  # linux/fs.h
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Rotation:
    """The node's bound on a stream's files: `max_size` bytes each (0: never rotate), and
    `max_files` of them, the current one included."""

    max_size: int = 0
    max_files: int = 1


@dataclass(frozen=True)
class OutputTarget:
    """Where a container's output goes, and what of the files precedes it."""

    docker_id: str
    sandbox: Path
    stdout_offset: int = 0  # the size of `stdout` when the container was created
    stderr_offset: int = 0
    log_path: str = ""  # a CRI log: the output goes there, not to the sandbox's files

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
    """One stream's sandbox file, appended to after `skip` bytes of its stream that the files
    already hold, rotated by `rotation`."""

    def __init__(self, target: OutputTarget, stream: int, rotation: Rotation) -> None:
        self.name = STREAM_FILES[stream]
        self.docker_id = target.docker_id
        self.rotation = rotation
        self.sandbox = str(target.sandbox)
        self.fd = open_output(self.sandbox, self.name)
        self.copied = _copied_before(self.fd, target.docker_id, target.offset(stream))
        self.skip = self.copied

    def write(self, data: bytes) -> None:
        cut = min(self.skip, len(data))
        self.skip -= cut
        view = memoryview(data)[cut:]
        while view:
            written = os.write(self.fd, view)
            self.copied += written
            view = view[written:]
        if cut < len(data) and 0 < self.rotation.max_size <= os.fstat(self.fd).st_size:
            self._rotate()

    def _rotate(self) -> None:
        """The current file becomes `<name>.1`, a new marked one takes the name. When no new
        file can be made (the workload blocked the temporary name), the current file starts
        over instead, so the disk still holds no more than the bound."""
        directory = _open_directory(self.sandbox)
        try:
            fresh = self._fresh_file(directory)
            if fresh is None:
                self._start_over()
                return
            _shift_rotated(directory, self.name, self.rotation.max_files)
            try:
                _exchange(directory, _temporary_name(self.name), self.name)
            except OSError:
                os.close(fresh)
                self._start_over()
                return
            oldest = f"{self.name}.1" if self.rotation.max_files > 1 else None
            _move_or_remove(directory, _temporary_name(self.name), oldest)
            os.close(self.fd)
            self.fd = fresh
        finally:
            os.close(directory)

    def _start_over(self) -> None:
        _mark(self.fd, self.docker_id, self.copied)
        os.ftruncate(self.fd, 0)

    def _fresh_file(self, directory: int) -> int | None:
        """A new empty file at the temporary name, marked with what precedes it."""
        temporary = _temporary_name(self.name)
        _remove_rotated(directory, temporary)
        try:
            fd = open_output(self.sandbox, temporary, truncate=True)
        except FailedPrecondition:
            return None
        try:
            _mark(fd, self.docker_id, self.copied)
        except OSError:
            os.close(fd)
            return None
        return fd


def _temporary_name(name: str) -> str:
    return f".{name}.rotating"


def _copied_before(fd: int, docker_id: str, offset: int) -> int:
    """How many bytes of the container's stream the files hold (see the module's docstring)."""
    size = os.fstat(fd).st_size
    try:
        mark = os.getxattr(fd, MARK_XATTR).decode("ascii").split()
    except (OSError, UnicodeDecodeError):
        mark = []
    if len(mark) == 2 and mark[0] == docker_id and mark[1].isdigit():
        return int(mark[1]) + size
    return max(0, size - offset)


def _mark(fd: int, docker_id: str, base: int) -> None:
    os.setxattr(fd, MARK_XATTR, f"{docker_id} {base}".encode("ascii"))


def _open_directory(sandbox: str) -> int:
    try:
        return os.open(sandbox, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise FailedPrecondition(f"sandbox {sandbox}: {exc.strerror} (not a directory?)") from None


def _remove_rotated(directory: int, name: str) -> None:
    """Remove a file, a link (itself) or an empty directory at `name`; a directory that holds
    something is the workload's and stays, unwalked."""
    try:
        os.unlink(name, dir_fd=directory)
    except (IsADirectoryError, PermissionError):  # a directory: EISDIR, or EPERM on some
        with contextlib.suppress(OSError):
            os.rmdir(name, dir_fd=directory)
    except FileNotFoundError:
        pass


def _move_or_remove(directory: int, source: str, target: str | None) -> None:
    """`source` renamed to `target` (itself, never what a link names); removed when that fails
    or there is no `target`."""
    if target is not None:
        try:
            os.rename(source, target, src_dir_fd=directory, dst_dir_fd=directory)
            return
        except FileNotFoundError:
            return
        except OSError:
            pass
    _remove_rotated(directory, source)


def _shift_rotated(directory: int, name: str, max_files: int) -> None:
    """The oldest out, then `<name>.<k-1>` to `<name>.<k>` down to `.1` to `.2`, so that each
    lands on a free name; what cannot be moved is removed."""
    if max_files < 2:
        return
    _remove_rotated(directory, f"{name}.{max_files - 1}")
    for k in range(max_files - 1, 1, -1):
        _move_or_remove(directory, f"{name}.{k - 1}", f"{name}.{k}")


def _exchange(directory: int, first: str, second: str) -> None:
    """Swap two names at once; when `second` is gone (the workload removed it), just rename."""
    result = _libc.renameat2(directory, first.encode(), directory, second.encode(), RENAME_EXCHANGE)
    if result == 0:
        return
    code = ctypes.get_errno()
    if code != errno.ENOENT:
        raise OSError(code, os.strerror(code), second)
    os.rename(first, second, src_dir_fd=directory, dst_dir_fd=directory)


async def copy_output(
    engine: DockerEngine,
    target: OutputTarget,
    rotation: Rotation,
    *,
    follow: bool,
    cri_log: CriLog | None = None,
) -> bool:
    """Append what of the container's log the files (or `cri_log`) lack; with `follow`, as it
    comes, until dockerd ends the stream, else once, for a container that has ended. Whether
    the stream ended as dockerd ends it (not cut short)."""
    if cri_log is not None:
        cri_sinks = {stream: CriSink(cri_log, stream) for stream in STREAM_FILES}
        complete = await _copy_frames(engine, target.docker_id, cri_sinks, follow=follow)
        if not follow:
            for cri_sink in cri_sinks.values():
                cri_sink.finish()
        return complete
    sinks: dict[int, _Sink] = {}
    try:
        for stream in STREAM_FILES:
            sinks[stream] = _Sink(target, stream, rotation)
        return await _copy_frames(engine, target.docker_id, sinks, follow=follow)
    finally:
        for sink in sinks.values():
            os.close(sink.fd)


async def _copy_frames(
    engine: DockerEngine, docker_id: str, sinks: Mapping[int, _Sink | CriSink], *, follow: bool
) -> bool:
    connection = await engine.logs(docker_id, follow=follow)
    try:
        frames = FrameReader(connection)
        while (frame := await frames.next()) is not None:
            stream, payload = frame
            if stream in sinks:
                sinks[stream].write(payload)
        return connection.complete
    finally:
        connection.close()


class OutputFollowers:
    """One follower task per running container of the driver."""

    def __init__(self, engine: DockerEngine, rotation: Rotation | None = None) -> None:
        self._engine = engine
        self._rotation = rotation or Rotation()
        self._followers: dict[str, asyncio.Task[None]] = {}
        self._cri_logs: dict[str, CriLog] = {}  # container id -> its open CRI log

    def follow(self, container_id: str, target: OutputTarget) -> None:
        current = self._followers.get(container_id)
        if current is None or current.done():
            self._followers[container_id] = asyncio.ensure_future(
                self._follow(container_id, target)
            )

    def _cri_log(self, container_id: str, target: OutputTarget) -> CriLog | None:
        """The container's CRI log, opened once and kept until its output is complete."""
        if not target.log_path:
            return None
        cri_log = self._cri_logs.get(container_id)
        if cri_log is None:
            cri_log = self._cri_logs[container_id] = CriLog(target.log_path, target.docker_id)
        return cri_log

    def reopen(self, container_id: str) -> None:
        """ReopenContainerLog: the CRI log's path opened again (the kubelet renamed the file)."""
        cri_log = self._cri_logs.get(container_id)
        if cri_log is None:
            raise FailedPrecondition(
                f"docker runtime: {container_id!r} has no CRI log being written (none asked"
                " for, or the container has ended)"
            )
        cri_log.reopen()

    async def _follow(self, container_id: str, target: OutputTarget) -> None:
        """Copy while the container runs: until dockerd ends the stream of a stopped container,
        the container is gone, or its files are refused."""
        backoff = RETRY_FIRST_S
        failures = 0
        while True:
            try:
                complete = await copy_output(
                    self._engine,
                    target,
                    self._rotation,
                    follow=True,
                    cri_log=self._cri_log(container_id, target),
                )
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
        await self._stop_following(container_id)
        try:
            cri_log = self._cri_log(container_id, target)
            await copy_output(self._engine, target, self._rotation, follow=False, cri_log=cri_log)
        except FailedPrecondition as exc:
            log.warning("docker: output of %s not copied: %s", container_id, exc)
        finally:
            self._close_cri_log(container_id)

    async def stop(self, container_id: str) -> None:
        """Stop following, copying nothing more."""
        await self._stop_following(container_id)
        self._close_cri_log(container_id)

    async def _stop_following(self, container_id: str) -> None:
        follower = self._followers.pop(container_id, None)
        if follower is not None:
            await _cancel(follower)

    def _close_cri_log(self, container_id: str) -> None:
        cri_log = self._cri_logs.pop(container_id, None)
        if cri_log is not None:
            cri_log.close()

    async def close(self) -> None:
        """Stop following (the service stops; the next start resumes by the offsets)."""
        followers = list(self._followers.values())
        self._followers.clear()
        for follower in followers:
            await _cancel(follower)
        for container_id in list(self._cri_logs):
            self._close_cri_log(container_id)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
