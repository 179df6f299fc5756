//! The Kubernetes roles and the coordinator's kubeadm orchestration end to
//! end, on nspawn machines booting systemd, with **STAND-IN KUBERNETES
//! PACKAGES**.
//!
//! ```text
//!   !!! No Kubernetes runs in this test. !!!
//!   kubeadm, kubelet and kubectl cannot be had on this machine, so the
//!   packages the agent installs under those names are stand-ins built by
//!   the test (steward_tests::standins): `kubeadm` records every call in
//!   /var/lib/kubeadm-standin/calls.log and leaves the files the real one
//!   leaves (admin.conf, kubelet.conf); `kubelet.service` runs `sleep`.
//!   What is real: the agent, coordinators and etcd; apt-get installing,
//!   pinning and holding the packages from the repository the cluster spec
//!   names; containerd (Debian's package) and its config; HAProxy; the CA,
//!   token, certificate key and CA hash the coordinator makes and ships.
//! ```
//!
//! Topology: cp1, cp2 (k8s-control-plane) and w1 (k8s-worker and lb, so a
//! VIP has a candidate and HAProxy renders the API frontend) as nspawn
//! machines with `steward-agent.service`; the VIP `api` is the Kubernetes
//! endpoint (`VIP:6443`). The stand-in repository is known to apt only
//! through the spec's `[kubernetes.repository]` (the agent's repository
//! resource, no key): a local file mirror (`file:/srv/kubernetes-standin`,
//! bound into every machine). It also holds a newer version (1.31.3-1.1) than the spec's, so the pin
//! matters.
//!
//! Checks: `kubeadm init` ran exactly once in the cluster, on a control
//! plane, with `--config F --upload-certs` and F (0600 while kubeadm ran,
//! gone after) saying `controlPlaneEndpoint: VIP:6443`, token T and
//! certificate key K; cp2 joined as a control plane with the same T, K
//! and the CA hash H in its join config, after the init node's join record;
//! w1 joined as a worker with T and H only; no kubeadm command line carries
//! T or K; H is the SHA-256 of the SubjectPublicKeyInfo
//! of the init node's `/etc/kubernetes/pki/ca.crt`, computed here with
//! openssl; T and K appear in no `stewardctl` output, event, etcd value or
//! log; `desired.json` is 0600; the packages are held at the spec's
//! version; containerd runs with the systemd cgroup driver; kernel-wide
//! items are not applicable in the container (with the reason) unless
//! they already hold there (no swap; the `net.bridge.*` sysctls, which this
//! kernel keeps per network namespace: checked in the machine), never
//! failed; every node settles; nothing runs again on rechecks or after an
//! agent restart. Product problems the test can step past are collected
//! and fail it at the end (`Findings`).
//!
//! Needs root, systemd-nspawn, etcd, openssl, etcdctl, and `cargo build
//! --workspace --bins` first. The first run builds a local repository with
//! containerd.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use steward_tests::converge_bed::{
    has_settled, poll, report_resources, secs, Clock, ConvergeBed, Findings, AGENT_UNIT,
    HAPROXY_CFG, RECHECK_S,
};
use steward_tests::nspawn::{Machine, MachineOptions};
use steward_tests::standins::{
    build_kubernetes_standins, config_value, parse_calls, recorded_config, Call, KUBEADM_CALLS_LOG,
};

const VERSION: &str = "1.31.2-1.1";
/// Also in the stand-in repository: apt would take it without the pin.
const NEWER: &str = "1.31.3-1.1";
const STANDIN_REPO: &str = "/srv/kubernetes-standin";
/// The machines' local repository: the lb role's packages and containerd
/// (the Kubernetes roles install Debian's).
const PACKAGES: &[&str] = &["haproxy", "procps", "containerd"];
const NODES: [&str; 3] = ["cp1", "cp2", "w1"];
const BOUND: Duration = Duration::from_secs(300);

