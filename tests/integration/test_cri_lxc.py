"""CRI pods whose containers run on the LXC runtime (runtime_handler "lxc"), against a real
service: the pod's holder is a native container, its containers are LXC containers that join the
holder's namespaces and honour the CRI's security context, volumes, logs and ExecSync."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.core.errors import InvalidArgument
from adapter.cri.api import cri
from adapter.runtimes.lxc.rootfs import resolve_in_root
from tests.conftest import BIN
from tests.integration.cri import (
    TIMEOUT,
    CriNode,
    cri_service,
    kubelet_default_linux,
    running_cri_node,
)
from tests.integration.test_cri_runtime import CRI_LOG_LINE
from tests.integration.test_lxc import lxcpath, monitors, require_lxc

pytestmark = pytest.mark.integration

HANDLER = "lxc"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CriNode]:
    require_lxc()
    workdir = tmp_path_factory.mktemp("cri-lxc")
    with running_cri_node(cri_service(workdir, runtimes=(HANDLER,)), workdir) as cri_node:
        yield cri_node


@contextlib.contextmanager
def lxc_pod(node: CriNode, **fields: object) -> Iterator[str]:
    pod_id = node.run_pod(node.pod_config("", **fields), runtime_handler=HANDLER)
    try:
        yield pod_id
    finally:
        node.remove_pod(pod_id)


def _code(error: object) -> grpc.StatusCode:
    assert isinstance(error, grpc.RpcError)
    code: grpc.StatusCode = error.code()
    return code


def _details(error: object) -> str:
    assert isinstance(error, grpc.RpcError)
    return error.details() or ""


def _security(**fields: object) -> cri.LinuxContainerConfig:
    return cri.LinuxContainerConfig(
        security_context=cri.LinuxContainerSecurityContext(**fields)  # type: ignore[arg-type]
    )


def _record(node: CriNode, container_id: str) -> pb.ContainerStatus:
    status: pb.ContainerStatus = node.service.stub().Status(
        pb.StatusRequest(container_id=container_id), timeout=TIMEOUT
    )
    return status


# ---- namespaces ----


@pytest.mark.parametrize("shared_pid", [True, False], ids=["holder-process", "pinned"])
def test_lxc_containers_join_the_native_holders_namespaces(node: CriNode, shared_pid: bool) -> None:
    """A pod that shares its pid namespace has a holder process; the kubelet's default pod
    has its namespaces pinned: LXC containers join either."""
    config_fields = {
        "hostname": "lxc-pod",
        "dns_config": cri.DNSConfig(servers=["10.9.9.9"], searches=["example.test"]),
        "linux": kubelet_default_linux(cri.POD if shared_pid else cri.CONTAINER),
    }
    with lxc_pod(node, **config_fields) as pod_id:
        server = node.run(pod_id, node.container_config("httpd", "-f", "-p", "8080"))
        client = node.run(pod_id, node.container_config("sleep", "600"))
        holder = _record(node, pod_id)
        assert (holder.runtime, _record(node, client).runtime) == ("native", HANDLER)
        # The pod's network: the client reaches the server on localhost.
        deadline = time.monotonic() + 10
        while True:
            reply = node.exec_sync(client, "sh", "-c", "echo | nc 127.0.0.1 8080")
            if reply.exit_code == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert reply.exit_code == 0, reply.stderr
        for kind in ("net", "uts", "ipc", "pid") if shared_pid else ("net", "uts", "ipc"):
            inside = node.exec_sync(client, "readlink", f"/proc/self/ns/{kind}").stdout
            assert inside.decode().strip() == node.pod_namespace(pod_id, kind), kind
        assert node.exec_sync(client, "hostname").stdout.strip() == b"lxc-pod"
        resolv = node.exec_sync(client, "cat", "/etc/resolv.conf").stdout
        assert b"nameserver 10.9.9.9" in resolv and b"search example.test" in resolv
        # The pod's pid namespace: the holder and the other container are in sight; or the
        # container's own, with nothing else in it.
        processes = node.exec_sync(client, "ps", "-o", "args").stdout
        if shared_pid:
            assert b"sleep infinity" in processes and b"httpd -f -p 8080" in processes
        else:
            assert b"sleep 600" in processes and b"httpd" not in processes, processes
        assert node.status(server).state == cri.CONTAINER_RUNNING


def test_a_container_pid_namespace_of_its_own(node: CriNode) -> None:
    own = _security(namespace_options=cri.NamespaceOption(pid=cri.CONTAINER))
    with lxc_pod(node) as pod_id:
        container_id = node.run(pod_id, node.container_config("sleep", "604", linux=own))
        processes = node.exec_sync(container_id, "ps", "-o", "args").stdout
        assert b"sleep 604" in processes and b"sleep infinity" not in processes, processes


# ---- security context, root filesystem, volumes ----


def test_run_as_user_group_and_supplemental_groups(node: CriNode) -> None:
    linux = _security(
        run_as_user=cri.Int64Value(value=1234),
        run_as_group=cri.Int64Value(value=2345),
        supplemental_groups=[3456],
    )
    with lxc_pod(node) as pod_id:
        container_id = node.run(pod_id, node.container_config("sleep", "600", linux=linux))
        ids = node.exec_sync(container_id, "id").stdout.decode()
        assert "uid=1234" in ids and "gid=2345" in ids and "3456" in ids, ids
        workload = node.exec_sync(container_id, "sh", "-c", "id -u; ps -o user,args | grep 600")
        assert workload.stdout.startswith(b"1234\n") and b"1234" in workload.stdout.split(b"\n")[1]
        by_name = node.run(
            pod_id, node.container_config("sleep", "600", linux=_security(run_as_username="nobody"))
        )
        assert node.exec_sync(by_name, "id", "-u").stdout.strip() == b"65534"


def test_read_only_rootfs_with_volumes(node: CriNode, tmp_path: Path) -> None:
    writable, read_only = tmp_path / "writable", tmp_path / "read-only"
    for directory in (writable, read_only):
        directory.mkdir()
    (read_only / "given").write_text("from the host\n")
    mounts = [
        cri.Mount(host_path=str(writable), container_path="/data/out"),
        cri.Mount(host_path=str(read_only), container_path="/data/in", readonly=True),
    ]
    with lxc_pod(node) as pod_id:
        container_id = node.run(
            pod_id,
            node.container_config(
                "sleep", "600", mounts=mounts, linux=_security(readonly_rootfs=True)
            ),
        )
        refused = node.exec_sync(container_id, "touch", "/file")
        assert refused.exit_code != 0 and b"Read-only file system" in refused.stderr
        assert node.exec_sync(container_id, "touch", "/data/out/made").exit_code == 0
        assert (writable / "made").is_file()
        assert node.exec_sync(container_id, "cat", "/data/in/given").stdout == b"from the host\n"
        assert node.exec_sync(container_id, "touch", "/data/in/new").exit_code != 0
        plain = node.run(pod_id, node.container_config("sleep", "600"))
        assert node.exec_sync(plain, "touch", "/file").exit_code == 0
        assert node.exec_sync(plain, "hostname", "renamed").exit_code != 0


@contextlib.contextmanager
def shared_source(tmp_path: Path) -> Iterator[Path]:
    """A host directory that is a shared mount (as the kubelet's pods directory is)."""
    source = tmp_path / "source"
    (source / "mountpoint").mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(source), str(source)], check=True)
    try:
        subprocess.run(["mount", "--make-rshared", str(source)], check=True)
        yield source
    finally:
        subprocess.run(["umount", "-R", str(source)], check=False)


