"""The text `containerizer` reads and writes: flag values (sizes, K=V, signals) in, and API
messages out as aligned tables with human units, or JSON.

Kept apart from the command modules so their code reads as parse -> call -> print. Nothing here
talks to the service; the protobuf modules are only imported for type checking, so importing
this module stays cheap.
"""

from __future__ import annotations

import argparse
import base64
import math
import re
import signal
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from adapter.api.containerizer.v1 import containerizer_pb2 as pb

# Exit status of a workload killed by a signal, as shells report it.
SIGNAL_EXIT_BASE = 128
# docker's status for "the workload has no exit status to report": the CLI or the service failed,
# or the workload never started or was lost. Never confused with a workload's own exit 1.
EXIT_CLI_FAILURE = 125
BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")
MIB_PER_UNIT = {
    "": 1.0,  # a plain number is MiB, the unit of Mesos' mem and disk
    "b": 1.0 / (1 << 20),
    **{unit: 1.0 / 1024 for unit in ("k", "kb", "kib")},
    **{unit: 1.0 for unit in ("m", "mb", "mib")},
    **{unit: 1024.0 for unit in ("g", "gb", "gib")},
    **{unit: 1024.0**2 for unit in ("t", "tb", "tib")},
}
# Compiled at its first use (re caches it), not by every command's import of this module.
SIZE_PATTERN = r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*"
# Labels the CRI front end puts on the containers it launches: a pod's holder has the role
# "sandbox", the pod's containers "container" (adapter/cri/pods.py, containers.py).
CRI_ROLE_LABEL = "io.containerizer.cri.role"
POD_NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
POD_NAME_LABEL = "io.kubernetes.pod.name"


# ---- flag values: argparse reports each error as "argument --flag: ..." ----


def size_mib(text: str) -> float:
    """'64M', '1G', '512K', '1.5GiB' or a plain number of MiB -> MiB."""
    match = re.fullmatch(SIZE_PATTERN, text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in MIB_PER_UNIT:
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r}: use a number with an optional unit K, M, G or T "
            "(e.g. 512M, 1G); a plain number is MiB"
        )
    mib = float(match.group(1)) * MIB_PER_UNIT[unit]
    if mib <= 0:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: must be more than zero")
    return mib


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return int(text)


def key_value(text: str) -> tuple[str, str]:
    key, equals, value = text.partition("=")
    if not equals or not key:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return key, value


def signal_number(text: str) -> int:
    """TERM, SIGTERM, term or 15 -> 15."""
    if text.isdigit() and int(text) in {int(s) for s in signal.valid_signals()}:
        return int(text)
    name = text.upper()
    name = name if name.startswith("SIG") else "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise argparse.ArgumentTypeError(
            f"unknown signal {text!r}: use a name such as TERM, KILL, HUP, INT or a number"
        ) from None


# ---- output ----


def render_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart; the last column is not padded."""
    all_rows = [list(header), *[list(row) for row in rows]]
    widths = [max(len(row[column]) for row in all_rows) for column in range(len(header))]
    lines = []
    for row in all_rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def to_json(message: Any, indent: int | None = 2) -> str:
    import json  # here: `ps` without --json need not load it

    return json.dumps(message_fields(message), indent=indent, sort_keys=False)


def message_fields(message: Any) -> dict[str, Any]:
    """A message as the proto3 JSON mapping writes it (proto field names, enum names), with two
    differences that make it easier to consume: every field without presence is written, empty
    or not, so a reply has the same keys whether its list is empty or full; and 64-bit integers
    are numbers, not the strings the mapping uses for JavaScript's sake."""
    fields: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        if not is_repeated(field) and field.has_presence and not message.HasField(field.name):
            continue
        value = getattr(message, field.name)
        if is_map(field):
            value_field = field.message_type.fields_by_name["value"]
            fields[field.name] = {str(k): json_value(value_field, v) for k, v in value.items()}
        elif is_repeated(field):
            fields[field.name] = [json_value(field, item) for item in value]
        else:
            fields[field.name] = json_value(field, value)
    return fields


