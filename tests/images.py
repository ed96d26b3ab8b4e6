"""Deterministic test images, built here so that no test needs a registry on the internet.

The busybox image: Debian's busybox-static (/bin/busybox) plus symlinks for the applets the tests
use, /etc/passwd and /etc/group, and the empty directories a runtime mounts over. Everything is
fixed (mtimes, owners, member order, gzip header mtime 0), so the same Debian package gives
byte-for-byte the same tarballs and digests on every run.

Also: the layer and tarball writers the store tests use to build hostile images, and a small push
client for the OCI distribution API (monolithic blob upload, manifest PUT).
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import json
import platform
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

BUSYBOX = Path("/bin/busybox")
REFERENCE = "localhost/busybox:latest"
FIXED_MTIME = 1_700_000_000  # a fixed, plausible time; 0 upsets some tools
APPLETS = (
    "sh", "echo", "cat", "sleep", "true", "false", "ls", "head", "tail", "hostname", "id", "env",
    "dd", "mkdir", "httpd", "nc", "ps", "kill", "rm", "cp", "mv", "grep", "wc", "test", "printf",
    "touch", "uname", "whoami", "pwd", "stat", "seq", "yes", "mount", "readlink", "ln", "chmod",
)  # fmt: skip
EMPTY_DIRECTORIES = ("dev", "proc", "sys", "root", "etc", "var", "home")
PASSWD = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = b"root:x:0:\nnogroup:x:65534:\n"
GOARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


@dataclass(frozen=True)
class Entry:
    """One tar member. kind: dir, file, symlink, hardlink, chr, fifo."""

    name: str
    kind: str = "file"
    data: bytes = b""
    mode: int = 0o644
    link: str = ""
    uid: int = 0
    gid: int = 0


TAR_TYPES = {
    "dir": tarfile.DIRTYPE,
    "file": tarfile.REGTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "chr": tarfile.CHRTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def tar_bytes(entries: Iterable[Entry]) -> bytes:
    """An uncompressed tar of `entries`, in the given order, with fixed metadata."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for entry in entries:
            info = tarfile.TarInfo(entry.name)
            info.type = TAR_TYPES[entry.kind]
            info.mode = entry.mode
            info.mtime = FIXED_MTIME
            info.uid, info.gid = entry.uid, entry.gid
            info.uname = info.gname = ""
            info.linkname = entry.link
            if entry.kind == "chr":
                info.devmajor, info.devminor = 1, 3
            info.size = len(entry.data) if entry.kind == "file" else 0
            archive.addfile(info, io.BytesIO(entry.data) if entry.kind == "file" else None)
    return buffer.getvalue()


def gzip_bytes(data: bytes) -> bytes:
    """gzip with no file name and mtime 0 in the header: the same input gives the same bytes."""
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0, filename="", compresslevel=6) as out:
        out.write(data)
    return buffer.getvalue()


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def busybox_entries() -> list[Entry]:
    if not BUSYBOX.is_file():
        raise FileNotFoundError(f"{BUSYBOX} is missing: apt-get install busybox-static")
    entries = [Entry("bin", "dir", mode=0o755)]
    entries.append(Entry("bin/busybox", data=BUSYBOX.read_bytes(), mode=0o755))
    entries += [Entry(f"bin/{applet}", "symlink", link="busybox") for applet in APPLETS]
    entries += [Entry(name, "dir", mode=0o755) for name in EMPTY_DIRECTORIES]
    entries += [Entry("tmp", "dir", mode=0o1777)]
    entries += [Entry("etc/passwd", data=PASSWD), Entry("etc/group", data=GROUP)]
    return entries


def image_config(layers: Sequence[bytes], diff_ids: Sequence[str] | None = None) -> bytes:
    """The image config; `diff_ids` overrides the layers' real ones (to test verification)."""
    config = {
        "architecture": GOARCH,
        "os": "linux",
        "config": {"Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["sh"]},
        "rootfs": {
            "type": "layers",
            "diff_ids": list(diff_ids or [digest(layer) for layer in layers]),
        },
    }
    return json.dumps(config, sort_keys=True, separators=(",", ":")).encode()


def oci_image_blobs(
    layers: Sequence[bytes], diff_ids: Sequence[str] | None = None
) -> tuple[bytes, bytes, list[bytes]]:
    """(manifest, config, compressed layers) of an image made of uncompressed `layers`."""
    compressed = [gzip_bytes(layer) for layer in layers]
    config = image_config(layers, diff_ids)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": digest(config), "size": len(config)},
        "layers": [
            {"mediaType": OCI_LAYER_GZIP, "digest": digest(blob), "size": len(blob)}
            for blob in compressed
        ],
    }
    return json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode(), config, compressed


