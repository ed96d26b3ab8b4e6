"""Deterministic test images, built here so that no test needs a registry on the internet.

The busybox image: Debian's busybox-static (/bin/busybox) plus symlinks for the applets the tests
use, /etc/passwd and /etc/group, and the empty directories a runtime mounts over. Everything is
fixed (mtimes, owners, member order, gzip header mtime 0), so the same Debian package gives
byte-for-byte the same tarballs and digests on every run.

Also: the layer and tarball writers the store tests use to build hostile images, and a small push
client for the OCI distribution API (monolithic blob upload, manifest PUT).
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import platform
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

# The image itself is built by the package (the node makes the same one for `compare`); the
# tests add a fixed, smaller applet list and the writers for hostile images.
from adapter.images.busybox import BUSYBOX_BINARY as BUSYBOX
from adapter.images.busybox import (
    EMPTY_DIRECTORIES,
    FIXED_MTIME,
    GROUP,
    PASSWD,
    REFERENCE,
    image_config,
    oci_image_blobs,
    oci_layout_tar,
    write_busybox_layout,
)
from adapter.images.busybox import gzip_fixed as gzip_bytes  # noqa: F401 - for layer writers

APPLETS = (
    "sh", "echo", "cat", "sleep", "true", "false", "ls", "head", "tail", "hostname", "id", "env",
    "dd", "mkdir", "httpd", "nc", "ps", "kill", "rm", "cp", "mv", "grep", "wc", "test", "printf",
    "touch", "uname", "whoami", "pwd", "stat", "seq", "yes", "mount", "readlink", "ln", "chmod",
)  # fmt: skip
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
    path.write_bytes(oci_layout_tar(layers, reference, diff_ids))
    return path


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
    return write_busybox_layout(dest_dir, applets=APPLETS)


def busybox_docker_archive(dest_dir: Path) -> Path:
    return write_docker_archive(dest_dir / "busybox-docker.tar", [tar_bytes(busybox_entries())])


def _json(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


# ---- pushing to a registry (OCI distribution API) ----


def push_image(address: str, repository: str, tag: str, layers: Sequence[bytes]) -> str:
    """Push an image of uncompressed `layers` to the registry at `address` (host:port, plain
    HTTP); return the manifest digest."""
    manifest, config, compressed = oci_image_blobs(layers)
    return push_manifest(address, repository, tag, manifest, [config, *compressed])


def push_manifest(
    address: str, repository: str, tag: str, manifest: bytes, blobs: Sequence[bytes]
) -> str:
    """Push the `blobs` an OCI image `manifest` names, then the manifest as `tag`; return the
    manifest digest."""
    connection = http.client.HTTPConnection(address, timeout=30)
    try:
        for blob in blobs:
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


# ---- confinement probes: a setuid-root binary, a syscall prober, an image's own command ----

SYSCALL_PROBE = "/bin/syscall-probe"
# The same binary, setuid root (mode 04755). Not a busybox copy: busybox drops a setuid bit at
# once unless /etc/busybox.conf grants the applet, and with that file its shell crashes for every
# non-root user.
SETUID_PROBE = "/bin/setuid-probe"
IMAGE_ENTRYPOINT = ("/bin/echo", "from-entrypoint")
IMAGE_CMD = ("from-cmd",)
CONFINEMENT_APPLETS = ("unshare", "awk", "sed", "mkdir", "grep", "id", "sh", "cat", "tr", "ls")
SYSCALL_PROBE_SOURCE = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

/* One attempt per name, each in a child of its own (a granted unshare would change the rest). */
static long attempt(const char *name) {
    if (!strcmp(name, "keyctl")) return syscall(SYS_keyctl, 1L, 0L); /* JOIN_SESSION_KEYRING */
    if (!strcmp(name, "unshare-user")) return syscall(SYS_unshare, (long)CLONE_NEWUSER);
    if (!strcmp(name, "unshare-mount")) return syscall(SYS_unshare, (long)CLONE_NEWNS);
    if (!strcmp(name, "mount")) return syscall(SYS_mount, "none", "/tmp", "tmpfs", 0L, NULL);
    errno = EINVAL;
    return -1;
}

/* `root-shell SCRIPT`: what a setuid-root binary gives an attacker, a shell that is root through
   and through (real ids too), or, when the bit was ignored, the caller's own shell. */
static int root_shell(const char *script) {
    if (setresgid(0, 0, 0) != 0 || setresuid(0, 0, 0) != 0) perror("setuid-probe: setresuid");
    execl("/bin/sh", "sh", "-c", script, (char *)NULL);
    perror("setuid-probe: exec /bin/sh");
    return 127;
}

int main(int argc, char **argv) {
    if (argc == 3 && !strcmp(argv[1], "root-shell")) return root_shell(argv[2]);
    for (int i = 1; i < argc; i++) {
        int status = 0;
        pid_t child = fork();
        if (child == 0) _exit(attempt(argv[i]) < 0 ? errno : 0);
        waitpid(child, &status, 0);
        int error = WIFEXITED(status) ? WEXITSTATUS(status) : EINTR;
        printf("%s: %s\n", argv[i], error ? strerror(error) : "allowed");
    }
    return 0;
}
"""


