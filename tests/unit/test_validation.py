import math

import pytest

from adapter import validation
from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.errors import InvalidArgument


def scalar(name: str, value: float) -> pb.Resource:
    return pb.Resource(name=name, type=pb.Value.SCALAR, scalar=pb.Value.Scalar(value=value))


def request(**overrides: object) -> pb.LaunchRequest:
    fields: dict[str, object] = {
        "container_id": "c1",
        "command": pb.CommandInfo(shell="true"),
    }
    fields.update(overrides)
    return pb.LaunchRequest(**fields)  # type: ignore[arg-type]


def spec(message: pb.LaunchRequest):  # type: ignore[no-untyped-def]
    return validation.launch_spec(message, default_runtime="native", default_sandbox="/tmp/sb")


@pytest.mark.parametrize("bad", ["../x", "a/b", "", "x" * 1000, "a\x00b", ".hidden", "-x", "a b"])
def test_bad_container_ids_are_refused(bad: str) -> None:
    with pytest.raises(InvalidArgument) as error:
        spec(request(container_id=bad))
    assert error.value.field == "container_id"


@pytest.mark.parametrize("good", ["a", "A.b_c-1", "x" * 128, "0"])
def test_good_container_ids(good: str) -> None:
    assert spec(request(container_id=good))[0].container_id == good


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("cpus", -1.0),
        ("mem", math.nan),
        ("disk", math.inf),
        ("cpus", 0.0),
        ("pids", 1.5),
        ("pids", 0.0),
        ("mem", -math.inf),
    ],
)
def test_bad_resources_name_the_resource(name: str, value: float) -> None:
    with pytest.raises(InvalidArgument) as error:
        spec(request(resources=[scalar(name, value)]))
    assert name in error.value.field


def test_unknown_and_duplicate_resources() -> None:
    with pytest.raises(InvalidArgument, match="unknown resource 'gpus'"):
        spec(request(resources=[scalar("gpus", 1)]))
    with pytest.raises(InvalidArgument, match="given twice"):
        spec(request(resources=[scalar("cpus", 1), scalar("cpus", 2)]))


def test_mem_below_minimum_is_raised_and_reported() -> None:
    parsed, warnings = spec(request(resources=[scalar("mem", 1), scalar("cpus", 0.5)]))
    assert parsed.resources.mem_mib == 32
    assert parsed.resources.cpus == 0.5
    assert warnings == ("mem raised from 1 MiB to the minimum of 32 MiB",)


def test_unknown_runtime_is_invalid() -> None:
    with pytest.raises(InvalidArgument) as error:
        spec(request(container=pb.ContainerInfo(runtime="warp")))
    assert error.value.field == "container.runtime"


@pytest.mark.parametrize(
    ("variable", "field"),
    [
        (pb.EnvironmentVariable(name="A=B", value="x"), "command.environment[0].name"),
        (pb.EnvironmentVariable(name="A\x00", value="x"), "command.environment[0].name"),
        (pb.EnvironmentVariable(name="", value="x"), "command.environment[0].name"),
        (pb.EnvironmentVariable(name="A", value="x\x00"), "command.environment[0].value"),
    ],
)
def test_bad_environment_names_the_entry(variable: pb.EnvironmentVariable, field: str) -> None:
    with pytest.raises(InvalidArgument) as error:
        spec(request(command=pb.CommandInfo(shell="true", environment=[variable])))
    assert error.value.field == field


@pytest.mark.parametrize(
    "command",
    [
        pb.CommandInfo(),
        pb.CommandInfo(shell="   "),
        pb.CommandInfo(argv=[""]),
        pb.CommandInfo(shell="x", argv=["y"]),
    ],
)
def test_empty_or_ambiguous_command_is_refused(command: pb.CommandInfo) -> None:
    with pytest.raises(InvalidArgument) as error:
        spec(request(command=command))
    assert error.value.field.startswith("command")


@pytest.mark.parametrize("sandbox", ["relative/dir", "/", "/tmp/../etc", "/a\x00b"])
def test_bad_sandbox_is_refused(sandbox: str) -> None:
    with pytest.raises(InvalidArgument) as error:
        spec(request(sandbox=sandbox))
    assert error.value.field == "sandbox"


def test_valid_request_becomes_a_spec() -> None:
    parsed, warnings = spec(
        request(
            command=pb.CommandInfo(
                argv=["/bin/echo", "hi"],
                environment=[pb.EnvironmentVariable(name="K", value="v=w")],
                working_dir="/tmp",
            ),
            labels={"team": "infra"},
        )
    )
    assert parsed.command.resolved_argv() == ["/bin/echo", "hi"]
    assert parsed.command.environment == (("K", "v=w"),)
    assert parsed.sandbox == "/tmp/sb"
    assert parsed.labels == (("team", "infra"),)
    assert warnings == ()


def test_signal_numbers() -> None:
    assert validation.signal_number(0) == 15
    assert validation.signal_number(9) == 9
    with pytest.raises(InvalidArgument, match="signal"):
        validation.signal_number(65)
