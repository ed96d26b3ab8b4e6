"""The libvirt driver's disk-image and network parts that need no daemon: config, image names,
user-data quoting, domain XML for disks and NICs, and how a guest's end becomes an Exit."""

from __future__ import annotations

import asyncio
import shlex
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapter.core.errors import ConfigError, FailedPrecondition, InvalidArgument
from adapter.core.model import Exit
from adapter.runtimes.libvirt import disk
from adapter.runtimes.libvirt.domain import BridgeInterface, Disk, domain_xml
from adapter.runtimes.libvirt.handle import GuestHandle
from adapter.runtimes.libvirt.options import LibvirtOptions
from adapter.runtimes.libvirt.state import Guest
from adapter.runtimes.registry import parse_options
from tests.unit.test_libvirt_parts import HOSTILE, _spec


def test_disk_images_come_from_the_config_as_absolute_paths(tmp_path: Path) -> None:
    def parse(table: dict[str, object]) -> LibvirtOptions:
        options = parse_options("libvirt", table, source="<config>", state_dir=tmp_path)
        assert isinstance(options, LibvirtOptions)
        return options

    options = parse({"disk_images": {"web": "/srv/web.qcow2"}})
    assert options.disk_images == {"web": Path("/srv/web.qcow2")}
    with pytest.raises(ConfigError, match=r"disk_images\.web: expected an absolute path"):
        parse({"disk_images": {"web": "web.qcow2"}})
    with pytest.raises(ConfigError, match="disk_images: expected a table"):
        parse({"disk_images": "/srv/web.qcow2"})


def test_an_image_reference_is_a_configured_name_never_a_path(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    base.write_bytes(b"")
    images = {"web": base, "gone": tmp_path / "missing.qcow2"}
    assert disk.resolve_image(images, "web") == base
    with pytest.raises(InvalidArgument) as raised:
        disk.resolve_image(images, str(base))
    assert raised.value.field == "container.image" and "'gone', 'web'" in str(raised.value)
    with pytest.raises(FailedPrecondition, match="does not exist"):
        disk.resolve_image(images, "gone")


def test_user_data_keeps_every_value_a_single_word() -> None:
    argv = ["printf", "%s|", HOSTILE, "a=b", ""]
    environment = (("HOSTILE", HOSTILE), ("EMPTY", ""))
    script = disk.user_data(argv, environment, f"/tmp/{HOSTILE}")
    assert script.startswith("#!/bin/sh\n")
    command_line = script[script.index("\nexec env ") + 1 :]  # values may hold newlines
    assert shlex.split(command_line) == [
        "exec", "env", f"HOSTILE={HOSTILE}", "EMPTY=",
        "/bin/sh", "-c", 'exec "$@"', "workload", *argv,
    ]  # fmt: skip
    ran = subprocess.run(["/bin/sh", "-c", command_line], capture_output=True, text=True)
    assert ran.stdout == f"{HOSTILE}|a=b||"
    cwd_line = script[script.index("\nmkdir ") + 1 : script.index("\nexec env ")]
    assert shlex.split(cwd_line)[2] == f"/tmp/{HOSTILE}"


def test_network_config_is_cloud_init_v1_static() -> None:
    address = disk.GuestAddress("10.9.0.5", 24, "10.9.0.1")
    assert address.netmask == "255.255.255.0"
    assert disk.network_config(address) == {
        "version": 1,
        "config": [
            {
                "type": "physical",
                "name": "eth0",
                "subnets": [{"type": "static", "address": "10.9.0.5/24", "gateway": "10.9.0.1"}],
            }
        ],
    }
    assert disk.network_config(None) is None


def test_domain_xml_attaches_disks_in_order_and_the_nic_on_our_bridge() -> None:
    spec = _spec()
    spec = type(spec)(
        **{
            **spec.__dict__,
            "disks": (Disk("/run/ctz/disk.qcow2", "qcow2"), Disk("/run/ctz/c.iso", "raw", True)),
            "interface": BridgeInterface(bridge="ctz0", tap="vz0123456789ab"),
        }
    )
    devices = ET.fromstring(domain_xml(spec)).find("devices")
    assert devices is not None
    disks = devices.findall("disk")
    assert [d.find("target").get("dev") for d in disks] == ["vda", "vdb"]  # type: ignore[union-attr]
    assert [d.find("driver").get("type") for d in disks] == ["qcow2", "raw"]  # type: ignore[union-attr]
    assert [d.find("readonly") is not None for d in disks] == [False, True]
    (nic,) = devices.findall("interface")
    assert nic.get("type") == "bridge"
    assert nic.find("source").get("bridge") == "ctz0"  # type: ignore[union-attr]
    assert nic.find("target").get("dev") == "vz0123456789ab"  # type: ignore[union-attr]
    assert nic.find("model").get("type") == "virtio"  # type: ignore[union-attr]
    bad = type(spec)(**{**spec.__dict__, "disks": (Disk("/run/a\x01b", "qcow2"),)})
    with pytest.raises(InvalidArgument, match="disk 0"):
        domain_xml(bad)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _guest(loop: asyncio.AbstractEventLoop, tmp_path: Path, disk_image: str) -> Guest:
    handle = GuestHandle(
        domain_name="containerizer-g",
        domain_uuid="u",
        run_dir=str(tmp_path),
        status_path=str(tmp_path / "ttyS3"),
        console_path=str(tmp_path / "console"),
        virt_type="qemu",
        disk_image=disk_image,
    )
    return Guest(handle, loop.create_future(), 64, 1)


def test_a_disk_guest_that_powers_off_by_itself_exits_0(
    loop: asyncio.AbstractEventLoop, tmp_path: Path
) -> None:
    guest = _guest(loop, tmp_path, "web")
    guest.powered_off = True
    assert guest.exit_now("stopped") == Exit(exit_code=0)
    (tmp_path / "ttyS3").write_text("exit 4\n")  # a guest that knows our status port wins
    assert guest.exit_now("stopped") == Exit(exit_code=4)


def test_without_a_status_a_stop_is_a_kill_or_a_loss(
    loop: asyncio.AbstractEventLoop, tmp_path: Path
) -> None:
    command_guest = _guest(loop, tmp_path, "")
    command_guest.powered_off = True  # the init always reports; powering off without is odd
    assert command_guest.exit_now("stopped").lost
    disk_guest = _guest(loop, tmp_path, "web")
    assert disk_guest.exit_now("stopped").lost  # stopped while nobody listened: unknown
    disk_guest.kill_signal = 15
    disk_guest.powered_off = True
    assert disk_guest.exit_now("stopped") == Exit(signal=15)


def test_handles_checkpointed_before_disk_mode_still_load(
    loop: asyncio.AbstractEventLoop, tmp_path: Path
) -> None:
    data = _guest(loop, tmp_path, "web").handle.to_json()
    assert GuestHandle.from_json(data).disk_image == "web"
    del data["disk_image"]
    assert GuestHandle.from_json(data).disk_image == ""
