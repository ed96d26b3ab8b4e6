"""A running command's (or an attached container's) stdout and stderr as one stream of chunks,
for the Exec and Attach RPCs: each read as it comes, neither waiting on the other."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from adapter.runtimes.base import AttachSession, ExecSession

QUEUED_CHUNKS = 16
STDOUT, STDERR = 1, 2


async def interleaved_output(
    session: ExecSession | AttachSession,
) -> AsyncIterator[tuple[int, bytes]]:
    """(STDOUT or STDERR, chunk) as the chunks come, until both streams have ended."""
    chunks: asyncio.Queue[tuple[int, bytes] | None] = asyncio.Queue(QUEUED_CHUNKS)

    async def pump(stream: int) -> None:
        try:
            while chunk := await session.read(stream):
                await chunks.put((stream, chunk))
        finally:
            await chunks.put(None)

    pumps = [asyncio.create_task(pump(stream)) for stream in (STDOUT, STDERR)]
    try:
        ended = 0
        while ended < len(pumps):
            item = await chunks.get()
            if item is None:
                ended += 1
            else:
                yield item
    finally:
        for task in pumps:
            task.cancel()
