"""How a bridge-mode attach finds our bridge, against a fake kernel: the first attach of the
process ensures it (create, address, up, route_localnet), later ones reuse it while the link
under its name is the one that ensure left, and one deleted or made anew behind our back (by an
operator, or by `close`) is ensured again by the next attach."""

from __future__ import annotations

import asyncio
import errno
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from isolators.network import bridge, netns, veth
from isolators.network import isolator as isolator_module
from isolators.network.isolator import NetworkIsolator
from isolators.network.model import NetworkConfig, NetworkError, NetworkRequest

BRIDGE = "ctz-a"
SUBNET = "10.77.0.0/24"
GATEWAY = "10.77.0.1/24"
CONTAINER_ETH0_INDEX = 2


@dataclass
class FakeLink:
    name: str
    kind: str
    master: int | None = None
    up: bool = False
    addresses: list[str] = field(default_factory=list)


@dataclass
class FakeAddress:
    address: str

    def get_attr(self, name: str) -> str | None:
        return self.address if name == "IFA_ADDRESS" else None


class FakeKernel:
    """The service's namespace: links by index, found by name; new links get ever higher
    indices, as the kernel's do, unless one is asked for (`ip link add ... index N`)."""

    def __init__(self) -> None:
        self.links: dict[int, FakeLink] = {}
        self.route_localnet: set[str] = set()
        self.address_dumps = 0
        self._next_index = 10

    def index_of(self, name: str) -> int | None:
        return next((i for i, link in self.links.items() if link.name == name), None)

    def link(self, index: int) -> FakeLink:
        if index not in self.links:
            raise NetlinkError(errno.ENODEV)
        return self.links[index]

    def bridge(self) -> FakeLink:
        index = self.index_of(BRIDGE)
        assert index is not None, "no bridge"
        return self.links[index]

    def add(self, name: str, kind: str, index: int | None = None) -> int:
        if self.index_of(name) is not None:
            raise NetlinkError(errno.EEXIST)
        if index is None:
            index, self._next_index = self._next_index, self._next_index + 1
        self.links[index] = FakeLink(name, kind)
        return index

    def delete(self, name: str) -> None:
        index = self.index_of(name)
        if index is None:
            raise NetlinkError(errno.ENODEV)
        del self.links[index]
        self.route_localnet.discard(name)


class FakeIPRoute:
    """The requests of AsyncIPRoute that the attach and cleanup of bridge mode make."""

    def __init__(self, kernel: FakeKernel) -> None:
        self.kernel = kernel

    async def __aenter__(self) -> FakeIPRoute:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    async def link(self, command: str, **request: Any) -> list[Any]:
        if command == "add":
            self.kernel.add(request["ifname"], request["kind"])
        elif command == "set":
            link = self.kernel.link(request["index"])
            if "state" in request:
                link.up = request["state"] == "up"
            if "master" in request:
                link.master = request["master"] or None
        elif command == "del":
            self.kernel.delete(request["ifname"])
        else:
            raise AssertionError(f"unexpected link request {command!r}")
        return []

    async def addr(self, command: str, **request: Any) -> list[Any]:
        link = self.kernel.link(request["index"])
        if command == "dump":
            self.kernel.address_dumps += 1
            return [FakeAddress(a.split("/")[0]) for a in link.addresses]
        if command == "add":
            link.addresses.append(f"{request['address']}/{request['prefixlen']}")
            return []
        raise AssertionError(f"unexpected addr request {command!r}")


@pytest.fixture
async def attach(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[NetworkIsolator, FakeKernel]]:
    """A bridge-mode isolator whose netlink, namespaces and veths are the fake kernel's."""
    kernel = FakeKernel()

    async def create_pair(
        ipr: object, host_name: str, path: Path, bridge_index: int, alias: str
    ) -> int:
        master = kernel.links.get(bridge_index)
        if master is None or master.kind != "bridge":
            raise NetlinkError(errno.EINVAL)  # as the kernel answers a master it does not know
        index = kernel.add(host_name, "veth")
        kernel.links[index].master = bridge_index
        kernel.links[index].up = True
        return index

    async def inside(path: Path, ifname: str) -> tuple[FakeIPRoute, int]:
        return FakeIPRoute(kernel), CONTAINER_ETH0_INDEX

    async def nothing(*args: object) -> None:
        return None

    monkeypatch.setattr(isolator_module, "AsyncIPRoute", lambda: FakeIPRoute(kernel))
    monkeypatch.setattr(isolator_module, "_ipr_and_index_in", inside)
    monkeypatch.setattr(bridge, "link_index", kernel.index_of)
    monkeypatch.setattr(bridge, "enable_route_localnet", kernel.route_localnet.add)
    monkeypatch.setattr(veth, "link_index", kernel.index_of)
    monkeypatch.setattr(veth, "create_pair", create_pair)
    monkeypatch.setattr(veth, "configure_container_side", nothing)
    monkeypatch.setattr(netns, "create", nothing)
    monkeypatch.setattr(netns, "remove", lambda path: None)
    config = NetworkConfig(
        state_dir=tmp_path, enabled=True, bridge=BRIDGE, subnet=SUBNET,
        default_mode="bridge", allow_host=False,
    )  # fmt: skip
    isolator = NetworkIsolator(config)
    yield isolator, kernel
    await isolator.close()


