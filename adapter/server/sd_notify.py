"""systemd's readiness protocol (sd_notify(3)): one datagram to $NOTIFY_SOCKET per state.

A unit of Type=notify is started once READY=1 arrives: sent after recovery, when the API
answers. STOPPING=1 says the stop is ours. Without $NOTIFY_SOCKET (not under systemd) nothing is
sent. A socket name starting with '@' is in the abstract namespace (a leading NUL byte).
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1"); False when there is no socket to send it to. A failure
    is logged, never raised: the service works the same without systemd's knowing."""
    target = os.environ.get("NOTIFY_SOCKET", "")
    if not target:
        return False
    address = "\0" + target[1:] if target.startswith("@") else target
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sender:
            sender.connect(address)
            sender.sendall(state.encode())
    except OSError as exc:
        log.warning("cannot notify systemd at %s (%s): %s", target, state, exc)
        return False
    return True
