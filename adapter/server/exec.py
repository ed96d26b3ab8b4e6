"""The Exec RPC: a command inside a running container, its input and output carried by one
bidirectional gRPC stream (`containerizer exec`).

The first request starts the command; its output is sent as it comes, the exit code last. The
command ends with the stream: a client that goes away (or cancels) gets its command killed, so
nothing runs on that nobody can see.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.core import errors
from adapter.core.containerizer import Containerizer
from adapter.runtimes.base import ExecSession
from adapter.server import validation
from adapter.server.output import STDOUT, interleaved_output

log = logging.getLogger(__name__)

MAX_ARGS = 4096


def exec_start(message: pb.ExecRequest) -> tuple[str, tuple[str, ...], pb.ExecStart]:
    if message.WhichOneof("input") != "start":
        raise errors.InvalidArgument("start", "the first request must start the command")
    start = message.start
    container_id = validation.container_id(start.container_id, "start.container_id")
    if not start.argv:
        raise errors.InvalidArgument("start.argv", "is empty: name the command to run")
    if len(start.argv) > MAX_ARGS:
        raise errors.InvalidArgument("start.argv", f"more than {MAX_ARGS} arguments")
    for index, argument in enumerate(start.argv):
        if "\x00" in argument:
            raise errors.InvalidArgument(f"start.argv[{index}]", "contains a NUL byte")
    validation.exec_size(start.argv, ())
    return container_id, tuple(start.argv), start


async def serve_exec(
    core: Containerizer, requests: AsyncIterator[pb.ExecRequest]
) -> AsyncIterator[pb.ExecResponse]:
    """The replies of one Exec stream; raises our errors for the servicer to map."""
    first = await anext(requests, None)
    if first is None:
        raise errors.InvalidArgument("start", "the stream ended before a start request")
    container_id, argv, start = exec_start(first)
    session = await core.exec_stream(container_id, argv, tty=start.tty)
    try:
        if start.tty and start.size.columns and start.size.rows:
            session.resize(start.size.columns, start.size.rows)
        if not start.stdin:
            session.close_stdin()
        feeder = asyncio.create_task(_feed(session, requests, start.stdin))
        try:
            async for stream, chunk in interleaved_output(session):
                yield (
                    pb.ExecResponse(stdout=chunk)
                    if stream == STDOUT
                    else pb.ExecResponse(stderr=chunk)
                )
            yield pb.ExecResponse(exit_code=await session.wait())
        finally:
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await feeder
    finally:
        session.kill()  # a no-op once it ended; ends it when the client went away
        session.close()


async def _feed(session: ExecSession, requests: AsyncIterator[pb.ExecRequest], stdin: bool) -> None:
    async for request in requests:
        kind = request.WhichOneof("input")
        if kind == "stdin" and stdin:
            await session.write(request.stdin)
        elif kind == "close_stdin":
            session.close_stdin()
        elif kind == "resize":
            session.resize(request.resize.columns, request.resize.rows)
    session.close_stdin()  # the client half-closed: end of input
