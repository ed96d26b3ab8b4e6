"""The native runtime with an image: the unpacked rootfs as /, /proc, /dev and the sandbox in."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.api.containerizer.v1 import images_pb2, images_pb2_grpc
from tests.conftest import ServiceProcess
from tests.image_fixtures import busybox_oci_tar  # noqa: F401
from tests.images import REFERENCE, Entry, busybox_entries, tar_bytes, write_oci_layout
from tests.integration.api import destroy, wait

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def imported(service: ServiceProcess, busybox_oci_tar: Path) -> str:  # noqa: F811
    channel = grpc.insecure_channel(service.endpoint)
    stub = images_pb2_grpc.ImagesStub(channel)
    list(stub.Import(images_pb2.ImportRequest(path=str(busybox_oci_tar)), timeout=60))
    channel.close()
    return REFERENCE


def launch_in_image(
    service: ServiceProcess, container_id: str, shell: str, image: str
) -> pb.LaunchResponse:
    return service.stub().Launch(
        pb.LaunchRequest(
            container_id=container_id,
            command=pb.CommandInfo(shell=shell),
            container=pb.ContainerInfo(image=image),
        ),
        timeout=30,
    )


def test_image_rootfs_is_the_workloads_root(
    service: ServiceProcess, container_id: str, imported: str
) -> None:
    script = (
        "echo pid=$$ cwd=$(pwd); ls /; echo $(ls /dev); "
        "echo $MESOS_SANDBOX; echo written > /etc/created-inside; "
        "test -e /work && echo host-visible; exit 5"
    )
    reply = launch_in_image(service, container_id, script, imported)
    termination = wait(service.stub(), container_id)
    output = (Path(reply.status.sandbox) / "stdout").read_text()
    assert termination.exit_code == 5, output + (Path(reply.status.sandbox) / "stderr").read_text()
    assert "pid=2 cwd=/mnt/mesos/sandbox" in output
    assert "bin" in output.split() and "host-visible" not in output
    for device in ("null", "zero", "urandom", "pts", "shm"):
        assert device in output
    assert "/mnt/mesos/sandbox\n" in output
    # The write went to the container's own layer, never into the shared image layers.
    assert not list(service.state_dir.glob("images/layers/*/etc/created-inside"))
    run_dir = service.state_dir / "native" / container_id
    assert not run_dir.exists()  # destroyed with the container after Wait
    assert str(run_dir) not in Path("/proc/self/mountinfo").read_text()


def test_the_writable_layer_is_volatile_and_goes_with_the_container(
    service: ServiceProcess, container_id: str, imported: str
) -> None:
    """The overlay is never synced at its unmount (the container's exit): its upper layer is
    scratch, removed with the run directory, the overlay's volatile marker in its work dir too."""
    reply = launch_in_image(service, container_id, "grep ' / / ' /proc/self/mountinfo", imported)
    termination = wait(service.stub(), container_id)
    root_mount = (Path(reply.status.sandbox) / "stdout").read_text()
    assert termination.exit_code == 0, root_mount
    options = root_mount.split()[-1].split(",")  # the superblock's: the kernel's own words
    assert "overlay" in root_mount and "fsync=volatile" in options
    assert not (service.state_dir / "native" / container_id).exists()


def test_each_user_of_an_image_gets_its_own_identity(
    service: ServiceProcess, container_id: str, imported: str
) -> None:
    """The identities an image's /etc files give are kept per image and user: launches of one
    image as different users, in turn, never get each other's; an unknown user fails each
    time."""
    stub = service.stub()
    for n, (user, expected) in enumerate([("", "0 0"), ("nobody", "65534 65534"), ("", "0 0")]):
        cid = f"{container_id}-{n}"
        reply = stub.Launch(
            pb.LaunchRequest(
                container_id=cid,
                command=pb.CommandInfo(shell="echo $(id -u) $(id -g)", user=user),
                container=pb.ContainerInfo(image=imported),
            ),
            timeout=30,
        )
        assert wait(stub, cid).exit_code == 0
        assert (Path(reply.status.sandbox) / "stdout").read_text() == expected + "\n", user
        destroy(stub, cid)
    for attempt in range(2):
        with pytest.raises(grpc.RpcError, match="no-such-user"):
            stub.Launch(
                pb.LaunchRequest(
                    container_id=f"{container_id}-unknown-{attempt}",
                    command=pb.CommandInfo(shell="true", user="no-such-user"),
                    container=pb.ContainerInfo(image=imported),
                ),
                timeout=30,
            )


def test_sandbox_is_shared_with_the_host(
    service: ServiceProcess, container_id: str, imported: str
) -> None:
    reply = launch_in_image(service, container_id, "echo from-inside > result; sleep 30", imported)
    result = Path(reply.status.sandbox) / "result"
    for _ in range(100):
        if result.exists() and result.read_text():
            break
        time.sleep(0.05)
    assert result.read_text() == "from-inside\n"
    assert destroy(service.stub(), container_id).reason == pb.DESTROYED


def test_unknown_and_malformed_images(service: ServiceProcess, container_id: str) -> None:
    for image, code in [
        ("localhost/nothing-here:1", grpc.StatusCode.NOT_FOUND),
        ("UPPER/Case::bad", grpc.StatusCode.INVALID_ARGUMENT),
    ]:
        with pytest.raises(grpc.RpcError) as error:
            launch_in_image(service, container_id, "true", image)
        assert error.value.code() == code
        assert image in error.value.details() or "container.image" in error.value.details()


def test_bridge_network_gets_its_own_etc_files(
    tmp_path: Path,
    busybox_oci_tar: Path,  # noqa: F811
) -> None:
    from tests.integration.test_network import network_service

    service = network_service(tmp_path)
    service.start()
    try:
        channel = grpc.insecure_channel(service.endpoint)
        list(
            images_pb2_grpc.ImagesStub(channel).Import(
                images_pb2.ImportRequest(path=str(busybox_oci_tar))
            )
        )
        channel.close()
        reply = service.stub().Launch(
            pb.LaunchRequest(
                container_id="bridged",
                command=pb.CommandInfo(
                    shell="cat /etc/hosts; cat /etc/resolv.conf; echo > /etc/hosts"
                ),
                container=pb.ContainerInfo(image=REFERENCE, network=pb.NetworkInfo(mode="bridge")),
            ),
            timeout=30,
        )
        termination = wait(service.stub(), "bridged")
        output = (Path(reply.status.sandbox) / "stdout").read_text()
        assert reply.status.ip_address and f"{reply.status.ip_address}\tbridged" in output
        assert termination.exit_code != 0  # the files are bound read-only
        assert not list(service.state_dir.glob("network/*.etc/bridged"))  # owner removed them
    finally:
        service.destroy_all()
        service.stop()
        service.remove_cgroup_roots()


def layered_image(tmp_path: Path) -> Path:
    """busybox, then a layer over it that deletes a file and makes a directory opaque."""
    base = tar_bytes(
        [
            *busybox_entries(),
            Entry("etc/gone", data=b"deleted above\n"),
            Entry("cache", "dir", mode=0o755),
            Entry("cache/old", data=b"hidden\n"),
        ]
    )
    top = tar_bytes(
        [Entry("etc/.wh.gone"), Entry("cache/.wh..wh..opq"), Entry("cache/new", data=b"new\n")]
    )
    path = write_oci_layout(tmp_path / "base.tar", [base], "localhost/layered-base:1")
    write_oci_layout(tmp_path / "layered.tar", [base, top], "localhost/layered:1")
    return path


def test_a_container_sees_its_image_layers_stacked(
    service: ServiceProcess, container_id: str, tmp_path: Path
) -> None:
    """Two images share their base layer (one directory); each container sees its own files."""
    layered_image(tmp_path)
    channel = grpc.insecure_channel(service.endpoint)
    images = images_pb2_grpc.ImagesStub(channel)
    for tarball in ("base.tar", "layered.tar"):
        list(images.Import(images_pb2.ImportRequest(path=str(tmp_path / tarball)), timeout=60))
    channel.close()
    outputs = {}
    for image in ("localhost/layered-base:1", "localhost/layered:1"):
        cid = f"{container_id}-{image.rsplit('/', 1)[1].replace(':', '-')}"
        reply = launch_in_image(service, cid, "ls /etc /cache", image)
        assert wait(service.stub(), cid).exit_code == 0
        outputs[image] = (Path(reply.status.sandbox) / "stdout").read_text().split()
    base, layered = outputs["localhost/layered-base:1"], outputs["localhost/layered:1"]
    assert "gone" in base and "old" in base
    assert "gone" not in layered and "passwd" in layered  # deleted above, the rest kept
    assert "old" not in layered and "new" in layered  # the opaque directory hides its past
    assert len(list(service.state_dir.glob("images/layers/*"))) >= 2
