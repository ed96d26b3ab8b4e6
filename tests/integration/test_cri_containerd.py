"""A pod's containers on the containerd runtime (CRI runtime_handler "containerd"), through the
CRI's own stubs against a real service and a private containerd: the pod's holder runs on the
native runtime, its containers under containerd's shim and runc, joined to the holder's
namespaces. Every assertion is on what the workload, the kernel, containerd or the log file
shows."""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.cri.api import cri
from tests.cgroup_roots import run_scoped_name
from tests.conftest import ServiceProcess, require, require_root
from tests.integration.containerd_daemon import (
    SHARED,
    ContainerdDaemon,
    containerd_available,
    containerd_config,
)
from tests.integration.cri import TIMEOUT, CriNode, import_busybox
from tests.integration.test_network import network_config

pytestmark = pytest.mark.integration

HANDLER = "containerd"
CRI_LOG_LINE = re.compile(
    rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}(Z|[+-]\d\d:\d\d) (stdout|stderr) [FP] .*"
)


class ContainerdPods(CriNode):
    """A CriNode whose pods run their containers on containerd, and what containerd holds."""

    def __init__(self, service: ServiceProcess, daemon: ContainerdDaemon, namespace: str) -> None:
        super().__init__(service)
        self.daemon = daemon
        self.namespace = namespace

    def run_pod(self, config: cri.PodSandboxConfig | None = None) -> str:
        config = config or self.pod_config()
        reply = self.runtime.RunPodSandbox(
            cri.RunPodSandboxRequest(config=config, runtime_handler=HANDLER), timeout=TIMEOUT
        )
        return str(reply.pod_sandbox_id)

    def holder_pid(self, pod_id: str) -> int:
        return int(self.service.stub().Status(pb.StatusRequest(container_id=pod_id)).pid)

    def held_in_containerd(self) -> dict[str, list[str]]:
        """What our namespace of containerd holds, by kind: ids of containers, tasks and
        leases, keys of snapshots (the image's committed layers among them)."""
        kinds = {
            "containers": ("containers", "ls", "-q"),
            "tasks": ("tasks", "ls", "-q"),
            "snapshots": ("snapshots", "ls"),
            "leases": ("leases", "ls", "-q"),
        }
        held = {}
        for kind, args in kinds.items():
            lines = self.daemon.ctr(*args, namespace=self.namespace).stdout.splitlines()
            held[kind] = [line.split()[0] for line in lines[kind == "snapshots" :] if line.strip()]
        return held


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ContainerdDaemon]:
    require_root()
    missing = containerd_available()
    require(missing is None, str(missing))
    daemon = SHARED.acquire(lambda: tmp_path_factory.mktemp("containerd"))
    yield daemon
    SHARED.release()


@pytest.fixture(scope="module")
def node(
    tmp_path_factory: pytest.TempPathFactory, containerd: ContainerdDaemon
) -> Iterator[ContainerdPods]:
    """One service (native for the pods' holders, containerd for their containers) on a
    bridge, with the test busybox image imported."""
    workdir = tmp_path_factory.mktemp("cri-containerd")
    namespace = run_scoped_name("ctz")
    bridge, subnet = network_config()
    service = ServiceProcess(
        workdir,
        extra_config=(
            f'cri_socket = "{workdir / "cri.sock"}"\nallow_privileged = true\n'
            f"{containerd_config(containerd, namespace)}"
            f'[network]\nbridge = "{bridge}"\nsubnet = "{subnet}"\n'
        ),
    )
    service.start()
    pods = ContainerdPods(service, containerd, namespace)
    try:
        import_busybox(service, workdir)
        yield pods
    finally:
        with contextlib.suppress(Exception):
            pods.remove_all_pods()
        pods.close()
        with contextlib.suppress(Exception):
            service.destroy_all()
        service.stop()
        containerd.remove_namespace(namespace)
        service.remove_cgroup_roots()


@pytest.fixture
def pod(node: ContainerdPods) -> Iterator[str]:
    pod_id = node.run_pod(node.pod_config(hostname="ctr-pod"))
    yield pod_id
    node.remove_pod(pod_id)


