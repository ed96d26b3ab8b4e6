"""The libvirt runtime's table, `[runtimes.libvirt]`, parsed once when the config is loaded.

Without the `libvirt` package: a node checks its config before it builds the driver, which is
where a missing binding is named (adapter/runtimes/registry.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from adapter.runtimes.table import RuntimeTable

VIRT_TYPES = ("auto", "kvm", "qemu")  # auto: KVM if a probe guest boots under it (kvm.py)
DEFAULT_MEMORY_MIB = 256
MIN_GUEST_MEMORY_MIB = 64  # below this the cloud kernel does not unpack its initramfs


@dataclass(frozen=True)
class LibvirtOptions:
    kernel: Path  # default <state_dir>/libvirt/kernel/vmlinuz (deploy/vm-kernel.sh)
    uri: str = "qemu:///system"
    virt_type: str = "auto"
    machine: str = "pc"  # QEMU machine type
    busybox: Path = Path("/bin/busybox")  # the guest's userland (busybox-static)
    kvm_probe_timeout: float = 10.0  # seconds a KVM guest may take to boot in the probe
    memory_mib: int = DEFAULT_MEMORY_MIB  # guest RAM when a launch asks for no mem
    # name -> base qcow2 disk: the images a launch may boot (disk mode, disk.py)
    disk_images: dict[str, Path] = field(default_factory=dict)
    kernel_args: str = ""  # appended to the guest kernel's command line (e.g. timer flags)

    @classmethod
    def parse(cls, table: RuntimeTable) -> LibvirtOptions:
        default_kernel = table.state_dir / "libvirt" / "kernel" / "vmlinuz"
        options = cls(
            kernel=Path(table.text("kernel", str(default_kernel))),
            uri=table.text("uri", cls.uri),
            virt_type=table.text("virt_type", cls.virt_type),
            machine=table.text("machine", cls.machine),
            busybox=Path(table.text("busybox", str(cls.busybox))),
            kvm_probe_timeout=table.number("kvm_probe_timeout", cls.kvm_probe_timeout),
            memory_mib=table.integer("memory_mib", cls.memory_mib),
            disk_images=_disk_images(table),
            kernel_args=table.text("kernel_args", cls.kernel_args),
        )
        if options.virt_type not in VIRT_TYPES:
            raise table.error("virt_type", f"one of {list(VIRT_TYPES)}")
        if options.memory_mib < MIN_GUEST_MEMORY_MIB:
            raise table.refusal("memory_mib", f"at least {MIN_GUEST_MEMORY_MIB}")
        return options


def _disk_images(table: RuntimeTable) -> dict[str, Path]:
    """`disk_images`: name -> absolute path of a qcow2 base disk; only these names boot, so a
    path never comes from the API."""
    images: dict[str, Path] = {}
    for name, path in table.subtable("disk_images", "a table of name = path").items():
        if not isinstance(path, str) or not path.startswith("/"):
            raise table.refusal(f"disk_images.{name}", f"expected an absolute path, got {path!r}")
        images[name] = Path(path)
    return images
