"""Unpacking layers: whiteouts, links, ownership, and every way a layer could write outside its
rootfs or change what lies outside, each refused or made harmless with nothing changed outside
(checked on a canary directory next to the store: content, links, mode, owner) and nothing left
of a half-unpacked rootfs. Images are unpacked when they are imported, so a refusal is the
import's."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from adapter.core.errors import InvalidArgument
from adapter.images import ImageStore
from tests.image_fixtures import ImageFiles, image_files  # noqa: F401
from tests.images import Entry, digest, tar_bytes, write_oci_layout

REFERENCE = "localhost/layers:test"
SECRET = b"the host's secret\n"


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    """A directory outside the store that no layer may touch."""
    directory = tmp_path / "canary"
    directory.mkdir()
    (directory / "secret").write_bytes(SECRET)
    return directory


def canary_state(canary: Path) -> list[tuple[str, int, int, int, int, bytes]]:
    return sorted(
        (
            path.name,
            path.lstat().st_nlink,
            path.lstat().st_mode,
            path.lstat().st_uid,
            path.lstat().st_gid,
            path.read_bytes() if path.is_file() else b"",
        )
        for path in [canary, *canary.rglob("*")]
    )


def store_is_empty(root: Path) -> bool:
    """Nothing of a refused image: no index entry, layer, staging directory or blob."""
    return (
        ImageStore(root).list() == []
        and not list((root / "layers").iterdir())
        and not list((root / "ingest").iterdir())
        and not list((root / "blobs" / "sha256").iterdir())
    )


OPEN_FILES: list[ImageFiles] = []  # the test's `image_files`, for `unpack`


@pytest.fixture(autouse=True)
def _files_of_this_test(image_files: ImageFiles) -> Iterator[None]:  # noqa: F811
    OPEN_FILES.append(image_files)
    yield
    OPEN_FILES.remove(image_files)


async def unpack(tmp_path: Path, layers: Sequence[Sequence[Entry]]) -> Path:
    """The image's files as a container sees them, its layers stacked."""
    tarball = write_oci_layout(
        tmp_path / "image.tar", [tar_bytes(layer) for layer in layers], REFERENCE
    )
    store = ImageStore(tmp_path / "store")
    await store.import_tarball(tarball)
    return await OPEN_FILES[-1](store, REFERENCE)


# `../../../canary` climbs from an unpacked layer (store/layers/<dir>/) to the canary.
# Each case: the layers, and the reason the refusal must give.
HOSTILE_LAYERS = {
    "dot-dot": [[Entry("../../../canary/pwned", data=b"x")]],
    "dot-dot-inside": [[Entry("etc/../../../../canary/pwned", data=b"x")]],
    "absolute": [[Entry("{canary}/pwned", data=b"x")]],
    "symlink-then-write": [
        [Entry("escape", "symlink", link="../../../canary"), Entry("escape/pwned", data=b"x")]
    ],
    "symlink-in-lower-layer": [
        [Entry("escape", "symlink", link="../../../canary")],
        [Entry("escape/pwned", data=b"x")],
    ],
    "absolute-symlink-then-write": [
        [Entry("escape", "symlink", link="{canary}"), Entry("escape/pwned", data=b"x")]
    ],
    "chained-symlinks": [
        [
            Entry("a", "dir", mode=0o755),
            Entry("a/up", "symlink", link=".."),
            Entry("b", "symlink", link="a/up/a/up/.."),
            Entry("b/pwned", data=b"x"),
        ]
    ],
    "hardlink-dot-dot": [[Entry("stolen", "hardlink", link="../../../canary/secret")]],
    "hardlink-absolute": [[Entry("stolen", "hardlink", link="{canary}/secret")]],
    "hardlink-through-symlink": [
        [
            Entry("escape", "symlink", link="../../../canary"),
            Entry("stolen", "hardlink", link="escape/secret"),
        ]
    ],
    "device-node": [[Entry("dev", "dir", mode=0o755), Entry("dev/mem", "chr", mode=0o600)]],
}


REFUSAL = {
    "dot-dot": "has a '..' component",
    "dot-dot-inside": "has a '..' component",
    "absolute": "is an absolute path",
    "symlink-then-write": "goes through a symlink that leaves the rootfs",
    "symlink-in-lower-layer": "goes through a symlink that leaves the rootfs",
    "absolute-symlink-then-write": "goes through the absolute symlink escape",
    "chained-symlinks": "goes through a symlink that leaves the rootfs",
    "hardlink-dot-dot": "'stolen' is a hard link to '../../../canary/secret', outside",
    "hardlink-absolute": "'stolen' is a hard link to",
    "hardlink-through-symlink": "'stolen' goes through a symlink that leaves the rootfs",
    "device-node": "is a device node",
}


