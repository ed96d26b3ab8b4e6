"""The commands about the service itself rather than a container: `serve` runs it on this node,
`runtimes` asks it which runtimes it offers and how they are.

`serve` is the one command that needs no client: main.py's dispatch() calls its handler with
the arguments alone. The service's modules are imported only once `serve` runs.
"""

from __future__ import annotations

import argparse
from typing import Any

from adapter.clients.cli import format as cli_format
from adapter.clients.cli.client import ServiceClient, add_subcommand, warn


def command_serve(args: argparse.Namespace) -> int:
    from adapter.server.serve import run_server

    return run_server(args.config)


def add_serve_parser(subcommands: Any) -> None:
    help_text = "run the service"
    serve = subcommands.add_parser("serve", help=help_text, description=help_text)
    serve.add_argument("--config", metavar="FILE", help="agent config (TOML)")
    serve.set_defaults(handler=command_serve)


def command_runtimes(args: argparse.Namespace, client: ServiceClient) -> int:
    from adapter.api.containerizer.v1 import containerizer_pb2 as pb

    response = client.call("Runtimes", pb.RuntimesRequest())
    for entry in response.quarantined:
        warn(f"damaged record of container {entry.container_id} set aside: {entry.error}")
    print(
        cli_format.to_json(response) if args.json else cli_format.runtimes_table(response.runtimes)
    )
    return 0


def add_runtimes_parser(subcommands: Any) -> None:
    from adapter.runtimes.registry import RUNTIME_NAMES

    add_subcommand(
        subcommands,
        "runtimes",
        command_runtimes,
        f"runtimes configured on this node (of {', '.join(RUNTIME_NAMES)})",
    )
