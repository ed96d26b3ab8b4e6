"""The containerd runtime end to end: our service, a private containerd, runc and crun, the busybox
test image imported through the Images API. No mocks: every assertion is on what containerd, the
kernel's cgroup files or the workload itself report."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from adapter.api.containerd.cgroups.v1 import metrics_pb2
from adapter.api.containerd.cgroups.v1 import metrics_pb2 as cgroups_v1_metrics
from adapter.api.containerd.services.tasks.v1 import tasks_pb2
from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.runtimes.containerd.client import ContainerdClient
from tests.cgroup_roots import run_scoped_name
from tests.conftest import CGROUP_MOUNT, ServiceProcess, require, require_root
from tests.images import (
    REFERENCE,
    Entry,
    busybox_docker_archive,
    busybox_entries,
    busybox_oci_layout,
    tar_bytes,
    write_docker_archive,
)
from tests.integration.api import scalar, usage, wait
from tests.integration.containerd_daemon import (
    SHARED,
    ContainerdDaemon,
    containerd_available,
    containerd_config,
    import_image,
)

pytestmark = pytest.mark.integration
MIB = 1024 * 1024


@pytest.fixture(scope="session")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ContainerdDaemon]:
    require_root()
    missing = containerd_available()
    require(missing is None, str(missing))
    daemon = SHARED.acquire(lambda: tmp_path_factory.mktemp("containerd"))
    yield daemon
    SHARED.release()


def start_service(
    tmp: Path, daemon: ContainerdDaemon, runtime_binary: str = ""
) -> tuple[ServiceProcess, str]:
    namespace = run_scoped_name("ctz")
    service = ServiceProcess(tmp, containerd_config(daemon, namespace, runtime_binary))
    service.start()
    assert import_image(service.endpoint, busybox_oci_layout(tmp)) == [REFERENCE]
    return service, namespace


def stop_service(service: ServiceProcess, daemon: ContainerdDaemon, namespace: str) -> None:
    with contextlib.suppress(Exception):
        service.destroy_all()
    service.stop()
    daemon.remove_namespace(namespace)
    service.remove_cgroup_roots()


@pytest.fixture(scope="module")
def runtime(
    tmp_path_factory: pytest.TempPathFactory, containerd: ContainerdDaemon
) -> Iterator[tuple[ServiceProcess, str]]:
    """A service with the containerd runtime (runc, the default) and its namespace."""
    service, namespace = start_service(tmp_path_factory.mktemp("runc"), containerd)
    yield service, namespace
    stop_service(service, containerd, namespace)


@pytest.fixture(scope="module")
def service(runtime: tuple[ServiceProcess, str]) -> ServiceProcess:
    return runtime[0]


def crun_refuses_this_host() -> bool:
    """crun does not support hybrid cgroups (v1 controllers plus a cgroup2 mount) once the v2
    hierarchy has a controller of its own: hugetlb on this kernel, as v1 does not mount it."""
    unified = CGROUP_MOUNT / "unified" / "cgroup.controllers"
    return unified.is_file() and bool(unified.read_text().strip())


def launch(
    stub: object,
    container_id: str,
    shell: str,
    *,
    image: str = REFERENCE,
    user: str = "",
    env: dict[str, str] | None = None,
    **resources: float,
) -> pb.LaunchResponse:
    return stub.Launch(  # type: ignore[attr-defined, no-any-return]
        pb.LaunchRequest(
            container_id=container_id,
            command=pb.CommandInfo(
                shell=shell,
                user=user,
                environment=[
                    pb.EnvironmentVariable(name=k, value=v) for k, v in (env or {}).items()
                ],
            ),
            resources=[scalar(name, value) for name, value in resources.items()],
            container=pb.ContainerInfo(runtime="containerd", image=image),
        ),
        timeout=60,
    )


def cgroup_file(service: ServiceProcess, controller: str, cid: str, name: str) -> str:
    return (CGROUP_MOUNT / controller / service.cgroups_root / cid / name).read_text().strip()


def test_exit_code_output_and_the_container_view(
    service: ServiceProcess, container_id: str
) -> None:
    stub = service.stub()
    script = (
        "echo out; echo err >&2; cat /proc/self/cgroup; "
        'echo "pid=$$ host=$(hostname) cwd=$(pwd) id=$(id -u) greeting=$GREETING path=$PATH"; '
        "ls /mnt/mesos/sandbox; exit 3"
    )
    reply = launch(stub, container_id, script, env={"GREETING": "a=b c"})
    assert reply.status.state == pb.RUNNING and reply.status.pid > 0
    termination = wait(stub, container_id)
    assert termination.reason == pb.EXITED
    assert termination.exit_code == 3 and termination.status == 3 << 8
    sandbox = Path(reply.status.sandbox)
    output = (sandbox / "stdout").read_text()
    assert output.startswith("out\n")
    assert (sandbox / "stderr").read_text() == "err\n"
    for controller in ("memory", "cpu", "pids"):  # the roots of its own cgroup namespace
        assert f":{controller}:/\n" in output
    assert f"pid=1 host={container_id} cwd=/mnt/mesos/sandbox id=0 greeting=a=b c" in output
    assert "path=/usr/sbin:/usr/bin:/sbin:/bin" in output  # the image's env
    assert "stdout" in output.splitlines()  # the sandbox is mounted in


def test_kill_delivers_a_signal_and_destroy_reports_sigkill(
    service: ServiceProcess, container_id: str
) -> None:
    stub = service.stub()
    launch(stub, container_id, "trap 'exit 42' USR1; while :; do sleep 0.05; done")
    time.sleep(0.3)
    stub.Kill(pb.KillRequest(container_id=container_id, signal=10), timeout=10)
    assert wait(stub, container_id).exit_code == 42
    other = f"{container_id}-d"
    launch(stub, other, "sleep 600")
    termination = stub.Destroy(pb.DestroyRequest(container_id=other), timeout=60).termination
    assert termination.reason == pb.DESTROYED and termination.signal == 9 and termination.killed


def test_limits_in_cgroup_files_live_update_and_usage(
    service: ServiceProcess, container_id: str
) -> None:
    stub = service.stub()
    launch(stub, container_id, "sleep 600", cpus=0.5, mem=64, pids=40)
    assert cgroup_file(service, "cpu", container_id, "cpu.shares") == "512"
    assert cgroup_file(service, "memory", container_id, "memory.limit_in_bytes") == str(64 * MIB)
    assert cgroup_file(service, "pids", container_id, "pids.max") == "40"
    stub.Update(
        pb.UpdateRequest(
            container_id=container_id, resources=[scalar("mem", 96), scalar("cpus", 1)]
        ),
        timeout=30,
    )
    assert cgroup_file(service, "memory", container_id, "memory.limit_in_bytes") == str(96 * MIB)
    assert cgroup_file(service, "cpu", container_id, "cpu.shares") == "1024"
    statistics = usage(stub, container_id)
    assert statistics.mem_limit_bytes == 96 * MIB
    assert statistics.cpus_limit == 1.0
    assert statistics.processes == 1
    stub.Destroy(pb.DestroyRequest(container_id=container_id), timeout=60)


def containerd_metrics(address: str, namespace: str, container_id: str) -> metrics_pb2.Metrics:
    """containerd's own numbers (tasks.Metrics): the Any's type_url has no type.googleapis.com/
    prefix, so it is compared and the value decoded."""

    async def fetch() -> metrics_pb2.Metrics:
        client = ContainerdClient(address, namespace)
        try:
            reply = await client.call(
                client.tasks.Metrics,
                tasks_pb2.MetricsRequest(filters=[f'id=="{container_id}"']),
                "metrics",
            )
        finally:
            await client.close()
        (metric,) = reply.metrics
        assert metric.data.type_url == cgroups_v1_metrics.Metrics.DESCRIPTOR.full_name
        return metrics_pb2.Metrics.FromString(metric.data.value)

    return asyncio.run(fetch())


def test_usage_agrees_with_containerd_metrics(
    runtime: tuple[ServiceProcess, str], containerd: ContainerdDaemon, container_id: str
) -> None:
    service, namespace = runtime
    stub = service.stub()
    launch(stub, container_id, "sleep 600 & sleep 600 & wait", mem=48, pids=30)
    time.sleep(0.5)
    ours = usage(stub, container_id)
    theirs = containerd_metrics(containerd.address, namespace, container_id)
    assert ours.mem_limit_bytes == theirs.memory.usage.limit == 48 * MIB
    assert ours.processes == theirs.pids.current == 3
    assert abs(ours.mem_total_bytes - theirs.memory.usage.usage) < 4 * MIB
    stub.Destroy(pb.DestroyRequest(container_id=container_id), timeout=60)


def test_launch_needs_an_image_that_exists(
    runtime: tuple[ServiceProcess, str], containerd: ContainerdDaemon, container_id: str
) -> None:
    service, namespace = runtime
    stub = service.stub()
    with pytest.raises(grpc.RpcError) as missing_field:
        launch(stub, container_id, "true", image="")
    assert missing_field.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "container.image" in str(missing_field.value.details())
    unknown = f"localhost/missing-{uuid.uuid4().hex[:8]}:1"
    with pytest.raises(grpc.RpcError) as not_found:
        launch(stub, f"{container_id}-2", "true", image=unknown)
    assert not_found.value.code() == grpc.StatusCode.NOT_FOUND
    assert unknown in str(not_found.value.details())
    with pytest.raises(grpc.RpcError) as malformed:
        launch(stub, f"{container_id}-3", "true", image="Bad Reference::")
    assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "container.image" in str(malformed.value.details())
    assert not containerd.lines("leases", "ls", "-q", namespace=namespace)


def test_docker_archive_with_two_layers(
    service: ServiceProcess, container_id: str, tmp_path: Path
) -> None:
    """A `docker save` tarball (uncompressed layers) whose second layer adds a file: unpacked by
    chain id on top of the first layer."""
    reference = f"localhost/busybox-docker-{uuid.uuid4().hex[:6]}:1"
    base = tar_bytes(busybox_entries())
    extra = tar_bytes([Entry("etc", "dir", mode=0o755), Entry("etc/motd", data=b"layer two\n")])
    tarball = write_docker_archive(tmp_path / "docker.tar", [base, extra], reference)
    assert import_image(service.endpoint, tarball) == [reference]
    stub = service.stub()
    reply = launch(stub, container_id, "cat /etc/motd; exit 5", image=reference)
    assert wait(stub, container_id).exit_code == 5
    assert (Path(reply.status.sandbox) / "stdout").read_text() == "layer two\n"


def test_the_busybox_docker_archive_runs(
    service: ServiceProcess, container_id: str, tmp_path: Path
) -> None:
    assert import_image(service.endpoint, busybox_docker_archive(tmp_path)) == [REFERENCE]
    stub = service.stub()
    launch(stub, container_id, "exit 0")
    assert wait(stub, container_id).reason == pb.EXITED


def test_user_from_the_image_passwd(service: ServiceProcess, container_id: str) -> None:
    stub = service.stub()
    reply = launch(stub, container_id, "id -u; id -g", user="nobody")
    assert wait(stub, container_id).exit_code == 0
    assert (Path(reply.status.sandbox) / "stdout").read_text() == "65534\n65534\n"


def test_containerd_down_is_unavailable_and_native_keeps_working(
    tmp_path: Path, container_id: str
) -> None:
    require_root()
    socket = tmp_path / "no-containerd.sock"
    config = '[runtimes.native]\n[runtimes.containerd]\naddress = "' + str(socket) + '"\n'
    service = ServiceProcess(tmp_path, config)
    service.start()
    try:
        assert import_image(service.endpoint, busybox_oci_layout(tmp_path)) == [REFERENCE]
        stub = service.stub()
        runtimes = {r.name: r for r in stub.Runtimes(pb.RuntimesRequest(), timeout=30).runtimes}
        assert not runtimes["containerd"].healthy
        assert str(socket) in runtimes["containerd"].message
        with pytest.raises(grpc.RpcError) as down:
            launch(stub, container_id, "true")
        assert down.value.code() == grpc.StatusCode.UNAVAILABLE
        assert str(socket) in str(down.value.details())
        native = f"{container_id}-native"
        stub.Launch(
            pb.LaunchRequest(container_id=native, command=pb.CommandInfo(shell="exit 4")),
            timeout=30,
        )
        assert wait(stub, native).exit_code == 4
    finally:
        service.stop()
        service.remove_cgroup_roots()


@pytest.mark.parametrize("binary", ["runc", "crun"])
def test_each_oci_runtime_runs_the_image_with_its_limits(
    binary: str, containerd: ContainerdDaemon, tmp_path: Path, container_id: str
) -> None:
    """runtimes.containerd.runtime_binary selects the OCI runtime behind the runc shim."""
    require(
        shutil.which(binary) is not None, f"{binary} is not installed (Debian package {binary})"
    )
    service, namespace = start_service(tmp_path, containerd, binary)
    try:
        stub = service.stub()
        if binary == "crun" and crun_refuses_this_host():
            # The launch fails as a launch, with crun's reason, and leaves nothing behind.
            with pytest.raises(grpc.RpcError) as refused:
                launch(stub, container_id, "exit 0", mem=64)
            assert refused.value.code() == grpc.StatusCode.INTERNAL
            assert "cgroups in hybrid mode not supported" in str(refused.value.details())
            for what in ("containers", "leases", "tasks"):
                assert not containerd.lines(what, "ls", "-q", namespace=namespace)
            assert container_id not in containerd.lines("snapshots", "ls", namespace=namespace)
            return
        reply = launch(stub, container_id, "cat /sys/fs/cgroup/pids/pids.max; exit 6", pids=25)
        assert wait(stub, container_id).exit_code == 6
        assert (Path(reply.status.sandbox) / "stdout").read_text() == "25\n"
        running = f"{container_id}-running"
        launch(stub, running, "sleep 600")
        info = containerd.ctr("containers", "info", running, namespace=namespace).stdout
        assert (f"/{binary}" in info) == (binary != "runc")  # runc: the shim's default
        stub.Destroy(pb.DestroyRequest(container_id=running), timeout=60)
    finally:
        stop_service(service, containerd, namespace)
