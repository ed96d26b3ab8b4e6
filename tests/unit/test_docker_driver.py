"""The docker driver's translation, without a daemon: exits, limits, container config, image
references, names and cgroup paths, config errors, and an unreachable daemon."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import docker
import pytest

from adapter.core.config import NetworkOptions, parse_config
from adapter.core.confinement import (
    ALL_CAPABILITIES,
    DEFAULT_CAPABILITIES,
    MASKED_PATHS,
    READONLY_PATHS,
    oci_seccomp_profile,
)
from adapter.core.errors import (
    ConfigError,
    FailedPrecondition,
    InvalidArgument,
    LaunchFailed,
    NotFound,
    Unavailable,
)
from adapter.core.limits import Limits
from adapter.core.model import Command, LaunchSpec, NetworkSettings, PortMapping, Resources
from adapter.runtimes.docker.client import DockerEngine
from adapter.runtimes.docker.confinement import (
    NodeCapabilities,
    confinement_fields,
    is_root_user,
)
from adapter.runtimes.docker.container_config import resource_fields
from adapter.runtimes.docker.container_state import exit_from_inspect
from adapter.runtimes.docker.driver import DockerDriver
from adapter.runtimes.docker.handle import (
    LABEL_CONTAINER_ID,
    LABEL_OWNER,
    LABEL_ROLE,
    ROLE_SANDBOX,
    DockerHandle,
    container_name,
    sandbox_name,
)
from adapter.runtimes.docker.images import DockerImage, DockerImages
from adapter.runtimes.docker.network import PreparedNetwork
from adapter.runtimes.docker.options import DockerOptions
from adapter.runtimes.registry import parse_options
from tests.services import node_services

MIB = 1024 * 1024


def inspect(code: int, oom: bool = False, error: str = "") -> dict[str, Any]:
    state = {"Status": "exited", "ExitCode": code, "OOMKilled": oom, "Error": error}
    return {"State": state, "HostConfig": {"Memory": 64 * MIB}}


@pytest.mark.parametrize(
    ("code", "exit_code", "signal"),
    [
        (0, 0, None),
        (3, 3, None),
        (128, 128, None),
        (137, None, 9),
        (143, None, 15),
        (255, 255, None),
    ],
)
def test_exit_codes_and_signal_deaths(code: int, exit_code: int | None, signal: int | None) -> None:
    exit_ = exit_from_inspect(inspect(code))
    assert (exit_.exit_code, exit_.signal, exit_.limitation) == (exit_code, signal, None)


def test_oom_killed_is_a_memory_limitation() -> None:
    exit_ = exit_from_inspect(inspect(137, oom=True))
    assert exit_.limitation == "mem" and exit_.signal == 9
    assert str(64 * MIB) in exit_.limitation_message


def test_daemon_error_becomes_the_message() -> None:
    assert exit_from_inspect(inspect(127, error="exec failed")).message == "exec failed"


def test_limits_use_the_mesos_arithmetic() -> None:
    resources = Resources(cpus=0.25, mem_mib=10, pids=20)
    assert resource_fields(Limits.of(resources, enable_cfs=False)) == {
        "CpuShares": 256,
        "Memory": 32 * MIB,  # the 32 MiB floor
        "MemorySwap": 32 * MIB,
        "MemoryReservation": 32 * MIB,
        "PidsLimit": 20,
    }
    with_cfs = resource_fields(Limits.of(Resources(cpus=0.005), enable_cfs=True))
    assert with_cfs == {"CpuShares": 5, "CpuPeriod": 100_000, "CpuQuota": 1_000}
    assert resource_fields(Limits.of(Resources(), enable_cfs=True)) == {}


def driver(
    tmp_path: Path, *, allow_host: bool = True, bridge: bool = False, **options: Any
) -> DockerDriver:
    network = NetworkOptions(allow_host=allow_host)
    if bridge:
        network = NetworkOptions(enabled=True, default_mode="bridge", allow_host=allow_host)
    parsed = parse_options("docker", options, source="<config>", state_dir=tmp_path)
    assert isinstance(parsed, DockerOptions)
    services = node_services(
        tmp_path, cgroups_root="ctz", network=network, runtimes={"docker": parsed}
    )
    return DockerDriver(parsed, services)


def spec(**overrides: Any) -> LaunchSpec:
    values: dict[str, Any] = {
        "container_id": "web-1",
        "command": Command(shell="echo hi", environment=(("A", "b=c"),)),
        "resources": Resources(cpus=1, mem_mib=64),
        "runtime": "docker",
        "sandbox": "/srv/sand:box",
        "image": "busybox",
        "labels": (("team", "x"), (LABEL_OWNER, "forged")),
    }
    values.update(overrides)
    return LaunchSpec(**values)


def test_container_config(tmp_path: Path) -> None:
    config = driver(tmp_path)._container_config(
        spec(), DockerImage("busybox"), PreparedNetwork("none")
    )
    assert (config["entrypoint"], config["command"]) == (["/bin/sh"], ["-c", "echo hi"])
    assert config["environment"] == ["A=b=c", "MESOS_SANDBOX=/mnt/mesos/sandbox"]
    assert config["working_dir"] == "/mnt/mesos/sandbox"
    assert config["labels"] == {
        "team": "x",
        LABEL_CONTAINER_ID: "web-1",
        LABEL_OWNER: str(tmp_path),  # ours win over a forged one
    }
    host = config["host_config"]
    assert host["Mounts"] == [
        {"Type": "bind", "Source": "/srv/sand:box", "Target": "/mnt/mesos/sandbox"}
    ]
    assert host["CgroupParent"] == "/ctz/web-1"
    assert (host["CpuShares"], host["Memory"], host["NetworkMode"]) == (1024, 64 * MIB, "none")
    assert host["Init"] is True and host["LogConfig"]["Type"] == "json-file"


def test_argv_keeps_its_words(tmp_path: Path) -> None:
    command = Command(argv=("/bin/echo", "a b", "$HOME"), working_dir="/tmp")
    config = driver(tmp_path)._container_config(
        spec(command=command), DockerImage("busybox"), PreparedNetwork("none")
    )
    assert (config["entrypoint"], config["command"]) == (["/bin/echo"], ["a b", "$HOME"])
    assert config["working_dir"] == "/tmp"


def test_network_modes(tmp_path: Path) -> None:
    """Without a [network] table Docker's own `none` stays the default; with one, bridge."""
    assert driver(tmp_path)._network.mode(spec()) == "none"
    assert driver(tmp_path)._network.mode(spec(network=NetworkSettings("host"))) == "host"
    # (the isolator is one per state directory: the bridge node needs its own)
    assert driver(tmp_path / "node", bridge=True)._network.mode(spec()) == "bridge"
    no_host = driver(tmp_path / "no-host", allow_host=False)
    with pytest.raises(FailedPrecondition, match="allow_host"):
        no_host._network.mode(spec(network=NetworkSettings("host")))
    with pytest.raises(FailedPrecondition, match=r"'bridge' needs a \[network\] table"):
        driver(tmp_path)._network.mode(spec(network=NetworkSettings("bridge")))
    mapped = NetworkSettings("none", (PortMapping(8080, 80),))
    with pytest.raises(InvalidArgument, match="port_mappings"):
        driver(tmp_path / "node", bridge=True)._network.mode(spec(network=mapped))


