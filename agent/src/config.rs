//! `steward-agent` configuration: TOML, unknown keys rejected, every default
//! written down once (here), all problems reported together.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use steward_lease::config::LeaseConfig;
use steward_lease::LeaseParams;
use steward_proto::domain::NodeId;
pub use steward_runtime::{ConfigError, TlsFiles};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This node's id; must match the common name of `tls.cert`. Defaults to
    /// the host name, lowercased.
    pub node_id: Option<String>,
    /// Coordinator replicas (https:// URLs). The agent talks to one at a
    /// time and moves to the next when it fails.
    pub coordinators: Vec<String>,
    pub tls: TlsFiles,
    /// Where the agent keeps its last desired state.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default = "default_heartbeat_interval_ms")]
    pub heartbeat_interval_ms: u64,
    /// How often the agent looks whether the host needs a reboot
    /// (`/run/reboot-required`, `needs-restarting -r`).
    #[serde(default = "default_reboot_check_interval_s")]
    pub reboot_check_interval_s: u64,
    /// A session with no heartbeat ack for this long is abandoned and the
    /// agent moves to another replica. Defaults to 3 heartbeats.
    pub ack_timeout_ms: Option<u64>,
    /// The address the rest of the cluster reaches this node at (HAProxy
    /// backends, Kubernetes and Gluster peers). Default: the address this
    /// node's session to the coordinator comes from.
    pub advertise_address: Option<std::net::IpAddr>,
    /// The floating-IP lease protocol (nodes with the lb role).
    #[serde(default)]
    pub vip: AgentVipConfig,
    /// Converging the host onto its roles.
    #[serde(default)]
    pub converge: AgentConvergeConfig,
    /// Where `GET /metrics` (Prometheus text format, plain HTTP) is served;
    /// absent: nowhere. The agent's only listener.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// `[converge]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConvergeConfig {
    /// false: record and report roles, but leave the host alone.
    #[serde(default = "default_converge_enabled")]
    pub enabled: bool,
    /// How often an unchanged host is checked for drift.
    #[serde(default = "default_recheck_s")]
    pub recheck_interval_s: u64,
    /// First retry after a failed run (doubling up to the recheck interval).
    #[serde(default = "default_retry_s")]
    pub retry_s: u64,
}

impl Default for AgentConvergeConfig {
    fn default() -> Self {
        Self {
            enabled: default_converge_enabled(),
            recheck_interval_s: default_recheck_s(),
            retry_s: default_retry_s(),
        }
    }
}

fn default_converge_enabled() -> bool {
    true
}
fn default_recheck_s() -> u64 {
    60
}
fn default_retry_s() -> u64 {
    2
}

/// `[vip]`: timing must agree with the coordinators' `[vip]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentVipConfig {
    /// "default" or "fast"; see packaging/agent.example.toml.
    pub profile: Option<String>,
    pub heartbeat_ms: Option<u64>,
    pub lease_ms: Option<u64>,
    pub drift_margin: Option<f64>,
    /// Coordinator replicas in the cluster. Default: the number of
    /// `coordinators` listed.
    pub replicas: Option<usize>,
    /// How long an ARP probe / DAD solicitation waits for an answer before
    /// the address counts as free.
    #[serde(default = "default_probe_wait_ms")]
    pub probe_wait_ms: u64,
    /// How often the local health check of each VIP runs.
    #[serde(default = "default_check_interval_ms")]
    pub check_interval_ms: u64,
    /// HAProxy's admin socket, for the default `haproxy` check.
    #[serde(default = "default_haproxy_socket")]
    pub haproxy_socket: PathBuf,
}

/// What an absent `[vip]` means: the same defaults as an empty one.
impl Default for AgentVipConfig {
    fn default() -> Self {
        Self {
            profile: None,
            heartbeat_ms: None,
            lease_ms: None,
            drift_margin: None,
            replicas: None,
            probe_wait_ms: default_probe_wait_ms(),
            check_interval_ms: default_check_interval_ms(),
            haproxy_socket: default_haproxy_socket(),
        }
    }
}

