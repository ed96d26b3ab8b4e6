"""Read an image tarball into a staging area: OCI image layouts and docker-archives (`docker save`).

The tarball is read once, as a stream. Nothing in it is extracted by its name: blobs are staged
under the digest of their content, so the names in the tarball never become paths on our disk.
What a name claims is checked: `blobs/sha256/<hex>` must hash to <hex>, a docker-archive config
`<hex>.json` likewise, and docker-archive layers must hash to the config's diff_ids (uncompressed
layers) or are checked at unpack (compressed ones).
"""

from __future__ import annotations

import gzip
import json
import os
import posixpath
import re
import tarfile
import threading
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from adapter.core.errors import InvalidArgument
from adapter.images.image import (
    DOCKER_LAYER_GZIP,
    INDEX_TYPES,
    MANIFEST_TYPES,
    MAX_JSON_BLOB,
    OCI_CONFIG,
    OCI_LAYER,
    OCI_MANIFEST,
    REF_NAME_ANNOTATION,
    Descriptor,
    Image,
    Progress,
    descriptor,
    image_from,
    load_json,
    manifest_parts,
    platform_manifest,
)
from adapter.images.layout import PROGRESS_STEP, TAR_STREAM_BUFFER, Staging, sha256_digest
from adapter.images.reference import canonical

BLOB_NAME = re.compile(r"blobs/sha256/([0-9a-f]{64})")
CONTAINERD_NAME_ANNOTATION = "io.containerd.image.name"
METADATA_NAMES = {"oci-layout", "index.json", "manifest.json", "repositories"}
GZIP_MAGIC = b"\x1f\x8b"
MAX_LINK_HOPS = 16
# Blobs copied at once: hashing and file I/O release the GIL, so layers copy side by side.
COPY_THREADS = min(4, os.cpu_count() or 1)
# Members up to this size (configs, manifests) are copied as their header comes: a thread of
# their own would cost more than the copy.
INLINE_COPY_SIZE = 1 << 16


@dataclass
class TarballContents:
    """What one pass over the tarball found: small metadata files, and staged files by name."""

    metadata: dict[str, bytes] = field(default_factory=dict)
    staged: dict[str, tuple[str, int]] = field(default_factory=dict)  # name -> (digest, size)
    links: dict[str, str] = field(default_factory=dict)  # name -> target name

    def staged_file(self, name: str, where: str) -> tuple[str, int]:
        for _ in range(MAX_LINK_HOPS):
            if name in self.staged:
                return self.staged[name]
            if name not in self.links:
                break
            name = self.links[name]
        raise InvalidArgument("image", f"{where}: {name!r} is missing from the tarball")


class CountingReader:
    """Reports how far into the tarball file we are, for the progress bar."""

    def __init__(self, source: BinaryIO, what: str, total: int, progress: Progress | None) -> None:
        self.source, self.what, self.total, self.progress = source, what, total, progress
        self.done = self.reported = 0
        self.lock = threading.Lock()  # blobs are copied by several threads at once

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size)
        self.count(len(data))
        return data

    def count(self, read: int) -> None:
        with self.lock:  # reported under the lock, so the reports only ever grow
            self.done += read
            if self.progress is not None and self.done - self.reported >= PROGRESS_STEP:
                self.progress(self.what, self.done, self.total)
                self.reported = self.done


class MemberReader:
    """The data of one member of a plain tarball, read with pread: threads copying several
    members of one file need no shared position, and readinto fills the caller's buffer."""

    def __init__(self, descriptor: int, member: tarfile.TarInfo, counter: CountingReader) -> None:
        self.descriptor, self.counter = descriptor, counter
        self.offset, self.left = member.offset_data, member.size

    def readinto(self, buffer: memoryview) -> int:
        count = os.preadv(self.descriptor, [buffer[: self.left]], self.offset) if self.left else 0
        if count == 0 and self.left:
            raise tarfile.ReadError("unexpected end of data")
        self.offset += count
        self.left -= count
        self.counter.count(count)
        return count

    def read(self, size: int = -1) -> bytes:
        buffer = memoryview(bytearray(self.left if size < 0 else min(size, self.left)))
        return bytes(buffer[: self.readinto(buffer)])


