"""The image store without a service: import of both tarball formats with verification, list,
remove with garbage collection, lookups, cleanup of what a crash leaves, the node's limits on
what one image may cost, and that nothing a running container uses is removed."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import random
import shutil
import tarfile
from pathlib import Path

import pytest

from adapter.core.config import ImagesOptions
from adapter.core.errors import FailedPrecondition, InvalidArgument, NotFound
from adapter.images import ImageStore
from adapter.images.layout import digest_hex
from adapter.images.leases import ImageUse
from adapter.runtimes.lxc.rootfs import BaseRootfs
from tests.image_fixtures import (  # noqa: F401
    ImageFiles,
    busybox_docker_tar,
    busybox_oci_tar,
    image_files,
)
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
from tests.services import node_services


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


async def test_oci_layout_imports_and_unpacks(
    tmp_path: Path,
    busybox_oci_tar: Path,  # noqa: F811
    image_files: ImageFiles,  # noqa: F811
) -> None:
    store = ImageStore(tmp_path / "images")
    reports: list[tuple[str, int, int, str]] = []

    def progress(what: str, done: int, total: int, phase: str = "read") -> None:
        reports.append((what, done, total, phase))

    [image] = await store.import_tarball(busybox_oci_tar, progress)
    assert image.reference == REFERENCE
    assert image.cmd == ("sh",) and ("PATH", "/usr/sbin:/usr/bin:/sbin:/bin") in image.env
    assert store.get("localhost/busybox") == image
    size = busybox_oci_tar.stat().st_size
    last_read = reports.index((busybox_oci_tar.name, size, size, "read"))
    # Then the import unpacks, and says so, counting the layer bytes up to all of them.
    layers = sum(layer.size for layer in image.layers)
    unpacking = reports[last_read + 1 :]
    assert {(what, total, phase) for what, _, total, phase in unpacking} == {
        (REFERENCE, layers, "unpack")
    }
    assert [done for _, done, _, _ in unpacking] == sorted(done for _, done, _, _ in unpacking)
    assert unpacking[0][1] == 0 and unpacking[-1][1] == layers
    for blob in (image.manifest, image.config, *image.layers):
        stored = store.blob_path(blob.digest).read_bytes()
        assert digest(stored) == blob.digest and len(stored) == blob.size
    rootfs = await image_files(store, REFERENCE)
    assert (rootfs / "bin" / "busybox").read_bytes() == BUSYBOX.read_bytes()
    assert os.readlink(rootfs / "bin" / "sh") == "busybox"
    assert (rootfs / "tmp").stat().st_mode & 0o7777 == 0o1777
    [layer] = await store.layers(REFERENCE)
    assert await store.layers(REFERENCE) == [layer]  # unpacked once, then shared
    assert layer.parent == tmp_path / "images" / "layers"
    assert layer.name == digest_hex(image.diff_ids[0])  # a base layer's chain id is its diff_id


async def test_docker_archive_imports_and_unpacks(
    tmp_path: Path,
    busybox_docker_tar: Path,  # noqa: F811
    image_files: ImageFiles,  # noqa: F811
) -> None:
    store = ImageStore(tmp_path / "images")
    [image] = await store.import_tarball(busybox_docker_tar)
    assert image.reference == REFERENCE
    assert image.layers[0].digest == image.diff_ids[0]  # an uncompressed layer
    rootfs = await image_files(store, REFERENCE)
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
    base, top = await store.layers("localhost/other:1")  # top first
    store.remove("localhost/other:1")
    assert [image.reference for image in store.list()] == [REFERENCE]
    remaining = {f"sha256:{p.name}" for p in (tmp_path / "images/blobs/sha256").iterdir()}
    assert remaining == busybox_blobs
    assert not base.exists() and not top.exists()
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
    half_unpacked = root / "layers" / ".tmp-something"
    (half_unpacked / "upper" / "bin").mkdir(parents=True)
    orphan = root / "blobs" / "sha256" / ("0" * 64)
    orphan.write_bytes(b"no manifest references me")
    unreferenced_layer = root / "layers" / ("1" * 64)
    unreferenced_layer.mkdir()
    reopened = ImageStore(root)
    assert not staging.exists() and not half_unpacked.exists()
    assert not orphan.exists() and not unreferenced_layer.exists()
    assert reopened.get(REFERENCE) == image
    assert all(layer.is_dir() for layer in await reopened.layers(REFERENCE))


MIB = 1 << 20


def leftovers(root: Path) -> list[Path]:
    """What an import left in the store besides its empty layout."""
    return [
        *(root / "layers").iterdir(),
        *(root / "stacks").iterdir(),
        *(root / "ingest").iterdir(),
        *(root / "blobs" / "sha256").iterdir(),
    ]


async def test_a_compression_bomb_is_refused_while_it_unpacks(tmp_path: Path) -> None:
    """A few KiB of gzip that would unpack to 48 MiB, under a 4 MiB limit."""
    bomb = write_oci_layout(
        tmp_path / "bomb.tar",
        [tar_bytes([Entry("zeros", data=bytes(48 * MIB))])],
        "localhost/bomb:1",
    )
    assert bomb.stat().st_size < MIB
    root = tmp_path / "images"
    store = ImageStore(root, ImagesOptions(max_unpacked_bytes=4 * MIB))
    with pytest.raises(InvalidArgument) as raised:
        await store.import_tarball(bomb)
    message = str(raised.value)
    assert "localhost/bomb:1 cannot be unpacked" in message and "'zeros'" in message
    assert f"more than {4 * MIB} bytes" in message and "images.max_unpacked_bytes" in message
    assert store.list() == [] and leftovers(root) == []


async def test_unpacked_bytes_are_counted_across_files_and_layers(
    tmp_path: Path,
    image_files: ImageFiles,  # noqa: F811
) -> None:
    """No single file is over the limit: their sum, counted across the layers, is (the 9th
    MiB, the fourth file of the second layer)."""
    layers = [
        tar_bytes([Entry(f"{layer}-{n}", data=bytes(MIB)) for n in range(5)]) for layer in "ab"
    ]
    tarball = write_oci_layout(tmp_path / "many.tar", layers, "localhost/many:1")
    small = ImageStore(tmp_path / "small", ImagesOptions(max_unpacked_bytes=8 * MIB))
    with pytest.raises(InvalidArgument, match="'b-3' makes the image unpack to more than"):
        await small.import_tarball(tarball)
    assert leftovers(tmp_path / "small") == []
    roomy = ImageStore(tmp_path / "roomy", ImagesOptions(max_unpacked_bytes=10 * MIB))
    await roomy.import_tarball(tarball)
    assert len(list((await image_files(roomy, "localhost/many:1")).iterdir())) == 10


async def test_entries_per_image_are_limited(tmp_path: Path) -> None:
    layer = tar_bytes([Entry(f"f{n}") for n in range(200)])
    tarball = write_oci_layout(tmp_path / "wide.tar", [layer], "localhost/wide:1")
    root = tmp_path / "images"
    store = ImageStore(root, ImagesOptions(max_entries=100))
    with pytest.raises(InvalidArgument) as raised:
        await store.import_tarball(tarball)
    assert "localhost/wide:1 cannot be unpacked" in str(raised.value)
    assert "more than 100 entries" in str(raised.value) and "images.max_entries" in str(
        raised.value
    )
    assert leftovers(root) == []


async def test_the_bytes_an_import_writes_are_limited(tmp_path: Path) -> None:
    noise = random.Random(7).randbytes(3 * MIB)  # gzip cannot shrink it
    tarball = write_oci_layout(
        tmp_path / "big.tar", [tar_bytes([Entry("noise", data=noise)])], "localhost/big:1"
    )
    root = tmp_path / "images"
    store = ImageStore(root, ImagesOptions(max_import_bytes=2 * MIB))
    with pytest.raises(InvalidArgument) as raised:
        await store.import_tarball(tarball)
    assert f"{tarball}: its blobs are more than {2 * MIB} bytes" in str(raised.value)
    assert "images.max_import_bytes" in str(raised.value)
    assert leftovers(root) == []


async def test_a_cancelled_import_leaves_nothing(tmp_path: Path) -> None:
    tarball = write_oci_layout(
        tmp_path / "slow.tar", [tar_bytes([Entry("zeros", data=bytes(64 * MIB))])], "localhost/s:1"
    )
    root = tmp_path / "images"
    store = ImageStore(root)
    unpacking = asyncio.Event()

    def progress(what: str, done: int, total: int, phase: str = "read") -> None:
        if phase == "unpack":
            unpacking.set()

    task = asyncio.create_task(store.import_tarball(tarball, progress))
    await unpacking.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert store.list() == [] and leftovers(root) == []


async def test_an_image_in_use_is_not_removed(tmp_path: Path, busybox_oci_tar: Path) -> None:  # noqa: F811
    running = {
        "web-1": ImageUse("localhost/busybox", launching=False),
        "db-2": ImageUse(REFERENCE, launching=True),
        "other": ImageUse("localhost/else:1", launching=False),
    }
    store = ImageStore(tmp_path / "images", containers=lambda: running)
    [image] = await store.import_tarball(busybox_oci_tar)
    layers = await store.layers(REFERENCE)
    assert store.users(REFERENCE) == ["db-2", "web-1"]
    with pytest.raises(FailedPrecondition) as raised:
        store.remove(REFERENCE)
    assert "in use by 2 container(s)" in str(raised.value) and "db-2, web-1" in str(raised.value)
    assert store.get(REFERENCE) == image and (layers[0] / "bin" / "busybox").is_file()
    running.clear()
    store.remove(REFERENCE)
    assert not any(layer.exists() for layer in layers)


async def test_a_reference_moved_to_another_image_keeps_what_containers_run_on(
    tmp_path: Path,
    busybox_oci_tar: Path,  # noqa: F811
) -> None:
    """A container keeps the manifest it launched with, across a re-import of its reference
    and a restart of the store, until it is gone."""
    running = {"web-1": ImageUse(REFERENCE, launching=False)}
    root = tmp_path / "images"
    store = ImageStore(root, containers=lambda: running)
    await store.import_tarball(busybox_oci_tar)
    [old_rootfs] = await store.layers(REFERENCE)
    newer = write_oci_layout(tmp_path / "newer.tar", [tar_bytes([Entry("v2", data=b"2")])])
    [replacement] = await store.import_tarball(newer)
    assert store.list() == [replacement]
    assert (old_rootfs / "bin" / "busybox").is_file()
    del store
    reopened = ImageStore(root, containers=lambda: running)  # collects a crash's garbage
    assert (old_rootfs / "bin" / "busybox").is_file()
    assert reopened.users(REFERENCE) == []  # web-1 runs on the old manifest, not this one
    running.clear()
    reopened.remove(REFERENCE)
    assert not old_rootfs.exists() and leftovers(root) == []


def in_flight(store: ImageStore) -> list[Path]:
    """A staging directory and a temporary layer, as an import of `store` has them."""
    staging = store.layout.new_staging(MIB, "in flight").directory
    unpacking = store.layout.temporary_layer_path("sha256:" + "a" * 64)
    (unpacking / "upper" / "bin").mkdir(parents=True)
    return [staging, unpacking]


def test_opening_a_second_store_leaves_imports_in_flight_alone(tmp_path: Path) -> None:
    first = ImageStore(tmp_path / "images")
    work = in_flight(first)
    ImageStore(tmp_path / "images")
    assert all(path.exists() for path in work)
    del first  # now the only store open is the next one: what is left is a crash's
    ImageStore(tmp_path / "images")
    assert not any(path.exists() for path in work)


async def test_lxc_rootfs_uses_the_services_store(tmp_path: Path, busybox_oci_tar: Path) -> None:  # noqa: F811
    store = node_services(tmp_path / "state").images  # as serve builds it
    await store.import_tarball(busybox_oci_tar)
    work = in_flight(store)
    rootfs = BaseRootfs(tmp_path / "state", store)  # as the LXC driver builds it
    async with rootfs.lower(REFERENCE) as lower:
        assert list(lower.layers) == await store.layers(REFERENCE)
        assert (lower.view / "bin" / "busybox").is_file()
    assert all(path.exists() for path in work)  # no second store collected them


async def test_a_launching_container_keeps_every_manifest_its_reference_had(
    tmp_path: Path,
    busybox_oci_tar: Path,  # noqa: F811
) -> None:
    """While a container launches, its runtime may look its reference up at any moment: each
    manifest the reference names meanwhile is kept for it; once it runs, no new one is."""
    running = {"web-1": ImageUse(REFERENCE, launching=True)}
    store = ImageStore(tmp_path / "images", containers=lambda: running)
    versions = [busybox_oci_tar] + [
        write_oci_layout(tmp_path / f"v{n}.tar", [tar_bytes([Entry(f"v{n}", data=b"x")])])
        for n in (2, 3)
    ]
    rootfs = []
    for number, tarball in enumerate(versions):
        if number == 2:
            running["web-1"] = ImageUse(REFERENCE, launching=False)  # it runs now
        await store.import_tarball(tarball)
        rootfs.extend(await store.layers(REFERENCE))
    assert len(rootfs) == 3 and all(path.exists() for path in rootfs)
    assert store.users(REFERENCE) == []  # v3 came after web-1 was running
    running.clear()
    store.remove(REFERENCE)
    assert not any(path.exists() for path in rootfs)


def test_the_images_limits_are_validated_at_load() -> None:
    from adapter.core.config import parse_config
    from adapter.core.errors import ConfigError

    assert parse_config({}).images == ImagesOptions(8 << 30, 8 << 30, 1_000_000)
    table = {"max_import_bytes": 1, "max_unpacked_bytes": 2, "max_entries": 3}
    assert parse_config({"images": table}).images == ImagesOptions(1, 2, 3)
    for key, value, expected in [
        ("max_entries", 0, "images.max_entries: expected an integer > 0, got 0"),
        ("max_unpacked_bytes", "8G", "images.max_unpacked_bytes: expected an integer > 0"),
        ("max_import_bytes", True, "images.max_import_bytes: expected an integer > 0"),
        ("max_layers", 3, "images.max_layers: unknown key"),
    ]:
        with pytest.raises(ConfigError, match=expected):
            parse_config({"images": {key: value}})
    with pytest.raises(ConfigError, match="images: expected a table"):
        parse_config({"images": 5})


async def test_a_store_without_the_rootfs_unpacks_it_at_first_use(
    tmp_path: Path,
    busybox_oci_tar: Path,  # noqa: F811
) -> None:
    """Images imported before imports unpacked (or whose layers were lost) still run."""
    store = ImageStore(tmp_path / "images", ImagesOptions(max_entries=10))
    with pytest.raises(InvalidArgument, match=r"images\.max_entries"):
        await store.import_tarball(busybox_oci_tar)
    store.options = ImagesOptions()
    await store.import_tarball(busybox_oci_tar)
    [layer] = await store.layers(REFERENCE)
    shutil.rmtree(layer)
    store.options = ImagesOptions(max_entries=10)
    with pytest.raises(InvalidArgument) as raised:
        await store.layers(REFERENCE)
    assert raised.value.field == "container.image" and "images.max_entries" in str(raised.value)
    assert not layer.exists() and not list((tmp_path / "images" / "layers").iterdir())
    store.options = ImagesOptions()
    assert await store.layers(REFERENCE) == [layer]
    assert (layer / "bin" / "busybox").read_bytes() == BUSYBOX.read_bytes()
