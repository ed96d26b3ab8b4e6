"""`containerizer`: the command line in front of the gRPC API.

Thin on purpose: parse the arguments, call one or two RPCs, print the answer (cli_format.py). grpc
and the generated stubs are imported inside the commands that talk to the service, so `--help`,
usage errors and `serve` start without paying for them; a subcommand's arguments, and the modules
they need, are defined only when that subcommand is the one given (LazySubcommands), so `ps`
costs little more than grpc itself.

Exit status: the workload's own for `run` and `wait` (128+n when killed by signal n); 125, as
`docker run` uses, for every failure of the CLI, the service or the launch (a bad flag, no service,
no such container or image, a workload that never started or whose status was lost), so none can
be mistaken for a workload's own exit 1; 130 after Ctrl-C. Errors are one line on stderr, never a
traceback. The connection flags and --json are accepted before and after the subcommand.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import IO, TYPE_CHECKING, Any, NoReturn, cast

from adapter.clients.cli import format as cli_format
from adapter.clients.cli.client import (
    EXIT_FAILURE,
    EXIT_USAGE,
    CliError,
    ServiceClient,
    ServiceCommand,
    TlsFiles,
    add_connection_options,
    add_subcommand,
)

if TYPE_CHECKING:
    from adapter.api.containerizer.v1 import containerizer_pb2 as pb

    SubParsersAction = argparse._SubParsersAction[argparse.ArgumentParser]
else:  # not subscriptable at run time
    SubParsersAction = argparse._SubParsersAction

PROG = "containerizer"
DISTRIBUTION = "containerizer-adapter"  # the project name in pyproject.toml
EXIT_INTERRUPTED = 130
# How often `run` looks for new output while the workload runs: fast enough to feel live.
OUTPUT_POLL_SECONDS = 0.05
OUTPUT_CHUNK_BYTES = 1 << 16


class HelpFormatter(argparse.HelpFormatter):
    """argparse's, told the terminal's width so that it does not import `shutil` (and with it
    bz2 and lzma) to find it: argparse makes a formatter for every argument it adds, so that
    import would cost every command's start."""

    def __init__(
        self,
        prog: str,
        indent_increment: int = 2,
        max_help_position: int = 24,
        width: int | None = None,
    ) -> None:
        width = terminal_columns() - 2 if width is None else width  # argparse's margin
        super().__init__(prog, indent_increment, max_help_position, width)


def terminal_columns() -> int:
    """What shutil.get_terminal_size() answers: $COLUMNS, else our stdout's terminal, else 80."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns > 0:
        return columns
    stdout = sys.__stdout__
    try:
        return (os.get_terminal_size(stdout.fileno()).columns if stdout else 0) or 80
    except (ValueError, OSError):  # stdout closed, or not a terminal
        return 80


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports usage errors as a CliError instead of exiting the interpreter."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{message} (see '{self.prog} --help')", EXIT_USAGE)


class VersionAction(argparse.Action):
    """`--version`: the installed package's version, looked up only when asked for."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(
            option_strings, dest, nargs=0, default=argparse.SUPPRESS, help="print the version"
        )

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> NoReturn:
        print(f"{PROG} {package_version()}")
        parser.exit()


def package_version() -> str:
    from importlib import metadata

    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown (not installed as a package)"


# ---- run: launch, follow the output files, exit like the workload ----


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


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


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


def destroy_request(container_id: str) -> pb.DestroyRequest:
    from adapter.api.containerizer.v1 import containerizer_pb2 as pb

    return pb.DestroyRequest(container_id=container_id)


# ---- the other commands ----


def command_serve(args: argparse.Namespace) -> int:
    from adapter.server.serve import run_server

    return run_server(args.config)


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


def command_runtimes(args: argparse.Namespace, client: ServiceClient) -> int:
    from adapter.api.containerizer.v1 import containerizer_pb2 as pb

    response = client.call("Runtimes", pb.RuntimesRequest())
    for entry in response.quarantined:
        warn(f"damaged record of container {entry.container_id} set aside: {entry.error}")
    print(
        cli_format.to_json(response) if args.json else cli_format.runtimes_table(response.runtimes)
    )
    return 0


