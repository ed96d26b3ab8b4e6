"""The connection to libvirtd, opened on demand and kept: lifecycle events go to the guests
store, a connection that drops is reopened in the background, and on every (re)open the guests
whose domains ended while nobody listened are resolved. Every call that talks to the daemon
runs in a worker thread: they block.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import libvirt  # type: ignore[import-untyped]
import libvirtaio  # type: ignore[import-untyped]

from adapter.core.errors import ContainerizerError, Unavailable
from adapter.core.services import EventLoopBinding
from adapter.runtimes.libvirt.state import Guests

log = logging.getLogger(__name__)

T = TypeVar("T")
RECONNECT_INTERVAL = 1.0
# A libvirtd that accepts the socket but does not answer must not hold a call until the
# client's deadline: it is Unavailable after this long.
CONNECT_TIMEOUT = 15.0
# Errors that say the connection to libvirtd failed, as opposed to the daemon refusing a request.
_CONNECTION_ERRORS = ("VIR_ERR_NO_CONNECT", "VIR_ERR_RPC", "VIR_ERR_AUTH_FAILED")
_CONNECTION_DOMAINS = ("VIR_FROM_RPC", "VIR_FROM_REMOTE")


def _register_event_loop(loop: asyncio.AbstractEventLoop) -> None:
    """libvirt dispatches events (and keepalives) through one event loop per process: ours."""
    libvirtaio.virEventRegisterAsyncIOImpl(loop=loop)


def libvirt_error(exc: Exception, code: int) -> bool:
    return isinstance(exc, libvirt.libvirtError) and exc.get_error_code() == code


def connection_failed(exc: libvirt.libvirtError) -> bool:
    """Whether libvirtd was not reached (Unavailable), rather than refusing the request."""
    codes = {getattr(libvirt, name) for name in _CONNECTION_ERRORS}
    domains = {getattr(libvirt, name) for name in _CONNECTION_DOMAINS}
    return exc.get_error_code() in codes or exc.get_error_domain() in domains


def _destroy_quietly(dom: Any) -> None:
    """Pull the plug on a domain whose guest has powered off; it may be gone already."""
    with contextlib.suppress(libvirt.libvirtError):
        dom.destroy()


class Connection:
    """One libvirtd connection for one driver; `get()` opens it when there is none. `events` is
    the service's record of the loop libvirt's events go through (adapter/core/services.py)."""

    def __init__(self, uri: str, guests: Guests, events: EventLoopBinding) -> None:
        self.uri = uri
        self._guests = guests
        self._events = events
        self._conn: Any = None
        self._connect_lock = asyncio.Lock()
        self._reconnect_task: asyncio.Task[None] | None = None
        self._closed = False

    async def call(self, function: Callable[..., T], *args: Any) -> T:
        """A blocking libvirt call in a worker thread, its errors as ours."""
        try:
            return await asyncio.to_thread(function, *args)
        except libvirt.libvirtError as exc:
            raise Unavailable(f"libvirt at {self.uri}: {exc.get_error_message()}") from exc

    async def get(self) -> Any:
        """The open connection, made (events registered, guests resynced) if there is none."""
        try:
            return await asyncio.wait_for(self._open(), CONNECT_TIMEOUT)
        except TimeoutError:
            raise Unavailable(
                f"libvirt at {self.uri}: no answer within {CONNECT_TIMEOUT:g}s"
            ) from None

    async def _open(self) -> Any:
        async with self._connect_lock:
            if self._conn is None:
                self._events.bind(_register_event_loop)
                conn = await self.call(libvirt.open, self.uri)
                await self.call(
                    conn.domainEventRegisterAny,
                    None,
                    libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                    self._on_lifecycle,
                    None,
                )
                await self.call(conn.registerCloseCallback, self._on_close, None)
                await self.call(conn.setKeepAlive, 5, 3)
                self._conn = conn
                await self._resync()
            return self._conn

    def _on_lifecycle(self, conn: Any, dom: Any, event: int, detail: int, opaque: Any) -> None:
        guest = self._guests.by_domain(dom.name())
        if guest is None:
            return
        loop = asyncio.get_running_loop()
        if event == libvirt.VIR_DOMAIN_EVENT_SHUTDOWN:
            guest.powered_off = True
            # The guest powered itself off (after reporting its exit over serial): nothing of
            # it is left to wait for. libvirt stops QEMU on its own too (on_poweroff destroy),
            # as fast (measured: ~0.2 s either way, its poll for the exited process); this
            # makes the end independent of the domain's on_poweroff.
            loop.run_in_executor(None, _destroy_quietly, dom)
        elif event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
            loop.call_soon(guest.resolve, "stopped")

    def _on_close(self, conn: Any, reason: int, opaque: Any) -> None:
        """libvirtd went away: reconnect, then look for guests that stopped meanwhile."""
        self._conn = None
        self.reconnect_in_background()

    def reconnect_in_background(self) -> None:
        if not self._closed and (self._reconnect_task is None or self._reconnect_task.done()):
            self._reconnect_task = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        while not self._closed:
            try:
                await self.get()
                return
            except ContainerizerError as exc:
                log.warning("libvirt: reconnect failed: %s", exc)
                await asyncio.sleep(RECONNECT_INTERVAL)

    async def _resync(self) -> None:
        """Resolve every watched guest whose domain is gone (stopped while nobody listened)."""
        for _, guest in self._guests.items():
            if guest.stopped.done():
                continue
            try:
                dom = await asyncio.to_thread(
                    self._conn.lookupByUUIDString, guest.handle.domain_uuid
                )
                active = await asyncio.to_thread(dom.isActive)
            except libvirt.libvirtError as exc:
                if not libvirt_error(exc, libvirt.VIR_ERR_NO_DOMAIN):
                    raise Unavailable(f"libvirt: {exc.get_error_message()}") from exc
                active = False
            if not active:
                guest.resolve("stopped")

    async def close(self) -> None:
        self._closed = True
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                await asyncio.to_thread(conn.unregisterCloseCallback)
                await asyncio.to_thread(conn.close)
