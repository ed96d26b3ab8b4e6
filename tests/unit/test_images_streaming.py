"""How the store reads what it imports: plain tarballs in place with their blobs copied side by
side, compressed tarballs as one stream, blobs the store holds already reused, uncompressed layers
applied in place, gzip layers inflated by a thread of their own (several gzip members, a layer cut
short, a reader that stops early), and unpack progress for both kinds of layer."""

from __future__ import annotations

import gzip
import io
import json
import threading
from pathlib import Path

import pytest

from adapter.core.errors import InvalidArgument
from adapter.images import ImageStore
from adapter.images.inflate import InflatingReader
from tests.image_fixtures import ImageFiles, image_files  # noqa: F401
from tests.images import (
    Entry,
    busybox_oci_layout,
    digest,
    tar_bytes,
    write_docker_archive,
)

MIB = 1 << 20


def layer_of(name: str, data: bytes) -> bytes:
    return tar_bytes([Entry("data", "dir", mode=0o755), Entry(f"data/{name}", data=data)])


def oci_layout_of_compressed(path: Path, layer: bytes, compressed: bytes, reference: str) -> Path:
    """An OCI layout tarball whose one gzip layer blob is `compressed` (made by the caller),
    for uncompressed content `layer`."""
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [digest(layer)]},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": digest(config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": digest(compressed),
                    "size": len(compressed),
                }
            ],
        }
    ).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": digest(manifest),
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": reference},
            }
        ],
    }
    files = [
        ("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'),
        ("index.json", json.dumps(index).encode()),
    ]
    files += [(f"blobs/sha256/{digest(blob)[7:]}", blob) for blob in (manifest, config, compressed)]
    entries = [Entry("blobs", "dir", mode=0o755), Entry("blobs/sha256", "dir", mode=0o755)]
    path.write_bytes(tar_bytes(entries + [Entry(name, data=data) for name, data in files]))
    return path


async def test_a_gzip_compressed_tarball_imports_as_a_stream(
    tmp_path: Path,
    image_files: ImageFiles,  # noqa: F811
) -> None:
    plain = busybox_oci_layout(tmp_path)
    compressed = tmp_path / "busybox.tar.gz"
    compressed.write_bytes(gzip.compress(plain.read_bytes()))
    store = ImageStore(tmp_path / "images")
    [image] = await store.import_tarball(compressed)
    rootfs = await image_files(store, image.reference)
    assert (rootfs / "bin" / "busybox").stat().st_size > 0


async def test_layers_of_a_docker_archive_are_copied_side_by_side_and_applied_in_order(
    tmp_path: Path,
    image_files: ImageFiles,  # noqa: F811
) -> None:
    layers = [layer_of("file", b"first\n"), layer_of("file", b"second\n"), layer_of("other", b"3")]
    tarball = write_docker_archive(tmp_path / "three.tar", layers, "localhost/three:1")
    store = ImageStore(tmp_path / "images")
    [image] = await store.import_tarball(tarball)
    assert [layer.digest for layer in image.layers] == [digest(layer) for layer in layers]
    rootfs = await image_files(store, "localhost/three:1")
    assert (rootfs / "data" / "file").read_bytes() == b"second\n"
    assert (rootfs / "data" / "other").read_bytes() == b"3"
    for layer in layers:  # every blob stored is what its digest says
        assert store.blob_path(digest(layer)).read_bytes() == layer


async def test_one_corrupt_layer_among_several_refuses_the_import_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    layers = [layer_of(f"file{n}", bytes([n]) * MIB) for n in range(4)]
    tarball = write_docker_archive(tmp_path / "four.tar", layers, "localhost/four:1")
    raw = bytearray(tarball.read_bytes())
    where = raw.find(bytes([2]) * MIB)
    raw[where + MIB // 2] ^= 0xFF  # the third layer, same size: only its digest tells
    tarball.write_bytes(bytes(raw))
    root = tmp_path / "images"
    store = ImageStore(root)
    with pytest.raises(InvalidArgument) as raised:
        await store.import_tarball(tarball)
    assert digest(layers[2]) in str(raised.value)
    assert store.list() == []
    assert not list((root / "ingest").iterdir()) and not list((root / "blobs" / "sha256").iterdir())


async def test_a_blob_the_store_holds_is_not_read_again_from_the_tarball(tmp_path: Path) -> None:
    tarball = busybox_oci_layout(tmp_path)
    store = ImageStore(tmp_path / "images")
    [image] = await store.import_tarball(tarball)
    [layer] = image.layers
    stored = store.blob_path(layer.digest)
    inode = stored.stat().st_ino
    # The same tarball with bytes of that blob flipped: the store's verified copy serves, so
    # the import succeeds, and the stored blob is the same file, still of its digest.
    raw, content = tarball.read_bytes(), stored.read_bytes()
    start = raw.index(content) + 100
    tarball.write_bytes(
        raw[:start] + bytes(b ^ 0xFF for b in raw[start : start + 100]) + raw[start + 100 :]
    )
    [again] = await store.import_tarball(tarball)
    assert again == image
    assert stored.stat().st_ino == inode and digest(stored.read_bytes()) == layer.digest


async def test_uncompressed_layers_report_unpack_progress_up_to_the_blob_size(
    tmp_path: Path,
) -> None:
    layers = [layer_of("big", bytes(3 * MIB)), layer_of("small", b"x")]
    tarball = write_docker_archive(tmp_path / "two.tar", layers, "localhost/two:1")
    reports: list[tuple[int, int]] = []

    def progress(what: str, done: int, total: int, phase: str = "read") -> None:
        if phase == "unpack":
            reports.append((done, total))

    await ImageStore(tmp_path / "images").import_tarball(tarball, progress)
    total = sum(len(layer) for layer in layers)
    assert reports[0] == (0, total) and reports[-1] == (total, total)
    assert len(reports) > 2  # the big file's layer reports on its way, not only at its end
    assert [done for done, _ in reports] == sorted(done for done, _ in reports)


async def test_a_gzip_layer_of_several_members_unpacks(
    tmp_path: Path,
    image_files: ImageFiles,  # noqa: F811
) -> None:
    layer = layer_of("file", b"hello\n" * 10000)
    half = len(layer) // 2
    compressed = gzip.compress(layer[:half]) + gzip.compress(layer[half:])
    tarball = oci_layout_of_compressed(tmp_path / "members.tar", layer, compressed, "localhost/m:1")
    store = ImageStore(tmp_path / "images")
    await store.import_tarball(tarball)
    rootfs = await image_files(store, "localhost/m:1")
    assert (rootfs / "data" / "file").read_bytes() == b"hello\n" * 10000


async def test_a_gzip_layer_cut_short_is_refused(tmp_path: Path) -> None:
    layer = layer_of("file", bytes(range(256)) * 4096)
    compressed = gzip.compress(layer)[:-100]
    tarball = oci_layout_of_compressed(tmp_path / "short.tar", layer, compressed, "localhost/s:1")
    root = tmp_path / "images"
    with pytest.raises(InvalidArgument) as raised:
        await ImageStore(root).import_tarball(tarball)
    assert f"layer {digest(compressed)}: not a readable tar" in str(raised.value)
    assert not list((root / "layers").iterdir()) and not list((root / "ingest").iterdir())


def test_a_reader_that_stops_early_ends_the_inflating_thread() -> None:
    data = bytes(64 * MIB)  # 64 chunks: far more than the thread may inflate ahead
    reader = InflatingReader(io.BytesIO(gzip.compress(data, 1)), None)  # type: ignore[arg-type]
    first = reader.read(MIB)  # one inflated chunk, at most
    assert first and first == bytes(len(first))
    reader.close()
    assert not reader.thread.is_alive()
    assert reader.thread not in threading.enumerate()


def test_the_inflating_reader_hashes_what_it_inflates() -> None:
    data = bytes(range(256)) * 40000
    reader = InflatingReader(io.BytesIO(gzip.compress(data)), None)  # type: ignore[arg-type]
    read = b""
    while chunk := reader.read(300_000):
        read += chunk
    assert read == data
    assert reader.drain() == digest(data)
    reader.close()
