#!/usr/bin/env bash
# Fetches the guest kernel for the libvirt runtime's direct kernel boot: Debian's
# linux-image-cloud-amd64 (virtio and serial built in, small), downloaded with `apt-get download`
# and unpacked with `dpkg-deb -x` — never installed, so the host's own kernel and boot loader are
# untouched. Idempotent: a kernel already in place for the current package version is kept.
#
#   deploy/vm-kernel.sh DIR  ->  DIR/vmlinuz (symlink to the versioned file), DIR/VERSION and
#                                DIR/modules/*.ko: the few modules the guest init loads, named
#                                GROUP-N-NAME.ko so a glob lists them in dependency order:
#                                acpi-*   the power button and evdev (an ACPI shutdown reaches the
#                                         guest); always loaded
#                                virtio-* virtio PCI, block and net, and the ISO 9660 reader for
#                                         the config drive; loaded only when the guest has a virtio
#                                         device (a network interface or a disk image)
#                                DIR/modules/ORDER lists them; a different list means a re-fetch.
set -euo pipefail

target=${1:?usage: vm-kernel.sh DIRECTORY}
meta_package=linux-image-cloud-amd64

# The meta package only depends on the versioned image package; resolve it.
image_package=$(apt-cache depends "$meta_package" 2>/dev/null \
  | awk '/Depends: linux-image-/ {print $2; exit}')
if [ -z "$image_package" ]; then
  apt-get update -q
  image_package=$(apt-cache depends "$meta_package" | awk '/Depends: linux-image-/ {print $2; exit}')
fi
[ -n "$image_package" ] || { echo "vm-kernel.sh: cannot resolve $meta_package" >&2; exit 1; }
version=${image_package#linux-image-}
# In load order: every module after the ones it depends on (their `depends=` modinfo).
modules_wanted="acpi-1-button:acpi/button.ko acpi-2-evdev:input/evdev.ko
virtio-01-virtio_ring:virtio/virtio_ring.ko virtio-02-virtio:virtio/virtio.ko
virtio-03-virtio_pci_modern_dev:virtio/virtio_pci_modern_dev.ko
virtio-04-virtio_pci_legacy_dev:virtio/virtio_pci_legacy_dev.ko
virtio-05-virtio_pci:virtio/virtio_pci.ko virtio-06-virtio_blk:block/virtio_blk.ko
virtio-07-failover:../net/core/failover.ko virtio-08-net_failover:net/net_failover.ko
virtio-09-virtio_net:net/virtio_net.ko virtio-10-cdrom:cdrom/cdrom.ko
virtio-11-isofs:../fs/isofs/isofs.ko"

mkdir -p "$target"
if [ -f "$target/VERSION" ] && [ "$(cat "$target/VERSION")" = "$version" ] \
  && [ -s "$target/vmlinuz-$version" ] \
  && [ "$(cat "$target/modules/ORDER" 2>/dev/null)" = "$modules_wanted" ]; then
  echo "==> guest kernel $version already in $target"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chmod 0755 "$work"  # apt-get download drops to the _apt user
echo "==> downloading $image_package"
(cd "$work" && apt-get download -q "$image_package")
dpkg-deb -x "$work"/"$image_package"_*.deb "$work/root"
install -m 0644 "$work/root/boot/vmlinuz-$version" "$target/vmlinuz-$version.tmp"
if [ -f "$work/root/boot/config-$version" ]; then
  install -m 0644 "$work/root/boot/config-$version" "$target/config-$version"
fi
modules="$work/root/lib/modules/$version/kernel/drivers"
rm -rf "$target/modules.tmp" && mkdir "$target/modules.tmp"
for entry in $modules_wanted; do
  install -m 0644 "$modules/${entry#*:}" "$target/modules.tmp/${entry%%:*}.ko"
done
echo "$modules_wanted" > "$target/modules.tmp/ORDER"
rm -rf "$target/modules" && mv "$target/modules.tmp" "$target/modules"
mv -f "$target/vmlinuz-$version.tmp" "$target/vmlinuz-$version"
ln -sfn "vmlinuz-$version" "$target/vmlinuz"
echo "$version" > "$target/VERSION.tmp" && mv -f "$target/VERSION.tmp" "$target/VERSION"
echo "==> guest kernel $version in $target"
