"""Pulls from registries that want credentials, against Debian's docker-registry: htpasswd
(bcrypt) Basic auth behind a self-signed TLS certificate made here, and Docker token auth with
tokens from a token server of the test's own that the registry verifies (tests/registry_servers.py).
Also a front that redirects blob GETs to another host, which must get no Authorization header."""

from __future__ import annotations

import base64
import json
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from adapter.api.containerizer.v1 import images_pb2, images_pb2_grpc
from adapter.core.config import RegistryHostOptions, RegistryOptions
from adapter.core.errors import PermissionDenied, Unavailable
from adapter.cri.api import cri, cri_grpc
from adapter.cri.images import CriImageService
from adapter.images import ImageStore
from adapter.images.auth import Credentials
from tests.conftest import BIN, ServiceProcess
from tests.images import busybox_entries, push_image, tar_bytes
from tests.registry_servers import (
    ISSUER,
    PASSWORD,
    SERVICE,
    USERNAME,
    RedirectingFront,
    TokenServer,
    docker_registry,
    htpasswd_file,
    make_certificate,
    open_registry,
    threaded_server,
)

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Registries:
    open: str  # plain HTTP, no auth: where tests push
    tls: str  # HTTPS with the certificate `ca`, htpasswd Basic auth
    ca: Path
    token: str  # plain HTTP (loopback), Docker token auth
    token_server: TokenServer
    front: str  # Basic auth; blobs redirected to front_state.blobs (localhost, another host)
    front_state: RedirectingFront


@pytest.fixture(scope="module")
def registries(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registries]:
    workdir = tmp_path_factory.mktemp("registry-auth")
    storage = workdir / "storage"
    certificate, key = make_certificate(workdir, "registry")
    token_certificate, token_key = make_certificate(workdir, "token-signer")
    htpasswd = htpasswd_file(workdir / "htpasswd", USERNAME, PASSWORD)
    tls = {"tls": {"certificate": str(certificate), "key": str(key)}}
    basic = {"htpasswd": {"realm": "test", "path": str(htpasswd)}}
    tokens = TokenServer(token_certificate, token_key)
    with (
        open_registry(workdir, storage) as open_address,
        docker_registry(workdir, storage, tls, basic) as tls_address,
        threaded_server(tokens.handler(), "127.0.0.1") as token_server_address,
        docker_registry(
            workdir,
            storage,
            {},
            {
                "token": {
                    "realm": f"http://{token_server_address}/token",
                    "service": SERVICE,
                    "issuer": ISSUER,
                    "rootcertbundle": str(token_certificate),
                }
            },
        ) as token_address,
    ):
        front = RedirectingFront(upstream=open_address)
        with (
            threaded_server(front.blob_handler(), "127.0.0.1") as blobs,
            threaded_server(front.front_handler(), "127.0.0.1") as front_address,
        ):
            front.blobs = blobs.replace("127.0.0.1", "localhost")
            yield Registries(
                open_address, tls_address, certificate, token_address, tokens, front_address, front
            )


def pushed(registries: Registries, tag: str = "1") -> tuple[str, str]:
    """(repository, manifest digest) of a new busybox image in the shared storage."""
    repository = f"auth/busybox-{uuid.uuid4().hex[:8]}"
    digest = push_image(registries.open, repository, tag, [tar_bytes(busybox_entries())])
    return repository, digest


def tls_options(registries: Registries, password: str = PASSWORD) -> RegistryOptions:
    table = RegistryHostOptions(USERNAME, password, ca_file=registries.ca)
    return RegistryOptions(hosts=((registries.tls, table),))


# ---- Basic auth over TLS ----


async def test_basic_auth_over_tls_with_the_configured_ca(
    tmp_path: Path, registries: Registries
) -> None:
    repository, digest = pushed(registries)
    store = ImageStore(tmp_path / "images", registries=tls_options(registries))
    image = await store.pull(f"{registries.tls}/{repository}:1")
    assert image.manifest.digest == digest
    assert all(layer.is_dir() for layer in await store.layers(image.reference))


