#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests, and the tests against real etcd and real
# network namespaces. Installs what it needs (Debian). Run as root: namespace tests skip otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/deps.sh

ensure_rust
ensure_deps

if [[ $(id -u) != 0 ]]; then
  echo "NOTE: not root: tests that need network namespaces will skip (CI runs as root)" >&2
fi

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> cargo build (binaries the end-to-end tests run)"
cargo build --workspace --bins --locked
echo "==> cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
# --no-fail-fast: one failing test binary must not hide the results of the others.
cargo test --workspace --all-targets --locked --no-fail-fast -- "$@" 2>&1 | tee "$log" || status=$?
# The plugin as shipped (release, static) must link on a fresh machine and start.
echo "==> the overlay CNI plugin as shipped (release, static)"
. scripts/lib/build.sh
plugin=${CARGO_TARGET_DIR:-target}/release/overlay
if build_plugin_release && [[ $(CNI_COMMAND=VERSION "$plugin" </dev/null) == *supportedVersions* ]]; then
  echo "static release plugin: ok"
else
  echo "static release plugin: FAILED (build or start of $plugin)"
  status=1
fi
# The plugin's input parser under libFuzzer for a short while (scripts/fuzz.sh for longer runs).
echo "==> fuzz: the plugin's input parsing, ${OVERLAY_FUZZ_SECONDS:-45}s"
if ! bash scripts/fuzz.sh "${OVERLAY_FUZZ_SECONDS:-45}"; then
  status=1
fi
# Every manifest against the API schemas of each Kubernetes version EKS supports.
echo "==> manifests (kubernetes-validate --strict)"
scripts/validate-manifests.sh || status=1
# The node image (reusing the release build above), then the DaemonSet from it on three lab nodes.
if [[ $(id -u) == 0 ]]; then
  echo "==> node image (scripts/image.sh)"
  if scripts/image.sh; then
    echo "==> the DaemonSet run for real (tests/daemonset/run.sh)"
    tests/daemonset/run.sh 2>&1 | tee -a "$log" || status=1
  else
    echo "node image: FAILED (scripts/image.sh)" | tee -a "$log"
    status=1
  fi
else
  echo "NOTE: not root: the image build and the DaemonSet test skip" >&2
fi
# One closing line for the whole suite (cargo prints one per test binary, the last often "0 passed";
# the DaemonSet test prints "daemonset: N passed, N failed").
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) g += $i } }
     /^daemonset: [0-9]+ passed, [0-9]+ failed/ { p += $2; f += $4 }
     /^node image: FAILED/ { f += 1 }
     END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, g }' "$log"
exit "$status"