def write_tarball(path: Path, files: Sequence[tuple[str, bytes]]) -> Path:
    entries = []
    parents = {str(parent) for name, _ in files for parent in Path(name).parents}
    for directory in sorted(parents - {"."}):
        entries.append(Entry(directory, "dir", mode=0o755))
    entries += [Entry(name, data=data) for name, data in files]
    path.write_bytes(tar_bytes(entries))
    return path


def write_oci_layout(
    path: Path,
    layers: Sequence[bytes],
    reference: str = REFERENCE,
    diff_ids: Sequence[str] | None = None,
) -> Path:
    """An OCI image-layout tarball of one image; `layers` are uncompressed layer tars."""
    manifest, config, compressed = oci_image_blobs(layers, diff_ids)
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": digest(manifest),
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": reference},
            }
        ],
    }
    blobs = {digest(blob): blob for blob in (manifest, config, *compressed)}
    files = [("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'), ("index.json", _json(index))]
    files += [(f"blobs/sha256/{d.removeprefix('sha256:')}", blob) for d, blob in blobs.items()]
    return write_tarball(path, files)


def write_docker_archive(path: Path, layers: Sequence[bytes], reference: str = REFERENCE) -> Path:
    """A `docker save` style tarball: manifest.json, <config hex>.json, <n>/layer.tar."""
    config = image_config(layers)
    config_name = digest(config).removeprefix("sha256:") + ".json"
    layer_names = [f"{digest(layer).removeprefix('sha256:')}/layer.tar" for layer in layers]
    manifest = [{"Config": config_name, "RepoTags": [reference], "Layers": layer_names}]
    files = [("manifest.json", _json(manifest)), (config_name, config)]
    files += list(zip(layer_names, layers, strict=True))
    return write_tarball(path, files)


def busybox_oci_layout(dest_dir: Path) -> Path:
    return write_oci_layout(dest_dir / "busybox-oci.tar", [tar_bytes(busybox_entries())])


def busybox_docker_archive(dest_dir: Path) -> Path:
    return write_docker_archive(dest_dir / "busybox-docker.tar", [tar_bytes(busybox_entries())])


def _json(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


# ---- pushing to a registry (OCI distribution API) ----


def push_image(address: str, repository: str, tag: str, layers: Sequence[bytes]) -> str:
    """Push an image of uncompressed `layers` to the registry at `address` (host:port, plain
    HTTP); return the manifest digest."""
    manifest, config, compressed = oci_image_blobs(layers)
    connection = http.client.HTTPConnection(address, timeout=30)
    try:
        for blob in (config, *compressed):
            _upload_blob(connection, repository, blob)
        status, _ = _request(
            connection,
            "PUT",
            f"/v2/{repository}/manifests/{tag}",
            manifest,
            {"Content-Type": OCI_MANIFEST},
        )
        assert status == 201, f"manifest PUT answered {status}"
    finally:
        connection.close()
    return digest(manifest)


def _upload_blob(connection: http.client.HTTPConnection, repository: str, blob: bytes) -> None:
    status, headers = _request(connection, "POST", f"/v2/{repository}/blobs/uploads/", b"", {})
    assert status == 202, f"upload start answered {status}"
    location = headers["Location"]
    separator = "&" if "?" in location else "?"
    if location.startswith("http"):
        location = "/" + location.split("/", 3)[3]
    status, _ = _request(
        connection,
        "PUT",
        f"{location}{separator}digest={digest(blob)}",
        blob,
        {"Content-Type": "application/octet-stream"},
    )
    assert status == 201, f"blob PUT answered {status}"


def _request(
    connection: http.client.HTTPConnection,
    method: str,
    url: str,
    body: bytes,
    headers: dict[str, str],
) -> tuple[int, dict[str, str]]:
    connection.request(
        method, url, body=body, headers={**headers, "Content-Length": str(len(body))}
    )
    response = connection.getresponse()
    response.read()
    return response.status, dict(response.getheaders())
