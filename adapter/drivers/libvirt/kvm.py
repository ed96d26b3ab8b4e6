"""KVM or QEMU (TCG): decided by really booting a guest under KVM, with a timeout, and cached.

A /dev/kvm that opens is not proof: on some hosts (nested setups, odd CPUID) KVM accepts a VM,
runs a few real-mode instructions, then hangs in the guest kernel's early boot. So the probe
boots the configured kernel with the driver's own initramfs running `true` under
`qemu-system-x86_64 -accel kvm`, and KVM is used only if the guest reports `exit 0` in time.
The answer is cached in the state directory, keyed by the host kernel, the QEMU binary and the
guest kernel, so the probe runs once per host change, not per start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from adapter.drivers.libvirt.handle import read_exit_code
from adapter.drivers.libvirt.initramfs import GuestCommand, write_container_initramfs

QEMU_BINARY = "qemu-system-x86_64"
KVM_DEVICE = Path("/dev/kvm")
VIRT_TYPES = ("auto", "kvm", "qemu")


@dataclass(frozen=True)
class VirtChoice:
    virt_type: str  # "kvm" or "qemu"
    reason: str


def _cache_key(kernel: Path, qemu: str) -> str:
    def identity(path: Path) -> str:
        with contextlib.suppress(OSError):
            info = path.stat()
            return f"{path}:{info.st_size}:{int(info.st_mtime)}"
        return f"{path}:missing"

    return "|".join((os.uname().release, identity(Path(qemu)), identity(kernel)))


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
            process.kill()
            await process.wait()
            return f"a KVM guest did not boot within {timeout:g}s (KVM hangs on this host)"
        if read_exit_code(status) == 0:
            return None
        detail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        return f"a KVM guest failed (qemu exit {process.returncode}: {detail[0]})"


async def choose_virt_type(
    configured: str, *, kernel: Path, base_initramfs: Path, cache: Path, timeout: float
) -> VirtChoice:
    """The domain type to use: the configured one, else the cached or freshly probed one."""
    if configured != "auto":
        return VirtChoice(configured, "set in the config")
    key = _cache_key(kernel, shutil.which(QEMU_BINARY) or QEMU_BINARY)
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        cached = json.loads(cache.read_text())
        if cached["key"] == key:
            return VirtChoice(cached["virt_type"], f"{cached['reason']} (cached probe)")
    unusable = _kvm_openable() or await _boot_under_kvm(kernel, base_initramfs, timeout)
    if unusable is None:
        choice = VirtChoice("kvm", "a KVM guest booted")
    else:
        choice = VirtChoice("qemu", f"TCG software emulation: {unusable}")
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_suffix(".tmp")
    partial.write_text(json.dumps({"key": key, **choice.__dict__}))
    partial.replace(cache)
    return choice
