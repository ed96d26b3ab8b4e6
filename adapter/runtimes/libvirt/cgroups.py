"""Where a domain's QEMU lands in the cgroup hierarchies, so the shared accounting reader finds it.

Domains start in libvirt's resource partition `/<cgroups_root>`; libvirt creates the domain's
own cgroup below it. The real directories are read from QEMU's /proc/<pid>/cgroup right after
start and kept in the handle.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import psutil

from adapter.core.errors import FailedPrecondition
from adapter.runtimes.libvirt import domain
from adapter.runtimes.libvirt.handle import GuestHandle
from isolators.cgroups import files
from isolators.cgroups.errors import CgroupFileError
from isolators.cgroups.hierarchy import MOUNTINFO, Hierarchies, parse_mountinfo
from isolators.cgroups.locate import dirs_in, process_cgroups

log = logging.getLogger(__name__)


def partition_dirs(partition: str) -> list[Path]:
    """libvirt maps partition /a/b to `<mount>/a.partition/b.partition` in every cgroup
    hierarchy it uses (here: each v1 controller and the unified mount)."""
    mounts = parse_mountinfo(MOUNTINFO.read_text())
    relative = Path(*(f"{part}.partition" for part in partition.strip("/").split("/")))
    roots = dict.fromkeys([*mounts.v1.values(), *([mounts.v2] if mounts.v2 else [])])
    return [root / relative for root in roots]


def ensure_partition(partition: str) -> None:
    """Create the partition in every hierarchy. A v1 cpuset partition gets its parent's CPUs
    and memory nodes (files.create): libvirt copies the partition's into the domain's group,
    and QEMU cannot join an empty cpuset (ENOSPC)."""
    for directory in partition_dirs(partition):
        try:
            files.create(directory)
        except CgroupFileError as exc:
            raise FailedPrecondition(f"libvirt: resource partition {partition}: {exc}") from exc


def remove_partition(partition: str) -> None:
    """Best effort: a partition another guest still uses stays (rmdir fails on it)."""
    for directory in reversed(partition_dirs(partition)):
        with contextlib.suppress(OSError):
            directory.rmdir()


def attach_qemu(handle: GuestHandle, hierarchies: Hierarchies, partition: str) -> GuestHandle:
    """The handle completed with QEMU's pid and the domain's real cgroup directories, found by
    the domain UUID on QEMU's command line (libvirt keeps its pid file in its own run dir).
    QEMU is looked for among the processes of our partition first, where libvirt started it: a
    handful of cgroup files rather than every process's command line."""
    for pid in _candidate_pids(partition):
        try:
            cmdline = psutil.Process(pid).cmdline()
        except psutil.Error:
            continue  # gone meanwhile, or a process we may not read: not our QEMU
        if "-uuid" in cmdline and handle.domain_uuid in cmdline:
            paths = process_cgroups(pid)
            if not paths:  # QEMU ended already
                break
            dirs = tuple(domain.domain_cgroup_dirs(dirs_in(hierarchies, paths).values()))
            return GuestHandle(**{**handle.__dict__, "qemu_pid": pid, "cgroup_dirs": dirs})
    log.warning("libvirt: QEMU of %s not found; usage will lack cgroup numbers", handle.domain_name)
    return handle


def _candidate_pids(partition: str) -> Iterator[int]:
    """The processes in the partition's cgroups (our domains' QEMUs), hierarchy by hierarchy
    (read only as far as needed), then every process."""
    for directory in partition_dirs(partition):
        for cgroup, _, _ in os.walk(directory):
            try:
                pids = files.read_pids(Path(cgroup))
            except OSError:
                continue  # removed meanwhile (another guest of ours ended)
            yield from pids
    yield from psutil.pids()
