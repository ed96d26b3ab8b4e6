"""The image store: an OCI image layout under `<state_dir>/images/` (see CONTRACT.md).

Slow work (reading a tarball, downloading, unpacking) runs in a worker thread and only ever
writes to a private place: a staging directory or a temporary rootfs directory. What makes it
visible (moving blobs into blobs/, rewriting index.json, renaming the rootfs into place, garbage
collection) runs on the event loop thread without awaiting in between, so those steps never
interleave with one another and need no lock. Progress callbacks are called on the event loop
thread too, so a caller may touch its asyncio objects from them.
"""

from __future__ import annotations

import asyncio
import builtins
import functools
import uuid
from pathlib import Path
from typing import Any

from adapter.errors import InvalidArgument, NotFound
from adapter.images.image import (
    MAX_JSON_BLOB,
    REF_NAME_ANNOTATION,
    Descriptor,
    Image,
    Progress,
    image_from,
    load_json,
    manifest_parts,
)
from adapter.images.importer import read_tarball
from adapter.images.layout import TEMPORARY_PREFIX, Layout, Staging, digest_hex, remove_tree
from adapter.images.reference import canonical, parse_reference
from adapter.images.registry import pull_image
from adapter.images.unpack import apply_layer

_STORES: dict[Path, ImageStore] = {}


def open_store(root: Path) -> ImageStore:
    """The one store of this process for `root`: the server and every driver share it, so
    their unpacks and removals see each other."""
    key = root.resolve()
    if key not in _STORES:
        _STORES[key] = ImageStore(key)
    return _STORES[key]


