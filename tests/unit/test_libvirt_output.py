"""The libvirt guest's CRI log (adapter/runtimes/libvirt/output.py) with plain files standing for
the serial files QEMU or virtlogd writes: records, rotations, bounded reads, the end of the
output, and resuming after a restart without a record twice or one lost."""

from __future__ import annotations

import asyncio
import logging
import os
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import pytest

from adapter.core.errors import FailedPrecondition
from adapter.core.model import Exit
from adapter.runtimes.crilog import LINE_MAX
from adapter.runtimes.libvirt import output
from adapter.runtimes.libvirt.output import GuestOutput, GuestOutputs
from tests.cri_logs import records as cri_records


@dataclass(frozen=True)
class Places:
    sandbox: Path  # with `stdout` and `stderr`, empty as a launch leaves them
    run_dir: Path
    log_path: Path

    def open(self) -> GuestOutput:
        self.log_path.parent.mkdir(exist_ok=True)
        return GuestOutput(str(self.log_path), str(self.sandbox), str(self.run_dir))


@pytest.fixture
def places(tmp_path: Path) -> Places:
    sandbox, run_dir = tmp_path / "sandbox", tmp_path / "run"
    sandbox.mkdir()
    run_dir.mkdir()
    for name in ("stdout", "stderr"):
        (sandbox / name).write_bytes(b"")
    return Places(sandbox, run_dir, tmp_path / "logs" / "c.log")


def _append(path: Path, data: bytes) -> None:
    with path.open("ab") as file:
        file.write(data)


def _rotate(sandbox: Path, name: str = "stdout", backups: int = 3) -> None:
    """What virtlogd does at max_size: NAME.k -> NAME.k+1 (the oldest dropped), NAME -> NAME.0,
    a new NAME."""
    (sandbox / f"{name}.{backups - 1}").unlink(missing_ok=True)
    for index in range(backups - 1, 0, -1):
        if (sandbox / f"{name}.{index - 1}").exists():
            (sandbox / f"{name}.{index - 1}").rename(sandbox / f"{name}.{index}")
    (sandbox / name).rename(sandbox / f"{name}.0")
    (sandbox / name).write_bytes(b"")


def _age(*paths: Path) -> None:
    """Files last written long ago: their writer is done."""
    for path in paths:
        os.utime(path, (1, 1))


async def _finish(guest_output: GuestOutput) -> None:
    stopped: asyncio.Future[Exit] = asyncio.get_running_loop().create_future()
    stopped.set_result(Exit(exit_code=0))
    await asyncio.wait_for(guest_output.follow(stopped), 10)


async def test_lines_long_lines_and_the_last_unfinished_line(places: Places) -> None:
    sandbox, log_path = places.sandbox, places.log_path
    guest_output = places.open()
    _append(sandbox / "stdout", b"one\n" + b"x" * (LINE_MAX + 5) + b"\nno newline")
    _append(sandbox / "stderr", b"oops\n")
    await guest_output.copy()
    assert cri_records(log_path) == [
        (b"stdout", b"F", b"one"),
        (b"stdout", b"P", b"x" * LINE_MAX),
        (b"stdout", b"F", b"xxxxx"),
        (b"stderr", b"F", b"oops"),
    ]  # the unfinished line waits for its end...
    _age(sandbox / "stdout", sandbox / "stderr")
    await _finish(guest_output)  # ...or for the end of the guest
    assert cri_records(log_path)[-1] == (b"stdout", b"F", b"no newline")
    assert guest_output.closed
    with pytest.raises(FailedPrecondition, match="written no more"):
        guest_output.reopen()


async def test_a_restart_goes_on_where_the_records_stopped(places: Places) -> None:
    sandbox, log_path = places.sandbox, places.log_path
    first = places.open()
    _append(sandbox / "stdout", b"before\nhal")
    _append(sandbox / "stderr", b"e1\n")
    await first.copy()
    first.close()  # the service stops: "hal" was read, never written
    _append(sandbox / "stdout", b"f\nwhile down\n")
    _append(sandbox / "stderr", b"e2\n")
    again = places.open()
    await again.copy()
    _append(sandbox / "stdout", b"after\n")
    _age(sandbox / "stdout", sandbox / "stderr")
    await _finish(again)
    texts = [(stream, text) for stream, _, text in cri_records(log_path)]
    assert texts == [
        (b"stdout", b"before"),
        (b"stderr", b"e1"),
        (b"stdout", b"half"),
        (b"stdout", b"while down"),
        (b"stderr", b"e2"),
        (b"stdout", b"after"),
    ]


async def test_rotations_are_followed_and_a_cut_line_goes_on_in_a_partial_record(
    places: Places,
) -> None:
    sandbox, log_path = places.sandbox, places.log_path
    guest_output = places.open()
    _append(sandbox / "stdout", b"a\nhal")
    await guest_output.copy()
    _rotate(sandbox)
    _append(sandbox / "stdout.0", b"f-")  # written before the rename: read to the end first
    _append(sandbox / "stdout", b"line\nb\n")
    await guest_output.copy()
    assert cri_records(log_path) == [
        (b"stdout", b"F", b"a"),
        (b"stdout", b"P", b"half-"),
        (b"stdout", b"F", b"line"),
        (b"stdout", b"F", b"b"),
    ]


