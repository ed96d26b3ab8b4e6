"""`prune` and size-based garbage collection on a real image store (no service): what no
container uses goes, least recently used first for GC, and what a container that is not
TERMINATED uses always stays."""

from __future__ import annotations

import os
from pathlib import Path

from adapter.core.config import ImagesOptions
from adapter.images import ImageStore
from adapter.images.layout import digest_hex
from adapter.images.leases import ImageUse
from adapter.images.prune import disk_bytes, prune
from tests.images import Entry, tar_bytes, write_oci_layout

LAYER_BYTES = 1 << 20  # random, so each image costs about twice this (blob + unpacked)


def image_layer(name: str) -> bytes:
    return tar_bytes([Entry(name, data=os.urandom(LAYER_BYTES))])


async def import_image(store: ImageStore, tmp_path: Path, name: str) -> str:
    reference = f"localhost/{name}:1"
    tarball = write_oci_layout(tmp_path / f"{name}.tar", [image_layer(name)], reference)
    [image] = await store.import_tarball(tarball)
    return image.reference


def in_use(uses: dict[str, str]) -> dict[str, ImageUse]:
    return {container: ImageUse(reference, False) for container, reference in uses.items()}


async def test_prune_removes_what_no_container_uses(tmp_path: Path) -> None:
    running: dict[str, str] = {}
    store = ImageStore(tmp_path / "images", containers=lambda: in_use(running))
    used = await import_image(store, tmp_path, "used")
    unused = await import_image(store, tmp_path, "unused")
    unused_image = store.get(unused)
    running["c1"] = used
    pruned = await prune(store)
    assert pruned.references == (unused,)
    assert pruned.freed_bytes >= 2 * LAYER_BYTES  # its layer blob and its unpacked layer
    assert [image.reference for image in store.list()] == [used]
    assert all(layer.is_dir() for layer in await store.layers(used))
    for blob in (unused_image.manifest, unused_image.config, *unused_image.layers):
        assert not store.blob_path(blob.digest).exists()
    assert not store.layout.layer_path(unused_image.diff_ids[0]).exists()
    # Once its container is gone, the used one goes too.
    running.clear()
    assert (await prune(store)).references == (used,)
    assert store.list() == []


async def test_prune_keeps_the_manifest_a_running_container_got_after_a_retag(
    tmp_path: Path,
) -> None:
    running: dict[str, str] = {}
    store = ImageStore(tmp_path / "images", containers=lambda: in_use(running))
    reference = await import_image(store, tmp_path, "app")
    first = store.get(reference).diff_ids[0]
    running["c1"] = reference
    store.users(reference)  # the store leases c1 what the reference names now
    await import_image(store, tmp_path, "app")  # same reference, another manifest
    # The reference now names a manifest no container runs on: it goes. What c1 runs on stays.
    assert (await prune(store)).references == (reference,)
    assert store.layout.layer_path(first).is_dir()


async def test_size_gc_removes_least_recently_used_unused_images(tmp_path: Path) -> None:
    running: dict[str, str] = {}
    store = ImageStore(tmp_path / "images", containers=lambda: in_use(running))
    oldest = await import_image(store, tmp_path, "oldest")  # in use: never collected
    running["c1"] = oldest
    old = await import_image(store, tmp_path, "old")
    await import_image(store, tmp_path, "recent")
    await store.layers(old)  # a launch: `old` is now more recent than `recent`
    one_image = disk_bytes([store.layout.root]) // 3
    # Four images will be about 4 x one_image: over high; down to low, one must go.
    store.options = ImagesOptions(
        gc_high_bytes=int(3.5 * one_image), gc_low_bytes=int(3.2 * one_image)
    )
    newest = await import_image(store, tmp_path, "newest")
    assert sorted(image.reference for image in store.list()) == sorted([oldest, old, newest])
    assert disk_bytes([store.layout.root]) <= store.options.gc_low_bytes
    hexes = {p.name for p in store.layout.layers.iterdir()}
    assert digest_hex(store.get(oldest).diff_ids[0]) in hexes


async def test_size_gc_never_removes_what_is_in_use_even_over_the_limit(tmp_path: Path) -> None:
    running: dict[str, str] = {}
    store = ImageStore(tmp_path / "images", containers=lambda: in_use(running))
    first = await import_image(store, tmp_path, "first")
    running["c1"] = first
    store.options = ImagesOptions(gc_high_bytes=1, gc_low_bytes=1)
    second = await import_image(store, tmp_path, "second")  # what a pull brings stays
    assert sorted(image.reference for image in store.list()) == sorted([first, second])
    third = await import_image(store, tmp_path, "third")
    # `second` was unused and over the limit: gone; `first` is in use, `third` just came.
    assert sorted(image.reference for image in store.list()) == sorted([first, third])
