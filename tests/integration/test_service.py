"""The service end to end on the native runtime: real processes, cgroups and namespaces."""

from __future__ import annotations

import os
import socket
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.api.containerizer.v1 import containerizer_pb2_grpc as pb_grpc
from tests.conftest import ServiceProcess
from tests.integration.api import destroy, launch, scalar, usage, wait

pytestmark = pytest.mark.integration


def test_exit_codes_and_output(service: ServiceProcess, container_id: str) -> None:
    stub = service.stub()
    reply = launch(stub, container_id, "echo out; echo err >&2; exit 3")
    assert reply.status.state == pb.RUNNING
    termination = wait(stub, container_id)
    assert termination.reason == pb.EXITED
    assert termination.exit_code == 3 and termination.status == 3 << 8
    assert not termination.HasField("signal") and not termination.killed
    sandbox = Path(reply.status.sandbox)
    assert (sandbox / "stdout").read_text() == "out\n"
    assert (sandbox / "stderr").read_text() == "err\n"


def test_death_by_signal(service: ServiceProcess, container_id: str) -> None:
    stub = service.stub()
    launch(stub, container_id, "kill -TERM $$; sleep 5")
    termination = wait(stub, container_id)
    assert termination.signal == 15 and termination.status == 15
    assert not termination.HasField("exit_code")
    assert termination.reason == pb.EXITED


def test_kill_delivers_a_signal(service: ServiceProcess, container_id: str) -> None:
    stub = service.stub()
    launch(stub, container_id, "trap 'exit 42' USR1; while :; do sleep 0.05; done")
    time.sleep(0.2)
    stub.Kill(pb.KillRequest(container_id=container_id, signal=10), timeout=10)
    assert wait(stub, container_id).exit_code == 42


SHOW_ISOLATION = 'cat /proc/self/cgroup; echo "pid=$$ init=$(cat /proc/1/comm) host=$(hostname)"'


def test_workload_is_isolated_from_its_first_instruction(
    service: ServiceProcess, container_id: str
) -> None:
    stub = service.stub()
    reply = stub.Launch(
        pb.LaunchRequest(
            container_id=container_id,
            command=pb.CommandInfo(
                argv=["/bin/sh", "-c", SHOW_ISOLATION],
                environment=[pb.EnvironmentVariable(name="GREETING", value="a=b c")],
            ),
            resources=[scalar("cpus", 0.5), scalar("mem", 64)],
        ),
        timeout=30,
    )
    assert wait(stub, container_id).exit_code == 0
    output = (Path(reply.status.sandbox) / "stdout").read_text()
    for controller in ("memory", "cpu", "pids", "freezer"):
        assert f":{controller}:/{service.cgroups_root}/{container_id}" in output
    assert "pid=2 init=containerizer-s " in output  # its own pid namespace, under our init
    assert f"host={container_id}" in output  # its own uts namespace


def test_environment_user_and_working_dir(service: ServiceProcess, container_id: str) -> None:
    stub = service.stub()
    reply = stub.Launch(
        pb.LaunchRequest(
            container_id=container_id,
            command=pb.CommandInfo(
                shell='echo "$GREETING|$(id -u)|$(pwd)"',
                environment=[pb.EnvironmentVariable(name="GREETING", value="a=b c")],
                user="nobody",
                working_dir="/tmp",
            ),
        ),
        timeout=30,
    )
    assert wait(stub, container_id).exit_code == 0
    assert (Path(reply.status.sandbox) / "stdout").read_text() == "a=b c|65534|/tmp\n"


def test_destroy_kills_double_forked_daemons(service: ServiceProcess, container_id: str) -> None:
    stub = service.stub()
    marker = f"{time.time_ns() % 1000}.{os.getpid()}"
    launch(stub, container_id, f"(setsid sleep 1{marker} &); (sleep 2{marker} &); sleep 1000")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(_sleepers(marker)) < 2:
        time.sleep(0.05)
    assert len(_sleepers(marker)) == 2
    termination = destroy(stub, container_id)
    assert termination.reason == pb.DESTROYED and termination.killed
    assert _sleepers(marker) == []
    assert not [p for p in service.leftover_cgroups() if p.name == container_id]


