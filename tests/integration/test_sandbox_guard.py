"""A caller-named sandbox gives a host user nothing (adapter/core/sandbox_guard.py), through the
real service, the native runtime and the real kernel.

Root in a container without a user namespace is host root in its sandbox: it plants a set-uid
copy of `id`, a copy of `cat` with file capabilities and a device node, and opens the sandbox to
every user. While the container lives, the sandbox is a nosuid,nodev mount of its own, so host
user `nobody` running them stays itself; once it ended, the files are stripped and the mount is
gone. A symlink planted in the sandbox leads the strip nowhere, a sandbox already on a
nosuid,nodev filesystem gets no mount, and a kill -9 of the service changes none of it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.core import sandbox_guard
from adapter.core.state_dir import is_mount_point, is_nosuid
from tests.conftest import ServiceProcess, require, require_root, searchable_by_all
from tests.integration.api import destroy, wait
from tests.run_records import unmount_below

pytestmark = pytest.mark.integration

NOBODY = 65534
CAPABILITY = "security.capability"
CAP_DAC_READ_SEARCH = 1 << 2
# What the workload plants in its sandbox ($MESOS_SANDBOX), then it opens the sandbox to all.
PLANT = (
    "cd $MESOS_SANDBOX && cp /usr/bin/id id && chmod 4755 id && chmod g+s id"
    " && cp /bin/cat cat && setcap cap_dac_read_search+ep cat"
    " && mknod null c 1 3 && chmod 666 null && chown 65534:65534 null"
    " && chmod 755 . && touch ready"
)


@pytest.fixture
def callers(tmp_path: Path) -> Iterator[Path]:
    """A directory of the caller's (not under the state directory), passable by every user,
    as /var/lib is (search only, added up to /tmp and left: restoring the modes would race
    another worker's test); whatever mount a failed test leaves below it is undone."""
    require_root()
    for tool in ("setcap", "mknod"):
        require(shutil.which(tool) is not None, f"{tool} missing: apt-get install libcap2-bin")
    directory = tmp_path / "callers"
    directory.mkdir()
    searchable_by_all(directory)
    try:
        yield directory
    finally:
        unmount_below(directory)


def launch(service: ServiceProcess, container_id: str, shell: str, sandbox: Path) -> int:
    """Launch on the native runtime with the host's files, as root without a user namespace,
    in the caller-named `sandbox`; the workload's pid."""
    reply = service.stub().Launch(
        pb.LaunchRequest(
            container_id=container_id,
            command=pb.CommandInfo(shell=shell),
            container=pb.ContainerInfo(runtime="native"),
            sandbox=str(sandbox),
            user_namespace=False,
        ),
        timeout=60,
    )
    assert reply.status.sandbox == str(sandbox)
    return reply.status.pid


def planted(sandbox: Path) -> None:
    """Wait until the workload has planted its files."""
    deadline = time.monotonic() + 30
    while not (sandbox / "ready").exists():
        if time.monotonic() > deadline:
            raise AssertionError((sandbox / "stderr").read_text())
        time.sleep(0.05)


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv),
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def effective_capabilities(status: str) -> int:
    """CapEff of a /proc/<pid>/status text."""
    line = next(line for line in status.splitlines() if line.startswith("CapEff:"))
    return int(line.split()[1], 16)


def assert_gives_nothing(sandbox: Path) -> None:
    """Host user nobody, running what the workload planted, stays itself."""
    ran = as_nobody(str(sandbox / "id"), "-u")
    assert ran.stdout.strip() == str(NOBODY), ran
    ran = as_nobody(str(sandbox / "cat"), "/proc/self/status")
    assert ran.returncode == 0, ran
    assert effective_capabilities(ran.stdout) == 0, ran.stdout
    ran = as_nobody("dd", f"if={sandbox / 'null'}", "count=0", "status=none")
    assert ran.returncode != 0 and "Permission denied" in ran.stderr, ran


def assert_stripped(sandbox: Path) -> None:
    """What the workload planted, as the caller gets its sandbox back: no set-id bit, no file
    capability, a device node of root's that no one may open; and no mount of ours."""
    assert not is_mount_point(sandbox) and not is_nosuid(sandbox)
    binary = (sandbox / "id").lstat()
    assert binary.st_uid == 0 and stat.S_IMODE(binary.st_mode) == 0o755
    assert CAPABILITY not in os.listxattr(sandbox / "cat")
    device = (sandbox / "null").lstat()
    assert stat.S_ISCHR(device.st_mode) and device.st_rdev == os.makedev(1, 3)
    assert (device.st_uid, device.st_gid, stat.S_IMODE(device.st_mode)) == (0, 0, 0)


