"""User namespaces on the real kernel: container root is an unprivileged host range, each
container its own, kept across a crash of the service."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.cri.api import cri
from tests.cgroup_roots import run_scoped_name
from tests.conftest import (
    BIN,
    USER_NAMESPACE_DEFAULT,
    ServiceProcess,
    require,
    require_root,
    searchable_by_all,
)
from tests.images import REFERENCE, busybox_oci_layout
from tests.integration.api import destroy, serve_expecting_refusal, wait
from tests.integration.containerd_daemon import (
    ContainerdDaemon,
    containerd_available,
    containerd_config,
    import_image,
)
from tests.integration.cri import CriNode, cri_service, running_cri_node
from tests.integration.test_lxc import LXC_CONFIG, require_lxc
from tests.integration.test_network import network_service
from tests.run_records import run_scoped_tempdir

pytestmark = pytest.mark.integration

# Far above the ids of /etc/subuid's users and of any image's files.
RANGE_START = 1_500_000_000
SIZE = 65536
USERNS_CONFIG = f'[user_namespace]\nrange = "{RANGE_START}:{SIZE * 4}"\nsize = {SIZE}\n'


@dataclass(frozen=True)
class Node:
    """A service of the test's own whose ranges hold four containers (the restart test kills
    it), and the runtime and image its launches use."""

    service: ServiceProcess
    runtime: str
    image: str

    def launch(
        self,
        container_id: str,
        shell: str,
        *,
        sandbox: str = "",
        user_namespace: bool | None = True,
        image: str | None = None,
    ) -> pb.LaunchResponse:
        return self.service.stub().Launch(
            pb.LaunchRequest(
                container_id=container_id,
                command=pb.CommandInfo(shell=shell),
                container=pb.ContainerInfo(
                    runtime=self.runtime, image=self.image if image is None else image
                ),
                sandbox=sandbox,
                user_namespace=user_namespace,
            ),
            timeout=60,
        )


@pytest.fixture(scope="module")
def containerd() -> Iterator[ContainerdDaemon]:
    """A private containerd whose state is searchable by every user: runc mounts the rootfs
    from inside the container's user namespace, as an unprivileged host uid, which must reach
    it (as under /run/containerd, 0711); pytest's temporary directories are 0700. A run-scoped
    directory, which a later run sweeps if this one is killed."""
    require_root()
    missing = containerd_available()
    require(missing is None, str(missing))
    workdir = run_scoped_tempdir("ctz-userns")
    workdir.chmod(0o711)
    daemon = ContainerdDaemon(workdir)
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(params=["native", "containerd", "lxc"])
def node(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Node]:
    require_root()
    namespace = ""
    if request.param == "containerd":
        daemon: ContainerdDaemon = request.getfixturevalue("containerd")
        namespace = run_scoped_name("ctz")
        service = ServiceProcess(tmp_path, containerd_config(daemon, namespace) + USERNS_CONFIG)
    elif request.param == "lxc":
        # LXC mounts the rootfs and binds as the namespace's root, which must reach them.
        require_lxc()
        searchable_by_all(tmp_path)
        service = ServiceProcess(tmp_path, LXC_CONFIG + USERNS_CONFIG)
    else:
        service = ServiceProcess(tmp_path, USERNS_CONFIG)
    service.start()
    assert import_image(service.endpoint, busybox_oci_layout(tmp_path)) == [REFERENCE]
    yield Node(service, request.param, REFERENCE)
    with contextlib.suppress(Exception):
        if service.process and service.process.poll() is None:
            service.destroy_all()
    service.stop()
    if namespace:
        daemon.remove_namespace(namespace)
    service.remove_cgroup_roots()


def outputs(reply: pb.LaunchResponse) -> str:
    sandbox = Path(reply.status.sandbox)
    return (sandbox / "stdout").read_text() + (sandbox / "stderr").read_text()


def uid_map_start(pid: int) -> int:
    """The host uid that container root is, from the init's /proc/PID/uid_map."""
    inside, host, _ = Path(f"/proc/{pid}/uid_map").read_text().split()
    assert inside == "0"
    return int(host)


def test_root_is_the_mapped_host_range(node: Node, container_id: str) -> None:
    script = "id -u; id -g; cat /proc/self/uid_map; echo made > created; ls -ln created"
    reply = node.launch(container_id, script)
    termination = wait(node.service.stub(), container_id)
    output = outputs(reply)
    assert termination.exit_code == 0, output
    lines = output.split("\n")
    assert lines[:2] == ["0", "0"], output
    assert lines[2].split() == ["0", str(RANGE_START), str(SIZE)], output
    created = Path(reply.status.sandbox) / "created"
    assert (created.stat().st_uid, created.stat().st_gid) == (RANGE_START, RANGE_START)
    assert created.read_text() == "made\n"


def test_the_image_is_root_owned_inside(node: Node, container_id: str) -> None:
    """The image's files are the container's root's: it may change /etc, and a copy of the
    image on the host is not touched."""
    script = "stat -c %u:%g /etc/passwd; echo extra:x:5:5::/:/bin/sh >> /etc/passwd && echo CHANGED"
    reply = node.launch(container_id, script)
    termination = wait(node.service.stub(), container_id)
    output = outputs(reply)
    assert termination.exit_code == 0, output
    assert output.split("\n")[:2] == ["0:0", "CHANGED"], output


