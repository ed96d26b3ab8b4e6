"""Attacks by a user-namespaced container's root (adapter/core/userns.py, the supervisor's
--userns) on the host, on the real kernel, with the native runtime: its root is an unprivileged
host uid, so

- a host-root-owned file it can reach (the host's filesystem of a launch without an image, a
  bind mount of a CRI container's `mounts`) cannot be written, truncated, chmod-ed, chown-ed,
  removed, renamed or hard-linked away;
- a host process's /proc/PID/environ cannot be read, not even from under its own /proc;
- the host's namespaces cannot be entered (setns through bind-mounted namespace files);
- no file can be given to a uid or gid outside its range;
- the sandbox's hand-over to its root follows nothing the workload planted in a caller-named
  sandbox that is launched again: the targets keep their owner, mode and content.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.cri.api import cri
from tests.conftest import (
    USER_NAMESPACE_DEFAULT,
    ServiceProcess,
    require_root,
    searchable_by_all,
    serving,
)
from tests.integration.api import destroy, wait
from tests.integration.cri import CriNode, cri_service, running_cri_node

pytestmark = pytest.mark.integration

RANGE_START = 1_600_000_000  # far above /etc/subuid's users and any image's ids
SIZE = 65536
USERNS_CONFIG = f'[user_namespace]\nrange = "{RANGE_START}:{SIZE * 4}"\nsize = {SIZE}\n'
SECRET = f"atk-secret-{uuid.uuid4().hex}"
# The host's mount namespace cannot be bind-mounted inside itself; the others can.
NAMESPACES = ("net", "uts", "ipc", "pid", "cgroup", "user", "time")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """A service of this module's own whose launches get a user namespace by default."""
    require_root()
    workdir = tmp_path_factory.mktemp("userns-attacks")
    searchable_by_all(workdir)
    process = ServiceProcess(workdir, USERNS_CONFIG.replace("]\n", "]\ndefault = true\n", 1))
    yield from serving(process)


@pytest.fixture
def host_dir(tmp_path: Path) -> Path:
    """A root-owned directory (0755) with a root-owned file (0644), searchable from a
    container on the host's filesystem."""
    searchable_by_all(tmp_path)
    directory = tmp_path / "host"
    directory.mkdir(mode=0o755)
    (directory / "root-owned").write_text("host\n")
    (directory / "root-owned").chmod(0o644)
    return directory


def facts(path: Path) -> tuple[int, int, int, int, str]:
    """Inode, mode, owner, group and content digest: what no attack may change."""
    info = path.lstat()
    return (
        info.st_ino,
        info.st_mode,
        info.st_uid,
        info.st_gid,
        hashlib.sha256(path.read_bytes()).hexdigest(),
    )


def tree(directory: Path) -> dict[str, tuple[int, int, int, int, str]]:
    return {entry.name: facts(entry) for entry in directory.iterdir()} | {".": facts_dir(directory)}


def facts_dir(directory: Path) -> tuple[int, int, int, int, str]:
    info = directory.lstat()
    return info.st_ino, info.st_mode, info.st_uid, info.st_gid, ""


def run(node: ServiceProcess, container_id: str, shell: str, sandbox: str = "") -> str:
    """Launch without an image (the host's filesystem; the sandbox is the working
    directory), wait, return stdout and stderr."""
    reply = node.stub().Launch(
        pb.LaunchRequest(
            container_id=container_id,
            command=pb.CommandInfo(shell=shell),
            container=pb.ContainerInfo(runtime="native"),
            sandbox=sandbox,
        ),
        timeout=60,
    )
    wait(node.stub(), container_id)
    directory = Path(reply.status.sandbox)
    output = (directory / "stdout").read_text() + (directory / "stderr").read_text()
    destroy(node.stub(), container_id)
    return output


def writes_to(target: str, sandbox: str) -> str:
    """A script trying every way to change `target` (a root-owned file in a root-owned
    directory); it prints WROTE-<how> for each one that worked."""
    attempts = {
        "append": f"echo owned >> {target}",
        "truncate": f": > {target}",
        "chmod": f"chmod 666 {target}",
        "chown": f"chown 0:0 {target}",
        "touch": f"touch -d 2000-01-01 {target}",
        "remove": f"rm -f {target} && [ ! -e {target} ]",
        "rename": f"mv {target} {target}.moved",
        "hardlink": f"ln {target} {sandbox}/linked",
        "new-file": f"echo x > {target}.new",
    }
    return "".join(f"{how} 2>/dev/null && echo WROTE-{name};" for name, how in attempts.items())


def test_root_cannot_change_a_host_root_file_it_can_reach(
    node: ServiceProcess, container_id: str, host_dir: Path
) -> None:
    before = tree(host_dir)
    script = "id -u; " + writes_to(str(host_dir / "root-owned"), ".")  # in its sandbox
    output = run(node, container_id, script)
    assert output.startswith("0\n"), output  # root inside
    assert "WROTE" not in output, output
    assert tree(host_dir) == before


def test_root_cannot_read_a_host_processs_environ(node: ServiceProcess, container_id: str) -> None:
    """Not through its /proc (its own pid namespace), nor through the host's proc under it
    (unmounting its /proc is refused), nor by pid through the host's filesystem."""
    host = subprocess.Popen(["sleep", "120"], env={"HOST_SECRET": SECRET})
    try:
        pid = host.pid
        script = (
            f"cat /proc/{pid}/environ; umount -l /proc 2>&1; cat /proc/{pid}/environ;"
            f" cat /proc/{pid}/root/proc/{pid}/environ; grep -l {SECRET} /proc/*/environ;"
            " echo END"
        )
        output = run(node, container_id, script)
    finally:
        host.kill()
        host.wait()
    assert "END" in output, output
    assert SECRET not in output, output


