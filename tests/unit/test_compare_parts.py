"""`containerizer compare` pieces that need no service: percentile math, `times` parsing,
discovery from a Runtimes answer, the progress output, the option parsing, host readings."""

from __future__ import annotations

import argparse
import io
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.clients.cli.compare import runtime_names
from adapter.clients.compare import host
from adapter.clients.compare.probes import children_cpu_seconds, cpu_limit_check
from adapter.clients.compare.progress import Progress
from adapter.clients.compare.results import Accuracy, Latencies, Verdict, percentile
from adapter.clients.compare.runner import discover
from adapter.clients.compare.session import ServiceCalls, owner_is_alive, owner_token

# ---- percentiles ----


def test_percentile_interpolates_between_closest_ranks() -> None:
    samples = [float(value) for value in range(1, 11)]  # 1..10
    assert percentile(samples, 50) == 5.5
    assert percentile(samples, 95) == pytest.approx(9.55)
    assert percentile(samples, 99) == pytest.approx(9.91)
    assert percentile(samples, 0) == 1 and percentile(samples, 100) == 10


def test_percentile_ignores_sample_order_and_handles_one_sample() -> None:
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([7.0], 99) == 7.0


def test_percentile_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="no samples"):
        percentile([], 50)
    with pytest.raises(ValueError, match=r"0\.\.100"):
        percentile([1.0], 101)


def test_latencies_summary_in_milliseconds() -> None:
    summary = Latencies((0.001, 0.002, 0.003, 0.010), failures=2).to_dict()
    assert summary["count"] == 4 and summary["failures"] == 2
    assert summary["p50_ms"] == 2.5 and summary["min_ms"] == 1 and summary["max_ms"] == 10
    assert Latencies(()).to_dict() == {"count": 0, "failures": 0, "samples_ms": []}


def test_accuracy_tolerance_is_relative_both_ways() -> None:
    assert Accuracy(1.14, 1.0, "x", 0.15).within_tolerance
    assert Accuracy(0.86, 1.0, "x", 0.15).within_tolerance
    assert not Accuracy(1.16, 1.0, "x", 0.15).within_tolerance
    assert not Accuracy(0.5, 0.0, "x", 0.15).within_tolerance


# ---- the workload's own cpu time ----


@pytest.mark.parametrize(
    ("output", "seconds"),
    [
        ("0m0.000000s 0m0.000000s\n0m0.990000s 0m0.010000s\nheld\n", 1.0),  # dash
        ("0m 0.00s 0m 0.00s\n0m 0.84s 0m 0.02s\nheld\n", 0.86),  # busybox sh
        ("0m0.00s 0m0.00s\n1m2.50s 0m0.50s\n", 63.0),
        ("held\n", None),
    ],
)
def test_children_cpu_seconds(output: str, seconds: float | None) -> None:
    assert children_cpu_seconds(output) == (pytest.approx(seconds) if seconds else None)


# ---- the cpu limit verdict ----


def cpu_sample(at: float, user: float, periods: int | None, throttled: int = 0) -> Any:
    statistics = pb.ResourceStatistics(timestamp=at, cpus_user_time_secs=user)
    statistics.cpus_system_time_secs = 0.0
    if periods is not None:
        statistics.cpus_nr_periods = periods
        statistics.cpus_nr_throttled = throttled
    return statistics


@pytest.mark.parametrize(
    ("used", "periods", "verdict", "words"),
    [
        (0.5, 10, Verdict.ENFORCED, "used 0.50 cpus of a 0.5 limit over 1.00 s, throttled in 5"),
        (0.6, None, Verdict.ENFORCED, "used 0.60 cpus"),  # within +25 %
        (1.0, 10, Verdict.NOT_ENFORCED, "(over +25%)"),
        (1.0, 0, Verdict.NOT_ENFORCED, "not enforced (cgroups_enable_cfs=false)"),
        # no period ran: a share near the limit is the host's business, not a quota's
        (0.5, 0, Verdict.NOT_ENFORCED, "no CFS period ran"),
        (0.2, 10, Verdict.UNKNOWN, "the host is too busy to tell"),
    ],
)
def test_cpu_limit_verdict(used: float, periods: int | None, verdict: Verdict, words: str) -> None:
    before = cpu_sample(100.0, 3.0, 0 if periods is not None else None)
    after = cpu_sample(101.0, 3.0 + used, periods, throttled=5)
    check = cpu_limit_check(before, after, expected=0.5)
    assert check.verdict is verdict
    assert words in check.detail
    assert check.measured == pytest.approx(used) and check.expected == 0.5