@pytest.mark.parametrize("node", ["native"], indirect=True)  # the one without images
def test_on_the_host_filesystem_root_is_mapped_too(node: Node, container_id: str) -> None:
    reply = node.launch(container_id, "id -u; cat /proc/self/uid_map; echo x > made", image="")
    termination = wait(node.service.stub(), container_id)
    assert termination.exit_code == 0, outputs(reply)
    assert outputs(reply).split()[:4] == ["0", "0", str(RANGE_START), str(SIZE)]
    assert (Path(reply.status.sandbox) / "made").stat().st_uid == RANGE_START


def test_a_host_root_file_stays_out_of_reach(node: Node, container_id: str, tmp_path: Path) -> None:
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    secret = sandbox / "root-owned"
    secret.write_text("host\n")
    os.chmod(secret, 0o644)
    script = (
        "cd /mnt/mesos/sandbox; cat root-owned; echo changed > root-owned && echo WROTE;"
        " stat -c owner=%u:%g root-owned"
    )
    reply = node.launch(container_id, script, sandbox=str(sandbox))
    wait(node.service.stub(), container_id)
    output = outputs(reply)
    assert "host\n" in output  # readable: 0644
    assert "WROTE" not in output and "ermission denied" in output, output
    assert secret.read_text() == "host\n"
    # Unmapped host root shows as the overflow id inside.
    assert "owner=65534:65534" in output, output


def test_two_containers_get_disjoint_ranges(node: Node, container_id: str) -> None:
    starts = []
    for suffix in ("a", "b"):
        reply = node.launch(f"{container_id}-{suffix}", "sleep 60")
        starts.append(uid_map_start(reply.status.pid))
    assert abs(starts[0] - starts[1]) >= SIZE, starts
    assert all(RANGE_START <= start < RANGE_START + 4 * SIZE for start in starts)
    for suffix in ("a", "b"):
        destroy(node.service.stub(), f"{container_id}-{suffix}")


def test_ranges_survive_a_crash_of_the_service(node: Node, container_id: str) -> None:
    first = node.launch(f"{container_id}-1", "sleep 120")
    second = node.launch(f"{container_id}-2", "sleep 120")
    first_start = uid_map_start(first.status.pid)
    live = {first_start, uid_map_start(second.status.pid)}
    node.service.restart()  # kill -9, then a new service recovers
    third = node.launch(f"{container_id}-3", "sleep 120")
    assert uid_map_start(third.status.pid) not in live
    # A destroy releases the range: the lowest free one is the next launch's.
    destroy(node.service.stub(), f"{container_id}-1")
    fourth = node.launch(f"{container_id}-4", "sleep 120")
    assert uid_map_start(fourth.status.pid) == first_start
    for suffix in ("2", "3", "4"):
        destroy(node.service.stub(), f"{container_id}-{suffix}")


def test_without_a_namespace_root_is_host_root(node: Node, container_id: str) -> None:
    reply = node.launch(container_id, "cat /proc/self/uid_map", user_namespace=None)
    wait(node.service.stub(), container_id)
    assert outputs(reply).split() == ["0", "0", "4294967295"]


def test_exec_runs_as_the_containers_root(node: Node, container_id: str) -> None:
    node.launch(container_id, "sleep 120")
    command = [str(BIN / "containerizer"), "--endpoint", node.service.endpoint, "exec"]
    command += [container_id, "--", "sh", "-c", "id -u; cat /proc/self/uid_map"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "0", str(RANGE_START), str(SIZE)]
    destroy(node.service.stub(), container_id)


@dataclass(frozen=True)
class PodNode:
    """A CRI service with user namespace ranges, and the runtime handler its pods use (the
    holder is native either way; the containers run on the handler's runtime)."""

    cri: CriNode
    handler: str

    def run_pod(self, config: cri.PodSandboxConfig | None = None) -> str:
        return self.cri.run_pod(config, runtime_handler=self.handler)


@pytest.fixture(params=["native", "lxc"])
def pods(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PodNode]:
    if request.param == "lxc":
        require_lxc()
        searchable_by_all(tmp_path)  # LXC mounts as the namespace's root (see `node`)
        service = cri_service(tmp_path, runtimes=("lxc",))
    else:
        service = cri_service(tmp_path)
    config = service.config_path.read_text().replace(USER_NAMESPACE_DEFAULT, "")
    service.config_path.write_text(config + USERNS_CONFIG)
    with running_cri_node(service, tmp_path) as node:
        yield PodNode(node, "" if request.param == "native" else request.param)


def pod_in_a_user_namespace(node: CriNode, pid: int = cri.POD) -> cri.PodSandboxConfig:
    userns = cri.UserNamespace(mode=cri.POD)
    options = cri.NamespaceOption(userns_options=userns, pid=pid)  # type: ignore[arg-type]
    return node.pod_config(
        linux=cri.LinuxPodSandboxConfig(
            security_context=cri.LinuxSandboxSecurityContext(namespace_options=options)
        )
    )


