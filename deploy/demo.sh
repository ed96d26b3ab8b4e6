#!/usr/bin/env bash
# The main job end to end on the native runtime: start the service with a private state
# directory and socket, run a workload under cpu and memory limits, show its usage and its
# termination, make the node's own busybox image and run in it, stop the service. Leaves nothing
# behind.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
ctz="$repo/.venv/bin/containerizer"
work=$(mktemp -d /tmp/containerizer-demo.XXXXXX)
cat > "$work/containerizer.toml" <<TOML
version = 1
state_dir = "$work/state"
socket = "$work/containerizer.sock"
cgroups_root = "containerizer-demo"
cgroups_enable_cfs = true
TOML
export CONTAINERIZER_ENDPOINT="unix:$work/containerizer.sock"

"$ctz" serve --config "$work/containerizer.toml" 2> "$work/service.log" &
service=$!
cleanup() {
  "$ctz" destroy demo >/dev/null 2>&1 || true
  kill -TERM "$service" 2>/dev/null || true
  wait "$service" 2>/dev/null || true
  # The service leaves its (empty) cgroup root in every hierarchy: remove it, deepest first.
  for root in /sys/fs/cgroup/containerizer-demo /sys/fs/cgroup/*/containerizer-demo; do
    if [ -d "$root" ]; then find "$root" -depth -type d -exec rmdir {} \; 2>/dev/null || true; fi
  done
  rm -rf "$work"
}
trap cleanup EXIT
for _ in $(seq 100); do [ -S "$work/containerizer.sock" ] && break; sleep 0.05; done

echo "## runtimes"
"$ctz" runtimes
echo
echo "## launch: a busy loop that also holds 100 MiB, with cpus=0.5 and mem=256M"
"$ctz" run --detach --id demo --cpus 0.5 --mem 256M --pids 64 -- \
  sh -c 'held=$(head -c 100m /dev/zero | tr "\\0" x); while :; do :; done'
sleep 2
echo
echo "## usage after 2 s (CFS holds it near 0.5 cpu)"
"$ctz" usage demo
echo
echo "## ps"
"$ctz" ps
echo
echo "## destroy, then the termination"
"$ctz" destroy demo
echo
echo "## a workload that exits on its own: its output and exit code"
set +e
"$ctz" run --cpus 1 --mem 64M -- sh -c 'echo "hello from $(hostname), pid $$"; exit 3'
echo "exit code: $?"
set -e
echo
echo "## an image made on this node from busybox-static (no download), and a container in it"
"$ctz" images import --busybox
"$ctz" run --image localhost/busybox:latest --user nobody -- \
  sh -c 'echo "running as $(id -un), with $(ls /bin | wc -l) commands in /bin"'