def test_cpu_limit_verdict_without_cpu_time() -> None:
    check = cpu_limit_check(pb.ResourceStatistics(), pb.ResourceStatistics(timestamp=1), 0.5)
    assert check.verdict is Verdict.UNKNOWN and "no cpu time" in check.detail


# ---- discovery ----


class FakeRuntimesService:
    """Answers Runtimes like a service that has native healthy and containerd down."""

    def Runtimes(self, request: Any, timeout: float) -> pb.RuntimesResponse:
        return pb.RuntimesResponse(
            runtimes=[
                pb.RuntimeInfo(
                    name="native",
                    version="1",
                    healthy=True,
                    is_default=True,
                    capabilities=pb.Capabilities(live_update=True, recover=True),
                ),
                pb.RuntimeInfo(
                    name="containerd",
                    healthy=False,
                    message="cannot reach /run/containerd/containerd.sock",
                    capabilities=pb.Capabilities(images=True),
                ),
            ]
        )


def test_discover_reports_every_requested_runtime_with_its_reason() -> None:
    calls = ServiceCalls(FakeRuntimesService(), timeout=5)
    native, containerd, lxc = discover(calls, ("native", "containerd", "lxc"))
    assert native.available and native.is_default and native.reason == ""
    assert native.capabilities is not None and native.capabilities["live_update"]
    assert not native.capabilities["images"]
    assert not containerd.available
    assert containerd.reason == "unhealthy: cannot reach /run/containerd/containerd.sock"
    assert containerd.capabilities is not None and containerd.capabilities["images"]
    assert not lxc.available and lxc.capabilities is None
    assert "[runtimes.lxc]" in lxc.reason and "configured: containerd, native" in lxc.reason


# ---- progress ----


def test_progress_on_a_pipe_prints_one_line_per_stage() -> None:
    stream = io.StringIO()
    progress = Progress(stream)
    progress.expect(10)
    progress.stage("native: latency (5 runs)")
    progress.advance(4)
    progress.stage("native: density (5 containers)")
    progress.finish()
    assert stream.getvalue() == (
        "compare: native: latency (5 runs)\ncompare: native: density (5 containers)\n"
    )


def test_progress_on_a_terminal_redraws_one_bar() -> None:
    stream = io.StringIO()
    progress = Progress(stream, interactive=True)
    progress.expect(4)
    progress.stage("native: latency")
    progress.advance()
    assert progress.bar().startswith("[########......................]  25%  native: latency")
    progress.advance(10)
    assert progress.done == 4  # never past the end
    progress.finish()
    output = stream.getvalue()
    assert "\n" not in output and output.endswith("\r")


# ---- options ----


def test_runtime_names_keeps_order_and_drops_repeats() -> None:
    assert runtime_names("lxc, native,lxc") == ("lxc", "native")


@pytest.mark.parametrize("text", ["", "native,", "Native", "na tive", "x" * 40, "../etc"])
def test_runtime_names_refuses_what_is_no_name(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="invalid runtime name"):
        runtime_names(text)


# ---- host readings ----


def test_mem_available_from_meminfo(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  2048 kB\nMemFree:  100 kB\nMemAvailable:  1024 kB\n")
    assert host.mem_available_bytes(meminfo) == 1024 * 1024
    assert host.mem_available_bytes(tmp_path / "missing") is None


@pytest.mark.parametrize(
    ("target", "path"),
    [
        ("unix:/run/c.sock", "/run/c.sock"),
        ("unix:///run/c.sock", "/run/c.sock"),
        ("unix:rel.sock", "rel.sock"),
        ("127.0.0.1:7070", None),
    ],
)
def test_unix_socket_path(target: str, path: str | None) -> None:
    assert host.unix_socket_path(target) == path


def test_service_process_found_through_the_socket_peer(tmp_path: Path) -> None:
    path = tmp_path / "peer.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(1)
        found = host.find_service_process(f"unix:{path}")
    assert found.pid == os.getpid()  # we are the listening peer
    assert "SO_PEERCRED" in found.source
    rss = found.rss_bytes()
    assert rss is not None and rss > 0


def test_service_process_not_guessed_for_tcp_or_a_dead_socket(tmp_path: Path) -> None:
    assert host.find_service_process("127.0.0.1:7070").pid is None
    missing = host.find_service_process(f"unix:{tmp_path / 'none.sock'}")
    assert missing.pid is None and "cannot connect" in missing.source


def test_owner_token_names_a_live_process_and_not_a_recycled_pid() -> None:
    token = owner_token()
    assert owner_is_alive(token)
    pid, _, _ = token.partition(":")
    assert not owner_is_alive(f"{pid}:1.00")  # same pid, another start time
    assert not owner_is_alive("garbage")
