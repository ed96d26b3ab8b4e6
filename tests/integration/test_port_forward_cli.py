"""`containerizer port-forward` against a real service: a server listening only on the
container's own 127.0.0.1 (its network namespace) is reached from 127.0.0.1 here."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.conftest import BIN, ServiceProcess
from tests.integration.api import destroy, launch
from tests.integration.test_network import network_service
from tests.integration.test_security_edge import free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bridged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    service = network_service(tmp_path_factory.mktemp("portforward"))
    service.start()
    yield service
    service.destroy_all()
    service.stop()
    service.remove_cgroup_roots()


def _exchange(port: int, payload: bytes, deadline: float) -> bytes:
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
                connection.sendall(payload)
                connection.shutdown(socket.SHUT_WR)
                received = b""
                while chunk := connection.recv(4096):
                    received += chunk
                if received:
                    return received
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("no answer through the forward")
        time.sleep(0.1)


def test_port_forward_reaches_a_port_only_the_container_listens_on(
    bridged: ServiceProcess, container_id: str
) -> None:
    # A server in the container's network namespace, not published: reached only by the forward.
    launch(
        bridged.stub(),
        container_id,
        "exec /bin/busybox nc -ll -p 7000 -e /bin/busybox tr a-z A-Z",
    )
    local = free_port()
    forward = subprocess.Popen(
        [str(BIN / "containerizer"), "--endpoint", bridged.endpoint, "port-forward",
         container_id, f"{local}:7000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert _exchange(local, b"hello\n", time.monotonic() + 20) == b"HELLO\n"
        assert _exchange(local, b"again\n", time.monotonic() + 20) == b"AGAIN\n"
    finally:
        forward.terminate()
        _, errors = forward.communicate(timeout=10)
        destroy(bridged.stub(), container_id)
    assert b"Traceback" not in errors, errors