def test_bridge_workload_joins_its_sandbox_with_our_etc_files(tmp_path: Path) -> None:
    hosts = {"Type": "bind", "Source": "/s/hosts", "Target": "/etc/hosts", "ReadOnly": True}
    network = PreparedNetwork("container:0123abc", (hosts,), "10.9.0.2", "0123abc")
    host = driver(tmp_path)._container_config(spec(), DockerImage("busybox"), network)[
        "host_config"
    ]
    assert host["NetworkMode"] == "container:0123abc"
    assert host["Mounts"][1:] == [hosts]
    assert "PortBindings" not in host  # forwards are the isolator's nftables rules


def test_sandbox_is_labelled_ours_and_sleeps_unprivileged(tmp_path: Path) -> None:
    config = driver(tmp_path)._network.sandbox_config(spec(), "busybox")
    assert config["labels"] == {
        LABEL_CONTAINER_ID: "web-1",
        LABEL_OWNER: str(tmp_path),
        LABEL_ROLE: ROLE_SANDBOX,
    }
    assert (config["entrypoint"], config["command"]) == (["sleep"], ["infinity"])
    assert (config["hostname"], config["user"]) == ("web-1", "65534:65534")
    host = config["host_config"]
    assert (host["NetworkMode"], host["CgroupParent"]) == ("none", "/ctz/web-1")
    assert host["ReadonlyRootfs"] is True and host["CapDrop"] == ["ALL"]


