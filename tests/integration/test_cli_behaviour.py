"""What a user of `containerizer` relies on, against a real `containerizer serve`: JSON with one
shape and real numbers, flags in either place, `--version`, exit 125 for the CLI's own failures
(never to be mistaken for a workload's 1), warnings on stderr, and an image a fresh node can make
for itself (`images import --busybox`)."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from importlib import metadata

import pytest

from tests.conftest import BIN, ServiceProcess, require, require_root, serving

pytestmark = pytest.mark.integration
CLI_FAILURE = 125
BUSYBOX_REFERENCE = "localhost/busybox:latest"


def containerizer(
    endpoint: str, *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "containerizer"), "--endpoint", endpoint, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """A service of this module's own, so what it lists and stores is this module's only."""
    require_root()
    require((BIN / "containerizer").exists(), "containerizer not installed")
    process = ServiceProcess(tmp_path_factory.mktemp("cli-behaviour"))
    yield from serving(process)


@pytest.fixture
def sleeper(node: ServiceProcess, container_id: str) -> Iterator[str]:
    """A running container on the host filesystem; destroyed and forgotten afterwards."""
    done = containerizer(node.endpoint, "run", "-d", "--id", container_id, "--", "sleep", "600")
    assert done.returncode == 0, done.stderr
    yield container_id
    for _ in range(2):  # destroy, then drop the retained termination
        containerizer(node.endpoint, "destroy", container_id)


def test_ps_json_of_a_node_without_containers_has_the_containers_key(
    fresh_service: ServiceProcess,
) -> None:
    done = containerizer(fresh_service.endpoint, "ps", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"containers": []}


def test_usage_json_numbers_are_numbers(node: ServiceProcess, sleeper: str) -> None:
    done = containerizer(node.endpoint, "usage", sleeper, "--json")
    assert done.returncode == 0, done.stderr
    statistics = json.loads(done.stdout)
    assert isinstance(statistics["mem_rss_bytes"], int) and statistics["mem_rss_bytes"] > 0
    texts = {name: value for name, value in statistics.items() if isinstance(value, str)}
    assert texts == {}, "every statistic is a number"


def test_connection_flags_and_json_after_the_subcommand(node: ServiceProcess, sleeper: str) -> None:
    done = containerizer(
        "/nonexistent.sock", "kill", sleeper, "--json", "--signal", "KILL", "--endpoint",
        node.endpoint, "--timeout", "20",
    )  # fmt: skip
    assert (done.returncode, json.loads(done.stdout)) == (0, {}), done.stderr
    done = containerizer(node.endpoint, "wait", sleeper, "--json")
    assert done.returncode == 128 + 9
    assert json.loads(done.stdout)["termination"]["signal"] == 9


def test_version_is_the_package_version() -> None:
    done = subprocess.run(
        [str(BIN / "containerizer"), "--version"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0
    assert done.stdout == f"containerizer {metadata.version('containerizer-adapter')}\n"


def test_cli_failures_exit_125_and_a_workload_exit_1_stays_1(node: ServiceProcess) -> None:
    not_found = containerizer(node.endpoint, "status", "no-such-container")
    assert not_found.returncode == CLI_FAILURE, not_found.stderr
    no_image = containerizer(node.endpoint, "run", "--image", "localhost/absent:1", "--", "true")
    assert no_image.returncode == CLI_FAILURE and "localhost/absent:1" in no_image.stderr
    bad_flag = containerizer(node.endpoint, "run", "--mem", "lots", "--", "true")
    assert bad_flag.returncode == CLI_FAILURE and "--mem" in bad_flag.stderr
    socket_dir = tempfile.mkdtemp(prefix="cz-cli-", dir="/tmp")
    try:
        absent = containerizer(f"{socket_dir}/absent.sock", "ps")
    finally:
        shutil.rmtree(socket_dir)
    assert absent.returncode == CLI_FAILURE and "cannot reach the service" in absent.stderr
    workload = containerizer(node.endpoint, "run", "--", "sh", "-c", "exit 1")
    assert (workload.returncode, workload.stderr) == (1, "")


def test_update_below_the_minimum_warns_on_stderr(node: ServiceProcess, sleeper: str) -> None:
    done = containerizer(node.endpoint, "update", sleeper, "--mem", "16M")
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith("warning: ") and "mem" in done.stderr, done.stderr


def test_images_import_busybox_makes_an_image_that_runs(fresh_service: ServiceProcess) -> None:
    require(shutil.which("busybox") is not None, "busybox missing: apt-get install busybox-static")
    endpoint = fresh_service.endpoint
    done = containerizer(endpoint, "images", "import", "--busybox")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"imported {BUSYBOX_REFERENCE} sha256:")
    listed = json.loads(containerizer(endpoint, "images", "ls", "--json").stdout)["images"]
    assert [image["reference"] for image in listed] == [BUSYBOX_REFERENCE]
    script = "id -un; ls /bin | wc -l; touch /tmp/x && echo tmp-writable; grep -c : /etc/group"
    ran = containerizer(endpoint, "run", "--image", BUSYBOX_REFERENCE, "--shell", script)
    assert ran.returncode == 0, ran.stderr
    user, applets, tmp, groups = ran.stdout.split()
    assert (user, tmp, groups) == ("root", "tmp-writable", "2")
    assert int(applets) > 100  # every applet of busybox, not a hand-picked few
    nobody = containerizer(
        endpoint, "run", "--image", BUSYBOX_REFERENCE, "--user", "nobody", "--", "id", "-un"
    )
    assert (nobody.returncode, nobody.stdout) == (0, "nobody\n"), nobody.stderr
