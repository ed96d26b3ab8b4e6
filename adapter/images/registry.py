"""Pull from an OCI distribution registry (distribution-spec: GET manifests and blobs) into a
staging area, verifying every digest on the way in.

Only the registry named in the reference is contacted, and only it: redirects are not followed
(a registry whose storage redirects elsewhere is refused with the address it wanted). Loopback
registries (localhost, 127.0.0.0/8, ::1) are spoken to over plain HTTP, like Docker's default
insecure registry; anything else over HTTPS. Token authentication is not supported: a registry
that asks for it is a FailedPrecondition naming the registry.

A mirror (the store's `mirrors`: registry domain -> host[:port], like containerd's hosts.toml)
serves a registry's repositories under the same paths: `gcr.io/a/b:1` from a mirror of gcr.io
is fetched from the mirror and stored as `gcr.io/a/b:1`. Only the mirror is contacted then.
"""

from __future__ import annotations

import http.client
import ipaddress
import urllib.parse
from collections.abc import Mapping
from typing import Any

from adapter.core.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from adapter.images.image import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    INDEX_TYPES,
    MANIFEST_TYPES,
    MAX_JSON_BLOB,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Image,
    Progress,
    image_from,
    load_json,
    manifest_parts,
    platform_manifest,
)
from adapter.images.layout import Staging, sha256_digest
from adapter.images.reference import DOMAIN_PATTERN, Reference

ACCEPT = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST))
DOCKER_HUB_REGISTRY = "registry-1.docker.io"
TIMEOUT_SECONDS = 30.0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def checked_mirrors(mirrors: Mapping[str, str], field: str = "images.mirrors") -> dict[str, str]:
    """Registry domain -> mirror host[:port], each checked; InvalidArgument(field) otherwise."""
    for domain, endpoint in mirrors.items():
        for what, value in (("registry", domain), ("mirror", endpoint)):
            if not isinstance(value, str) or not DOMAIN_PATTERN.fullmatch(value):
                raise InvalidArgument(
                    field, f"{what} {value!r} of {domain!r} is not HOST[:PORT] (no scheme or path)"
                )
    return dict(mirrors)


class RegistryClient:
    """One connection to one registry (or its mirror), for one pull."""

    def __init__(self, reference: Reference, mirrors: Mapping[str, str] | None = None) -> None:
        self.reference = reference
        domain = DOCKER_HUB_REGISTRY if reference.domain == "docker.io" else reference.domain
        mirror = (mirrors or {}).get(reference.domain)
        endpoint = mirror or domain
        parsed = urllib.parse.urlsplit(f"//{endpoint}")
        self.host = parsed.hostname or endpoint
        self.port = parsed.port
        self.registry = f"{mirror} (mirror of {reference.domain})" if mirror else domain
        connection_class = (
            http.client.HTTPConnection if is_loopback(self.host) else http.client.HTTPSConnection
        )
        self.connection = connection_class(self.host, self.port, timeout=TIMEOUT_SECONDS)

    def close(self) -> None:
        self.connection.close()

    def request(self, path: str, accept: str | None = None) -> http.client.HTTPResponse:
        """GET `path` (below /v2/<name>/); the response is 200 or an error of ours is raised."""
        url = f"/v2/{self.reference.path}/{path}"
        headers = {"Accept": accept} if accept else {}
        try:
            self.connection.request("GET", url, headers=headers)
            response = self.connection.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            self.connection.close()
            raise Unavailable(f"registry {self.registry}: cannot GET {url}: {exc}") from exc
        if response.status == 200:
            return response
        response.read()  # keep the connection usable for the next request
        if response.status == 404:
            raise NotFound(f"image {self.reference}: {url} not found in registry {self.registry}")
        if response.status in (401, 403):
            raise FailedPrecondition(
                f"registry {self.registry} requires authentication for {url}, "
                "which pull does not support"
            )
        if 300 <= response.status < 400:
            raise Unavailable(
                f"registry {self.registry} redirects {url} to {response.getheader('Location')}; "
                "pull only talks to the registry in the reference"
            )
        raise Unavailable(f"registry {self.registry}: HTTP {response.status} for GET {url}")

    def manifest(self, reference: str, staging: Staging) -> tuple[Descriptor, dict[str, Any]]:
        """Fetch, verify and stage a manifest or index; `reference` is a tag or a digest."""
        response = self.request(f"manifests/{reference}", ACCEPT)
        body = response.read(MAX_JSON_BLOB + 1)
        digest = sha256_digest(body)
        if reference.startswith("sha256:") and digest != reference:
            raise InvalidArgument(
                "image", f"blob {reference}: content does not match its digest ({digest})"
            )
        document = load_json(body, f"manifest {digest}")
        media_type = document.get("mediaType") or response.getheader("Content-Type", "")
        media_type = str(media_type).split(";")[0].strip()
        if media_type not in INDEX_TYPES + MANIFEST_TYPES:
            raise InvalidArgument(
                "image", f"manifest {digest}: unsupported media type {media_type!r}"
            )
        staging.write_bytes(body, digest)
        return Descriptor(media_type, digest, len(body)), document

    def blob(self, blob: Descriptor, staging: Staging, progress: Progress | None) -> None:
        if staging.path(blob.digest) is not None:
            if progress is not None:
                progress(blob.digest, blob.size, blob.size)  # already here: nothing to fetch
            return
        response = self.request(f"blobs/{blob.digest}")

        def report(done: int) -> None:
            if progress is not None:
                progress(blob.digest, done, blob.size)

        try:
            staging.write(response, blob.digest, blob.size, report)
        except (OSError, http.client.HTTPException) as exc:
            self.connection.close()
            raise Unavailable(f"registry {self.registry}: reading {blob.digest}: {exc}") from exc


def pull_image(
    reference: Reference,
    staging: Staging,
    progress: Progress | None,
    mirrors: Mapping[str, str] | None = None,
) -> Image:
    """Stage the manifest (for this platform), config and layers of `reference`."""
    client = RegistryClient(reference, mirrors)
    try:
        top, document = client.manifest(reference.digest or str(reference.tag), staging)
        manifest, manifest_json = top, document
        if top.media_type in INDEX_TYPES:
            chosen = platform_manifest(document, top.digest)
            manifest, manifest_json = client.manifest(chosen.digest, staging)
        config, layers = manifest_parts(manifest_json, manifest.digest)
        declared = config.size + sum(layer.size for layer in layers)
        if declared > staging.max_bytes:  # staging counts what it writes; this saves the wait
            raise InvalidArgument(
                "image",
                f"{reference}: its blobs are {declared} bytes, more than {staging.max_bytes}, this "
                "node's limit (images.max_import_bytes)",
            )
        client.blob(config, staging, progress)
        config_data = staging.read(config.digest, MAX_JSON_BLOB)
        assert config_data is not None  # just staged
        image = image_from(
            str(reference), manifest, manifest_json, load_json(config_data, config.digest)
        )
        for layer in layers:
            client.blob(layer, staging, progress)
        return image
    finally:
        client.close()
