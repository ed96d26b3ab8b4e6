"""The docker driver's CRI log (adapter/runtimes/docker/crilog.py): records as the supervisor
writes them, reopening, and resuming after a restart without a line twice."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from adapter.core.errors import FailedPrecondition
from adapter.runtimes.crilog import LINE_MAX, records, timestamp
from adapter.runtimes.docker.crilog import CriLog, CriSink
from adapter.runtimes.docker.streams import STDERR, STDOUT
from tests.cri_logs import records_of

DOCKER_ID = "d" * 64


def test_timestamp_is_rfc3339_utc_with_every_nanosecond() -> None:
    assert timestamp(1_700_000_000_000_000_007) == b"2023-11-14T22:13:20.000000007Z"


def test_lines_are_f_records_and_an_unfinished_line_waits() -> None:
    pending = bytearray(b"one\n\ntwo\nhalf")
    data, consumed = records(STDOUT, pending, 0, at_end=False)
    assert records_of(data) == [
        (b"stdout", b"F", b"one"),
        (b"stdout", b"F", b""),
        (b"stdout", b"F", b"two"),
    ]
    assert (consumed, bytes(pending)) == (9, b"half")
    data, consumed = records(STDERR, pending, 0, at_end=True)
    assert records_of(data) == [(b"stderr", b"F", b"half")] and consumed == 4 and not pending


def test_a_long_line_is_cut_into_16_kib_partial_records() -> None:
    pending = bytearray(b"a" * (2 * LINE_MAX + 10) + b"\n" + b"b" * LINE_MAX + b"\n")
    data, consumed = records(STDOUT, pending, 0, at_end=False)
    shape = [(tag, len(text)) for _, tag, text in records_of(data)]
    # A line of exactly 16 KiB is one F, as the supervisor writes it.
    assert shape == [(b"P", LINE_MAX), (b"P", LINE_MAX), (b"F", 10), (b"F", LINE_MAX)]
    assert consumed == 3 * LINE_MAX + 12 and not pending


def test_an_unfinished_line_over_16_kib_is_written_as_partial_records_at_once() -> None:
    pending = bytearray(b"c" * (LINE_MAX + 5))
    data, _ = records(STDOUT, pending, 0, at_end=False)
    assert [(tag, len(text)) for _, tag, text in records_of(data)] == [(b"P", LINE_MAX)]
    assert bytes(pending) == b"ccccc"


def test_reopen_continues_in_a_new_file_and_a_restart_skips_what_is_written(
    tmp_path: Path,
) -> None:
    path = tmp_path / "c.log"
    log = CriLog(str(path), DOCKER_ID)
    sink = CriSink(log, STDOUT)
    sink.write(b"first\nsec")
    path.rename(tmp_path / "c.log.1")
    log.reopen()
    sink.write(b"ond\nthird\n")
    log.close()
    assert [text for _, _, text in records_of((tmp_path / "c.log.1").read_bytes())] == [b"first"]
    assert [text for _, _, text in records_of(path.read_bytes())] == [b"second", b"third"]
    # A restart reads the stream from its start: the mark says what the file holds.
    again = CriLog(str(path), DOCKER_ID)
    replay = CriSink(again, STDOUT)
    replay.write(b"first\nsecond\nthird\nfourth\n")
    CriSink(again, STDERR).write(b"err\n")
    again.close()
    texts = [(stream, text) for stream, _, text in records_of(path.read_bytes())]
    assert texts == [
        (b"stdout", b"second"),
        (b"stdout", b"third"),
        (b"stdout", b"fourth"),
        (b"stderr", b"err"),
    ]


def test_another_containers_mark_counts_for_nothing(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    log = CriLog(str(path), DOCKER_ID)
    CriSink(log, STDOUT).write(b"old\n")
    log.close()
    other = CriLog(str(path), "e" * 64)
    assert other.copied == {STDOUT: 0, STDERR: 0}
    other.close()


def test_a_link_or_a_linked_file_at_the_path_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(FailedPrecondition):
        CriLog(str(tmp_path / "link"), DOCKER_ID)
    os.link(target, tmp_path / "hard")
    with pytest.raises(FailedPrecondition, match="not a regular file of its own"):
        CriLog(str(tmp_path / "hard"), DOCKER_ID)
