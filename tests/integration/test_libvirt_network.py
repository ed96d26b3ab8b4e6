"""The libvirt runtime on the network isolator's bridge: a guest with its IPAM address serves
HTTP on a mapped host port, shaped and accounted on its tap. One guest boot.

Traffic stays on loopback and our own bridge (a bridge name and subnet of this test's own)."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import random
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.api.containerizer.v1 import containerizer_pb2_grpc as pb_grpc
from isolators.network.veth import host_veth_name
from tests.conftest import ServiceProcess
from tests.integration.api import destroy, scalar, usage
from tests.integration.libvirtd import PrivateLibvirtd, libvirt_service, libvirtd
from tests.integration.test_network import launch, network_config, node_state

__all__ = ["libvirtd"]  # the shared session fixture, used by name
pytestmark = pytest.mark.integration
PAGE = "hello from the guest"


@pytest.fixture
def bridged_vm_service(tmp_path: Path, libvirtd: PrivateLibvirtd) -> Iterator[ServiceProcess]:
    """A libvirt service with a [network] table (host mode allowed by the node, so that the
    refusal tested here is the VM's own) on a bridge and subnet of its own."""
    bridge, subnet = network_config()
    extra = f'[network]\nbridge = "{bridge}"\nsubnet = "{subnet}"\nallow_host = true\n'
    before = node_state(bridge)
    service = libvirt_service(libvirtd, tmp_path, extra_config=extra)
    service.bridge, service.subnet = bridge, subnet  # type: ignore[attr-defined]
    service.start()
    yield service
    try:
        with contextlib.suppress(grpc.RpcError):
            service.destroy_all()
    finally:
        service.stop()
        service.remove_cgroup_roots()
    assert node_state(bridge) == before  # tap, forwards and bridge are gone


def _launch(
    stub: pb_grpc.ContainerizerStub, container_id: str, shell: str, **network: Any
) -> pb.LaunchResponse:
    """test_network's launch, with the patience a VM boot needs."""
    return launch(stub, container_id, shell, timeout=120, **network)


def test_host_network_is_refused_for_a_vm(
    bridged_vm_service: ServiceProcess, container_id: str
) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        _launch(bridged_vm_service.stub(), container_id, "true", mode="host")
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "container.network.mode" in (raised.value.details() or "")
    run_dir = bridged_vm_service.state_dir / "libvirt" / "run" / container_id
    assert not run_dir.exists()


def _get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return str(reply.read().decode())
    except OSError:
        return None


def _qdisc_kinds(link: str) -> list[str]:
    shown = subprocess.run(
        ["tc", "-j", "qdisc", "show", "dev", link], capture_output=True, text=True, check=True
    )
    return [qdisc["kind"] for qdisc in json.loads(shown.stdout)]


def _link(name: str) -> dict[str, object] | None:
    shown = subprocess.run(["ip", "-j", "link", "show", name], capture_output=True, text=True)
    return json.loads(shown.stdout)[0] if shown.returncode == 0 else None  # type: ignore[no-any-return]


def test_guest_on_the_bridge_serves_http_on_its_mapped_port(
    bridged_vm_service: ServiceProcess, container_id: str
) -> None:
    stub = bridged_vm_service.stub()
    bridge: str = bridged_vm_service.bridge  # type: ignore[attr-defined]
    host_port = random.randint(20000, 45000)
    reply = _launch(
        stub,
        container_id,
        f"mkdir -p /www && echo '{PAGE}' > /www/index.html && exec httpd -f -p 8080 -h /www",
        mode="bridge",
        mappings=(f"{host_port}:8080/tcp",),
        resources=(scalar("network_bandwidth", 20),),
    )
    address = ipaddress.IPv4Address(reply.status.ip_address)
    assert address in ipaddress.IPv4Network(bridged_vm_service.subnet)  # type: ignore[attr-defined]
    tap = host_veth_name(bridge, container_id)
    link = _link(tap)
    assert link is not None and link.get("master") == bridge  # libvirt's tap, our name
    assert "tbf" in _qdisc_kinds(tap)  # network_bandwidth, shaped on the host side

    # The guest configured its address from the kernel command line; the forward reaches it.
    url = f"http://127.0.0.1:{host_port}/index.html"
    deadline = time.monotonic() + 120
    while (page := _get(url)) is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert page == PAGE + "\n"
    statistics = usage(stub, container_id)
    assert statistics.net_tx_bytes > len(PAGE) and statistics.net_rx_bytes > 0

    assert destroy(stub, container_id).reason == pb.DESTROYED
    assert _link(tap) is None
    assert _get(url) is None
