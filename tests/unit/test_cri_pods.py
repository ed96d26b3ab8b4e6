"""Pod sandboxes refuse what they cannot honour before anything is made."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from adapter.core.errors import FailedPrecondition, InvalidArgument
from adapter.core.model import Capabilities, Fingerprint
from adapter.cri.api import cri
from adapter.cri.events import ContainerEvents
from adapter.cri.pods import Pods
from adapter.cri.store import CriStore


class FakeRuntime:
    def __init__(self, name: str, pods: bool) -> None:
        self.name = name
        self.pods = pods

    async def fingerprint(self) -> Fingerprint:
        return Fingerprint(self.name, "1", True, capabilities=Capabilities(pods=self.pods))


def pods(tmp_path: Path) -> Pods:
    drivers = {"native": FakeRuntime("native", True), "docker": FakeRuntime("docker", False)}

    async def capabilities(runtime: str) -> Capabilities:
        return (await drivers[runtime].fingerprint()).capabilities

    core = SimpleNamespace(
        default_runtime="native",
        drivers=drivers,
        capabilities=capabilities,
        sandbox_root=tmp_path / "sandboxes",
    )
    store = CriStore(tmp_path / "cri.db")
    events = ContainerEvents(lambda pod_id: [])
    return Pods(core, store, tmp_path / "pods", set(core.drivers), events, bridge=False)  # type: ignore[arg-type]


def config(**fields: object) -> cri.PodSandboxConfig:
    metadata = cri.PodSandboxMetadata(name="p", namespace="ns", uid="u")
    return cri.PodSandboxConfig(metadata=metadata, **fields)  # type: ignore[arg-type]


async def test_a_handler_that_cannot_join_pods_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition, match="'docker' cannot run a pod's containers"):
        await pods(tmp_path).run(config(), "docker")
    assert not (tmp_path / "pods").exists()  # nothing was made


async def test_an_unknown_handler_is_refused_with_the_configured_ones(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition, match=r"'kata' is not a runtime.*docker, native"):
        await pods(tmp_path).run(config(), "kata")


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"hostname": "bad host"}, "config.hostname"),
        ({"log_directory": "relative"}, "config.log_directory"),
        ({"port_mappings": [cri.PortMapping(container_port=0)]}, "config.port_mappings[0]"),
        (
            {"port_mappings": [cri.PortMapping(container_port=80, protocol=cri.SCTP)]},
            "config.port_mappings[0].protocol",
        ),
        ({"linux": cri.LinuxPodSandboxConfig(sysctls={"vm.swappiness": "1"})}, "sysctls"),
        ({"linux": cri.LinuxPodSandboxConfig(sysctls={"../x": "1"})}, "sysctls"),
    ],
)
async def test_bad_pod_configs_name_the_field(
    tmp_path: Path, fields: dict[str, object], field: str
) -> None:
    with pytest.raises(InvalidArgument) as error:
        await pods(tmp_path).run(config(**fields), "")
    assert field in str(error.value)
