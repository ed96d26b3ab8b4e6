"""Pull from an OCI distribution registry (distribution-spec: GET manifests and blobs) into a
staging area, verifying every digest on the way in.

Whom a pull talks to: the registry in the reference, or its mirror (the store's `mirrors`:
registry domain -> host[:port], like containerd's hosts.toml, which serves the registry's
repositories under the same paths: `gcr.io/a/b:1` from a mirror of gcr.io is fetched from the
mirror and stored as `gcr.io/a/b:1`), and then only the URLs that registry names: the token realm
of its `WWW-Authenticate` challenge and the `Location` of its redirects (blob storage), at most
MAX_REDIRECTS of them. How: HTTPS with the system's CA bundle or the host's `ca_file`; plain HTTP
only to a host whose `[registry."HOST"]` table says `insecure = true`, or to a loopback host
(localhost, 127.0.0.0/8, ::1) without a table that says otherwise or gives a `ca_file` (Docker's
default insecure registry). A URL the registry names is refused when it would go over plain HTTP
to a host where that is not allowed, so a registry cannot downgrade us.

The Authorization header (auth.py: Basic, or a Bearer token) goes to the registry's own origin
only: never along a redirect to another host, which gets a request without it.
"""

from __future__ import annotations

import http.client
import ipaddress
import ssl
import threading
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from adapter.core.config import RegistryOptions
from adapter.core.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from adapter.images.auth import (
    Challenge,
    Credentials,
    TokenCache,
    basic_authorization,
    configured_credentials,
    parse_challenge,
    token_from,
)
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
MAX_REDIRECTS = 5
MAX_TOKEN_ANSWER = 1 << 20
# An error page or a redirect's body: read to reuse the connection, up to this much.
MAX_DISCARDED_BODY = 64 << 10
REDIRECTS = (301, 302, 303, 307, 308)
USER_AGENT = "containerizer"


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


@dataclass(frozen=True)
class Origin:
    """Scheme, host and port: what an Authorization header is bound to."""

    scheme: str
    host: str
    port: int | None

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port is None else f"{host}:{self.port}"


class Endpoints:
    """How to reach each host a pull may contact: the scheme and TLS rule of its table."""

    def __init__(self, options: RegistryOptions) -> None:
        self.options = options
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._lock = threading.Lock()

    def plain_http(self, host: str, port: int | None) -> bool:
        table = self.options.host(Origin("", host, port).netloc) or self.options.host(host)
        if table is not None and table.insecure is not None:
            return table.insecure
        return is_loopback(host) and (table is None or table.ca_file is None)

    def origin(self, endpoint: str) -> Origin:
        """The origin of a HOST[:PORT] that the reference, a mirror or the config names."""
        parsed = urllib.parse.urlsplit(f"//{endpoint}")
        host = parsed.hostname or endpoint
        scheme = "http" if self.plain_http(host, parsed.port) else "https"
        return Origin(scheme, host, parsed.port)

    def named(self, url: str, base: Origin, what: str) -> tuple[Origin, str]:
        """(origin, path and query) of a URL a registry named (relative to `base`), refused
        (Unavailable, naming it) unless it is HTTP(S) and allowed over its scheme."""
        absolute = urllib.parse.urljoin(f"{base.scheme}://{base.netloc}/", url)
        parsed = urllib.parse.urlsplit(absolute)
        try:
            port = parsed.port
        except ValueError:
            port = -1
        host = parsed.hostname or ""
        shown = url.split("?")[0]  # a signed storage URL's query is a credential
        if parsed.scheme not in ("http", "https") or not host or port == -1:
            raise Unavailable(f"{what} {shown!r} is not an http(s) URL with a host")
        if parsed.scheme == "http" and not self.plain_http(host, port):
            raise Unavailable(
                f"{what} {shown!r} is plain HTTP to a host that is spoken to over HTTPS only "
                f'(set insecure = true in its [registry."HOST"] table to allow it)'
            )
        target = urllib.parse.urlunsplit(("", "", parsed.path or "/", parsed.query, ""))
        return Origin(parsed.scheme, host, port), target

    def connect(self, origin: Origin) -> http.client.HTTPConnection:
        if origin.scheme == "http":
            return http.client.HTTPConnection(origin.host, origin.port, timeout=TIMEOUT_SECONDS)
        return http.client.HTTPSConnection(
            origin.host, origin.port, timeout=TIMEOUT_SECONDS, context=self._context(origin)
        )

    def _context(self, origin: Origin) -> ssl.SSLContext:
        table = self.options.host(origin.netloc) or self.options.host(origin.host)
        ca_file = str(table.ca_file) if table is not None and table.ca_file else ""
        with self._lock:
            context = self._contexts.get(ca_file)
            if context is None:
                try:
                    context = ssl.create_default_context(cafile=ca_file or None)
                except (OSError, ssl.SSLError) as exc:
                    raise FailedPrecondition(
                        f"registry.{origin.netloc}.ca_file: cannot load {ca_file}: {exc}"
                    ) from exc
                self._contexts[ca_file] = context
            return context


