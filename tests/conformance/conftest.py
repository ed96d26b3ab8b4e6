"""Fixtures of the runtime conformance suite: one node (a started service) per runtime and xdist
worker, on the daemons the per-runtime integration tests share, and a node of a test's own for
the tests that crash the service.

A test asks for `node` (or `fresh_node`) with the runtime as an indirect parameter; see
test_runtime_contract.py for the parametrization and the table of declared lacks."""

# The daemon fixtures are imported from their modules and injected by name, which ruff reads as
# redefinition (F811) and as unused imports (F401).
# ruff: noqa: F811

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conformance import runtimes
from tests.conformance.nodes import Node
from tests.conftest import ServiceProcess, require, require_root
from tests.docker_fixtures import (  # noqa: F401  (fixtures, injected by parameter name)
    BUSYBOX,
    PrivateDockerd,
    build_image,
    busybox_image,
    dockerd,
)
from tests.images import CONTRACT_SETTINGS, GROUP, PASSWD, settings_dockerfile
from tests.images import settings_image_layout as settings_layout
from tests.integration.containerd_daemon import SHARED, ContainerdDaemon, containerd_available
from tests.integration.libvirtd import PrivateLibvirtd, libvirtd  # noqa: F401
from tests.integration.test_lxc import require_lxc

DOCKER_SETTINGS_IMAGE = "ctz-contract-settings:latest"


@pytest.fixture(scope="session")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ContainerdDaemon]:
    """The worker's private containerd, shared with the containerd test modules."""
    require_root()
    missing = containerd_available()
    require(missing is None, str(missing))
    daemon = SHARED.acquire(lambda: tmp_path_factory.mktemp("containerd"))
    yield daemon
    SHARED.release()


@pytest.fixture(scope="session")
def settings_tarball(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The busybox image with CONTRACT_SETTINGS, as an OCI layout for the image store."""
    require(BUSYBOX.is_file(), f"{BUSYBOX} missing: apt-get install busybox-static")
    return settings_layout(tmp_path_factory.mktemp("contract-settings"), CONTRACT_SETTINGS)


@pytest.fixture(scope="session")
def docker_settings_image(dockerd: PrivateDockerd) -> str:
    """The same settings image, built in the private dockerd by Docker's own builder."""
    with tempfile.TemporaryDirectory(prefix="ctz-contract-") as tmp:
        context = Path(tmp)
        (context / "passwd").write_bytes(PASSWD)
        (context / "group").write_bytes(GROUP)
        files = {"busybox": BUSYBOX, "passwd": context / "passwd", "group": context / "group"}
        dockerfile = settings_dockerfile(CONTRACT_SETTINGS)
        return build_image(dockerd, DOCKER_SETTINGS_IMAGE, dockerfile, files)


NodeBuilder = Callable[[Path], Node]


def node_builder(request: pytest.FixtureRequest, runtime: str) -> NodeBuilder:
    """How to make a started node of `runtime` in a work directory; the daemons it needs are
    the worker's shared ones, asked for here so that only the runtimes in use start theirs."""
    require_root()
    settings: Path = request.getfixturevalue("settings_tarball")
    if runtime == "native":
        return lambda workdir: runtimes.native_node(workdir, settings)
    if runtime == "lxc":
        require_lxc()
        return lambda workdir: runtimes.lxc_node(workdir, settings)
    if runtime == "containerd":
        daemon: ContainerdDaemon = request.getfixturevalue("containerd")
        return lambda workdir: runtimes.containerd_node(workdir, settings, daemon)
    if runtime == "docker":
        docker: PrivateDockerd = request.getfixturevalue("dockerd")
        image: str = request.getfixturevalue("busybox_image")
        settings_image: str = request.getfixturevalue("docker_settings_image")
        return lambda workdir: runtimes.docker_node(workdir, docker, image, settings_image)
    if runtime == "libvirt":
        libvirt_daemon: PrivateLibvirtd = request.getfixturevalue("libvirtd")
        return lambda workdir: runtimes.libvirt_node(workdir, libvirt_daemon)
    raise ValueError(f"no such runtime: {runtime!r}")


@pytest.fixture(scope="session")
def native_node(request: pytest.FixtureRequest, service: ServiceProcess) -> Node:
    """The suite-wide native service of tests/conftest.py, with the settings image imported."""
    require_root()
    settings: Path = request.getfixturevalue("settings_tarball")
    return runtimes.native_node(service.workdir, settings, service)


def _session_node(
    request: pytest.FixtureRequest, factory: pytest.TempPathFactory, runtime: str
) -> Iterator[Node]:
    build = node_builder(request, runtime)
    node = build(factory.mktemp(f"{runtime}-contract"))
    yield node
    node.stop()


@pytest.fixture(scope="session")
def lxc_node(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Node]:
    yield from _session_node(request, tmp_path_factory, "lxc")


@pytest.fixture(scope="session")
def containerd_node(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Node]:
    yield from _session_node(request, tmp_path_factory, "containerd")


@pytest.fixture(scope="session")
def docker_node(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Node]:
    yield from _session_node(request, tmp_path_factory, "docker")


@pytest.fixture(scope="session")
def libvirt_node(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Node]:
    yield from _session_node(request, tmp_path_factory, "libvirt")


@pytest.fixture
def node(request: pytest.FixtureRequest) -> Node:
    """The worker's node of the runtime given as the indirect parameter."""
    found: Node = request.getfixturevalue(f"{request.param}_node")
    return found


@pytest.fixture
def fresh_node(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Node]:
    """A node of the test's own (the test may kill its service), on the shared daemons."""
    node = node_builder(request, request.param)(tmp_path)
    yield node
    node.stop()
