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
from adapter.server.output import STDOUT, interleaved_output


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
        feeder = asyncio.create_task(_feed(session, requests)) if start.stdin else None
        try:
            async for stream, chunk in interleaved_output(session):
                if stream == STDOUT:
                    yield pb.AttachResponse(stdout=chunk)
                else:
                    yield pb.AttachResponse(stderr=chunk)
        finally:
            if feeder is not None:
                feeder.cancel()
    finally:
        session.close()


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