def _security(**fields: object) -> cri.LinuxContainerConfig:
    return cri.LinuxContainerConfig(
        security_context=cri.LinuxContainerSecurityContext(**fields)  # type: ignore[arg-type]
    )


def _code(error: object) -> grpc.StatusCode:
    assert isinstance(error, grpc.RpcError)
    return error.code()  # type: ignore[no-any-return]


def _details(error: object) -> str:
    assert isinstance(error, grpc.RpcError)
    return error.details() or ""  # type: ignore[no-any-return]


def _output(node: CriNode, container_id: str, *command: str) -> str:
    reply = node.exec_sync(container_id, *command)
    assert reply.exit_code == 0, (command, reply.stderr)
    return bytes(reply.stdout).decode().strip()


# ---- the pod's namespaces ----


def test_containers_share_the_holders_network_hostname_and_ipc(
    node: ContainerdPods, pod: str
) -> None:
    server = node.run(pod, node.container_config("httpd", "-f", "-p", "8080"))
    client = node.run(pod, node.container_config("sleep", "600"))
    for kind in ("net", "uts", "ipc"):
        inside = _output(node, client, "readlink", f"/proc/self/ns/{kind}")
        assert inside == node.pod_namespace(pod, kind), kind
    assert _output(node, client, "hostname") == "ctr-pod"
    assert "ctr-pod" in _output(node, client, "cat", "/etc/hosts")
    deadline = time.monotonic() + 10
    while True:  # the server is reached on the pod's loopback
        reply = node.exec_sync(client, "sh", "-c", "echo | nc 127.0.0.1 8080")
        if reply.exit_code == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert reply.exit_code == 0, reply.stderr
    assert node.status(server).state == cri.CONTAINER_RUNNING


def test_pod_level_pid_namespace_is_the_holders(node: ContainerdPods) -> None:
    options = cri.NamespaceOption(pid=cri.POD)
    config = node.pod_config(
        linux=cri.LinuxPodSandboxConfig(
            security_context=cri.LinuxSandboxSecurityContext(namespace_options=options)
        )
    )
    pod_id = node.run_pod(config)
    try:
        linux = _security(namespace_options=options)
        first = node.run(pod_id, node.container_config("sleep", "601", linux=linux))
        second = node.run(pod_id, node.container_config("sleep", "602", linux=linux))
        holder = node.holder_pid(pod_id)
        assert _output(node, first, "readlink", "/proc/self/ns/pid") == os.readlink(
            f"/proc/{holder}/ns/pid"
        )
        assert "sleep 601" in _output(node, second, "ps", "-o", "args")
    finally:
        node.remove_pod(pod_id)


# ---- security context ----


def test_run_as_user_group_and_supplemental_groups(node: ContainerdPods, pod: str) -> None:
    linux = _security(
        run_as_user=cri.Int64Value(value=1234),
        run_as_group=cri.Int64Value(value=2345),
        supplemental_groups=[3456],
    )
    container_id = node.run(pod, node.container_config("sleep", "600", linux=linux))
    ids = _output(node, container_id, "id")
    assert "uid=1234" in ids and "gid=2345" in ids and "3456" in ids, ids
    by_name = node.run(
        pod, node.container_config("sleep", "600", linux=_security(run_as_username="nobody"))
    )
    assert _output(node, by_name, "id", "-u") == "65534"
    capabilities = _output(node, by_name, "grep", "CapEff", "/proc/self/status")
    assert capabilities.split()[1] == "0000000000000000"  # a non-root user holds nothing


def test_read_only_rootfs_and_masked_paths(node: ContainerdPods, pod: str) -> None:
    read_only = node.run(
        pod,
        node.container_config(
            "sleep", "600", linux=_security(readonly_rootfs=True, masked_paths=["/etc/group"])
        ),
    )
    assert node.exec_sync(read_only, "touch", "/file").exit_code != 0
    assert node.exec_sync(read_only, "touch", "/mnt/mesos/sandbox/file").exit_code == 0
    assert _output(node, read_only, "cat", "/etc/group") == ""  # the CRI's path, masked
    assert _output(node, read_only, "cat", "/proc/timer_list") == ""  # and ours still
    plain = node.run(pod, node.container_config("sleep", "600"))
    assert node.exec_sync(plain, "touch", "/file").exit_code == 0