def read_tarball(path: Path, staging: Staging, progress: Progress | None) -> list[Image]:
    """Stage every blob of the tarball at `path`; return the images it names (verified)."""
    total = path.stat().st_size
    with open(path, "rb") as raw:
        counting = CountingReader(raw, path.name, total, progress)
        try:
            contents = _stage_tarball(raw, counting, staging)
        except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
            raise InvalidArgument("path", f"{path}: not a readable tar archive: {exc}") from exc
    if progress is not None:
        progress(path.name, total, total)
    if "oci-layout" in contents.metadata or "index.json" in contents.metadata:
        return _oci_layout_images(contents, staging)
    if "manifest.json" in contents.metadata:
        return _docker_archive_images(contents, staging)
    raise InvalidArgument(
        "path",
        f"{path}: neither an OCI image layout (no oci-layout, index.json) nor a docker archive "
        "(no manifest.json)",
    )


def _stage_tarball(raw: BinaryIO, counting: CountingReader, staging: Staging) -> TarballContents:
    """A plain tar is read in place (its members copied in parallel, straight from the file);
    a compressed one (tarfile refuses it as plain) as one stream."""
    try:
        archive = tarfile.open(fileobj=raw, mode="r:")  # noqa: SIM115 - the with below closes it
    except tarfile.ReadError:
        raw.seek(0)
        return _stage_stream(counting, staging)
    with archive:
        return _stage_plain(archive, raw.fileno(), counting, staging)


def _stage_plain(
    archive: tarfile.TarFile, descriptor: int, counting: CountingReader, staging: Staging
) -> TarballContents:
    """Metadata and small files are staged as their headers come; the large files once every
    header is read (headers only: the data is skipped), so that one is copied on this thread
    and several side by side."""
    contents = TarballContents()
    copies: dict[str, tuple[MemberReader, str | None]] = {}  # name -> (data, expected digest)
    for member in archive:
        name = _member_name(member, contents)
        if name is None:
            continue
        copies.pop(name, None)  # as in tar, a later member of the same name is the one kept
        if member.sparse is not None:  # rare: tarfile maps the holes, on this thread
            _stage_member(name, archive.extractfile(member), member.size, contents, staging)
            continue
        blob = BLOB_NAME.fullmatch(name)
        if blob is not None and _reuse_stored(staging, name, blob.group(1), member, contents):
            counting.count(member.size)
            continue
        reader = MemberReader(descriptor, member, counting)
        if name in METADATA_NAMES:
            _stage_member(name, reader, member.size, contents, staging)
            continue
        expected = None if blob is None else "sha256:" + blob.group(1)
        if member.size <= INLINE_COPY_SIZE:
            contents.staged[name] = _stage_blob(staging, reader, expected)
        else:
            copies[name] = (reader, expected)
    contents.staged.update(_copy_blobs(copies, staging))
    return contents


def _copy_blobs(
    copies: dict[str, tuple[MemberReader, str | None]], staging: Staging
) -> dict[str, tuple[str, int]]:
    """Stage large members, one on this thread or several side by side; name -> (digest,
    size), or the first failure in tarball order once every copy has ended."""
    if len(copies) <= 1:
        return {name: _stage_blob(staging, *copy) for name, copy in copies.items()}
    with ThreadPoolExecutor(max_workers=COPY_THREADS) as pool:
        futures: dict[str, Future[tuple[str, int]]] = {}
        try:
            for name, copy in copies.items():
                futures[name] = pool.submit(_stage_blob, staging, *copy)
        except BaseException:
            staging.stop.set()  # the copies in flight end at their next chunk
            raise
    # Every copy has ended (the pool is shut down): the first failure, if any, is the answer.
    return {name: future.result() for name, future in futures.items()}


def _stage_blob(staging: Staging, data: MemberReader, expected: str | None) -> tuple[str, int]:
    return staging.write(data, expected)  # type: ignore[arg-type]  # reads like a binary file


def _reuse_stored(
    staging: Staging, name: str, hex_digest: str, member: tarfile.TarInfo, contents: TarballContents
) -> bool:
    """A blob the store holds already (verified when it went in) is linked, not copied again."""
    digest = "sha256:" + hex_digest
    if not staging.layout.blob_path(digest).exists():
        return False
    staged = staging.path(digest)
    if staged is None or staged.stat().st_size != member.size:
        return False
    contents.staged[name] = (digest, member.size)
    return True


