"""The metrics listener: `/metrics` (Prometheus text) and `/healthz`, on a loopback address.

A few lines of HTTP/1.1 on asyncio streams, in the service's own loop: the scrape reads the
core's state where it lives, with no thread and no web framework. One request per connection;
anything but GET or HEAD of the two paths is answered 404 or 405.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)

# A scraper's request is a line and a few headers; anything slower or larger is dropped.
REQUEST_TIMEOUT_SECONDS = 10.0
REQUEST_LIMIT_BYTES = 16 << 10
REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}

Scrape = Callable[[], Awaitable[bytes]]


class MetricsEndpoint:
    """Serves `scrape()` at /metrics; /healthz is 503 until `ready` is set (recovery done)."""

    def __init__(self, scrape: Scrape) -> None:
        self._scrape = scrape
        self.ready = False
        self._server: asyncio.Server | None = None

    async def start(self, address: str) -> str:
        """Listen on HOST:PORT (port 0: any free one); returns the address bound."""
        host, _, port = address.rpartition(":")
        self._server = await asyncio.start_server(
            self._answer, host.strip("[]"), int(port), limit=REQUEST_LIMIT_BYTES
        )
        bound = self._server.sockets[0].getsockname()
        return f"{address.rpartition(':')[0]}:{bound[1]}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_SECONDS)
            method, _, rest = head.decode("latin-1").partition(" ")
            path = rest.partition(" ")[0].partition("?")[0]
            status, content_type, body = await self._route(method, path)
            writer.write(_response(status, content_type, body, head_only=method == "HEAD"))
            writer.close()  # once the answer is sent
            # A client that does not read its answer in time (as a slowloris does not send
            # its request) must not hold the connection, its task and the answer's memory.
            await asyncio.wait_for(writer.wait_closed(), REQUEST_TIMEOUT_SECONDS)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # a client that sent no complete request in time gets nothing
        except ConnectionError:
            pass  # the scraper went away
        except Exception:
            log.exception("metrics request failed")
        finally:
            if not writer.transport.is_closing() or writer.transport.get_write_buffer_size():
                writer.transport.abort()  # closed now, whatever is left unsent

    async def _route(self, method: str, path: str) -> tuple[int, str, bytes]:
        if path not in ("/metrics", "/healthz"):
            return 404, "text/plain", b"not found: try /metrics or /healthz\n"
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"only GET and HEAD\n"
        if path == "/healthz":
            return (
                (200, "text/plain", b"ok\n") if self.ready else (503, "text/plain", b"starting\n")
            )
        return 200, CONTENT_TYPE_LATEST, await self._scrape()


def _response(status: int, content_type: str, body: bytes, *, head_only: bool) -> bytes:
    head = (
        f"HTTP/1.1 {status} {REASONS[status]}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + (b"" if head_only else body)
