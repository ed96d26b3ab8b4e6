"""Docker for the test suite: a private dockerd per xdist worker, images built by Docker's own
builder through testcontainers, a registry container on 127.0.0.1, and services configured with
the docker runtime.

Test modules import what they use (`from tests.docker_fixtures import ...`); the conftest line
`pytest_plugins = ["tests.docker_fixtures"]` would register the fixtures for every module.

testcontainers runs without its reaper container (TESTCONTAINERS_RYUK_DISABLED: the suite is
offline and the reaper image cannot be pulled); these fixtures remove what they create instead.
Everything talks to the private daemon only, through `docker_client_kw`, never through a
DOCKER_HOST of the whole process.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from adapter.runtimes.docker.handle import LABEL_CONTAINER_ID
from tests.cgroup_roots import remove_cgroup_trees, run_scoped_name
from tests.conftest import ServiceProcess, require, require_root
from tests.image_fixtures import free_loopback_port, registry_answers
from tests.run_records import run_scoped_tempdir, unmount_below

os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")

DOCKERD = Path("/usr/sbin/dockerd")  # Debian's docker.io (/usr/local/bin/docker is a client)
DOCKER_CLI = Path("/usr/bin/docker")
BUSYBOX = Path("/bin/busybox")  # busybox-static
REGISTRY_BINARY = Path("/usr/bin/docker-registry")  # Debian's docker-registry
BUSYBOX_IMAGE = "ctz-busybox:latest"
REGISTRY_IMAGE = "ctz-registry:latest"
START_SECONDS = 30

BUSYBOX_DOCKERFILE = """\
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
"""
# The registry binary is dynamically linked against glibc: the loader and libc come along.
REGISTRY_DOCKERFILE = """\
FROM scratch
COPY busybox /bin/busybox
COPY libc.so.6 /lib/x86_64-linux-gnu/libc.so.6
COPY ld-linux-x86-64.so.2 /lib64/ld-linux-x86-64.so.2
COPY docker-registry /bin/docker-registry
COPY config.yml /etc/docker/registry/config.yml
ENTRYPOINT ["/bin/docker-registry", "serve", "/etc/docker/registry/config.yml"]
"""
REGISTRY_CONFIG = {
    "version": 0.1,
    "storage": {"filesystem": {"rootdirectory": "/var/lib/registry"}},
    "http": {"addr": "127.0.0.1:5000"},  # replaced per run by REGISTRY_HTTP_ADDR
}


class PrivateDockerd:
    """dockerd with its own data root, exec root (its managed containerd lives there too),
    pidfile, config file and socket under one temporary directory."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.socket = workdir / "docker.sock"
        self.endpoint = f"unix://{self.socket}"
        self.log_path = workdir / "dockerd.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.storage_driver = ""
        # Its own containers (the registry, image builds) go below a cgroup of this run, not
        # dockerd's default /docker: stop() removes it.
        self.cgroup_parent = run_scoped_name("ctz-dockerd")

    def start(self) -> None:
        """overlay2 where the filesystem allows it, else vfs (slow but works everywhere)."""
        (self.workdir / "daemon.json").write_text("{}")  # not the host's /etc/docker one
        for storage_driver in ("overlay2", "vfs"):
            if self._start(storage_driver):
                self.storage_driver = storage_driver
                return
        raise RuntimeError(f"dockerd did not start:\n{self.log_path.read_text()[-3000:]}")

    def _start(self, storage_driver: str) -> bool:
        argv = [
            str(DOCKERD),
            f"--config-file={self.workdir / 'daemon.json'}",
            f"--data-root={self.workdir / 'data'}",
            f"--exec-root={self.workdir / 'exec'}",
            f"--pidfile={self.workdir / 'docker.pid'}",
            f"--host={self.endpoint}",
            f"--storage-driver={storage_driver}",
            "--exec-opt=native.cgroupdriver=cgroupfs",
            f"--cgroup-parent=/{self.cgroup_parent}",
            "--iptables=false", "--ip-forward=false", "--ip-masq=false", "--bridge=none",
            "--userland-proxy=false",
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            if accepts_connections(self.socket):
                with contextlib.suppress(docker.errors.DockerException):
                    client = self.client()
                    client.ping()
                    client.close()
                    return True
            time.sleep(0.1)
        self.stop()
        return False

    def client(self) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.endpoint, version="auto", timeout=120)

    def stop(self) -> None:
        """Terminate (dockerd stops its containers and its containerd), then kill; unmount
        whatever it left mounted under our directory."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        unmount_below(self.workdir)
        remove_cgroup_trees(self.cgroup_parent)

    def our_containers(self) -> list[Any]:
        client = self.client()
        try:
            return list(client.containers.list(all=True, filters={"label": LABEL_CONTAINER_ID}))
        finally:
            client.close()


def accepts_connections(path: Path) -> bool:
    """Probe with a socket of our own: the docker SDK leaks its socket when a connect fails,
    which `filterwarnings = error` turns into a failure of whatever test runs next."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def private_dockerd(keep_log: Path | None = None) -> Iterator[PrivateDockerd]:
    """A started private dockerd, stopped and removed at exit (also used by the benchmark).
    Its log (dockerd's and its containerd's lines) is copied to `keep_log` first, if given."""
    # Named with the run id (and in /tmp, for short socket paths): should this run be killed
    # halfway, the next one finds the directory, its mounts and the daemons naming it.
    workdir = run_scoped_tempdir("ctz-dockerd")
    daemon = PrivateDockerd(workdir)
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()
        if keep_log is not None:
            with contextlib.suppress(OSError):
                shutil.copyfile(daemon.log_path, keep_log)
        shutil.rmtree(workdir, ignore_errors=True)


