//! A Kubernetes upgrade as a rollout (issue 15, item 3) on nspawn machines
//! booting systemd, with **STAND-IN KUBERNETES PACKAGES**.
//!
//! ```text
//!   !!! No Kubernetes runs in this test. !!!
//!   kubeadm, kubelet and kubectl are the recording fakes of
//!   tests/src/standins.rs: kubeadm and kubectl append every call to a log
//!   in the machine, `kubeadm upgrade` also writes down its own version and
//!   the installed kubelet's, the kubelet writes down each start with its
//!   version, and `kubectl get node NAME` answers Ready.
//!   What is real: the agents, three coordinators on a real etcd, apt-get
//!   installing and holding the packages from a local repository, systemd
//!   restarting the kubelet, HAProxy and the VIP.
//! ```
//!
//! Topology: cp1, cp2 (k8s-control-plane and lb: the VIP `api` is the
//! Kubernetes endpoint) and w1, w2 (k8s-worker). The cluster is built at
//! 1.30.5-1.1; then:
//!
//! 1. `apply --dry-run` of 1.32.0-1.1 (two minor versions up) is refused
//!    naming the versions and the skew rule, and a plain `apply` of
//!    1.31.2-1.1 is refused with the advice to use `--rollout`; neither
//!    changes the settings nor starts a rollout.
//! 2. `apply --rollout --wait` of 1.31.2-1.1. While it runs, the test
//!    samples every machine's dpkg database every 50 ms, and SIGKILLs the
//!    leader once cp2 is changed (its upgrade in flight: kubeadm moving,
//!    `kubeadm upgrade node` next).
//!    From the recorded calls: `kubeadm upgrade plan` then `apply` on cp1,
//!    then `kubeadm upgrade node` on cp2, each after the previous node's
//!    kubelet restarted at the new version, then the workers one at a time,
//!    each cordoned and drained (kubectl, on cp1) before its upgrade (and
//!    only once the worker before it was uncordoned), asked
//!    Ready after its kubelet restart, uncordoned after; every `kubeadm
//!    upgrade` ran with kubeadm at the new version and the kubelet still at
//!    the old one; no node was upgraded twice or skipped; at every sample the
//!    nodes whose kubeadm moved are a prefix of the rollout's order and at
//!    most one is between its kubeadm and kubelet moves; every node ends
//!    with the three packages held at the new version.
//!
//! Needs root, systemd-nspawn, etcd, etcdctl, and `cargo build --workspace
//! --bins` first.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use steward_tests::converge_bed::{
    has_settled, poll, report_resources, Clock, ConvergeBed, Findings,
};
use steward_tests::nspawn::{Machine, MachineOptions};
use steward_tests::standins::{
    build_kubernetes_standins, parse_calls, parse_kubectl_calls, Call, KUBEADM_CALLS_LOG,
    KUBEADM_UPGRADES_LOG, KUBECTL_CALLS_LOG, KUBELET_STARTS_LOG,
};

const FROM: &str = "1.30.5-1.1";
const TO: &str = "1.31.2-1.1";
/// Two minor versions above [`FROM`]: the skew policy forbids it.
const JUMP: &str = "1.32.0-1.1";
const STANDIN_REPO: &str = "/srv/kubernetes-standin";
const PACKAGES: &[&str] = &["haproxy", "procps", "containerd"];
const NODES: [&str; 4] = ["cp1", "cp2", "w1", "w2"];
const KUBERNETES_PACKAGES: [&str; 3] = ["kubeadm", "kubelet", "kubectl"];
const BOUND: Duration = Duration::from_secs(300);

fn spec(vip: &str, version: &str) -> String {
    format!(
        r#"# Kubernetes with STAND-IN packages (see tests/src/standins.rs)
[[vip]]
name = "api"
address = "{vip}"
check = "haproxy"

[kubernetes]
version = "{version}"
pod_subnet = "10.244.0.0/16"
service_subnet = "10.96.0.0/12"

[kubernetes.repository]
url = "file:{STANDIN_REPO}"
suite = "./"

[nodes.cp1]
roles = ["k8s-control-plane", "lb"]

[nodes.cp2]
roles = ["k8s-control-plane", "lb"]

[nodes.w1]
roles = ["k8s-worker"]

[nodes.w2]
roles = ["k8s-worker"]
"#
    )
}

