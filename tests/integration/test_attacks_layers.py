"""Attacks by an image's layers on the store that unpacks them (adapter/images/layers.py,
overlay.py, unpack.py), imported through the service's Images API and run by the native
runtime, on the real kernel. Each hostile tarball is built here.

- A symlink planted in a lower layer (`a -> /etc`, or a relative one climbing out) does not let
  a later layer write through it (`a/passwd`), whiteout through it or mark it opaque.
- Whiteouts named `.wh...` and `.wh.` (of `..` and of nothing) are refused; a whiteout of a
  lower layer's symlink removes the link, not what it names.
- A hard link to a lower layer's file, given another mode and then written through (by the
  layer, then by a container), leaves the lower layer's directory as it was.
- Device nodes are refused, a fake whiteout (a 0/0 character device from the layer) too.
- A setuid-root binary keeps its mode, but a non-root workload that runs it stays itself
  (no_new_privs).
- Two images on one base layer: a container of one writing to the base's files changes neither
  what a container of the other sees nor the base layer's directory.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import subprocess
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.api.containerizer.v1 import images_pb2, images_pb2_grpc
from adapter.images.busybox import BUSYBOX_BINARY as BUSYBOX
from adapter.images.busybox import FIXED_MTIME
from adapter.images.layout import chain_ids, digest_hex
from tests.conftest import ServiceProcess, require, require_root, traversable_by_all
from tests.images import Entry, busybox_entries, digest, tar_bytes, write_oci_layout
from tests.integration.api import destroy, wait

pytestmark = pytest.mark.integration

OPAQUE = "trusted.overlay.opaque"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """A service of this module's own: the tests look at its store's layer directories."""
    require_root()
    require(BUSYBOX.is_file(), f"{BUSYBOX} missing: apt-get install busybox-static")
    process = ServiceProcess(tmp_path_factory.mktemp("layer-attacks"))
    process.start()
    yield process
    process.destroy_all()
    process.stop()
    process.remove_cgroup_roots()


@pytest.fixture
def host_dir(tmp_path: Path) -> Path:
    """A host directory with a file, which no layer may reach."""
    directory = tmp_path / "host"
    directory.mkdir()
    (directory / "passwd").write_text("the host's own\n")
    return directory


def reference(name: str) -> str:
    return f"localhost/{name}-{uuid.uuid4().hex[:8]}:1"


def import_layers(
    node: ServiceProcess, tmp_path: Path, layers: list[bytes], name: str
) -> tuple[str, grpc.RpcError | None]:
    """Import an image of `layers` through the Images API: (reference, the refusal if any)."""
    image = reference(name)
    tarball = write_oci_layout(tmp_path / f"{uuid.uuid4().hex}.tar", layers, image)
    with grpc.insecure_channel(node.endpoint) as channel:
        request = images_pb2.ImportRequest(path=str(tarball))
        try:
            list(images_pb2_grpc.ImagesStub(channel).Import(request, timeout=120))  # type: ignore[no-untyped-call]
        except grpc.RpcError as exc:
            return image, exc
    return image, None


def refused(node: ServiceProcess, tmp_path: Path, layers: list[bytes], why: str) -> str:
    """Import, expecting INVALID_ARGUMENT whose details contain `why`; the details."""
    _, error = import_layers(node, tmp_path, layers, "hostile")
    assert error is not None, "the hostile image was imported"
    details = error.details() or ""
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, details
    assert why in details, details
    return details


def layer_dir(node: ServiceProcess, layers: list[bytes], index: int) -> Path:
    """The store's directory of layers[index] (named by its chain id)."""
    chain = chain_ids([digest(layer) for layer in layers])[index]
    return node.state_dir / "images" / "layers" / digest_hex(chain)


def tree_facts(root: Path) -> dict[str, tuple[int, int, int, int, str]]:
    """Every entry under `root`: mode, owner, group, link count, content or link digest."""
    facts = {}
    for directory, names, files in os.walk(root):
        for name in [*names, *files]:
            path = Path(directory, name)
            info = path.lstat()
            if stat.S_ISREG(info.st_mode):
                content = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                content = os.readlink(path) if stat.S_ISLNK(info.st_mode) else ""
            key = str(path.relative_to(root))
            facts[key] = (info.st_mode, info.st_uid, info.st_gid, info.st_nlink, content)
    return facts


def file_facts(path: Path) -> tuple[int, int, int, int, int, int]:
    info = path.lstat()
    return info.st_ino, info.st_mode, info.st_uid, info.st_gid, info.st_size, info.st_mtime_ns


def host_facts(directory: Path) -> tuple[object, ...]:
    return tree_facts(directory), file_facts(directory)