def docker_client_kw(daemon: PrivateDockerd) -> dict[str, Any]:
    """testcontainers' client arguments: the private daemon, whatever DOCKER_HOST says."""
    return {"environment": {"DOCKER_HOST": daemon.endpoint}, "version": "auto"}


def build_image(daemon: PrivateDockerd, tag: str, dockerfile: str, files: dict[str, Path]) -> str:
    """Build through Docker's own builder (testcontainers' DockerImage) from a context holding
    `files` (name in context -> host file) and the Dockerfile."""
    from testcontainers.core.image import DockerImage

    with tempfile.TemporaryDirectory(prefix="ctz-build-") as context:
        for name, source in files.items():
            shutil.copy2(source, Path(context) / name)
        (Path(context) / "Dockerfile").write_text(dockerfile)
        image = DockerImage(context, docker_client_kw(daemon), tag=tag, clean_up=False)
        image.build()
        image.get_docker_client().client.close()
    return tag


def build_busybox_image(daemon: PrivateDockerd, tag: str = BUSYBOX_IMAGE) -> str:
    return build_image(daemon, tag, BUSYBOX_DOCKERFILE, {"busybox": BUSYBOX})


@contextlib.contextmanager
def registry_container(daemon: PrivateDockerd) -> Iterator[str]:
    """A registry container (built from Debian's docker-registry binary) on the host network,
    listening on a free 127.0.0.1 port; yields "127.0.0.1:PORT"."""
    from testcontainers.core.container import DockerContainer

    with tempfile.TemporaryDirectory(prefix="ctz-registry-") as tmp:
        config = Path(tmp) / "config.yml"
        config.write_text(json.dumps(REGISTRY_CONFIG))  # JSON is YAML
        files = {
            "busybox": BUSYBOX,
            "libc.so.6": Path("/lib/x86_64-linux-gnu/libc.so.6"),
            "ld-linux-x86-64.so.2": Path("/lib64/ld-linux-x86-64.so.2"),
            "docker-registry": REGISTRY_BINARY,
            "config.yml": config,
        }
        build_image(daemon, REGISTRY_IMAGE, REGISTRY_DOCKERFILE, files)
    address = f"127.0.0.1:{free_loopback_port()}"
    container = DockerContainer(
        REGISTRY_IMAGE,
        docker_client_kw(daemon),
        env={"REGISTRY_HTTP_ADDR": address},
        name=f"ctz-registry-{uuid.uuid4().hex[:8]}",
        network_mode="host",
    )
    container.start()
    try:
        deadline = time.monotonic() + START_SECONDS
        while not registry_answers(address):
            if time.monotonic() > deadline:
                raise RuntimeError(f"registry did not answer on {address}")
            time.sleep(0.1)
        yield address
    finally:
        container.stop()


def docker_service_config(daemon: PrivateDockerd, registry: str | None) -> str:
    registry_line = f'registry = "{registry}"\n' if registry else ""
    return (
        f'default_runtime = "docker"\n[runtimes.docker]\nendpoint = "{daemon.endpoint}"\n'
        f"{registry_line}"
    )


# ---- fixtures ----


@pytest.fixture(scope="session")
def dockerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateDockerd]:
    """One private dockerd per xdist worker. At the end nothing of ours may be left in it (the
    suite's `docker ps -a` check): leftovers are removed and reported as an error. Its log is
    kept in the session's basetemp (`dockerd-<worker>.log`), to read after a failure."""
    require_root()
    for binary, package in ((DOCKERD, "docker.io"), (DOCKER_CLI, "docker.io")):
        require(binary.is_file(), f"{binary} missing: apt-get install {package}")
    require(BUSYBOX.is_file(), f"{BUSYBOX} missing: apt-get install busybox-static")
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    keep_log = tmp_path_factory.getbasetemp() / f"dockerd-{worker}.log"
    with private_dockerd(keep_log) as daemon:
        yield daemon
        leftovers = daemon.our_containers()
        for container in leftovers:
            container.remove(force=True)
        assert not leftovers, f"containers of ours left in dockerd: {[c.name for c in leftovers]}"


@pytest.fixture(scope="session")
def busybox_image(dockerd: PrivateDockerd) -> str:
    return build_busybox_image(dockerd)


@pytest.fixture(scope="session")
def docker_registry(dockerd: PrivateDockerd) -> Iterator[str]:
    require(
        REGISTRY_BINARY.is_file(), f"{REGISTRY_BINARY} missing: apt-get install docker-registry"
    )
    with registry_container(dockerd) as address:
        yield address


def _stop_service(process: ServiceProcess) -> None:
    with contextlib.suppress(Exception):
        if process.process and process.process.poll() is None:
            process.destroy_all()
    process.stop()
    process.remove_cgroup_roots()


@pytest.fixture(scope="session")
def docker_service(
    tmp_path_factory: pytest.TempPathFactory, dockerd: PrivateDockerd, docker_registry: str
) -> Iterator[ServiceProcess]:
    """A `containerizer serve` whose default runtime is docker on the private daemon."""
    process = ServiceProcess(
        tmp_path_factory.mktemp("docker-service"), docker_service_config(dockerd, docker_registry)
    )
    process.start()
    yield process
    _stop_service(process)


@pytest.fixture
def fresh_docker_service(
    tmp_path: Path, dockerd: PrivateDockerd, docker_registry: str
) -> Iterator[ServiceProcess]:
    """A docker service of the test's own, for tests that crash it."""
    process = ServiceProcess(tmp_path, docker_service_config(dockerd, docker_registry))
    process.start()
    yield process
    _stop_service(process)