@pytest.mark.parametrize("case", sorted(HOSTILE_LAYERS))
async def test_hostile_layers_are_refused(tmp_path: Path, canary: Path, case: str) -> None:
    layers = [
        [
            Entry(
                e.name.replace("{canary}", str(canary)),
                e.kind,
                e.data,
                e.mode,
                e.link.replace("{canary}", str(canary)),
            )
            for e in layer
        ]
        for layer in HOSTILE_LAYERS[case]
    ]
    before = canary_state(canary)
    with pytest.raises(InvalidArgument) as raised:
        await unpack(tmp_path, layers)
    assert raised.value.field == "image"
    assert REFERENCE in str(raised.value) and "layer sha256:" in str(raised.value)
    assert REFUSAL[case] in str(raised.value)
    assert canary_state(canary) == before
    assert not (canary / "pwned").exists()
    assert store_is_empty(tmp_path / "store")  # the half rootfs is gone, and the image


async def test_a_file_replaces_a_hostile_symlink_instead_of_writing_through_it(
    tmp_path: Path, canary: Path
) -> None:
    lower = [
        Entry("etc", "dir", mode=0o755),
        Entry("etc/passwd", "symlink", link="../../../../canary/secret"),
    ]
    upper = [Entry("etc/passwd", data=b"root:x:0:0::/:/bin/sh\n")]
    rootfs = await unpack(tmp_path, [lower, upper])
    assert not (rootfs / "etc" / "passwd").is_symlink()
    assert (rootfs / "etc" / "passwd").read_bytes() == b"root:x:0:0::/:/bin/sh\n"
    assert (canary / "secret").read_bytes() == SECRET


async def test_whiteouts_hide_the_layers_below(tmp_path: Path) -> None:
    lower = [
        Entry("a", "dir", mode=0o755),
        Entry("a/keep", data=b"keep"),
        Entry("a/gone", data=b"gone"),
        Entry("a/sub", "dir", mode=0o755),
        Entry("a/sub/deep", data=b"deep"),
        Entry("b", "dir", mode=0o755),
        Entry("b/old", data=b"old"),
        Entry("b/olddir", "dir", mode=0o755),
        Entry("b/olddir/file", data=b"x"),
        Entry("c", "dir", mode=0o755),
        Entry("c/file", data=b"x"),
    ]
    upper = [
        Entry("a/.wh.gone"),
        Entry("b/new", data=b"new"),  # before the opaque marker: it must survive it
        Entry("b/.wh..wh..opq"),
        Entry(".wh.c"),
    ]
    rootfs = await unpack(tmp_path, [lower, upper])
    assert sorted(p.name for p in (rootfs / "a").iterdir()) == ["keep", "sub"]
    assert (rootfs / "a" / "sub" / "deep").read_bytes() == b"deep"
    assert sorted(p.name for p in (rootfs / "b").iterdir()) == ["new"]
    assert not (rootfs / "c").exists()
    assert not list(rootfs.rglob(".wh.*"))


async def test_relative_symlinks_inside_the_rootfs_are_followed(tmp_path: Path) -> None:
    lower = [
        Entry("usr", "dir", mode=0o755),
        Entry("usr/lib", "dir", mode=0o755),
        Entry("lib", "symlink", link="usr/lib"),
    ]
    upper = [
        Entry("lib/libx.so", data=b"elf"),
        Entry("usr/lib/liby.so", "hardlink", link="lib/libx.so"),
    ]
    rootfs = await unpack(tmp_path, [lower, upper])
    assert (rootfs / "usr" / "lib" / "libx.so").read_bytes() == b"elf"
    assert os.readlink(rootfs / "lib") == "usr/lib"
    assert (rootfs / "usr" / "lib" / "liby.so").stat().st_nlink == 2


