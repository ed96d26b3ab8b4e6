"""The service end to end on the native runtime: real processes, cgroups and namespaces."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import subprocess
import sys
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
from tests.integration.test_mesos_ecp import Agent
from tests.integration.tls import make_certificates

pytestmark = pytest.mark.integration

CLI = str(Path(sys.executable).parent / "containerizer")


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
    """The TCP listener answers a client with a certificate of the configured CA (mutual TLS:
    test_security_edge.py shows who it refuses)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    certificates = make_certificates(tmp_path / "tls")
    address = f"127.0.0.1:{port}"
    service = ServiceProcess(tmp_path, extra_config=certificates.service_config(address))
    service.start()
    try:
        channel = certificates.channel(
            address, cert=certificates.client_cert, key=certificates.client_key
        )
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


# ---- input the kernel or the wire cannot take ----

HUGE = 1e30


@pytest.mark.parametrize(
    ("name", "value", "bound"),
    [
        ("mem", HUGE, "at most 8.58993e+09 MiB"),
        ("cpus", HUGE, "at most 256 cores"),
        ("cpus", 257, "at most 256 cores"),
        ("disk", HUGE, "at most 8.58993e+09 MiB"),
        ("pids", 4_194_305, "1..4194304"),
        ("network_bandwidth", HUGE, "at most 34359 Mbit/s"),
    ],
)
def test_resources_beyond_what_the_kernel_takes_are_invalid(
    service: ServiceProcess, container_id: str, name: str, value: float, bound: str
) -> None:
    """mem = 1e30 used to be accepted and the kernel wrapped it to a 0-byte limit."""
    stub = service.stub()
    with pytest.raises(grpc.RpcError) as error:
        launch(stub, container_id, "sleep 30", **{name: value})
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        error.value.details().startswith(f"resources[{name}]: ") and bound in error.value.details()
    )
    assert not [p for p in service.leftover_cgroups() if p.name == container_id]


