"""The docker runtime's translation of a pod's namespaces: /proc/<pid>/ns/<kind> of a holder
becomes `container:<id>` of the driver's own container with that pid, or is refused by kind."""

from __future__ import annotations

from typing import Any

import pytest

from adapter.core.errors import FailedPrecondition, InvalidArgument
from adapter.core.model import HOST_NAMESPACE, LinuxOptions
from adapter.runtimes.docker.pod import namespace_modes

HOLDER_PID = 4242


async def holder(network_mode: str = "none") -> Any:
    async def find(pid: int) -> dict[str, Any]:
        if pid != HOLDER_PID:
            raise FailedPrecondition(f"process {pid} is no running container of ours")
        return {"Id": "h0ld3r", "HostConfig": {"NetworkMode": network_mode}}

    return find


def joined(*kinds: str) -> LinuxOptions:
    return LinuxOptions(namespaces=tuple((k, f"/proc/{HOLDER_PID}/ns/{k}") for k in kinds))


async def test_net_ipc_pid_and_uts_of_the_holder() -> None:
    modes = await namespace_modes(joined("net", "uts", "ipc", "pid"), await holder())
    assert modes.network_mode == "container:h0ld3r"
    assert modes.host_config == {
        "NetworkMode": "container:h0ld3r",
        "IpcMode": "container:h0ld3r",
        "PidMode": "container:h0ld3r",
    }


async def test_a_bridge_holders_network_is_its_sandboxs() -> None:
    modes = await namespace_modes(joined("net", "uts"), await holder("container:s4ndb0x"))
    assert modes.network_mode == "container:s4ndb0x"


async def test_the_hosts_namespaces() -> None:
    linux = LinuxOptions(namespaces=(("net", HOST_NAMESPACE), ("uts", HOST_NAMESPACE)))
    modes = await namespace_modes(linux, await holder())
    assert modes.network_mode == "host"
    assert modes.host_config == {"NetworkMode": "host", "UTSMode": "host"}


@pytest.mark.parametrize(
    ("linux", "kind"),
    [
        (joined("user"), "user"),
        (joined("uts"), "uts"),  # a hostname is shared only with the joined network
        (LinuxOptions(namespaces=(("user", HOST_NAMESPACE),)), "user"),
    ],
)
async def test_what_docker_cannot_express_is_refused_by_kind(
    linux: LinuxOptions, kind: str
) -> None:
    with pytest.raises(FailedPrecondition, match=f"linux.namespaces: {kind}"):
        await namespace_modes(linux, await holder())


async def test_a_pid_that_is_no_container_of_ours_is_refused() -> None:
    linux = LinuxOptions(namespaces=(("ipc", "/proc/1/ns/ipc"),))
    with pytest.raises(FailedPrecondition, match="process 1"):
        await namespace_modes(linux, await holder())


async def test_a_path_that_is_not_a_namespace_of_the_kind_is_refused() -> None:
    linux = LinuxOptions(namespaces=(("ipc", f"/proc/{HOLDER_PID}/ns/net"),))
    with pytest.raises(InvalidArgument, match=r"linux\.namespaces"):
        await namespace_modes(linux, await holder())
