"""The CRI RuntimeService against a real service, through the CRI's own stubs: pods, containers,
their namespaces, logs, exec, stats, security contexts, bad input and a crash of the service."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import grpc
import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.cri.api import cri
from tests.integration.cri import TIMEOUT, CriNode

pytestmark = pytest.mark.integration

CRI_LOG_LINE = re.compile(
    rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}(Z|[+-]\d\d:\d\d) (stdout|stderr) [FP] .*"
)


def _code(call: object) -> grpc.StatusCode:
    assert isinstance(call, grpc.RpcError)
    return call.code()  # type: ignore[no-any-return]


# ---- the runtime ----


def test_version_and_status(cri_node: CriNode) -> None:
    version = cri_node.runtime.Version(cri.VersionRequest(), timeout=TIMEOUT)
    assert (version.runtime_name, version.runtime_api_version) == ("containerizer", "v1")
    status = cri_node.runtime.Status(cri.StatusRequest(), timeout=TIMEOUT).status
    conditions = {c.type: c.status for c in status.conditions}
    assert conditions == {"RuntimeReady": True, "NetworkReady": True}


# ---- pods ----


def test_pod_lifecycle_and_idempotent_stop_and_remove(cri_node: CriNode) -> None:
    config = cri_node.pod_config(hostname="pod-host", labels={"app": "one"})
    pod_id = cri_node.run_pod(config)
    status = cri_node.runtime.PodSandboxStatus(
        cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id), timeout=TIMEOUT
    ).status
    assert status.state == cri.SANDBOX_READY
    assert status.network.ip, "a pod on the bridge has an address"
    assert status.metadata.name == config.metadata.name
    listed = cri_node.runtime.ListPodSandbox(
        cri.ListPodSandboxRequest(filter=cri.PodSandboxFilter(label_selector={"app": "one"})),
        timeout=TIMEOUT,
    ).items
    assert [pod.id for pod in listed] == [pod_id]
    for _ in range(2):  # twice: stopping and removing what is gone is no error
        cri_node.runtime.StopPodSandbox(
            cri.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=TIMEOUT
        )
    status = cri_node.runtime.PodSandboxStatus(
        cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id), timeout=TIMEOUT
    ).status
    assert status.state == cri.SANDBOX_NOTREADY
    for _ in range(2):
        cri_node.runtime.RemovePodSandbox(
            cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=TIMEOUT
        )
    with pytest.raises(grpc.RpcError) as error:
        cri_node.runtime.PodSandboxStatus(
            cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id), timeout=TIMEOUT
        )
    assert _code(error.value) == grpc.StatusCode.NOT_FOUND


def test_containers_share_the_pods_namespaces(cri_node: CriNode) -> None:
    config = cri_node.pod_config(
        hostname="shared-host",
        dns_config=cri.DNSConfig(servers=["10.9.9.9"], searches=["example.test"]),
    )
    pod_id = cri_node.run_pod(config)
    try:
        server = cri_node.run(pod_id, cri_node.container_config("httpd", "-f", "-p", "8080"))
        client = cri_node.run(pod_id, cri_node.container_config("sleep", "600"))
        # The pod's network: the client reaches the server on localhost.
        deadline = time.monotonic() + 10
        while True:
            reply = cri_node.exec_sync(client, "sh", "-c", "echo | nc 127.0.0.1 8080")
            if reply.exit_code == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert reply.exit_code == 0, reply.stderr
        assert cri_node.exec_sync(client, "hostname").stdout.strip() == b"shared-host"
        resolv = cri_node.exec_sync(client, "cat", "/etc/resolv.conf").stdout
        assert b"nameserver 10.9.9.9" in resolv and b"search example.test" in resolv
        ipc = [
            cri_node.exec_sync(c, "readlink", "/proc/self/ns/ipc").stdout for c in (server, client)
        ]
        assert ipc[0] == ipc[1]
    finally:
        cri_node.remove_pod(pod_id)


def test_pod_level_pid_namespace_is_shared(cri_node: CriNode) -> None:
    options = cri.NamespaceOption(pid=cri.POD)
    config = cri_node.pod_config(
        linux=cri.LinuxPodSandboxConfig(
            security_context=cri.LinuxSandboxSecurityContext(namespace_options=options)
        )
    )
    pod_id = cri_node.run_pod(config)
    try:
        container_options = cri.LinuxContainerConfig(
            security_context=cri.LinuxContainerSecurityContext(namespace_options=options)
        )
        first = cri_node.run(
            pod_id, cri_node.container_config("sleep", "601", linux=container_options)
        )
        second = cri_node.run(
            pod_id, cri_node.container_config("sleep", "602", linux=container_options)
        )
        processes = cri_node.exec_sync(second, "ps", "-o", "args").stdout
        assert b"sleep 601" in processes, processes
        assert cri_node.status(first).state == cri.CONTAINER_RUNNING
        own = cri.LinuxContainerConfig(
            security_context=cri.LinuxContainerSecurityContext(
                namespace_options=cri.NamespaceOption(pid=cri.CONTAINER)
            )
        )
        alone = cri_node.run(pod_id, cri_node.container_config("sleep", "603", linux=own))
        processes = cri_node.exec_sync(alone, "ps", "-o", "args").stdout
        assert b"sleep 601" not in processes and b"sleep 603" in processes, processes
    finally:
        cri_node.remove_pod(pod_id)


# ---- containers ----


def test_container_lifecycle_exit_codes_and_filters(cri_node: CriNode) -> None:
    pod_id = cri_node.run_pod()
    try:
        ok = cri_node.create(pod_id, cri_node.container_config("true", labels={"k": "ok"}))
        assert cri_node.status(ok).state == cri.CONTAINER_CREATED
        cri_node.start(ok)
        failing = cri_node.run(pod_id, cri_node.container_config("sh", "-c", "exit 3"))
        done = cri_node.wait_exited(ok)
        assert (done.exit_code, done.reason) == (0, "Completed")
        assert 0 < done.created_at <= done.started_at <= done.finished_at
        failed = cri_node.wait_exited(failing)
        assert (failed.exit_code, failed.reason) == (3, "Error")
        listed = cri_node.runtime.ListContainers(
            cri.ListContainersRequest(
                filter=cri.ContainerFilter(pod_sandbox_id=pod_id, label_selector={"k": "ok"})
            ),
            timeout=TIMEOUT,
        ).containers
        assert [c.id for c in listed] == [ok]
        with pytest.raises(grpc.RpcError) as error:
            cri_node.start(ok)  # an exited container cannot start again
        assert _code(error.value) == grpc.StatusCode.FAILED_PRECONDITION
        for container_id in (ok, failing, failing):  # removing twice is no error
            cri_node.runtime.RemoveContainer(
                cri.RemoveContainerRequest(container_id=container_id), timeout=TIMEOUT
            )
        with pytest.raises(grpc.RpcError) as error:
            cri_node.status(ok)
        assert _code(error.value) == grpc.StatusCode.NOT_FOUND
    finally:
        cri_node.remove_pod(pod_id)


def test_exited_at_the_exit_with_the_whole_log_and_removed_after_the_cleanup(
    cri_node: CriNode,
) -> None:
    """EXITED comes as soon as the exit is known (before the core's cleanup, on native), and
    the log is complete then; RemoveContainer leaves nothing of the container in the core."""
    pod_id = cri_node.run_pod()
    try:
        # More output than a pipe holds: the supervisor is still copying it when `sh` exits.
        config = cri_node.container_config("sh", "-c", "seq 1 20000; exit 4")
        container_id = cri_node.run(pod_id, config)
        log_path = Path(cri_node.status(container_id).log_path)
        deadline = time.monotonic() + TIMEOUT
        while (status := cri_node.status(container_id)).state != cri.CONTAINER_EXITED:
            assert status.state == cri.CONTAINER_RUNNING
            assert time.monotonic() < deadline, "no exit"
            time.sleep(0.001)
        assert (status.exit_code, status.reason) == (4, "Error")
        lines = log_path.read_bytes().splitlines()
        assert [line.split(b" ", 3)[3] for line in lines] == [
            str(n).encode() for n in range(1, 20001)
        ]
        for call, request in (
            (cri_node.runtime.StopContainer, cri.StopContainerRequest),
            (cri_node.runtime.RemoveContainer, cri.RemoveContainerRequest),
        ):
            call(request(container_id=container_id), timeout=TIMEOUT)
        listed = cri_node.service.stub().Containers(pb.ContainersRequest(), timeout=TIMEOUT)
        assert container_id not in {c.container_id for c in listed.containers}
    finally:
        cri_node.remove_pod(pod_id)


def test_stop_sends_sigterm_then_kills(cri_node: CriNode) -> None:
    pod_id = cri_node.run_pod()
    try:
        polite = cri_node.run(
            pod_id, cri_node.container_config("sh", "-c", "trap 'exit 7' TERM; sleep 600 & wait")
        )
        stubborn = cri_node.run(
            pod_id, cri_node.container_config("sh", "-c", "trap '' TERM; sleep 600 & wait")
        )
        time.sleep(0.3)  # the traps are set
        cri_node.runtime.StopContainer(
            cri.StopContainerRequest(container_id=polite, timeout=10), timeout=TIMEOUT
        )
        assert cri_node.status(polite).exit_code == 7
        started = time.monotonic()
        cri_node.runtime.StopContainer(
            cri.StopContainerRequest(container_id=stubborn, timeout=1), timeout=TIMEOUT
        )
        assert time.monotonic() - started < 10
        assert cri_node.status(stubborn).exit_code == 128 + signal.SIGKILL
    finally:
        cri_node.remove_pod(pod_id)


def test_logs_in_the_cri_format_and_reopened(cri_node: CriNode) -> None:
    pod_config = cri_node.pod_config()
    pod_id = cri_node.run_pod(pod_config)
    try:
        config = cri_node.container_config(
            "sh", "-c", "echo out; echo err >&2; read -t 2 x < /dev/zero; sleep 1; echo after"
        )
        container_id = cri_node.run(pod_id, config)
        log_path = cri_node.status(container_id).log_path
        assert log_path == os.path.join(pod_config.log_directory, config.log_path)
        time.sleep(0.5)
        os.rename(log_path, log_path + ".1")
        cri_node.runtime.ReopenContainerLog(
            cri.ReopenContainerLogRequest(container_id=container_id), timeout=TIMEOUT
        )
        cri_node.wait_exited(container_id)
        first = Path(log_path + ".1").read_bytes().splitlines()
        second = Path(log_path).read_bytes().splitlines()
        for line in first + second:
            assert CRI_LOG_LINE.fullmatch(line), line
        assert [line.split(b" ", 3)[1:] for line in first] == [
            [b"stdout", b"F", b"out"],
            [b"stderr", b"F", b"err"],
        ] or sorted(line.split(b" ", 3)[3] for line in first) == [b"err", b"out"]
        assert [line.split(b" ", 3)[3] for line in second] == [b"after"]
    finally:
        cri_node.remove_pod(pod_id)


def test_exec_sync_output_exit_code_and_timeout(cri_node: CriNode) -> None:
    pod_id = cri_node.run_pod()
    try:
        container_id = cri_node.run(pod_id, cri_node.container_config("sleep", "600"))
        reply = cri_node.exec_sync(container_id, "sh", "-c", "echo hi; echo oops >&2; exit 4")
        assert (reply.stdout, reply.stderr, reply.exit_code) == (b"hi\n", b"oops\n", 4)
        with pytest.raises(grpc.RpcError) as error:
            cri_node.exec_sync(container_id, "/no/such/binary")  # never ran: no exit code
        assert _code(error.value) == grpc.StatusCode.FAILED_PRECONDITION
        assert "/no/such/binary" in (error.value.details() or "")  # type: ignore[attr-defined]
        with pytest.raises(grpc.RpcError) as error:
            cri_node.exec_sync(container_id, "sleep", "30", timeout=1)
        assert _code(error.value) == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        cri_node.remove_pod(pod_id)


def test_stats_come_from_our_accounting(cri_node: CriNode) -> None:
    pod_id = cri_node.run_pod()
    try:
        container_id = cri_node.run(
            pod_id,
            cri_node.container_config(
                "sh", "-c", "head -c 20000000 /dev/zero | cat >/dev/null; sleep 600"
            ),
        )
        time.sleep(1)
        stats = cri_node.runtime.ContainerStats(
            cri.ContainerStatsRequest(container_id=container_id), timeout=TIMEOUT
        ).stats
        assert stats.attributes.id == container_id
        assert stats.cpu.usage_core_nano_seconds.value > 0
        assert stats.memory.working_set_bytes.value > 0
        listed = cri_node.runtime.ListContainerStats(
            cri.ListContainerStatsRequest(filter=cri.ContainerStatsFilter(pod_sandbox_id=pod_id)),
            timeout=TIMEOUT,
        ).stats
        assert [s.attributes.id for s in listed] == [container_id]
        pod_stats = cri_node.runtime.PodSandboxStats(
            cri.PodSandboxStatsRequest(pod_sandbox_id=pod_id), timeout=TIMEOUT
        ).stats
        assert [c.attributes.id for c in pod_stats.linux.containers] == [container_id]
    finally:
        cri_node.remove_pod(pod_id)


def test_update_container_resources_reaches_the_cgroup(cri_node: CriNode) -> None:
    pod_id = cri_node.run_pod()
    try:
        container_id = cri_node.run(pod_id, cri_node.container_config("sleep", "600"))
        cri_node.runtime.UpdateContainerResources(
            cri.UpdateContainerResourcesRequest(
                container_id=container_id,
                linux=cri.LinuxContainerResources(memory_limit_in_bytes=96 * 1024 * 1024),
            ),
            timeout=TIMEOUT,
        )
        usage = cri_node.service.stub().Usage(pb.UsageRequest(container_id=container_id))
        assert usage.statistics.mem_limit_bytes == 96 * 1024 * 1024
    finally:
        cri_node.remove_pod(pod_id)


# ---- security context ----


def _security(**fields: object) -> cri.LinuxContainerConfig:
    return cri.LinuxContainerConfig(
        security_context=cri.LinuxContainerSecurityContext(**fields)  # type: ignore[arg-type]
    )


def test_run_as_user_group_and_supplemental_groups(cri_node: CriNode) -> None:
    pod_id = cri_node.run_pod()
    try:
        linux = _security(
            run_as_user=cri.Int64Value(value=1234),
            run_as_group=cri.Int64Value(value=2345),
            supplemental_groups=[3456],
        )
        container_id = cri_node.run(pod_id, cri_node.container_config("sleep", "600", linux=linux))
        ids = cri_node.exec_sync(container_id, "id").stdout.decode()
        assert "uid=1234" in ids and "gid=2345" in ids and "3456" in ids, ids
        by_name = cri_node.run(
            pod_id,
            cri_node.container_config("sleep", "600", linux=_security(run_as_username="nobody")),
        )
        assert cri_node.exec_sync(by_name, "id", "-u").stdout.strip() == b"65534"
    finally:
        cri_node.remove_pod(pod_id)


def test_read_only_rootfs_and_added_capability(cri_node: CriNode) -> None:
    pod_id = cri_node.run_pod()
    try:
        read_only = cri_node.run(
            pod_id, cri_node.container_config("sleep", "600", linux=_security(readonly_rootfs=True))
        )
        assert cri_node.exec_sync(read_only, "touch", "/file").exit_code != 0
        plain = cri_node.run(pod_id, cri_node.container_config("sleep", "600"))
        assert cri_node.exec_sync(plain, "touch", "/file").exit_code == 0
        assert cri_node.exec_sync(plain, "hostname", "renamed").exit_code != 0
        admin = cri_node.run(
            pod_id,
            cri_node.container_config(
                "sleep",
                "600",
                linux=_security(
                    capabilities=cri.Capability(add_capabilities=["SYS_ADMIN"]),
                    seccomp=cri.SecurityProfile(profile_type=cri.SecurityProfile.RuntimeDefault),
                ),
            ),
        )
        assert cri_node.exec_sync(admin, "hostname", "renamed").exit_code == 0
    finally:
        cri_node.remove_pod(pod_id)


# ---- bad input ----


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"log_path": "/abs/path.log"}, "config.log_path"),
        ({"log_path": "../escape.log"}, "config.log_path"),
        ({"mounts": [cri.Mount(container_path="rel", host_path="/tmp")]}, "container_path"),
        ({"mounts": [cri.Mount(container_path="/x", host_path="/tmp/../etc")]}, "host_path"),
        (
            {"linux": _security(run_as_group=cri.Int64Value(value=5))},
            "run_as_group",
        ),
        (
            {"linux": _security(seccomp_profile_path="custom.json")},
            "seccomp_profile_path",
        ),
    ],
)
def test_bad_container_configs_name_the_field(
    cri_node: CriNode, change: dict[str, object], field: str
) -> None:
    pod_id = cri_node.run_pod()
    try:
        config = cri_node.container_config("true", **change)
        with pytest.raises(grpc.RpcError) as error:
            cri_node.create(pod_id, config)
        assert _code(error.value) == grpc.StatusCode.INVALID_ARGUMENT
        assert field in (error.value.details() or "")  # type: ignore[attr-defined]
    finally:
        cri_node.remove_pod(pod_id)


def test_bad_pod_configs_name_the_field(cri_node: CriNode) -> None:
    bad_sysctl = cri_node.pod_config(
        linux=cri.LinuxPodSandboxConfig(sysctls={"kernel.hostname": "x"})
    )
    with pytest.raises(grpc.RpcError) as error:
        cri_node.run_pod(bad_sysctl)
    assert _code(error.value) == grpc.StatusCode.INVALID_ARGUMENT
    assert "sysctls" in (error.value.details() or "")  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as error:
        cri_node.runtime.RunPodSandbox(
            cri.RunPodSandboxRequest(config=cri.PodSandboxConfig()), timeout=TIMEOUT
        )
    assert "config.metadata.name" in (error.value.details() or "")  # type: ignore[attr-defined]


# ---- our own API sees CRI containers ----


def test_our_api_shows_cri_containers_with_their_pod(cri_node: CriNode) -> None:
    pod_config = cri_node.pod_config()
    pod_id = cri_node.run_pod(pod_config)
    try:
        container_id = cri_node.run(pod_id, cri_node.container_config("sleep", "600"))
        status = cri_node.service.stub().Status(pb.StatusRequest(container_id=container_id))
        labels = dict(status.labels)
        assert labels["io.kubernetes.pod.name"] == pod_config.metadata.name
        assert labels["io.containerizer.cri.pod"] == pod_id
    finally:
        cri_node.remove_pod(pod_id)
