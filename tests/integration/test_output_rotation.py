"""A container's stdout and stderr files rotate by size (log_max_size, log_max_files) against a
real service: the newest output is kept, nothing outgrows the bound, a link or a directory the
workload put at a rotated name is never followed and never fails it, `containerizer logs`
reads across a rotation (--tail and -f), and bad values are refused naming the key."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import BIN, ServiceProcess, require_root, serving
from tests.integration.api import destroy, launch, serve_expecting_refusal, wait
from tests.integration.test_lxc import LXC_CONFIG, require_lxc

pytestmark = pytest.mark.integration

MAX_SIZE = 256 << 10
MAX_FILES = 3
# What the supervisor appends at once: one read from the workload's pipe, at most its buffer.
ONE_WRITE = 32 << 10
# `seq -w 0 N` with N of six digits: 7 bytes a line, 3 MiB in all.
LINES = (3 << 20) // 7 + 1


ROTATION_CONFIG = f"log_max_size = {MAX_SIZE}\nlog_max_files = {MAX_FILES}\n"


def rotating_service(workdir: Path, extra_config: str = "") -> Iterator[ServiceProcess]:
    """A service whose containers' files rotate at 256 KiB, 3 kept."""
    service = ServiceProcess(workdir, extra_config=ROTATION_CONFIG + extra_config)
    yield from serving(service)


