"""The network checkpoint: one small JSON file per bridge, written with fsync + rename.

It holds every container's Attachment (address, namespace, veth, port forwards, rate) and the
IPAM cursor. A JSON file rather than the service's SQLite store because this package imports
nothing from `adapter/` and is shared by every driver of the process, and because an allocation
must be durable *before* the namespace and links exist: the core checkpoints a driver's handle
only after launch returns, too late to find what a crash in the middle of a launch left behind.
Writes are rare (launch, destroy, update) and the file is small, so rewriting it whole is cheap.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from isolators.network.model import Attachment

STATE_VERSION = 1


@dataclass
class NetworkState:
    attachments: dict[str, Attachment] = field(default_factory=dict)
    last_address: str | None = None  # the IPAM cursor


def load(path: Path) -> NetworkState:
    """The checkpoint at `path`; an absent file is an empty state."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return NetworkState()
    if data.get("version") != STATE_VERSION:
        raise ValueError(f"{path}: unknown network state version {data.get('version')!r}")
    attachments = {
        cid: Attachment.from_json(entry) for cid, entry in data.get("containers", {}).items()
    }
    return NetworkState(attachments, data.get("last_address"))


def save(path: Path, state: NetworkState, *, durable: bool = True) -> None:
    """Durable when it returns: temp file, fsync, rename over the old one, fsync the directory.
    Not `durable`: the directory is not synced, so a power loss may bring back the file before
    this save (whole either way: the new one was synced before the rename). For a removal only,
    which recovery does again when it finds the attachment still there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps(
        {
            "version": STATE_VERSION,
            "last_address": state.last_address,
            "containers": {cid: a.to_json() for cid, a in sorted(state.attachments.items())},
        },
        indent=1,
    )
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w") as stream:
        stream.write(body)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temporary, path)
    if not durable:
        return
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
