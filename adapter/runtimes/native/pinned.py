"""A pod's UTS and IPC namespaces held by bind mounts instead of a process.

A pod whose containers share no pid namespace (the kubelet's default: each container its own)
needs a holder only to keep its namespaces alive between its containers. A bind mount of a
namespace's /proc file keeps it alive as a process does (as `ip netns add` does for a network
namespace, and the network isolator for every container's), so such a pod costs no process, no
cgroups and no supervisor: a throwaway thread unshares the two namespaces, sets the hostname and
the IPC (and, in the pod's network namespace, the network) sysctls, bind-mounts
/proc/thread-self/ns/{uts,ipc} onto files in the holder's run directory, and ends.

The run directory is root's (0700) and the workload never sees it; the files are removed by
`unpin_directory`: unmount, then unlink, which also detaches the copies of the mount that mount
namespaces created meanwhile took (Linux >= 3.18), so the namespaces really go.
"""

from __future__ import annotations

import ctypes
import os
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path

from isolators.network import netns

CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000
PINNABLE = {"uts": CLONE_NEWUTS, "ipc": CLONE_NEWIPC}

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _write_sysctl(key: str, value: str) -> None:
    """A key the launch's checks allowed (namespaced, no '..'), in the calling thread's
    namespaces: /proc/sys answers for the task that opens it."""
    with open("/proc/sys/" + key.replace(".", "/"), "w") as file:
        file.write(value)


def _pin(
    directory: str,
    kinds: Sequence[str],
    hostname: str,
    sysctls: Sequence[tuple[str, str]],
    network: str | None,
) -> dict[str, str]:
    """In a throwaway thread: new namespaces of `kinds`, set up, bound at directory/<kind>."""
    flags = 0
    for kind in kinds:
        flags |= PINNABLE[kind]
    _check(_libc.unshare(flags), "unshare")
    if "uts" in kinds:
        socket.sethostname(hostname)
    for key, value in sysctls:
        if not key.startswith("net."):
            _write_sysctl(key, value)
    pinned: dict[str, str] = {}
    for kind in kinds:
        path = os.path.join(directory, kind)
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444))
        source = f"/proc/thread-self/ns/{kind}".encode()
        _check(_libc.mount(source, path.encode(), b"none", netns.MS_BIND, None), "bind mount")
        pinned[kind] = path
    network_sysctls = [(k, v) for k, v in sysctls if k.startswith("net.")]
    if network is not None and network_sysctls:
        fd = os.open(network, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _check(_libc.setns(fd, CLONE_NEWNET), "setns")
        finally:
            os.close(fd)
        for key, value in network_sysctls:
            _write_sysctl(key, value)
    return pinned


async def pin(
    directory: str,
    kinds: Sequence[str],
    *,
    hostname: str,
    sysctls: Sequence[tuple[str, str]] = (),
    network: str | None = None,
) -> dict[str, str]:
    """kind -> the file that holds the new namespace, for each of `kinds` (uts, ipc); the
    hostname set in the UTS one; `sysctls` written in the new IPC namespace and, for net.*
    keys, in the network namespace at `network`. A failure leaves files for `unpin_directory`."""
    return await netns.in_fresh_thread(
        lambda: _pin(directory, tuple(kinds), hostname, tuple(sysctls), network)
    )


def unpin_directory(directory: str) -> None:
    """Let go the namespaces a run directory pins, whatever a crash left of them; idempotent."""
    for kind in PINNABLE:
        netns.remove(Path(directory, kind))


def still_pinned(pinned: Mapping[str, str]) -> bool:
    """Whether every file still holds its namespace (a mount point: another device than its
    directory's), e.g. after a restart of the service."""
    try:
        return all(
            os.stat(path).st_dev != os.stat(os.path.dirname(path)).st_dev
            for path in pinned.values()
        )
    except FileNotFoundError:
        return False
