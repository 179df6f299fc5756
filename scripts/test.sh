#!/usr/bin/env bash
# Runs Steward's whole test suite: unit tests, and end-to-end tests against a
# real etcd with real coordinator and agent processes.
#
#   scripts/test.sh          everything
#   scripts/test.sh --fast   unit tests only (no etcd, seconds)
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh

if [ "${1:-}" = "--fast" ]; then
  exec cargo test --workspace --locked --lib --bins
fi

echo "==> building binaries"
cargo build --workspace --bins --locked
echo "==> running all tests"
cargo test --workspace --locked
