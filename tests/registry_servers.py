"""Registries that want credentials, for the registry-auth tests: Debian's docker-registry with
htpasswd (bcrypt, from apache2-utils' htpasswd) behind a self-signed TLS certificate made here,
the same registry with Docker token auth whose tokens a token server of ours signs (RS256 with
openssl, the certificate in the JWT's x5c header and in the registry's rootcertbundle), and a
small front that demands Basic auth and redirects blob GETs to a blob server on another host.

Each registry that wants credentials shares the storage directory of an open one on plain HTTP,
so tests push there with tests/images.py's push_image and pull here.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import http.server
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import require
from tests.image_fixtures import free_loopback_port, registry_answers

USERNAME = "puller"
PASSWORD = "s3cret-Pa55"  # a test secret: asserted absent from every error message
SERVICE = "test-registry"
ISSUER = "test-token-issuer"
START_SECONDS = 20


def make_certificate(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, and its key (PEM files)."""
    certificate, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout", str(key), "-out", str(certificate),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return certificate, key


def htpasswd_file(path: Path, username: str, password: str) -> Path:
    binary = shutil.which("htpasswd")
    require(binary is not None, "htpasswd missing: apt-get install apache2-utils")
    assert binary is not None
    # -i: the password from stdin, not the command line; -B: bcrypt, which the registry wants.
    subprocess.run([binary, "-iBc", str(path), username], input=password.encode(), check=True)
    return path


def listening(address: str) -> bool:
    host, _, port = address.rpartition(":")
    with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=1):
        return True
    return False


@contextlib.contextmanager
def docker_registry(workdir: Path, storage: Path, http: dict[str, Any], auth: Any) -> Iterator[str]:
    """A docker-registry on 127.0.0.1 serving `storage` with these `http` and `auth` settings;
    stopped (terminate, then kill) at the end."""
    binary = shutil.which("docker-registry")
    require(binary is not None, "docker-registry missing: apt-get install docker-registry")
    assert binary is not None
    address = f"127.0.0.1:{free_loopback_port()}"
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "warn"},
        "storage": {"filesystem": {"rootdirectory": str(storage)}},
        "http": {"addr": address, **http},
    }
    if auth is not None:
        config["auth"] = auth
    name = uuid.uuid4().hex[:8]
    (workdir / f"{name}.yml").write_text(json.dumps(config))  # JSON is YAML
    log_path = workdir / f"{name}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [binary, "serve", str(workdir / f"{name}.yml")],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + START_SECONDS
        while not listening(address):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"registry did not start:\n{log_path.read_text()}")
            time.sleep(0.05)
        yield address
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def open_registry(workdir: Path, storage: Path) -> Iterator[str]:
    """The plain-HTTP registry without auth that tests push to."""
    with docker_registry(workdir, storage, {}, None) as address:
        deadline = time.monotonic() + START_SECONDS
        while not registry_answers(address) and time.monotonic() < deadline:
            time.sleep(0.05)
        yield address


@contextlib.contextmanager
def threaded_server(handler: type[http.server.BaseHTTPRequestHandler], host: str) -> Iterator[str]:
    """An http.server on `host` and a free port in a thread; its host:port."""
    server = http.server.ThreadingHTTPServer((host, 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class TokenServer:
    """Docker token auth's token endpoint: Basic credentials in, a signed JWT out."""

    certificate: Path
    key: Path
    username: str = USERNAME
    password: str = PASSWORD
    issued: list[str] = field(default_factory=list)  # the scope of each token issued
    refused: int = 0
    lifetime: int = 300

    def sign(self, scope: str, subject: str) -> str:
        der = subprocess.run(
            ["openssl", "x509", "-in", str(self.certificate), "-outform", "DER"],
            check=True,
            capture_output=True,
        ).stdout
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}
        resource_type, name, actions = scope.split(":", 2) if scope else ("", "", "")
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "sub": subject,
            "aud": SERVICE,
            "exp": now + self.lifetime,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": [{"type": resource_type, "name": name, "actions": actions.split(",")}]
            if scope
            else [],
        }
        signing_input = (
            f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        )
        signature = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key)],
            input=signing_input.encode(),
            check=True,
            capture_output=True,
        ).stdout
        return f"{signing_input}.{_b64url(signature)}"

    def handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                expected = (
                    "Basic "
                    + base64.b64encode(f"{server.username}:{server.password}".encode()).decode()
                )
                if self.headers.get("Authorization") != expected:
                    server.refused += 1
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                scope = query.get("scope", [""])[0]
                server.issued.append(scope)
                body = json.dumps(
                    {"token": server.sign(scope, server.username), "expires_in": server.lifetime}
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        return Handler


@dataclass
class RedirectingFront:
    """Demands Basic auth, serves manifests from `upstream` (an open registry) and answers blob
    GETs with a redirect to the blob server at `blobs`, which records what it was sent."""

    upstream: str
    blobs: str = ""
    blob_headers: list[dict[str, str]] = field(default_factory=list)

    def front_handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        front = self
        expected = "Basic " + base64.b64encode(f"{USERNAME}:{PASSWORD}".encode()).decode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.headers.get("Authorization") != expected:
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="front"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif "/blobs/" in self.path:
                    self.send_response(307)
                    self.send_header("Location", f"http://{front.blobs}{self.path}?signed=1")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                else:
                    _forward(self, front.upstream, self.path)

            def log_message(self, *args: Any) -> None:
                pass

        return Handler

    def blob_handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        front = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                front.blob_headers.append(dict(self.headers.items()))
                _forward(self, front.upstream, self.path.split("?")[0])

            def log_message(self, *args: Any) -> None:
                pass

        return Handler


def _forward(handler: http.server.BaseHTTPRequestHandler, upstream: str, path: str) -> None:
    """Answer with what the open registry answers to GET `path` (no auth there)."""
    connection = http.client.HTTPConnection(upstream, timeout=30)
    try:
        accept = handler.headers.get("Accept")
        connection.request("GET", path, headers={"Accept": accept} if accept else {})
        response = connection.getresponse()
        body = response.read()
        handler.send_response(response.status)
        for name in ("Content-Type", "Docker-Content-Digest"):
            value = response.getheader(name)
            if value:
                handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)
    finally:
        connection.close()
