"""Disk-image mode of the libvirt runtime: a qcow2 base disk booted through a per-container
overlay, the disk's own /sbin/init, the command from a cloud-init style config drive.

The base disk is built here: an ext4 filesystem (mke2fs -d) holding busybox and an init script,
converted to qcow2. One guest boot in all; it also covers recovery after kill -9 of the service.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.api.containerizer.v1 import containerizer_pb2_grpc as pb_grpc
from tests.conftest import ServiceProcess, require
from tests.integration.api import destroy, usage
from tests.integration.libvirtd import PrivateLibvirtd, libvirt_service, libvirtd

__all__ = ["libvirtd"]  # the shared session fixture, used by name
pytestmark = pytest.mark.integration

BUSYBOX = Path("/bin/busybox")
RELEASE = "containerizer test disk 1"
# The disk's own init: proves it runs (console, a file only it writes), runs the config
# drive's user-data like cloud-init would, and lives on like a long-running machine.
DISK_INIT = """#!/bin/sh
export PATH=/bin
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "disk init up" > /dev/console
echo "written by the guest" > /var/guest-write
sync
mkdir -p /run/cidata
mount -t iso9660 -o ro /dev/vdb /run/cidata && sh /run/cidata/user-data &
while :; do sleep 60; done
"""


def build_base_disk(directory: Path, init: str = DISK_INIT) -> Path:
    """A 32 MiB qcow2 disk: ext4 with busybox, /sbin/init = `init`, /etc/release."""
    rootfs = directory / "rootfs"
    for name in ("bin", "sbin", "dev", "proc", "sys", "tmp", "run", "etc", "var"):
        (rootfs / name).mkdir(parents=True)
    shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
    applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, check=True)
    for applet in applets.stdout.split():
        if applet != "busybox":
            (rootfs / "bin" / applet).symlink_to("busybox")
    (rootfs / "sbin" / "init").write_text(init)
    (rootfs / "sbin" / "init").chmod(0o755)
    (rootfs / "etc" / "release").write_text(RELEASE + "\n")
    raw = directory / "base.raw"
    subprocess.run(
        ["mke2fs", "-q", "-t", "ext4", "-d", str(rootfs), "-L", "root", str(raw), "32M"],
        check=True,
    )
    base = directory / "base.qcow2"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(base)], check=True
    )
    raw.unlink()
    return base


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def disk_service(tmp_path: Path, libvirtd: PrivateLibvirtd) -> Iterator[ServiceProcess]:
    for tool in ("mke2fs", "qemu-img", "genisoimage"):
        require(shutil.which(tool) is not None, f"disk-image mode test needs {tool}")
    base = build_base_disk(tmp_path)
    extra = f'disk_images = {{ tiny = "{base}" }}\n'
    service = libvirt_service(libvirtd, tmp_path, extra_config=extra)
    service.base_disk = base  # type: ignore[attr-defined]
    service.start()
    yield service
    try:
        if service.process and service.process.poll() is None:
            service.destroy_all()
    finally:
        service.stop()
        service.remove_cgroup_roots()


def _launch_disk(stub: pb_grpc.ContainerizerStub, container_id: str, image: str) -> pb.Status:
    reply = stub.Launch(
        pb.LaunchRequest(
            container_id=container_id,
            command=pb.CommandInfo(
                shell='cat /etc/release /var/guest-write; tr "\\0" " " < /proc/1/cmdline; echo;'
                ' echo "$GREETING" >&2',
                environment=[pb.EnvironmentVariable(name="GREETING", value="it's <me> & 'you'")],
            ),
            container=pb.ContainerInfo(image=image),
        ),
        timeout=120,
    )
    return reply.status


def _wait_for(condition: object, timeout: float = 120) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.2)


def test_unknown_disk_image_is_refused_naming_the_field(disk_service: ServiceProcess) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        _launch_disk(disk_service.stub(), "no-such-disk", "/etc/passwd")
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "container.image" in (raised.value.details() or "")
    assert "tiny" in (raised.value.details() or "")  # the names that do exist
    assert not (disk_service.state_dir / "libvirt" / "run" / "no-such-disk").exists()


def test_an_image_launch_without_a_command_is_refused_naming_the_field(
    disk_service: ServiceProcess,
) -> None:
    """A disk image has no Entrypoint or Cmd: with no command there is nothing to run."""
    request = pb.LaunchRequest(container_id="no-command", container=pb.ContainerInfo(image="tiny"))
    with pytest.raises(grpc.RpcError) as raised:
        disk_service.stub().Launch(request, timeout=60)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = raised.value.details() or ""
    assert details.startswith("command: ") and "no image command" in details, details
    assert not (disk_service.state_dir / "libvirt" / "run" / "no-command").exists()


def test_disk_guest_runs_its_own_init_on_an_overlay_and_survives_a_crash(
    disk_service: ServiceProcess, libvirtd: PrivateLibvirtd, container_id: str
) -> None:
    base: Path = disk_service.base_disk  # type: ignore[attr-defined]
    base_checksum = _sha256(base)
    try:
        _disk_guest_lifecycle(disk_service, libvirtd, container_id, base, base_checksum)
    finally:
        libvirtd.destroy_domains(f"containerizer-{container_id}")  # only if the test failed


def _disk_guest_lifecycle(
    disk_service: ServiceProcess,
    libvirtd: PrivateLibvirtd,
    container_id: str,
    base: Path,
    base_checksum: str,
) -> None:
    stub = disk_service.stub()
    status = _launch_disk(stub, container_id, "tiny")
    assert status.state == pb.RUNNING
    run_dir = disk_service.state_dir / "libvirt" / "run" / container_id
    overlay = run_dir / "disk.qcow2"
    assert overlay.is_file() and (run_dir / "cidata.iso").is_file()
    stdout = Path(status.sandbox) / "stdout"
    _wait_for(lambda: stdout.exists() and "/sbin/init" in stdout.read_text())
    # The disk's init ran (PID 1 is /sbin/init from the disk, its file is there), and the
    # config drive's user-data ran with its environment intact.
    lines = [line.rstrip() for line in stdout.read_text().splitlines()]
    assert lines == [RELEASE, "written by the guest", "/bin/sh /sbin/init"]
    # ttyS2 reaches its file through virtlogd on its own, not in order with ttyS1's.
    stderr = Path(status.sandbox) / "stderr"
    _wait_for(lambda: stderr.exists() and stderr.read_text().endswith("\n"))
    assert stderr.read_text() == "it's <me> & 'you'\n"
    # The guest's writes landed in the overlay: it grew past a fresh one, the base is unchanged.
    fresh = run_dir.parent / "fresh-overlay.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(fresh)],
        check=True,
    )
    assert overlay.stat().st_size > fresh.stat().st_size
    fresh.unlink()
    # Usage: the overlay's allocated bytes, and its virtual size as the limit.
    info = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(overlay)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    statistics = usage(stub, container_id)
    assert statistics.disk_limit_bytes == json.loads(info.stdout)["virtual-size"]
    allocated = overlay.stat().st_blocks * 512
    assert abs(statistics.disk_used_bytes - allocated) <= 0.05 * allocated
    assert _sha256(base) == base_checksum

    disk_service.kill()  # kill -9: the guest keeps running without us
    # What a crash mid-launch leaves: a run directory with an overlay no checkpoint names.
    orphan = run_dir.parent / f"{container_id}-orphan"
    orphan.mkdir()
    shutil.copy2(overlay, orphan / "disk.qcow2")
    disk_service.start()
    assert not orphan.exists()  # recovery swept it
    stub = disk_service.stub()
    status = stub.Status(pb.StatusRequest(container_id=container_id), timeout=30)
    assert status.state == pb.RUNNING
    assert f"containerizer-{container_id}" in _domain_names(libvirtd)
    assert overlay.is_file()

    termination = destroy(stub, container_id)
    assert termination.reason == pb.DESTROYED and termination.killed
    assert f"containerizer-{container_id}" not in _domain_names(libvirtd)
    assert not run_dir.exists()  # overlay and config drive went with it
    assert _sha256(base) == base_checksum


def _domain_names(daemon: PrivateLibvirtd) -> set[str]:
    import libvirt

    connection = libvirt.open(daemon.uri)
    try:
        return {domain.name() for domain in connection.listAllDomains()}
    finally:
        connection.close()


def test_destroy_mid_boot_removes_the_overlay(
    disk_service: ServiceProcess, libvirtd: PrivateLibvirtd, container_id: str
) -> None:
    stub = disk_service.stub()
    try:
        status = _launch_disk(stub, container_id, "tiny")
        run_dir = disk_service.state_dir / "libvirt" / "run" / container_id
        assert (run_dir / "disk.qcow2").is_file()
        termination = destroy(stub, container_id)  # still in the kernel or the initramfs
    finally:
        libvirtd.destroy_domains(f"containerizer-{container_id}")  # only if the test failed
    assert termination.reason == pb.DESTROYED and termination.signal == 9
    assert f"containerizer-{container_id}" not in _domain_names(libvirtd)
    assert not run_dir.exists()
    assert not (Path(status.sandbox) / "stdout").read_text()  # the command never ran
