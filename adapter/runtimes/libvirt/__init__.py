"""The libvirt runtime: commands in QEMU/KVM guests, and long-running disk-image guests."""
