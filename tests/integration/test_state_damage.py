"""A real service restarted on a damaged state directory: one bad record is set aside and the
node starts with the rest, a database SQLite cannot read is refused in one line, and a missing or
empty database beside running containers is refused instead of killing them as unknown."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from tests.conftest import ServiceProcess
from tests.integration.api import destroy, launch, serve_expecting_refusal, wait

pytestmark = pytest.mark.integration

CLI = str(Path(sys.executable).parent / "containerizer")


def _edit_record(database: Path, container_id: str, edit: Callable[[dict[str, Any]], Any]) -> None:
    with contextlib.closing(sqlite3.connect(database)) as db:
        (text,) = db.execute(
            "SELECT record FROM containers WHERE container_id = ?", (container_id,)
        ).fetchone()
        record = json.loads(text)
        changed = edit(record)
        text = changed if isinstance(changed, str) else json.dumps(record)
        db.execute("UPDATE containers SET record = ? WHERE container_id = ?", (text, container_id))
        db.commit()


DAMAGE: dict[str, tuple[Callable[[dict[str, Any]], Any], str]] = {
    "json": (lambda record: json.dumps(record)[:40], "not valid JSON"),
    "handle": (lambda record: record.update(handle="pid 4242"), "handle: expected dict, got str"),
    "field": (lambda record: record.update(state="SLEEPING"), "'SLEEPING' is not a valid State"),
}


def test_a_damaged_record_is_set_aside_and_the_others_recover(
    fresh_service: ServiceProcess, container_id: str
) -> None:
    ids = {kind: f"{container_id}-{kind}" for kind in ("good", *DAMAGE)}
    pids = {
        kind: launch(fresh_service.stub(), cid, "sleep 300").status.pid for kind, cid in ids.items()
    }
    fresh_service.stop()  # the containers keep running
    for kind, (edit, _) in DAMAGE.items():
        _edit_record(fresh_service.state_dir / "state.db", ids[kind], edit)
    try:
        fresh_service.start()
        stub = fresh_service.stub()
        listed = stub.Containers(pb.ContainersRequest(), timeout=10).containers
        assert [status.container_id for status in listed] == [ids["good"]]
        quarantined = {
            entry.container_id: entry.error
            for entry in stub.Runtimes(pb.RuntimesRequest(), timeout=10).quarantined
        }
        assert set(quarantined) == {ids[kind] for kind in DAMAGE}
        for kind, (_, reason) in DAMAGE.items():
            assert reason in quarantined[ids[kind]]
            assert psutil.Process(pids[kind]).status() != psutil.STATUS_ZOMBIE  # left alone
        with pytest.raises(grpc.RpcError) as error:
            launch(stub, ids["json"], "true")  # its cgroups are still in use
        assert error.value.code() == grpc.StatusCode.ALREADY_EXISTS
        shown = subprocess.run(
            [CLI, "--endpoint", fresh_service.endpoint, "runtimes"], capture_output=True, text=True
        )
        assert f"damaged record of container {ids['handle']} set aside" in shown.stderr
        assert destroy(stub, ids["good"]).reason == pb.DESTROYED
    finally:
        for kind in DAMAGE:  # an operator's decision, here: end them
            with contextlib.suppress(ProcessLookupError):
                os.kill(pids[kind], signal.SIGKILL)


def _terminated_containers(service: ServiceProcess, container_id: str, count: int) -> None:
    """Records that fill several database pages (labels of 8 KiB each); nothing left running."""
    stub = service.stub()
    for index in range(count):
        cid = f"{container_id}-{index}"
        stub.Launch(
            pb.LaunchRequest(
                container_id=cid,
                command=pb.CommandInfo(shell="true"),
                labels={"filler": "x" * 8192},
            ),
            timeout=30,
        )
        wait(stub, cid)


def _truncate(database: Path) -> None:
    os.truncate(database, database.stat().st_size // 2)


def _overwrite_header(database: Path) -> None:
    with database.open("r+b") as file:
        file.write(b"not a database, " * 8)


@pytest.mark.parametrize("damage", [_truncate, _overwrite_header], ids=["truncated", "header"])
def test_an_unreadable_database_is_refused_in_one_line(
    fresh_service: ServiceProcess, container_id: str, damage: Callable[[Path], None]
) -> None:
    _terminated_containers(fresh_service, container_id, 20)
    fresh_service.stop()
    database = fresh_service.state_dir / "state.db"
    damage(database)
    output = serve_expecting_refusal(fresh_service.config_path)
    assert "Traceback" not in output
    refusal = [line for line in output.splitlines() if line.startswith("containerizer: ")]
    assert len(refusal) == 1
    assert refusal[0].startswith(f"containerizer: cannot serve: state database {database}")
    assert "is damaged" in refusal[0] and "restore it from a backup" in refusal[0]


@pytest.mark.parametrize("loss", ["missing", "empty"])
def test_lost_records_beside_running_containers_are_refused(
    fresh_service: ServiceProcess, container_id: str, tmp_path: Path, loss: str
) -> None:
    pid = launch(fresh_service.stub(), container_id, "sleep 300").status.pid
    fresh_service.stop()
    database = fresh_service.state_dir / "state.db"
    backup = tmp_path / "state.db.backup"
    shutil.copy(database, backup)
    if loss == "missing":
        database.unlink()
    else:
        database.write_bytes(b"")
    output = serve_expecting_refusal(fresh_service.config_path)
    assert f"state database {database} is {loss}, but containers of this node" in output
    assert container_id in output and "Traceback" not in output
    assert psutil.Process(pid).status() != psutil.STATUS_ZOMBIE  # not killed as unknown
    shutil.copy(backup, database)  # what the refusal asks the operator to do
    fresh_service.start()
    assert destroy(fresh_service.stub(), container_id).reason == pb.DESTROYED