@pytest.mark.parametrize("name", ["mem", "cpus"])
def test_update_beyond_what_the_kernel_takes_is_invalid(
    service: ServiceProcess, container_id: str, name: str
) -> None:
    stub = service.stub()
    launch(stub, container_id, "sleep 300", mem=64, cpus=0.5)
    with pytest.raises(grpc.RpcError) as error:
        stub.Update(
            pb.UpdateRequest(container_id=container_id, resources=[scalar(name, HUGE)]), timeout=10
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith(f"resources[{name}]: must be at most")
    assert usage(stub, container_id).mem_limit_bytes == 64 * 1024 * 1024
    destroy(stub, container_id)


def test_argv_and_environment_beyond_exec_limits_are_invalid(
    service: ServiceProcess, container_id: str
) -> None:
    """4,000 x 1 KiB of environment used to come back INTERNAL (E2BIG from exec)."""
    stub = service.stub()
    variables = [pb.EnvironmentVariable(name=f"V{n}", value="x" * 1000) for n in range(3000)]
    cases = [
        (pb.CommandInfo(shell="true", environment=variables), "command: argv and environment"),
        (pb.CommandInfo(argv=["/bin/echo", "y" * 200_000]), "command.argv[1]: is 200000 bytes"),
    ]
    for command, message in cases:
        with pytest.raises(grpc.RpcError) as error:
            stub.Launch(pb.LaunchRequest(container_id=container_id, command=command), timeout=30)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.value.details().startswith(message)
    assert not (service.state_dir / "sandboxes" / container_id).exists()


def test_update_below_the_minimum_says_so(service: ServiceProcess, container_id: str) -> None:
    stub = service.stub()
    launch(stub, container_id, "sleep 300", mem=64)
    reply = stub.Update(
        pb.UpdateRequest(container_id=container_id, resources=[scalar("mem", 16)]), timeout=10
    )
    assert list(reply.warnings) == ["mem raised from 16 MiB to the minimum of 32 MiB"]
    assert usage(stub, container_id).mem_limit_bytes == 32 * 1024 * 1024
    cli = subprocess.run(
        [CLI, "--endpoint", service.endpoint, "update", container_id, "--mem", "16M"],
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 0
    assert "warning: mem raised from 16 MiB to the minimum of 32 MiB" in cli.stderr
    destroy(stub, container_id)


# ---- listing any number of containers ----


def test_oversized_labels_are_invalid(service: ServiceProcess, container_id: str) -> None:
    """~3.3 MB of labels per container used to be accepted, and two made listing fail."""
    stub = service.stub()
    cases = [
        ({f"k{n}": "v" * 1000 for n in range(3300)}, "labels: keys and values take"),
        ({"big": "v" * 20_000}, "labels[big]: is 20000 bytes, over 16384 bytes"),
        ({"k" * 300: "v"}, "labels: label key"),
    ]
    for labels, message in cases:
        with pytest.raises(grpc.RpcError) as error:
            stub.Launch(
                pb.LaunchRequest(
                    container_id=container_id, command=pb.CommandInfo(shell="true"), labels=labels
                ),
                timeout=30,
            )
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.value.details().startswith(message)


LABELS_PER_CONTAINER = {f"label{n}": "v" * 15_000 for n in range(4)}  # ~60 KB, within bounds
LISTED = 72  # ~4.3 MB of statuses: more than one gRPC message may carry


def test_listing_pages_past_the_message_limit(fresh_service: ServiceProcess) -> None:
    stub = fresh_service.stub()
    ids = [f"listed-{n:03}" for n in range(LISTED)]
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda cid: _launch_labelled(stub, cid), ids))
        pages = [stub.Containers(pb.ContainersRequest(), timeout=30)]  # as older clients ask
        while pages[-1].next_page_token:
            request = pb.ContainersRequest(page_token=pages[-1].next_page_token)
            pages.append(stub.Containers(request, timeout=30))
        assert len(pages) > 1 and all(page.ByteSize() < 2 * 1024 * 1024 for page in pages)
        assert [s.container_id for page in pages for s in page.containers] == ids
        counted = stub.Containers(pb.ContainersRequest(page_size=5), timeout=30)
        assert [s.container_id for s in counted.containers] == ids[:5]
        assert counted.next_page_token == ids[4]
        ps = subprocess.run(
            [CLI, "--endpoint", fresh_service.endpoint, "ps", "--json"],
            capture_output=True,
            text=True,
        )
        assert ps.returncode == 0, ps.stderr
        assert [c["container_id"] for c in json.loads(ps.stdout)["containers"]] == ids
        agent = Agent(fresh_service.endpoint)
        assert agent.containers() == ids
        assert agent.run("recover").returncode == 0
    finally:
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda cid: _destroy_if_known(stub, cid), ids))


def _destroy_if_known(stub: pb_grpc.ContainerizerStub, container_id: str) -> None:
    with contextlib.suppress(grpc.RpcError):
        destroy(stub, container_id)


def _launch_labelled(stub: pb_grpc.ContainerizerStub, container_id: str) -> None:
    stub.Launch(
        pb.LaunchRequest(
            container_id=container_id,
            command=pb.CommandInfo(shell="sleep 300"),
            labels=LABELS_PER_CONTAINER,
        ),
        timeout=30,
    )


def test_launches_leave_the_service_in_its_own_cgroups(
    service: ServiceProcess, container_id: str
) -> None:
    """Every launch warms the cgroup attach lock by writing 0 (the writer) to the service's own
    cgroup.procs (isolators/cgroups/warm.py): that must move nothing, and must not fail."""
    assert service.process is not None
    memberships = Path(f"/proc/{service.process.pid}/cgroup")
    before = memberships.read_text()
    stub = service.stub()
    for n in range(3):
        launch(stub, f"{container_id}-{n}", "true")
        assert wait(stub, f"{container_id}-{n}").exit_code == 0
        destroy(stub, f"{container_id}-{n}")
    assert memberships.read_text() == before
    assert "warm-up off" not in service.log_path.read_text()
