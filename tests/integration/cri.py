"""A real `containerizer serve` driven through its CRI socket, with the CRI's own stubs.

One service per xdist worker (session scope) with a bridge network, privileged launches allowed
(some CRI specs need them) and the test busybox image imported through our Images API."""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.api.containerizer.v1 import images_pb2, images_pb2_grpc
from adapter.cri.api import cri, cri_grpc
from tests.conftest import ServiceProcess, require_root
from tests.images import REFERENCE, busybox_oci_layout
from tests.integration.test_network import network_config

TIMEOUT = 60


def kubelet_default_linux(pid: int = cri.CONTAINER) -> cri.LinuxPodSandboxConfig:
    options = cri.NamespaceOption(pid=pid)  # type: ignore[arg-type]
    security = cri.LinuxSandboxSecurityContext(namespace_options=options)
    return cri.LinuxPodSandboxConfig(security_context=security)


def namespace_of(path: str | Path, kind: str) -> str:
    """A namespace's name as `readlink /proc/PID/ns/KIND` gives it, from any file of it (a
    bind-mounted pin too)."""
    return f"{kind}:[{os.stat(path).st_ino}]"


class CriNode:
    def __init__(self, service: ServiceProcess) -> None:
        self.service = service
        self.cri_socket = service.workdir / "cri.sock"
        self.channel = grpc.insecure_channel(f"unix:{self.cri_socket}")
        self.runtime = cri_grpc.RuntimeServiceStub(self.channel)
        self.images = cri_grpc.ImageServiceStub(self.channel)
        self.image = REFERENCE
        self.log_root = service.workdir / "logs"

    def reconnect(self) -> None:
        self.channel.close()
        self.channel = grpc.insecure_channel(f"unix:{self.cri_socket}")
        self.runtime = cri_grpc.RuntimeServiceStub(self.channel)
        self.images = cri_grpc.ImageServiceStub(self.channel)

    def pod_config(self, name: str = "", **fields: object) -> cri.PodSandboxConfig:
        """A pod as the kubelet asks for one by default (its containers' pid namespaces their
        own: the pod's namespaces are pinned, no holder process) unless `linux` says more."""
        name = name or f"pod-{uuid.uuid4().hex[:8]}"
        fields.setdefault("linux", kubelet_default_linux())
        config = cri.PodSandboxConfig(
            metadata=cri.PodSandboxMetadata(name=name, namespace="test", uid=uuid.uuid4().hex),
            log_directory=str(self.log_root / name),
            **fields,  # type: ignore[arg-type]
        )
        return config

    def shared_pid_pod_config(self, name: str = "", **fields: object) -> cri.PodSandboxConfig:
        """A pod whose containers share its pid namespace: it has a holder process (pid 1)."""
        return self.pod_config(name, linux=kubelet_default_linux(cri.POD), **fields)

    def pod_namespace(self, pod_id: str, kind: str) -> str:
        """The pod's namespace of `kind` as its containers' `readlink /proc/self/ns/KIND` shows
        it: its holder process's, or the file that pins it."""
        pid = self.service.stub().Status(pb.StatusRequest(container_id=pod_id), timeout=10).pid
        if pid:
            return os.readlink(f"/proc/{pid}/ns/{kind}")
        if kind == "net":
            [path] = Path("/run/netns").glob(f"*.{pod_id}")
            return namespace_of(path, kind)
        return namespace_of(self.service.state_dir / "native" / pod_id / kind, kind)

    def limited_pod_config(
        self, memory: int, overhead: int, cpu_quota: int = 0
    ) -> cri.PodSandboxConfig:
        """A pod with pod-level resources (its containers' sum) and a runtime class overhead."""
        return self.pod_config(
            linux=cri.LinuxPodSandboxConfig(
                resources=cri.LinuxContainerResources(
                    memory_limit_in_bytes=memory, cpu_quota=cpu_quota, cpu_period=100_000
                ),
                overhead=cri.LinuxContainerResources(memory_limit_in_bytes=overhead),
            )
        )

    def pod_cgroup(self, pod_id: str, controller: Path = Path("/sys/fs/cgroup/memory")) -> Path:
        """The pod's cgroup in one controller's hierarchy."""
        return controller / self.service.cgroups_root / "_pods" / pod_id

    def run_pod(self, config: cri.PodSandboxConfig | None = None, runtime_handler: str = "") -> str:
        config = config or self.pod_config()
        request = cri.RunPodSandboxRequest(config=config, runtime_handler=runtime_handler)
        reply = self.runtime.RunPodSandbox(request, timeout=TIMEOUT)
        return str(reply.pod_sandbox_id)

    def container_config(
        self, *command: str, name: str = "", **fields: object
    ) -> cri.ContainerConfig:
        name = name or f"c-{uuid.uuid4().hex[:8]}"
        fields.setdefault("log_path", f"{name}.log")
        return cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name=name),
            image=cri.ImageSpec(image=self.image),
            command=list(command),
            **fields,  # type: ignore[arg-type]
        )

    def create(self, pod_id: str, config: cri.ContainerConfig) -> str:
        reply = self.runtime.CreateContainer(
            cri.CreateContainerRequest(pod_sandbox_id=pod_id, config=config), timeout=TIMEOUT
        )
        return str(reply.container_id)

    def start(self, container_id: str) -> None:
        self.runtime.StartContainer(
            cri.StartContainerRequest(container_id=container_id), timeout=TIMEOUT
        )

    def run(self, pod_id: str, config: cri.ContainerConfig) -> str:
        container_id = self.create(pod_id, config)
        self.start(container_id)
        return container_id

    def status(self, container_id: str) -> cri.ContainerStatus:
        return self.runtime.ContainerStatus(
            cri.ContainerStatusRequest(container_id=container_id), timeout=TIMEOUT
        ).status

    def wait_exited(self, container_id: str, timeout: float = 30) -> cri.ContainerStatus:
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(container_id)
            if status.state == cri.CONTAINER_EXITED:
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"{container_id} did not exit: {status}")
            time.sleep(0.05)

    def exec_sync(
        self, container_id: str, *command: str, timeout: int = 10
    ) -> cri.ExecSyncResponse:
        return self.runtime.ExecSync(
            cri.ExecSyncRequest(container_id=container_id, cmd=list(command), timeout=timeout),
            timeout=timeout + TIMEOUT,
        )

    def remove_pod(self, pod_id: str) -> None:
        self.runtime.StopPodSandbox(
            cri.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=TIMEOUT
        )
        self.runtime.RemovePodSandbox(
            cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=TIMEOUT
        )

    def remove_all_pods(self) -> None:
        for pod in self.runtime.ListPodSandbox(cri.ListPodSandboxRequest(), timeout=TIMEOUT).items:
            with contextlib.suppress(grpc.RpcError):
                self.remove_pod(pod.id)

    def close(self) -> None:
        self.channel.close()


