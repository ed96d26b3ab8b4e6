"""Starting one LXC container: `lxc-start -F`, LXC's monitor, spawned from the event loop with
our supervisor as the container's init; the supervisor's configuration fed through lxc-start's
stdin (which `lxc-start -F` hands to the init, so the command, its environment and the user are
on no command line); its handshake line read from lxc-start's stdout (`lxc.console.path =
none`), which says that the workload has exec'd, or why it could not; and then the container's
processes found on the host, for the handle (handle.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from adapter.core.errors import LaunchFailed
from adapter.runtimes.lxc.handle import LxcHandle, find_container_processes
from adapter.runtimes.lxc.rootfs import SUPERVISOR_TARGET
from adapter.supervisor import client as protocol
from adapter.supervisor.children import Child as Monitor
from adapter.supervisor.processes import ProcessRef, start_time
from isolators.cgroups.hierarchy import Hierarchies
from isolators.cgroups.locate import cgroup_dirs_of, distinct
from isolators.registry import ACCOUNTED_CONTROLLERS

HANDSHAKE_TIMEOUT_S = 15.0


class LxcStart:
    """lxc-start for the containers under `lxcpath`, whose cgroups are in `hierarchies`."""

    def __init__(self, lxcpath: Path, hierarchies: Hierarchies) -> None:
        self._lxcpath = lxcpath
        self._hierarchies = hierarchies

    def spawn(self, cid: str) -> tuple[Monitor, int]:
        """lxc-start, the supervisor as the init; its config pipe's write end to feed."""
        init = ["/" + SUPERVISOR_TARGET, *protocol.CONFIG_ARGUMENTS]
        command = ["lxc-start", "-F", "-P", str(self._lxcpath), "-n", cid, "--", *init]
        log_file = self._lxcpath / cid / "lxc-start.log"
        return protocol.start_configured(command, log_file)

    async def handshake(
        self, cid: str, process: Monitor, config_fd: int, payload: bytes, workload: str
    ) -> LxcHandle:
        """Feed the supervisor its configuration, read its handshake and find the container's
        processes on the host."""
        try:
            line = await asyncio.wait_for(
                protocol.handshake(process, config_fd, payload), HANDSHAKE_TIMEOUT_S
            )
        except TimeoutError:
            raise LaunchFailed(
                f"lxc: {cid!r} did not start within {HANDSHAKE_TIMEOUT_S} s"
            ) from None
        if not line:
            raise LaunchFailed(f"lxc: launch of {cid!r} failed: {self._lxc_errors(cid)}")
        _, workload_init_start, init_start = protocol.parse_handshake(line, workload)
        monitor_start = start_time(process.pid) or 0
        procs = self._hierarchies.container_dirs(cid)[0] / "cgroup.procs"
        init, workload_init = find_container_processes(
            procs, process.pid, init_start, workload_init_start
        )
        # A workload that already ended took its processes along: pid 0 records "gone".
        init = init or ProcessRef(0, init_start)
        found = cgroup_dirs_of(init.pid, self._hierarchies) if init.pid else {}
        dirs = distinct(d for c, d in found.items() if c in ACCOUNTED_CONTROLLERS)
        return LxcHandle(
            name=cid,
            lxcpath=str(self._lxcpath),
            monitor=ProcessRef(process.pid, monitor_start),
            init=init,
            workload_init=workload_init or ProcessRef(0, workload_init_start),
            status_file=str(self._lxcpath / cid / "run" / "status"),
            cgroup_dirs=tuple(map(str, dirs or self._hierarchies.container_dirs(cid))),
        )

    def _lxc_errors(self, cid: str) -> str:
        """Why lxc-start ended without a handshake: the ERROR lines it logged."""
        directory = self._lxcpath / cid
        lines: list[str] = []
        for name in ("lxc-start.log", "lxc.log"):
            with contextlib.suppress(OSError):
                text = (directory / name).read_text()
                lines += [line for line in text.splitlines() if "ERROR" in line]
        return "; ".join(lines[-3:]) or "lxc-start exited before the container started"