def test_sandbox_names_never_collide_with_workload_names() -> None:
    owner = "/var/lib/containerizer"
    assert sandbox_name(owner, "web") != container_name(owner, "sandbox-web")
    assert sandbox_name(owner, "web") != container_name(owner, ".sandbox-web")
    workload_prefix = container_name(owner, "")
    assert not sandbox_name(owner, "web").startswith(workload_prefix)


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"endpoint": "/var/run/docker.sock"}, "endpoint"),
        ({"registry": "http://x"}, "registry"),
        ({"sandbox_image": "Not An Image"}, "sandbox_image"),
    ],
)
def test_bad_options_name_the_key(tmp_path: Path, options: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError, match=f"runtimes.docker.{key}"):
        driver(tmp_path, **options)


def test_config_schema_accepts_the_docker_table() -> None:
    raw = {
        "default_runtime": "docker",
        "runtimes": {"docker": {"endpoint": "unix:///run/d.sock", "registry": "127.0.0.1:5000"}},
    }
    assert parse_config(raw).runtimes["docker"] == DockerOptions(
        endpoint="unix:///run/d.sock", registry="127.0.0.1:5000"
    )
    with pytest.raises(ConfigError, match=r"runtimes\.docker\.socket"):
        parse_config({"runtimes": {"docker": {"socket": "/x"}}})


class FakeImages:
    """The two engine calls image resolution makes; records pulls."""

    where = "/run/fake-docker.sock"

    def __init__(self, present: set[str], config: dict[str, Any] | None = None) -> None:
        self.present = present
        self.config = {"Cmd": ["sh"]} if config is None else config
        self.pulled: list[str] = []

    async def image_config(self, reference: str) -> dict[str, Any] | None:
        return self.config if reference in self.present else None

    async def pull(self, reference: str, error: type[Exception]) -> None:
        self.pulled.append(reference)
        self.present.add(reference)


@pytest.mark.parametrize(
    ("reference", "pulled"),
    [
        ("busybox", "127.0.0.1:5000/busybox:latest"),
        ("ctz/busybox:1", "127.0.0.1:5000/ctz/busybox:1"),
        ("127.0.0.1:5000/ctz/busybox:2", "127.0.0.1:5000/ctz/busybox:2"),
        ("app@sha256:" + "a" * 64, "127.0.0.1:5000/app@sha256:" + "a" * 64),
    ],
)
async def test_missing_images_come_from_the_configured_registry(
    reference: str, pulled: str
) -> None:
    engine = FakeImages(set())
    subject = DockerImages(engine, "127.0.0.1:5000")  # type: ignore[arg-type]
    assert await subject.ensure(reference) == DockerImage(pulled, {"Cmd": ["sh"]})
    assert engine.pulled == [pulled]


