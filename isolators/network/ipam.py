"""IPv4 address management over the bridge's subnet: pure allocation policy, no I/O.

The allocations themselves live in the network checkpoint (state.py); this module only decides
which address comes next. Allocation continues after the last address handed out (like CNI's
host-local `last_reserved_ip`) instead of taking the lowest free one, so an address just freed is
not handed out again at once while other containers may still hold it in their ARP caches.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection

from isolators.network.model import NetworkUnavailable


class AddressPool:
    """The container addresses of one subnet: every host address except the bridge's (the
    first host, the containers' gateway)."""

    def __init__(self, subnet: ipaddress.IPv4Network) -> None:
        if subnet.num_addresses < 4:
            raise ValueError(f"subnet {subnet} has no room for a gateway and a container")
        self.subnet = subnet
        self.gateway = subnet.network_address + 1
        self._first = int(subnet.network_address) + 2
        self._last = int(subnet.broadcast_address) - 1

    @property
    def size(self) -> int:
        return self._last - self._first + 1

    def contains(self, address: ipaddress.IPv4Address) -> bool:
        return self._first <= int(address) <= self._last

    def allocate(
        self, used: Collection[ipaddress.IPv4Address], after: ipaddress.IPv4Address | None = None
    ) -> ipaddress.IPv4Address:
        """The next free address after `after` (wrapping around), never one in `used`."""
        start = int(after) + 1 if after is not None and self.contains(after) else self._first
        taken = {int(address) for address in used}
        for offset in range(self.size):
            candidate = self._first + (start - self._first + offset) % self.size
            if candidate not in taken:
                return ipaddress.IPv4Address(candidate)
        raise NetworkUnavailable(
            f"no free address left in {self.subnet} ({self.size} addresses, all in use)"
        )
