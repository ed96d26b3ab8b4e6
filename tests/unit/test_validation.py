import math
import os
from pathlib import Path

import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.core.errors import InvalidArgument
from adapter.server import validation


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


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("cpus", 256.5, "must be at most 256 cores"),
        ("mem", 1e30, "must be at most 8.58993e+09 MiB (2^53 bytes)"),
        ("disk", 2.0**33 + 1, "must be at most 8.58993e+09 MiB (2^53 bytes)"),
        ("network_bandwidth", 40_000, "must be at most 34359 Mbit/s"),
        ("pids", 4_194_305, "must be an integer in 1..4194304"),
    ],
)
def test_resources_are_bounded_by_what_the_kernel_takes(
    name: str, value: float, message: str
) -> None:
    with pytest.raises(InvalidArgument) as error:
        validation.resources([scalar(name, value)])
    assert error.value.field == f"resources[{name}]"
    assert message in str(error.value)


def test_largest_accepted_resources() -> None:
    parsed, _ = validation.resources(
        [scalar("cpus", 256), scalar("mem", 2.0**33), scalar("pids", 4_194_304)]
    )
    assert parsed.cpus == 256 and parsed.mem_bytes == 2**53 and parsed.pids == 4_194_304


@pytest.mark.parametrize(
    ("labels", "field", "message"),
    [
        ({"k" * 257: "v"}, "labels", "is over 256 bytes"),
        ({"é" * 129: "v"}, "labels", "is over 256 bytes"),  # bytes, not characters
        ({"k": "v" * 16385}, "labels[k]", "is 16385 bytes, over 16384 bytes"),
        ({f"k{n}": "v" * 16000 for n in range(5)}, "labels", "over 65536 bytes"),
    ],
)
def test_labels_are_bounded(labels: dict[str, str], field: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as error:
        spec(request(labels=labels))
    assert error.value.field == field
    assert message in str(error.value)


def test_labels_up_to_the_bounds_are_accepted() -> None:
    labels = {f"k{n}": "v" * 16000 for n in range(4)}
    assert dict(spec(request(labels=labels))[0].labels) == labels


def test_argv_and_environment_must_fit_exec() -> None:
    room = os.sysconf("SC_ARG_MAX")
    with pytest.raises(InvalidArgument) as error:
        spec(request(command=pb.CommandInfo(argv=["/bin/echo", "y" * validation.MAX_ARG_STRLEN])))
    assert error.value.field == "command.argv[1]"
    with pytest.raises(InvalidArgument) as error:
        spec(request(command=pb.CommandInfo(shell="x" * validation.MAX_ARG_STRLEN)))
    assert error.value.field == "command.argv[2]"  # /bin/sh -c SHELL
    variables = [
        pb.EnvironmentVariable(name=f"V{n}", value="x" * 1024) for n in range(room // 1024)
    ]
    with pytest.raises(InvalidArgument) as error:
        spec(request(command=pb.CommandInfo(shell="true", environment=variables)))
    assert error.value.field == "command"
    assert f"ARG_MAX of {room} bytes" in str(error.value)
    fits = variables[: room // 2048]
    assert len(
        spec(request(command=pb.CommandInfo(shell="true", environment=fits)))[0].command.environment
    ) == len(fits)


def launched_in(state_dir: str, sandbox: str, taken: tuple[str, ...] = ()) -> str:
    return validation.launch_spec(
        request(sandbox=sandbox),
        default_runtime="native",
        default_sandbox=f"{state_dir}/sandboxes/c1",
        state_dir=state_dir,
        sandboxes_in_use=taken,
    )[0].sandbox


@pytest.mark.parametrize(
    "sandbox",
    [
        "/var/lib/ctz",
        "/var/lib/ctz/sandboxes/other",
        "/var/lib/ctz/sandboxes",
        "/var/lib/ctz/native/x",
        "/var/lib",  # would hold the state directory
        "/srv/a",  # a running container's
        "/srv/a/inner",
        "/srv",
    ],
)
def test_caller_sandbox_may_not_overlap_state_or_another_sandbox(sandbox: str) -> None:
    with pytest.raises(InvalidArgument) as error:
        launched_in("/var/lib/ctz", sandbox, taken=("/srv/a",))
    assert error.value.field == "sandbox"


def test_caller_sandbox_through_a_symlink_into_the_state_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "sandboxes" / "a").mkdir(parents=True)
    (tmp_path / "link").symlink_to(state / "sandboxes" / "a")
    with pytest.raises(InvalidArgument, match="overlaps the service's state directory"):
        launched_in(str(state), str(tmp_path / "link"))


def test_caller_sandboxes_beside_others_are_fine() -> None:
    assert launched_in("/var/lib/ctz", "/srv/ab", taken=("/srv/a",)) == "/srv/ab"
    assert launched_in("/var/lib/ctz", "", taken=("/srv/a",)) == "/var/lib/ctz/sandboxes/c1"