class ImageStore:
    def __init__(self, root: Path) -> None:
        self.layout = Layout(root)
        self._unpacking: dict[str, asyncio.Lock] = {}
        # Whatever a crash left: staging directories, half-unpacked rootfs, orphan blobs.
        self._collect_garbage(including_in_flight=True)

    # ---- reading ----

    def get(self, reference: str, field: str = "container.image") -> Image:
        """The image named `reference`; NotFound naming it, InvalidArgument when malformed."""
        name = canonical(reference, field)
        for entry in self.layout.read_index():
            if _entry_name(entry) == name:
                return self._image(name, entry)
        raise NotFound(
            f"image {reference!r} ({name}) is not in the image store; import or pull it first"
        )

    def list(self) -> builtins.list[Image]:
        return [self._image(_entry_name(entry), entry) for entry in self.layout.read_index()]

    def blob_path(self, digest: str) -> Path:
        return self.layout.blob_path(digest)

    # ---- adding ----

    async def import_tarball(
        self, path: Path, progress: Progress | None = None
    ) -> builtins.list[Image]:
        """Import every image of an OCI-layout or docker-archive tarball on this node."""
        if not path.is_absolute():
            raise InvalidArgument("path", f"{str(path)!r} must be an absolute path")
        if not path.is_file():
            raise NotFound(f"path: {path} is not a file on the service's node")
        staging = self.layout.new_staging()
        try:
            images = await asyncio.to_thread(read_tarball, path, staging, _on_loop(progress))
            if not images:
                raise InvalidArgument("path", f"{path}: the tarball holds no image")
            self._commit(staging, images)
        finally:
            await asyncio.to_thread(staging.discard)
        return images

    async def pull(self, reference: str, progress: Progress | None = None) -> Image:
        """Pull `reference` (host:port/name:tag or @sha256:...) from its registry."""
        parsed = parse_reference(reference, "reference")
        staging = self.layout.new_staging()
        try:
            image = await asyncio.to_thread(pull_image, parsed, staging, _on_loop(progress))
            self._commit(staging, [image])
        finally:
            await asyncio.to_thread(staging.discard)
        return image

    # ---- removing ----

    def remove(self, reference: str, field: str = "container.image") -> None:
        """Forget `reference`; its blobs and rootfs go when no other reference uses them."""
        name = self.get(reference, field).reference
        entries = [e for e in self.layout.read_index() if _entry_name(e) != name]
        self.layout.write_index(entries)
        self._collect_garbage(including_in_flight=False)

    # ---- root filesystems ----

    async def rootfs(self, reference: str, field: str = "container.image") -> Path:
        """The unpacked root filesystem of `reference`, unpacked once and then shared.

        Nobody writes to it after it is renamed into place: runtimes use it read-only (a read-only
        bind mount or an overlay lower directory), so one unpack serves every container."""
        image = self.get(reference, field)
        target = self.layout.rootfs_path(image.manifest.digest)
        lock = self._unpacking.setdefault(image.manifest.digest, asyncio.Lock())
        async with lock:
            if target.is_dir():
                return target
            temporary = self.layout.rootfs / f"{TEMPORARY_PREFIX}{target.name}-{uuid.uuid4().hex}"
            try:
                await asyncio.to_thread(self._unpack, image, temporary)
            except InvalidArgument as exc:
                await asyncio.to_thread(remove_tree, temporary)
                detail = str(exc).removeprefix(f"{exc.field}: ")
                raise InvalidArgument(field, f"{reference} cannot be unpacked: {detail}") from exc
            except BaseException:
                await asyncio.to_thread(remove_tree, temporary)
                raise
            temporary.rename(target)
        if all(e["digest"] != image.manifest.digest for e in self.layout.read_index()):
            remove_tree(target)  # removed while we unpacked: it has no owner left
            raise NotFound(f"image {reference!r} was removed while it was being unpacked")
        return target

    def _unpack(self, image: Image, rootfs: Path) -> None:
        rootfs.mkdir(mode=0o755)
        for layer, diff_id in zip(image.layers, image.diff_ids, strict=True):
            apply_layer(self.layout.blob_path(layer.digest), layer, diff_id, rootfs)

    # ---- internals ----

    def _image(self, name: str, entry: dict[str, Any]) -> Image:
        manifest = Descriptor(entry["mediaType"], entry["digest"], entry["size"])
        manifest_json = self._json_blob(manifest.digest)
        config, _ = manifest_parts(manifest_json, manifest.digest)
        return image_from(name, manifest, manifest_json, self._json_blob(config.digest))

    def _json_blob(self, digest: str) -> dict[str, Any]:
        with open(self.layout.blob_path(digest), "rb") as blob:
            return load_json(blob.read(MAX_JSON_BLOB + 1), f"blob {digest}")

    def _commit(self, staging: Staging, images: builtins.list[Image]) -> None:
        """Make images visible: blobs first, then index.json (a crash in between leaves only
        orphan blobs, which garbage collection removes)."""
        staging.commit()
        added = {image.reference: image for image in images}
        entries = [e for e in self.layout.read_index() if _entry_name(e) not in added]
        for image in added.values():
            entry = image.manifest.to_json()
            entry["annotations"] = {REF_NAME_ANNOTATION: image.reference}
            entries.append(entry)
        self.layout.write_index(entries)
        self._collect_garbage(including_in_flight=False)

    def _collect_garbage(self, *, including_in_flight: bool) -> None:
        blobs: set[str] = set()
        manifests: set[str] = set()
        for entry in self.layout.read_index():
            image = self._image(_entry_name(entry), entry)
            manifests.add(digest_hex(image.manifest.digest))
            blobs.update(
                digest_hex(blob.digest) for blob in (image.manifest, image.config, *image.layers)
            )
        self.layout.collect_garbage(blobs, manifests, including_in_flight=including_in_flight)


def _entry_name(entry: dict[str, Any]) -> str:
    name: str = (entry.get("annotations") or {}).get(REF_NAME_ANNOTATION, "")
    return name


def _on_loop(progress: Progress | None) -> Progress | None:
    """`progress`, but called on the event loop thread whichever thread reports."""
    if progress is None:
        return None
    loop = asyncio.get_running_loop()

    def report(what: str, done: int, total: int) -> None:
        loop.call_soon_threadsafe(functools.partial(progress, what, done, total))

    return report