fn log_in(m: &Machine, path: &str) -> String {
    std::fs::read_to_string(m.root().join(path.trim_start_matches('/'))).unwrap_or_default()
}

fn kubeadm_calls(m: &Machine) -> Vec<Call> {
    parse_calls(&log_in(m, KUBEADM_CALLS_LOG))
        .unwrap_or_else(|e| panic!("{}: {KUBEADM_CALLS_LOG}: {e}", m.name()))
}

fn kubectl_calls(m: &Machine) -> Vec<Call> {
    parse_kubectl_calls(&log_in(m, KUBECTL_CALLS_LOG))
        .unwrap_or_else(|e| panic!("{}: {KUBECTL_CALLS_LOG}: {e}", m.name()))
}

/// `(unix time, words after the host)` of each line of a stand-in's log.
fn timed_lines(m: &Machine, path: &str) -> Vec<(f64, Vec<String>)> {
    log_in(m, path)
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let at = words.next()?.parse().ok()?;
            let _host = words.next()?;
            Some((at, words.map(str::to_owned).collect()))
        })
        .collect()
}

/// When the kubelet started at `version` in `m` (unix seconds).
fn kubelet_starts(m: &Machine, version: &str) -> Vec<f64> {
    timed_lines(m, KUBELET_STARTS_LOG)
        .into_iter()
        .filter(|(_, w)| w.get(1).map(String::as_str) == Some(version))
        .map(|(at, _)| at)
        .collect()
}

/// The installed version of each Kubernetes package, from the machine's
/// dpkg database (read from the host: no process in the machine).
fn installed(m: &Machine) -> BTreeMap<String, String> {
    parse_status(&log_in(m, "/var/lib/dpkg/status"))
}

fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_secs_f64()
}

fn etcd_settings(bed: &ConvergeBed) -> String {
    let key = format!("/steward/{}/cluster/settings", bed.cluster.name);
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", bed.cluster.etcd.client_url))
        .args(["get", &key, "-w", "json"])
        .output()
        .expect("run etcdctl");
    assert!(out.status.success(), "etcdctl get {key}");
    let json: Value = serde_json::from_slice(&out.stdout).expect("etcdctl json");
    // Value and mod revision: "changes nothing" means neither moved.
    format!(
        "{}@{}",
        json["kvs"][0]["value"], json["kvs"][0]["mod_revision"]
    )
}

fn joined(bed: &ConvergeBed, node: &str) -> bool {
    let key = format!(
        "/steward/{}/orchestration/kubernetes/joined/{node}",
        bed.cluster.name
    );
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", bed.cluster.etcd.client_url))
        .args(["get", &key, "--print-value-only"])
        .output()
        .expect("run etcdctl");
    !String::from_utf8_lossy(&out.stdout).trim().is_empty()
}

/// `stewardctl ARGS`, which must fail saying each of `expected`.
fn refused(bed: &ConvergeBed, args: &[&str], expected: &[String]) -> steward_tests::Ctl {
    let out = bed.cluster.ctl(args);
    assert!(!out.ok(), "stewardctl {args:?} passed: {}", out.stdout);
    for e in expected {
        assert!(out.stderr.contains(e), "no {e:?} in:\n{}", out.stderr);
    }
    out
}

fn write_spec(bed: &ConvergeBed, name: &str, text: &str) -> String {
    let path = bed.cluster.dir.path().join(name);
    std::fs::write(&path, text).expect("write spec");
    path.display().to_string()
}

/// One sample of every machine's Kubernetes packages.
type Sample = (f64, BTreeMap<String, BTreeMap<String, String>>);