async def test_owner_mode_and_missing_parents(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give files other owners")
    layer = [
        Entry("usr/local/bin/tool", data=b"#!/bin/sh\n", mode=0o4755, uid=1000, gid=100),
        Entry("run", "fifo", mode=0o600),
    ]
    rootfs = await unpack(tmp_path, [layer])
    tool = (rootfs / "usr" / "local" / "bin" / "tool").stat()
    assert (tool.st_uid, tool.st_gid, tool.st_mode & 0o7777) == (1000, 100, 0o4755)
    assert (rootfs / "usr" / "local").is_dir()  # created though the layer has no entry for it
    assert (rootfs / "run").is_fifo()


async def test_a_layer_that_differs_from_its_diff_id_is_refused(tmp_path: Path) -> None:
    layer = tar_bytes([Entry("hello", data=b"hi")])
    wrong = digest(b"something else")
    tarball = write_oci_layout(tmp_path / "image.tar", [layer], REFERENCE, diff_ids=[wrong])
    store = ImageStore(tmp_path / "store")
    with pytest.raises(InvalidArgument, match=wrong):
        await store.import_tarball(tarball)
    assert store_is_empty(tmp_path / "store")


# Layers that name a host file through a symlink and then set metadata or remove through it:
# each is unpacked (or refused) without the host file changing mode, owner, content or links.
# `{secret}` is the canary file's absolute path, `../../../canary` climbs to it from a rootfs.
THROUGH_SYMLINK_LAYERS = {
    "hardlink-to-absolute-symlink": [
        [
            Entry("s", "symlink", link="{secret}"),
            Entry("h", "hardlink", link="s", mode=0o4777, uid=0, gid=0),
        ]
    ],
    "hardlink-to-escaping-relative-symlink": [
        [
            Entry("s", "symlink", link="../../../canary/secret"),
            Entry("h", "hardlink", link="s", mode=0o6777, uid=0, gid=0),
        ]
    ],
    "hardlink-to-symlink-of-a-lower-layer": [
        [Entry("etc", "dir", mode=0o755), Entry("etc/s", "symlink", link="{secret}")],
        [Entry("h", "hardlink", link="etc/s", mode=0o4777, uid=0, gid=0)],
    ],
    "symlink-entry-with-a-mode": [[Entry("s", "symlink", link="{secret}", mode=0o4777)]],
    "directory-over-a-symlink": [
        [Entry("d", "symlink", link="{canary}")],
        [Entry("d", "dir", mode=0o777, uid=0, gid=0)],
    ],
    "fifo-over-a-symlink": [
        [Entry("f", "symlink", link="{secret}")],
        [Entry("f", "fifo", mode=0o4777, uid=0, gid=0)],
    ],
    "whiteout-of-a-symlink": [[Entry("s", "symlink", link="{secret}")], [Entry(".wh.s")]],
}


def with_canary(layers: list[list[Entry]], canary: Path) -> list[list[Entry]]:
    def fill(text: str) -> str:
        return text.replace("{secret}", str(canary / "secret")).replace("{canary}", str(canary))

    return [
        [Entry(fill(e.name), e.kind, e.data, e.mode, fill(e.link), e.uid, e.gid) for e in layer]
        for layer in layers
    ]


@pytest.mark.parametrize("case", sorted(THROUGH_SYMLINK_LAYERS))
async def test_metadata_never_follows_a_symlink_out_of_the_rootfs(
    tmp_path: Path, canary: Path, case: str
) -> None:
    (canary / "secret").chmod(0o600)
    if os.geteuid() == 0:
        os.chown(canary / "secret", 4321, 4321)  # so that a chown through the link would show
        os.chown(canary, 4321, 4321)
    before = canary_state(canary)
    await unpack(tmp_path, with_canary(THROUGH_SYMLINK_LAYERS[case], canary))
    assert canary_state(canary) == before
    assert (canary / "secret").read_bytes() == SECRET
    layers = tmp_path / "store" / "layers"  # every layer as stored, the image's files in them
    for path in layers.rglob("*"):  # what is a link stays a link, nothing followed it
        assert path.is_symlink() or os.path.realpath(path).startswith(str(layers))


async def test_a_hardlink_to_a_symlink_links_the_symlink_itself(
    tmp_path: Path, canary: Path
) -> None:
    layer = [
        Entry("s", "symlink", link=str(canary / "secret")),
        Entry("h", "hardlink", link="s", mode=0o4777),
    ]
    rootfs = await unpack(tmp_path, [layer])
    assert (rootfs / "h").is_symlink() and os.readlink(rootfs / "h") == str(canary / "secret")
    assert (rootfs / "h").lstat().st_ino == (rootfs / "s").lstat().st_ino
    assert (canary / "secret").stat().st_nlink == 1


@pytest.mark.parametrize(
    "marker", [".wh.secret", ".wh..wh..opq"], ids=["whiteout", "opaque-marker"]
)
@pytest.mark.parametrize("link", ["{canary}", "../../../canary"], ids=["absolute", "relative"])
async def test_whiteouts_do_not_go_through_a_symlink(
    tmp_path: Path, canary: Path, marker: str, link: str
) -> None:
    layers = [[Entry("d", "symlink", link=link)], [Entry(f"d/{marker}")]]
    before = canary_state(canary)
    with pytest.raises(InvalidArgument, match="goes through"):
        await unpack(tmp_path, with_canary(layers, canary))
    assert canary_state(canary) == before
    assert store_is_empty(tmp_path / "store")
