"""The disk isolator on the real kernel, through the service: disk/du kills a container past its
disk limit (LIMITATION_DISK), on native (its sandbox), LXC (its rootfs overlay's upper directory),
containerd (its snapshot's) and docker (overlay2's), also across a kill -9 and restart of the
service; usage reports what was written; on a loop-mounted ext4 the test makes, a project quota
refuses the write where the kernel has project quotas, and otherwise the isolator says why not
and measures instead."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.api.containerizer.v1 import containerizer_pb2_grpc as pb_grpc
from isolators.disk import quota
from tests.cgroup_roots import run_scoped_name
from tests.conftest import ServiceProcess, require_root
from tests.docker_fixtures import PrivateDockerd, busybox_image, docker_service_config, dockerd
from tests.images import REFERENCE, busybox_oci_layout
from tests.integration.api import launch, scalar, usage, wait
from tests.integration.containerd_daemon import ContainerdDaemon, containerd_config, import_image
from tests.integration.test_containerd import containerd
from tests.integration.test_containerd import launch as launch_image
from tests.integration.test_lxc import LXC_CONFIG, require_lxc

pytestmark = pytest.mark.integration
# Fixtures shared with the runtimes' own tests, injected by parameter name.
__all__ = ["busybox_image", "containerd", "dockerd"]

MIB = 1024 * 1024
FAST_WATCH = "disk_watch_interval = 0.3"
WRITE_20_MIB = "head -c 20971520 /dev/zero > big; echo $? > written; sleep 120"
LIMIT_MESSAGE = "exceeds the limit 10485760 bytes"


@contextlib.contextmanager
def running_service(workdir: Path, extra_config: str = "") -> Iterator[ServiceProcess]:
    service = ServiceProcess(workdir, extra_config=f"{FAST_WATCH}\n{extra_config}")
    service.start()
    try:
        yield service
    finally:
        with contextlib.suppress(Exception):
            service.destroy_all()
        service.stop()
        service.remove_cgroup_roots()


def assert_ended_for_disk(termination: pb.Termination) -> None:
    assert termination.reason == pb.LIMITATION_DISK, termination
    assert list(termination.limited_resources) == ["disk"]
    assert termination.killed
    assert LIMIT_MESSAGE in termination.message


def test_a_measured_container_past_its_disk_limit_ends_limitation_disk(
    tmp_path: Path, container_id: str
) -> None:
    require_root()
    with running_service(tmp_path) as service:
        stub = service.stub()
        reply = launch(stub, container_id, WRITE_20_MIB, disk=10)
        assert not [w for w in reply.warnings if "not enforced" in w]
        assert_ended_for_disk(wait(stub, container_id, timeout=60))


def test_lxc_measures_its_writable_layer_and_ends_it_limitation_disk(
    tmp_path: Path, container_id: str
) -> None:
    """The 20 MiB go to the container's root filesystem (its overlay's upper directory), not
    to the sandbox."""
    require_lxc()
    with running_service(tmp_path, LXC_CONFIG) as service:
        stub = service.stub()
        script = "head -c 20971520 /dev/zero > /var/big; sleep 120"
        reply = launch(stub, container_id, script, disk=10)
        assert not [w for w in reply.warnings if "not enforced" in w]
        assert_ended_for_disk(wait(stub, container_id, timeout=90))


def test_containerd_measures_its_snapshot_and_ends_it_limitation_disk(
    tmp_path: Path, containerd: ContainerdDaemon, container_id: str
) -> None:
    """The 20 MiB go to the image's root filesystem: the snapshot's upper directory, found
    from the snapshot's mounts."""
    namespace = run_scoped_name("ctz")
    try:
        with running_service(tmp_path, containerd_config(containerd, namespace)) as service:
            assert import_image(service.endpoint, busybox_oci_layout(tmp_path)) == [REFERENCE]
            stub = service.stub()
            script = "head -c 20971520 /dev/zero > /var/big; sleep 120"
            reply = launch_image(stub, container_id, script, disk=10)
            assert not [w for w in reply.warnings if "not enforced" in w]
            assert_ended_for_disk(wait(stub, container_id, timeout=90))
    finally:
        containerd.remove_namespace(namespace)


def test_docker_measures_its_overlay2_layer_and_ends_it_limitation_disk(
    tmp_path: Path, dockerd: PrivateDockerd, busybox_image: str, container_id: str
) -> None:
    """With overlay2 the container's layer (GraphDriver.Data.UpperDir) is measured; under a
    storage driver without one, the launch says the request is enforced on the sandbox only."""
    with running_service(tmp_path, docker_service_config(dockerd, None)) as service:
        stub = service.stub()
        script = "mkdir /data; head -c 20971520 /dev/zero > /data/big; sleep 120"
        request = pb.LaunchRequest(
            container_id=container_id,
            command=pb.CommandInfo(shell=script),
            resources=[scalar("disk", 10)],
            container=pb.ContainerInfo(runtime="docker", image=busybox_image),
        )
        reply = stub.Launch(request, timeout=120)
        sandbox_only = [w for w in reply.warnings if "enforced on the sandbox only" in w]
        if dockerd.storage_driver == "overlay2":
            assert not sandbox_only
            assert_ended_for_disk(wait(stub, container_id, timeout=90))
        else:
            assert sandbox_only and dockerd.storage_driver in sandbox_only[0]


