"""What `exec` and `attach` share on our side: our terminal in raw mode while a command's
terminal has the keys, its size following ours, and our stdin read on a thread of its own."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

READ_CHUNK = 32 * 1024


def terminal_size() -> tuple[int, int] | None:
    """Our terminal's (columns, rows); None when stdin is no terminal."""
    try:
        size = os.get_terminal_size(sys.stdin.fileno())
    except OSError:
        return None
    return size.columns, size.lines


@contextlib.contextmanager
def raw_terminal(raw: bool) -> Iterator[None]:
    """Every key passes through (the command's terminal does the echo and ^C)."""
    if not raw:
        yield
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def following_size(raw: bool, on_size: Callable[[int, int], None]) -> Iterator[None]:
    """A window change of ours becomes `on_size(columns, rows)`."""
    if not raw:
        yield
        return

    def on_resize(_signum: int, _frame: Any) -> None:
        size = terminal_size()
        if size is not None:
            on_size(*size)

    previous = signal.signal(signal.SIGWINCH, on_resize)
    try:
        yield
    finally:
        signal.signal(signal.SIGWINCH, previous)


def read_stdin(on_data: Callable[[bytes], None], on_end: Callable[[], None]) -> None:
    """Our stdin, chunk by chunk, then its end, on a daemon thread."""

    def run() -> None:
        fd = sys.stdin.fileno()
        while chunk := os.read(fd, READ_CHUNK):
            on_data(chunk)
        on_end()

    threading.Thread(target=run, daemon=True).start()
