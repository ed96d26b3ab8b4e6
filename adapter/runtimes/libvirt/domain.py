"""Domain XML for one container, built with xml.etree.ElementTree and read back the same way.

Nothing is pasted into XML text: every value goes through ElementTree, which escapes `<`, `&`,
quotes and newlines. What XML 1.0 cannot carry at all (control characters) is refused for paths
QEMU must open, and replaced in labels, which are an informational copy (the core's checkpoint
holds the real ones).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from adapter.core.errors import InvalidArgument

METADATA_NAMESPACE = "https://containerizer.dev/xmlns/libvirt/1"
METADATA_PREFIX = "containerizer"
DOMAIN_PREFIX = "containerizer-"

# Characters XML 1.0 cannot represent (its `Char` production excludes these).
# The thread groups libvirt makes inside a domain's cgroup (cpu, cpuacct, cpuset).
THREAD_GROUP = re.compile(r"emulator|vcpu\d+|iothread\d+")
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def domain_name(container_id: str) -> str:
    return DOMAIN_PREFIX + container_id


def xml_path(value: str, field: str) -> str:
    """A path QEMU opens: it must survive the trip through XML exactly, or not be used."""
    if _NOT_XML.search(value):
        raise InvalidArgument(field, f"{value!r} holds control characters libvirt cannot take")
    return value


def xml_label(value: str) -> str:
    return _NOT_XML.sub("\ufffd", value)


@dataclass(frozen=True)
class Metadata:
    """What we keep in the domain: enough to re-attach after a restart of the service and to
    tell our domains from those of another service sharing the libvirtd."""

    container_id: str
    sandbox: str
    status_path: str
    run_dir: str
    owner: str  # the state directory of the service that launched it
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class SerialFiles:
    """Host files behind the guest's serial ports (ttyS0..ttyS3), written by QEMU."""

    console: str
    stdout: str
    stderr: str
    status: str


@dataclass(frozen=True)
class Disk:
    """A virtio disk backed by a host file (vda, vdb, ... in the order given)."""

    path: str
    format: str  # "qcow2" or "raw"
    readonly: bool = False


@dataclass(frozen=True)
class BridgeInterface:
    """A virtio NIC whose tap, named `tap` (the isolator's name for the host side), libvirt
    creates and enslaves to `bridge`."""

    bridge: str
    tap: str


@dataclass(frozen=True)
class DomainSpec:
    name: str
    uuid: str
    virt_type: str  # "kvm" or "qemu"
    machine: str
    memory_mib: int
    vcpus: int
    cpu_shares: int
    partition: str  # libvirt resource partition, e.g. "/containerizer"
    kernel: str
    initrd: str
    cmdline: str
    serial: SerialFiles
    metadata: Metadata
    disks: tuple[Disk, ...] = ()
    interface: BridgeInterface | None = None


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attributes: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attributes)
    if text is not None:
        element.text = text
    return element


def metadata_element(metadata: Metadata) -> ET.Element:
    """Our <metadata> child, in our namespace (libvirt keeps foreign namespaces verbatim)."""
    root = ET.Element(f"{{{METADATA_NAMESPACE}}}container")
    for tag, value in (
        ("id", metadata.container_id),
        ("sandbox", xml_path(metadata.sandbox, "sandbox")),
        ("status", xml_path(metadata.status_path, "status")),
        ("run-dir", xml_path(metadata.run_dir, "run_dir")),
        ("owner", xml_path(metadata.owner, "state_dir")),
    ):
        _sub(root, f"{{{METADATA_NAMESPACE}}}{tag}", value)
    labels = _sub(root, f"{{{METADATA_NAMESPACE}}}labels")
    for key, value in metadata.labels:
        label = _sub(labels, f"{{{METADATA_NAMESPACE}}}label", xml_label(value))
        label.set("key", xml_label(key))
    return root


def metadata_xml(metadata: Metadata) -> str:
    """The metadata element alone, as virDomainSetMetadata / the <metadata> child take it."""
    ET.register_namespace(METADATA_PREFIX, METADATA_NAMESPACE)
    return ET.tostring(metadata_element(metadata), encoding="unicode")


