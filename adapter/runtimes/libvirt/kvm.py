"""KVM or QEMU (TCG): decided by really booting a guest under KVM, with a timeout, remembered.

A /dev/kvm that opens is not proof: on some hosts (nested setups, odd CPUID) KVM accepts a VM,
runs a few real-mode instructions, then hangs in the guest kernel's early boot. So the probe
boots the configured kernel with the driver's own initramfs running `true` under
`qemu-system-x86_64 -accel kvm`, and KVM is used only if the guest reports `exit 0` in time.

The verdict is kept in a small file in the state directory, keyed by what decides it: the host
kernel release, the QEMU version, /dev/kvm's identity (device number, inode, mtime: a reloaded
module makes a new node) and the guest kernel. The probe runs again only when one of those
changes, and then in the background (VirtTypeChooser): neither the service's start nor
`runtimes` waits for a guest to boot; a launch waits for the verdict it needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from adapter.core.errors import ContainerizerError
from adapter.runtimes.libvirt.handle import read_exit_code
from adapter.runtimes.libvirt.initramfs import GuestCommand, write_container_initramfs

log = logging.getLogger(__name__)

QEMU_BINARY = "qemu-system-x86_64"
KVM_DEVICE = Path("/dev/kvm")
VERSION_TIMEOUT = 10.0


@dataclass(frozen=True)
class VirtChoice:
    virt_type: str  # "kvm" or "qemu"
    reason: str


def _file_identity(path: Path) -> str:
    try:
        info = path.stat()
    except OSError:
        return f"{path}:missing"
    return f"{path}:{info.st_size}:{info.st_mtime_ns}"


def kvm_device_identity(device: Path) -> str:
    """/dev/kvm as the kernel made it: device number, inode and mtime, or why it is absent."""
    try:
        info = device.stat()
    except OSError as exc:
        return f"{device}:{exc.strerror}"
    number = f"{os.major(info.st_rdev)}:{os.minor(info.st_rdev)}"
    return f"{device}:{number}:{info.st_ino}:{info.st_mtime_ns}"


async def qemu_version(qemu: str) -> str:
    """The first line of `qemu-system-x86_64 --version`, or why there is none."""
    try:
        process = await asyncio.create_subprocess_exec(
            qemu, "--version", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
        )
        out, _ = await asyncio.wait_for(process.communicate(), VERSION_TIMEOUT)
    except (OSError, TimeoutError) as exc:
        return f"{qemu}: no version ({exc})"
    return (out.decode(errors="replace").splitlines() or [f"{qemu}: no version"])[0].strip()


async def probe_key(kernel: Path) -> str:
    """What the KVM verdict depends on; a cached verdict under another key is not used."""
    qemu = shutil.which(QEMU_BINARY) or QEMU_BINARY
    parts = (
        f"host {os.uname().release}",
        f"qemu {await qemu_version(qemu)}",
        f"kvm {kvm_device_identity(KVM_DEVICE)}",
        f"guest {_file_identity(kernel)}",
    )
    return " | ".join(parts)


def read_verdict(cache: Path, key: str) -> VirtChoice | None:
    """The remembered verdict for this key, or None (no file, another key, unreadable)."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        cached = json.loads(cache.read_text())
        if cached["key"] == key and cached["virt_type"] in ("kvm", "qemu"):
            return VirtChoice(cached["virt_type"], f"{cached['reason']} (cached probe)")
    return None


def write_verdict(cache: Path, key: str, choice: VirtChoice) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_suffix(".tmp")
    partial.write_text(json.dumps({"key": key, **choice.__dict__}))
    partial.replace(cache)


def _kvm_openable() -> str | None:
    """Why /dev/kvm cannot be used at all, or None when it opens read-write."""
    try:
        descriptor = os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"{KVM_DEVICE}: {exc.strerror}"
    os.close(descriptor)
    return None


