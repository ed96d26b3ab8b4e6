"""The containerd runtime across a crash of our service (kill -9): containers keep running under
containerd's shims and are re-attached, one that exited meanwhile still reports its exit code,
and containers in our namespace that no checkpoint knows are removed."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.runtimes.containerd.handle import CONTAINER_LABEL
from tests.cgroup_roots import run_scoped_name
from tests.conftest import ServiceProcess, require, require_root
from tests.images import REFERENCE, busybox_oci_layout
from tests.integration.api import scalar, usage, wait
from tests.integration.containerd_daemon import (
    SHARED,
    ContainerdDaemon,
    containerd_available,
    containerd_config,
    import_image,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ContainerdDaemon]:
    require_root()
    missing = containerd_available()
    require(missing is None, str(missing))
    daemon = SHARED.acquire(lambda: tmp_path_factory.mktemp("containerd"))
    yield daemon
    SHARED.release()


@pytest.fixture
def crashing_service(
    tmp_path: Path, containerd: ContainerdDaemon
) -> Iterator[tuple[ServiceProcess, str]]:
    namespace = run_scoped_name("ctz")
    service = ServiceProcess(tmp_path, containerd_config(containerd, namespace))
    service.start()
    assert import_image(service.endpoint, busybox_oci_layout(tmp_path)) == [REFERENCE]
    yield service, namespace
    with contextlib.suppress(Exception):
        if service.process and service.process.poll() is None:
            service.destroy_all()
    service.stop()
    containerd.remove_namespace(namespace)
    service.remove_cgroup_roots()


def launch(stub: object, container_id: str, shell: str) -> None:
    stub.Launch(  # type: ignore[attr-defined]
        pb.LaunchRequest(
            container_id=container_id,
            command=pb.CommandInfo(shell=shell),
            resources=[scalar("mem", 64)],
            container=pb.ContainerInfo(runtime="containerd", image=REFERENCE),
        ),
        timeout=60,
    )


def test_running_and_exited_while_down_containers_are_recovered(
    crashing_service: tuple[ServiceProcess, str], containerd: ContainerdDaemon, container_id: str
) -> None:
    service, namespace = crashing_service
    stub = service.stub()
    running, exiting = f"{container_id}-run", f"{container_id}-exit"
    launch(stub, running, "sleep 600")
    launch(stub, exiting, "sleep 1; exit 7")
    service.kill()
    time.sleep(2)  # `exiting` ends while nobody watches
    assert "STOPPED" in containerd.ctr("tasks", "ls", namespace=namespace).stdout
    service.start()
    stub = service.stub()
    assert wait(stub, exiting).exit_code == 7
    status = stub.Status(pb.StatusRequest(container_id=running), timeout=10)
    assert status.state == pb.RUNNING
    assert usage(stub, running).mem_limit_bytes == 64 * 1024 * 1024
    termination = stub.Destroy(pb.DestroyRequest(container_id=running), timeout=60).termination
    assert termination.reason == pb.DESTROYED and termination.signal == 9
    assert not containerd.lines("containers", "ls", "-q", namespace=namespace)
    assert not containerd.lines("leases", "ls", "-q", namespace=namespace)


def test_containers_no_checkpoint_knows_are_removed(
    crashing_service: tuple[ServiceProcess, str], containerd: ContainerdDaemon
) -> None:
    """A container in our namespace, labelled as ours, but in no checkpoint (as a crash between
    containerd's create and our checkpoint would leave it) goes at the next start; one without
    our label is not ours and stays."""
    service, namespace = crashing_service
    orphan, foreign = f"orphan-{uuid.uuid4().hex[:8]}", f"foreign-{uuid.uuid4().hex[:8]}"
    label = f"{CONTAINER_LABEL}={orphan}"
    launch(service.stub(), f"{orphan}-loader", "exit 0")  # loads the image into containerd
    assert wait(service.stub(), f"{orphan}-loader").exit_code == 0
    containerd.ctr(
        "run", "-d", "--label", label, REFERENCE, orphan, "sleep", "600", namespace=namespace
    )
    containerd.ctr("containers", "create", REFERENCE, foreign, "true", namespace=namespace)
    service.restart()
    containers = containerd.lines("containers", "ls", "-q", namespace=namespace)
    assert orphan not in containers
    assert foreign in containers
    assert orphan not in containerd.lines("snapshots", "ls", namespace=namespace)
