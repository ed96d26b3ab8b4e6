"""Named network namespaces (`ip netns` compatible: bind mounts under /run/netns), without forking.

pyroute2 creates namespaces and per-namespace sockets in a forked child; forking the service (a
multi-threaded gRPC process) is unsafe. A namespace is per thread on Linux, so we do it in a
fresh, short-lived thread instead: the thread unshares (or setns-es into) the namespace, opens what
it needs there, and exits. It never has to switch back, so no pooled thread is ever left in a
container's namespace.

Names are `<bridge>.<container_id>`: bridge names may not contain a dot, so `<bridge>.` marks
the namespaces of one service instance, which is what recovery sweeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import hashlib
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
MS_BIND = 4096
MS_REC = 16384
MS_SHARED = 1 << 20
MNT_DETACH = 2
NETLINK_ROUTE = 0

_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


def _check(result: int, what: str, path: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)


def netns_prefix(bridge: str, state_dir: Path) -> str:
    """`<bridge>.<owner>`: the owner (a hash of the service's state directory) keeps one
    service's recovery sweep off another's namespaces on the same node."""
    owner = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:8]
    return f"{bridge}.{owner}"


def netns_name(prefix: str, container_id: str) -> str:
    return f"{prefix}.{container_id}"


def netns_path(prefix: str, container_id: str) -> Path:
    return NETNS_DIR / netns_name(prefix, container_id)


async def in_fresh_thread(work: Callable[[], T]) -> T:
    """Run `work` in a new thread that ends with it, and await its result. A cancelled caller
    still waits for the thread to end before the cancellation goes on: a thread cannot be
    stopped, and what it makes (a namespace, a pin) must exist before the caller's rollback
    looks for it, or it is left behind."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def run() -> None:
        try:
            result = work()
        except BaseException as exc:  # handed to the awaiting coroutine
            loop.call_soon_threadsafe(_settle, done, None, exc)
        else:
            loop.call_soon_threadsafe(_settle, done, result, None)

    threading.Thread(target=run, name="netns", daemon=True).start()
    try:
        return await asyncio.shield(done)
    except asyncio.CancelledError:
        while not done.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([done])
        raise


def _settle(future: asyncio.Future[T], result: T | None, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)  # type: ignore[arg-type]


def _share_run_dir() -> None:
    """Make /run/netns a shared mount point of its own, as `ip netns add` does. If it were not,
    the first `ip netns add` on the node would bind-mount it over itself and hide every
    namespace mounted before under the new mount, where it can be neither unmounted nor
    unlinked (EBUSY). Shared, a namespace removed on the host also goes from mount namespaces
    created meanwhile."""
    NETNS_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    directory = os.fsencode(NETNS_DIR)
    if _libc.mount(b"", directory, b"none", MS_SHARED | MS_REC, None) == 0:
        return
    _check(
        _libc.mount(directory, directory, b"none", MS_BIND | MS_REC, None), "bind", str(NETNS_DIR)
    )
    _check(_libc.mount(b"", directory, b"none", MS_SHARED | MS_REC, None), "share", str(NETNS_DIR))


def _create(path: Path) -> None:
    """In a throwaway thread: a new netns, bind-mounted at `path` so it outlives the thread."""
    _share_run_dir()
    os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o444))
    try:
        _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)", str(path))
        source = b"/proc/thread-self/ns/net"
        _check(
            _libc.mount(source, os.fsencode(path), b"none", MS_BIND, None), "bind mount", str(path)
        )
    except BaseException:
        os.unlink(path)
        raise


async def create(path: Path, then: Callable[[], None] | None = None) -> None:
    """Create the named namespace at `path`; FileExistsError if the name is taken. `then` runs
    next in the same throwaway thread, still inside the new namespace; if it fails, the
    namespace is left to the caller's rollback."""

    def work() -> None:
        _create(path)
        if then is not None:
            then()

    await in_fresh_thread(work)


def _adopt(path: Path, source: Path) -> None:
    """`_create` for a namespace that already exists: bind-mount `source` at `path`."""
    _share_run_dir()
    os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o444))
    try:
        _check(
            _libc.mount(os.fsencode(source), os.fsencode(path), b"none", MS_BIND, None),
            "bind mount",
            str(path),
        )
    except BaseException:
        os.unlink(path)
        raise


async def adopt(path: Path, source: Path) -> None:
    """Name an existing namespace (`source`, e.g. /proc/<pid>/ns/net of a runtime's sandbox
    process) at `path`, so it is ours from here on exactly as one `create` made: the bind mount
    keeps it alive after that process is gone, and `remove` lets it go. For runtimes that
    cannot join a namespace by path (Docker) and make one of their own instead."""
    await in_fresh_thread(lambda: _adopt(path, source))


def _netlink_socket_in(path: Path) -> socket.socket:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_libc.setns(fd, CLONE_NEWNET), "setns", str(path))
    finally:
        os.close(fd)
    return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_ROUTE)


async def netlink_socket_in(path: Path) -> socket.socket:
    """An rtnetlink socket that talks to the namespace at `path` (a socket keeps the namespace
    it was created in), for pyroute2's AsyncIPRoute(fileno=...)."""
    return await in_fresh_thread(lambda: _netlink_socket_in(path))


MAX_STACKED_MOUNTS = 64


def remove(path: Path) -> None:
    """Unmount and unlink. Unlinking also detaches the copies of this mount that containers'
    mount namespaces took (Linux >= 3.18), so the namespace really goes. Idempotent.

    The bind mount can be stacked more than once on the file when a mount namespace that is a
    shared peer of ours (another runtime's) propagates it back; unmount until none is left, or
    unlink fails with EBUSY."""
    for _ in range(MAX_STACKED_MOUNTS):
        if _libc.umount2(os.fsencode(path), MNT_DETACH) != 0:
            break  # EINVAL: nothing (more) mounted there; ENOENT: already gone
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise


def names_with_prefix(prefix: str) -> list[str]:
    try:
        return sorted(name for name in os.listdir(NETNS_DIR) if name.startswith(prefix))
    except FileNotFoundError:
        return []
