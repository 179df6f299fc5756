#!/usr/bin/env bash
# Installs what building and testing Steward needs on Debian/Ubuntu:
# protoc (to compile the .proto files) and a real etcd for the tests.
# Idempotent: does nothing when everything is present.
set -euo pipefail

need=()
command -v protoc >/dev/null || need+=(protobuf-compiler)
# etcd-client's build imports google/protobuf/*.proto, which protoc finds only
# with libprotobuf-dev (a recommendation, not a dependency, of protoc).
[ -f /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev)
command -v etcd >/dev/null || need+=(etcd-server)
command -v etcdctl >/dev/null || need+=(etcd-client)
command -v ip >/dev/null || need+=(iproute2)

if [ ${#need[@]} -gt 0 ]; then
  echo "==> installing: ${need[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

if ! command -v cargo >/dev/null; then
  echo "cargo not found: install Rust first (https://rustup.rs), then re-run." >&2
  exit 1
fi
