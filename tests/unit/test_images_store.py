"""The image store without a service: import of both tarball formats with verification, list,
remove with garbage collection, lookups, and cleanup of what a crash leaves."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from adapter.errors import InvalidArgument, NotFound
from adapter.images import ImageStore
from adapter.images.layout import digest_hex
from tests.image_fixtures import busybox_docker_tar, busybox_oci_tar  # noqa: F401
from tests.images import (
    BUSYBOX,
    REFERENCE,
    Entry,
    busybox_docker_archive,
    busybox_oci_layout,
    digest,
    tar_bytes,
    write_docker_archive,
    write_oci_layout,
)


def tampered_copy(source: Path, dest: Path, member_name: str) -> Path:
    """`source` with one byte of `member_name` flipped (same size, so only the digest tells)."""
    with tarfile.open(source) as original, tarfile.open(dest, "w") as copy:
        for member in original.getmembers():
            data = original.extractfile(member).read() if member.isfile() else None  # type: ignore[union-attr]
            if member.name == member_name and data is not None:
                middle = len(data) // 2
                data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]
            copy.addfile(member, io.BytesIO(data) if data is not None else None)
    return dest


def largest_member(tarball: Path) -> str:
    with tarfile.open(tarball) as archive:
        return max(archive.getmembers(), key=lambda member: member.size).name


async def test_oci_layout_imports_and_unpacks(tmp_path: Path, busybox_oci_tar: Path) -> None:  # noqa: F811
    store = ImageStore(tmp_path / "images")
    reports: list[tuple[str, int, int]] = []
    [image] = await store.import_tarball(busybox_oci_tar, lambda *report: reports.append(report))
    assert image.reference == REFERENCE
    assert image.cmd == ("sh",) and ("PATH", "/usr/sbin:/usr/bin:/sbin:/bin") in image.env
    assert store.get("localhost/busybox") == image
    size = busybox_oci_tar.stat().st_size
    assert reports[-1] == (busybox_oci_tar.name, size, size)
    for blob in (image.manifest, image.config, *image.layers):
        stored = store.blob_path(blob.digest).read_bytes()
        assert digest(stored) == blob.digest and len(stored) == blob.size
    rootfs = await store.rootfs(REFERENCE)
    assert (rootfs / "bin" / "busybox").read_bytes() == BUSYBOX.read_bytes()
    assert os.readlink(rootfs / "bin" / "sh") == "busybox"
    assert (rootfs / "tmp").stat().st_mode & 0o7777 == 0o1777
    assert await store.rootfs(REFERENCE) == rootfs  # unpacked once, then shared
    assert rootfs.parent == tmp_path / "images" / "rootfs"
    assert rootfs.name == digest_hex(image.manifest.digest)


async def test_docker_archive_imports_and_unpacks(tmp_path: Path, busybox_docker_tar: Path) -> None:  # noqa: F811
    store = ImageStore(tmp_path / "images")
    [image] = await store.import_tarball(busybox_docker_tar)
    assert image.reference == REFERENCE
    assert image.layers[0].digest == image.diff_ids[0]  # an uncompressed layer
    rootfs = await store.rootfs(REFERENCE)
    assert (rootfs / "bin" / "busybox").read_bytes() == BUSYBOX.read_bytes()
    assert (rootfs / "etc" / "passwd").read_text().startswith("root:x:0:0:")


def test_the_busybox_tarballs_are_reproducible(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    for build in (busybox_oci_layout, busybox_docker_archive):
        assert build(first).read_bytes() == build(second).read_bytes()


async def test_a_corrupted_oci_blob_is_refused_naming_its_digest(
    tmp_path: Path,
    busybox_oci_tar: Path,  # noqa: F811
) -> None:
    layer = largest_member(busybox_oci_tar)
    broken = tampered_copy(busybox_oci_tar, tmp_path / "broken.tar", layer)
    store = ImageStore(tmp_path / "images")
    with pytest.raises(InvalidArgument) as raised:
        await store.import_tarball(broken)
    assert f"sha256:{layer.rsplit('/', 1)[1]}" in str(raised.value)
    assert "does not match its digest" in str(raised.value)
    assert store.list() == []
    assert not list((tmp_path / "images" / "blobs" / "sha256").iterdir())
    assert not list((tmp_path / "images" / "ingest").iterdir())


async def test_a_corrupted_docker_layer_is_refused_naming_its_digest(
    tmp_path: Path,
    busybox_docker_tar: Path,  # noqa: F811
) -> None:
    layer_name = largest_member(busybox_docker_tar)
    with tarfile.open(busybox_docker_tar) as archive:
        real = archive.extractfile(layer_name).read()  # type: ignore[union-attr]
    broken = tampered_copy(busybox_docker_tar, tmp_path / "broken.tar", layer_name)
    store = ImageStore(tmp_path / "images")
    with pytest.raises(InvalidArgument) as raised:
        await store.import_tarball(broken)
    assert "sha256:" + hashlib.sha256(real).hexdigest() in str(raised.value)
    assert store.list() == []


async def test_list_and_remove_keep_shared_blobs(tmp_path: Path, busybox_oci_tar: Path) -> None:  # noqa: F811
    store = ImageStore(tmp_path / "images")
    extra_layer = tar_bytes([Entry("hello", data=b"hi\n")])
    busybox_layer = tar_bytes(
        [Entry("bin", "dir", mode=0o755), Entry("bin/busybox", data=b"x", mode=0o755)]
    )
    other = write_oci_layout(
        tmp_path / "other.tar", [busybox_layer, extra_layer], "localhost/other:1"
    )
    await store.import_tarball(busybox_oci_tar)
    [second] = await store.import_tarball(other)
    assert sorted(image.reference for image in store.list()) == [REFERENCE, "localhost/other:1"]
    busybox_blobs = {b.digest for i in store.list() if i.reference == REFERENCE
                     for b in (i.manifest, i.config, *i.layers)}  # fmt: skip
    rootfs = await store.rootfs("localhost/other:1")
    store.remove("localhost/other:1")
    assert [image.reference for image in store.list()] == [REFERENCE]
    remaining = {f"sha256:{p.name}" for p in (tmp_path / "images/blobs/sha256").iterdir()}
    assert remaining == busybox_blobs
    assert not rootfs.exists()
    assert second.manifest.digest not in remaining
    store.remove(REFERENCE)
    assert store.list() == []
    assert not list((tmp_path / "images/blobs/sha256").iterdir())


async def test_importing_a_reference_again_replaces_it(
    tmp_path: Path,
    busybox_oci_tar: Path,  # noqa: F811
    busybox_docker_tar: Path,  # noqa: F811
) -> None:
    store = ImageStore(tmp_path / "images")
    await store.import_tarball(busybox_oci_tar)
    [latest] = await store.import_tarball(busybox_docker_tar)
    assert store.list() == [latest]


def test_missing_and_malformed_references(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    with pytest.raises(NotFound, match=r"'localhost/absent:1'"):
        store.get("localhost/absent:1")
    with pytest.raises(NotFound, match="localhost/absent:1"):
        store.remove("localhost/absent:1")
    with pytest.raises(InvalidArgument) as raised:
        store.get("Not A Reference")
    assert raised.value.field == "container.image"


async def test_files_that_are_not_image_tarballs(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(InvalidArgument, match="not a readable tar"):
        await store.import_tarball(tmp_path / "junk.tar")
    empty = tmp_path / "empty.tar"
    empty.write_bytes(tar_bytes([Entry("hello", data=b"hi")]))
    with pytest.raises(InvalidArgument, match="neither an OCI image layout"):
        await store.import_tarball(empty)
    with pytest.raises(NotFound, match=r"missing\.tar"):
        await store.import_tarball(tmp_path / "missing.tar")
    with pytest.raises(InvalidArgument, match="absolute"):
        await store.import_tarball(Path("relative.tar"))


async def test_a_docker_archive_without_a_name_is_refused(tmp_path: Path) -> None:
    layer = tar_bytes([Entry("hello", data=b"hi")])
    path = write_docker_archive(tmp_path / "unnamed.tar", [layer])
    with tarfile.open(path) as archive:
        manifest = json.loads(archive.extractfile("manifest.json").read())  # type: ignore[union-attr]
    manifest[0]["RepoTags"] = []
    rebuilt = tmp_path / "rebuilt.tar"
    with tarfile.open(path) as archive, tarfile.open(rebuilt, "w") as out:
        for member in archive.getmembers():
            data = archive.extractfile(member).read() if member.isfile() else None  # type: ignore[union-attr]
            if member.name == "manifest.json":
                data = json.dumps(manifest).encode()
                member.size = len(data)
            out.addfile(member, io.BytesIO(data) if data is not None else None)
    with pytest.raises(InvalidArgument, match="no RepoTags"):
        await ImageStore(tmp_path / "images").import_tarball(rebuilt)


async def test_opening_the_store_removes_what_a_crash_left(
    tmp_path: Path,
    busybox_oci_tar: Path,  # noqa: F811
) -> None:
    root = tmp_path / "images"
    [image] = await ImageStore(root).import_tarball(busybox_oci_tar)
    staging = root / "ingest" / "deadbeef"
    staging.mkdir()
    (staging / "half-a-blob").write_bytes(b"x")
    half_unpacked = root / "rootfs" / ".tmp-something"
    (half_unpacked / "bin").mkdir(parents=True)
    orphan = root / "blobs" / "sha256" / ("0" * 64)
    orphan.write_bytes(b"no manifest references me")
    unreferenced_rootfs = root / "rootfs" / ("1" * 64)
    unreferenced_rootfs.mkdir()
    reopened = ImageStore(root)
    assert not staging.exists() and not half_unpacked.exists()
    assert not orphan.exists() and not unreferenced_rootfs.exists()
    assert reopened.get(REFERENCE) == image
