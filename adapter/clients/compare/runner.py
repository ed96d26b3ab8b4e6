"""Runs the comparison through the API: which runtimes to measure, latency, density, then the
isolation and accounting probes, each runtime in turn (never two at once, so they do not steal
cpu and memory from each other's numbers).

Discovery is the service's own answer: Runtimes says what is configured and healthy, with its
capabilities. A requested runtime missing from that answer, or unhealthy, is reported with the
reason and not measured. A section that fails is reported with its error and the run goes on.
Every container launched is removed before the runtime's turn ends, also on Ctrl-C.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

from adapter.clients.compare import probes
from adapter.clients.compare.host import (
    ServiceProcess,
    find_service_process,
    host_facts,
    mem_available_bytes,
)
from adapter.clients.compare.progress import Progress
from adapter.clients.compare.results import (
    CompareReport,
    Density,
    Latencies,
    RuntimeReport,
    Settings,
)
from adapter.clients.compare.session import (
    RpcFailure,
    RuntimeSession,
    ServiceCalls,
    owner_token,
    sweep_orphans,
)
from adapter.clients.compare.workloads import IDLE, TRUE, Workload

if TYPE_CHECKING:
    from adapter.api.containerizer.v1 import containerizer_pb2 as pb

# Give up on a latency series when this many runs in a row failed without one success: the
# runtime is broken (missing image, ...), and waiting for N timeouts would only hide that.
MAX_FAILURES_BEFORE_SUCCESS = 3
# Threads for the density waves: past this many, launches queue (the report still times them).
MAX_PARALLEL_LAUNCHES = 64
# Idle containers settle (runtimes finish their setup, pages are faulted in) before the memory
# they cost is read.
DENSITY_SETTLE_SECONDS = 1.0
# The idle workload under its own purpose, so the density containers are found by id prefix.
DENSITY = replace(IDLE, purpose="density")
PROBES = 5  # progress units: 3 isolation checks + 2 accounting measurements
SECTION_ERRORS = (RpcFailure, probes.Unmeasurable, OSError)

Measured = TypeVar("Measured")


def capabilities_of(info: pb.RuntimeInfo) -> dict[str, bool]:
    return {
        descriptor.name: bool(getattr(info.capabilities, descriptor.name))
        for descriptor in info.capabilities.DESCRIPTOR.fields
    }


def discover(calls: ServiceCalls, requested: tuple[str, ...]) -> list[RuntimeReport]:
    """One entry per requested runtime, available or with the reason it is not."""
    from adapter.api.containerizer.v1 import containerizer_pb2 as pb

    configured = {info.name: info for info in calls.call("Runtimes", pb.RuntimesRequest()).runtimes}
    reports = []
    for name in requested:
        info = configured.get(name)
        if info is None:
            known = ", ".join(sorted(configured)) or "none"
            reports.append(
                RuntimeReport(
                    name,
                    available=False,
                    reason=f"not configured on this node: the service config has no "
                    f"[runtimes.{name}] table (configured: {known})",
                )
            )
            continue
        report = RuntimeReport(
            name,
            available=info.healthy,
            reason="" if info.healthy else f"unhealthy: {info.message or 'no reason given'}",
            version=info.version,
            message=info.message,
            is_default=info.is_default,
            capabilities=capabilities_of(info),
        )
        reports.append(report)
    return reports


@dataclass(frozen=True)
class CompareOptions:
    runtimes: tuple[str, ...]
    runs: int
    density: int
    image: str
    target: str  # the grpc target of the service


class CompareRunner:
    def __init__(self, calls: ServiceCalls, options: CompareOptions, progress: Progress) -> None:
        self.calls = calls
        self.options = options
        self.progress = progress
        self.owner = owner_token()

    def run(self) -> CompareReport:
        options = self.options
        settings = Settings(
            options.target, options.runs, options.density, options.image, options.runtimes
        )
        report = CompareReport(settings, started_at=time.time(), host=host_facts())
        began = time.monotonic()
        sweep_orphans(self.calls)
        report.runtimes = discover(self.calls, options.runtimes)
        available = [runtime for runtime in report.runtimes if runtime.available]
        self.progress.expect(len(available) * (2 * options.runs + 2 * options.density + PROBES))
        service = find_service_process(options.target)
        for runtime in available:
            self.measure(runtime, service)
        self.progress.finish()
        report.duration_seconds = time.monotonic() - began
        return report

    def measure(self, runtime: RuntimeReport, service: ServiceProcess) -> None:
        capabilities = runtime.capabilities or {}
        image = self.options.image if capabilities.get("images") else ""
        runtime.root = f"image {image}" if image else "host filesystem"
        session = RuntimeSession(self.calls, runtime.name, image, self.owner)
        name = runtime.name
        try:
            self.progress.stage(f"{name}: latency ({self.options.runs} runs)")
            runtime.latency = self.section(runtime, "latency", lambda: self.latency(session))
            self.progress.stage(f"{name}: density ({self.options.density} containers)")
            runtime.density = self.section(
                runtime, "density", lambda: self.density(session, service)
            )
            self.progress.stage(f"{name}: isolation")
            runtime.isolation = self.checks(
                runtime,
                "isolation",
                {
                    "memory": probes.check_memory_limit,
                    "cpu": probes.check_cpu_limit,
                    "pids": probes.check_pids_limit,
                },
                session,
            )
            self.progress.stage(f"{name}: accounting")
            runtime.accounting = self.checks(
                runtime,
                "accounting",
                {
                    "cpu": probes.measure_cpu_accounting,
                    "memory": probes.measure_memory_accounting,
                },
                session,
            )
        finally:
            if stuck := session.remove_all():
                runtime.errors["cleanup"] = f"could not remove: {', '.join(stuck)}"

    def section(
        self, runtime: RuntimeReport, name: str, measure: Callable[[], Measured]
    ) -> Measured | None:
        try:
            return measure()
        except SECTION_ERRORS as exc:
            runtime.errors[name] = str(exc)
            return None

    def checks(
        self,
        runtime: RuntimeReport,
        section: str,
        probes_by_name: dict[str, Callable[[RuntimeSession], Any]],
        session: RuntimeSession,
    ) -> dict[str, Any]:
        results = {}
        for name, probe in probes_by_name.items():
            result = self.section(runtime, f"{section}.{name}", functools.partial(probe, session))
            if result is not None:
                results[name] = result
            self.progress.advance()
        return results

    # ---- latency ----

    def latency(self, session: RuntimeSession) -> dict[str, Latencies]:
        lifecycles = self.series(lambda: self.lifecycle_run(session))
        teardowns = self.series(lambda: self.teardown_run(session))
        launch = tuple(launched - started for started, launched, _ in lifecycles.samples)
        lifecycle = tuple(ended - started for started, _, ended in lifecycles.samples)
        return {
            "launch": Latencies(launch, lifecycles.failures),
            "lifecycle": Latencies(lifecycle, lifecycles.failures),
            "teardown": Latencies(tuple(teardowns.samples), teardowns.failures),
        }

    def series(self, run_once: Callable[[], Any]) -> _Series:
        """`runs` runs of one measurement; a failed run is counted, not fatal, unless no run
        succeeds at all."""
        series = _Series()
        for _ in range(self.options.runs):
            try:
                series.samples.append(run_once())
            except RpcFailure:
                series.failures += 1
                if not series.samples and series.failures >= MAX_FAILURES_BEFORE_SUCCESS:
                    raise
            finally:
                self.progress.advance()
        return series

    def lifecycle_run(self, session: RuntimeSession) -> tuple[float, float, float]:
        """Launch /bin/true, wait for it, acknowledge it: what a task that does nothing costs."""
        started = time.perf_counter()
        container_id = session.launch(TRUE).container_id
        launched = time.perf_counter()
        try:
            session.wait(container_id)
            session.destroy(container_id)
            ended = time.perf_counter()
        finally:
            session.remove(container_id)
        return started, launched, ended

    def teardown_run(self, session: RuntimeSession) -> float:
        """Destroy of a running sleeper, until the service says it is gone."""
        container_id = session.launch(IDLE).container_id
        try:
            started = time.perf_counter()
            session.destroy(container_id)
            return time.perf_counter() - started
        finally:
            session.remove(container_id)

    # ---- density ----

    def density(self, session: RuntimeSession, service: ServiceProcess) -> Density:
        count = self.options.density
        # Ids are chosen up front so a launch that fails is removed like one that worked.
        ids = [session.new_id(DENSITY.purpose) for _ in range(count)]
        rss_before = service.rss_bytes()
        available_before = mem_available_bytes()
        started = time.perf_counter()
        launched, errors = self.parallel(
            count, lambda index: launch_as(session, DENSITY, ids[index])
        )
        launch_seconds = time.perf_counter() - started
        time.sleep(DENSITY_SETTLE_SECONDS)
        available_after = mem_available_bytes()
        rss_with_containers = service.rss_bytes()
        started = time.perf_counter()
        self.parallel(len(launched), lambda index: session.destroy(launched[index]))
        destroy_seconds = time.perf_counter() - started
        for container_id in ids:
            session.remove(container_id)  # drop the retained terminations too
        per_container = None
        if available_before is not None and available_after is not None and launched:
            per_container = (available_before - available_after) / len(launched)
        return Density(
            containers=count,
            launched=len(launched),
            launch_seconds=launch_seconds,
            destroy_seconds=destroy_seconds,
            host_memory_per_container_bytes=per_container,
            service_rss_before_bytes=rss_before,
            service_rss_with_containers_bytes=rss_with_containers,
            service_memory_source=service.source,
            leftovers=self.still_listed(session.id_prefix(DENSITY.purpose)),
            launch_errors=tuple(sorted(set(errors))),
        )

    def parallel(
        self, count: int, call: Callable[[int], Measured]
    ) -> tuple[list[Measured], list[str]]:
        """`count` calls at once; results of those that succeeded, and the errors of the rest."""
        results: list[Measured] = []
        errors: list[str] = []
        with ThreadPoolExecutor(max_workers=min(max(count, 1), MAX_PARALLEL_LAUNCHES)) as pool:
            futures = [pool.submit(call, index) for index in range(count)]
            for future in as_completed(futures):
                try:
                    results.append(future.result())
                except RpcFailure as exc:
                    errors.append(str(exc))
                self.progress.advance()
        return results, errors

    def still_listed(self, id_prefix: str) -> tuple[str, ...]:
        """Ids starting with `id_prefix` that the service still lists."""
        from adapter.api.containerizer.v1 import containerizer_pb2 as pb

        listed = self.calls.call("Containers", pb.ContainersRequest()).containers
        return tuple(sorted(s.container_id for s in listed if s.container_id.startswith(id_prefix)))


def launch_as(session: RuntimeSession, workload: Workload, container_id: str) -> str:
    return session.launch(workload, container_id).container_id


@dataclass
class _Series:
    samples: list[Any] = field(default_factory=list)
    failures: int = 0