def _sleepers(marker: str) -> list[psutil.Process]:
    return [
        p
        for p in psutil.process_iter(["name", "cmdline"])
        if p.info["name"] == "sleep" and marker in " ".join(p.info["cmdline"] or [])
    ]


def test_exit_while_destroy_acknowledges(service: ServiceProcess, container_id: str) -> None:
    stub = service.stub()
    launch(stub, container_id, "exit 0")
    first = wait(stub, container_id)
    assert destroy(stub, container_id) == first  # acknowledged: the record goes
    with pytest.raises(grpc.RpcError) as error:
        stub.Status(pb.StatusRequest(container_id=container_id), timeout=10)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


BAD_IDS = ["../x", "a/b", "", "x" * 1000, "a\x00b"]


@pytest.mark.parametrize("bad_id", BAD_IDS)
def test_bad_ids_are_refused_before_anything_happens(service: ServiceProcess, bad_id: str) -> None:
    stub = service.stub()
    before = set(os.listdir(service.state_dir))
    for call, request in [
        (stub.Launch, pb.LaunchRequest(container_id=bad_id, command=pb.CommandInfo(shell="true"))),
        (stub.Wait, pb.WaitRequest(container_id=bad_id)),
        (stub.Destroy, pb.DestroyRequest(container_id=bad_id)),
        (stub.Usage, pb.UsageRequest(container_id=bad_id)),
    ]:
        with pytest.raises(grpc.RpcError) as error:
            call(request, timeout=10)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "container_id" in error.value.details()
    assert set(os.listdir(service.state_dir)) == before


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"resources": [scalar("cpus", -1)]}, "resources[cpus]"),
        ({"resources": [scalar("mem", float("nan"))]}, "resources[mem]"),
        ({"resources": [scalar("disk", float("inf"))]}, "resources[disk]"),
        ({"container": pb.ContainerInfo(runtime="warp")}, "container.runtime"),
        (
            {
                "command": pb.CommandInfo(
                    shell="true", environment=[pb.EnvironmentVariable(name="A=B")]
                )
            },
            "command.environment[0].name",
        ),
        (
            {
                "command": pb.CommandInfo(
                    shell="true", environment=[pb.EnvironmentVariable(name="A\x00")]
                )
            },
            "command.environment[0].name",
        ),
        ({"command": pb.CommandInfo()}, "command"),
    ],
)
def test_bad_launch_input_is_invalid_argument(
    service: ServiceProcess, container_id: str, request_fields: dict[str, object], field: str
) -> None:
    fields: dict[str, object] = {
        "container_id": container_id,
        "command": pb.CommandInfo(shell="true"),
        **request_fields,
    }
    with pytest.raises(grpc.RpcError) as error:
        service.stub().Launch(pb.LaunchRequest(**fields), timeout=10)  # type: ignore[arg-type]
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.value.details()
    assert not (service.state_dir / "sandboxes" / container_id).exists()
    assert not [p for p in service.leftover_cgroups() if p.name == container_id]


def test_small_mem_is_raised_and_reported(service: ServiceProcess, container_id: str) -> None:
    stub = service.stub()
    reply = launch(stub, container_id, "sleep 30", mem=1)
    assert reply.warnings == ["mem raised from 1 MiB to the minimum of 32 MiB"]
    assert usage(stub, container_id).mem_limit_bytes == 32 * 1024 * 1024
    destroy(stub, container_id)


