"""adapter/clients/mesos/translate.py on its own: Mesos ECP messages in, containerizer.v1 messages
out.

The builders at the top write messages the way a Mesos 0.2x agent does (executor_info always,
task resources already folded into the executor's); the other test modules import them.
"""

from __future__ import annotations

import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.api.mesos import containerizer_pb2 as ecp
from adapter.api.mesos import mesos_pb2 as mesos
from adapter.clients.mesos import translate as translate

SANDBOX = "/var/lib/mesos/slaves/S1/frameworks/F1/executors/E1/runs/C1"


def scalar(name: str, value: float) -> mesos.Resource:
    return mesos.Resource(
        name=name, type=mesos.Value.SCALAR, scalar=mesos.Value.Scalar(value=value)
    )


def ports(*spans: tuple[int, int]) -> mesos.Resource:
    resource = mesos.Resource(name="ports", type=mesos.Value.RANGES)
    for begin, end in spans:
        resource.ranges.range.add(begin=begin, end=end)
    return resource


def shell_command(value: str, **environment: str) -> mesos.CommandInfo:
    command = mesos.CommandInfo(value=value)
    for name, variable_value in environment.items():
        command.environment.variables.add(name=name, value=variable_value)
    return command


def executor_launch(
    container_id: str,
    command: mesos.CommandInfo,
    resources: list[mesos.Resource] | None = None,
    directory: str = SANDBOX,
) -> ecp.Launch:
    """A custom executor's launch, as the agent writes it."""
    launch = ecp.Launch(directory=directory, slave_pid="slave(1)@10.0.0.5:5051", checkpoint=True)
    launch.container_id.value = container_id
    launch.slave_id.value = "S1"
    executor = launch.executor_info
    executor.executor_id.value = "E1"
    executor.framework_id.value = "F1"
    executor.name = "test executor"
    executor.command.CopyFrom(command)
    executor.resources.extend(resources or [])
    return launch


def command_task_launch(
    container_id: str,
    command: mesos.CommandInfo,
    resources: list[mesos.Resource] | None = None,
    directory: str = SANDBOX,
) -> ecp.Launch:
    """A command task's launch: task_info carries the command; executor_info is the agent's
    command executor, whose resources include the task's (plus the executor's allowance)."""
    task_resources = resources or []
    launch = executor_launch(
        container_id,
        mesos.CommandInfo(value="/usr/libexec/mesos/mesos-executor"),
        [*task_resources, scalar("cpus", 0.1), scalar("mem", 32)] if resources else [],
        directory,
    )
    launch.executor_info.executor_id.value = "T1"
    task = launch.task_info
    task.name = "task"
    task.task_id.value = "T1"
    task.slave_id.value = "S1"
    task.command.CopyFrom(command)
    task.resources.extend(task_resources)
    return launch


def by_name(resources: list[pb.Resource] | object) -> dict[str, pb.Resource]:
    return {resource.name: resource for resource in resources}  # type: ignore[attr-defined]


def environment(request: pb.LaunchRequest) -> dict[str, str]:
    return {variable.name: variable.value for variable in request.command.environment}


def launch_request(launch: ecp.Launch, agent_env: dict[str, str] | None = None) -> pb.LaunchRequest:
    request = translate.launch_request(launch, agent_env or {}).request
    assert isinstance(request, pb.LaunchRequest)
    return request


# ---- launch: command ----


def test_executor_command_runs_with_sh_by_default() -> None:
    request = launch_request(executor_launch("c1", shell_command("./my-executor --flag")))
    assert request.container_id == "c1"
    assert request.command.shell == "./my-executor --flag"
    assert list(request.command.argv) == []


def test_command_task_runs_the_task_command_not_the_command_executor() -> None:
    request = launch_request(command_task_launch("c2", shell_command("exit 3")))
    assert request.command.shell == "exit 3"
    assert request.labels["mesos.task_id"] == "T1"
    assert request.labels["mesos.command_task"] == "true"


