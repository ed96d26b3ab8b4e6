"""Request validation at the service edge: API messages -> domain types, or InvalidArgument.

Nothing reaches a runtime or a path on disk before it has passed through here. Every error names
the field (`launch.resources[cpus]`, `command.environment[2].name`) and the value received.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.core.errors import InvalidArgument
from adapter.core.limits import memory_floor
from adapter.core.model import (
    MIB,
    NETWORK_MODES,
    Command,
    LaunchSpec,
    LinuxOptions,
    NetworkSettings,
    PortMapping,
    Resources,
    is_valid_container_id,
)
from adapter.runtimes.registry import RUNTIMES

SCALAR_RESOURCES = {"cpus", "mem", "disk", "pids", "network_bandwidth"}
RANGES_RESOURCES = {"ports"}
MAX_PORT = 65535
MAX_PORT_MAPPINGS = 1024
MAX_PIDS = 4_194_304  # the kernel's pid_max ceiling
MAX_TEXT = 64 * 1024  # an env value, a path: generous, but bounded
MAX_COMMAND = 1024 * 1024
# What the kernel accepts, so a request is refused here rather than wrapped or failed inside it:
# cpu.shares = 1024 x cpus tops out at 262144; mem and disk stay exact in a double and far below
# memory.limit_in_bytes' ceiling; tc's token bucket keeps its rate in 32-bit bytes per second.
MAX_CPUS = 256
MAX_SIZE_MIB = 2**53 // MIB
MAX_BANDWIDTH_MBIT = 34_359
RESOURCE_BOUNDS: dict[str, tuple[float, str]] = {
    "cpus": (MAX_CPUS, "cores (cpu.shares = 1024 x cpus may not pass the kernel's 262144)"),
    "mem": (MAX_SIZE_MIB, "MiB (2^53 bytes)"),
    "disk": (MAX_SIZE_MIB, "MiB (2^53 bytes)"),
    "network_bandwidth": (MAX_BANDWIDTH_MBIT, "Mbit/s (tc's 32-bit rate in bytes per second)"),
}
# Labels travel in every status and listing: bounded so a page of containers stays small.
MAX_LABEL_KEY_BYTES = 256
MAX_LABEL_VALUE_BYTES = 16 * 1024
MAX_LABELS_BYTES = 64 * 1024
# execve(2): one argument or "NAME=VALUE" string is at most MAX_ARG_STRLEN bytes with its NUL;
# all of them, with a pointer each, must fit ARG_MAX. A quarter of ARG_MAX (at least 64 KiB) is
# kept for the supervisor's own arguments and environment and the image's variables.
MAX_ARG_STRLEN = 32 * 4096
ARG_POINTER_BYTES = 8


def container_id(value: str, field: str = "container_id") -> str:
    if not is_valid_container_id(value):
        shown = value if len(value) <= 64 else value[:64] + "..."
        raise InvalidArgument(
            field,
            f"{shown!r} is not a valid id: 1-128 characters of [A-Za-z0-9_.-],"
            " starting with a letter or digit",
        )
    return value


def _text(value: str, field: str, limit: int = MAX_TEXT) -> str:
    if "\x00" in value:
        raise InvalidArgument(field, "contains a NUL byte")
    if len(value) > limit:
        raise InvalidArgument(field, f"longer than {limit} characters")
    return value


def resources(
    messages: Iterable[pb.Resource], field: str = "resources"
) -> tuple[Resources, tuple[str, ...]]:
    """Parse Mesos-shaped resources; return them and the adjustments made (the mem floor)."""
    values: dict[str, float] = {}
    ports: tuple[tuple[int, int], ...] = ()
    for index, message in enumerate(messages):
        name = message.name
        where = f"{field}[{index}]"
        if name in RANGES_RESOURCES:
            if ports:
                raise InvalidArgument(f"{where}.name", f"resource {name!r} given twice")
            ports = port_ranges(message, f"{field}[{name}]")
            continue
        if name not in SCALAR_RESOURCES:
            known = sorted(SCALAR_RESOURCES | RANGES_RESOURCES)
            raise InvalidArgument(f"{where}.name", f"unknown resource {name!r}; known: {known}")
        if message.type != pb.Value.SCALAR:
            raise InvalidArgument(f"{where}.type", f"resource {name!r} must be SCALAR")
        if name in values:
            raise InvalidArgument(f"{where}.name", f"resource {name!r} given twice")
        value = message.scalar.value
        if not math.isfinite(value) or value < 0:
            raise InvalidArgument(f"{field}[{name}]", f"must be a finite number >= 0, got {value}")
        values[name] = value
    for name, (bound, unit) in RESOURCE_BOUNDS.items():
        if values.get(name, 0) > bound:
            raise InvalidArgument(
                f"{field}[{name}]", f"must be at most {bound:g} {unit}, got {values[name]:g}"
            )
    warnings: list[str] = []
    for positive in ("cpus", "network_bandwidth"):
        if positive in values and values[positive] == 0:
            raise InvalidArgument(f"{field}[{positive}]", "must be greater than 0")
    pids = values.get("pids")
    if pids is not None and (pids != int(pids) or not 1 <= pids <= MAX_PIDS):
        raise InvalidArgument(f"{field}[pids]", f"must be an integer in 1..{MAX_PIDS}, got {pids}")
    mem = values.get("mem")
    if mem is not None and (floor := memory_floor(mem)) != mem:
        # The record and the reply say what is enforced (adapter/core/limits.py's floor).
        warnings.append(f"mem raised from {mem:g} MiB to the minimum of {floor:g} MiB")
        mem = floor
    parsed = Resources(
        cpus=values.get("cpus"),
        mem_mib=mem,
        disk_mib=values.get("disk"),
        pids=int(pids) if pids is not None else None,
        network_bandwidth=values.get("network_bandwidth"),
        ports=ports,
    )
    return parsed, tuple(warnings)


def port_ranges(message: pb.Resource, field: str) -> tuple[tuple[int, int], ...]:
    """Mesos ranges of host ports: each begin <= end inside 1-65535, none overlapping."""
    if message.type != pb.Value.RANGES:
        raise InvalidArgument(field, "must be of type RANGES")
    ranges = sorted((r.begin, r.end) for r in message.ranges.range)
    if not ranges:
        raise InvalidArgument(field, "has no range")
    for index, (begin, end) in enumerate(ranges):
        if not 1 <= begin <= end <= MAX_PORT:
            raise InvalidArgument(field, f"range {begin}-{end} is not within 1-{MAX_PORT}")
        if index and begin <= ranges[index - 1][1]:
            raise InvalidArgument(field, f"range {begin}-{end} overlaps another range")
    if sum(end - begin + 1 for begin, end in ranges) > MAX_PORT_MAPPINGS:
        raise InvalidArgument(field, f"more than {MAX_PORT_MAPPINGS} ports")
    return tuple(ranges)


def port_mapping(text: str, field: str) -> PortMapping:
    """`HOST_PORT:CONTAINER_PORT[/tcp|/udp]`, both ports in 1-65535."""
    ports, _, protocol = text.partition("/")
    host, sep, container = ports.partition(":")
    shown = text if len(text) <= 64 else text[:64] + "..."
    if not sep or not host.isdigit() or not container.isdigit() or len(ports) > 11:
        raise InvalidArgument(field, f"{shown!r} is not HOST_PORT:CONTAINER_PORT[/tcp|/udp]")
    if protocol not in ("", "tcp", "udp"):
        raise InvalidArgument(field, f"{shown!r}: protocol must be tcp or udp")
    for name, port in (("host port", int(host)), ("container port", int(container))):
        if not 1 <= port <= MAX_PORT:
            raise InvalidArgument(field, f"{shown!r}: {name} {port} is outside 1-{MAX_PORT}")
    return PortMapping(int(host), int(container), protocol or "tcp")


def network(message: pb.NetworkInfo) -> NetworkSettings:
    """Mode and mappings as far as they can be checked without the node's config; the network
    isolator checks the rest (mode allowed, privileged ports, conflicts) before it creates
    anything."""
    mode = _text(message.mode, "container.network.mode", 64)
    if mode and mode not in NETWORK_MODES:
        raise InvalidArgument(
            "container.network.mode", f"unknown mode {mode!r}; known: {list(NETWORK_MODES)}"
        )
    if len(message.port_mappings) > MAX_PORT_MAPPINGS:
        raise InvalidArgument("container.network.port_mappings", "too many mappings")
    mappings = tuple(
        port_mapping(text, f"container.network.port_mappings[{index}]")
        for index, text in enumerate(message.port_mappings)
    )
    return NetworkSettings(mode=mode, port_mappings=mappings)


def _environment(variables: Sequence[pb.EnvironmentVariable]) -> tuple[tuple[str, str], ...]:
    result = []
    for index, variable in enumerate(variables):
        where = f"command.environment[{index}]"
        if not variable.name or "=" in variable.name or "\x00" in variable.name:
            raise InvalidArgument(
                f"{where}.name", f"{variable.name!r} must be non-empty without '=' or NUL"
            )
        result.append((variable.name, _text(variable.value, f"{where}.value")))
    return tuple(result)


def command(message: pb.CommandInfo, *, image_given: bool = False) -> Command:
    """An empty command is allowed with an image: the image's Entrypoint and Cmd run."""
    shell, argv = message.shell, list(message.argv)
    if shell and argv:
        raise InvalidArgument("command", "give either shell or argv, not both")
    if shell and not shell.strip():
        raise InvalidArgument("command.shell", "is blank")
    if not shell and not argv and not image_given:
        raise InvalidArgument("command", "is empty: give a shell string or an argv")
    if argv and not argv[0]:
        raise InvalidArgument("command.argv[0]", "is empty")
    _text(shell, "command.shell", MAX_COMMAND)
    for index, arg in enumerate(argv):
        _text(arg, f"command.argv[{index}]", MAX_COMMAND)
    user = _text(message.user, "command.user", 256)
    if user and not all(c.isalnum() or c in "_.-" for c in user):
        raise InvalidArgument("command.user", f"{user!r} is not a user name or uid")
    working_dir = _text(message.working_dir, "command.working_dir")
    if working_dir and not working_dir.startswith("/"):
        raise InvalidArgument("command.working_dir", f"{working_dir!r} is not an absolute path")
    environment = _environment(message.environment)
    exec_size(["/bin/sh", "-c", shell] if shell else argv, environment)
    return Command(
        shell=shell if shell else None,
        argv=tuple(argv),
        environment=environment,
        user=user or None,
        working_dir=working_dir or None,
    )