def is_repeated(field: Any) -> bool:
    # protobuf 6 added is_repeated; 7 removed `label`, which is all older versions have.
    repeated = getattr(field, "is_repeated", None)
    return bool(field.label == field.LABEL_REPEATED if repeated is None else repeated)


def is_map(field: Any) -> bool:
    return bool(field.message_type is not None and field.message_type.GetOptions().map_entry)


def json_value(field: Any, value: Any) -> Any:
    """One value of `field` as JSON: messages as objects, enums by name, bytes in base64."""
    if field.cpp_type == field.CPPTYPE_MESSAGE:
        if field.message_type.full_name.startswith("google.protobuf."):
            # Well-known types have their own JSON forms (Timestamp as RFC 3339, ...).
            from google.protobuf import json_format  # type: ignore[import-untyped, unused-ignore]

            return json_format.MessageToDict(value, preserving_proto_field_name=True)
        return message_fields(value)
    if field.cpp_type == field.CPPTYPE_ENUM:
        known = field.enum_type.values_by_number.get(value)
        return known.name if known is not None else value
    if field.type == field.TYPE_BYTES:
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def human_bytes(count: float) -> str:
    value = float(count)
    for unit in BYTE_UNITS:
        if abs(value) < 1024 or unit == BYTE_UNITS[-1]:
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    """Two most significant units, like `ps`: 45s, 3m12s, 2h05m, 4d03h."""
    whole = max(0, int(seconds))
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def exit_code_of(termination: pb.Termination) -> int:
    """The status a shell would report for the workload; 125 when it never ran or was lost."""
    if reason_name(termination) in ("LAUNCH_FAILED", "LOST"):
        return EXIT_CLI_FAILURE
    if termination.HasField("signal"):
        return SIGNAL_EXIT_BASE + termination.signal
    if termination.HasField("exit_code"):
        return termination.exit_code
    return EXIT_CLI_FAILURE


def reason_name(termination: pb.Termination) -> str:
    field = termination.DESCRIPTOR.fields_by_name["reason"]
    return str(field.enum_type.values_by_number[termination.reason].name)


def state_name(status: pb.ContainerStatus) -> str:
    field = status.DESCRIPTOR.fields_by_name["state"]
    return str(field.enum_type.values_by_number[status.state].name)


def describe_termination(termination: pb.Termination) -> str:
    """What happened, said once. The service's message is that sentence ('exited with code 3',
    'destroyed: killed by signal 9 (SIGKILL)'); a reason it does not say in words (a limitation,
    LOST, LAUNCH_FAILED) labels it. From a service that sent no message, one made of the fields."""
    reason = reason_name(termination)
    message = termination.message or _outcome(termination, reason)
    if reason in ("EXITED", "DESTROYED"):
        return message
    if termination.limited_resources:
        reason += f" ({', '.join(termination.limited_resources)})"
    return f"{reason}: {message}"


def _outcome(termination: pb.Termination, reason: str) -> str:
    if termination.HasField("signal"):
        outcome = f"killed by signal {termination.signal} ({signal_name(termination.signal)})"
    elif termination.HasField("exit_code"):
        outcome = f"exited with code {termination.exit_code}"
    else:
        outcome = "no exit status"
    return f"destroyed: {outcome}" if reason == "DESTROYED" else outcome


def short_outcome(termination: pb.Termination) -> str:
    """The AGE/EXIT cell of `ps` for an ended container."""
    if termination.HasField("signal"):
        return signal_name(termination.signal)
    if termination.HasField("exit_code"):
        return f"exit {termination.exit_code}"
    return reason_name(termination)


def format_resources(resources: Iterable[pb.Resource]) -> str:
    cells = []
    for resource in resources:
        value = resource.scalar.value
        if resource.name in ("mem", "disk"):
            cells.append(f"{resource.name}={human_bytes(value * 1024 * 1024)}")
        else:
            cells.append(f"{resource.name}={value:g}")
    return " ".join(cells) or "-"