async def _boot_under_kvm(kernel: Path, base_initramfs: Path, timeout: float) -> str | None:
    """Boot `true` under KVM; None on success, else why KVM is not usable."""
    qemu = shutil.which(QEMU_BINARY)
    if qemu is None:
        return f"{QEMU_BINARY} not found"
    with tempfile.TemporaryDirectory(prefix="containerizer-kvm-probe-") as scratch:
        initrd = Path(scratch) / "initrd"
        status = Path(scratch) / "status"
        write_container_initramfs(base_initramfs, GuestCommand(argv=("true",)), initrd)
        process = await asyncio.create_subprocess_exec(
            qemu, "-accel", "kvm", "-M", "pc", "-m", "128", "-nodefaults", "-no-user-config",
            "-display", "none", "-no-reboot", "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", "console=ttyS0 quiet panic=-1",
            "-serial", "null", "-serial", "null", "-serial", "null",
            "-serial", f"file:{status}",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            _, err = await asyncio.wait_for(process.communicate(), timeout)
        except TimeoutError:
            return f"a KVM guest did not boot within {timeout:g}s (KVM hangs on this host)"
        finally:
            if process.returncode is None:  # timed out, or the service stops mid-probe
                process.kill()
                await process.wait()
        if read_exit_code(status) == 0:
            return None
        detail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        return f"a KVM guest failed (qemu exit {process.returncode}: {detail[0]})"


async def probe(kernel: Path, base_initramfs: Path, timeout: float) -> VirtChoice:
    unusable = _kvm_openable() or await _boot_under_kvm(kernel, base_initramfs, timeout)
    if unusable is None:
        return VirtChoice("kvm", "a KVM guest booted")
    return VirtChoice("qemu", f"TCG software emulation: {unusable}")


async def choose_virt_type(
    configured: str,
    *,
    kernel: Path,
    base_initramfs: Callable[[], Awaitable[Path]],
    cache: Path,
    timeout: float,
) -> VirtChoice:
    """The domain type to use: the configured one, else the remembered or freshly probed one
    (`base_initramfs` is built only for a probe)."""
    if configured != "auto":
        return VirtChoice(configured, "set in the config")
    key = await probe_key(kernel)
    cached = read_verdict(cache, key)
    if cached is not None:
        return cached
    log.info("libvirt: probing whether KVM works here (a guest boot, up to %gs)", timeout)
    choice = await probe(kernel, await base_initramfs(), timeout)
    try:
        write_verdict(cache, key, choice)
    except OSError as exc:  # the verdict stands; only the next start probes again
        log.warning("libvirt: cannot remember the KVM verdict in %s: %s", cache, exc)
    return choice


class VirtTypeChooser:
    """The domain type, decided once per service in a background task started by `start()`
    (at recovery, i.e. service start): `current()` answers at once, `choice()` waits."""

    def __init__(
        self,
        configured: str,
        *,
        kernel: Path,
        base_initramfs: Callable[[], Awaitable[Path]],
        cache: Path,
        timeout: float,
    ) -> None:
        self._configured = configured
        self._kernel = kernel
        self._base_initramfs = base_initramfs
        self._cache = cache
        self._timeout = timeout
        self._task: asyncio.Task[VirtChoice] | None = None

    @property
    def probe_timeout(self) -> float:
        return self._timeout

    def start(self) -> None:
        """Begin deciding, unless that has begun (a failed attempt is tried again)."""
        task = self._task
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            self._task = asyncio.get_running_loop().create_task(self._decide())
            self._task.add_done_callback(_log_failure)

    async def _decide(self) -> VirtChoice:
        choice = await choose_virt_type(
            self._configured,
            kernel=self._kernel,
            base_initramfs=self._base_initramfs,
            cache=self._cache,
            timeout=self._timeout,
        )
        log.info("libvirt: domain type %s (%s)", choice.virt_type, choice.reason)
        return choice

    def current(self) -> VirtChoice | None:
        """The verdict if decided, None while deciding; raises why deciding failed."""
        self.start()
        assert self._task is not None
        return self._task.result() if self._task.done() else None

    async def choice(self) -> VirtChoice:
        self.start()
        assert self._task is not None
        return await asyncio.shield(self._task)

    async def close(self) -> None:
        """Stop a probe in flight (its QEMU is killed); nothing is remembered from it."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ContainerizerError):
                await self._task


def _log_failure(task: asyncio.Task[VirtChoice]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("libvirt: cannot decide the domain type: %s", task.exception())