def test_the_watch_resumes_after_a_kill_9_and_restart(tmp_path: Path, container_id: str) -> None:
    require_root()
    with running_service(tmp_path) as service:
        stub = service.stub()
        script = f"while [ ! -e go ]; do sleep 0.1; done; {WRITE_20_MIB}"
        launch(stub, container_id, script, disk=10)
        service.restart()  # kill -9, then a new service recovers the container
        (service.state_dir / "sandboxes" / container_id / "go").touch()
        assert_ended_for_disk(wait(service.stub(), container_id, timeout=60))


def used_within_5_percent(stub: pb_grpc.ContainerizerStub, container_id: str, written: int) -> int:
    """The container's disk_used_bytes once it is within 5% of `written` (a measurement is
    reused for one interval, so a few are waited for)."""
    deadline = time.monotonic() + 20
    used = 0
    while time.monotonic() < deadline:
        used = int(usage(stub, container_id).disk_used_bytes)
        if abs(used - written) <= 0.05 * written:
            return used
        time.sleep(0.2)
    raise AssertionError(f"disk_used_bytes {used}, wrote {written}")


def test_usage_reports_what_a_native_container_wrote(tmp_path: Path, container_id: str) -> None:
    require_root()
    with running_service(tmp_path) as service:
        stub = service.stub()
        launch(stub, container_id, "head -c 8388608 /dev/urandom > data; sleep 120", disk=100)
        used_within_5_percent(stub, container_id, 8 * MIB)
        assert usage(stub, container_id).disk_limit_bytes == 100 * MIB


def test_usage_reports_what_an_lxc_container_wrote_in_its_layer_and_sandbox(
    tmp_path: Path, container_id: str
) -> None:
    require_lxc()
    with running_service(tmp_path, LXC_CONFIG) as service:
        stub = service.stub()
        script = (
            "head -c 4194304 /dev/urandom > /var/layer;"
            " head -c 4194304 /dev/urandom > data; sleep 120"
        )
        launch(stub, container_id, script)
        used_within_5_percent(stub, container_id, 8 * MIB)


@dataclass(frozen=True)
class LoopFilesystem:
    mount_point: Path
    # Why the isolator will not use a project quota there ("" where it will).
    why_no_quota: str


@pytest.fixture
def loop_filesystem(tmp_path: Path) -> Iterator[LoopFilesystem]:
    """An ext4 made with the project and quota features, loop-mounted with prjquota on a
    directory of the test's own; where the kernel refuses that mount (no CONFIG_QUOTA or
    CONFIG_QFMT_V2), a plain ext4 instead. Unmounted and its loop device detached afterwards."""
    require_root()
    image = tmp_path / "ext4.img"
    mount_point = tmp_path / "mnt"
    mount_point.mkdir()
    device = ""
    try:
        device = make_and_mount(image, mount_point, ["-O", "project,quota"], ["-o", "prjquota"])
        if not device:
            device = make_and_mount(image, mount_point, [], [])
        assert device, "a plain ext4 on a loop device could not be mounted"
        fd = quota.open_directory(str(mount_point))
        try:
            why = quota.why_no_project_quota(fd)
        finally:
            os.close(fd)
        try:
            yield LoopFilesystem(mount_point, why)
        finally:
            subprocess.run(["umount", str(mount_point)], check=True)
    finally:
        if device:
            subprocess.run(["losetup", "--detach", device], check=False)


def make_and_mount(image: Path, mount_point: Path, features: list[str], options: list[str]) -> str:
    """The loop device with a fresh ext4 mounted, or "" (detached again) when the mount fails."""
    image.unlink(missing_ok=True)
    with image.open("wb") as file:
        file.truncate(128 * MIB)
    subprocess.run(["mkfs.ext4", "-q", *features, str(image)], check=True)
    device = subprocess.run(
        ["losetup", "--find", "--show", str(image)], check=True, capture_output=True, text=True
    ).stdout.strip()
    if subprocess.run(["mount", *options, device, str(mount_point)]).returncode == 0:
        return device
    subprocess.run(["losetup", "--detach", device], check=True)
    return ""


def test_on_a_loop_filesystem_a_quota_refuses_the_write_or_measurement_ends_it(
    loop_filesystem: LoopFilesystem, container_id: str
) -> None:
    """One test, two branches, by what the isolator detects on the filesystem: a project
    quota (the write fails with EDQUOT, the container lives on), or the reason there is none,
    in the service's log, and disk/du ending the container LIMITATION_DISK."""
    with running_service(loop_filesystem.mount_point) as service:
        stub = service.stub()
        launch(stub, container_id, WRITE_20_MIB, disk=10)
        sandbox = service.state_dir / "sandboxes" / container_id
        if loop_filesystem.why_no_quota:
            assert_ended_for_disk(wait(stub, container_id, timeout=60))
            log = service.log_path.read_text()
            assert f"disk: no project quota ({loop_filesystem.why_no_quota})" in log
            assert str(loop_filesystem.mount_point) in loop_filesystem.why_no_quota
        else:
            assert_quota_refused_the_write(stub, container_id, sandbox)


def assert_quota_refused_the_write(
    stub: pb_grpc.ContainerizerStub, container_id: str, sandbox: Path
) -> None:
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
