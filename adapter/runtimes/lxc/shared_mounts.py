"""LXC's mount hook for bidirectional (rshared) volumes; run by LXC as a script, stdlib only.

    python -I -S shared_mounts.py HOST_MNT_NS SOURCE TARGET [SOURCE TARGET]... NAME lxc mount

LXC makes every mount of a new container a slave of the host's before it mounts anything, so a
bind it makes can receive the host's mounts but never send one back. A mount the host's own
namespace clones (open_tree) is a peer of its source instead: this hook, run by LXC in the
container's mount namespace before the pivot_root, enters the service's mount namespace
(HOST_MNT_NS, /proc/PID/ns/mnt of the service), clones each SOURCE there, comes back and moves
the clone onto TARGET (relative to $LXC_ROOTFS_MOUNT, resolved by the service inside the rootfs:
no symlink of the image on its way). The supervisor then keeps it a peer in the workload's own
mount namespace (`--propagation rshared`). LXC appends the container's name and the hook's
section and type; they are ignored. Any failure exits 1 with the reason on stderr, and LXC does
not start the container.
"""

from __future__ import annotations

import ctypes
import os
import stat
import sys

SYS_OPEN_TREE = 428  # the same number on every architecture (new system calls are)
SYS_MOVE_MOUNT = 429
OPEN_TREE_CLONE = 1
AT_RECURSIVE = 0x8000
AT_FDCWD = -100
MOVE_MOUNT_F_EMPTY_PATH = 0x4
CLONE_NEWNS = 0x20000
HOOK_ARGUMENTS = 3  # LXC's: the container's name, "lxc", "mount"

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> int:
    if result < 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{what}: {os.strerror(error)}")
    return result


def _enter(namespace: int, what: str) -> None:
    _check(_libc.setns(namespace, CLONE_NEWNS), f"setns {what}")


def clone_tree(host_namespace: int, own_namespace: int, source: str) -> int:
    """A detached clone of `source` and the mounts below it, made in the host's namespace."""
    _enter(host_namespace, "into the service's mount namespace")
    try:
        flags = OPEN_TREE_CLONE | os.O_CLOEXEC | AT_RECURSIVE
        return _check(_libc.syscall(SYS_OPEN_TREE, AT_FDCWD, source.encode(), flags), source)
    finally:
        _enter(own_namespace, "back into the container's mount namespace")


def attach(tree: int, target: str) -> None:
    """Make the mount point (a directory, or a file for a file's clone) and move the tree."""
    if stat.S_ISDIR(os.fstat(tree).st_mode):
        os.makedirs(target, exist_ok=True)
    elif not os.path.lexists(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644))
    flags = MOVE_MOUNT_F_EMPTY_PATH
    _check(_libc.syscall(SYS_MOVE_MOUNT, tree, b"", AT_FDCWD, target.encode(), flags), target)


def main(arguments: list[str]) -> int:
    ours = arguments[: len(arguments) - HOOK_ARGUMENTS]
    if len(ours) < 3 or len(ours) % 2 == 0:
        print(f"shared_mounts: bad arguments {arguments!r}", file=sys.stderr)
        return 1
    rootfs = os.environ["LXC_ROOTFS_MOUNT"]
    host = os.open(ours[0], os.O_RDONLY | os.O_CLOEXEC)
    own = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    pairs = ours[1:]
    try:
        for source, target in zip(pairs[::2], pairs[1::2], strict=True):
            tree = clone_tree(host, own, source)
            try:
                attach(tree, os.path.join(rootfs, target))
            finally:
                os.close(tree)
    except OSError as exc:
        print(f"shared_mounts: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