def test_a_planted_setuid_binary_capability_or_device_gives_a_host_user_nothing(
    service: ServiceProcess, callers: Path, container_id: str
) -> None:
    sandbox = callers / "sandbox"
    launch(service, container_id, f"{PLANT} && exec sleep 600", sandbox)
    try:
        planted(sandbox)
        # The workload did plant them: the files themselves are as it made them.
        binary = (sandbox / "id").lstat()
        assert binary.st_uid == 0 and stat.S_IMODE(binary.st_mode) == 0o6755
        assert CAPABILITY in os.listxattr(sandbox / "cat")
        assert is_mount_point(sandbox) and is_nosuid(sandbox)
        assert_gives_nothing(sandbox)
    finally:
        destroy(service.stub(), container_id)
    assert_stripped(sandbox)
    assert as_nobody(str(sandbox / "id"), "-u").stdout.strip() == str(NOBODY)


def test_a_planted_symlink_leads_the_strip_nowhere(
    service: ServiceProcess, callers: Path, tmp_path: Path, container_id: str
) -> None:
    """Links to a set-uid file, to a file with capabilities, and to a directory holding both:
    each keeps what it had."""
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy("/usr/bin/id", outside / "id")
    os.chmod(outside / "id", 0o4755)
    shutil.copy("/bin/cat", outside / "cat")
    subprocess.run(["setcap", "cap_dac_read_search+ep", str(outside / "cat")], check=True)
    links = (
        f"cd $MESOS_SANDBOX && ln -s {outside}/id id && ln -s {outside}/cat cat"
        f" && mkdir sub && ln -s {outside} sub/dir && ln -s ../../../../../../{outside} up"
        " && cp /usr/bin/id sub/own && chmod 4755 sub/own"
    )
    sandbox = callers / "sandbox"
    launch(service, container_id, links, sandbox)
    assert wait(service.stub(), container_id).exit_code == 0, (sandbox / "stderr").read_text()
    destroy(service.stub(), container_id)
    assert (sandbox / "id").is_symlink() and (sandbox / "sub" / "dir").is_symlink()
    assert stat.S_IMODE((outside / "id").stat().st_mode) == 0o4755
    assert CAPABILITY in os.listxattr(outside / "cat")
    assert stat.S_IMODE((sandbox / "sub" / "own").stat().st_mode) == 0o755, "the strip ran"
    assert not is_mount_point(sandbox)


def test_a_sandbox_on_a_nosuid_nodev_filesystem_gets_no_mount(
    service: ServiceProcess, callers: Path, container_id: str
) -> None:
    filesystem = callers / "tmpfs"
    filesystem.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "nosuid,nodev,mode=755", "tmpfs", str(filesystem)],
        check=True,
    )
    sandbox = filesystem / "sandbox"
    launch(service, container_id, "touch $MESOS_SANDBOX/ready && exec sleep 600", sandbox)
    try:
        planted(sandbox)
        assert not is_mount_point(sandbox), "a mount of its own on a nosuid,nodev filesystem"
        assert is_nosuid(sandbox)
    finally:
        destroy(service.stub(), container_id)
    assert is_mount_point(filesystem), "the caller's filesystem stays"
    assert (sandbox / "ready").exists()


def test_after_a_crash_an_ended_sandbox_is_stripped_and_a_running_one_kept(
    fresh_service: ServiceProcess, callers: Path
) -> None:
    """kill -9 of the service; one container ends while it is down, one is gone with its
    supervisor (no status recorded), one runs on. After the restart, the sandboxes of the
    first two are stripped and unmounted, the running one's keeps its mount until it is
    destroyed."""
    ends, gone, runs = callers / "ends", callers / "gone", callers / "runs"
    until_told = f"{PLANT} && while [ ! -e go ]; do sleep 0.05; done"
    ends_pid = launch(fresh_service, "ends", until_told, ends)
    gone_pid = launch(fresh_service, "gone", f"{PLANT} && exec sleep 600", gone)
    launch(fresh_service, "runs", f"{PLANT} && exec sleep 600", runs)
    for sandbox in (ends, gone, runs):
        planted(sandbox)
    fresh_service.kill()
    (ends / "go").touch()
    with contextlib.suppress(psutil.NoSuchProcess):
        psutil.Process(ends_pid).wait(timeout=30)  # it ends with nobody but its supervisor
    supervisor = psutil.Process(psutil.Process(gone_pid).ppid())
    assert "containerizer-supervisor" in supervisor.name()
    supervisor.kill()
    with contextlib.suppress(psutil.NoSuchProcess):
        psutil.Process(gone_pid).kill()
    psutil.wait_procs([supervisor], timeout=30)
    assert is_mount_point(ends) and is_mount_point(gone), "nothing is undone while it is down"
    fresh_service.start()
    stub = fresh_service.stub()
    assert wait(stub, "ends").exit_code == 0
    assert_stripped(ends)
    assert wait(stub, "gone").reason == pb.LOST
    assert_stripped(gone)
    assert stub.Status(pb.StatusRequest(container_id="runs"), timeout=10).state == pb.RUNNING
    assert is_mount_point(runs) and is_nosuid(runs)
    assert_gives_nothing(runs)
    destroy(stub, "runs")
    assert_stripped(runs)


