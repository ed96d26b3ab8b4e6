"""The CRI ImageService (runtime.v1) on the node's image store: a façade like server/images.py,
with the same error map (server/containers.py `mapped_errors`).

A CRI image is what containerd's CRI plugin calls one: an image config, named by its digest (the
image id), together with every reference of the store whose manifest has that config. Those
references are its repo tags (`host/name:tag`) and repo digests (`host/name@<manifest digest>`),
and each of them finds it: a reference with or without tag (`:latest`) or registry (Docker's
`docker.io/library/` rule), `name@sha256:<manifest>`, the id `sha256:<config>` or its bare hex.
Removing an image removes all of its references, or none while a container runs on it (the
store's leases). An image that is not there is no error: ImageStatus answers without an image,
RemoveImage succeeds, as the CRI asks.

A PullImage's AuthConfig (username and password, or `auth`, an identity token or a registry
token) is what the pull presents to the image's registry when it asks (adapter/images/auth.py);
without one, the node's [registry] config. Pulls go through the store and its registry
mirrors: that is how critest's `gcr.io/k8s-staging-cri-tools/...` images come from a registry on
loopback.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import re
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapter.core.errors import InvalidArgument
from adapter.cri.api import cri, cri_grpc
from adapter.images import Image, ImageStore
from adapter.images.auth import Credentials, decode_auth
from adapter.images.image import MAX_JSON_BLOB, load_json
from adapter.images.reference import DIGEST_PATTERN, Reference, parse_reference
from adapter.server.errors import mapped_errors

log = logging.getLogger(__name__)

IMAGE_FIELD = "image.image"
FILTER_FIELD = "filter.image.image"
BARE_ID_PATTERN = re.compile(r"[0-9a-f]{64}")
# Kubernetes' rule for an image's User: the part before ':' is a uid when it is an integer.
UID_PATTERN = re.compile(r"[+-]?[0-9]{1,19}")
UID_RANGE = range(-(2**63), 2**63)  # the CRI's Int64Value; beyond it a name, as in Go
BLOCK_BYTES = 512  # the unit of st_blocks


@dataclass(frozen=True)
class CriImage:
    """One image config and every reference of the store to it (one Image per reference,
    sorted by reference)."""

    id: str  # the config digest, "sha256:<hex>"
    images: tuple[Image, ...]

    @property
    def reference(self) -> str:
        """A reference of the store that names this image (for store.get and store.rootfs)."""
        return self.images[0].reference

    @property
    def size(self) -> int:
        """Bytes of the distinct blobs (manifests, config, layers) its references use."""
        blobs = {
            blob.digest: blob.size
            for image in self.images
            for blob in (image.manifest, image.config, *image.layers)
        }
        return sum(blobs.values())


class CriImageService(cri_grpc.ImageServiceServicer):
    def __init__(self, store: ImageStore) -> None:
        self._store = store

    @mapped_errors
    async def ListImages(
        self, request: cri.ListImagesRequest, context: Any
    ) -> cri.ListImagesResponse:
        wanted = request.filter.image.image
        if wanted:
            found = find_image(self._store.list(), wanted, FILTER_FIELD)
            images = [found] if found is not None else []
        else:
            images = by_config(self._store.list())
        return cri.ListImagesResponse(images=[to_cri_image(image) for image in images])

    @mapped_errors
    async def ImageStatus(
        self, request: cri.ImageStatusRequest, context: Any
    ) -> cri.ImageStatusResponse:
        found = find_image(self._store.list(), request.image.image, IMAGE_FIELD)
        if found is None:
            return cri.ImageStatusResponse()
        info = verbose_info(self._store, found) if request.verbose else {}
        return cri.ImageStatusResponse(image=to_cri_image(found), info=info)

    @mapped_errors
    async def PullImage(self, request: cri.PullImageRequest, context: Any) -> cri.PullImageResponse:
        reference = pullable_reference(request.image.image)
        image = await self._store.pull(str(reference), credentials=credentials_of(request.auth))
        return cri.PullImageResponse(image_ref=image.config.digest)

    @mapped_errors
    async def RemoveImage(
        self, request: cri.RemoveImageRequest, context: Any
    ) -> cri.RemoveImageResponse:
        # Finding and removing do not await in between: no pull can add a reference meanwhile.
        found = find_image(self._store.list(), request.image.image, IMAGE_FIELD)
        if found is not None:
            self._store.remove_all([image.reference for image in found.images], IMAGE_FIELD)
        return cri.RemoveImageResponse()

    @mapped_errors
    async def ImageFsInfo(
        self, request: cri.ImageFsInfoRequest, context: Any
    ) -> cri.ImageFsInfoResponse:
        root = self._store.layout.root
        # A walk of every unpacked rootfs: a worker thread's work, not the event loop's. When the
        # call is cancelled the walk runs on to its end, harmlessly: it only reads.
        used_bytes, inodes_used = await asyncio.to_thread(disk_usage, root)
        usage = cri.FilesystemUsage(
            timestamp=time.time_ns(),
            fs_id=cri.FilesystemIdentifier(mountpoint=str(root)),
            used_bytes=cri.UInt64Value(value=used_bytes),
            inodes_used=cri.UInt64Value(value=inodes_used),
        )
        return cri.ImageFsInfoResponse(image_filesystems=[usage])


# ---- finding an image by any of its names ----


def find_image(images: Iterable[Image], text: str, field: str = IMAGE_FIELD) -> CriImage | None:
    """The image that `text` names among the store's `images`, None when none is named.
    InvalidArgument(field) when `text` is empty or neither an image id nor a valid reference."""
    if not text:
        raise InvalidArgument(
            field, "must name an image: a reference (HOST/NAME:TAG, NAME@sha256:...) or an id"
        )
    images = list(images)
    image_id = text if DIGEST_PATTERN.fullmatch(text) else None
    if image_id is None:
        wanted = parse_reference(text, field)
        named = [image for image in images if names(wanted, image)]
        if named:
            image_id = named[0].config.digest
        elif BARE_ID_PATTERN.fullmatch(text):
            image_id = f"sha256:{text}"  # a bare id, once it is known to be no image's name
    same = [image for image in images if image.config.digest == image_id]
    return CriImage(image_id, tuple(sorted(same, key=_reference))) if image_id and same else None


def names(wanted: Reference, image: Image) -> bool:
    """Whether `wanted` names `image`: its reference, or its repository and manifest digest."""
    if wanted.digest is None:
        return image.reference == str(wanted)
    stored = parse_reference(image.reference, "image")
    return stored.name == wanted.name and image.manifest.digest == wanted.digest


def by_config(images: Iterable[Image]) -> list[CriImage]:
    """The store's images grouped by image config, in id order."""
    groups: dict[str, list[Image]] = {}
    for image in images:
        groups.setdefault(image.config.digest, []).append(image)
    return [
        CriImage(image_id, tuple(sorted(groups[image_id], key=_reference)))
        for image_id in sorted(groups)
    ]


