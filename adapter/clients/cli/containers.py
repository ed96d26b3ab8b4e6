"""The commands on containers the service already runs: `ps`, `status`, `usage`, `update`,
`kill`, `destroy` and `wait`, each its parser and its handler; and the resource flags (--cpus,
--mem, ...) that `update` shares with `run` (run.py).

Each subcommand's parser is defined only when it is the one given (main.py's LazySubcommands),
and the generated stubs are imported inside the handlers, so loading this module costs `ps`
next to nothing.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

from adapter.clients.cli import format as cli_format
from adapter.clients.cli.client import EXIT_USAGE, CliError, ServiceClient, add_subcommand, warn

if TYPE_CHECKING:
    from adapter.api.containerizer.v1 import containerizer_pb2 as pb


# ---- the resource flags, shared with `run` ----


def add_resource_options(parser: argparse.ArgumentParser, *, disk: bool) -> None:
    parser.add_argument("--cpus", type=cli_format.positive_float, help="CPU cores, e.g. 0.5")
    parser.add_argument(
        "--mem", type=cli_format.size_mib, help="memory limit: 64M, 1G, 512K; plain = MiB"
    )
    if disk:
        parser.add_argument(
            "--disk", type=cli_format.size_mib, help="disk limit, same units as --mem"
        )
    parser.add_argument("--pids", type=cli_format.positive_int, help="maximum number of processes")
    parser.add_argument(
        "--bandwidth",
        dest="network_bandwidth",
        type=cli_format.positive_float,
        metavar="MBIT",
        help="rate limit of traffic into the container, Mbit/s (bridge networking)",
    )


def resource_messages(args: argparse.Namespace) -> list[pb.Resource]:
    """The resource flags that were given, as Mesos scalar resources (mem and disk in MiB)."""
    from adapter.api.containerizer.v1 import containerizer_pb2 as pb

    names = ("cpus", "mem", "disk", "pids", "network_bandwidth")
    requested = {name: getattr(args, name, None) for name in names}
    return [
        pb.Resource(name=name, type=pb.Value.SCALAR, scalar=pb.Value.Scalar(value=float(value)))
        for name, value in requested.items()
        if value is not None
    ]


def destroy_request(container_id: str) -> pb.DestroyRequest:
    from adapter.api.containerizer.v1 import containerizer_pb2 as pb

    return pb.DestroyRequest(container_id=container_id)


# ---- the handlers ----


def list_containers(client: ServiceClient) -> list[pb.ContainerStatus]:
    """Every container, page by page: one reply holds only as many as fit its size bound."""
    from adapter.api.containerizer.v1 import containerizer_pb2 as pb

    containers: list[pb.ContainerStatus] = []
    token = ""
    while True:
        page = client.call("Containers", pb.ContainersRequest(page_token=token))
        containers.extend(page.containers)
        token = page.next_page_token
        if not token:
            return containers


def command_ps(args: argparse.Namespace, client: ServiceClient) -> int:
    containers = list_containers(client)
    if args.json:
        # One shape with and without containers: {"containers": [...]}.
        print(cli_format.containers_json(containers))
    else:
        print(cli_format.containers_table(containers, time.time()))
    return 0


def command_status(args: argparse.Namespace, client: ServiceClient) -> int:
    from adapter.api.containerizer.v1 import containerizer_pb2 as pb

    status = client.call("Status", pb.StatusRequest(container_id=args.container_id))
    print(cli_format.to_json(status) if args.json else cli_format.status_text(status, time.time()))
    return 0


def command_usage(args: argparse.Namespace, client: ServiceClient) -> int:
    from adapter.api.containerizer.v1 import containerizer_pb2 as pb

    request = pb.UsageRequest(container_id=args.container_id)
    clear_screen = args.watch and not args.json and sys.stdout.isatty()
    try:
        while True:
            statistics = client.call("Usage", request).statistics
            if clear_screen:
                print("\x1b[H\x1b[2J", end="")
            if args.json:
                # --watch prints one JSON object per line so the stream can be piped to jq.
                print(cli_format.to_json(statistics, indent=None if args.watch else 2))
            else:
                print(cli_format.usage_table(statistics))
            if not args.watch:
                return 0
            sys.stdout.flush()
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0  # Ctrl-C is how --watch ends


def command_update(args: argparse.Namespace, client: ServiceClient) -> int:
    from adapter.api.containerizer.v1 import containerizer_pb2 as pb

    resources = resource_messages(args)
    if not resources:
        raise CliError("update: give at least one of --cpus, --mem, --pids", EXIT_USAGE)
    request = pb.UpdateRequest(container_id=args.container_id, resources=resources)
    response = client.call("Update", request)
    for warning in response.warnings:  # e.g. a limit raised to the kernel's minimum
        warn(warning)
    if args.json:
        print(cli_format.to_json(response))
    return 0


def command_kill(args: argparse.Namespace, client: ServiceClient) -> int:
    from adapter.api.containerizer.v1 import containerizer_pb2 as pb

    response = client.call(
        "Kill", pb.KillRequest(container_id=args.container_id, signal=args.signal)
    )
    if args.json:
        print(cli_format.to_json(response))
    return 0


def command_destroy(args: argparse.Namespace, client: ServiceClient) -> int:
    response = client.call("Destroy", destroy_request(args.container_id))
    if args.json:
        print(cli_format.to_json(response))
    else:
        description = cli_format.describe_termination(response.termination)
        print(f"{args.container_id}: {description}")
    return 0


def command_wait(args: argparse.Namespace, client: ServiceClient) -> int:
    from adapter.api.containerizer.v1 import containerizer_pb2 as pb

    termination = client.wait(args.container_id)
    if args.json:
        print(cli_format.to_json(pb.WaitResponse(termination=termination)))
    else:
        print(f"{args.container_id}: {cli_format.describe_termination(termination)}")
    return cli_format.exit_code_of(termination)


# ---- the parsers ----


def add_ps_parser(subcommands: Any) -> None:
    add_subcommand(subcommands, "ps", command_ps, "list containers")


def add_status_parser(subcommands: Any) -> None:
    status = add_subcommand(subcommands, "status", command_status, "show one container")
    status.add_argument("container_id", metavar="ID")


def add_usage_parser(subcommands: Any) -> None:
    usage = add_subcommand(subcommands, "usage", command_usage, "resource usage of a container")
    usage.add_argument("container_id", metavar="ID")
    usage.add_argument("--watch", "-w", action="store_true", help="repeat until Ctrl-C")
    usage.add_argument(
        "--interval", type=cli_format.positive_float, default=2.0, help="seconds (default 2)"
    )


def add_update_parser(subcommands: Any) -> None:
    update = add_subcommand(subcommands, "update", command_update, "change resource limits, live")
    update.add_argument("container_id", metavar="ID")
    add_resource_options(update, disk=False)


def add_kill_parser(subcommands: Any) -> None:
    kill = add_subcommand(subcommands, "kill", command_kill, "send a signal to a container")
    kill.add_argument("container_id", metavar="ID")
    kill.add_argument(
        "--signal",
        "-s",
        type=cli_format.signal_number,
        default=int(signal.SIGTERM),
        help="default TERM",
    )


def add_destroy_parser(subcommands: Any) -> None:
    destroy = add_subcommand(
        subcommands, "destroy", command_destroy, "kill and clean up a container"
    )
    destroy.add_argument("container_id", metavar="ID")


def add_wait_parser(subcommands: Any) -> None:
    wait = add_subcommand(subcommands, "wait", command_wait, "wait for a container to end")
    wait.add_argument("container_id", metavar="ID")
