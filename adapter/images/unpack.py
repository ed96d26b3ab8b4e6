"""Apply image layers to a root filesystem directory, refusing every write outside it.

A layer is a tar stream of changes (OCI image-spec layer.md): files, directories, links, and
whiteouts (`.wh.NAME` deletes NAME from the layers below, `.wh..wh..opq` empties its directory of
what the layers below put there). We write it ourselves instead of using tarfile's extraction,
because a layer is hostile input and because whiteouts are not tar semantics.

What is refused, with the layer digest and the entry name (the whole rootfs is then discarded):
- absolute names and names with a `..` component;
- a name whose directory part goes through a symlink that is absolute or climbs out of the rootfs
  (relative links that stay inside are followed, as the kernel will inside the container);
- hard links whose target is outside the rootfs or not yet in it;
- character and block devices (a container gets its /dev from the runtime, never from an image).
Paths are resolved component by component with lstat, so nothing the layer wrote earlier can
redirect a later write; the final component is never followed (O_NOFOLLOW / os.link without
following).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import stat
import tarfile
import zlib
from pathlib import Path
from typing import BinaryIO

from adapter.errors import InvalidArgument
from adapter.images.image import GZIP_LAYER_TYPES, Descriptor
from adapter.images.layout import CHUNK, remove_tree

WHITEOUT_PREFIX = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"
MAX_SYMLINK_HOPS = 40  # the kernel's MAXSYMLINKS
NEW_DIRECTORY_MODE = 0o755


class HashingReader:
    """A read-only stream that hashes what passes through (the layer's diff_id)."""

    def __init__(self, source: BinaryIO) -> None:
        self.source = source
        self.hasher = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size)
        self.hasher.update(data)
        return data

    def drain(self) -> str:
        """Read what the tar reader left (end-of-archive padding) and return the digest."""
        while self.read(CHUNK):
            pass
        return "sha256:" + self.hasher.hexdigest()


def apply_layer(blob: Path, layer: Descriptor, diff_id: str, rootfs: Path) -> None:
    """Apply one layer blob to `rootfs`; InvalidArgument when it is hostile or corrupt."""
    with open(blob, "rb") as raw:
        stream: BinaryIO = raw
        if layer.media_type in GZIP_LAYER_TYPES:
            stream = gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[assignment]
        hashing = HashingReader(stream)
        try:
            with tarfile.open(fileobj=hashing, mode="r|") as archive:  # type: ignore[call-overload]
                applier = LayerApplier(rootfs, layer.digest)
                for member in archive:
                    applier.apply(member, archive)
                applier.finish()
            actual = hashing.drain()
        except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
            raise InvalidArgument(
                "image", f"layer {layer.digest}: not a readable tar: {exc}"
            ) from exc
    if actual != diff_id:
        raise InvalidArgument(
            "image",
            f"layer {layer.digest}: uncompressed content is {actual}, the config says {diff_id}",
        )


