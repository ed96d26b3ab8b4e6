"""Image snapshots owned by a user namespace's ids, for containerd 1.6 and runc 1.1.

Neither has idmapped root filesystems (containerd's remapping snapshotter option came in 2.0),
and a container whose root is host uid N sees an image's files, owned by host ids from 0, as
nobody's: its root could not change /etc. So each mapping gets its own committed copy of the
image's top snapshot with every owner moved into the range (uid u -> start + u), a child of the
image's snapshots (overlay copies up what the chown touches: the metadata and the data of
regular files), and the container's writable snapshot is prepared from it.

Why a committed parent rather than chowning the container's own upper layer: the upper starts
empty, so changing the image's files there would copy up the whole image at every launch; the
parent is made once per (image, mapping) and reused by every later container of that mapping
(the allocator hands out the lowest free range first, so mappings recur). It lives as long as
the image: the image config's gc label references it, as it references the unpacked layers.
"""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import tempfile
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from google.protobuf import field_mask_pb2  # type: ignore[import-untyped, unused-ignore]

from adapter.api.containerd.services.content.v1 import content_pb2
from adapter.api.containerd.services.snapshots.v1 import snapshots_pb2
from adapter.core.errors import LaunchFailed
from adapter.core.model import IdMapping
from adapter.runtimes.containerd.client import ContainerdClient
from adapter.runtimes.containerd.content import GC_SNAPSHOT, snapshot_exists

# chown clears these on a file; they are put back, as the image had them.
PRIVILEGE_BITS = stat.S_ISUID | stat.S_ISGID


def remapped_name(top: str, mapping: IdMapping) -> str:
    return f"{top}/userns-{mapping.uid_start}-{mapping.gid_start}-{mapping.size}"


class RemappedSnapshots:
    """The remapped parents of one containerd namespace, made once per (image, mapping)."""

    def __init__(self, client: ContainerdClient) -> None:
        self._client = client
        self._locks: dict[str, asyncio.Lock] = {}

    async def parent(
        self, top: str, mapping: IdMapping, *, snapshotter: str, config_digest: str, lease: str
    ) -> str:
        """The committed snapshot of `top` owned by `mapping`'s ids, made if missing."""
        name = remapped_name(top, mapping)
        async with self._locks.setdefault(name, asyncio.Lock()):
            if not await snapshot_exists(self._client, snapshotter, name):
                await self._make(top, name, mapping, snapshotter, lease)
                await self._reference(name, snapshotter, config_digest)
        return name

    async def _make(
        self, top: str, name: str, mapping: IdMapping, snapshotter: str, lease: str
    ) -> None:
        work = f"{name}-work-{uuid.uuid4().hex[:12]}"
        prepared = await self._client.call(
            self._client.snapshots.Prepare,
            snapshots_pb2.PrepareSnapshotRequest(snapshotter=snapshotter, key=work, parent=top),
            f"prepare snapshot {work}",
            lease=lease,
        )
        try:
            await asyncio.to_thread(_chown_mounted, list(prepared.mounts), mapping)
            await self._client.call(
                self._client.snapshots.Commit,
                snapshots_pb2.CommitSnapshotRequest(snapshotter=snapshotter, name=name, key=work),
                f"commit snapshot {name}",
                lease=lease,
            )
        except BaseException:
            await self._client.call(
                self._client.snapshots.Remove,
                snapshots_pb2.RemoveSnapshotRequest(snapshotter=snapshotter, key=work),
                f"remove snapshot {work}",
            )
            raise

    async def _reference(self, name: str, snapshotter: str, config_digest: str) -> None:
        """Kept as long as the image: a gc reference from its config, beside the layers'."""
        label = f"{GC_SNAPSHOT.format(snapshotter=snapshotter)}/{name.rpartition('/')[2]}"
        await self._client.call(
            self._client.content.Update,
            content_pb2.UpdateRequest(
                info=content_pb2.Info(digest=config_digest, labels={label: name}),
                update_mask=field_mask_pb2.FieldMask(paths=[f"labels.{label}"]),
            ),
            f"label config {config_digest}",
        )


def _chown_mounted(mounts: list[Any], mapping: IdMapping) -> None:
    """Mount the prepared snapshot on a private directory of ours, move every owner into the
    mapping, unmount. Nothing else can reach the directory, and no symlink is followed."""
    with tempfile.TemporaryDirectory(prefix="containerizer-remap-") as directory:
        for mount in mounts:
            _mount(mount, directory)
        try:
            shift_owners(Path(directory), mapping)
        finally:
            subprocess.run(["umount", directory], check=False, capture_output=True)


def _mount(mount: Any, target: str) -> None:
    options = ",".join(mount.options)
    command = ["mount", "-t", mount.type, "-o", options, mount.source, target]
    if mount.type == "bind":
        command = ["mount", "--bind", mount.source, target]
        if "ro" in mount.options:
            raise LaunchFailed("containerd gave a read-only snapshot to remap")
    result = subprocess.run(command, check=False, capture_output=True, text=True)
    if result.returncode != 0:
        raise LaunchFailed(f"mount the snapshot to remap: {result.stderr.strip()}")


def shift_owners(root: Path, mapping: IdMapping) -> None:
    """Every file's owner u:g under root (root included) becomes start+u : start+g."""
    _shift(str(root), mapping)
    for directory, dirs, files in os.walk(root, followlinks=False):
        _shift_all(directory, (*dirs, *files), mapping)


def _shift_all(directory: str, names: Iterable[str], mapping: IdMapping) -> None:
    for name in names:
        _shift(os.path.join(directory, name), mapping)


def _shift(path: str, mapping: IdMapping) -> None:
    info = os.lstat(path)
    if info.st_uid >= mapping.size or info.st_gid >= mapping.size:
        return  # an owner the namespace cannot map stays as it is (nobody inside)
    os.chown(
        path, mapping.host_uid(info.st_uid), mapping.host_gid(info.st_gid), follow_symlinks=False
    )
    if not stat.S_ISLNK(info.st_mode) and info.st_mode & PRIVILEGE_BITS:
        os.chmod(path, stat.S_IMODE(info.st_mode))  # a file of our private mount: no link
