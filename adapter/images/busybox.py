"""The node's own small workload image, built from Debian's busybox-static: nothing to download.

One layer: /bin/busybox with a symlink per applet, /etc/passwd and /etc/group with root and
nobody, a world-writable /tmp and the empty directories a runtime mounts over. Everything is fixed
(mtimes, owners, member order, the gzip header), so one busybox binary always gives the same
bytes and digests. The result is an OCI image-layout tarball that the Images service imports like
any other (`containerizer images import --busybox`; `containerizer compare` when it is missing).
"""

from __future__ import annotations

import gzip
import io
import json
import re
import subprocess
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from adapter.core.errors import FailedPrecondition
from adapter.images.image import (
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_LAYOUT_VERSION,
    OCI_MANIFEST,
    REF_NAME_ANNOTATION,
    host_architecture,
)
from adapter.images.layout import sha256_digest

BUSYBOX_BINARY = Path("/bin/busybox")
REFERENCE = "localhost/busybox:latest"
TARBALL_NAME = "busybox-oci.tar"
FIXED_MTIME = 1_700_000_000  # a fixed, plausible time; 0 upsets some tools
EMPTY_DIRECTORIES = ("dev", "proc", "sys", "root", "etc", "var", "home")
PASSWD = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = b"root:x:0:\nnogroup:x:65534:\n"
IMAGE_ENV = ("PATH=/usr/sbin:/usr/bin:/sbin:/bin",)
IMAGE_CMD = ("sh",)
# What `busybox --list` may name: a plain file name for /bin (it lists "[" and "[[" too).
APPLET_NAME = re.compile(r"[A-Za-z0-9_.+\[\]-]+")
LIST_SECONDS = 10


@dataclass(frozen=True)
class Member:
    """One tar member of the layer. kind: dir, file or symlink."""

    name: str
    kind: str = "file"
    data: bytes = b""
    mode: int = 0o644
    link: str = ""


TAR_TYPES = {"dir": tarfile.DIRTYPE, "file": tarfile.REGTYPE, "symlink": tarfile.SYMTYPE}


def missing_binary_message(binary: Path) -> str:
    return f"{binary} is missing: install Debian's busybox-static (apt-get install busybox-static)"


def applets_of(binary: Path = BUSYBOX_BINARY) -> tuple[str, ...]:
    """Every applet the binary says it has, sorted; a symlink in /bin is made for each."""
    try:
        listed = subprocess.run(
            [str(binary), "--list"],
            capture_output=True,
            text=True,
            timeout=LIST_SECONDS,
            check=True,
        ).stdout
    except FileNotFoundError:
        raise FailedPrecondition(missing_binary_message(binary)) from None
    except (OSError, subprocess.SubprocessError) as exc:
        raise FailedPrecondition(f"{binary} --list failed: {exc}") from None
    names = {name for name in listed.split() if APPLET_NAME.fullmatch(name)}
    names.discard("busybox")
    if "sh" not in names:
        raise FailedPrecondition(f"{binary} --list names no `sh` applet: not a usable busybox")
    return tuple(sorted(names))


def busybox_members(binary: Path, applets: Iterable[str]) -> list[Member]:
    """The layer's members, in a fixed order."""
    try:
        program = binary.read_bytes()
    except FileNotFoundError:
        raise FailedPrecondition(missing_binary_message(binary)) from None
    members = [Member("bin", "dir", mode=0o755), Member("bin/busybox", data=program, mode=0o755)]
    members += [Member(f"bin/{applet}", "symlink", link="busybox") for applet in applets]
    members += [Member(name, "dir", mode=0o755) for name in EMPTY_DIRECTORIES]
    members += [Member("tmp", "dir", mode=0o1777)]
    members += [Member("etc/passwd", data=PASSWD), Member("etc/group", data=GROUP)]
    return members