class LayerApplier:
    def __init__(self, rootfs: Path, digest: str) -> None:
        self.rootfs = rootfs
        self.digest = digest
        self.written: set[tuple[str, ...]] = set()  # entries of this layer: whiteouts spare them
        self.directory_times: list[tuple[Path, int]] = []
        self.set_owner = os.geteuid() == 0

    def refuse(self, name: str, why: str) -> InvalidArgument:
        return InvalidArgument("image", f"layer {self.digest}: entry {name!r} {why}")

    def apply(self, member: tarfile.TarInfo, archive: tarfile.TarFile) -> None:
        parts = self.components(member.name)
        if not parts:
            return  # the rootfs itself ("./"): its mode is the runtime's business
        parent = self.resolve_directory(parts[:-1], member.name)
        leaf = parts[-1]
        if leaf == OPAQUE_WHITEOUT:
            self.opaque(parent)
            return
        if leaf.startswith(WHITEOUT_PREFIX):
            self.whiteout(parent, leaf[len(WHITEOUT_PREFIX) :], member.name)
            return
        if member.ischr() or member.isblk():
            raise self.refuse(member.name, "is a device node; images may not carry devices")
        path = self.rootfs.joinpath(*parent, leaf)
        self.written.add((*parent, leaf))
        self.make_room(path, member)
        if member.isdir():
            if not path.is_dir():
                os.mkdir(path, NEW_DIRECTORY_MODE)
            self.directory_times.append((path, int(member.mtime)))
        elif member.isreg():
            self.write_file(path, member, archive)
        elif member.issym():
            os.symlink(member.linkname, path)
        elif member.islnk():
            os.link(self.link_target(member), path, follow_symlinks=False)
        elif member.isfifo():
            os.mkfifo(path)
        else:
            raise self.refuse(member.name, f"has an unsupported tar type {member.type!r}")
        self.set_metadata(path, member)

    def finish(self) -> None:
        """Directory mtimes last: writing their children changed them."""
        for path, mtime in reversed(self.directory_times):
            os.utime(path, (mtime, mtime), follow_symlinks=False)

    def components(self, name: str) -> list[str]:
        if name.startswith("/"):
            raise self.refuse(name, "is an absolute path")
        parts = [part for part in name.split("/") if part not in ("", ".")]
        if ".." in parts:
            raise self.refuse(name, "has a '..' component")
        return parts

    def resolve_directory(self, parts: list[str], name: str, create: bool = True) -> list[str]:
        """The real directory (no symlinks left) that `parts` names inside the rootfs, created
        when missing. Relative symlinks are followed while they stay inside; anything else is
        refused."""
        resolved: list[str] = []
        pending = list(parts)
        hops = 0
        while pending:
            part = pending.pop(0)
            if part == "..":  # only link targets bring these
                if not resolved:
                    raise self.refuse(name, "goes through a symlink that leaves the rootfs")
                resolved.pop()
                continue
            path = self.rootfs.joinpath(*resolved, part)
            if path.is_symlink():
                hops += 1
                target = os.readlink(path)
                if target.startswith("/"):
                    raise self.refuse(name, f"goes through the absolute symlink {part} -> {target}")
                if hops > MAX_SYMLINK_HOPS:
                    raise self.refuse(name, "goes through too many symlinks")
                pending = [p for p in target.split("/") if p not in ("", ".")] + pending
                continue
            if not path.exists():
                if not create:
                    raise self.refuse(name, "points to a path that does not exist in the layers")
                os.mkdir(path, NEW_DIRECTORY_MODE)
            elif not path.is_dir():
                raise self.refuse(name, f"needs {'/'.join((*resolved, part))} to be a directory")
            resolved.append(part)
        return resolved

    def link_target(self, member: tarfile.TarInfo) -> Path:
        """A hard link's target: an existing non-directory inside the rootfs."""
        if member.linkname.startswith("/") or ".." in member.linkname.split("/"):
            raise self.refuse(member.name, f"is a hard link to {member.linkname!r}, outside")
        parts = self.components(member.linkname)
        if not parts:
            raise self.refuse(member.name, "is a hard link to the rootfs itself")
        parent = self.resolve_directory(parts[:-1], member.name, create=False)
        target = self.rootfs.joinpath(*parent, parts[-1])
        if not target.is_symlink() and not target.exists():
            raise self.refuse(
                member.name, f"is a hard link to {member.linkname!r}, which is missing"
            )
        if not target.is_symlink() and target.is_dir():
            raise self.refuse(member.name, "is a hard link to a directory")
        return target

    def make_room(self, path: Path, member: tarfile.TarInfo) -> None:
        """A later layer replaces what is there, except that a directory merges with a directory."""
        if path.is_symlink() or (path.exists() and not (member.isdir() and path.is_dir())):
            remove_tree(path)

    def write_file(self, path: Path, member: tarfile.TarInfo, archive: tarfile.TarFile) -> None:
        source = archive.extractfile(member)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        descriptor = os.open(path, flags, 0o600)
        with os.fdopen(descriptor, "wb") as out:
            if source is not None:
                while chunk := source.read(CHUNK):
                    out.write(chunk)

    def set_metadata(self, path: Path, member: tarfile.TarInfo) -> None:
        # chown before chmod: chown clears the set-id bits that the mode may carry.
        if self.set_owner:
            os.lchown(path, member.uid, member.gid)
        if not member.issym():
            os.chmod(path, stat.S_IMODE(member.mode))  # `path` is ours, not a link
        if not member.isdir():
            os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)

    def opaque(self, parent: list[str]) -> None:
        directory = self.rootfs.joinpath(*parent)
        for child in directory.iterdir():
            if (*parent, child.name) not in self.written:
                remove_tree(child)

    def whiteout(self, parent: list[str], hidden: str, name: str) -> None:
        if hidden in ("", ".", "..") or hidden.startswith(WHITEOUT_PREFIX):
            raise self.refuse(name, "is a malformed whiteout")
        if (*parent, hidden) in self.written:
            return  # a whiteout hides the layers below, not this one
        remove_tree(self.rootfs.joinpath(*parent, hidden))
