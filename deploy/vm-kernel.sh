#!/usr/bin/env bash
# Fetches the guest kernel for the libvirt runtime's direct kernel boot: Debian's
# linux-image-cloud-amd64 (virtio and serial built in, small), downloaded with `apt-get download`
# and unpacked with `dpkg-deb -x` — never installed, so the host's own kernel and boot loader are
# untouched. Idempotent: a kernel already in place for the current package version is kept.
#
#   deploy/vm-kernel.sh DIR  ->  DIR/vmlinuz (symlink to the versioned file), DIR/VERSION and
#                                DIR/modules/*.ko: the few modules the guest init loads (the ACPI
#                                power button and evdev, so an ACPI shutdown reaches the guest)
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

mkdir -p "$target"
if [ -f "$target/VERSION" ] && [ "$(cat "$target/VERSION")" = "$version" ] \
  && [ -s "$target/vmlinuz-$version" ] && [ -d "$target/modules" ]; then
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
for module in acpi/button.ko input/evdev.ko; do
  install -m 0644 "$modules/$module" "$target/modules.tmp/"
done
rm -rf "$target/modules" && mv "$target/modules.tmp" "$target/modules"
mv -f "$target/vmlinuz-$version.tmp" "$target/vmlinuz-$version"
ln -sfn "vmlinuz-$version" "$target/vmlinuz"
echo "$version" > "$target/VERSION.tmp" && mv -f "$target/VERSION.tmp" "$target/VERSION"
echo "==> guest kernel $version in $target"
