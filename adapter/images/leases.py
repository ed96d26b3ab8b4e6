"""Which image each container runs on, so that nothing a container uses is deleted.

The store asks the core which containers are not TERMINATED, which image reference each one
named and whether it is still launching (a callable injected at wiring time). A reference is
only a name: an import or pull may point it at another manifest while a container still runs on
the old one. So the store leases each container the manifests its reference resolved to while
it launched, and keeps the lease until the container is gone.

Why that is exact enough: leases are refreshed before every change to the index. A launch reads
the index at some moment while its container is LAUNCHING; the index it read is then either
still current (its manifests are named, so kept) or was replaced by a change whose refresh saw
the container LAUNCHING and leased it what the reference resolved to just before. Once a
container runs, its lease stops growing. Leases are kept in `leases.json`, so that a restart of
the service keeps protecting what running containers use.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from adapter.images.layout import write_file_durably

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageUse:
    """What the core says of a container that is not TERMINATED."""

    reference: str  # the image it named
    launching: bool  # LAUNCHING: its runtime may still be looking the reference up


# container id -> its ImageUse, for every container that is not TERMINATED and has an image.
ContainerImages = Callable[[], Mapping[str, ImageUse]]


@dataclass(frozen=True)
class Lease:
    reference: str
    digests: frozenset[str]  # the manifests it may run on


class Leases:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.leases: dict[str, Lease] = {}
        # False when leases.json was unreadable: until the next refresh nobody knows what
        # runs, so garbage collection keeps every root filesystem.
        self.known = True
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_bytes())
            self.leases = {
                str(container): Lease(str(lease["reference"]), frozenset(lease["digests"]))
                for container, lease in data.items()
            }
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            log.warning(
                "%s is unreadable (%s): keeping every root filesystem until the running "
                "containers are known again",
                self.path,
                exc,
            )
            self.known = False

    def refresh(
        self, containers: Mapping[str, ImageUse], resolve: Callable[[str], str | None]
    ) -> None:
        """Lease each container what `resolve` (reference -> manifest digest, None when not in
        the store) gives now, added to its lease while it launches; drop the others."""
        leases = {}
        for container, use in containers.items():
            lease = self.leases.get(container)
            if lease is not None and lease.reference != use.reference:
                lease = None  # an id used again, for another launch
            if lease is None or use.launching:
                digest = resolve(use.reference)
                digests = (lease.digests if lease else frozenset()) | (
                    {digest} if digest else set()
                )
                lease = Lease(use.reference, digests) if digests else None
            if lease is not None:
                leases[container] = lease
        if leases != self.leases or not self.known:
            self.leases, self.known = leases, True
            document = {
                container: {"reference": lease.reference, "digests": sorted(lease.digests)}
                for container, lease in leases.items()
            }
            write_file_durably(self.path, json.dumps(document, indent=2).encode())

    def users(self, digest: str) -> list[str]:
        """The containers that may run on manifest `digest`."""
        return sorted(c for c, lease in self.leases.items() if digest in lease.digests)

    def digests(self) -> set[str]:
        return {digest for lease in self.leases.values() for digest in lease.digests}
