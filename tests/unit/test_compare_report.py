"""`containerizer compare` reporting from fake measurements: tables, JSON, HTML; no service."""

from __future__ import annotations

import base64
import json
import re
from dataclasses import replace

import pytest

from adapter.clients.compare import charts, report
from adapter.clients.compare.results import (
    MEASUREMENTS,
    SECTIONS,
    Accuracy,
    CompareReport,
    Density,
    Latencies,
    LimitCheck,
    RuntimeReport,
    Settings,
    Verdict,
)

MIB = 1024 * 1024
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CAPABILITIES = {"images": False, "live_update": True, "oom_detection": True}


def measured_runtime(name: str, scale: float = 1.0) -> RuntimeReport:
    samples = tuple(scale * value / 1000 for value in range(1, 21))  # 1..20 ms
    return RuntimeReport(
        name=name,
        available=True,
        version="1",
        is_default=name == "native",
        capabilities=dict(CAPABILITIES),
        root="host filesystem",
        latency={
            "launch": Latencies(samples),
            "lifecycle": Latencies(tuple(2 * s for s in samples)),
            "teardown": Latencies(samples[:10], failures=1),
        },
        density=Density(
            containers=20,
            launched=20,
            launch_seconds=0.5 * scale,
            destroy_seconds=0.7 * scale,
            host_memory_per_container_bytes=3 * MIB,
            service_rss_before_bytes=50 * MIB,
            service_rss_with_containers_bytes=52 * MIB,
            service_memory_source="RSS of pid 42, found via SO_PEERCRED on /run/x.sock",
        ),
        isolation={
            "memory": LimitCheck(Verdict.ENFORCED, "LIMITATION_MEMORY", None, 64 * MIB),
            "cpu": LimitCheck(
                Verdict.NOT_ENFORCED, "not enforced (cgroups_enable_cfs=false)", 1.0, 0.5
            ),
            "pids": LimitCheck(Verdict.ENFORCED, "peak 30 tasks", 30, 32),
        },
        accounting={
            "cpu": Accuracy(0.98, 1.0, "the workload's own rusage", 0.15),
            "memory": Accuracy(float(100 * MIB), float(64 * MIB), "64 MiB held", 0.25),
        },
    )


def fake_report() -> CompareReport:
    settings = Settings("unix:/run/x.sock", 20, 20, "localhost/busybox:latest", ("native", "lxc"))
    unavailable = RuntimeReport(
        "lxc", available=False, reason="not configured on this node: no [runtimes.lxc] table"
    )
    return CompareReport(
        settings,
        started_at=1_700_000_000.0,
        duration_seconds=12.5,
        host={"cpus": 2},
        runtimes=[measured_runtime("native"), unavailable],
    )


def test_aligned_right_aligns_numbers_and_left_aligns_text() -> None:
    text = report.aligned(
        ("NAME", "MS"), [("native", "5.5"), ("containerd", "120.25")], frozenset({1})
    )
    assert text.splitlines() == [
        "NAME            MS",
        "native         5.5",
        "containerd  120.25",
    ]


def test_aligned_columns_start_at_the_same_offset_in_every_row() -> None:
    header = ("RUNTIME", "STATUS", "REASON")
    rows = [("native *", "measured", "-"), ("lxc", "unavailable", "not configured")]
    lines = report.aligned(header, rows, frozenset()).splitlines()
    second_column = ("STATUS", "measured", "unavailable")
    starts = {line.index(cell) for line, cell in zip(lines, second_column, strict=True)}
    assert len(starts) == 1
    assert all(line == line.rstrip() for line in lines)


def test_aligned_refuses_a_row_of_the_wrong_width() -> None:
    with pytest.raises(ValueError, match="2 cells"):
        report.aligned(("A", "B", "C"), [("1", "2")], frozenset())


def test_human_bytes() -> None:
    assert report.human_bytes(None) == "-"
    assert report.human_bytes(512) == "512 B"
    assert report.human_bytes(3 * MIB) == "3.0 MiB"
    assert report.human_bytes(-2048) == "-2.0 KiB"  # a MemAvailable that rose


def test_text_report_has_every_section_and_every_runtime_in_each() -> None:
    text = report.render_text(fake_report())
    for title in ("Runtimes", "Latency", "Density", "Isolation", "Accounting", "Capabilities"):
        assert re.search(rf"^{title}", text, re.MULTILINE), title
    assert "1 of 2 runtimes measured" in text
    assert text.count("lxc (unavailable)") == 5  # every section table after Runtimes
    assert "not configured on this node: no [runtimes.lxc] table" in text
    assert "not enforced (cgroups_enable_cfs=false)" in text


