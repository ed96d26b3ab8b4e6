"""Who a pull is, to a registry: credentials and the two ways to present them.

Credentials come, first found wins, from the request (the CRI PullImage's AuthConfig, our Pull's
credentials), the registry's `[registry."HOST[:PORT]"]` table, then the `auths` of the Docker
config.json named by `[registry] docker_config`. They are only presented when the registry asks
(HTTP 401 with `WWW-Authenticate`):

- `Basic`: the username and password, on every request to that registry.
- `Bearer realm=...,service=...,scope=...` (Docker Registry v2 token auth): a token fetched from
  the realm (with the username and password when there are any, anonymously otherwise; with an
  identity token through OAuth2's refresh_token grant), cached per registry, scope and
  credentials until it expires.

Secrets (passwords, tokens, `auth` values) never appear in a repr, a log line or an error: a
message names the registry and the user at most.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from adapter.core.config import RegistryOptions
from adapter.core.errors import FailedPrecondition, InvalidArgument

# Docker Hub's names in a config.json's `auths`, besides the host a pull contacts.
DOCKER_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io")
DEFAULT_TOKEN_SECONDS = 60  # the token spec's default when a token server omits expires_in
TOKEN_MARGIN_SECONDS = 5  # a cached token is dropped this long before it expires
MAX_DOCKER_CONFIG = 1 << 20
_PARAMETER = re.compile(r'\s*([A-Za-z][A-Za-z0-9_-]*)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)\s*,?')


@dataclass(frozen=True)
class Credentials:
    """What a pull presents to one registry; all empty: anonymous."""

    username: str = ""
    password: str = field(default="", repr=False)
    # OAuth2 refresh token (Docker's `identitytoken`): exchanged at the token realm.
    identity_token: str = field(default="", repr=False)
    # A bearer token for the registry itself, sent as it is.
    registry_token: str = field(default="", repr=False)

    def __bool__(self) -> bool:
        return any((self.username, self.password, self.identity_token, self.registry_token))

    def fingerprint(self) -> str:
        """Tells credentials apart in the token cache without keeping them in its keys: a
        token fetched for one user is never handed to a pull of another (or an anonymous one)."""
        parts = (self.username, self.password, self.identity_token, self.registry_token)
        return hashlib.sha256("\x00".join(parts).encode()).hexdigest()

    def describe(self) -> str:
        """For messages: who, never the secret."""
        if self.username:
            return f"user {self.username!r}"
        return "the given token" if self else "no credentials (anonymous)"


def decode_auth(text: str, field: str) -> tuple[str, str]:
    """A Docker `auth` value (base64 of USERNAME:PASSWORD) -> (username, password)."""
    try:
        decoded = base64.b64decode(text.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        decoded = ""
    username, colon, password = decoded.partition(":")
    if not colon or not username:
        raise InvalidArgument(field, "is not the base64 of USERNAME:PASSWORD (value not shown)")
    return username, password


def configured_credentials(options: RegistryOptions, hosts: tuple[str, ...]) -> Credentials:
    """The credentials of the first of `hosts` (the names one registry goes by) that the config
    or its Docker config.json has; anonymous when none has any."""
    for host in hosts:
        table = options.host(host)
        if table is not None and (table.username or table.password):
            return Credentials(table.username, table.password)
    if options.docker_config is None:
        return Credentials()
    auths = _docker_auths(options.docker_config)
    for host in hosts:
        keys = (host, *DOCKER_HUB_KEYS) if host in ("docker.io", "registry-1.docker.io") else ()
        for key in keys or (host,):
            entry = auths.get(key)
            if entry is not None:
                return _docker_entry(entry, options.docker_config, key)
    return Credentials()


def _docker_auths(path: Path) -> dict[str, dict[str, str]]:
    """The `auths` of a Docker config.json, keyed by bare HOST[:PORT] (and Docker Hub's URL)."""
    try:
        with open(path, "rb") as config:
            document = json.loads(config.read(MAX_DOCKER_CONFIG))
        auths = document.get("auths", {})
    except FileNotFoundError:
        return {}  # no config.json (yet): nobody logged in
    except (OSError, ValueError, AttributeError) as exc:
        raise FailedPrecondition(
            f"registry.docker_config: {path} is not a readable Docker config.json: "
            f"{type(exc).__name__}"
        ) from None
    if not isinstance(auths, dict):
        raise FailedPrecondition(f"registry.docker_config: {path}: `auths` is not an object")
    entries = {}
    for key, entry in auths.items():
        if isinstance(entry, dict):
            bare = key if key in DOCKER_HUB_KEYS else re.sub(r"^https?://", "", key).split("/")[0]
            entries[bare] = entry
    return entries


def _docker_entry(entry: dict[str, str], path: Path, key: str) -> Credentials:
    username, password = str(entry.get("username", "")), str(entry.get("password", ""))
    if entry.get("auth"):
        try:
            username, password = decode_auth(str(entry["auth"]), f"auths[{key!r}].auth")
        except InvalidArgument as exc:
            raise FailedPrecondition(f"registry.docker_config: {path}: {exc}") from None
    return Credentials(
        username,
        password,
        identity_token=str(entry.get("identitytoken", "")),
        registry_token=str(entry.get("registrytoken", "")),
    )


@dataclass(frozen=True)
class Challenge:
    """One `WWW-Authenticate` challenge: its scheme (lowercase) and parameters."""

    scheme: str
    parameters: dict[str, str]


def parse_challenge(header: str) -> Challenge | None:
    """`Bearer realm="...",service="...",scope="..."` or `Basic realm="..."`; None for a header
    that is neither (an unknown scheme is then a refusal naming the header's scheme)."""
    scheme, _, rest = header.strip().partition(" ")
    if not scheme:
        return None
    parameters = {}
    for match in _PARAMETER.finditer(rest):
        value = match.group(2)
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        parameters[match.group(1).lower()] = value
    return Challenge(scheme.lower(), parameters)


def basic_authorization(credentials: Credentials) -> str:
    pair = f"{credentials.username}:{credentials.password}".encode()
    return "Basic " + base64.b64encode(pair).decode()


@dataclass(frozen=True)
class CachedToken:
    token: str = field(repr=False)
    expires: float


class TokenCache:
    """Bearer tokens by (registry, scope, credentials fingerprint), until they expire. Shared by
    the pulls of one store, which run in worker threads: hence the lock."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tokens: dict[tuple[str, str, str], CachedToken] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str, str]) -> str | None:
        with self._lock:
            cached = self._tokens.get(key)
            if cached is None:
                return None
            if cached.expires <= self._clock():
                del self._tokens[key]
                return None
            return cached.token

    def put(self, key: tuple[str, str, str], token: str, expires_in: float) -> None:
        lifetime = max(expires_in - TOKEN_MARGIN_SECONDS, 0.0)
        with self._lock:
            now = self._clock()
            self._tokens = {k: v for k, v in self._tokens.items() if v.expires > now}
            if lifetime > 0:
                self._tokens[key] = CachedToken(token, now + lifetime)


def token_from(body: bytes, realm: str) -> tuple[str, float]:
    """(token, seconds it lives) from a token server's JSON answer."""
    try:
        document = json.loads(body)
        token = document.get("token") or document.get("access_token")
        expires_in = document.get("expires_in", DEFAULT_TOKEN_SECONDS)
    except (ValueError, AttributeError):
        token, expires_in = None, None
    if not isinstance(token, str) or not token:
        raise FailedPrecondition(f"token server {realm} answered without a token")
    if isinstance(expires_in, bool) or not isinstance(expires_in, int | float):
        expires_in = DEFAULT_TOKEN_SECONDS
    return token, float(expires_in)
