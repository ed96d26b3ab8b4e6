"""The store on disk: an OCI image layout (oci-layout, index.json, blobs/sha256/<hex>) plus two
directories of ours: `ingest/` (one private staging directory per import or pull), `layers/`
(each layer unpacked once, by chain id, as an overlay lower directory) and `stacks/` (per manifest
digest, the chain ids of its layers, topmost first: what an image's overlay stacks).

A layer directory is keyed by the layer's chain id (OCI image-spec config.md: the diff_id of the
base layer; then sha256 of "<chain id below> <diff_id>"), not by its diff_id alone: what unpacking a
layer writes depends on the layers below it (a name through a symlink they made, a whiteout of what
they hold), so the same layer over other layers is another directory. Images sharing their base
layers share those directories.

Every blob is hashed while it is written to staging and refused when the content does not match
the digest it claims; only verified blobs are renamed into blobs/. What one import or pull may
write to staging is bounded (config `images.max_import_bytes`), counted as it is written.
Whatever a crash leaves behind (staging directories, half-unpacked layers, blobs no manifest
references) is owned by the store and removed by `collect_garbage`, which the store runs when it
opens - but only when no other store is open on the same directory (`StoreLock`), since then the
staging directories may be someone's import in flight.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import threading
import uuid
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

from adapter.core.errors import InvalidArgument
from adapter.images.image import OCI_LAYOUT_VERSION

CHUNK = 1 << 20
# tarfile's read buffer for a tar stream: its 10 KiB default costs a Python call per 10 KiB,
# and every header read copies what is left of the buffer, so a large one costs per entry.
TAR_STREAM_BUFFER = 1 << 15
DIGEST_PATTERN = re.compile(r"sha256:([0-9a-f]{64})")
TEMPORARY_PREFIX = ".tmp-"
# How often (in bytes) a blob copy reports progress: often enough for a smooth bar.
PROGRESS_STEP = 1 << 20
# Blobs fsynced at once: concurrent fsyncs share journal commits. Up to that many are fsynced
# one after another instead (an image of a layer or two): starting the threads would cost the
# unpack that runs beside the sync more than the commits they would share.
SYNC_THREADS = 4
# A staging directory's subdirectory of layer stacks, by manifest (not a blob: never hex).
STAGED_STACKS = "stacks"


class Cancelled(Exception):
    """Raised in a worker thread when its caller went away (an import or pull cancelled)."""


def digest_hex(digest: str, field: str = "digest") -> str:
    match = DIGEST_PATTERN.fullmatch(digest)
    if match is None:
        raise InvalidArgument(field, f"{digest!r} is not a sha256 digest (sha256:<64 hex>)")
    return match.group(1)


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_file_durably(path: Path, data: bytes) -> None:
    """Write-then-rename with fsync, so a crash leaves the old or the new file, never half."""
    temporary = path.with_name(f"{TEMPORARY_PREFIX}{path.name}.{uuid.uuid4().hex}")
    with open(temporary, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)


class Staging:
    """One import's or pull's blobs, verified, not yet visible in the store. `source` (the
    tarball or the reference) names the import in errors; `stop` cancels a write in progress."""

    def __init__(self, directory: Path, layout: Layout, max_bytes: int, source: str) -> None:
        self.directory = directory
        self.layout = layout
        self.max_bytes = max_bytes
        self.source = source
        self.written_bytes = 0
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._unsynced: set[Path] = set()  # staged blobs not yet fsynced
        self._syncer: threading.Thread | None = None
        self._sync_error: BaseException | None = None
        directory.mkdir(parents=True)

    def write(
        self,
        source: BinaryIO,
        expected_digest: str | None = None,
        expected_size: int | None = None,
        on_bytes: Callable[[int], None] | None = None,
    ) -> tuple[str, int]:
        """Copy `source` to a staged blob, hashing each chunk as it is written (one read of every
        byte); verify it; return (digest, size). `sync` makes it durable before a commit."""
        temporary = self.directory / f"{TEMPORARY_PREFIX}{uuid.uuid4().hex}"
        hasher, size, reported = hashlib.sha256(), 0, 0
        buffer = memoryview(bytearray(CHUNK))
        with open(temporary, "wb", buffering=0) as out:
            while count := _read_into(source, buffer):
                size += count
                self._count(count)
                if expected_size is not None and size > expected_size:
                    break  # a blob longer than its descriptor: refused below, read no further
                chunk = buffer[:count]
                hasher.update(chunk)
                _write_all(out, chunk)
                if on_bytes is not None and size - reported >= PROGRESS_STEP:
                    on_bytes(size)
                    reported = size
        if on_bytes is not None:
            on_bytes(size)
        digest = "sha256:" + hasher.hexdigest()
        named = expected_digest or digest
        if expected_size is not None and size != expected_size:
            temporary.unlink()
            found = "more" if size > expected_size else f"{size} bytes"
            raise InvalidArgument(
                "image", f"blob {named}: {found} where its descriptor says {expected_size} bytes"
            )
        if digest != named:
            temporary.unlink()
            raise InvalidArgument(
                "image", f"blob {named}: content does not match its digest (it hashes to {digest})"
            )
        staged = self.directory / digest_hex(digest)
        os.replace(temporary, staged)
        with self._lock:
            self._unsynced.add(staged)
        return digest, size

    def start_sync(self) -> None:
        """Start making the staged blobs durable in a thread of ours, so the disk flushes them
        while the caller unpacks; `sync`, `commit` and `discard` wait for it."""
        self._join_syncer()
        self._syncer = threading.Thread(target=self._sync_in_thread, name="sync-blobs")
        self._syncer.start()

    def sync(self) -> None:
        """fsync the blobs written since the last sync, all at once (the journal commits them
        together) instead of one fsync per blob while copying."""
        self._join_syncer()
        self._sync_pending()

    def _sync_pending(self) -> None:
        with self._lock:
            pending, self._unsynced = self._unsynced, set()
        if len(pending) <= SYNC_THREADS:
            for path in pending:
                _fsync_file(path)
        else:
            with ThreadPoolExecutor(max_workers=SYNC_THREADS) as pool:
                list(pool.map(_fsync_file, pending))

    def _sync_in_thread(self) -> None:
        try:
            self._sync_pending()
        except BaseException as exc:  # raised again by whoever waits for the thread
            self._sync_error = exc

    def syncing(self) -> bool:
        """Whether a `start_sync` thread is still to be waited for (`discard` waits)."""
        return self._syncer is not None

    def _join_syncer(self) -> None:
        if self._syncer is not None:
            self._syncer.join()
            self._syncer = None
        error, self._sync_error = self._sync_error, None
        if error is not None:
            raise error

    def _count(self, written: int) -> None:
        if self.stop.is_set():
            raise Cancelled(f"{self.source}: cancelled")
        with self._lock:  # blobs may be written by several threads at once
            self.written_bytes += written
            over = self.written_bytes > self.max_bytes
        if over:
            raise InvalidArgument(
                "image",
                f"{self.source}: its blobs are more than {self.max_bytes} bytes, this node's "
                "limit (images.max_import_bytes)",
            )

    def write_bytes(self, data: bytes, expected_digest: str | None = None) -> tuple[str, int]:
        return self.write(io.BytesIO(data), expected_digest)

    def path(self, digest: str) -> Path | None:
        """The staged blob with this digest, or None. A blob already in the store is hard-linked
        into staging first, so a removal that collects it before our commit cannot leave the
        index pointing at a missing blob."""
        staged = self.directory / digest_hex(digest)
        if staged.exists():
            return staged
        try:
            os.link(self.layout.blob_path(digest), staged)
        except FileNotFoundError:
            return None
        except FileExistsError:
            pass
        return staged

    def read(self, digest: str, limit: int) -> bytes | None:
        path = self.path(digest)
        if path is None:
            return None
        with open(path, "rb") as blob:
            return blob.read(limit + 1)

    def stage_stack(self, manifest_digest: str, chain_ids: list[str]) -> None:
        """Stage a manifest's layer stack (Layout.write_stack's file), so that the blobs' sync
        makes it durable too, while the layers unpack; `commit` moves it into stacks/."""
        stacks = self.directory / STAGED_STACKS
        stacks.mkdir(exist_ok=True)
        staged = stacks / digest_hex(manifest_digest)
        staged.write_bytes(json.dumps(chain_ids).encode())
        with self._lock:
            self._unsynced.add(staged)

    def commit(self) -> None:
        """Move the staged blobs into blobs/ (a blob already there is identical: same digest),
        then the staged stacks into stacks/. All are durable first (a no-op when the caller
        already ran `sync` in a worker)."""
        self.sync()
        for staged in self.directory.iterdir():
            if staged.name.startswith(TEMPORARY_PREFIX) or staged.name == STAGED_STACKS:
                continue
            target = self.layout.blobs / staged.name
            if not target.exists():
                os.replace(staged, target)
        stacks = self.directory / STAGED_STACKS
        for staged in stacks.iterdir() if stacks.is_dir() else ():
            os.replace(staged, self.layout.stacks / staged.name)
        with contextlib.suppress(FileNotFoundError):
            stacks.rmdir()

    def discard(self) -> None:
        with contextlib.suppress(OSError):  # what is discarded need not be durable
            self._join_syncer()
        shutil.rmtree(self.directory, ignore_errors=True)


def _read_into(source: BinaryIO, buffer: memoryview) -> int:
    """Fill `buffer` from `source` (a short count only at its end); readinto avoids a copy."""
    readinto = getattr(source, "readinto", None)
    if readinto is None:
        data = source.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)
    filled = 0
    while filled < len(buffer) and (count := readinto(buffer[filled:])):
        filled += count
    return filled


def _write_all(out: BinaryIO, data: memoryview) -> None:
    while data:
        data = data[out.write(data) :]


def _fsync_file(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# The store is root's alone: its layers hold images' files as they are, setuid binaries among
# them, which a host user who could reach a layer's directory (its name is the chain id, known
# for any public image) could run on the host. Nothing but root reads them: an overlay's lower
# layers are looked up with its mounter's credentials.
STORE_MODE = 0o700


class Layout:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(mode=STORE_MODE, parents=True, exist_ok=True)
        if root.stat().st_mode & 0o777 != STORE_MODE:  # a store made before: closed now
            os.chmod(root, STORE_MODE)
        self.blobs = root / "blobs" / "sha256"
        self.ingest = root / "ingest"
        self.layers = root / "layers"
        self.stacks = root / "stacks"
        for directory in (self.blobs, self.ingest, self.layers, self.stacks):
            directory.mkdir(parents=True, exist_ok=True)
        if not (root / "oci-layout").exists():
            layout = json.dumps({"imageLayoutVersion": OCI_LAYOUT_VERSION}).encode()
            write_file_durably(root / "oci-layout", layout)
        if not (root / "index.json").exists():
            self.write_index([])

    def blob_path(self, digest: str) -> Path:
        return self.blobs / digest_hex(digest)

    def new_staging(self, max_bytes: int, source: str) -> Staging:
        return Staging(self.ingest / uuid.uuid4().hex, self, max_bytes, source)

    def layer_path(self, chain_id: str) -> Path:
        """A layer's directory. Named by the bare hex (no `sha256/`): LXC hands the overlay
        its layers in one `lowerdir=` string, which a page bounds."""
        return self.layers / digest_hex(chain_id)

    def temporary_layer_path(self, chain_id: str) -> Path:
        """Where a layer is unpacked (its `upper/`, with the overlay's `work/`; a base layer
        into the directory itself) before it is renamed into place; garbage collection leaves
        these to their unpack while the store is open, and a store opening alone removes them."""
        return self.layers / f"{TEMPORARY_PREFIX}{digest_hex(chain_id)}-{uuid.uuid4().hex}"

    def read_stack(self, manifest_digest: str) -> list[str] | None:
        """The chain ids of the manifest's layers, topmost first; None when not unpacked."""
        try:
            stack = json.loads((self.stacks / digest_hex(manifest_digest)).read_bytes())
        except FileNotFoundError:
            return None
        return [str(chain_id) for chain_id in stack]

    def write_stack(self, manifest_digest: str, chain_ids: list[str]) -> None:
        stack = json.dumps(chain_ids).encode()
        write_file_durably(self.stacks / digest_hex(manifest_digest), stack)

    def stacked_layers(self) -> set[str]:
        """The hex of every layer some stack names."""
        layers: set[str] = set()
        for stack in self.stacks.iterdir():
            if not stack.name.startswith(TEMPORARY_PREFIX):
                layers.update(digest_hex(c) for c in self.read_stack(f"sha256:{stack.name}") or ())
        return layers

    def read_index(self) -> list[dict[str, Any]]:
        """The manifest descriptors of index.json (written only by us, so trusted)."""
        index = json.loads((self.root / "index.json").read_bytes())
        manifests: list[dict[str, Any]] = index.get("manifests", [])
        return manifests

    def write_index(self, manifests: list[dict[str, Any]]) -> None:
        index = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests,
        }
        write_file_durably(self.root / "index.json", json.dumps(index, indent=2).encode())

    def collect_garbage(
        self,
        referenced_blobs: set[str],
        referenced_stacks: set[str] | None,
        pinned_layers: set[str],
        *,
        including_in_flight: bool,
    ) -> None:
        """Remove blobs, stacks and layer directories that are not referenced (stacks and
        layers: all are kept when `referenced_stacks` is None; a layer is referenced by a kept
        stack or `pinned_layers`, the hex of those in use by an unpack in flight) and, when
        nothing can be in flight (the only store open is opening), staging and temporary layer
        directories: what a crash left."""
        if including_in_flight:
            for staging in self.ingest.iterdir():
                shutil.rmtree(staging, ignore_errors=True)
        for blob in self.blobs.iterdir():
            if blob.name not in referenced_blobs:
                with contextlib.suppress(FileNotFoundError):
                    blob.unlink()
        for leftover in self.root.glob(f"{TEMPORARY_PREFIX}*") if including_in_flight else ():
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
        for stack in self.stacks.iterdir():
            if referenced_stacks is not None and stack.name not in referenced_stacks:
                with contextlib.suppress(FileNotFoundError):
                    stack.unlink()
        layers = self.stacked_layers() | pinned_layers
        for layer in self.layers.iterdir():
            if layer.name.startswith(TEMPORARY_PREFIX):
                if including_in_flight:
                    remove_tree(layer)
            elif referenced_stacks is not None and layer.name not in layers:
                remove_tree(layer)
        legacy = self.root / "rootfs"  # flattened copies an older store made, by manifest
        for rootfs in legacy.iterdir() if legacy.is_dir() else ():
            if referenced_stacks is not None and rootfs.name not in referenced_stacks:
                remove_tree(rootfs)


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """The chain id of each layer, base first (OCI image-spec config.md, "Layer ChainID")."""
    chains: list[str] = []
    for diff_id in diff_ids:
        chains.append(diff_id if not chains else sha256_digest(f"{chains[-1]} {diff_id}".encode()))
    return chains


class StoreLock:
    """A shared flock on `<root>/lock` held for as long as a store is open, in any process.
    `alone` says whether the lock could be taken exclusively first: then no other store is open,
    and what sits in ingest/ and the temporary rootfs directories is a crash's, not in flight."""

    def __init__(self, root: Path) -> None:
        descriptor = os.open(root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        weakref.finalize(self, os.close, descriptor)
        self.descriptor = descriptor
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.alone = True
        except BlockingIOError:
            self.alone = False

    def share(self) -> None:
        """From now on other stores may open beside this one."""
        fcntl.flock(self.descriptor, fcntl.LOCK_SH)


def remove_tree(path: Path) -> None:
    """Remove a file, link or directory tree if it exists (as root, mode bits do not stop it)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)
