"""Disk-image mode: a long-running guest that boots a qcow2 disk and runs its own init.

The operator names the base disks a node may boot in the runtime's config,

    [runtimes.libvirt.disk_images]
    web = "/srv/vm/web.qcow2"

and a launch whose image is `web` boots that disk. Only names from this table are accepted, so a
path never comes from the API. Each container gets its own copy-on-write overlay
(`qemu-img create -f qcow2 -b BASE -F qcow2`) in its run directory: the guest writes there, the
base is only ever read (QEMU opens backing files read-only), and the overlay leaves with the run
directory on destroy and in recovery's sweep of orphans.

The command reaches the guest the way cloud images expect their instructions: a NoCloud config
drive (an ISO 9660 volume labelled `cidata`, attached read-only as the second virtio disk) with
`user-data` (the command as a shell script, which cloud-init runs once per instance),
`meta-data` (instance id, hostname) and, on a bridge, `network-config`. The script sends its
output to ttyS1/ttyS2 (the sandbox's stdout/stderr, as in command mode). Values are quoted with
shlex and the JSON files written with json, never pasted.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import shlex
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapter.core.errors import FailedPrecondition, InvalidArgument, LaunchFailed

QEMU_IMG = "qemu-img"
ISO_BUILDERS = ("genisoimage", "xorrisofs", "mkisofs")  # same mkisofs command line
CONFIG_DRIVE_LABEL = "cidata"  # what cloud-init's NoCloud datasource looks for
OVERLAY_NAME = "disk.qcow2"
CONFIG_DRIVE_NAME = "cidata.iso"
FIELD_IMAGE = "container.image"
# The qcow2 header: magic "QFI\xfb", version, backing file offset and size, cluster bits, size.
QCOW2_MAGIC = b"QFI\xfb"
_QCOW2_HEADER = struct.Struct(">4sIQIIQ")


def resolve_image(images: dict[str, Path], reference: str) -> Path:
    """The base disk an image reference names, or why it cannot be booted."""
    base = images.get(reference)
    if base is None:
        known = sorted(images) or "none configured (runtimes.libvirt.disk_images)"
        raise InvalidArgument(
            FIELD_IMAGE, f"{reference[:64]!r} is not a disk image of this node; known: {known}"
        )
    if not base.is_file():
        raise FailedPrecondition(
            f"libvirt: disk image {reference!r} is configured as {base}, which does not exist"
        )
    return base


async def _run(*argv: str) -> None:
    try:
        process = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
    except OSError as exc:
        raise FailedPrecondition(f"libvirt: cannot run {argv[0]}: {exc.strerror}") from exc
    _, err = await process.communicate()
    if process.returncode != 0:
        raise LaunchFailed(f"{argv[0]} failed: {err.decode(errors='replace').strip()[-400:]}")


async def create_overlay(base: Path, run_dir: Path) -> Path:
    """A qcow2 overlay on `base` in the container's run directory: the guest's writable disk."""
    if shutil.which(QEMU_IMG) is None:
        raise FailedPrecondition(f"libvirt: {QEMU_IMG} not found (install qemu-utils)")
    overlay = run_dir / OVERLAY_NAME
    await _run(
        QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(overlay)
    )
    return overlay


def overlay_usage(run_dir: Path) -> dict[str, float]:
    """The guest's disk as Mesos' statistics: the overlay's allocated bytes are what the guest
    wrote (disk_used_bytes), its virtual size the most it can (disk_limit_bytes); {} for a
    command guest (no overlay). Read from our run directory, by descriptor, not followed."""
    try:
        fd = os.open(run_dir / OVERLAY_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return {}
    try:
        header = os.pread(fd, _QCOW2_HEADER.size, 0)
        allocated = os.fstat(fd).st_blocks * 512
    finally:
        os.close(fd)
    statistics: dict[str, float] = {"disk_used_bytes": allocated}
    if len(header) == _QCOW2_HEADER.size:
        magic, _, _, _, _, virtual_size = _QCOW2_HEADER.unpack(header)
        if magic == QCOW2_MAGIC:
            statistics["disk_limit_bytes"] = virtual_size
    return statistics


@dataclass(frozen=True)
class GuestAddress:
    """The guest's static IPv4 configuration from our IPAM."""

    address: str
    prefix_len: int
    gateway: str

    @property
    def netmask(self) -> str:
        return str(ipaddress.IPv4Network(f"0.0.0.0/{self.prefix_len}").netmask)


def user_data(
    argv: list[str], environment: tuple[tuple[str, str], ...], working_dir: str | None
) -> str:
    """The command as the shell script cloud-init runs: output to the sandbox's serial ports."""
    lines = [
        "#!/bin/sh",
        "# containerizer: the container's command; stdout/stderr go to the host's sandbox files",
        "[ -c /dev/ttyS1 ] && exec >/dev/ttyS1",
        "[ -c /dev/ttyS2 ] && exec 2>/dev/ttyS2",
    ]
    if working_dir:
        quoted = shlex.quote(working_dir)
        lines.append(f"mkdir -p {quoted} && cd {quoted} || exit 127")
    # `sh -c 'exec "$@"'` between env and argv: an argv[0] holding '=' stays the command.
    words = ["env", *(f"{name}={value}" for name, value in environment)]
    words += ["/bin/sh", "-c", 'exec "$@"', "workload", *argv]
    lines.append("exec " + shlex.join(words))
    return "\n".join(lines) + "\n"


def network_config(address: GuestAddress | None) -> dict[str, Any] | None:
    """cloud-init network config (version 1) for the first NIC, or None without a network."""
    if address is None:
        return None
    subnet = {
        "type": "static",
        "address": f"{address.address}/{address.prefix_len}",
        "gateway": address.gateway,
    }
    return {"version": 1, "config": [{"type": "physical", "name": "eth0", "subnets": [subnet]}]}


async def write_config_drive(
    run_dir: Path, container_id: str, script: str, address: GuestAddress | None
) -> Path:
    """The NoCloud ISO in the run directory: user-data, meta-data, network-config."""
    builder = next((found for name in ISO_BUILDERS if (found := shutil.which(name))), None)
    if builder is None:
        raise FailedPrecondition(f"libvirt: no ISO builder found ({', '.join(ISO_BUILDERS)})")
    source = run_dir / "cidata"
    source.mkdir(exist_ok=True)
    (source / "user-data").write_text(script)
    meta = {"instance-id": container_id, "local-hostname": container_id[:63]}
    (source / "meta-data").write_text(json.dumps(meta) + "\n")  # JSON is YAML
    files = [source / "user-data", source / "meta-data"]
    network = network_config(address)
    if network is not None:
        (source / "network-config").write_text(json.dumps(network) + "\n")
        files.append(source / "network-config")
    iso = run_dir / CONFIG_DRIVE_NAME
    await _run(
        builder, "-quiet", "-output", str(iso), "-volid", CONFIG_DRIVE_LABEL,
        "-joliet", "-rock", *map(str, files),
    )  # fmt: skip
    return iso
