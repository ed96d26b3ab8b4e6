"""What compare measures outside the API: the node's available memory and the service's RSS.

The service process is found through its socket, not by name: connecting to the unix socket and
asking the kernel for the peer's credentials (SO_PEERCRED) names exactly the process that serves
this endpoint, even when several services run on the node (tests do that). A TCP endpoint has no
such answer, and the report says so instead of guessing.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

import psutil

MEMINFO = Path("/proc/meminfo")
PEERCRED_FORMAT = "3i"  # struct ucred: pid, uid, gid


def mem_available_bytes(meminfo: Path = MEMINFO) -> int | None:
    """MemAvailable: the kernel's estimate of what can be allocated without swapping; its drop is
    what containers cost the node, page cache and all."""
    try:
        text = meminfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name == "MemAvailable":
            return int(rest.split()[0]) * 1024
    return None


def unix_socket_path(target: str) -> str | None:
    """The filesystem path of a grpc `unix:` target (unix:/p, unix:///p, unix:rel), else None."""
    if not target.startswith("unix:"):
        return None
    path = target.removeprefix("unix:")
    if path.startswith("//"):
        path = path[2:]
    return path or None


@dataclass(frozen=True)
class ServiceProcess:
    """The process behind the endpoint, or why it was not found (`pid` None)."""

    pid: int | None
    source: str

    def rss_bytes(self) -> int | None:
        if self.pid is None:
            return None
        try:
            return int(psutil.Process(self.pid).memory_info().rss)
        except psutil.Error:
            return None


def find_service_process(target: str) -> ServiceProcess:
    path = unix_socket_path(target)
    if path is None:
        return ServiceProcess(None, f"not measured: {target} is not a unix socket")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.connect(path)
            credentials = connection.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize(PEERCRED_FORMAT)
            )
    except OSError as exc:
        return ServiceProcess(None, f"not measured: cannot connect to {path}: {exc.strerror}")
    pid, _uid, _gid = struct.unpack(PEERCRED_FORMAT, credentials)
    if pid <= 0:
        # The service runs in another pid namespace: its pid means nothing here.
        return ServiceProcess(None, "not measured: the service is in another pid namespace")
    return ServiceProcess(pid, f"RSS of pid {pid}, found via SO_PEERCRED on {path}")


def host_facts() -> dict[str, object]:
    """What the numbers depend on, so reports from different nodes are not compared blindly."""
    uname = os.uname()
    return {
        "hostname": uname.nodename,
        "kernel": uname.release,
        "cpus": os.cpu_count(),
        "mem_total_bytes": psutil.virtual_memory().total,
    }
