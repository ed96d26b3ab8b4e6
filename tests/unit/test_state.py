import contextlib
import json
import os
import signal
import sqlite3
import stat
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from adapter.core.errors import FailedPrecondition
from adapter.core.model import (
    Command,
    IdMapping,
    LaunchSpec,
    LinuxOptions,
    Mount,
    NetworkSettings,
    PortMapping,
    Reason,
    Resources,
    State,
    Termination,
)
from adapter.core.state import ContainerRecord, StateStore, database_is_empty, spec_json


def record(cid: str) -> ContainerRecord:
    spec = LaunchSpec(
        container_id=cid,
        command=Command(shell="echo hi", environment=(("A", "1"),)),
        resources=Resources(cpus=0.5, mem_mib=64, pids=10),
        runtime="native",
        sandbox="/tmp/sb",
        labels=(("k", "v"),),
    )
    return ContainerRecord(spec=spec, state=State.RUNNING, launched_at=1.5, handle={"pid": 7})


def test_records_survive_reopening(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db")
    first = record("a")
    store.put(first)
    store.put(record("b"))
    ended = first.evolve(
        state=State.TERMINATED,
        termination=Termination(Reason.EXITED, exit_code=3, status=768, finished_at=2.0),
    )
    store.put(ended)
    store.delete("b")
    store.close()

    reopened = StateStore(tmp_path / "state.db")
    assert reopened.load_all() == [ended]
    reopened.close()


def test_wal_and_normal_sync_are_on(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db")
    assert store._db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert store._db.execute("PRAGMA synchronous").fetchone() == (1,)  # NORMAL
    store.close()


def test_a_put_survives_a_crash_of_the_service(tmp_path: Path) -> None:
    """Each put is committed when it returns: a process killed right after it, with its
    connection never closed, leaves every record it put (and none half-written)."""
    path = tmp_path / "state.db"
    StateStore(path).close()  # the schema, before the crashing writer
    first = record("a")
    ended = first.evolve(
        state=State.TERMINATED,
        termination=Termination(Reason.EXITED, exit_code=0, finished_at=2.0),
    )
    pid = os.fork()
    if pid == 0:  # the service: writes, then dies without closing anything
        store = StateStore(path)
        store.put(first)
        store.put(record("b"))
        store.put(ended)
        store.delete("b")
        os.kill(os.getpid(), signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL

    reopened = StateStore(path)
    assert reopened.load_all() == [ended]
    reopened.close()


def _raw_rows(path: Path, rows: list[tuple[object, object]]) -> None:
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executemany("INSERT INTO containers (container_id, record) VALUES (?, ?)", rows)
        db.commit()


def test_damaged_records_are_quarantined_and_the_rest_load(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = StateStore(path)
    good = record("good")
    store.put(good)
    store.close()
    wrong_handle = json.loads(record("handle").to_json())
    wrong_handle["handle"] = [1, 2]
    garbled = json.loads(record("garbled").to_json())
    garbled["spec"]["command"]["argv"] = "echo hi"
    renamed = record("other").to_json()
    _raw_rows(
        path,
        [
            ("json", '{"spec": {'),
            ("handle", json.dumps(wrong_handle)),
            ("garbled", json.dumps(garbled)),
            ("renamed", renamed),
            ("blob", b"\x00\xff"),
        ],
    )
    reopened = StateStore(path)
    assert reopened.load_all() == [good]
    errors = {entry.container_id: entry.error for entry in reopened.quarantined()}
    assert errors == {
        "json": errors["json"],
        "handle": "handle: expected dict, got list",
        "garbled": "spec.command.argv: expected list, got str",
        "renamed": "spec.container_id 'other' is not the row's id",
        "blob": errors["blob"],
    }
    assert errors["json"].startswith("not valid JSON") and errors["blob"].startswith("not valid")
    assert reopened.load_all() == [good]  # set aside once: the next start finds only the good
    assert len(reopened.quarantined()) == 5
    reopened.close()


def test_a_record_from_before_sandbox_ownership_owns_nothing(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    StateStore(path).close()
    old = json.loads(record("old").to_json())
    del old["sandbox_owned"]
    _raw_rows(path, [("old", json.dumps(old))])
    store = StateStore(path)
    store.put(record("new").evolve(sandbox_owned=True))
    loaded = {r.container_id: r.sandbox_owned for r in store.load_all()}
    assert loaded == {"old": False, "new": True}
    store.close()


def test_database_files_are_private(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    old_umask = os.umask(0o022)
    try:
        store = StateStore(path)
        store.put(record("a"))
        modes = {s: stat.S_IMODE(os.stat(f"{path}{s}").st_mode) for s in ("", "-wal", "-shm")}
        assert modes == {"": 0o600, "-wal": 0o600, "-shm": 0o600}
        store.close()
        path.chmod(0o644)  # as an older version left it
        StateStore(path).close()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        os.umask(old_umask)


@pytest.mark.parametrize("damage", ["truncated", "header"])
def test_an_unreadable_database_is_one_clear_error(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "state.db"
    store = StateStore(path)
    for n in range(40):
        store.put(record(f"c{n}").evolve(warnings=("w" * 4000,)))
    store.close()
    if damage == "truncated":
        os.truncate(path, path.stat().st_size // 2)
    else:
        path.write_bytes(b"garbage " * 64 + path.read_bytes()[512:])
    with pytest.raises(FailedPrecondition) as error:
        StateStore(path)
    assert str(error.value).startswith(f"state database {path} is damaged (")
    assert "\n" not in str(error.value)


def test_an_empty_database_is_told_apart(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    assert database_is_empty(path)
    path.write_bytes(b"")
    assert database_is_empty(path)
    StateStore(path).put(record("a"))
    assert not database_is_empty(path)


def test_a_changed_spec_is_stored_with_the_next_transition(tmp_path: Path) -> None:
    """A container's spec is turned into JSON once per spec: an update's new spec is stored."""
    store = StateStore(tmp_path / "state.db")
    first = record("a")
    store.put(first)
    store.put(first.evolve(state=State.DESTROYING))
    updated = first.evolve(spec=replace(first.spec, resources=Resources(cpus=2.0, mem_mib=128)))
    store.put(updated)
    store.close()

    reopened = StateStore(tmp_path / "state.db")
    assert reopened.load_all() == [updated]
    reopened.close()


def test_a_record_is_stored_as_one_json_document_spec_first(tmp_path: Path) -> None:
    """The stored text is what json.dumps of the whole record gave before the spec's text was
    kept between transitions: rows written by either version read the same."""
    ended = record("a").evolve(
        state=State.TERMINATED,
        warnings=("w",),
        termination=Termination(
            Reason.LIMITATION_MEMORY, signal=9, killed=True, limited_resources=("mem",)
        ),
    )
    whole = {
        "spec": asdict(ended.spec),
        "state": "TERMINATED",
        "launched_at": ended.launched_at,
        "handle": ended.handle,
        "pid": ended.pid,
        "termination": {**asdict(ended.termination), "reason": "LIMITATION_MEMORY"},
        "warnings": ["w"],
        "ip_address": "",
        "sandbox_owned": False,
        "sandbox_mount": "",
        "disk_limitation": "",
    }
    assert ended.to_json() == json.dumps(whole)
    store = StateStore(tmp_path / "state.db")
    store.put(ended)
    stored = store._db.execute("SELECT record FROM containers").fetchone()[0]
    assert stored == json.dumps(whole)
    store.close()


def test_rows_of_an_older_writer_are_updated_in_place_and_load_in_launch_order(
    tmp_path: Path,
) -> None:
    """Rows an older version wrote (INSERT OR REPLACE) load and take the next transition; a
    transition updates its row where it is, so records load in the order they were launched."""
    path = tmp_path / "state.db"
    StateStore(path).close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        for cid in ("old", "older"):
            db.execute(
                "INSERT OR REPLACE INTO containers (container_id, record) VALUES (?, ?)",
                (cid, record(cid).to_json()),
            )
        db.commit()
    store = StateStore(path)
    store.put(record("new"))
    destroying = record("old").evolve(state=State.DESTROYING)
    store.put(destroying)
    assert store.load_all() == [destroying, record("older"), record("new")]
    store.close()


def test_every_part_of_a_spec_is_encoded_as_its_json_form() -> None:
    """spec_json is json.dumps(spec.to_json()) for a spec with every nested record set."""
    spec = LaunchSpec(
        container_id="full",
        command=Command(argv=("sh", "-c", "x"), environment=(("A", "1"),), user="u"),
        resources=Resources(cpus=1.5, mem_mib=64, disk_mib=10, pids=5, ports=((80, 81),)),
        runtime="native",
        sandbox="/sb",
        image="busybox",
        labels=(("k", "v"),),
        network=NetworkSettings("bridge", (PortMapping(8080, 80), PortMapping(53, 53, "udp"))),
        privileged=True,
        linux=LinuxOptions(
            namespaces=(("net", "/proc/1/ns/net"),),
            masked_paths=("/proc/kcore",),
            mounts=(Mount("/h", "/c", read_only=True, propagation="rslave"),),
            sysctls=(("net.ipv4.ip_forward", "1"),),
            pod="p",
        ),
        user_namespace=True,
        id_mapping=IdMapping(100000, 100000, 65536),
    )
    assert spec_json(spec) == json.dumps(spec.to_json())
    assert LaunchSpec.from_json(json.loads(spec_json(spec))) == spec
    with pytest.raises(TypeError, match="not JSON serializable"):
        spec_json(replace(spec, image=State.RUNNING))  # type: ignore[arg-type]
