"""The CRI log format as the tests read it back: `<RFC3339Nano> <stdout|stderr> <F|P> <line>`."""

from __future__ import annotations

import re
from pathlib import Path

RECORD = re.compile(rb"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z) (stdout|stderr) ([FP]) (.*)")


def records_of(data: bytes) -> list[tuple[bytes, bytes, bytes]]:
    """(stream, tag, content) of each record, each line checked for the record's form."""
    found = []
    for line in data.splitlines():
        match = RECORD.fullmatch(line)
        assert match is not None, line[:200]
        found.append((match.group(2), match.group(3), match.group(4)))
    return found


def records(path: Path) -> list[tuple[bytes, bytes, bytes]]:
    """records_of the log file at `path`."""
    return records_of(path.read_bytes())
