"""The docker runtime end to end: our API -> `containerizer serve` -> a private dockerd, with
images built by Docker's builder and pulled from a registry container on 127.0.0.1."""

# Fixtures are imported from tests.docker_fixtures and injected by name, which ruff reads as
# redefinition; a conftest `pytest_plugins` line would make both the imports and this go away.
# ruff: noqa: F811

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.api.containerizer.v1 import containerizer_pb2_grpc as pb_grpc
from adapter.runtimes.docker.handle import LABEL_CONTAINER_ID
from tests.conftest import CGROUP_MOUNT, ServiceProcess
from tests.docker_fixtures import (  # noqa: F401  (fixtures, injected by parameter name)
    PrivateDockerd,
    busybox_image,
    docker_registry,
    docker_service,
    dockerd,
)
from tests.integration.api import destroy, scalar, usage, wait

pytestmark = pytest.mark.integration
MIB = 1024 * 1024


def launch_docker(
    stub: pb_grpc.ContainerizerStub,
    container_id: str,
    shell: str,
    image: str,
    **resources: float,
) -> pb.LaunchResponse:
    return stub.Launch(
        pb.LaunchRequest(
            container_id=container_id,
            command=pb.CommandInfo(shell=shell),
            resources=[scalar(name, value) for name, value in resources.items()],
            container=pb.ContainerInfo(runtime="docker", image=image),
        ),
        timeout=120,
    )


def docker_container(dockerd: PrivateDockerd, container_id: str) -> Any | None:
    """Our container of that id in the daemon, or None."""
    client = dockerd.client()
    try:
        found = client.containers.list(
            all=True, filters={"label": f"{LABEL_CONTAINER_ID}={container_id}"}
        )
        return found[0] if found else None
    finally:
        client.close()


def parent_cgroups(service: ServiceProcess, container_id: str) -> list[Path]:
    return [p for p in CGROUP_MOUNT.glob(f"*/{service.cgroups_root}/{container_id}")]


def test_lifecycle_output_sandbox_and_cleanup(
    docker_service: ServiceProcess, dockerd: PrivateDockerd, busybox_image: str, container_id: str
) -> None:
    stub = docker_service.stub()
    shell = (
        "echo out; echo err >&2; echo $MESOS_SANDBOX $(pwd);"
        " grep memory /proc/self/cgroup; printf partial; sleep 0.5; exit 3"
    )
    reply = launch_docker(stub, container_id, shell, busybox_image)
    assert reply.status.state == pb.RUNNING and reply.status.pid > 0
    running = docker_container(dockerd, container_id)
    assert running is not None and running.status == "running"
    assert running.attrs["HostConfig"]["NetworkMode"] == "none"

    termination = wait(stub, container_id)
    assert termination.reason == pb.EXITED
    assert termination.exit_code == 3 and termination.status == 3 << 8
    assert not termination.HasField("signal") and not termination.killed
    sandbox = Path(reply.status.sandbox)
    stdout = (sandbox / "stdout").read_text().splitlines()
    assert stdout[:2] == ["out", "/mnt/mesos/sandbox /mnt/mesos/sandbox"]
    assert stdout[2].endswith(":memory:/")  # the root of its own cgroup namespace
    assert stdout[3] == "partial"
    assert (sandbox / "stderr").read_text() == "err\n"
    assert docker_container(dockerd, container_id) is None  # removed once it ended
    assert parent_cgroups(docker_service, container_id) == []


def test_death_by_signal_and_kill(
    docker_service: ServiceProcess, busybox_image: str, container_id: str
) -> None:
    stub = docker_service.stub()
    launch_docker(stub, container_id, "kill -TERM $$; sleep 5", busybox_image)
    termination = wait(stub, container_id)
    assert termination.signal == 15 and termination.status == 15
    assert not termination.HasField("exit_code") and termination.reason == pb.EXITED

    trapped = f"{container_id}-trap"
    launch_docker(stub, trapped, "trap 'exit 42' USR1; while :; do sleep 0.05; done", busybox_image)
    time.sleep(0.3)
    stub.Kill(pb.KillRequest(container_id=trapped, signal=10), timeout=10)
    assert wait(stub, trapped).exit_code == 42


def test_allocating_past_the_limit_is_a_memory_limitation(
    docker_service: ServiceProcess, busybox_image: str, container_id: str
) -> None:
    stub = docker_service.stub()
    hog = "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived"
    launch_docker(stub, container_id, hog, busybox_image, mem=32)
    termination = wait(stub, container_id)
    assert termination.reason == pb.LIMITATION_MEMORY
    assert list(termination.limited_resources) == ["mem"] and termination.killed
    assert "Memory limit exceeded" in termination.message
    assert str(32 * MIB) in termination.message


def test_limits_follow_the_mesos_arithmetic_and_update_live(
    docker_service: ServiceProcess, dockerd: PrivateDockerd, busybox_image: str, container_id: str
) -> None:
    stub = docker_service.stub()
    launch_docker(stub, container_id, "sleep 300", busybox_image, cpus=0.5, mem=64, pids=50)
    container = docker_container(dockerd, container_id)
    assert container is not None
    host = container.attrs["HostConfig"]
    assert (host["CpuShares"], host["Memory"], host["PidsLimit"]) == (512, 64 * MIB, 50)
    leaf = f"{docker_service.cgroups_root}/{container_id}/{container.id}"
    memory_limit = CGROUP_MOUNT / "memory" / leaf / "memory.limit_in_bytes"
    assert int(memory_limit.read_text()) == 64 * MIB

    stub.Update(
        pb.UpdateRequest(
            container_id=container_id,
            resources=[scalar("cpus", 1.5), scalar("mem", 128), scalar("pids", 100)],
        ),
        timeout=30,
    )
    container.reload()
    host = container.attrs["HostConfig"]
    assert (host["CpuShares"], host["Memory"], host["PidsLimit"]) == (1536, 128 * MIB, 100)
    assert int(memory_limit.read_text()) == 128 * MIB
    assert (CGROUP_MOUNT / "cpu" / leaf / "cpu.shares").read_text().strip() == "1536"
    assert (CGROUP_MOUNT / "pids" / leaf / "pids.max").read_text().strip() == "100"
    statistics = usage(stub, container_id)
    assert statistics.mem_limit_bytes == 128 * MIB and statistics.cpus_limit == 1.5
    assert destroy(stub, container_id).reason == pb.DESTROYED