@pytest.mark.parametrize(
    ("propagation", "out"),
    [(cri.PROPAGATION_HOST_TO_CONTAINER, False), (cri.PROPAGATION_BIDIRECTIONAL, True)],
)
def test_volume_propagation_from_the_host_and_back(
    node: CriNode, tmp_path: Path, propagation: int, out: bool
) -> None:
    later = tmp_path / "later"
    later.mkdir()
    (later / "flag").write_text("")
    with shared_source(tmp_path) as source, lxc_pod(node) as pod_id:
        mount = cri.Mount(host_path=str(source), container_path="/volume", propagation=propagation)
        # A read-only root too: the volume's mount point is made before the root is remounted.
        linux = _security(privileged=True, readonly_rootfs=True)
        container_id = node.run(
            pod_id, node.container_config("sleep", "600", mounts=[mount], linux=linux)
        )
        subprocess.run(["mount", "--bind", str(later), str(source / "mountpoint")], check=True)
        listing = node.exec_sync(container_id, "ls", "/volume/mountpoint").stdout
        assert listing == b"flag\n"  # the host's mount reached the container
        made = node.exec_sync(
            container_id, "sh", "-c", "mkdir /volume/inside && mount -t tmpfs none /volume/inside"
        )
        assert made.exit_code == 0, made.stderr
        assert os.path.ismount(source / "inside") is out  # and the container's the host


