"""The CRI RuntimeService: pods (adapter/cri/pods.py) and containers (adapter/cri/containers.py)
on the core, with the CRI's idempotence rules (stopping or removing what is gone is no error).

Exec and PortForward answer with a URL on the streaming server (adapter/cri/streaming.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import grpc

from adapter.core.containerizer import Containerizer
from adapter.core.errors import ContainerizerError, FailedPrecondition, InvalidArgument, NotFound
from adapter.core.model import Capabilities, Statistics
from adapter.cri import convert, translate
from adapter.cri.api import cri, cri_grpc
from adapter.cri.containers import CriContainers
from adapter.cri.events import QUEUE_LIMIT, ContainerEvents
from adapter.cri.pods import Pods
from adapter.cri.store import RUNNING, Container, CriStore
from adapter.cri.streaming import StreamingServer
from adapter.images.store import ImageStore
from adapter.server.errors import mapped_errors
from adapter.streaming.remotecommand import ExecOptions

log = logging.getLogger(__name__)

RUNTIME_NAME = "containerizer"
RUNTIME_VERSION = "0.1.0"
API_VERSION = "v1"


class CriRuntime:
    """Pods and containers together: what the servicer and recovery share."""

    def __init__(
        self,
        core: Containerizer,
        images: ImageStore,
        state_dir: Path,
        *,
        bridge: bool,
        streaming_address: str = "127.0.0.1:0",
    ) -> None:
        self.core = core
        host, _, port = streaming_address.rpartition(":")
        self.streaming = StreamingServer(core, host.strip("[]"), int(port))
        self.store = CriStore(state_dir / "cri.db")
        root = state_dir / "cri" / "pods"
        self.events = ContainerEvents(lambda pod_id: self.containers.of_pod(pod_id))
        self.pods = Pods(core, self.store, root, set(core.drivers), self.events, bridge=bridge)
        self.containers = CriContainers(core, self.store, self.pods, images, self.events)
        self.pod_cidr = ""

    async def recover(self) -> None:
        await self.pods.recover()
        await self.containers.recover()

    async def stop_pod(self, pod_id: str) -> None:
        try:
            pod = self.pods.get(pod_id)
        except NotFound:
            return
        async with self.pods.lock(pod.id):
            await asyncio.gather(
                *(self.containers.stop(c.id, 0) for c in self.containers.of_pod(pod.id))
            )
            await self.pods.stop_holder(pod)

    async def remove_pod(self, pod_id: str) -> None:
        try:
            pod = self.pods.get(pod_id)
        except NotFound:
            return
        await self.stop_pod(pod.id)
        for container in self.containers.of_pod(pod.id):
            await self.containers.remove(container.id)
        await self.pods.remove(pod)

    async def usage(self, container: Container) -> Statistics:
        """Created or exited: nothing runs to account (an exited one's cgroups may be going)."""
        if container.state != RUNNING:
            return {}
        try:
            return await self.core.usage(container.id)
        except ContainerizerError:
            return {}  # it ended since

    async def close(self) -> None:
        self.events.close()
        await self.streaming.close()
        await self.containers.close()
        await self.pods.close()
        self.store.close()


class CriRuntimeService(cri_grpc.RuntimeServiceServicer):
    def __init__(self, runtime: CriRuntime) -> None:
        self.runtime = runtime
        self.pods = runtime.pods
        self.containers = runtime.containers

    @mapped_errors
    async def Version(self, request: cri.VersionRequest, context: Any) -> cri.VersionResponse:
        return cri.VersionResponse(
            version="0.1.0",
            runtime_name=RUNTIME_NAME,
            runtime_version=RUNTIME_VERSION,
            runtime_api_version=API_VERSION,
        )

    # ---- pods ----

    @mapped_errors
    async def RunPodSandbox(
        self, request: cri.RunPodSandboxRequest, context: Any
    ) -> cri.RunPodSandboxResponse:
        pod = await self.pods.run(request.config, request.runtime_handler)
        return cri.RunPodSandboxResponse(pod_sandbox_id=pod.id)

    @mapped_errors
    async def StopPodSandbox(
        self, request: cri.StopPodSandboxRequest, context: Any
    ) -> cri.StopPodSandboxResponse:
        await self.runtime.stop_pod(_required(request.pod_sandbox_id, "pod_sandbox_id"))
        return cri.StopPodSandboxResponse()

    @mapped_errors
    async def RemovePodSandbox(
        self, request: cri.RemovePodSandboxRequest, context: Any
    ) -> cri.RemovePodSandboxResponse:
        await self.runtime.remove_pod(_required(request.pod_sandbox_id, "pod_sandbox_id"))
        return cri.RemovePodSandboxResponse()

    @mapped_errors
    async def PodSandboxStatus(
        self, request: cri.PodSandboxStatusRequest, context: Any
    ) -> cri.PodSandboxStatusResponse:
        pod = self.pods.get(_required(request.pod_sandbox_id, "pod_sandbox_id"))
        return cri.PodSandboxStatusResponse(status=convert.pod_status(pod))

    @mapped_errors
    async def ListPodSandbox(
        self, request: cri.ListPodSandboxRequest, context: Any
    ) -> cri.ListPodSandboxResponse:
        wanted = request.filter
        items = []
        for pod in self.pods.records.values():
            if wanted.id and not pod.id.startswith(wanted.id):
                continue
            if (
                wanted.HasField("state")
                and cri.PodSandboxState.Value(pod.state) != wanted.state.state
            ):
                continue
            if not convert.matches_labels(pod.pod_config().labels, wanted.label_selector):
                continue
            items.append(convert.pod_sandbox(pod))
        return cri.ListPodSandboxResponse(items=items)

    # ---- containers ----

    @mapped_errors
    async def CreateContainer(
        self, request: cri.CreateContainerRequest, context: Any
    ) -> cri.CreateContainerResponse:
        pod_id = _required(request.pod_sandbox_id, "pod_sandbox_id")
        container = self.containers.create(pod_id, request.config)
        return cri.CreateContainerResponse(container_id=container.id)

    @mapped_errors
    async def StartContainer(
        self, request: cri.StartContainerRequest, context: Any
    ) -> cri.StartContainerResponse:
        await self.containers.start(_required(request.container_id, "container_id"))
        return cri.StartContainerResponse()

    @mapped_errors
    async def StopContainer(
        self, request: cri.StopContainerRequest, context: Any
    ) -> cri.StopContainerResponse:
        if request.timeout < 0:
            raise InvalidArgument("timeout", "must not be negative")
        await self.containers.stop(_required(request.container_id, "container_id"), request.timeout)
        return cri.StopContainerResponse()

    @mapped_errors
    async def RemoveContainer(
        self, request: cri.RemoveContainerRequest, context: Any
    ) -> cri.RemoveContainerResponse:
        await self.containers.remove(_required(request.container_id, "container_id"))
        return cri.RemoveContainerResponse()

    @mapped_errors
    async def ListContainers(
        self, request: cri.ListContainersRequest, context: Any
    ) -> cri.ListContainersResponse:
        wanted = request.filter
        found = []
        for record in self.containers.records.values():
            if wanted.id and not record.id.startswith(wanted.id):
                continue
            if wanted.pod_sandbox_id and not record.pod_id.startswith(wanted.pod_sandbox_id):
                continue
            if (
                wanted.HasField("state")
                and cri.ContainerState.Value(record.state) != wanted.state.state
            ):
                continue
            if not convert.matches_labels(record.container_config().labels, wanted.label_selector):
                continue
            found.append(convert.container(record))
        return cri.ListContainersResponse(containers=found)

    async def GetContainerEvents(self, request: cri.GetEventsRequest, context: Any) -> None:
        """Every lifecycle event from now on, until the client goes or the service stops
        (adapter/cri/events.py)."""
        with self.runtime.events.subscribe() as subscription:
            while (event := await subscription.next()) is not None:
                await context.write(event)
            if subscription.overflowed:
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"this stream fell {QUEUE_LIMIT} events behind and was ended: list"
                    " the containers again, then subscribe again",
                )

    @mapped_errors
    async def ContainerStatus(
        self, request: cri.ContainerStatusRequest, context: Any
    ) -> cri.ContainerStatusResponse:
        record = self.containers.get(_required(request.container_id, "container_id"))
        return cri.ContainerStatusResponse(status=convert.container_status(record))

    @mapped_errors
    async def UpdateContainerResources(
        self, request: cri.UpdateContainerResourcesRequest, context: Any
    ) -> cri.UpdateContainerResourcesResponse:
        record = self.containers.get(_required(request.container_id, "container_id"))
        resources = translate.container_resources(request.linux, "linux")
        if record.state == RUNNING:
            await self.runtime.core.update(record.id, resources)
        return cri.UpdateContainerResourcesResponse()

    @mapped_errors
    async def ReopenContainerLog(
        self, request: cri.ReopenContainerLogRequest, context: Any
    ) -> cri.ReopenContainerLogResponse:
        record = self.containers.get(_required(request.container_id, "container_id"))
        if record.state != RUNNING:
            raise InvalidArgument("container_id", f"container {record.id!r} is not running")
        await self.runtime.core.reopen_log(record.id)
        return cri.ReopenContainerLogResponse()

    @mapped_errors
    async def ExecSync(self, request: cri.ExecSyncRequest, context: Any) -> cri.ExecSyncResponse:
        container_id = _required(request.container_id, "container_id")
        if not request.cmd:
            raise InvalidArgument("cmd", "is empty")
        if request.timeout < 0:
            raise InvalidArgument("timeout", "must not be negative")
        result = await self.containers.exec_sync(container_id, list(request.cmd), request.timeout)
        if result.timed_out:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"command timed out after {request.timeout} s",
            )
        return cri.ExecSyncResponse(
            stdout=result.stdout, stderr=result.stderr, exit_code=result.exit_code
        )

    @mapped_errors
    async def Exec(self, request: cri.ExecRequest, context: Any) -> cri.ExecResponse:
        record = self.containers.get(_required(request.container_id, "container_id"))
        if record.state != RUNNING:
            raise FailedPrecondition(f"container {record.id!r} is not running")
        if not request.cmd:
            raise InvalidArgument("cmd", "is empty")
        options = ExecOptions(request.stdin, request.stdout, request.stderr, request.tty)
        url = self.runtime.streaming.exec_url(record.id, tuple(request.cmd), options)
        return cri.ExecResponse(url=url)

    @mapped_errors
    async def Attach(self, request: cri.AttachRequest, context: Any) -> cri.AttachResponse:
        record = self.containers.get(_required(request.container_id, "container_id"))
        if record.state != RUNNING:
            raise FailedPrecondition(f"container {record.id!r} is not running")
        options = ExecOptions(request.stdin, request.stdout, request.stderr, request.tty)
        return cri.AttachResponse(url=self.runtime.streaming.attach_url(record.id, options))

    @mapped_errors
    async def PortForward(
        self, request: cri.PortForwardRequest, context: Any
    ) -> cri.PortForwardResponse:
        pod = self.pods.get(_required(request.pod_sandbox_id, "pod_sandbox_id"))
        self.pods.namespace_files(pod)  # the pod is ready: its namespaces exist
        for index, port in enumerate(request.port):
            if not 0 < port < 65536:
                raise InvalidArgument(f"port[{index}]", f"{port} is not a TCP port")
        netns = pod.netns or None  # "" on the host's network
        url = self.runtime.streaming.port_forward_url(netns, tuple(request.port))
        return cri.PortForwardResponse(url=url)

    # ---- statistics ----

    @mapped_errors
    async def ContainerStats(
        self, request: cri.ContainerStatsRequest, context: Any
    ) -> cri.ContainerStatsResponse:
        record = self.containers.get(_required(request.container_id, "container_id"))
        statistics = await self.runtime.usage(record)
        return cri.ContainerStatsResponse(stats=convert.container_stats(record, statistics))

    @mapped_errors
    async def ListContainerStats(
        self, request: cri.ListContainerStatsRequest, context: Any
    ) -> cri.ListContainerStatsResponse:
        wanted = request.filter
        stats = []
        for record in list(self.containers.records.values()):
            if wanted.id and not record.id.startswith(wanted.id):
                continue
            if wanted.pod_sandbox_id and not record.pod_id.startswith(wanted.pod_sandbox_id):
                continue
            if not convert.matches_labels(record.container_config().labels, wanted.label_selector):
                continue
            statistics = await self.runtime.usage(record)
            stats.append(convert.container_stats(record, statistics))
        return cri.ListContainerStatsResponse(stats=stats)

    @mapped_errors
    async def PodSandboxStats(
        self, request: cri.PodSandboxStatsRequest, context: Any
    ) -> cri.PodSandboxStatsResponse:
        pod = self.pods.get(_required(request.pod_sandbox_id, "pod_sandbox_id"))
        return cri.PodSandboxStatsResponse(stats=await self._pod_stats(pod.id))

    @mapped_errors
    async def ListPodSandboxStats(
        self, request: cri.ListPodSandboxStatsRequest, context: Any
    ) -> cri.ListPodSandboxStatsResponse:
        wanted = request.filter
        stats = []
        for pod in list(self.pods.records.values()):
            if wanted.id and not pod.id.startswith(wanted.id):
                continue
            if not convert.matches_labels(pod.pod_config().labels, wanted.label_selector):
                continue
            stats.append(await self._pod_stats(pod.id))
        return cri.ListPodSandboxStatsResponse(stats=stats)

    async def _pod_stats(self, pod_id: str) -> cri.PodSandboxStats:
        pod = self.pods.get(pod_id)
        containers = []
        for record in self.containers.of_pod(pod.id):
            statistics = await self.runtime.usage(record)
            containers.append(convert.container_stats(record, statistics))
        # The pod's cgroup: the kernel's sums over all its containers and its holder.
        return convert.pod_stats(pod, self.pods.statistics(pod.id), containers)

    # ---- the runtime ----

    @mapped_errors
    async def UpdateRuntimeConfig(
        self, request: cri.UpdateRuntimeConfigRequest, context: Any
    ) -> cri.UpdateRuntimeConfigResponse:
        # Pods get addresses from the node's network (config [network]); the kubelet's pod CIDR
        # is recorded and shown by Status, not applied.
        self.runtime.pod_cidr = request.runtime_config.network_config.pod_cidr
        return cri.UpdateRuntimeConfigResponse()

    @mapped_errors
    async def Status(self, request: cri.StatusRequest, context: Any) -> cri.StatusResponse:
        fingerprints = {f.name: f for f in await self.runtime.core.runtimes()}
        default = fingerprints.get(self.runtime.core.default_runtime)
        runtime_ready = default is not None and default.healthy
        network = self.runtime.core.network
        not_ready = (
            network.ready()
            if network is not None
            else None
            if self.pods.bridge
            else "the node's config has no [network] table: pods get only a loopback interface"
        )
        conditions = [
            cri.RuntimeCondition(
                type="RuntimeReady",
                status=runtime_ready,
                reason="" if runtime_ready else "RuntimeNotReady",
                message="" if runtime_ready else (default.message if default else "no runtime"),
            ),
            cri.RuntimeCondition(
                type="NetworkReady",
                status=not_ready is None,
                reason="" if not_ready is None else "NoNetwork",
                message=not_ready or "",
            ),
        ]
        info = {}
        if request.verbose:
            # How each runtime handler (RuntimeClass) runs a pod's containers.
            handlers = {name: pod_model(f.capabilities) for name, f in sorted(fingerprints.items())}
            info["config"] = json.dumps(
                {"runtimeHandlers": handlers, "podCIDR": self.runtime.pod_cidr}
            )
        return cri.StatusResponse(status=cri.RuntimeStatus(conditions=conditions), info=info)


def pod_model(capabilities: Capabilities) -> str:
    """What a pod is on a runtime, as its capabilities declare it."""
    if capabilities.single_container_pods:
        return "one container per pod (a VM): joins no namespaces, a second container is refused"
    if not capabilities.pods:
        return "no pods"
    holder = "its own container" if capabilities.pod_holder else "a native process"
    return f"containers share the pod's namespaces, held by {holder}"


def _required(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument(field, "is required")
    if len(value) > 128:
        raise InvalidArgument(field, "is too long")
    return value
