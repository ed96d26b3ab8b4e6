"""What is needed to find one container in containerd again after a restart of the service.

Our container ids allow what containerd's identifiers do not (`a--b`, a trailing `.`, up to 128
characters; containerd wants `[A-Za-z0-9]+([._-][A-Za-z0-9]+)*`, at most 76). An id that fits is
used as it is, so `ctr` output is readable; any other becomes `ctz-<sha256 prefix>`. The mapping is
a pure function of our id, so a half-launched container can be cleaned without a handle, and the
label CONTAINER_LABEL names our id on everything we create in containerd.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

# containerd's identifiers.Validate
CONTAINERD_ID = re.compile(r"[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*")
CONTAINERD_ID_MAX = 76
CONTAINER_LABEL = "io.containerizer.container-id"


def containerd_id(container_id: str) -> str:
    if len(container_id) <= CONTAINERD_ID_MAX and CONTAINERD_ID.fullmatch(container_id):
        return container_id
    return "ctz-" + hashlib.sha256(container_id.encode()).hexdigest()[:40]


@dataclass(frozen=True)
class ContainerdHandle:
    """One container: its containerd id (also the snapshot key and the lease id), namespace,
    and snapshotter, as launched."""

    container_id: str
    containerd_id: str
    namespace: str
    snapshotter: str

    @property
    def snapshot_key(self) -> str:
        return self.containerd_id

    @property
    def lease_id(self) -> str:
        return self.containerd_id

    @classmethod
    def for_container(cls, container_id: str, namespace: str, snapshotter: str) -> ContainerdHandle:
        return cls(container_id, containerd_id(container_id), namespace, snapshotter)

    def to_json(self) -> dict[str, Any]:
        return {
            "containerd_id": self.containerd_id,
            "namespace": self.namespace,
            "snapshotter": self.snapshotter,
        }

    @classmethod
    def from_json(cls, container_id: str, data: dict[str, Any]) -> ContainerdHandle:
        return cls(
            container_id,
            str(data["containerd_id"]),
            str(data["namespace"]),
            str(data["snapshotter"]),
        )