def containers_table(containers: Sequence[pb.ContainerStatus], now: float) -> str:
    rows = []
    for status in containers:
        if status.HasField("termination") and status.termination.reason:
            age_or_exit = short_outcome(status.termination)
        elif status.launched_at:
            age_or_exit = human_duration(now - status.launched_at)
        else:
            age_or_exit = "-"
        pid = str(status.pid) if status.pid else "-"
        image = status.image or "-"
        rows.append(
            [
                status.container_id,
                status.runtime,
                state_name(status),
                pid,
                age_or_exit,
                image,
                pod_cell(status),
            ]
        )
    return render_table(["ID", "RUNTIME", "STATE", "PID", "AGE/EXIT", "IMAGE", "POD"], rows)


def pod_cell(status: pb.ContainerStatus) -> str:
    """The POD cell of `ps`: namespace/name of the CRI pod the container belongs to, with
    "(sandbox)" on the pod's holder; "-" for a container the CRI did not launch. Last in the
    row, so that its space does not shift the columns a script splits."""
    labels = status.labels
    role = labels.get(CRI_ROLE_LABEL)
    if role is None:
        return "-"
    pod = f"{labels.get(POD_NAMESPACE_LABEL, '')}/{labels.get(POD_NAME_LABEL, '')}"
    return f"{pod} (sandbox)" if role == "sandbox" else pod


def containers_json(containers: Sequence[pb.ContainerStatus]) -> str:
    import json  # here: `ps` without --json need not load it

    return json.dumps({"containers": [message_fields(status) for status in containers]}, indent=2)


def format_time(timestamp: float, now: float) -> str:
    if not timestamp:
        return "-"
    clock = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))
    return f"{clock} ({human_duration(now - timestamp)} ago)"


def status_text(status: pb.ContainerStatus, now: float) -> str:
    fields = [
        ("ID", status.container_id),
        ("Runtime", status.runtime or "-"),
        ("State", state_name(status)),
        ("PID", str(status.pid) if status.pid else "-"),
        ("Launched", format_time(status.launched_at, now)),
        ("Image", status.image or "-"),
        ("Sandbox", status.sandbox or "-"),
        ("Address", status.ip_address or "-"),
        ("Resources", format_resources(status.resources)),
        ("Labels", " ".join(f"{k}={v}" for k, v in sorted(status.labels.items())) or "-"),
    ]
    if status.HasField("termination") and status.termination.reason:
        fields.append(("Termination", describe_termination(status.termination)))
        fields.append(("Finished", format_time(status.termination.finished_at, now)))
    width = max(len(name) for name, _ in fields) + 1
    return "\n".join(f"{(name + ':').ljust(width)} {value}" for name, value in fields)


def statistic_value(name: str, value: Any) -> str:
    """Human units chosen by the Mesos naming convention of the field."""
    if name.endswith("_bytes"):
        return human_bytes(value)
    if name.endswith("_secs"):
        return f"{value:.3f} s"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def usage_table(statistics: pb.ResourceStatistics) -> str:
    """Only the statistics the runtime measured: unset fields are not shown as zero."""
    rows = []
    for field in statistics.DESCRIPTOR.fields:
        if not field.has_presence or not statistics.HasField(field.name):
            continue
        value = getattr(statistics, field.name)
        rows.append([field.name, statistic_value(field.name, value)])
    return render_table(["STATISTIC", "VALUE"], rows)


def runtimes_table(runtimes: Sequence[pb.RuntimeInfo]) -> str:
    rows = []
    for runtime in runtimes:
        capabilities = [
            field.name
            for field in runtime.capabilities.DESCRIPTOR.fields
            if getattr(runtime.capabilities, field.name)
        ]
        rows.append(
            [
                runtime.name,
                "*" if runtime.is_default else "",
                "yes" if runtime.healthy else "no",
                runtime.version or "-",
                runtime.message or "-",
                ",".join(capabilities) or "-",
            ]
        )
    header = ["NAME", "DEFAULT", "HEALTHY", "VERSION", "MESSAGE", "CAPABILITIES"]
    return render_table(header, rows)
