"""One guest: what the service needs to find it again after a restart, and how its end is read.

The handle is checkpointed by the core as JSON. The exit status itself is not in it: the guest's
init writes `exit <code>` to its status serial port, which QEMU writes into `status_path`, a
file that outlives both the guest and this service.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

_STATUS_LINE = re.compile(rb"^exit (\d{1,3})\s*$", re.MULTILINE)


@dataclass(frozen=True)
class GuestHandle:
    domain_name: str
    domain_uuid: str
    run_dir: str
    status_path: str
    console_path: str
    virt_type: str
    qemu_pid: int = 0
    # The domain's cgroup directories (one per v1 controller) as QEMU's /proc/<pid>/cgroup
    # showed them right after start; read with the shared accounting reader.
    cgroup_dirs: tuple[str, ...] = field(default_factory=tuple)
    # Disk-image mode: the configured name of the base disk; "" for a command guest.
    disk_image: str = ""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["cgroup_dirs"] = list(self.cgroup_dirs)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GuestHandle:
        return cls(
            domain_name=str(data["domain_name"]),
            domain_uuid=str(data["domain_uuid"]),
            run_dir=str(data["run_dir"]),
            status_path=str(data["status_path"]),
            console_path=str(data["console_path"]),
            virt_type=str(data["virt_type"]),
            qemu_pid=int(data.get("qemu_pid", 0)),
            cgroup_dirs=tuple(str(d) for d in data.get("cgroup_dirs", ())),
            disk_image=str(data.get("disk_image", "")),
        )


def read_exit_code(status_path: str | Path) -> int | None:
    """The code the guest's init reported, or None when it reported nothing (killed, crashed,
    destroyed mid-boot). The last line wins, should a port ever carry more than one."""
    try:
        data = Path(status_path).read_bytes()
    except OSError:
        return None
    codes = _STATUS_LINE.findall(data)
    return int(codes[-1]) & 0xFF if codes else None


def console_tail(console_path: str | Path, limit: int = 600) -> str:
    """The end of the guest's kernel console, for messages about a guest that died silently."""
    try:
        with Path(console_path).open("rb") as console:
            console.seek(0, 2)
            size = console.tell()
            console.seek(max(0, size - limit))
            text = console.read().decode(errors="replace")
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())[-limit:]
