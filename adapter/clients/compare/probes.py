"""Isolation and accounting probes: each launches one workload, decides from what the API
reports, and removes its container whatever happens.

The expected numbers come from the one Mesos arithmetic every runtime applies (memory hard limit
at least 32 MiB, CFS quota = period x cpus: adapter/core/limits.py), so a runtime is held to
exactly what it was asked to enforce.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING

from adapter.clients.cli.format import describe_termination, reason_name
from adapter.clients.compare.results import Accuracy, LimitCheck, Verdict
from adapter.clients.compare.session import RpcFailure, RuntimeSession, wait_for_output
from adapter.clients.compare.workloads import (
    BUSY_LOOP_SECONDS,
    CPU_HOG,
    CPU_LIMIT_CPUS,
    FORK_BOMB,
    HELD_MARKER,
    HELD_MEMORY,
    HELD_MEMORY_MIB,
    MEMORY_HOG,
    MEMORY_HOG_MIB,
    MEMORY_LIMIT_MIB,
    MIB,
    PIDS_LIMIT,
    TIMED_BUSY_LOOP,
)
from adapter.core.limits import memory_floor
from isolators.cgroups.cpu import CFS_PERIOD_US, cfs_quota_us

if TYPE_CHECKING:
    from adapter.api.containerizer.v1 import containerizer_pb2 as pb

# How long a workload that must hit its memory limit may run before we call the limit absent.
OOM_DEADLINE_SECONDS = 30.0
CPU_WARMUP_SECONDS = 0.3
CPU_WINDOW_SECONDS = 1.0
CPU_LIMIT_TOLERANCE = 0.25
PIDS_OBSERVE_SECONDS = 1.5
USAGE_POLL_SECONDS = 0.1
# Accounting: how long the known work may take to show up, and how close the report must be.
OUTPUT_DEADLINE_SECONDS = 15.0
CPU_ACCOUNTING_TOLERANCE = 0.15
MEMORY_ACCOUNTING_TOLERANCE = 0.25
TIMES_FIELD = re.compile(r"(\d+)m\s*(\d+(?:\.\d+)?)s")


class Unmeasurable(Exception):
    """The runtime does not report what a probe needs; the report shows this as the reason."""


def cpu_seconds(statistics: pb.ResourceStatistics) -> float | None:
    if not statistics.HasField("cpus_user_time_secs"):
        return None
    return statistics.cpus_user_time_secs + statistics.cpus_system_time_secs


def children_cpu_seconds(times_output: str) -> float | None:
    """User + system time of the shell's children from `times` (second line), as the kernel's
    rusage counted them: the workload's own measure of the work, inside whatever it runs in."""
    fields = [int(m) * 60 + float(s) for m, s in TIMES_FIELD.findall(times_output)]
    if len(fields) < 4:
        return None
    return fields[2] + fields[3]


def check_memory_limit(session: RuntimeSession) -> LimitCheck:
    limit = int(memory_floor(MEMORY_LIMIT_MIB) * MIB)
    container_id = session.launch(MEMORY_HOG).container_id
    try:
        termination = session.wait(container_id, timeout=OOM_DEADLINE_SECONDS)
    except RpcFailure as exc:
        if exc.code != "DEADLINE_EXCEEDED":
            raise
        return LimitCheck(
            Verdict.NOT_ENFORCED,
            f"still running {OOM_DEADLINE_SECONDS:g} s after touching {MEMORY_HOG_MIB} MiB "
            f"under a {limit // MIB} MiB limit",
            expected=limit,
        )
    finally:
        session.remove(container_id)
    outcome = describe_termination(termination)
    if reason_name(termination) == "LIMITATION_MEMORY":
        return LimitCheck(
            Verdict.ENFORCED, f"{MEMORY_HOG_MIB} MiB touched, stopped at: {outcome}", None, limit
        )
    return LimitCheck(
        Verdict.NOT_ENFORCED,
        f"{MEMORY_HOG_MIB} MiB touched under a {limit // MIB} MiB limit, but: {outcome}",
        expected=limit,
    )


def check_cpu_limit(session: RuntimeSession) -> LimitCheck:
    """A busy loop under a cpu limit: its share of a core over one second must match the CFS
    quota within tolerance. With CFS off only shares apply, and a lone loop takes a full core."""
    expected = cfs_quota_us(CPU_LIMIT_CPUS) / CFS_PERIOD_US
    container_id = session.launch(CPU_HOG).container_id
    try:
        time.sleep(CPU_WARMUP_SECONDS)
        before = session.usage(container_id)
        time.sleep(CPU_WINDOW_SECONDS)
        after = session.usage(container_id)
    finally:
        session.remove(container_id)
    return cpu_limit_check(before, after, expected)


