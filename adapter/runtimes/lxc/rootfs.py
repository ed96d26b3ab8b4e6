"""Root filesystems for LXC containers: a shared read-only base, one writable overlay each.

Without an image a container gets a minimal busybox system built here once from the host's
static busybox (Debian's busybox-static): /bin/busybox, a symlink per applet, /etc/passwd and
/etc/group with root and nobody, and the mount points the driver binds into every container.
With an image the base is the image store's read-only layer directories, each unpacked once and
shared (adapter/images/CONTRACT.md).

Either way the base is never written: LXC mounts `overlay:<layers>:<container dir>/delta0` inside
the container's own mount namespace, so the container's writes land in its directory under the
lxcpath and leave with it, and nothing is mounted on the host that a crash could leave behind
(but a user-namespaced container's layers, idmapped by userns.py, which recovery detaches).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import stat
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from adapter.core.errors import FailedPrecondition, InvalidArgument

if TYPE_CHECKING:
    from adapter.images import ImageStore

BUSYBOX = Path("/bin/busybox")
COMPLETE_MARKER = ".containerizer-base-complete"
# Where the driver binds things into every container (relative to its root).
SUPERVISOR_TARGET = ".containerizer/supervisor"
RUN_TARGET = ".containerizer/run"
SANDBOX_TARGET = "mnt/mesos/sandbox"

# The overlay's mount options: LXC's own keys around the layers (lowerdir and upperdir) and
# the work directory, about as long as the upper's path (userxattr in a user namespace); a page
# bounds them all.
LXC_OVERLAY_OPTIONS = "upperdir=,lowerdir=,workdir=/olwork,xino=off,index=off,userxattr"
PAGE_BYTES = 4096
# As the kernel's bound on symlinks in one path lookup (ELOOP beyond).
MAX_SYMLINKS = 40

_PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
_GROUP = "root:x:0:\nnogroup:x:65534:\n"
_DIRECTORIES = ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "etc", "root",
                "tmp", "run", "var", "mnt/mesos/sandbox", ".containerizer/run")  # fmt: skip


def resolve_in_root(root: Path, path: str, field: str) -> str:
    """`path` of the container with each symlink the root holds resolved as the container
    would resolve it, never above `root`: relative to the root, and free of symlinks.

    LXC makes a missing mount point (`create=dir|file`) on the host with mkdir and open, which
    follow symlinks: a target through an image's `/data -> /etc` would make /etc/... on the
    host. A target resolved here leads nowhere else. The root is the read-only lower layer (an
    image's or the busybox base); the container's own layer is empty until it starts."""
    pending = [part for part in path.split("/") if part not in ("", ".")]
    resolved: list[str] = []
    followed = 0
    while pending:
        part = pending.pop(0)
        if part == "..":
            del resolved[-1:]  # `..` of the root is the root, as in the container
            continue
        try:
            info = os.lstat(root.joinpath(*resolved, part))
        except OSError:  # not there (yet): nothing below it can be a symlink of the image
            info = None
        if info is None or not stat.S_ISLNK(info.st_mode):
            resolved.append(part)
            continue
        followed += 1
        if followed > MAX_SYMLINKS:
            raise InvalidArgument(field, f"{path!r}: too many symlinks in the image's rootfs")
        link = os.readlink(root.joinpath(*resolved, part))
        if link.startswith("/"):
            resolved = []
        pending[:0] = [part for part in link.split("/") if part not in ("", ".")]
    return "/".join(resolved)


def _digest(path: Path) -> str:
    with path.open("rb") as binary:
        return hashlib.file_digest(binary, "sha256").hexdigest()[:16]


def _applets(busybox: Path) -> list[str]:
    """Applet paths relative to / (`bin/sh`, `usr/bin/awk`, ...) from `busybox --list-full`."""
    listing = subprocess.run(
        [str(busybox), "--list-full"], capture_output=True, text=True, check=True, timeout=30
    )
    return [line.strip().lstrip("/") for line in listing.stdout.splitlines() if line.strip()]


def _populate(root: Path, busybox: Path) -> None:
    for directory in _DIRECTORIES:
        (root / directory).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    shutil.copy2(busybox, root / "bin/busybox")
    for applet in _applets(busybox):
        link = root / applet
        if applet != "bin/busybox" and not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to("/bin/busybox")
    (root / "etc/passwd").write_text(_PASSWD)
    (root / "etc/group").write_text(_GROUP)
    (root / SUPERVISOR_TARGET).touch()  # bind-mount target: a file
    (root / COMPLETE_MARKER).touch()


def build_busybox_base(bases_dir: Path, busybox: Path = BUSYBOX) -> Path:
    """The busybox base for this busybox binary, built once (named after its digest so an
    upgraded busybox gets a new base). Built aside and renamed into place, so a crash mid-build
    leaves a `.build-*` directory (removed by `remove_stale_builds`), never a half base."""
    if not busybox.is_file():
        raise FailedPrecondition(
            f"{busybox} not found: install Debian's busybox-static for the LXC default rootfs"
        )
    base = bases_dir / f"busybox-{_digest(busybox)}"
    if (base / COMPLETE_MARKER).is_file():
        return base
    bases_dir.mkdir(parents=True, exist_ok=True)
    building = bases_dir / f".build-{uuid.uuid4().hex}"
    try:
        _populate(building, busybox)
        try:
            os.rename(building, base)
        except OSError:
            if not (base / COMPLETE_MARKER).is_file():  # not a concurrent builder's base
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return base


def remove_stale_builds(bases_dir: Path) -> None:
    """Remove what an interrupted `build_busybox_base` left."""
    if bases_dir.is_dir():
        for entry in bases_dir.glob(".build-*"):
            shutil.rmtree(entry, ignore_errors=True)


@dataclass(frozen=True)
class Lower:
    """A container's read-only lower layers, topmost first, and a path to their merged files
    (where the service resolves mount targets and reads the image's /etc files), valid while
    the `BaseRootfs.lower` block that made it runs."""

    layers: tuple[Path, ...]
    view: Path

    def rootfs_path(self, upper: Path) -> str:
        """`lxc.rootfs.path`: LXC's overlay takes every lower layer before the upper one.
        LXC mounts it with one option string, which the kernel bounds by a page."""
        path = "overlay:" + ":".join(str(layer) for layer in (*self.layers, upper))
        if len(path) + 2 * len(str(upper)) + len(LXC_OVERLAY_OPTIONS) > PAGE_BYTES:
            raise FailedPrecondition(
                f"the image has {len(self.layers)} layers: more than LXC can stack in one overlay"
                f" mount (its options fit in {PAGE_BYTES} bytes); the native runtime runs it"
            )
        return path


class BaseRootfs:
    """The read-only lower layers: the busybox base (built once per driver, under a lock)
    and image layers from the image store.

    `images` is the service's one store, never a store of our own: opening a store collects
    garbage, and a second one could take another import's or unpack's work for garbage."""

    def __init__(self, state_dir: Path, images: ImageStore) -> None:
        self._bases_dir = state_dir / "lxc" / "bases"
        self._images = images
        self._lock = asyncio.Lock()
        self._busybox: Path | None = None

    async def busybox(self) -> Path:
        async with self._lock:
            if self._busybox is None:
                remove_stale_builds(self._bases_dir)
                self._busybox = await asyncio.to_thread(build_busybox_base, self._bases_dir)
            return self._busybox

    @contextlib.asynccontextmanager
    async def lower(self, image: str | None) -> AsyncIterator[Lower]:
        """The image's layers from the image store, or the busybox base."""
        if not image:
            base = await self.busybox()
            yield Lower((base,), base)
            return
        layers = await self._images.layers(image)
        async with self._images.view(image) as view:
            yield Lower(tuple(layers), view)
