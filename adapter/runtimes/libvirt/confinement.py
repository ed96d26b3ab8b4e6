"""What confines a workload of the libvirt runtime, for `runtimes`, read from libvirt itself.

The node's confinement policy (adapter/core/confinement.py: capabilities, seccomp, masked paths)
is for processes on the host kernel. A libvirt workload runs on a kernel of its own in a virtual
machine: inside it is root with every capability of the guest kernel, and the boundary is the
hypervisor. On the host, what confines the QEMU process is what libvirt gives it: its security
drivers (DAC: the user and group QEMU runs as; AppArmor or SELinux where the host has one),
QEMU's own seccomp sandbox (libvirt's `seccomp_sandbox`, on by default) and the domain's cgroups.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET


def security_models(capabilities_xml: str, virt_type: str) -> list[str]:
    """libvirt's security drivers from its host capabilities, DAC with the label QEMU runs as
    (`+0:+0` is root), e.g. ["apparmor", "dac +64055:+994"]; "none" models are left out."""
    try:
        root = ET.fromstring(capabilities_xml)
    except ET.ParseError:
        return []
    models: list[str] = []
    for secmodel in root.iterfind("host/secmodel"):
        model = (secmodel.findtext("model") or "").strip()
        if not model or model == "none":
            continue
        labels = {label.get("type"): (label.text or "").strip() for label in secmodel}
        label = labels.get(virt_type) or labels.get("qemu") or labels.get("kvm") or ""
        models.append(f"{model} {label}".strip() if label else model)
    return models


def vm_confinement(capabilities_xml: str, virt_type: str, partition: str) -> str:
    """One line: the guest boundary, then what libvirt confines QEMU with on the host."""
    models = security_models(capabilities_xml, virt_type)
    drivers = ", ".join(models) if models else "none reported"
    return (
        f"virtual machine ({virt_type}): the workload runs as root on its own guest kernel,"
        " with no host filesystem or device shared (initramfs or an overlay disk; output over"
        " serial ports); the node's capability/seccomp policy applies to no process here, the"
        f" hypervisor is the boundary. On the host, QEMU as libvirt confines it: security"
        f" drivers: {drivers}; QEMU's seccomp sandbox per libvirt's seccomp_sandbox; cgroups"
        f" in the resource partition {partition}"
    )
