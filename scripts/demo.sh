#!/usr/bin/env bash
# Shows Steward doing its job, live on this machine.
#
#   scripts/demo.sh                 the main job (root): two load balancers
#                                   booting real systemd (systemd-nspawn) converge
#                                   HAProxy and a floating IP (VIP) from one spec;
#                                   a client through the VIP every 10 ms while the
#                                   VIP holder's link is cut and the leader replica
#                                   is SIGKILLed; then the cluster stays up (how to
#                                   reach every host is printed) until Ctrl-C
#   scripts/demo.sh --exit          the same, then everything is removed; exits
#                                   non-zero unless the outage was under 2 s, the
#                                   VIP was never on two hosts and no request failed
#                                   on the leader kill (used by CI)
#   scripts/demo.sh --quick [--exit]
#                                   the control plane only, on loopback: etcd, three
#                                   replicas, three agents, a token join, roles, a
#                                   leader SIGKILL (no root needed)
#
# The main job runs tests/src/bin/steward-demo.rs on the test harness's hosts
# (addresses in 198.18.0.0/15, no default route; the hosts' image and local apt
# repository are built on first use into /var/cache/steward-tests). Only
# processes the demo started are stopped (by pid) when it exits, also on
# failure and Ctrl-C. DEMO_KEEP_DIR=1 keeps --quick's directory for a look.
set -euo pipefail
cd "$(dirname "$0")/.."
KEEP=1
QUICK=0
for arg in "$@"; do
  case "$arg" in
    --exit) KEEP=0 ;;
    --quick) QUICK=1 ;;
    *) echo "usage: scripts/demo.sh [--quick] [--exit]" >&2; exit 2 ;;
  esac
done

scripts/deps.sh
echo "==> building"
cargo build --workspace --bins --locked --quiet
BIN="$PWD/target/debug"
export PATH="$BIN:$PATH"

if [ "$QUICK" = 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "the main demo needs root (network namespaces, systemd-nspawn): sudo scripts/demo.sh" >&2
    echo "or, without root: scripts/demo.sh --quick" >&2
    exit 1
  fi
  ARGS=()
  [ "$KEEP" = 1 ] || ARGS+=(--exit)
  # Its own session: Ctrl-C reaches only this script, which asks the demo to
  # stop (SIGTERM); the demo then removes what it started and exits.
  setsid "$BIN/steward-demo" "${ARGS[@]}" &
  DEMO=$!
  trap 'kill -TERM "$DEMO" 2>/dev/null || true' INT TERM
  RC=0
  while :; do
    wait "$DEMO" && RC=0 || RC=$?
    kill -0 "$DEMO" 2>/dev/null || break
  done
  exit "$RC"
fi

DIR=$(mktemp -d /tmp/steward-demo.XXXXXX)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${DEMO_KEEP_DIR:-}" ] || rm -rf "$DIR"
}
trap cleanup EXIT INT TERM

# Bold on a terminal, plain when piped (CI logs).
if [ -t 1 ]; then
  step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
else
  step() { printf '\n==> %s\n' "$*"; }
fi
wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then echo "timed out waiting for $what" >&2; exit 1; fi
    sleep 0.2
  done
}
# The roles an agent recorded for itself: the top-level "roles" of its
# desired.json (pretty-printed; the cluster view inside lists every member's
# roles too, deeper), as "revision N: role,role".
recorded() { # recorded NODE
  local f="$DIR/state-$1/desired.json"
  [ -f "$f" ] || return 1
  local rev roles
  rev=$(sed -n 's/^    "revision": \([0-9]*\),$/\1/p' "$f")
  roles=$(sed -n '/^    "roles": \[/,/^    \]/p' "$f" | sed -n 's/^      "\(.*\)",\{0,1\}$/\1/p' | paste -sd, -)
  echo "revision $rev: ${roles:-none}"
}
USED_PORTS=" "
free_port() { # a random loopback port nobody listens on (nor was handed out here)
  local port
  while :; do
    port=$((20000 + RANDOM % 40000))
    case "$USED_PORTS" in *" $port "*) continue ;; esac
    ss -Htln "sport = :$port" | grep -q . || break
  done
  USED_PORTS+="$port "
  echo "$port"
}

step "certificates (stewardctl pki) in $DIR/pki"
stewardctl pki init "$DIR/pki" --cluster demo
stewardctl pki issue "$DIR/pki" admin --kind admin
for i in 1 2 3; do
  stewardctl pki issue "$DIR/pki" "coord-$i" --kind coordinator
  [ "$i" = 3 ] || stewardctl pki issue "$DIR/pki" "node-$i" --kind agent  # node-3 joins by token
done

step "etcd"
ETCD_PORT=$(free_port); PEER_PORT=$(free_port)
etcd --name demo --data-dir "$DIR/etcd" \
  --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls "http://127.0.0.1:$PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$PEER_PORT" \
  --initial-cluster "demo=http://127.0.0.1:$PEER_PORT" >"$DIR/etcd.log" 2>&1 &
PIDS+=($!)
wait_for 20 etcd etcdctl --endpoints "http://127.0.0.1:$ETCD_PORT" endpoint health

step "three coordinator replicas"
ENDPOINTS=()
declare -A COORD_PID
for i in 1 2 3; do
  port=$(free_port)
  join_port=$(free_port)
  cat >"$DIR/coord-$i.toml" <<TOML
