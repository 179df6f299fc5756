//! **STAND-IN** Kubernetes packages for the end-to-end tests.
//!
//! Kubernetes binaries cannot be had on the machines the tests run on (no
//! network beyond the Debian mirror). So the Kubernetes tests install these
//! instead: small `.deb`s built with [`build_deb`] under the real names
//! (`kubeadm`, `kubelet`, `kubectl`) and the cluster's version, that run no
//! Kubernetes at all. They only
//!
//! - record every `kubeadm` call, one line each, in [`KUBEADM_CALLS_LOG`]
//!   (see [`parse_calls`]), and the file a call names with `--config`
//!   (its content and mode while kubeadm ran) in [`KUBEADM_CONFIGS_DIR`]
//!   (see [`recorded_config`]);
//! - leave the files the real `kubeadm` leaves, which Steward's tasks are
//!   guarded on: `init` writes `/etc/kubernetes/admin.conf` (and
//!   `kubelet.conf`), `join` writes `/etc/kubernetes/kubelet.conf` (and
//!   `admin.conf` with `--control-plane`);
//! - refuse what the real one refuses in ways a test can see: `init`
//!   without the coordinator's CA (`/etc/kubernetes/pki/ca.crt`, `ca.key`),
//!   `init` or `join` a second time (the files exist: kubeadm's
//!   `FileAvailable` preflight errors), missing endpoint, token, CA hash or
//!   (for control planes) certificate key, whether given as flags or in the
//!   `--config` file, and `--config` mixed with those flags;
//! - print, on success, what the real one prints, the join commands with
//!   the token and certificate key included, so a test sees whether that
//!   output leaks anywhere.
//!
//! `kubeadm upgrade ...` upgrades nothing; it records its own version and
//! the installed kubelet's in [`KUBEADM_UPGRADES_LOG`].
//!
//! `kubelet.service` runs `sleep infinity` under the name `kubelet`, and
//! records each start with its version in [`KUBELET_STARTS_LOG`];
//! `kubectl` records every call in [`KUBECTL_CALLS_LOG`], keeps what it
//! read for `-f -` in [`KUBECTL_STDIN_DIR`], applies nothing, answers
//! `get node NAME` with `True` (every node Ready, as a jsonpath on the
//! Ready condition prints it), and says on stderr that it is a stand-in.

use std::path::{Path, PathBuf};

use crate::nspawn::{build_deb, index_repo};

/// Where the stand-in `kubeadm` appends one line per call.
pub const KUBEADM_CALLS_LOG: &str = "/var/lib/kubeadm-standin/calls.log";

/// Where the stand-in keeps a copy of each `--config` file it was given:
/// `<n>.yaml` and `<n>.mode` (octal, as `stat -c %a` prints it), `<n>` the
/// call's index in [`KUBEADM_CALLS_LOG`] (from 0).
pub const KUBEADM_CONFIGS_DIR: &str = "/var/lib/kubeadm-standin/configs";

/// The stand-in `kubeadm` (POSIX sh: the machines have no other
/// interpreter). A line of the log: `<unix time, ns> <hostname> kubeadm
/// '<arg>' '<arg>' ...`, each argument single-quoted as for `sh`.
const KUBEADM: &str = r#"#!/bin/sh
# STAND-IN kubeadm, built by steward-tests: NOT Kubernetes. Records its
# arguments and fakes the files kubeadm leaves (see tests/src/standins.rs).
set -u
LOG=/var/lib/kubeadm-standin/calls.log
mkdir -p "${LOG%/*}"
quote() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }
line="$(date +%s.%N) $(cat /etc/hostname) kubeadm"
for a in "$@"; do line="$line $(quote "$a")"; done
index=$(cat "$LOG" 2>/dev/null | wc -l)
printf '%s\n' "$line" >> "$LOG"

