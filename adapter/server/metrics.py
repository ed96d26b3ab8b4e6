"""Prometheus metrics: the containers' usage under cAdvisor's names, and the service's own.

Container metrics are read at scrape time, from the same accounting Usage returns
(Containerizer.usage), by a collector made for that one scrape: nothing is kept up to date
between scrapes. The service's own (launches, destroys, launch latency, recoveries, RPC latency)
are counters and histograms fed by the core's lifecycle events and the RPC interceptor.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from adapter.core.containerizer import Containerizer
from adapter.core.errors import ContainerizerError
from adapter.core.events import Event
from adapter.core.model import Reason, State, Statistics
from adapter.core.state import ContainerRecord

CONTAINER_LABELS = ("id", "runtime", "image", "pod", "namespace")
# The labels a CRI container's LaunchSpec carries (adapter/cri/containers.py): any client that
# sets them gets its containers labelled by pod, and the core needs to know nothing of pods.
KUBERNETES_POD_LABELS = {
    "pod": "io.kubernetes.pod.name",
    "namespace": "io.kubernetes.pod.namespace",
}
LAUNCH_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

log = logging.getLogger(__name__)
LabelProvider = Callable[[ContainerRecord], dict[str, str]]


def kubernetes_pod_labels(record: ContainerRecord) -> dict[str, str]:
    """pod and namespace from a CRI container's Kubernetes labels; empty for others."""
    labels = dict(record.spec.labels)
    return {name: labels.get(key, "") for name, key in KUBERNETES_POD_LABELS.items()}


@dataclass(frozen=True)
class ContainerMetric:
    """One cAdvisor metric and how it is derived from a container's Statistics."""

    name: str
    help: str
    value: Callable[[Statistics], float | None]
    counter: bool = False


def _key(name: str) -> Callable[[Statistics], float | None]:
    return lambda stats: stats.get(name)


def _cpu_seconds(stats: Statistics) -> float | None:
    if "cpus_user_time_secs" not in stats:
        return None
    return stats["cpus_user_time_secs"] + stats.get("cpus_system_time_secs", 0)


def _working_set(stats: Statistics) -> float | None:
    """cAdvisor's working set: usage less the inactive page cache, which the kernel reclaims
    first under pressure."""
    if "mem_total_bytes" not in stats:
        return None
    return max(0, stats["mem_total_bytes"] - stats.get("mem_inactive_file_bytes", 0))


def _memory_limit(stats: Statistics) -> float | None:
    """0 when unlimited, as cAdvisor reports it (the accounting leaves the key out)."""
    return stats.get("mem_limit_bytes", 0) if "mem_total_bytes" in stats else None


CONTAINER_METRICS = (
    ContainerMetric(
        "container_cpu_usage_seconds_total", "Cumulative CPU time consumed.", _cpu_seconds, True
    ),
    ContainerMetric(
        "container_cpu_user_seconds_total",
        "Cumulative user CPU time.",
        _key("cpus_user_time_secs"),
        True,
    ),
    ContainerMetric(
        "container_cpu_system_seconds_total",
        "Cumulative system CPU time.",
        _key("cpus_system_time_secs"),
        True,
    ),
    ContainerMetric(
        "container_cpu_cfs_periods_total", "Elapsed CFS periods.", _key("cpus_nr_periods"), True
    ),
    ContainerMetric(
        "container_cpu_cfs_throttled_periods_total",
        "Throttled CFS periods.",
        _key("cpus_nr_throttled"),
        True,
    ),
    ContainerMetric(
        "container_cpu_cfs_throttled_seconds_total",
        "Total time the container was throttled.",
        _key("cpus_throttled_time_secs"),
        True,
    ),
    ContainerMetric(
        "container_memory_usage_bytes",
        "Current memory usage, cache included.",
        _key("mem_total_bytes"),
    ),
    ContainerMetric("container_memory_working_set_bytes", "Current working set.", _working_set),
    ContainerMetric(
        "container_memory_rss", "Anonymous and swap cache memory.", _key("mem_rss_bytes")
    ),
    ContainerMetric("container_memory_cache", "Page cache memory.", _key("mem_cache_bytes")),
    ContainerMetric(
        "container_memory_mapped_file", "Memory-mapped file bytes.", _key("mem_mapped_file_bytes")
    ),
    ContainerMetric("container_memory_swap", "Swap usage.", _key("mem_swap_bytes")),
    ContainerMetric("container_spec_memory_limit_bytes", "Memory limit (0: none).", _memory_limit),
    ContainerMetric(
        "container_spec_memory_reservation_limit_bytes",
        "Memory soft limit.",
        _key("mem_soft_limit_bytes"),
    ),
    ContainerMetric("container_processes", "Number of processes.", _key("processes")),
    ContainerMetric("container_threads", "Number of threads.", _key("threads")),
    ContainerMetric(
        "container_network_receive_bytes_total", "Bytes received.", _key("net_rx_bytes"), True
    ),
    ContainerMetric(
        "container_network_transmit_bytes_total", "Bytes transmitted.", _key("net_tx_bytes"), True
    ),
    ContainerMetric(
        "container_network_receive_packets_total", "Packets received.", _key("net_rx_packets"), True
    ),
    ContainerMetric(
        "container_network_transmit_packets_total",
        "Packets transmitted.",
        _key("net_tx_packets"),
        True,
    ),
    ContainerMetric(
        "container_network_receive_packets_dropped_total",
        "Received packets dropped.",
        _key("net_rx_dropped"),
        True,
    ),
    ContainerMetric(
        "container_network_transmit_packets_dropped_total",
        "Transmitted packets dropped.",
        _key("net_tx_dropped"),
        True,
    ),
    ContainerMetric(
        "container_network_receive_errors_total", "Receive errors.", _key("net_rx_errors"), True
    ),
    ContainerMetric(
        "container_network_transmit_errors_total", "Transmit errors.", _key("net_tx_errors"), True
    ),
)


