"""Mesos External Containerizer Protocol messages <-> our containerizer.v1 API messages.

Pure functions, no grpc and no I/O, so every rule here is unit-tested on its own. The service's
ECP socket (adapter/server/mesos.py) uses them; the `containerizer-mesos` program (program.py)
never imports them: it is a pipe of the standard library to that socket.

The rules follow what a Mesos 0.19-0.27 agent sends and expects:

* Launch: the agent always sends `executor_info`; `task_info` too when the run starts with a
  task. A *command task* (task_info.command set, task_info.executor unset) runs the task's own
  command; any other launch runs the executor's command. The agent has already added the task's
  resources to `executor_info.resources` (slave.cpp, "include the task's resources", MESOS-600),
  so those are the container's resources; the task's are used only when the executor has none.
* The workload gets the environment Mesos' executorEnvironment() gives an executor (so a Mesos
  executor inside can register with the agent), then `command.environment` on top, as Mesos does.
* CommandInfo.shell=false executes the file `value` with argv `arguments`, arguments[0] being
  argv[0] (execlp semantics); our API executes argv[0], so argv = [value] + arguments[1:].
* Termination.status is the waitpid() status word the agent decodes with WIFEXITED/WTERMSIG.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

# No protobuf type stubs in this environment (types-protobuf): DecodeError is an Exception.
from google.protobuf.message import DecodeError  # type: ignore[import-untyped, unused-ignore]

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.api.mesos import containerizer_pb2 as ecp
from adapter.api.mesos import mesos_pb2 as mesos

# Resources our API accepts from a Mesos agent; anything else is dropped with a warning.
SCALAR_RESOURCES = ("cpus", "mem", "disk")
RANGE_RESOURCES = ("ports",)
# Variables of the agent's own executor environment that a Launch cannot tell us but the agent
# put into *our* environment when it invoked `launch` (external_containerizer.cpp passes
# executorEnvironment() to the ECP): forwarded to the workload as they are.
AGENT_ENVIRONMENT_PREFIXES = ("MESOS_", "LIBPROCESS_")
AGENT_ENVIRONMENT_NAMES = ("HADOOP_HOME",)
# Set by the agent for the ECP program itself, not part of an executor's environment.
ECP_ONLY_VARIABLES = (
    "MESOS_LIBEXEC_DIRECTORY",
    "MESOS_WORK_DIRECTORY",
    "MESOS_DEFAULT_CONTAINER_IMAGE",
)
DOCKER_URI_PREFIXES = ("docker:///", "docker://")
LABEL_PREFIX = "mesos."


class BadMessage(ValueError):
    """A message on stdin that cannot be used; the text names the message and the field."""


@dataclass
class Translated:
    """A request for our API plus the adjustments worth a line in the agent's sandbox log."""

    request: pb.LaunchRequest | pb.UpdateRequest
    warnings: list[str] = field(default_factory=list)


# ---- parsing ----


def parse(kind: type[Any], payload: bytes) -> Any:
    """Decode one ECP message; garbage becomes a BadMessage naming the expected type."""
    message = kind()
    try:
        message.ParseFromString(payload)
    except DecodeError as exc:
        raise BadMessage(
            f"cannot decode {len(payload)} bytes as {kind.DESCRIPTOR.full_name}: {exc}"
        ) from None
    return message


def container_id(message: ecp.Launch | ecp.Update | ecp.Wait | ecp.Destroy | ecp.Usage) -> str:
    """The container id every ECP input carries; its absence is the agent's error, named."""
    value: str = message.container_id.value
    if not value:
        raise BadMessage(f"{message.DESCRIPTOR.full_name} has no container_id.value")
    if not isinstance(value, str):  # proto2 hands a string that is not UTF-8 over as bytes
        raise BadMessage(f"{message.DESCRIPTOR.full_name}: container_id.value is not UTF-8")
    return value


# ---- launch ----


