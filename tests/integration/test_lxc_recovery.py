"""LXC containers across a kill -9 of the service: running ones are re-attached, ones that exited
while it was down report their exact status, containers nobody knows are removed."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from tests.conftest import ServiceProcess
from tests.integration.api import destroy, launch, usage, wait
from tests.integration.test_lxc import LXC_CONFIG, lxc_ls, lxcpath, monitors, require_lxc

pytestmark = pytest.mark.integration


@pytest.fixture
def crashing_service(tmp_path: Path) -> Iterator[ServiceProcess]:
    """A service of the test's own: the test kills it."""
    require_lxc()
    process = ServiceProcess(tmp_path, extra_config=LXC_CONFIG)
    process.start()
    yield process
    with contextlib.suppress(Exception):
        if process.process and process.process.poll() is None:
            process.destroy_all()
    process.stop()
    process.remove_cgroup_roots()


def _start_stranger(service: ServiceProcess) -> Path:
    """An LXC container in our lxcpath that no checkpoint names (as if its record were lost)."""
    base = next((service.state_dir / "lxc" / "bases").glob("busybox-*"))
    directory = lxcpath(service) / "stranger"
    (directory / "delta0").mkdir(parents=True)
    (directory / "config").write_text(
        f"lxc.uts.name = stranger\nlxc.rootfs.path = overlay:{base}:{directory / 'delta0'}\n"
        "lxc.net.0.type = empty\nlxc.apparmor.profile = unconfined\nlxc.autodev = 1\n"
        "lxc.mount.auto = proc:mixed sys:ro\n"
        f"lxc.cgroup.dir.container = {service.cgroups_root}/stranger\n"
        f"lxc.cgroup.dir.monitor = {service.cgroups_root}.lxc-monitor.stranger\n"
    )
    subprocess.run(
        ["lxc-start", "-d", "-P", str(lxcpath(service)), "-n", "stranger", "--", "sleep", "300"],
        check=True,
        timeout=30,
    )
    return directory


def test_running_and_exited_containers_survive_a_crash(crashing_service: ServiceProcess) -> None:
    service = crashing_service
    stub = service.stub()
    running = launch(stub, "lxc-runs", "sleep 300", mem=64)
    launch(stub, "lxc-exits", "sleep 1; exit 7")
    launch(stub, "lxc-signaled", "sleep 1; kill -TERM $$")
    service.kill()
    stranger = _start_stranger(service)
    time.sleep(2)  # two exit now, with only their in-container supervisors watching
    service.start()
    stub = service.stub()

    assert (wait(stub, "lxc-exits").reason, wait(stub, "lxc-exits").exit_code) == (pb.EXITED, 7)
    assert wait(stub, "lxc-signaled").signal == 15
    status = stub.Status(pb.StatusRequest(container_id="lxc-runs"), timeout=10)
    assert status.state == pb.RUNNING and status.pid == running.status.pid
    assert psutil.pid_exists(running.status.pid)
    assert usage(stub, "lxc-runs").mem_limit_bytes == 64 * 1024 * 1024
    stub.Kill(pb.KillRequest(container_id="lxc-runs", signal=15), timeout=10)
    assert wait(stub, "lxc-runs").signal == 15

    assert not stranger.exists() and not monitors("stranger")
    for cid in ("lxc-runs", "lxc-exits", "lxc-signaled"):
        assert not monitors(cid)
    assert lxc_ls(service) == []
    assert service.leftover_cgroups() == []


def test_destroy_after_a_crash_leaves_nothing(crashing_service: ServiceProcess) -> None:
    service = crashing_service
    stub = service.stub()
    launch(stub, "lxc-victim", "(sleep 1002 &); sleep 1000")
    service.kill()
    service.start()
    stub = service.stub()
    termination = destroy(stub, "lxc-victim")
    assert termination.reason == pb.DESTROYED and termination.signal == 9
    assert lxc_ls(service) == [] and not monitors("lxc-victim")
    assert service.leftover_cgroups() == []
    assert not list(Path("/sys/fs/cgroup").glob(f"*/{service.cgroups_root}.lxc-monitor.*"))
