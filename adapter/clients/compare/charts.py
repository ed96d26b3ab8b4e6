"""The charts of the HTML report, as PNG bytes.

matplotlib is imported here only, and only when --html asks for charts, so the command stays
quick (and works without matplotlib) otherwise. Figures are built with matplotlib.figure.Figure,
which renders through Agg without pyplot's global state or a display.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

from adapter.clients.compare.results import (
    ACCOUNTING_CHECKS,
    LATENCY_KINDS,
    PERCENTILES,
    CompareReport,
    RuntimeReport,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MIB = 1024 * 1024
BAR_WIDTH = 0.8
DPI = 100


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return buffer.getvalue()


def _figure(columns: int, height: float = 3.6) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(4.2 * columns, height), layout="constrained")


def _runtime_axis(ax: Axes, names: list[str]) -> None:
    """One tick per runtime, with room on both sides so a lone runtime is not one wide block."""
    ax.set_xticks(range(len(names)), names)
    ax.set_xlim(-0.6, len(names) - 0.4)


def latency_chart(runtimes: list[RuntimeReport]) -> bytes | None:
    """p50/p95/p99 bars per runtime, one panel per operation."""
    measured = [runtime for runtime in runtimes if runtime.latency]
    if not measured:
        return None
    figure = _figure(len(LATENCY_KINDS))
    axes = figure.subplots(1, len(LATENCY_KINDS), squeeze=False)[0]
    width = BAR_WIDTH / len(PERCENTILES)
    for ax, kind in zip(axes, LATENCY_KINDS, strict=True):
        for offset, rank in enumerate(PERCENTILES):
            positions = [index + (offset - 1) * width for index in range(len(measured))]
            values = []
            for runtime in measured:
                assert runtime.latency is not None
                series = runtime.latency[kind]
                values.append(series.milliseconds(rank) if series.samples else 0.0)
            ax.bar(positions, values, width, label=f"p{rank}")
        _runtime_axis(ax, [runtime.name for runtime in measured])
        ax.set_title(kind)
        ax.set_ylabel("ms")
    axes[0].legend()
    return _png(figure)


def lifecycle_distribution_chart(runtimes: list[RuntimeReport]) -> bytes | None:
    """Every lifecycle sample per runtime: the spread the percentiles summarise."""
    measured = [r for r in runtimes if r.latency and r.latency["lifecycle"].samples]
    if not measured:
        return None
    figure = _figure(1)
    ax = figure.subplots()
    samples = []
    for runtime in measured:
        assert runtime.latency is not None
        samples.append([value * 1000 for value in runtime.latency["lifecycle"].samples])
    ax.boxplot(samples, tick_labels=[runtime.name for runtime in measured])
    ax.set_title("lifecycle of /bin/true")
    ax.set_ylabel("ms")
    return _png(figure)


def density_chart(runtimes: list[RuntimeReport]) -> bytes | None:
    """Time for the launch and destroy waves, and what each container costs in memory."""
    measured = [runtime for runtime in runtimes if runtime.density]
    if not measured:
        return None
    names = [runtime.name for runtime in measured]
    figure = _figure(2)
    times_ax, memory_ax = figure.subplots(1, 2)
    half = BAR_WIDTH / 2
    left = [index - half / 2 for index in range(len(measured))]
    right = [index + half / 2 for index in range(len(measured))]
    densities = [runtime.density for runtime in measured if runtime.density]
    times_ax.bar(left, [d.launch_seconds for d in densities], half, label="launch all")
    times_ax.bar(right, [d.destroy_seconds for d in densities], half, label="destroy all")
    _runtime_axis(times_ax, names)
    times_ax.set_ylabel("s")
    times_ax.set_title(f"{densities[0].containers} idle containers")
    times_ax.legend()
    host = [(d.host_memory_per_container_bytes or 0) / MIB for d in densities]
    service = [(d.service_rss_per_container_bytes or 0) / MIB for d in densities]
    memory_ax.bar(left, host, half, label="host (MemAvailable drop)")
    memory_ax.bar(right, service, half, label="service RSS growth")
    _runtime_axis(memory_ax, names)
    memory_ax.set_ylabel("MiB per container")
    memory_ax.set_title("memory per container")
    memory_ax.legend()
    return _png(figure)


def accounting_chart(runtimes: list[RuntimeReport]) -> bytes | None:
    """Reported / expected per measurement; the band is the tolerance around a perfect 1."""
    measured = [runtime for runtime in runtimes if runtime.accounting]
    if not measured:
        return None
    figure = _figure(len(ACCOUNTING_CHECKS))
    axes = figure.subplots(1, len(ACCOUNTING_CHECKS), squeeze=False)[0]
    for ax, check in zip(axes, ACCOUNTING_CHECKS, strict=True):
        ratios = []
        tolerance = 0.0
        for runtime in measured:
            assert runtime.accounting is not None
            result = runtime.accounting.get(check)
            ratios.append(result.ratio if result else 0.0)
            tolerance = max(tolerance, result.tolerance if result else 0.0)
        ax.axhspan(1 - tolerance, 1 + tolerance, color="#d8f0d8", label="tolerance")
        ax.axhline(1.0, color="#2a2", linewidth=1)
        ax.bar(range(len(measured)), ratios, BAR_WIDTH / 2)
        _runtime_axis(ax, [runtime.name for runtime in measured])
        ax.set_title(f"{check}: reported / expected")
        ax.legend()
    return _png(figure)


def charts(report: CompareReport) -> list[tuple[str, bytes]]:
    """(title, PNG) for every chart that has data."""
    drawn = [
        ("Latency percentiles", latency_chart(report.runtimes)),
        ("Lifecycle latency, every run", lifecycle_distribution_chart(report.runtimes)),
        ("Density", density_chart(report.runtimes)),
        ("Accounting accuracy", accounting_chart(report.runtimes)),
    ]
    return [(title, png) for title, png in drawn if png is not None]
