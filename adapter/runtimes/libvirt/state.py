"""The driver's in-memory store: one record per guest it watches, keyed by container id.

A guest's end arrives as a libvirt lifecycle event (STOPPED) on the event loop; the record's
future resolves with the Exit read from the status file at that moment, so a later removal of
the run directory cannot lose it. Without a status: the signal we stopped it with; for a
disk-image guest that powered itself off, 0; else lost, with the end of its console.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from adapter.core.model import Exit
from adapter.runtimes.libvirt.handle import GuestHandle, console_tail, read_exit_code


@dataclass
class Guest:
    handle: GuestHandle
    stopped: asyncio.Future[Exit]
    memory_mib: int
    vcpus: int
    # The signal we answered a kill with (15: ACPI shutdown, 9: destroy), for a guest that
    # ends without reporting a status.
    kill_signal: int | None = None
    # The guest powered itself off (libvirt's SHUTDOWN event reached us).
    powered_off: bool = False
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def exit_now(self, how: str) -> Exit:
        """The guest has stopped: its exit as the status file (written by QEMU) tells it."""
        code = read_exit_code(self.handle.status_path)
        if code is not None:
            return Exit(exit_code=code)
        if self.kill_signal is not None:
            return Exit(signal=self.kill_signal)
        if self.powered_off and self.handle.disk_image:
            # A disk-image guest runs its own init, which need not know our status port:
            # powering off by itself is how such a machine ends normally.
            return Exit(exit_code=0)
        tail = console_tail(self.handle.console_path)
        return Exit(
            lost=True,
            message=f"the guest {how} without reporting an exit status"
            + (f"; console: {tail}" if tail else ""),
        )

    def resolve(self, how: str) -> None:
        if not self.stopped.done():
            self.stopped.set_result(self.exit_now(how))


class Guests:
    def __init__(self) -> None:
        self._guests: dict[str, Guest] = {}

    def add(self, container_id: str, guest: Guest) -> None:
        self._guests[container_id] = guest

    def get(self, container_id: str) -> Guest | None:
        return self._guests.get(container_id)

    def pop(self, container_id: str) -> Guest | None:
        return self._guests.pop(container_id, None)

    def by_domain(self, domain_name: str) -> Guest | None:
        for guest in self._guests.values():
            if guest.handle.domain_name == domain_name:
                return guest
        return None

    def items(self) -> list[tuple[str, Guest]]:
        return list(self._guests.items())

    def clear(self) -> None:
        for guest in self._guests.values():
            if not guest.stopped.done():
                guest.stopped.cancel()
        self._guests.clear()
