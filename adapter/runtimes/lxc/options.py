"""The LXC runtime's table, `[runtimes.lxc]`, parsed once when the config is loaded."""

from __future__ import annotations

from dataclasses import dataclass

from adapter.runtimes.table import RuntimeTable

# LXC's own network of a container when the node's network isolator does not choose it.
NETWORK_TYPES = ("empty", "none", "veth")
DEFAULT_NETWORK_TYPE = "empty"


@dataclass(frozen=True)
class LxcOptions:
    supervisor: str | None = None  # the static supervisor; None: found beside our Python
    # None when the table does not set it: a node with a [network] table refuses the key.
    network: str | None = None
    network_link: str | None = None  # the operator's bridge of `network = "veth"`

    @property
    def network_type(self) -> str:
        return self.network or DEFAULT_NETWORK_TYPE

    @classmethod
    def parse(cls, table: RuntimeTable) -> LxcOptions:
        options = cls(
            supervisor=table.optional_text("supervisor"),
            network=table.optional_text("network"),
            network_link=table.optional_text("network_link"),
        )
        if options.network_type not in NETWORK_TYPES:
            raise table.error("network", f"one of {NETWORK_TYPES}")
        if (options.network_type == "veth") != (options.network_link is not None):
            raise table.refusal("network_link", "required with (and only with) 'veth'")
        return options
