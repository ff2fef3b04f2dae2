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
cargo test --workspace --locked -- "$@"