def build_syscall_probe(dest_dir: Path) -> Path:
    """The probe, static (gcc and libc6-dev): `syscall-probe NAME...` prints `NAME: allowed` or
    `NAME: <strerror>` for keyctl, unshare-user, unshare-mount and mount; `syscall-probe
    root-shell SCRIPT` takes uid 0 if it can and runs SCRIPT with /bin/sh."""
    import subprocess

    source = dest_dir / "syscall-probe.c"
    source.write_text(SYSCALL_PROBE_SOURCE)
    binary = dest_dir / "syscall-probe"
    subprocess.run(
        ["gcc", "-static", "-O1", "-o", str(binary), str(source)], check=True, capture_output=True
    )
    return binary


def confinement_entries(probe: Path) -> list[Entry]:
    """The busybox image plus the probe, and a setuid-root copy of it."""
    entries = busybox_entries()
    present = {entry.name for entry in entries}
    entries += [
        Entry(f"bin/{applet}", "symlink", link="busybox")
        for applet in CONFINEMENT_APPLETS
        if f"bin/{applet}" not in present
    ]
    entries += [
        Entry(SYSCALL_PROBE.lstrip("/"), data=probe.read_bytes(), mode=0o755),
        Entry(SETUID_PROBE.lstrip("/"), data=probe.read_bytes(), mode=0o4755),
    ]
    return entries


