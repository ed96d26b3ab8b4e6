"""The containerd runtime's table, `[runtimes.containerd]`, parsed once when the config is
loaded."""

from __future__ import annotations

import shutil
from dataclasses import dataclass

from adapter.core.errors import FailedPrecondition
from adapter.runtimes.containerd.handle import CONTAINERD_ID
from adapter.runtimes.table import RuntimeTable

DEFAULT_ADDRESS = "/run/containerd/containerd.sock"


@dataclass(frozen=True)
class ContainerdOptions:
    address: str = DEFAULT_ADDRESS  # containerd's gRPC socket
    namespace: str = "containerizer"  # containerd's namespace for everything we create
    runtime: str = "io.containerd.runc.v2"  # the shim
    runtime_binary: str | None = None  # e.g. "crun": the runc shim runs this OCI runtime instead
    snapshotter: str = "overlayfs"

    def runtime_binary_path(self) -> str | None:
        """Where runtime_binary is installed; None when the shim's own runc is used."""
        if self.runtime_binary is None:
            return None
        found = shutil.which(self.runtime_binary)
        if found is None:
            raise FailedPrecondition(
                f"runtimes.containerd.runtime_binary: {self.runtime_binary!r} is not installed"
                " (Debian packages runc, crun)"
            )
        return found

    @classmethod
    def parse(cls, table: RuntimeTable) -> ContainerdOptions:
        defaults = cls()
        options = cls(
            address=table.text("address", defaults.address),
            namespace=table.text("namespace", defaults.namespace),
            runtime=table.text("runtime", defaults.runtime),
            runtime_binary=table.optional_text("runtime_binary"),
            snapshotter=table.text("snapshotter", defaults.snapshotter),
        )
        # Both become parts of containerd identifiers, which it validates with this grammar.
        for key in ("namespace", "snapshotter"):
            if not CONTAINERD_ID.fullmatch(getattr(options, key)):
                raise table.error(key, "a containerd name: [A-Za-z0-9]+([._-][A-Za-z0-9]+)*")
        return options
