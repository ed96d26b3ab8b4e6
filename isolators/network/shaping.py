"""Bandwidth shaping with tc: a token bucket (tbf) root qdisc on the host side of a veth.

The qdisc sits in the host namespace, where the container (root inside its own namespace, with
CAP_NET_ADMIN there) cannot remove it. It shapes what the host side transmits, i.e. the traffic
delivered to the container; `network_bandwidth` therefore bounds every transfer into the
container, from other containers, from the host and through port forwards.
"""

from __future__ import annotations

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from isolators.network.bridge import ENOENT_OR_NODEV

# The bucket must hold at least one GSO super-packet (64 KiB on a veth) or tbf has to segment
# every one; 5 ms worth of the rate above that keeps fast rates smooth.
MIN_BURST_BYTES = 64 * 1024 + 1514
BURST_SECONDS = 0.005
LATENCY = "50ms"  # how long a packet may queue before it is dropped
EINVAL = 22


def burst_bytes(mbit: float) -> int:
    return max(MIN_BURST_BYTES, int(mbit * 1_000_000 / 8 * BURST_SECONDS))


async def set_rate(ipr: AsyncIPRoute, index: int, mbit: float) -> None:
    """Install or change (live) the rate limit on link `index`."""
    rate_kbit = max(1, round(mbit * 1000))
    await ipr.tc(
        "replace", "tbf", index, rate=f"{rate_kbit}kbit", burst=burst_bytes(mbit), latency=LATENCY
    )


async def clear_rate(ipr: AsyncIPRoute, index: int) -> None:
    """Back to the default qdisc; fine if there is no tbf (or no link any more)."""
    try:
        await ipr.tc("del", index=index, handle=0, parent=0xFFFFFFFF)
    except NetlinkError as exc:
        if exc.code not in (*ENOENT_OR_NODEV, EINVAL):
            raise
