"""Load an image from our store into containerd and unpack it into snapshots.

containerd 1.6 (Debian 12) has no Transfer API, so this does what its client's unpacker does:
content.Write of every blob (layers, config, then the manifest, with the garbage-collector
labels that tie them together), images.Create of the reference, then per layer snapshots.Prepare
on the parent chain, diff.Apply of the layer into the prepared mounts, and snapshots.Commit under
the layer's chain id. The image record roots it all, so it outlives the containers using it; it
is removed when our store no longer has the image (see ContainerdDriver.recover).

Everything is written under the caller's lease, so nothing is collected halfway.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
from google.protobuf import field_mask_pb2  # type: ignore[import-untyped, unused-ignore]

from adapter.api.containerd.services.content.v1 import content_pb2
from adapter.api.containerd.services.diff.v1 import diff_pb2
from adapter.api.containerd.services.images.v1 import images_pb2
from adapter.api.containerd.services.snapshots.v1 import snapshots_pb2
from adapter.api.containerd.types import descriptor_pb2
from adapter.core.errors import AlreadyExists, LaunchFailed, NotFound
from adapter.images.image import Descriptor, Image
from adapter.runtimes.containerd.client import ContainerdClient

WRITE_CHUNK = 1024 * 1024
GC_CONFIG = "containerd.io/gc.ref.content.config"
GC_LAYER = "containerd.io/gc.ref.content.l.{index}"
GC_SNAPSHOT = "containerd.io/gc.ref.snapshot.{snapshotter}"
UNCOMPRESSED = "containerd.io/uncompressed"


def chain_ids(diff_ids: tuple[str, ...]) -> list[str]:
    """The OCI image-spec ChainID of every layer prefix: the snapshot names of the unpack."""
    chain: list[str] = []
    for diff_id in diff_ids:
        if not chain:
            chain.append(diff_id)
        else:
            joined = f"{chain[-1]} {diff_id}".encode()
            chain.append("sha256:" + hashlib.sha256(joined).hexdigest())
    return chain


def _descriptor(value: Descriptor) -> descriptor_pb2.Descriptor:
    return descriptor_pb2.Descriptor(
        media_type=value.media_type, digest=value.digest, size=value.size
    )


class ImageLoader:
    """Loads images of one store into one containerd namespace; one load per image at a time."""

    def __init__(self, client: ContainerdClient, blob_path: Callable[[str], Path]) -> None:
        self._client = client
        self._blob_path = blob_path
        self._locks: dict[str, asyncio.Lock] = {}
        # (reference, manifest digest, snapshotter) -> top chain id, of images found or made
        # current in containerd: a launch of one of them makes no call here and takes no lock,
        # so parallel launches of one image do not queue. Stale when something outside removes
        # the image from containerd: the caller finds out (its snapshot's parent is gone) and
        # calls `forget`.
        self._unpacked: dict[tuple[str, str, str], str] = {}

    async def ensure_unpacked(self, image: Image, snapshotter: str, lease: str) -> str:
        """The committed snapshot (chain id) of the image's top layer, loading what is missing."""
        key = (image.reference, image.manifest.digest, snapshotter)
        top = self._unpacked.get(key)
        if top is not None:
            return top
        if len(image.diff_ids) != len(image.layers) or not image.layers:
            raise LaunchFailed(
                f"image {image.reference!r}: its config lists {len(image.diff_ids)} diff_ids for"
                f" {len(image.layers)} layers; cannot unpack it"
            )
        chain = chain_ids(image.diff_ids)
        lock = self._locks.setdefault(image.manifest.digest, asyncio.Lock())
        async with lock:
            if not (
                await self._image_current(image)
                and await self._snapshot_exists(snapshotter, chain[-1])
            ):
                await self._load(image, chain, snapshotter, lease)
            # The reference now names this manifest: an entry for another one is stale.
            self.forget(image.reference)
            self._unpacked[key] = chain[-1]
        return chain[-1]

    def forget(self, reference: str) -> None:
        """The next launch of `reference` checks containerd again (and loads what is missing)."""
        for key in [key for key in self._unpacked if key[0] == reference]:
            del self._unpacked[key]

    async def _load(self, image: Image, chain: list[str], snapshotter: str, lease: str) -> None:
        await self._load_content(image, lease)
        await self._create_image(image)
        for index, layer in enumerate(image.layers):
            parent = chain[index - 1] if index else ""
            await self._unpack_layer(
                layer, image.diff_ids[index], chain[index], parent, snapshotter, lease
            )
        await self._label_config(image, snapshotter, chain[-1])

    async def _image_current(self, image: Image) -> bool:
        try:
            reply = await self._client.call(
                self._client.images.Get,
                images_pb2.GetImageRequest(name=image.reference),
                f"get image {image.reference}",
            )
        except NotFound:
            return False
        return bool(reply.image.target.digest == image.manifest.digest)

    async def _snapshot_exists(self, snapshotter: str, name: str) -> bool:
        return await snapshot_exists(self._client, snapshotter, name)

    # ---- content ----

    async def _load_content(self, image: Image, lease: str) -> None:
        manifest_labels = {GC_CONFIG: image.config.digest}
        for index, layer in enumerate(image.layers):
            manifest_labels[GC_LAYER.format(index=index)] = layer.digest
            await self._write_blob(layer, {UNCOMPRESSED: image.diff_ids[index]}, lease)
        await self._write_blob(image.config, {}, lease)
        await self._write_blob(image.manifest, manifest_labels, lease)

    async def _write_blob(self, blob: Descriptor, labels: dict[str, str], lease: str) -> None:
        try:
            await self._client.call(
                self._client.content.Info,
                content_pb2.InfoRequest(digest=blob.digest),
                f"content info {blob.digest}",
            )
            return
        except NotFound:
            pass
        ref = f"containerizer-{blob.digest.replace(':', '-')}"
        with contextlib.suppress(NotFound):  # an ingest a crashed launch left behind
            await self._client.call(
                self._client.content.Abort, content_pb2.AbortRequest(ref=ref), f"abort {ref}"
            )
        call = self._client.content.Write(metadata=self._client.metadata(lease))
        try:
            async for request in self._write_requests(blob, ref, labels):
                await call.write(request)
                await call.read()
            await call.done_writing()
        except grpc.aio.AioRpcError as exc:
            error = self._client.error(exc, f"write {blob.digest} into containerd")
            if not isinstance(error, AlreadyExists):  # AlreadyExists: another writer won
                raise error from exc
        finally:
            call.cancel()

    async def _write_requests(
        self, blob: Descriptor, ref: str, labels: dict[str, str]
    ) -> AsyncIterator[content_pb2.WriteContentRequest]:
        path = self._blob_path(blob.digest)
        offset = 0
        with path.open("rb") as source:
            while True:
                data = await asyncio.to_thread(source.read, WRITE_CHUNK)
                last = offset + len(data) >= blob.size
                yield content_pb2.WriteContentRequest(
                    action=content_pb2.COMMIT if last else content_pb2.WRITE,
                    ref=ref,
                    total=blob.size,
                    expected=blob.digest,
                    offset=offset,
                    data=data,
                    labels=labels if last else None,
                )
                offset += len(data)
                if last or not data:
                    return

    async def _create_image(self, image: Image) -> None:
        record = images_pb2.Image(name=image.reference, target=_descriptor(image.manifest))
        try:
            await self._client.call(
                self._client.images.Create,
                images_pb2.CreateImageRequest(image=record),
                f"create image {image.reference}",
            )
        except AlreadyExists:  # re-imported under the same name: point it at the new manifest
            await self._client.call(
                self._client.images.Update,
                images_pb2.UpdateImageRequest(
                    image=record, update_mask=field_mask_pb2.FieldMask(paths=["target"])
                ),
                f"update image {image.reference}",
            )

    # ---- snapshots ----

    async def _unpack_layer(
        self,
        layer: Descriptor,
        diff_id: str,
        chain_id: str,
        parent: str,
        snapshotter: str,
        lease: str,
    ) -> None:
        if await self._snapshot_exists(snapshotter, chain_id):
            return
        key = f"extract-{uuid.uuid4().hex}-{chain_id}"
        client = self._client
        prepared = await client.call(
            client.snapshots.Prepare,
            snapshots_pb2.PrepareSnapshotRequest(snapshotter=snapshotter, key=key, parent=parent),
            f"prepare snapshot for layer {layer.digest}",
            lease=lease,
        )
        try:
            applied = await client.call(
                client.diff.Apply,
                diff_pb2.ApplyRequest(diff=_descriptor(layer), mounts=prepared.mounts),
                f"apply layer {layer.digest}",
                lease=lease,
                timeout=None,
            )
            if applied.applied.digest != diff_id:
                raise LaunchFailed(
                    f"layer {layer.digest} unpacked to {applied.applied.digest}, but the image"
                    f" config says {diff_id}"
                )
            await client.call(
                client.snapshots.Commit,
                snapshots_pb2.CommitSnapshotRequest(
                    snapshotter=snapshotter, name=chain_id, key=key
                ),
                f"commit snapshot {chain_id}",
                lease=lease,
            )
        except AlreadyExists:
            pass  # another loader committed the same layer first
        finally:
            with contextlib.suppress(NotFound):  # committed: the key is gone
                await client.call(
                    client.snapshots.Remove,
                    snapshots_pb2.RemoveSnapshotRequest(snapshotter=snapshotter, key=key),
                    f"remove snapshot {key}",
                )

    async def _label_config(self, image: Image, snapshotter: str, top: str) -> None:
        """The config's label roots the unpacked snapshots at the image, as containerd does."""
        label = GC_SNAPSHOT.format(snapshotter=snapshotter)
        await self._client.call(
            self._client.content.Update,
            content_pb2.UpdateRequest(
                info=content_pb2.Info(digest=image.config.digest, labels={label: top}),
                update_mask=field_mask_pb2.FieldMask(paths=[f"labels.{label}"]),
            ),
            f"label config {image.config.digest}",
        )


async def snapshot_exists(client: ContainerdClient, snapshotter: str, name: str) -> bool:
    try:
        await client.call(
            client.snapshots.Stat,
            snapshots_pb2.StatSnapshotRequest(snapshotter=snapshotter, key=name),
            f"stat snapshot {name}",
        )
    except NotFound:
        return False
    return True
