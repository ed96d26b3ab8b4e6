"""Large files of an uncompressed layer are copied by a thread of their own while the next
entries are made: the layer unpacks exactly as it would one entry after another (a later hard
link's metadata wins, a later entry replaces the file, the byte limit refuses by name, a cut
layer is refused) and nothing, the copying thread included, outlives the unpack. Likewise an
import copies a tarball's large members once every header is read, and a later member of a
name still wins."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import threading
from pathlib import Path

import pytest

from adapter.core.config import ImagesOptions
from adapter.core.errors import InvalidArgument
from adapter.images import ImageStore
from adapter.images.unpack import BACKGROUND_COPIES, BACKGROUND_COPY_SIZE, BackgroundCopies
from tests.image_fixtures import ImageFiles, image_files  # noqa: F401
from tests.images import Entry, digest, image_config, tar_bytes, write_docker_archive, write_tarball

REFERENCE = "localhost/copies:1"
LARGE = BACKGROUND_COPY_SIZE + 1000  # a copy of its own, and not a multiple of a block


def content(seed: int, size: int = LARGE) -> bytes:
    return bytes((seed + n) % 251 for n in range(size))


async def unpack(tmp_path: Path, entries: list[Entry], store: ImageStore | None = None) -> Path:
    """The files of a one-layer docker archive (uncompressed: applied in place)."""
    tarball = write_docker_archive(tmp_path / "image.tar", [tar_bytes(entries)], REFERENCE)
    store = store or ImageStore(tmp_path / "store")
    await store.import_tarball(tarball)
    [layer] = await store.layers(REFERENCE)
    return layer


def no_copier_left() -> bool:
    return not [thread for thread in threading.enumerate() if "layer-copy" in thread.name]


async def test_large_files_are_whole_with_their_own_metadata(tmp_path: Path) -> None:
    count = 2 * BACKGROUND_COPIES + 1  # more than may wait at once
    entries = [Entry("big", "dir", mode=0o755)]
    for n in range(count):
        entries.append(Entry(f"big/{n}", data=content(n), mode=0o600 + n % 2, uid=n, gid=2 * n))
        entries.append(Entry(f"big/{n}.link", "symlink", link=str(n)))
    layer = await unpack(tmp_path, entries)
    for n in range(count):
        path = layer / "big" / str(n)
        assert path.read_bytes() == content(n)
        found = path.stat()
        assert stat.S_IMODE(found.st_mode) == 0o600 + n % 2
        assert (found.st_uid, found.st_gid) == (n, 2 * n)
        assert found.st_mtime == os.stat(layer / "big").st_mtime  # the tar's, for both
        assert os.readlink(layer / "big" / f"{n}.link") == str(n)
    assert no_copier_left()


async def test_a_later_hard_link_sets_the_metadata_of_a_large_file(tmp_path: Path) -> None:
    data = content(1) * 64  # copied for far longer than the next header takes to read
    layer = await unpack(
        tmp_path,
        [
            Entry("big", data=data, mode=0o644, uid=1, gid=1),
            Entry("link", "hardlink", link="big", mode=0o4711, uid=2, gid=3),
        ],
    )
    for name in ("big", "link"):
        found = (layer / name).stat()
        assert (layer / name).read_bytes() == data
        assert (stat.S_IMODE(found.st_mode), found.st_uid, found.st_gid) == (0o4711, 2, 3)
        assert found.st_nlink == 2


async def test_large_files_of_an_upper_layer_and_links_to_the_layer_below(
    tmp_path: Path,
    image_files: ImageFiles,  # noqa: F811
) -> None:
    """Over a layer below, the entries are made in a detached overlay: a hard link to a file
    below copies it up, a file of this layer is copied in the background as in a base layer."""
    lower = [Entry("below", data=content(1), mode=0o644)]
    upper = [
        Entry("above", data=content(2), mode=0o640, uid=5),
        Entry("below-link", "hardlink", link="below", mode=0o600, uid=7),
        Entry("above-link", "hardlink", link="above", mode=0o604, uid=9),
    ]
    layers = [tar_bytes(lower), tar_bytes(upper)]
    tarball = write_docker_archive(tmp_path / "image.tar", layers, REFERENCE)
    store = ImageStore(tmp_path / "store")
    await store.import_tarball(tarball)
    files = await image_files(store, REFERENCE)
    expected = {"below": (1, 0o600, 7), "above": (2, 0o604, 9)}
    for name, (seed, mode, uid) in expected.items():
        for path in (files / name, files / f"{name}-link"):
            assert path.read_bytes() == content(seed)
            assert (stat.S_IMODE(path.stat().st_mode), path.stat().st_uid) == (mode, uid)
    assert no_copier_left()


async def test_a_later_entry_replaces_a_large_file(tmp_path: Path) -> None:
    layer = await unpack(
        tmp_path,
        [
            Entry("first", data=content(1)),
            Entry("second", data=content(2)),
            Entry("first", "symlink", link="second"),
            Entry("second", data=b"small now\n"),
            Entry(".wh.second"),  # hides the layers below only: this layer's file stays
        ],
    )
    assert os.readlink(layer / "first") == "second"
    assert (layer / "second").read_bytes() == b"small now\n"


async def test_a_large_file_over_the_limit_is_refused_by_name(tmp_path: Path) -> None:
    options = ImagesOptions(max_unpacked_bytes=2 * LARGE + 10)
    store = ImageStore(tmp_path / "store", options)
    entries = [Entry(f"f{n}", data=content(n)) for n in range(3)]
    with pytest.raises(InvalidArgument, match="'f2' makes the image unpack to more than"):
        await unpack(tmp_path, entries, store)
    assert list((tmp_path / "store" / "layers").iterdir()) == []
    assert no_copier_left()


async def test_a_layer_cut_in_a_large_file_is_refused(tmp_path: Path) -> None:
    whole = tar_bytes([Entry("small", data=b"x"), Entry("big", data=content(3, 4 * LARGE))])
    tarball = write_docker_archive(tmp_path / "cut.tar", [whole[: 3 * LARGE]], REFERENCE)
    store = ImageStore(tmp_path / "store")
    with pytest.raises(InvalidArgument, match="not a readable tar"):
        await store.import_tarball(tarball)
    assert list((tmp_path / "store" / "layers").iterdir()) == []
    assert no_copier_left()


async def test_a_cancelled_unpack_stops_the_copies_and_leaves_nothing(tmp_path: Path) -> None:
    entries = [Entry(f"f{n}", data=bytes(16 << 20)) for n in range(4)]
    tarball = write_docker_archive(tmp_path / "slow.tar", [tar_bytes(entries)], REFERENCE)
    store = ImageStore(tmp_path / "store")
    unpacking = asyncio.Event()

    def progress(what: str, done: int, total: int, phase: str = "read") -> None:
        if phase == "unpack" and done:
            unpacking.set()

    task = asyncio.create_task(store.import_tarball(tarball, progress))
    await unpacking.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert store.list() == [] and list((tmp_path / "store" / "layers").iterdir()) == []
    assert no_copier_left()


def test_a_failed_copy_is_raised_once_every_copy_has_ended() -> None:
    copies, ended = BackgroundCopies(), []

    def fails() -> None:
        raise OSError(28, "No space left on device")

    copies.submit(lambda: ended.append(1))
    copies.submit(fails)
    copies.submit(lambda: ended.append(3))
    with pytest.raises(OSError, match="No space left"):
        copies.wait()
    assert ended == [1, 3]
    copies.submit(fails)
    copies.close()  # the caller's failure is already on its way: close only ends the thread
    assert copies.copier is not None and no_copier_left()


def test_copies_waiting_are_bounded() -> None:
    copies, go = BackgroundCopies(), threading.Event()
    for _ in range(BACKGROUND_COPIES):
        copies.submit(go.wait)
    one_more = threading.Thread(target=copies.submit, args=(go.wait,))
    one_more.start()
    one_more.join(0.05)
    assert one_more.is_alive()  # it waits for the oldest copy to end
    go.set()
    one_more.join()
    copies.wait()
    copies.close()
    assert no_copier_left()


async def test_a_later_member_of_the_same_name_is_the_one_imported(tmp_path: Path) -> None:
    """Tarball members are staged as they come (small ones) or once every header is read (large
    ones): whichever the sizes, a later member of a name replaces an earlier one, as in tar."""
    layer = tar_bytes([Entry("file", data=b"the later member\n")])
    name = digest(layer).removeprefix("sha256:") + "/layer.tar"
    config = image_config([layer])
    config_name = digest(config).removeprefix("sha256:") + ".json"
    manifest = [{"Config": config_name, "RepoTags": [REFERENCE], "Layers": [name]}]
    files = [("manifest.json", json.dumps(manifest).encode()), (config_name, config)]
    files += [(name, content(9)), (name, layer)]  # a large member first, then the small one
    store = ImageStore(tmp_path / "store")
    await store.import_tarball(write_tarball(tmp_path / "twice.tar", files))
    [files_of_the_layer] = await store.layers(REFERENCE)
    assert (files_of_the_layer / "file").read_bytes() == b"the later member\n"