def launch_request(
    launch: ecp.Launch, agent_environment: Mapping[str, str], *, ports: bool = True
) -> Translated:
    """Launch -> LaunchRequest; `agent_environment` is the environment the agent gave us,
    `ports` whether port ranges are forwarded (see resource_list)."""
    cid = container_id(launch)
    executor, task = launch.executor_info, launch.task_info
    command_task = launch.HasField("task_info") and _is_command_task(task)
    command = task.command if command_task else executor.command
    if not command.value:
        where = "task_info.command.value" if command_task else "executor_info.command.value"
        raise BadMessage(f"mesos.containerizer.Launch has no command: {where} is empty")
    resources, warnings = resource_list(
        executor.resources if executor.resources else task.resources, "Launch", ports=ports
    )
    request = pb.LaunchRequest(
        container_id=cid,
        command=_command(command, launch.user, executor_environment(launch, agent_environment)),
        resources=resources,
        sandbox=launch.directory,
        labels=_labels(launch, command_task),
    )
    image = _image(task if command_task else None, executor, command)
    if image:
        request.container.image = image
    return Translated(request, warnings)


def _is_command_task(task: mesos.TaskInfo) -> bool:
    return task.HasField("command") and not task.HasField("executor")


def _command(
    command: mesos.CommandInfo, user: str, base_environment: Mapping[str, str]
) -> pb.CommandInfo:
    """CommandInfo -> ours: shell string or argv, the merged environment, the agent's user."""
    environment = dict(base_environment)
    for variable in command.environment.variables:
        environment[variable.name] = variable.value
    ours = pb.CommandInfo(user=user)
    if command.shell:
        ours.shell = command.value
    else:
        ours.argv.extend([command.value, *command.arguments[1:]])
    for name, value in environment.items():
        ours.environment.add(name=name, value=value)
    return ours


def executor_environment(
    launch: ecp.Launch, agent_environment: Mapping[str, str]
) -> dict[str, str]:
    """What Mesos' executorEnvironment() sets, derived from the Launch where it can be.

    Mesos 0.2x sets LIBPROCESS_PORT=0, MESOS_FRAMEWORK_ID, MESOS_EXECUTOR_ID, MESOS_DIRECTORY,
    MESOS_SLAVE_ID, MESOS_SLAVE_PID, MESOS_CHECKPOINT (and MESOS_RECOVERY_TIMEOUT, from an agent
    flag, when checkpointing): the ones a Launch carries come from it, the rest are forwarded
    from the environment the agent invoked us with."""
    environment = {
        name: value
        for name, value in agent_environment.items()
        if (name.startswith(AGENT_ENVIRONMENT_PREFIXES) or name in AGENT_ENVIRONMENT_NAMES)
        and name not in ECP_ONLY_VARIABLES
    }
    executor = launch.executor_info
    derived = {
        "MESOS_FRAMEWORK_ID": executor.framework_id.value,
        "MESOS_EXECUTOR_ID": executor.executor_id.value,
        "MESOS_DIRECTORY": launch.directory,
        "MESOS_SLAVE_ID": launch.slave_id.value,
        "MESOS_SLAVE_PID": launch.slave_pid,
    }
    environment.update({name: value for name, value in derived.items() if value})
    environment["LIBPROCESS_PORT"] = "0"
    environment["MESOS_CHECKPOINT"] = "1" if launch.checkpoint else "0"
    return environment


def _labels(launch: ecp.Launch, command_task: bool) -> dict[str, str]:
    """Mesos ids as labels, so `containerizer ps` shows which framework a container serves."""
    executor = launch.executor_info
    labels = {
        "framework_id": executor.framework_id.value,
        "executor_id": executor.executor_id.value,
        "slave_id": launch.slave_id.value,
        "task_id": launch.task_info.task_id.value if launch.HasField("task_info") else "",
    }
    if command_task:
        labels["command_task"] = "true"
    return {LABEL_PREFIX + key: value for key, value in labels.items() if value}


def _image(
    task: mesos.TaskInfo | None, executor: mesos.ExecutorInfo, command: mesos.CommandInfo
) -> str:
    """The Docker image asked for, if any: ContainerInfo (0.20+), else CommandInfo's (0.19).

    An empty answer leaves the container to the node's default runtime; an image makes the
    service route it to an image-capable one."""
    owners: list[mesos.TaskInfo | mesos.ExecutorInfo] = (
        [executor] if task is None else [task, executor]
    )
    for owner in owners:
        info = owner.container
        if owner.HasField("container") and info.type == mesos.ContainerInfo.DOCKER:
            image: str = info.docker.image
            if image:
                return image
    legacy: str = command.container.image
    for prefix in DOCKER_URI_PREFIXES:
        if legacy.startswith(prefix):
            return legacy[len(prefix) :]
    return legacy