async def test_present_images_are_not_pulled_and_other_registries_are_refused() -> None:
    subject = DockerImages(FakeImages({"local:1"}), "127.0.0.1:5000")  # type: ignore[arg-type]
    assert (await subject.ensure("local:1")).reference == "local:1"
    with pytest.raises(NotFound, match="only from the configured registry"):
        await subject.ensure("quay.io/app:1")
    unconfigured = DockerImages(FakeImages(set()), None)  # type: ignore[arg-type]
    with pytest.raises(NotFound, match=r"no runtimes\.docker\.registry"):
        await unconfigured.ensure("busybox")


async def test_unreachable_daemon_is_unavailable_naming_the_socket(tmp_path: Path) -> None:
    engine = DockerEngine(f"unix://{tmp_path}/missing.sock")
    try:
        with pytest.raises(Unavailable, match=f"{tmp_path}/missing.sock"):
            await engine.version()
    finally:
        await engine.close()


def test_handle_round_trip_and_names() -> None:
    handle = DockerHandle("abc", "ctz-x-web-1", "/ctz/web-1/abc", "busybox", "def")
    assert DockerHandle.from_json(handle.to_json()) == handle
    before_networking = {k: v for k, v in handle.to_json().items() if k != "sandbox_id"}
    assert DockerHandle.from_json(before_networking).sandbox_id == ""
    name = container_name("/var/lib/containerizer", "web-1")
    assert name.startswith("ctz-") and name.endswith("-web-1")
    assert container_name("/other/state", "web-1") != name


class RacyStartApi:
    """dockerd under load: the start happened, the answer says it failed."""

    def __init__(self, started_at: str) -> None:
        self.started_at = started_at

    def start(self, container: str) -> None:
        raise docker.errors.APIError(
            "500 Server Error", explanation="cannot start an already running container"
        )

    def inspect_container(self, container: str) -> dict[str, Any]:
        return {"State": {"Running": True, "StartedAt": self.started_at}}


async def test_a_start_that_happened_counts_even_when_dockerd_says_it_failed() -> None:
    engine = DockerEngine("unix:///run/fake-docker.sock")
    engine._client = RacyStartApi("2026-11-25T20:00:00.1Z")
    await engine.start("c1", LaunchFailed)  # no error: it runs
    engine._client = RacyStartApi("0001-01-01T00:00:00Z")
    with pytest.raises(LaunchFailed, match="already running"):
        await engine.start("c1", LaunchFailed)  # never started: the failure stands


# ---- confinement and the image's command ----


def host_config(tmp_path: Path, image: DockerImage | None = None, **overrides: Any) -> Any:
    image = image or DockerImage("busybox")
    config = driver(tmp_path)._container_config(spec(**overrides), image, PreparedNetwork("none"))
    return config["host_config"]


def seccomp_option(host: dict[str, Any]) -> dict[str, Any] | None:
    for option in host.get("SecurityOpt", []):
        if option.startswith("seccomp="):
            profile: dict[str, Any] = json.loads(option.removeprefix("seccomp="))
            return profile
    return None


def test_dockers_defaults_stay_on_and_the_capability_set_is_ours(tmp_path: Path) -> None:
    host = host_config(tmp_path)
    assert host["Privileged"] is False and host["CgroupnsMode"] == "private"
    assert host["CapDrop"] == ["ALL"] and host["CapAdd"] == list(DEFAULT_CAPABILITIES)
    assert seccomp_option(host) == oci_seccomp_profile()
    assert host["MaskedPaths"] == list(MASKED_PATHS)
    assert host["ReadonlyPaths"] == list(READONLY_PATHS)
    assert "no-new-privileges:true" not in host["SecurityOpt"]  # root, as under Docker
    text = json.dumps(host)
    assert "unconfined" not in text and "UsernsMode" not in host and "Devices" not in host