def exec_size(argv: Sequence[str], environment: Sequence[tuple[str, str]]) -> None:
    """Refuse what execve would refuse (E2BIG) before anything is created."""
    named = [(f"command.argv[{i}]", arg) for i, arg in enumerate(argv)]
    named += [(f"command.environment[{i}]", f"{k}={v}") for i, (k, v) in enumerate(environment)]
    total = 0
    for where, text in named:
        size = len(text.encode()) + 1
        if size > MAX_ARG_STRLEN:
            raise InvalidArgument(
                where,
                f"is {size - 1} bytes; the kernel takes at most {MAX_ARG_STRLEN - 1} bytes per"
                " argument or NAME=VALUE variable (MAX_ARG_STRLEN)",
            )
        total += size + ARG_POINTER_BYTES
    arg_max = os.sysconf("SC_ARG_MAX")
    budget = arg_max - max(arg_max // 4, 64 * 1024)
    if total > budget:
        raise InvalidArgument(
            "command",
            f"argv and environment take {total} bytes; at most {budget} fit this node's"
            f" ARG_MAX of {arg_max} bytes with room for the supervisor",
        )


def sandbox(
    value: str, default: str, *, state_dir: str | None = None, taken: Iterable[str] = ()
) -> str:
    """The caller's sandbox directory, or the default. A caller-named one may not lie in the
    state directory (which holds other containers' sandboxes and our records) nor overlap a
    sandbox in use: the service removes only what it created, but must not write into or hand
    out another container's files either."""
    if not value:
        return default
    _text(value, "sandbox", 4096)
    if not value.startswith("/"):
        raise InvalidArgument("sandbox", f"{value!r} is not an absolute path")
    normalized = os.path.normpath(value)
    if normalized == "/" or ".." in value.split("/"):
        raise InvalidArgument("sandbox", f"{value!r} is not a usable sandbox directory")
    candidates = {normalized, os.path.realpath(normalized)}
    if state_dir is not None:
        for state in {os.path.normpath(state_dir), os.path.realpath(state_dir)}:
            if any(_overlap(candidate, state) for candidate in candidates):
                raise InvalidArgument(
                    "sandbox", f"{normalized!r} overlaps the service's state directory {state}"
                )
    for other in taken:
        if any(_overlap(candidate, other) for candidate in candidates):
            raise InvalidArgument(
                "sandbox", f"{normalized!r} overlaps the sandbox {other} of a running container"
            )
    return normalized


def _overlap(path: str, other: str) -> bool:
    """Whether one of two normalized absolute paths is the other or lies inside it."""
    return path == other or path.startswith(other.rstrip("/") + "/") or other.startswith(path + "/")


def labels(values: dict[str, str]) -> tuple[tuple[str, str], ...]:
    total = 0
    for key, value in values.items():
        if not key or any(not (c.isprintable()) for c in key):
            raise InvalidArgument("labels", f"label key {key[:64]!r} is empty or not printable")
        key_bytes, value_bytes = len(key.encode()), len(value.encode())
        if key_bytes > MAX_LABEL_KEY_BYTES:
            raise InvalidArgument(
                "labels", f"label key {key[:64]!r}... is over {MAX_LABEL_KEY_BYTES} bytes"
            )
        _text(value, f"labels[{key}]")
        if value_bytes > MAX_LABEL_VALUE_BYTES:
            raise InvalidArgument(
                f"labels[{key}]", f"is {value_bytes} bytes, over {MAX_LABEL_VALUE_BYTES} bytes"
            )
        total += key_bytes + value_bytes
    if total > MAX_LABELS_BYTES:
        raise InvalidArgument(
            "labels", f"keys and values take {total} bytes, over {MAX_LABELS_BYTES} bytes"
        )
    return tuple(sorted(values.items()))


def launch_spec(
    request: pb.LaunchRequest,
    *,
    default_runtime: str,
    default_sandbox: str,
    state_dir: str | None = None,
    sandboxes_in_use: Iterable[str] = (),
) -> tuple[LaunchSpec, tuple[str, ...]]:
    """Validate a LaunchRequest completely; return the spec and the warnings to report.

    A runtime name that is no runtime at all is INVALID_ARGUMENT here; a real runtime that this
    node has not configured is FAILED_PRECONDITION, from the core."""
    cid = container_id(request.container_id)
    runtime = request.container.runtime or default_runtime
    if runtime not in RUNTIMES:
        raise InvalidArgument(
            "container.runtime", f"unknown runtime {runtime!r}; known: {sorted(RUNTIMES)}"
        )
    image = _text(request.container.image, "container.image", 1024)
    if image and any(c.isspace() for c in image):
        raise InvalidArgument("container.image", f"{image!r} contains whitespace")
    parsed, warnings = resources(request.resources)
    spec = LaunchSpec(
        container_id=cid,
        command=command(request.command, image_given=bool(image)),
        resources=parsed,
        runtime=runtime,
        sandbox=sandbox(
            request.sandbox, default_sandbox, state_dir=state_dir, taken=sandboxes_in_use
        ),
        image=image or None,
        labels=labels(dict(request.labels)),
        network=network(request.container.network),
        privileged=request.privileged,
        no_new_privileges=request.no_new_privileges,
        linux=LinuxOptions(
            stdin=request.stdin or request.stdin_once,
            stdin_once=request.stdin_once,
            tty=request.tty,
        ),
        user_namespace=(request.user_namespace if request.HasField("user_namespace") else None),
    )
    return spec, warnings


def signal_number(value: int) -> int:
    if value == 0:
        return 15
    if not 1 <= value <= 64:
        raise InvalidArgument("signal", f"must be a signal number in 1..64, got {value}")
    return value
