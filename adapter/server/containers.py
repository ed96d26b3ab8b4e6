"""The Containerizer gRPC servicer: a thin façade that validates, delegates to the core, converts.

Errors are mapped once, by class (adapter/server/errors.py); no Python traceback crosses the API.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.api.containerizer.v1 import containerizer_pb2_grpc as pb_grpc
from adapter.core import errors
from adapter.core.containerizer import Containerizer
from adapter.core.events import Event, Missed
from adapter.core.model import (
    Fingerprint,
    Resources,
    State,
    Statistics,
    Termination,
    is_finite_non_negative,
)
from adapter.core.state import ContainerRecord
from adapter.server import validation
from adapter.server.attach import serve_attach
from adapter.server.errors import mapped_errors, mapped_stream_errors
from adapter.server.exec import serve_exec
from adapter.server.logs import serve_logs
from adapter.server.portforward import serve_port_forward

log = logging.getLogger(__name__)

# A Containers reply stays this far under gRPC's default 4 MiB receive limit, whatever the
# number of containers: a status is at most ~70 KiB (labels are bounded at Launch).
MAX_PAGE_BYTES = 1024 * 1024


class ContainerizerService(pb_grpc.ContainerizerServicer):
    def __init__(
        self, core: Containerizer, sandbox_root: Path, *, state_dir: Path | None = None
    ) -> None:
        self._core = core
        self._sandbox_root = sandbox_root
        self._state_dir = state_dir

    @mapped_errors
    async def Launch(self, request: pb.LaunchRequest, context: Any) -> pb.LaunchResponse:
        cid = validation.container_id(request.container_id)
        in_use = [
            r.spec.sandbox
            for r in self._core.containers()
            if r.state is not State.TERMINATED and r.container_id != cid
        ]
        spec, warnings = validation.launch_spec(
            request,
            default_runtime=self._core.default_runtime,
            default_sandbox=str(self._sandbox_root / cid),
            state_dir=str(self._state_dir) if self._state_dir else None,
            sandboxes_in_use=in_use,
        )
        if cid in self._core.quarantined_ids():
            # Its processes may still run: reusing the id would take over their cgroups.
            raise errors.AlreadyExists(
                f"container {cid!r} has a damaged record set aside in quarantine (see `runtimes`)"
            )
        record = await self._core.launch(spec, warnings)
        return pb.LaunchResponse(status=to_status(record), warnings=list(record.warnings))

    @mapped_errors
    async def Update(self, request: pb.UpdateRequest, context: Any) -> pb.UpdateResponse:
        cid = validation.container_id(request.container_id)
        resources, warnings = validation.resources(request.resources)
        if resources.ports:  # port forwards are set up at launch only
            raise errors.InvalidArgument("resources[ports]", "cannot change on a running container")
        await self._core.update(cid, resources)
        return pb.UpdateResponse(warnings=list(warnings))

    @mapped_errors
    async def Usage(self, request: pb.UsageRequest, context: Any) -> pb.UsageResponse:
        cid = validation.container_id(request.container_id)
        return pb.UsageResponse(statistics=to_statistics(await self._core.usage(cid)))

    @mapped_errors
    async def Status(self, request: pb.StatusRequest, context: Any) -> pb.ContainerStatus:
        cid = validation.container_id(request.container_id)
        return to_status(self._core.status(cid))

    @mapped_errors
    async def Wait(self, request: pb.WaitRequest, context: Any) -> pb.WaitResponse:
        cid = validation.container_id(request.container_id)
        return pb.WaitResponse(termination=to_termination(await self._core.wait(cid)))

    @mapped_errors
    async def Kill(self, request: pb.KillRequest, context: Any) -> pb.KillResponse:
        cid = validation.container_id(request.container_id)
        await self._core.kill(cid, validation.signal_number(request.signal))
        return pb.KillResponse()

    @mapped_errors
    async def Destroy(self, request: pb.DestroyRequest, context: Any) -> pb.DestroyResponse:
        cid = validation.container_id(request.container_id)
        return pb.DestroyResponse(termination=to_termination(await self._core.destroy(cid)))

    @mapped_errors
    async def Containers(
        self, request: pb.ContainersRequest, context: Any
    ) -> pb.ContainersResponse:
        if request.page_size < 0:
            raise errors.InvalidArgument("page_size", f"must be >= 0, got {request.page_size}")
        after = request.page_token
        if after:
            validation.container_id(after, "page_token")
        records = sorted(
            (r for r in self._core.containers() if r.container_id > after),
            key=lambda r: r.container_id,
        )
        return containers_page(records, request.page_size or len(records))

    @mapped_errors
    async def Runtimes(self, request: pb.RuntimesRequest, context: Any) -> pb.RuntimesResponse:
        fingerprints = await self._core.runtimes()
        return pb.RuntimesResponse(
            runtimes=[to_runtime(f, f.name == self._core.default_runtime) for f in fingerprints],
            quarantined=[
                pb.QuarantinedRecord(
                    container_id=q.container_id, error=q.error, quarantined_at=q.quarantined_at
                )
                for q in self._core.quarantined()
            ],
        )

    async def Events(self, request: pb.EventsRequest, context: Any) -> AsyncIterator[pb.Event]:
        cid = request.container_id
        if cid:
            try:
                validation.container_id(cid)
            except errors.InvalidArgument as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        since = request.since
        if since and not is_finite_non_negative(since):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"since: {since} is no time")
        async for event in self._core.events(cid or None, since or None):
            yield to_event(event)

    @mapped_stream_errors
    async def Logs(self, request: pb.LogsRequest, context: Any) -> AsyncIterator[pb.LogEntry]:
        async for entry in serve_logs(self._core, request):
            yield entry

    @mapped_stream_errors
    async def PortForward(
        self, request_iterator: AsyncIterator[pb.PortForwardRequest], context: Any
    ) -> AsyncIterator[pb.PortForwardResponse]:
        async for reply in serve_port_forward(self._core, request_iterator):
            yield reply

    @mapped_stream_errors
    async def Attach(
        self, request_iterator: AsyncIterator[pb.AttachRequest], context: Any
    ) -> AsyncIterator[pb.AttachResponse]:
        async for reply in serve_attach(self._core, request_iterator):
            yield reply

    @mapped_stream_errors
    async def Exec(
        self, request_iterator: AsyncIterator[pb.ExecRequest], context: Any
    ) -> AsyncIterator[pb.ExecResponse]:
        async for reply in serve_exec(self._core, request_iterator):
            yield reply


# ---- domain -> API ----


def containers_page(records: list[ContainerRecord], page_size: int) -> pb.ContainersResponse:
    """The first records (in id order) that fit both the page size and MAX_PAGE_BYTES; the
    token names the last one sent, so the next page starts after it even if containers come
    and go in between."""
    reply = pb.ContainersResponse()
    size = 0
    for record in records[:page_size]:
        status = to_status(record)
        size += status.ByteSize() + 8  # the field's tag and length
        if reply.containers and size > MAX_PAGE_BYTES:
            break
        reply.containers.append(status)
    if len(reply.containers) < len(records):
        reply.next_page_token = reply.containers[-1].container_id
    return reply


def to_termination(termination: Termination) -> pb.Termination:
    message = pb.Termination(
        status=termination.status,
        killed=termination.killed,
        reason=pb.Reason.Value(termination.reason.value),
        message=termination.message,
        limited_resources=list(termination.limited_resources),
        finished_at=termination.finished_at,
    )
    if termination.exit_code is not None:
        message.exit_code = termination.exit_code
    if termination.signal is not None:
        message.signal = termination.signal
    return message


def to_resources(resources: Resources) -> list[pb.Resource]:
    values = {
        "cpus": resources.cpus,
        "mem": resources.mem_mib,
        "disk": resources.disk_mib,
        "pids": resources.pids,
    }
    scalars = [
        pb.Resource(name=name, type=pb.Value.SCALAR, scalar=pb.Value.Scalar(value=float(value)))
        for name, value in values.items()
        if value is not None
    ]
    if resources.network_bandwidth is not None:
        scalars.append(
            pb.Resource(
                name="network_bandwidth",
                type=pb.Value.SCALAR,
                scalar=pb.Value.Scalar(value=resources.network_bandwidth),
            )
        )
    if resources.ports:
        ranges = [pb.Value.Range(begin=begin, end=end) for begin, end in resources.ports]
        scalars.append(
            pb.Resource(name="ports", type=pb.Value.RANGES, ranges=pb.Value.Ranges(range=ranges))
        )
    return scalars


def to_status(record: ContainerRecord) -> pb.ContainerStatus:
    spec = record.spec
    status = pb.ContainerStatus(
        container_id=spec.container_id,
        runtime=spec.runtime,
        state=pb.State.Value(record.state.value),
        pid=record.pid,
        launched_at=record.launched_at,
        image=spec.image or "",
        sandbox=spec.sandbox,
        labels=dict(spec.labels),
        resources=to_resources(spec.resources),
        ip_address=record.ip_address,
    )
    if record.state is State.TERMINATED and record.termination is not None:
        status.termination.CopyFrom(to_termination(record.termination))
    return status


def to_statistics(statistics: Statistics) -> pb.ResourceStatistics:
    known = pb.ResourceStatistics.DESCRIPTOR.fields_by_name
    fields: dict[str, Any] = {k: v for k, v in statistics.items() if k in known}
    return pb.ResourceStatistics(**fields)


def to_runtime(fingerprint: Fingerprint, is_default: bool) -> pb.RuntimeInfo:
    caps = fingerprint.capabilities
    return pb.RuntimeInfo(
        name=fingerprint.name,
        version=fingerprint.version,
        healthy=fingerprint.healthy,
        message=fingerprint.message,
        is_default=is_default,
        confinement=fingerprint.confinement,
        capabilities=pb.Capabilities(
            images=caps.images,
            live_update=caps.live_update,
            oom_detection=caps.oom_detection,
            pid_namespace=caps.pid_namespace,
            recover=caps.recover,
            network_isolation=caps.network_isolation,
            pods=caps.pods,
            user_namespace=caps.user_namespace,
        ),
    )


def to_event(event: Event | Missed) -> pb.Event:
    if isinstance(event, Missed):
        return pb.Event(missed=event.count)
    message = pb.Event(
        timestamp=event.timestamp,
        container_id=event.container_id,
        state=pb.State.Value(event.state.value),
        runtime=event.runtime,
    )
    if event.termination is not None:
        message.termination.CopyFrom(to_termination(event.termination))
    return message
