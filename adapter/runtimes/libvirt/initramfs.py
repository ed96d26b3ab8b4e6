"""The guest's initramfs: busybox-static, a small init, the kernel modules it loads, and per
container a second archive with the command.

The base archive is built once per (busybox, init, modules) and cached by content hash; a launch
appends a tiny archive holding the command's argv, environment and working directory as one file
per value (the kernel unpacks concatenated newc archives in order). Values travel as file
contents, so no quoting is ever involved: any byte but NUL survives, newlines included.

The init runs the command with stdout on ttyS1 and stderr on ttyS2, writes `exit <code>` to
ttyS3 and powers the guest off. The host side of each serial port is a file written by QEMU, so
the exit status is durable without us: a guest that ends while the service is down still
leaves its status behind. An ACPI power-button press (our SIGTERM) becomes a SIGTERM to the
command through busybox acpid.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from adapter.core.errors import FailedPrecondition

FORMAT_VERSION = "2"  # bump when the layout below changes: invalidates cached archives
STDOUT_PORT, STDERR_PORT, STATUS_PORT = 1, 2, 3  # ttyS<n>; ttyS0 is the kernel console
GUEST_PATH = "/bin:/sbin:/usr/bin:/usr/sbin"
VIRTIO_MODULE_PREFIX = "virtio-"

# PID 1 in the guest. Runs under busybox ash; values are read from files, never interpolated.
# The kernel command line carries only what the driver built from validated values: `root=`
# (disk-image mode) and `ip=` (the address from our IPAM).
INIT_SCRIPT = r"""#!/bin/busybox sh
# containerizer guest init: run /ctz's command, report its status on ttyS3, power off.
# With root= on the kernel command line: mount that disk and hand over to its own /sbin/init.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /run /tmp

boot_disk() {
    tries=0
    while [ ! -b "$1" ] && [ "$tries" -lt 250 ]; do sleep 0.02; tries=$((tries + 1)); done
    mkdir -p /newroot
    if ! mount -o rw "$1" /newroot || [ ! -x /newroot/sbin/init ]; then
        echo "containerizer init: cannot boot $1 (no filesystem or no /sbin/init)" > /dev/console
        echo "exit 127" > /dev/ttyS3
        poweroff -f
    fi
    for fs in dev proc sys; do
        if [ -d "/newroot/$fs" ]; then mount --move "/$fs" "/newroot/$fs"; else umount "/$fs"; fi
    done
    exec switch_root /newroot /sbin/init
}
configure_network() {
    # ADDRESS::GATEWAY:NETMASK::DEVICE:off, the kernel's ip= syntax
    old_ifs=$IFS; IFS=:; set -- $1; IFS=$old_ifs
    ifconfig lo up
    ifconfig "$6" "$1" netmask "$4" up && route add default gw "$3"
}

