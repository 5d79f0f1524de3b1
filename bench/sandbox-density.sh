#!/usr/bin/env bash
# Host memory per idle sandbox beyond the appliance, against the same program run bare
# in the same run (see bench/density/src/main.rs).
#
# Usage: bench/sandbox-density.sh [COUNT]   (root; needs cargo build --release)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/appliance.sh
count=${1:-500}
bin=$PWD/target/x86_64-unknown-linux-musl/release
work=$(mktemp -d /tmp/juice-density.XXXXXX)
trap 'rm -rf "$work"' EXIT
appliance_toml "$work/app" idle 1 "$bin/juice-probe" /usr/bin/probe <<TOML
[run]
command = ["/usr/bin/probe", "sleep", "3600"]
TOML
JUICE_HOME=$work/home "$bin/juice" build "$work/app" -q >/dev/null
JUICE_INIT=$bin/juice-init "$bin/juice-bench-density" "$work/home" idle:1 "$count"
