"""Crash-safe checkpoint store for container records.

SQLite in WAL mode with synchronous=NORMAL: each transition is one `put`, one committed
transaction appended to the write-ahead log. A commit is in the log (the kernel's page cache)
when `put` returns, so it survives a crash of the service, which is the failure recovery
handles; a crash mid-write leaves the previous version intact, and one file holds every record.
The log is fsynced at each checkpoint of it into the database, not at every commit: after a
power loss the last transitions may be rolled back (never torn), and with the machine every
container is gone too. FULL cost an fsync per transition, five per container's life, which
blocked the event loop for 12% of the service's time under a launch loop. We chose SQLite over
write-fsync-rename files because listing 500 records is one query instead of 500 opens. Calls
are synchronous and short (one small row); the event loop tolerates that better than a thread
hop per transition would cost.

Records hold secrets (a launch's environment), so the database and its -wal/-shm files are 0600.
One damaged record must not keep the node from starting: it is moved, with the reason, to the
`quarantine` table and the others load. A database file that SQLite cannot read at all is
refused with one line that says what to do.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from adapter.core.errors import FailedPrecondition
from adapter.core.model import LaunchSpec, State, Termination

log = logging.getLogger(__name__)

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS containers (container_id TEXT PRIMARY KEY, record TEXT NOT NULL)",
    # A damaged row as it was found (record untyped: it may not even be text) and why.
    "CREATE TABLE IF NOT EXISTS quarantine"
    " (container_id TEXT, record, error TEXT NOT NULL, quarantined_at REAL NOT NULL)",
)
PRIVATE_FILE_MODE = 0o600
DATABASE_SUFFIXES = ("", "-wal", "-shm")


class DamagedRecord(ValueError):
    """A stored record that cannot be turned back into a ContainerRecord; says which field."""


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
    # Whether the service created the sandbox (the default one under the state directory) and
    # so may remove it with the record; a sandbox the caller named is never removed.
    sandbox_owned: bool = False
    # Where a caller-named sandbox has the service's nosuid,nodev bind mount (its resolved path),
    # checkpointed before the mount is made and cleared once it is undone at the end
    # (adapter/core/sandbox_guard.py); "": none.
    sandbox_mount: str = ""
    # The disk isolator's message once it killed the container for its disk usage: kept so
    # that a restart between the kill and the exit still ends it LIMITATION_DISK.
    disk_limitation: str = ""

    @property
    def container_id(self) -> str:
        return self.spec.container_id

    def evolve(self, **changes: Any) -> ContainerRecord:
        return replace(self, **changes)

    def to_json(self, spec: str | None = None) -> str:
        """The record as stored; `spec`: the spec's JSON text, when the caller has it."""
        spec_text = spec_json(self.spec) if spec is None else spec
        rest = json.dumps(
            {
                "state": self.state.value,
                "launched_at": self.launched_at,
                "handle": self.handle,
                "pid": self.pid,
                "termination": self.termination.to_json() if self.termination else None,
                "warnings": list(self.warnings),
                "ip_address": self.ip_address,
                "sandbox_owned": self.sandbox_owned,
                "sandbox_mount": self.sandbox_mount,
                "disk_limitation": self.disk_limitation,
            }
        )
        # json.dumps of the whole record, spec first, without encoding the spec every time.
        return f'{{"spec": {spec_text}, {rest[1:]}'

    @classmethod
    def from_json(cls, text: str | bytes) -> ContainerRecord:
        """The record, or DamagedRecord naming what is wrong with it."""
        try:
            data = json.loads(text)
        except (ValueError, TypeError) as exc:
            raise DamagedRecord(f"not valid JSON: {exc}") from None
        _check_record_shape(data)
        termination = data["termination"]
        try:
            return cls(
                spec=LaunchSpec.from_json(data["spec"]),
                state=State(data["state"]),
                launched_at=float(data["launched_at"]),
                handle=data["handle"],
                pid=data["pid"],
                termination=Termination.from_json(termination) if termination else None,
                warnings=tuple(data["warnings"]),
                ip_address=data.get("ip_address", ""),
                sandbox_owned=data.get("sandbox_owned", False),
                sandbox_mount=data.get("sandbox_mount", ""),
                disk_limitation=data.get("disk_limitation", ""),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DamagedRecord(f"{type(exc).__name__}: {exc}") from None


def spec_json(spec: LaunchSpec) -> str:
    """json.dumps(spec.to_json()), a quarter of its cost: the encoder takes each nested record's
    fields as they are (tuples become lists either way) instead of asdict's deep copy first."""
    return json.dumps(spec, default=_fields_of)


def _fields_of(value: Any) -> dict[str, Any]:
    if not dataclasses.is_dataclass(value) or isinstance(value, type):
        raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")
    # A dataclass instance's attributes are its fields (none of the spec's sets others).
    return vars(value)


# The JSON shape a record must have: field -> accepted types. Checked before any field is used,
# so a garbled value is reported as damage instead of failing later inside a driver.
_NONE = type(None)
_NUMBER = (int, float)
_RECORD_SHAPE: dict[str, tuple[type, ...]] = {
    "spec": (dict,),
    "state": (str,),
    "launched_at": _NUMBER,
    "handle": (dict,),
    "pid": (int,),
    "termination": (dict, _NONE),
    "warnings": (list,),
}
_OPTIONAL_SHAPE: dict[str, tuple[type, ...]] = {
    "ip_address": (str,),
    "sandbox_owned": (bool,),
    "sandbox_mount": (str,),
    "disk_limitation": (str,),
}
_SPEC_SHAPE: dict[str, tuple[type, ...]] = {
    "container_id": (str,),
    "command": (dict,),
    "resources": (dict,),
    "runtime": (str,),
    "sandbox": (str,),
    "image": (str, _NONE),
    "labels": (list,),
}
_COMMAND_SHAPE: dict[str, tuple[type, ...]] = {
    "shell": (str, _NONE),
    "argv": (list,),
    "environment": (list,),
    "user": (str, _NONE),
    "working_dir": (str, _NONE),
}
_TERMINATION_SHAPE: dict[str, tuple[type, ...]] = {
    "reason": (str,),
    "exit_code": (int, _NONE),
    "signal": (int, _NONE),
    "status": (int,),
    "killed": (bool,),
    "message": (str,),
    "limited_resources": (list,),
    "finished_at": _NUMBER,
}


def _check_fields(
    data: Any, shape: dict[str, tuple[type, ...]], where: str, *, required: bool = True
) -> None:
    if not isinstance(data, dict):
        raise DamagedRecord(f"{where or 'record'}: expected an object, got {type(data).__name__}")
    for key, kinds in shape.items():
        if key not in data:
            if required:
                raise DamagedRecord(f"{where}{key}: missing")
            continue
        value = data[key]
        # bool is an int in Python; a true where a number belongs is still damage.
        wrong_bool = isinstance(value, bool) and bool not in kinds
        if wrong_bool or not isinstance(value, kinds):
            expected = " or ".join("null" if k is _NONE else k.__name__ for k in kinds)
            raise DamagedRecord(f"{where}{key}: expected {expected}, got {type(value).__name__}")


def _check_strings(values: list[Any], where: str, pairs: bool = False) -> None:
    for index, value in enumerate(values):
        if pairs:
            good = isinstance(value, list) and len(value) == 2
            good = good and all(isinstance(item, str) for item in value)
        else:
            good = isinstance(value, str)
        if not good:
            expected = "a [name, value] pair of strings" if pairs else "a string"
            raise DamagedRecord(f"{where}[{index}]: expected {expected}")


def _check_record_shape(data: Any) -> None:
    _check_fields(data, _RECORD_SHAPE, "")
    _check_fields(data, _OPTIONAL_SHAPE, "", required=False)
    _check_strings(data["warnings"], "warnings")
    spec = data["spec"]
    _check_fields(spec, _SPEC_SHAPE, "spec.")
    _check_fields(spec["command"], _COMMAND_SHAPE, "spec.command.")
    _check_strings(spec["command"]["argv"], "spec.command.argv")
    _check_strings(spec["command"]["environment"], "spec.command.environment", pairs=True)
    _check_strings(spec["labels"], "spec.labels", pairs=True)
    for name, value in spec["resources"].items():
        if name != "ports" and (
            isinstance(value, bool) or not isinstance(value, (*_NUMBER, _NONE))
        ):
            raise DamagedRecord(f"spec.resources.{name}: expected a number or null")
    if data["termination"] is not None:
        _check_fields(data["termination"], _TERMINATION_SHAPE, "termination.")


@dataclass(frozen=True)
class QuarantinedRecord:
    """A row set aside at start because it could not be read."""

    container_id: str
    error: str
    quarantined_at: float


class StateStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # Created 0600 from the start (SQLite gives -wal and -shm the database file's mode); a
        # store left 0644 by an older version is tightened below.
        old_umask = os.umask(0o077)
        try:
            self._db = _open_database(path)
        finally:
            os.umask(old_umask)
        restrict_database_files(path)
        # Read once: records are set aside only while loading, and every Launch asks.
        self._quarantined: list[QuarantinedRecord] | None = None
        # container id -> (spec, its JSON text): a container's transitions keep its spec, and
        # encoding the spec was most of the cost of each of its checkpoints.
        self._spec_json: dict[str, tuple[LaunchSpec, str]] = {}

    def put(self, record: ContainerRecord) -> None:
        """One committed transaction: it survives a crash of the service once this returns.

        An upsert, not INSERT OR REPLACE: a replace deletes the row and inserts it again under a
        new rowid, writing the primary key's index too, at over twice the cost of updating the
        row in place; and the row keeps its place, so records load in launch order."""
        self._db.execute(
            "INSERT INTO containers (container_id, record) VALUES (?, ?)"
            " ON CONFLICT (container_id) DO UPDATE SET record = excluded.record",
            (record.container_id, record.to_json(self._spec_json_of(record))),
        )

    def _spec_json_of(self, record: ContainerRecord) -> str:
        cached = self._spec_json.get(record.container_id)
        if cached is not None and cached[0] is record.spec:
            return cached[1]
        text = spec_json(record.spec)
        self._spec_json[record.container_id] = (record.spec, text)
        return text

    def delete(self, container_id: str) -> None:
        self._db.execute("DELETE FROM containers WHERE container_id = ?", (container_id,))
        self._spec_json.pop(container_id, None)

    def load_all(self) -> list[ContainerRecord]:
        """Every readable record; each damaged one is moved to the quarantine table."""
        rows = self._db.execute(
            "SELECT rowid, container_id, record FROM containers ORDER BY rowid"
        ).fetchall()
        records = []
        for rowid, container_id, text in rows:
            try:
                record = ContainerRecord.from_json(text)
                if record.container_id != container_id:
                    raise DamagedRecord(
                        f"spec.container_id {record.container_id!r} is not the row's id"
                    )
            except DamagedRecord as exc:
                self._quarantine(rowid, container_id, text, str(exc))
                continue
            records.append(record)
        return records

    def quarantined(self) -> list[QuarantinedRecord]:
        if self._quarantined is None:
            rows = self._db.execute(
                "SELECT container_id, error, quarantined_at FROM quarantine ORDER BY rowid"
            ).fetchall()
            self._quarantined = [
                QuarantinedRecord(str(cid), str(error), float(at)) for cid, error, at in rows
            ]
        return list(self._quarantined)

    def _quarantine(self, rowid: int, container_id: Any, text: Any, error: str) -> None:
        log.error(
            "state: the record of container %r in %s is damaged (%s): moved to its quarantine"
            " table; the container's processes are left alone",
            container_id,
            self.path,
            error,
        )
        with self._transaction():
            self._db.execute(
                "INSERT INTO quarantine (container_id, record, error, quarantined_at)"
                " VALUES (?, ?, ?, ?)",
                (container_id, text, error, time.time()),
            )
            self._db.execute("DELETE FROM containers WHERE rowid = ?", (rowid,))
        self._quarantined = None

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()


def _open_database(path: Path) -> sqlite3.Connection:
    """Open, check and prepare the database; an unreadable file is one clear error."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        # Durable across a crash of the process (the WAL is in the kernel's page cache);
        # fsynced at each WAL checkpoint rather than at every commit (see the module's note).
        db.execute("PRAGMA synchronous=NORMAL")
        problems = [row[0] for row in db.execute("PRAGMA quick_check").fetchall()]
        if problems != ["ok"]:
            raise sqlite3.DatabaseError("; ".join(str(p) for p in problems[:3]))
        for statement in SCHEMA:
            db.execute(statement)
    except sqlite3.DatabaseError as exc:
        db.close()
        raise FailedPrecondition(
            f"state database {path} is damaged ({exc}): restore it from a backup, or move it"
            " aside once no container of this node runs"
        ) from None
    return db


def restrict_database_files(path: Path) -> None:
    """The database and its WAL files readable by root only, whatever mode they had."""
    for suffix in DATABASE_SUFFIXES:
        with suppress(FileNotFoundError):
            os.chmod(f"{path}{suffix}", PRIVATE_FILE_MODE)


def database_is_empty(path: Path) -> bool:
    """No database, or a 0-byte file: SQLite would open either as a valid, empty store."""
    try:
        return path.stat().st_size == 0
    except FileNotFoundError:
        return True
