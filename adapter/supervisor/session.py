"""A command running inside a container with its input and output open to the caller: the
streaming Exec (the CRI's, through the streaming server), on the supervisor's exec mode.

The command's stdin, stdout and stderr are three pipes to the supervisor. With a terminal, the
supervisor makes a pty of the container's own devpts (so `tty` and `stty` work inside) and relays
it: everything the command writes comes on stdout, and a resize is a line on a pipe of its own
that the supervisor turns into the terminal's window size (the kernel then sends SIGWINCH).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

from adapter.supervisor.exec import ExecConfig, exec_process, raise_if_not_started

READ_CHUNK = 32 * 1024
STDOUT = 1
STDERR = 2


class ExecSession:
    def __init__(
        self, process: asyncio.subprocess.Process, report: int, resize: int | None, command: str
    ) -> None:
        self._process = process
        self._report = report  # the supervisor's word on a command that never ran
        self._resize = resize  # "COLUMNS ROWS" lines to the supervisor, with a terminal
        self._command = command

    @classmethod
    async def start(cls, binary: str, config: ExecConfig) -> ExecSession:
        """Raises what exec_process raises; a command that cannot run (no such binary) starts
        a session whose wait() raises ExecNotStarted."""
        report, report_write = os.pipe2(os.O_CLOEXEC)
        resize_read, resize = os.pipe2(os.O_CLOEXEC) if config.tty else (None, None)
        try:
            process = await exec_process(
                binary, config, report_fd=report_write, resize_fd=resize_read
            )
        except BaseException:
            for fd in (report, resize):
                if fd is not None:
                    os.close(fd)
            raise
        finally:
            for fd in (report_write, resize_read):  # the supervisor's copies alone stay
                if fd is not None:
                    os.close(fd)
        if resize is not None:
            os.set_blocking(resize, False)
        return cls(process, report, resize, config.argv[0])

    @property
    def tty(self) -> bool:
        return self._resize is not None

    async def write(self, data: bytes) -> None:
        stdin = self._process.stdin
        if stdin is None or stdin.is_closing():
            return
        stdin.write(data)
        with contextlib.suppress(ConnectionError):
            await stdin.drain()

    def close_stdin(self) -> None:
        """EOF for the command's input (with a terminal, ^D is how a user says it)."""
        if self._process.stdin is not None:
            self._process.stdin.close()

    async def read(self, stream: int = STDOUT) -> bytes:
        """The next chunk of the command's stdout (or stderr), b"" at its end."""
        reader = self._process.stdout if stream == STDOUT else self._process.stderr
        assert reader is not None
        return await reader.read(READ_CHUNK)

    def resize(self, columns: int, rows: int) -> None:
        if self._resize is not None and 0 < columns < 65536 and 0 < rows < 65536:
            with contextlib.suppress(BlockingIOError, BrokenPipeError):
                os.write(self._resize, f"{columns} {rows}\n".encode())

    async def wait(self) -> int:
        """The command's exit code (128 + n when signal n ended it); ExecNotStarted when it
        never ran."""
        code = await self._process.wait()
        report, self._report = self._report, -1
        if report >= 0:
            raise_if_not_started(report, self._command)  # closes it
        return code

    def kill(self) -> None:
        """End the command and what it started in its session (the supervisor's group)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._process.pid, signal.SIGKILL)

    def close(self) -> None:
        for fd in (self._resize, self._report):
            if fd is not None and fd >= 0:
                os.close(fd)
        self._resize, self._report = None, -1