def run(node: ServiceProcess, container_id: str, image: str, shell: str, user: str = "") -> str:
    reply = node.stub().Launch(
        pb.LaunchRequest(
            container_id=container_id,
            command=pb.CommandInfo(shell=shell, user=user),
            container=pb.ContainerInfo(runtime="native", image=image),
        ),
        timeout=60,
    )
    termination = wait(node.stub(), container_id)
    sandbox = Path(reply.status.sandbox)
    output = (sandbox / "stdout").read_text() + (sandbox / "stderr").read_text()
    destroy(node.stub(), container_id)
    assert termination.exit_code == 0, output
    return output


BASE = tar_bytes(busybox_entries()) if BUSYBOX.is_file() else b""


@pytest.mark.parametrize("absolute", [True, False], ids=["absolute", "climbing"])
def test_a_lower_layers_symlink_leads_no_later_layer_out(
    node: ServiceProcess, tmp_path: Path, host_dir: Path, absolute: bool
) -> None:
    """`a -> HOST` (or `a -> ../../..HOST`) in layer 1; layer 2 writes a/passwd, a/new, whites
    out a/passwd, marks a opaque: each refused, the host directory untouched; a whiteout of `a`
    itself removes the link only."""
    target = str(host_dir) if absolute else "../" * 12 + str(host_dir).lstrip("/")
    lower = tar_bytes([Entry("a", "symlink", link=target), Entry("b", "symlink", link="a")])
    before = host_facts(host_dir)
    attacks = [
        Entry("a/passwd", data=b"owned\n"),
        Entry("b/new", data=b"owned\n"),
        Entry("a/.wh.passwd"),
        Entry("b/.wh..wh..opq"),
        Entry("a/passwd", "hardlink", link="bin/busybox"),
        Entry("a/sub", "dir"),
    ]
    for attack in attacks:
        refused(node, tmp_path, [BASE, lower, tar_bytes([attack])], "symlink")
        assert host_facts(host_dir) == before, attack
    # The same for the host's /etc, named absolutely.
    etc = [Entry("e", "symlink", link="/etc")]
    passwd = file_facts(Path("/etc/passwd"))
    refused(node, tmp_path, [BASE, tar_bytes(etc), tar_bytes([Entry("e/passwd")])], "symlink")
    assert file_facts(Path("/etc/passwd")) == passwd
    # A whiteout of the link itself is fine, and removes only the link.
    layers = [BASE, lower, tar_bytes([Entry(".wh.a")])]
    _, error = import_layers(node, tmp_path, layers, "unlinked")
    assert error is None, error.details()
    assert host_facts(host_dir) == before


def test_a_relative_symlink_inside_the_image_is_followed_in_the_image(
    node: ServiceProcess, tmp_path: Path
) -> None:
    """The positive twin: `a -> etc` in layer 1, `a/extra` in layer 2 lands in the image's etc
    (layer 2's directory holds etc/extra), and opaque through the link marks etc itself; the
    lower layer's etc keeps its files on disk."""
    lower = tar_bytes([Entry("a", "symlink", link="etc")])
    upper = tar_bytes([Entry("a/.wh..wh..opq"), Entry("a/extra", data=b"in the image\n")])
    layers = [BASE, lower, upper]
    _, error = import_layers(node, tmp_path, layers, "inside")
    assert error is None, error.details()
    top = layer_dir(node, layers, 2)
    assert (top / "etc" / "extra").read_text() == "in the image\n"
    assert os.getxattr(top / "etc", OPAQUE) == b"y"
    assert not (top / "a").exists()
    assert (layer_dir(node, layers, 0) / "etc" / "passwd").is_file()


@pytest.mark.parametrize("name", [".wh...", ".wh.", "etc/.wh...", "etc/.wh.", ".wh..wh."])
def test_a_whiteout_of_dot_dot_or_nothing_is_refused(
    node: ServiceProcess, tmp_path: Path, name: str
) -> None:
    layers = [BASE, tar_bytes([Entry(name)])]
    base_before = tree_facts(layer_dir(node, layers, 0))
    refused(node, tmp_path, layers, "malformed whiteout")
    assert tree_facts(layer_dir(node, layers, 0)) == base_before


def test_opaque_then_the_directory_replaced_by_a_symlink_is_no_internal_error(
    node: ServiceProcess, tmp_path: Path, host_dir: Path
) -> None:
    """Layer 2 empties etc (opaque) and then puts a symlink to the host in its place: the
    opaque mark has nothing to go on, nothing is followed, the image imports."""
    before = host_facts(host_dir)
    upper = tar_bytes([Entry("etc/.wh..wh..opq"), Entry("etc", "symlink", link=str(host_dir))])
    layers = [BASE, upper]
    _, error = import_layers(node, tmp_path, layers, "opaque-then-link")
    assert error is None, error.details()
    top = layer_dir(node, layers, 1)
    assert os.readlink(top / "etc") == str(host_dir)
    assert OPAQUE not in os.listxattr(host_dir)
    assert host_facts(host_dir) == before


