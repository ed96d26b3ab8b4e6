"""`containerizer events [--since T] [--filter id=..,runtime=..,state=..] [--json]`: the
service's lifecycle events as they happen (after the kept ones since T), one a line; with
--json, one JSON object a line. When this reader fell behind, the service says how many events
it dropped: a line on stderr ({"missed": N} on stdout with --json). Runs until Ctrl-C."""

from __future__ import annotations

import argparse
import datetime
import sys
from typing import TYPE_CHECKING, Any

from adapter.clients.cli import format as cli_format
from adapter.clients.cli.client import ServiceClient, add_subcommand
from adapter.clients.cli.logs import since_time

if TYPE_CHECKING:
    from adapter.api.containerizer.v1 import containerizer_pb2 as pb

FILTER_KEYS = ("id", "runtime", "state")
STATES = ("LAUNCHING", "RUNNING", "DESTROYING", "TERMINATED")
EventFilter = dict[str, set[str]]


def event_filter(text: str) -> EventFilter:
    """`id=a,state=RUNNING,state=TERMINATED`: each key's values are alternatives, the keys must
    all match."""
    wanted: EventFilter = {}
    for term in text.split(","):
        key, equals, value = term.partition("=")
        if not equals or key not in FILTER_KEYS or not value:
            raise argparse.ArgumentTypeError(
                f"{term!r}: expected KEY=VALUE with KEY one of {', '.join(FILTER_KEYS)}"
            )
        if key == "state" and value.upper() not in STATES:
            raise argparse.ArgumentTypeError(f"state={value}: expected one of {', '.join(STATES)}")
        wanted.setdefault(key, set()).add(value.upper() if key == "state" else value)
    return wanted


def add_events_parser(subcommands: Any) -> None:
    parser = add_subcommand(subcommands, "events", command_events, "follow lifecycle events")
    parser.add_argument(
        "--since",
        type=since_time,
        metavar="TIME",
        help="first the recent events since TIME that the service kept: 10m, 2h, RFC 3339, ...",
    )
    parser.add_argument(
        "--filter",
        type=event_filter,
        action="append",
        default=[],
        metavar="KEY=VALUE[,...]",
        help=f"only matching events; KEY of {', '.join(FILTER_KEYS)}; repeatable",
    )


def command_events(args: argparse.Namespace, client: ServiceClient) -> int:
    import grpc

    from adapter.api.containerizer.v1 import containerizer_pb2 as pb

    wanted = _merged(args.filter)
    ids = wanted.get("id", set())
    # One container: the service filters; several: this side does.
    request = pb.EventsRequest(
        container_id=next(iter(ids)) if len(ids) == 1 else "", since=args.since or 0.0
    )
    events = client.stub.Events(request, timeout=None)  # no deadline: it follows
    try:
        for event in events:
            if event.missed or _matches(event, wanted):
                _print(event, as_json=args.json)
    except grpc.RpcError as exc:
        raise client.error_from(exc) from None
    except KeyboardInterrupt:
        events.cancel()
    return 0


def _merged(filters: list[EventFilter]) -> EventFilter:
    merged: EventFilter = {}
    for wanted in filters:
        for key, values in wanted.items():
            merged.setdefault(key, set()).update(values)
    return merged


def _matches(event: pb.Event, wanted: EventFilter) -> bool:
    values = {"id": event.container_id, "runtime": event.runtime, "state": _state(event)}
    return all(values[key] in allowed for key, allowed in wanted.items())


def _state(event: pb.Event) -> str:
    field = event.DESCRIPTOR.fields_by_name["state"]
    return str(field.enum_type.values_by_number[event.state].name)


def _print(event: pb.Event, *, as_json: bool) -> None:
    if as_json:
        line = f'{{"missed": {event.missed}}}' if event.missed else cli_format.to_json(event, None)
        print(line, flush=True)
        return
    if event.missed:
        missed = f"containerizer: events: {event.missed} events missed (this reader fell behind)"
        print(missed, file=sys.stderr, flush=True)
        return
    moment = datetime.datetime.fromtimestamp(event.timestamp, datetime.UTC)
    text = f"{moment.isoformat(timespec='milliseconds')} {event.container_id} {event.runtime}"
    text += f" {_state(event)}"
    if event.HasField("termination"):
        text += f" {cli_format.describe_termination(event.termination)}"
    print(text, flush=True)