@pytest.mark.parametrize(
    ("request_user", "image_user", "no_new_privileges", "expected"),
    [
        (None, "", False, False),
        ("root", "", False, False),
        ("0:0", "nobody", False, False),  # the request's user wins over the image's
        ("nobody", "", False, True),
        ("65534", "", False, True),
        (None, "app", False, True),  # the image's USER
        (None, "", True, True),  # asked for as root
    ],
)
def test_no_new_privileges_for_every_user_but_root_and_on_request(
    tmp_path: Path,
    request_user: str | None,
    image_user: str,
    no_new_privileges: bool,
    expected: bool,
) -> None:
    host = host_config(
        tmp_path,
        DockerImage("busybox", {"User": image_user}),
        command=Command(shell="id", user=request_user),
        no_new_privileges=no_new_privileges,
    )
    assert ("no-new-privileges:true" in host["SecurityOpt"]) is expected


def test_privileged_is_dockers_privileged_and_only_on_request() -> None:
    host = confinement_fields(spec(privileged=True), "", NodeCapabilities())
    assert host["Privileged"] is True
    assert "CapAdd" not in host and "CapDrop" not in host and "SecurityOpt" not in host
    assert "MaskedPaths" not in host and "ReadonlyPaths" not in host
    asked = confinement_fields(spec(privileged=True, no_new_privileges=True), "")
    assert asked["SecurityOpt"] == ["no-new-privileges:true"]
    assert NodeCapabilities().warnings(spec(privileged=True)) == ()


def test_privileged_on_a_node_without_every_capability_gets_what_it_holds() -> None:
    """Docker's Privileged would ask runc for capabilities the node cannot grant."""
    held = tuple(name for name in ALL_CAPABILITIES if name != "CAP_SYS_RESOURCE")
    node = NodeCapabilities(held, complete=False)
    host = confinement_fields(spec(privileged=True), "", node)
    assert host["Privileged"] is False
    assert (host["CapAdd"], host["CapDrop"]) == (["ALL"], ["CAP_SYS_RESOURCE"])
    assert host["SecurityOpt"] == ["seccomp=unconfined", "apparmor=unconfined"]
    assert host["MaskedPaths"] == host["ReadonlyPaths"] == []
    assert host["DeviceCgroupRules"] == ["a *:* rwm"]
    assert "CAP_SYS_RESOURCE" in node.warnings(spec(privileged=True))[0]
    default = confinement_fields(spec(), "", node)
    assert default["CapAdd"] == list(DEFAULT_CAPABILITIES)  # all within what it holds
    assert node.warnings(spec()) == ()


def test_root_user_names() -> None:
    assert all(is_root_user(user) for user in ("", "0", "root", "root:staff", "0:5"))
    assert not any(is_root_user(user) for user in ("nobody", "1000", "app:root", "00x"))


def test_an_empty_command_leaves_the_images_entrypoint_cmd_and_working_dir(
    tmp_path: Path,
) -> None:
    image = DockerImage("app", {"Entrypoint": ["/bin/app"], "Cmd": ["serve"], "WorkingDir": "/a"})
    config = driver(tmp_path)._container_config(
        spec(command=Command()), image, PreparedNetwork("none")
    )
    assert config["entrypoint"] is None and config["command"] is None
    assert config["working_dir"] == "/a"
    asked = Command(argv=("/bin/true",), working_dir="/b")
    config = driver(tmp_path)._container_config(spec(command=asked), image, PreparedNetwork("none"))
    assert (config["entrypoint"], config["command"], config["working_dir"]) == (
        ["/bin/true"],
        None,
        "/b",
    )


async def test_an_empty_command_needs_an_image_with_one(tmp_path: Path) -> None:
    subject = driver(tmp_path)
    images = FakeImages({"bare:1"}, {"Env": ["PATH=/bin"]})
    subject._images = DockerImages(images, None)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument) as refused:
        await subject.start(spec(command=Command(), image="bare:1"))
    assert refused.value.field == "command" and "bare:1" in str(refused.value)