def parse_metadata(text: str) -> Metadata:
    """Our metadata element back to values: from a whole domain XML, or from
    virDomainGetMetadata, which returns the element with its namespace stripped."""
    root = ET.fromstring(text)
    for element in root.iter():
        element.tag = element.tag.rpartition("}")[2]
    found = root if root.tag == "container" else root.find("./metadata/container")
    if found is None:
        raise ValueError("no containerizer metadata in the domain")

    def child(name: str) -> str:
        return found.findtext(name) or ""

    labels = tuple(
        (label.get("key", ""), label.text or "") for label in found.iterfind("./labels/label")
    )
    return Metadata(
        container_id=child("id"),
        sandbox=child("sandbox"),
        status_path=child("status"),
        run_dir=child("run-dir"),
        owner=child("owner"),
        labels=labels,
    )


def _serial(devices: ET.Element, port: int, path: str) -> None:
    serial = _sub(devices, "serial", type="file")
    _sub(serial, "source", path=xml_path(path, f"serial port {port}"), append="off")
    _sub(serial, "target", port=str(port))


def _disk(devices: ET.Element, index: int, disk: Disk) -> None:
    element = _sub(devices, "disk", type="file", device="disk")
    _sub(element, "driver", name="qemu", type=disk.format)
    _sub(element, "source", file=xml_path(disk.path, f"disk {index}"))
    _sub(element, "target", dev=f"vd{chr(ord('a') + index)}", bus="virtio")
    if disk.readonly:
        _sub(element, "readonly")


def _interface(devices: ET.Element, interface: BridgeInterface) -> None:
    element = _sub(devices, "interface", type="bridge")
    _sub(element, "source", bridge=interface.bridge)
    _sub(element, "target", dev=interface.tap)
    _sub(element, "model", type="virtio")


def domain_xml(spec: DomainSpec) -> str:
    """A transient domain: direct kernel boot, four serial files, and the disks and bridge
    interface the spec names."""
    domain = ET.Element("domain", type=spec.virt_type)
    _sub(domain, "name", spec.name)
    _sub(domain, "uuid", spec.uuid)
    metadata = _sub(domain, "metadata")
    metadata.append(metadata_element(spec.metadata))
    _sub(domain, "memory", str(spec.memory_mib), unit="MiB")
    _sub(domain, "vcpu", str(spec.vcpus))
    cputune = _sub(domain, "cputune")
    _sub(cputune, "shares", str(spec.cpu_shares))
    resource = _sub(domain, "resource")
    _sub(resource, "partition", spec.partition)
    os_element = _sub(domain, "os")
    _sub(os_element, "type", "hvm", arch="x86_64", machine=spec.machine)
    _sub(os_element, "kernel", xml_path(spec.kernel, "kernel"))
    _sub(os_element, "initrd", xml_path(spec.initrd, "initrd"))
    _sub(os_element, "cmdline", spec.cmdline)
    features = _sub(domain, "features")
    _sub(features, "acpi")  # the power button: our SIGTERM
    _sub(domain, "clock", offset="utc")
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        _sub(domain, event, "destroy")  # a guest that stops for any reason is gone
    devices = _sub(domain, "devices")
    for port, path in enumerate(
        (spec.serial.console, spec.serial.stdout, spec.serial.stderr, spec.serial.status)
    ):
        _serial(devices, port, path)
    for index, disk in enumerate(spec.disks):
        _disk(devices, index, disk)
    if spec.interface is not None:
        _interface(devices, spec.interface)
    _sub(devices, "controller", type="usb", model="none")
    _sub(devices, "memballoon", model="none")
    ET.register_namespace(METADATA_PREFIX, METADATA_NAMESPACE)
    return ET.tostring(domain, encoding="unicode")


def domain_cgroup_dirs(qemu_dirs: Iterable[Path]) -> list[str]:
    """The domain's cgroup directories from those of its QEMU process.

    libvirt puts QEMU's main thread in `<domain cgroup>/emulator` (and vCPU threads in
    `vcpu<N>`) in the cpu/cpuacct/cpuset hierarchies, and the whole domain in one cgroup in the
    others; the accounting reader wants the domain level, which holds all of them. It counts
    processes in the first directory that lists any, and a domain-level directory above the
    thread groups lists none itself: those come after the ones QEMU is in."""
    dirs = list(qemu_dirs)
    in_thread_group = [d for d in dirs if THREAD_GROUP.fullmatch(d.name)]
    holding_qemu = [d for d in dirs if d not in in_thread_group]
    domain_dirs = [*holding_qemu, *(d.parent for d in in_thread_group)]
    return list(dict.fromkeys(map(str, domain_dirs)))
