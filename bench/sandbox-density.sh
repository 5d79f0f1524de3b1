#!/usr/bin/env bash
# Host memory per idle sandbox beyond the appliance, against the same program run bare
# in the same run (see bench/density/src/main.rs).
#
# Usage: bench/sandbox-density.sh [COUNT]   (root; needs cargo build --release)
set -euo pipefail
cd "$(dirname "$0")/.."
count=${1:-500}
bin=$PWD/target/x86_64-unknown-linux-musl/release
work=$(mktemp -d /tmp/juice-density.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/app"
cat >"$work/app/juice.toml" <<TOML
[appliance]
name = "idle"
version = "1"
[build]
binaries = [{ from = "$bin/juice-probe", to = "/usr/bin/probe" }]
[run]
command = ["/usr/bin/probe", "sleep", "3600"]
TOML
JUICE_HOME=$work/home "$bin/juice" build "$work/app" -q >/dev/null
JUICE_INIT=$bin/juice-init "$bin/juice-bench-density" "$work/home" idle:1 "$count"
