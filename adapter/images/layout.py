"""The store on disk: an OCI image layout (oci-layout, index.json, blobs/sha256/<hex>) plus two
directories of ours, `ingest/` (one private staging directory per import or pull) and `rootfs/`
(unpacked root filesystems by manifest digest).

Every blob is hashed while it is written to staging and refused when the content does not match
the digest it claims; only verified blobs are renamed into blobs/. What one import or pull may
write to staging is bounded (config `images.max_import_bytes`), counted as it is written.
Whatever a crash leaves behind (staging directories, half-unpacked rootfs, blobs no manifest
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
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from adapter.core.errors import InvalidArgument
from adapter.images.image import OCI_LAYOUT_VERSION

CHUNK = 1 << 20
DIGEST_PATTERN = re.compile(r"sha256:([0-9a-f]{64})")
TEMPORARY_PREFIX = ".tmp-"
# How often (in bytes) a blob copy reports progress: often enough for a smooth bar.
PROGRESS_STEP = 1 << 20


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
        directory.mkdir(parents=True)

    def write(
        self,
        source: BinaryIO,
        expected_digest: str | None = None,
        expected_size: int | None = None,
        on_bytes: Callable[[int], None] | None = None,
    ) -> tuple[str, int]:
        """Copy `source` to a staged blob; verify it; return (digest, size)."""
        temporary = self.directory / f"{TEMPORARY_PREFIX}{uuid.uuid4().hex}"
        hasher, size, reported = hashlib.sha256(), 0, 0
        with open(temporary, "wb") as out:
            while chunk := source.read(CHUNK):
                size += len(chunk)
                self._count(len(chunk))
                if expected_size is not None and size > expected_size:
                    break  # a blob longer than its descriptor: refused below, read no further
                hasher.update(chunk)
                out.write(chunk)
                if on_bytes is not None and size - reported >= PROGRESS_STEP:
                    on_bytes(size)
                    reported = size
            out.flush()
            os.fsync(out.fileno())
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
        os.replace(temporary, self.directory / digest_hex(digest))
        return digest, size

    def _count(self, written: int) -> None:
        if self.stop.is_set():
            raise Cancelled(f"{self.source}: cancelled")
        self.written_bytes += written
        if self.written_bytes > self.max_bytes:
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

    def commit(self) -> None:
        """Move the staged blobs into blobs/ (a blob already there is identical: same digest)."""
        for staged in self.directory.iterdir():
            if staged.name.startswith(TEMPORARY_PREFIX):
                continue
            target = self.layout.blobs / staged.name
            if not target.exists():
                os.replace(staged, target)

    def discard(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


class Layout:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs" / "sha256"
        self.ingest = root / "ingest"
        self.rootfs = root / "rootfs"
        for directory in (self.blobs, self.ingest, self.rootfs):
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

    def rootfs_path(self, manifest_digest: str) -> Path:
        return self.rootfs / digest_hex(manifest_digest)

    def temporary_rootfs_path(self, manifest_digest: str) -> Path:
        """Where a rootfs is unpacked before it is renamed into place (garbage collection
        leaves these to their unpack while the store is open)."""
        return self.rootfs / f"{TEMPORARY_PREFIX}{digest_hex(manifest_digest)}-{uuid.uuid4().hex}"

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
        referenced_rootfs: set[str] | None,
        *,
        including_in_flight: bool,
    ) -> None:
        """Remove blobs and rootfs directories that are not referenced (rootfs: all are kept
        when `referenced_rootfs` is None) and, when nothing can be in flight (the only store
        open is opening), staging and temporary rootfs directories: what a crash left."""
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
        for rootfs in self.rootfs.iterdir():
            if rootfs.name.startswith(TEMPORARY_PREFIX):
                if including_in_flight:
                    remove_tree(rootfs)
            elif referenced_rootfs is not None and rootfs.name not in referenced_rootfs:
                remove_tree(rootfs)


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
