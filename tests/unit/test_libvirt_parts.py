"""The libvirt driver's pure parts: domain XML, initramfs, status files, options, probe cache."""

from __future__ import annotations

import asyncio
import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from adapter.core.errors import ConfigError, InvalidArgument
from adapter.runtimes.libvirt import kvm
from adapter.runtimes.libvirt.confinement import security_models, vm_confinement
from adapter.runtimes.libvirt.domain import (
    DomainSpec,
    Metadata,
    SerialFiles,
    domain_cgroup_dirs,
    domain_xml,
    metadata_xml,
    parse_metadata,
)
from adapter.runtimes.libvirt.handle import GuestHandle, read_exit_code
from adapter.runtimes.libvirt.initramfs import GuestCommand, command_archive, source_signature
from adapter.runtimes.libvirt.options import LibvirtOptions
from adapter.runtimes.registry import parse_options
from isolators.cgroups.hierarchy import Hierarchies
from isolators.cgroups.locate import dirs_in, parse_proc_cgroup

HOSTILE = "<a>&amp; \"q\" 'q' ]]> <!-- x --> </domain>\n<devices><disk/></devices> \\"


def _spec(**metadata_changes: object) -> DomainSpec:
    metadata = Metadata(
        container_id="x.-_1",
        sandbox=f"/srv/{HOSTILE}",
        status_path="/run/ctz/ttyS3",
        run_dir="/run/ctz",
        owner="/var/lib/containerizer",
        labels=((HOSTILE, HOSTILE), ("bell", "ring\x07")),
    )
    metadata = Metadata(**{**metadata.__dict__, **metadata_changes})
    return DomainSpec(
        name="containerizer-x.-_1",
        uuid="6fd1a6c4-28d1-4d3a-92fd-befa41ca9ca2",
        virt_type="qemu",
        machine="pc",
        memory_mib=200,
        vcpus=2,
        cpu_shares=1536,
        partition="/containerizer",
        kernel="/k/vmlinuz",
        initrd="/run/ctz/initrd",
        cmdline="console=ttyS0",
        serial=SerialFiles("/run/ctz/console", f"/srv/{HOSTILE}/stdout", "/e", "/run/ctz/ttyS3"),
        metadata=metadata,
    )


def test_hostile_values_stay_values_in_the_domain_xml() -> None:
    root = ET.fromstring(domain_xml(_spec()))
    devices = root.find("devices")
    assert devices is not None
    # Structure is exactly ours: nothing a value held became an element.
    assert [child.tag for child in devices] == [
        "serial", "serial", "serial", "serial", "controller", "memballoon",
    ]  # fmt: skip
    assert root.find("devices/disk") is None
    assert root.findall("devices/serial/source")[1].get("path") == f"/srv/{HOSTILE}/stdout"
    assert (root.findtext("memory"), root.findtext("vcpu")) == ("200", "2")
    assert root.findtext("cputune/shares") == "1536"
    assert root.findtext("resource/partition") == "/containerizer"
    metadata = parse_metadata(ET.tostring(root, encoding="unicode"))
    assert metadata.sandbox == f"/srv/{HOSTILE}"
    # Labels: an informational copy; what XML cannot carry at all becomes U+FFFD.
    assert metadata.labels == ((HOSTILE, HOSTILE), ("bell", "ring\ufffd"))


def test_metadata_round_trips_without_its_namespace() -> None:
    """virDomainGetMetadata hands the element back with the namespace stripped."""
    text = metadata_xml(_spec().metadata)
    stripped = text.replace("containerizer:", "").split(">", 1)
    plain = "<container>" + stripped[1]
    assert parse_metadata(plain) == parse_metadata(text)
    assert parse_metadata(plain).owner == "/var/lib/containerizer"
    with pytest.raises(ValueError):
        parse_metadata("<domain><metadata/></domain>")


def test_paths_xml_cannot_carry_are_refused_with_the_field() -> None:
    with pytest.raises(InvalidArgument) as caught:
        domain_xml(_spec(sandbox="/srv/bad\x01dir"))
    assert caught.value.field == "sandbox"


