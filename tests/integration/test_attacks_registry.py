"""Attacks by a registry on a pull (adapter/images/registry.py), over real loopback sockets: an
endless body on a 404, a 401 and a redirect; a huge manifest; a redirect to another host when
the pull has credentials; the credentials never in an error, a log line or the image store."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.server
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from adapter.core.errors import ContainerizerError, InvalidArgument
from adapter.images import ImageStore
from adapter.images.auth import Credentials
from adapter.images.image import MAX_JSON_BLOB
from tests.registry_servers import threaded_server

pytestmark = pytest.mark.integration

SECRET = "atk-Secr3t-pw"
ENDLESS_CAP = 256 << 20  # what an endless body stops at, so that a regression still ends
CHUNK = b"x" * 65536


@dataclass
class Seen:
    """What the hostile servers saw and sent."""

    sent: dict[str, int] = field(default_factory=dict)
    headers: list[dict[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def hostile(seen: Seen, other_host: str = "") -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            with seen.lock:
                seen.headers.append(dict(self.headers))
            if self.path == "/v2/":
                self.endless(200)
            elif "notfound" in self.path:
                self.endless(404)
            elif "unauthorized" in self.path:
                self.endless(401, [("WWW-Authenticate", 'Basic realm="r"')])
            elif "redirect" in self.path:
                self.endless(302, [("Location", f"/v2/x/manifests/notfound{len(seen.headers)}")])
            elif "elsewhere" in self.path and "Authorization" not in self.headers:
                self.respond(401, b"{}", [("WWW-Authenticate", 'Basic realm="r"')])
            elif "elsewhere" in self.path:
                self.respond(302, b"", [("Location", f"http://{other_host}/v2/x/manifests/a")])
            elif "huge" in self.path:
                self.respond(200, b"{" + b" " * (MAX_JSON_BLOB + 10) + b"}", [])
            else:
                self.respond(404, b"{}", [])

        def respond(self, status: int, body: bytes, headers: list[tuple[str, str]]) -> None:
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def endless(self, status: int, headers: list[tuple[str, str]] | None = None) -> None:
            self.send_response(status)
            for name, value in headers or []:
                self.send_header(name, value)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            sent = 0
            with contextlib.suppress(OSError):
                while sent < ENDLESS_CAP:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(CHUNK), CHUNK))
                    sent += len(CHUNK)
            with seen.lock:
                seen.sent[self.path] = sent
            self.close_connection = True

    return Handler


@pytest.fixture
def registry() -> Iterator[tuple[str, Seen]]:
    seen = Seen()
    with threaded_server(hostile(seen), "127.0.0.1") as address:
        yield address, seen


def pull(root: Path, reference: str, credentials: Credentials | None = None) -> None:
    asyncio.run(ImageStore(root).pull(reference, credentials=credentials))


@pytest.mark.parametrize("tag", ["notfound", "unauthorized", "redirect"])
def test_an_endless_error_body_is_not_read_to_its_end(
    tmp_path: Path, registry: tuple[str, Seen], tag: str
) -> None:
    address, seen = registry
    with pytest.raises(ContainerizerError):
        pull(tmp_path / "images", f"{address}/x:{tag}", Credentials("puller", SECRET))
    assert seen.sent, "the hostile registry answered nothing"
    assert max(seen.sent.values()) < 32 << 20, seen.sent  # socket buffers, not the body


def test_a_huge_manifest_is_refused_at_the_limit(
    tmp_path: Path, registry: tuple[str, Seen]
) -> None:
    address, _ = registry
    with pytest.raises(InvalidArgument, match=f"more than {MAX_JSON_BLOB} bytes"):
        pull(tmp_path / "images", f"{address}/x:huge")


def test_a_redirect_to_another_host_carries_no_credentials_and_nothing_keeps_the_secret(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The registry wants Basic auth (the first request has it after the 401); it redirects
    to another host, which must see no Authorization. The secret appears in no error, log
    record or file of the image store."""
    caplog.set_level(logging.DEBUG)
    other_seen, front_seen = Seen(), Seen()
    with (
        threaded_server(hostile(other_seen), "127.0.0.2") as other,
        threaded_server(hostile(front_seen, other), "127.0.0.1") as front,
    ):
        root = tmp_path / "images"
        with pytest.raises(ContainerizerError) as raised:
            pull(root, f"{front}/x:elsewhere", Credentials("puller", SECRET))
    basic = "Basic " + base64.b64encode(f"puller:{SECRET}".encode()).decode()
    assert other_seen.headers, "the redirect was not followed"
    assert all("Authorization" not in h for h in other_seen.headers)
    assert basic in [h.get("Authorization") for h in front_seen.headers]
    assert SECRET not in str(raised.value) and SECRET not in caplog.text
    encoded = base64.b64encode(f"puller:{SECRET}".encode())
    for path in root.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert SECRET.encode() not in content and encoded not in content, path
