"""What a CRI container needs of containerizer-supervisor, on the real kernel: a numeric
identity (never a name service inside an image), namespaces joined or shared with the host, a
read-only root, sysctls, seccomp off, and bind propagation both ways.

The supervisor is the one built from this checkout (test_supervisor.py's `binary`); the image
root filesystems are plain directories made here from the host's static busybox."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.api.containerizer.v1 import images_pb2, images_pb2_grpc
from adapter.core.confinement import DEFAULT_CAPABILITIES, Confinement, capability_mask
from adapter.core.errors import InvalidArgument
from adapter.core.identity import image_etc, resolve_identity
from adapter.core.model import Identity, Mount
from adapter.supervisor.client import SpawnError
from adapter.supervisor.launch_config import Enforcement, Filesystem
from adapter.supervisor.seccomp import build_program
from tests.conftest import ServiceProcess
from tests.images import BUSYBOX, Entry, busybox_entries, tar_bytes, write_oci_layout
from tests.integration.api import destroy, wait
from tests.integration.test_supervisor import Box, binary, enforcement  # noqa: F401 - fixtures

pytestmark = pytest.mark.integration

SANDBOX_INSIDE = "/mnt/mesos/sandbox"
DEFAULT_MASK = f"{capability_mask(DEFAULT_CAPABILITIES):016x}"
FORTY_GROUPS = tuple(range(3000, 3040))
NSS_MARKER = "nss-was-loaded"
EVIL_NSS_SOURCE = f"""
#include <fcntl.h>
#include <unistd.h>
/* Runs on dlopen(): what an image's NSS module would run, with every capability held. */
__attribute__((constructor)) static void loaded(void) {{
    int fd = open("/{NSS_MARKER}", O_WRONLY | O_CREAT, 0644);
    if (fd >= 0) close(fd);
}}
"""


# --- root filesystems, holders of namespaces, shared mounts ---------------------------------------


@pytest.fixture
def box(binary: str, tmp_path: Path, enforcement: Enforcement) -> Box:  # noqa: F811
    """A supervised workload's files in tmp_path, under the default confinement."""
    return Box(binary, tmp_path, enforcement)


