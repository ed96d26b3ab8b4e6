"""The images CLI's progress display: a bar redrawn in place on a terminal, a few plain lines
otherwise."""

from __future__ import annotations

import io

from adapter.clients.cli.images import ProgressDisplay

MIB = 1 << 20


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def feed(display: ProgressDisplay) -> None:
    for done in range(0, 10 * MIB + 1, MIB):
        display.update("busybox.tar", done, 10 * MIB)
    display.finish()


def test_a_terminal_gets_one_bar_redrawn_in_place() -> None:
    stream = Terminal()
    feed(ProgressDisplay(stream))
    output = stream.getvalue()
    assert output.count("\r") == 11 and output.endswith("\n") and output.count("\n") == 1
    last = output.rsplit("\r", 1)[1]
    assert "[" + "#" * 30 + "]" in last and "100%" in last and "10.0 MiB / 10.0 MiB" in last


def test_a_pipe_gets_a_line_per_quarter() -> None:
    stream = io.StringIO()
    feed(ProgressDisplay(stream))
    lines = stream.getvalue().splitlines()
    assert [line.split(": ")[1].split()[0] for line in lines] == ["0%", "30%", "50%", "80%", "100%"]
    assert "\r" not in stream.getvalue()