@pytest.fixture
def host_namespaces(tmp_path: Path) -> Iterator[Path]:
    """The test process's (the host's) namespaces bind-mounted on files of a 0755 directory,
    as `ip netns add` does; unmounted afterwards."""
    searchable_by_all(tmp_path)
    directory = tmp_path / "ns"
    directory.mkdir(mode=0o755)
    mounted = []
    try:
        for kind in NAMESPACES:
            target = directory / kind
            target.touch(mode=0o444)
            subprocess.run(["mount", "--bind", f"/proc/self/ns/{kind}", str(target)], check=True)
            mounted.append(target)
        yield directory
    finally:
        for target in mounted:
            subprocess.run(["umount", str(target)], check=False)


def test_root_cannot_enter_the_hosts_namespaces(
    node: ServiceProcess, container_id: str, host_namespaces: Path
) -> None:
    script = "".join(
        f"nsenter --{kind}={host_namespaces / kind} true && echo ENTERED-{kind};"
        for kind in NAMESPACES
    )
    output = run(node, container_id, script)
    assert "ENTERED" not in output, output
    assert output.count("Operation not permitted") == len(NAMESPACES), output  # all tried


def test_root_cannot_give_a_file_to_an_id_outside_its_range(
    node: ServiceProcess, container_id: str, tmp_path: Path
) -> None:
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    searchable_by_all(sandbox)
    outside = (SIZE, SIZE + 1, 4294967294)
    script = "touch mine; chown 65535:65535 mine && echo TOP-OF-RANGE;"
    script += "".join(f"chown {uid} mine 2>/dev/null && echo GAVE-{uid};" for uid in outside)
    script += "".join(f"chgrp {gid} mine 2>/dev/null && echo GAVE-{gid};" for gid in outside)
    output = run(node, container_id, script, sandbox=str(sandbox))
    assert "TOP-OF-RANGE" in output, output  # the range's last id is its own
    assert "GAVE" not in output, output
    owner = (sandbox / "mine").lstat()
    assert (owner.st_uid, owner.st_gid) == (RANGE_START + SIZE - 1, RANGE_START + SIZE - 1)


def test_a_relaunched_sandbox_hands_nothing_planted_over(
    node: ServiceProcess, container_id: str, tmp_path: Path, host_dir: Path
) -> None:
    """The first workload plants symlinks to /etc/shadow and a host file, a symlink to /etc,
    and replaces stderr with a link to the host file; the caller launches the same sandbox
    again, twice: every target keeps its owner, mode and content."""
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    searchable_by_all(sandbox)
    decoy = host_dir / "root-owned"
    decoy.chmod(0o600)
    shadow, host_before = facts(Path("/etc/shadow")), tree(host_dir)
    plant = (
        f"ln -s /etc/shadow x; ln -s {decoy} y; ln -s /etc etc;"
        f" mkdir d; ln -s /etc/shadow d/x; ln {decoy} hard 2>/dev/null; echo PLANTED"
    )
    assert "PLANTED" in run(node, f"{container_id}-1", plant, str(sandbox))
    try:
        look = "cat x y etc/shadow 2>&1 | grep -c denied"
        assert run(node, f"{container_id}-2", look, str(sandbox)).split()[-1] == "3"
        replace = f"rm stderr; ln -s {decoy} stderr; echo err >&2"
        run(node, f"{container_id}-3", replace, str(sandbox))
        with contextlib.suppress(grpc.RpcError):  # refused, or launched on files of its own
            run(node, f"{container_id}-4", "echo again; echo err >&2", str(sandbox))
    finally:
        if facts(Path("/etc/shadow")) != shadow:  # put the host right before failing
            os.chown("/etc/shadow", shadow[2], shadow[3])
            os.chmod("/etc/shadow", stat.S_IMODE(shadow[1]))
    assert facts(Path("/etc/shadow")) == shadow
    assert tree(host_dir) == host_before
    assert sandbox.lstat().st_uid == RANGE_START  # the hand-over did happen


@pytest.fixture(scope="module")
def pods(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CriNode]:
    """A CRI service whose pods may ask for a user namespace."""
    workdir = tmp_path_factory.mktemp("userns-cri")
    searchable_by_all(workdir)
    service = cri_service(workdir)
    config = service.config_path.read_text().replace(USER_NAMESPACE_DEFAULT, "")
    service.config_path.write_text(config + USERNS_CONFIG)
    with running_cri_node(service, workdir) as node:
        yield node


def test_a_cri_bind_mount_gives_root_no_write_to_host_root_files(
    pods: CriNode, host_dir: Path
) -> None:
    before = tree(host_dir)
    options = cri.NamespaceOption(userns_options=cri.UserNamespace(mode=cri.POD))
    pod_id = pods.run_pod(
        pods.pod_config(
            linux=cri.LinuxPodSandboxConfig(
                security_context=cri.LinuxSandboxSecurityContext(namespace_options=options)
            )
        )
    )
    mount = cri.Mount(container_path="/data", host_path=str(host_dir))
    container = pods.run(pod_id, pods.container_config("sleep", "60", mounts=[mount]))
    try:
        script = "id -u; cat /data/root-owned; " + writes_to("/data/root-owned", "/tmp")
        reply = pods.exec_sync(container, "sh", "-c", script)
        output = reply.stdout.decode() + reply.stderr.decode()
        assert output.startswith("0\nhost\n"), output  # root inside, and the file is there
        assert "WROTE" not in output, output
    finally:
        pods.remove_pod(pod_id)
    assert tree(host_dir) == before
