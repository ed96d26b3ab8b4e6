"""What the CRI adds to the core's records, checkpointed: pod sandboxes and the CRI's view of
their containers (configs as the kubelet sent them, the created state the core does not have,
exit details kept until RemoveContainer).

A second SQLite file (<state_dir>/cri.db) beside the core's, with the same durability
(adapter/core/state.py says why): WAL with synchronous=NORMAL, so a `put` is in the log (the
kernel's page cache) when it returns, and after `kill -9` every pod and container comes back with
its id, state, exit code and log path; after a power loss the last changes may be rolled back,
never torn, and the pods are gone with the machine anyway. FULL cost an fsync per write, eight
per pod with one container, 0.3 ms each on an idle disk and over 1 ms on a busy one. Configs are
stored as the serialized protobuf message (base64 in the JSON), so whatever the kubelet sent is
returned unchanged.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import sqlite3
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from adapter.core.errors import FailedPrecondition
from adapter.cri.api import cri

log = logging.getLogger(__name__)

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS objects (kind TEXT, id TEXT, record TEXT, PRIMARY KEY(kind, id))"
)

# CRI states, by the names the API uses.
POD_READY = "SANDBOX_READY"
POD_NOTREADY = "SANDBOX_NOTREADY"
CREATED = "CONTAINER_CREATED"
RUNNING = "CONTAINER_RUNNING"
EXITED = "CONTAINER_EXITED"


@dataclass(frozen=True)
class Pod:
    id: str
    config: bytes  # cri.PodSandboxConfig, serialized
    runtime_handler: str
    created_at: int  # ns since the epoch
    state: str = POD_READY
    ip: str = ""
    netns: str = ""  # its network namespace's file while READY, "" on the host's network
    # The runtime the pod's holder runs on; "" for a pod without one (one container, a VM).
    holder_runtime: str = "native"

    def pod_config(self) -> cri.PodSandboxConfig:
        config = cri.PodSandboxConfig()
        config.ParseFromString(self.config)
        return config

    def evolve(self, **changes: Any) -> Pod:
        return replace(self, **changes)


@dataclass(frozen=True)
class Container:
    id: str
    pod_id: str
    config: bytes  # cri.ContainerConfig, serialized
    image_ref: str  # the store reference it runs
    image_id: str  # the image's config digest
    created_at: int
    log_path: str = ""  # absolute; "" when the pod has no log directory
    state: str = CREATED
    started_at: int = 0
    finished_at: int = 0
    exit_code: int = 0
    reason: str = ""
    message: str = ""

    def container_config(self) -> cri.ContainerConfig:
        config = cri.ContainerConfig()
        config.ParseFromString(self.config)
        return config

    def evolve(self, **changes: Any) -> Container:
        return replace(self, **changes)


Record = TypeVar("Record", Pod, Container)


class CriStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        old_umask = os.umask(0o077)  # configs hold the workloads' environment: root's only
        try:
            self._db = sqlite3.connect(path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise FailedPrecondition(
                f"CRI state database {path} is damaged ({exc}): move it aside once no pod runs"
            ) from None
        finally:
            os.umask(old_umask)
        # record id -> (its config, the config in base64), for the record's next put
        self._configs: dict[str, tuple[bytes, str]] = {}

    def put(self, record: Pod | Container) -> None:
        """An upsert: the row is updated in place (a replace would delete and insert it, and
        write its index entry again)."""
        self._db.execute(
            "INSERT INTO objects (kind, id, record) VALUES (?, ?, ?)"
            " ON CONFLICT (kind, id) DO UPDATE SET record = excluded.record",
            (type(record).__name__, record.id, self._json(record)),
        )

    def _json(self, record: Pod | Container) -> str:
        # Every field is a str, an int or the config's bytes: a shallow copy is the record
        # (asdict's deep copy was most of a put's cost), and the config, which a record never
        # changes, is encoded once.
        data = dict(vars(record))
        cached = self._configs.get(record.id)
        if cached is None or cached[0] is not record.config:
            cached = (record.config, base64.b64encode(record.config).decode("ascii"))
            self._configs[record.id] = cached
        data["config"] = cached[1]
        return json.dumps(data)

    def delete(self, record: Pod | Container) -> None:
        self._db.execute(
            "DELETE FROM objects WHERE kind = ? AND id = ?", (type(record).__name__, record.id)
        )
        self._configs.pop(record.id, None)

    def load(self, kind: type[Record]) -> list[Record]:
        """Every readable record of `kind`; one that cannot be read is logged and skipped (it
        stays in the file for inspection)."""
        records = []
        names = {f.name for f in fields(kind)}
        rows = self._db.execute("SELECT id, record FROM objects WHERE kind = ?", (kind.__name__,))
        for object_id, text in rows.fetchall():
            try:
                data = json.loads(text)
                data["config"] = base64.b64decode(data["config"])
                records.append(kind(**{k: v for k, v in data.items() if k in names}))
            except (ValueError, TypeError, KeyError) as exc:
                log.error("CRI %s %s: unreadable record skipped: %s", kind.__name__, object_id, exc)
        return records

    def close(self) -> None:
        self._db.close()
