#!/usr/bin/env bash
# Builds Steward's packages into one folder: .deb (cargo-deb) and .rpm
# (cargo-generate-rpm) of
#
#   steward-agent        the node agent: binary, systemd unit, /etc/steward/agent.toml
#   steward-coordinator  a coordinator replica: binary, systemd unit (runs as the
#                        `steward` system user), /etc/steward/coordinator.toml
#   stewardctl           the operators' CLI, for workstations: binary, example cluster spec
#
# Run `scripts/package.sh --help` for usage. Each package is one crate's: the
# metadata lives in agent/Cargo.toml, coordinator/Cargo.toml and
# coordinator/ctl/Cargo.toml ([package.metadata.deb] and
# [package.metadata.generate-rpm]); units, scripts and lintian overrides in
# packaging/.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/package.sh [OUT_DIR]

Builds the three binaries once (cargo build --release), strips copies of
them, and packages them into OUT_DIR (default: target/packages):

  steward-agent_VERSION_ARCH.deb         steward-agent-VERSION.ARCH.rpm
  steward-coordinator_VERSION_ARCH.deb   steward-coordinator-VERSION.ARCH.rpm
  stewardctl_VERSION_ARCH.deb            stewardctl-VERSION.ARCH.rpm

Older Steward packages in OUT_DIR are removed first; nothing else there is
touched. Installs cargo-deb and cargo-generate-rpm (cargo install --locked)
when missing. The version is the workspace's (Cargo.toml), revision 1.

Try them:
  dpkg-deb -c OUT_DIR/steward-agent_*.deb      what a .deb holds
  rpm -qp --list --scripts OUT_DIR/steward-agent-*.rpm
  lintian OUT_DIR/*.deb                          (tests/tests/packages.rs runs it)
  dpkg -i OUT_DIR/steward-agent_*.deb            on a node; see README.md, "Packages"
EOF
}

case "${1:-}" in
  -h | --help) usage; exit 0 ;;
  -*) echo "package.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
esac
if [ $# -gt 1 ]; then
  echo "package.sh: at most one argument (OUT_DIR)" >&2
  usage >&2
  exit 2
fi

# OUT_DIR is relative to where we were called from; the default to the
# repository.
OUT=${1:-}
[ -z "$OUT" ] || OUT=$(realpath -m -- "$OUT")
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/target/packages}
TARGET=${CARGO_TARGET_DIR:-$PWD/target}

# Known-good versions of the packaging tools.
CARGO_DEB_VERSION=3.8.0
CARGO_GENERATE_RPM_VERSION=0.21.1
for tool in "cargo-deb $CARGO_DEB_VERSION" "cargo-generate-rpm $CARGO_GENERATE_RPM_VERSION"; do
  set -- $tool
  if ! command -v "$1" >/dev/null; then
    echo "==> installing $1 $2 (cargo install --locked)"
    cargo install --locked "$1" --version "$2"
  fi
done
for tool in dpkg-deb strip help2man; do
  command -v "$tool" >/dev/null || {
    echo "package.sh: $tool not found: run scripts/deps.sh" >&2
    exit 1
  }
done

echo "==> building steward-agent, steward-coordinator, stewardctl (release)"
cargo build --release --locked -p steward-agent -p steward-coordinator -p stewardctl --bins

# The release profile keeps line tables (readable backtraces for the
# benchmarks); the packages ship stripped copies, and manual pages made from
# their --help. The metadata's assets name target/release/package-bin/,
# which both tools map to the real target dir.
BIN="$TARGET/release/package-bin"
mkdir -p "$BIN"
for b in steward-agent steward-coordinator stewardctl; do
  strip --strip-all --remove-section=.comment -o "$BIN/$b.tmp" "$TARGET/release/$b"
  mv "$BIN/$b.tmp" "$BIN/$b"
done
manpage() { # manpage BINARY SECTION "name line"
  help2man --no-info --section "$2" --name "$3" --output "$BIN/$1.$2" "$BIN/$1"
  gzip -9nf "$BIN/$1.$2"
}
manpage steward-agent 8 "Steward node agent"
manpage steward-coordinator 8 "Steward coordinator replica"
manpage stewardctl 1 "operate a Steward cluster"
# stewardctl's shell completions, made by stewardctl itself.
"$BIN/stewardctl" completion bash > "$BIN/stewardctl.bash"
"$BIN/stewardctl" completion zsh > "$BIN/_stewardctl"
"$BIN/stewardctl" completion fish > "$BIN/stewardctl.fish"

mkdir -p "$OUT"
rm -f "$OUT"/steward-agent_*.deb "$OUT"/steward-coordinator_*.deb "$OUT"/stewardctl_*.deb \
  "$OUT"/steward-agent-*.rpm "$OUT"/steward-coordinator-*.rpm "$OUT"/stewardctl-*.rpm

echo "==> .deb (cargo deb --no-build)"
# One crate, one package: the .deb's synopsis is the crate's description.
for crate in steward-agent steward-coordinator stewardctl; do
  cargo deb --no-build --quiet -p "$crate" -o "$OUT/"
done

echo "==> .rpm (cargo generate-rpm)"
for dir in agent coordinator coordinator/ctl; do
  cargo generate-rpm -p "$dir" -o "$OUT/"
done

echo "==> packages in $OUT"
for f in "$OUT"/steward-agent_*.deb "$OUT"/steward-coordinator_*.deb "$OUT"/stewardctl_*.deb; do
  printf '%-55s %s\n' "$(basename "$f")" "$(dpkg-deb -f "$f" Description | head -1)"
done
for f in "$OUT"/steward-agent-*.rpm "$OUT"/steward-coordinator-*.rpm "$OUT"/stewardctl-*.rpm; do
  printf '%-55s %s bytes\n' "$(basename "$f")" "$(stat -c %s "$f")"
done
