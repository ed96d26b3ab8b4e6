"""`containerizer run`: launch a container, follow its output, exit like its workload.

Without -i/-t the workload's stdout and stderr files in the sandbox are followed (tail -f) onto
ours until Wait answers; with them the CLI attaches (attach.py). The exit status is the
workload's own (128+n when killed by signal n); Ctrl-C destroys the container and exits 130.
Its flags are the largest set of any command, so they are defined only when `run` is given.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import IO, TYPE_CHECKING, Any

from adapter.clients.cli import format as cli_format
from adapter.clients.cli.client import (
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    PROG,
    CliError,
    ServiceClient,
    add_subcommand,
    warn,
)
from adapter.clients.cli.containers import (
    add_resource_options,
    destroy_request,
    resource_messages,
)

if TYPE_CHECKING:
    from adapter.api.containerizer.v1 import containerizer_pb2 as pb

# How often `run` looks for new output while the workload runs: fast enough to feel live.
OUTPUT_POLL_SECONDS = 0.05
OUTPUT_CHUNK_BYTES = 1 << 16


class OutputFollower:
    """Copies what the workload appends to one sandbox file onto one of our streams (tail -f)."""

    def __init__(self, path: str, sink: IO[str]) -> None:
        self.path = path
        self.sink = sink
        self.source: IO[bytes] | None = None
        self.unreadable = False

    def pump(self) -> None:
        if self.source is None and not self.unreadable:
            self.open_source()
        while self.source is not None and (chunk := self.source.read(OUTPUT_CHUNK_BYTES)):
            write_bytes(self.sink, chunk)

    def open_source(self) -> None:
        try:
            self.source = open(self.path, "rb")  # noqa: SIM115 - held open across pumps
        except FileNotFoundError:
            return  # the service has not created it yet
        except OSError as exc:
            self.unreadable = True
            warn(f"cannot follow {self.path}: {exc.strerror}; output is not shown")

    def close(self) -> None:
        if self.source is not None:
            self.source.close()


def write_bytes(sink: IO[str], data: bytes) -> None:
    """The workload's bytes unchanged when the stream has a binary side, else decoded."""
    sink.flush()
    binary = getattr(sink, "buffer", None)
    if binary is not None:
        binary.write(data)
        binary.flush()
    else:
        sink.write(data.decode(errors="replace"))
        sink.flush()


def launch_request(args: argparse.Namespace) -> pb.LaunchRequest:
    from adapter.api.containerizer.v1 import containerizer_pb2 as pb

    command = pb.CommandInfo(
        shell=args.shell or "",
        argv=args.command,
        environment=[pb.EnvironmentVariable(name=k, value=v) for k, v in args.env],
        user=args.user or "",
        working_dir=args.workdir or "",
    )
    return pb.LaunchRequest(
        container_id=args.id,
        command=command,
        resources=resource_messages(args),
        container=pb.ContainerInfo(
            runtime=args.runtime or "",
            image=args.image or "",
            network=pb.NetworkInfo(mode=args.network or "", port_mappings=args.publish),
        ),
        sandbox=os.path.abspath(args.sandbox) if args.sandbox else "",
        labels=dict(args.label),
        privileged=args.privileged,
        no_new_privileges=args.no_new_privileges,
        stdin=args.interactive,
        tty=args.tty,
        user_namespace=args.userns,
    )


def command_run(args: argparse.Namespace, client: ServiceClient) -> int:
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if bool(args.shell) == bool(args.command):
        raise CliError(
            "run: give the command after `--` (run -- sh -c 'echo hi') or as --shell 'STRING', "
            "not both",
            EXIT_USAGE,
        )
    import secrets  # here: hashlib and random cost every other command's start

    args.id = args.id or "ctr-" + secrets.token_hex(6)
    try:
        response = client.call("Launch", launch_request(args))
        for warning in response.warnings:
            warn(warning)
        if args.detach:
            print(cli_format.to_json(response) if args.json else response.status.container_id)
            return 0
        if args.interactive or args.tty:
            from adapter.clients.cli.attach import attach  # its own module: attach

            attach(client, args.id, stdin=args.interactive)
            termination = client.wait(args.id)
        else:
            termination = follow_until_exit(client, args.id, response.status.sandbox)
    except KeyboardInterrupt:
        return destroy_after_interrupt(client, args.id)
    return report_exit(args.id, termination)