@dataclass(frozen=True)
class ContainerSample:
    """What one scrape read of one container: its record and, when RUNNING, its usage."""

    record: ContainerRecord
    statistics: Statistics | None


class ContainerCollector(Collector):
    """The metric families of one scrape's samples; made per scrape, never registered.

    `text()` writes the same families in the text format itself: prometheus_client's writer
    escapes and validates every label of every sample, which for 500 containers costs more
    than reading their cgroup files; here each container's labels are escaped once. collect()
    is the reference text() is tested against, and what a registry would use."""

    def __init__(self, samples: list[ContainerSample], labels_of: LabelProvider) -> None:
        self._samples = samples
        self._labels_of = labels_of

    def collect(self) -> Iterator[Metric]:
        labelled = [(sample, self._label_values(sample.record)) for sample in self._samples]
        running = [(s.statistics, labels) for s, labels in labelled if s.statistics is not None]
        for metric in CONTAINER_METRICS:
            family = _family(metric.name, metric.help, metric.counter)
            for statistics, labels in running:
                value = metric.value(statistics)
                if value is not None:
                    family.add_metric(labels, value)
            yield family
        yield from self._record_families(labelled)

    def text(self) -> bytes:
        labelled = [
            (sample, _label_text(self._label_values(sample.record))) for sample in self._samples
        ]
        running = [(s.statistics, labels) for s, labels in labelled if s.statistics is not None]
        lines: list[str] = []
        for metric in CONTAINER_METRICS:
            lines += _head(metric.name, metric.help, metric.counter)
            for statistics, labels in running:
                value = metric.value(statistics)
                if value is not None:
                    lines.append(f"{metric.name}{labels} {float(value)!r}")
        lines += _head(*STARTED)
        lines += [f"{STARTED[0]}{labels} {s.record.launched_at!r}" for s, labels in labelled]
        lines += _head(*OOM_EVENTS)
        lines += [f"{OOM_EVENTS[0]}{labels} {float(_ooms(s.record))!r}" for s, labels in labelled]
        return ("\n".join(lines) + "\n").encode()

    def _record_families(
        self, labelled: list[tuple[ContainerSample, list[str]]]
    ) -> Iterator[Metric]:
        """What the records say, for every container the service still knows: when it
        started, and whether the kernel's OOM killer ended it (the memory isolator turns an
        OOM kill into the container's end, so there is at most one)."""
        started, ooms = _family(*STARTED), _family(*OOM_EVENTS)
        for sample, labels in labelled:
            started.add_metric(labels, sample.record.launched_at)
            ooms.add_metric(labels, _ooms(sample.record))
        yield started
        yield ooms

    def _label_values(self, record: ContainerRecord) -> list[str]:
        extra = self._labels_of(record)
        spec = record.spec
        pod, namespace = extra.get("pod", ""), extra.get("namespace", "")
        return [spec.container_id, spec.runtime, spec.image or "", pod, namespace]


STARTED = ("container_start_time_seconds", "Start time (Unix seconds).", False)
OOM_EVENTS = ("container_oom_events_total", "OOM kills of the container.", True)


