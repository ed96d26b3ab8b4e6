"""The CRI ImageService on a real image store, served by a real grpc.aio server on a unix socket
and driven through the CRI's own stubs, pulling from a real registry (Debian's docker-registry
on 127.0.0.1) images built here: the shapes critest's Image Manager specs pull."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from adapter.core.errors import InvalidArgument
from adapter.cri.api import cri, cri_grpc
from adapter.cri.images import CriImageService, disk_usage
from adapter.images import ImageStore
from adapter.images.busybox import compact_json, gzip_fixed, host_architecture
from adapter.images.image import OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST
from adapter.images.leases import ImageUse
from tests.image_fixtures import local_registry  # noqa: F401
from tests.images import Entry, digest, push_manifest, tar_bytes, write_oci_layout

pytestmark = pytest.mark.integration

PASSWD = b"root:x:0:0:root:/root:/bin/sh\nwww-data:x:33:33:www-data:/var/www:/bin/sh\n"
USERS = {  # repository -> the image config's User, as in cri-tools' image-user images
    "user-uid": "1002",
    "user-username": "www-data",
    "user-uid-group": "1003:1004",
    "user-username-group": "www-data:1004",
}


@dataclass(frozen=True)
class Pushed:
    """One image in the registry: its config (the CRI id), manifest and blob sizes."""

    config: str
    manifest: str
    size: int

    @property
    def bare_id(self) -> str:
        return self.config.removeprefix("sha256:")


@dataclass(frozen=True)
class Registry:
    """What the module pushed: `name(repo)` is host:port/<namespace>/repo."""

    address: str
    namespace: str
    shared: Pushed  # test-image-tag:{test,all}, test-image-latest:latest, test-image-tags:{1,2,3}
    distinct: tuple[Pushed, ...]  # test-image-{1,2,3}:latest, one image each
    users: dict[str, Pushed]  # USERS' repositories, :latest

    def name(self, repository: str) -> str:
        return f"{self.address}/{self.namespace}/{repository}"


def layer_of(marker: str) -> bytes:
    """A small layer: /etc/passwd with root and www-data, and a file that tells images apart."""
    return tar_bytes(
        [
            Entry("etc", "dir", mode=0o755),
            Entry("etc/passwd", data=PASSWD),
            Entry(marker, data=marker.encode()),
        ]
    )


def push(
    address: str, repository: str, tags: tuple[str, ...], marker: str, user: str = ""
) -> Pushed:
    layer = layer_of(marker)
    compressed = gzip_fixed(layer)
    settings: dict[str, object] = {"Cmd": ["sh"], **({"User": user} if user else {})}
    config = compact_json(
        {
            "architecture": host_architecture(),
            "os": "linux",
            "config": settings,
            "rootfs": {"type": "layers", "diff_ids": [digest(layer)]},
        }
    )
    manifest = compact_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": digest(config), "size": len(config)},
            "layers": [
                {"mediaType": OCI_LAYER_GZIP, "digest": digest(compressed), "size": len(compressed)}
            ],
        }
    )
    for tag in tags:
        push_manifest(address, repository, tag, manifest, [config, compressed])
    return Pushed(digest(config), digest(manifest), len(manifest) + len(config) + len(compressed))


@pytest.fixture(scope="module")
def registry(local_registry: str) -> Registry:  # noqa: F811
    namespace = f"cri-{uuid.uuid4().hex[:8]}"  # the registry is shared by the whole session

    def at(repository: str) -> str:
        return f"{namespace}/{repository}"

    shared = push(local_registry, at("test-image-tag"), ("test", "all"), "shared")
    push(local_registry, at("test-image-latest"), ("latest",), "shared")
    push(local_registry, at("test-image-tags"), ("1", "2", "3"), "shared")
    distinct = tuple(
        push(local_registry, at(f"test-image-{i}"), ("latest",), f"test-{i}") for i in (1, 2, 3)
    )
    users = {
        repository: push(local_registry, at(repository), ("latest",), "shared", user)
        for repository, user in USERS.items()
    }
    return Registry(local_registry, namespace, shared, distinct, users)


@dataclass
class Node:
    store: ImageStore
    images: cri_grpc.ImageServiceStub
    # What the core would tell the store: container id -> the image it runs on.
    containers: dict[str, ImageUse]

    async def pull(self, reference: str) -> str:
        request = cri.PullImageRequest(image=cri.ImageSpec(image=reference))
        reply = await self.images.PullImage(request, timeout=60)
        return str(reply.image_ref)

    async def status(self, reference: str, verbose: bool = False) -> cri.ImageStatusResponse:
        request = cri.ImageStatusRequest(image=cri.ImageSpec(image=reference), verbose=verbose)
        return await self.images.ImageStatus(request, timeout=10)

    async def remove(self, reference: str) -> None:
        request = cri.RemoveImageRequest(image=cri.ImageSpec(image=reference))
        await self.images.RemoveImage(request, timeout=10)

    async def list(self, reference: str = "") -> list[cri.Image]:
        request = cri.ListImagesRequest(
            filter=cri.ImageFilter(image=cri.ImageSpec(image=reference))
        )
        return list((await self.images.ListImages(request, timeout=10)).images)


@pytest.fixture
def short_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory whose path is short enough for a unix socket (108 bytes)."""
    return tmp_path_factory.mktemp("cri")