async def test_tls_is_verified_against_the_system_bundle_without_ca_file(
    tmp_path: Path, registries: Registries
) -> None:
    repository, _ = pushed(registries)
    table = RegistryHostOptions(USERNAME, PASSWORD, insecure=False)  # HTTPS, no ca_file
    store = ImageStore(
        tmp_path / "images", registries=RegistryOptions(hosts=((registries.tls, table),))
    )
    with pytest.raises(Unavailable, match="CERTIFICATE_VERIFY_FAILED"):
        await store.pull(f"{registries.tls}/{repository}:1")
    assert store.list() == []


async def test_wrong_or_missing_basic_credentials_are_permission_denied(
    tmp_path: Path, registries: Registries
) -> None:
    repository, _ = pushed(registries)
    reference = f"{registries.tls}/{repository}:1"
    store = ImageStore(tmp_path / "images", registries=tls_options(registries, "not-it"))
    with pytest.raises(PermissionDenied, match=f"refused user '{USERNAME}'") as wrong:
        await store.pull(reference)
    assert "not-it" not in str(wrong.value)
    anonymous = RegistryHostOptions(ca_file=registries.ca)
    store = ImageStore(
        tmp_path / "other", registries=RegistryOptions(hosts=((registries.tls, anonymous),))
    )
    with pytest.raises(PermissionDenied, match="has no credentials"):
        await store.pull(reference)
    # The request's credentials win over the config's (none here).
    image = await store.pull(reference, credentials=Credentials(USERNAME, PASSWORD))
    assert image.reference == reference


async def test_credentials_from_a_docker_config_json(
    tmp_path: Path, registries: Registries
) -> None:
    repository, digest = pushed(registries)
    docker_config = tmp_path / "config.json"
    auth = base64.b64encode(f"{USERNAME}:{PASSWORD}".encode()).decode()
    docker_config.write_text(json.dumps({"auths": {f"https://{registries.tls}": {"auth": auth}}}))
    options = RegistryOptions(
        hosts=((registries.tls, RegistryHostOptions(ca_file=registries.ca)),),
        docker_config=docker_config,
    )
    store = ImageStore(tmp_path / "images", registries=options)
    assert (await store.pull(f"{registries.tls}/{repository}:1")).manifest.digest == digest


# ---- token auth ----


async def test_token_auth_fetches_once_and_reuses_the_token(
    tmp_path: Path, registries: Registries
) -> None:
    repository, digest = pushed(registries, "a")
    push_image(registries.open, repository, "b", [tar_bytes(busybox_entries())])
    store = ImageStore(tmp_path / "images")
    credentials = Credentials(USERNAME, PASSWORD)
    issued = len(registries.token_server.issued)
    image = await store.pull(f"{registries.token}/{repository}:a", credentials=credentials)
    assert image.manifest.digest == digest
    assert registries.token_server.issued[issued:] == [f"repository:{repository}:pull"]
    await store.pull(f"{registries.token}/{repository}:b", credentials=credentials)
    assert len(registries.token_server.issued) == issued + 1  # cached: no second token
    # Another caller without credentials does not get the cached token: the token server
    # refuses it, and that is PermissionDenied naming the token server, not the registry.
    refused = registries.token_server.refused
    with pytest.raises(PermissionDenied, match=r"token server .* refused no credentials"):
        await store.pull(f"{registries.token}/{repository}:b")
    assert registries.token_server.refused == refused + 1


async def test_token_auth_with_a_wrong_password(tmp_path: Path, registries: Registries) -> None:
    repository, _ = pushed(registries)
    store = ImageStore(tmp_path / "images")
    with pytest.raises(PermissionDenied) as raised:
        await store.pull(
            f"{registries.token}/{repository}:1", credentials=Credentials(USERNAME, "wrong-one")
        )
    message = str(raised.value)
    assert f"user '{USERNAME}'" in message and "wrong-one" not in message
    assert store.list() == []


# ---- redirects ----


