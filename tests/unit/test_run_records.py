"""The parts of the killed-run sweep that decide what belongs to a run (tests/run_records.py);
the sweep itself runs against the real host in tests/integration/test_killed_run_sweep.py."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from tests.run_records import LiveRuns, RunRecord, names_directory, run_scoped_bridge


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("/tmp/pytest-of-root/pytest-1", True),
        ("/tmp/pytest-of-root/pytest-1/popen-gw0/containerd0/config.toml", True),
        ("containerd\0--config\0/tmp/pytest-of-root/pytest-1/config.toml", True),
        ("--data-root=/tmp/pytest-of-root/pytest-1/data", True),
        ("/tmp/pytest-of-root/pytest-1 (deleted)", True),  # a removed working directory
        ("/tmp/pytest-of-root/pytest-12/config.toml", False),  # another run's basetemp
        ("/tmp/pytest-of-root/pytest-1.log", False),
        ("/tmp/pytest-of-root", False),
    ],
)
def test_a_directory_is_named_only_as_a_whole_path(text: str, named: bool) -> None:
    assert names_directory(text, "/tmp/pytest-of-root/pytest-1") is named


def test_a_dead_runs_directory_holding_a_live_runs_is_spared() -> None:
    live = LiveRuns({"aaaaaaaa"}, [Path("/tmp/pytest-of-root/pytest-7/popen-gw0/libvirtd0")])
    dead = [
        Path("/tmp/pytest-of-root/pytest-7"),  # holds the live one: never the dead run's to take
        Path("/tmp/pytest-of-root/pytest-7/popen-gw0/libvirtd0"),
        Path("/tmp/pytest-of-root/pytest-7/popen-gw0/test_x0/libvirtd"),  # inside: the dead one's
        Path("/tmp/pytest-of-root/pytest-6"),
    ]
    assert live.spare(dead) == dead[2:]


@pytest.mark.parametrize("run_id", ["", "abc", "ABCDEFGH", "abcd-fgh", "abcdefghi", "a*cdefgh"])
def test_a_run_id_that_could_match_others_names_is_refused(tmp_path: Path, run_id: str) -> None:
    with pytest.raises(ValueError, match="CTZ_TEST_RUN_ID"):
        RunRecord([tmp_path / "basetemp"], run_id=run_id, registry=tmp_path / "runs")
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_a_record_is_locked_until_released(tmp_path: Path) -> None:
    registry = tmp_path / "runs"
    record = RunRecord([tmp_path / "basetemp"], run_id="0123abcd", registry=registry)
    assert sorted(path.suffix for path in registry.iterdir()) == [".json", ".lock"]
    descriptor = os.open(record.lock_path, os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):  # what a sweeper tries: the run is alive
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(descriptor)
    record.release()
    assert list(registry.iterdir()) == []


def test_a_bridge_name_fits_an_interface_name_and_carries_the_run_id() -> None:
    from tests.cgroup_roots import RUN_ID

    name = run_scoped_bridge()
    assert len(name) <= 15 and name.startswith(f"c{RUN_ID}-")