def make_lower(dest: Path, passwd: str = "", group: str = "") -> Path:
    """A busybox root filesystem: every applet, /etc/passwd and /etc/group, mount points."""
    if not BUSYBOX.is_file():
        pytest.skip(f"{BUSYBOX} missing: apt-get install busybox-static")
    for directory in ("bin", "etc", "dev", "proc", "sys", "mnt", "home"):
        (dest / directory).mkdir(parents=True, exist_ok=True)
    (dest / "tmp").mkdir(mode=0o1777, exist_ok=True)
    (dest / "tmp").chmod(0o1777)
    shutil.copy2(BUSYBOX, dest / "bin" / "busybox")
    applets = subprocess.run(
        [str(BUSYBOX), "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    for applet in applets:
        if applet != "busybox" and not (dest / "bin" / applet).exists():
            (dest / "bin" / applet).symlink_to("busybox")
    (dest / "etc" / "passwd").write_text(passwd or "root:x:0:0:root:/root:/bin/sh\n")
    (dest / "etc" / "group").write_text(group or "root:x:0:\n")
    return dest


@pytest.fixture(scope="module")
def lower(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_lower(tmp_path_factory.mktemp("lower") / "rootfs")


def in_image(
    box: Box, lower: Path, *, read_only_root: bool = False, mounts: tuple[Mount, ...] = ()
) -> dict[str, object]:
    """Options for a launch in an overlay of `lower` with the sandbox bound in, confined as
    the native runtime confines an image container."""
    rootfs_dir = box.root / "rootfs"
    for part in ("upper", "work", "merged"):
        (rootfs_dir / part).mkdir(parents=True, exist_ok=True)
    filesystem = Filesystem(
        str(lower),
        str(rootfs_dir),
        binds=((str(box.root), SANDBOX_INSIDE),),
        mounts=mounts,
        read_only_root=read_only_root,
    )
    return {"filesystem": filesystem, "cwd": SANDBOX_INSIDE}


def confined_in_image(box: Box) -> Box:
    policy = Enforcement.of(
        Confinement(), build_program().bpf, own_root=True, cgroup_namespace=True
    )
    return dataclasses.replace(box, enforcement=policy)


@contextlib.contextmanager
def namespace_holder(*kinds: str) -> Iterator[int]:
    """The host pid of a process in new namespaces of `kinds` (pid 1 of its own pid namespace
    when "pid" is one), like a pod's holder; killed at the end."""
    flags = [f"--{kind}" for kind in kinds] + (["--fork"] if "pid" in kinds else [])
    holder = subprocess.Popen(["unshare", *flags, "sleep", "600"], start_new_session=True)
    try:
        deadline = time.monotonic() + 5
        while True:
            process = psutil.Process(holder.pid)
            children = process.children()
            sleeper = children[0] if "pid" in kinds and children else process
            if sleeper.name() == "sleep":
                yield sleeper.pid
                return
            assert time.monotonic() < deadline, "the holder did not start"
            time.sleep(0.01)
    finally:
        os.killpg(holder.pid, 9)
        holder.wait()


def namespace_links(pid: int | str) -> list[str]:
    return [os.readlink(f"/proc/{pid}/ns/{kind}") for kind in ("ipc", "uts", "pid")]


@pytest.fixture
def shared_source(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs on the host made a shared mount: what Kubernetes asks of a propagating volume's
    source. Unmounted, with whatever propagated into it, at the end."""
    source = tmp_path / "source"
    source.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "ctz-test", str(source)], check=True)
    try:
        subprocess.run(["mount", "--make-shared", str(source)], check=True)
        (source / "from-host").mkdir()
        (source / "from-container").mkdir()
        yield source
    finally:
        subprocess.run(["umount", "--recursive", "--lazy", str(source)], check=False)


def mounted_at(path: Path) -> bool:
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return str(path) in points


# --- identity ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("identity", "expected"),
    [
        (Identity(1234, 2345, (7, 8)), ["1234", "2345", "2345 7 8"]),
        (Identity(1234, 2345, ()), ["1234", "2345", "2345"]),  # an empty list: no group at all
        (Identity(0, 0, (5,)), ["0", "0", "0 5"]),
        # more than musl's NGROUPS_MAX (32): the kernel takes 65536, and so does the supervisor
        (
            Identity(1234, 2345, FORTY_GROUPS),
            ["1234", "2345", " ".join(map(str, (2345, *FORTY_GROUPS)))],
        ),
    ],
)
async def test_uid_gid_and_groups_are_exactly_the_numbers_given(
    box: Box, identity: Identity, expected: list[str]
) -> None:
    status = await box.run(["sh", "-c", "id -u; id -g; id -G"], identity=identity)
    assert status is not None and status.exit_code == 0, box.stderr.read_text()
    assert box.stdout.read_text().split("\n")[:3] == expected
    owner = box.root.stat()
    assert (owner.st_uid, owner.st_gid) == (identity.uid, identity.gid)  # the sandbox is its


async def test_root_keeps_its_capabilities_and_others_get_none(box: Box) -> None:
    script = "grep -e CapEff -e NoNewPrivs /proc/self/status"
    await box.run(["sh", "-c", script], identity=Identity(0, 0))
    await box.run(["sh", "-c", script], identity=Identity(1234, 1234))
    lines = [line.split()[1] for line in box.stdout.read_text().splitlines()]
    assert lines == [DEFAULT_MASK, "0", "0000000000000000", "1"]


def build_evil_nss(dest: Path) -> Path:
    """A shared library whose constructor leaves NSS_MARKER at the root of whoever loads it."""
    source = dest / "evil.c"
    source.write_text(EVIL_NSS_SOURCE)
    library = dest / "libnss_evil.so.2"
    compiler = shutil.which("cc") or shutil.which("gcc")
    assert compiler is not None
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    return library


@pytest.fixture
def nss_image(tmp_path: Path) -> Path:
    """An image whose name service is a module of its own: glibc would dlopen it for any
    getpwnam() made inside it."""
    lower = make_lower(
        tmp_path / "nss-lower",
        passwd="root:x:0:0:root:/root:/bin/sh\napp:x:4321:4322:app:/home/app:/bin/sh\n",
        group="root:x:0:\nextra:x:99:app\n",
    )
    (lower / "etc" / "nsswitch.conf").write_text("passwd: evil files\ngroup: evil files\n")
    library = build_evil_nss(tmp_path)
    for directory in (
        "lib",
        "lib64",
        "usr/lib",
        "lib/x86_64-linux-gnu",
        "usr/lib/x86_64-linux-gnu",
    ):
        (lower / directory).mkdir(parents=True, exist_ok=True)
        shutil.copy2(library, lower / directory / library.name)
    return lower


async def test_an_images_user_is_resolved_from_its_files_without_its_name_service(
    box: Box, nss_image: Path
) -> None:
    identity = resolve_identity("app", image_etc(nss_image))
    assert identity == Identity(4321, 4322, (99,), "/home/app")
    box = confined_in_image(box)
    script = "id -u; id -g; id -G; echo $HOME"
    status = await box.run(["sh", "-c", script], identity=identity, **in_image(box, nss_image))
    assert status is not None and status.exit_code == 0, box.stderr.read_text()
    assert box.stdout.read_text() == "4321\n4322\n4322 99\n/home/app\n"
    assert not (box.root / "rootfs" / "upper" / NSS_MARKER).exists()
    assert not (nss_image / NSS_MARKER).exists()


@pytest.fixture(scope="module")
def shadow_image(service: ServiceProcess, tmp_path_factory: pytest.TempPathFactory) -> str:
    """An image whose /etc/passwd is a symlink to the host's /etc/shadow, imported."""
    reference = "localhost/passwd-to-shadow:latest"
    entries = [entry for entry in busybox_entries() if entry.name != "etc/passwd"]
    entries.append(Entry("etc/passwd", "symlink", link="/etc/shadow"))
    tarball = tmp_path_factory.mktemp("shadow-image") / "image.tar"
    write_oci_layout(tarball, [tar_bytes(entries)], reference)
    channel = grpc.insecure_channel(service.endpoint)
    try:
        stub = images_pb2_grpc.ImagesStub(channel)
        list(stub.Import(images_pb2.ImportRequest(path=str(tarball)), timeout=120))
    finally:
        channel.close()
    return reference


def launch(
    service: ServiceProcess, container_id: str, shell: str, image: str, user: str = ""
) -> Path:
    reply = service.stub().Launch(
        pb.LaunchRequest(
            container_id=container_id,
            command=pb.CommandInfo(shell=shell, user=user),
            container=pb.ContainerInfo(runtime="native", image=image),
        ),
        timeout=60,
    )
    return Path(reply.status.sandbox)


def test_a_passwd_linked_to_the_hosts_shadow_resolves_nothing(
    service: ServiceProcess, container_id: str, shadow_image: str
) -> None:
    """Followed, the shadow file's "root:HASH:19000:0:..." would read as uid 19000, gid 0."""
    with pytest.raises(grpc.RpcError) as refused:
        launch(service, container_id, "id -u", shadow_image, user="root")
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "command.user" in (refused.value.details() or "")
    assert "no such user in the image's /etc/passwd" in (refused.value.details() or "")
    sandbox = launch(service, f"{container_id}-2", "id -u; id -g; echo $HOME", shadow_image)
    termination = wait(service.stub(), f"{container_id}-2")
    output = (sandbox / "stdout").read_text()
    destroy(service.stub(), f"{container_id}-2")  # removes the sandbox
    assert termination.exit_code == 0, termination.message
    assert output == "0\n0\n/\n"  # root, without an entry


# --- namespaces joined or shared ---------------------------------------------------------------


async def test_a_holders_ipc_uts_and_pid_namespaces_are_joined(box: Box) -> None:
    script = (
        "readlink /proc/self/ns/ipc /proc/self/ns/uts /proc/self/ns/pid; hostname;"
        " (sleep 30 & echo $! > orphan); sleep 0.3;"
        ' echo parent=$(cut -d" " -f4 /proc/$(cat orphan)/stat); kill $(cat orphan)'
    )
    with namespace_holder("ipc", "uts", "pid") as holder:
        joined = tuple((kind, f"/proc/{holder}/ns/{kind}") for kind in ("ipc", "uts", "pid"))
        handle = await box.spawn(
            ["sh", "-c", script],
            namespaces_joined=joined,
            hostname="not-applied",
            cwd=str(box.root),
        )
        init_in_namespace = Path(f"/proc/{handle.child_pid}/status").read_text()
        status = await box.supervisors.wait_exit(handle)
        assert status is not None and status.exit_code == 0, box.stderr.read_text()
        *links, hostname, parent = box.stdout.read_text().splitlines()
        assert links == namespace_links(holder)
    assert hostname == os.uname().nodename  # a joined UTS namespace keeps its name
    nspid = next(line for line in init_in_namespace.splitlines() if line.startswith("NSpid:"))
    assert nspid.split()[-1] != "1"  # our init is not the namespace's pid 1 ...
    assert parent == f"parent={nspid.split()[-1]}"  # ... yet the workload's orphans are its


async def test_host_namespaces_are_the_hosts(box: Box) -> None:
    shared = tuple((kind, "host") for kind in ("ipc", "uts", "pid"))
    script = "readlink /proc/self/ns/ipc /proc/self/ns/uts /proc/self/ns/pid; hostname"
    status = await box.run(["sh", "-c", script], namespaces_joined=shared, hostname="not-applied")
    assert status is not None and status.exit_code == 0, box.stderr.read_text()
    *links, hostname = box.stdout.read_text().splitlines()
    assert links == namespace_links("self")
    assert hostname == os.uname().nodename


@pytest.mark.parametrize("kind", ["ipc", "uts", "pid"])
async def test_a_path_that_is_no_namespace_of_that_kind_is_refused(box: Box, kind: str) -> None:
    with pytest.raises(SpawnError) as missing:
        await box.spawn(["true"], namespaces_joined=((kind, "/nonexistent/ns"),))
    assert missing.value.step == f"{kind}ns"
    assert missing.value.reason == "/nonexistent/ns: No such file or directory"
    with pytest.raises(SpawnError) as wrong:  # a namespace, of another kind
        await box.spawn(["true"], namespaces_joined=((kind, "/proc/self/ns/net"),))
    assert wrong.value.step == f"{kind}ns"
    assert wrong.value.reason == "/proc/self/ns/net: Invalid argument"
    assert not box.status_file.exists()


# --- read-only root, sysctls, seccomp ------------------------------------------------------------


async def test_a_read_only_root_refuses_writes_but_not_to_its_mounts(box: Box, lower: Path) -> None:
    box = confined_in_image(box)
    script = (
        "touch /written 2>/dev/null || echo root-refused;"
        " touch /tmp/written 2>/dev/null || echo tmp-refused;"
        " touch /dev/shm/written && echo shm-written;"
        f" touch {SANDBOX_INSIDE}/written && echo sandbox-written"
    )
    status = await box.run(["sh", "-c", script], **in_image(box, lower, read_only_root=True))
    assert status is not None and status.exit_code == 0, box.stderr.read_text()
    assert box.stdout.read_text().split() == [
        "root-refused",
        "tmp-refused",
        "shm-written",
        "sandbox-written",
    ]
    assert not list((box.root / "rootfs" / "upper").rglob("written"))


async def test_an_ipc_sysctl_is_set_in_the_containers_namespace_only(box: Box, lower: Path) -> None:
    box = confined_in_image(box)
    host_before = Path("/proc/sys/kernel/shm_rmid_forced").read_text()
    script = "cat /proc/sys/kernel/shm_rmid_forced; echo 0 > /proc/sys/kernel/shm_rmid_forced"
    status = await box.run(
        ["sh", "-c", script],
        sysctls=(("kernel.shm_rmid_forced", "1"),),
        **in_image(box, lower),
    )
    assert status is not None, box.stderr.read_text()
    assert box.stdout.read_text() == "1\n"
    assert "Read-only file system" in box.stderr.read_text()  # /proc/sys is locked afterwards
    assert Path("/proc/sys/kernel/shm_rmid_forced").read_text() == host_before


async def test_a_net_sysctl_is_set_in_the_containers_network_namespace(box: Box) -> None:
    host_before = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    with namespace_holder("net") as holder:
        netns = f"/proc/{holder}/ns/net"
        status = await box.run(
            ["cat", "/proc/sys/net/ipv4/ip_forward"],
            netns=netns,
            sysctls=(("net.ipv4.ip_forward", "1"),),
        )
        inside = subprocess.run(
            ["nsenter", f"--net={netns}", "cat", "/proc/sys/net/ipv4/ip_forward"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    assert status is not None and status.exit_code == 0, box.stderr.read_text()
    assert (box.stdout.read_text(), inside) == ("1\n", "1\n")
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text() == host_before


async def test_sysctls_the_host_would_feel_never_reach_the_supervisor(box: Box) -> None:
    for sysctls, options in (
        ((("kernel.domainname", "x"),), {}),
        ((("net.ipv4.ip_forward", "1"),), {}),  # the host's network
        ((("kernel.shmmax", "1"),), {"namespaces_joined": (("ipc", "host"),)}),
    ):
        with pytest.raises(InvalidArgument) as refused:
            await box.spawn(["true"], sysctls=sysctls, **options)
        assert refused.value.field == "linux.sysctls"
    assert not box.stdout.exists()


async def test_a_sysctl_the_kernel_refuses_fails_the_launch_at_its_step(box: Box) -> None:
    with pytest.raises(SpawnError) as refused:
        await box.spawn(["true"], sysctls=(("kernel.shm_no_such_key", "1"),))
    assert refused.value.step == "sysctl"
    assert "kernel.shm_no_such_key=1" in str(refused.value)


async def test_seccomp_off_allows_what_the_default_filter_refuses(box: Box) -> None:
    script = "grep -e Seccomp: -e CapEff /proc/self/status; unshare --user true && echo userns"
    status = await box.run(["sh", "-c", script])
    assert status is not None
    confined = box.stdout.read_text()
    box.stdout.write_text("")
    unconfined = dataclasses.replace(box.enforcement, seccomp_bpf=b"")
    status = await dataclasses.replace(box, enforcement=unconfined).run(["sh", "-c", script])
    assert status is not None and status.exit_code == 0, box.stderr.read_text()
    assert "Seccomp:\t2" in confined and "userns" not in confined
    assert box.stdout.read_text().split() == ["CapEff:", DEFAULT_MASK, "Seccomp:", "0", "userns"]


# --- bind propagation ---------------------------------------------------------------------------


def wait_for_file(name: str, seconds: float) -> str:
    """A shell loop that prints `seen` once `name` exists, or `unseen` after `seconds`."""
    tries = int(seconds / 0.05)
    return (
        f"i=0; while [ ! -e {name} ] && [ $i -lt {tries} ]; do sleep 0.05; i=$((i+1)); done;"
        f" [ -e {name} ] && echo seen || echo unseen"
    )


async def host_mounts_into(source: Path, box: Box) -> None:
    """Waits until the workload is ready, then mounts a tmpfs with a marker under `source`."""
    deadline = time.monotonic() + 10
    while "ready" not in (box.stdout.read_text() if box.stdout.exists() else ""):
        assert time.monotonic() < deadline, box.stderr.read_text()
        await asyncio.sleep(0.02)
    target = source / "from-host"
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "ctz-host", str(target)], check=True)
    (target / "marker").write_text("from the host\n")


@pytest.mark.parametrize(("propagation", "expected"), [("rslave", "seen"), ("private", "unseen")])
async def test_host_mounts_reach_an_rslave_bind_only(
    box: Box, lower: Path, shared_source: Path, propagation: str, expected: str
) -> None:
    box = confined_in_image(box)
    volume = Mount(str(shared_source), "/volume", propagation=propagation)
    script = f"echo ready; {wait_for_file('/volume/from-host/marker', 2)}"
    handle = await box.spawn(["sh", "-c", script], **in_image(box, lower, mounts=(volume,)))
    await host_mounts_into(shared_source, box)
    status = await box.supervisors.wait_exit(handle)
    assert status is not None and status.exit_code == 0, box.stderr.read_text()
    assert box.stdout.read_text() == f"ready\n{expected}\n"


async def test_an_rshared_bind_propagates_both_ways(
    box: Box, lower: Path, shared_source: Path
) -> None:
    box = dataclasses.replace(box, enforcement=Enforcement(privileged=True))
    volume = Mount(str(shared_source), "/volume", propagation="rshared")
    script = (
        "mount -t tmpfs -o size=1m ctz-inside /volume/from-container"
        " && echo from-container > /volume/from-container/marker;"
        f" echo ready; {wait_for_file('/volume/from-host/marker', 5)}; sleep 0.5"
    )
    handle = await box.spawn(["sh", "-c", script], **in_image(box, lower, mounts=(volume,)))
    await host_mounts_into(shared_source, box)
    assert mounted_at(shared_source / "from-container")  # the container's mount, out here
    assert (shared_source / "from-container" / "marker").read_text() == "from-container\n"
    status = await box.supervisors.wait_exit(handle)
    assert status is not None and status.exit_code == 0, box.stderr.read_text()
    assert box.stdout.read_text() == "ready\nseen\n"


async def test_an_rslave_binds_own_mounts_stay_inside(
    box: Box, lower: Path, shared_source: Path
) -> None:
    """Even a privileged container's mount under an rslave volume never reaches the host."""
    box = dataclasses.replace(box, enforcement=Enforcement(privileged=True))
    volume = Mount(str(shared_source), "/volume", propagation="rslave")
    script = "mount -t tmpfs -o size=1m ctz-inside /volume/from-container && echo mounted"
    status = await box.run(["sh", "-c", script], **in_image(box, lower, mounts=(volume,)))
    assert status is not None and status.exit_code == 0, box.stderr.read_text()
    assert box.stdout.read_text() == "mounted\n"
    assert not mounted_at(shared_source / "from-container")