def test_destroy_kills_copies_output_and_removes(
    docker_service: ServiceProcess, dockerd: PrivateDockerd, busybox_image: str, container_id: str
) -> None:
    stub = docker_service.stub()
    reply = launch_docker(
        stub, container_id, "echo started; sleep 1000 & sleep 1000 & wait", busybox_image
    )
    time.sleep(0.3)
    termination = destroy(stub, container_id)
    assert termination.reason == pb.DESTROYED and termination.killed
    assert termination.signal == 9
    assert (Path(reply.status.sandbox) / "stdout").read_text() == "started\n"
    assert docker_container(dockerd, container_id) is None
    assert parent_cgroups(docker_service, container_id) == []


def test_usage_matches_docker_stats(
    docker_service: ServiceProcess, dockerd: PrivateDockerd, busybox_image: str, container_id: str
) -> None:
    """Our cgroup reader against the Engine's stats endpoint (what `docker stats` shows), read
    once the workload has gone quiet so both see the same totals."""
    stub = docker_service.stub()
    burn = "end=$(($(date +%s) + 3)); while [ $(date +%s) -lt $end ]; do :; done"
    hold = """awk 'BEGIN { s = sprintf("%40000000s", ""); system("sleep 300") }'"""
    workload = f"{burn}; {hold}"
    launch_docker(stub, container_id, workload, busybox_image, mem=256)
    time.sleep(4.5)
    container = docker_container(dockerd, container_id)
    assert container is not None
    ours = usage(stub, container_id)
    theirs = container.stats(stream=False, one_shot=True)
    docker_cpu_secs = theirs["cpu_stats"]["cpu_usage"]["total_usage"] / 1e9
    our_cpu_secs = ours.cpus_user_time_secs + ours.cpus_system_time_secs
    assert docker_cpu_secs > 1.0  # it did burn CPU, so 10 % is a meaningful bound
    assert our_cpu_secs == pytest.approx(docker_cpu_secs, rel=0.10)
    assert ours.mem_total_bytes == pytest.approx(theirs["memory_stats"]["usage"], rel=0.10)
    assert ours.mem_total_bytes > 40_000_000
    assert ours.processes == theirs["pids_stats"]["current"]
    assert ours.mem_limit_bytes == theirs["memory_stats"]["limit"] == 256 * MIB
    destroy(stub, container_id)


def test_image_is_pulled_from_the_local_registry(
    docker_service: ServiceProcess,
    dockerd: PrivateDockerd,
    busybox_image: str,
    docker_registry: str,
    container_id: str,
) -> None:
    tag = uuid.uuid4().hex[:12]
    pushed = f"{docker_registry}/ctz/busybox"
    client = dockerd.client()
    try:
        client.images.get(busybox_image).tag(pushed, tag)
        for message in client.images.push(pushed, tag, stream=True, decode=True):
            assert "error" not in message, message
        client.images.remove(f"{pushed}:{tag}")  # only the registry has it now
        stub = docker_service.stub()
        launch_docker(stub, container_id, "echo pulled", f"ctz/busybox:{tag}")
        assert wait(stub, container_id).exit_code == 0
        assert client.images.get(f"{pushed}:{tag}") is not None
        client.images.remove(f"{pushed}:{tag}")
    finally:
        client.close()


def test_images_elsewhere_are_not_pulled_and_an_image_is_required(
    docker_service: ServiceProcess, container_id: str
) -> None:
    stub = docker_service.stub()
    with pytest.raises(grpc.RpcError) as refused:
        launch_docker(stub, container_id, "true", "registry.elsewhere:5000/busybox:1")
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert "only from the configured registry" in (refused.value.details() or "")
    with pytest.raises(grpc.RpcError) as no_image:
        launch_docker(stub, f"{container_id}-x", "true", "")
    assert no_image.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "container.image" in (no_image.value.details() or "")


def test_a_stdout_the_workload_turned_into_a_symlink_is_not_followed(
    docker_service: ServiceProcess,
    dockerd: PrivateDockerd,
    busybox_image: str,
    container_id: str,
    tmp_path: Path,
) -> None:
    """Docker's log copy into the sandbox at cleanup must not follow a symlink the workload
    made there: the host file keeps its content and mode, and the container is still removed."""
    victim = tmp_path / "victim"
    victim.write_text("host data\n")
    victim.chmod(0o600)
    stub = docker_service.stub()
    # Retried: the service's live copy of the output may create `stdout` again in between.
    link = f"ln -sfn {victim} $MESOS_SANDBOX/stdout"
    swap = (
        f"echo loud; for try in 1 2 3 4 5; do {link} && [ -L $MESOS_SANDBOX/stdout ] && break; done"
    )
    launch_docker(stub, container_id, swap, busybox_image)
    assert wait(stub, container_id, timeout=120).exit_code == 0
    assert victim.read_text() == "host data\n"
    assert victim.stat().st_mode & 0o7777 == 0o600
    assert docker_container(dockerd, container_id) is None
    destroy(stub, container_id)
