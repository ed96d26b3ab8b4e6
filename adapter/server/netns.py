"""A TCP connection from the service into a pod's network namespace (CRI PortForward).

A socket belongs to the network namespace its creator was in when it was made. So a thread of
its own switches into the pod's namespace, makes the socket there, and ends; the socket is then
used from the event loop like any other. Only that short-lived thread ever moves (never one of
a pool that other work reuses): the rest of the service stays in the host's namespace.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import socket
import threading

CLONE_NEWNET = 0x40000000
CONNECT_TIMEOUT_S = 10.0
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


def _socket_in(netns_path: str, port: int) -> socket.socket:
    """Run on a thread of its own, which ends in the pod's namespace."""
    target = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
    finally:
        os.close(target)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(CONNECT_TIMEOUT_S)
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def _on_own_thread(netns_path: str, port: int) -> socket.socket:
    loop = asyncio.get_running_loop()
    result: asyncio.Future[socket.socket] = loop.create_future()

    def run() -> None:
        try:
            sock = _socket_in(netns_path, port)
        except BaseException as exc:  # delivered to the awaiting task
            loop.call_soon_threadsafe(_settle, result, None, exc)
        else:
            loop.call_soon_threadsafe(_settle, result, sock, None)

    threading.Thread(target=run, name="cri-netns-connect", daemon=True).start()
    return await result


def _settle(
    result: asyncio.Future[socket.socket], sock: socket.socket | None, error: BaseException | None
) -> None:
    if result.cancelled():
        if sock is not None:
            sock.close()
    elif error is not None:
        result.set_exception(error)
    else:
        assert sock is not None
        result.set_result(sock)


async def open_connection(
    netns_path: str | None, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to 127.0.0.1:`port` inside the namespace at `netns_path` (None: the host's,
    for a pod on the host's network)."""
    if netns_path is None:
        return await asyncio.open_connection("127.0.0.1", port)
    sock = await _on_own_thread(netns_path, port)
    return await asyncio.open_connection(sock=sock)