fn default_probe_wait_ms() -> u64 {
    30
}
fn default_check_interval_ms() -> u64 {
    50
}
fn default_haproxy_socket() -> PathBuf {
    "/run/haproxy/admin.sock".into()
}

/// Validated `[vip]`.
#[derive(Debug, Clone)]
pub struct VipSettings {
    pub lease: LeaseParams,
    pub probe_wait: Duration,
    pub check_interval: Duration,
    pub haproxy_socket: PathBuf,
}

fn default_state_dir() -> PathBuf {
    "/var/lib/steward-agent".into()
}
fn default_heartbeat_interval_ms() -> u64 {
    1000
}
fn default_reboot_check_interval_s() -> u64 {
    60
}

/// A validated config.
#[derive(Debug, Clone)]
pub struct Settings {
    pub node_id: NodeId,
    pub coordinators: Vec<String>,
    pub tls: TlsFiles,
    pub state_dir: PathBuf,
    pub heartbeat_interval: Duration,
    pub reboot_check_interval: Duration,
    pub ack_timeout: Duration,
    pub advertise_address: Option<std::net::IpAddr>,
    pub vip: VipSettings,
    pub converge: crate::converge::ConvergeSettings,
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// The node id when none is given: the host name, lowercased.
pub fn default_node_id() -> String {
    sysinfo::System::host_name()
        .map(|h| h.to_lowercase())
        .unwrap_or_default()
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        let config: Self = steward_runtime::read_toml(path)?;
        config.validate().map_err(|problems| ConfigError {
            path: path.to_owned(),
            problems,
        })
    }

