"""The runtimes as the conformance suite drives them: a real `containerizer serve` per runtime,
configured the way the per-runtime integration tests configure theirs (the same private
containerd, dockerd and libvirtd, started once per xdist worker), and what each runtime leaves on
the host while a container exists, so a test can tell that destroy removed all of it.

Every check goes through the gRPC API; the host is only read (cgroup files, processes, the
runtime's own objects) to see what the API claims.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.api.containerizer.v1 import images_pb2, images_pb2_grpc
from tests.cgroup_roots import hierarchy_mounts
from tests.conftest import CGROUP_MOUNT, ServiceProcess
from tests.integration.api import scalar

RUNTIMES = ("native", "lxc", "containerd", "docker", "libvirt")
# Launch returns once the container runs; a guest under TCG takes seconds more to boot.
LAUNCH_SECONDS = 120
# Appended to a script: tells the test the workload runs. Docker's output reaches the sandbox
# files only when the container ends, and a guest does not share the sandbox, so the workload
# says it both ways: on stdout (a guest's serial port is copied as it comes) and as a file in
# the sandbox (bound into every container that shares the host's or its own filesystem).
READY = 'echo ready; echo ready > "$MESOS_SANDBOX/ready"'
# libvirt keeps QEMU's threads in groups below the domain's cgroup; the domain holds the limits.
THREAD_GROUPS = re.compile(r"/(emulator|vcpu\d+|iothread\d+)$")

# What a runtime still holds of a container id on the host, besides cgroups: a description of
# each object (a run directory, a containerd record, a Docker container, a libvirt domain).
ObjectProbe = Callable[[str], list[str]]


@dataclass
class Node:
    """One runtime behind one service: how to launch on it and what it leaves behind."""

    runtime: str
    service: ServiceProcess
    objects: ObjectProbe
    # What a plain launch runs in: "" for the runtime's own root, else an image reference.
    image: str = ""
    # The image carrying tests.images.CONTRACT_SETTINGS; "" where the runtime runs no images.
    settings_image: str = ""
    stop_actions: list[Callable[[], None]] = field(default_factory=list)

    def request(
        self,
        container_id: str,
        shell: str = "",
        *,
        argv: tuple[str, ...] = (),
        environment: dict[str, str] | None = None,
        user: str = "",
        working_dir: str = "",
        image: str | None = None,
        sandbox: str = "",
        **resources: float,
    ) -> pb.LaunchRequest:
        variables = [
            pb.EnvironmentVariable(name=name, value=value)
            for name, value in (environment or {}).items()
        ]
        return pb.LaunchRequest(
            container_id=container_id,
            command=pb.CommandInfo(
                shell=shell,
                argv=list(argv),
                environment=variables,
                user=user,
                working_dir=working_dir,
            ),
            resources=[scalar(name, value) for name, value in resources.items()],
            container=pb.ContainerInfo(
                runtime=self.runtime, image=self.image if image is None else image
            ),
            sandbox=sandbox,
        )

    def launch(self, container_id: str, shell: str = "", **options: object) -> pb.LaunchResponse:
        request = self.request(container_id, shell, **options)  # type: ignore[arg-type]
        reply: pb.LaunchResponse = self.service.stub().Launch(request, timeout=LAUNCH_SECONDS)
        return reply

    def leftovers(self, container_id: str) -> list[str]:
        """Everything of the container still on the host: cgroups under the service's roots
        and the runtime's own objects."""
        cgroups = [str(path) for path in cgroups_named(self.service, container_id)]
        return cgroups + self.objects(container_id)

    def stop(self) -> None:
        """Destroy what is left, stop the service, remove its cgroup roots and daemon state."""
        with contextlib.suppress(Exception):
            if self.service.process and self.service.process.poll() is None:
                self.service.destroy_all()
        self.service.stop()
        for action in self.stop_actions:
            action()
        self.service.remove_cgroup_roots()


def cgroups_named(service: ServiceProcess, container_id: str) -> list[Path]:
    """Cgroup directories whose name holds the container id, anywhere below the service's
    cgroup roots (`<root>` and the roots named after it: libvirt's `<root>.partition`, LXC's
    `<root>.lxc-monitor.<id>`), in every hierarchy."""
    found = []
    for mount in hierarchy_mounts():
        tops = [*mount.glob(service.cgroups_root), *mount.glob(f"{service.cgroups_root}.*")]
        for top in tops:
            for directory, _, _ in os.walk(top):
                if container_id in Path(directory).name:
                    found.append(Path(directory))
    return found


def limits_cgroup(pid: int, controller: str) -> Path:
    """The cgroup that holds `controller`'s limits for the container whose init is `pid`, as the
    host sees it (/proc/PID/cgroup), with libvirt's per-thread groups left out."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return CGROUP_MOUNT / controller / THREAD_GROUPS.sub("", path).lstrip("/")
    raise AssertionError(f"process {pid} is in no {controller} cgroup")


def processes_in(cgroup: Path) -> set[int]:
    """Every process in the cgroup and the groups below it."""
    found: set[int] = set()
    for directory, _, _ in os.walk(cgroup):
        with contextlib.suppress(OSError):
            procs = (Path(directory) / "cgroup.procs").read_text().split()
            found.update(int(pid) for pid in procs)
    return found


def alive(pid: int) -> bool:
    """Whether the process runs (a zombie has ended)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def cpu_seconds_of_tree(pid: int) -> float:
    """User + system CPU time of the process and all its descendants, as the host counts it."""
    root = psutil.Process(pid)
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def wait_for(condition: Callable[[], bool], what: str, timeout: float = LAUNCH_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s"
        time.sleep(0.05)


def wait_until_ready(sandbox: Path) -> None:
    """Until the workload has run READY (see there for why two signs)."""

    def ready() -> bool:
        with contextlib.suppress(OSError):
            if (sandbox / "ready").exists() or "ready" in (sandbox / "stdout").read_text():
                return True
        return False

    wait_for(ready, f"the workload's READY line in {sandbox}")


def import_images(service: ServiceProcess, *tarballs: Path) -> None:
    """Import OCI or `docker save` tarballs into the service's store through the Images API."""
    with grpc.insecure_channel(service.endpoint) as channel:
        images = images_pb2_grpc.ImagesStub(channel)
        for tarball in tarballs:
            list(images.Import(images_pb2.ImportRequest(path=str(tarball)), timeout=120))
