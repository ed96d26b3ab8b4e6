"""A docker container's sandbox files rotate by size (log_max_size, log_max_files) like the other
runtimes': the newest output is kept in the bound, a link or directory the workload put at a
rotated name is never followed, `containerizer logs` reads across the files, and a restart of
the service after a rotation neither repeats nor loses a byte."""

# Fixtures are imported from tests.docker_fixtures and injected by name, which ruff reads as
# redefinition; a conftest `pytest_plugins` line would make both the imports and this go away.
# ruff: noqa: F811

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ServiceProcess, serving
from tests.docker_fixtures import (  # noqa: F401  (fixtures, injected by parameter name)
    PrivateDockerd,
    busybox_image,
    docker_service_config,
    dockerd,
)
from tests.integration.api import destroy, wait
from tests.integration.test_docker import launch_docker
from tests.integration.test_output_rotation import (
    LINES,
    MAX_FILES,
    MAX_SIZE,
    ROTATION_CONFIG,
    WRITTEN,
    logs,
    output_files,
)

pytestmark = pytest.mark.integration

# Docker's json-file driver splits lines at 16 KiB: a frame, appended whole before a rotation.
ONE_FRAME = 16 << 10


def rotating_docker_service(workdir: Path, dockerd: PrivateDockerd) -> Iterator[ServiceProcess]:
    # The rotation keys are top-level: before the [runtimes.docker] table.
    service = ServiceProcess(workdir, ROTATION_CONFIG + docker_service_config(dockerd, None))
    yield from serving(service)


@pytest.fixture(scope="module")
def rotating_docker(
    tmp_path_factory: pytest.TempPathFactory, dockerd: PrivateDockerd
) -> Iterator[ServiceProcess]:
    yield from rotating_docker_service(tmp_path_factory.mktemp("rotating-docker"), dockerd)


@pytest.fixture
def fresh_rotating_docker(tmp_path: Path, dockerd: PrivateDockerd) -> Iterator[ServiceProcess]:
    """One of the test's own, for a test that kills it."""
    yield from rotating_docker_service(tmp_path, dockerd)


def test_the_newest_output_is_kept_in_max_files_of_max_size(
    rotating_docker: ServiceProcess, busybox_image: str, container_id: str
) -> None:
    stub = rotating_docker.stub()
    reply = launch_docker(stub, container_id, f"seq -w 0 {LINES - 1}", busybox_image)
    sandbox = Path(reply.status.sandbox)
    try:
        assert wait(stub, container_id).exit_code == 0
        files = output_files(sandbox)
        assert sorted(files) == ["stdout", "stdout.1", "stdout.2"]
        assert len(files) == MAX_FILES
        assert all(len(data) <= MAX_SIZE + ONE_FRAME for data in files.values())
        kept = files["stdout.2"] + files["stdout.1"] + files["stdout"]
        assert files["stdout"] and WRITTEN.endswith(kept)
        assert len(kept) >= 2 * MAX_SIZE
        assert not [path.name for path in sandbox.iterdir() if "rotating" in path.name]
        tail = logs(rotating_docker, "--tail", "5", container_id)
        assert tail.returncode == 0, tail.stderr
        assert tail.stdout == WRITTEN[-5 * 7 :]
    finally:
        destroy(stub, container_id)


# 100000 lines of 7 bytes in 20 pieces, a tenth of a second apart: two rotations, all kept.
FIRST, COUNT, PIECES = 100000, 100000, 20
ALL_OF_IT = b"".join(b"%d\n" % number for number in range(FIRST, FIRST + COUNT))
SLOWLY = (
    f"i=0; while [ $i -lt {PIECES} ]; do"
    f" seq $(({FIRST} + i * {COUNT // PIECES})) $(({FIRST} + (i + 1) * {COUNT // PIECES} - 1));"
    " i=$((i + 1)); sleep 0.15; done"
)


def test_a_restart_after_a_rotation_neither_repeats_nor_loses_output(
    fresh_rotating_docker: ServiceProcess, busybox_image: str, container_id: str
) -> None:
    service = fresh_rotating_docker
    reply = launch_docker(service.stub(), container_id, SLOWLY, busybox_image)
    sandbox = Path(reply.status.sandbox)
    deadline = time.monotonic() + 60
    while not (sandbox / "stdout.1").is_file():  # a rotation happened before the crash
        assert time.monotonic() < deadline, "no rotation"
        time.sleep(0.05)
    service.kill()
    time.sleep(1)  # more output, copied by nobody meanwhile
    service.start()
    stub = service.stub()
    try:
        assert wait(stub, container_id).exit_code == 0
        files = output_files(sandbox)
        assert sorted(files) == ["stdout", "stdout.1", "stdout.2"]
        assert files["stdout.2"] + files["stdout.1"] + files["stdout"] == ALL_OF_IT
    finally:
        destroy(stub, container_id)


def test_a_link_or_directory_at_a_rotated_name_is_never_followed(
    rotating_docker: ServiceProcess, busybox_image: str, container_id: str, tmp_path: Path
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("the host's\n")
    plant = (
        f"ln -s {victim} stdout.1 && mkdir stdout.2 && echo mine > stdout.2/kept"
        f" && seq -w 0 {LINES - 1}"
    )
    stub = rotating_docker.stub()
    sandbox = Path(launch_docker(stub, container_id, plant, busybox_image).status.sandbox)
    try:
        assert wait(stub, container_id).exit_code == 0
        assert victim.read_text() == "the host's\n"
        assert (sandbox / "stdout.2" / "kept").read_text() == "mine\n"  # not movable: stays
        assert not (sandbox / "stdout.1").is_symlink()
        files = output_files(sandbox)
        assert sorted(files) == ["stdout", "stdout.1"]
        assert all(len(data) <= MAX_SIZE + ONE_FRAME for data in files.values())
        assert files["stdout"] and WRITTEN.endswith(files["stdout.1"] + files["stdout"])
    finally:
        destroy(stub, container_id)
