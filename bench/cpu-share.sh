#!/usr/bin/env bash
# CPU share: two spinning threads in a sandbox declared `cpus = 0.5`, beside the
# same probe with the host ceiling lifted (`cpus = 2`), in one run. The quota
# itself is tested as the kernel holds it (crates/cli/tests/sandbox.rs); how
# much cpu the threads really get is a measurement, so it lives here.
#
# Usage: bench/cpu-share.sh [SECONDS]   (root; needs cargo build --release)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/appliance.sh
secs=${1:-5}
juice=$PWD/target/x86_64-unknown-linux-musl/release/juice
probe=$PWD/target/x86_64-unknown-linux-musl/release/juice-probe
work=$(mktemp -d /tmp/juice-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
export JUICE_HOME=$work/home
for cpus in 0.5 2; do
  appliance_toml "$work/app-$cpus" spin "$cpus" "$probe" /usr/bin/probe <<TOML
[run]
command = ["/usr/bin/probe"]
[resources]
cpus = $cpus
TOML
  "$juice" build -q "$work/app-$cpus" >/dev/null
done
printf '%-28s %s\n' "sandbox" "cores used by 2 spinning threads over ${secs} s"
for cpus in 2 0.5; do
  line=$("$juice" run -q "spin:$cpus" --network none -- spin "$secs" 2)
  printf '%-28s %s\n' "cpus = $cpus" "${line##*= }"
done
echo "goal: cpus = 0.5 gets about 0.5 cores; cpus = 2 is the baseline (what the machine gives)"