def test_text_report_numbers_come_from_the_measurements() -> None:
    text = report.render_text(fake_report())
    latency_row = next(line for line in text.splitlines() if line.startswith("native   "))
    # launch p50 of 1..20 ms is 10.5 ms; lifecycle is twice that; one teardown failure
    assert latency_row.split()[1:4] == ["10.5", "19.1", "19.8"]
    assert latency_row.split()[4] == "21.0" and latency_row.split()[-1] == "1"
    assert "1.56 off (>25%)" in text  # 100 MiB reported for 64 MiB held
    assert "0.98 ok" in text
    assert "20/20" in text and "3.0 MiB" in text and "102.4 KiB" in text  # (52-50) MiB / 20


def test_a_failed_section_is_marked_and_explained() -> None:
    compare = fake_report()
    compare.runtimes[0].density = None
    compare.runtimes[0].errors["density"] = "Launch: UNAVAILABLE: runtime down"
    text = report.render_text(compare)
    assert "native (error)" in text
    assert "Launch: UNAVAILABLE: runtime down" in text


def test_json_report_has_every_section_for_every_runtime() -> None:
    data = json.loads(report.render_json(fake_report()))
    assert data["settings"]["runs"] == 20
    native, lxc = data["runtimes"]
    for entry in (native, lxc):
        assert set(SECTIONS) <= set(entry)
    assert native["latency"]["launch"]["p50_ms"] == 10.5
    assert native["latency"]["teardown"]["failures"] == 1
    assert native["density"]["nothing_left"] is True
    assert native["density"]["service_rss_per_container_bytes"] == pytest.approx(2 * MIB / 20)
    assert native["isolation"]["cpu"]["verdict"] == "not enforced"
    assert native["accounting"]["memory"]["within_tolerance"] is False
    assert native["accounting"]["cpu"]["within_tolerance"] is True
    assert lxc["available"] is False and lxc["reason"].startswith("not configured")
    assert lxc["latency"] is None and lxc["capabilities"] is None


def test_html_report_is_self_contained_with_png_charts() -> None:
    compare = fake_report()
    compare.runtimes.append(measured_runtime("containerd", scale=3.0))
    drawn = charts.charts(compare)
    assert [title for title, _ in drawn] == [
        "Latency percentiles",
        "Lifecycle latency, every run",
        "Density",
        "Accounting accuracy",
    ]
    page = report.render_html(compare, drawn)
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', page)
    assert len(images) == 4
    assert all(base64.b64decode(image).startswith(PNG_SIGNATURE) for image in images)
    assert "http://" not in page and "https://" not in page  # nothing fetched from elsewhere
    assert "not configured on this node" in page


def test_html_escapes_what_it_shows() -> None:
    compare = fake_report()
    compare.runtimes[1].reason = "unhealthy: <script>alert(1)</script> & more"
    page = report.render_html(compare, [])
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in page


def test_no_charts_without_measurements() -> None:
    compare = fake_report()
    compare.runtimes = compare.runtimes[1:]
    assert charts.charts(compare) == []


def test_unmeasured_names_what_no_runtime_measured() -> None:
    compare = fake_report()
    assert compare.unmeasured() == []
    native = compare.runtimes[0]
    native.density = None
    assert native.isolation is not None
    del native.isolation["cpu"]
    assert compare.unmeasured() == ["density", "isolation.cpu"]
    # measured on any one runtime is enough: the report can still compare something
    compare.runtimes.append(measured_runtime("containerd"))
    assert compare.unmeasured() == []
    assert json.loads(report.render_json(compare))["unmeasured"] == []


def test_runs_that_all_failed_measured_nothing() -> None:
    compare = fake_report()
    native = compare.runtimes[0]
    native.latency = {kind: Latencies((), failures=2) for kind in ("launch", "lifecycle")}
    assert native.density is not None
    native.density = replace(native.density, launched=0, launch_errors=("Launch: NOT_FOUND",))
    assert compare.unmeasured() == ["latency", "density"]


def test_without_an_available_runtime_nothing_is_measured() -> None:
    compare = fake_report()
    compare.runtimes = compare.runtimes[1:]
    assert compare.unmeasured() == list(MEASUREMENTS)
    assert MEASUREMENTS[:3] == ("latency", "density", "isolation.memory")