def test_a_hard_link_to_a_lower_file_written_through_leaves_the_lower_layer(
    node: ServiceProcess, tmp_path: Path, container_id: str
) -> None:
    """Layer 2 hard-links h to layer 1's shared/file with mode 04777 and another owner, writes
    shared/file anew; a container then appends through /h: layer 1's file keeps its content,
    mode, owner and single link."""
    lower = tar_bytes([Entry("shared", "dir", mode=0o755), Entry("shared/file", data=b"base\n")])
    upper = tar_bytes(
        [
            Entry("h", "hardlink", link="shared/file", mode=0o4777, uid=1234, gid=1234),
            Entry("h2", "hardlink", link="h", mode=0o6777),
            Entry("shared/file", data=b"layer two\n", mode=0o600),
        ]
    )
    layers = [BASE, lower, upper]
    image, error = import_layers(node, tmp_path, layers, "hard-link")
    assert error is None, error.details()
    lower_dir = layer_dir(node, layers, 1)
    lower_before = tree_facts(lower_dir)
    assert lower_before["shared/file"][0] == stat.S_IFREG | 0o644
    assert lower_before["shared/file"][1:4] == (0, 0, 1)
    output = run(node, container_id, image, "echo container >> /h; cat /h /shared/file")
    assert output == "base\ncontainer\nlayer two\n", output
    assert tree_facts(lower_dir) == lower_before
    assert (lower_dir / "shared" / "file").read_text() == "base\n"


@pytest.mark.parametrize(
    "entry",
    [Entry("dev/evil", "chr"), Entry("etc/passwd", "chr"), Entry("null", "chr")],
    ids=["in-dev", "over-a-file", "top"],
)
def test_device_nodes_are_refused(node: ServiceProcess, tmp_path: Path, entry: Entry) -> None:
    refused(node, tmp_path, [BASE, tar_bytes([entry])], "device node")


