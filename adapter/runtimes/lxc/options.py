"""The LXC runtime's table, `[runtimes.lxc]`, parsed once when the config is loaded."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass

from adapter.core.errors import FailedPrecondition
from adapter.runtimes.table import RuntimeTable

STATIC_SUPERVISOR_NAME = "containerizer-supervisor-static"

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

    def static_supervisor(self) -> str:
        """The static supervisor: the container's rootfs has no libc of ours to load a dynamic
        one. Configured path, else beside our Python (where the install step builds it)."""
        beside_python = os.path.join(os.path.dirname(sys.executable), STATIC_SUPERVISOR_NAME)
        if self.supervisor:
            candidates = [self.supervisor]
        elif os.access(beside_python, os.X_OK):  # the install step's place: no PATH search
            candidates = [beside_python]
        else:
            candidates = [beside_python, shutil.which(STATIC_SUPERVISOR_NAME) or ""]
        for candidate in candidates:
            if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
                return candidate
        raise FailedPrecondition(
            f"lxc: static supervisor not found (looked at {[c for c in candidates if c]}); build"
            f" it with `make -C supervisor STATIC_BIN={candidates[0]}`"
        )

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
