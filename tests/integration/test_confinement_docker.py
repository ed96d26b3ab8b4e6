"""The default confinement of docker workloads, attacked from inside against the real kernel.

Our service and a private dockerd; the workload image is built by Docker's builder from
busybox-static, the syscall prober (and a setuid-root copy of it), with an Entrypoint and Cmd of
its own. The scripts and parsers are the containerd module's: both runtimes must confine alike.
"""

# Fixtures are imported from tests.docker_fixtures and injected by name, which ruff reads as
# redefinition; a conftest `pytest_plugins` line would make both the imports and this go away.
# ruff: noqa: F811

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.core.confinement import (
    ALL_CAPABILITIES,
    DEFAULT_CAPABILITIES,
    READONLY_PATHS,
    Confinement,
    capability_mask,
)
from adapter.runtimes.docker.confinement import NodeCapabilities
from tests.conftest import ServiceProcess, require, serving
from tests.docker_fixtures import (  # noqa: F401  (fixtures, injected by parameter name)
    BUSYBOX,
    PrivateDockerd,
    build_image,
    docker_registry,
    docker_service,
    docker_service_config,
    dockerd,
)
from tests.images import (
    GROUP,
    IMAGE_CMD,
    IMAGE_ENTRYPOINT,
    PASSWD,
    SETUID_PROBE,
    SYSCALL_PROBE,
    build_syscall_probe,
)
from tests.integration.api import wait
from tests.integration.test_confinement_containerd import (
    ESCAPE,
    INSIDE,
    MOUNTS,
    ROOT_PROBE,
    SETUID_SHELL,
    STATUS,
    fields,
    full_mask_text,
    mask_text,
    masked_on_this_host,
    mount_options,
)
from tests.integration.test_docker import docker_container

pytestmark = pytest.mark.integration
CONFINED = "ctz-confined:latest"
CONFINED_DOCKERFILE = f"""\
FROM scratch
COPY busybox /bin/busybox
COPY syscall-probe {SYSCALL_PROBE}
COPY syscall-probe {SETUID_PROBE}
COPY passwd /etc/passwd
COPY group /etc/group
RUN ["/bin/busybox", "sh", "-c", "/bin/busybox --install -s /bin && chmod 4755 {SETUID_PROBE} \
&& mkdir -m 1777 /tmp"]
ENTRYPOINT {json.dumps(IMAGE_ENTRYPOINT)}
CMD {json.dumps(IMAGE_CMD)}
"""


@pytest.fixture(scope="session")
def confined_docker_image(dockerd: PrivateDockerd) -> str:
    require(shutil.which("gcc") is not None, "gcc missing: apt-get install gcc libc6-dev")
    with tempfile.TemporaryDirectory(prefix="ctz-confined-") as tmp:
        workdir = Path(tmp)
        (workdir / "passwd").write_bytes(PASSWD)
        (workdir / "group").write_bytes(GROUP)
        files = {
            "busybox": BUSYBOX,
            "syscall-probe": build_syscall_probe(workdir),
            "passwd": workdir / "passwd",
            "group": workdir / "group",
        }
        return build_image(dockerd, CONFINED, CONFINED_DOCKERFILE, files)


def run(
    service: ServiceProcess,
    container_id: str,
    command: pb.CommandInfo,
    *,
    privileged: bool = False,
) -> tuple[pb.Termination, str]:
    """Launch in the confined image, wait for the end; the termination and the stdout."""
    stub = service.stub()
    reply = stub.Launch(
        pb.LaunchRequest(
            container_id=container_id,
            command=command,
            container=pb.ContainerInfo(runtime="docker", image=CONFINED),
            privileged=privileged,
        ),
        timeout=120,
    )
    termination = wait(stub, container_id, timeout=120)  # once the output is in the sandbox
    sandbox = Path(reply.status.sandbox)
    print((sandbox / "stderr").read_text())  # shown when a test fails
    return termination, (sandbox / "stdout").read_text()


def test_cgroup_release_agent_escape_fails_and_the_host_is_untouched(
    docker_service: ServiceProcess, confined_docker_image: str, container_id: str, tmp_path: Path
) -> None:
    marker = tmp_path / "escaped"
    command = pb.CommandInfo(
        shell=f"{ESCAPE}\n{STATUS}",
        environment=[pb.EnvironmentVariable(name="MARKER", value=str(marker))],
    )
    termination, output = run(docker_service, container_id, command)
    assert termination.reason == pb.EXITED and "done: escape" in output, output
    assert fields(output)["mount-rc"] != "0"
    assert "wrote:" not in output and "joined:" not in output, output
    cgroup_lines = [line for line in output.splitlines() if line[:1].isdigit() and ":/" in line]
    assert cgroup_lines and all(line.endswith(":/") for line in cgroup_lines), output
    assert fields(output)["Seccomp"] == "2"
    time.sleep(0.5)  # a release agent runs asynchronously once the cgroup empties
    assert not marker.exists()


