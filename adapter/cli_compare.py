"""`containerizer compare`: which runtime should this node use? The same workloads through the
API on each runtime, reported as an aligned table, JSON (--json) or an HTML page (--html).

The subcommand is only parse -> run -> print; the work is in adapter/compare/. Its own module
because its options and output are larger than every other subcommand's together.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapter import cli_format
from adapter.cli import CliError, ServiceClient, add_subcommand
from adapter.compare.workloads import DEFAULT_IMAGE, DEFAULT_RUNTIMES

if TYPE_CHECKING:
    from adapter.compare.results import CompareReport

DEFAULT_RUNS = 20
DEFAULT_DENSITY = 20
RUNTIME_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")


def runtime_names(text: str) -> tuple[str, ...]:
    """'native,lxc' -> ('native', 'lxc'), in the order given, each once."""
    names: list[str] = []
    for name in (part.strip() for part in text.split(",")):
        if not RUNTIME_NAME.fullmatch(name):
            raise argparse.ArgumentTypeError(
                f"invalid runtime name {name!r}: give names such as {','.join(DEFAULT_RUNTIMES)}"
            )
        if name not in names:
            names.append(name)
    return tuple(names)


def add_compare_parser(subcommands: Any) -> None:
    compare = add_subcommand(
        subcommands,
        "compare",
        command_compare,
        "run the same workloads on each runtime and compare latency, density, isolation, "
        "accounting and capabilities",
        reads=True,
    )
    compare.add_argument(
        "--runtimes",
        type=runtime_names,
        default=DEFAULT_RUNTIMES,
        metavar="NAME,...",
        help=f"runtimes to compare, in this order (default: {','.join(DEFAULT_RUNTIMES)}); "
        "one that is not configured or not healthy is listed with the reason",
    )
    compare.add_argument(
        "--runs",
        type=cli_format.positive_int,
        default=DEFAULT_RUNS,
        help=f"latency runs per operation (default {DEFAULT_RUNS})",
    )
    compare.add_argument(
        "--density",
        type=cli_format.positive_int,
        default=DEFAULT_DENSITY,
        help=f"idle containers launched at once (default {DEFAULT_DENSITY})",
    )
    compare.add_argument(
        "--html", metavar="FILE", help="also write a self-contained HTML report with charts"
    )
    compare.add_argument(
        "--image",
        default=DEFAULT_IMAGE,
        help=f"image for the runtimes that run images (default {DEFAULT_IMAGE})",
    )


def command_compare(args: argparse.Namespace, client: ServiceClient) -> int:
    from adapter.api.containerizer.v1 import containerizer_pb2 as pb
    from adapter.compare.progress import Progress
    from adapter.compare.report import render_json, render_text
    from adapter.compare.runner import CompareOptions, CompareRunner
    from adapter.compare.session import RpcFailure, ServiceCalls

    # Reach the service once through the CLI's client: an absent service is one clear line.
    client.call("Runtimes", pb.RuntimesRequest())
    options = CompareOptions(args.runtimes, args.runs, args.density, args.image, client.target)
    progress = Progress(sys.stderr)
    try:
        report = CompareRunner(ServiceCalls(client.stub, client.timeout), options, progress).run()
    except RpcFailure as exc:
        raise CliError(f"compare: {exc}") from None
    finally:
        progress.finish()
    if args.html:
        write_html(Path(args.html), report)
    print(render_json(report) if args.json else render_text(report))
    return 0


def write_html(path: Path, report: CompareReport) -> None:
    from adapter.compare.charts import charts
    from adapter.compare.report import render_html

    try:
        drawn = charts(report)
    except ImportError as exc:
        raise CliError(f"--html needs matplotlib ({exc}): pip install matplotlib") from None
    page = render_html(report, drawn)
    try:
        path.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise CliError(f"--html: cannot write {path}: {exc.strerror}") from None
