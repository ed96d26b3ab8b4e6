"""`containerizer exec` on the LXC and containerd runtimes (issue 17): the exec'd process runs in
the container's pid namespace and memory cgroup, and the container's destroy ends it and the
CLI. The native and docker runtimes have the same proof in test_exec_cli.py and
test_docker_exec.py."""

# Fixtures are imported from their test modules and injected by name, which ruff reads as
# redefinition (F811) and as unused imports (F401).
# ruff: noqa: F811

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator

import grpc
import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from tests.conftest import BIN, ServiceProcess
from tests.integration.api import destroy
from tests.integration.api import launch as launch_default
from tests.integration.containerd_daemon import ContainerdDaemon
from tests.integration.processes import memory_cgroup, pid_namespace, read_until, wait_for_process
from tests.integration.test_containerd import (
    containerd,  # noqa: F401  (fixture)
    start_service,
    stop_service,
)
from tests.integration.test_containerd import launch as launch_containerd
from tests.integration.test_lxc import lxc_service  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration

Launcher = Callable[[ServiceProcess, str], object]


@pytest.fixture(scope="module")
def containerd_service(
    tmp_path_factory: pytest.TempPathFactory, containerd: ContainerdDaemon
) -> Iterator[ServiceProcess]:
    """A service whose containers run on the worker's private containerd, busybox imported."""
    service, namespace = start_service(tmp_path_factory.mktemp("exec-containerd"), containerd)
    yield service
    stop_service(service, containerd, namespace)


def cli(service: ServiceProcess, *args: str) -> list[str]:
    return [str(BIN / "containerizer"), "--endpoint", service.endpoint, *args]


def _launch_lxc(service: ServiceProcess, container_id: str) -> object:
    return launch_default(service.stub(), container_id, "exec sleep 600")


def _launch_containerd(service: ServiceProcess, container_id: str) -> object:
    return launch_containerd(service.stub(), container_id, "exec sleep 600")


@pytest.fixture(params=["lxc", "containerd"])
def runtime(request: pytest.FixtureRequest) -> tuple[ServiceProcess, Launcher]:
    """The service of the runtime under test (its fixture started only when asked for) and how
    to launch a long sleeper on it."""
    if request.param == "lxc":
        return request.getfixturevalue("lxc_service"), _launch_lxc
    return request.getfixturevalue("containerd_service"), _launch_containerd


def test_exec_runs_inside_the_container_and_ends_with_it(
    runtime: tuple[ServiceProcess, Launcher], container_id: str
) -> None:
    service, launch = runtime
    stub = service.stub()
    launch(service, container_id)
    marker = f"{900 + int.from_bytes(os.urandom(2), 'big') / 1000:.3f}"  # a unique duration
    process = subprocess.Popen(
        cli(service, "exec", container_id, "--", "sleep", marker),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        exec_process = wait_for_process(["sleep", marker])
        init = stub.Status(pb.StatusRequest(container_id=container_id), timeout=10).pid
        assert pid_namespace(exec_process.pid) == pid_namespace(init)
        assert pid_namespace(init) != pid_namespace(os.getpid())
        assert memory_cgroup(exec_process.pid) == memory_cgroup(init)
        assert memory_cgroup(init).endswith(f"/{service.cgroups_root}/{container_id}")
        destroy(stub, container_id)
        assert process.wait(timeout=30) != 0
        assert not exec_process.is_running()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        with contextlib.suppress(grpc.RpcError):  # NOT_FOUND once the test's destroy ran
            destroy(stub, container_id)


def test_exec_with_a_terminal_is_a_working_shell(
    runtime: tuple[ServiceProcess, Launcher], container_id: str
) -> None:
    """`exec -it` gives a shell on a terminal (also where the container has no devpts of its
    own, as LXC's: then the host's pty)."""
    service, launch = runtime
    launch(service, container_id)
    master, slave = os.openpty()
    process = subprocess.Popen(
        cli(service, "exec", "-it", container_id, "--", "sh"),
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    try:
        os.write(master, b"[ -t 0 ] && echo terminal-$((6*7))\n")
        assert b"terminal-42" in read_until(master, b"terminal-42")
        os.write(master, b"exit 3\n")
        assert process.wait(timeout=30) == 3
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)
        with contextlib.suppress(grpc.RpcError):
            destroy(service.stub(), container_id)
