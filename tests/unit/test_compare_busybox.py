"""The node's own busybox image (adapter/images/busybox.py), which `compare` and
`images import --busybox` make when a fresh node has no image: its content, its determinism, and
that the test images are built by the same code."""

from __future__ import annotations

import hashlib
import io
import json
import stat
import tarfile
from pathlib import Path

import pytest

from adapter.clients.compare.workloads import DEFAULT_IMAGE
from adapter.core.errors import FailedPrecondition
from adapter.images import busybox
from tests.images import APPLETS, busybox_entries, tar_bytes

# What the compare workloads run (workloads.py): the image must have each of them.
COMPARE_APPLETS = ("sh", "sleep", "true", "yes", "head", "kill")


@pytest.fixture(scope="module")
def layer() -> bytes:
    if not busybox.BUSYBOX_BINARY.is_file():
        pytest.skip("/bin/busybox missing: apt-get install busybox-static")
    return busybox.busybox_layer()


def members(tar: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        return {member.name: member for member in archive.getmembers()}


def test_the_layer_has_busybox_its_applets_users_and_tmp(layer: bytes) -> None:
    found = members(layer)
    program = found["bin/busybox"]
    assert program.isfile() and stat.S_IMODE(program.mode) == 0o755
    assert program.size == busybox.BUSYBOX_BINARY.stat().st_size
    for applet in COMPARE_APPLETS:
        assert found[f"bin/{applet}"].issym() and found[f"bin/{applet}"].linkname == "busybox"
    # every applet the binary has, not a hand-picked few
    assert len([m for m in found.values() if m.issym()]) == len(busybox.applets_of())
    assert found["tmp"].isdir() and stat.S_IMODE(found["tmp"].mode) == 0o1777
    assert {m.uid for m in found.values()} == {0}
    with tarfile.open(fileobj=io.BytesIO(layer)) as archive:
        passwd = archive.extractfile("etc/passwd")
        assert passwd is not None
        users = [line.split(":")[0] for line in passwd.read().decode().splitlines()]
    assert users == ["root", "nobody"]


def test_the_same_binary_gives_the_same_bytes(layer: bytes) -> None:
    assert busybox.busybox_layer() == layer
    first = busybox.oci_layout_tar([layer], busybox.REFERENCE)
    assert busybox.oci_layout_tar([layer], busybox.REFERENCE) == first


def test_the_test_images_are_built_by_the_same_code(layer: bytes) -> None:
    assert busybox.busybox_layer(applets=APPLETS) == tar_bytes(busybox_entries())


def test_the_layout_names_the_image_and_every_blob_matches_its_digest(
    layer: bytes, tmp_path: Path
) -> None:
    tarball = busybox.write_busybox_layout(tmp_path)
    with tarfile.open(tarball) as archive:
        files = {
            m.name: archive.extractfile(m).read()  # type: ignore[union-attr]
            for m in archive.getmembers()
            if m.isfile()
        }
    index = json.loads(files["index.json"])
    (entry,) = index["manifests"]
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == DEFAULT_IMAGE
    for name, data in files.items():
        if name.startswith("blobs/sha256/"):
            assert hashlib.sha256(data).hexdigest() == name.removeprefix("blobs/sha256/")
    manifest = json.loads(files["blobs/sha256/" + entry["digest"].removeprefix("sha256:")])
    config = json.loads(files["blobs/sha256/" + manifest["config"]["digest"][7:]])
    assert config["config"]["Cmd"] == ["sh"]
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(layer).hexdigest()]
    assert len(manifest["layers"]) == 1


def test_a_missing_busybox_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition, match="busybox-static"):
        busybox.write_busybox_layout(tmp_path, binary=tmp_path / "busybox")
    assert list(tmp_path.iterdir()) == []
