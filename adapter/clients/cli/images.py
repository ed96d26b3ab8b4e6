"""`containerizer images import FILE|--busybox | pull REF | ls | rm REF | prune`: the image store.

Kept apart from main.py, which only calls `add_images_commands` to register the group. Import and
pull stream progress: a bar redrawn in place on stderr when it is a terminal, plain lines (at
most one per quarter of each transfer) when it is a file or a pipe, so logs stay short.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from adapter.clients.cli import format as cli_format
from adapter.clients.cli.client import EXIT_USAGE, CliError, add_subcommand

BAR_WIDTH = 30
PLAIN_STEPS = 4  # plain progress lines per transfer: 25%, 50%, 75%, 100%


class ProgressDisplay:
    """Draws Transfer messages on `stream`."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.is_tty = stream.isatty()
        self.drawn = False
        self.steps_shown: dict[str, int] = {}

    def update(self, what: str, done: int, total: int) -> None:
        amounts = f"{cli_format.human_bytes(done)} / {cli_format.human_bytes(total)}"
        fraction = done / total if total else 1.0
        if self.is_tty:
            filled = int(BAR_WIDTH * fraction)
            bar = "#" * filled + "-" * (BAR_WIDTH - filled)
            name = what if len(what) <= 24 else what[:21] + "..."
            self.stream.write(f"\r\x1b[K{name:<24} [{bar}] {fraction:4.0%} {amounts}")
            self.drawn = True
        else:
            step = int(fraction * PLAIN_STEPS)
            if step > self.steps_shown.get(what, -1):
                self.steps_shown[what] = step
                self.stream.write(f"{what}: {fraction:.0%} ({amounts})\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


def follow_progress(client: Any, stream: Iterable[Any]) -> list[Any]:
    """Show the Transfer messages of an Import/Pull stream; return its images."""
    import grpc

    display = ProgressDisplay(sys.stderr)
    images = []
    try:
        for message in stream:
            if message.HasField("transfer"):
                transfer = message.transfer
                unpacking = transfer.phase == transfer.UNPACK
                what = f"unpacking {transfer.what}" if unpacking else transfer.what
                display.update(what, transfer.done_bytes, transfer.total_bytes)
            else:
                images.append(message.image)
    except grpc.RpcError as exc:
        raise client.error_from(exc) from None
    finally:
        display.finish()
    return images


def print_images(args: argparse.Namespace, images: list[Any], verb: str) -> None:
    from adapter.api.containerizer.v1 import images_pb2

    if args.json:
        print(cli_format.to_json(images_pb2.ListImagesResponse(images=images)))
        return
    for image in images:
        print(f"{verb} {image.reference} {image.manifest.digest}")


def images_stub(client: Any) -> Any:
    from adapter.api.containerizer.v1 import images_pb2_grpc

    return images_pb2_grpc.ImagesStub(client.channel)  # type: ignore[no-untyped-call, unused-ignore]


def import_tarball(client: Any, path: str) -> list[Any]:
    from adapter.api.containerizer.v1 import images_pb2

    # The service reads the file itself: same node, so an absolute path is all it needs.
    request = images_pb2.ImportRequest(path=os.path.abspath(path))
    return follow_progress(client, images_stub(client).Import(request))


def import_busybox(client: Any) -> list[Any]:
    """Build the node's own busybox image (adapter/images/busybox.py) in a private temporary
    directory and import it as localhost/busybox:latest."""
    from adapter.core.errors import ContainerizerError
    from adapter.images.busybox import write_busybox_layout

    with tempfile.TemporaryDirectory(prefix="containerizer-busybox-") as scratch:
        try:
            tarball = write_busybox_layout(Path(scratch))
        except ContainerizerError as exc:
            raise CliError(f"cannot build the busybox image: {exc}") from None
        return import_tarball(client, str(tarball))


def command_import(args: argparse.Namespace, client: Any) -> int:
    if bool(args.file) == args.busybox:
        raise CliError("images import: give a tarball FILE or --busybox, not both", EXIT_USAGE)
    images = import_busybox(client) if args.busybox else import_tarball(client, args.file)
    print_images(args, images, "imported")
    return 0


def command_pull(args: argparse.Namespace, client: Any) -> int:
    from adapter.api.containerizer.v1 import images_pb2

    request = images_pb2.PullRequest(reference=args.reference)
    secret = read_password(sys.stdin) if args.password_stdin else ""
    if args.username:
        request.credentials.username = args.username
        request.credentials.password = secret
    elif secret:  # no user: a bearer token for the registry
        request.credentials.registry_token = secret
    images = follow_progress(client, images_stub(client).Pull(request))
    print_images(args, images, "pulled")
    return 0


def read_password(stream: IO[str]) -> str:
    """The password on `stream` (like `docker login --password-stdin`): never on the command
    line, where other users see it in ps; one trailing newline is not part of it."""
    password = stream.read().removesuffix("\n").removesuffix("\r")
    if not password:
        raise CliError("images pull: --password-stdin read an empty password", EXIT_USAGE)
    return password


def command_prune(args: argparse.Namespace, client: Any) -> int:
    import grpc

    from adapter.api.containerizer.v1 import images_pb2

    try:
        response = images_stub(client).Prune(
            images_pb2.PruneImagesRequest(), timeout=client.timeout
        )
    except grpc.RpcError as exc:
        raise client.error_from(exc) from None
    if args.json:
        print(cli_format.to_json(response))
        return 0
    for reference in response.references:
        print(f"removed {reference}")
    print(f"freed {cli_format.human_bytes(response.freed_bytes)}")
    return 0


def command_ls(args: argparse.Namespace, client: Any) -> int:
    import grpc

    from adapter.api.containerizer.v1 import images_pb2

    try:
        response = images_stub(client).List(images_pb2.ListImagesRequest(), timeout=client.timeout)
    except grpc.RpcError as exc:
        raise client.error_from(exc) from None
    if args.json:
        print(cli_format.to_json(response))
        return 0
    rows = [
        (
            image.reference,
            image.manifest.digest.removeprefix("sha256:")[:12],
            str(len(image.layers)),
            cli_format.human_bytes(image.size),
        )
        for image in response.images
    ]
    print(cli_format.render_table(("REFERENCE", "DIGEST", "LAYERS", "SIZE"), rows))
    return 0


def command_rm(args: argparse.Namespace, client: Any) -> int:
    import grpc

    from adapter.api.containerizer.v1 import images_pb2

    request = images_pb2.RemoveImageRequest(reference=args.reference)
    try:
        response = images_stub(client).Remove(request, timeout=client.timeout)
    except grpc.RpcError as exc:
        raise client.error_from(exc) from None
    print(cli_format.to_json(response) if args.json else f"removed {args.reference}")
    return 0


def add_images_commands(subcommands: Any) -> None:
    """Register `images` and its subcommands on the top-level parser."""
    help_text = "manage the node's image store"
    images = subcommands.add_parser("images", help=help_text, description=help_text)
    group = images.add_subparsers(dest="images_command", metavar="COMMAND", required=True)
    imported = add_subcommand(
        group,
        "import",
        command_import,
        "import an OCI-layout or docker-archive tarball, or the node's own busybox image",
    )
    imported.add_argument("file", metavar="FILE", nargs="?", help="tarball on this node")
    imported.add_argument(
        "--busybox",
        action="store_true",
        help="build localhost/busybox:latest from this node's /bin/busybox (busybox-static) "
        "and import it: a small workload image without a download",
    )
    pulled = add_subcommand(
        group, "pull", command_pull, "pull HOST[:PORT]/NAME[:TAG] from a registry"
    )
    pulled.add_argument("reference", metavar="REF")
    pulled.add_argument("--username", help="user to present to the registry when it asks")
    pulled.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password (with --username) or a registry token from standard input",
    )
    add_subcommand(group, "ls", command_ls, "list images")
    removed = add_subcommand(group, "rm", command_rm, "remove an image")
    removed.add_argument("reference", metavar="REF")
    add_subcommand(
        group,
        "prune",
        command_prune,
        "remove every image no container uses, and the blobs and layers no image names",
    )
