"""`containerizer logs` against a real service: the sandbox's output and a CRI container's
timestamped log, --tail, --since, -f until the container ends, over the TCP listener too, and a
sandbox whose files were swapped for links."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.server.logs import parse_cri_timestamp
from tests.conftest import BIN, ServiceProcess, require_root
from tests.integration.api import destroy, launch, wait
from tests.integration.cri import CriNode
from tests.integration.tls import Certificates, make_certificates

pytestmark = pytest.mark.integration


def logs(
    endpoint: str, *args: str, extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [str(BIN / "containerizer"), "--endpoint", endpoint, *extra, "logs", *args],
        capture_output=True,
        timeout=60,
    )


@pytest.fixture
def finished(service: ServiceProcess, container_id: str) -> Iterator[str]:
    launch(service.stub(), container_id, "for i in 1 2 3 4; do echo line$i; done; echo oops >&2")
    wait(service.stub(), container_id)
    yield container_id
    destroy(service.stub(), container_id)


def test_logs_show_stdout_and_stderr(service: ServiceProcess, finished: str) -> None:
    done = logs(service.endpoint, finished)
    assert (done.returncode, done.stdout, done.stderr) == (
        0,
        b"line1\nline2\nline3\nline4\n",
        b"oops\n",
    )
    tail = logs(service.endpoint, "--tail", "2", finished)
    # Without timestamps the last lines are stdout's, then stderr's.
    assert (tail.stdout, tail.stderr) == (b"line4\n", b"oops\n")


def test_logs_since_needs_timestamps(service: ServiceProcess, finished: str) -> None:
    done = logs(service.endpoint, "--since", "10m", finished)
    assert done.returncode == 125
    assert b"no timestamps" in done.stderr and done.stderr.count(b"\n") == 1


def test_logs_follow_ends_with_the_container(service: ServiceProcess, container_id: str) -> None:
    launch(service.stub(), container_id, "for i in 1 2 3; do echo tick$i; sleep 0.3; done")
    try:
        started = time.monotonic()
        done = logs(service.endpoint, "-f", container_id)
        assert done.returncode == 0
        assert done.stdout == b"tick1\ntick2\ntick3\n"
        assert time.monotonic() - started >= 0.5  # it waited for the later lines
    finally:
        destroy(service.stub(), container_id)


def test_logs_never_read_through_a_link_the_workload_put_in_its_sandbox(
    service: ServiceProcess, container_id: str
) -> None:
    launch(service.stub(), container_id, "rm stdout; ln -s /etc/shadow stdout; echo x >&2")
    try:
        wait(service.stub(), container_id)
        done = logs(service.endpoint, container_id)
        assert done.returncode == 125 and b"root:" not in done.stdout + done.stderr
    finally:
        destroy(service.stub(), container_id)


def test_cri_logs_have_timestamps_and_since(cri_node: CriNode) -> None:
    pod_id = cri_node.run_pod()
    try:
        container_id = cri_node.run(
            pod_id, cri_node.container_config("sh", "-c", "echo early; sleep 1.2; echo late >&2")
        )
        cri_node.wait_exited(container_id)
        endpoint = cri_node.service.endpoint
        stamped = logs(endpoint, "--timestamps", container_id)
        lines = stamped.stdout.splitlines() + stamped.stderr.splitlines()
        assert [line.split(b" ", 1)[1] for line in lines] == [b"early", b"late"]
        assert all(line[:4].isdigit() and line.split(b" ")[0].endswith(b"Z") for line in lines)
        late_at = parse_cri_timestamp(stamped.stderr.split(b" ", 1)[0])
        recent = logs(endpoint, "--since", f"{late_at - 0.5:.3f}", container_id)
        assert (recent.stdout, recent.stderr) == (b"", b"late\n")
    finally:
        cri_node.remove_pod(pod_id)


@pytest.fixture
def tls_node(tmp_path: Path) -> Iterator[tuple[ServiceProcess, Certificates, str]]:
    require_root()
    certificates = make_certificates(tmp_path / "tls")
    from tests.integration.test_security_edge import free_port

    address = f"127.0.0.1:{free_port()}"
    (tmp_path / "node").mkdir()
    service = ServiceProcess(tmp_path / "node", extra_config=certificates.service_config(address))
    service.start()
    yield service, certificates, address
    service.destroy_all()
    service.stop()
    service.remove_cgroup_roots()


def test_logs_follow_over_the_tcp_listener(
    tls_node: tuple[ServiceProcess, Certificates, str], container_id: str
) -> None:
    service, certificates, address = tls_node
    launch(service.stub(), container_id, "echo first; sleep 0.5; echo second")
    tls = (
        "--tls-cert", str(certificates.client_cert),
        "--tls-key", str(certificates.client_key),
        "--tls-ca", str(certificates.ca),
    )  # fmt: skip
    done = logs(address, "-f", container_id, extra=tls)
    assert (done.returncode, done.stdout) == (0, b"first\nsecond\n"), done.stderr
    status = service.stub().Status(pb.StatusRequest(container_id=container_id))
    assert status.state == pb.TERMINATED
    assert os.path.exists(service.state_dir)
