"""Our Linux bridge: created on first use with the subnet's first address, kept while the service
runs and while containers use it; and the check that our subnet collides with nothing the host
already routes."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from isolators.network.model import NetworkConfigError

ENOENT_OR_NODEV = (2, 19)
LOCAL_TABLE = 255


def link_index(name: str) -> int | None:
    """The index of the link `name` in the service's own network namespace, or None: one
    SIOCGIFINDEX ioctl (~2 us), where a netlink RTM_GETLINK costs ~0.25 ms of CPU to encode and
    decode through pyroute2. The ioctl answers for the calling thread's namespace; the event
    loop's thread never leaves the service's (netns.py does its setns in throwaway threads), and
    it is the namespace of every AsyncIPRoute() the loop opens."""
    try:
        return socket.if_nametoindex(name)
    except OSError:  # if_nametoindex gave 0: no link of that name
        return None


async def ensure_bridge(
    ipr: AsyncIPRoute, name: str, gateway: ipaddress.IPv4Address, prefix_len: int
) -> int:
    """The bridge's index, creating it (address `gateway`, up) if missing. route_localnet is on
    so that connections to 127.0.0.1 that nftables DNATs to a container may leave through it."""
    index = link_index(name)
    if index is None:
        await ipr.link("add", ifname=name, kind="bridge")
        index = link_index(name)
        assert index is not None
    addresses = [a.get_attr("IFA_ADDRESS") for a in await collect(ipr.addr("dump", index=index))]
    if str(gateway) not in addresses:
        await ipr.addr("add", index=index, address=str(gateway), prefixlen=prefix_len)
    await ipr.link("set", index=index, state="up")
    enable_route_localnet(name)
    return index


def enable_route_localnet(name: str) -> None:
    Path(f"/proc/sys/net/ipv4/conf/{name}/route_localnet").write_text("1\n")


async def remove_bridge(ipr: AsyncIPRoute, name: str) -> None:
    try:
        await ipr.link("del", ifname=name)
    except NetlinkError as exc:
        if exc.code not in ENOENT_OR_NODEV:
            raise


async def check_subnet_is_free(
    ipr: AsyncIPRoute, subnet: ipaddress.IPv4Network, bridge: str
) -> None:
    """NetworkConfigError if a route or address of another interface overlaps `subnet` (default
    routes aside): containers there would shadow, or be shadowed by, the host's own network."""
    ours = link_index(bridge)
    for route in await collect(ipr.route("dump", family=2)):
        prefix_len = route.get("dst_len", 0)
        destination = route.get_attr("RTA_DST")
        local_table = route.get_attr("RTA_TABLE") == LOCAL_TABLE  # covered by the addresses
        if (
            prefix_len == 0
            or destination is None
            or local_table
            or route.get_attr("RTA_OIF") == ours
        ):
            continue
        routed = ipaddress.IPv4Network(f"{destination}/{prefix_len}", strict=False)
        if routed.overlaps(subnet):
            raise NetworkConfigError(
                f"network.subnet: {subnet} overlaps the host's route to {routed};"
                " choose a subnet the host does not use"
            )
    for address in await collect(ipr.addr("dump")):
        if address.get("index") == ours:
            continue
        if address.get("family") != socket.AF_INET:
            continue
        host = ipaddress.IPv4Address(address.get_attr("IFA_ADDRESS"))
        if host in subnet:
            raise NetworkConfigError(
                f"network.subnet: {subnet} contains the host address {host};"
                " choose a subnet the host does not use"
            )


async def collect(request: Any) -> list[Any]:
    """The messages of a pyroute2 0.9 request: an async iterator for dumps, a list otherwise."""
    awaited = await request
    if isinstance(awaited, list | tuple):
        return list(awaited)
    return [item async for item in awaited]
