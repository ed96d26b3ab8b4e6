"""The comparison for people and machines: aligned text tables, JSON, and a self-contained HTML
page with the charts embedded as PNG data URIs (one file to mail or attach to a ticket).

The tables are built once as data (Table) and rendered twice, as text and as HTML, so the page
and the terminal always show the same numbers. Every requested runtime has a row in every
table: one that was not measured says so, and the RUNTIMES table says why.
"""

from __future__ import annotations

import base64
import html
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from adapter.clients.compare.results import (
    ACCOUNTING_CHECKS,
    ISOLATION_CHECKS,
    LATENCY_KINDS,
    PERCENTILES,
    Accuracy,
    CompareReport,
    RuntimeReport,
)

NOT_MEASURED = "-"
BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


@dataclass(frozen=True)
class Table:
    title: str
    header: tuple[str, ...]
    rows: Sequence[tuple[str, ...]]
    # Column indexes whose cells are numbers: right-aligned so the digits line up.
    numeric: frozenset[int] = frozenset()
    notes: list[str] = field(default_factory=list)


def aligned(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: frozenset[int]) -> str:
    """Columns two spaces apart, numbers right-aligned, text left-aligned; no trailing blanks."""
    all_rows = [list(header), *[list(row) for row in rows]]
    for row in all_rows:
        if len(row) != len(header):
            raise ValueError(f"row {row!r} has {len(row)} cells, the header {len(header)}")
    widths = [max(len(row[column]) for row in all_rows) for column in range(len(header))]
    lines = []
    for row in all_rows:
        cells = [
            cell.rjust(width) if column in numeric else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def human_bytes(count: float | None) -> str:
    if count is None:
        return NOT_MEASURED
    value = float(count)
    for unit in BYTE_UNITS:
        if abs(value) < 1024 or unit == BYTE_UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _not_measured_row(runtime: RuntimeReport, width: int) -> tuple[str, ...]:
    """A row of dashes named for why: the Runtimes table (unavailable) or the errors table
    (a section that failed) has the reason."""
    marker = "error" if runtime.available else "unavailable"
    return (f"{runtime.name} ({marker})", *([NOT_MEASURED] * (width - 1)))


# ---- the tables ----


def runtimes_table(report: CompareReport) -> Table:
    rows = []
    for runtime in report.runtimes:
        status = "measured" if runtime.available else "unavailable"
        rows.append(
            (
                runtime.name + (" *" if runtime.is_default else ""),
                status,
                runtime.version or NOT_MEASURED,
                runtime.root or NOT_MEASURED,
                runtime.reason or NOT_MEASURED,
            )
        )
    header = ("RUNTIME", "STATUS", "VERSION", "ROOT", "REASON")
    return Table("Runtimes (* = the node's default)", header, rows)


def latency_table(report: CompareReport) -> Table:
    header = ["RUNTIME"]
    for kind in LATENCY_KINDS:
        header += [f"{kind.upper()} p{PERCENTILES[0]}", *[f"p{rank}" for rank in PERCENTILES[1:]]]
    header.append("FAILED")
    rows = []
    for runtime in report.runtimes:
        if runtime.latency is None:
            rows.append(_not_measured_row(runtime, len(header)))
            continue
        cells = [runtime.name]
        for kind in LATENCY_KINDS:
            series = runtime.latency[kind]
            for rank in PERCENTILES:
                cells.append(f"{series.milliseconds(rank):.1f}" if series.samples else "-")
        cells.append(str(sum(runtime.latency[kind].failures for kind in ("launch", "teardown"))))
        rows.append(tuple(cells))
    title = f"Latency in ms over {report.settings.runs} runs (launch and lifecycle of /bin/true; "
    title += "teardown: Destroy of a running sleeper)"
    return Table(title, tuple(header), rows, frozenset(range(1, len(header))))


def density_table(report: CompareReport) -> Table:
    header = (
        "RUNTIME",
        "LAUNCHED",
        "LAUNCH s",
        "DESTROY s",
        "HOST MEM/CTR",
        "SERVICE RSS",
        "SERVICE +/CTR",
        "LEFT BEHIND",
    )
    rows = []
    notes = []
    for runtime in report.runtimes:
        density = runtime.density
        if density is None:
            rows.append(_not_measured_row(runtime, len(header)))
            continue
        rows.append(
            (
                runtime.name,
                f"{density.launched}/{density.containers}",
                f"{density.launch_seconds:.2f}",
                f"{density.destroy_seconds:.2f}",
                human_bytes(density.host_memory_per_container_bytes),
                human_bytes(density.service_rss_with_containers_bytes),
                human_bytes(density.service_rss_per_container_bytes),
                ", ".join(density.leftovers) or "none",
            )
        )
        notes.append(f"{runtime.name}: service memory: {density.service_memory_source}")
        notes += [f"{runtime.name}: launch failed: {error}" for error in density.launch_errors]
    title = f"Density: {report.settings.density} idle containers launched at once, then destroyed"
    return Table(title, header, rows, frozenset(range(1, 7)), notes)


def isolation_table(report: CompareReport) -> Table:
    header = ("RUNTIME", *(f"{check.upper()} LIMIT" for check in ISOLATION_CHECKS))
    rows = []
    notes = []
    for runtime in report.runtimes:
        if runtime.isolation is None:
            rows.append(_not_measured_row(runtime, len(header)))
            continue
        cells = [runtime.name]
        for check in ISOLATION_CHECKS:
            result = runtime.isolation.get(check)
            cells.append(result.verdict.value if result else "error")
            if result:
                notes.append(f"{runtime.name} {check}: {result.detail}")
        rows.append(tuple(cells))
    return Table("Isolation: each workload tries to exceed its limit", header, rows, notes=notes)


def _accuracy_cells(result: Accuracy | None, unit: Callable[[float], str]) -> list[str]:
    if result is None:
        return ["error", NOT_MEASURED, NOT_MEASURED]
    verdict = "ok" if result.within_tolerance else f"off (>{result.tolerance:.0%})"
    return [unit(result.reported), unit(result.expected), f"{result.ratio:.2f} {verdict}"]


def accounting_table(report: CompareReport) -> Table:
    header = ["RUNTIME"]
    for check in ACCOUNTING_CHECKS:
        header += [f"{check.upper()} REPORTED", "EXPECTED", "RATIO"]
    units: dict[str, Callable[[float], str]] = {
        "cpu": lambda seconds: f"{seconds:.3f} s",
        "memory": human_bytes,
    }
    rows = []
    notes = []
    for runtime in report.runtimes:
        if runtime.accounting is None:
            rows.append(_not_measured_row(runtime, len(header)))
            continue
        cells = [runtime.name]
        for check in ACCOUNTING_CHECKS:
            result = runtime.accounting.get(check)
            cells += _accuracy_cells(result, units[check])
            if result:
                detail = f"; {result.detail}" if result.detail else ""
                notes.append(f"{runtime.name} {check}: expected = {result.reference}{detail}")
        rows.append(tuple(cells))
    title = "Accounting: reported usage against known work"
    return Table(title, tuple(header), rows, frozenset(range(1, len(header))), notes)


def capabilities_table(report: CompareReport) -> Table:
    names: list[str] = []
    for runtime in report.runtimes:
        names += [name for name in runtime.capabilities or {} if name not in names]
    header = ("RUNTIME", *names) if names else ("RUNTIME", "CAPABILITIES")
    rows = []
    for runtime in report.runtimes:
        if runtime.capabilities is None:
            rows.append(_not_measured_row(runtime, len(header)))
            continue
        flags = [runtime.capabilities.get(name) for name in names]
        rows.append((runtime.name, *("yes" if flag else "no" for flag in flags)))
    return Table("Capabilities (as each runtime reports them)", header, rows)


def errors_table(report: CompareReport) -> Table:
    rows = [
        (runtime.name, section, message)
        for runtime in report.runtimes
        for section, message in runtime.errors.items()
    ]
    return Table("Sections that could not be measured", ("RUNTIME", "SECTION", "ERROR"), rows)


def tables(report: CompareReport) -> list[Table]:
    built = [
        runtimes_table(report),
        latency_table(report),
        density_table(report),
        isolation_table(report),
        accounting_table(report),
        capabilities_table(report),
    ]
    errors = errors_table(report)
    return [*built, errors] if errors.rows else built


def summary_line(report: CompareReport) -> str:
    measured = sum(1 for runtime in report.runtimes if runtime.available)
    settings = report.settings
    return (
        f"containerizer compare: {measured} of {len(report.runtimes)} runtimes measured through "
        f"{settings.endpoint} in {report.duration_seconds:.1f} s"
    )


# ---- renderers ----


def render_text(report: CompareReport) -> str:
    parts = [summary_line(report)]
    for table in tables(report):
        block = [table.title]
        block.append(aligned(table.header, table.rows, table.numeric))
        block += [f"  {note}" for note in table.notes]
        parts.append("\n".join(block))
    return "\n\n".join(parts)


def render_json(report: CompareReport) -> str:
    return json.dumps(report.to_dict(), indent=2)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _html_table(table: Table) -> str:
    def cell(tag: str, text: str, column: int) -> str:
        css = ' class="num"' if column in table.numeric else ""
        return f"<{tag}{css}>{html.escape(text)}</{tag}>"

    head = "".join(cell("th", text, index) for index, text in enumerate(table.header))
    body = "".join(
        "<tr>" + "".join(cell("td", text, index) for index, text in enumerate(row)) + "</tr>"
        for row in table.rows
    )
    notes = "".join(f"<li>{html.escape(note)}</li>" for note in table.notes)
    return (
        f"<h2>{html.escape(table.title)}</h2>\n<table><thead><tr>{head}</tr></thead>"
        f"<tbody>{body}</tbody></table>\n" + (f"<ul class='notes'>{notes}</ul>\n" if notes else "")
    )


HTML_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin-bottom: 0.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f0f0f0; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
ul.notes { font-size: 0.9em; color: #555; }
img { max-width: 100%; display: block; margin: 1em 0; }
"""


def render_html(report: CompareReport, charts: Sequence[tuple[str, bytes]]) -> str:
    """A page that needs nothing else: styles inline, charts as data URIs, all text escaped."""
    generated = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(report.started_at))
    host = ", ".join(f"{key} {value}" for key, value in report.host.items())
    figures = "".join(
        f'<figure><img alt="{html.escape(title)}" src="{data_uri(png)}">'
        f"<figcaption>{html.escape(title)}</figcaption></figure>\n"
        for title, png in charts
    )
    sections = "".join(_html_table(table) for table in tables(report))
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<title>containerizer compare</title>"
        f"<style>{HTML_STYLE}</style></head><body>\n"
        f"<h1>containerizer compare</h1>\n<p>{html.escape(summary_line(report))}</p>\n"
        f"<p>Started {html.escape(generated)}; host: {html.escape(host)}</p>\n"
        f"{figures}{sections}</body></html>\n"
    )
