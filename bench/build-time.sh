#!/usr/bin/env bash
# Build time of both examples, cold (empty $JUICE_HOME) and warm (unchanged
# inputs, so the build cache answers), against the time to read and sha256
# every byte that goes into the image, measured in the same run.
#
# Usage: bench/build-time.sh   (needs: nginx installed, cargo build --release, hyperfine)
set -euo pipefail
cd "$(dirname "$0")/.."
juice=$PWD/target/x86_64-unknown-linux-musl/release/juice
[ -x "$juice" ] || { echo "build first: cargo build --release" >&2; exit 1; }
command -v hyperfine >/dev/null || apt-get install -y -qq hyperfine >/dev/null
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export JUICE_HOME=$work/home

median() { jq '.results[0].median * 1000' "$1"; }
printf '%-10s %10s %10s %14s %14s\n' example "cold ms" "warm ms" "hash-inputs ms" "warm/hash"
for ex in hello-web nginx; do
  # The baseline hashes the files of the image (the same bytes the build reads).
  $juice build "examples/$ex" -t "$ex:bench" -q >/dev/null
  layer=$($juice inspect "$ex:bench" -o json | jq -r '.oci_manifest.layers[0].digest' | cut -d: -f2)
  mkdir -p "$work/root-$ex"
  tar -xzf "$JUICE_HOME/images/blobs/sha256/$layer" -C "$work/root-$ex"
  hyperfine -N --warmup 3 --runs 20 --export-json "$work/hash.json" \
    "sh -c 'find $work/root-$ex -type f -print0 | xargs -0 cat | sha256sum'" >/dev/null 2>&1
  hyperfine -N --runs 10 --prepare "rm -rf $JUICE_HOME" --export-json "$work/cold.json" \
    "$juice build examples/$ex -q" >/dev/null 2>&1
  $juice build "examples/$ex" -q >/dev/null
  hyperfine -N --warmup 3 --runs 20 --export-json "$work/warm.json" \
    "$juice build examples/$ex -q" >/dev/null 2>&1
  cold=$(median "$work/cold.json"); warm=$(median "$work/warm.json"); hash=$(median "$work/hash.json")
  printf '%-10s %10.1f %10.1f %14.1f %14.2f\n' "$ex" "$cold" "$warm" "$hash" "$(awk -v a="$warm" -v b="$hash" 'BEGIN{print a/b}')"
done
