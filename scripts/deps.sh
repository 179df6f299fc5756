#!/usr/bin/env bash
# Installs what building and testing Steward needs on Debian/Ubuntu:
# protoc (to compile the .proto files), for the packages (scripts/package.sh)
# strip and help2man, and for the tests a real etcd, HAProxy, keepalived,
# iproute2, nftables, debootstrap, systemd-nspawn, dpkg-dev, psmisc, openssl,
# lintian, rpm and Prometheus (promtool, and a server the alert test runs).
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
# The VIP tests run a real HAProxy on every test LB host; the failover
# benchmark compares against keepalived (VRRP).
command -v haproxy >/dev/null || need+=(haproxy)
command -v keepalived >/dev/null || need+=(keepalived)
# Test partitions filter traffic inside test namespaces with nftables.
command -v nft >/dev/null || need+=(nftables)
# Test hosts with systemd as PID 1 (tests/src/nspawn.rs): a base image made
# with debootstrap, booted with systemd-nspawn, and a local apt repository
# indexed with dpkg-scanpackages.
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v systemd-nspawn >/dev/null || need+=(systemd-container)
command -v dpkg-scanpackages >/dev/null || need+=(dpkg-dev)
# The convergence tests check dpkg's locks with fuser and the kubeadm CA
# hash with openssl, independently of the code under test.
command -v fuser >/dev/null || need+=(psmisc)
command -v openssl >/dev/null || need+=(openssl)
# scripts/package.sh ships stripped binaries with manual pages made from
# their --help; tests/tests/packages.rs checks the .debs with lintian and
# the .rpms with rpm (queries, an install into a scratch root).
command -v strip >/dev/null || need+=(binutils)
command -v help2man >/dev/null || need+=(help2man)
command -v lintian >/dev/null || need+=(lintian)
command -v rpm >/dev/null || need+=(rpm)
# tests/tests/completion.rs parses stewardctl's completion scripts in the
# real shells and completes names with bash and fish.
command -v zsh >/dev/null || need+=(zsh)
command -v fish >/dev/null || need+=(fish)
# The alert rules (packaging/prometheus/) are checked and unit-tested with
# promtool, and tests/tests/alerts.rs has a real Prometheus scrape both
# daemons; the package's own service stays off (policy-rc.d below).
command -v promtool >/dev/null || need+=(prometheus)

if [ ${#need[@]} -gt 0 ]; then
  echo "==> installing: ${need[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  # Packages such as haproxy and etcd-server start their system service on
  # install; the tests start their own instances and nothing else should
  # run. Without a policy in place, hold services off for this install only.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

if ! command -v cargo >/dev/null; then
  echo "cargo not found: install Rust first (https://rustup.rs), then re-run." >&2
  exit 1
fi