die() { echo "error execution phase preflight (kubeadm STAND-IN): $*" >&2; exit 1; }
# The value of option $1 among the rest ("--opt value" or "--opt=value").
opt() {
  want=$1; shift
  while [ $# -gt 0 ]; do
    case "$1" in
      "$want") [ $# -ge 2 ] || return 1; printf '%s' "$2"; return 0 ;;
      "$want"=*) printf '%s' "${1#*=}"; return 0 ;;
    esac
    shift
  done
  return 1
}
has() { want=$1; shift; for a in "$@"; do [ "$a" = "$want" ] && return 0; done; return 1; }
# --config FILE: recorded as it is while kubeadm runs (content and mode);
# like the real kubeadm, no other settings flag may come with it.
cfg=""
if cfg=$(opt --config "$@"); then
  [ -r "$cfg" ] || die "unable to read config from \"$cfg\""
  mkdir -p /var/lib/kubeadm-standin/configs
  cp "$cfg" "/var/lib/kubeadm-standin/configs/$index.yaml"
  stat -c %a "$cfg" > "/var/lib/kubeadm-standin/configs/$index.mode"
  for f in --token --certificate-key --control-plane-endpoint --discovery-token-ca-cert-hash \
           --pod-network-cidr --service-cidr --node-name --control-plane; do
    has "$f" "$@" && die "can not mix '--config' with arguments [$f]"
  done
fi
# The first "KEY: value" of the config (a list item's too), quotes dropped.
cfgval() {
  [ -n "$cfg" ] || return 1
  v=$(sed -n "s/^[ -]*$1: *\"\{0,1\}\([^\"]*\)\"\{0,1\} *\$/\1/p" "$cfg" | head -n 1)
  [ -n "$v" ] && printf '%s' "$v"
}
kubeconfig() {
  mkdir -p /etc/kubernetes
  cat > "/etc/kubernetes/$1" <<EOF
# kubeconfig written by the kubeadm STAND-IN (steward-tests)
apiVersion: v1
kind: Config
clusters:
- name: kubernetes
  cluster:
    server: https://$2
users:
- name: $3
EOF
  chmod 600 "/etc/kubernetes/$1"
}
start_kubelet() { systemctl restart kubelet.service >/dev/null 2>&1 || true; }

case "${1:-}" in
init)
  shift
  if [ "${1:-}" = phase ]; then echo "[upload-certs] (STAND-IN) done"; exit 0; fi
  for f in /etc/kubernetes/pki/ca.crt /etc/kubernetes/pki/ca.key; do
    [ -s "$f" ] || die "$f is missing: the cluster CA was not provided"
  done
  for f in admin.conf kubelet.conf; do
    [ -e "/etc/kubernetes/$f" ] && die "[ERROR FileAvailable--etc-kubernetes-$f]: /etc/kubernetes/$f already exists"
  done
  endpoint=$(opt --control-plane-endpoint "$@" || cfgval controlPlaneEndpoint) || die "no --control-plane-endpoint"
  token=$(opt --token "$@" || cfgval token) || die "no --token"
  key=$(opt --certificate-key "$@" || cfgval certificateKey) || die "no --certificate-key"
  has --upload-certs "$@" || die "no --upload-certs"
  hash="sha256:<the CA hash; the STAND-IN does not compute it>"
  kubeconfig admin.conf "$endpoint" kubernetes-admin
  kubeconfig kubelet.conf "$endpoint" "system:node:$(cat /etc/hostname)"
  start_kubelet
  cat <<EOF
Your Kubernetes control-plane has initialized successfully! (kubeadm STAND-IN)

You can now join any number of control-plane nodes running the following command on each as root:

  kubeadm join $endpoint --token $token \
	--discovery-token-ca-cert-hash $hash \
	--control-plane --certificate-key $key

Then you can join any number of worker nodes by running the following on each as root:

kubeadm join $endpoint --token $token \
	--discovery-token-ca-cert-hash $hash
EOF
  ;;
