"""From a runtime's exit to the container's Termination, the policy said once: the exit awaited
(bounded once the container is killed), then its reason, `killed` and the one message every
client shows.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import replace

from adapter.core.model import Exit, Reason, Termination
from adapter.runtimes.base import Runtime

log = logging.getLogger(__name__)

LIMITATION_REASONS = {
    "mem": Reason.LIMITATION_MEMORY,
    "pids": Reason.LIMITATION_PIDS,
    "disk": Reason.LIMITATION_DISK,
}
# Limits whose enforcement ends the container (the kernel's OOM kill, the disk isolator); a
# pids limit only refuses forks, so the container's end has another cause.
KILLING_LIMITATIONS = (Reason.LIMITATION_MEMORY, Reason.LIMITATION_DISK)
# How long the exit may take to show after kill_all; then the container is recorded as killed
# with its exit unknown, and cleaned up anyway.
EXIT_AFTER_KILL_TIMEOUT = 30.0


async def await_exit(driver: Runtime, container_id: str, kill_done: asyncio.Event) -> Exit:
    """The runtime's exit of the container; once `kill_done` is set (kill_all returned) it gets
    EXIT_AFTER_KILL_TIMEOUT, then the exit is unknown (and the container, killed, is cleaned up
    anyway)."""
    wait = asyncio.ensure_future(driver.wait(container_id))
    killed = asyncio.ensure_future(kill_done.wait())
    try:
        await asyncio.wait((wait, killed), return_when=asyncio.FIRST_COMPLETED)
        if not wait.done():
            await asyncio.wait((wait,), timeout=EXIT_AFTER_KILL_TIMEOUT)
        if not wait.done():
            log.warning("%s: no exit %g s after the kill", container_id, EXIT_AFTER_KILL_TIMEOUT)
            return Exit(
                lost=True,
                message=f"no exit reported within {EXIT_AFTER_KILL_TIMEOUT:g} s of the kill",
            )
        if wait.exception() is not None:  # a runtime fault must not leave waiters hanging
            log.error("wait on %s failed", container_id, exc_info=wait.exception())
            return Exit(lost=True, message=f"wait failed: {wait.exception()}")
        return wait.result()
    finally:
        wait.cancel()
        killed.cancel()


def termination_of(exit_: Exit, *, destroy_requested: bool, disk_limitation: str) -> Termination:
    if disk_limitation and not exit_.lost:
        exit_ = replace(exit_, limitation="disk", limitation_message=disk_limitation)
    reason = _reason(exit_, destroy_requested=destroy_requested)
    killed = destroy_requested or reason in KILLING_LIMITATIONS
    return Termination(
        reason=reason,
        exit_code=exit_.exit_code,
        signal=exit_.signal,
        status=exit_.status,
        killed=killed,
        message=_termination_message(reason, exit_),
        limited_resources=(exit_.limitation,) if exit_.limitation else (),
        finished_at=exit_.finished_at or time.time(),
    )


def _reason(exit_: Exit, *, destroy_requested: bool) -> Reason:
    """Why the container ended. A limit that kills (memory, disk) was the cause even when a
    Destroy followed; otherwise a requested destroy is: it ends DESTROYED even if the runtime
    lost track of the exit (a restart in the middle of the destroy) or a pids limit had refused
    some forks (that kills nothing)."""
    limitation = LIMITATION_REASONS.get(exit_.limitation or "")
    if limitation is not None and limitation in KILLING_LIMITATIONS and not exit_.lost:
        return limitation
    if destroy_requested:
        return Reason.DESTROYED
    if exit_.lost:
        return Reason.LOST
    return limitation or Reason.EXITED


def _termination_message(reason: Reason, exit_: Exit) -> str:
    """What happened, said once: the one sentence every client shows as it is."""
    if exit_.lost:
        outcome = exit_.message or "exit status unknown"
    elif exit_.signal is not None:
        outcome = f"killed by signal {exit_.signal} ({_signal_name(exit_.signal)})"
    else:
        outcome = f"exited with code {exit_.exit_code}"
    if reason is Reason.DESTROYED:
        outcome = f"destroyed: {outcome}"
    if exit_.limitation_message:
        outcome += f"; {exit_.limitation_message}"
    return outcome


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return "unknown signal"
