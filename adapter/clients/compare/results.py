"""What `containerizer compare` measured, as plain data, and the JSON shape of it.

Nothing here talks to the service: the runner fills these records, report.py renders them, and
unit tests build them by hand. Times are kept in seconds and rendered in milliseconds; memory in
bytes. A section that could not be measured is None, with the reason in `errors`, so a reader
always learns why a number is missing.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# Every runtime entry of the JSON report carries each of these keys, measured or not.
SECTIONS = ("capabilities", "latency", "density", "isolation", "accounting")
LATENCY_KINDS = ("launch", "lifecycle", "teardown")
PERCENTILES = (50, 95, 99)
ISOLATION_CHECKS = ("memory", "cpu", "pids")
ACCOUNTING_CHECKS = ("cpu", "memory")
# What one runtime can fail to measure, each on its own: `compare` fails when none measured one.
MEASUREMENTS = (
    "latency",
    "density",
    *(f"isolation.{check}" for check in ISOLATION_CHECKS),
    *(f"accounting.{check}" for check in ACCOUNTING_CHECKS),
)


def percentile(samples: Sequence[float], rank: float) -> float:
    """The `rank`-th percentile (0-100) with linear interpolation between the closest ranks,
    numpy's default method, so the numbers match what an analyst recomputes from the samples."""
    if not samples:
        raise ValueError("percentile of no samples")
    if not 0 <= rank <= 100:
        raise ValueError(f"percentile rank must be within 0..100, got {rank}")
    ordered = sorted(samples)
    position = (len(ordered) - 1) * rank / 100
    lower = math.floor(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


@dataclass(frozen=True)
class Latencies:
    """Durations of one operation, in seconds, one per run that succeeded."""

    samples: tuple[float, ...]
    failures: int = 0

    def milliseconds(self, rank: float) -> float:
        return percentile(self.samples, rank) * 1000

    def to_dict(self) -> dict[str, Any]:
        summary: dict[str, Any] = {"count": len(self.samples), "failures": self.failures}
        if self.samples:
            for rank in PERCENTILES:
                summary[f"p{rank}_ms"] = round(self.milliseconds(rank), 3)
            summary["min_ms"] = round(min(self.samples) * 1000, 3)
            summary["max_ms"] = round(max(self.samples) * 1000, 3)
        summary["samples_ms"] = [round(sample * 1000, 3) for sample in self.samples]
        return summary


@dataclass(frozen=True)
class Density:
    """N idle containers launched at once, measured, then destroyed at once."""

    containers: int
    launched: int
    launch_seconds: float
    destroy_seconds: float
    # MemAvailable before minus after, divided by the containers that run: what the node pays.
    host_memory_per_container_bytes: float | None
    service_rss_before_bytes: int | None
    service_rss_with_containers_bytes: int | None
    # How the service process was found (e.g. "pid 42 via SO_PEERCRED"), or why it was not.
    service_memory_source: str
    # Ids the service still listed after the destroy wave: must be empty.
    leftovers: tuple[str, ...] = ()
    launch_errors: tuple[str, ...] = ()

    @property
    def service_rss_per_container_bytes(self) -> float | None:
        if (
            self.service_rss_before_bytes is None
            or self.service_rss_with_containers_bytes is None
            or not self.launched
        ):
            return None
        growth = self.service_rss_with_containers_bytes - self.service_rss_before_bytes
        return growth / self.launched

    def to_dict(self) -> dict[str, Any]:
        return {
            "containers": self.containers,
            "launched": self.launched,
            "launch_seconds": round(self.launch_seconds, 4),
            "destroy_seconds": round(self.destroy_seconds, 4),
            "host_memory_per_container_bytes": _rounded(self.host_memory_per_container_bytes),
            "service_rss_before_bytes": self.service_rss_before_bytes,
            "service_rss_with_containers_bytes": self.service_rss_with_containers_bytes,
            "service_rss_per_container_bytes": _rounded(self.service_rss_per_container_bytes),
            "service_memory_source": self.service_memory_source,
            "leftovers": list(self.leftovers),
            "nothing_left": not self.leftovers,
            "launch_errors": list(self.launch_errors),
        }


class Verdict(enum.Enum):
    ENFORCED = "enforced"
    NOT_ENFORCED = "not enforced"
    # The runtime reports nothing the check could be decided on.
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class LimitCheck:
    """Whether one limit held, with the numbers it was decided on."""

    verdict: Verdict
    detail: str
    measured: float | None = None
    expected: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict.value,
            "detail": self.detail,
            "measured": _rounded(self.measured),
            "expected": _rounded(self.expected),
        }