def test_root_holds_the_default_set_behind_seccomp_and_read_only_kernel_paths(
    docker_service: ServiceProcess, confined_docker_image: str, container_id: str
) -> None:
    termination, output = run(docker_service, container_id, pb.CommandInfo(shell=ROOT_PROBE))
    assert termination.reason == pb.EXITED, output
    status = fields(output)
    default = mask_text(DEFAULT_CAPABILITIES)
    assert (status["CapEff"], status["CapPrm"], status["CapBnd"]) == (default,) * 3
    assert status["CapAmb"] == "0" * 16
    assert (status["NoNewPrivs"], status["Seccomp"]) == ("0", "2")
    assert status["unshare-m-rc"] != "0" and status["unshare-U-rc"] != "0"
    for call in ("keyctl", "unshare-user", "unshare-mount", "mount"):
        assert status[call] == "Operation not permitted", output
    mounts = mount_options(output)
    assert status["keys-bytes"] == "0"
    assert all(path in mounts for path in masked_on_this_host()), mounts
    assert status["cgroup-mkdir-rc"] != "0"
    read_only = [path for path in READONLY_PATHS if Path(path).exists()]
    for point in (*read_only, "/sys"):
        assert mounts[point].split(",")[0] == "ro", (point, mounts)
    cgroupfs = [point for point in mounts if point.startswith("/sys/fs/cgroup/")]
    assert cgroupfs and all(mounts[point].split(",")[0] == "ro" for point in cgroupfs), mounts


def test_a_setuid_root_binary_gives_nothing_back_to_nobody(
    docker_service: ServiceProcess, confined_docker_image: str, container_id: str
) -> None:
    inside = pb.EnvironmentVariable(name="INSIDE", value=INSIDE)
    command = pb.CommandInfo(shell=SETUID_SHELL, user="nobody", environment=[inside])
    termination, output = run(docker_service, container_id, command)
    assert termination.reason == pb.EXITED, output
    status = fields(output)
    assert (status["setuid-uid"], status["setuid-CapEff"]) == ("65534", "0" * 16), output
    assert status["uid-after"] == "65534"
    assert status["CapEff"] == status["CapPrm"] == "0" * 16
    assert status["NoNewPrivs"] == "1"


@pytest.fixture
def privileged_docker_service(
    tmp_path: Path, dockerd: PrivateDockerd, docker_registry: str
) -> Iterator[ServiceProcess]:
    config = "allow_privileged = true\n" + docker_service_config(dockerd, docker_registry)
    process = ServiceProcess(tmp_path, config)
    yield from serving(process)


def test_privileged_is_refused_unless_the_node_allows_it(
    docker_service: ServiceProcess,
    privileged_docker_service: ServiceProcess,
    dockerd: PrivateDockerd,
    confined_docker_image: str,
    container_id: str,
) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        run(docker_service, container_id, pb.CommandInfo(shell="true"), privileged=True)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "allow_privileged" in str(refused.value.details())
    assert docker_container(dockerd, container_id) is None
    probe = f"{STATUS}\n{SYSCALL_PROBE} keyctl\n{MOUNTS}"
    termination, output = run(
        privileged_docker_service, container_id, pb.CommandInfo(shell=probe), privileged=True
    )
    assert termination.reason == pb.EXITED, output
    status = fields(output)
    # Every capability the node holds, up to the last one this Docker knows (20.10: AUDIT_READ).
    effective = int(status["CapEff"], 16)
    assert status["CapEff"] == status["CapBnd"] and effective & ~int(full_mask_text(), 16) == 0
    known = capability_mask(ALL_CAPABILITIES[: ALL_CAPABILITIES.index("CAP_AUDIT_READ") + 1])
    assert effective & known == int(full_mask_text(), 16) & known
    assert status["Seccomp"] == "0" and status["keyctl"] == "allowed"
    mounts = mount_options(output)
    assert not any(path in mounts for path in masked_on_this_host()), mounts
    # Docker's Privileged (and so a writable /sys) needs a node holding every capability.
    writable = "rw" if NodeCapabilities.of_this_node().complete else "ro"
    assert mounts["/sys"].split(",")[0] == writable


def test_an_empty_command_runs_the_images_entrypoint_and_cmd(
    docker_service: ServiceProcess, confined_docker_image: str, container_id: str
) -> None:
    termination, output = run(docker_service, container_id, pb.CommandInfo())
    assert termination.reason == pb.EXITED and termination.exit_code == 0
    assert output == " ".join((*IMAGE_ENTRYPOINT[1:], *IMAGE_CMD)) + "\n"


def test_runtimes_reports_the_confinement(docker_service: ServiceProcess) -> None:
    stub = docker_service.stub()
    runtimes = {r.name: r for r in stub.Runtimes(pb.RuntimesRequest(), timeout=30).runtimes}
    assert runtimes["docker"].healthy
    assert runtimes["docker"].confinement == Confinement().summary()
