"""The PortForward RPC: one TCP connection, made from inside a running container's network
namespace to its 127.0.0.1, carried by one bidirectional gRPC stream
(`containerizer port-forward`). Either side's end closes the other's."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.core import errors
from adapter.core.containerizer import Containerizer
from adapter.core.model import State
from adapter.server import validation
from adapter.server.netns import open_connection

READ_CHUNK = 64 * 1024


def container_netns(core: Containerizer, container_id: str) -> str:
    """The network namespace of a running container: its init's."""
    record = core.status(container_id)
    if record.state is not State.RUNNING or record.pid <= 0:
        raise errors.FailedPrecondition(f"container {container_id!r} is not running here")
    return f"/proc/{record.pid}/ns/net"


async def connect(
    core: Containerizer, container_id: str, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    netns = container_netns(core, container_id)
    try:
        return await open_connection(netns, port)
    except ConnectionRefusedError:
        raise errors.FailedPrecondition(
            f"container {container_id!r}: nothing listens on port {port}"
        ) from None
    except OSError as exc:
        raise errors.FailedPrecondition(
            f"container {container_id!r}: cannot connect to port {port}: {exc.strerror}"
        ) from None


async def serve_port_forward(
    core: Containerizer, requests: AsyncIterator[pb.PortForwardRequest]
) -> AsyncIterator[pb.PortForwardResponse]:
    first = await anext(requests, None)
    if first is None or first.WhichOneof("input") != "start":
        raise errors.InvalidArgument("start", "the first request must name the container and port")
    container_id = validation.container_id(first.start.container_id, "start.container_id")
    port = first.start.port
    if not 0 < port < 65536:
        raise errors.InvalidArgument("start.port", f"{port} is not a TCP port (1-65535)")
    reader, writer = await connect(core, container_id, port)
    sender = asyncio.create_task(_send(requests, writer))
    try:
        while data := await reader.read(READ_CHUNK):
            yield pb.PortForwardResponse(data=data)
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await sender
        writer.close()


async def _send(
    requests: AsyncIterator[pb.PortForwardRequest], writer: asyncio.StreamWriter
) -> None:
    async for request in requests:
        if request.WhichOneof("input") == "data":
            writer.write(request.data)
            await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()  # the client is done sending: half-close, as TCP would