def test_task_with_its_own_executor_runs_the_executor() -> None:
    launch = executor_launch("c3", shell_command("./executor"))
    launch.task_info.task_id.value = "T9"
    launch.task_info.executor.CopyFrom(launch.executor_info)
    launch.task_info.command.value = "ignored: the executor runs the task"
    request = launch_request(launch)
    assert request.command.shell == "./executor"
    assert "mesos.command_task" not in request.labels


def test_shell_false_executes_value_with_arguments_after_argv0() -> None:
    # Mesos: execlp(value, arguments[0], arguments[1], ...): arguments[0] is argv[0].
    command = mesos.CommandInfo(value="/bin/sh", shell=False, arguments=["sh", "-c", "exit 4"])
    request = launch_request(command_task_launch("c4", command))
    assert list(request.command.argv) == ["/bin/sh", "-c", "exit 4"]
    assert request.command.shell == ""


def test_shell_false_without_arguments_runs_value_alone() -> None:
    command = mesos.CommandInfo(value="/bin/true", shell=False)
    assert list(launch_request(executor_launch("c5", command)).command.argv) == ["/bin/true"]


def test_shell_true_ignores_arguments_as_mesos_does() -> None:
    command = mesos.CommandInfo(value="echo hi", arguments=["x", "y"])
    request = launch_request(executor_launch("c6", command))
    assert request.command.shell == "echo hi"
    assert list(request.command.argv) == []


def test_user_comes_from_the_launch_not_the_command() -> None:
    launch = executor_launch("c7", mesos.CommandInfo(value="id", user="framework-user"))
    assert launch_request(launch).command.user == ""
    launch.user = "nobody"
    assert launch_request(launch).command.user == "nobody"


def test_sandbox_is_the_directory() -> None:
    assert launch_request(executor_launch("c8", shell_command("true"))).sandbox == SANDBOX


@pytest.mark.parametrize("launch_kind", [executor_launch, command_task_launch])
def test_launch_without_command_is_refused(launch_kind: object) -> None:
    launch = launch_kind("c9", mesos.CommandInfo())  # type: ignore[operator]
    with pytest.raises(translate.BadMessage, match="has no command"):
        translate.launch_request(launch, {})


def test_launch_without_container_id_is_refused() -> None:
    launch = executor_launch("", shell_command("true"))
    with pytest.raises(translate.BadMessage, match="container_id"):
        translate.launch_request(launch, {})


# ---- launch: environment ----


def test_executor_environment_is_derived_from_the_launch() -> None:
    env = environment(launch_request(executor_launch("c10", shell_command("true"))))
    assert env["MESOS_FRAMEWORK_ID"] == "F1"
    assert env["MESOS_EXECUTOR_ID"] == "E1"
    assert env["MESOS_SLAVE_ID"] == "S1"
    assert env["MESOS_SLAVE_PID"] == "slave(1)@10.0.0.5:5051"
    assert env["MESOS_DIRECTORY"] == SANDBOX
    assert env["MESOS_CHECKPOINT"] == "1"
    assert env["LIBPROCESS_PORT"] == "0"


def test_checkpoint_false_is_zero_and_missing_ids_are_left_out() -> None:
    launch = ecp.Launch(directory=SANDBOX)
    launch.container_id.value = "c11"
    launch.executor_info.command.value = "true"
    env = environment(launch_request(launch))
    assert env["MESOS_CHECKPOINT"] == "0"
    assert "MESOS_FRAMEWORK_ID" not in env and "MESOS_SLAVE_PID" not in env


