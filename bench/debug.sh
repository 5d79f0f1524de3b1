#!/usr/bin/env bash
# Debug session latency: `juice debug NAME -- true` against a running sandbox and a
# running microVM, through the daemon, from the command to its exit. Baselines in the
# same run: `nsenter` into the sandbox's namespaces running `true` (the floor of "a
# command beside the appliance": no toolbox root, no API, no policy), and `juice get
# instances` (one API round trip). For the microVM, the cost of carrying the toolbox
# disk from its boot: boot-to-healthy with and without the toolbox in the store.
#
# Usage: bench/debug.sh [RUNS]   (root; needs cargo build --release, busybox-static,
# strace, tcpdump for examples/toolbox; qemu and the cloud kernel for the microVM part)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
runs=${1:-20}

printf '[group.web]\nimage = "%s"\nsize = 1\n' "$PWD/examples/hello-web" >"$work/web.toml"
cp "$work/web.toml" "$work/both.toml"
printf '\n[group.vm]\nimage = "%s"\nsize = 1\nisolation = "microvm"\n' "$PWD/examples/hello-web" >>"$work/both.toml"
start_daemon
# Deletes the vm group too when the benchmark ends.
trap '"$juice" delete vm >/dev/null 2>&1 || true; stop_daemon' EXIT

healthy() { "$juice" get instances -o json | jq -e --arg g "$1" 'any(.[]; .group == $g and .health == "healthy")' >/dev/null; }
name_of() { "$juice" get instances -o json | jq -r --arg g "$1" '.[] | select(.group == $g) | .name'; }
# boot_vm: ms from applying the site with the vm group to its VM answering its health check.
boot_vm() {
  "$juice" apply -f "$work/web.toml" >/dev/null
  until [ -z "$(name_of vm)" ] && healthy web; do sleep 0.1; done
  local t0; t0=$(now_ms)
  "$juice" apply -f "$work/both.toml" >/dev/null
  until healthy vm; do sleep 0.05; done
  echo $(( $(now_ms) - t0 ))
}
# Each boot twice, the second warm (artefacts made): without a toolbox, then with one.
boot_vm >/dev/null; boot_plain=$(boot_vm)
"$juice" build examples/toolbox >/dev/null
boot_vm >/dev/null; boot_toolbox=$(boot_vm)

web=$(name_of web); vm=$(name_of vm)
pid=$("$juice" get instances -o json | jq -r '.[] | select(.group == "web") | .pid')
hyperfine -N --warmup 2 --runs "$runs" --export-json "$work/h.json" \
  -n "nsenter into the sandbox (floor)" "nsenter -t $pid -p -n -i -u true" \
  -n "juice get instances (one API call)" "$juice get instances" \
  -n "juice debug sandbox -- true" "$juice debug $web -- true" \
  -n "juice debug microvm -- true" "$juice debug $vm -- true" >/dev/null
jq -r '.results[] | "\(.command): median \(.median * 1000 | floor) ms, min \(.min * 1000 | floor) ms"' "$work/h.json"
floor=$(jq '.results[0].median' "$work/h.json")
api=$(jq '.results[1].median' "$work/h.json")
for i in 2 3; do
  jq -r --argjson f "$floor" --argjson a "$api" --argjson i "$i" \
    '.results[$i] | "\(.command): \(.median / $f * 10 | floor / 10)x nsenter, \(.median / $a * 10 | floor / 10)x an API call"' "$work/h.json"
done
echo "microVM apply to healthy (warm): ${boot_plain} ms without a toolbox disk, ${boot_toolbox} ms with one"
