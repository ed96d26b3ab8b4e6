"""CRI pods on the libvirt runtime (runtime_handler "libvirt"): one VM per pod, no holder.

A CRI container needs an image of our store; on libvirt an image is a disk image the node names
(`[runtimes.libvirt.disk_images]`), so the store's busybox reference names a base disk built
here (test_libvirt_disk's builder) whose init runs the command and powers off with its status,
as a disk image made for containers would. Guest boots are costly under TCG: one boot per test.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from adapter.cri.api import cri
from adapter.runtimes.libvirt import cgroups
from tests.conftest import ServiceProcess
from tests.cri_logs import records as cri_records
from tests.images import REFERENCE
from tests.integration.cri import TIMEOUT, CriNode, running_cri_node
from tests.integration.libvirtd import PrivateLibvirtd, libvirt_config, libvirtd
from tests.integration.test_libvirt_disk import build_base_disk
from tests.integration.test_network import network_config, node_state

__all__ = ["libvirtd"]  # the shared session fixture, used by name
pytestmark = pytest.mark.integration

HANDLER = "libvirt"
BOOT_TIMEOUT = 180  # a guest boots under TCG, slowly on a loaded machine
# The disk's init: the config drive's user-data is the container's command; its status goes
# to the status port (ttyS3), then the guest powers off, which ends the container.
CONTAINER_INIT = """#!/bin/sh
export PATH=/bin
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /run/cidata
mount -t iso9660 -o ro /dev/vdb /run/cidata
sh /run/cidata/user-data
echo "exit $?" > /dev/ttyS3
poweroff -f
"""


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, libvirtd: PrivateLibvirtd) -> Iterator[CriNode]:
    workdir = tmp_path_factory.mktemp("cri-libvirt")
    (workdir / "disk").mkdir()
    base = build_base_disk(workdir / "disk", init=CONTAINER_INIT)
    bridge, subnet = network_config()
    config = (
        f'cri_socket = "{workdir / "cri.sock"}"\n'
        + libvirt_config(libvirtd)
        + f'disk_images = {{ "{REFERENCE}" = "{base}" }}\n'
        + f'[network]\nbridge = "{bridge}"\nsubnet = "{subnet}"\n'
    )
    service = libvirtd.register(ServiceProcess(workdir, extra_config=config))
    service.bridge, service.subnet = bridge, subnet  # type: ignore[attr-defined]
    before = node_state(bridge)
    with running_cri_node(service, workdir) as cri_node:
        yield cri_node
    assert node_state(bridge) == before  # the tap, forwards and bridge are gone


def _domains(daemon: PrivateLibvirtd) -> list[str]:
    listed = subprocess.run(
        ["virsh", "-c", daemon.uri, "list", "--all", "--name"],
        capture_output=True,
        text=True,
        check=True,
    )
    return [name for name in listed.stdout.split() if name.startswith("containerizer-")]


def _pod_ip(node: CriNode, pod_id: str) -> str:
    reply = node.runtime.PodSandboxStatus(
        cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id), timeout=TIMEOUT
    )
    return str(reply.status.network.ip)


def test_status_says_a_libvirt_pod_is_one_vm(node: CriNode) -> None:
    reply = node.runtime.Status(cri.StatusRequest(verbose=True), timeout=TIMEOUT)
    handlers = json.loads(reply.info["config"])["runtimeHandlers"]
    assert "one container per pod" in handlers[HANDLER]


def test_one_vm_per_pod_runs_exits_and_leaves_nothing(
    node: CriNode, libvirtd: PrivateLibvirtd
) -> None:
    service: ServiceProcess = node.service
    pod_id = node.run_pod(runtime_handler=HANDLER)
    assert _pod_ip(node, pod_id) == ""  # no holder: the address comes with the VM
    command = node.container_config("sh", "-c", "echo from the vm; sleep 2; exit 3")
    first = node.run(pod_id, command)
    address = _pod_ip(node, pod_id)
    bridge = service.bridge  # type: ignore[attr-defined]
    assert set(node_state(bridge)["links"]) - {bridge}  # the VM's tap on the bridge
    assert ipaddress.IPv4Address(address) in ipaddress.IPv4Network(service.subnet)  # type: ignore[attr-defined]
    # The VM is the pod: a second container is refused while the first runs.
    with pytest.raises(grpc.RpcError) as refused:
        node.create(pod_id, node.container_config("true"))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "one container per pod" in (refused.value.details() or "")
    status = node.wait_exited(first, timeout=180)
    assert (status.exit_code, status.reason) == (3, "Error")
    assert _pod_ip(node, pod_id) == ""  # its address went with it
    # Once the first has ended another may come (the kubelet's restart).
    node.create(pod_id, node.container_config("true"))
    node.remove_pod(pod_id)
    assert _domains(libvirtd) == []
    assert set(node_state(bridge)["links"]) <= {bridge}  # no tap: the bridge alone stays
    assert not node.pod_cgroup(pod_id).exists()
    partition = cgroups.partition_dirs(f"/{service.cgroups_root}")  # libvirt's, for QEMU
    assert [directory for directory in partition if directory.exists()] == []
    leftovers = []
    for path in service.leftover_cgroups():
        below = [child for child in path.iterdir() if child.is_dir()]
        leftovers += below if path.name == "_pods" else [path]
    assert leftovers == []


def _wait_for(condition: Callable[[], bool], timeout: float = BOOT_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_the_guest_output_is_a_cri_log_complete_at_the_exit_and_reopened(
    node: CriNode,
) -> None:
    script = (
        "echo one; head -c 20000 /dev/zero | tr '\\0' a; echo; echo two >&2;"
        " sleep 3; echo three; printf 'no newline'"
    )
    pod_id = node.run_pod(runtime_handler=HANDLER)
    try:
        container = node.run(pod_id, node.container_config("sh", "-c", script))
        path = Path(node.status(container).log_path)
        _wait_for(lambda: b" stderr F two" in path.read_bytes())
        rotated = path.with_name(path.name + ".1")
        path.rename(rotated)  # as the kubelet rotates: rename, then ReopenContainerLog
        node.runtime.ReopenContainerLog(
            cri.ReopenContainerLogRequest(container_id=container), timeout=TIMEOUT
        )
        assert node.wait_exited(container, timeout=BOOT_TIMEOUT).exit_code == 0
        first, then = cri_records(rotated), cri_records(path)  # complete once EXITED is reported
    finally:
        node.remove_pod(pod_id)
    shape = [(stream, tag, len(text), set(text)) for stream, tag, text in first]
    assert [entry for entry in shape if entry[0] == b"stdout"] == [
        (b"stdout", b"F", 3, set(b"one")),
        (b"stdout", b"P", 16384, {ord("a")}),
        (b"stdout", b"F", 20000 - 16384, {ord("a")}),
    ]
    assert [entry for entry in first if entry[0] == b"stderr"] == [(b"stderr", b"F", b"two")]
    # The rest in the new file; the unfinished last line written once the guest ended.
    assert then == [(b"stdout", b"F", b"three"), (b"stdout", b"F", b"no newline")]


def test_the_cri_log_goes_on_after_a_restart_without_a_line_twice(node: CriNode) -> None:
    count = 150
    counter = f"i=0; while [ $i -lt {count} ]; do echo line$i; i=$((i+1)); sleep 0.05; done"
    pod_id = node.run_pod(runtime_handler=HANDLER)
    try:
        container = node.run(pod_id, node.container_config("sh", "-c", counter))
        path = Path(node.status(container).log_path)
        _wait_for(lambda: len(path.read_bytes().splitlines()) >= 3)
        node.service.kill()
        time.sleep(0.5)  # output the service is not there to copy: the sandbox's file keeps it
        node.service.start()
        node.reconnect()
        assert node.wait_exited(container, timeout=BOOT_TIMEOUT).exit_code == 0
        lines = [text for _, _, text in cri_records(path)]
    finally:
        node.remove_pod(pod_id)
    assert lines == [b"line%d" % number for number in range(count)], lines
