from pathlib import Path

from adapter.model import Command, LaunchSpec, Reason, Resources, State, Termination
from adapter.state import ContainerRecord, StateStore


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


def test_wal_and_full_sync_are_on(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db")
    assert store._db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert store._db.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    store.close()