# ---- the parser ----


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


def add_serve_parser(subcommands: Any) -> None:
    serve = subcommands.add_parser("serve", help=SERVE_HELP, description=SERVE_HELP)
    serve.add_argument("--config", metavar="FILE", help="agent config (TOML)")


def add_ps_parser(subcommands: Any) -> None:
    add_subcommand(subcommands, "ps", command_ps, PS_HELP)


def add_status_parser(subcommands: Any) -> None:
    status = add_subcommand(subcommands, "status", command_status, STATUS_HELP)
    status.add_argument("container_id", metavar="ID")


def add_usage_parser(subcommands: Any) -> None:
    usage = add_subcommand(subcommands, "usage", command_usage, USAGE_HELP)
    usage.add_argument("container_id", metavar="ID")
    usage.add_argument("--watch", "-w", action="store_true", help="repeat until Ctrl-C")
    usage.add_argument(
        "--interval", type=cli_format.positive_float, default=2.0, help="seconds (default 2)"
    )


def add_update_parser(subcommands: Any) -> None:
    update = add_subcommand(subcommands, "update", command_update, UPDATE_HELP)
    update.add_argument("container_id", metavar="ID")
    add_resource_options(update, disk=False)


def add_kill_parser(subcommands: Any) -> None:
    kill = add_subcommand(subcommands, "kill", command_kill, KILL_HELP)
    kill.add_argument("container_id", metavar="ID")
    kill.add_argument(
        "--signal",
        "-s",
        type=cli_format.signal_number,
        default=int(signal.SIGTERM),
        help="default TERM",
    )


def add_destroy_parser(subcommands: Any) -> None:
    destroy = add_subcommand(subcommands, "destroy", command_destroy, DESTROY_HELP)
    destroy.add_argument("container_id", metavar="ID")


def add_wait_parser(subcommands: Any) -> None:
    wait = add_subcommand(subcommands, "wait", command_wait, WAIT_HELP)
    wait.add_argument("container_id", metavar="ID")


def add_runtimes_parser(subcommands: Any) -> None:
    from adapter.runtimes.registry import RUNTIME_NAMES

    add_subcommand(
        subcommands,
        "runtimes",
        command_runtimes,
        f"{RUNTIMES_HELP} (of {', '.join(RUNTIME_NAMES)})",
    )


def defined_in(module: str, function: str) -> Callable[[Any], object]:
    """A subcommand defined by `function` of its own `module`, imported only when chosen."""

    def define(subcommands: Any) -> object:
        adder: Callable[[Any], object] = getattr(importlib.import_module(module), function)
        return adder(subcommands)

    return define


SERVE_HELP = "run the service"
PS_HELP = "list containers"
STATUS_HELP = "show one container"
USAGE_HELP = "resource usage of a container"
UPDATE_HELP = "change resource limits, live"
KILL_HELP = "send a signal to a container"
DESTROY_HELP = "kill and clean up a container"
WAIT_HELP = "wait for a container to end"
RUNTIMES_HELP = "runtimes configured on this node"
CLI = "adapter.clients.cli."
# name -> (its line in `containerizer --help`, what defines its parser), in the listing's order.
# The lines of the commands of other modules repeat those modules' descriptions.
SUBCOMMANDS: dict[str, tuple[str, Callable[[Any], object]]] = {
    "serve": (SERVE_HELP, add_serve_parser),
    "run": ("launch a container and follow it", add_run_parser),
    "ps": (PS_HELP, add_ps_parser),
    "status": (STATUS_HELP, add_status_parser),
    "usage": (USAGE_HELP, add_usage_parser),
    "update": (UPDATE_HELP, add_update_parser),
    "kill": (KILL_HELP, add_kill_parser),
    "destroy": (DESTROY_HELP, add_destroy_parser),
    "wait": (WAIT_HELP, add_wait_parser),
    "runtimes": (RUNTIMES_HELP, add_runtimes_parser),
    "images": ("manage the node's image store", defined_in(CLI + "images", "add_images_commands")),
    "exec": ("run a command in a running container", defined_in(CLI + "exec", "add_exec_parser")),
    "attach": (
        "attach to a running container's first process",
        defined_in(CLI + "attach", "add_attach_parser"),
    ),
    "logs": ("show a container's output", defined_in(CLI + "logs", "add_logs_parser")),
    "port-forward": (
        "reach a port inside a container",
        defined_in(CLI + "portforward", "add_port_forward_parser"),
    ),
    "compare": (
        "run the same workloads on each runtime and compare latency, density, isolation, "
        "accounting and capabilities",
        defined_in(CLI + "compare", "add_compare_parser"),
    ),
    "events": ("follow lifecycle events", defined_in(CLI + "events", "add_events_parser")),
    "completion": (
        "print a bash or zsh completion script",
        defined_in(CLI + "completion", "add_completion_parser"),
    ),
}