def _unpack(archive: bytes) -> dict[str, bytes]:
    """A minimal newc reader: name -> data, to check what the kernel will unpack."""
    entries: dict[str, bytes] = {}
    offset = 0
    while True:
        header = archive[offset : offset + 110]
        assert header[:6] == b"070701"
        fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        size, name_size = fields[6], fields[11]
        name_start = offset + 110
        name = archive[name_start : name_start + name_size - 1].decode()
        data_start = name_start + name_size + (-(110 + name_size) % 4)
        data = archive[data_start : data_start + size]
        offset = data_start + size + (-size % 4)
        if name == "TRAILER!!!":
            return entries
        entries[name] = data


def test_command_archive_carries_any_bytes_but_nul_verbatim() -> None:
    command = GuestCommand(
        argv=("/bin/sh", "-c", HOSTILE + "\n\n"),
        environment=(f"HOSTILE={HOSTILE}", "-u=option-looking"),
        working_dir="/tmp/a b",
    )
    entries = _unpack(command_archive(command))
    assert entries["ctz/argv/2"] == (HOSTILE + "\n\n").encode()
    assert entries["ctz/env/0"] == f"HOSTILE={HOSTILE}".encode()
    assert entries["ctz/env/1"] == b"-u=option-looking"
    assert entries["ctz/cwd"] == b"/tmp/a b"
    assert "ctz/argv/3" not in entries


def test_base_archive_sources_signature_follows_every_file(tmp_path: Path) -> None:
    """The driver reuses its base archive while this signature stays: any rewritten or
    replaced busybox or module must change it, a missing one must give none."""
    busybox, modules = tmp_path / "busybox", tmp_path / "modules"
    modules.mkdir()
    busybox.write_bytes(b"v1")
    (modules / "a.ko").write_bytes(b"m1")
    first = source_signature(busybox, modules)
    assert first is not None and first == source_signature(busybox, modules)
    a_second_later = (modules / "a.ko").stat().st_mtime_ns + 10**9
    (modules / "a.ko").write_bytes(b"m2")  # same size, rewritten in place
    os.utime(modules / "a.ko", ns=(a_second_later, a_second_later))
    second = source_signature(busybox, modules)
    assert second != first
    replacement = tmp_path / "new"
    replacement.write_bytes(b"v1")
    replacement.replace(busybox)
    assert source_signature(busybox, modules) not in (first, second)
    (modules / "b.ko").write_bytes(b"")
    assert len(source_signature(busybox, modules) or ()) == 3
    busybox.unlink()
    assert source_signature(busybox, modules) is None


def test_exit_status_is_the_last_reported_line(tmp_path: Path) -> None:
    status = tmp_path / "ttyS3"
    assert read_exit_code(status) is None  # never written: destroyed mid-boot
    status.write_bytes(b"")
    assert read_exit_code(status) is None
    status.write_bytes(b"exit 7\n")
    assert read_exit_code(status) == 7
    status.write_bytes(b"noise\r\nexit 0\nexit 143\n")
    assert read_exit_code(status) == 143


def test_handle_round_trips_through_json() -> None:
    handle = GuestHandle("d", "u", "/r", "/r/s", "/r/c", "qemu", 42, ("/sys/fs/cgroup/memory/x",))
    assert GuestHandle.from_json(json.loads(json.dumps(handle.to_json()))) == handle


def test_domain_cgroups_are_read_above_the_emulator_thread_group() -> None:
    proc_cgroup = (
        "8:pids:/\n"
        "4:memory:/ctz.partition/qemu-3-containerizer-a.libvirt-qemu\n"
        "1:cpu:/ctz.partition/qemu-3-containerizer-a.libvirt-qemu/emulator\n"
        "0::/ctz.partition/qemu-3-containerizer-a.libvirt-qemu/emulator\n"
    )
    mounts = {"memory": Path("/cg/memory"), "cpu": Path("/cg/cpu"), "pids": Path("/cg/pids")}
    v1 = Hierarchies(version=1, cgroups_root="ctz", mounts=mounts)
    # The directories QEMU itself is in come first: the accounting reader counts processes
    # in the first that lists any.
    assert domain_cgroup_dirs(dirs_in(v1, parse_proc_cgroup(proc_cgroup)).values()) == [
        "/cg/memory/ctz.partition/qemu-3-containerizer-a.libvirt-qemu",
        "/cg/pids",
        "/cg/cpu/ctz.partition/qemu-3-containerizer-a.libvirt-qemu",
    ]
    v2 = Hierarchies(version=2, cgroups_root="ctz", mounts=dict.fromkeys(mounts, Path("/u")))
    assert domain_cgroup_dirs(dirs_in(v2, parse_proc_cgroup(proc_cgroup)).values()) == [
        "/u/ctz.partition/qemu-3-containerizer-a.libvirt-qemu"
    ]