def _stage_stream(source: CountingReader, staging: Staging) -> TarballContents:
    contents = TarballContents()
    with tarfile.open(fileobj=source, mode="r|*", bufsize=TAR_STREAM_BUFFER) as archive:  # type: ignore[call-overload]
        for member in archive:
            name = _member_name(member, contents)
            if name is not None:
                _stage_member(name, archive.extractfile(member), member.size, contents, staging)
    return contents


def _member_name(member: tarfile.TarInfo, contents: TarballContents) -> str | None:
    """The normalised name of a member whose content matters; links are noted, others skipped."""
    name = posixpath.normpath(member.name.lstrip("/"))
    if member.issym() or member.islnk():
        base = posixpath.dirname(name) if member.issym() else ""
        contents.links[name] = posixpath.normpath(posixpath.join(base, member.linkname))
        return None
    return name if member.isreg() else None


def _stage_member(
    name: str, fileobj: Any, size: int, contents: TarballContents, staging: Staging
) -> None:
    """Keep a metadata file in memory, or stage a blob (checked against the digest its name
    claims, when it claims one)."""
    assert fileobj is not None  # a regular member always has content
    if name in METADATA_NAMES:
        if size > MAX_JSON_BLOB:
            raise InvalidArgument("image", f"{name}: larger than {MAX_JSON_BLOB} bytes")
        contents.metadata[name] = fileobj.read(MAX_JSON_BLOB + 1)
        return
    blob = BLOB_NAME.fullmatch(name)
    contents.staged[name] = staging.write(
        fileobj, None if blob is None else "sha256:" + blob.group(1)
    )


# ---- OCI image layout ----


def _oci_layout_images(contents: TarballContents, staging: Staging) -> list[Image]:
    index = load_json(contents.metadata.get("index.json", b""), "index.json")
    entries = index.get("manifests")
    if not isinstance(entries, list) or not entries:
        raise InvalidArgument("image", "index.json: no manifests")
    repo_tags = _docker_repo_tags(contents)
    images = []
    for number, entry in enumerate(entries):
        top = descriptor(entry, f"index.json manifest {number}")
        manifest = _resolve_platform(staging, top)
        manifest_json = _read_verified(staging, manifest)
        config, _ = manifest_parts(manifest_json, manifest.digest)
        names = _oci_names(entry, repo_tags.get(config.digest, []), number)
        config_json = _read_verified(staging, config)
        for name in names:
            image = image_from(name, manifest, manifest_json, config_json)
            _check_blobs_present(staging, image)
            images.append(image)
    return images


def _resolve_platform(staging: Staging, top: Descriptor) -> Descriptor:
    """A multi-platform index names the manifest for this machine; a manifest names itself."""
    if top.media_type in INDEX_TYPES:
        return platform_manifest(_read_verified(staging, top), top.digest)
    if top.media_type not in MANIFEST_TYPES:
        raise InvalidArgument("image", f"{top.digest}: unsupported media type {top.media_type!r}")
    return top


def _oci_names(entry: dict[str, Any], repo_tags: list[str], number: int) -> list[str]:
    """The references an index.json entry names. OCI's ref.name may be a bare tag ("latest"):
    then the name comes from containerd's annotation or docker's manifest.json."""
    annotations = entry.get("annotations") or {}
    full = annotations.get(CONTAINERD_NAME_ANNOTATION)
    ref_name = annotations.get(REF_NAME_ANNOTATION)
    if isinstance(full, str):
        return [canonical(full, "image")]
    if isinstance(ref_name, str) and ("/" in ref_name or ":" in ref_name):
        return [canonical(ref_name, "image")]
    if repo_tags:
        return [canonical(tag, "image") for tag in repo_tags]
    raise InvalidArgument(
        "image",
        f"index.json manifest {number} has no name (annotation {REF_NAME_ANNOTATION} with a "
        "full reference such as localhost/busybox:latest)",
    )


def _docker_repo_tags(contents: TarballContents) -> dict[str, list[str]]:
    """config digest -> RepoTags of a manifest.json that newer `docker save` writes beside OCI."""
    if "manifest.json" not in contents.metadata:
        return {}
    tags: dict[str, list[str]] = {}
    for entry in _docker_manifest_entries(contents):
        config_digest, _ = contents.staged_file(str(entry.get("Config")), "manifest.json Config")
        tags[config_digest] = [str(tag) for tag in entry.get("RepoTags") or []]
    return tags