for module in /lib/modules/*.ko; do [ -e "$module" ] && insmod "$module" 2>/dev/null; done
for port in /dev/ttyS1 /dev/ttyS2 /dev/ttyS3; do stty -F "$port" raw -echo 2>/dev/null; done
root= ip_config=
set -f
for arg in $(cat /proc/cmdline); do
    case $arg in root=*) root=${arg#root=} ;; ip=*) ip_config=${arg#ip=} ;; esac
done
set +f
[ -n "$root" ] && boot_disk "$root"
[ -n "$ip_config" ] && configure_network "$ip_config"

finish() {
    # Whatever the command left behind dies first, so the last writer of each port has
    # closed it (a tty's last close drains its buffer) before the status goes out.
    kill -KILL -1 2>/dev/null
    tries=0
    while [ "$tries" -lt 50 ] && [ -n "$(others)" ]; do sleep 0.02; tries=$((tries + 1)); done
    echo "exit $1" > /dev/ttyS3
    poweroff -f
}
others() {
    for dir in /proc/[0-9]*; do
        pid=${dir#/proc/}
        [ "$pid" = 1 ] || [ "$pid" = $$ ] || [ ! -s "$dir/cmdline" ] || { echo "$pid"; return; }
    done
}
value() { v=$(cat "$1"; echo .); v=${v%.}; }

set -- PATH=@GUEST_PATH@ HOME=/root MESOS_SANDBOX=/tmp
n=0
while [ -e "/ctz/env/$n" ]; do value "/ctz/env/$n"; set -- "$@" "$v"; n=$((n + 1)); done
set -- "$@" /bin/sh -c 'exec "$@"' workload
n=0
while [ -e "/ctz/argv/$n" ]; do value "/ctz/argv/$n"; set -- "$@" "$v"; n=$((n + 1)); done
if [ -e /ctz/cwd ]; then
    value /ctz/cwd
    mkdir -p "$v" && cd "$v" || { echo "cannot enter working directory" > /dev/ttyS2; finish 127; }
else
    cd /tmp
fi
acpid -c /etc/acpi -l /dev/null 2>/dev/null
env -i -- "$@" < /dev/null > /dev/ttyS1 2> /dev/ttyS2 &
echo $! > /run/workload.pid
wait $!
finish $?
""".replace("@GUEST_PATH@", GUEST_PATH)

# busybox acpid runs /etc/acpi/<ACTION>/<PARAMETER> on an event: the power button (PWRF).
POWER_BUTTON_SCRIPT = """#!/bin/sh
# ACPI shutdown request from the host (a SIGTERM to the container): pass it to the command.
[ -s /run/workload.pid ] && kill -TERM "$(cat /run/workload.pid)"
"""


class Archive:
    """A cpio "newc" archive built in memory: what the kernel's initramfs unpacker reads."""

    def __init__(self) -> None:
        self._data = bytearray()
        self._inode = 1

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        encoded = name.encode() + b"\0"
        fields = (
            self._inode, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0,
        )  # fmt: skip
        self._inode += 1
        self._data += b"070701" + b"".join(b"%08X" % value for value in fields)
        self._data += encoded
        self._pad()
        self._data += data
        self._pad()

    def _pad(self) -> None:
        self._data += b"\0" * (-len(self._data) % 4)

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return bytes(self._data)


@dataclass(frozen=True)
class GuestCommand:
    """What the guest runs: argv, the environment as NAME=value, the working directory."""

    argv: tuple[str, ...]
    environment: tuple[str, ...] = ()
    working_dir: str | None = None


def command_archive(command: GuestCommand) -> bytes:
    archive = Archive()
    archive.directory("ctz")
    for group, values in (("argv", command.argv), ("env", command.environment)):
        archive.directory(f"ctz/{group}")
        for index, value in enumerate(values):
            archive.file(f"ctz/{group}/{index}", value.encode())
    if command.working_dir:
        archive.file("ctz/cwd", command.working_dir.encode())
    return archive.finish()


def _base_archive(busybox: bytes, applets: Iterable[str], modules: dict[str, bytes]) -> bytes:
    archive = Archive()
    for directory in ("bin", "sbin", "dev", "proc", "sys", "tmp", "run", "root", "etc"):
        archive.directory(directory)
    archive.char_device("dev/console", 5, 1)  # the kernel opens it before devtmpfs is mounted
    archive.file("bin/busybox", busybox, 0o755)
    for applet in sorted(set(applets) - {"busybox"}):
        archive.symlink(f"bin/{applet}", "busybox")
    archive.file("init", INIT_SCRIPT.encode(), 0o755)
    for directory in ("etc/acpi", "etc/acpi/PWRF", "lib", "lib/modules"):
        archive.directory(directory)
    archive.file("etc/acpi/PWRF/00000080", POWER_BUTTON_SCRIPT.encode(), 0o755)
    for name, data in sorted(modules.items()):
        archive.file(f"lib/modules/{name}", data)
    return archive.finish()


async def _applets(busybox: Path) -> list[str]:
    process = await asyncio.create_subprocess_exec(
        str(busybox), "--list", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await process.communicate()
    if process.returncode != 0:
        raise FailedPrecondition(f"{busybox} --list failed: {err.decode(errors='replace')}")
    return out.decode().split()


def source_signature(busybox: Path, modules_dir: Path | None) -> tuple[object, ...] | None:
    """What tells the base archive's sources apart without reading them: device, inode, size,
    mtime and ctime of busybox and of every module file: a replaced or rewritten file changes
    it (as for make, a rewrite keeping the size within one timestamp tick would not). None if
    one cannot be read: base_initramfs then says why."""
    modules = sorted(modules_dir.glob("*.ko")) if modules_dir is not None else []
    signature = []
    for path in (busybox, *modules):
        try:
            found = path.stat()
        except OSError:
            return None
        identity = (found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns, found.st_ctime_ns)
        signature.append((str(path), *identity))
    return tuple(signature)


async def base_initramfs(
    cache_dir: Path, busybox: Path, modules_dir: Path | None, *, virtio: bool = False
) -> Path:
    """The cached base archive for this busybox and these modules, built if missing. The
    virtio modules (`virtio-*.ko`, see deploy/vm-kernel.sh) go in only with `virtio`: a guest
    without a disk image or a NIC boots faster without unpacking and loading them."""
    try:
        busybox_bytes = busybox.read_bytes()
        modules = (
            {
                p.name: p.read_bytes()
                for p in sorted(modules_dir.glob("*.ko"))
                if virtio or not p.name.startswith(VIRTIO_MODULE_PREFIX)
            }
            if modules_dir is not None and modules_dir.is_dir()
            else {}
        )
    except OSError as exc:
        raise FailedPrecondition(
            f"libvirt: cannot read the guest's busybox {busybox} (install busybox-static)"
            f" or modules: {exc}"
        ) from exc
    digest = hashlib.sha256(FORMAT_VERSION.encode() + INIT_SCRIPT.encode())
    digest.update(POWER_BUTTON_SCRIPT.encode() + busybox_bytes)
    for name, data in sorted(modules.items()):
        digest.update(name.encode() + hashlib.sha256(data).digest())
    kind = "virtio" if virtio else "base"
    target = cache_dir / f"{kind}-{digest.hexdigest()[:24]}.cpio"
    if target.is_file():
        return target
    archive = _base_archive(busybox_bytes, await _applets(busybox), modules)
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.tmp")
    partial.write_bytes(archive)
    partial.replace(target)  # atomic: a concurrent build of the same content is harmless
    for stale in cache_dir.glob(f"{kind}-*.cpio"):
        if stale != target:
            stale.unlink(missing_ok=True)
    return target


def write_container_initramfs(base: Path, command: GuestCommand, target: Path) -> None:
    """base + the command archive, as one file: the initrd of one container."""
    partial = target.with_suffix(".tmp")
    with base.open("rb") as source, partial.open("wb") as out:
        shutil.copyfileobj(source, out)
        out.write(command_archive(command))
    partial.replace(target)