@dataclass(frozen=True)
class Access:
    """What a pull may use: the registry tables, request credentials, the shared token cache."""

    registries: RegistryOptions
    tokens: TokenCache
    credentials: Credentials = field(default_factory=Credentials)


class RegistryClient:
    """One connection to one registry (or its mirror), for one pull."""

    def __init__(
        self, reference: Reference, mirrors: Mapping[str, str] | None, access: Access
    ) -> None:
        self.reference = reference
        domain = DOCKER_HUB_REGISTRY if reference.domain == "docker.io" else reference.domain
        mirror = (mirrors or {}).get(reference.domain)
        self.endpoint = mirror or domain
        self.registry = f"{mirror} (mirror of {reference.domain})" if mirror else domain
        self.endpoints = Endpoints(access.registries)
        self.origin = self.endpoints.origin(self.endpoint)
        # A request's credentials are for the registry it names; a mirror gets its own.
        names = (mirror,) if mirror else (domain, reference.domain)
        self.credentials = (
            access.credentials
            if access.credentials and not mirror
            else configured_credentials(access.registries, names)
        )
        self.scope = f"repository:{reference.path}:pull"
        self.tokens = access.tokens
        self._token_key = (self.origin.netloc, self.scope, self.credentials.fingerprint())
        cached = self.tokens.get(self._token_key)
        self.authorization = f"Bearer {cached}" if cached else None
        self.connection = self.endpoints.connect(self.origin)
        self._detour: http.client.HTTPConnection | None = None  # to another host (redirect)

    def close(self) -> None:
        self.connection.close()
        self._close_detour()

    def _close_detour(self) -> None:
        if self._detour is not None:
            self._detour.close()
            self._detour = None

    def request(self, path: str, accept: str | None = None) -> http.client.HTTPResponse:
        """GET `path` (below /v2/<name>/), authenticating when asked and following redirects;
        the response is 200 or an error of ours is raised."""
        self._close_detour()
        url = f"/v2/{self.reference.path}/{path}"
        response = self._send(self.origin, url, accept)
        if response.status == 401 and self._authenticate(response):
            response = self._send(self.origin, url, accept)
        origin, target = self.origin, url
        for _ in range(MAX_REDIRECTS):
            if response.status not in REDIRECTS:
                break
            location = response.getheader("Location") or ""
            self._discard(response, origin)
            origin, target = self.endpoints.named(location, origin, f"redirect of {url} to")
            response = self._send(origin, target, accept)
        return self._checked(response, url)

    def _send(self, origin: Origin, target: str, accept: str | None) -> http.client.HTTPResponse:
        """GET on the registry's connection with its Authorization, or on a new connection to
        another origin without it."""
        headers = {"User-Agent": USER_AGENT}
        if accept:
            headers["Accept"] = accept
        if origin == self.origin:
            connection = self.connection
            if self.authorization:
                headers["Authorization"] = self.authorization
        else:
            self._close_detour()
            connection = self._detour = self.endpoints.connect(origin)
        try:
            connection.request("GET", target, headers=headers)
            return connection.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            where = self.registry if origin == self.origin else origin.netloc
            path = target.split("?")[0]
            raise Unavailable(f"registry {where}: cannot GET {path}: {exc}") from exc

    def _discard(self, response: http.client.HTTPResponse, origin: Origin) -> None:
        """Read the body of an answer we do not use, so the connection serves the next request;
        one longer than MAX_DISCARDED_BODY (a registry's endless body) closes the connection
        instead, which the next request reopens."""
        try:
            whole = len(response.read(MAX_DISCARDED_BODY + 1)) <= MAX_DISCARDED_BODY
        except (OSError, http.client.HTTPException):
            whole = False
        if not whole:
            response.close()
            if origin == self.origin:
                self.connection.close()
            else:
                self._close_detour()

    def _checked(self, response: http.client.HTTPResponse, url: str) -> http.client.HTTPResponse:
        if response.status == 200:
            return response
        self._discard(response, self.origin)
        if response.status == 404:
            raise NotFound(f"image {self.reference}: {url} not found in registry {self.registry}")
        if response.status == 401:
            raise PermissionDenied(self._refusal(url))
        if response.status == 403:
            raise PermissionDenied(
                f"registry {self.registry} denies {self.credentials.describe()} "
                f"access to {url} (HTTP 403)"
            )
        if response.status in REDIRECTS:
            raise Unavailable(f"registry {self.registry}: more than {MAX_REDIRECTS} redirects")
        raise Unavailable(f"registry {self.registry}: HTTP {response.status} for GET {url}")

    def _refusal(self, url: str) -> str:
        if not self.credentials:
            return (
                f"registry {self.registry} requires authentication for {url} and this pull has "
                f'no credentials: give them with the pull or in [registry."{self.endpoint}"] '
                "(or registry.docker_config)"
            )
        return (
            f"registry {self.registry} refused {self.credentials.describe()} for {url} (HTTP 401)"
        )

    def _authenticate(self, response: http.client.HTTPResponse) -> bool:
        """Answer a 401's challenge: True when there is a new Authorization to retry with."""
        self._discard(response, self.origin)
        headers = response.msg.get_all("WWW-Authenticate") or []
        challenges = [c for c in map(parse_challenge, headers) if c is not None]
        bearer = next((c for c in challenges if c.scheme == "bearer"), None)
        basic = next((c for c in challenges if c.scheme == "basic"), None)
        if bearer is not None:
            self.authorization = f"Bearer {self._token(bearer)}"
            return True
        if basic is not None:
            if not (self.credentials.username or self.credentials.password):
                return False  # the 401 stands: _refusal says what is missing
            self.authorization = basic_authorization(self.credentials)
            return True
        schemes = ", ".join(sorted({c.scheme for c in challenges})) or "none"
        raise FailedPrecondition(
            f"registry {self.registry} asks for an authentication scheme this node does not "
            f"speak ({schemes}); Basic and Bearer (token) are supported"
        )

    def _token(self, challenge: Challenge) -> str:
        """A Bearer token for this pull's scope: the request's registry token, or one fetched
        from the challenge's realm and cached for later pulls."""
        if self.credentials.registry_token:
            return self.credentials.registry_token
        realm = challenge.parameters.get("realm", "")
        if not realm:
            raise FailedPrecondition(f"registry {self.registry}: a Bearer challenge without realm")
        origin, target = self.endpoints.named(realm, self.origin, "token realm")
        query = {"scope": challenge.parameters.get("scope") or self.scope}
        if "service" in challenge.parameters:
            query["service"] = challenge.parameters["service"]
        body, status = self._token_request(origin, target, query)
        if status in (401, 403):
            raise PermissionDenied(
                f"token server {origin.netloc} of registry {self.registry} refused "
                f"{self.credentials.describe()} for {query['scope']} (HTTP {status})"
            )
        if status != 200:
            raise Unavailable(f"token server {origin.netloc}: HTTP {status}")
        token, expires_in = token_from(body, origin.netloc)
        self.tokens.put(self._token_key, token, expires_in)
        return token

    def _token_request(
        self, origin: Origin, target: str, query: dict[str, str]
    ) -> tuple[bytes, int]:
        """Ask the realm for a token: an identity token through OAuth2 (POST), otherwise a GET
        with the username and password when there are any."""
        headers = {"User-Agent": USER_AGENT}
        method, body = "GET", None
        if self.credentials.identity_token:
            method = "POST"
            form = {
                **query,
                "grant_type": "refresh_token",
                "refresh_token": self.credentials.identity_token,
                "client_id": USER_AGENT,
            }
            body = urllib.parse.urlencode(form).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        else:
            separator = "&" if "?" in target else "?"
            target += separator + urllib.parse.urlencode(query)
            if self.credentials.username or self.credentials.password:
                headers["Authorization"] = basic_authorization(self.credentials)
        connection = self.endpoints.connect(origin)
        try:
            connection.request(method, target, body=body, headers=headers)
            response = connection.getresponse()
            return response.read(MAX_TOKEN_ANSWER), response.status
        except (OSError, http.client.HTTPException) as exc:
            raise Unavailable(f"token server {origin.netloc}: {exc}") from exc
        finally:
            connection.close()

    def manifest(self, reference: str, staging: Staging) -> tuple[Descriptor, dict[str, Any]]:
        """Fetch, verify and stage a manifest or index; `reference` is a tag or a digest."""
        response = self.request(f"manifests/{reference}", ACCEPT)
        body = response.read(MAX_JSON_BLOB + 1)
        if len(body) > MAX_JSON_BLOB:
            self.close()  # the rest is not read: this connection is spent
            raise InvalidArgument(
                "image", f"manifest {reference}: more than {MAX_JSON_BLOB} bytes (the limit)"
            )
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
            self.close()
            raise Unavailable(f"registry {self.registry}: reading {blob.digest}: {exc}") from exc


def pull_image(
    reference: Reference,
    staging: Staging,
    progress: Progress | None,
    mirrors: Mapping[str, str] | None,
    access: Access,
) -> Image:
    """Stage the manifest (for this platform), config and layers of `reference`."""
    client = RegistryClient(reference, mirrors, access)
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
