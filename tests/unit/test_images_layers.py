"""Layers unpacked once each and shared: images with a common base share its directory, a
layer's deletions are stored the overlayfs way so the layers stack as overlay lower directories
as they are, and removal takes only the layers no image stacks any more."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from adapter.images import ImageStore
from tests.image_fixtures import ImageFiles, image_files  # noqa: F401
from tests.images import Entry, tar_bytes, write_oci_layout

BASE = tar_bytes(
    [
        Entry("etc", "dir", mode=0o755),
        Entry("etc/gone", data=b"deleted above\n"),
        Entry("etc/kept", data=b"kept\n"),
        Entry("cache", "dir", mode=0o755),
        Entry("cache/old", data=b"hidden by an opaque directory above\n"),
    ]
)
TOP = tar_bytes(
    [
        Entry("etc/.wh.gone"),
        Entry("cache", "dir", mode=0o755),
        Entry("cache/.wh..wh..opq"),
        Entry("cache/new", data=b"new\n"),
    ]
)


async def import_images(store: ImageStore, tmp_path: Path) -> tuple[str, str]:
    base = write_oci_layout(tmp_path / "base.tar", [BASE], "localhost/base:1")
    app = write_oci_layout(tmp_path / "app.tar", [BASE, TOP], "localhost/app:1")
    await store.import_tarball(base)
    await store.import_tarball(app)
    return "localhost/base:1", "localhost/app:1"


async def test_a_shared_base_layer_is_unpacked_once(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    base = write_oci_layout(tmp_path / "base.tar", [BASE], "localhost/base:1")
    await store.import_tarball(base)
    [base_layer] = await store.layers("localhost/base:1")
    before = os.stat(base_layer / "etc" / "kept")
    app = write_oci_layout(tmp_path / "app.tar", [BASE, TOP], "localhost/app:1")
    await store.import_tarball(app)
    top, shared = await store.layers("localhost/app:1")  # topmost first
    assert shared == base_layer and top != base_layer
    after = os.stat(base_layer / "etc" / "kept")
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not redone
    assert sorted(p.name for p in store.layout.layers.iterdir()) == sorted([top.name, shared.name])


async def test_deletions_are_stored_as_overlay_whiteouts(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    _, app = await import_images(store, tmp_path)
    top, _ = await store.layers(app)
    whiteout = os.lstat(top / "etc" / "gone")
    assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == os.makedev(0, 0)
    assert not (top / "etc" / "kept").exists()  # only what the layer changed is in it
    for name in ("trusted.overlay.opaque", "user.overlay.opaque"):
        assert os.getxattr(top / "cache", name) == b"y"
    assert sorted(p.name for p in (top / "cache").iterdir()) == ["new"]
    assert not list(top.rglob(".wh.*"))


async def test_each_image_sees_its_own_files(
    tmp_path: Path,
    image_files: ImageFiles,  # noqa: F811
) -> None:
    store = ImageStore(tmp_path / "images")
    base, app = await import_images(store, tmp_path)
    base_files, app_files = await image_files(store, base), await image_files(store, app)
    assert sorted(p.name for p in (base_files / "etc").iterdir()) == ["gone", "kept"]
    assert sorted(p.name for p in (base_files / "cache").iterdir()) == ["old"]
    assert sorted(p.name for p in (app_files / "etc").iterdir()) == ["kept"]
    assert sorted(p.name for p in (app_files / "cache").iterdir()) == ["new"]  # opaque: no old
    assert (app_files / "etc" / "kept").read_bytes() == b"kept\n"


async def test_a_layer_goes_with_the_last_image_that_stacks_it(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    base, app = await import_images(store, tmp_path)
    top, shared = await store.layers(app)
    store.remove(app)
    assert not top.exists() and shared.is_dir()
    assert await store.layers(base) == [shared]
    store.remove(base)
    assert not shared.exists() and not list(store.layout.layers.iterdir())
    assert not list(store.layout.stacks.iterdir())


async def test_a_layer_over_other_layers_is_another_directory(tmp_path: Path) -> None:
    """The same layer blob over another base writes other files (here: through the base's
    symlink), so it is unpacked again for that base, keyed by its chain id."""
    linked = tar_bytes([Entry("data", "symlink", link="store"), Entry("store", "dir", mode=0o755)])
    plain = tar_bytes([Entry("data", "dir", mode=0o755)])
    top = tar_bytes([Entry("data/file", data=b"x")])
    store = ImageStore(tmp_path / "images")
    for name, base in (("linked", linked), ("plain", plain)):
        tarball = write_oci_layout(tmp_path / f"{name}.tar", [base, top], f"localhost/{name}:1")
        await store.import_tarball(tarball)
    linked_top, _ = await store.layers("localhost/linked:1")
    plain_top, _ = await store.layers("localhost/plain:1")
    assert linked_top != plain_top
    assert (linked_top / "store" / "file").is_file() and not (linked_top / "data").exists()
    assert (plain_top / "data" / "file").is_file()