#[test]
fn a_kubernetes_version_change_upgrades_control_planes_then_workers_node_by_node() {
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
    build_kubernetes_standins(repo.path(), &[FROM, TO]);
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
    let mut bed = ConvergeBed::start_machines("k8s-upgrade", machines);
    bed.dump_units = ["kubelet.service", "haproxy.service"]
        .map(String::from)
        .to_vec();
    let vip = format!("{}/{}", bed.vip, bed.net.prefix_len());
    clock.say("bed up");

    // ---- the cluster at FROM
    bed.apply_spec(&spec(&vip, FROM));
    for n in NODES {
        bed.settled(&findings, n, BOUND, |r| {
            has_settled(&["packages:kubernetes", "unit:kubelet.service"])(r)?;
            let step = report_resources(r)
                .into_iter()
                .any(|x| x["id"] == "command:kubeadm-init" || x["id"] == "command:kubeadm-join");
            step.then_some(())
                .ok_or_else(|| format!("{n}: no kubeadm init or join yet"))
        });
    }
    poll(
        BOUND,
        Duration::from_millis(500),
        "every node joined",
        || {
            let missing: Vec<&str> = NODES.iter().copied().filter(|n| !joined(&bed, n)).collect();
            if missing.is_empty() {
                Ok(())
            } else {
                Err(format!("not joined: {missing:?}"))
            }
        },
    );
    for n in NODES {
        let have = installed(bed.machine(n));
        for p in KUBERNETES_PACKAGES {
            assert_eq!(have.get(p).map(String::as_str), Some(FROM), "{n}: {have:?}");
        }
    }
    clock.say(format!(
        "Kubernetes (STAND-IN) {FROM} on {NODES:?}, every node joined"
    ));

    // ---- refusals that change nothing
    let before = etcd_settings(&bed);
    let jump = write_spec(&bed, "jump.toml", &spec(&vip, JUMP));
    let dry = refused(
        &bed,
        &["apply", "-f", &jump, "--dry-run"],
        &[
            format!("kubernetes.version {FROM} -> {JUMP} jumps 2 minor versions (1.30 -> 1.32)"),
            "version skew policy allows upgrading one minor version at a time".to_owned(),
            "upgrade to 1.31 first".to_owned(),
        ],
    );
    let upgrade = write_spec(&bed, "upgrade.toml", &spec(&vip, TO));
    let plain = refused(
        &bed,
        &["apply", "-f", &upgrade],
        &[
            format!("kubernetes.version {FROM} -> {TO}"),
            "--rollout".to_owned(),
        ],
    );
    assert_eq!(
        etcd_settings(&bed),
        before,
        "a refusal changed the settings"
    );
    let list = bed.ctl_ok(&["rollout", "list", "-o", "json"]).stdout;
    assert!(
        !list.contains("\"id\""),
        "a refusal started a rollout: {list}"
    );
    clock.say(format!(
        "refused, nothing changed:\n  {}\n  {}",
        dry.stderr.trim(),
        plain.stderr.trim()
    ));

    // ---- the upgrade, sampled
    let stop = Arc::new(AtomicBool::new(false));
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let roots: Vec<(String, std::path::PathBuf)> = NODES
        .iter()
        .map(|n| ((*n).to_owned(), bed.machine(n).root().to_path_buf()))
        .collect();
    let sampler = {
        let stop = stop.clone();
        let samples = samples.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(900);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let at = now_s();
                let mut state = BTreeMap::new();
                for (name, root) in &roots {
                    let status = std::fs::read_to_string(root.join("var/lib/dpkg/status"))
                        .unwrap_or_default();
                    state.insert(name.clone(), parse_status(&status));
                }
                samples.lock().expect("samples").push((at, state));
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let leader = bed.cluster.leader().expect("a leader");
    // Followed through replicas that stay up: the leader is killed below.
    let endpoints: Vec<String> = bed
        .cluster
        .coordinators
        .iter()
        .filter(|c| c.id != leader)
        .map(|c| c.url.clone())
        .collect();
    let pki = bed.cluster.pki();
    let mut apply = Command::new(steward_tests::bin("stewardctl"))
        .env("STEWARD_ENDPOINTS", endpoints.join(","))
        .env("STEWARD_CA", pki.join("ca.crt"))
        .env("STEWARD_CERT", pki.join("admin.crt"))
        .env("STEWARD_KEY", pki.join("admin.key"))
        .args([
            "apply",
            "-f",
            &upgrade,
            "--rollout",
            "--wait",
            "--timeout",
            "10m",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run stewardctl apply --rollout --wait");
    let started = Instant::now();
    let id = poll(
        Duration::from_secs(30),
        Duration::from_millis(200),
        "the rollout created",
        || {
            let list = bed.ctl_ok(&["rollout", "list", "-o", "json"]).json();
            list.as_array()
                .or_else(|| list["rollouts"].as_array())
                .and_then(|a| a.first())
                .and_then(|r| r["id"].as_str())
                .map(str::to_owned)
                .ok_or_else(|| format!("no rollout: {list}"))
        },
    );
    // The leader dies while cp2's `kubeadm upgrade node` is in flight.
    poll(
        Duration::from_secs(300),
        Duration::from_millis(100),
        "cp2 changed",
        || {
            let r = bed.ctl_ok(&["rollout", "status", &id, "-o", "json"]).json();
            let step = r["nodes"]
                .as_array()
                .and_then(|a| a.iter().find(|n| n["node"] == "cp2"))
                .and_then(|n| n["step"].as_str())
                .unwrap_or("pending")
                .to_owned();
            (step == "changed").then_some(()).ok_or(step)
        },
    );
    let index = bed.cluster.coordinator_index(&leader);
    bed.cluster.coordinators[index].proc.kill();
    let killed_at = now_s();
    clock.say(format!("SIGKILLed leader {leader} with cp2 changed"));
    let watch = loop {
        if let Some(_status) = apply.try_wait().expect("poll stewardctl") {
            break apply.wait_with_output().expect("stewardctl output");
        }
        if started.elapsed() > Duration::from_secs(600) {
            apply.kill().expect("kill stewardctl (by pid)");
            panic!("apply --rollout --wait did not return within 600 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    sampler.join().expect("sampler");
    let watch_out = String::from_utf8_lossy(&watch.stdout).into_owned();
    let watch_err = String::from_utf8_lossy(&watch.stderr).into_owned();
    assert!(
        watch.status.success(),
        "apply --rollout --wait failed:\n{watch_out}\n{watch_err}"
    );
    let done = bed.ctl_ok(&["rollout", "status", &id, "-o", "json"]).json();
    assert_eq!(done["phase"], "done", "{done}");
    let new_leader = bed.cluster.leader().expect("a new leader");
    assert_ne!(new_leader, leader);
    let order: Vec<String> = done["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| n["node"].as_str().unwrap_or_default().to_owned())
        .collect();
    clock.say(format!(
        "rollout {id} done in {:.1} s (new leader {new_leader}), order {order:?}",
        took.as_secs_f64()
    ));
    assert_eq!(
        &order[..2],
        ["cp1", "cp2"],
        "control planes first, cp1 leading"
    );
    let mut workers = order[2..].to_vec();
    workers.sort();
    assert_eq!(workers, ["w1", "w2"]);

    // ---- the recorded calls
    let upgrades: BTreeMap<&str, Vec<Call>> = NODES
        .iter()
        .map(|n| {
            let calls = kubeadm_calls(bed.machine(n))
                .into_iter()
                .filter(|c| c.argv.first().map(String::as_str) == Some("upgrade"))
                .collect();
            (*n, calls)
        })
        .collect();
    for (n, calls) in &upgrades {
        for c in calls {
            eprintln!("  {n}: kubeadm {} at {:.3}", c.argv.join(" "), c.at);
        }
    }
    let kubeadm_version = "v1.31.2";
    let cp1 = &upgrades["cp1"];
    assert_eq!(cp1.len(), 2, "cp1: plan and apply, once each: {cp1:#?}");
    assert_eq!(cp1[0].argv, ["upgrade", "plan", kubeadm_version]);
    assert_eq!(cp1[1].argv, ["upgrade", "apply", "-y", kubeadm_version]);
    for n in ["cp2", "w1", "w2"] {
        let calls = &upgrades[n];
        assert_eq!(
            calls.len(),
            1,
            "{n}: one `kubeadm upgrade node`: {calls:#?}"
        );
        assert_eq!(calls[0].argv, ["upgrade", "node"], "{n}");
    }
    // Each upgrade with kubeadm moved and the kubelet not yet.
    for n in NODES {
        for (_, words) in timed_lines(bed.machine(n), KUBEADM_UPGRADES_LOG) {
            assert_eq!(
                words.first().map(String::as_str),
                Some(format!("kubeadm={TO}").as_str()),
                "{n}: {words:?}"
            );
            assert_eq!(
                words.get(1).map(String::as_str),
                Some(format!("kubelet={FROM}").as_str()),
                "{n}: {words:?}"
            );
        }
    }
    // The kubelet restarted at TO once per node, after its upgrade.
    let restarted: BTreeMap<&str, f64> = NODES
        .iter()
        .map(|n| {
            let starts = kubelet_starts(bed.machine(n), TO);
            assert_eq!(starts.len(), 1, "{n}: kubelet starts at {TO}: {starts:?}");
            (*n, starts[0])
        })
        .collect();
    let upgraded_at = |n: &str| upgrades[n].last().expect("an upgrade").at;
    for n in NODES {
        assert!(
            restarted[n] > upgraded_at(n),
            "{n}: kubelet restarted at {:.3}, before its kubeadm upgrade at {:.3}",
            restarted[n],
            upgraded_at(n)
        );
    }
    // One node at a time, in the rollout's order.
    for pair in order.windows(2) {
        let (a, b) = (pair[0].as_str(), pair[1].as_str());
        assert!(
            upgrades[b][0].at > restarted[a],
            "{b}'s kubeadm upgrade at {:.3} before {a}'s kubelet restart at {:.3}",
            upgrades[b][0].at,
            restarted[a]
        );
    }
    eprintln!(
        "  leader killed at {killed_at:.3}: cp2's kubeadm upgrade node at {:.3}, its kubelet \
         restart at {:.3}",
        upgrades["cp2"][0].at, restarted["cp2"]
    );
    // Workers: cordoned and drained before, asked Ready, uncordoned after
    // (kubectl on cp1, the control plane that runs it).
    let kubectl = kubectl_calls(bed.machine("cp1"));
    let first = |what: &str, node: &str| -> f64 {
        kubectl
            .iter()
            .find(|c| {
                c.argv.iter().any(|a| a == what)
                    && c.argv.iter().any(|a| a == node)
                    && c.at > upgrades["cp1"][0].at
            })
            .map(|c| c.at)
            .unwrap_or_else(|| panic!("no kubectl {what} {node} on cp1: {kubectl:#?}"))
    };
    for w in ["w1", "w2"] {
        let cordon = first("cordon", w);
        let drain = first("drain", w);
        let uncordon = first("uncordon", w);
        let ready = kubectl
            .iter()
            .find(|c| c.argv.windows(2).any(|p| p[0] == "node" && p[1] == w) && c.at > restarted[w])
            .map(|c| c.at)
            .unwrap_or_else(|| panic!("{w} never asked Ready after its kubelet restart"));
        eprintln!(
            "  {w}: cordon {cordon:.3}, drain {drain:.3}, kubeadm upgrade node {:.3}, kubelet \
             {TO} {:.3}, get node {ready:.3}, uncordon {uncordon:.3}",
            upgraded_at(w),
            restarted[w]
        );
        assert!(
            cordon <= drain && drain < upgraded_at(w),
            "{w}: drained before its upgrade"
        );
        assert!(
            ready < uncordon,
            "{w}: asked Ready before it was uncordoned"
        );
        assert!(
            restarted[w] < uncordon,
            "{w}: uncordoned after its kubelet restart"
        );
    }
    // One batch at a time: the next worker is cordoned only once the one
    // before is back in service (uncordoned).
    let (a, b) = (order[2].as_str(), order[3].as_str());
    assert!(
        first("cordon", b) > first("uncordon", a),
        "{b} cordoned at {:.3}, before {a} was uncordoned at {:.3}",
        first("cordon", b),
        first("uncordon", a)
    );
    for cp in ["cp1", "cp2"] {
        assert!(
            kubectl
                .iter()
                .any(|c| c.argv.windows(2).any(|p| p[0] == "node" && p[1] == cp)
                    && c.at > restarted[cp]),
            "{cp} never asked Ready after its kubelet restart"
        );
        assert!(
            !kubectl
                .iter()
                .any(|c| c.argv.iter().any(|a| a == "cordon") && c.argv.iter().any(|a| a == cp)),
            "{cp}: a control plane is upgraded in place, not drained"
        );
    }

    // ---- the holds moved with each node
    let samples = samples.lock().expect("samples").clone();
    assert!(samples.len() > 20, "too few samples: {}", samples.len());
    let mut between_max = 0;
    for (at, state) in &samples {
        let moved: Vec<bool> = order
            .iter()
            .map(|n| state[n].get("kubeadm").map(String::as_str) == Some(TO))
            .collect();
        let prefix = moved.iter().take_while(|m| **m).count();
        assert!(
            moved[prefix..].iter().all(|m| !m),
            "at {at:.3}: kubeadm moved out of order ({order:?}): {state:?}"
        );
        let between: Vec<&String> = order
            .iter()
            .filter(|n| {
                state[*n].get("kubeadm").map(String::as_str) == Some(TO)
                    && state[*n].get("kubelet").map(String::as_str) == Some(FROM)
            })
            .collect();
        assert!(
            between.len() <= 1,
            "at {at:.3}: {between:?} upgrading at once"
        );
        between_max = between_max.max(between.len());
        for (n, packages) in state {
            assert!(
                !(packages.get("kubelet").map(String::as_str) == Some(TO)
                    && packages.get("kubeadm").map(String::as_str) != Some(TO)),
                "at {at:.3}: {n}'s kubelet moved before its kubeadm: {packages:?}"
            );
        }
    }
    assert_eq!(
        between_max, 1,
        "no sample caught a node between kubeadm and kubelet"
    );
    for n in NODES {
        let m = bed.machine(n);
        let holds = m.sh("apt-mark showhold");
        for p in KUBERNETES_PACKAGES {
            assert!(
                holds.lines().any(|l| l.trim() == p),
                "{n}: {p} not held:\n{holds}"
            );
        }
        let have = installed(m);
        for p in KUBERNETES_PACKAGES {
            assert_eq!(have.get(p).map(String::as_str), Some(TO), "{n}: {have:?}");
        }
    }
    for n in done["nodes"].as_array().expect("nodes") {
        let ms = &n["ms"];
        clock.say(format!(
            "{}: drain {} ms, change {} ms, converge {} ms, health {} ms, total {} ms",
            n["node"], ms["drain"], ms["change"], ms["converge"], ms["health"], ms["total"]
        ));
    }
    clock.say(format!(
        "{} samples: kubeadm moved in the rollout's order, one node at a time between its \
         kubeadm and kubelet moves; all held at {TO}",
        samples.len()
    ));
    findings.assert_none();
}

fn parse_status(status: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for stanza in status.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
                .map(str::to_owned)
        };
        let (Some(package), Some(version)) = (field("Package"), field("Version")) else {
            continue;
        };
        let state = field("Status").unwrap_or_default();
        if KUBERNETES_PACKAGES.contains(&package.as_str()) && state.ends_with(" installed") {
            out.insert(package, version);
        }
    }
    out
}