def cpu_limit_check(
    before: pb.ResourceStatistics, after: pb.ResourceStatistics, expected: float
) -> LimitCheck:
    """The verdict from two Usage samples of a busy loop limited to `expected` cpus."""
    used_before, used_after = cpu_seconds(before), cpu_seconds(after)
    wall = after.timestamp - before.timestamp
    if used_before is None or used_after is None or wall <= 0:
        return LimitCheck(Verdict.UNKNOWN, "the runtime reports no cpu time", expected=expected)
    share = (used_after - used_before) / wall
    numbers = f"used {share:.2f} cpus of a {expected:g} limit over {wall:.2f} s"
    if after.HasField("cpus_nr_periods") and after.cpus_nr_periods == 0:
        # A busy loop under a quota runs CFS periods; none ran, so there is no quota, and a share
        # near the limit only means the host was busy.
        detail = f"not enforced (cgroups_enable_cfs=false): no CFS period ran; {numbers}"
        return LimitCheck(Verdict.NOT_ENFORCED, detail, share, expected)
    throttled = after.cpus_nr_throttled if after.HasField("cpus_nr_throttled") else 0
    if abs(share / expected - 1) <= CPU_LIMIT_TOLERANCE:
        detail = f"{numbers}, throttled in {throttled} periods"
        return LimitCheck(Verdict.ENFORCED, detail, share, expected)
    if share < expected:
        detail = f"{numbers}: below the limit, the host is too busy to tell"
        return LimitCheck(Verdict.UNKNOWN, detail, share, expected)
    tolerance = f"{CPU_LIMIT_TOLERANCE:.0%}"
    return LimitCheck(Verdict.NOT_ENFORCED, f"{numbers} (over +{tolerance})", share, expected)


def check_pids_limit(session: RuntimeSession) -> LimitCheck:
    """A fork bomb under a pids limit: the task count must never pass it, by Usage.threads (or
    processes) while it runs, or at least by the LIMITATION_PIDS the runtime reports."""
    container_id = session.launch(FORK_BOMB).container_id
    try:
        peak = peak_task_count(session, container_id)
        termination = session.destroy(container_id)
    finally:
        session.remove(container_id)
    limited = reason_name(termination) == "LIMITATION_PIDS"
    reported = "the runtime reported LIMITATION_PIDS" if limited else "no limitation reported"
    if peak is None:
        verdict = Verdict.ENFORCED if limited else Verdict.UNKNOWN
        return LimitCheck(verdict, f"task count not reported; {reported}", None, PIDS_LIMIT)
    numbers = f"peak {peak} tasks under a limit of {PIDS_LIMIT}; {reported}"
    verdict = Verdict.ENFORCED if peak <= PIDS_LIMIT else Verdict.NOT_ENFORCED
    return LimitCheck(verdict, numbers, peak, PIDS_LIMIT)


def peak_task_count(session: RuntimeSession, container_id: str) -> int | None:
    """The most tasks Usage showed while the bomb ran; None if the runtime reports none."""
    peak: int | None = None
    deadline = time.monotonic() + PIDS_OBSERVE_SECONDS
    while time.monotonic() < deadline:
        try:
            statistics = session.usage(container_id)
        except RpcFailure:
            break  # it ended (the shell itself may fail to fork at the limit)
        for name in ("threads", "processes"):
            if statistics.HasField(name):
                peak = max(peak or 0, getattr(statistics, name))
                break
        time.sleep(USAGE_POLL_SECONDS)
    return peak


def measure_cpu_accounting(session: RuntimeSession) -> Accuracy:
    """Reported cpu time of a one-second busy loop against the loop's own rusage (or, when its
    output cannot be read, against the wall time it ran)."""
    status = session.launch(TIMED_BUSY_LOOP)
    try:
        output = wait_for_output(status.sandbox, HELD_MARKER, OUTPUT_DEADLINE_SECONDS)
        if output is None:
            time.sleep(BUSY_LOOP_SECONDS + CPU_WARMUP_SECONDS)
        statistics = session.usage(status.container_id)
    finally:
        session.remove(status.container_id)
    reported = cpu_seconds(statistics)
    if reported is None:
        raise Unmeasurable("the runtime reports no cpu time")
    own = children_cpu_seconds(output) if output else None
    if own:
        share = own / BUSY_LOOP_SECONDS
        detail = f"the {BUSY_LOOP_SECONDS} s busy loop got {share:.0%} of a core"
        return Accuracy(
            reported,
            own,
            "the workload's own rusage (sh `times`)",
            CPU_ACCOUNTING_TOLERANCE,
            detail,
        )
    return Accuracy(
        reported,
        float(BUSY_LOOP_SECONDS),
        "wall time of the busy loop (its output was not readable)",
        CPU_ACCOUNTING_TOLERANCE,
    )


def measure_memory_accounting(session: RuntimeSession) -> Accuracy:
    """Reported memory of a shell holding a known amount of touched memory."""
    status = session.launch(HELD_MEMORY)
    try:
        output = wait_for_output(status.sandbox, HELD_MARKER, OUTPUT_DEADLINE_SECONDS)
        statistics = session.usage(status.container_id)
    finally:
        session.remove(status.container_id)
    expected = HELD_MEMORY_MIB * MIB
    for name in ("mem_anon_bytes", "mem_rss_bytes", "mem_total_bytes"):
        if statistics.HasField(name):
            detail = f"{name}" + ("" if output else "; the workload's marker was not seen")
            return Accuracy(
                float(getattr(statistics, name)),
                float(expected),
                f"{HELD_MEMORY_MIB} MiB held in a shell variable",
                MEMORY_ACCOUNTING_TOLERANCE,
                detail,
            )
    raise Unmeasurable("the runtime reports no memory usage")
