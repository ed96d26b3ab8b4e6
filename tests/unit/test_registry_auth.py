"""Registry auth without a registry: the [registry] config, credential lookup (config tables,
Docker config.json), WWW-Authenticate parsing, the token cache, and which URLs a registry may
send us to."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from adapter.core.config import RegistryHostOptions, RegistryOptions, parse_config
from adapter.core.errors import ConfigError, InvalidArgument, Unavailable
from adapter.images.auth import (
    Credentials,
    TokenCache,
    configured_credentials,
    decode_auth,
    parse_challenge,
    token_from,
)
from adapter.images.registry import Endpoints, Origin

SECRET = "hunter2-secret"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_registry_tables_parse_with_auth_or_username_and_password() -> None:
    config = parse_config(
        {
            "registry": {
                "docker_config": "/etc/containerizer/docker.json",
                "reg.example:5000": {"auth": b64(f"alice:{SECRET}"), "ca_file": "/etc/ca.pem"},
                "127.0.0.1:5001": {"username": "bob", "password": SECRET, "insecure": False},
            }
        }
    )
    registry = config.registry
    assert registry.docker_config == Path("/etc/containerizer/docker.json")
    assert registry.host("reg.example:5000") == RegistryHostOptions(
        "alice", SECRET, Path("/etc/ca.pem"), None
    )
    assert registry.host("127.0.0.1:5001") == RegistryHostOptions("bob", SECRET, None, False)
    assert SECRET not in repr(config)


@pytest.mark.parametrize(
    ("table", "words"),
    [
        ({"http://reg:5000": {}}, 'registry."http://reg:5000"'),
        ({"reg:5000": {"auth": "not base64!"}}, 'registry."reg:5000".auth'),
        ({"reg:5000": {"auth": b64(f"x:{SECRET}"), "password": SECRET}}, "not both"),
        ({"reg:5000": {"ca_file": "relative.pem"}}, "ca_file"),
        ({"reg:5000": {"insecure": "yes"}}, "insecure: expected a bool"),
        ({"reg:5000": {"token": SECRET}}, "unknown key"),
        ({"docker_config": "relative.json"}, "docker_config"),
    ],
)
def test_bad_registry_tables_name_the_key_and_never_the_secret(
    table: dict[str, object], words: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config({"registry": table})
    assert words in str(raised.value)
    assert SECRET not in str(raised.value)


def test_gc_low_must_not_exceed_high() -> None:
    with pytest.raises(ConfigError, match="gc_low_bytes"):
        parse_config({"images": {"gc_high_bytes": 10, "gc_low_bytes": 20}})
    images = parse_config({"images": {"gc_high_bytes": 20, "gc_low_bytes": 10}}).images
    assert (images.gc_high_bytes, images.gc_low_bytes) == (20, 10)


def test_decode_auth() -> None:
    assert decode_auth(b64("user:pa:ss"), "auth") == ("user", "pa:ss")
    with pytest.raises(InvalidArgument, match=r"^auth: ") as raised:
        decode_auth(b64(f"no-colon-{SECRET}"), "auth")
    assert SECRET not in str(raised.value)


def test_credentials_from_tables_then_docker_config(tmp_path: Path) -> None:
    docker_config = tmp_path / "config.json"
    docker_config.write_text(
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {"auth": b64("hubuser:hubpass")},
                    "https://other.example:5000/v2/": {"identitytoken": "refresh"},
                    "tabled.example": {"auth": b64("ignored:ignored")},
                }
            }
        )
    )
    options = RegistryOptions(
        hosts=(("tabled.example", RegistryHostOptions("alice", "pw")),),
        docker_config=docker_config,
    )
    assert configured_credentials(options, ("tabled.example",)) == Credentials("alice", "pw")
    hub = configured_credentials(options, ("registry-1.docker.io", "docker.io"))
    assert hub == Credentials("hubuser", "hubpass")
    other = configured_credentials(options, ("other.example:5000",))
    assert other.identity_token == "refresh" and other
    assert not configured_credentials(options, ("unknown.example",))
    missing = RegistryOptions(docker_config=tmp_path / "absent.json")
    assert not configured_credentials(missing, ("unknown.example",))


def test_credentials_hide_their_secrets() -> None:
    credentials = Credentials("alice", SECRET, SECRET, SECRET)
    assert SECRET not in repr(credentials) and SECRET not in credentials.describe()
    assert credentials.fingerprint() != Credentials("alice", "other").fingerprint()
    assert SECRET not in credentials.fingerprint()


def test_challenges() -> None:
    bearer = parse_challenge(
        'Bearer realm="https://auth.example/token",service="registry.example",'
        'scope="repository:library/busybox:pull"'
    )
    assert bearer is not None and bearer.scheme == "bearer"
    assert bearer.parameters == {
        "realm": "https://auth.example/token",
        "service": "registry.example",
        "scope": "repository:library/busybox:pull",
    }
    basic = parse_challenge('Basic realm="Registry Realm"')
    assert basic is not None and basic.scheme == "basic"
    assert basic.parameters == {"realm": "Registry Realm"}


def test_token_cache_expires() -> None:
    now = [100.0]
    cache = TokenCache(clock=lambda: now[0])
    key = ("reg:5000", "repository:a:pull", "fingerprint")
    cache.put(key, "token", 60)
    assert cache.get(key) == "token"
    assert cache.get(("reg:5000", "repository:a:pull", "another")) is None
    now[0] += 56  # within the margin before expiry
    assert cache.get(key) is None
    assert token_from(b'{"access_token": "t"}', "realm") == ("t", 60.0)


def test_urls_a_registry_names_never_downgrade_to_plain_http() -> None:
    endpoints = Endpoints(
        RegistryOptions(
            hosts=(
                ("mirror.example:5000", RegistryHostOptions(insecure=True)),
                ("127.0.0.1:5443", RegistryHostOptions(ca_file=Path("/etc/ca.pem"))),
            )
        )
    )
    assert endpoints.origin("127.0.0.1:5000").scheme == "http"  # loopback, as Docker does
    assert endpoints.origin("127.0.0.1:5443").scheme == "https"  # it has a CA: TLS
    assert endpoints.origin("mirror.example:5000").scheme == "http"  # insecure = true
    assert endpoints.origin("registry.example").scheme == "https"
    registry = Origin("https", "registry.example", None)
    origin, target = endpoints.named("https://blobs.example/x?sig=1", registry, "redirect")
    assert (origin, target) == (Origin("https", "blobs.example", None), "/x?sig=1")
    assert endpoints.named("/v2/other", registry, "redirect")[0] == registry
    for url in ("http://blobs.example/x", "file:///etc/passwd", "ftp://x/y", "http://:80/"):
        with pytest.raises(Unavailable):
            endpoints.named(url, registry, "redirect")
