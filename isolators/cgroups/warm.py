"""A launch's first cgroup attach, made cheap by starting its wait early.

Moving a process into a cgroup (a write to cgroup.procs, in any hierarchy, v1 or v2) takes the
kernel's one cgroup_threadgroup_rwsem for writing. The first writer after a quiet spell waits for
an RCU grace period before it gets the lock (rcu_sync_enter): 10-15 ms on this kind of host
(CONFIG_HZ=250, lazy RCU), half of a native launch. Writers that follow within a few ms do not
wait, as the kernel keeps the fast path off for a grace period after the last one.

So a launch keeps the lock warm while it prepares: a thread of ours writes 0 (the writer itself)
to the cgroup.procs of the cgroup the service is in already, which moves nothing but takes the
lock, at once and then every KEEP_WARM_S until the launch is done. The grace period passes while
the launch prepares (network, root filesystem, cgroups), however long that takes (a CNI chain
takes longer than a grace period), and the attach that follows (our supervisor's, runc's, LXC's,
QEMU's) finds the lock warm. While it is kept warm, the kernel's fork and exit take their slower
path, as they do for a grace period after any attach: for the length of a launch only. A host
whose lock never waits (cgroup mounted with favordynmods) pays one write on a thread. Where the
file cannot be written (a service without the right to), warming is off, said once in the log.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from isolators.cgroups.hierarchy import MOUNTINFO, Mounts, parse_mountinfo

log = logging.getLogger(__name__)

PROC_SELF_CGROUP = Path("/proc/self/cgroup")
KEEP_WARM_S = 0.003  # well inside a grace period: the lock never cools while a launch holds it
# Hierarchies whose attach does nothing more for a process already there (cpuset and devices
# check their own rules first): any will do, these are asked first.
PREFERRED = ("pids", "cpuacct", "cpu", "memory")


class OwnCgroup:
    """The cgroup.procs file of the cgroup this process is in, found again at every ask (the
    mounts are read once): a process that was moved since (by systemd, an operator) must not be
    moved back by a warm-up. The first hierarchy mounted here is used (v1 by controller, else
    v2); None when there is none or the tables cannot be read."""

    def __init__(self, mountinfo: Path = MOUNTINFO, proc_cgroup: Path = PROC_SELF_CGROUP) -> None:
        self._proc_cgroup = proc_cgroup
        try:
            self._mounts: Mounts | None = parse_mountinfo(mountinfo.read_text())
        except OSError:
            self._mounts = None

    def procs_file(self) -> Path | None:
        mounts = self._mounts
        if mounts is None:
            return None
        try:
            memberships = self._proc_cgroup.read_text().splitlines()
        except OSError:
            return None
        v1: dict[str, str] = {}  # controller -> this process's cgroup in its hierarchy
        v2 = None
        for line in memberships:
            _, controllers, path = line.split(":", 2)
            if controllers:
                v1.update(dict.fromkeys(controllers.split(","), path.lstrip("/")))
            else:
                v2 = path.lstrip("/")
        mounted = [c for c in (*PREFERRED, *sorted(v1)) if c in v1 and c in mounts.v1]
        if mounted:
            return mounts.v1[mounted[0]] / v1[mounted[0]] / "cgroup.procs"
        if v2 is not None and mounts.v2 is not None:
            return mounts.v2 / v2 / "cgroup.procs"
        return None


class AttachWarmer:
    """`warm()` for one write, `kept_warm()` for writes every KEEP_WARM_S while it is held;
    from the event loop, at once: the writes happen on a thread of their own. An ask that comes
    while a write runs is served by one more write after it (cheap: the lock is warm)."""

    def __init__(self, locate: Callable[[], Path | None] | None) -> None:
        """`locate`: where to write, asked before every write (OwnCgroup.procs_file); None:
        never warm."""
        self._locate = locate
        self._wanted = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._holders = 0  # launches between their start and their attach (kept_warm)
        self.writes = 0  # done so far, for the curious (tests, a debugger)

    @property
    def enabled(self) -> bool:
        return self._locate is not None and not self._closed

    def warm(self) -> None:
        if not self.enabled:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cgroup-warm", daemon=True)
            self._thread.start()
        self._wanted.set()

    @contextlib.contextmanager
    def kept_warm(self) -> Iterator[None]:
        """Warm now, and again every KEEP_WARM_S until the block ends."""
        self._holders += 1
        try:
            self.warm()
            yield
        finally:
            self._holders -= 1

    def _run(self) -> None:
        while True:
            asked = self._wanted.wait(KEEP_WARM_S if self._holders else None)
            if not asked and not self._holders:
                continue  # the last holder left during the wait
            self._wanted.clear()
            if self._closed or self._locate is None:
                return
            procs = self._locate()
            if procs is None:
                log.info("cgroup attach warm-up off: this process's cgroup is not found")
                self._locate = None
                return
            try:
                fd = os.open(procs, os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.write(fd, b"0")
                finally:
                    os.close(fd)
                self.writes += 1
            except OSError as exc:
                log.info("cgroup attach warm-up off: %s: %s", procs, exc.strerror)
                self._locate = None
                return

    def close(self) -> None:
        self._closed = True
        self._wanted.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
