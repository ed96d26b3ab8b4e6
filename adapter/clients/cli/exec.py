"""`containerizer exec [-i] [-t] ID -- COMMAND...`: a command inside a running container, as
`docker exec` runs one: -i passes our stdin to it, -t gives it a terminal (ours goes raw for the
while, and its size follows ours). The exit status is the command's.
"""

from __future__ import annotations

import argparse
import queue
import sys
from collections.abc import Iterator
from typing import Any

from adapter.clients.cli.client import CliError, ServiceClient, add_subcommand, until_done
from adapter.clients.cli.terminal import following_size, raw_terminal, read_stdin, terminal_size

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
    size = terminal_size() if raw else None
    if size is not None:
        start.size.CopyFrom(pb.TerminalSize(columns=size[0], rows=size[1]))
    requests.put(pb.ExecRequest(start=start))
    if args.interactive:
        read_stdin(
            lambda chunk: requests.put(pb.ExecRequest(stdin=chunk)),
            lambda: requests.put(pb.ExecRequest(close_stdin=True)),
        )

    def resize(columns: int, rows: int) -> None:
        requests.put(pb.ExecRequest(resize=pb.TerminalSize(columns=columns, rows=rows)))

    replies = client.stub.Exec(until_done(requests))
    with raw_terminal(raw), following_size(raw, resize):
        try:
            return _write_output(replies)
        except grpc.RpcError as exc:
            raise client.error_from(exc) from None
        finally:
            requests.put(None)


def _write_output(replies: Iterator[Any]) -> int:
    for reply in replies:
        kind = reply.WhichOneof("output")
        if kind == "exit_code":
            return int(reply.exit_code)
        stream = sys.stdout.buffer if kind == "stdout" else sys.stderr.buffer
        stream.write(reply.stdout if kind == "stdout" else reply.stderr)
        stream.flush()
    raise CliError("exec: the service ended the stream without the command's exit code")