@dataclass(frozen=True)
class Accuracy:
    """A reported number next to the known truth it should equal."""

    reported: float
    expected: float
    # What `expected` is: e.g. "the workload's own rusage" or "wall time of the busy loop".
    reference: str
    tolerance: float  # relative, e.g. 0.15 for +-15 %
    detail: str = ""

    @property
    def ratio(self) -> float:
        return self.reported / self.expected if self.expected else math.inf

    @property
    def within_tolerance(self) -> bool:
        return abs(self.ratio - 1) <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {
            "reported": _rounded(self.reported),
            "expected": _rounded(self.expected),
            "reference": self.reference,
            "ratio": _rounded(self.ratio),
            "tolerance": self.tolerance,
            "within_tolerance": self.within_tolerance,
            "detail": self.detail,
        }


@dataclass
class RuntimeReport:
    """Everything compare learned about one runtime; `reason` says why it was not measured."""

    name: str
    available: bool
    reason: str = ""
    version: str = ""
    message: str = ""
    is_default: bool = False
    capabilities: dict[str, bool] | None = None
    # What the workloads ran in: "image REF" or "host filesystem".
    root: str = ""
    latency: dict[str, Latencies] | None = None
    density: Density | None = None
    isolation: dict[str, LimitCheck] | None = None
    accounting: dict[str, Accuracy] | None = None
    # section (or "section.check") -> why it has no numbers
    errors: dict[str, str] = field(default_factory=dict)

    def measured(self) -> set[str]:
        """The MEASUREMENTS this runtime has numbers (or a verdict) for: a latency series without
        one successful run, or a density wave in which no container started, measured nothing."""
        done = set()
        if self.latency and any(series.samples for series in self.latency.values()):
            done.add("latency")
        if self.density and self.density.launched:
            done.add("density")
        done |= {f"isolation.{check}" for check in self.isolation or {}}
        done |= {f"accounting.{check}" for check in self.accounting or {}}
        return done

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "available": self.available,
            "reason": self.reason,
            "version": self.version,
            "message": self.message,
            "is_default": self.is_default,
            "root": self.root,
            "capabilities": self.capabilities,
            "latency": _mapped(self.latency),
            "density": self.density.to_dict() if self.density else None,
            "isolation": _mapped(self.isolation),
            "accounting": _mapped(self.accounting),
            "errors": dict(self.errors),
        }


@dataclass(frozen=True)
class Settings:
    endpoint: str
    runs: int
    density: int
    image: str
    runtimes: tuple[str, ...]


@dataclass
class CompareReport:
    settings: Settings
    started_at: float
    duration_seconds: float = 0.0
    host: dict[str, Any] = field(default_factory=dict)
    runtimes: list[RuntimeReport] = field(default_factory=list)

    def unmeasured(self) -> list[str]:
        """The MEASUREMENTS no runtime produced, in report order: what this run cannot answer."""
        done = set().union(*(runtime.measured() for runtime in self.runtimes))
        return [name for name in MEASUREMENTS if name not in done]

    def to_dict(self) -> dict[str, Any]:
        settings = self.settings
        return {
            "settings": {
                "endpoint": settings.endpoint,
                "runs": settings.runs,
                "density": settings.density,
                "image": settings.image,
                "runtimes": list(settings.runtimes),
            },
            "started_at": self.started_at,
            "duration_seconds": round(self.duration_seconds, 3),
            "host": dict(self.host),
            "runtimes": [runtime.to_dict() for runtime in self.runtimes],
            "unmeasured": self.unmeasured(),
        }


def _rounded(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(value, 4)


def _mapped(checks: dict[str, Any] | None) -> dict[str, Any] | None:
    if checks is None:
        return None
    return {name: check.to_dict() for name, check in checks.items()}
