"""The runtime's table, `[runtimes.libvirt]`, parsed once when the driver is built."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapter.core.errors import ConfigError
from adapter.runtimes.libvirt import disk, kvm

DEFAULT_MEMORY_MIB = 256
MIN_GUEST_MEMORY_MIB = 64  # below this the cloud kernel does not unpack its initramfs


@dataclass(frozen=True)
class LibvirtOptions:
    uri: str
    virt_type: str
    kernel: Path
    machine: str
    busybox: Path
    kvm_probe_timeout: float
    memory_mib: int
    disk_images: dict[str, Path]
    kernel_args: str  # appended to the guest kernel's command line (e.g. timer flags)

    @classmethod
    def parse(cls, options: dict[str, Any], state_dir: Path) -> LibvirtOptions:
        virt_type = options.get("virt_type", "auto")
        if virt_type not in kvm.VIRT_TYPES:
            raise ConfigError(
                f"runtimes.libvirt.virt_type: expected one of {list(kvm.VIRT_TYPES)},"
                f" got {virt_type!r}"
            )
        memory = options.get("memory_mib", DEFAULT_MEMORY_MIB)
        if memory < MIN_GUEST_MEMORY_MIB:
            raise ConfigError(f"runtimes.libvirt.memory_mib: at least {MIN_GUEST_MEMORY_MIB}")
        return cls(
            uri=options.get("uri", "qemu:///system"),
            virt_type=virt_type,
            kernel=Path(options.get("kernel", state_dir / "libvirt" / "kernel" / "vmlinuz")),
            machine=options.get("machine", "pc"),
            busybox=Path(options.get("busybox", "/bin/busybox")),
            kvm_probe_timeout=float(options.get("kvm_probe_timeout", 10.0)),
            memory_mib=int(memory),
            disk_images=disk.parse_disk_images(options.get("disk_images", {})),
            kernel_args=str(options.get("kernel_args", "")),
        )