@pytest.mark.parametrize("pods", ["native"], indirect=True)
def test_a_pods_containers_share_its_user_namespace(pods: PodNode) -> None:
    node = pods.cri
    pod_id = pods.run_pod(pod_in_a_user_namespace(node))
    first = node.run(pod_id, node.container_config("sleep", "60"))
    second = node.run(pod_id, node.container_config("sleep", "60"))
    stub = node.service.stub()
    pids = [
        stub.Status(pb.StatusRequest(container_id=cid), timeout=10).pid
        for cid in (pod_id, first, second)
    ]
    namespaces = {os.stat(f"/proc/{pid}/ns/user").st_ino for pid in pids}
    assert len(namespaces) == 1 and os.stat("/proc/self/ns/user").st_ino not in namespaces
    reply = node.exec_sync(first, "sh", "-c", "id -u; cat /proc/self/uid_map; echo x > /made")
    assert reply.exit_code == 0, reply.stderr
    assert reply.stdout.decode().split() == ["0", "0", str(RANGE_START), str(SIZE)]
    node.remove_pod(pod_id)


def test_a_pod_without_userns_options_gets_the_nodes_default(pods: PodNode) -> None:
    node = pods.cri
    pod_id = pods.run_pod()
    container = node.run(pod_id, node.container_config("sleep", "60"))
    reply = node.exec_sync(container, "cat", "/proc/self/uid_map")
    assert reply.stdout.decode().split() == ["0", "0", "4294967295"]  # default: false
    node.remove_pod(pod_id)


def test_a_user_without_subordinate_ids_is_refused_at_start(tmp_path: Path) -> None:
    require_root()
    config = tmp_path / "node.toml"
    config.write_text(
        f'version = 1\nstate_dir = "{tmp_path / "state"}"\nsocket = "{tmp_path / "s.sock"}"\n'
        '[user_namespace]\nuser = "no-such-user-here"\n'
    )
    output = serve_expecting_refusal(config)
    assert "user_namespace.user" in output and "/etc/subuid" in output, output


@pytest.mark.parametrize("pods", ["native"], indirect=True)
def test_a_killed_holders_range_stays_with_its_running_container(pods: PodNode) -> None:
    """The holder's range is its container's too: a holder killed first does not free it.
    (Each container has a pid namespace of its own: the holder's end would end a shared one.)"""
    node = pods.cri
    stub = node.service.stub()
    pod_id = pods.run_pod(pod_in_a_user_namespace(node, pid=cri.CONTAINER))
    member = node.run(pod_id, node.container_config("sleep", "120"))
    holder_pid = stub.Status(pb.StatusRequest(container_id=pod_id), timeout=10).pid
    shared = uid_map_start(holder_pid)
    os.kill(holder_pid, signal.SIGKILL)
    assert wait(stub, pod_id).signal == signal.SIGKILL
    running = stub.Status(pb.StatusRequest(container_id=member), timeout=10)
    assert running.state == pb.RUNNING
    assert uid_map_start(running.pid) == shared  # still running in the range
    second = pods.run_pod(pod_in_a_user_namespace(node))
    second_pid = stub.Status(pb.StatusRequest(container_id=second), timeout=10).pid
    assert abs(uid_map_start(second_pid) - shared) >= SIZE
    node.remove_pod(second)
    node.remove_pod(pod_id)


@pytest.mark.parametrize("pods", ["lxc"], indirect=True)
def test_lxc_refuses_a_pods_user_namespace(pods: PodNode) -> None:
    """LXC joins a shared user namespace before the pod's network namespace, which is then out
    of its reach: a pod asking for one is refused, saying so, rather than run without."""
    node = pods.cri
    with pytest.raises(grpc.RpcError) as refused:
        pods.run_pod(pod_in_a_user_namespace(node))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "cannot join a pod's user namespace" in (refused.value.details() or "")


def test_lxc_in_the_network_isolators_namespace(tmp_path: Path, container_id: str) -> None:
    """A network namespace the container does not own (the isolator's): no sysfs of its own
    to mount, so the host's /sys read-only, and the address on its veth."""
    require_lxc()
    searchable_by_all(tmp_path)
    service = network_service(tmp_path, "[runtimes.native]\n[runtimes.lxc]\n" + USERNS_CONFIG)
    service.start()
    try:
        node = Node(service, "lxc", "")
        script = "id -u; cat /proc/self/uid_map; ip -4 -o addr show eth0; touch /sys/kernel/x"
        reply = node.launch(container_id, script, image="")
        wait(service.stub(), container_id)
        lines = outputs(reply).splitlines()
        assert lines[0] == "0" and lines[1].split() == ["0", str(RANGE_START), str(SIZE)]
        assert reply.status.ip_address and reply.status.ip_address in lines[2]
        assert "Read-only file system" in lines[3], lines
    finally:
        with contextlib.suppress(Exception):
            service.destroy_all()
        service.stop()
        service.remove_cgroup_roots()
