"""Crash-safe checkpoint store for container records.

SQLite in WAL mode with synchronous=FULL: a `put` returns only after the record is on disk, a
crash mid-write leaves the previous version intact, and one file holds every record. We chose
it over write-fsync-rename files because a transition then costs one fsync of an append-only
log instead of three (file, rename, directory), and listing 500 records is one query instead
of 500 opens. Calls are synchronous and short (one small row); the event loop tolerates that
better than a thread hop per transition would cost.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from adapter.model import LaunchSpec, State, Termination

SCHEMA = """
CREATE TABLE IF NOT EXISTS containers (
    container_id TEXT PRIMARY KEY,
    record TEXT NOT NULL
)
"""


@dataclass(frozen=True)
class ContainerRecord:
    spec: LaunchSpec
    state: State
    launched_at: float
    handle: dict[str, Any]
    pid: int = 0
    termination: Termination | None = None
    warnings: tuple[str, ...] = ()
    ip_address: str = ""

    @property
    def container_id(self) -> str:
        return self.spec.container_id

    def evolve(self, **changes: Any) -> ContainerRecord:
        return replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(
            {
                "spec": self.spec.to_json(),
                "state": self.state.value,
                "launched_at": self.launched_at,
                "handle": self.handle,
                "pid": self.pid,
                "termination": self.termination.to_json() if self.termination else None,
                "warnings": list(self.warnings),
                "ip_address": self.ip_address,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> ContainerRecord:
        data = json.loads(text)
        termination = data["termination"]
        return cls(
            spec=LaunchSpec.from_json(data["spec"]),
            state=State(data["state"]),
            launched_at=data["launched_at"],
            handle=data["handle"],
            pid=data["pid"],
            termination=Termination.from_json(termination) if termination else None,
            warnings=tuple(data["warnings"]),
            ip_address=data.get("ip_address", ""),
        )


class StateStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(SCHEMA)

    def put(self, record: ContainerRecord) -> None:
        """Durable when it returns."""
        self._db.execute(
            "INSERT OR REPLACE INTO containers (container_id, record) VALUES (?, ?)",
            (record.container_id, record.to_json()),
        )

    def delete(self, container_id: str) -> None:
        self._db.execute("DELETE FROM containers WHERE container_id = ?", (container_id,))

    def load_all(self) -> list[ContainerRecord]:
        rows = self._db.execute("SELECT record FROM containers ORDER BY rowid").fetchall()
        return [ContainerRecord.from_json(text) for (text,) in rows]

    def close(self) -> None:
        self._db.close()