fn spec(vip: &str, repo_url: &str) -> String {
    format!(
        r#"# Kubernetes with STAND-IN packages (see tests/src/standins.rs)
[[vip]]
name = "api"
address = "{vip}"
check = "haproxy"

[kubernetes]
version = "{VERSION}"
pod_subnet = "10.244.0.0/16"
service_subnet = "10.96.0.0/12"

[kubernetes.repository]
url = "{repo_url}"
suite = "./"

[nodes.cp1]
roles = ["k8s-control-plane"]

[nodes.cp2]
roles = ["k8s-control-plane"]

[nodes.w1]
roles = ["k8s-worker", "lb"]
"#
    )
}

const KUBERNETES_RESOURCES: &[&str] = &[
    "packages:containerd",
    "file:/etc/containerd/config.toml",
    "unit:containerd.service",
    "repository:kubernetes",
    "packages:kubernetes",
    "unit:kubelet.service",
];

/// Every stand-in kubeadm call in `m`.
fn calls(m: &Machine) -> Vec<Call> {
    let text = std::fs::read_to_string(m.root().join(KUBEADM_CALLS_LOG.trim_start_matches('/')))
        .unwrap_or_default();
    parse_calls(&text).unwrap_or_else(|e| panic!("{}: {KUBEADM_CALLS_LOG}: {e}", m.name()))
}

/// The `--config` file `call` (one of `m`'s) was given, as kubeadm saw it:
/// (mode, content).
fn config_of(m: &Machine, call: &Call) -> (u32, String) {
    let index = calls(m)
        .iter()
        .position(|c| c == call)
        .unwrap_or_else(|| panic!("{call:?} is not a call of {}", m.name()));
    recorded_config(m.root(), index)
        .unwrap_or_else(|| panic!("{}: no --config recorded for {call:?}", m.name()))
}

/// The one list item of a JoinConfiguration: `caCertHashes`' hash.
fn ca_hash_in(yaml: &str) -> Option<&str> {
    yaml.lines()
        .find_map(|l| l.trim().strip_prefix("- ").map(|v| v.trim_matches('"')))
}

fn all_calls(bed: &ConvergeBed) -> BTreeMap<String, Vec<Call>> {
    NODES
        .iter()
        .map(|n| ((*n).to_owned(), calls(bed.machine(n))))
        .collect()
}

/// `sha256:<hex>` of the SubjectPublicKeyInfo of the PEM certificate at
/// `path` (on this host), as kubeadm documents it.
fn spki_sha256(path: &Path) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(
            "openssl x509 -pubkey -noout -in \"$1\" | openssl pkey -pubin -outform der \
             | sha256sum | cut -d' ' -f1",
        )
        .arg("sh")
        .arg(path)
        .output()
        .expect("run openssl");
    let hex = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        out.status.success() && hex.len() == 64,
        "openssl on {}: {}{}",
        path.display(),
        hex,
        String::from_utf8_lossy(&out.stderr)
    );
    format!("sha256:{hex}")
}

