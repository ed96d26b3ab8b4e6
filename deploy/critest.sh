#!/usr/bin/env bash
# Kubernetes' CRI validation suite (critest, cri-tools v1.26.1) against our CRI endpoint:
# a local registry with the images critest pulls, a service with a private config, critest.
# The registry is the config's mirror of gcr.io and registry.k8s.io: critest's --registry-prefix
# drops the images' tags and then checks the unprefixed names, so no runtime passes with it.
#   deploy/critest.sh [critest arguments, e.g. --ginkgo.focus REGEX]
#   CRITEST_RUNTIMES=lxc deploy/critest.sh --runtime-handler lxc   (pods on another runtime)
#   CRITEST_RUNTIMES=containerd deploy/critest.sh --runtime-handler containerd
#     (with a private containerd: own root, state and socket under the run's directory, as the
#     tests start one, stopped with everything else at the end)
# Binaries: $CRITEST / $CRICTL, else ../shared/cri/bin; the image builder: $CRITEST_IMAGES,
# else ../shared/cri/critest-images. Everything this makes lives under one temporary
# directory and is stopped and removed at the end.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

critest=${CRITEST:-$repo/../shared/cri/bin/critest}
images=${CRITEST_IMAGES:-$repo/../shared/cri/critest-images}
for tool in "$critest" "$images"; do
  if [ ! -x "$tool" ]; then
    echo "critest.sh: $tool not found: set CRITEST and CRITEST_IMAGES (cri-tools v1.26.1)" >&2
    exit 2
  fi
done
command -v docker-registry >/dev/null \
  || { echo "critest.sh: docker-registry missing: apt-get install docker-registry" >&2; exit 2; }

work=$(mktemp -d /tmp/containerizer-critest.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  # What a private containerd left: its shims (by the pid each wrote in its state) and its
  # mounts under the run's directory.
  for shim in "$work"/containerd/state/io.containerd.runtime.v2.task/*/*/shim.pid; do
    [ -f "$shim" ] && kill -KILL "$(cat "$shim")" 2>/dev/null || true
  done
  grep -o " $work/[^ ]*" /proc/self/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

port=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
registry=127.0.0.1:$port
cat >"$work/registry.yml" <<EOF
version: 0.1
log: {level: warn}
storage: {filesystem: {rootdirectory: $work/registry}, delete: {enabled: true}}
http: {addr: $registry}
EOF
docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
pids+=($!)
.venv/bin/python - "$registry" <<'EOF'
import sys, time, urllib.request
for _ in range(200):
    try:
        urllib.request.urlopen(f"http://{sys.argv[1]}/v2/", timeout=1).close()
        break
    except OSError:
        time.sleep(0.05)
else:
    sys.exit(f"critest.sh: the registry on {sys.argv[1]} did not answer")
EOF
echo "==> pushing critest's images to $registry"
"$images" --registry "$registry" >"$work/images.log"

if [[ " ${CRITEST_RUNTIMES:-} " == *" containerd "* ]]; then
  for tool in containerd ctr containerd-shim-runc-v2 runc; do
    command -v "$tool" >/dev/null \
      || { echo "critest.sh: $tool missing: apt-get install containerd runc" >&2; exit 2; }
  done
  echo "==> a private containerd in $work/containerd"
  mkdir -p "$work/containerd"
  containerd config default | .venv/bin/python -c 'if True:
    import sys
    from pathlib import Path
    from tests.integration.containerd_daemon import private_config
    print(private_config(sys.stdin.read(), Path(sys.argv[1])))' "$work/containerd" \
    >"$work/containerd/config.toml"
  containerd --config "$work/containerd/config.toml" >"$work/containerd/containerd.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 300); do
    ctr --address "$work/containerd/containerd.sock" version >/dev/null 2>&1 && break
    sleep 0.1
  done
  ctr --address "$work/containerd/containerd.sock" version >/dev/null \
    || { cat "$work/containerd/containerd.log" >&2; exit 1; }
fi

socket=$work/containerizer.sock
cri_socket=$work/cri.sock
cat >"$work/config.toml" <<EOF
version = 1
state_dir = "$work/state"
socket = "$socket"
cri_socket = "$cri_socket"
cgroups_root = "critest-$$"
allow_privileged = true
[images.mirrors]
"gcr.io" = "$registry"
"registry.k8s.io" = "$registry"
[network]
bridge = "ctzcri$(( $$ % 10000 ))"
subnet = "10.$(( 100 + $$ % 100 )).0.0/16"
allow_privileged_ports = true
allow_host = true
EOF
# CRITEST_RUNTIMES="lxc ...": runtime tables to add (with native's, which runs the pods'
# holders), for critest's --runtime-handler NAME. A table another step wrote is kept.
for name in ${CRITEST_RUNTIMES:+native $CRITEST_RUNTIMES}; do
  grep -qx "\[runtimes\.$name\]" "$work/config.toml" && continue
  echo "[runtimes.$name]" >>"$work/config.toml"
  if [ "$name" = containerd ]; then  # the private one started above
    printf 'address = "%s"\nnamespace = "critest"\n' "$work/containerd/containerd.sock" \
      >>"$work/config.toml"
  fi
done
.venv/bin/containerizer serve --config "$work/config.toml" >"$work/service.log" 2>&1 &
service=$!
pids=("$service" "${pids[@]}")
for _ in $(seq 200); do [ -S "$cri_socket" ] && break; sleep 0.1; done
[ -S "$cri_socket" ] || { cat "$work/service.log" >&2; exit 1; }

skip=()
if [ "${CRITEST_SKIP_KNOWN:-0}" = 1 ]; then
  # Specs that cannot pass here, each with its reason (deploy/critest-known-failures.txt).
  known=$(sed -e '/^#/d' -e 's/ # .*//' deploy/critest-known-failures.txt | paste -sd '|')
  skip=(--ginkgo.skip "$known")
fi
echo "==> critest against unix://$cri_socket"
status=0
"$critest" --runtime-endpoint "unix://$cri_socket" --image-endpoint "unix://$cri_socket" \
  --ginkgo.no-color --ginkgo.succinct "${skip[@]}" "$@" || status=$?
if [ "$status" -ne 0 ] && [ -n "${CRITEST_SERVICE_LOG:-}" ]; then
  cp "$work/service.log" "$CRITEST_SERVICE_LOG"
fi
# Whatever critest left running is destroyed through our own API, then the service stops.
.venv/bin/python - "unix:$socket" <<'EOF'
import sys
import grpc
from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.api.containerizer.v1 import containerizer_pb2_grpc as pb_grpc
stub = pb_grpc.ContainerizerStub(grpc.insecure_channel(sys.argv[1]))
for status in stub.Containers(pb.ContainersRequest(), timeout=10).containers:
    try:
        stub.Destroy(pb.DestroyRequest(container_id=status.container_id), timeout=60)
    except grpc.RpcError as exc:
        print(f"critest.sh: destroy {status.container_id}: {exc.details()}", file=sys.stderr)
EOF
kill "$service"; wait "$service" 2>/dev/null || true
pids=("${pids[@]:1}")
find /sys/fs/cgroup -depth -type d -path "*/critest-$$*" -exec rmdir {} + 2>/dev/null || true
exit "$status"