@pytest.fixture
async def node(short_dir: Path) -> AsyncIterator[Node]:
    """A store of its own behind the servicer on a real gRPC server, and a CRI client of it."""
    containers: dict[str, ImageUse] = {}
    store = ImageStore(short_dir / "images", containers=lambda: dict(containers))
    async with served(store, short_dir) as images:
        yield Node(store, images, containers)


@contextlib.asynccontextmanager
async def served(store: ImageStore, directory: Path) -> AsyncIterator[cri_grpc.ImageServiceStub]:
    server = grpc.aio.server()
    cri_grpc.add_ImageServiceServicer_to_server(CriImageService(store), server)
    address = f"unix://{directory / 'cri.sock'}"
    server.add_insecure_port(address)
    await server.start()
    channel = grpc.aio.insecure_channel(address)
    try:
        yield cri_grpc.ImageServiceStub(channel)
    finally:
        await channel.close()
        await server.stop(None)


async def expect_error(call: Awaitable[object], code: grpc.StatusCode, *words: str) -> str:
    """Await `call`, which must fail with `code` and a message holding every one of `words`."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    assert raised.value.code() == code, raised.value.details()
    details = str(raised.value.details())
    assert all(word in details for word in words), details
    return details


# ---- pull, status, remove ----


async def test_pull_by_tag_status_and_remove(node: Node, registry: Registry) -> None:
    reference = f"{registry.name('test-image-tag')}:test"
    assert await node.pull(reference) == registry.shared.config  # the image id
    image = (await node.status(reference)).image
    assert image.id == registry.shared.config
    assert list(image.repo_tags) == [reference]
    assert list(image.repo_digests) == [
        f"{registry.name('test-image-tag')}@{registry.shared.manifest}"
    ]
    assert image.size == registry.shared.size
    assert image.spec.image == image.id
    assert not image.HasField("uid") and image.username == ""
    await node.remove(reference)
    assert not (await node.status(reference)).HasField("image")
    assert node.store.list() == []


async def test_pull_without_tag_is_latest(node: Node, registry: Registry) -> None:
    name = registry.name("test-image-latest")
    await node.pull(name)
    image = (await node.status(name)).image
    assert list(image.repo_tags) == [f"{name}:latest"]
    assert (await node.status(f"{name}:latest")).image == image
    await node.remove(image.id)
    assert not (await node.status(name)).HasField("image")


async def test_pull_by_digest_has_no_tag(node: Node, registry: Registry) -> None:
    reference = f"{registry.name('test-image-tag')}@{registry.shared.manifest}"
    assert await node.pull(reference) == registry.shared.config
    image = (await node.status(reference)).image
    assert list(image.repo_tags) == []
    assert list(image.repo_digests) == [reference]
    await node.remove(reference)
    assert not (await node.status(reference)).HasField("image")


async def test_status_by_every_kind_of_reference(node: Node, registry: Registry) -> None:
    """The same status whichever name asks: each tag, each repo digest, the id, its bare hex;
    and removing by one tag removes the image with all its tags."""
    tags = [f"{registry.name('test-image-tags')}:{tag}" for tag in ("1", "2", "3")]
    tags.append(f"{registry.name('test-image-tag')}:all")
    ids = {await node.pull(tag) for tag in tags}
    assert ids == {registry.shared.config}
    status = (await node.status(tags[0])).image
    assert list(status.repo_tags) == sorted(tags)
    assert list(status.repo_digests) == sorted(
        f"{registry.name(repository)}@{registry.shared.manifest}"
        for repository in ("test-image-tags", "test-image-tag")
    )
    pinned = f"{registry.name('test-image-tags')}:2@{registry.shared.manifest}"
    names = [*status.repo_tags, *status.repo_digests, status.id, registry.shared.bare_id, pinned]
    for name in names:
        assert (await node.status(name)).image == status, name
    assert len(await node.list()) == 1
    await node.remove(tags[2])
    for name in names:
        assert not (await node.status(name)).HasField("image"), name


async def test_docker_hub_short_names(node: Node, short_dir: Path) -> None:
    """Names are normalised as Docker does: `busybox` is docker.io/library/busybox:latest (an
    import: nothing may reach Docker Hub from a test)."""
    tarball = write_oci_layout(short_dir / "hub.tar", [layer_of("hub")], "busybox:latest")
    await node.store.import_tarball(tarball)
    image = (await node.status("busybox")).image
    assert list(image.repo_tags) == ["docker.io/library/busybox:latest"]
    for name in ("library/busybox", "docker.io/library/busybox:latest", "busybox:latest"):
        assert (await node.status(name)).image == image, name
    await node.remove("busybox")
    assert node.store.list() == []


async def test_image_user_is_uid_or_username(node: Node, registry: Registry) -> None:
    expected = {  # Kubernetes' rule: the user part (before ':') is a uid when it is an integer
        "user-uid": (1002, ""),
        "user-username": (None, "www-data"),
        "user-uid-group": (1003, ""),
        "user-username-group": (None, "www-data"),
    }
    for repository, (uid, username) in expected.items():
        reference = registry.name(repository)
        assert await node.pull(reference) == registry.users[repository].config
        image = (await node.status(reference)).image
        assert image.HasField("uid") == (uid is not None), repository
        assert (image.uid.value if uid is not None else None) == uid, repository
        assert image.username == username, repository


async def test_verbose_status_has_the_image_config(node: Node, registry: Registry) -> None:
    reference = registry.name("user-username-group")
    await node.pull(reference)
    assert dict((await node.status(reference)).info) == {}
    reply = await node.status(reference, verbose=True)
    info = json.loads(reply.info["info"])
    assert info["id"] == reply.image.id
    assert info["imageSpec"]["config"]["User"] == "www-data:1004"
    assert info["imageSpec"]["rootfs"]["type"] == "layers"


async def test_pull_with_credentials_pulls_anonymously(node: Node, registry: Registry) -> None:
    reference = f"{registry.name('test-image-tag')}:test"
    auth = cri.AuthConfig(username="someone", password="secret", server_address=registry.address)
    request = cri.PullImageRequest(image=cri.ImageSpec(image=reference), auth=auth)
    reply = await node.images.PullImage(request, timeout=60)
    assert reply.image_ref == registry.shared.config


async def test_pull_of_a_missing_image_is_not_found(node: Node, registry: Registry) -> None:
    await expect_error(
        node.pull(f"{registry.name('test-image-tag')}:no-such-tag"),
        grpc.StatusCode.NOT_FOUND,
        "no-such-tag",
    )
    assert node.store.list() == []


async def test_pull_through_a_registry_mirror(short_dir: Path, registry: Registry) -> None:
    """critest names its images gcr.io/k8s-staging-cri-tools/...: a mirror of gcr.io on the
    local registry serves them, and the images keep their gcr.io names. Only the mirror is
    contacted (a pull from gcr.io itself would fail here)."""
    store = ImageStore(short_dir / "images", mirrors={"gcr.io": registry.address})
    async with served(store, short_dir) as images:
        node = Node(store, images, {})
        reference = f"gcr.io/{registry.namespace}/test-image-tag:test"
        assert await node.pull(reference) == registry.shared.config
        assert list((await node.status(reference)).image.repo_tags) == [reference]


@pytest.mark.parametrize(
    "mirrors", [{"gcr.io": "http://127.0.0.1:5000"}, {"gcr.io/path": "127.0.0.1"}, {"": "x"}]
)
def test_a_malformed_mirror_is_refused(short_dir: Path, mirrors: dict[str, str]) -> None:
    with pytest.raises(InvalidArgument, match=r"^images\.mirrors: "):
        ImageStore(short_dir / "images", mirrors=mirrors)


# ---- list ----


async def test_list_three_images_and_filter(node: Node, registry: Registry) -> None:
    names = [f"{registry.name(f'test-image-{i}')}:latest" for i in (1, 2, 3)]
    ids = [await node.pull(name) for name in names]
    assert ids == [pushed.config for pushed in registry.distinct]
    listed = {image.id: list(image.repo_tags) for image in await node.list()}
    assert listed == {image_id: [name] for image_id, name in zip(ids, names, strict=True)}
    for name, image_id in zip(names, ids, strict=True):
        assert [image.id for image in await node.list(name)] == [image_id]
        assert [image.id for image in await node.list(image_id)] == [image_id]
    assert await node.list(f"{registry.name('test-image-tag')}:test") == []
    for name in names:
        await node.remove(name)
    assert await node.list() == []


async def test_one_image_with_three_tags_is_listed_once(node: Node, registry: Registry) -> None:
    tags = [f"{registry.name('test-image-tags')}:{tag}" for tag in ("3", "1", "2")]
    ids = {await node.pull(tag) for tag in tags}
    [image] = await node.list()
    assert ids == {image.id}
    assert list(image.repo_tags) == sorted(tags)


# ---- remove ----


async def test_remove_of_an_image_in_use_is_refused(node: Node, registry: Registry) -> None:
    """A container runs on one tag: removing the image (by any name) is refused and keeps every
    tag; once the container is gone, the image goes."""
    tags = [f"{registry.name('test-image-tags')}:{tag}" for tag in ("1", "2")]
    for tag in tags:
        await node.pull(tag)
    node.containers["web"] = ImageUse(reference=tags[0], launching=False)
    assert node.store.users(tags[0]) == ["web"]
    for name in (registry.shared.config, tags[1]):
        await expect_error(node.remove(name), grpc.StatusCode.FAILED_PRECONDITION, "in use", "web")
    assert list((await node.status(tags[1])).image.repo_tags) == tags
    del node.containers["web"]
    await node.remove(tags[1])
    assert await node.list() == []


async def test_remove_is_idempotent(node: Node, registry: Registry) -> None:
    reference = registry.name("test-image-latest")
    image_id = await node.pull(reference)
    await node.remove(image_id)
    for name in (reference, image_id, registry.shared.bare_id, "never-pulled:1"):
        await node.remove(name)  # absent: no error
    assert await node.list() == []


# ---- bad input ----


@pytest.mark.parametrize("name", ["", "UPPER/Case", "name:bad tag", " spaced", "a" * 600])
async def test_bad_references_name_the_field(node: Node, name: str) -> None:
    await expect_error(node.status(name), grpc.StatusCode.INVALID_ARGUMENT, "image.image")
    await expect_error(node.remove(name), grpc.StatusCode.INVALID_ARGUMENT, "image.image")
    await expect_error(node.pull(name), grpc.StatusCode.INVALID_ARGUMENT, "image.image")
    if name:  # an empty filter lists everything
        await expect_error(node.list(name), grpc.StatusCode.INVALID_ARGUMENT, "filter.image.image")


async def test_an_image_id_cannot_be_pulled(node: Node, registry: Registry) -> None:
    await expect_error(
        node.pull(registry.shared.config), grpc.StatusCode.INVALID_ARGUMENT, "image.image", "id"
    )


# ---- the store's filesystem ----


def du(root: Path, *options: str) -> int:
    output = subprocess.run(
        ["du", "-s", "-x", *options, str(root)], capture_output=True, text=True, check=True
    ).stdout
    return int(output.split()[0])


async def test_image_fs_info_is_what_du_counts(node: Node, registry: Registry) -> None:
    root = node.store.layout.root
    before = time.time_ns()
    reply = await node.images.ImageFsInfo(cri.ImageFsInfoRequest(), timeout=30)
    [empty] = reply.image_filesystems
    assert empty.fs_id.mountpoint == str(root)
    assert before <= empty.timestamp <= time.time_ns()
    await node.pull(registry.name("test-image-latest"))
    reply = await node.images.ImageFsInfo(cri.ImageFsInfoRequest(), timeout=30)
    [usage] = reply.image_filesystems
    assert usage.used_bytes.value == du(root, "-B1") > empty.used_bytes.value
    assert usage.inodes_used.value == du(root, "--inodes") > empty.inodes_used.value


@pytest.fixture
def tree_with_links(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A tree whose symlinks point at a big directory beside it, and a hard link in it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "big").write_bytes(b"x" * (1 << 20))
    root = tmp_path / "root"
    (root / "dir").mkdir(parents=True)
    (root / "dir" / "file").write_bytes(b"y" * 10000)
    (root / "dir" / "hardlink").hardlink_to(root / "dir" / "file")
    (root / "to-outside").symlink_to(outside)
    (root / "dir" / "to-big").symlink_to(outside / "big")
    yield root, outside


def test_disk_usage_never_follows_symlinks(tree_with_links: tuple[Path, Path]) -> None:
    root, _ = tree_with_links
    used, inodes = disk_usage(root)
    assert inodes == 5  # root, dir, the file (linked twice), two symlinks
    assert (used, inodes) == (du(root, "-B1"), du(root, "--inodes"))
    assert used < 1 << 20  # the big file outside is not counted
