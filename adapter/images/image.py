"""What an image is to the store: descriptors, the Image record, and the parsing of manifests and
image configs (OCI image-spec and the Docker schema 2 equivalents, which share their shape).

Parsing is strict: a blob that does not have the shape we rely on is refused with the digest that
names it, so a broken image fails at import or pull, not when a container starts.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from typing import Any, Protocol

from adapter.core.errors import InvalidArgument

# Phases of an import or pull: blobs read into the store, then the image unpacked.
READ = "read"
UNPACK = "unpack"


class Progress(Protocol):
    """Reports (what, done_bytes, total_bytes, phase). READ: `what` is the tarball's file name or
    a blob digest being read. UNPACK: `what` is the image reference, and the bytes count its
    layer blobs as they are unpacked."""

    def __call__(self, what: str, done: int, total: int, phase: str = READ) -> None: ...


OCI_LAYOUT_VERSION = "1.0.0"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
GZIP_LAYER_TYPES = (OCI_LAYER_GZIP, DOCKER_LAYER_GZIP)
PLAIN_LAYER_TYPES = (OCI_LAYER, "application/vnd.docker.image.rootfs.diff.tar")
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
# Manifests and configs are small; a bigger "manifest" is an attack or a mistake.
MAX_JSON_BLOB = 4 * 1024 * 1024
GOARCH_BY_MACHINE = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}


def host_architecture() -> str:
    machine = platform.machine()
    return GOARCH_BY_MACHINE.get(machine, machine)


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class Image:
    reference: str
    manifest: Descriptor
    config: Descriptor
    layers: tuple[Descriptor, ...]
    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    working_dir: str
    user: str
    # The uncompressed digests of the layers (config rootfs.diff_ids), checked at unpack.
    diff_ids: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        """Bytes of the image's blobs in the store (manifest, config, layers)."""
        return self.manifest.size + self.config.size + sum(layer.size for layer in self.layers)


def load_json(data: bytes, what: str) -> dict[str, Any]:
    """A JSON object, or InvalidArgument naming `what` (a digest or a file in a tarball)."""
    if len(data) > MAX_JSON_BLOB:
        raise InvalidArgument("image", f"{what}: larger than {MAX_JSON_BLOB} bytes")
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument("image", f"{what}: not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise InvalidArgument("image", f"{what}: expected a JSON object")
    return value


def descriptor(value: Any, what: str) -> Descriptor:
    if not isinstance(value, dict):
        raise InvalidArgument("image", f"{what}: expected a descriptor object")
    media_type, digest, size = value.get("mediaType"), value.get("digest"), value.get("size")
    if not isinstance(media_type, str) or not isinstance(digest, str):
        raise InvalidArgument("image", f"{what}: descriptor without mediaType or digest")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidArgument("image", f"{what}: descriptor size must be an integer >= 0")
    return Descriptor(media_type, digest, size)


def manifest_parts(manifest: dict[str, Any], digest: str) -> tuple[Descriptor, list[Descriptor]]:
    """The config and layer descriptors of an image manifest."""
    if manifest.get("schemaVersion") != 2:
        raise InvalidArgument("image", f"manifest {digest}: only schemaVersion 2 is supported")
    config = descriptor(manifest.get("config"), f"manifest {digest} config")
    layers_json = manifest.get("layers")
    if not isinstance(layers_json, list):
        raise InvalidArgument("image", f"manifest {digest}: layers must be a list")
    layers = [
        descriptor(layer, f"manifest {digest} layer {i}") for i, layer in enumerate(layers_json)
    ]
    for layer in layers:
        if layer.media_type not in GZIP_LAYER_TYPES + PLAIN_LAYER_TYPES:
            raise InvalidArgument(
                "image",
                f"layer {layer.digest}: media type {layer.media_type!r} is not supported "
                f"(supported: {list(GZIP_LAYER_TYPES + PLAIN_LAYER_TYPES)})",
            )
    return config, layers


def platform_manifest(index: dict[str, Any], digest: str) -> Descriptor:
    """The manifest of an image index that runs here (linux and this machine's architecture)."""
    manifests = index.get("manifests")
    if not isinstance(manifests, list):
        raise InvalidArgument("image", f"index {digest}: manifests must be a list")
    arch = host_architecture()
    for i, entry in enumerate(manifests):
        found = descriptor(entry, f"index {digest} manifest {i}")
        wanted = entry.get("platform") or {}
        runs_here = (
            wanted.get("os", "linux") == "linux" and wanted.get("architecture", arch) == arch
        )
        if found.media_type in MANIFEST_TYPES and runs_here:
            return found
    raise InvalidArgument("image", f"index {digest}: no manifest for linux/{arch}")


def image_from(reference: str, manifest: Descriptor, manifest_json: dict[str, Any],
               config_json: dict[str, Any]) -> Image:  # fmt: skip
    """The Image record of a manifest and its config, both already verified blobs."""
    config, layers = manifest_parts(manifest_json, manifest.digest)
    runtime = config_json.get("config") or {}
    rootfs = config_json.get("rootfs") or {}
    diff_ids = rootfs.get("diff_ids") or []
    if not isinstance(runtime, dict) or not isinstance(diff_ids, list):
        raise InvalidArgument("image", f"config {config.digest}: config/rootfs have a wrong type")
    if len(diff_ids) != len(layers) or not all(isinstance(d, str) for d in diff_ids):
        raise InvalidArgument(
            "image",
            f"config {config.digest}: {len(diff_ids)} diff_ids for {len(layers)} layers",
        )
    return Image(
        reference=reference,
        manifest=manifest,
        config=config,
        layers=tuple(layers),
        entrypoint=_strings(runtime.get("Entrypoint"), config.digest, "Entrypoint"),
        cmd=_strings(runtime.get("Cmd"), config.digest, "Cmd"),
        env=tuple(_env_pair(v) for v in _strings(runtime.get("Env"), config.digest, "Env")),
        working_dir=_string(runtime.get("WorkingDir"), config.digest, "WorkingDir"),
        user=_string(runtime.get("User"), config.digest, "User"),
        diff_ids=tuple(diff_ids),
    )


def _strings(value: Any, digest: str, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument("image", f"config {digest}: {key} must be a list of strings")
    return tuple(value)


def _string(value: Any, digest: str, key: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidArgument("image", f"config {digest}: {key} must be a string")
    return value


def _env_pair(entry: str) -> tuple[str, str]:
    name, _, value = entry.partition("=")
    return name, value
