"""CRI pods on the docker runtime (runtime_handler "docker"), against a real service and the
suite's private dockerd: the pod's holder is a docker container (Docker joins only its own
containers' namespaces), and the pod's containers join it by `container:<id>`."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.cri.api import cri
from adapter.runtimes.docker.handle import LABEL_CONTAINER_ID, LABEL_ROLE, ROLE_SANDBOX
from isolators.cgroups.locate import UNIFIED, process_cgroups
from tests.conftest import ServiceProcess
from tests.cri_logs import records as cri_records
from tests.docker_fixtures import PrivateDockerd, build_busybox_image, dockerd
from tests.integration.cri import TIMEOUT, CriNode, kubelet_default_linux, running_cri_node
from tests.integration.test_network import _get, free_port, network_config

__all__ = ["dockerd"]  # the shared session fixture, used by name
pytestmark = pytest.mark.integration

HANDLER = "docker"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, dockerd: PrivateDockerd) -> Iterator[CriNode]:
    workdir = tmp_path_factory.mktemp("cri-docker")
    bridge, subnet = network_config()
    service = ServiceProcess(
        workdir,
        extra_config=(
            f'cri_socket = "{workdir / "cri.sock"}"\n'
            f'[network]\nbridge = "{bridge}"\nsubnet = "{subnet}"\n'
            f'[runtimes.native]\n[runtimes.docker]\nendpoint = "{dockerd.endpoint}"\n'
        ),
    )
    with running_cri_node(service, workdir) as cri_node:
        # The same image by the same name in our store (CRI's ImageService) and in dockerd.
        build_busybox_image(dockerd, cri_node.image)
        yield cri_node


@contextlib.contextmanager
def docker_pod(node: CriNode, **fields: object) -> Iterator[str]:
    pod_id = node.run_pod(node.pod_config("", **fields), runtime_handler=HANDLER)
    try:
        yield pod_id
    finally:
        node.remove_pod(pod_id)


def _record(node: CriNode, container_id: str) -> pb.ContainerStatus:
    status: pb.ContainerStatus = node.service.stub().Status(
        pb.StatusRequest(container_id=container_id), timeout=TIMEOUT
    )
    return status


def _ours(daemon: PrivateDockerd, node: CriNode) -> list[str]:
    """Names of the docker containers this service owns (labelled with its state dir)."""
    client = daemon.client()
    try:
        label = f"org.containerizer.state-dir={node.service.state_dir}"
        return [c.name for c in client.containers.list(all=True, filters={"label": label})]
    finally:
        client.close()


def _reachable(node: CriNode, client: str, port: int) -> cri.ExecSyncResponse:
    deadline = time.monotonic() + 10
    while True:
        reply = node.exec_sync(client, "sh", "-c", f"echo | nc 127.0.0.1 {port}")
        if reply.exit_code == 0 or time.monotonic() > deadline:
            return reply
        time.sleep(0.1)


def _pod_ip(node: CriNode, pod_id: str) -> str:
    reply = node.runtime.PodSandboxStatus(
        cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id), timeout=TIMEOUT
    )
    return str(reply.status.network.ip)


def test_containers_share_the_docker_holders_network_ipc_and_hostname(
    node: CriNode, dockerd: PrivateDockerd
) -> None:
    with docker_pod(node, hostname="docker-pod") as pod_id:
        server = node.run(pod_id, node.container_config("httpd", "-f", "-p", "8080"))
        client = node.run(pod_id, node.container_config("sleep", "600"))
        assert {_record(node, c).runtime for c in (pod_id, server, client)} == {HANDLER}
        # One network: localhost reaches the other container, and both have the pod's address.
        reply = _reachable(node, client, 8080)
        assert reply.exit_code == 0, reply.stderr
        address = _pod_ip(node, pod_id)
        assert address
        for container in (server, client):
            addresses = node.exec_sync(container, "ip", "-4", "-o", "addr").stdout.decode()
            assert f"{address}/" in addresses, addresses
        # One IPC namespace and the pod's hostname.
        for kind in ("net", "ipc"):
            links = {
                node.exec_sync(c, "readlink", f"/proc/self/ns/{kind}").stdout
                for c in (server, client)
            }
            assert len(links) == 1, (kind, links)
        assert node.exec_sync(client, "hostname").stdout.strip() == b"docker-pod"
        # Placed in the pod's cgroup, as on every runtime.
        pod_cgroup = node.pod_cgroup(pod_id)
        assert any(pod_cgroup.glob(f"{client}/*/cgroup.procs")), list(pod_cgroup.iterdir())
        assert node.status(server).state == cri.CONTAINER_RUNNING
    # Stop and remove leave nothing: no docker container of ours, no pod cgroup.
    assert _ours(dockerd, node) == []
    assert not node.pod_cgroup(pod_id).exists()
    # Nothing below our root but the (empty) directory of pods, in every hierarchy.
    leftovers = []
    for path in node.service.leftover_cgroups():
        below = [child for child in path.iterdir() if child.is_dir()]
        leftovers += below if path.name == "_pods" else [path]
    assert leftovers == []


def test_a_container_pid_namespace_of_its_own(node: CriNode) -> None:
    own = cri.LinuxContainerConfig(
        security_context=cri.LinuxContainerSecurityContext(
            namespace_options=cri.NamespaceOption(pid=cri.CONTAINER)
        )
    )
    with docker_pod(node, linux=kubelet_default_linux(cri.POD)) as pod_id:
        container = node.run(pod_id, node.container_config("sleep", "601", linux=own))
        processes = node.exec_sync(container, "ps", "-o", "args").stdout
        assert b"sleep 601" in processes and b"sleep infinity" not in processes, processes
        shared = node.run(pod_id, node.container_config("sleep", "603"))
        processes = node.exec_sync(shared, "ps", "-o", "args").stdout
        assert b"sleep infinity" in processes, processes  # the pod's: the holder is in sight


def test_the_network_sandbox_leaves_room_for_runc_to_start_it(
    node: CriNode, dockerd: PrivateDockerd
) -> None:
    # runc applies the sandbox's pids limit while its own init (a Go program of several
    # threads) still waits in there for the start: one refused a thread dies, and the pod's
    # start failed at random ("cannot start a stopped process").
    with docker_pod(node) as pod_id:
        cgroup = _pids_cgroup(_sandbox_pid(dockerd, pod_id))
        peak, limit = (int((cgroup / name).read_text()) for name in ("pids.peak", "pids.max"))
        assert peak < limit, f"{cgroup}: runc's start took {peak} tasks, the limit is {limit}"


def _sandbox_pid(daemon: PrivateDockerd, container_id: str) -> int:
    """The host pid of the network sandbox of our container `container_id`."""
    client = daemon.client()
    try:
        labels = [f"{LABEL_ROLE}={ROLE_SANDBOX}", f"{LABEL_CONTAINER_ID}={container_id}"]
        (sandbox,) = client.containers.list(filters={"label": labels})
        return int(sandbox.attrs["State"]["Pid"])
    finally:
        client.close()


def _pids_cgroup(pid: int) -> Path:
    """The pids cgroup directory of process `pid` (cgroup v1 or v2)."""
    paths = process_cgroups(pid)
    if "pids" in paths:
        return Path("/sys/fs/cgroup/pids") / paths["pids"].lstrip("/")
    return Path("/sys/fs/cgroup") / paths[UNIFIED].lstrip("/")


def test_pod_and_containers_come_back_after_kill_9(node: CriNode, dockerd: PrivateDockerd) -> None:
    with docker_pod(node) as pod_id:
        first = node.run(pod_id, node.container_config("sleep", "600"))
        node.service.kill()
        node.service.start()
        node.reconnect()
        assert node.status(first).state == cri.CONTAINER_RUNNING
        # The holder is found again among the driver's own containers: a new container joins it.
        second = node.run(pod_id, node.container_config("sleep", "602"))
        links = {node.exec_sync(c, "readlink", "/proc/self/ns/net").stdout for c in (first, second)}
        assert len(links) == 1, links
    assert _ours(dockerd, node) == []


def test_status_says_how_each_handler_runs_pods(node: CriNode) -> None:
    reply = node.runtime.Status(cri.StatusRequest(verbose=True), timeout=TIMEOUT)
    handlers = json.loads(reply.info["config"])["runtimeHandlers"]
    assert "its own container" in handlers[HANDLER]
    assert "a native process" in handlers["native"]


def test_a_stopped_pod_takes_no_containers(node: CriNode) -> None:
    with docker_pod(node) as pod_id:
        node.runtime.StopPodSandbox(
            cri.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=TIMEOUT
        )
        with pytest.raises(grpc.RpcError) as error:
            node.create(pod_id, node.container_config("sleep", "1"))
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION


# ---- CRI logs, seccomp, sysctls, ports ----


def _log_path(node: CriNode, container_id: str) -> Path:
    return Path(node.status(container_id).log_path)


def test_the_output_is_a_cri_log_with_partial_records_for_long_lines(node: CriNode) -> None:
    script = (
        "echo one; echo two >&2; head -c 40960 /dev/zero | tr '\\0' a; echo; printf 'no newline'"
    )
    with docker_pod(node) as pod_id:
        container = node.run(pod_id, node.container_config("sh", "-c", script))
        assert node.wait_exited(container).exit_code == 0
        found = cri_records(_log_path(node, container))
        shape = [(stream, tag, len(text), set(text)) for stream, tag, text in found]
        stdout = [entry for entry in shape if entry[0] == b"stdout"]
        assert stdout == [
            (b"stdout", b"F", 3, set(b"one")),
            (b"stdout", b"P", 16384, {ord("a")}),
            (b"stdout", b"P", 16384, {ord("a")}),
            (b"stdout", b"F", 8192, {ord("a")}),
            (b"stdout", b"F", 10, set(b"no newline")),
        ]
        assert [entry for entry in found if entry[0] == b"stderr"] == [(b"stderr", b"F", b"two")]


def test_reopen_container_log_continues_in_a_new_file(node: CriNode) -> None:
    counter = "i=0; while :; do echo line$i; i=$((i+1)); sleep 0.05; done"
    with docker_pod(node) as pod_id:
        container = node.run(pod_id, node.container_config("sh", "-c", counter))
        path = _log_path(node, container)
        _wait_for(lambda: len(path.read_bytes().splitlines()) >= 3)
        rotated = path.with_name(path.name + ".1")
        path.rename(rotated)  # as the kubelet rotates: rename, then ReopenContainerLog
        node.runtime.ReopenContainerLog(
            cri.ReopenContainerLogRequest(container_id=container), timeout=TIMEOUT
        )
        _wait_for(lambda: path.exists() and len(path.read_bytes().splitlines()) >= 3)
        node.runtime.StopContainer(
            cri.StopContainerRequest(container_id=container, timeout=0), timeout=TIMEOUT
        )
        lines = [text for _, _, text in cri_records(rotated) + cri_records(path)]
        # Every line once, in order, across the two files.
        assert lines == [b"line%d" % number for number in range(len(lines))], lines


def test_the_cri_log_resumes_after_kill_9_without_a_line_twice(node: CriNode) -> None:
    counter = "i=0; while :; do echo line$i; i=$((i+1)); sleep 0.05; done"
    with docker_pod(node) as pod_id:
        container = node.run(pod_id, node.container_config("sh", "-c", counter))
        path = _log_path(node, container)
        _wait_for(lambda: len(path.read_bytes().splitlines()) >= 3)
        node.service.kill()
        written = len(path.read_bytes().splitlines())
        time.sleep(0.5)  # output the service is not there to copy: Docker keeps it
        node.service.start()
        node.reconnect()
        _wait_for(lambda: len(path.read_bytes().splitlines()) >= written + 20)
        node.runtime.StopContainer(
            cri.StopContainerRequest(container_id=container, timeout=0), timeout=TIMEOUT
        )
        lines = [text for _, _, text in cri_records(path)]
        assert lines == [b"line%d" % number for number in range(len(lines))], lines


def _wait_for(condition: object, timeout: float = 20) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_a_localhost_seccomp_profile_is_docker_s_filter(node: CriNode, tmp_path: Path) -> None:
    profile = tmp_path / "no-mkdir.json"
    rule = {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13}
    profile.write_text(json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [rule]}))
    seccomp = cri.SecurityProfile(
        profile_type=cri.SecurityProfile.Localhost, localhost_ref=str(profile)
    )
    linux = cri.LinuxContainerConfig(
        security_context=cri.LinuxContainerSecurityContext(seccomp=seccomp)
    )
    with docker_pod(node) as pod_id:
        container = node.run(pod_id, node.container_config("sleep", "600", linux=linux))
        refused = node.exec_sync(container, "mkdir", "/tmp/x")
        assert refused.exit_code != 0 and b"Permission denied" in refused.stderr, refused
        assert node.exec_sync(container, "touch", "/touched").exit_code == 0
        status = node.exec_sync(container, "grep", "Seccomp:", "/proc/self/status").stdout
        assert status.split()[1] == b"2", status  # a filter, not unconfined


def test_a_bad_localhost_profile_is_refused_naming_the_field(node: CriNode, tmp_path: Path) -> None:
    profile = tmp_path / "bad.json"
    profile.write_text(json.dumps({"defaultAction": "SCMP_ACT_NOPE"}))
    seccomp = cri.SecurityProfile(
        profile_type=cri.SecurityProfile.Localhost, localhost_ref=str(profile)
    )
    linux = cri.LinuxContainerConfig(
        security_context=cri.LinuxContainerSecurityContext(seccomp=seccomp)
    )
    with docker_pod(node) as pod_id:
        container = node.create(pod_id, node.container_config("sleep", "600", linux=linux))
        with pytest.raises(grpc.RpcError) as error:
            node.start(container)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "localhost_ref" in (error.value.details() or "")


def test_pod_sysctls_reach_its_containers(node: CriNode) -> None:
    sysctls = {"kernel.shm_rmid_forced": "1", "net.ipv4.ip_unprivileged_port_start": "81"}
    with docker_pod(node, linux=cri.LinuxPodSandboxConfig(sysctls=sysctls)) as pod_id:
        container = node.run(pod_id, node.container_config("sleep", "600"))
        for name, value in sysctls.items():
            path = "/proc/sys/" + name.replace(".", "/")
            assert node.exec_sync(container, "cat", path).stdout.strip() == value.encode(), name


def test_a_pod_host_port_reaches_its_container(node: CriNode) -> None:
    port = free_port()
    mapping = cri.PortMapping(protocol=cri.TCP, container_port=8080, host_port=port)
    serve = "mkdir -p /www && echo served > /www/index.html && exec httpd -f -p 8080 -h /www"
    with docker_pod(node, port_mappings=[mapping]) as pod_id:
        node.run(pod_id, node.container_config("sh", "-c", serve))
        assert _get(f"http://127.0.0.1:{port}/index.html") == "served\n"
