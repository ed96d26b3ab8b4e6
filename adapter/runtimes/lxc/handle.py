"""What the LXC driver needs to find one container again after a restart of the service.

Three processes make a running LXC container here (host pids, each with its start time because
pids are reused and nothing is signalled unless the start time still matches):

    monitor         `lxc-start -F`: LXC's monitor; it tears the container down when init ends
    init            pid 1 of the container: a static containerizer-supervisor, which reaps the
                    workload and writes its exact exit status to the status file
    workload_init   the supervisor's own init (pid 1 of a nested pid namespace) that forwards
                    signals to the workload: what `kill` signals

The status file lives in the container's directory on the host (bind-mounted into the
container), so it is there for a service that restarts after the container ended. Its format is
the supervisor's, read by adapter/supervisor/processes.py like the native driver's.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapter.supervisor.processes import ProcessRef, proc_stat

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LxcHandle:
    """Checkpointed by the core as JSON after launch."""

    name: str
    lxcpath: str
    monitor: ProcessRef
    init: ProcessRef
    workload_init: ProcessRef
    status_file: str
    cgroup_dirs: tuple[str, ...]  # the real cgroup directories, as read from /proc/PID/cgroup

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "lxcpath": self.lxcpath,
            "monitor": self.monitor.to_json(),
            "init": self.init.to_json(),
            "workload_init": self.workload_init.to_json(),
            "status_file": self.status_file,
            "cgroup_dirs": list(self.cgroup_dirs),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LxcHandle:
        """Rebuild from `to_json`; a checkpoint that does not fit raises ValueError naming the
        key rather than producing a handle that signals the wrong process."""
        texts = {}
        for key in ("name", "lxcpath", "status_file"):
            if not isinstance(data.get(key), str):
                raise ValueError(f"lxc handle: {key!r} must be a string, got {data.get(key)!r}")
            texts[key] = data[key]
        dirs = data.get("cgroup_dirs")
        if not isinstance(dirs, list) or not all(isinstance(d, str) for d in dirs):
            raise ValueError(f"lxc handle: 'cgroup_dirs' must be a list of paths, got {dirs!r}")
        return cls(
            name=texts["name"],
            lxcpath=texts["lxcpath"],
            monitor=ProcessRef.from_json(data.get("monitor"), "monitor"),
            init=ProcessRef.from_json(data.get("init"), "init"),
            workload_init=ProcessRef.from_json(data.get("workload_init"), "workload_init"),
            status_file=texts["status_file"],
            cgroup_dirs=tuple(dirs),
        )


def find_container_processes(
    cgroup_procs: Path, monitor_pid: int, init_start: int, workload_init_start: int
) -> tuple[ProcessRef | None, ProcessRef | None]:
    """Host (init, workload init) among the pids in `cgroup_procs`: the init is the monitor's
    child, the workload init the init's child, each with the start time the supervisor reported
    (start times are the same in every pid namespace; pids are not). None for one that has
    already exited."""
    try:
        pids = [int(line) for line in cgroup_procs.read_text().split()]
    except OSError as exc:
        # A workload that ended at once may have had its cgroup removed by LXC's teardown
        # already (ENOENT) or while we read it (ENODEV): its processes are gone either way.
        if exc.errno not in (errno.ENOENT, errno.ENODEV):
            raise
        return None, None
    stats = {pid: (stat[1], stat[2]) for pid in pids if (stat := proc_stat(pid)) is not None}

    def child(parent: int, started: int) -> ProcessRef | None:
        for pid, stat in stats.items():
            if stat == (parent, started):
                return ProcessRef(pid, started)
        return None

    init = child(monitor_pid, init_start)
    return init, child(init.pid, workload_init_start) if init else None