class LazySubcommands(SubParsersAction):
    """Subcommands whose parsers are defined only once one is chosen: the listing of `--help`
    needs only names and lines, and `ps` must not import what `run`, `images` or `compare`
    need (the runtime registry, the model, the compare workloads).

    Until then a subcommand is its name in argparse's map (for `invalid choice`), mapped to
    one shared stand-in parser, and its line in the listing: a parser each would cost more
    than all of `ps`'s own parsing. Choosing it replaces both with what its definer adds."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.definers: dict[str, Callable[[Any], object]] = {}
        self.stand_in = ArgumentParser(add_help=False)

    def add_lazily(self, name: str, help_text: str, define: Callable[[Any], object]) -> None:
        self._name_parser_map[name] = self.stand_in
        self._choices_actions.append(self._ChoicesPseudoAction(name, (), help_text))
        self.definers[name] = define

    def define(self, name: str) -> None:
        define = self.definers.pop(name, None)
        if define is None:
            return  # defined already, or not ours: argparse reports an unknown one
        del self._name_parser_map[name]  # the real parser takes the stand-in's place
        self._choices_actions = [line for line in self._choices_actions if line.dest != name]
        define(self)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        if values:
            self.define(values[0])
        super().__call__(parser, namespace, values, option_string)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROG, description="Run and inspect containers on this node.")
    parser.add_argument("--version", action=VersionAction)
    add_connection_options(parser, top=True)
    subcommands = cast(
        LazySubcommands,
        parser.add_subparsers(
            dest="subcommand", metavar="COMMAND", required=True, action=LazySubcommands
        ),
    )
    for name, (help_text, define) in SUBCOMMANDS.items():
        subcommands.add_lazily(name, help_text, define)
    return parser


def dispatch(args: argparse.Namespace) -> int:
    if args.subcommand == "serve":
        gc.enable()  # entry() turned it off for the start-up: the service runs for months
        return command_serve(args)
    client = ServiceClient(args.endpoint, args.timeout, TlsFiles.from_args(args))
    gc.enable()  # grpc and the API are loaded (see entry()): `run` or `logs -f` may last days
    try:
        handler: ServiceCommand = args.handler
        return handler(args, client)
    finally:
        client.close()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return dispatch(args)
    except CliError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.exit_code
    except SystemExit as exc:  # --help and --version end here
        if exc.code is None:
            return 0
        return exc.code if isinstance(exc.code, int) else EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`containerizer ps | head -1`): not an error worth a traceback.
        silence_stdout()
        return EXIT_FAILURE


def entry() -> NoReturn:
    """The `containerizer` console script: main(), then, once our output is flushed, leave
    without interpreter teardown: unloading grpc and protobuf would cost a short command a
    fifth of its time and does nothing useful. `serve` leaves the ordinary way: the service
    may have left something for the interpreter's exit to finish.

    The cyclic garbage collector is off until the modules are loaded (dispatch() turns it
    back on): loading grpc and protobuf allocates a few hundred thousand objects that all
    stay, and collecting among them cost `ps` 8% of its time for nothing."""
    gc.disable()
    code = main()
    if "serve" in sys.argv[1:]:  # maybe a container named serve: then only a slower exit
        sys.exit(code)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:  # the reader went away (`containerizer ps | head -1`)
        code = code or EXIT_FAILURE
    os._exit(code)


def silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass  # not a real file descriptor (tests, embedding): nothing will be flushed to it


if __name__ == "__main__":
    entry()