def tar_of(members: Iterable[Member]) -> bytes:
    """An uncompressed tar of `members` in the given order, owned by root, with a fixed mtime."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for member in members:
            info = tarfile.TarInfo(member.name)
            info.type = TAR_TYPES[member.kind]
            info.mode = member.mode
            info.mtime = FIXED_MTIME
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.linkname = member.link
            info.size = len(member.data) if member.kind == "file" else 0
            archive.addfile(info, io.BytesIO(member.data) if member.kind == "file" else None)
    return buffer.getvalue()


def gzip_fixed(data: bytes) -> bytes:
    """gzip with no file name and mtime 0 in the header: the same input gives the same bytes."""
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0, filename="", compresslevel=6) as out:
        out.write(data)
    return buffer.getvalue()


def compact_json(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def image_config(layers: Sequence[bytes], diff_ids: Sequence[str] | None = None) -> bytes:
    """The image config of uncompressed `layers`; `diff_ids` replaces their real digests (an
    image whose config lies about its layers)."""
    return compact_json(
        {
            "architecture": host_architecture(),
            "os": "linux",
            "config": {"Env": list(IMAGE_ENV), "Cmd": list(IMAGE_CMD)},
            "rootfs": {
                "type": "layers",
                "diff_ids": list(diff_ids or [sha256_digest(layer) for layer in layers]),
            },
        }
    )


def oci_image_blobs(
    layers: Sequence[bytes], diff_ids: Sequence[str] | None = None
) -> tuple[bytes, bytes, list[bytes]]:
    """(manifest, config, gzip-compressed layers) of an image made of uncompressed `layers`."""
    compressed = [gzip_fixed(layer) for layer in layers]
    config = image_config(layers, diff_ids)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha256_digest(config), "size": len(config)},
        "layers": [
            {"mediaType": OCI_LAYER_GZIP, "digest": sha256_digest(blob), "size": len(blob)}
            for blob in compressed
        ],
    }
    return compact_json(manifest), config, compressed


def oci_layout_tar(
    layers: Sequence[bytes], reference: str, diff_ids: Sequence[str] | None = None
) -> bytes:
    """An OCI image-layout tarball holding one image, named `reference`."""
    manifest, config, compressed = oci_image_blobs(layers, diff_ids)
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": sha256_digest(manifest),
                "size": len(manifest),
                "annotations": {REF_NAME_ANNOTATION: reference},
            }
        ],
    }
    blobs = {sha256_digest(blob): blob for blob in (manifest, config, *compressed)}
    files = [
        ("oci-layout", compact_json({"imageLayoutVersion": OCI_LAYOUT_VERSION})),
        ("index.json", compact_json(index)),
    ]
    files += [(f"blobs/sha256/{d.removeprefix('sha256:')}", blob) for d, blob in blobs.items()]
    return tar_of(with_parent_directories(files))


def with_parent_directories(files: Sequence[tuple[str, bytes]]) -> list[Member]:
    """Members for `files`, preceded by one directory member per parent directory, sorted."""
    parents = {str(parent) for name, _ in files for parent in Path(name).parents} - {"."}
    members = [Member(directory, "dir", mode=0o755) for directory in sorted(parents)]
    return members + [Member(name, data=data) for name, data in files]


def busybox_layer(binary: Path = BUSYBOX_BINARY, applets: Sequence[str] | None = None) -> bytes:
    """The image's one uncompressed layer; every applet of `binary` unless `applets` is given."""
    chosen = applets_of(binary) if applets is None else applets
    return tar_of(busybox_members(binary, chosen))


def write_busybox_layout(
    directory: Path,
    binary: Path = BUSYBOX_BINARY,
    applets: Sequence[str] | None = None,
    reference: str = REFERENCE,
) -> Path:
    """Write the busybox image as an OCI image-layout tarball in `directory`; returns its path."""
    path = directory / TARBALL_NAME
    path.write_bytes(oci_layout_tar([busybox_layer(binary, applets)], reference))
    return path
