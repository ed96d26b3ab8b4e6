"""How every `containerizer` command reaches the service: the connection flags it accepts (before
or after the subcommand), the client they configure, the one error type the CLI reports and its
exit statuses, and the one shape of a warning.

main.py and every command module build on this module and none of them on main.py, so the
command modules import each other in no circle. grpc and the generated stubs are imported
inside the methods that talk to the service: building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import TYPE_CHECKING, Any, NamedTuple

from adapter.clients.cli import format as cli_format

# Every command imports this module: nothing here that `ps` does not use (queue, dataclasses).
if TYPE_CHECKING:
    import queue

    from adapter.api.containerizer.v1 import containerizer_pb2 as pb

PROG = "containerizer"
ENDPOINT_ENV = "CONTAINERIZER_ENDPOINT"
DEFAULT_ENDPOINT = "unix:///run/containerizer/containerizer.sock"
DEFAULT_TIMEOUT_SECONDS = 30.0
# The CLI's own failures, usage errors included, share docker's 125: argparse's 2 and a plain 1
# are exit codes a workload could have returned.
EXIT_FAILURE = cli_format.EXIT_CLI_FAILURE
EXIT_USAGE = EXIT_FAILURE
EXIT_INTERRUPTED = 130  # after Ctrl-C, as a shell reports SIGINT
# The TCP listener takes only clients with a certificate (mutual TLS): flag -> environment.
TLS_ENV = {
    "tls_cert": "CONTAINERIZER_TLS_CERT",
    "tls_key": "CONTAINERIZER_TLS_KEY",
    "tls_ca": "CONTAINERIZER_TLS_CA",
}
# After an UNAVAILABLE, how long to check whether the service itself answered (connection is up).
REACHABILITY_PROBE_SECONDS = 0.5
# Modules that grpc and protobuf import and no command uses, loaded only if something asks for
# them (LoadedOnUse): grpc's asyncio API (our calls are synchronous), a tenth of importing grpc;
# protobuf's pure-Python message implementation, which its descriptor pool imports even when the C
# one (upb) builds every message, and with it text_format, the Python encoder and decoder, pickle
# and copy: more than half of what loading our API costs a command.
GRPC_ASYNCIO = "grpc.aio"
PURE_PYTHON_MESSAGES = "google.protobuf.internal.python_message"


class CliError(Exception):
    """An error worth one line on stderr; carries the exit status."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def warn(message: str) -> None:
    """Something the user should know that does not fail the command: one line on stderr."""
    print(f"warning: {message}", file=sys.stderr)


def grpc_target(endpoint: str) -> str:
    """A socket path (absolute or relative), `unix:PATH` or `host:port` -> a grpc target."""
    if endpoint.startswith(("/", ".")) or ":" not in endpoint:
        return "unix:" + os.path.abspath(endpoint)
    return endpoint


class TlsFiles(NamedTuple):
    """Our side of the TCP listener's mutual TLS: our certificate and key (signed by the CA the
    service trusts) and the CA that signed the service's certificate."""

    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TlsFiles:
        return cls(*(getattr(args, name, None) for name in TLS_ENV))

    def credentials(self, target: str) -> Any:
        """grpc channel credentials, or a CliError naming what is missing or unreadable."""
        import grpc

        flags = {name: "--" + name.replace("_", "-") for name in TLS_ENV}
        missing = [flags[name] for name in TLS_ENV if not getattr(self, name)]
        if missing:
            raise CliError(
                f"the TCP endpoint {target} needs client certificates: give"
                f" {', '.join(missing)} (or ${', $'.join(TLS_ENV[n] for n in TLS_ENV)})"
            )
        pem: dict[str, bytes] = {}
        for name in TLS_ENV:
            path = str(getattr(self, name))
            try:
                with open(path, "rb") as source:
                    pem[name] = source.read()
            except OSError as exc:
                raise CliError(f"{flags[name]}: cannot read {path}: {exc.strerror}") from None
        return grpc.ssl_channel_credentials(
            root_certificates=pem["tls_ca"],
            private_key=pem["tls_key"],
            certificate_chain=pem["tls_cert"],
        )


def open_channel(target: str, tls: TlsFiles) -> Any:
    """The Unix socket as it is (root-only by its mode); a TCP endpoint only over mutual TLS.
    Connecting starts at once, in grpc's own threads, while the caller loads the API's stubs."""
    if "grpc" not in sys.modules:  # else its asyncio API came with it (tests, in-process use)
        defer_import(GRPC_ASYNCIO)
    import grpc

    # The service is node-local: an http_proxy in the environment must never be used for it.
    options = [("grpc.enable_http_proxy", 0)]
    if target.startswith("unix:"):
        channel = grpc.insecure_channel(target, options=options)
    else:
        channel = grpc.secure_channel(target, tls.credentials(target), options=options)
    start_connecting(channel)
    return channel


def start_connecting(channel: Any) -> None:
    """Ask the channel to connect now rather than at its first call. grpc has no public call for
    this but subscribe(), whose polling and delivery threads would cost more than the overlap
    saves; without the core channel (another grpc), the first call connects, as it always may."""
    core_channel = getattr(channel, "_channel", None)
    check_state = getattr(core_channel, "check_connectivity_state", None)
    if check_state is not None:
        check_state(True)  # True: try to connect