    pub fn validate(self) -> Result<Settings, Vec<String>> {
        let mut p = Vec::new();
        let raw_id = match self.node_id {
            Some(id) => id,
            None => default_node_id(),
        };
        let node_id = NodeId::new(raw_id)
            .map_err(|e| p.push(format!("node_id: {e}")))
            .ok();
        if self.coordinators.is_empty() {
            p.push("coordinators: list at least one https:// URL".into());
        }
        for c in &self.coordinators {
            if !c.starts_with("https://") {
                p.push(format!(
                    "coordinators: {c:?} must be an https:// URL (all traffic is mutual TLS)"
                ));
            }
        }
        for (what, path) in [
            ("tls.ca", &self.tls.ca),
            ("tls.cert", &self.tls.cert),
            ("tls.key", &self.tls.key),
        ] {
            if let Err(e) = std::fs::metadata(path) {
                p.push(format!("{what} {}: {e}", path.display()));
            }
        }
        if !(50..=60_000).contains(&self.heartbeat_interval_ms) {
            p.push(format!(
                "heartbeat_interval_ms = {}: must be between 50 and 60000",
                self.heartbeat_interval_ms
            ));
        }
        if !(1..=86_400).contains(&self.reboot_check_interval_s) {
            p.push(format!(
                "reboot_check_interval_s = {}: must be between 1 and 86400",
                self.reboot_check_interval_s
            ));
        }
        let ack_timeout_ms = self
            .ack_timeout_ms
            .unwrap_or(3 * self.heartbeat_interval_ms);
        if ack_timeout_ms < 2 * self.heartbeat_interval_ms {
            p.push(format!(
                "ack_timeout_ms = {ack_timeout_ms}: must be at least two heartbeat intervals"
            ));
        }
        let lease = LeaseConfig {
            profile: self.vip.profile.clone(),
            heartbeat_ms: self.vip.heartbeat_ms,
            lease_ms: self.vip.lease_ms,
            drift_margin: self.vip.drift_margin,
            replicas: self.vip.replicas,
        }
        .params(self.coordinators.len().max(1))
        .map_err(|problems| p.extend(problems))
        .ok();
        if !(1..=2000).contains(&self.vip.probe_wait_ms) {
            p.push(format!(
                "vip.probe_wait_ms = {}: must be between 1 and 2000",
                self.vip.probe_wait_ms
            ));
        }
        if !(10..=10_000).contains(&self.vip.check_interval_ms) {
            p.push(format!(
                "vip.check_interval_ms = {}: must be between 10 and 10000",
                self.vip.check_interval_ms
            ));
        }
        if !(1..=86_400).contains(&self.converge.recheck_interval_s) {
            p.push(format!(
                "converge.recheck_interval_s = {}: must be between 1 and 86400",
                self.converge.recheck_interval_s
            ));
        }
        if self.converge.retry_s == 0 || self.converge.retry_s > self.converge.recheck_interval_s {
            p.push(format!(
                "converge.retry_s = {}: must be at least 1 and at most recheck_interval_s",
                self.converge.retry_s
            ));
        }
        match (node_id, lease) {
            (Some(node_id), Some(lease)) if p.is_empty() => Ok(Settings {
                node_id,
                coordinators: self.coordinators,
                tls: self.tls,
                state_dir: self.state_dir,
                heartbeat_interval: Duration::from_millis(self.heartbeat_interval_ms),
                reboot_check_interval: Duration::from_secs(self.reboot_check_interval_s),
                ack_timeout: Duration::from_millis(ack_timeout_ms),
                advertise_address: self.advertise_address,
                metrics_listen: self.metrics_listen,
                converge: crate::converge::ConvergeSettings {
                    enabled: self.converge.enabled,
                    recheck: Duration::from_secs(self.converge.recheck_interval_s),
                    retry: Duration::from_secs(self.converge.retry_s),
                },
                vip: VipSettings {
                    lease,
                    probe_wait: Duration::from_millis(self.vip.probe_wait_ms),
                    check_interval: Duration::from_millis(self.vip.check_interval_ms),
                    haproxy_socket: self.vip.haproxy_socket,
                },
            }),
            _ => Err(p),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> AgentConfig {
        toml::from_str(toml_text).expect("parses")
    }

    /// Only existence of the TLS files is checked here; any file will do.
    const MINIMAL: &str = concat!(
        "node_id = \"node-1\"\n",
        "coordinators = [\"https://127.0.0.1:7400\"]\n",
        "[tls]\n",
        "ca = \"",
        env!("CARGO_MANIFEST_DIR"),
        "/Cargo.toml\"\n",
        "cert = \"",
        env!("CARGO_MANIFEST_DIR"),
        "/Cargo.toml\"\n",
        "key = \"",
        env!("CARGO_MANIFEST_DIR"),
        "/Cargo.toml\"\n",
    );

    #[test]
    fn a_config_without_vip_section_gets_the_same_defaults_as_an_empty_one() {
        let absent = parse(MINIMAL).validate().expect("minimal config is valid");
        let empty = parse(&format!("{MINIMAL}\n[vip]\n"))
            .validate()
            .expect("empty [vip] is valid");
        assert_eq!(absent.vip.probe_wait, Duration::from_millis(30));
        assert_eq!(absent.vip.check_interval, Duration::from_millis(50));
        assert_eq!(absent.vip.probe_wait, empty.vip.probe_wait);
        assert_eq!(absent.vip.check_interval, empty.vip.check_interval);
        assert_eq!(absent.vip.haproxy_socket, empty.vip.haproxy_socket);
    }

    #[test]
    fn out_of_range_vip_timing_is_reported_together() {
        let problems = parse(&format!(
            "{MINIMAL}\n[vip]\nprobe_wait_ms = 0\ncheck_interval_ms = 1\n"
        ))
        .validate()
        .expect_err("invalid");
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("vip.probe_wait_ms"), "{problems:?}");
        assert!(
            problems[1].contains("vip.check_interval_ms"),
            "{problems:?}"
        );
    }
}
