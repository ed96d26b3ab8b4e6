"""CRI logs of containerd containers: containerd's shim starts our supervisor in its log relay
mode as the task's logging binary, and the relay writes the CRI records.

A task whose stdout is `binary://<path>?<query>` gets a logging binary from its shim: the shim
runs `<path>` with the query's pairs as arguments, the task's stdout and stderr as pipes on fds
3 and 4, and waits for fd 5 to close (containerd's runtime v2 logging). The relay
(`containerizer-supervisor --log-relay LOG --pid-file FILE`) writes the same records as the
native runtime's supervisor, reopens LOG on SIGUSR1, and ends once the task is deleted, after
writing what the pipes still held. It is the shim's child: the log keeps flowing while this
service restarts, and the relay's pid, which ReopenContainerLog needs, is in FILE in the
container's run directory (rundir.py), with its start time so that a reused pid is never hit.

A container without a CRI log has its output in the sandbox's stdout and stderr. With rotation
(the node's log_max_size above 0) the shim runs the same program in its sandbox relay mode
(`--sandbox-relay SANDBOX --output-max-size N --output-max-files K --uid U --gid G`), which
appends to those files and rotates them as the native runtime's supervisor does: by name
relative to the sandbox opened without following a link, the files given to the workload's
user. Without rotation the shim appends to the files itself.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from urllib.parse import quote, urlencode

from adapter.core.errors import FailedPrecondition
from adapter.core.model import Identity
from adapter.supervisor.processes import ProcessRef

PID_FILE = "log-relay.pid"
MAX_PID_FILE_BYTES = 64


def relay_uri(supervisor: str, log_path: str, run_dir: Path) -> str:
    """The task's stdout (and stderr) URI that starts the relay for `log_path`."""
    query = urlencode({"--log-relay": log_path, "--pid-file": str(run_dir / PID_FILE)})
    return f"binary://{quote(supervisor)}?{query}"


def sandbox_relay_uri(
    supervisor: str, sandbox: str, max_size: int, max_files: int, owner: Identity
) -> str:
    """The task's stdout (and stderr) URI that starts the relay appending to `sandbox`'s files,
    rotated at `max_size` bytes, `max_files` kept a stream, owned by `owner`."""
    query = urlencode(
        {
            "--sandbox-relay": sandbox,
            "--output-max-size": max_size,
            "--output-max-files": max_files,
            "--uid": owner.uid,
            "--gid": owner.gid,
        }
    )
    return f"binary://{quote(supervisor)}?{query}"


def reopen(run_dir: Path, container_id: str) -> None:
    """SIGUSR1 to the container's relay: it opens a new file at the log's path."""
    relay = _relay(run_dir / PID_FILE)
    if relay is None or not relay.send(signal.SIGUSR1):
        raise FailedPrecondition(
            f"containerd runtime: {container_id!r} has no running log relay (no CRI log, or"
            " its task is gone)"
        )


def _relay(pid_file: Path) -> ProcessRef | None:
    """The relay named in its pid file (`<pid> <start time>`), or None when there is none."""
    try:
        fd = os.open(pid_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        words = os.read(fd, MAX_PID_FILE_BYTES).split()
    finally:
        os.close(fd)
    if len(words) != 2 or not all(word.isdigit() for word in words):
        return None
    return ProcessRef(int(words[0]), int(words[1]))