def test_agent_environment_is_forwarded_except_the_ecp_only_variables() -> None:
    agent_env = {
        "MESOS_RECOVERY_TIMEOUT": "15mins",
        "MESOS_NATIVE_LIBRARY": "/usr/lib/libmesos.so",
        "LIBPROCESS_IP": "10.0.0.5",
        "HADOOP_HOME": "/opt/hadoop",
        "MESOS_LIBEXEC_DIRECTORY": "/usr/libexec/mesos",
        "MESOS_WORK_DIRECTORY": "/var/lib/mesos",
        "MESOS_DEFAULT_CONTAINER_IMAGE": "busybox",
        "HOME": "/root",
        "CONTAINERIZER_ENDPOINT": "unix:/x",
        "MESOS_DIRECTORY": "/stale",
    }
    env = environment(launch_request(executor_launch("c12", shell_command("true")), agent_env))
    assert env["MESOS_RECOVERY_TIMEOUT"] == "15mins"
    assert env["MESOS_NATIVE_LIBRARY"] == "/usr/lib/libmesos.so"
    assert env["LIBPROCESS_IP"] == "10.0.0.5"
    assert env["HADOOP_HOME"] == "/opt/hadoop"
    for name in (
        "MESOS_LIBEXEC_DIRECTORY",
        "MESOS_WORK_DIRECTORY",
        "HOME",
        "CONTAINERIZER_ENDPOINT",
    ):
        assert name not in env
    assert "MESOS_DEFAULT_CONTAINER_IMAGE" not in env
    assert env["MESOS_DIRECTORY"] == SANDBOX  # the Launch wins over the inherited value


def test_command_environment_overrides_the_executor_environment() -> None:
    command = shell_command("true", GREETING="hello", LIBPROCESS_PORT="5052")
    env = environment(launch_request(executor_launch("c13", command)))
    assert env["GREETING"] == "hello"
    assert env["LIBPROCESS_PORT"] == "5052"


# ---- launch: resources ----


def test_executor_resources_are_the_container_resources() -> None:
    # The agent has already added the task's resources to the executor's: no double count.
    launch = command_task_launch(
        "c14", shell_command("true"), [scalar("cpus", 1), scalar("mem", 128)]
    )
    resources = by_name(launch_request(launch).resources)
    assert resources["cpus"].scalar.value == pytest.approx(1.1)
    assert resources["mem"].scalar.value == pytest.approx(160)
    assert resources["cpus"].type == pb.Value.SCALAR


def test_task_resources_are_used_when_the_executor_has_none() -> None:
    launch = command_task_launch("c15", shell_command("true"))
    launch.task_info.resources.extend([scalar("cpus", 0.5), scalar("disk", 10)])
    resources = by_name(launch_request(launch).resources)
    assert resources["cpus"].scalar.value == 0.5
    assert resources["disk"].scalar.value == 10


def test_scalars_of_one_name_are_summed_across_roles() -> None:
    launch = executor_launch(
        "c16", shell_command("true"), [scalar("cpus", 1), scalar("cpus", 0.25), scalar("mem", 64)]
    )
    resources = by_name(launch_request(launch).resources)
    assert resources["cpus"].scalar.value == 1.25
    assert len(launch_request(launch).resources) == 2


def test_port_ranges_pass_through() -> None:
    launch = executor_launch("c17", shell_command("true"), [ports((31000, 31004), (31010, 31010))])
    resource = by_name(launch_request(launch).resources)["ports"]
    assert resource.type == pb.Value.RANGES
    assert [(r.begin, r.end) for r in resource.ranges.range] == [(31000, 31004), (31010, 31010)]


def test_port_ranges_can_be_held_back_with_a_warning() -> None:
    launch = executor_launch(
        "c17b", shell_command("true"), [ports((31000, 31004)), scalar("cpus", 1)]
    )
    translated = translate.launch_request(launch, {}, ports=False)
    assert [r.name for r in translated.request.resources] == ["cpus"]
    assert translated.warnings == ["Launch: 'ports' not forwarded: the host network is shared"]


def test_unknown_resources_are_dropped_with_a_warning() -> None:
    gpus = scalar("gpus", 1)
    text_cpus = mesos.Resource(name="cpus", type=mesos.Value.SET)
    translated = translate.launch_request(
        executor_launch("c18", shell_command("true"), [gpus, text_cpus, scalar("mem", 64)]), {}
    )
    assert [r.name for r in translated.request.resources] == ["mem"]
    assert len(translated.warnings) == 2
    assert "'gpus'" in translated.warnings[0]


# ---- launch: image and labels ----


