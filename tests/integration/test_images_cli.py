"""`containerizer images ...` and the Images API against a real `containerizer serve`."""

from __future__ import annotations

import json
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from adapter.api.containerizer.v1 import images_pb2, images_pb2_grpc
from adapter.clients.cli.format import EXIT_CLI_FAILURE
from tests.conftest import BIN, ServiceProcess, require_root
from tests.image_fixtures import busybox_docker_tar, busybox_oci_tar  # noqa: F401
from tests.images import REFERENCE, Entry, tar_bytes, write_oci_layout

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def images_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """A service of this module's own: its image store is not shared with other tests."""
    require_root()
    process = ServiceProcess(tmp_path_factory.mktemp("images-service"))
    process.start()
    yield process
    process.stop()
    process.remove_cgroup_roots()


@pytest.fixture
def images_stub(images_service: ServiceProcess) -> Iterator[images_pb2_grpc.ImagesStub]:
    channel = grpc.insecure_channel(images_service.endpoint)
    yield images_pb2_grpc.ImagesStub(channel)
    channel.close()


def containerizer(service: ServiceProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "containerizer"), "--endpoint", service.endpoint, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def listed(service: ServiceProcess) -> dict[str, str]:
    """reference -> manifest digest, from `images ls --json`."""
    result = containerizer(service, "images", "ls", "--json")
    assert result.returncode == 0, result.stderr
    images = json.loads(result.stdout).get("images", [])
    return {image["reference"]: image["manifest"]["digest"] for image in images}


def test_import_ls_rm_both_formats(
    images_service: ServiceProcess,
    busybox_oci_tar: Path,  # noqa: F811
    busybox_docker_tar: Path,  # noqa: F811
) -> None:
    for tarball in (busybox_oci_tar, busybox_docker_tar):
        result = containerizer(images_service, "images", "import", str(tarball))
        assert result.returncode == 0, result.stderr
        verb, reference, digest = result.stdout.split()
        assert (verb, reference) == ("imported", REFERENCE)
        assert f"{tarball.name}: 100%" in result.stderr  # plain progress lines: not a tty
        assert f"unpacking {REFERENCE}: 100%" in result.stderr  # then the unpack's
        assert result.stderr.index(f"{tarball.name}: 100%") < result.stderr.index("unpacking")
        assert "\r" not in result.stderr
        assert listed(images_service) == {REFERENCE: digest}
    table = containerizer(images_service, "images", "ls")
    assert table.stdout.splitlines()[0].split() == ["REFERENCE", "DIGEST", "LAYERS", "SIZE"]
    assert table.stdout.splitlines()[1].startswith(REFERENCE)
    removed = containerizer(images_service, "images", "rm", "localhost/busybox")
    assert removed.returncode == 0 and removed.stdout == "removed localhost/busybox\n"
    assert listed(images_service) == {}


def test_cli_errors_name_the_reference_or_file(
    images_service: ServiceProcess,
    tmp_path: Path,
    busybox_oci_tar: Path,  # noqa: F811
) -> None:
    malformed = containerizer(images_service, "images", "rm", "Bad Reference")
    assert malformed.returncode == EXIT_CLI_FAILURE
    assert "reference: 'Bad Reference' is not a valid image reference" in malformed.stderr
    missing = containerizer(images_service, "images", "rm", "localhost/absent:1")
    assert missing.returncode == EXIT_CLI_FAILURE and "localhost/absent:1" in missing.stderr
    no_file = containerizer(images_service, "images", "import", str(tmp_path / "none.tar"))
    assert no_file.returncode == EXIT_CLI_FAILURE and "none.tar is not a file" in no_file.stderr
    assert "Traceback" not in malformed.stderr + missing.stderr + no_file.stderr


def test_import_streams_progress_then_the_image(
    images_stub: images_pb2_grpc.ImagesStub, tmp_path: Path
) -> None:
    reference = "localhost/streamed:1"
    incompressible = random.Random(4).randbytes(4 << 20)  # 4 MiB that gzip cannot shrink
    big_layer = tar_bytes([Entry("blob", data=incompressible)])
    tarball = write_oci_layout(tmp_path / "streamed.tar", [big_layer], reference)
    messages = list(stub_import(images_stub, tarball))
    transfers = [m.transfer for m in messages if m.HasField("transfer")]
    phases = [t.phase for t in transfers]
    assert phases == sorted(phases)  # reading, then unpacking
    read = [t for t in transfers if t.phase == images_pb2.Transfer.READ]
    assert len(read) >= 2  # a report per MiB read and the final one
    assert [t.done_bytes for t in read] == sorted(t.done_bytes for t in read)
    assert read[-1].done_bytes == read[-1].total_bytes == tarball.stat().st_size
    unpacked = [t for t in transfers if t.phase == images_pb2.Transfer.UNPACK]
    assert {t.what for t in unpacked} == {reference} and len(unpacked) >= 3  # 0, each MiB, all
    assert [t.done_bytes for t in unpacked] == sorted(t.done_bytes for t in unpacked)
    layer_bytes = messages[-1].image.layers[0].size
    assert unpacked[-1].done_bytes == unpacked[-1].total_bytes == layer_bytes
    assert messages[-1].image.reference == reference
    assert messages[-1].image.layers[0].size > 0
    images_stub.Remove(images_pb2.RemoveImageRequest(reference=reference), timeout=10)


def stub_import(stub: images_pb2_grpc.ImagesStub, tarball: Path) -> list[images_pb2.ImageProgress]:
    return list(stub.Import(images_pb2.ImportRequest(path=str(tarball)), timeout=60))


def test_api_status_codes(images_stub: images_pb2_grpc.ImagesStub, tmp_path: Path) -> None:
    cases = [
        (images_pb2.RemoveImageRequest(reference="UPPER/case"), grpc.StatusCode.INVALID_ARGUMENT),
        (images_pb2.RemoveImageRequest(reference="localhost/x:1"), grpc.StatusCode.NOT_FOUND),
    ]
    for request, code in cases:
        with pytest.raises(grpc.RpcError) as raised:
            images_stub.Remove(request, timeout=10)
        assert raised.value.code() == code
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"junk" * 1000)
    for path, code in [
        ("relative.tar", grpc.StatusCode.INVALID_ARGUMENT),
        (str(junk), grpc.StatusCode.INVALID_ARGUMENT),
        (str(tmp_path / "absent.tar"), grpc.StatusCode.NOT_FOUND),
    ]:
        with pytest.raises(grpc.RpcError) as raised:
            list(images_stub.Import(images_pb2.ImportRequest(path=path), timeout=30))
        assert raised.value.code() == code, path


def test_reflection_lists_the_images_service(images_service: ServiceProcess) -> None:
    channel = grpc.insecure_channel(images_service.endpoint)
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    [reply] = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
    channel.close()
    names = {service.name for service in reply.list_services_response.service}
    assert "containerizer.v1.Images" in names
