"""The Attach RPC: a running container's first process, its output from now on and (when its
launch kept stdin open) its input, carried by one bidirectional gRPC stream
(`containerizer attach`, `containerizer run -i`).

It ends when the container's output ends (its input may have ended before: the output goes on,
as `docker attach`'s does), or when the client goes away (detaching). Detaching never stops the
container. The CRI's Attach (adapter/cri/streaming.py) ends at the end of the client's input
instead, as the kubelet's clients expect.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.core import errors
from adapter.core.containerizer import Containerizer
from adapter.runtimes.base import AttachSession
from adapter.server import validation

QUEUED_REPLIES = 16
OUTPUT_ENDED = "output ended"  # one of stdout and stderr is at its end


async def serve_attach(
    core: Containerizer, requests: AsyncIterator[pb.AttachRequest]
) -> AsyncIterator[pb.AttachResponse]:
    first = await anext(requests, None)
    if first is None or first.WhichOneof("input") != "start":
        raise errors.InvalidArgument("start", "the first request must name the container")
    start = first.start
    container_id = validation.container_id(start.container_id, "start.container_id")
    session = await core.attach(container_id, stdout=start.stdout, stderr=start.stderr)
    try:
        yield pb.AttachResponse(tty=session.tty)
        if session.tty and start.size.columns and start.size.rows:
            session.resize(start.size.columns, start.size.rows)
        replies: asyncio.Queue[pb.AttachResponse | str] = asyncio.Queue(QUEUED_REPLIES)
        tasks = [
            asyncio.create_task(_pump(session, 1, replies)),
            asyncio.create_task(_pump(session, 2, replies)),
        ]
        if start.stdin:
            tasks.append(asyncio.create_task(_feed(session, requests)))
        try:
            outputs_open = 2
            while outputs_open:
                reply = await replies.get()
                if reply == OUTPUT_ENDED:
                    outputs_open -= 1
                elif isinstance(reply, pb.AttachResponse):
                    yield reply
        finally:
            for task in tasks:
                task.cancel()
    finally:
        session.close()


async def _pump(
    session: AttachSession, stream: int, replies: asyncio.Queue[pb.AttachResponse | str]
) -> None:
    try:
        while chunk := await session.read(stream):
            reply = (
                pb.AttachResponse(stdout=chunk) if stream == 1 else pb.AttachResponse(stderr=chunk)
            )
            await replies.put(reply)
    finally:
        await replies.put(OUTPUT_ENDED)


async def _feed(session: AttachSession, requests: AsyncIterator[pb.AttachRequest]) -> None:
    async for request in requests:
        kind = request.WhichOneof("input")
        if kind == "stdin":
            await session.write(request.stdin)
        elif kind == "close_stdin":
            break
        elif kind == "resize":
            session.resize(request.resize.columns, request.resize.rows)
    session.close_stdin()
