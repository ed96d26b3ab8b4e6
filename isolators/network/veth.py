"""The veth pair of a bridge-mode container: host side on our bridge, `eth0` in its namespace.

The host side is created already enslaved to the bridge and with the peer already inside the
namespace (one RTM_NEWLINK), so there is no moment where an interface of ours floats unowned in
the host namespace. Its name is derived from (bridge, container id), so cleanup finds it again
from the checkpoint alone; its ifalias names the container for operators (`ip -d link`) and
lets recovery find a detached host side that no attachment names any more.

Removal does not delete the pair: deleting a veth waits for RCU grace periods under the rtnl
lock (~30 ms), while the kernel deletes the pair by itself, in its own workqueue, when the
namespace of the peer dies. Cleanup detaches the host side from the bridge and sets it down
(cheap), removes the namespace, and hands the host side to `DetachedVeths`, which deletes it
later in case someone still holds the namespace.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import ipaddress
import logging
import os
from pathlib import Path

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from isolators.base import Statistics
from isolators.network.bridge import ENOENT_OR_NODEV, collect, link_index

log = logging.getLogger(__name__)
CONTAINER_IFNAME = "eth0"
# The loopback's index in every network namespace: the kernel registers `lo` first in each new
# namespace and gives it index 1 (LOOPBACK_IFINDEX, checked there by a BUG_ON); it can be
# neither deleted nor moved to another namespace. So no lookup is needed to bring it up.
LOOPBACK_IFINDEX = 1
HOST_PREFIX = "vz"
ALIAS_PREFIX = "containerizer"
# How long a detached host side may outlive its container's cleanup: the kernel deletes the pair
# ~30 ms after the namespace dies; one still there after this has a namespace someone holds.
DELETE_DETACHED_AFTER_SECONDS = 2.0


def host_veth_name(bridge: str, container_id: str) -> str:
    """15 characters at most (IFNAMSIZ): `vz` + 12 hex digits of a hash."""
    digest = hashlib.blake2b(f"{bridge}/{container_id}".encode(), digest_size=6).hexdigest()
    return HOST_PREFIX + digest


def host_veth_alias(bridge: str, container_id: str) -> str:
    """The ifalias of a host side: `containerizer <bridge> <container id>` (255 bytes at most)."""
    return f"{alias_prefix(bridge)}{container_id}"[:255]


def alias_prefix(bridge: str) -> str:
    """What the ifalias of every host side of `bridge` starts with (bridge names have no space)."""
    return f"{ALIAS_PREFIX} {bridge} "


async def create_pair(
    ipr: AsyncIPRoute, host_name: str, netns: Path, bridge_index: int, alias: str
) -> int:
    """Create the pair (peer `eth0` inside `netns`), bring the host side up; its index. A host
    side of the same name still there is the detached one of a container of the same id that
    was just removed (the kernel deletes it shortly): delete it now and create again."""
    netns_fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            await _add_pair(ipr, host_name, netns_fd, bridge_index)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise
            log.debug("network: deleting the previous %s before creating it again", host_name)
            await delete_link(ipr, host_name)
            await _add_pair(ipr, host_name, netns_fd, bridge_index)
    finally:
        os.close(netns_fd)
    index = link_index(host_name)
    assert index is not None
    await ipr.link("set", index=index, state="up", ifalias=alias[:255])
    return index


async def _add_pair(ipr: AsyncIPRoute, host_name: str, netns_fd: int, bridge_index: int) -> None:
    await ipr.link(
        "add",
        ifname=host_name,
        kind="veth",
        master=bridge_index,
        peer={"ifname": CONTAINER_IFNAME, "net_ns_fd": netns_fd},
    )


async def configure_container_side(
    ipr_in_netns: AsyncIPRoute,
    index: int,
    address: ipaddress.IPv4Address,
    prefix_len: int,
    gateway: ipaddress.IPv4Address | None,
) -> None:
    """Inside the container's namespace: lo and eth0 (link `index` there) up, the address, the
    default route."""
    await bring_loopback_up(ipr_in_netns)
    await ipr_in_netns.addr("add", index=index, address=str(address), prefixlen=prefix_len)
    await ipr_in_netns.link("set", index=index, state="up")
    if gateway is not None:
        await ipr_in_netns.route("add", dst="0.0.0.0/0", gateway=str(gateway), oif=index)


async def bring_loopback_up(ipr_in_netns: AsyncIPRoute) -> None:
    await ipr_in_netns.link("set", index=LOOPBACK_IFINDEX, state="up")


async def delete_link(ipr: AsyncIPRoute, name: str) -> None:
    """Delete a link (and with a veth, its peer); a missing one is fine."""
    try:
        await ipr.link("del", ifname=name)
    except NetlinkError as exc:
        if exc.code not in ENOENT_OR_NODEV:
            raise


async def detach(ipr: AsyncIPRoute, name: str) -> int | None:
    """Take the host side off its bridge and set it down, in one request (~1 ms, where a delete
    takes ~30): no frame from the namespace behind it reaches the bridge any more, whoever
    still holds that namespace. Its index, or None when there is no such link."""
    index = link_index(name)
    if index is None:
        return None
    try:
        await ipr.link("set", index=index, master=0, state="down")
    except NetlinkError as exc:
        if exc.code not in ENOENT_OR_NODEV:
            raise
        return None
    return index


async def delete_index(ipr: AsyncIPRoute, index: int) -> bool:
    """Delete the link with this index; False when it is gone already. By index, not by name:
    a container of the same id may have a new host side of the same name by then."""
    try:
        await ipr.link("del", index=index)
    except NetlinkError as exc:
        if exc.code not in ENOENT_OR_NODEV:
            raise
        return False
    return True


async def bridge_ports(ipr: AsyncIPRoute, bridge_index: int) -> list[str]:
    """Names of the links enslaved to the bridge."""
    return [
        link.get_attr("IFLA_IFNAME")
        for link in await collect(ipr.link("dump"))
        if link.get_attr("IFLA_MASTER") == bridge_index
    ]


async def detached_host_sides(ipr: AsyncIPRoute, bridge: str) -> list[str]:
    """Names of host sides of `bridge` that are on no bridge: removed containers' ones that the
    kernel has not deleted yet, or whose namespace someone still holds."""
    prefix = alias_prefix(bridge)
    return [
        link.get_attr("IFLA_IFNAME")
        for link in await collect(ipr.link("dump"))
        if not link.get_attr("IFLA_MASTER")
        and (link.get_attr("IFLA_IFALIAS") or "").startswith(prefix)
    ]


def _still_there(index: int, name: str) -> bool:
    """Whether the link `name` with this index still exists in the service's namespace (sysfs:
    a read, where netlink is a socket and a dump)."""
    try:
        with open(f"/sys/class/net/{name}/ifindex") as ifindex:
            return int(ifindex.read()) == index
    except (OSError, ValueError):
        return False


class DetachedVeths:
    """Owner of the host sides that cleanup detached: the kernel deletes each with its
    namespace, unless some process still holds that namespace (Docker's sandbox container until
    Docker removes it, a leaked fd). One still there `delay` seconds after its detach is deleted
    then, in a task of its own. A service that stops first deletes the pending ones in `close`;
    one that dies leaves them to recovery's sweep of detached host sides."""

    def __init__(self, delay: float = DELETE_DETACHED_AFTER_SECONDS) -> None:
        self._delay = delay
        self._pending: dict[int, str] = {}  # index -> name
        self._tasks: set[asyncio.Task[None]] = set()

    def delete_later(self, index: int, name: str) -> None:
        self._pending[index] = name
        task = asyncio.get_running_loop().create_task(self._delete_after_delay(index, name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _delete_after_delay(self, index: int, name: str) -> None:
        await asyncio.sleep(self._delay)
        if not _still_there(index, name):  # the usual case: no netlink socket for nothing
            self._pending.pop(index, None)
            return
        try:
            async with AsyncIPRoute() as host:
                if await delete_index(host, index):
                    log.debug("network: deleted %s, its namespace outlived its cleanup", name)
        except Exception as exc:  # nothing awaits this task: log, recovery's sweep retries
            log.warning("network: deleting the detached %s: %s", name, exc)
        # Not when cancelled: `close` deletes what is still pending.
        self._pending.pop(index, None)

    async def close(self) -> None:
        """Cancel the waits and delete now what they were waiting for."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        pending, self._pending = self._pending, {}
        if pending:
            async with AsyncIPRoute() as host:
                for index in pending:
                    await delete_index(host, index)


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
