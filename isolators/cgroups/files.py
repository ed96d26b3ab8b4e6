"""Mechanism: read and write cgroup interface files, create and remove cgroup directories.

No policy here (which value to write is the isolators' business). Reads use os.open/os.read
because the accounting reader calls them thousands of times per second across many containers
and pathlib's text layer costs several times more than the kernel's work.
"""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

from isolators.cgroups.errors import CgroupFileError

# cgroup v1 prints this (PAGE_COUNTER_MAX rounded to pages) for "no memory limit".
V1_UNLIMITED = 0x7FFFFFFFFFFFF000


def read_text(path: str | Path) -> str:
    """The file's content; FileNotFoundError propagates so callers can skip missing files."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode()


def parse_int(path: str | Path, text: str) -> int:
    """Parse one integer, naming the file in the error since cgroup files vary by kernel."""
    try:
        return int(text.strip())
    except ValueError:
        raise CgroupFileError(f"{path}: expected an integer, read {text.strip()!r}") from None


def read_int(path: str | Path) -> int:
    return parse_int(path, read_text(path))


def read_limit(path: str | Path) -> int | None:
    """A limit file: None for "max" (v2) or the v1 unlimited sentinel, else the integer."""
    text = read_text(path).strip()
    if text == "max":
        return None
    value = parse_int(path, text)
    return None if value >= V1_UNLIMITED else value


def parse_kv(path: str | Path, text: str) -> dict[str, int]:
    """Parse "key value" lines (memory.stat, cpu.stat, pids.events, memory.oom_control)."""
    result: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if not value:
            continue
        try:
            result[key] = int(value)
        except ValueError:
            raise CgroupFileError(f"{path}: expected '<key> <integer>', read {line!r}") from None
    return result


def read_kv(path: str | Path) -> dict[str, int]:
    return parse_kv(path, read_text(path))


def read_pids(cgroup: Path, name: str = "cgroup.procs") -> list[int]:
    """Pids (or tids with name="tasks"/"cgroup.threads") listed by the cgroup; [] if it is gone."""
    try:
        text = read_text(cgroup / name)
    except FileNotFoundError:
        return []
    return [int(line) for line in text.split()]


def write(path: str | Path, value: str | int) -> None:
    """Write one value. The kernel answers bad values with EINVAL/EBUSY: name file and value."""
    data = str(value).encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
    except OSError as exc:
        raise CgroupFileError(f"cannot write {str(value)!r} to {path}: {exc.strerror}") from exc


def create(cgroup: str | Path) -> None:
    """Create the cgroup directory and missing parents; an existing one is reused. In a v1
    cpuset hierarchy each level gets its parent's CPUs and memory nodes (see inherit_cpuset)."""
    try:
        make_directory(os.fspath(cgroup))
    except OSError as exc:
        raise CgroupFileError(f"cannot create cgroup {cgroup}: {exc.strerror}") from exc
    inherit_cpuset(cgroup)


def make_directory(path: str) -> None:
    """Path.mkdir(parents=True, exist_ok=True) for the usual case in one mkdir: the parent (a
    cgroup root, the sandboxes' root) exists; the parents are made only when it does not."""
    try:
        os.mkdir(path)
    except FileNotFoundError:
        os.makedirs(path, exist_ok=True)
    except FileExistsError:
        if not os.path.isdir(path):
            raise


CPUSET_FILES = ("cpuset.cpus", "cpuset.mems")


def inherit_cpuset(cgroup: str | Path) -> None:
    """Give `cgroup` and its ancestors below the mount their parent's cpuset.cpus and
    cpuset.mems where those are empty, top-down; nothing outside a v1 cpuset hierarchy.

    A new v1 cpuset cgroup starts with both empty unless its parent's cgroup.clone_children is
    1 (it is 0 on a fresh host), and no task can join an empty cpuset: the kernel answers
    ENOSPC. runc and libvirt fill their own groups the same way. Values already set are kept."""
    chain: list[str] = []
    level = os.fspath(cgroup).rstrip("/")
    parent = os.path.dirname(level)
    # v1 only: a v2 cpuset with empty values inherits its parent's, and has no clone_children.
    # The parent's cpuset file first: outside a cpuset hierarchy (every other controller) it is
    # missing, and that one stat answers.
    while os.path.exists(f"{parent}/{CPUSET_FILES[0]}") and os.path.exists(
        f"{level}/cgroup.clone_children"
    ):
        chain.append(level)
        level, parent = parent, os.path.dirname(parent)
    for directory in reversed(chain):
        for name in CPUSET_FILES:
            try:
                if read_text(f"{directory}/{name}").strip():
                    continue
                value = read_text(f"{os.path.dirname(directory)}/{name}").strip()
            except FileNotFoundError:
                return  # not a cpuset hierarchy, or removed meanwhile
            if value:
                write(f"{directory}/{name}", value)


async def remove(cgroup: str | Path, attempts: int = 20, delay: float = 0.01) -> None:
    """Remove the cgroup and any nested cgroups, deepest first; a missing one is fine.

    rmdir answers EBUSY while exiting tasks are still being released, so it is retried a few
    times with short sleeps before giving up with the cgroup's name.
    """
    try:
        os.rmdir(cgroup)  # the usual case, in one call: no nested cgroup, no task left
        return
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError:
        pass  # nested cgroups, or tasks still leaving: the walk below, with its retries
    if not os.path.isdir(cgroup):
        return
    nested = [root for root, _, _ in os.walk(cgroup, topdown=False)]
    for directory in nested:
        for attempt in range(attempts):
            try:
                os.rmdir(directory)
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY or attempt == attempts - 1:
                    raise CgroupFileError(
                        f"cannot remove cgroup {directory}: {exc.strerror}"
                    ) from exc
                await asyncio.sleep(delay * (attempt + 1))


def children(cgroup: Path) -> list[str]:
    """Names of the cgroups directly below `cgroup` ([] if it does not exist)."""
    try:
        return sorted(entry.name for entry in os.scandir(cgroup) if entry.is_dir())
    except FileNotFoundError:
        return []
