"""Images that cannot hurt the host, and that nothing in use loses, through a real service: the
CLI's `images import|rm` and a native launch of the image.

- A layer that points a symlink at a host file and hard-links it with mode 04777 changes nothing
  of that file (mode, owner, content), through the import and a run of the image.
- A compression bomb is refused while it unpacks, naming the node's limit and the image, and
  leaves nothing in the store.
- `images rm` of an image a running container uses is refused (FAILED_PRECONDITION, naming the
  container), and the container keeps its root filesystem.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.api.containerizer.v1 import images_pb2, images_pb2_grpc
from tests.conftest import BIN, ServiceProcess, require, require_root
from tests.images import BUSYBOX, Entry, busybox_entries, tar_bytes, write_oci_layout
from tests.integration.api import destroy, wait

pytestmark = pytest.mark.integration

MIB = 1 << 20
UNPACK_LIMIT = 32 * MIB  # room for busybox, not for the bomb


@pytest.fixture(scope="module")
def limited_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """A service of this module's own, with a small unpack limit."""
    require_root()
    require(BUSYBOX.is_file(), f"{BUSYBOX} missing: apt-get install busybox-static")
    process = ServiceProcess(
        tmp_path_factory.mktemp("images-safety"),
        f"\n[images]\nmax_unpacked_bytes = {UNPACK_LIMIT}\n",
    )
    process.start()
    yield process
    process.destroy_all()
    process.stop()
    process.remove_cgroup_roots()


def containerizer(service: ServiceProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "containerizer"), "--endpoint", service.endpoint, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def unique_reference(name: str) -> str:
    return f"localhost/{name}-{uuid.uuid4().hex[:8]}:1"


def import_image(service: ServiceProcess, tarball: Path) -> subprocess.CompletedProcess[str]:
    return containerizer(service, "images", "import", str(tarball))


def launch_in_image(
    service: ServiceProcess, container_id: str, shell: str, image: str
) -> pb.LaunchResponse:
    return service.stub().Launch(
        pb.LaunchRequest(
            container_id=container_id,
            command=pb.CommandInfo(shell=shell),
            container=pb.ContainerInfo(image=image),
        ),
        timeout=60,
    )


def store_work(service: ServiceProcess) -> set[Path]:
    """The store's unpacked layers and staging directories."""
    images = service.state_dir / "images"
    return {*(images / "layers").iterdir(), *(images / "ingest").iterdir()}


def file_facts(path: Path) -> tuple[int, int, int, bytes]:
    facts = path.lstat()
    return stat.S_IMODE(facts.st_mode), facts.st_uid, facts.st_gid, path.read_bytes()


def test_a_layer_cannot_change_a_host_file_through_a_symlink(
    limited_service: ServiceProcess, container_id: str, tmp_path: Path
) -> None:
    host_file = tmp_path / "host" / "private"
    host_file.parent.mkdir()
    host_file.write_bytes(b"the host's own\n")
    host_file.chmod(0o600)
    os.chown(host_file, 4321, 4321)
    before = file_facts(host_file)
    attack = [
        Entry("s", "symlink", link=str(host_file)),
        Entry("h", "hardlink", link="s", mode=0o4777),
        Entry("rel", "symlink", link=f"../../../../../../../..{host_file}"),
        Entry("rel-h", "hardlink", link="rel", mode=0o6777),
    ]
    reference = unique_reference("symlink-attack")
    layer = tar_bytes([*busybox_entries(), *attack])
    imported = import_image(
        limited_service, write_oci_layout(tmp_path / "a.tar", [layer], reference)
    )
    assert imported.returncode == 0, imported.stderr
    assert file_facts(host_file) == before
    script = "chmod 4777 /h /rel-h 2>/dev/null; cat /h; ls -l /h"
    reply = launch_in_image(limited_service, container_id, script, reference)
    wait(limited_service.stub(), container_id)
    output = (Path(reply.status.sandbox) / "stdout").read_text()
    assert "the host's own" not in output  # inside, the link names the container's own path
    assert file_facts(host_file) == before
    destroy(limited_service.stub(), container_id)
    assert containerizer(limited_service, "images", "rm", reference).returncode == 0


def test_a_compression_bomb_is_refused_and_leaves_nothing(
    limited_service: ServiceProcess, tmp_path: Path
) -> None:
    reference = unique_reference("bomb")
    zeros = tar_bytes([Entry("zeros", data=bytes(UNPACK_LIMIT + 16 * MIB))])
    bomb = write_oci_layout(tmp_path / "bomb.tar", [zeros], reference)
    assert bomb.stat().st_size < MIB
    before = store_work(limited_service)
    result = import_image(limited_service, bomb)
    assert result.returncode != 0
    assert f"{reference} cannot be unpacked" in result.stderr
    assert f"more than {UNPACK_LIMIT} bytes" in result.stderr
    assert "images.max_unpacked_bytes" in result.stderr
    assert "Traceback" not in result.stderr
    listed = json.loads(containerizer(limited_service, "images", "ls", "--json").stdout)
    assert reference not in {image["reference"] for image in listed.get("images", [])}
    assert store_work(limited_service) == before


def test_rm_is_refused_while_a_running_container_uses_the_image(
    limited_service: ServiceProcess, container_id: str, tmp_path: Path
) -> None:
    reference = unique_reference("in-use")
    layer = tar_bytes(busybox_entries())
    imported = import_image(
        limited_service, write_oci_layout(tmp_path / "b.tar", [layer], reference)
    )
    assert imported.returncode == 0, imported.stderr
    # The workload counts /bin once the test has tried to remove its image.
    script = "while [ ! -e go ]; do sleep 0.05; done; ls /bin | wc -l"
    reply = launch_in_image(limited_service, container_id, script, reference)
    removed = containerizer(limited_service, "images", "rm", reference)
    assert removed.returncode != 0
    assert container_id in removed.stderr and "in use" in removed.stderr
    channel = grpc.insecure_channel(limited_service.endpoint)
    with pytest.raises(grpc.RpcError) as refused:
        images_pb2_grpc.ImagesStub(channel).Remove(
            images_pb2.RemoveImageRequest(reference=reference), timeout=10
        )
    channel.close()
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert container_id in (refused.value.details() or "")
    (Path(reply.status.sandbox) / "go").touch()
    assert wait(limited_service.stub(), container_id).exit_code == 0
    bin_entries = int((Path(reply.status.sandbox) / "stdout").read_text())
    assert bin_entries == len([e for e in busybox_entries() if e.name.startswith("bin/")])
    # TERMINATED: nothing runs on the image any more, so it may go.
    assert containerizer(limited_service, "images", "rm", reference).returncode == 0
    destroy(limited_service.stub(), container_id)