def test_a_whiteout_device_from_a_layer_is_refused(node: ServiceProcess, tmp_path: Path) -> None:
    """A 0/0 character device would hide etc/passwd from the layers below if stored as is."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        info = tarfile.TarInfo("etc/passwd")
        info.type, info.mtime = tarfile.CHRTYPE, FIXED_MTIME
        info.devmajor = info.devminor = 0
        archive.addfile(info)
    refused(node, tmp_path, [BASE, buffer.getvalue()], "device node")


def test_a_device_named_as_a_whiteout_is_only_a_whiteout(
    node: ServiceProcess, tmp_path: Path
) -> None:
    """`etc/.wh.passwd` of type character device deletes etc/passwd; no device of the layer
    is made (only the overlay's own 0/0 whiteout)."""
    layers = [BASE, tar_bytes([Entry("etc/.wh.passwd", "chr")])]
    _, error = import_layers(node, tmp_path, layers, "whiteout-device")
    assert error is None, error.details()
    etc = layer_dir(node, layers, 1) / "etc"
    assert sorted(os.listdir(etc)) == ["passwd"]
    assert (etc / "passwd").lstat().st_rdev == os.makedev(0, 0)


@pytest.fixture(scope="module")
def euid_binary(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A static binary that prints its real and effective uid (busybox drops a setuid
    privilege itself, so it would prove nothing)."""
    require(shutil.which("gcc") is not None, "gcc missing: apt-get install build-essential")
    directory = tmp_path_factory.mktemp("euid")
    source = directory / "euid.c"
    source.write_text(
        "#include <stdio.h>\n#include <unistd.h>\n"
        'int main(void) { printf("uid=%d euid=%d\\n", (int)getuid(), (int)geteuid()); }\n'
    )
    binary = directory / "euid"
    subprocess.run(["gcc", "-static", "-O2", "-o", str(binary), str(source)], check=True)
    return binary.read_bytes()


def test_a_setuid_binary_is_kept_but_gives_no_privilege(
    node: ServiceProcess, tmp_path: Path, container_id: str, euid_binary: bytes
) -> None:
    suid = Entry("bin/euid", data=euid_binary, mode=0o4755, uid=0, gid=0)
    layers = [BASE, tar_bytes([suid])]
    image, error = import_layers(node, tmp_path, layers, "setuid")
    assert error is None, error.details()
    kept = (layer_dir(node, layers, 1) / "bin" / "euid").lstat()
    assert stat.S_IMODE(kept.st_mode) == 0o4755 and kept.st_uid == 0
    output = run(
        node, container_id, image, "/bin/euid; grep NoNewPrivs /proc/self/status", "nobody"
    )
    assert "uid=65534 euid=65534" in output, output
    assert "NoNewPrivs:\t1" in output, output


def test_a_host_user_cannot_reach_the_stores_setuid_binaries(
    node: ServiceProcess, tmp_path: Path, euid_binary: bytes
) -> None:
    """A layer's name is its chain id, known for any public image: were the store open to other
    users, a host user could run an image's setuid-root binary on the host as root."""
    suid = Entry("bin/euid", data=euid_binary, mode=0o4755, uid=0, gid=0)
    layers = [BASE, tar_bytes([suid])]
    _, error = import_layers(node, tmp_path, layers, "setuid-host")
    assert error is None, error.details()
    binary = layer_dir(node, layers, 1) / "bin" / "euid"
    assert stat.S_IMODE(binary.lstat().st_mode) == 0o4755, "the layer keeps the image's mode"
    with traversable_by_all(node.state_dir.parent), pytest.raises(PermissionError):
        subprocess.run(  # as nobody, with no capability left
            [str(binary)], user=65534, group=65534, extra_groups=[], timeout=30, check=False
        )
    assert stat.S_IMODE((node.state_dir / "images").stat().st_mode) == 0o700


def test_a_setuid_binary_a_container_plants_in_its_sandbox_gives_host_users_nothing(
    node: ServiceProcess, tmp_path: Path, container_id: str, euid_binary: bytes
) -> None:
    """Root in a container (without a user namespace, host root) may make a setuid-root file in
    its sandbox and open the sandbox to every user; the sandboxes are mounted nosuid on the
    host, so a host user who runs it stays itself."""
    layers = [BASE, tar_bytes([Entry("bin/euid", data=euid_binary, mode=0o755)])]
    image, error = import_layers(node, tmp_path, layers, "plant")
    assert error is None, error.details()
    box = "/mnt/mesos/sandbox"
    # The sandbox is 0750, but root in the container may open it to everyone.
    plant = (
        f"cp /bin/euid {box}/euid && chmod 4755 {box}/euid && chmod 755 {box} && touch {box}/ready"
    )
    reply = node.stub().Launch(
        pb.LaunchRequest(
            container_id=container_id,
            command=pb.CommandInfo(shell=f"{plant} && sleep 600"),
            container=pb.ContainerInfo(runtime="native", image=image),
        ),
        timeout=60,
    )
    try:
        sandbox = Path(reply.status.sandbox)
        deadline = time.monotonic() + 30
        while not (sandbox / "ready").exists():
            assert time.monotonic() < deadline, (sandbox / "stderr").read_text()
            time.sleep(0.05)
        planted = (sandbox / "euid").lstat()
        assert stat.S_IMODE(planted.st_mode) == 0o4755 and planted.st_uid == 0
        with traversable_by_all(sandbox.parent):
            ran = subprocess.run(
                [str(sandbox / "euid")],
                user=65534,
                group=65534,
                extra_groups=[],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
        assert "euid=0" not in ran.stdout, ran
        assert ran.stdout.strip() == "uid=65534 euid=65534", ran
    finally:
        destroy(node.stub(), container_id)


def test_a_container_writing_a_shared_layer_changes_nothing_for_another_image(
    node: ServiceProcess, tmp_path: Path, container_id: str
) -> None:
    shared = tar_bytes([Entry("shared", "dir", mode=0o755), Entry("shared/file", data=b"base\n")])
    image_a, error = import_layers(node, tmp_path, [BASE, shared, tar_bytes([Entry("a")])], "a")
    assert error is None, error.details()
    image_b, error = import_layers(node, tmp_path, [BASE, shared, tar_bytes([Entry("b")])], "b")
    assert error is None, error.details()
    base_dir, shared_dir = layer_dir(node, [BASE, shared], 0), layer_dir(node, [BASE, shared], 1)
    before = tree_facts(base_dir), tree_facts(shared_dir)
    write = (
        "echo A >> /shared/file; echo A > /shared/new; rm /bin/ls; chmod 4777 /bin/busybox;"
        " busybox chown 5:5 /shared/file; mkdir /shared/dir; rm -r /etc; echo done"
    )
    assert run(node, f"{container_id}-a", image_a, write).endswith("done\n")
    look = "cat /shared/file; ls /shared; stat -c %a /bin/busybox; ls /bin/ls /etc/passwd"
    seen = run(node, f"{container_id}-b", image_b, look)
    assert seen == "base\nfile\n755\n/bin/ls\n/etc/passwd\n", seen
    assert (tree_facts(base_dir), tree_facts(shared_dir)) == before
