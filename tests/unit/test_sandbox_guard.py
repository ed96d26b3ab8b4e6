"""The strip of a caller-named sandbox (adapter/core/sandbox_guard.py strip_privileges) on plain
directories, and the record of its mount. The mount itself is tested on the real kernel in
tests/integration/test_sandbox_guard.py."""

from __future__ import annotations

import os
import resource
import shutil
import stat
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from adapter.core.model import Command, LaunchSpec, Resources, State
from adapter.core.sandbox_guard import CAPABILITY_XATTR, strip_privileges
from adapter.core.state import ContainerRecord
from tests.conftest import require_root

# A version 2 security.capability value: cap_dac_read_search permitted and effective.
FILE_CAPABILITY = bytes.fromhex("0100000204000000000000000000000000000000")


@contextmanager
def opened(directory: Path) -> Iterator[int]:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield fd
    finally:
        os.close(fd)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def setuid_file(path: Path, bits: int = 0o4755) -> None:
    path.write_bytes(b"#!/bin/sh\n")
    os.chmod(path, bits)


def test_set_id_bits_capabilities_and_devices_are_stripped(tmp_path: Path) -> None:
    require_root()
    setuid_file(tmp_path / "suid", 0o6755)
    (tmp_path / "sub").mkdir()
    setuid_file(tmp_path / "sub" / "sgid", 0o2711)
    (tmp_path / "capable").write_bytes(b"")  # not executable: its owner could make it so
    os.setxattr(tmp_path / "capable", CAPABILITY_XATTR, FILE_CAPABILITY)
    os.chown(tmp_path / "capable", 65534, 65534)  # chown clears the xattr: set it again
    os.setxattr(tmp_path / "capable", CAPABILITY_XATTR, FILE_CAPABILITY)
    os.mknod(tmp_path / "disk", stat.S_IFBLK | 0o666, os.makedev(7, 0))
    os.chown(tmp_path / "disk", 65534, 65534)
    (tmp_path / "plain").write_text("left as it is\n")
    os.chmod(tmp_path / "plain", 0o640)
    with opened(tmp_path) as fd:
        stripped = strip_privileges(fd)
    assert (stripped.files, stripped.devices, stripped.entries) == (3, 1, 6)
    assert mode(tmp_path / "suid") == 0o755
    assert mode(tmp_path / "sub" / "sgid") == 0o711
    assert CAPABILITY_XATTR not in os.listxattr(tmp_path / "capable")
    disk = (tmp_path / "disk").lstat()
    assert stat.S_ISBLK(disk.st_mode) and disk.st_rdev == os.makedev(7, 0)
    assert (disk.st_uid, disk.st_gid, stat.S_IMODE(disk.st_mode)) == (0, 0, 0)
    assert mode(tmp_path / "plain") == 0o640
    with opened(tmp_path) as fd:
        again = strip_privileges(fd)
    assert (again.files, again.devices) == (0, 0), "a second strip finds nothing to do"


def test_symlinks_are_not_followed(tmp_path: Path) -> None:
    outside, sandbox = tmp_path / "outside", tmp_path / "sandbox"
    outside.mkdir()
    sandbox.mkdir()
    setuid_file(outside / "suid")
    (sandbox / "file").symlink_to(outside / "suid")
    (sandbox / "directory").symlink_to(outside)
    (sandbox / "climbing").symlink_to("../outside")
    (sandbox / "dangling").symlink_to(tmp_path / "nothing")
    setuid_file(sandbox / "own")
    with opened(sandbox) as fd:
        stripped = strip_privileges(fd)
    assert stripped.files == 1 and mode(sandbox / "own") == 0o755
    assert mode(outside / "suid") == 0o4755
    assert (sandbox / "file").is_symlink() and (sandbox / "directory").is_symlink()


def test_a_hundred_thousand_files_are_one_walk(tmp_path: Path) -> None:
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    for directory in range(100):
        path = sandbox / f"d{directory}"
        path.mkdir()
        with opened(path) as fd:
            for file in range(1000):
                setid = directory % 10 == 0 and file % 100 == 0
                os.close(os.open(f"f{file}", flags, 0o4755 if setid else 0o644, dir_fd=fd))
    with opened(sandbox) as fd:
        stripped = strip_privileges(fd)
    assert stripped.entries == 100 + 100_000
    assert stripped.files == 100
    assert mode(sandbox / "d0" / "f0") == 0o755 and mode(sandbox / "d90" / "f900") == 0o755


DEPTH = 10_000


def test_a_nest_ten_thousand_deep_needs_two_descriptors_and_no_recursion(
    tmp_path: Path,
) -> None:
    """Deeper than PATH_MAX and the recursion limit, walked under a descriptor limit of a few
    more than are open already."""
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    current = os.open(sandbox, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for level in range(DEPTH):
            if level in (0, DEPTH // 2, DEPTH - 1):
                os.close(os.open("suid", os.O_WRONLY | os.O_CREAT, 0o4755, dir_fd=current))
            os.mkdir("d", dir_fd=current)
            deeper = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=current)
            os.close(current)
            current = deeper
    finally:
        os.close(current)
    try:
        with opened(sandbox) as fd, descriptor_limit(len(os.listdir("/proc/self/fd")) + 4):
            stripped = strip_privileges(fd)
        assert stripped.files == 3
        assert stripped.entries == DEPTH + 3
        assert mode(sandbox / "suid") == 0o755
    finally:
        subprocess.run(["rm", "-rf", str(sandbox)], check=True)  # rmtree recurses per level


@contextmanager
def descriptor_limit(limit: int) -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_file_that_cannot_be_stripped_stops_the_walk(tmp_path: Path) -> None:
    """An error other than a vanished entry ends the strip (the mount then stays)."""
    require_root()
    chattr = shutil.which("chattr")
    if chattr is None:
        pytest.skip("chattr missing: apt-get install e2fsprogs")
    setuid_file(tmp_path / "immutable")
    if subprocess.run([chattr, "+i", str(tmp_path / "immutable")], check=False).returncode:
        pytest.skip(f"{tmp_path} is on a filesystem without the immutable attribute")
    try:
        with opened(tmp_path) as fd, pytest.raises(PermissionError):
            strip_privileges(fd)
    finally:
        subprocess.run([chattr, "-i", str(tmp_path / "immutable")], check=True)


def test_the_record_keeps_the_mount_and_older_records_have_none() -> None:
    spec = LaunchSpec(
        container_id="c",
        command=Command(shell="true"),
        resources=Resources(),
        runtime="native",
        sandbox="/srv/a sandbox",
    )
    record = ContainerRecord(
        spec=spec, state=State.RUNNING, launched_at=1.0, handle={}, sandbox_mount="/srv/a sandbox"
    )
    assert ContainerRecord.from_json(record.to_json()).sandbox_mount == "/srv/a sandbox"
    older = record.to_json().replace(', "sandbox_mount": "/srv/a sandbox"', "")
    assert "sandbox_mount" not in older
    assert ContainerRecord.from_json(older).sandbox_mount == ""