join)
  shift
  endpoint=${1:-}
  [ -n "$cfg" ] && endpoint=$(cfgval apiServerEndpoint)
  case "$endpoint" in ""|-*) die "no API server endpoint (kubeadm join HOST:PORT ...)" ;; esac
  token=$(opt --token "$@" || cfgval token) || die "no --token"
  hash=$(opt --discovery-token-ca-cert-hash "$@" || { [ -n "$cfg" ] && grep -o 'sha256:[0-9a-f]*' "$cfg" | head -n 1; }) \
    || die "no --discovery-token-ca-cert-hash"
  case "$hash" in sha256:*) ;; *) die "bad CA hash $hash" ;; esac
  [ -e /etc/kubernetes/kubelet.conf ] && die "[ERROR FileAvailable--etc-kubernetes-kubelet.conf]: /etc/kubernetes/kubelet.conf already exists"
  if has --control-plane "$@" || { [ -n "$cfg" ] && grep -q '^controlPlane:' "$cfg"; }; then
    opt --certificate-key "$@" >/dev/null || cfgval certificateKey >/dev/null \
      || die "--control-plane without --certificate-key"
    kubeconfig admin.conf "$endpoint" kubernetes-admin
  fi
  kubeconfig kubelet.conf "$endpoint" "system:node:$(cat /etc/hostname)"
  start_kubelet
  echo "This node has joined the cluster (token $token; kubeadm STAND-IN)"
  ;;
token)
  case "${2:-}" in
    list) ;;
    create) case "${3:-}" in ""|-*) cfgval token; echo ;; *) echo "$3" ;; esac ;;
  esac
  ;;
version)
  echo 'kubeadm version: &version.Info{GitVersion:"v0.0.0-STAND-IN"}'
  ;;
upgrade)
  # Which packages were in place when it ran: kubeadm's own version (this
  # package's) and the kubelet's, as dpkg has them.
  kubelet=$(dpkg-query -W -f='${Version}' kubelet 2>/dev/null || echo none)
  printf '%s %s kubeadm=%s kubelet=%s %s\n' "$(date +%s.%N)" "$(cat /etc/hostname)" \
    "@VERSION@" "$kubelet" "${2:-}" >> /var/lib/kubeadm-standin/upgrades.log
  echo "[upgrade] (kubeadm STAND-IN) ${2:-}: nothing upgraded, no Kubernetes here"
  ;;
esac
exit 0
"#;

const KUBELET: &str = "#!/bin/sh\n\
# STAND-IN kubelet, built by steward-tests: NOT Kubernetes. Runs nothing.\n\
mkdir -p /var/lib/kubeadm-standin\n\
echo \"$(date +%s.%N) $(cat /etc/hostname) kubelet @VERSION@\" >> /var/lib/kubeadm-standin/kubelet-starts.log\n\
exec sleep infinity\n";

/// Where the stand-in `kubeadm upgrade ...` appends `<unix time> <host>
/// kubeadm=<its version> kubelet=<the installed kubelet's> <subcommand>`.
pub const KUBEADM_UPGRADES_LOG: &str = "/var/lib/kubeadm-standin/upgrades.log";
/// Where the stand-in kubelet appends `<unix time> <host> kubelet
/// <version>` each time it starts.
pub const KUBELET_STARTS_LOG: &str = "/var/lib/kubeadm-standin/kubelet-starts.log";

const KUBELET_UNIT: &str = "[Unit]\n\
Description=kubelet STAND-IN (steward-tests): sleeps, runs no pods\n\
\n\
[Service]\n\
ExecStart=/usr/bin/kubelet\n\
Restart=always\n\
RestartSec=2\n\
\n\
[Install]\n\
WantedBy=multi-user.target\n";

/// Where the stand-in `kubectl` appends one line per call (as
/// [`KUBEADM_CALLS_LOG`], with `kubectl` for `kubeadm`; [`parse_kubectl_calls`]).
pub const KUBECTL_CALLS_LOG: &str = "/var/lib/kubeadm-standin/kubectl-calls.log";
/// Where the stand-in `kubectl` keeps what it read for `-f -`: one file per
/// call, `<n>.yaml`, n counting from 1.
pub const KUBECTL_STDIN_DIR: &str = "/var/lib/kubeadm-standin/kubectl-stdin";

