#!/usr/bin/env bash
# Installs everything containerizer needs on a Debian machine, idempotently: the Debian packages
# (compiler for the supervisor, busybox for test images, LXC for the benchmark's direct tool),
# the Python virtual environment at .venv with the package and its dev tools, the generated gRPC
# stubs, and the containerizer-supervisor binary. Run as root from anywhere.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

debian_packages=(
  gcc make libc6-dev            # builds containerizer-supervisor (libc.a: its static twin)
  musl-tools                    # musl-gcc: the supervisor static on musl, a tenth of glibc's exec
  libseccomp2                   # compiles the seccomp filter the supervisor loads (ctypes)
  python3 python3-venv python3-dev
  util-linux iproute2 procps    # unshare, ip, ps: used by tests and benchmarks
  openssl                       # tests make the TCP listener's TLS certificates
  busybox-static                # the test image's userland, LXC's default rootfs
  strace                        # tests destroy of a ptraced member
  lxc                           # the lxc runtime
  containerd runc crun          # the containerd runtime
  docker.io                     # the docker runtime (Docker Engine)
  libvirt-daemon-system libvirt-daemon-driver-qemu qemu-system-x86  # the libvirt runtime
  libvirt-dev pkg-config        # to build libvirt-python
  qemu-utils genisoimage e2fsprogs  # libvirt disk mode: qcow2 overlays, cidata ISOs, test disks
  golang-github-containerd-containerd-dev golang-github-gogo-protobuf-dev  # its API's .proto files
  nftables                      # port mappings of the bridge network
  containernetworking-plugins   # network.backend = "cni": bridge, host-local, portmap, bandwidth...
  docker-registry               # the local registry images are pulled from in tests
  apache2-utils                 # htpasswd: the registry-auth tests' bcrypt password file
  xfsprogs                      # mkfs.xfs: the disk isolator's project-id tests on a loop-mounted XFS
)

missing=()
for package in "${debian_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
    || missing+=("$package")
done
if ((${#missing[@]})); then
  echo "==> installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# A Python >= 3.11: the one on PATH if new enough (Debian bookworm's is 3.11).
python=${PYTHON:-python3}
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "install.sh: $python is older than 3.11" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$python" -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -e "$stamp" ]; then
  echo "==> installing Python packages into .venv"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev,all]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi

echo "==> generating gRPC stubs"
.venv/bin/python protos/build.py

echo "==> building containerizer-supervisor"
# .venv/bin/containerizer-supervisor and its static twin, which the LXC runtime bind-mounts into
# image root filesystems as their pid 1, where the host's shared libraries are not. With musl-gcc
# both are one static musl build, else cc's (dynamic, and static); remade only when the source,
# the Makefile or the compiler changed (supervisor/Makefile). Beside them containerizer-du, the
# disk isolator's walker.
make -C supervisor --no-print-directory

# The libvirt runtime boots guests on Debian's cloud kernel; fetched, never installed.
deploy/vm-kernel.sh "${CONTAINERIZER_VM_KERNEL_DIR:-/var/lib/containerizer/libvirt/kernel}"

echo "==> installed: $repo/.venv/bin/containerizer"
