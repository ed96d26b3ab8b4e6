"""`containerizer compare`: which runtime should this node use? The same workloads through the
API on each runtime, reported as an aligned table, JSON (--json) or an HTML page (--html).

The subcommand is only parse -> run -> print; the work is in adapter/clients/compare/. Its own
module because its options and output are larger than every other subcommand's together.

A fresh node has no image: when none is named and the default is missing, compare builds the
node's own busybox image and imports it first (as `images import --busybox` does), so the image
runtimes have something to run. It exits 1 when a measurement could not be made on any runtime,
naming it: a report of errors only is not a comparison.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapter.clients.cli import format as cli_format
from adapter.clients.cli.client import CliError, ServiceClient, add_subcommand
from adapter.clients.compare.workloads import DEFAULT_IMAGE, DEFAULT_RUNTIMES

if TYPE_CHECKING:
    from adapter.api.containerizer.v1 import containerizer_pb2 as pb
    from adapter.clients.compare.results import CompareReport

DEFAULT_RUNS = 20
DEFAULT_DENSITY = 20
# A run that could not measure something on any runtime: distinct from the CLI's own 125.
EXIT_UNMEASURED = 1
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
        help=f"image for the runtimes that run images (default {DEFAULT_IMAGE}, built from "
        "this node's busybox and imported when it is missing)",
    )


def command_compare(args: argparse.Namespace, client: ServiceClient) -> int:
    from adapter.api.containerizer.v1 import containerizer_pb2 as pb
    from adapter.clients.compare.progress import Progress
    from adapter.clients.compare.report import render_json, render_text
    from adapter.clients.compare.runner import CompareOptions, CompareRunner
    from adapter.clients.compare.session import RpcFailure, ServiceCalls

    # Reach the service once through the CLI's client: an absent service is one clear line.
    runtimes = client.call("Runtimes", pb.RuntimesRequest()).runtimes
    image = args.image or default_image(client, runtimes, args.runtimes)
    options = CompareOptions(args.runtimes, args.runs, args.density, image, client.target)
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
    if unmeasured := report.unmeasured():
        print(
            f"compare: not measured on any runtime: {', '.join(unmeasured)} "
            "(the report's errors and reasons say why)",
            file=sys.stderr,
        )
        return EXIT_UNMEASURED
    return 0


def default_image(
    client: ServiceClient, runtimes: Sequence[pb.RuntimeInfo], compared: Sequence[str]
) -> str:
    """DEFAULT_IMAGE, built and imported first when it is missing and a compared runtime runs
    images (the others run on the host filesystem and need none)."""
    runs_images = any(
        info.name in compared and info.healthy and info.capabilities.images for info in runtimes
    )
    if runs_images and DEFAULT_IMAGE not in stored_references(client):
        from adapter.clients.cli.images import import_busybox

        print(
            f"compare: {DEFAULT_IMAGE} is not in the image store: building it from this "
            "node's busybox and importing it",
            file=sys.stderr,
        )
        import_busybox(client)
    return DEFAULT_IMAGE


def stored_references(client: ServiceClient) -> set[str]:
    import grpc

    from adapter.api.containerizer.v1 import images_pb2
    from adapter.clients.cli.images import images_stub

    try:
        listed = images_stub(client).List(images_pb2.ListImagesRequest(), timeout=client.timeout)
    except grpc.RpcError as exc:
        raise client.error_from(exc) from None
    return {image.reference for image in listed.images}


def write_html(path: Path, report: CompareReport) -> None:
    from adapter.clients.compare.charts import charts
    from adapter.clients.compare.report import render_html

    try:
        drawn = charts(report)
    except ImportError as exc:
        raise CliError(
            f"--html needs matplotlib ({exc}): pip install 'containerizer-adapter[charts]'"
        ) from None
    page = render_html(report, drawn)
    try:
        path.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise CliError(f"--html: cannot write {path}: {exc.strerror}") from None