def write_commanded_oci_layout(path: Path, layers: Sequence[bytes], reference: str) -> Path:
    """An OCI image-layout tarball (uncompressed layers) whose config has IMAGE_ENTRYPOINT and
    IMAGE_CMD: what runs when a launch gives no command."""
    config = json.dumps(
        {
            "architecture": GOARCH,
            "os": "linux",
            "config": {
                "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
                "Entrypoint": list(IMAGE_ENTRYPOINT),
                "Cmd": list(IMAGE_CMD),
            },
            "rootfs": {"type": "layers", "diff_ids": [digest(layer) for layer in layers]},
        },
        sort_keys=True,
    ).encode()
    layer_type = "application/vnd.oci.image.layer.v1.tar"
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": digest(config),
                "size": len(config),
            },
            "layers": [
                {"mediaType": layer_type, "digest": digest(layer), "size": len(layer)}
                for layer in layers
            ],
        },
        sort_keys=True,
    ).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": digest(manifest),
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": reference},
            }
        ],
    }
    blobs = {digest(blob): blob for blob in (manifest, config, *layers)}
    files = [("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')]
    files.append(("index.json", json.dumps(index, sort_keys=True).encode()))
    files += [(f"blobs/sha256/{d.removeprefix('sha256:')}", blob) for d, blob in blobs.items()]
    return write_tarball(path, files)


# ---- native and LXC confinement: a setuid-root shell, an image with its own settings ----

ROOT_SHELL_REFERENCE = "localhost/busybox-root-shell:latest"
ROOT_SHELL_BUSYBOX = "/suid/busybox"  # named busybox, so `/suid/busybox ash` is its ash applet
SETTINGS_REFERENCE = "localhost/busybox-settings:latest"


def root_shell_layout(dest_dir: Path) -> Path:
    """The busybox image plus a setuid-root copy of busybox that keeps root for its `ash`
    applet (busybox drops the bit for any applet /etc/busybox.conf does not grant it): the
    classic way back to root for a workload run as another user."""
    entries = [*busybox_entries(), Entry("suid", "dir", mode=0o755)]
    entries += [
        Entry(ROOT_SHELL_BUSYBOX.lstrip("/"), data=BUSYBOX.read_bytes(), mode=0o4755),
        Entry("etc/busybox.conf", data=b"[SUID]\nash = ssx 0.0\n"),
    ]
    tarball = dest_dir / "busybox-root-shell.tar"
    return write_oci_layout(tarball, [tar_bytes(entries)], ROOT_SHELL_REFERENCE)


def settings_image_layout(dest_dir: Path, settings: dict[str, object]) -> Path:
    """The busybox image (plus an empty /srv) whose config's `config` object is `settings`
    (Env, Entrypoint, Cmd, WorkingDir, User): what a runtime merges with a request."""
    layer = tar_bytes([*busybox_entries(), Entry("srv", "dir", mode=0o755)])
    config = _json(
        {
            "architecture": GOARCH,
            "os": "linux",
            "config": settings,
            "rootfs": {"type": "layers", "diff_ids": [digest(layer)]},
        }
    )
    layer_type = "application/vnd.oci.image.layer.v1.tar"
    manifest = _json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": digest(config), "size": len(config)},
            "layers": [{"mediaType": layer_type, "digest": digest(layer), "size": len(layer)}],
        }
    )
    entry = {"mediaType": OCI_MANIFEST, "digest": digest(manifest), "size": len(manifest)}
    entry["annotations"] = {"org.opencontainers.image.ref.name": SETTINGS_REFERENCE}
    files = [("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')]
    files.append(("index.json", _json({"schemaVersion": 2, "manifests": [entry]})))
    files += [
        (f"blobs/sha256/{digest(blob).removeprefix('sha256:')}", blob)
        for blob in (manifest, config, layer)
    ]
    return write_tarball(dest_dir / "busybox-settings.tar", files)


# ---- the settings an image runtime must honour, for the OCI store and for Docker's builder ----

# Env, WorkingDir, User, Entrypoint and Cmd of an image; without a command it prints
# "from-image", "/srv" and 65534 (nobody). A request's own command, variables, working
# directory and user win over each of them.
CONTRACT_SETTINGS: dict[str, object] = {
    "Env": ["PATH=/bin", "GREETING=from-image"],
    "Entrypoint": ["sh", "-c"],
    "Cmd": ["echo $GREETING; pwd; id -u"],
    "WorkingDir": "/srv",
    "User": "nobody",
}


def settings_dockerfile(settings: dict[str, object]) -> str:
    """The settings image for Docker's builder, from a context holding `busybox`, `passwd` and
    `group`: busybox-static with every applet, /etc/passwd and /etc/group, /tmp and /srv, then
    `settings` (the keys of CONTRACT_SETTINGS) as ENV, WORKDIR, USER, ENTRYPOINT and CMD."""
    env = settings.get("Env", [])
    assert isinstance(env, list)
    lines = [
        "FROM scratch",
        "COPY busybox /bin/busybox",
        "COPY passwd /etc/passwd",
        "COPY group /etc/group",
        'RUN ["/bin/busybox", "sh", "-c", "/bin/busybox --install -s /bin'
        ' && mkdir -m 1777 /tmp && mkdir /srv"]',
    ]
    for variable in env:
        name, _, value = str(variable).partition("=")
        lines.append(f"ENV {name}={json.dumps(value)}")
    lines.append(f"WORKDIR {settings['WorkingDir']}")
    lines.append(f"USER {settings['User']}")
    lines.append(f"ENTRYPOINT {json.dumps(settings['Entrypoint'])}")
    lines.append(f"CMD {json.dumps(settings['Cmd'])}")
    return "\n".join(lines) + "\n"
