"""The disk isolator on the real kernel, through the service: disk/du kills a container past its
disk limit (LIMITATION_DISK); a project quota on a loop-mounted ext4 refuses the write instead
and the container lives on, its usage the project's."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from isolators.disk import quota
from tests.conftest import ServiceProcess, require, require_root
from tests.integration.api import launch, usage, wait

MIB = 1024 * 1024
WRITE_20_MIB = "head -c 20971520 /dev/zero > big; echo $? > written; sleep 120"


def test_a_measured_container_past_its_disk_limit_ends_limitation_disk(
    tmp_path: Path, container_id: str
) -> None:
    require_root()
    service = ServiceProcess(tmp_path, extra_config="disk_watch_interval = 0.3")
    service.start()
    try:
        stub = service.stub()
        reply = launch(stub, container_id, WRITE_20_MIB, disk=10)
        assert not [w for w in reply.warnings if "not enforced" in w]
        termination = wait(stub, container_id, timeout=60)
        assert termination.reason == pb.LIMITATION_DISK, termination
        assert list(termination.limited_resources) == ["disk"]
        assert termination.killed
        assert "exceeds the limit 10485760 bytes" in termination.message
    finally:
        with contextlib.suppress(Exception):
            service.destroy_all()
        service.stop()
        service.remove_cgroup_roots()


@pytest.fixture
def project_quota_filesystem(tmp_path: Path) -> Iterator[Path]:
    """An ext4 made with the project and quota features, loop-mounted with prjquota on a
    directory of the test's own; unmounted and its loop device detached afterwards."""
    require_root()
    require(shutil.which("mkfs.ext4") is not None, "needs mkfs.ext4 (e2fsprogs)")
    image = tmp_path / "ext4.img"
    with image.open("wb") as file:
        file.truncate(128 * MIB)
    subprocess.run(
        ["mkfs.ext4", "-q", "-O", "project,quota", "-E", "quotatype=prjquota", str(image)],
        check=True,
    )
    mount_point = tmp_path / "mnt"
    mount_point.mkdir()
    device = subprocess.run(
        ["losetup", "--find", "--show", str(image)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        mounted = subprocess.run(["mount", "-o", "prjquota", device, str(mount_point)])
        # A kernel built without CONFIG_QUOTA refuses the mount (dmesg says so): no project
        # quota exists there, and the isolator measures instead (the test above).
        require(mounted.returncode == 0, "the kernel has no ext4 project quotas (CONFIG_QUOTA)")
        try:
            yield mount_point
        finally:
            subprocess.run(["umount", str(mount_point)], check=False)
    finally:
        subprocess.run(["losetup", "--detach", device], check=False)


def test_a_quota_refuses_the_write_and_the_container_keeps_running(
    project_quota_filesystem: Path, container_id: str
) -> None:
    service = ServiceProcess(project_quota_filesystem, extra_config="disk_watch_interval = 0.3")
    service.start()
    try:
        stub = service.stub()
        launch(stub, container_id, WRITE_20_MIB, disk=10)
        sandbox = service.state_dir / "sandboxes" / container_id
        written = sandbox / "written"
        deadline = time.monotonic() + 30
        while not (written.exists() and written.read_text().strip()):
            assert time.monotonic() < deadline, "the write did not end"
            time.sleep(0.1)
        assert written.read_text().strip() != "0"  # head failed: EDQUOT
        size = (sandbox / "big").stat().st_size
        assert 9 * MIB <= size <= 10 * MIB
        time.sleep(1)  # several watch intervals: no disk/du kill in quota mode
        status = stub.Status(pb.StatusRequest(container_id=container_id), timeout=10)
        assert status.state == pb.RUNNING
        statistics = usage(stub, container_id)
        assert statistics.disk_limit_bytes == 10 * MIB
        assert abs(statistics.disk_used_bytes - size) <= 0.05 * size
        stub.Destroy(pb.DestroyRequest(container_id=container_id), timeout=60)
        fd = os.open(sandbox, os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert quota.project_of(fd) == 0  # the project id is released
        finally:
            os.close(fd)
    finally:
        with contextlib.suppress(Exception):
            service.destroy_all()
        service.stop()
        service.remove_cgroup_roots()
