"""What a test run killed halfway leaves behind is removed by the next run that starts.

A run (the xdist controller of a pytest session, or a benchmark's private libvirtd) keeps a record
in REGISTRY: `<name>.json` with its run id, its pid and the directories it owns (the session's
basetemp), beside `<name>.lock`, which it holds with flock for as long as it lives. The kernel
drops the lock when the process dies, however it dies; so at the start of a run every record
whose lock can be taken belongs to a dead run, and `sweep_dead_runs` ends and removes what that
run left:

- processes: those whose environment carries the run id (every process a run starts inherits
  CTZ_TEST_RUN_ID), whose command line names one of its directories or a name carrying its id
  (a containerd namespace `ctz-<id>-...`, a cgroup parent), whose working directory is in one of
  its directories; with all their descendants (QEMU below libvirtd, a workload below its
  supervisor); then whatever is still in its cgroups (`*-<id>-*` in every hierarchy);
- mounts under its directories and under the temporary directories named with its id (a private
  dockerd's overlays and nsfs mounts), deepest first, lazily if busy;
- its cgroups, deepest first; its bridges, veths, network namespaces and nft tables (their names
  start with `c<id>-`); then its directories and the record.

Several records may share a run id (a session's record and its libvirtd's); a run id is dead when
no live record carries it. Nothing is touched that does not carry a dead run's id or directory,
and a dead record's directory that holds a live record's is left out, so a concurrent run (a
developer's second suite) keeps all of its things. CONTAINERIZER_TEST_RUN_REGISTRY moves the
registry (a test's pretend runs use one of their own).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from tests.cgroup_roots import RUN_ID, remove_cgroup_trees, run_cgroup_roots, tree_pids

RUN_ID_VARIABLE = "CTZ_TEST_RUN_ID"
# /run is emptied by a reboot, as are the cgroups, mounts and processes the records speak for.
REGISTRY = Path(os.environ.get("CONTAINERIZER_TEST_RUN_REGISTRY", "/run/containerizer-tests/runs"))
# Where run-scoped temporary directories go: /tmp, for short unix socket paths (108 bytes).
TEMP_ROOT = Path("/tmp")
NETNS_DIR = Path("/run/netns")
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8
KILL_SECONDS = 15.0
# What a run id looks like (uuid4().hex[:8] by default). Strict, since the sweep matches names
# and command lines against it, and a bridge name has room for exactly 8 characters of it.
RUN_ID_FORM = re.compile(r"[0-9a-z]{8}")


def run_scoped_tempdir(prefix: str) -> Path:
    """A new directory `/tmp/<prefix>-<run id>-XXXXXXXX`: a dead run's sweep finds it by name."""
    return Path(tempfile.mkdtemp(prefix=f"{prefix}-{RUN_ID}-", dir=TEMP_ROOT))


def remove_tree(directory: Path) -> None:
    """Remove a directory however deep (a disk test makes 10,000 levels, past what Python's
    recursive rmtree survives): coreutils' rm walks it without recursion."""
    subprocess.run(["rm", "-rf", "--", str(directory)], check=False)


def bridge_prefix(run_id: str) -> str:
    """Network names of a run start with this: `c<id>-`, so that a bridge name stays within
    IFNAMSIZ (15 characters) with room for a per-service suffix."""
    return f"c{run_id}-"


def run_scoped_bridge() -> str:
    """A fresh bridge name of this run (15 characters)."""
    return bridge_prefix(RUN_ID) + uuid.uuid4().hex[:5]


