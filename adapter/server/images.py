"""The Images gRPC servicer: a thin façade over adapter/images/store.py.

Errors map by class (adapter/server/errors.py), for the unary RPCs and the two streaming ones
(Import, Pull) alike. Progress comes
from the store on the event loop thread and is passed on through a queue, so a slow client slows
the stream, never the import.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

from adapter.api.containerizer.v1 import images_pb2 as pb
from adapter.api.containerizer.v1 import images_pb2_grpc as pb_grpc
from adapter.core import errors
from adapter.images import Descriptor, Image, ImageStore, Progress
from adapter.images.auth import Credentials
from adapter.images.image import READ, UNPACK
from adapter.images.prune import prune
from adapter.server.errors import mapped_errors, mapped_stream_errors

log = logging.getLogger(__name__)
MAX_PATH = 4096
StreamMethod = Callable[..., AsyncIterator[pb.ImageProgress]]
PHASES = {READ: pb.Transfer.READ, UNPACK: pb.Transfer.UNPACK}


class ImagesService(pb_grpc.ImagesServicer):
    def __init__(self, store: ImageStore) -> None:
        self._store = store

    @mapped_stream_errors
    async def Import(
        self, request: pb.ImportRequest, context: Any
    ) -> AsyncIterator[pb.ImageProgress]:
        path = tarball_path(request.path)
        async for message in with_progress(lambda report: self._store.import_tarball(path, report)):
            yield message

    @mapped_stream_errors
    async def Pull(self, request: pb.PullRequest, context: Any) -> AsyncIterator[pb.ImageProgress]:
        credentials = to_credentials(request.credentials)

        async def pull(report: Progress) -> list[Image]:
            return [await self._store.pull(request.reference, report, credentials)]

        async for message in with_progress(pull):
            yield message

    @mapped_errors
    async def List(self, request: pb.ListImagesRequest, context: Any) -> pb.ListImagesResponse:
        return pb.ListImagesResponse(images=[to_image(image) for image in self._store.list()])

    @mapped_errors
    async def Remove(self, request: pb.RemoveImageRequest, context: Any) -> pb.RemoveImageResponse:
        self._store.remove(request.reference, field="reference")
        return pb.RemoveImageResponse()

    @mapped_errors
    async def Prune(self, request: pb.PruneImagesRequest, context: Any) -> pb.PruneImagesResponse:
        pruned = await prune(self._store)
        return pb.PruneImagesResponse(
            references=list(pruned.references), freed_bytes=pruned.freed_bytes
        )


def to_credentials(message: pb.RegistryCredentials) -> Credentials:
    return Credentials(
        username=message.username,
        password=message.password,
        identity_token=message.identity_token,
        registry_token=message.registry_token,
    )


def tarball_path(text: str) -> Path:
    if not text or "\x00" in text or len(text) > MAX_PATH:
        raise errors.InvalidArgument("path", "must be a non-empty path without NUL bytes")
    if not text.startswith("/"):
        raise errors.InvalidArgument("path", f"{text!r} must be absolute (the service's cwd is /)")
    return Path(text)


async def with_progress(
    work: Callable[[Progress], Coroutine[Any, Any, list[Image]]],
) -> AsyncIterator[pb.ImageProgress]:
    """Run `work(report)`, yielding each progress report as it comes, then the images."""
    updates: asyncio.Queue[pb.ImageProgress] = asyncio.Queue()

    def report(what: str, done: int, total: int, phase: str = READ) -> None:
        transfer = pb.Transfer(what=what, done_bytes=done, total_bytes=total, phase=PHASES[phase])
        updates.put_nowait(pb.ImageProgress(transfer=transfer))

    task = asyncio.create_task(work(report))
    try:
        while not task.done() or not updates.empty():
            getter = asyncio.ensure_future(updates.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield getter.result()
            else:
                getter.cancel()
        for image in task.result():
            yield pb.ImageProgress(image=to_image(image))
    finally:
        if not task.done():
            task.cancel()  # the client went away; the staging area is discarded by the store
            with contextlib.suppress(asyncio.CancelledError, errors.ContainerizerError):
                await task


def to_descriptor(descriptor: Descriptor) -> pb.Descriptor:
    return pb.Descriptor(
        media_type=descriptor.media_type, digest=descriptor.digest, size=descriptor.size
    )


def to_image(image: Image) -> pb.Image:
    return pb.Image(
        reference=image.reference,
        manifest=to_descriptor(image.manifest),
        config=to_descriptor(image.config),
        layers=[to_descriptor(layer) for layer in image.layers],
        entrypoint=list(image.entrypoint),
        cmd=list(image.cmd),
        env=[f"{name}={value}" for name, value in image.env],
        working_dir=image.working_dir,
        user=image.user,
        size=image.size,
    )
