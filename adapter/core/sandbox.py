"""The sandbox's output files, opened the one safe way: never through a symlink.

A workload can write its sandbox (it is bound into the container), so it can replace `stdout`
with a symlink to a host file, or a FIFO. Whoever opens these files as root for it (runc's shim,
QEMU through libvirt, the docker runtime copying logs, the supervisor) must not follow what the
workload put there. Each file is opened relative to the sandbox directory (itself opened without
following a symlink), with O_NOFOLLOW, and must be a regular file with one link: a symlink, a
FIFO, a directory or a hard link to some other file is refused.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Sequence
from pathlib import Path

from adapter.core.errors import FailedPrecondition, LaunchFailed
from adapter.core.model import LaunchSpec
from isolators.cgroups.files import make_directory

OUTPUTS = ("stdout", "stderr")


def open_output(sandbox: str, name: str, *, truncate: bool = False) -> int:
    """A writable fd of `sandbox/name`, created (0640) when missing; appending unless
    `truncate`. FailedPrecondition naming the file when it is not a plain file of its own."""
    where = f"sandbox {sandbox}: {name}"
    try:
        directory = os.open(sandbox, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise FailedPrecondition(f"sandbox {sandbox}: {exc.strerror} (not a directory?)") from None
    # O_NONBLOCK: opening a FIFO for writing fails at once instead of waiting for a reader.
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    flags |= os.O_TRUNC if truncate else os.O_APPEND
    try:
        fd = os.open(name, flags, 0o640, dir_fd=directory)
    except OSError as exc:
        raise FailedPrecondition(f"{where}: {exc.strerror} (a symlink is refused)") from None
    finally:
        os.close(directory)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        raise FailedPrecondition(f"{where}: not a regular file of its own (link count or type)")
    os.set_blocking(fd, True)
    return fd


def prepare_outputs(sandbox: str) -> None:
    """Create `stdout` and `stderr` in the sandbox, or check the ones there are plain files, so
    a runtime that opens them by path (a shim, QEMU) opens a file and not what a workload of an
    earlier launch of this sandbox left there."""
    for name in OUTPUTS:
        os.close(open_output(sandbox, name))


def remove_directory(path: str, expected: Sequence[str] = OUTPUTS) -> None:
    """Remove the directory `path` and what it holds, like rmtree(ignore_errors=True), faster
    for the usual content: the files `expected` (a sandbox's outputs) are unlinked relative to
    the directory opened without following a link, and the directory is removed. Anything
    else there (a workload's files, a subdirectory, a symlink in its place) is left to rmtree,
    which follows no symlink either. A missing directory is fine."""
    try:
        directory = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError:
        shutil.rmtree(path, ignore_errors=True)
        return
    try:
        for name in expected:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=directory)
    except OSError:
        pass  # a directory under that name, say: rmtree below
    finally:
        os.close(directory)
    try:
        os.rmdir(path)
    except OSError:
        shutil.rmtree(path, ignore_errors=True)


def make_sandbox(path: str) -> None:
    """A launch's sandbox made (with its parents) and its output files ready; LaunchFailed
    naming the path when it cannot be made."""
    try:
        make_directory(path)
    except OSError as exc:
        raise LaunchFailed(f"sandbox {path}: {exc.strerror}") from exc
    prepare_outputs(path)


def default_sandbox_root(state_dir: Path) -> Path:
    return state_dir / "sandboxes"


def is_default_sandbox(spec: LaunchSpec, sandbox_root: Path | None) -> bool:
    """The service makes (and may remove) only the default sandbox; a caller-named one may not
    lie under the state directory (validation), so it can never be this path."""
    if sandbox_root is None:
        return False
    default = f"{sandbox_root}/{spec.container_id}"  # as validation spells it
    return spec.sandbox == default or Path(spec.sandbox) == Path(default)