/// The stand-in `kubectl`: records its arguments and, for `-f -`, its
/// standard input; applies nothing.
const KUBECTL: &str = r#"#!/bin/sh
# STAND-IN kubectl, built by steward-tests: NOT Kubernetes. Records its
# arguments and what `-f -` reads (see tests/src/standins.rs).
set -u
LOG=/var/lib/kubeadm-standin/kubectl-calls.log
STDIN_DIR=/var/lib/kubeadm-standin/kubectl-stdin
mkdir -p "$STDIN_DIR"
quote() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }
line="$(date +%s.%N) $(cat /etc/hostname) kubectl"
for a in "$@"; do line="$line $(quote "$a")"; done
printf '%s
' "$line" >> "$LOG"
prev=""
for a in "$@"; do
  if [ "$prev" = "-f" ] && [ "$a" = "-" ]; then
    n=$(ls "$STDIN_DIR" | wc -l)
    cat > "$STDIN_DIR/$((n + 1)).yaml"
  fi
  prev=$a
done
echo 'kubectl STAND-IN (steward-tests): no Kubernetes here' >&2
# `get node NAME`: every node is Ready (what a jsonpath on the Ready
# condition's status prints).
case " $* " in *" get node "*) printf True ;; esac
exit 0
"#;

/// Builds the stand-in `kubeadm`, `kubelet` and `kubectl` at each of
/// `versions` into `dir` and indexes it as a flat repository (`deb
/// [trusted=yes] file:<where dir is bound> ./`). Returns the packages.
pub fn build_kubernetes_standins(dir: &Path, versions: &[&str]) -> Vec<PathBuf> {
    let mut debs = Vec::new();
    for version in versions {
        // A continuation line: the package's long description.
        let extra = format!(" STAND-IN {version}, NOT Kubernetes: steward-tests' recording fake\n");
        debs.push(build_deb(
            dir,
            "kubeadm",
            version,
            &[(
                "usr/bin/kubeadm",
                KUBEADM.replace("@VERSION@", version).as_bytes(),
                0o755,
            )],
            &extra,
        ));
        debs.push(build_deb(
            dir,
            "kubelet",
            version,
            &[
                (
                    "usr/bin/kubelet",
                    KUBELET.replace("@VERSION@", version).as_bytes(),
                    0o755,
                ),
                (
                    "lib/systemd/system/kubelet.service",
                    KUBELET_UNIT.as_bytes(),
                    0o644,
                ),
            ],
            &extra,
        ));
        debs.push(build_deb(
            dir,
            "kubectl",
            version,
            &[("usr/bin/kubectl", KUBECTL.as_bytes(), 0o755)],
            &extra,
        ));
    }
    index_repo(dir);
    debs
}

/// One recorded `kubeadm` call.
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    /// Unix time of the call, seconds (the machines share the host's clock).
    pub at: f64,
    /// The machine's hostname.
    pub host: String,
    /// kubeadm's arguments (without `kubeadm`).
    pub argv: Vec<String>,
}

impl Call {
    /// The value of `--name VALUE` or `--name=VALUE`.
    pub fn opt(&self, name: &str) -> Option<&str> {
        let mut it = self.argv.iter();
        while let Some(a) = it.next() {
            if a == name {
                return it.next().map(String::as_str);
            }
            if let Some(v) = a.strip_prefix(name).and_then(|r| r.strip_prefix('=')) {
                return Some(v);
            }
        }
        None
    }

    pub fn has(&self, flag: &str) -> bool {
        self.argv.iter().any(|a| a == flag)
    }

    /// `init` (not `init phase ...`).
    pub fn is_init(&self) -> bool {
        self.argv.first().map(String::as_str) == Some("init")
            && self.argv.get(1).map(String::as_str) != Some("phase")
    }

