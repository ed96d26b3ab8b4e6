"""The image store: an OCI image layout under `<state_dir>/images/` (see CONTRACT.md).

Slow work (reading a tarball, downloading, unpacking) runs in a worker thread and only ever
writes to a private place: a staging directory or a temporary rootfs directory. What makes it
visible (moving blobs into blobs/, renaming a rootfs into place, rewriting index.json, garbage
collection) runs on the event loop thread without awaiting in between, so those steps never
interleave with one another and need no lock. Progress callbacks are called on the event loop
thread too, so a caller may touch its asyncio objects from them.

An import or pull also unpacks what it brings, within the node's limits (config `[images]`), so a
hostile or oversized image is refused then, with nothing of it kept, rather than at a launch.
Nothing a container that is not TERMINATED runs on is removed, by `remove` or by garbage
collection: the store asks the core through `containers` (wired by the server) and keeps a
lease per container (leases.py).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import functools
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from adapter.core.config import ImagesOptions
from adapter.core.errors import FailedPrecondition, InvalidArgument, NotFound
from adapter.images.image import (
    MAX_JSON_BLOB,
    READ,
    REF_NAME_ANNOTATION,
    UNPACK,
    Descriptor,
    Image,
    Progress,
    image_from,
    load_json,
    manifest_parts,
)
from adapter.images.importer import read_tarball
from adapter.images.layout import (
    PROGRESS_STEP,
    Layout,
    Staging,
    StoreLock,
    digest_hex,
    remove_tree,
)
from adapter.images.leases import ContainerImages, Leases
from adapter.images.reference import canonical, parse_reference
from adapter.images.registry import checked_mirrors, pull_image
from adapter.images.unpack import UnpackBudget, UnpackLimits, apply_layer

T = TypeVar("T")


class ImageStore:
    """One per service (adapter/core/services.py builds it): the server and every runtime
    share it, so their unpacks and removals see each other."""

    def __init__(
        self,
        root: Path,
        options: ImagesOptions | None = None,
        containers: ContainerImages | None = None,
        mirrors: Mapping[str, str] | None = None,
    ) -> None:
        self.layout = Layout(root)
        self.options = options or ImagesOptions()
        # Registry domain -> the host[:port] that serves its repositories (registry.py).
        self.mirrors = checked_mirrors(mirrors or {})
        # Which image each container that is not TERMINATED named (leases.py); None: nothing
        # runs here that the store must protect (a store used without a service).
        self.containers = containers
        self._leases = Leases(root / "leases.json")
        self._unpacking: dict[str, asyncio.Lock] = {}
        self._lock = StoreLock(root)
        # Whatever a crash left: staging directories, half-unpacked rootfs, orphan blobs. Only
        # when no other store is open: else they may be another store's work in flight (blobs
        # and a rootfs are in place a moment before index.json names them).
        if self._lock.alone:
            self._collect_garbage(including_in_flight=True)
        self._lock.share()

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

    def users(self, reference: str, field: str = "reference") -> builtins.list[str]:
        """The containers (not TERMINATED) that may run on the manifest `reference` names."""
        image = self.get(reference, field)
        self._refresh_leases()
        return self._leases.users(image.manifest.digest)

    # ---- adding ----

    async def import_tarball(
        self, path: Path, progress: Progress | None = None
    ) -> builtins.list[Image]:
        """Import and unpack every image of an OCI-layout or docker-archive tarball on this node."""
        if not path.is_absolute():
            raise InvalidArgument("path", f"{str(path)!r} must be an absolute path")
        if not path.is_file():
            raise NotFound(f"path: {path} is not a file on the service's node")
        report = _on_loop(progress)
        staging = self.layout.new_staging(self.options.max_import_bytes, str(path))
        unpacked: dict[str, Path] = {}
        try:
            images = await _in_thread(staging.stop, read_tarball, path, staging, report)
            if not images:
                raise InvalidArgument("path", f"{path}: the tarball holds no image")
            await self._unpack_new(images, staging, report, unpacked)
            self._commit(staging, images, unpacked)
        finally:
            await _discard(staging, list(unpacked.values()))
        return images

    async def pull(self, reference: str, progress: Progress | None = None) -> Image:
        """Pull and unpack `reference` (host:port/name:tag or @sha256:...) from its registry."""
        parsed = parse_reference(reference, "reference")
        report = _on_loop(progress)
        staging = self.layout.new_staging(self.options.max_import_bytes, str(parsed))
        unpacked: dict[str, Path] = {}
        try:
            image = await _in_thread(
                staging.stop, pull_image, parsed, staging, report, self.mirrors
            )
            await self._unpack_new([image], staging, report, unpacked)
            self._commit(staging, [image], unpacked)
        finally:
            await _discard(staging, list(unpacked.values()))
        return image

    # ---- removing ----

    def remove(self, reference: str, field: str = "container.image") -> None:
        """Forget `reference`; its blobs and rootfs go when no other reference uses them.
        Refused (FailedPrecondition, naming them) while containers run on what would go."""
        self.remove_all([reference], field)

    def remove_all(self, references: Iterable[str], field: str = "container.image") -> None:
        """Forget every one of `references` in one change of the index (the CRI removes an image
        with all its tags): all go or, while containers run on what would go, none."""
        names = {self.get(reference, field).reference for reference in references}
        self._refresh_leases()
        entries = self.layout.read_index()
        removed = [e for e in entries if _entry_name(e) in names]
        kept = [e for e in entries if _entry_name(e) not in names]
        for entry in removed:
            users = self._leases.users(entry["digest"])
            if users and all(other["digest"] != entry["digest"] for other in kept):
                raise FailedPrecondition(
                    f"image {_entry_name(entry)} is in use by {len(users)} container(s) that are "
                    f"not terminated: {', '.join(users)}; destroy them before removing it"
                )
        self.layout.write_index(kept)
        self._collect_garbage(including_in_flight=False)

    # ---- root filesystems ----

    async def rootfs(self, reference: str, field: str = "container.image") -> Path:
        """The unpacked root filesystem of `reference`, unpacked once and then shared.

        Nobody writes to it after it is renamed into place: runtimes use it read-only (a read-only
        bind mount or an overlay lower directory), so one unpack serves every container. An
        import or pull has unpacked it already; this unpacks what an older store did not."""
        image = self.get(reference, field)
        digest = image.manifest.digest
        target = self.layout.rootfs_path(digest)
        lock = self._unpacking.setdefault(digest, asyncio.Lock())
        async with lock:
            if not target.is_dir():
                temporary = await self._unpack_aside(image, self.layout.blob_path, None, field)
                self._install(temporary, target)
                await _discard(None, [temporary])  # when an import's unpack got there first
        if digest not in self._protected():
            remove_tree(target)  # removed while we unpacked, and nothing runs on it
            raise NotFound(f"image {reference!r} was removed while it was being unpacked")
        return target

    async def _unpack_new(
        self,
        images: builtins.list[Image],
        staging: Staging,
        progress: Progress | None,
        unpacked: dict[str, Path],
    ) -> None:
        """Unpack the staged images that have no rootfs yet, each into a temporary directory
        recorded in `unpacked` (manifest digest -> directory) as soon as it exists."""

        def staged_blob(digest: str) -> Path:
            path = staging.path(digest)
            if path is None:
                raise InvalidArgument("image", f"blob {digest} is missing from the tarball")
            return path

        for image in images:
            digest = image.manifest.digest
            if digest in unpacked or self.layout.rootfs_path(digest).is_dir():
                continue
            unpacked[digest] = await self._unpack_aside(
                image, staged_blob, progress, "image", staging.stop
            )

    async def _unpack_aside(
        self,
        image: Image,
        blob_of: Callable[[str], Path],
        progress: Progress | None,
        field: str,
        stop: threading.Event | None = None,
    ) -> Path:
        """Unpack `image` into a new temporary rootfs directory and return it; on any failure
        nothing of it is left. Refusals are InvalidArgument(field) naming the image."""
        temporary = self.layout.temporary_rootfs_path(image.manifest.digest)
        stop = stop or threading.Event()
        limits = UnpackLimits(self.options.max_unpacked_bytes, self.options.max_entries)
        budget = UnpackBudget(limits, stop)
        try:
            await _in_thread(stop, _unpack, image, temporary, blob_of, budget, progress)
        except InvalidArgument as exc:
            await _discard(None, [temporary])
            detail = str(exc).removeprefix(f"{exc.field}: ")
            raise InvalidArgument(field, f"{image.reference} cannot be unpacked: {detail}") from exc
        except BaseException:
            await _discard(None, [temporary])
            raise
        return temporary

    def _install(self, temporary: Path, target: Path) -> None:
        """Rename an unpacked rootfs into place, unless another unpack of the same manifest got
        there first (then `temporary` is left for the caller's cleanup)."""
        if not target.is_dir():
            temporary.rename(target)

    # ---- internals ----

    def _image(self, name: str, entry: dict[str, Any]) -> Image:
        manifest = Descriptor(entry["mediaType"], entry["digest"], entry["size"])
        manifest_json = self._json_blob(manifest.digest)
        config, _ = manifest_parts(manifest_json, manifest.digest)
        return image_from(name, manifest, manifest_json, self._json_blob(config.digest))

    def _json_blob(self, digest: str) -> dict[str, Any]:
        with open(self.layout.blob_path(digest), "rb") as blob:
            return load_json(blob.read(MAX_JSON_BLOB + 1), f"blob {digest}")

    def _commit(
        self, staging: Staging, images: builtins.list[Image], unpacked: dict[str, Path]
    ) -> None:
        """Make images visible: blobs and root filesystems first, then index.json (a crash in
        between leaves only unreferenced files, which garbage collection removes)."""
        self._refresh_leases()  # before a reference may move to another manifest
        staging.commit()
        for digest, temporary in unpacked.items():
            self._install(temporary, self.layout.rootfs_path(digest))
        added = {image.reference: image for image in images}
        entries = [e for e in self.layout.read_index() if _entry_name(e) not in added]
        for image in added.values():
            entry = image.manifest.to_json()
            entry["annotations"] = {REF_NAME_ANNOTATION: image.reference}
            entries.append(entry)
        self.layout.write_index(entries)
        self._collect_garbage(including_in_flight=False)

    def _refresh_leases(self) -> None:
        if self.containers is not None:
            self._leases.refresh(self.containers(), self._manifest_digest)

    def _manifest_digest(self, reference: str) -> str | None:
        with contextlib.suppress(InvalidArgument):
            name = canonical(reference, "image")
            for entry in self.layout.read_index():
                if _entry_name(entry) == name:
                    return str(entry["digest"])
        return None

    def _protected(self) -> set[str]:
        """Manifest digests whose rootfs must stay: named in the index or run on."""
        return {e["digest"] for e in self.layout.read_index()} | self._leases.digests()

    def _collect_garbage(self, *, including_in_flight: bool) -> None:
        self._refresh_leases()
        blobs: set[str] = set()
        for entry in self.layout.read_index():
            image = self._image(_entry_name(entry), entry)
            blobs.update(
                digest_hex(blob.digest) for blob in (image.manifest, image.config, *image.layers)
            )
        rootfs = {digest_hex(d) for d in self._protected()} if self._leases.known else None
        self.layout.collect_garbage(blobs, rootfs, including_in_flight=including_in_flight)


def _unpack(
    image: Image,
    rootfs: Path,
    blob_of: Callable[[str], Path],
    budget: UnpackBudget,
    progress: Progress | None,
) -> None:
    """Apply every layer of `image` to a new directory `rootfs` (in a worker thread), reporting
    the layer bytes read as the unpack's progress."""
    total = sum(layer.size for layer in image.layers)
    done = reported = 0

    def on_read(count: int) -> None:
        nonlocal done, reported
        done += count
        if progress is not None and done - reported >= PROGRESS_STEP:
            progress(image.reference, done, total, UNPACK)
            reported = done

    if progress is not None:
        progress(image.reference, 0, total, UNPACK)
    rootfs.mkdir(mode=0o755)
    for layer, diff_id in zip(image.layers, image.diff_ids, strict=True):
        apply_layer(blob_of(layer.digest), layer, diff_id, rootfs, budget, on_read)
    if progress is not None:
        progress(image.reference, total, total, UNPACK)


async def _in_thread(stop: threading.Event, work: Callable[..., T], *args: Any) -> T:
    """`work(*args)` in a worker thread. A thread cannot be interrupted: when the caller is
    cancelled, `stop` tells the work to end and we wait until it has, so that what it was
    writing is only cleaned up once nothing writes there any more."""
    task = asyncio.ensure_future(asyncio.to_thread(work, *args))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        stop.set()
        while not task.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({task})
        with contextlib.suppress(BaseException):
            task.result()
        raise


async def _discard(staging: Staging | None, directories: Iterable[Path]) -> None:
    """Remove a staging area and temporary rootfs directories that were not renamed into place;
    shielded, so that a second cancellation cannot leave them half removed."""

    def discard() -> None:
        if staging is not None:
            staging.discard()
        for directory in directories:
            remove_tree(directory)

    await asyncio.shield(asyncio.to_thread(discard))


def _entry_name(entry: dict[str, Any]) -> str:
    name: str = (entry.get("annotations") or {}).get(REF_NAME_ANNOTATION, "")
    return name


def _on_loop(progress: Progress | None) -> Progress | None:
    """`progress`, but called on the event loop thread whichever thread reports."""
    if progress is None:
        return None
    loop = asyncio.get_running_loop()

    def report(what: str, done: int, total: int, phase: str = READ) -> None:
        loop.call_soon_threadsafe(functools.partial(progress, what, done, total, phase))

    return report
