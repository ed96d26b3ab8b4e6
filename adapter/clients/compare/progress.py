"""Progress of a compare run on stderr, so stdout stays the report (pipe-able, --json clean).

On a terminal: one bar redrawn in place. Anywhere else (CI logs, files): one plain line per stage,
because carriage returns make unreadable logs.
"""

from __future__ import annotations

from typing import IO

BAR_WIDTH = 30


class Progress:
    def __init__(self, stream: IO[str], *, interactive: bool | None = None) -> None:
        self.stream = stream
        self.interactive = stream.isatty() if interactive is None else interactive
        self.total = 0
        self.done = 0
        self.label = ""
        self._drawn_width = 0

    def expect(self, units: int) -> None:
        """Announce more work: the bar's end moves, its position does not."""
        self.total += units
        self._draw()

    def stage(self, label: str) -> None:
        self.label = label
        if self.interactive:
            self._draw()
        else:
            print(f"compare: {label}", file=self.stream, flush=True)

    def advance(self, units: int = 1) -> None:
        self.done = min(self.done + units, self.total) if self.total else self.done + units
        self._draw()

    def finish(self) -> None:
        if self.interactive and self._drawn_width:
            self.stream.write("\r" + " " * self._drawn_width + "\r")
            self.stream.flush()
            self._drawn_width = 0

    def bar(self) -> str:
        fraction = self.done / self.total if self.total else 0.0
        filled = round(BAR_WIDTH * fraction)
        return f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {fraction:4.0%}  {self.label}"

    def _draw(self) -> None:
        if not self.interactive:
            return
        line = self.bar()
        padding = " " * max(0, self._drawn_width - len(line))
        self.stream.write("\r" + line + padding)
        self.stream.flush()
        self._drawn_width = len(line)