fn etcdctl(bed: &ConvergeBed, args: &[&str]) -> String {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", bed.cluster.etcd.client_url))
        .args(args)
        .output()
        .expect("run etcdctl");
    assert!(
        out.status.success(),
        "etcdctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// When the coordinator recorded `node` as joined (init or join done),
/// Unix seconds.
fn joined_at(bed: &ConvergeBed, node: &str) -> Option<f64> {
    let key = format!(
        "/steward/{}/orchestration/kubernetes/joined/{node}",
        bed.cluster.name
    );
    let text = etcdctl(bed, &["get", &key, "--print-value-only"]);
    let json: Value = serde_json::from_str(text.trim()).ok()?;
    json["at_unix_ms"].as_u64().map(|ms| ms as f64 / 1000.0)
}

/// The mode bits of a file in `m`.
fn mode(m: &Machine, path: &str) -> Option<u32> {
    std::fs::metadata(m.root().join(path.trim_start_matches('/')))
        .ok()
        .map(|md| md.permissions().mode() & 0o7777)
}

/// Kernel-wide items cannot be set from a container: they must be
/// not-applicable with the container as the reason, or already hold in the
/// machine (checked here, not taken from the report). Never failed.
/// Returns one line per item.
fn check_kernel_items(m: &Machine, report: &Value) -> Vec<String> {
    let mut lines = Vec::new();
    for r in report_resources(report) {
        let id = r["id"].as_str().unwrap_or_default();
        let status = r["status"].as_str().unwrap_or_default();
        let detail = r["detail"].as_str().unwrap_or_default();
        let kernel =
            id == "swap:off" || id.starts_with("kernel-module:") || id.starts_with("sysctl:");
        if !kernel {
            continue;
        }
        assert_ne!(status, "failed", "{}: {id} failed: {detail}", m.name());
        let holds = if id == "swap:off" {
            let swaps = m.sh("cat /proc/swaps");
            (
                swaps.lines().count() <= 1,
                format!(
                    "/proc/swaps: {} swap(s)",
                    swaps.lines().count().saturating_sub(1)
                ),
            )
        } else if let Some(module) = id.strip_prefix("kernel-module:") {
            let loaded = m
                .exec(&["test", "-d", &format!("/sys/module/{module}")])
                .status
                .success();
            (
                loaded,
                format!(
                    "/sys/module/{module} {}",
                    if loaded { "present" } else { "absent" }
                ),
            )
        } else {
            let key = id.trim_start_matches("sysctl:");
            let file = format!("/proc/sys/{}", key.replace('.', "/"));
            let out = m.exec(&["cat", &file]);
            let value = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            (
                out.status.success() && value == "1",
                format!("{file} = {value:?}"),
            )
        };
        match status {
            "not-applicable" => assert!(
                detail.contains("container"),
                "{}: {id} is not-applicable without the container as the reason: {detail:?}",
                m.name()
            ),
            "ok" | "changed" => assert!(
                holds.0,
                "{}: {id} is {status} but does not hold in the machine ({})",
                m.name(),
                holds.1
            ),
            other => panic!("{}: {id} is {other}: {detail}", m.name()),
        }
        lines.push(format!(
            "{id}: {status}{} [{}]",
            if detail.is_empty() {
                String::new()
            } else {
                format!(" ({detail})")
            },
            holds.1
        ));
    }
    lines
}

/// Every place an operator (or a backup) could read: `stewardctl` output
/// for every node, the node list, the events, all of etcd, the
/// coordinators' logs, the agents' journals. Returns where `secret` shows.
fn leaks(bed: &ConvergeBed, secret: &str) -> Vec<String> {
    let mut places: Vec<(String, String)> = Vec::new();
    for n in NODES {
        let json = bed.cluster.ctl(&["node", "show", n, "-o", "json"]);
        places.push((format!("stewardctl node show {n} -o json"), json.stdout));
        places.push((format!("stewardctl node show {n}"), bed.node_table(n)));
        places.push((
            format!("{n}: journal of {AGENT_UNIT}"),
            bed.machine(n).journal(AGENT_UNIT),
        ));
    }
    for args in [
        &["nodes", "-o", "json"][..],
        &["nodes"],
        &["events", "--limit", "10000", "-o", "json"],
        &["events", "--limit", "10000"],
    ] {
        let out = bed.ctl_ok(args);
        places.push((
            format!("stewardctl {}", args.join(" ")),
            format!("{}{}", out.stdout, out.stderr),
        ));
    }
    let etcd = etcdctl(bed, &["get", "", "--prefix"]);
    // Not a vacuous search: the sealed record and the reports are there.
    assert!(
        etcd.contains("orchestration/kubernetes/bootstrap"),
        "the etcd dump lacks the bootstrap record"
    );
    assert!(
        places[0].1.contains("command:kubeadm"),
        "node show lacks the kubeadm task: {}",
        places[0].1
    );
    places.push(("etcd (every key and value)".into(), etcd));
    for c in &bed.cluster.coordinators {
        places.push((format!("{} log", c.id), c.proc.log_text()));
    }
    places
        .into_iter()
        .filter(|(_, text)| text.contains(secret))
        .map(|(place, _)| place)
        .collect()
}

#[test]
fn kubeadm_init_once_and_joins_with_standin_kubernetes_packages() {
    let clock = Clock::start();
    let findings = Findings::default();
    eprintln!(
        "\n*** STAND-IN KUBERNETES: kubeadm, kubelet and kubectl in this test are fakes built by \
         the test (tests/src/standins.rs) that record their calls; no Kubernetes runs. ***\n"
    );
    let repo = tempfile::Builder::new()
        .prefix("steward-k8s-standin-")
        .tempdir()
        .expect("tempdir");
    let debs = build_kubernetes_standins(repo.path(), &[VERSION, NEWER]);
    clock.say(format!(
        "built {} STAND-IN packages: {}",
        debs.len(),
        debs.iter()
            .filter_map(|d| d.file_name().map(|f| f.to_string_lossy().into_owned()))
            .collect::<Vec<_>>()
            .join(" ")
    ));
    let machines: Vec<(&str, MachineOptions)> = NODES
        .iter()
        .map(|n| {
            (
                *n,
                MachineOptions::default()
                    .packages(PACKAGES)
                    .bind_ro(repo.path(), STANDIN_REPO),
            )
        })
        .collect();
    let mut bed = ConvergeBed::start_machines("converge-k8s", machines);
    bed.dump_units = ["containerd.service", "kubelet.service", "haproxy.service"]
        .map(String::from)
        .to_vec();
    let vip = format!("{}/{}", bed.vip, bed.net.prefix_len());
    let endpoint = format!("{}:6443", bed.vip);
    clock.say(format!(
        "bed up: {}; VIP {vip}",
        bed.lbs
            .iter()
            .map(|m| format!("{} {}", m.name(), m.ip()))
            .collect::<Vec<_>>()
            .join(", ")
    ));

    // ---- apply, then wait for everyone to settle
    // The repository as a local file mirror, bound into every machine.
    let repo_url = format!("file:{STANDIN_REPO}");
    let out = bed.apply_spec(&spec(&vip, &repo_url));
    let t0 = Instant::now();
    clock.say(format!(
        "applied: cp1, cp2 k8s-control-plane; w1 k8s-worker + lb; [kubernetes] {VERSION} from \
         {repo_url} (STAND-IN packages):\n{}",
        out.stdout.trim()
    ));
    let lb_resources = ["packages:haproxy", HAPROXY_CFG_ID, "unit:haproxy.service"];
    let mut reports = BTreeMap::new();
    for n in NODES {
        let report = bed.settled(&findings, n, BOUND, |r| {
            has_settled(KUBERNETES_RESOURCES)(r)?;
            if n == "w1" {
                has_settled(&lb_resources)(r)?;
            }
            let step = report_resources(r)
                .into_iter()
                .any(|x| x["id"] == "command:kubeadm-init" || x["id"] == "command:kubeadm-join");
            if step {
                Ok(())
            } else {
                Err(format!("{n}: no kubeadm init or join in the report yet"))
            }
        });
        clock.say(format!(
            "{n}: converged at revision {} after {} ({})",
            report["revision"],
            secs(t0.elapsed()),
            report["counts"]
        ));
        reports.insert(n, report);
    }

    // ---- kubeadm: one init, the joins, the order
    let calls = all_calls(&bed);
    let inits: Vec<&Call> = calls.values().flatten().filter(|c| c.is_init()).collect();
    assert_eq!(
        inits.len(),
        1,
        "kubeadm init must run exactly once in the cluster: {inits:#?}"
    );
    let init = inits[0].clone();
    let init_node = init.host.clone();
    assert_eq!(
        init_node, "cp1",
        "the first control plane by id runs init: {init:?}"
    );
    let init_m = bed.machine(&init_node);
    // The secrets reach kubeadm in a file only root can read, never on its
    // command line.
    let (init_mode, init_config) = config_of(init_m, &init);
    assert_eq!(
        init_mode, 0o600,
        "the init config must be 0600 while kubeadm reads it"
    );
    let token = config_value(&init_config, "token")
        .expect("init config: token")
        .to_owned();
    let key = config_value(&init_config, "certificateKey")
        .expect("init config: certificateKey")
        .to_owned();
    let secrets = [token.as_str(), key.as_str()];
    eprintln!("calls (token and certificate key withheld here):");
    for c in calls.values().flatten() {
        eprintln!("  {}", c.redacted(&secrets));
    }
    for c in calls.values().flatten() {
        assert!(
            !c.argv
                .iter()
                .any(|a| a.contains(&token) || a.contains(&key)),
            "a kubeadm command line carries the token or certificate key: {}",
            c.redacted(&secrets)
        );
    }
    assert_eq!(
        init.argv,
        [
            "init",
            "--config",
            "/run/steward-agent/kubeadm/kubeadm-init.yaml",
            "--upload-certs"
        ]
    );
    assert_eq!(
        config_value(&init_config, "controlPlaneEndpoint"),
        Some(endpoint.as_str())
    );
    assert!(
        token.len() == 23
            && token.as_bytes()[6] == b'.'
            && token
                .bytes()
                .enumerate()
                .all(|(i, b)| i == 6 || b.is_ascii_lowercase() || b.is_ascii_digit()),
        "token {:?} is not [a-z0-9]{{6}}.[a-z0-9]{{16}}",
        token.len()
    );
    assert!(
        key.len() == 64 && key.bytes().all(|b| b.is_ascii_hexdigit()),
        "certificate key is not 32 bytes of hex"
    );
    assert_eq!(
        config_value(&init_config, "podSubnet"),
        Some("10.244.0.0/16")
    );
    assert_eq!(
        config_value(&init_config, "serviceSubnet"),
        Some("10.96.0.0/12")
    );

    let ca_hash = spki_sha256(&init_m.root().join("etc/kubernetes/pki/ca.crt"));
    clock.say(format!(
        "kubeadm init ran once, on {init_node}; CA hash computed here with openssl: {ca_hash}"
    ));
    assert_eq!(mode(init_m, "/etc/kubernetes/pki/ca.key"), Some(0o600));

    let joins =
        |n: &str| -> Vec<Call> { calls[n].iter().filter(|c| c.is_join()).cloned().collect() };
    let cp2 = joins("cp2");
    assert_eq!(cp2.len(), 1, "cp2 must join exactly once: {cp2:#?}");
    let cp2 = &cp2[0];
    let (cp2_mode, cp2_config) = config_of(bed.machine("cp2"), cp2);
    assert_eq!(cp2_mode, 0o600, "cp2's join config must be 0600");
    assert_eq!(
        config_value(&cp2_config, "apiServerEndpoint"),
        Some(endpoint.as_str())
    );
    assert_eq!(config_value(&cp2_config, "token"), Some(token.as_str()));
    assert_eq!(
        ca_hash_in(&cp2_config),
        Some(ca_hash.as_str()),
        "cp2's CA hash is not the hash of the init node's CA"
    );
    assert_eq!(
        config_value(&cp2_config, "certificateKey"),
        Some(key.as_str()),
        "cp2 joins as a control plane with the certificate key"
    );
    let w1 = joins("w1");
    assert_eq!(w1.len(), 1, "w1 must join exactly once: {w1:#?}");
    let w1 = &w1[0];
    let (w1_mode, w1_config) = config_of(bed.machine("w1"), w1);
    assert_eq!(w1_mode, 0o600, "w1's join config must be 0600");
    assert_eq!(
        config_value(&w1_config, "apiServerEndpoint"),
        Some(endpoint.as_str())
    );
    assert_eq!(config_value(&w1_config, "token"), Some(token.as_str()));
    assert_eq!(ca_hash_in(&w1_config), Some(ca_hash.as_str()));
    assert!(
        !w1_config.contains("controlPlane") && !w1_config.contains(&key),
        "a worker joins without the control plane's certificate key"
    );
    // Removed once kubeadm returned.
    for n in NODES {
        let left = bed
            .machine(n)
            .sh("ls -A /run/steward-agent/kubeadm 2>/dev/null || true");
        assert!(
            left.trim().is_empty(),
            "{n}: kubeadm configs left behind: {left}"
        );
    }
    assert!(
        joins(&init_node).is_empty(),
        "the init node must not join as well"
    );
    let init_joined = joined_at(&bed, &init_node).expect("the init node's join record");
    eprintln!(
        "order: init {:.3}, init node recorded joined {:.3} (+{:.1} s), cp2 join {:.3} (+{:.1} s), \
         w1 join {:.3} (+{:.1} s)",
        init.at,
        init_joined,
        init_joined - init.at,
        cp2.at,
        cp2.at - init.at,
        w1.at,
        w1.at - init.at
    );
    assert!(init_joined > init.at, "joined record before init ran");
    for (who, at) in [("cp2", cp2.at), ("w1", w1.at)] {
        assert!(
            at > init_joined,
            "{who} joined at {at:.3}, before the init node's join record ({init_joined:.3})"
        );
    }
    for n in ["cp2", "w1"] {
        assert!(joined_at(&bed, n).is_some(), "{n}: no join record");
    }
    clock.say("cp2 joined as a control plane and w1 as a worker, both after init was recorded");

    // ---- secrets stay out of sight
    // The CA key's first line of base64: long and random enough to find.
    let ca_key_pem = std::fs::read_to_string(init_m.root().join("etc/kubernetes/pki/ca.key"))
        .expect("the CA key on the init node");
    let ca_key_line = ca_key_pem
        .lines()
        .find(|l| !l.starts_with("-----") && l.len() >= 40)
        .expect("a base64 line in ca.key")
        .to_owned();
    // Positive control: the searches find what is there.
    let held = bed
        .read_file(init_m, "/var/lib/steward-agent/desired.json")
        .unwrap_or_default();
    // The secrets ride in the tasks' input files (bytes in JSON).
    let desired: Value = serde_json::from_str(&held).unwrap_or_default();
    let inputs: String = desired["desired"]["tasks"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|t| t["inputs"].as_array().into_iter().flatten())
        .filter_map(|i| {
            let bytes: Option<Vec<u8>> = i["content"]
                .as_array()?
                .iter()
                .map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
                .collect();
            String::from_utf8(bytes?).ok()
        })
        .collect();
    assert!(
        inputs.contains(&token) && inputs.contains(&key),
        "the init node's desired.json should carry the token and key it ran init with"
    );
    for (what, secret) in [
        ("join token", &token),
        ("certificate key", &key),
        ("cluster CA key", &ca_key_line),
    ] {
        let places = leaks(&bed, secret);
        findings.check(places.is_empty(), || {
            format!("the kubeadm {what} shows in: {}", places.join(", "))
        });
    }
    for n in NODES {
        let m = bed.machine(n);
        assert_eq!(
            mode(m, "/var/lib/steward-agent/desired.json"),
            Some(0o600),
            "{n}: desired.json must be 0600 (it carries the cluster secrets)"
        );
    }
    clock.say(
        "token, certificate key and CA key in no stewardctl output, event, etcd value or log; \
         desired.json 0600 everywhere",
    );

    // ---- packages, containerd, kubelet, kernel items
    for n in NODES {
        let m = bed.machine(n);
        let holds = m.sh("apt-mark showhold");
        for p in ["kubeadm", "kubelet", "kubectl"] {
            assert!(
                holds.lines().any(|l| l.trim() == p),
                "{n}: {p} not held:\n{holds}"
            );
            let v = m.sh(&format!("dpkg-query -W -f='${{Version}}' {p}"));
            assert_eq!(
                v.trim(),
                VERSION,
                "{n}: {p} version ({NEWER} is in the repository too)"
            );
        }
        let list = bed
            .read_file(m, "/etc/apt/sources.list.d/steward-kubernetes.list")
            .unwrap_or_default();
        assert_eq!(
            list.trim(),
            format!("deb [trusted=yes] {repo_url} ./"),
            "{n}: the repository the spec names"
        );
        let containerd = m.sh("dpkg-query -W -f='${Version}' containerd");
        let config = bed
            .read_file(m, "/etc/containerd/config.toml")
            .unwrap_or_default();
        assert!(
            config.contains("SystemdCgroup = true"),
            "{n}: /etc/containerd/config.toml:\n{config}"
        );
        assert_eq!(
            bed.unit_state(m, "containerd.service"),
            "active",
            "{n}: containerd:\n{}",
            m.journal("containerd.service")
        );
        assert_eq!(
            bed.unit_property(m, "kubelet.service", "UnitFileState"),
            "enabled",
            "{n}: kubelet.service enabled"
        );
        assert_eq!(
            bed.unit_state(m, "kubelet.service"),
            "active",
            "{n}: the (stand-in) kubelet, started by kubeadm"
        );
        eprintln!(
            "{n}: held {}; containerd {} (Debian's) active with SystemdCgroup; kubelet enabled, active",
            holds.split_whitespace().collect::<Vec<_>>().join(" "),
            containerd.trim()
        );
        for line in check_kernel_items(m, &reports[n]) {
            eprintln!("  {n}: {line}");
        }
    }

    // ---- the API frontend on the lb
    {
        let w1 = bed.machine("w1");
        let cfg = bed.read_file(w1, HAPROXY_CFG).unwrap_or_default();
        let section = |name: &str| -> Vec<String> {
            cfg.split("\n\n")
                .find(|s| s.trim_start().starts_with(name))
                .map(|s| s.lines().map(|l| l.trim().to_owned()).collect())
                .unwrap_or_default()
        };
        let front = section("frontend kube-apiserver");
        assert!(
            front.contains(&format!("bind {endpoint}")),
            "w1: no `bind {endpoint}` in frontend kube-apiserver:\n{cfg}"
        );
        let back = section("backend kube-apiserver");
        for cp in ["cp1", "cp2"] {
            let want = format!("server {cp} {}:6443", bed.machine(cp).ip());
            assert!(back.contains(&want), "w1: no `{want}`:\n{cfg}");
        }
        assert_eq!(bed.unit_state(w1, "haproxy.service"), "active");
        let holders = poll(
            Duration::from_secs(30),
            Duration::from_millis(200),
            "w1 to hold the VIP",
            || {
                let h = bed.vip_holders();
                if h == ["w1"] {
                    Ok(h)
                } else {
                    Err(format!("holders {h:?}"))
                }
            },
        );
        clock.say(format!(
            "w1: HAProxy binds {endpoint} to cp1, cp2 on :6443; VIP held by {holders:?}"
        ));
    }

    // ---- nothing runs again: rechecks, then agent restarts
    std::thread::sleep(Duration::from_secs(2 * RECHECK_S + 1));
    assert_eq!(all_calls(&bed), calls, "kubeadm ran again on a recheck");
    // The stored report changes only with its outcome, so the restarts
    // are followed in the journals: each new agent opened a session; its
    // converge runs (at start and every recheck) log nothing when nothing
    // changed, so give them two rechecks.
    let t_restart = Instant::now();
    for n in NODES {
        let m = bed.machine(n);
        let pid = bed.unit_property(m, AGENT_UNIT, "MainPID");
        m.sh(&format!("systemctl restart {AGENT_UNIT}"));
        poll(
            Duration::from_secs(30),
            Duration::from_millis(200),
            &format!("{n}: the agent restarted and connected"),
            || {
                let now = bed.unit_property(m, AGENT_UNIT, "MainPID");
                let recorded = m
                    .journal(AGENT_UNIT)
                    .lines()
                    .filter(|l| l.contains(&format!("steward-agent[{now}]")))
                    .any(|l| l.contains("session open"));
                if now != pid && now != "0" && recorded {
                    Ok(())
                } else {
                    Err(format!(
                        "main pid {now} (was {pid}), session open: {recorded}"
                    ))
                }
            },
        );
    }
    clock.say(format!(
        "agents restarted and reconnected in {}",
        secs(t_restart.elapsed())
    ));
    std::thread::sleep(Duration::from_secs(2 * RECHECK_S + 1));
    let after = all_calls(&bed);
    assert_eq!(after, calls, "kubeadm ran again after the agents restarted");
    clock.say(format!(
        "no kubeadm call on rechecks nor after every agent restarted ({} calls in all)",
        after.values().map(Vec::len).sum::<usize>()
    ));
    for n in NODES {
        bed.settled(&findings, n, Duration::from_secs(30), |_| Ok(()));
    }
    findings.assert_none();
}

const HAPROXY_CFG_ID: &str = "file:/etc/haproxy/haproxy.cfg";
