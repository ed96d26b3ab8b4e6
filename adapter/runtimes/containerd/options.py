"""The containerd runtime's table, `[runtimes.containerd]`, parsed once when the config is
loaded."""

from __future__ import annotations

from dataclasses import dataclass

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