class RunRecord:
    """One run's entry in the registry, locked until `release()` or the process's death."""

    def __init__(
        self, directories: Iterable[Path], run_id: str = RUN_ID, registry: Path = REGISTRY
    ) -> None:
        _check_run_id(run_id)
        self.run_id = run_id
        self.directories = [_owned_directory(path) for path in directories]
        registry.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.name = f"{run_id}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.path = registry / f"{self.name}.json"
        self.lock_path = registry / f"{self.name}.lock"
        content = {
            "run_id": run_id,
            "pid": os.getpid(),
            "started": time.time(),
            "directories": [str(path) for path in self.directories],
        }
        partial = registry / f".{self.name}.tmp"
        partial.write_text(json.dumps(content))
        partial.replace(self.path)
        # Locked under a hidden name, then renamed: a sweeper never sees the lock free. Not
        # inherited by children (O_CLOEXEC): a leaked daemon must not keep a dead run alive.
        hidden = registry / f".{self.name}.lock"
        self._lock: int | None = os.open(hidden, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        hidden.rename(self.lock_path)

    def release(self) -> None:
        """The run ended and removed what it made: its record goes."""
        if self._lock is None:
            return
        self.path.unlink(missing_ok=True)
        self.lock_path.unlink(missing_ok=True)
        os.close(self._lock)
        self._lock = None


def _check_run_id(run_id: str) -> None:
    if RUN_ID_FORM.fullmatch(run_id) is None:
        raise ValueError(
            f"{RUN_ID_VARIABLE}={run_id!r}: a run id is 8 characters of [0-9a-z]"
            " (unset it to get a fresh one)"
        )


def _owned_directory(path: Path) -> Path:
    """A directory a run may own: absolute and below a top-level one (`/tmp/x`, never `/tmp`),
    since the sweep kills what names it and removes it."""
    path = Path(os.path.abspath(path))
    if len(path.parts) < 3:
        raise ValueError(f"run record directories: {str(path)!r} is not a run's own directory")
    return path


@dataclass
class DeadRun:
    """What the registry says about a dead run: the union of its records."""

    run_id: str
    directories: list[Path] = field(default_factory=list)
    records: list[Path] = field(default_factory=list)  # lock files, held by the sweeper
    pids: list[int] = field(default_factory=list)


@dataclass
class SweptRun:
    """What the sweep of one dead run ended and removed, and what it could not."""

    run_id: str
    pids: list[int]
    directories: list[Path]
    killed: int = 0
    unmounted: int = 0
    cgroups: int = 0
    network: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = (
            f"dead test run {self.run_id} (pid {', '.join(map(str, self.pids))}):"
            f" killed {self.killed} processes, unmounted {self.unmounted} mounts,"
            f" removed {self.cgroups} cgroup trees and {len(self.network)} network names"
        )
        return text + (f"; could not remove {', '.join(self.left)}" if self.left else "")


def sweep_dead_runs(registry: Path = REGISTRY) -> list[SweptRun]:
    """End and remove what every dead run recorded in `registry` left; drop their records
    (kept, to be tried again, when something could not be removed)."""
    if not registry.is_dir():
        return []
    held: dict[Path, int] = {}
    try:
        live, dead = _classify_records(registry, held)
        swept = []
        for run in dead.values():
            if run.run_id in live.run_ids:
                continue  # one of its records is alive: the run is, too
            result = sweep_run(run.run_id, live.spare(run.directories))
            result.pids = run.pids
            if not result.left:
                for lock_path in run.records:
                    lock_path.with_suffix(".json").unlink(missing_ok=True)
                    lock_path.unlink(missing_ok=True)
            swept.append(result)
        orphans = sweep_orphan_networks(live.run_ids | set(dead))
        if orphans is not None:
            swept.append(orphans)
        return swept
    finally:
        for descriptor in held.values():
            os.close(descriptor)


# A test bridge's name (run_scoped_bridge): "c", the run id, "-", five hex digits.
RUN_BRIDGE = re.compile(r"c([0-9a-z]{8})-[0-9a-f]{5}")


def sweep_orphan_networks(recorded_ids: set[str]) -> SweptRun | None:
    """Network names of test runs no record names any more (a run that ended without removing
    all it made, before runs checked their own network at the end): nobody owns them."""
    spared = recorded_ids | {RUN_ID}  # and this process's own run, recorded or not yet
    run_ids = {
        match.group(1)
        for name in _network_names()
        if (match := RUN_BRIDGE.match(name)) is not None and match.group(1) not in spared
    }
    if not run_ids:
        return None
    result = SweptRun("orphans", [], [])
    for run_id in sorted(run_ids):
        removed, left = remove_network(bridge_prefix(run_id))
        result.network += removed
        result.left += left
    return result


def _network_names() -> list[str]:
    names = [path.name for path in NETNS_DIR.glob("c*")] if NETNS_DIR.is_dir() else []
    output = _output("ip", "-j", "link", "show")
    names += [str(link.get("ifname", "")) for link in json.loads(output or "[]")]
    return names


@dataclass
class LiveRuns:
    """What the live records name: never swept, whatever a dead record says."""

    run_ids: set[str] = field(default_factory=set)
    directories: list[Path] = field(default_factory=list)

    def spare(self, directories: list[Path]) -> list[Path]:
        """`directories` without those holding a live run's directory (a dead run's directory
        inside a live one's, as a test's pretend run makes, is the dead run's own)."""
        return [
            directory
            for directory in directories
            if not any(live.is_relative_to(directory) for live in self.directories)
        ]


def _classify_records(registry: Path, held: dict[Path, int]) -> tuple[LiveRuns, dict[str, DeadRun]]:
    """The live runs, and the dead ones, whose locks are taken into `held` so that a concurrent
    sweeper leaves them to us. A record without a valid run id is left alone."""
    live = LiveRuns()
    dead: dict[str, DeadRun] = {}
    for lock_path in sorted(registry.glob("*.lock")):
        try:
            content: dict[str, Any] = json.loads(lock_path.with_suffix(".json").read_text())
        except (OSError, ValueError):
            content = {}
        run_id = str(content.get("run_id") or lock_path.stem.split("-")[0])
        directories = []
        with contextlib.suppress(ValueError, TypeError):
            directories = [_owned_directory(Path(d)) for d in content.get("directories", [])]
        try:
            descriptor = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # released, or swept by a concurrent sweeper
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            live.run_ids.add(run_id)
            live.directories += directories
            continue
        if RUN_ID_FORM.fullmatch(run_id) is None:
            os.close(descriptor)
            continue
        held[lock_path] = descriptor
        run = dead.setdefault(run_id, DeadRun(run_id))
        run.records.append(lock_path)
        run.pids.append(int(content.get("pid") or 0))
        run.directories += directories
    return live, dead


def sweep_run(run_id: str, directories: Iterable[Path]) -> SweptRun:
    """Kill the run's processes, unmount and remove its cgroups, network and directories."""
    _check_run_id(run_id)
    owned = [*directories, *sorted(TEMP_ROOT.glob(f"ctz-*{run_id}-*"))]
    tags = RunTags(run_id, tuple(str(path) for path in owned))
    result = SweptRun(run_id, [], owned)
    result.killed = kill_processes(tags)
    result.cgroups = len(run_cgroup_roots(run_id))
    result.killed += len(tree_pids(f"*-{run_id}-*"))  # workloads: marked by their cgroup only
    left = remove_cgroup_trees(f"*-{run_id}-*")
    result.left += [str(cgroup) for cgroup in left]
    result.killed += kill_processes(tags)  # forked while its cgroups were emptied
    result.network, network_left = remove_network(bridge_prefix(run_id))
    result.left += network_left
    for directory in owned:
        unmounted, still = unmount_below(directory)
        result.unmounted += unmounted
        result.left += [f"mount {point}" for point in still]
        if not still:
            remove_tree(directory)
        if directory.exists():
            result.left.append(f"directory {directory}")
    return result


# ---- processes ----


@dataclass(frozen=True)
class RunTags:
    """What marks a process as one of a run's: its id, and the directories it owns."""

    run_id: str
    directories: tuple[str, ...]

    def mark(self, process: psutil.Process) -> bool:
        """Whether `process` carries the run's id or names one of its directories."""
        if process.environ().get(RUN_ID_VARIABLE) == self.run_id:
            return True
        cmdline = "\0".join(process.cmdline())
        if re.search(rf"(?:-|\bc){re.escape(self.run_id)}-", cmdline):
            return True
        texts = (cmdline, process.cwd())
        return any(names_directory(text, path) for text in texts for path in self.directories)


def names_directory(text: str, directory: str) -> bool:
    """Whether `text` holds the path `directory` or a path below it (not merely a longer name:
    /tmp/pytest-1 is not named by /tmp/pytest-12)."""
    start = text.find(directory)
    while start != -1:
        end = start + len(directory)
        if end == len(text) or text[end] in "/\0 :=,;\"'":
            return True
        start = text.find(directory, start + 1)
    return False


def tagged_processes(tags: RunTags) -> list[psutil.Process]:
    """The live processes `tags` mark, with their descendants; never this process or an
    ancestor of it."""
    spared = {os.getpid(), 1, *(parent.pid for parent in psutil.Process().parents())}
    marked: dict[int, psutil.Process] = {}
    for process in psutil.process_iter():
        if process.pid in spared:
            continue
        with contextlib.suppress(psutil.Error):  # gone, or a zombie: nothing to end
            if tags.mark(process):
                marked[process.pid] = process
                for child in process.children(recursive=True):
                    marked.setdefault(child.pid, child)
    return [process for pid, process in marked.items() if pid not in spared]


def kill_processes(tags: RunTags, timeout: float = KILL_SECONDS) -> int:
    """SIGKILL what `tags` mark until nothing is left (a daemon may restart a child between
    two scans); the number killed."""
    killed: set[int] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        doomed = [process for process in tagged_processes(tags) if not ended(process)]
        if not doomed:
            break
        for process in doomed:
            with contextlib.suppress(psutil.Error):
                process.kill()
                killed.add(process.pid)
        while doomed and time.monotonic() < deadline:
            doomed = [process for process in doomed if not ended(process)]
            time.sleep(0.02)
    return len(killed)


def ended(process: psutil.Process) -> bool:
    """Gone, or a zombie (an orphan waits for PID 1, which may reap only every few seconds)."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


# ---- mounts ----


def mounts_below(directory: Path) -> list[Path]:
    """Mount points at or below `directory` in our mount namespace, deepest first."""
    prefix = os.path.realpath(directory)
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
        if point == prefix or point.startswith(prefix + "/"):
            points.append(Path(point))
    return sorted(points, key=lambda path: len(path.parts), reverse=True)


def unmount(point: Path) -> bool:
    """Unmount `point`, lazily (detached now, released when unused) if it is busy."""
    libc = ctypes.CDLL(None, use_errno=True)
    for flags in (UMOUNT_NOFOLLOW, UMOUNT_NOFOLLOW | MNT_DETACH):
        if libc.umount2(os.fsencode(point), flags) == 0:
            return True
        error = ctypes.get_errno()
        if error in (errno.EINVAL, errno.ENOENT):
            return True  # no longer a mount point
        if error != errno.EBUSY:
            return False
    return False


def unmount_below(directory: Path) -> tuple[int, list[Path]]:
    """Unmount everything at or below `directory`, deepest first, until nothing is mounted
    there (mounts may be stacked); the number undone and what stays mounted."""
    undone = 0
    for _ in range(10):
        points = mounts_below(directory)
        if not points:
            return undone, []
        undone += sum(unmount(point) for point in points)
    return undone, mounts_below(directory)


# ---- network ----


def remove_network(prefix: str) -> tuple[list[str], list[str]]:
    """Remove the network namespaces, veths, bridges and nft tables whose names start with
    `prefix` (a veth by its bridge or its alias); what was removed and what could not be."""
    removed: list[str] = []
    left: list[str] = []
    for netns in sorted(NETNS_DIR.glob(f"{prefix}*")) if NETNS_DIR.is_dir() else []:
        unmount(netns)
        with contextlib.suppress(FileNotFoundError):
            netns.unlink()
        (left if netns.exists() else removed).append(f"netns {netns.name}")
    for name in _links(prefix):
        # A veth whose peer sat in a namespace removed above goes with that namespace, in the
        # kernel's own time: a delete that finds it gone has nothing left to do.
        done = _run("ip", "link", "delete", name) or not _link_exists(name)
        (removed if done else left).append(f"link {name}")
    for table in _nft_tables("containerizer_" + prefix.replace("-", "_")):
        done = _run("nft", "delete", "table", "inet", table)
        (removed if done else left).append(f"nft table {table}")
    return removed, left


def _link_exists(name: str) -> bool:
    return (Path("/sys/class/net") / name).exists()


def _links(prefix: str) -> list[str]:
    """Links named with `prefix`, enslaved to such a bridge or aliased after one: veths first,
    then the bridges."""
    output = _output("ip", "-j", "link", "show")
    if output is None:
        return []
    veths, bridges = [], []
    for link in json.loads(output or "[]"):
        alias = str(link.get("ifalias", "")).split()
        if str(link.get("ifname", "")).startswith(prefix):
            bridges.append(str(link["ifname"]))
        elif str(link.get("master", "")).startswith(prefix) or (
            len(alias) > 1 and alias[0] == "containerizer" and alias[1].startswith(prefix)
        ):
            veths.append(str(link["ifname"]))
    return veths + bridges


def _nft_tables(prefix: str) -> list[str]:
    output = _output("nft", "-j", "list", "tables", "inet")
    if not output:
        return []
    entries = json.loads(output).get("nftables", [])
    names = [str(entry["table"].get("name", "")) for entry in entries if "table" in entry]
    return [name for name in names if name.startswith(prefix)]


def _output(*argv: str) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    return done.stdout if done.returncode == 0 else None


def _run(*argv: str) -> bool:
    done = subprocess.run(argv, capture_output=True, check=False, timeout=30)
    return done.returncode == 0