def test_docker_container_info_gives_the_image_and_leaves_the_runtime_to_the_service() -> None:
    launch = executor_launch("c19", shell_command("true"))
    launch.executor_info.container.type = mesos.ContainerInfo.DOCKER
    launch.executor_info.container.docker.image = "busybox:1.36"
    request = launch_request(launch)
    assert request.container.image == "busybox:1.36"
    assert request.container.runtime == ""


def test_command_task_container_info_comes_from_the_task() -> None:
    launch = command_task_launch("c20", shell_command("true"))
    launch.task_info.container.type = mesos.ContainerInfo.DOCKER
    launch.task_info.container.docker.image = "alpine"
    assert launch_request(launch).container.image == "alpine"


def test_no_container_info_or_mesos_type_means_the_default_runtime() -> None:
    launch = executor_launch("c21", shell_command("true"))
    assert not launch_request(launch).HasField("container")
    launch.executor_info.container.type = mesos.ContainerInfo.MESOS
    assert launch_request(launch).container.image == ""


def test_legacy_command_container_image_is_understood() -> None:
    command = shell_command("true")
    command.container.image = "docker:///ubuntu:14.04"
    assert launch_request(executor_launch("c22", command)).container.image == "ubuntu:14.04"


def test_mesos_ids_become_labels() -> None:
    labels = dict(launch_request(executor_launch("c23", shell_command("true"))).labels)
    assert labels == {
        "mesos.framework_id": "F1",
        "mesos.executor_id": "E1",
        "mesos.slave_id": "S1",
    }


# ---- parse, update ----


def test_unknown_fields_from_a_newer_agent_are_ignored() -> None:
    launch = executor_launch("c24", shell_command("true"))
    # Field 99 (length-delimited) and field 98 (varint) are unknown to us.
    payload = launch.SerializeToString() + b"\x9a\x06\x03abc" + b"\x90\x06\x01"
    parsed = translate.parse(ecp.Launch, payload)
    assert launch_request(parsed).command.shell == "true"


def test_garbage_is_a_bad_message_naming_the_type() -> None:
    with pytest.raises(translate.BadMessage, match=r"mesos\.containerizer\.Wait"):
        translate.parse(ecp.Wait, b"\xff\xff\xff\xff")


def test_container_id_is_required_for_every_input() -> None:
    for kind in (ecp.Wait, ecp.Destroy, ecp.Usage, ecp.Update):
        with pytest.raises(translate.BadMessage, match="container_id"):
            translate.container_id(kind())


def test_update_carries_the_new_total_resources() -> None:
    update = ecp.Update(resources=[scalar("cpus", 2), scalar("mem", 256), scalar("mem", 256)])
    update.container_id.value = "c25"
    request = translate.update_request(update).request
    assert isinstance(request, pb.UpdateRequest)
    assert request.container_id == "c25"
    assert by_name(request.resources)["mem"].scalar.value == 512


# ---- replies ----


def test_exit_code_becomes_the_status_word() -> None:
    ours = pb.Termination(exit_code=3, status=3 << 8, reason=pb.EXITED, message="exited")
    reply = translate.termination(ours)
    assert (reply.status, reply.killed, reply.message) == (768, False, "exited")


def test_killed_by_signal_keeps_killed_and_the_signal_number() -> None:
    ours = pb.Termination(signal=9, status=9, killed=True, reason=pb.DESTROYED)
    reply = translate.termination(ours)
    assert (reply.status, reply.killed) == (9, True)
    assert reply.message == "destroyed: killed by signal 9"


def test_a_lost_container_has_no_status() -> None:
    reply = translate.termination(pb.Termination(reason=pb.LOST, message="gone"))
    assert not reply.HasField("status")
    assert reply.IsInitialized()  # killed and message, required by Mesos, are always set


def test_containers_lists_everything_not_terminated() -> None:
    statuses = [
        pb.ContainerStatus(container_id="a", state=pb.RUNNING),
        pb.ContainerStatus(container_id="b", state=pb.TERMINATED),
        pb.ContainerStatus(container_id="c", state=pb.DESTROYING),
        pb.ContainerStatus(container_id="d", state=pb.LAUNCHING),
    ]
    reply = translate.containers(statuses)
    assert [c.value for c in reply.containers] == ["a", "c", "d"]