def test_duplicate_unknown_and_unconfigured(service: ServiceProcess, container_id: str) -> None:
    stub = service.stub()
    launch(stub, container_id, "sleep 30")
    cases = [
        (lambda: launch(stub, container_id, "true"), grpc.StatusCode.ALREADY_EXISTS),
        (lambda: wait(stub, "no-such-container"), grpc.StatusCode.NOT_FOUND),
        (
            lambda: stub.Launch(
                pb.LaunchRequest(
                    container_id=container_id + "-lxc",
                    command=pb.CommandInfo(shell="true"),
                    container=pb.ContainerInfo(runtime="lxc"),
                ),
                timeout=10,
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
        ),
    ]
    for call, code in cases:
        with pytest.raises(grpc.RpcError) as error:
            call()
        assert error.value.code() == code
    destroy(stub, container_id)


def test_missing_binary_is_launch_failed(service: ServiceProcess, container_id: str) -> None:
    stub = service.stub()
    with pytest.raises(grpc.RpcError) as error:
        stub.Launch(
            pb.LaunchRequest(
                container_id=container_id, command=pb.CommandInfo(argv=["/no/such/binary"])
            ),
            timeout=10,
        )
    assert "No such file or directory" in error.value.details()
    termination = wait(stub, container_id)
    assert termination.reason == pb.LAUNCH_FAILED
    assert not [p for p in service.leftover_cgroups() if p.name == container_id]


def test_fifty_concurrent_launches(service: ServiceProcess, container_id: str) -> None:
    stub = service.stub()
    ids = [f"{container_id}-{n}" for n in range(50)]
    with ThreadPoolExecutor(max_workers=50) as pool:
        replies = list(pool.map(lambda cid: launch(stub, cid, f"exit {len(cid) % 7}"), ids))
        terminations = list(pool.map(lambda cid: wait(stub, cid), ids))
    assert all(reply.status.state == pb.RUNNING for reply in replies)
    assert [t.exit_code for t in terminations] == [len(cid) % 7 for cid in ids]


def test_health_reflection_and_socket_mode(service: ServiceProcess) -> None:
    channel = grpc.insecure_channel(service.endpoint)
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", "containerizer.v1.Containerizer"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
    )
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert "containerizer.v1.Containerizer" in names
    channel.close()
    assert stat.S_IMODE(os.stat(service.socket).st_mode) == 0o600


def test_runtimes_lists_native_as_default(service: ServiceProcess) -> None:
    runtimes = service.stub().Runtimes(pb.RuntimesRequest(), timeout=10).runtimes
    native = next(r for r in runtimes if r.name == "native")
    assert native.is_default and native.healthy
    assert native.capabilities.pid_namespace and native.capabilities.recover


def test_events_stream_lifecycle(service: ServiceProcess, container_id: str) -> None:
    stub = service.stub()
    stream = stub.Events(pb.EventsRequest(container_id=container_id), timeout=30)
    seen: list[int] = []
    with ThreadPoolExecutor(max_workers=1) as pool:

        def collect() -> None:
            for event in stream:
                seen.append(event.state)
                if event.state == pb.TERMINATED:
                    assert event.termination.exit_code == 4
                    stream.cancel()
                    return

        collector = pool.submit(collect)
        time.sleep(0.3)  # the subscription is in place before the launch
        launch(stub, container_id, "exit 4")
        collector.result(timeout=30)
    assert seen[:2] == [pb.LAUNCHING, pb.RUNNING] and seen[-1] == pb.TERMINATED


def test_tcp_listen_address(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    service = ServiceProcess(tmp_path, extra_config=f'listen = "127.0.0.1:{port}"')
    service.start()
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        runtimes = pb_grpc.ContainerizerStub(channel).Runtimes(pb.RuntimesRequest(), timeout=10)
        assert [r.name for r in runtimes.runtimes] == ["native"]
        channel.close()
    finally:
        service.stop()
        service.remove_cgroup_roots()


def test_no_thread_per_container(service: ServiceProcess, container_id: str) -> None:
    """Supervisors are reaped through pidfds on the event loop, not a waitpid thread each."""
    stub = service.stub()
    assert service.process is not None
    ids = [f"{container_id}-{n}" for n in range(30)]
    for cid in ids:
        launch(stub, cid, "sleep 300")
    threads = psutil.Process(service.process.pid).num_threads()
    for cid in ids:
        destroy(stub, cid)
    assert threads < 30
