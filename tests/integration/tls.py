"""Test certificates for the TCP listener's mutual TLS, made with the openssl command (Debian's
openssl package; python's `cryptography` is not a dependency)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import grpc

from tests.conftest import require

EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True)
class Certificates:
    ca: Path  # signs the service's certificate and the clients it accepts
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # a client certificate from another CA
    stranger_key: Path

    def service_config(self, listen: str) -> str:
        return (
            f'listen = "{listen}"\ntls_cert = "{self.server_cert}"\n'
            f'tls_key = "{self.server_key}"\ntls_client_ca = "{self.ca}"\n'
        )

    def channel(self, target: str, *, cert: Path | None, key: Path | None) -> grpc.Channel:
        """A TLS channel that trusts our CA and shows `cert` (or no client certificate)."""
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes(),
            private_key=key.read_bytes() if key else None,
            certificate_chain=cert.read_bytes() if cert else None,
        )
        return grpc.secure_channel(target, credentials)


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def _ca(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _openssl(
        "req", "-x509", *EC_KEY, "-keyout", key, "-out", cert, "-days", "2",
        "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return cert, key


def _signed(
    directory: Path, name: str, ca: tuple[Path, Path], extensions: str
) -> tuple[Path, Path]:
    cert, key, request = (directory / f"{name}.{ext}" for ext in ("pem", "key", "csr"))
    extfile = directory / f"{name}.ext"
    extfile.write_text(extensions)
    _openssl("req", *EC_KEY, "-keyout", key, "-out", request, "-subj", f"/CN={name}")
    _openssl(
        "x509", "-req", "-in", request, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
        "-out", cert, "-days", "2", "-extfile", extfile,
    )  # fmt: skip
    return cert, key


def make_certificates(directory: Path) -> Certificates:
    require(shutil.which("openssl") is not None, "needs the openssl command (Debian: openssl)")
    directory.mkdir(parents=True, exist_ok=True)
    ca = _ca(directory, "ca")
    server = _signed(
        directory,
        "server",
        ca,
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    client = _signed(directory, "client", ca, "extendedKeyUsage=clientAuth\n")
    stranger = _signed(
        directory, "stranger", _ca(directory, "other-ca"), "extendedKeyUsage=clientAuth\n"
    )
    return Certificates(ca[0], *server, *client, *stranger)