def cri_service(
    workdir: Path, runtimes: tuple[str, ...] = (), *, allow_host: bool = False
) -> ServiceProcess:
    """`runtimes`: the runtime tables besides native's (which runs the pods' holders);
    `allow_host`: pods may ask for the host's network."""
    require_root()
    bridge, subnet = network_config()
    tables = "".join(f"[runtimes.{name}]\n" for name in ("native", *runtimes)) if runtimes else ""
    return ServiceProcess(
        workdir,
        extra_config=(
            f'cri_socket = "{workdir / "cri.sock"}"\nallow_privileged = true\n'
            f'[network]\nbridge = "{bridge}"\nsubnet = "{subnet}"\n'
            f"{'allow_host = true' if allow_host else ''}\n{tables}"
        ),
    )


def import_busybox(service: ServiceProcess, workdir: Path) -> None:
    channel = grpc.insecure_channel(service.endpoint)
    try:
        stub = images_pb2_grpc.ImagesStub(channel)
        tarball = busybox_oci_layout(workdir)
        list(stub.Import(images_pb2.ImportRequest(path=str(tarball)), timeout=120))
    finally:
        channel.close()


@contextlib.contextmanager
def running_cri_node(service: ServiceProcess, workdir: Path) -> Iterator[CriNode]:
    """The service started with the busybox image imported, as a CriNode; afterwards every pod
    and container removed (the service restarted first if a test left it killed), the service
    stopped and its cgroups gone."""
    service.start()
    node = CriNode(service)
    try:
        import_busybox(service, workdir)
        yield node
    finally:
        with contextlib.suppress(Exception):
            if service.process is None or service.process.poll() is not None:
                service.start()
            node.reconnect()
            node.remove_all_pods()
        node.close()
        with contextlib.suppress(Exception):
            service.destroy_all()
        service.stop()
        service.remove_cgroup_roots()


@pytest.fixture(scope="session")
def cri_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CriNode]:
    workdir = tmp_path_factory.mktemp("cri")
    with running_cri_node(cri_service(workdir), workdir) as node:
        yield node
