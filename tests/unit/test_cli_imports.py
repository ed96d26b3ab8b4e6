"""`containerizer` loads only what the command given needs: `ps` must not pay for the modules
of `run`, `images` or `compare` (the runtime registry, the model, the compare workloads), and
the listing of `--help` for none of them. Checked in a fresh interpreter, against the fake
service of test_cli."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.unit.test_cli import Cli, FakeContainerizer, run_cli, service  # noqa: F401 - fixtures

# What `ps` needs of the package: the CLI's common modules, its own (containers) and the API's
# generated ones.
PS_MODULES = {
    "adapter",
    "adapter.api",
    "adapter.api.containerizer",
    "adapter.api.containerizer.v1",
    "adapter.api.containerizer.v1.containerizer_pb2",
    "adapter.api.containerizer.v1.containerizer_pb2_grpc",
    "adapter.clients",
    "adapter.clients.cli",
    "adapter.clients.cli.client",
    "adapter.clients.cli.containers",
    "adapter.clients.cli.format",
    "adapter.clients.cli.main",
}


# main() as the console script runs it, then the modules loaded: -X importtime would miss
# those loaded through importlib.import_module, as a subcommand's own module is.
MAIN = "adapter.clients.cli.main"
MARK = "modules:"
PROGRAM = f"""
import sys
from adapter.clients.cli.main import main
code = main(sys.argv[1:])
print({MARK!r}, *sorted(sys.modules), file=sys.stderr)
sys.exit(code)
"""


def imported_modules(*argv: str, endpoint: str = "") -> tuple[int, set[str]]:
    """The exit status of `containerizer ARGV` and every module it loaded."""
    env = {**os.environ, "CONTAINERIZER_ENDPOINT": endpoint}
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM, *argv],
        capture_output=True,
        env=env,
        timeout=60,
    )
    _, _, names = result.stderr.decode().rpartition(MARK)
    return result.returncode, set(names.split())


def ours(modules: set[str]) -> set[str]:
    return {name for name in modules if name.split(".")[0] in ("adapter", "matplotlib")}


def test_ps_loads_only_the_cli_core_and_the_api(
    run_cli: Cli,  # noqa: F811 - the fixture
    service: FakeContainerizer,  # noqa: F811 - the fixture
) -> None:
    run_cli.launch("c1", "sleep", "10")
    code, loaded = imported_modules("ps", endpoint=service.endpoint)
    assert code == 0
    assert ours(loaded) == PS_MODULES


def test_help_loads_neither_grpc_nor_any_command_module() -> None:
    code, loaded = imported_modules("--help")
    assert code == 0
    assert "grpc" not in loaded
    assert ours(loaded) == {
        "adapter",
        "adapter.clients",
        "adapter.clients.cli",
        "adapter.clients.cli.client",
        "adapter.clients.cli.format",
        "adapter.clients.cli.main",
    }


def test_a_command_loads_its_own_module_when_given() -> None:
    code, loaded = imported_modules("compare", "--help")
    assert code == 0
    assert "adapter.clients.cli.compare" in loaded
    assert "adapter.clients.cli.images" not in loaded


def test_the_console_script_leaves_with_its_output_and_status(
    run_cli: Cli,  # noqa: F811 - the fixture
    service: FakeContainerizer,  # noqa: F811 - the fixture
) -> None:
    # entry() skips the interpreter's teardown: what it printed must still arrive, in full.
    script = Path(sys.executable).parent / "containerizer"
    program = [str(script)] if script.exists() else [sys.executable, "-m", MAIN]
    for number in range(40):
        run_cli.launch(f"c{number:02}", "sleep", "10")
    env = {**os.environ, "CONTAINERIZER_ENDPOINT": service.endpoint}
    listed = subprocess.run([*program, "ps"], capture_output=True, env=env, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[0] for line in listed.stdout.decode().splitlines()[1:]] == [
        f"c{number:02}" for number in range(40)
    ]
    missing = subprocess.run([*program, "status", "gone"], capture_output=True, env=env, timeout=60)
    assert (missing.returncode, missing.stdout) == (125, b"")
    assert missing.stderr.decode().count("\n") == 1 and "gone" in missing.stderr.decode()
