"""A containerd container's stdout and stderr files rotate by size (log_max_size, log_max_files)
against a real service and a private containerd: the shim runs our supervisor as the task's
logging binary, which keeps the newest output within the bound, never follows a link the
workload put at a rotated name, gives the files to the workload's user, and has a short
container's output complete by the time its end is reported."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from tests.cgroup_roots import run_scoped_name
from tests.conftest import ServiceProcess, require, require_root
from tests.images import REFERENCE, busybox_oci_layout
from tests.integration.api import destroy, wait
from tests.integration.containerd_daemon import (
    SHARED,
    ContainerdDaemon,
    containerd_available,
    containerd_config,
    import_image,
)
from tests.integration.test_output_rotation import (
    LINES,
    MAX_SIZE,
    ONE_WRITE,
    ROTATION_CONFIG,
    WRITTEN,
    output_files,
)

pytestmark = pytest.mark.integration
NOBODY = 65534  # the test image's nobody (tests/images.py)


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ContainerdDaemon]:
    require_root()
    missing = containerd_available()
    require(missing is None, str(missing))
    daemon = SHARED.acquire(lambda: tmp_path_factory.mktemp("containerd"))
    yield daemon
    SHARED.release()


@pytest.fixture(scope="module")
def rotating(
    tmp_path_factory: pytest.TempPathFactory, containerd: ContainerdDaemon
) -> Iterator[ServiceProcess]:
    """A service whose containerd containers' files rotate at 256 KiB, 3 kept."""
    workdir = tmp_path_factory.mktemp("containerd-rotating")
    namespace = run_scoped_name("ctz")
    service = ServiceProcess(workdir, ROTATION_CONFIG + containerd_config(containerd, namespace))
    service.start()
    try:
        assert import_image(service.endpoint, busybox_oci_layout(workdir)) == [REFERENCE]
        yield service
    finally:
        try:
            service.destroy_all()
        finally:
            service.stop()
            containerd.remove_namespace(namespace)
            service.remove_cgroup_roots()


def run(service: ServiceProcess, container_id: str, shell: str, user: str = "") -> Path:
    """Launch `shell` on containerd, wait for its success; its sandbox."""
    reply = service.stub().Launch(
        pb.LaunchRequest(
            container_id=container_id,
            command=pb.CommandInfo(shell=shell, user=user),
            container=pb.ContainerInfo(runtime="containerd", image=REFERENCE),
        ),
        timeout=60,
    )
    termination = wait(service.stub(), container_id)
    assert termination.reason == pb.EXITED and termination.exit_code == 0, termination
    return Path(reply.status.sandbox)


def test_the_newest_output_is_kept_in_max_files_of_max_size(
    rotating: ServiceProcess, container_id: str
) -> None:
    sandbox = run(rotating, container_id, f"seq -w 0 {LINES - 1}", user="nobody")
    try:
        files = output_files(sandbox)
        assert sorted(files) == ["stdout", "stdout.1", "stdout.2"]
        assert not (sandbox / "stdout.3").exists()
        assert all(len(data) <= MAX_SIZE + ONE_WRITE for data in files.values())
        # The last bytes written end the newest file, and the older ones hold what came before,
        # in order. (stdout may be empty: the relay reads as much as the pipe holds, and a read
        # that ends at the bound rotates the file it filled.)
        kept = files["stdout.2"] + files["stdout.1"] + files["stdout"]
        assert WRITTEN.endswith(kept)
        assert len(kept) >= 2 * MAX_SIZE  # two files were full when the third began
        for name in files:  # the workload's own, as the native runtime's are
            info = (sandbox / name).stat()
            assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (NOBODY, NOBODY, 0o640)
    finally:
        destroy(rotating.stub(), container_id)


def test_a_short_containers_output_is_complete_when_its_end_is_reported(
    rotating: ServiceProcess, container_id: str
) -> None:
    sandbox = run(rotating, container_id, "echo out; echo err >&2; printf last")
    try:
        assert (sandbox / "stdout").read_bytes() == b"out\nlast"
        assert (sandbox / "stderr").read_bytes() == b"err\n"
        assert sorted(output_files(sandbox)) == ["stdout"]
    finally:
        destroy(rotating.stub(), container_id)


def test_a_link_at_a_rotated_name_is_never_followed(
    rotating: ServiceProcess, container_id: str, tmp_path: Path
) -> None:
    host_file = tmp_path / "host-file"
    host_file.write_text("the host's\n")
    plant = f"ln -s {host_file} /mnt/mesos/sandbox/stdout.1 && seq -w 0 {LINES - 1}"
    sandbox = run(rotating, container_id, plant)
    try:
        assert host_file.read_text() == "the host's\n"
        assert not (sandbox / "stdout.1").is_symlink()
        files = output_files(sandbox)
        assert sorted(files) == ["stdout", "stdout.1", "stdout.2"]
        assert WRITTEN.endswith(files["stdout.2"] + files["stdout.1"] + files["stdout"])
    finally:
        destroy(rotating.stub(), container_id)
