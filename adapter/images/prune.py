"""Freeing the image store: `prune` removes every image no container uses; size-based garbage
collection (`[images] gc_high_bytes / gc_low_bytes`) removes unused images, least recently used
first, once the store is bigger than gc_high_bytes, until it is under gc_low_bytes.

"Used" is the store's leases (leases.py): the manifests of every container that is not
TERMINATED, a launching one included. Both end in `store.remove_all`, which refuses to remove
what such a container runs on and then deletes the blobs and unpacked layers no image names
any more: which images to remove is decided again right before, without awaiting in between,
so a container that started meanwhile keeps its image.

"Recently used" is the last time an image was pulled, imported or unpacked for a launch
(`store.layers`), kept in `last-used.json` (LastUse). Sizes are bytes allocated on disk, each
inode counted once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from adapter.images.image import Descriptor, Image
from adapter.images.layout import chain_ids

if TYPE_CHECKING:
    from adapter.images.store import ImageStore

log = logging.getLogger(__name__)
BLOCK_BYTES = 512  # the unit of st_blocks


@dataclass(frozen=True)
class Pruned:
    references: tuple[str, ...]  # the references removed
    freed_bytes: int  # store bytes before minus after


class LastUse:
    """Manifest digest -> when it was last pulled, imported or unpacked for a launch. A lost or
    unreadable file only makes every image look old: ordering, never safety, depends on it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.times: dict[str, float] = {}
        try:
            loaded = json.loads(path.read_bytes())
            self.times = {str(k): float(v) for k, v in loaded.items()}
        except (OSError, ValueError, TypeError, AttributeError):
            pass  # none yet, or unreadable: everything is equally old

    def touch(self, digests: Iterable[str], keep: Callable[[], Iterable[str]]) -> None:
        """Mark `digests` used now; forget the ones not in `keep()` (the index's manifests),
        asked only when the file is rewritten (a launch of the last-used image rewrites none)."""
        digests = list(digests)
        if len(digests) == 1 and self._newest(digests[0]):
            return  # only the order counts, and it would not change: no file to rewrite
        now = time.time()
        kept = set(keep())
        times = {d: t for d, t in self.times.items() if d in kept}
        times.update((digest, now) for digest in digests)
        self.times = times
        temporary = self.path.with_name(self.path.name + ".tmp")
        try:
            temporary.write_text(json.dumps(times, indent=1, sort_keys=True))
            os.replace(temporary, self.path)  # no fsync: a crash only loses recency
        except OSError as exc:
            log.warning("cannot record image use in %s: %s", self.path, exc)

    def _newest(self, digest: str) -> bool:
        """Whether `digest` is already the one used last, and alone in that place."""
        when = self.times.get(digest)
        others = (used for other, used in self.times.items() if other != digest)
        return when is not None and all(used < when for used in others)

    def of(self, digest: str) -> float:
        return self.times.get(digest, 0.0)


def disk_bytes(paths: Iterable[Path], seen: set[tuple[int, int]] | None = None) -> int:
    """Bytes allocated to the files and directories under `paths`, without following symlinks;
    an inode in `seen` (filled as it goes) is not counted again."""
    seen = set() if seen is None else seen
    total = 0
    pending = [str(path) for path in paths]
    while pending:
        path = pending.pop()
        try:
            status = os.lstat(path)
        except OSError:
            continue  # removed meanwhile
        if (status.st_dev, status.st_ino) in seen:
            continue
        seen.add((status.st_dev, status.st_ino))
        total += status.st_blocks * BLOCK_BYTES
        if os.path.isdir(path) and not os.path.islink(path):
            try:
                pending.extend(os.path.join(path, name) for name in os.listdir(path))
            except OSError:
                continue
    return total


async def prune(store: ImageStore) -> Pruned:
    """Remove every image no container uses, then every blob and unpacked layer no image
    names (what a crash or an older store left is collected by remove_all too)."""
    before = await asyncio.to_thread(disk_bytes, [store.layout.root])
    used = store.used_manifests()
    unused = [image.reference for image in store.list() if image.manifest.digest not in used]
    store.remove_all(unused, field="reference")
    after = await asyncio.to_thread(disk_bytes, [store.layout.root])
    return Pruned(tuple(sorted(unused)), max(before - after, 0))


async def collect_by_size(store: ImageStore, keep: Iterable[str] = ()) -> Pruned:
    """When the store is above gc_high_bytes, remove unused images, least recently used
    first, until it is at most gc_low_bytes (or nothing more may go). `keep`: manifest
    digests never removed here (what the pull or import that called us just brought)."""
    high, low = store.options.gc_high_bytes, store.options.gc_low_bytes
    if not high:
        return Pruned((), 0)
    root = store.layout.root
    total = await asyncio.to_thread(disk_bytes, [root])
    if total <= high:
        return Pruned((), 0)
    kept = set(keep)
    candidates = [i for i in store.list() if i.manifest.digest not in kept]
    sizes = await asyncio.to_thread(_image_sizes, store, candidates)
    # From here to the removal nothing awaits: the images in use are the ones of this moment.
    used = store.used_manifests() | kept
    images = store.list()
    chosen = _least_recently_used(store, images, used, sizes, total - low)
    if not chosen:
        return Pruned((), 0)  # everything left is in use or just arrived
    store.remove_all(chosen, field="reference")
    after = await asyncio.to_thread(disk_bytes, [root])
    log.info(
        "image store was %d bytes (gc_high_bytes %d): removed %d unused image(s), now %d",
        total,
        high,
        len(chosen),
        after,
    )
    return Pruned(tuple(sorted(chosen)), max(total - after, 0))


def _image_sizes(store: ImageStore, images: list[Image]) -> dict[str, int]:
    """Bytes of each blob and unpacked layer these images have, by _parts key."""
    sizes = {}
    for image in images:
        for key, path in _parts(store, image).items():
            if key not in sizes:
                sizes[key] = disk_bytes([path])
    return sizes


def _least_recently_used(
    store: ImageStore, images: list[Image], used: set[str], sizes: dict[str, int], excess: int
) -> list[str]:
    """References of unused manifests, least recently used first, until removing them frees
    `excess` bytes: a manifest frees the blobs and unpacked layers no remaining image has."""
    by_manifest: dict[str, list[Image]] = {}
    for image in images:
        by_manifest.setdefault(image.manifest.digest, []).append(image)
    unused = sorted((d for d in by_manifest if d not in used), key=store.last_use.of)
    remaining = dict(by_manifest)
    chosen: list[str] = []
    freed = 0
    for digest in unused:
        if freed >= excess:
            break
        removed = remaining.pop(digest)
        still_named = {key for i in _flatten(remaining.values()) for key in _parts(store, i)}
        own = {key for i in removed for key in _parts(store, i)} - still_named
        freed += sum(sizes.get(key, 0) for key in own)
        chosen.extend(image.reference for image in removed)
    return chosen


def _flatten(groups: Iterable[list[Image]]) -> Iterable[Image]:
    return (image for group in groups for image in group)


def _parts(store: ImageStore, image: Image) -> dict[str, Path]:
    """What of the store `image` holds on to, by a key that images sharing it share: its
    blobs (by digest) and its unpacked layers (by chain id, "layer:" before it)."""
    parts = {blob.digest: store.blob_path(blob.digest) for blob in _blobs(image)}
    for chain in chain_ids(image.diff_ids):
        parts[f"layer:{chain}"] = store.layout.layer_path(chain)
    return parts


def _blobs(image: Image) -> tuple[Descriptor, ...]:
    return (image.manifest, image.config, *image.layers)
