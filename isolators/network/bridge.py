"""Our Linux bridge: created on first use with the subnet's first address, kept while the service
runs and while containers use it; and the check that our subnet collides with nothing the host
already routes."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from socket import AF_INET
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from isolators.network.model import NetworkConfigError

ENOENT_OR_NODEV = (2, 19)
LOCAL_TABLE = 255


async def link_index(ipr: AsyncIPRoute, name: str) -> int | None:
    found = await ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


async def ensure_bridge(
    ipr: AsyncIPRoute, name: str, gateway: ipaddress.IPv4Address, prefix_len: int
) -> int:
    """The bridge's index, creating it (address `gateway`, up) if missing. route_localnet is on
    so that connections to 127.0.0.1 that nftables DNATs to a container may leave through it."""
    index = await link_index(ipr, name)
    if index is None:
        await ipr.link("add", ifname=name, kind="bridge")
        index = await link_index(ipr, name)
        assert index is not None
    addresses = [a.get_attr("IFA_ADDRESS") for a in await collect(ipr.addr("dump", index=index))]
    if str(gateway) not in addresses:
        await ipr.addr("add", index=index, address=str(gateway), prefixlen=prefix_len)
    await ipr.link("set", index=index, state="up")
    Path(f"/proc/sys/net/ipv4/conf/{name}/route_localnet").write_text("1\n")
    return index


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
    ours = await link_index(ipr, bridge)
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
        if address.get("family") != AF_INET:
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
