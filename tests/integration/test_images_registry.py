"""Pull from a real OCI distribution registry (Debian's docker-registry on 127.0.0.1), directly
into a store and through the service's Images API."""

from __future__ import annotations

import uuid
from pathlib import Path

import grpc
import pytest

from adapter.api.containerizer.v1 import images_pb2, images_pb2_grpc
from adapter.core.errors import NotFound, Unavailable
from adapter.images import ImageStore
from tests.conftest import ServiceProcess
from tests.image_fixtures import free_loopback_port, local_registry  # noqa: F401
from tests.images import BUSYBOX, busybox_entries, push_image, tar_bytes

pytestmark = pytest.mark.integration


def unique_repository() -> str:
    return f"test/busybox-{uuid.uuid4().hex[:8]}"


async def test_pull_with_progress(tmp_path: Path, local_registry: str) -> None:  # noqa: F811
    repository = unique_repository()
    layer = tar_bytes(busybox_entries())
    manifest_digest = push_image(local_registry, repository, "1", [layer])
    store = ImageStore(tmp_path / "images")
    reports: list[tuple[str, int, int, str]] = []
    reference = f"{local_registry}/{repository}:1"
    image = await store.pull(reference, lambda *report: reports.append(report))
    assert image.reference == reference
    assert image.manifest.digest == manifest_digest
    assert store.get(reference) == image
    [layer_blob] = image.layers
    layer_reports = [r for r in reports if r[0] == layer_blob.digest]
    assert layer_reports[-1] == (layer_blob.digest, layer_blob.size, layer_blob.size, "read")
    assert all(done <= total for _, done, total, _ in reports)
    # The pull unpacks what it fetched, and says so last.
    assert reports[-1] == (reference, layer_blob.size, layer_blob.size, "unpack")
    [layer] = await store.layers(reference)  # one layer: its directory is the image's files
    assert (layer / "bin" / "busybox").read_bytes() == BUSYBOX.read_bytes()


async def test_pull_by_digest_and_again_from_the_store(
    tmp_path: Path,
    local_registry: str,  # noqa: F811
) -> None:
    repository = unique_repository()
    manifest_digest = push_image(local_registry, repository, "v2", [tar_bytes(busybox_entries())])
    store = ImageStore(tmp_path / "images")
    by_digest = await store.pull(f"{local_registry}/{repository}@{manifest_digest}")
    assert by_digest.manifest.digest == manifest_digest
    reports: list[tuple[str, int, int, str]] = []
    await store.pull(f"{local_registry}/{repository}:v2", lambda *report: reports.append(report))
    # Every blob was already in the store, and unpacked: each is reported complete at once,
    # nothing fetched or unpacked again.
    assert all(done == total and phase == "read" for _, done, total, phase in reports)
    assert len(store.list()) == 2


async def test_missing_images_and_unreachable_registries(
    tmp_path: Path,
    local_registry: str,  # noqa: F811
) -> None:
    store = ImageStore(tmp_path / "images")
    missing = f"{local_registry}/{unique_repository()}:nope"
    with pytest.raises(NotFound, match=missing):
        await store.pull(missing)
    port = free_loopback_port()  # nothing listens there
    with pytest.raises(Unavailable, match=f"registry 127.0.0.1:{port}: cannot GET"):
        await store.pull(f"127.0.0.1:{port}/busybox:1")
    assert store.list() == []
    assert not list((tmp_path / "images" / "ingest").iterdir())


def test_pull_through_the_service(
    tmp_path: Path,
    local_registry: str,  # noqa: F811
) -> None:
    repository = unique_repository()
    push_image(local_registry, repository, "1", [tar_bytes(busybox_entries())])
    service = ServiceProcess(tmp_path)
    service.start()
    try:
        channel = grpc.insecure_channel(service.endpoint)
        stub = images_pb2_grpc.ImagesStub(channel)
        reference = f"{local_registry}/{repository}:1"
        messages = list(stub.Pull(images_pb2.PullRequest(reference=reference), timeout=60))
        assert messages[-1].image.reference == reference
        assert any(m.HasField("transfer") for m in messages[:-1])
        listed = stub.List(images_pb2.ListImagesRequest(), timeout=10).images
        assert [image.reference for image in listed] == [reference]
        with pytest.raises(grpc.RpcError) as raised:
            list(stub.Pull(images_pb2.PullRequest(reference="Bad Reference"), timeout=60))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "reference" in (raised.value.details() or "")
        channel.close()
    finally:
        service.stop()
        service.remove_cgroup_roots()
