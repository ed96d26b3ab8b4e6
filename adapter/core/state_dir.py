"""The state directory as one service's private place: its lock, its modes, and the refusal to
start over running containers whose records are gone.

- One service per state directory: two would recover the same records, fight over the socket
  and kill each other's containers as unknown. An exclusive flock on `<state_dir>/lock`, held for
  the life of the process (the kernel drops it when the process dies, however it dies), with the
  holder's pid written in the file so the refusal can name it.
- The directory is 0711: other users may pass through it to a path they were given (a non-root
  workload reaching its own sandbox under `sandboxes/`, a runtime's unprivileged helper reaching
  its files) but may not list it. The default sandbox root is 0711 for the same reason.
- A missing or empty state.db beside running containers of ours means the records were lost, not
  that nothing runs here: starting would kill those containers as unknown, so we refuse.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
from pathlib import Path

from adapter.core.errors import FailedPrecondition
from isolators.cgroups.errors import HierarchyError
from isolators.cgroups.hierarchy import Hierarchies, unescape_mountinfo

LOCK_FILE = "lock"
PRIVATE_DIRECTORY_MODE = 0o711  # traverse only: no listing by other users
SHOWN_TRACES = 5


class StateDirLock:
    """The held lock; released when closed or when the process ends."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def lock_state_dir(state_dir: Path) -> StateDirLock:
    """Take the state directory for this process, or say which process has it."""
    path = state_dir / LOCK_FILE
    # O_CLOEXEC: a supervisor we spawn must not inherit the lock and outlive us holding it.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise FailedPrecondition(
            f"state directory {state_dir} is in use by another containerizer service"
            f" (pid {holder}, holding {path}): stop it first, or give this one its own state_dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return StateDirLock(fd, path)


def make_private_directory(path: Path) -> None:
    """Create `path` 0711, or take group/other read and write away from an existing one."""
    path.mkdir(mode=PRIVATE_DIRECTORY_MODE, parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o7777
    if mode & ~PRIVATE_DIRECTORY_MODE:
        os.chmod(path, mode & PRIVATE_DIRECTORY_MODE)


# mount(2) flags, and statvfs's for those a bind remount must keep (it sets them all anew).
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_RELATIME = 1024, 2048, 4096, 1 << 21
KEPT_FLAGS = {
    os.ST_RDONLY: MS_RDONLY,
    os.ST_NOEXEC: MS_NOEXEC,
    os.ST_NOATIME: MS_NOATIME,
    os.ST_NODIRATIME: MS_NODIRATIME,
    os.ST_RELATIME: MS_RELATIME,
}
MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


def _mount(source: Path | None, target: Path, flags: int) -> None:
    source_bytes = None if source is None else os.fsencode(source)
    if _libc.mount(source_bytes, os.fsencode(target), None, flags, None) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"mount {target}: {os.strerror(error)}")


def is_nosuid(path: Path) -> bool:
    flags = os.statvfs(path).f_flag
    return bool(flags & os.ST_NOSUID and flags & os.ST_NODEV)


def mount_nosuid(path: Path) -> bool:
    """Make `path` a mount of its own with nosuid and nodev, keeping its other flags, unless its
    filesystem is mounted so already; True if this made the mount. For the sandboxes: a workload
    that is root on the host (no user namespace) may leave a setuid-root file in its sandbox,
    and open the sandbox to every user (it owns it): a host user must not gain root by it."""
    if is_nosuid(path):
        return False
    kept = os.statvfs(path).f_flag
    _mount(path, path, MS_BIND)
    flags = MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV
    flags |= sum(mount_flag for st_flag, mount_flag in KEPT_FLAGS.items() if kept & st_flag)
    try:
        _mount(None, path, flags)
    except OSError:
        _libc.umount2(os.fsencode(path), MNT_DETACH)
        raise
    return True


def is_mount_point(path: Path) -> bool:
    """Whether a mount sits on `path`, a bind of its own filesystem included (which
    os.path.ismount cannot see: the device is its parent's)."""
    wanted = str(path)
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            point = line.split(" ", 5)[4]
            if point == wanted or unescape_mountinfo(point) == wanted:
                return True
    return False


def unmount_nosuid(path: Path) -> None:
    """mount_nosuid undone, once nothing is left under `path` to protect. Only a bind of the
    filesystem its parent is on (what mount_nosuid makes): a filesystem of its own mounted there
    is the operator's."""
    if os.stat(path).st_dev != os.stat(path.parent).st_dev or not is_mount_point(path):
        return
    with os.scandir(path) as entries:
        if any(entries):
            return
    _libc.umount2(os.fsencode(path), MNT_DETACH)


def refuse_start_without_records(
    database: Path,
    database_empty: bool,
    *,
    state_dir: Path,
    cgroups_root: str,
    cgroups_hierarchy: str | None,
) -> None:
    """With no records, any live container of ours means they were lost: refuse to start."""
    if not database_empty:
        return
    traces = live_cgroups(cgroups_root, cgroups_hierarchy) + run_directories(state_dir)
    if not traces:
        return
    what = "empty" if database.exists() else "missing"
    shown = ", ".join(traces[:SHOWN_TRACES])
    more = f" and {len(traces) - SHOWN_TRACES} more" if len(traces) > SHOWN_TRACES else ""
    raise FailedPrecondition(
        f"state database {database} is {what}, but containers of this node are still running"
        f" ({shown}{more}): restore the database from a backup, or stop those containers and"
        " remove what they left before starting; starting now would kill them as unknown"
    )


def live_cgroups(cgroups_root: str, cgroups_hierarchy: str | None) -> list[str]:
    """Our per-container cgroups (`<mount>/<cgroups_root>/<id>`, any depth) with processes."""
    override = Path(cgroups_hierarchy) if cgroups_hierarchy else None
    try:
        hierarchies = Hierarchies.discover(cgroups_root, override=override)
    except (HierarchyError, ValueError):
        return []  # no cgroups on this host: nothing of ours can run in one
    found = []
    for root in sorted({hierarchies.root(controller) for controller in hierarchies.mounts}):
        found += [str(child) for child in _subdirectories(root) if _has_processes(child)]
    return found


def run_directories(state_dir: Path) -> list[str]:
    """The native runtime's per-container run directories: one exists while a container runs."""
    return [str(child) for child in _subdirectories(state_dir / "native")]


def _subdirectories(directory: Path) -> list[Path]:
    """Subdirectories of a directory that may not exist (or vanish while we look)."""
    try:
        return sorted(path for path in directory.iterdir() if path.is_dir())
    except OSError:
        return []


def _has_processes(cgroup: Path) -> bool:
    for directory, _, files in os.walk(cgroup):
        if "cgroup.procs" in files:
            try:
                if (Path(directory) / "cgroup.procs").read_text().strip():
                    return True
            except OSError:
                continue
    return False
