"""The docker runtime across a kill -9 of our service, and with dockerd unreachable."""

# Fixtures are imported from tests.docker_fixtures and injected by name, which ruff reads as
# redefinition; a conftest `pytest_plugins` line would make both the imports and this go away.
# ruff: noqa: F811

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.runtimes.docker.handle import LABEL_CONTAINER_ID, LABEL_OWNER
from tests.conftest import ServiceProcess, require_root
from tests.docker_fixtures import (  # noqa: F401  (fixtures, injected by parameter name)
    PrivateDockerd,
    busybox_image,
    docker_registry,
    dockerd,
    fresh_docker_service,
)
from tests.integration.api import destroy, wait
from tests.integration.test_docker import docker_container, launch_docker, parent_cgroups

pytestmark = pytest.mark.integration


def test_containers_survive_a_crash_and_orphans_are_removed(
    fresh_docker_service: ServiceProcess, dockerd: PrivateDockerd, busybox_image: str
) -> None:
    service = fresh_docker_service
    stub = service.stub()
    launch_docker(stub, "keeps-running", "echo before; sleep 300", busybox_image)
    exits = launch_docker(stub, "exits-while-down", "echo bye; sleep 1; exit 7", busybox_image)
    running_id = docker_container(dockerd, "keeps-running").id
    client = dockerd.client()
    try:  # a container of ours that no checkpoint names (as if launched just before a crash)
        orphan = client.containers.create(
            busybox_image,
            ["sleep", "300"],
            labels={LABEL_CONTAINER_ID: "orphan", LABEL_OWNER: str(service.state_dir)},
            network_mode="none",
        )
        orphan.start()
    finally:
        client.close()
    service.kill()
    time.sleep(2)  # "exits-while-down" ends now, with only dockerd watching
    service.start()
    stub = service.stub()

    termination = wait(stub, "exits-while-down")
    assert (termination.reason, termination.exit_code) == (pb.EXITED, 7)
    assert (Path(exits.status.sandbox) / "stdout").read_text() == "bye\n"
    assert docker_container(dockerd, "orphan") is None
    status = stub.Status(pb.StatusRequest(container_id="keeps-running"), timeout=10)
    assert status.state == pb.RUNNING
    assert docker_container(dockerd, "keeps-running").id == running_id
    assert stub.Usage(
        pb.UsageRequest(container_id="keeps-running"), timeout=10
    ).statistics.processes
    termination = destroy(stub, "keeps-running")
    assert termination.reason == pb.DESTROYED and termination.signal == 9
    assert docker_container(dockerd, "keeps-running") is None
    assert parent_cgroups(service, "keeps-running") == []
    assert dockerd.our_containers() == []


def test_unreachable_dockerd_is_unavailable_and_the_service_still_starts(
    tmp_path: Path,
) -> None:
    require_root()
    missing = tmp_path / "no-docker.sock"
    service = ServiceProcess(
        tmp_path, f'default_runtime = "docker"\n[runtimes.docker]\nendpoint = "unix://{missing}"\n'
    )
    service.start()
    try:
        stub = service.stub()
        runtimes = stub.Runtimes(pb.RuntimesRequest(), timeout=10).runtimes
        docker_runtime = next(r for r in runtimes if r.name == "docker")
        assert not docker_runtime.healthy and str(missing) in docker_runtime.message
        with pytest.raises(grpc.RpcError) as refused:
            stub.Launch(
                pb.LaunchRequest(
                    container_id="needs-docker",
                    command=pb.CommandInfo(shell="true"),
                    container=pb.ContainerInfo(image="busybox"),
                ),
                timeout=10,  # a retry loop would end in DEADLINE_EXCEEDED
            )
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert str(missing) in (refused.value.details() or "")
    finally:
        service.stop()
        service.remove_cgroup_roots()