def follow_until_exit(client: ServiceClient, container_id: str, sandbox: str) -> pb.Termination:
    """Streams stdout/stderr until Wait answers, then drains what is left."""
    followers = []
    if sandbox:
        followers = [
            OutputFollower(os.path.join(sandbox, "stdout"), sys.stdout),
            OutputFollower(os.path.join(sandbox, "stderr"), sys.stderr),
        ]
    future = client.wait_future(container_id)
    try:
        while not future.done():
            for follower in followers:
                follower.pump()
            time.sleep(OUTPUT_POLL_SECONDS)
        for follower in followers:
            follower.pump()
        termination: pb.Termination = client.result(future).termination
        return termination
    finally:
        future.cancel()
        for follower in followers:
            follower.close()


def destroy_after_interrupt(client: ServiceClient, container_id: str) -> int:
    print(f"{PROG}: interrupted: destroying container {container_id}", file=sys.stderr)
    try:
        client.call("Destroy", destroy_request(container_id))
    except CliError as exc:
        # Ctrl-C during Launch may come before the container exists: nothing left to destroy.
        print(f"{PROG}: destroy {container_id}: {exc}", file=sys.stderr)
    return EXIT_INTERRUPTED


def report_exit(container_id: str, termination: pb.Termination) -> int:
    """The workload's exit status; anything but a plain exit is explained on stderr."""
    if cli_format.reason_name(termination) != "EXITED" or not termination.HasField("exit_code"):
        description = cli_format.describe_termination(termination)
        print(f"{PROG}: container {container_id}: {description}", file=sys.stderr)
    return cli_format.exit_code_of(termination)


def add_run_parser(subcommands: Any) -> None:
    from adapter.core.model import NETWORK_MODES
    from adapter.runtimes.registry import RUNTIME_NAMES

    run = add_subcommand(subcommands, "run", command_run, "launch a container and follow it")
    run.add_argument(
        "--runtime",
        choices=RUNTIME_NAMES,
        help="runtime from the node's config; default: the node's default one",
    )
    add_resource_options(run, disk=True)
    run.add_argument("--image", help="image reference; default: the runtime's root filesystem")
    run.add_argument("--id", help="container id; default: ctr- and 12 random hex digits")
    run.add_argument(
        "--network",
        choices=NETWORK_MODES,
        help="network mode; default: the node's (config [network])",
    )
    run.add_argument(
        "--publish",
        "-p",
        action="append",
        default=[],
        metavar="HOST_PORT:CONTAINER_PORT[/tcp|/udp]",
        help="forward 127.0.0.1:HOST_PORT to the container (bridge mode); repeatable",
    )
    run.add_argument(
        "--env",
        type=cli_format.key_value,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="repeatable",
    )
    run.add_argument("--user", help="user name or uid to run as")
    run.add_argument(
        "--privileged",
        action="store_true",
        help="no confinement: all capabilities, no seccomp (the node must allow it)",
    )
    run.add_argument(
        "--no-new-privileges",
        action="store_true",
        help="set no_new_privs even as root (always set for other users)",
    )
    run.add_argument(
        "--userns",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="in a user namespace of its own (root is an unprivileged host uid); default: the"
        " node's",
    )
    run.add_argument("--workdir", help="working directory inside the container")
    run.add_argument("--sandbox", metavar="DIR", help="host directory for stdout/stderr files")
    run.add_argument(
        "--label",
        type=cli_format.key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="repeatable",
    )
    run.add_argument("--detach", "-d", action="store_true", help="print the id and return at once")
    run.add_argument(
        "--interactive", "-i", action="store_true", help="keep its stdin open, pass ours to it"
    )
    run.add_argument("--tty", "-t", action="store_true", help="give it a terminal")
    run.add_argument("--shell", metavar="STRING", help="run STRING with /bin/sh -c")
    run.add_argument("command", nargs=argparse.REMAINDER, help="argv to execute (after --)")
