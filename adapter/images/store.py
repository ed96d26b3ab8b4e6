"""The image store: an OCI image layout under `<state_dir>/images/` (see CONTRACT.md).

Slow work (reading a tarball, downloading, unpacking) runs in a worker thread and only ever
writes to a private place: a staging directory or a temporary layer directory. What makes it
visible (moving blobs into blobs/, renaming a layer into place, rewriting index.json, garbage
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
import collections
import contextlib
import errno
import functools
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from adapter.core.config import ImagesOptions, RegistryOptions
from adapter.core.errors import ContainerizerError, FailedPrecondition, InvalidArgument, NotFound
from adapter.images.auth import Credentials, TokenCache
from adapter.images.image import (
    MAX_JSON_BLOB,
    READ,
    REF_NAME_ANNOTATION,
    Descriptor,
    Image,
    Progress,
    image_from,
    load_json,
    manifest_parts,
)
from adapter.images.importer import read_tarball
from adapter.images.layers import UnpackProgress, unpack_layer
from adapter.images.layout import (
    Layout,
    Staging,
    StoreLock,
    chain_ids,
    digest_hex,
    remove_tree,
)
from adapter.images.leases import ContainerImages, Leases
from adapter.images.overlay import DetachedOverlay
from adapter.images.prune import LastUse, collect_by_size
from adapter.images.reference import canonical, parse_reference
from adapter.images.registry import Access, checked_mirrors, pull_image
from adapter.images.unpack import UnpackBudget, UnpackLimits

T = TypeVar("T")
log = logging.getLogger(__name__)


class ImageStore:
    """One per service (adapter/core/services.py builds it): the server and every runtime
    share it, so their unpacks and removals see each other."""

    def __init__(
        self,
        root: Path,
        options: ImagesOptions | None = None,
        containers: ContainerImages | None = None,
        mirrors: Mapping[str, str] | None = None,
        registries: RegistryOptions | None = None,
    ) -> None:
        self.layout = Layout(root)
        self.options = options or ImagesOptions()
        # Registry domain -> the host[:port] that serves its repositories (registry.py).
        self.mirrors = checked_mirrors(mirrors or {})
        # How to reach and authenticate to registries ([registry] tables; auth.py), and the
        # Bearer tokens they gave, reused by later pulls until they expire.
        self.registries = registries or RegistryOptions()
        self.tokens = TokenCache()
        self.last_use = LastUse(root / "last-used.json")  # the order of size-based GC
        # Which image each container that is not TERMINATED named (leases.py); None: nothing
        # runs here that the store must protect (a store used without a service).
        self.containers = containers
        self._leases = Leases(root / "leases.json")
        self._unpacking: dict[str, asyncio.Lock] = {}  # by chain id: one unpack of a layer
        # Chain id -> unpacks in flight that use the layer: garbage collection keeps it.
        self._pins: collections.Counter[str] = collections.Counter()
        self._lock = StoreLock(root)
        # Parsed images by index entry: their blobs are content-addressed and never change, so
        # a lookup reads index.json only. Trimmed to the index by garbage collection.
        self._images: dict[tuple[str, str, str, int], Image] = {}
        # Whatever a crash left: staging directories, half-unpacked layers, orphan blobs. Only
        # when no other store is open: else they may be another store's work in flight (blobs
        # and layers are in place a moment before index.json names them).
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
        pinned: builtins.list[str] = []
        stacked: builtins.list[str] = []
        try:
            images = await _in_thread(staging.stop, read_tarball, path, staging, report)
            if not images:
                raise InvalidArgument("path", f"{path}: the tarball holds no image")
            pinned = [chain for image in images for chain in self._pin(image)]
            await self._unpack_new(images, staging, report)
            await _in_thread(staging.stop, staging.sync)  # not on the loop: fsync waits on disk
            stacked = self._commit(staging, images)
        finally:
            self._unpin(pinned, stacked)
            await _discard_staging(staging)
        await self._collect_by_size(images)
        return images

    async def pull(
        self,
        reference: str,
        progress: Progress | None = None,
        credentials: Credentials | None = None,
    ) -> Image:
        """Pull and unpack `reference` (host:port/name:tag or @sha256:...) from its registry,
        as `credentials` or, without them, as the [registry] config says (auth.py)."""
        parsed = parse_reference(reference, "reference")
        access = Access(self.registries, self.tokens, credentials or Credentials())
        report = _on_loop(progress)
        staging = self.layout.new_staging(self.options.max_import_bytes, str(parsed))
        pinned: builtins.list[str] = []
        stacked: builtins.list[str] = []
        try:
            image = await _in_thread(
                staging.stop, pull_image, parsed, staging, report, self.mirrors, access
            )
            pinned = self._pin(image)
            await self._unpack_new([image], staging, report)
            await _in_thread(staging.stop, staging.sync)
            stacked = self._commit(staging, [image])
        finally:
            self._unpin(pinned, stacked)
            await _discard_staging(staging)
        await self._collect_by_size([image])
        return image

    # ---- removing ----

    def used_manifests(self) -> set[str]:
        """Manifest digests that containers which are not TERMINATED may run on."""
        self._refresh_leases()
        return self._leases.digests()

    async def _collect_by_size(self, added: builtins.list[Image]) -> None:
        """Size-based GC after an import or pull (prune.py); what they brought stays. A
        failure is logged: the images are in the store either way."""
        try:
            await collect_by_size(self, {image.manifest.digest for image in added})
        except (ContainerizerError, OSError) as exc:
            log.warning("image garbage collection failed: %s", exc)

    def remove(self, reference: str, field: str = "container.image") -> None:
        """Forget `reference`; its blobs and layers go when no other reference uses them.
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

    # ---- layers ----

    async def layers(self, reference: str, field: str = "container.image") -> builtins.list[Path]:
        """The unpacked layer directories of `reference`, topmost first: overlay lower
        directories, in `lowerdir` order. Each is unpacked once and shared by every image that
        has it (below the same layers) and every container of those.

        Nobody writes to them once they are in place: runtimes stack them under an upper
        directory of the container's own, so they may stay as they are. An import or pull has
        unpacked them already; this unpacks what an older store did not."""
        image = self.get(reference, field)
        digest = image.manifest.digest
        chains = self._pin(image)
        stacked: builtins.list[str] = []
        try:
            await self._unpack_layers(image, self.layout.blob_path, None, field)
            indexed = self._indexed()
            if digest not in indexed and digest not in self._leases.digests():
                raise NotFound(f"image {reference!r} was removed while it was being unpacked")
            if self.layout.read_stack(digest) != chains[::-1]:  # an older store had none
                self.layout.write_stack(digest, chains[::-1])
            stacked = chains
        finally:
            self._unpin(chains, stacked)
        self._touch([digest], indexed)
        return [self.layout.layer_path(chain) for chain in chains[::-1]]

    @contextlib.asynccontextmanager
    async def view(self, reference: str, field: str = "container.image") -> AsyncIterator[Path]:
        """A read-only path to the merged files of `reference` (a detached overlay of its
        layers, overlay.py), for reading the image's own files (its /etc/passwd) while the
        block runs. Nothing is mounted anywhere a crash could leave it."""
        layers = await self.layers(reference, field)
        with DetachedOverlay(layers) as merged:
            yield merged.root

    def _pin(self, image: Image) -> builtins.list[str]:
        """Keep `image`'s layer directories from garbage collection until `_unpin`, whatever
        the index says meanwhile (an unpack in flight uses them); its chain ids, base first."""
        chains = chain_ids(image.diff_ids)
        self._pins.update(chains)
        return chains

    def _unpin(self, chains: Iterable[str], stacked: Iterable[str] = ()) -> None:
        """Release pins; a layer no pin and no stack holds any more goes (what an import that
        failed or an image removed meanwhile had unpacked). `stacked`: chains the caller has
        just seen a stack name, which therefore stay (reading every stack costs a file each)."""
        released = set(chains)
        self._pins.subtract(released)
        self._pins = +self._pins  # drop what is no longer pinned
        unpinned = released - set(self._pins) - set(stacked)
        if not unpinned:
            return
        stacks = self.layout.stacked_layers()
        for chain in unpinned:
            if digest_hex(chain) not in stacks:
                remove_tree(self.layout.layer_path(chain))

    async def _unpack_new(
        self,
        images: builtins.list[Image],
        staging: Staging,
        progress: Progress | None,
    ) -> None:
        """Unpack the layers of the staged images that are not unpacked yet (the caller has
        pinned them)."""

        def staged_blob(digest: str) -> Path:
            path = staging.path(digest)
            if path is None:
                raise InvalidArgument("image", f"blob {digest} is missing from the tarball")
            return path

        for image in images:  # the stacks are staged with the blobs: one sync for all
            staging.stage_stack(image.manifest.digest, chain_ids(image.diff_ids)[::-1])
        staging.start_sync()  # the staged blobs reach the disk while we unpack
        for image in images:
            await self._unpack_layers(image, staged_blob, progress, "image", staging.stop)

    async def _unpack_layers(
        self,
        image: Image,
        blob_of: Callable[[str], Path],
        progress: Progress | None,
        field: str,
        stop: threading.Event | None = None,
    ) -> None:
        """Unpack each layer of `image` that has no directory yet, base first, each over the
        ones below it; a layer in place is never unpacked again. Refusals are
        InvalidArgument(field) naming the image, and leave nothing of the refused layer."""
        chains = chain_ids(image.diff_ids)
        unpacked = all(self.layout.layer_path(chain).is_dir() for chain in chains)
        if unpacked and self.layout.read_stack(image.manifest.digest) is not None:
            return  # an image the store has unpacked before: nothing to do or report
        stop = stop or threading.Event()
        limits = UnpackLimits(self.options.max_unpacked_bytes, self.options.max_entries)
        budget = UnpackBudget(limits, stop)
        report = UnpackProgress(image.reference, image.layers, progress)
        report.start()
        for index, (layer, diff_id) in enumerate(zip(image.layers, image.diff_ids, strict=True)):
            target = self.layout.layer_path(chains[index])
            async with self._unpacking.setdefault(chains[index], asyncio.Lock()):
                if target.is_dir():
                    report.skipped(layer)
                    continue
                lowers = [self.layout.layer_path(chain) for chain in reversed(chains[:index])]
                temporary = self.layout.temporary_layer_path(chains[index])
                try:
                    layer_directory = await _in_thread(
                        stop,
                        unpack_layer,
                        blob_of(layer.digest),
                        layer,
                        diff_id,
                        lowers,
                        temporary,
                        budget,
                        report.on_read,
                    )
                    layer_directory.rename(target)
                except InvalidArgument as exc:
                    detail = str(exc).removeprefix(f"{exc.field}: ")
                    raise InvalidArgument(
                        field, f"{image.reference} cannot be unpacked: {detail}"
                    ) from exc
                finally:
                    if not _remove_if_empty(temporary):  # a failed unpack's: in a thread
                        await _discard(None, [temporary])
        report.finish()

    # ---- internals ----

    def _image(self, name: str, entry: dict[str, Any]) -> Image:
        key = _cache_key(entry)
        image = self._images.get(key)
        if image is None:
            manifest = Descriptor(entry["mediaType"], entry["digest"], entry["size"])
            manifest_json = self._json_blob(manifest.digest)
            config, _ = manifest_parts(manifest_json, manifest.digest)
            config_json = self._json_blob(config.digest)
            image = self._images[key] = image_from(name, manifest, manifest_json, config_json)
        return image

    def _json_blob(self, digest: str) -> dict[str, Any]:
        with open(self.layout.blob_path(digest), "rb") as blob:
            return load_json(blob.read(MAX_JSON_BLOB + 1), f"blob {digest}")

    def _commit(self, staging: Staging, images: builtins.list[Image]) -> builtins.list[str]:
        """Make images visible: blobs and layer stacks first, then index.json (a crash in
        between leaves only unreferenced files, which garbage collection removes). Returns
        the chain ids the stacks of the indexed images name."""
        self._refresh_leases()  # before a reference may move to another manifest
        staging.commit()  # the blobs and the stacks _unpack_new staged
        added = {image.reference: image for image in images}
        entries = [e for e in self.layout.read_index() if _entry_name(e) not in added]
        for image in added.values():
            entry = image.manifest.to_json()
            entry["annotations"] = {REF_NAME_ANNOTATION: image.reference}
            entries.append(entry)
        self.layout.write_index(entries)
        self._collect_garbage(including_in_flight=False)
        self._touch(image.manifest.digest for image in images)
        return [chain for image in added.values() for chain in chain_ids(image.diff_ids)]

    def _touch(self, digests: Iterable[str], indexed: set[str] | None = None) -> None:
        """Record a use of these manifests (the order of size-based GC); `indexed`: the
        index's manifest digests, when the caller has just read them."""
        self.last_use.touch(digests, keep=self._indexed if indexed is None else lambda: indexed)

    def _indexed(self) -> set[str]:
        """The manifest digests index.json names."""
        return {entry["digest"] for entry in self.layout.read_index()}

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
        """Manifest digests whose layers must stay: named in the index or run on."""
        return self._indexed() | self._leases.digests()

    def _collect_garbage(self, *, including_in_flight: bool) -> None:
        self._refresh_leases()
        blobs: set[str] = set()
        images = {}
        for entry in self.layout.read_index():
            image = images[_cache_key(entry)] = self._image(_entry_name(entry), entry)
            blobs.update(
                digest_hex(blob.digest) for blob in (image.manifest, image.config, *image.layers)
            )
        self._images = images
        stacks = {digest_hex(d) for d in self._protected()} if self._leases.known else None
        pinned = {digest_hex(chain) for chain in self._pins}
        self.layout.collect_garbage(blobs, stacks, pinned, including_in_flight=including_in_flight)


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
    """Remove a staging area and temporary layer directories (what is left of them once the
    layer was renamed into place, or all of them when it was not);
    shielded, so that a second cancellation cannot leave them half removed."""

    def discard() -> None:
        if staging is not None:
            staging.discard()
        for directory in directories:
            remove_tree(directory)

    await asyncio.shield(asyncio.to_thread(discard))


async def _discard_staging(staging: Staging) -> None:
    """Remove what is left of a staging area: nothing, after a commit that moved every blob
    (one rmdir here); else, in a thread, what the commit did not move or a failure left."""
    if not staging.syncing() and _remove_if_empty(staging.directory):
        return
    await _discard(staging, [])


def _remove_if_empty(directory: Path) -> bool:
    """Remove `directory` when it is empty or gone (what a layer's unpack leaves once its upper
    directory is in place: one rmdir, no need of a thread); False when it holds anything."""
    try:
        directory.rmdir()
    except FileNotFoundError:
        return True
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            return False
        raise
    return True


def _cache_key(entry: dict[str, Any]) -> tuple[str, str, str, int]:
    """What an index entry says of its image: the same key is the same image."""
    return (_entry_name(entry), entry["mediaType"], entry["digest"], entry["size"])


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