def pullable_reference(text: str) -> Reference:
    """The reference a PullImage names; an image id names nothing a registry has."""
    if not text:
        raise InvalidArgument(IMAGE_FIELD, "must name the image to pull: [HOST[:PORT]/]NAME[:TAG]")
    if DIGEST_PATTERN.fullmatch(text):
        raise InvalidArgument(
            IMAGE_FIELD, f"{text!r} is an image id, which cannot be pulled: name the image"
        )
    return parse_reference(text, IMAGE_FIELD)


def credentials_of(auth: cri.AuthConfig) -> Credentials:
    """The AuthConfig as credentials; `auth` (base64 USER:PASSWORD) stands for the two."""
    username, password = auth.username, auth.password
    if auth.auth and not (username or password):
        username, password = decode_auth(auth.auth, "auth.auth")
    return Credentials(
        username=username,
        password=password,
        identity_token=auth.identity_token,
        registry_token=auth.registry_token,
    )


def _reference(image: Image) -> str:
    return image.reference


# ---- the CRI's Image message ----


def to_cri_image(image: CriImage) -> cri.Image:
    references = [(parse_reference(one.reference, "image"), one) for one in image.images]
    tags = {str(ref) for ref, _ in references if ref.tag is not None and ref.digest is None}
    digests = {f"{ref.name}@{one.manifest.digest}" for ref, one in references}
    uid, username = user_of(image.images[0].user)
    return cri.Image(
        id=image.id,
        repo_tags=sorted(tags),
        repo_digests=sorted(digests),
        size=image.size,
        uid=cri.Int64Value(value=uid) if uid is not None else None,
        username=username,
        # The id, not the name asked: a status must be the same whichever name found it.
        spec=cri.ImageSpec(image=image.id),
    )


def user_of(user: str) -> tuple[int | None, str]:
    """(uid, username) of an image config's User (`user[:group]`): a uid when the user part is
    an integer, else a user name; neither when it is empty."""
    name = user.partition(":")[0]
    if UID_PATTERN.fullmatch(name) and int(name) in UID_RANGE:
        return int(name), ""
    return None, name


def verbose_info(store: ImageStore, image: CriImage) -> dict[str, str]:
    """ImageStatus' `info` when verbose: the image config, as containerd's `imageSpec`."""
    digest = image.id
    with open(store.blob_path(digest), "rb") as blob:
        config = load_json(blob.read(MAX_JSON_BLOB + 1), f"blob {digest}")
    return {"info": json.dumps({"id": digest, "imageSpec": config})}


# ---- ImageFsInfo: what the store uses on its filesystem ----


def disk_usage(root: Path) -> tuple[int, int]:
    """(bytes allocated, inodes) of the tree at `root`, on root's filesystem only and each inode
    once, like `du -x`. Image layers made the root filesystems in it, so the walk goes from
    directory descriptors opened with O_NOFOLLOW: a symlink is counted, never followed. What a
    removal takes away meanwhile is skipped."""
    top = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    top_status = os.fstat(top)
    counted = {top_status.st_ino: top_status.st_blocks}

    def count(status: os.stat_result) -> None:
        counted.setdefault(status.st_ino, status.st_blocks)

    # One descriptor per level of the directory being walked, closed on the way back up.
    stack = [(top, _entries(top))]
    try:
        while stack:
            directory, entries = stack[-1]
            entry = next(entries, None)
            if entry is None:
                os.close(stack.pop()[0])
                continue
            child = _count_entry(directory, entry, top_status.st_dev, count)
            if child is not None:
                stack.append((child, _entries(child)))
    finally:
        for directory, _ in stack:
            os.close(directory)
    return sum(counted.values()) * BLOCK_BYTES, len(counted)


def _entries(directory: int) -> Iterator[os.DirEntry[str]]:
    """The entries of an open directory, read at once (they stat through its descriptor)."""
    with os.scandir(directory) as listing:
        return iter(list(listing))


def _count_entry(
    directory: int,
    entry: os.DirEntry[str],
    device: int,
    count: Callable[[os.stat_result], None],
) -> int | None:
    """Count `entry`; return a descriptor of it when it is a directory to walk into."""
    try:
        status = entry.stat(follow_symlinks=False)
    except FileNotFoundError:
        return None
    if status.st_dev != device:
        return None  # a mount point: another filesystem
    count(status)
    if not stat.S_ISDIR(status.st_mode):
        return None
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(entry.name, flags, dir_fd=directory)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return None  # removed, or replaced by something else, since it was listed
        raise