def test_mount_targets_resolve_inside_the_rootfs(tmp_path: Path) -> None:
    """LXC makes missing mount points by following symlinks on the host: a target is resolved
    within the image's rootfs first, so an image's links cannot lead it out."""
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "var").mkdir()
    (root / "escape").symlink_to("/etc")
    (root / "var" / "run").symlink_to("../../../run")
    (root / "loop").symlink_to("loop")
    assert resolve_in_root(root, "/escape/hosts", "f") == "etc/hosts"
    assert resolve_in_root(root, "/var/run/secrets", "f") == "run/secrets"
    assert resolve_in_root(root, "/../../new/dir", "f") == "new/dir"
    with pytest.raises(InvalidArgument, match=r"^f: .*too many symlinks"):
        resolve_in_root(root, "/loop/x", "f")


# ---- logs and exec ----


def test_logs_in_the_cri_format_reopened_and_hidden_from_the_workload(node: CriNode) -> None:
    pod_config = node.pod_config()
    pod_id = node.run_pod(pod_config, runtime_handler=HANDLER)
    try:
        config = node.container_config(
            "sh",
            "-c",
            "echo out; echo err >&2; ls -A /.containerizer | wc -l; sleep 1.5; echo after",
        )
        container_id = node.run(pod_id, config)
        log_path = node.status(container_id).log_path
        assert log_path == os.path.join(pod_config.log_directory, config.log_path)
        time.sleep(0.7)
        os.rename(log_path, log_path + ".1")
        node.runtime.ReopenContainerLog(
            cri.ReopenContainerLogRequest(container_id=container_id), timeout=TIMEOUT
        )
        assert Path(log_path).is_file()  # reopened by the time the call returns
        assert node.wait_exited(container_id).exit_code == 0
        first = Path(log_path + ".1").read_bytes().splitlines()
        second = Path(log_path).read_bytes().splitlines()
        for line in first + second:
            assert CRI_LOG_LINE.fullmatch(line), line
        assert sorted(line.split(b" ", 3)[1:] for line in first) == [
            [b"stderr", b"F", b"err"],
            [b"stdout", b"F", b"0"],  # the service's directory is an empty mask
            [b"stdout", b"F", b"out"],
        ]
        assert [line.split(b" ", 3)[1:] for line in second] == [[b"stdout", b"F", b"after"]]
    finally:
        node.remove_pod(pod_id)