# ---- resources and update ----


def resource_list(
    resources: Iterable[mesos.Resource], where: str, *, ports: bool = True
) -> tuple[list[pb.Resource], list[str]]:
    """Mesos resources -> ours: scalars of one name summed (Mesos lists one entry per role),
    port ranges concatenated, names our API does not know dropped with a warning.

    `ports=False` drops port ranges too, for a service that does not take them yet: without
    network isolation a container shares the host's network and its task binds the ports it
    was offered directly, which is what Mesos' own containerizer does without a port isolator."""
    scalars: dict[str, float] = {}
    ranges: dict[str, list[tuple[int, int]]] = {}
    warnings: list[str] = []
    for resource in resources:
        name = resource.name
        if name in SCALAR_RESOURCES and resource.type == mesos.Value.SCALAR:
            scalars[name] = scalars.get(name, 0.0) + resource.scalar.value
        elif name in RANGE_RESOURCES and resource.type == mesos.Value.RANGES and not ports:
            warnings.append(f"{where}: {name!r} not forwarded: the host network is shared")
        elif name in RANGE_RESOURCES and resource.type == mesos.Value.RANGES:
            spans = ranges.setdefault(name, [])
            spans.extend((span.begin, span.end) for span in resource.ranges.range)
        else:
            kind = mesos.Value.Type.Name(resource.type) if resource.HasField("type") else "?"
            warnings.append(f"{where}: ignored resource {name!r} of type {kind}")
    ours = [
        pb.Resource(name=name, type=pb.Value.SCALAR, scalar=pb.Value.Scalar(value=value))
        for name, value in scalars.items()
    ]
    for name, spans in ranges.items():
        resource = pb.Resource(name=name, type=pb.Value.RANGES)
        resource.ranges.range.extend(pb.Value.Range(begin=b, end=e) for b, e in spans)
        ours.append(resource)
    return ours, warnings


def update_request(update: ecp.Update, *, ports: bool = True) -> Translated:
    """Update -> UpdateRequest: the container's new total resources."""
    resources, warnings = resource_list(update.resources, "Update", ports=ports)
    request = pb.UpdateRequest(container_id=container_id(update), resources=resources)
    return Translated(request, warnings)


# ---- replies ----


def usage_statistics(statistics: pb.ResourceStatistics, now: float) -> bytes:
    """Our statistics as a mesos.ResourceStatistics: the same bytes, as the fields line up
    number for number, with a timestamp (`now`) when ours has none: proto3 leaves a zero out,
    and Mesos requires the field."""
    if statistics.timestamp:
        payload: bytes = statistics.SerializeToString()
        return payload
    stamped = pb.ResourceStatistics()
    stamped.CopyFrom(statistics)
    stamped.timestamp = now
    payload = stamped.SerializeToString()
    return payload


def termination(ours: pb.Termination) -> ecp.Termination:
    """Our Termination -> Mesos'. `status` only when there is one: a container lost or never
    started has no exit status, and an absent status is how Mesos says so."""
    reply = ecp.Termination(killed=ours.killed, message=ours.message or _describe(ours))
    if ours.HasField("exit_code") or ours.HasField("signal"):
        reply.status = ours.status
    return reply


def _describe(ours: pb.Termination) -> str:
    """A message for the agent's log when the service gave none."""
    reason = str(pb.Reason.Name(ours.reason)).lower().replace("_", " ")
    if ours.HasField("signal"):
        return f"{reason}: killed by signal {ours.signal}"
    if ours.HasField("exit_code"):
        return f"{reason}: exit code {ours.exit_code}"
    return reason


def containers(statuses: Iterable[pb.ContainerStatus]) -> ecp.Containers:
    """Every container not yet TERMINATED: those the agent may still wait on or destroy."""
    reply = ecp.Containers()
    for status in statuses:
        if status.state != pb.TERMINATED:
            reply.containers.add(value=status.container_id)
    return reply
