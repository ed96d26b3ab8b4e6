"""The CRI log file as every runtime opens it (the supervisor's open_log_file, the containerd
log relay, the docker output copy): never through a symlink, a FIFO at the path failing at once
instead of hanging the open, appended to, and checked to be a regular file of its own."""

from __future__ import annotations

import os
import stat

from adapter.core.errors import InvalidArgument

# What the relay opens the log with (the supervisor's open_log_file): never through a symlink,
# and a FIFO at the path fails at once instead of hanging the open.
LOG_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def check_log_file(log_path: str) -> None:
    """Create the log as it will be opened, so that a log that cannot be written fails the
    launch here, with the reason (containerd's shim cannot tell a relay's failure from its
    readiness)."""
    field = "linux.log_path"
    try:
        fd = os.open(log_path, LOG_FLAGS, 0o640)
    except OSError as exc:
        raise InvalidArgument(field, f"{log_path}: cannot open the log: {exc.strerror}") from exc
    try:
        info = os.fstat(fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        raise InvalidArgument(field, f"{log_path}: not a regular file of its own")