async def test_files_rotated_while_the_service_was_down_are_found_again(
    places: Places, caplog: pytest.LogCaptureFixture
) -> None:
    sandbox, log_path = places.sandbox, places.log_path
    first = places.open()
    _append(sandbox / "stdout", b"1\n")
    await first.copy()
    first.close()
    _append(sandbox / "stdout", b"2\n")
    _rotate(sandbox)
    _append(sandbox / "stdout", b"3\n")
    _rotate(sandbox)
    _append(sandbox / "stdout", b"4\n")
    again = places.open()
    await again.copy()
    assert [text for _, _, text in cri_records(log_path)] == [b"1", b"2", b"3", b"4"]
    again.close()
    # Rotated beyond the backups kept: what is left is copied, the loss is said. (The file
    # stays open, so that its inode is not a new file's when the position is looked for.)
    held = os.open(sandbox / "stdout", os.O_RDONLY)
    for text in (b"5\n", b"6\n", b"7\n", b"8\n", b"9\n"):
        _rotate(sandbox)
        _append(sandbox / "stdout", text)
    with caplog.at_level(logging.WARNING):
        last = places.open()
        await last.copy()
    os.close(held)
    assert [text for _, _, text in cri_records(log_path)][4:] == [b"6", b"7", b"8", b"9"]
    assert "rotated away" in caplog.text
    last.close()


async def test_reads_are_bounded_whatever_the_guest_prints(places: Places) -> None:
    sandbox, log_path = places.sandbox, places.log_path
    size = 8 * 1024 * 1024
    with (sandbox / "stdout").open("ab") as file:  # one line of 8 MiB, then a short one
        for _ in range(size // (1024 * 1024)):
            file.write(b"y" * 1024 * 1024)
        file.write(b"\nend\n")
    guest_output = places.open()
    tracemalloc.start()
    try:
        await guest_output.copy()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024  # a read and a record at a time, never the output
    shape = [(tag, len(text)) for _, tag, text in cri_records(log_path)]
    # The last 16 KiB of the long line end it: an F, as the supervisor writes it.
    assert shape == [(b"P", LINE_MAX)] * (size // LINE_MAX - 1) + [(b"F", LINE_MAX), (b"F", 3)]
    guest_output.close()


async def test_the_end_waits_for_the_writer_to_be_done(
    places: Places, monkeypatch: pytest.MonkeyPatch
) -> None:
    """virtlogd writes what QEMU left in its pipe after QEMU is gone: output that lands after
    the stop, while the file is not yet still, is in the log before the follower ends."""
    sandbox, log_path = places.sandbox, places.log_path
    monkeypatch.setattr(output, "QUIET_S", 0.5)
    guest_output = places.open()
    _append(sandbox / "stdout", b"early\n")
    stopped: asyncio.Future[Exit] = asyncio.get_running_loop().create_future()
    follower = asyncio.ensure_future(guest_output.follow(stopped))
    await asyncio.sleep(0.1)
    stopped.set_result(Exit(exit_code=0))
    await asyncio.sleep(0.1)
    _append(sandbox / "stdout", b"late")
    await asyncio.wait_for(follower, 10)
    assert [text for _, _, text in cri_records(log_path)] == [b"early", b"late"]


async def test_the_followers_of_a_driver(places: Places) -> None:
    sandbox, log_path = places.sandbox, places.log_path
    followers = GuestOutputs()
    stopped: asyncio.Future[Exit] = asyncio.get_running_loop().create_future()
    followers.follow("c1", places.open(), stopped)
    _append(sandbox / "stdout", b"first\n")
    await asyncio.sleep(0.3)
    log_path.rename(log_path.with_name("c.log.1"))
    followers.reopen("c1")  # the kubelet's rotation: the rest goes to a new file
    _append(sandbox / "stdout", b"second\n")
    _age(sandbox / "stdout", sandbox / "stderr")
    stopped.set_result(Exit(exit_code=0))
    await asyncio.wait_for(followers.drained("c1"), 10)
    assert [text for _, _, text in cri_records(log_path.with_name("c.log.1"))] == [b"first"]
    assert [text for _, _, text in cri_records(log_path)] == [b"second"]
    with pytest.raises(FailedPrecondition):
        followers.reopen("c1")  # the guest has ended
    await followers.stop("c1")
    with pytest.raises(FailedPrecondition, match="no CRI log"):
        followers.reopen("c1")
    await followers.drained("c1")  # none: at once


def test_links_are_never_followed(places: Places, tmp_path: Path) -> None:
    sandbox, log_path = places.sandbox, places.log_path
    secret = tmp_path / "secret"
    secret.write_bytes(b"host secret\n")
    for name in ("stdout", "stderr"):
        (sandbox / name).unlink()
    (sandbox / "stdout").symlink_to(secret)
    os.link(secret, sandbox / "stderr")  # a hard link to another file
    log_path.parent.mkdir()
    log_path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FailedPrecondition, match="CRI log"):
        places.open()
    log_path.unlink()
    guest_output = places.open()
    asyncio.run(guest_output.copy())
    guest_output.close()
    assert log_path.read_bytes() == b""
    assert not (tmp_path / "elsewhere").exists()
