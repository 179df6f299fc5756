//! The packaged alert rules (`packaging/prometheus/steward-alerts.yml`):
//! they query only series the daemons export, `promtool` accepts them and
//! their unit tests pass, and Debian's real Prometheus, scraping real
//! coordinators and a real agent, puts the VIP-without-holder alert in
//! pending once the only candidate holding the VIP crashes silently.
//!
//! Needs root (a network namespace for the lb host), etcd and Debian's
//! `prometheus` package (promtool and the server; `scripts/deps.sh`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use steward_tests::metered_lb::{MeteredLb, VIP_NAME};
use steward_tests::scrape::{exported, http_exchange, steward_series_in};
use steward_tests::{eventually, free_port, repo_root, Proc};

fn rules_dir() -> PathBuf {
    repo_root().join("packaging/prometheus")
}

fn rules() -> PathBuf {
    rules_dir().join("steward-alerts.yml")
}

/// Series Prometheus makes itself that the rules may use.
const SYNTHETIC: &[&str] = &["up"];

/// Every `steward_*` name in the rules (expressions and annotations alike)
/// is a series the daemons export, and every alert the issue asks for is
/// there.
#[test]
fn the_alert_rules_use_exported_series_only() {
    let text = std::fs::read_to_string(rules()).expect("rules");
    let exported = exported();
    let used = steward_series_in(&text);
    assert!(!used.is_empty(), "no steward_ series found in the rules");
    for name in &used {
        assert!(
            exported.series.contains(name),
            "the rules use {name}, which nothing exports"
        );
    }
    for word in SYNTHETIC {
        assert!(
            text.contains(&format!("{word}{{")),
            "{word} is allowed but unused"
        );
    }
    for alert in [
        "StewardVipWithoutHolder",
        "StewardNodeDisconnected",
        "StewardNodeDown",
        "StewardConvergeFailing",
        "StewardCertificateExpiringSoon",
        "StewardNoLeader",
        "StewardEtcdLatencyHigh",
    ] {
        assert!(
            text.contains(&format!("- alert: {alert}\n")),
            "no alert {alert}"
        );
    }
}

fn promtool(args: &[&str]) -> (bool, String) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(rules_dir())
        .output()
        .expect("run promtool (apt-get install prometheus; scripts/deps.sh)");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn promtool_checks_the_rules_and_their_unit_tests_pass() {
    let (ok, out) = promtool(&["check", "rules", "steward-alerts.yml"]);
    assert!(ok, "promtool check rules:\n{out}");
    eprintln!("{out}");
    let (ok, out) = promtool(&["test", "rules", "steward-alerts.test.yml"]);
    assert!(ok, "promtool test rules:\n{out}");
    eprintln!("{out}");
}

/// A Prometheus server on loopback with the packaged rules, scraping the
/// bed's replicas (job steward-coordinator) and agent (job steward-agent)
/// every second and evaluating every second.
struct Prometheus {
    /// Killed (by pid) when dropped.
    _proc: Proc,
    addr: SocketAddr,
}

