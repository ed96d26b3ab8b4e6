"""The native runtime's table, `[runtimes.native]`, parsed once when the config is loaded."""

from __future__ import annotations

from dataclasses import dataclass

from adapter.runtimes.table import RuntimeTable


@dataclass(frozen=True)
class NativeOptions:
    supervisor: str | None = None  # the supervisor binary; None: found beside our Python
    namespaces: bool = True  # new pid/mount/uts/ipc namespaces (and so images) for workloads

    @classmethod
    def parse(cls, table: RuntimeTable) -> NativeOptions:
        return cls(
            supervisor=table.optional_text("supervisor"),
            namespaces=table.flag("namespaces", True),
        )
