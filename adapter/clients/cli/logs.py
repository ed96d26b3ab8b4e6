"""`containerizer logs [-f] [--since T] [--tail N] [--timestamps] ID`: a container's output, as
`docker logs` shows it, streamed by the service (so it works over TCP too): stdout to our stdout,
stderr to our stderr."""

from __future__ import annotations

import argparse
import datetime
import re
import sys
import time
from typing import Any

from adapter.clients.cli.client import ServiceClient, add_subcommand

RELATIVE = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def since_time(text: str) -> float:
    """Seconds since the epoch from `10m`, `1.5h`, a number of seconds since the epoch, or an
    RFC 3339 time."""
    relative = RELATIVE.fullmatch(text)
    if relative:
        return time.time() - float(relative.group(1)) * UNIT_SECONDS[relative.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time: use 10m, 2h, seconds since the epoch or RFC 3339"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def tail_count(text: str) -> int:
    if text == "all":
        return 0
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of lines, or all")
    return int(text)


def add_logs_parser(subcommands: Any) -> None:
    parser = add_subcommand(subcommands, "logs", command_logs, "show a container's output")
    parser.add_argument("--follow", "-f", action="store_true", help="then follow it")
    parser.add_argument("--since", type=since_time, metavar="TIME", help="10m, 2h, RFC 3339, ...")
    parser.add_argument(
        "--tail", "-n", type=tail_count, default=0, metavar="N", help="last N lines"
    )
    parser.add_argument("--timestamps", "-t", action="store_true", help="prefix each line's time")
    parser.add_argument("container_id", metavar="ID")


def command_logs(args: argparse.Namespace, client: ServiceClient) -> int:
    import grpc

    from adapter.api.containerizer.v1 import containerizer_pb2 as pb

    request = pb.LogsRequest(
        container_id=args.container_id,
        follow=args.follow,
        tail_lines=args.tail,
        since=args.since or 0.0,
    )
    # No deadline when following: the output may go on for days.
    entries = client.stub.Logs(request, timeout=None if args.follow else client.timeout)
    at_line_start = {"stdout": True, "stderr": True}
    try:
        for entry in entries:
            out = sys.stdout.buffer if entry.stream == "stdout" else sys.stderr.buffer
            if args.timestamps and at_line_start[entry.stream]:
                out.write(_stamp(entry.timestamp).encode() + b" ")
            out.write(entry.data)
            out.flush()
            at_line_start[entry.stream] = entry.data.endswith(b"\n")
    except grpc.RpcError as exc:
        raise client.error_from(exc) from None
    except KeyboardInterrupt:
        entries.cancel()
    return 0


def _stamp(timestamp: float) -> str:
    if not timestamp:
        return "-"
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
