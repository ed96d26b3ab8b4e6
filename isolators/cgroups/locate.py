"""Where a process's cgroups are, from /proc/PID/cgroup: the one reader of that file.

A runtime whose own tools place a container (LXC's monitor, Docker's CgroupParent, libvirt's
resource partition) learns the real directories from the container's process rather than
assuming them, and hands them to the shared accounting reader.

/proc/PID/cgroup has a line per hierarchy, `ID:CONTROLLERS:PATH`: the controllers comma-separated
("cpu,cpuacct"), a named hierarchy as "name=systemd", the v2 unified hierarchy with none
("0::/a/b"). PATH is relative to the hierarchy's root as the reader's cgroup namespace sees it;
the service runs in the host's, so a path that climbs out of it ("/../x") is not ours to follow.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from isolators.cgroups.hierarchy import Hierarchies

UNIFIED = ""  # the controller key of the v2 line


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """controller -> path inside its hierarchy; the v2 line under UNIFIED."""
    paths: dict[str, str] = {}
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        if not path.startswith("/") or ".." in path.split("/"):
            continue
        for controller in controllers.split(",") if controllers else [UNIFIED]:
            paths.setdefault(controller, path)
    return paths


def process_cgroups(pid: int) -> dict[str, str]:
    """/proc/PID/cgroup as parse_proc_cgroup gives it; empty once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return {}
    return parse_proc_cgroup(text)


def dirs_in(hierarchies: Hierarchies, paths: dict[str, str]) -> dict[str, Path]:
    """controller -> the directory `paths` names in it, for each controller of `hierarchies`:
    its own v1 line, or on v2 the unified line (the same directory for every controller)."""
    dirs: dict[str, Path] = {}
    for controller, mount in hierarchies.mounts.items():
        path = paths.get(UNIFIED if hierarchies.version == 2 else controller)
        if path is not None:
            dirs[controller] = mount / path.lstrip("/")
    return dirs


def cgroup_dirs_of(pid: int, hierarchies: Hierarchies) -> dict[str, Path]:
    """controller -> the cgroup directory process `pid` is in; empty once it is gone."""
    return dirs_in(hierarchies, process_cgroups(pid))


def distinct(dirs: Iterable[Path]) -> tuple[Path, ...]:
    """Each directory once, in order: co-mounted v1 controllers and v2 share one."""
    return tuple(dict.fromkeys(dirs))
