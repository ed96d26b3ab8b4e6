"""A command running inside a container with its input and output open to the caller: the
streaming Exec (the CRI's, through the streaming server), on the supervisor's exec mode.

Without a terminal the command's stdin, stdout and stderr are three pipes. With one, all three are
the slave of a pty whose master the session keeps: output is read from it, input written to it,
and a resize sets its window size (the kernel then sends the command SIGWINCH).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import struct
import termios

from adapter.supervisor.exec import ExecConfig, exec_process, raise_if_not_started

READ_CHUNK = 32 * 1024
STDOUT = 1
STDERR = 2


class ExecSession:
    def __init__(
        self, process: asyncio.subprocess.Process, master: int | None, report: int, command: str
    ) -> None:
        self._process = process
        self._master = master
        self._report = report  # the supervisor's word on a command that never ran
        self._command = command
        self._master_eof = False

    @classmethod
    async def start(cls, binary: str, config: ExecConfig) -> ExecSession:
        """Raises what exec_process raises; a command that cannot run (no such binary) starts
        a session whose wait() raises ExecNotStarted."""
        report, report_write = os.pipe2(os.O_CLOEXEC)
        master, slave = os.openpty() if config.tty else (None, None)
        try:
            process = await exec_process(binary, config, terminal=slave, report_fd=report_write)
        except BaseException:
            for fd in (report, master):
                if fd is not None:
                    os.close(fd)
            raise
        finally:
            for fd in (report_write, slave):  # the supervisor's copies alone keep them open
                if fd is not None:
                    os.close(fd)
        if master is not None:
            os.set_blocking(master, False)
        return cls(process, master, report, config.argv[0])

    @property
    def tty(self) -> bool:
        return self._master is not None

    async def write(self, data: bytes) -> None:
        if self._master is not None:
            await _write_fd(self._master, data)
            return
        stdin = self._process.stdin
        if stdin is None or stdin.is_closing():
            return
        stdin.write(data)
        with contextlib.suppress(ConnectionError):
            await stdin.drain()

    def close_stdin(self) -> None:
        """EOF for the command's input; with a terminal, ^D at the start of a line is how the
        terminal says it, and that is the caller's to send."""
        if self._master is None and self._process.stdin is not None:
            self._process.stdin.close()

    async def read(self, stream: int = STDOUT) -> bytes:
        """The next chunk of the command's stdout (or stderr), b"" at its end. With a terminal
        everything comes on STDOUT and STDERR ends at once."""
        if self._master is not None:
            return b"" if stream == STDERR else await self._read_master()
        reader = self._process.stdout if stream == STDOUT else self._process.stderr
        assert reader is not None
        return await reader.read(READ_CHUNK)

    async def _read_master(self) -> bytes:
        assert self._master is not None
        while not self._master_eof:
            try:
                return os.read(self._master, READ_CHUNK)
            except BlockingIOError:
                await _readable(self._master)
            except OSError:  # EIO: every slave copy is closed, the command has ended
                self._master_eof = True
        return b""

    def resize(self, columns: int, rows: int) -> None:
        if self._master is not None and 0 < columns < 65536 and 0 < rows < 65536:
            fcntl.ioctl(self._master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))

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
        for fd in (self._master, self._report):
            if fd is not None and fd >= 0:
                os.close(fd)
        self._master, self._report = None, -1


async def _readable(fd: int) -> None:
    await _ready(fd, writable=False)


async def _write_fd(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            await _ready(fd, writable=True)


async def _ready(fd: int, *, writable: bool) -> None:
    """Until `fd` is readable (or writable)."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    if writable:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        if writable:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)
