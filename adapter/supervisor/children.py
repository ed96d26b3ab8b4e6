"""A long-lived child of the service (a container's supervisor, LXC's monitor): spawned, read
and reaped without asyncio's subprocess machinery.

Why not `asyncio.create_subprocess_exec`: on Python 3.11 its default child watcher starts one
thread per child that blocks in waitpid() for the child's whole life (a container's), the pipes
become transports set up over several event-loop round trips, and a transport that is collected
kills its child, which must outlive a stopping service. Here the child is started with
`subprocess.Popen` (vfork + exec, no thread), its one handshake line is read straight from the
pipe when the loop says it is readable, and its exit is seen through a pidfd (readable when the
process ends: an event, not a poll), then reaped with a non-blocking waitpid.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from pathlib import Path

from adapter.core.errors import LaunchFailed

# The supervisor's handshake is one short line; anything longer is not a handshake.
MAX_HANDSHAKE_BYTES = 4096


class Child:
    """One long-lived child we started; its stdout carries a one-line handshake."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self._process = process
        self.pid = process.pid
        # Opened right after the spawn, while the child cannot have been reaped yet (only
        # `wait` reaps it): the pidfd names this process and no later one with its pid.
        self._pidfd = os.pidfd_open(process.pid)
        self._exited: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def start(
        cls, argv: list[str], errors_log: Path | None = None, *, stdin: int | None = None
    ) -> Child:
        """Spawn `argv` in a new session, stdin `stdin` (a file descriptor; /dev/null when
        None), stdout a pipe, stderr appended to `errors_log` (or discarded)."""
        with contextlib.ExitStack() as stack:
            errors = stack.enter_context(errors_log.open("ab")) if errors_log else None
            try:
                process = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL if stdin is None else stdin,
                    stdout=subprocess.PIPE,
                    stderr=errors if errors else subprocess.DEVNULL, start_new_session=True,
                )  # fmt: skip
            except OSError as exc:
                raise LaunchFailed(f"cannot run {argv[0]}: {exc}") from exc
        return cls(process)

    @property
    def returncode(self) -> int | None:
        return self._process.returncode

    async def readline(self) -> bytes:
        """The first line on stdout (with its newline), or what came before EOF. The caller
        bounds the wait. The pipe stays open until the monitor is reaped, as a transport's
        would: a late write (LXC's) must not end the child with SIGPIPE mid-teardown."""
        stdout = self._process.stdout
        assert stdout is not None
        fd = stdout.fileno()
        os.set_blocking(fd, False)
        loop = asyncio.get_running_loop()
        data = b""
        while b"\n" not in data and len(data) < MAX_HANDSHAKE_BYTES:
            readable: asyncio.Future[None] = loop.create_future()
            loop.add_reader(fd, readable.set_result, None)
            try:
                await readable
            finally:
                loop.remove_reader(fd)
            with contextlib.suppress(BlockingIOError):
                chunk = os.read(fd, MAX_HANDSHAKE_BYTES)
                if not chunk:
                    break
                data += chunk
        return data.split(b"\n", 1)[0] + b"\n" if b"\n" in data else data

    async def wait(self) -> int:
        """Its exit status, once it has ended (reaped here, so no zombie stays behind). Any
        number of callers may wait, and a cancelled wait leaves the others waiting."""
        if self._process.returncode is None:
            await asyncio.shield(self._exit())
        returncode = self._process.wait()  # it has ended: this waitpid does not block
        self.close()
        return returncode

    def _exit(self) -> asyncio.Future[None]:
        """One future for every waiter, resolved when the pidfd becomes readable."""
        if self._exited is None:
            loop = asyncio.get_running_loop()
            exited: asyncio.Future[None] = loop.create_future()

            def on_exit() -> None:
                loop.remove_reader(self._pidfd)
                if not exited.done():
                    exited.set_result(None)

            loop.add_reader(self._pidfd, on_exit)
            self._exited, self._loop = exited, loop
        return self._exited

    def kill(self) -> None:
        """SIGKILL through the pidfd: never a reused pid."""
        if self._process.returncode is None and self._pidfd >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    def kill_group(self) -> None:
        """SIGKILL to its whole process group (its own session): what it forked goes too."""
        if self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)

    def _close_pidfd(self) -> None:
        if self._pidfd >= 0:
            if self._loop is not None and self._exited is not None and not self._exited.done():
                self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1

    def close_stdout(self) -> None:
        """For a child that writes nothing after its handshake: one fd less per container."""
        if self._process.stdout is not None:
            self._process.stdout.close()

    def close(self) -> None:
        """Release our fds: once it is reaped, or when the service stops and leaves it running
        (a restarted service finds it through the handle's pid and start time)."""
        if self._process.stdout is not None:
            self._process.stdout.close()
        self._close_pidfd()
