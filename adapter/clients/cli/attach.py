"""`containerizer attach ID`: the container's output from now on, and, when its launch kept
stdin open (`run -i`), our stdin to it; with a terminal (`run -t`) ours goes raw and its size
follows ours. It lasts until the container's output ends, as `docker attach`; detaching
(Ctrl-C) never stops the container."""

from __future__ import annotations

import argparse
import queue
import sys
from collections.abc import Iterator
from typing import Any

from adapter.clients.cli.client import ServiceClient, add_subcommand, until_done
from adapter.clients.cli.terminal import following_size, raw_terminal, read_stdin, terminal_size


def add_attach_parser(subcommands: Any) -> None:
    parser = add_subcommand(
        subcommands, "attach", command_attach, "attach to a running container's first process"
    )
    parser.add_argument(
        "--no-stdin", action="store_true", help="do not pass our stdin, only show the output"
    )
    parser.add_argument("container_id", metavar="ID")


def command_attach(args: argparse.Namespace, client: ServiceClient) -> int:
    attach(client, args.container_id, stdin=not args.no_stdin)
    return 0


def attach(client: ServiceClient, container_id: str, *, stdin: bool) -> None:
    """Until the container's output ends (or Ctrl-C)."""
    import grpc

    from adapter.api.containerizer.v1 import containerizer_pb2 as pb

    requests: queue.Queue[Any] = queue.Queue()
    start = pb.AttachStart(container_id=container_id, stdin=stdin, stdout=True, stderr=True)
    size = terminal_size()
    if size is not None:
        start.size.CopyFrom(pb.TerminalSize(columns=size[0], rows=size[1]))
    requests.put(pb.AttachRequest(start=start))
    replies = client.stub.Attach(until_done(requests))
    try:
        first = next(replies)
        raw = first.tty and sys.stdin.isatty()
        if stdin:
            read_stdin(
                lambda chunk: requests.put(pb.AttachRequest(stdin=chunk)),
                lambda: requests.put(pb.AttachRequest(close_stdin=True)),
            )

        def resize(columns: int, rows: int) -> None:
            requests.put(pb.AttachRequest(resize=pb.TerminalSize(columns=columns, rows=rows)))

        with raw_terminal(raw), following_size(raw, resize):
            _write_output(replies)
    except grpc.RpcError as exc:
        raise client.error_from(exc) from None
    except KeyboardInterrupt:
        replies.cancel()
    finally:
        requests.put(None)


def _write_output(replies: Iterator[Any]) -> None:
    for reply in replies:
        kind = reply.WhichOneof("output")
        if kind in ("stdout", "stderr"):
            stream = sys.stdout.buffer if kind == "stdout" else sys.stderr.buffer
            stream.write(getattr(reply, kind))
            stream.flush()
