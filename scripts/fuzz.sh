#!/usr/bin/env bash
# Fuzzes what the `overlay` CNI plugin parses from its input (the CNI_* environment, the network
# config on stdin with prevResult and runtime config, the subnet file) with cargo-fuzz/libFuzzer:
# every input must get a CNI error JSON with a spec code or a valid result, and nothing may panic.
#
#   scripts/fuzz.sh [SECONDS]      (default 60)
#
# The fuzz crate (cni-plugin/fuzz) is a workspace of its own. cargo-fuzz passes nightly flags;
# RUSTC_BOOTSTRAP=1 lets the stable toolchain accept them. The corpus starts from the seeds in
# cni-plugin/fuzz/seeds and lives in a temp dir; a crashing input is kept under
# cni-plugin/fuzz/artifacts/ (and printed) for replay: `scripts/fuzz.sh` prints the command.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-60}
[[ $SECS =~ ^[0-9]+$ && $SECS -ge 1 ]] || { echo "SECONDS must be a positive number" >&2; exit 2; }
. scripts/lib/deps.sh
ensure_rust
ensure_deps # g++: libFuzzer is C++
ensure_cargo_fuzz
export RUSTC_BOOTSTRAP=1
corpus=$(mktemp -d /tmp/overlay-fuzz.XXXXXX)
trap 'rm -rf "$corpus"' EXIT
cp cni-plugin/fuzz/seeds/input/* "$corpus/"
echo "==> building the fuzz target (cni-plugin/fuzz, release + ASan)"
cargo fuzz build --fuzz-dir cni-plugin/fuzz input
echo "==> fuzzing for ${SECS}s"
log=$corpus.log
trap 'rm -rf "$corpus" "$log"' EXIT
status=0
cargo fuzz run --fuzz-dir cni-plugin/fuzz input "$corpus" -- \
  -max_total_time="$SECS" -rss_limit_mb=1024 -print_final_stats=1 >"$log" 2>&1 || status=$?
grep -E '^stat::number_of_executed_units|^Done ' "$log" || true
if ((status != 0)); then
  tail -50 "$log"
  echo "fuzz: FAILED (replay: RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir cni-plugin/fuzz input <artifact>)"
  exit 1
fi
echo "fuzz: clean"