def _ooms(record: ContainerRecord) -> int:
    termination = record.termination
    return int(termination is not None and termination.reason is Reason.LIMITATION_MEMORY)


# The text format's escapes: in label values backslash, quote and newline; in help text the
# same but the quote.
LABEL_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n"})
HELP_ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n"})


def _head(name: str, help_text: str, counter: bool) -> list[str]:
    kind = "counter" if counter else "gauge"
    return [f"# HELP {name} {help_text.translate(HELP_ESCAPES)}", f"# TYPE {name} {kind}"]


def _label_text(values: list[str]) -> str:
    """`{id="..",runtime="..",...}`, escaped once per container."""
    pairs = (
        f'{name}="{value.translate(LABEL_ESCAPES)}"'
        for name, value in zip(CONTAINER_LABELS, values, strict=True)
    )
    return "{" + ",".join(pairs) + "}"


def _family(name: str, help_text: str, counter: bool) -> CounterMetricFamily | GaugeMetricFamily:
    if counter:
        return CounterMetricFamily(name, help_text, labels=CONTAINER_LABELS)
    return GaugeMetricFamily(name, help_text, labels=CONTAINER_LABELS)


class ServiceMetrics:
    """The service's own metrics, in a registry of this service's (tests run several)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.launches = Counter(
            "containerizer_launches",
            "Container launches by runtime and outcome (success, failure).",
            ("runtime", "outcome"),
            registry=self.registry,
        )
        self.destroys = Counter(
            "containerizer_destroys",
            "Destroyed containers by runtime and outcome (the termination's reason).",
            ("runtime", "outcome"),
            registry=self.registry,
        )
        self.launch_seconds = Histogram(
            "containerizer_launch_duration_seconds",
            "From Launch accepted to the container RUNNING.",
            ("runtime",),
            buckets=LAUNCH_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.recoveries = Counter(
            "containerizer_recoveries", "Recoveries of checkpointed state.", registry=self.registry
        )
        self.rpc_seconds = Histogram(
            "containerizer_rpc_duration_seconds",
            "gRPC call latency by method and status code (a stream: until it ended).",
            ("method", "code"),
            registry=self.registry,
        )
        self._launching: dict[str, float] = {}
        self._destroying: set[str] = set()

    def observe(self, event: Event) -> None:
        """An EventHub observer: launches, their latency and destroys, from the transitions."""
        cid = event.container_id
        if event.state is State.LAUNCHING:
            self._launching[cid] = event.timestamp
        elif event.state is State.RUNNING and event.termination is None:
            started = self._launching.pop(cid, None)
            if started is not None:
                self.launches.labels(event.runtime, "success").inc()
                self.launch_seconds.labels(event.runtime).observe(event.timestamp - started)
        elif event.state is State.DESTROYING:
            self._destroying.add(cid)
        elif event.state is State.TERMINATED:
            self._terminated(event)

    def _terminated(self, event: Event) -> None:
        cid = event.container_id
        self._launching.pop(cid, None)
        reason = event.termination.reason if event.termination else Reason.LOST
        if reason is Reason.LAUNCH_FAILED:
            self.launches.labels(event.runtime, "failure").inc()
        if cid in self._destroying or reason is Reason.DESTROYED:
            self._destroying.discard(cid)
            self.destroys.labels(event.runtime, reason.value.lower()).inc()


async def read_samples(core: Containerizer) -> list[ContainerSample]:
    """Every known container; the usage of the RUNNING ones, read concurrently (a runtime's
    usage may be an RPC). One that ends meanwhile is reported without usage."""
    records = core.containers()
    running = [r for r in records if r.state is State.RUNNING]
    usages = await asyncio.gather(
        *(core.usage(r.container_id) for r in running), return_exceptions=True
    )
    by_id = dict(zip((r.container_id for r in running), usages, strict=True))
    samples = []
    for record in records:
        usage = by_id.get(record.container_id)
        if isinstance(usage, BaseException):
            if not isinstance(usage, ContainerizerError):  # a runtime's fault: not the scrape's
                log.warning("usage of %s failed", record.container_id, exc_info=usage)
            usage = None
        samples.append(ContainerSample(record, usage))
    return samples


async def scrape(core: Containerizer, service: ServiceMetrics, labels_of: LabelProvider) -> bytes:
    """The Prometheus text exposition of one scrape."""
    samples = await read_samples(core)
    return generate_latest(service.registry) + ContainerCollector(samples, labels_of).text()
