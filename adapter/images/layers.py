"""Unpacking one layer into a directory of its own, stored the overlayfs way, so an image's
layers stack as overlay lower directories as they are (layout.py names them by chain id).

A layer is applied to the merged view of a detached overlay (overlay.py) whose lower
directories are the layers below it, already unpacked, and whose upper directory is the new
layer's: the unpacker (unpack.py, every one of its checks unchanged) sees the image as it is at
that layer, so a name through a symlink of a layer below lands where the container will find
it, and a hard link may name a file of a layer below (the overlay copies it up). The overlay
writes what the layer changes into the upper directory in its own format: a deleted name
becomes a whiteout (a 0/0 character device the kernel makes, never one from the layer), a
directory made over one below becomes opaque (`trusted.overlay.opaque`, mirrored to
`user.overlay.*` for overlays mounted in a user namespace). A layer's opaque whiteout
(`.wh..wh..opq`) empties its directory in the merged view (a whiteout per name below, so the
rest of the layer sees it empty) and is then stored as one opaque mark instead. The base layer
has nothing below it and is applied to its directory directly.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from adapter.images.image import UNPACK, Descriptor, Progress
from adapter.images.layout import PROGRESS_STEP
from adapter.images.overlay import DetachedOverlay, mark_opaque, mirror_opaque_marks
from adapter.images.unpack import UnpackBudget, apply_layer


def unpack_layer(
    blob: Path,
    layer: Descriptor,
    diff_id: str,
    lowers: Sequence[Path],
    temporary: Path,
    budget: UnpackBudget,
    on_read: Callable[[int], None] | None,
) -> Path:
    """Unpack `layer` over `lowers` (topmost first) into a new directory, and return it (in a
    worker thread): `temporary`/upper, or `temporary` itself for a base layer, which needs no
    overlay work directory beside it (one directory less to make and remove). The caller owns
    `temporary` and removes what is left of it whatever happens, once it has renamed the
    returned directory into place."""
    if not lowers:
        temporary.mkdir(mode=0o755)
        apply_layer(blob, layer, diff_id, temporary, budget, on_read)
        return temporary
    upper, work = temporary / "upper", temporary / "work"
    temporary.mkdir(mode=0o700)
    upper.mkdir(mode=0o755)
    work.mkdir(mode=0o700)
    with DetachedOverlay(lowers, upper, work) as merged:
        opaque = apply_layer(blob, layer, diff_id, merged.descriptor, budget, on_read)
    shutil.rmtree(work)  # the overlay's, unmounted: the caller then removes `temporary` inline
    for directory in opaque:
        mark_opaque(upper, directory)
    mirror_opaque_marks(upper)
    return upper


class UnpackProgress:
    """An image's unpack reported as the bytes of its layer blobs read, across its layers
    (those already unpacked count as read); `on_read` is called from worker threads, one
    layer at a time."""

    def __init__(self, reference: str, layers: Sequence[Descriptor], progress: Progress | None):
        self.reference, self.progress = reference, progress
        self.total = sum(layer.size for layer in layers)
        self.done = self.reported = 0

    def start(self) -> None:
        if self.progress is not None:
            self.progress(self.reference, 0, self.total, UNPACK)

    def on_read(self, count: int) -> None:
        self.done += count
        if self.progress is not None and self.done - self.reported >= PROGRESS_STEP:
            self.progress(self.reference, self.done, self.total, UNPACK)
            self.reported = self.done

    def skipped(self, layer: Descriptor) -> None:
        self.done += layer.size

    def finish(self) -> None:
        if self.progress is not None:
            self.progress(self.reference, self.total, self.total, UNPACK)
