"""`containerizer exec [-i] [-t] ID -- COMMAND...`: a command inside a running container, as
`docker exec` runs one: -i passes our stdin to it, -t gives it a terminal (ours goes raw for the
while, and its size follows ours). The exit status is the command's.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

from adapter.clients.cli.client import CliError, ServiceClient, add_subcommand

READ_CHUNK = 32 * 1024


def add_exec_parser(subcommands: Any) -> None:
    parser = add_subcommand(
        subcommands, "exec", command_exec, "run a command in a running container"
    )
    parser.add_argument("--interactive", "-i", action="store_true", help="pass stdin to it")
    parser.add_argument("--tty", "-t", action="store_true", help="give it a terminal")
    parser.add_argument("container_id", metavar="ID")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="argv to execute (after --)")


def command_exec(args: argparse.Namespace, client: ServiceClient) -> int:
    import grpc

    from adapter.api.containerizer.v1 import containerizer_pb2 as pb

    argv = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not argv:
        raise CliError("exec: name the command to run, e.g. containerizer exec ID -- sh")
    tty = bool(args.tty)
    raw = tty and sys.stdin.isatty()
    requests: queue.Queue[Any] = queue.Queue()
    start = pb.ExecStart(container_id=args.container_id, argv=argv, tty=tty, stdin=args.interactive)
    size = _terminal_size() if raw else None
    if size is not None:
        start.size.CopyFrom(pb.TerminalSize(columns=size[0], rows=size[1]))
    requests.put(pb.ExecRequest(start=start))
    if args.interactive:
        threading.Thread(target=_read_stdin, args=(requests, pb), daemon=True).start()
    replies = client.stub.Exec(_until_done(requests))
    with _raw_terminal(raw), _resizes(raw, requests, pb):
        try:
            return _write_output(replies)
        except grpc.RpcError as exc:
            raise client.error_from(exc) from None
        finally:
            requests.put(None)


def _until_done(requests: queue.Queue[Any]) -> Iterator[Any]:
    while (request := requests.get()) is not None:
        yield request


def _read_stdin(requests: queue.Queue[Any], pb: Any) -> None:
    """Our stdin to the command, then its end."""
    fd = sys.stdin.fileno()
    while chunk := os.read(fd, READ_CHUNK):
        requests.put(pb.ExecRequest(stdin=chunk))
    requests.put(pb.ExecRequest(close_stdin=True))


def _write_output(replies: Iterator[Any]) -> int:
    for reply in replies:
        kind = reply.WhichOneof("output")
        if kind == "exit_code":
            return int(reply.exit_code)
        stream = sys.stdout.buffer if kind == "stdout" else sys.stderr.buffer
        stream.write(reply.stdout if kind == "stdout" else reply.stderr)
        stream.flush()
    raise CliError("exec: the service ended the stream without the command's exit code")


def _terminal_size() -> tuple[int, int] | None:
    try:
        size = os.get_terminal_size(sys.stdin.fileno())
    except OSError:
        return None
    return size.columns, size.lines


@contextlib.contextmanager
def _raw_terminal(tty: bool) -> Iterator[None]:
    """Our terminal passes every key through (the command's terminal does the echo and ^C)."""
    if not tty:
        yield
        return
    import termios
    import tty as tty_module

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty_module.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def _resizes(tty: bool, requests: queue.Queue[Any], pb: Any) -> Iterator[None]:
    """A window change of ours becomes one of the command's terminal."""
    if not tty:
        yield
        return

    def on_resize(_signum: int, _frame: Any) -> None:
        size = _terminal_size()
        if size is not None:
            resize = pb.TerminalSize(columns=size[0], rows=size[1])
            requests.put(pb.ExecRequest(resize=resize))

    previous = signal.signal(signal.SIGWINCH, on_resize)
    try:
        yield
    finally:
        signal.signal(signal.SIGWINCH, previous)