def _master_of(kernel: FakeKernel, isolator: NetworkIsolator, container_id: str) -> int | None:
    attachment = isolator.attachment(container_id)
    assert attachment is not None and attachment.host_veth is not None
    index = kernel.index_of(attachment.host_veth)
    assert index is not None
    return kernel.links[index].master


def _assert_bridge_is_ready(kernel: FakeKernel) -> None:
    assert kernel.bridge().addresses == [GATEWAY]
    assert kernel.bridge().up
    assert BRIDGE in kernel.route_localnet


async def test_the_first_attach_ensures_the_bridge_and_later_ones_reuse_it(
    attach: tuple[NetworkIsolator, FakeKernel],
) -> None:
    isolator, kernel = attach
    for container_id in ("a", "b", "c"):
        await isolator.prepare(container_id, NetworkRequest("bridge"))
    _assert_bridge_is_ready(kernel)
    assert kernel.address_dumps == 1
    bridge_index = kernel.index_of(BRIDGE)
    assert {_master_of(kernel, isolator, c) for c in ("a", "b", "c")} == {bridge_index}


@pytest.mark.parametrize("own_link", [False, True], ids=["veth", "runtime's link"])
async def test_a_bridge_deleted_between_two_attaches_is_made_again_with_its_address(
    attach: tuple[NetworkIsolator, FakeKernel], own_link: bool
) -> None:
    isolator, kernel = attach
    await isolator.prepare("a", NetworkRequest("bridge"))
    kernel.delete(BRIDGE)
    await isolator.prepare("b", NetworkRequest("bridge"), own_link=own_link)
    _assert_bridge_is_ready(kernel)
    if not own_link:
        assert _master_of(kernel, isolator, "b") == kernel.index_of(BRIDGE)


async def test_a_bridge_made_anew_under_our_name_is_ensured_again(
    attach: tuple[NetworkIsolator, FakeKernel],
) -> None:
    isolator, kernel = attach
    await isolator.prepare("a", NetworkRequest("bridge"))
    kernel.delete(BRIDGE)
    kernel.add(BRIDGE, "bridge")  # an operator's: no address, down, another index
    await isolator.prepare("b", NetworkRequest("bridge"))
    _assert_bridge_is_ready(kernel)
    assert _master_of(kernel, isolator, "b") == kernel.index_of(BRIDGE)


async def test_after_close_removed_the_bridge_the_next_attach_ensures_it(
    attach: tuple[NetworkIsolator, FakeKernel],
) -> None:
    """Even when a bridge of our name has come back with the very index that close removed,
    which the name and index alone cannot tell from the one we ensured."""
    isolator, kernel = attach
    await isolator.prepare("a", NetworkRequest("bridge"))
    index = kernel.index_of(BRIDGE)
    await isolator.cleanup("a")
    await isolator.close()
    assert kernel.index_of(BRIDGE) is None
    kernel.add(BRIDGE, "bridge", index=index)
    await isolator.prepare("b", NetworkRequest("bridge"))
    _assert_bridge_is_ready(kernel)


async def test_an_ensure_that_failed_is_done_again_by_the_next_attach(
    attach: tuple[NetworkIsolator, FakeKernel], monkeypatch: pytest.MonkeyPatch
) -> None:
    isolator, kernel = attach

    def refuse(name: str) -> None:
        raise PermissionError("route_localnet")

    with monkeypatch.context() as refusing:
        refusing.setattr(bridge, "enable_route_localnet", refuse)
        with pytest.raises(NetworkError, match="route_localnet"):
            await isolator.prepare("a", NetworkRequest("bridge"))
    await isolator.prepare("b", NetworkRequest("bridge"))
    _assert_bridge_is_ready(kernel)


async def test_a_cancelled_caller_waits_for_its_thread_before_the_rollback() -> None:
    """What the thread makes (a namespace, a pin) exists by the time the caller's cancellation
    reaches its rollback; otherwise the rollback finds nothing and the thread's work stays."""
    started, release = threading.Event(), threading.Event()
    made: list[str] = []

    def work() -> None:
        started.set()
        release.wait(5)
        made.append("namespace")

    async def caller() -> list[str]:
        try:
            await netns.in_fresh_thread(work)
        except asyncio.CancelledError:
            return list(made)  # what the rollback would see
        raise AssertionError("not cancelled")

    task = asyncio.ensure_future(caller())
    await asyncio.to_thread(started.wait, 5)
    task.cancel()
    await asyncio.sleep(0.01)
    assert not task.done(), "the cancellation went on while the thread still worked"
    release.set()
    assert await asyncio.wait_for(task, 5) == ["namespace"]