class LoadedOnUse(ModuleType):
    """A module's stand-in in sys.modules: the first attribute asked of it imports the module,
    whose names it then takes, so whoever imported the stand-in holds the module."""

    def __getattr__(self, name: str) -> Any:
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        module = importlib.import_module(self.__name__)
        self.__dict__.update(module.__dict__)
        return getattr(module, name)


def defer_import(name: str) -> None:
    """Import `name` from now on as a LoadedOnUse stand-in, also as its package's attribute if
    the package is loaded (else the package's own import of it binds the stand-in)."""
    stand_in = LoadedOnUse(name)
    sys.modules[name] = stand_in
    package, _, attribute = name.rpartition(".")
    if package in sys.modules:
        setattr(sys.modules[package], attribute, stand_in)


def load_api_stubs() -> ModuleType:
    """The generated gRPC stubs of our API, without protobuf's pure-Python messages when its C
    implementation is the one in use (the pure-Python one builds every message with them).
    Nothing deferred once protobuf is loaded (the service's own process, tests)."""
    if PURE_PYTHON_MESSAGES not in sys.modules:
        from google.protobuf.internal import api_implementation  # type: ignore[import-untyped, unused-ignore]

        if api_implementation.Type() == "upb":
            defer_import(PURE_PYTHON_MESSAGES)
    from adapter.api.containerizer.v1 import containerizer_pb2_grpc

    return containerizer_pb2_grpc


class ServiceClient:
    """One channel to the service; every failed call becomes a CliError with a readable line."""

    def __init__(self, endpoint: str, timeout: float, tls: TlsFiles | None = None) -> None:
        self.target = grpc_target(endpoint)
        self.timeout = timeout
        self.channel = open_channel(self.target, tls or TlsFiles())
        self.stub = load_api_stubs().ContainerizerStub(self.channel)

    def call(self, method: str, request: Any) -> Any:
        """A unary RPC bounded by --timeout."""
        import grpc

        try:
            return getattr(self.stub, method)(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise self.error_from(exc) from None

    def wait_future(self, container_id: str) -> Any:
        """Wait without a deadline (a workload may run for days), as a grpc future."""
        from adapter.api.containerizer.v1 import containerizer_pb2 as pb

        return self.stub.Wait.future(pb.WaitRequest(container_id=container_id))

    def wait(self, container_id: str) -> pb.Termination:
        termination: pb.Termination = self.result(self.wait_future(container_id)).termination
        return termination

    def result(self, future: Any) -> Any:
        import grpc

        try:
            return future.result()
        except grpc.RpcError as exc:
            raise self.error_from(exc) from None

    def error_from(self, exc: Any) -> CliError:
        import grpc

        code, details = exc.code(), exc.details() or exc.code().name
        if code == grpc.StatusCode.UNAVAILABLE and not self.service_is_reachable():
            return CliError(
                f"cannot reach the service at {self.target}: is `containerizer serve` running? "
                f"({code.name}: {details})"
            )
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return CliError(
                f"no answer from the service at {self.target} within {self.timeout:g}s "
                "(raise --timeout if it is busy)"
            )
        return CliError(details)

    def service_is_reachable(self) -> bool:
        """Tells 'no service' from the service's own UNAVAILABLE (e.g. a runtime is down)."""
        import grpc

        ready = grpc.channel_ready_future(self.channel)
        try:
            ready.result(timeout=REACHABILITY_PROBE_SECONDS)
            return True
        except grpc.FutureTimeoutError:
            ready.cancel()
            return False

    def close(self) -> None:
        self.channel.close()


def until_done(requests: queue.Queue[Any]) -> Iterator[Any]:
    """A streaming call's requests, taken from `requests` (filled by other threads: our stdin,
    signals, a socket) until a None says there are no more."""
    while (request := requests.get()) is not None:
        yield request


# ---- the flags every service command accepts ----

ServiceCommand = Callable[[argparse.Namespace, ServiceClient], int]


def add_connection_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """Accepted before and after the subcommand (`kill ID --json` as `--json kill ID`); a
    subcommand only overrides what it was given."""

    def default(value: object) -> object:
        return value if top else argparse.SUPPRESS

    parser.add_argument(
        "--endpoint",
        default=default(os.environ.get(ENDPOINT_ENV) or DEFAULT_ENDPOINT),
        help=(
            f"socket path, unix:PATH or host:port (default: ${ENDPOINT_ENV} or {DEFAULT_ENDPOINT})"
        ),
    )
    parser.add_argument(
        "--timeout",
        type=cli_format.positive_float,
        default=default(DEFAULT_TIMEOUT_SECONDS),
        help="seconds to wait for each call; not applied to waiting for a container (default 30)",
    )
    for name, variable in TLS_ENV.items():
        what = {"tls_cert": "our certificate", "tls_key": "its private key"}.get(
            name, "the CA of the service's certificate"
        )
        parser.add_argument(
            "--" + name.replace("_", "-"),
            metavar="PEM",
            default=default(os.environ.get(variable)),
            help=f"TCP endpoint (mutual TLS): {what} (default: ${variable})",
        )
    parser.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print the reply as JSON (64-bit numbers as numbers, empty lists as [])",
    )


def add_subcommand(
    subcommands: Any, name: str, handler: ServiceCommand, help_text: str
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subcommands.add_parser(
        name, help=help_text, description=help_text
    )
    add_connection_options(parser, top=False)
    parser.set_defaults(handler=handler)
    return parser