@pytest.fixture(scope="module")
def rotating(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    require_root()
    yield from rotating_service(tmp_path_factory.mktemp("rotating"))


@pytest.fixture(scope="module")
def rotating_lxc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """The same with LXC, whose container's init (our supervisor) writes and rotates them."""
    require_lxc()
    yield from rotating_service(tmp_path_factory.mktemp("rotating-lxc"), LXC_CONFIG)


def run(service: ServiceProcess, container_id: str, shell: str) -> Path:
    """Launch `shell`, wait for its success; its sandbox."""
    reply = launch(service.stub(), container_id, shell)
    assert wait(service.stub(), container_id).exit_code == 0
    return Path(reply.status.sandbox)


def output_files(sandbox: Path) -> dict[str, bytes]:
    """The regular files a stream's rotation made, by name."""
    return {
        path.name: path.read_bytes()
        for path in sandbox.iterdir()
        if path.name.startswith("stdout") and path.is_file() and not path.is_symlink()
    }


# What `seq -w 0 LINES-1` writes.
WRITTEN = b"".join(b"%06d\n" % number for number in range(LINES))


def logs(service: ServiceProcess, *args: str) -> subprocess.CompletedProcess[bytes]:
    command = [str(BIN / "containerizer"), "--endpoint", service.endpoint, "logs", *args]
    return subprocess.run(command, capture_output=True, timeout=60)


def test_the_newest_output_is_kept_in_max_files_of_max_size(
    rotating: ServiceProcess, container_id: str
) -> None:
    assert_the_newest_output_is_kept(rotating, container_id)


def test_an_lxc_containers_output_rotates_too(
    rotating_lxc: ServiceProcess, container_id: str
) -> None:
    assert_the_newest_output_is_kept(rotating_lxc, container_id)


def assert_the_newest_output_is_kept(service: ServiceProcess, container_id: str) -> None:
    sandbox = run(service, container_id, f"seq -w 0 {LINES - 1}")
    try:
        files = output_files(sandbox)
        assert sorted(files) == ["stdout", "stdout.1", "stdout.2"]
        assert not (sandbox / "stdout.3").exists()
        assert all(len(data) <= MAX_SIZE + ONE_WRITE for data in files.values())
        # The last bytes written end stdout, and the files hold what came before, in order.
        kept = files["stdout.2"] + files["stdout.1"] + files["stdout"]
        assert WRITTEN.endswith(kept)  # the newest bytes last (stdout may have just begun)
        assert len(kept) >= 2 * MAX_SIZE  # two files were full when the third began
    finally:
        destroy(service.stub(), container_id)


def test_a_link_or_directory_at_a_rotated_name_is_never_followed(
    rotating: ServiceProcess, container_id: str, tmp_path: Path
) -> None:
    passwd_copy = tmp_path / "passwd-copy"
    passwd_copy.write_text("root:x:0:0:root:/root:/bin/sh\n")
    plant = (
        f"ln -s {passwd_copy} stdout.1 && mkdir stdout.2 && echo mine > stdout.2/kept"
        f" && seq -w 0 {LINES - 1}"
    )
    sandbox = run(rotating, container_id, plant)
    try:
        assert passwd_copy.read_text() == "root:x:0:0:root:/root:/bin/sh\n"
        # The directory could not be moved nor removed: it stays, with what the workload put in.
        assert (sandbox / "stdout.2" / "kept").read_text() == "mine\n"
        assert not (sandbox / "stdout.1").is_symlink()
        files = output_files(sandbox)
        assert sorted(files) == ["stdout", "stdout.1"]
        assert all(len(data) <= MAX_SIZE + ONE_WRITE for data in files.values())
        assert WRITTEN.endswith(files["stdout.1"] + files["stdout"])
    finally:
        destroy(rotating.stub(), container_id)


# For the Logs RPC, which sends a line a message: lines of 1000 bytes, 3 MiB in all.
LONG_LINES = (3 << 20) // 1000 + 1
LONG = "seq -f %0999.0f"


def long_lines(first: int, end: int) -> list[bytes]:
    return [b"%0999d" % number for number in range(first, end)]


def test_logs_tail_reaches_into_the_rotated_files(
    rotating: ServiceProcess, container_id: str
) -> None:
    sandbox = run(rotating, container_id, f"{LONG} 0 {LONG_LINES - 1}")
    try:
        in_current = (sandbox / "stdout").read_bytes().count(b"\n")
        count = in_current + 100  # the last 100 of them in stdout.1
        tail = logs(rotating, "--tail", str(count), container_id)
        assert tail.returncode == 0, tail.stderr
        assert tail.stdout.splitlines() == long_lines(LONG_LINES - count, LONG_LINES)
        whole = logs(rotating, container_id).stdout.splitlines()[1:]  # the first may be cut
        assert whole == long_lines(LONG_LINES - len(whole), LONG_LINES)
        assert len(whole) > count
    finally:
        destroy(rotating.stub(), container_id)


def test_logs_follow_reads_on_across_rotations(
    rotating: ServiceProcess, container_id: str, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    # 60 KB a tenth of a second: a rotation every half second, several while followed.
    write = (
        f"echo ready; while [ ! -e {go} ]; do sleep 0.05; done;"
        f" i=0; while [ $i -lt 16 ]; do {LONG} $((i * 60)) $((i * 60 + 59));"
        " i=$((i + 1)); sleep 0.1; done"
    )
    sandbox = Path(launch(rotating.stub(), container_id, write).status.sandbox)
    command = [str(BIN / "containerizer"), "--endpoint", rotating.endpoint, "logs", "-f"]
    follower = subprocess.Popen([*command, container_id], stdout=subprocess.PIPE)
    try:
        assert follower.stdout is not None
        assert follower.stdout.readline() == b"ready\n"
        go.touch()
        output, _ = follower.communicate(timeout=60)
        assert follower.returncode == 0
        assert output.splitlines() == long_lines(0, 16 * 60)
        assert (sandbox / "stdout.2").is_file()  # it was rotated twice at least meanwhile
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
        destroy(rotating.stub(), container_id)


@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ("log_max_size = -1", "log_max_size"),
        ('log_max_size = "100M"', "log_max_size"),
        ("log_max_files = 0", "log_max_files"),
        ("log_max_files = 1000", "log_max_files"),
    ],
)
def test_bad_rotation_settings_are_refused_naming_the_key(
    tmp_path: Path, setting: str, key: str
) -> None:
    config = tmp_path / "containerizer.toml"
    config.write_text(f'version = 1\nstate_dir = "{tmp_path / "state"}"\n{setting}\n')
    output = serve_expecting_refusal(config)
    assert f"{key}: expected" in output
