"""Session fixtures for image tests: the busybox tarballs (built once per xdist worker) and a
private `docker-registry` (Debian's package of the distribution registry) on 127.0.0.1.

Test modules import the fixtures they use (`from tests.image_fixtures import ...`); a conftest
`pytest_plugins = ["tests.image_fixtures"]` line would make that unnecessary.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from adapter.images import ImageStore
from adapter.images.overlay import DetachedOverlay
from tests.conftest import require
from tests.images import BUSYBOX, busybox_docker_archive, busybox_oci_layout

REGISTRY_BINARY = "docker-registry"
REGISTRY_START_SECONDS = 20


ImageFiles = Callable[[ImageStore, str], Awaitable[Path]]


@pytest.fixture
def image_files() -> Iterator[ImageFiles]:
    """`await image_files(store, reference)`: a path to the image's files as a container sees
    them (a detached read-only overlay of its layers), open until the test ends."""
    with contextlib.ExitStack() as views:

        async def open_files(store: ImageStore, reference: str) -> Path:
            layers = await store.layers(reference)
            return views.enter_context(DetachedOverlay(layers)).root

        yield open_files


@pytest.fixture(scope="session")
def busybox_oci_tar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require(BUSYBOX.is_file(), f"{BUSYBOX} missing: apt-get install busybox-static")
    return busybox_oci_layout(tmp_path_factory.mktemp("busybox-oci"))


@pytest.fixture(scope="session")
def busybox_docker_tar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require(BUSYBOX.is_file(), f"{BUSYBOX} missing: apt-get install busybox-static")
    return busybox_docker_archive(tmp_path_factory.mktemp("busybox-docker"))


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def registry_answers(address: str) -> bool:
    connection = http.client.HTTPConnection(address, timeout=1)
    try:
        connection.request("GET", "/v2/")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


@pytest.fixture(scope="session")
def local_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """host:port of a registry with its own storage, stopped (terminate, then kill) at the end."""
    binary = shutil.which(REGISTRY_BINARY)
    require(binary is not None, f"{REGISTRY_BINARY} missing: apt-get install docker-registry")
    assert binary is not None
    with registry_process(binary, tmp_path_factory.mktemp("registry")) as address:
        yield address


@contextlib.contextmanager
def registry_process(binary: str, workdir: Path) -> Iterator[str]:
    """The registry behind `local_registry`, for a caller that is not a test (a benchmark)."""
    address = f"127.0.0.1:{free_loopback_port()}"
    # JSON is YAML: the storage path and address are quoted by the json module, not pasted.
    config = {
        "version": 0.1,
        "log": {"level": "warn"},
        "storage": {"filesystem": {"rootdirectory": str(workdir / "storage")}},
        "http": {"addr": address},
    }
    (workdir / "config.yml").write_text(json.dumps(config))
    with open(workdir / "registry.log", "wb") as log:
        process = subprocess.Popen(
            [binary, "serve", str(workdir / "config.yml")],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + REGISTRY_START_SECONDS
        while not registry_answers(address):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"registry did not start:\n{(workdir / 'registry.log').read_text()}"
                )
            time.sleep(0.05)
        yield address
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        with contextlib.suppress(OSError):
            shutil.rmtree(workdir / "storage")
