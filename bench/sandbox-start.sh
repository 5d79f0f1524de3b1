#!/usr/bin/env bash
# Sandbox start latency: spawn to exit of /usr/bin/true, side by side in one run with
#   - the floor: unshare --mount --pid --net --uts --ipc --fork chroot ROOTFS /usr/bin/true
#   - crun run and runc run on the same root filesystem, with the same namespaces
#     (mount, pid, net, uts, ipc, cgroup), a read-only root, the same mounts and limits.
# Juice is measured three ways so each cost has its own line: no cgroup and loopback only
# (like the floor), with a cgroup and limits (like crun/runc), and with bridge networking.
#
# The whole run happens in a private mount namespace with /sys/fs/cgroup/unified
# unmounted, because crun 1.8 refuses this machine's hybrid cgroup layout otherwise;
# every command sees the same environment.
#
# Usage: bench/sandbox-start.sh [RUNS]   (root; needs cargo build --release, hyperfine, crun, runc, jq)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-200}
if [ -z "${JUICE_BENCH_INNER:-}" ]; then
  for t in hyperfine crun runc jq; do command -v $t >/dev/null || apt-get install -y -qq $t >/dev/null; done
  exec unshare -m env JUICE_BENCH_INNER=1 bash -c 'umount /sys/fs/cgroup/unified 2>/dev/null || true; exec bash "$0" "$@"' "$0" "$@"
fi
juice=$PWD/target/x86_64-unknown-linux-musl/release/juice
work=$(mktemp -d /tmp/juice-bench.XXXXXX)
cleanup() { for id in bench-crun bench-runc; do crun delete -f $id >/dev/null 2>&1; runc delete -f $id >/dev/null 2>&1; done; rm -rf "$work"; }
trap cleanup EXIT
export JUICE_HOME=$work/home

mkdir -p "$work/app"
cat >"$work/app/juice.toml" <<TOML
[appliance]
name = "true"
version = "1"
[build]
binaries = ["/usr/bin/true"]
[run]
command = ["/usr/bin/true"]
[resources]
cpus = 1.0
memory = "64MiB"
pids = 64
TOML
$juice build "$work/app" -q >/dev/null
# Materialise the root once (a run does it) and find it.
$juice run -q --network none true:1
rootfs=$(ls -d "$JUICE_HOME"/rootfs/*)

# An OCI bundle on the same root, with Juice's mounts and limits.
mkdir -p "$work/bundle"
(cd "$work/bundle" && runc spec)
jq --arg root "$rootfs" '
  .root = {path: $root, readonly: true}
  | .process.terminal = false | .process.args = ["/usr/bin/true"]
  | .hostname = "bench"
  | .linux.namespaces = [{type:"pid"},{type:"network"},{type:"ipc"},{type:"uts"},{type:"mount"},{type:"cgroup"}]
  | .mounts = [
      {destination:"/proc", type:"proc", source:"proc"},
      {destination:"/dev", type:"tmpfs", source:"tmpfs", options:["nosuid","strictatime","mode=755","size=1m"]},
      {destination:"/dev/pts", type:"devpts", source:"devpts", options:["nosuid","noexec","newinstance","ptmxmode=0666","mode=0620"]},
      {destination:"/dev/shm", type:"tmpfs", source:"shm", options:["nosuid","noexec","nodev","mode=1777","size=65536k"]},
      {destination:"/sys", type:"sysfs", source:"sysfs", options:["nosuid","noexec","nodev","ro"]},
      {destination:"/tmp", type:"tmpfs", source:"tmpfs", options:["nosuid","nodev","mode=1777"]},
      {destination:"/run", type:"tmpfs", source:"tmpfs", options:["nosuid","nodev","mode=755"]}
    ]
  | .linux.resources = {memory: {limit: 67108864, swap: 67108864}, cpu: {quota: 100000, period: 100000}, pids: {limit: 64}}
' "$work/bundle/config.json" >"$work/bundle/config.json.new"
mv "$work/bundle/config.json.new" "$work/bundle/config.json"

hyperfine -N --warmup 10 --runs "$runs" --export-json "$work/r.json" \
  -n floor "unshare --mount --pid --net --uts --ipc --fork chroot $rootfs /usr/bin/true" \
  -n "juice (no cgroup, loopback)" "$juice run -q --network none --no-cgroup --name b1 true:1" \
  -n "juice (cgroup + limits, loopback)" "$juice run -q --network none --name b2 true:1" \
  -n "juice (cgroup + limits + bridge)" "$juice run -q --name b3 true:1" \
  -n "crun (cgroup + limits, loopback)" "crun --cgroup-manager=cgroupfs run --bundle $work/bundle bench-crun" \
  -n "runc (cgroup + limits, loopback)" "runc run --bundle $work/bundle bench-runc" >/dev/null

jq -r '
  (.results | map({key: .command, value: .median}) | from_entries) as $m
  | .results[]
  | [.command, (.median * 1000), (.mean * 1000), (.median / $m["floor"]), (.median / $m["crun (cgroup + limits, loopback)"])]
  | @tsv' "$work/r.json" \
  | awk -F'\t' 'BEGIN { printf "%-36s %10s %10s %9s %9s\n", "command", "median ms", "mean ms", "x floor", "x crun" }
                { printf "%-36s %10.2f %10.2f %9.2f %9.2f\n", $1, $2, $3, $4, $5 }'
echo "runs: $runs each; goal: juice median <= 1.5x floor and <= 0.5x crun"