id = "coord-$i"
cluster = "demo"
listen = "127.0.0.1:$port"
advertise = "https://127.0.0.1:$port"
[tls]
ca = "$DIR/pki/ca.crt"
cert = "$DIR/pki/coord-$i.crt"
key = "$DIR/pki/coord-$i.key"
[etcd]
endpoints = ["http://127.0.0.1:$ETCD_PORT"]
[secrets]
key_file = "$DIR/pki/secrets.key"
[pki]
ca_key = "$DIR/pki/ca.key"
bootstrap_listen = "127.0.0.1:$join_port"
[timing]
member_lease_ttl_s = 2
TOML
  steward-coordinator --config "$DIR/coord-$i.toml" >"$DIR/coord-$i.log" 2>&1 &
  PIDS+=($!); COORD_PID[coord-$i]=$!
  ENDPOINTS+=("https://127.0.0.1:$port")
done
export STEWARD_ENDPOINTS=$(IFS=,; echo "${ENDPOINTS[*]}")
export STEWARD_CA="$DIR/pki/ca.crt" STEWARD_CERT="$DIR/pki/admin.crt" STEWARD_KEY="$DIR/pki/admin.key"
wait_for 20 "a leader" sh -c 'stewardctl status -o json | grep -q "\"leader\":\"coord-"'
stewardctl status

step "three agents (node-3 joins with a token)"
COORDS=$(printf '"%s",' "${ENDPOINTS[@]}"); COORDS="[${COORDS%,}]"
for i in 1 2 3; do
  cat >"$DIR/node-$i.toml" <<TOML
node_id = "node-$i"
coordinators = $COORDS
state_dir = "$DIR/state-node-$i"
heartbeat_interval_ms = 500
# The demo's agents share this machine: they record and report their roles
# but must not install packages or rewrite its files.
[converge]
enabled = false
[tls]
ca = "$DIR/pki/ca.crt"
cert = "$DIR/pki/node-$i.crt"
key = "$DIR/pki/node-$i.key"
TOML
  if [ "$i" = 3 ]; then
    # As on a new machine: a token from the admin, then `steward-agent join`
    # (printed by `token create`), which gets node-3 its certificate and
    # sets node_id, coordinators and [tls] in its config.
    TOKEN_OUT=$(stewardctl token create --ttl 10m --description demo)
    echo "$TOKEN_OUT"
    JOIN=$(echo "$TOKEN_OUT" | sed -n 's/^  \(steward-agent join .*\)$/\1/p')
    echo "+ $JOIN --node-id node-3 --pki-dir $DIR/pki-node-3 --no-start"
    # shellcheck disable=SC2086 # the join command is words by design
    steward-agent --config "$DIR/node-$i.toml" ${JOIN#steward-agent } --node-id node-3 \
      --pki-dir "$DIR/pki-node-3" --no-start
    echo "+ the same token again is refused:"
    # shellcheck disable=SC2086
    if steward-agent --config "$DIR/node-x.toml" ${JOIN#steward-agent } --node-id node-x \
      --pki-dir "$DIR/pki-node-x" --no-start; then
      echo "a used token was accepted" >&2; exit 1
    fi
  fi
  steward-agent --config "$DIR/node-$i.toml" >"$DIR/node-$i.log" 2>&1 &
  PIDS+=($!)
done
wait_for 10 "three nodes" sh -c '[ "$(stewardctl nodes -o json | grep -o "\"health\":\"healthy\"" | wc -l)" -eq 3 ]'
stewardctl nodes

step "roles: stewardctl role add"
stewardctl role add node-1 lb k8s-control-plane
stewardctl role add node-2 lb k8s-worker
stewardctl role add node-3 gluster-brick k8s-worker
has_roles() { recorded "$1" | grep -q ": $2\$"; }
wait_for 5 "roles at node-1" has_roles node-1 lb,k8s-control-plane
echo "node-1 recorded $(recorded node-1)"
stewardctl nodes

step "failover: SIGKILL the leader"
LEADER=$(stewardctl status -o json | sed -n 's/.*"leader":"\([^"]*\)".*/\1/p')
echo "leader is $LEADER (pid ${COORD_PID[$LEADER]}); killing it"
kill -9 "${COORD_PID[$LEADER]}"
T0=$(date +%s%N)
wait_for 20 "a new leader" sh -c "stewardctl status -o json | grep -q '\"leader\":\"coord-' && ! stewardctl status -o json | grep -q '\"leader\":\"$LEADER\"'"
echo "new leader after $((($(date +%s%N) - T0) / 1000000)) ms"
wait_for 20 "agents on live replicas" sh -c "[ \"\$(stewardctl nodes -o json | grep -o '\"health\":\"healthy\"' | wc -l)\" -eq 3 ] && ! stewardctl nodes -o json | grep -q '\"replica\":\"$LEADER\"'"
stewardctl status
stewardctl nodes

step "a role change after the failover still arrives"
stewardctl role rm node-3 k8s-worker
wait_for 5 "change at node-3" has_roles node-3 gluster-brick
echo "node-3 recorded $(recorded node-3)"

step "events"
stewardctl events

if [ "$KEEP" = 1 ]; then
  step "the cluster is up; in another shell try:"
  echo "  export PATH=$BIN:\$PATH STEWARD_ENDPOINTS=$STEWARD_ENDPOINTS"
  echo "  export STEWARD_CA=$STEWARD_CA STEWARD_CERT=$STEWARD_CERT STEWARD_KEY=$STEWARD_KEY"
  echo "  stewardctl status; stewardctl nodes; stewardctl events --follow"
  echo "Logs: $DIR/*.log. Press Ctrl-C to stop and clean up."
  while true; do sleep 3600; done
fi
step "demo passed; cleaning up"