def test_capabilities_added_and_dropped(node: ContainerdPods, pod: str) -> None:
    plain = node.run(pod, node.container_config("sleep", "600"))
    assert node.exec_sync(plain, "hostname", "renamed").exit_code != 0
    admin = node.run(
        pod,
        node.container_config(
            "sleep",
            "600",
            linux=_security(
                capabilities=cri.Capability(add_capabilities=["SYS_ADMIN"]),
                seccomp=cri.SecurityProfile(profile_type=cri.SecurityProfile.RuntimeDefault),
            ),
        ),
    )
    # CAP_SYS_ADMIN and the default filter widened for it: the pod's hostname can change.
    assert node.exec_sync(admin, "mount", "-t", "tmpfs", "x", "/mnt").exit_code == 0
    none = node.run(
        pod,
        node.container_config(
            "sleep", "600", linux=_security(capabilities=cri.Capability(drop_capabilities=["ALL"]))
        ),
    )
    assert _output(node, none, "grep", "CapBnd", "/proc/self/status").split()[1] == "0" * 16
    assert node.exec_sync(none, "busybox", "chown", "1:1", "/tmp").exit_code != 0


def _profile(path: Path, document: dict[str, object]) -> str:
    path.write_text(json.dumps(document))
    return str(path)


def test_seccomp_localhost_profile(node: ContainerdPods, pod: str, tmp_path: Path) -> None:
    # Docker's format: the mkdir rule applies only without CAP_SYS_ADMIN, as its excludes say.
    profile = _profile(
        tmp_path / "no-mkdir.json",
        {
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [
                {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
                {"name": "getcwd", "action": "SCMP_ACT_ERRNO", "excludes": {"caps": ["CAP_CHOWN"]}},
            ],
        },
    )
    seccomp = cri.SecurityProfile(profile_type=cri.SecurityProfile.Localhost, localhost_ref=profile)
    container_id = node.run(
        pod, node.container_config("sleep", "600", linux=_security(seccomp=seccomp))
    )
    refused = node.exec_sync(container_id, "mkdir", "/tmp/x")
    assert refused.exit_code != 0 and b"Permission denied" in refused.stderr  # errno 13
    # The getcwd rule is excluded: the container holds CAP_CHOWN.
    assert _output(node, container_id, "pwd") == "/mnt/mesos/sandbox"
    unconfined = node.run(
        pod,
        node.container_config(
            "sleep",
            "600",
            linux=_security(
                seccomp=cri.SecurityProfile(profile_type=cri.SecurityProfile.Unconfined)
            ),
        ),
    )
    assert _output(node, unconfined, "grep", "Seccomp:", "/proc/self/status").split()[1] == "0"


def test_a_bad_localhost_profile_names_the_field(
    node: ContainerdPods, pod: str, tmp_path: Path
) -> None:
    profile = _profile(tmp_path / "bad.json", {"defaultAction": "SCMP_ACT_NOPE"})
    seccomp = cri.SecurityProfile(profile_type=cri.SecurityProfile.Localhost, localhost_ref=profile)
    container_id = node.create(
        pod, node.container_config("sleep", "600", linux=_security(seccomp=seccomp))
    )
    with pytest.raises(grpc.RpcError) as error:
        node.start(container_id)
    assert _code(error.value) == grpc.StatusCode.INVALID_ARGUMENT
    assert "localhost_ref" in _details(error.value) and "defaultAction" in _details(error.value)


# ---- volumes ----


def test_volumes_read_write_and_read_only(node: ContainerdPods, pod: str, tmp_path: Path) -> None:
    shared, read_only = tmp_path / "shared", tmp_path / "ro"
    for directory in (shared, read_only):
        directory.mkdir()
    (read_only / "given").write_text("from the host\n")
    mounts = [
        cri.Mount(container_path="/data", host_path=str(shared)),
        cri.Mount(container_path="/config", host_path=str(read_only), readonly=True),
    ]
    container_id = node.run(pod, node.container_config("sleep", "600", mounts=mounts))
    assert node.exec_sync(container_id, "sh", "-c", "echo hi > /data/out").exit_code == 0
    assert (shared / "out").read_text() == "hi\n"
    assert _output(node, container_id, "cat", "/config/given") == "from the host"
    assert node.exec_sync(container_id, "touch", "/config/new").exit_code != 0


# ---- logs ----


def _records(path: Path) -> list[list[bytes]]:
    lines = path.read_bytes().splitlines()
    for line in lines:
        assert CRI_LOG_LINE.fullmatch(line), line
    return [line.split(b" ", 3)[1:] for line in lines]


def _wait_for_record(path: Path, content: bytes, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and any(r[2] == content for r in _records(path))):
        assert time.monotonic() < deadline, f"no {content!r} in {path}"
        time.sleep(0.05)


def test_logs_in_the_cri_format_reopened_and_complete_at_exit(node: ContainerdPods) -> None:
    pod_config = node.pod_config()
    pod_id = node.run_pod(pod_config)
    try:
        config = node.container_config(
            "sh", "-c", "echo out; echo err >&2; sleep 1.5; echo after; printf tail"
        )
        container_id = node.run(pod_id, config)
        log_path = Path(node.status(container_id).log_path)
        assert log_path == Path(pod_config.log_directory) / config.log_path
        _wait_for_record(log_path, b"err")
        os.rename(log_path, f"{log_path}.1")
        node.runtime.ReopenContainerLog(
            cri.ReopenContainerLogRequest(container_id=container_id), timeout=TIMEOUT
        )
        node.wait_exited(container_id)  # all of the output is in the log by then
        assert sorted(_records(Path(f"{log_path}.1"))) == [
            [b"stderr", b"F", b"err"],
            [b"stdout", b"F", b"out"],
        ]
        assert _records(log_path) == [[b"stdout", b"F", b"after"], [b"stdout", b"F", b"tail"]]
        with pytest.raises(grpc.RpcError) as error:  # an exited container has no log to reopen
            node.runtime.ReopenContainerLog(
                cri.ReopenContainerLogRequest(container_id=container_id), timeout=TIMEOUT
            )
        assert "not running" in _details(error.value)
    finally:
        node.remove_pod(pod_id)


def test_logs_keep_flowing_while_the_service_is_down(node: ContainerdPods) -> None:
    pod_id = node.run_pod()
    try:
        config = node.container_config(
            "sh", "-c", "i=0; while true; do i=$((i+1)); echo line $i; sleep 0.1; done"
        )
        container_id = node.run(pod_id, config)
        log_path = Path(node.status(container_id).log_path)
        _wait_for_record(log_path, b"line 2")
        node.service.kill()
        before = len(_records(log_path))
        time.sleep(1)
        assert len(_records(log_path)) > before + 3  # written with nobody of ours running
        node.service.start()
        node.reconnect()
        rotated = Path(f"{log_path}.1")
        os.rename(log_path, rotated)
        node.runtime.ReopenContainerLog(  # the relay is found again after the restart
            cri.ReopenContainerLogRequest(container_id=container_id), timeout=TIMEOUT
        )
        deadline = time.monotonic() + 10
        while not (log_path.exists() and len(_records(log_path)) >= 2):
            assert time.monotonic() < deadline, "nothing written after the reopen"
            time.sleep(0.05)
        numbers = [int(r[2].split()[1]) for r in _records(rotated) + _records(log_path)]
        assert numbers == list(range(1, len(numbers) + 1))  # nothing lost, nothing twice
    finally:
        node.remove_pod(pod_id)


# ---- ExecSync ----


def test_exec_sync_output_exit_code_timeout_and_not_found(node: ContainerdPods, pod: str) -> None:
    linux = _security(run_as_user=cri.Int64Value(value=4321))
    container_id = node.run(
        pod,
        node.container_config("sleep", "600", envs=[cri.KeyValue(key="K", value="v")], linux=linux),
    )
    reply = node.exec_sync(container_id, "sh", "-c", "echo hi $K $(id -u); echo oops >&2; exit 4")
    assert (reply.stdout, reply.stderr, reply.exit_code) == (b"hi v 4321\n", b"oops\n", 4)
    with pytest.raises(grpc.RpcError) as error:
        node.exec_sync(container_id, "/no/such/binary")  # never ran: no exit code
    assert _code(error.value) == grpc.StatusCode.FAILED_PRECONDITION
    assert "/no/such/binary" in _details(error.value)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as error:
        node.exec_sync(container_id, "sleep", "30", timeout=1)
    assert _code(error.value) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 10
    assert "sleep 30" not in _output(node, container_id, "ps", "-o", "args")  # killed
    big = node.exec_sync(container_id, "sh", "-c", "head -c 3000000 /dev/zero")
    assert len(big.stdout) == 3_000_000


# ---- nothing left behind ----


def test_stop_and_remove_leave_nothing_in_containerd(node: ContainerdPods) -> None:
    pod_id = node.run_pod()
    run_dirs = node.service.state_dir / "containerd"
    container_id = node.run(pod_id, node.container_config("sleep", "600"))
    node.exec_sync(container_id, "true")
    held = node.held_in_containerd()
    assert all(container_id in ids for ids in held.values()), held
    assert (run_dirs / container_id).is_dir()
    node.runtime.StopContainer(
        cri.StopContainerRequest(container_id=container_id, timeout=1), timeout=TIMEOUT
    )
    assert node.status(container_id).state == cri.CONTAINER_EXITED
    node.remove_pod(pod_id)
    held = node.held_in_containerd()
    assert held["containers"] == held["tasks"] == [], held
    assert container_id not in held["snapshots"] + held["leases"], held
    assert not (run_dirs / container_id).exists()


def _exec_stream(
    node: ContainerdPods, container_id: str, *argv: str, tty: bool = False, stdin: bytes = b""
) -> tuple[bytes, bytes, int]:
    """A streaming Exec through our own API: stdout, stderr and the exit code."""
    start = pb.ExecStart(container_id=container_id, argv=list(argv), tty=tty, stdin=True)
    requests = [pb.ExecRequest(start=start), pb.ExecRequest(stdin=stdin)]
    if not tty:
        requests.append(pb.ExecRequest(close_stdin=True))
    stdout, stderr, code = b"", b"", -1
    for reply in node.service.stub().Exec(iter(requests), timeout=TIMEOUT):
        stdout += reply.stdout
        stderr += reply.stderr
        if reply.WhichOneof("output") == "exit_code":
            code = reply.exit_code
    return stdout, stderr, code


def test_streaming_exec_with_input_and_with_a_terminal(node: ContainerdPods, pod: str) -> None:
    container_id = node.run(pod, node.container_config("sleep", "600"))
    piped = _exec_stream(
        node, container_id, "sh", "-c", "cat; echo err >&2; exit 3", stdin=b"hello\n"
    )
    assert piped == (b"hello\n", b"err\n", 3)
    counted = _exec_stream(node, container_id, "wc", "-c", stdin=b"x" * 300_000)
    assert (counted[0].strip(), counted[2]) == (b"300000", 0)  # more than a FIFO holds
    stdout, stderr, code = _exec_stream(
        node, container_id, "sh", "-c", "test -t 0 && test -t 1 && echo terminal", tty=True
    )
    assert (stdout.strip(), stderr, code) == (b"terminal", b"", 0)
    with pytest.raises(grpc.RpcError) as error:
        _exec_stream(node, container_id, "/no/such/binary")
    assert _code(error.value) == grpc.StatusCode.FAILED_PRECONDITION
    assert not list((node.service.state_dir / "containerd" / container_id).glob("exec-*"))