def test_exec_sync_output_exit_code_timeout_and_not_found(node: CriNode) -> None:
    with lxc_pod(node) as pod_id:
        container_id = node.run(
            pod_id,
            node.container_config(
                "sleep", "600", working_dir="/tmp", envs=[cri.KeyValue(key="GREETING", value="hi")]
            ),
        )
        reply = node.exec_sync(
            container_id, "sh", "-c", "echo $GREETING; pwd; echo oops >&2; exit 4"
        )
        assert (reply.stdout, reply.stderr, reply.exit_code) == (b"hi\n/tmp\n", b"oops\n", 4)
        with pytest.raises(grpc.RpcError) as error:
            node.exec_sync(container_id, "/no/such/binary")  # never ran: no exit code
        assert _code(error.value) == grpc.StatusCode.FAILED_PRECONDITION
        assert "/no/such/binary" in _details(error.value)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as error:
            node.exec_sync(container_id, "sleep", "30", timeout=1)
        assert _code(error.value) == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 10
        assert b"sleep 30" not in node.exec_sync(container_id, "ps", "-o", "args").stdout
        with pytest.raises(grpc.RpcError) as error:
            node.exec_sync("no-such-container", "true")
        assert _code(error.value) == grpc.StatusCode.NOT_FOUND


# ---- stop and remove ----


def test_stop_and_remove_leave_nothing(node: CriNode) -> None:
    with lxc_pod(node) as pod_id:
        stubborn = node.run(
            pod_id,
            node.container_config("sh", "-c", "trap '' TERM; sleep 700 & sleep 701 & wait"),
        )
        time.sleep(0.3)  # the trap is set
        cgroups = [Path(d) for d in _lxc_cgroups(node, stubborn) if Path(d).is_dir()]
        assert cgroups, "the container has cgroups under the service's root"
        started = time.monotonic()
        node.runtime.StopContainer(
            cri.StopContainerRequest(container_id=stubborn, timeout=1), timeout=TIMEOUT
        )
        assert time.monotonic() - started < 15
        assert node.status(stubborn).exit_code == 128 + signal.SIGKILL
        # In the pod's pid namespace the workload's children are not taken along by its end:
        # the stop killed them too.
        assert not [d for d in cgroups if d.exists() and (d / "cgroup.procs").read_text()]
        node.runtime.RemoveContainer(
            cri.RemoveContainerRequest(container_id=stubborn), timeout=TIMEOUT
        )
        assert not (lxcpath(node.service) / stubborn).exists()
        assert not monitors(stubborn)
        assert not [d for d in cgroups if d.exists()]
        pod = node.runtime.PodSandboxStatus(
            cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id), timeout=TIMEOUT
        ).status
        assert pod.state == cri.SANDBOX_READY  # the pod outlives its container
        with pytest.raises(grpc.RpcError) as error:
            _record(node, stubborn)
        assert _code(error.value) == grpc.StatusCode.NOT_FOUND


def _lxc_cgroups(node: CriNode, container_id: str) -> list[str]:
    """The container's cgroups, in its pod's cgroup in every hierarchy."""
    root = Path("/sys/fs/cgroup")
    pattern = f"*/{node.service.cgroups_root}/_pods/*/{container_id}"
    return [str(d) for d in root.glob(pattern)]


# ---- our own API's streaming exec ----


def test_our_apis_exec_streams_into_an_lxc_container(node: CriNode, container_id: str) -> None:
    stub = node.service.stub()
    stub.Launch(
        pb.LaunchRequest(
            container_id=container_id,
            command=pb.CommandInfo(shell="exec sleep 600"),
            container=pb.ContainerInfo(runtime=HANDLER),
        ),
        timeout=TIMEOUT,
    )
    try:
        cli = [str(BIN / "containerizer"), "--endpoint", node.service.endpoint, "exec", "-i"]
        done = subprocess.run(
            [*cli, container_id, "--", "sh", "-c", "tr a-z A-Z; exit 3"],
            input=b"hello\n",
            capture_output=True,
            timeout=60,
        )
        assert (done.returncode, done.stdout, done.stderr) == (3, b"HELLO\n", b"")
    finally:
        stub.Destroy(pb.DestroyRequest(container_id=container_id), timeout=TIMEOUT)