    pub fn is_join(&self) -> bool {
        self.argv.first().map(String::as_str) == Some("join")
    }

    /// The line as a shell would read it, with `secrets` replaced.
    pub fn redacted(&self, secrets: &[&str]) -> String {
        let mut line = format!(
            "{:.3} {} kubeadm {}",
            self.at,
            self.host,
            self.argv.join(" ")
        );
        for s in secrets.iter().filter(|s| !s.is_empty()) {
            line = line.replace(s, "<withheld>");
        }
        line
    }
}

/// The `--config` file call number `index` of a machine was given (see
/// [`KUBEADM_CONFIGS_DIR`]), as `(mode, content)`, read under the
/// machine's root directory `root`.
pub fn recorded_config(root: &Path, index: usize) -> Option<(u32, String)> {
    let dir = root.join(KUBEADM_CONFIGS_DIR.trim_start_matches('/'));
    let content = std::fs::read_to_string(dir.join(format!("{index}.yaml"))).ok()?;
    let mode = std::fs::read_to_string(dir.join(format!("{index}.mode"))).ok()?;
    Some((u32::from_str_radix(mode.trim(), 8).ok()?, content))
}

/// The first `key: value` in a kubeadm config (list items too), quotes
/// dropped: what the stand-in reads.
pub fn config_value<'a>(yaml: &'a str, key: &str) -> Option<&'a str> {
    yaml.lines().find_map(|l| {
        let l = l.trim_start_matches([' ', '-']);
        let v = l.strip_prefix(key)?.strip_prefix(':')?.trim();
        Some(v.trim_matches('"'))
    })
}

/// Parses [`KUBEADM_CALLS_LOG`]; `Err` names a line it cannot read.
pub fn parse_calls(text: &str) -> Result<Vec<Call>, String> {
    parse_program_calls(text, "kubeadm")
}

/// Parses [`KUBECTL_CALLS_LOG`] (`argv` without `kubectl`).
pub fn parse_kubectl_calls(text: &str) -> Result<Vec<Call>, String> {
    parse_program_calls(text, "kubectl")
}

fn parse_program_calls(text: &str, program: &str) -> Result<Vec<Call>, String> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let words = shell_words(line).ok_or_else(|| format!("unbalanced quotes: {line}"))?;
            match words.as_slice() {
                [at, host, name, argv @ ..] if name == program => Ok(Call {
                    at: at.parse().map_err(|_| format!("bad time in: {line}"))?,
                    host: host.clone(),
                    argv: argv.to_vec(),
                }),
                _ => Err(format!("not a call record: {line}")),
            }
        })
        .collect()
}

/// Splits a line as `sh` would for single quotes and backslashes (all the
/// stand-in writes); `None` if a quote is not closed.
fn shell_words(line: &str) -> Option<Vec<String>> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' => {
                if let Some(w) = word.take() {
                    words.push(w);
                }
            }
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next()? {
                        '\'' => break,
                        c => w.push(c),
                    }
                }
            }
            '\\' => word.get_or_insert_with(String::new).push(chars.next()?),
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    Some(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_lines_round_trip_through_shell_quoting() {
        let log = "1700000000.123456789 cp1 kubeadm 'init' '--token' 'ab.cd' 'it'\\''s' ''\n\
                   1700000001.5 w1 kubeadm 'join' '198.18.0.200:6443' '--x=y'\n";
        let calls = parse_calls(log).unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].host, "cp1");
        assert_eq!(calls[0].argv, ["init", "--token", "ab.cd", "it's", ""]);
        assert!(calls[0].is_init());
        assert_eq!(calls[0].opt("--token"), Some("ab.cd"));
        assert_eq!(calls[1].opt("--x"), Some("y"));
        assert!(calls[1].is_join());
        assert!(calls[1].at > calls[0].at);
        assert!(parse_calls("1 h kubeadm 'open").is_err());
    }
}