impl Prometheus {
    fn start(bed: &MeteredLb) -> Prometheus {
        let dir = bed.cluster.dir.path().join("prometheus");
        std::fs::create_dir_all(&dir).expect("prometheus dir");
        let targets = |addrs: &[SocketAddr]| {
            addrs
                .iter()
                .map(|a| format!("\"{a}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules}\n\
             scrape_configs:\n\
             \x20 - job_name: steward-coordinator\n    static_configs:\n      - targets: [{replicas}]\n\
             \x20 - job_name: steward-agent\n    static_configs:\n      - targets: [{agent}]\n",
            rules = rules().display(),
            replicas = targets(&bed.replicas),
            agent = targets(&[bed.agent_metrics]),
        );
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write prometheus.yml");
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let mut cmd = Command::new("prometheus");
        cmd.arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn");
        let proc = Proc::spawn("prometheus", cmd, dir.join("prometheus.log"));
        let p = Prometheus { _proc: proc, addr };
        eventually(Duration::from_secs(30), "Prometheus to be ready", || {
            p.get("/-/ready")
                .filter(|b| b.contains("Ready"))
                .map(|_| ())
        });
        p
    }

    /// The body of `GET path`, `None` if it cannot be had.
    fn get(&self, path: &str) -> Option<String> {
        // HTTP/1.0: the whole body, then the connection closes.
        let request = format!("GET {path} HTTP/1.0\r\nHost: prometheus\r\n\r\n");
        let response = http_exchange(self.addr, request.as_bytes()).ok()?;
        let (head, body) = response.split_once("\r\n\r\n")?;
        (steward_tests::scrape::status_code(head) == Some(200)).then(|| body.to_owned())
    }

    fn api(&self, path: &str) -> Option<Value> {
        let v: Value = serde_json::from_str(&self.get(path)?).ok()?;
        (v["status"] == "success").then(|| v["data"].clone())
    }

    /// An instant query's result vector.
    fn query(&self, promql: &str) -> Option<Vec<Value>> {
        let q: String = promql
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' | b'-' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        self.api(&format!("/api/v1/query?query={q}"))?["result"]
            .as_array()
            .cloned()
    }

    /// Alerts now (pending and firing), as (name, labels, state).
    fn alerts(&self) -> Option<Vec<(String, Value, String)>> {
        let data = self.api("/api/v1/alerts")?;
        Some(
            data["alerts"]
                .as_array()?
                .iter()
                .map(|a| {
                    (
                        a["labels"]["alertname"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                        a["labels"].clone(),
                        a["state"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect(),
        )
    }

    /// The rule `alert`'s last evaluation time, as Prometheus prints it.
    fn last_evaluation(&self, alert: &str) -> Option<String> {
        let data = self.api("/api/v1/rules?type=alert")?;
        data["groups"]
            .as_array()?
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .find(|r| r["name"] == alert)
            .and_then(|r| r["lastEvaluation"].as_str().map(str::to_owned))
    }

    /// Waits until `alert` has been evaluated `n` more times.
    fn wait_evaluations(&self, alert: &str, n: usize) {
        let mut last = self.last_evaluation(alert);
        for _ in 0..n {
            last = Some(eventually(
                Duration::from_secs(10),
                &format!("another evaluation of {alert}"),
                || {
                    self.last_evaluation(alert)
                        .filter(|t| Some(t) != last.as_ref())
                },
            ));
        }
    }
}

#[test]
fn prometheus_puts_the_vip_without_holder_alert_in_pending_after_a_silent_crash() {
    let bed = MeteredLb::start("alerts");
    let prometheus = Prometheus::start(&bed);
    let t0 = Instant::now();

    // Every target scraped, and the VIP acked by every replica as
    // Prometheus sees it.
    eventually(Duration::from_secs(30), "all four targets up", || {
        let up = prometheus.query("up == 1")?;
        (up.len() == 4).then_some(())
    });
    eventually(
        Duration::from_secs(30),
        "Prometheus to see every replica ack the VIP",
        || {
            let acking =
                prometheus.query(&format!("steward_vip_acking{{vip=\"{VIP_NAME}\"}} == 1"))?;
            (acking.len() == 3).then_some(())
        },
    );
    // Two evaluations while the VIP is held: the alert must be quiet.
    prometheus.wait_evaluations("StewardVipWithoutHolder", 2);
    let alerts = prometheus.alerts().expect("alerts");
    let vip_alerts: Vec<_> = alerts
        .iter()
        .filter(|(name, _, _)| name == "StewardVipWithoutHolder")
        .collect();
    assert!(
        vip_alerts.is_empty(),
        "the VIP is held, yet: {vip_alerts:?}"
    );
    assert!(
        !alerts.iter().any(|(name, _, _)| name == "StewardNoLeader"),
        "a leader exists, yet: {alerts:?}"
    );
    eprintln!(
        "[{:>5.1}s] VIP held by lb1, acked by 3 replicas; no alert (all: {:?})",
        t0.elapsed().as_secs_f64(),
        alerts.iter().map(|a| &a.0).collect::<Vec<_>>()
    );

    // lb1, the only candidate, vanishes from the network without a word.
    let crash = Instant::now();
    bed.lb.link_down();
    let (labels, state) = eventually(
        Duration::from_secs(30),
        "StewardVipWithoutHolder to go pending",
        || {
            prometheus
                .alerts()?
                .into_iter()
                .find(|(name, labels, _)| {
                    name == "StewardVipWithoutHolder" && labels["vip"] == VIP_NAME
                })
                .map(|(_, labels, state)| (labels, state))
        },
    );
    eprintln!(
        "[{:>5.1}s] StewardVipWithoutHolder {state} {:.1} s after lb1 vanished: {labels}",
        t0.elapsed().as_secs_f64(),
        crash.elapsed().as_secs_f64()
    );
    // The rule waits 15 s before firing: pending first.
    assert_eq!(state, "pending", "{labels}");
    assert_eq!(labels["severity"], "critical");
    // And the node itself: unreachable, pending too.
    let down = eventually(
        Duration::from_secs(30),
        "StewardNodeDown for lb1 to go pending",
        || {
            prometheus.alerts()?.into_iter().find(|(name, labels, _)| {
                name == "StewardNodeDown"
                    && labels["instance"] == bed.agent_metrics.to_string().as_str()
            })
        },
    );
    eprintln!(
        "[{:>5.1}s] StewardNodeDown {} for {}",
        t0.elapsed().as_secs_f64(),
        down.2,
        down.1["instance"]
    );
}
