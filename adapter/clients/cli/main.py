"""`containerizer`: the command line in front of the gRPC API, and its entry point.

Thin on purpose: parse the arguments, call one or two RPCs, print the answer (format.py). This
module is the parser and the dispatch only; each command's flags and handler live in the module
of its area (containers.py, run.py, service.py, images.py, compare.py, ...), imported only when
that command is the one given (LazySubcommands), and grpc and the generated stubs are imported
inside the commands that talk to the service: `--help` and usage errors start without paying for
them, `serve` pays for none of the client's, and `ps` costs little more than grpc itself.

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
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, cast

from adapter.clients.cli.client import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    PROG,
    CliError,
    ServiceClient,
    ServiceCommand,
    TlsFiles,
    add_connection_options,
)

if TYPE_CHECKING:
    SubParsersAction = argparse._SubParsersAction[argparse.ArgumentParser]
else:  # not subscriptable at run time
    SubParsersAction = argparse._SubParsersAction

DISTRIBUTION = "containerizer-adapter"  # the project name in pyproject.toml


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


CLI = "adapter.clients.cli."


def defined_in(module: str, function: str) -> Callable[[Any], object]:
    """A subcommand defined by `function` of its own `module` of this package, imported only
    when chosen."""

    def define(subcommands: Any) -> object:
        adder: Callable[[Any], object] = getattr(importlib.import_module(CLI + module), function)
        return adder(subcommands)

    return define


# name -> (its line in `containerizer --help`, what defines its parser), in the listing's order.
# Each line repeats the description its module gives the subcommand's own --help: the listing
# must not import the modules it lists.
SUBCOMMANDS: dict[str, tuple[str, Callable[[Any], object]]] = {
    "serve": ("run the service", defined_in("service", "add_serve_parser")),
    "run": ("launch a container and follow it", defined_in("run", "add_run_parser")),
    "ps": ("list containers", defined_in("containers", "add_ps_parser")),
    "status": ("show one container", defined_in("containers", "add_status_parser")),
    "usage": ("resource usage of a container", defined_in("containers", "add_usage_parser")),
    "update": ("change resource limits, live", defined_in("containers", "add_update_parser")),
    "kill": ("send a signal to a container", defined_in("containers", "add_kill_parser")),
    "destroy": ("kill and clean up a container", defined_in("containers", "add_destroy_parser")),
    "wait": ("wait for a container to end", defined_in("containers", "add_wait_parser")),
    "runtimes": ("runtimes configured on this node", defined_in("service", "add_runtimes_parser")),
    "images": ("manage the node's image store", defined_in("images", "add_images_commands")),
    "exec": ("run a command in a running container", defined_in("exec", "add_exec_parser")),
    "attach": (
        "attach to a running container's first process",
        defined_in("attach", "add_attach_parser"),
    ),
    "logs": ("show a container's output", defined_in("logs", "add_logs_parser")),
    "port-forward": (
        "reach a port inside a container",
        defined_in("portforward", "add_port_forward_parser"),
    ),
    "compare": (
        "run the same workloads on each runtime and compare latency, density, isolation, "
        "accounting and capabilities",
        defined_in("compare", "add_compare_parser"),
    ),
    "events": ("follow lifecycle events", defined_in("events", "add_events_parser")),
    "completion": (
        "print a bash or zsh completion script",
        defined_in("completion", "add_completion_parser"),
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
    if args.subcommand == "serve":  # the one command without a client (service.py)
        gc.enable()  # entry() turned it off for the start-up: the service runs for months
        serve: Callable[[argparse.Namespace], int] = args.handler
        return serve(args)
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
