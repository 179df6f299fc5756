#!/usr/bin/env bash
# Runs Steward's whole test suite: unit tests, and end-to-end tests against a
# real etcd with real coordinator and agent processes, and of the packages
# (built first with scripts/package.sh into target/packages).
#
#   scripts/test.sh          everything
#   scripts/test.sh --fast   unit tests only (no etcd, no packages, seconds)
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh

if [ "${1:-}" = "--fast" ]; then
  exec cargo test --workspace --locked --lib --bins
fi

echo "==> building binaries"
cargo build --workspace --bins --locked
echo "==> building the packages (tests/tests/packages.rs checks and installs them)"
scripts/package.sh
echo "==> running all tests"
cargo test --workspace --locked