def test_options_refuse_unknown_virt_types(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="virt_type"):
        parse_options("libvirt", {"virt_type": "xen"}, source="<config>", state_dir=tmp_path)
    options = parse_options("libvirt", {}, source="<config>", state_dir=tmp_path)
    assert isinstance(options, LibvirtOptions)
    assert options.uri == "qemu:///system"
    assert options.kernel == tmp_path / "libvirt" / "kernel" / "vmlinuz"


async def _no_probe() -> Path:
    raise AssertionError("a KVM probe ran")


async def test_virt_type_from_config_or_a_remembered_verdict_without_probing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"kernel")
    device = tmp_path / "kvm"
    device.write_bytes(b"")
    qemu = {"version": "QEMU emulator version 7.2.22"}

    async def version(binary: str) -> str:
        return qemu["version"]

    monkeypatch.setattr(kvm, "KVM_DEVICE", device)
    monkeypatch.setattr(kvm, "qemu_version", version)
    cache = tmp_path / "virt-type.json"

    async def choose(configured: str) -> kvm.VirtChoice:
        return await kvm.choose_virt_type(
            configured, kernel=kernel, base_initramfs=_no_probe, cache=cache, timeout=1
        )

    assert await choose("qemu") == kvm.VirtChoice("qemu", "set in the config")
    key = await kvm.probe_key(kernel)
    kvm.write_verdict(cache, key, kvm.VirtChoice("kvm", "a KVM guest booted"))
    remembered = await choose("auto")
    assert remembered == kvm.VirtChoice("kvm", "a KVM guest booted (cached probe)")
    # Each thing the verdict depends on, changed, makes the remembered one not apply.
    for change in (
        lambda: os.utime(device, ns=(0, 1)),  # /dev/kvm made anew (module reloaded)
        lambda: qemu.update(version="QEMU emulator version 8.2.0"),
        lambda: os.utime(kernel, ns=(0, 1)),  # another guest kernel
    ):
        change()
        changed = await kvm.probe_key(kernel)
        assert changed != key and kvm.read_verdict(cache, changed) is None
        key = changed


async def test_the_kvm_probe_runs_in_the_background_once_per_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"kernel")
    release = asyncio.Event()
    probes: list[Path] = []

    async def slow_probe(kernel: Path, initramfs: Path, timeout: float) -> kvm.VirtChoice:
        probes.append(initramfs)
        await release.wait()
        return kvm.VirtChoice("qemu", "TCG software emulation: KVM hangs")

    async def version(binary: str) -> str:
        return "QEMU emulator version 7.2.22"

    async def initramfs() -> Path:
        return tmp_path / "initrd"

    monkeypatch.setattr(kvm, "probe", slow_probe)
    monkeypatch.setattr(kvm, "qemu_version", version)

    def chooser() -> kvm.VirtTypeChooser:
        return kvm.VirtTypeChooser(
            "auto", kernel=kernel, base_initramfs=initramfs, cache=tmp_path / "v.json", timeout=5
        )

    first = chooser()
    first.start()
    for _ in range(100):
        if probes:
            break
        await asyncio.sleep(0.01)
    assert probes and first.current() is None  # deciding: answered at once, not waited for
    waiting = asyncio.create_task(first.choice())
    release.set()
    assert (await waiting).virt_type == "qemu"
    assert first.current() == await waiting
    second = chooser()  # the next start of the service
    assert (await second.choice()).reason.endswith("(cached probe)")
    assert len(probes) == 1


def test_confinement_names_libvirts_security_drivers_and_qemus_user() -> None:
    capabilities = """<capabilities><host>
      <secmodel><model>none</model><doi>0</doi></secmodel>
      <secmodel><model>apparmor</model><doi>0</doi></secmodel>
      <secmodel><model>dac</model><doi>0</doi>
        <baselabel type='kvm'>+64055:+994</baselabel>
        <baselabel type='qemu'>+64055:+994</baselabel></secmodel>
    </host></capabilities>"""
    assert security_models(capabilities, "kvm") == ["apparmor", "dac +64055:+994"]
    line = vm_confinement(capabilities, "qemu", "/containerizer")
    assert "virtual machine (qemu)" in line and "apparmor, dac +64055:+994" in line
    assert "/containerizer" in line
    assert security_models("not xml", "kvm") == []