def test_a_release_finds_only_its_own_mount_and_finishes_one_a_crash_froze(
    callers: Path,
) -> None:
    """Straight on sandbox_guard: a release where no mount of ours is touches nothing; one that
    finds the mount read-only (a crash in the middle of an earlier release) strips and
    unmounts; a mount below the sandbox is not entered, and a bind of the same filesystem is
    a mount all the same."""
    sandbox = callers / "sandbox"
    (sandbox / "inner").mkdir(parents=True)
    shutil.copy("/usr/bin/id", sandbox / "id")
    os.chmod(sandbox / "id", 0o4755)
    point = sandbox_guard.mount_point(str(sandbox))
    assert sandbox_guard.release(point) is None
    assert stat.S_IMODE((sandbox / "id").stat().st_mode) == 0o4755, "not ours: untouched"

    assert sandbox_guard.guard(str(sandbox), point) is True
    elsewhere = callers / "elsewhere"
    elsewhere.mkdir()
    shutil.copy("/usr/bin/id", elsewhere / "id")
    os.chmod(elsewhere / "id", 0o4755)
    subprocess.run(["mount", "--bind", str(elsewhere), str(sandbox / "inner")], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro,nosuid,nodev", str(sandbox)], check=True)
    stripped = sandbox_guard.release(point)
    assert stripped is not None and stripped.files == 1, stripped
    assert stat.S_IMODE((sandbox / "id").stat().st_mode) == 0o755
    assert stat.S_IMODE((elsewhere / "id").stat().st_mode) == 0o4755, "another mount entered"
    assert not is_mount_point(sandbox) and not is_mount_point(sandbox / "inner")


def test_a_sandbox_that_is_a_filesystem_of_its_own_is_released_and_the_filesystem_kept(
    callers: Path,
) -> None:
    """The caller's sandbox is the root of a filesystem mounted without nosuid: the guard's
    bind over it is undone at the end, and the caller's filesystem stays mounted."""
    sandbox = callers / "filesystem"
    sandbox.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=755", "tmpfs", str(sandbox)], check=True)
    point = sandbox_guard.mount_point(str(sandbox))
    assert sandbox_guard.guard(str(sandbox), point) is True
    assert is_nosuid(sandbox)
    shutil.copy("/usr/bin/id", sandbox / "id")
    os.chmod(sandbox / "id", 0o4755)
    stripped = sandbox_guard.release(point)
    assert stripped is not None and stripped.files == 1, stripped
    assert stat.S_IMODE((sandbox / "id").stat().st_mode) == 0o755
    assert is_mount_point(sandbox) and not is_nosuid(sandbox), "the caller's tmpfs, as it was"
    assert sandbox_guard.release(point) is None, "the caller's own is not taken for ours"


def test_the_walk_enters_no_mount_below_its_directory(callers: Path) -> None:
    """strip_privileges on a directory with a bind of another directory (same filesystem, so
    the same device) below it: the other directory's set-uid file keeps its bit."""
    sandbox, elsewhere = callers / "sandbox", callers / "elsewhere"
    (sandbox / "inner").mkdir(parents=True)
    elsewhere.mkdir()
    for directory in (sandbox, elsewhere):
        shutil.copy("/usr/bin/id", directory / "id")
        os.chmod(directory / "id", 0o4755)
    subprocess.run(["mount", "--bind", str(elsewhere), str(sandbox / "inner")], check=True)
    top = os.open(sandbox, os.O_RDONLY | os.O_DIRECTORY)
    try:
        stripped = sandbox_guard.strip_privileges(top)
    finally:
        os.close(top)
    assert stripped.files == 1
    assert stat.S_IMODE((sandbox / "id").stat().st_mode) == 0o755
    assert stat.S_IMODE((elsewhere / "id").stat().st_mode) == 0o4755
