"""The veth pair of a bridge-mode container: host side on our bridge, `eth0` in its namespace.

The host side is created already enslaved to the bridge and with the peer already inside the
namespace (one RTM_NEWLINK), so there is no moment where an interface of ours floats unowned in
the host namespace. Its name is derived from (bridge, container id), so cleanup finds it again
from the checkpoint alone; its ifalias names the container for operators (`ip -d link`).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
from pathlib import Path

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from isolators.base import Statistics
from isolators.network.bridge import ENOENT_OR_NODEV, collect, link_index

CONTAINER_IFNAME = "eth0"
HOST_PREFIX = "vz"


def host_veth_name(bridge: str, container_id: str) -> str:
    """15 characters at most (IFNAMSIZ): `vz` + 12 hex digits of a hash."""
    digest = hashlib.blake2b(f"{bridge}/{container_id}".encode(), digest_size=6).hexdigest()
    return HOST_PREFIX + digest


async def create_pair(
    ipr: AsyncIPRoute, host_name: str, netns: Path, bridge_index: int, alias: str
) -> int:
    """Create the pair (peer `eth0` inside `netns`), bring the host side up; its index."""
    netns_fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        await ipr.link(
            "add",
            ifname=host_name,
            kind="veth",
            master=bridge_index,
            peer={"ifname": CONTAINER_IFNAME, "net_ns_fd": netns_fd},
        )
    finally:
        os.close(netns_fd)
    index = await link_index(ipr, host_name)
    assert index is not None
    await ipr.link("set", index=index, state="up", ifalias=alias[:255])
    return index


async def configure_container_side(
    ipr_in_netns: AsyncIPRoute,
    address: ipaddress.IPv4Address,
    prefix_len: int,
    gateway: ipaddress.IPv4Address | None,
) -> None:
    """Inside the container's namespace: lo and eth0 up, the address, the default route."""
    await bring_loopback_up(ipr_in_netns)
    index = await link_index(ipr_in_netns, CONTAINER_IFNAME)
    assert index is not None
    await ipr_in_netns.addr("add", index=index, address=str(address), prefixlen=prefix_len)
    await ipr_in_netns.link("set", index=index, state="up")
    if gateway is not None:
        await ipr_in_netns.route("add", dst="0.0.0.0/0", gateway=str(gateway), oif=index)


async def bring_loopback_up(ipr_in_netns: AsyncIPRoute) -> None:
    index = await link_index(ipr_in_netns, "lo")
    assert index is not None
    await ipr_in_netns.link("set", index=index, state="up")


async def delete_link(ipr: AsyncIPRoute, name: str) -> None:
    """Delete a link (and with a veth, its peer); a missing one is fine."""
    try:
        await ipr.link("del", ifname=name)
    except NetlinkError as exc:
        if exc.code not in ENOENT_OR_NODEV:
            raise


async def bridge_ports(ipr: AsyncIPRoute, bridge_index: int) -> list[str]:
    """Names of the links enslaved to the bridge."""
    return [
        link.get_attr("IFLA_IFNAME")
        for link in await collect(ipr.link("dump"))
        if link.get_attr("IFLA_MASTER") == bridge_index
    ]


async def container_counters(ipr: AsyncIPRoute, host_name: str) -> Statistics:
    """The container's interface counters as Mesos names them, read from the host side of the
    pair. A veth delivers every frame one side transmits to the other side, so the host side's
    rx is the container's tx and vice versa; reading there costs one netlink request in our own
    namespace instead of a thread and a socket inside the container's namespace per Usage call."""
    found = await collect(ipr.link("get", ifname=host_name))
    stats = found[0].get_attr("IFLA_STATS64") if found else None
    if stats is None:
        return {}
    return {
        "net_rx_packets": stats["tx_packets"],
        "net_rx_bytes": stats["tx_bytes"],
        "net_rx_errors": stats["tx_errors"],
        "net_rx_dropped": stats["tx_dropped"],
        "net_tx_packets": stats["rx_packets"],
        "net_tx_bytes": stats["rx_bytes"],
        "net_tx_errors": stats["rx_errors"],
        "net_tx_dropped": stats["rx_dropped"],
    }