async def test_a_redirect_to_another_host_gets_no_authorization(
    tmp_path: Path, registries: Registries
) -> None:
    repository, digest = pushed(registries)
    store = ImageStore(tmp_path / "images")
    front = registries.front_state
    seen = len(front.blob_headers)
    image = await store.pull(
        f"{registries.front}/{repository}:1", credentials=Credentials(USERNAME, PASSWORD)
    )
    assert image.manifest.digest == digest
    redirected = front.blob_headers[seen:]
    assert len(redirected) == 2  # the config and the layer, from localhost
    assert all("Authorization" not in headers for headers in redirected)


# ---- through the service's API and the CRI ----


def test_pull_through_the_service_with_config_and_request_credentials(
    tmp_path: Path, registries: Registries
) -> None:
    repository, _ = pushed(registries)
    config = (
        f'[registry."{registries.tls}"]\n'
        f'auth = "{base64.b64encode(f"{USERNAME}:{PASSWORD}".encode()).decode()}"\n'
        f'ca_file = "{registries.ca}"\n'
    )
    service = ServiceProcess(tmp_path, config)
    service.start()
    try:
        with grpc.insecure_channel(service.endpoint) as channel:
            stub = images_pb2_grpc.ImagesStub(channel)
            reference = f"{registries.tls}/{repository}:1"
            messages = list(stub.Pull(images_pb2.PullRequest(reference=reference), timeout=60))
            assert messages[-1].image.reference == reference
            token_reference = f"{registries.token}/{repository}:1"
            wrong = images_pb2.RegistryCredentials(username=USERNAME, password="bad-secret")
            request = images_pb2.PullRequest(reference=token_reference, credentials=wrong)
            with pytest.raises(grpc.RpcError) as raised:
                list(stub.Pull(request, timeout=60))
            assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "bad-secret" not in (raised.value.details() or "")
            right = images_pb2.RegistryCredentials(username=USERNAME, password=PASSWORD)
            request = images_pb2.PullRequest(reference=token_reference, credentials=right)
            assert list(stub.Pull(request, timeout=60))[-1].image.reference == token_reference
            # No container uses either: prune removes both, and what only they had.
            pruned = stub.Prune(images_pb2.PruneImagesRequest(), timeout=30)
            assert sorted(pruned.references) == sorted([reference, token_reference])
            assert pruned.freed_bytes > 0
            assert not stub.List(images_pb2.ListImagesRequest(), timeout=10).images
        # The CLI: the password from stdin, never on the command line; then `images prune`.
        cli = [str(BIN / "containerizer"), "--endpoint", service.endpoint, "images"]
        pull = [*cli, "pull", "--username", USERNAME, "--password-stdin", token_reference]
        done = subprocess.run(
            pull, input=f"{PASSWORD}\n", capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert f"pulled {token_reference}" in done.stdout
        wrong = subprocess.run(pull, input="nope\n", capture_output=True, text=True, timeout=60)
        assert wrong.returncode != 0 and "refused user" in wrong.stderr
        pruned_text = subprocess.run([*cli, "prune"], capture_output=True, text=True, timeout=60)
        assert f"removed {token_reference}" in pruned_text.stdout
    finally:
        service.stop()
        service.remove_cgroup_roots()
    log = service.log_path.read_text()
    assert PASSWORD not in log and "bad-secret" not in log


async def test_cri_pull_image_uses_its_auth_config(tmp_path: Path, registries: Registries) -> None:
    repository, _ = pushed(registries)
    store = ImageStore(tmp_path / "images")
    server = grpc.aio.server()
    cri_grpc.add_ImageServiceServicer_to_server(CriImageService(store), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            images = cri_grpc.ImageServiceStub(channel)
            spec = cri.ImageSpec(image=f"{registries.token}/{repository}:1")
            anonymous = cri.PullImageRequest(image=spec)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await images.PullImage(anonymous, timeout=60)
            assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
            auth = base64.b64encode(f"{USERNAME}:{PASSWORD}".encode()).decode()
            request = cri.PullImageRequest(image=spec, auth=cri.AuthConfig(auth=auth))
            reply = await images.PullImage(request, timeout=60)
            assert reply.image_ref == store.get(spec.image).config.digest
    finally:
        await server.stop(None)