# ---- docker-archive ----


def _docker_manifest_entries(contents: TarballContents) -> list[dict[str, Any]]:
    try:
        entries = json.loads(contents.metadata["manifest.json"])
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument("image", f"manifest.json: not valid JSON: {exc}") from exc
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise InvalidArgument("image", "manifest.json: expected a list of objects")
    return entries


def _docker_archive_images(contents: TarballContents, staging: Staging) -> list[Image]:
    images = []
    for number, entry in enumerate(_docker_manifest_entries(contents)):
        where = f"manifest.json entry {number}"
        config_name = entry.get("Config")
        layer_names = entry.get("Layers")
        tags = entry.get("RepoTags") or []
        if not isinstance(config_name, str) or not isinstance(layer_names, list):
            raise InvalidArgument("image", f"{where}: needs Config (a file) and Layers (a list)")
        if not tags or not all(isinstance(tag, str) for tag in tags):
            raise InvalidArgument("image", f"{where}: no RepoTags: the image has no name")
        config_digest, config_size = contents.staged_file(config_name, where)
        stem = posixpath.basename(config_name).removesuffix(".json")
        if re.fullmatch(r"[0-9a-f]{64}", stem) and f"sha256:{stem}" != config_digest:
            raise InvalidArgument(
                "image", f"blob sha256:{stem}: content does not match its digest ({config_digest})"
            )
        config = Descriptor(OCI_CONFIG, config_digest, config_size)
        config_json = _read_verified(staging, config)
        layers = [_docker_layer(contents, staging, str(n), where) for n in layer_names]
        manifest_json = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config.to_json(),
            "layers": [layer.to_json() for layer in layers],
        }
        manifest_bytes = json.dumps(manifest_json, sort_keys=True, separators=(",", ":")).encode()
        digest, size = staging.write_bytes(manifest_bytes, sha256_digest(manifest_bytes))
        manifest = Descriptor(OCI_MANIFEST, digest, size)
        for tag in tags:
            image = image_from(canonical(tag, "image"), manifest, manifest_json, config_json)
            _check_docker_diff_ids(image)
            images.append(image)
    return images


def _docker_layer(contents: TarballContents, staging: Staging, name: str, where: str) -> Descriptor:
    digest, size = contents.staged_file(name, where)
    path = staging.path(digest)
    assert path is not None  # staged_file only answers for staged files
    with open(path, "rb") as layer:
        compressed = layer.read(2) == GZIP_MAGIC
    return Descriptor(DOCKER_LAYER_GZIP if compressed else OCI_LAYER, digest, size)


def _check_docker_diff_ids(image: Image) -> None:
    """An uncompressed layer's digest is its diff_id: a corrupt layer is refused here."""
    for layer, diff_id in zip(image.layers, image.diff_ids, strict=True):
        if layer.media_type == OCI_LAYER and layer.digest != diff_id:
            raise InvalidArgument(
                "image",
                f"blob {diff_id}: content does not match its digest (the layer file hashes to "
                f"{layer.digest})",
            )


# ---- shared ----


def _read_verified(staging: Staging, blob: Descriptor) -> dict[str, Any]:
    """A JSON blob that is staged or stored (so its digest was verified) of the declared size."""
    data = staging.read(blob.digest, MAX_JSON_BLOB)
    if data is None:
        raise InvalidArgument("image", f"blob {blob.digest} is missing from the tarball")
    if len(data) != blob.size:
        raise InvalidArgument(
            "image", f"blob {blob.digest}: {len(data)} bytes where its descriptor says {blob.size}"
        )
    return load_json(data, f"blob {blob.digest}")


def _check_blobs_present(staging: Staging, image: Image) -> None:
    for blob in (image.config, *image.layers):
        path = staging.path(blob.digest)
        if path is None:
            raise InvalidArgument("image", f"blob {blob.digest} is missing from the tarball")
        if path.stat().st_size != blob.size:
            raise InvalidArgument(
                "image",
                f"blob {blob.digest}: {path.stat().st_size} bytes, descriptor says {blob.size}",
            )
