#!/usr/bin/env bash
# Installs everything containerizer needs on a Debian machine, idempotently: the Debian packages
# (compiler for the supervisor, busybox for test images, LXC for the benchmark's direct tool),
# the Python virtual environment at .venv with the package and its dev tools, the generated gRPC
# stubs, and the containerizer-supervisor binary. Run as root from anywhere.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

debian_packages=(
  gcc make libc6-dev            # builds containerizer-supervisor
  python3 python3-venv python3-dev
  util-linux iproute2 procps    # unshare, ip, ps: used by tests and benchmarks
  busybox-static                # the test image's userland
  lxc                           # lxc-execute, the benchmark's direct tool
  strace                        # tests destroy of a ptraced member
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
  .venv/bin/pip install -q -e '.[dev]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi

echo "==> generating gRPC stubs"
.venv/bin/python protos/build.py

echo "==> building containerizer-supervisor"
cc -O2 -Wall -Wextra -Werror -o .venv/bin/containerizer-supervisor \
  supervisor/containerizer-supervisor.c

echo "==> installed: $repo/.venv/bin/containerizer"
