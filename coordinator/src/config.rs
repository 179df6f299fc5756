//! `steward-coordinator` configuration: TOML, unknown keys rejected, every
//! default written down once (here), all problems reported together.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
pub use steward_lease::config::LeaseConfig;
use steward_lease::LeaseParams;
pub use steward_runtime::{ConfigError, TlsFiles};

/// Coordinator replicas a cluster runs unless `vip.replicas` says otherwise.
pub const DEFAULT_REPLICAS: usize = 3;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// This replica's id, unique within the cluster.
    pub id: String,
    /// Cluster name; all state lives under `/steward/<cluster>/` in etcd.
    #[serde(default = "default_cluster")]
    pub cluster: String,
    /// Address the gRPC server binds.
    pub listen: SocketAddr,
    /// URL agents and peers use to reach this replica.
    pub advertise: String,
    pub tls: TlsFiles,
    pub etcd: EtcdConfig,
    #[serde(default)]
    pub timing: Timing,
    /// Timing of the VIP lease protocol; must agree with the agents'.
    #[serde(default)]
    pub vip: LeaseConfig,
    /// Sealing of cluster secrets (Kubernetes join token, certificate key,
    /// CA key) in etcd. Every replica needs the same key.
    pub secrets: Option<SecretsConfig>,
    /// Where `GET /metrics` (Prometheus text format, plain HTTP) is served;
    /// absent: nowhere.
    pub metrics_listen: Option<SocketAddr>,
    /// Certificates for agents: joining by token and renewal. Without it
    /// this replica issues none.
    pub pki: Option<PkiConfig>,
    /// What unauthenticated connections may cost on each listener.
    #[serde(default)]
    pub limits: Limits,
    /// Fleet-scale limits of agent sessions (SECURITY.md lists them).
    #[serde(default)]
    pub sessions: SessionLimits,
    /// How long each step of a rollout may take.
    #[serde(default)]
    pub rollout: RolloutTimeouts,
}

/// `[rollout]`: how long a node may spend in each step of a rollout before
/// it fails the rollout (`stewardctl rollout status` says which step).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutTimeouts {
    /// A gate refusing the node's drain, then the drain itself.
    #[serde(default = "default_rollout_drain_timeout_s")]
    pub drain_timeout_s: u64,
    /// The agent applying and converging the change.
    #[serde(default = "default_rollout_converge_timeout_s")]
    pub converge_timeout_s: u64,
    /// The agent healthy and its roles ready again.
    #[serde(default = "default_rollout_health_timeout_s")]
    pub health_timeout_s: u64,
}

impl Default for RolloutTimeouts {
    fn default() -> Self {
        Self {
            drain_timeout_s: default_rollout_drain_timeout_s(),
            converge_timeout_s: default_rollout_converge_timeout_s(),
            health_timeout_s: default_rollout_health_timeout_s(),
        }
    }
}

impl RolloutTimeouts {
    pub fn step_timeouts(&self) -> crate::rollout::driver::StepTimeouts {
        crate::rollout::driver::StepTimeouts {
            drain: Duration::from_secs(self.drain_timeout_s),
            converge: Duration::from_secs(self.converge_timeout_s),
            health: Duration::from_secs(self.health_timeout_s),
        }
    }
}

fn default_rollout_drain_timeout_s() -> u64 {
    300
}
fn default_rollout_converge_timeout_s() -> u64 {
    600
}
fn default_rollout_health_timeout_s() -> u64 {
    300
}

/// `[sessions]`: how many sessions open at once, how often one node's
/// status may be written, how much a node may say about itself.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionLimits {
    /// Sessions being admitted (their etcd reads and writes) at once; the
    /// rest wait in a queue.
    #[serde(default = "default_max_concurrent_opens")]
    pub max_concurrent_opens: usize,
    /// Sessions waiting to be admitted; beyond this a hello is refused
    /// with UNAVAILABLE and a hint of when to retry (the agent waits that
    /// long, jittered).
    #[serde(default = "default_max_queued_opens")]
    pub max_queued_opens: usize,
    /// Longest a hello waits for its turn (ms) before its stream is
    /// answered: below the agent's 4 s deadline for an answer. It then
    /// waits on the answered stream, its heartbeats acked, until its turn.
    #[serde(default = "default_max_open_wait_ms")]
    pub max_open_wait_ms: u64,
    /// One node's status is written at most once per this interval on
    /// average (health flaps are damped, not mirrored into etcd)...
    #[serde(default = "default_status_write_interval_ms")]
    pub status_write_interval_ms: u64,
    /// ...with bursts of up to this many writes.
    #[serde(default = "default_status_write_burst")]
    pub status_write_burst: u32,
    /// Largest facts (encoded JSON) stored for a node; larger facts are
    /// cut down to fit (lists shortened, long strings cut) and logged.
    #[serde(default = "default_max_facts_bytes")]
    pub max_facts_bytes: usize,
    /// One node may open a session at most once per this interval on
    /// average (per replica)...
    #[serde(default = "default_hello_interval_ms")]
    pub hello_interval_ms: u64,
    /// ...with bursts of up to this many; beyond, its hello is refused
    /// with UNAVAILABLE (the agent backs off).
    #[serde(default = "default_hello_burst")]
    pub hello_burst: u32,
    /// Heartbeats this replica budgets for, per second: serving more agents
    /// than this, it asks them for sparser heartbeats (at most one per 30 s
    /// each), so its idle cost stays bounded. A node counts as unreachable
    /// after three of its intervals pass silent (or
    /// `timing.agent_unreachable_after_ms`, if longer).
    #[serde(default = "default_heartbeats_per_s")]
    pub heartbeats_per_s: u32,
    /// Node status writes this replica has in flight to etcd at once; the
    /// others wait (each session's writer keeps only its latest status, so
    /// waiting coalesces). A change every node consumes makes every node
    /// report a new applied revision at once: unbounded, 10,000 writes from
    /// three replicas outran etcd's apply loop, and etcd refused every
    /// request ("too many requests"), an operator's next apply included.
    #[serde(default = "default_max_concurrent_status_writes")]
    pub max_concurrent_status_writes: usize,
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self {
            max_concurrent_opens: default_max_concurrent_opens(),
            max_queued_opens: default_max_queued_opens(),
            max_open_wait_ms: default_max_open_wait_ms(),
            status_write_interval_ms: default_status_write_interval_ms(),
            status_write_burst: default_status_write_burst(),
            max_facts_bytes: default_max_facts_bytes(),
            hello_interval_ms: default_hello_interval_ms(),
            hello_burst: default_hello_burst(),
            heartbeats_per_s: default_heartbeats_per_s(),
            max_concurrent_status_writes: default_max_concurrent_status_writes(),
        }
    }
}

fn default_max_concurrent_opens() -> usize {
    32
}
fn default_max_concurrent_status_writes() -> usize {
    64
}
fn default_max_queued_opens() -> usize {
    16_384
}
fn default_max_open_wait_ms() -> u64 {
    2000
}
fn default_status_write_interval_ms() -> u64 {
    2000
}
fn default_status_write_burst() -> u32 {
    4
}
fn default_max_facts_bytes() -> usize {
    16 * 1024
}
fn default_hello_interval_ms() -> u64 {
    5000
}
fn default_hello_burst() -> u32 {
    10
}
/// `sessions.heartbeats_per_s` unless set.
pub const DEFAULT_HEARTBEATS_PER_S: u32 = 2000;

fn default_heartbeats_per_s() -> u32 {
    DEFAULT_HEARTBEATS_PER_S
}

/// `[limits]`: connection caps of the gRPC and join listeners (the packaged
/// unit's `LimitNOFILE=65536` leaves room for all of them together).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Time a client has to finish the TLS handshake (ms).
    #[serde(default = "default_handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
    /// Connections still in the TLS handshake, per listener; more wait in
    /// the kernel's backlog.
    #[serde(default = "default_max_pending_handshakes")]
    pub max_pending_handshakes: usize,
    /// With `max_pending_handshakes` in progress, the age (ms) from which
    /// the oldest is dropped to make room for a new connection.
    #[serde(default = "default_handshake_evict_after_ms")]
    pub handshake_evict_after_ms: u64,
    /// Connections open at once on `listen` (agents, stewardctl, peers);
    /// more are closed at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Connections open at once on `pki.bootstrap_listen`.
    #[serde(default = "default_max_join_connections")]
    pub max_join_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshake_timeout_ms: default_handshake_timeout_ms(),
            max_pending_handshakes: default_max_pending_handshakes(),
            handshake_evict_after_ms: default_handshake_evict_after_ms(),
            max_connections: default_max_connections(),
            max_join_connections: default_max_join_connections(),
        }
    }
}

fn default_handshake_timeout_ms() -> u64 {
    10_000
}
fn default_max_pending_handshakes() -> usize {
    256
}
fn default_handshake_evict_after_ms() -> u64 {
    2_000
}
fn default_max_connections() -> usize {
    16_384
}
fn default_max_join_connections() -> usize {
    256
}

impl Limits {
    fn connection_limits(
        &self,
        max_connections: usize,
    ) -> steward_runtime::listener::ConnectionLimits {
        steward_runtime::listener::ConnectionLimits {
            handshake_timeout: Duration::from_millis(self.handshake_timeout_ms),
            max_pending_handshakes: self.max_pending_handshakes,
            evict_after: Duration::from_millis(self.handshake_evict_after_ms),
            max_connections,
        }
    }

    /// The gRPC listener's limits.
    pub fn grpc(&self) -> steward_runtime::listener::ConnectionLimits {
        self.connection_limits(self.max_connections)
    }

    /// The join listener's limits.
    pub fn join(&self) -> steward_runtime::listener::ConnectionLimits {
        self.connection_limits(self.max_join_connections)
    }
}

/// `[pki]`: the CA key this replica signs agent certificates with.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PkiConfig {
    /// The key of the CA in `tls.ca`.
    pub ca_key: std::path::PathBuf,
    /// Lifetime of the agent certificates this replica issues; agents renew
    /// at two thirds of it.
    #[serde(default = "default_agent_cert_validity_s")]
    pub agent_cert_validity_s: u64,
    /// Where joining nodes reach this replica: server TLS only (they have no
    /// certificate yet; their token authenticates them). Absent: no joins
    /// here, renewals still are.
    pub bootstrap_listen: Option<SocketAddr>,
}

/// Shortest agent certificate lifetime accepted (tests use short ones).
pub const MIN_AGENT_CERT_VALIDITY_S: u64 = 20;

fn default_agent_cert_validity_s() -> u64 {
    365 * 24 * 3600
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretsConfig {
    /// 64 hex digits; `stewardctl pki init` writes one as `secrets.key`.
    pub key_file: std::path::PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    /// TLS to etcd; omit for a plaintext etcd on a trusted network.
    pub tls: Option<TlsFiles>,
    #[serde(default = "default_dial_timeout_ms")]
    pub dial_timeout_ms: u64,
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timing {
    /// TTL of this replica's etcd lease (membership and leadership). A replica
    /// that dies silently loses leadership after at most this long.
    #[serde(default = "default_member_lease_ttl_s")]
    pub member_lease_ttl_s: u64,
    /// A connected agent whose heartbeats stop for this long is unreachable.
    #[serde(default = "default_agent_unreachable_after_ms")]
    pub agent_unreachable_after_ms: u64,
    /// How many audit events (everything but session churn) the leader
    /// keeps in etcd.
    #[serde(default = "default_events_retained")]
    pub events_retained: u32,
    /// How many session events (node-connected, node-disconnected) the
    /// leader keeps in etcd, apart from the audit events.
    #[serde(default = "default_events_retained")]
    pub session_events_retained: u32,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            member_lease_ttl_s: default_member_lease_ttl_s(),
            agent_unreachable_after_ms: default_agent_unreachable_after_ms(),
            events_retained: default_events_retained(),
            session_events_retained: default_events_retained(),
        }
    }
}

fn default_cluster() -> String {
    "default".into()
}
fn default_dial_timeout_ms() -> u64 {
    2000
}
fn default_request_timeout_ms() -> u64 {
    5000
}
fn default_member_lease_ttl_s() -> u64 {
    3
}
fn default_agent_unreachable_after_ms() -> u64 {
    3000
}
fn default_events_retained() -> u32 {
    1000
}

fn is_valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

fn check_readable(problems: &mut Vec<String>, what: &str, path: &Path) {
    if let Err(e) = std::fs::metadata(path) {
        problems.push(format!("{what} {}: {e}", path.display()));
    }
}

impl CoordinatorConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let config: Self = steward_runtime::read_toml(path)?;
        config.validate().map_err(|problems| ConfigError {
            path: path.to_owned(),
            problems,
        })?;
        Ok(config)
    }

    /// Checks everything serde cannot; returns every problem at once.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut p = Vec::new();
        let l = &self.sessions;
        if l.max_concurrent_opens == 0
            || l.status_write_burst == 0
            || l.hello_burst == 0
            || l.max_concurrent_status_writes == 0
        {
            p.push(
                "sessions.max_concurrent_opens, sessions.status_write_burst, \
                 sessions.hello_burst and sessions.max_concurrent_status_writes must be at \
                 least 1"
                    .into(),
            );
        }
        if !(1024..=1024 * 1024).contains(&l.max_facts_bytes) {
            p.push(format!(
                "sessions.max_facts_bytes = {}: must be between 1024 and 1048576",
                l.max_facts_bytes
            ));
        }
        if !(10..=1_000_000).contains(&l.heartbeats_per_s) {
            p.push(format!(
                "sessions.heartbeats_per_s = {}: must be between 10 and 1000000",
                l.heartbeats_per_s
            ));
        }
        if !(100..=3500).contains(&l.max_open_wait_ms) {
            p.push(format!(
                "sessions.max_open_wait_ms = {}: must be between 100 and 3500 (agents give up \
                 on an unanswered session request after 4 s)",
                l.max_open_wait_ms
            ));
        }
        if !is_valid_name(&self.id) {
            p.push(format!(
                "id {:?}: use 1-63 letters, digits, '-' or '.'",
                self.id
            ));
        }
        if !is_valid_name(&self.cluster) {
            p.push(format!(
                "cluster {:?}: use 1-63 letters, digits, '-' or '.'",
                self.cluster
            ));
        }
        if !self.advertise.starts_with("https://") {
            p.push(format!(
                "advertise {:?}: must be an https:// URL (all traffic is mutual TLS)",
                self.advertise
            ));
        }
        check_readable(&mut p, "tls.ca", &self.tls.ca);
        if let Some(secrets) = &self.secrets {
            if let Err(e) = crate::orchestrate::secrets::SecretBox::from_file(&secrets.key_file) {
                p.push(format!("secrets.key_file: {e}"));
            }
        }
        check_readable(&mut p, "tls.cert", &self.tls.cert);
        if let Some(pki) = &self.pki {
            check_readable(&mut p, "pki.ca_key", &pki.ca_key);
            if pki.agent_cert_validity_s < MIN_AGENT_CERT_VALIDITY_S {
                p.push(format!(
                    "pki.agent_cert_validity_s = {}: must be at least {MIN_AGENT_CERT_VALIDITY_S}",
                    pki.agent_cert_validity_s
                ));
            }
            if pki.bootstrap_listen.is_some_and(|b| b == self.listen) {
                p.push("pki.bootstrap_listen must differ from listen".into());
            }
        }
        check_readable(&mut p, "tls.key", &self.tls.key);
        if self.etcd.endpoints.is_empty() {
            p.push("etcd.endpoints: list at least one endpoint".into());
        }
        for e in &self.etcd.endpoints {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                p.push(format!(
                    "etcd.endpoints: {e:?} must start with http:// or https://"
                ));
            }
        }
        if let Some(tls) = &self.etcd.tls {
            check_readable(&mut p, "etcd.tls.ca", &tls.ca);
            check_readable(&mut p, "etcd.tls.cert", &tls.cert);
            check_readable(&mut p, "etcd.tls.key", &tls.key);
        }
        if self.etcd.dial_timeout_ms == 0 || self.etcd.request_timeout_ms == 0 {
            p.push("etcd.dial_timeout_ms and etcd.request_timeout_ms must be positive".into());
        }
        if !(2..=60).contains(&self.timing.member_lease_ttl_s) {
            p.push(format!(
                "timing.member_lease_ttl_s = {}: must be between 2 and 60",
                self.timing.member_lease_ttl_s
            ));
        }
        if self.timing.agent_unreachable_after_ms < 500 {
            p.push("timing.agent_unreachable_after_ms must be at least 500".into());
        }
        let r = &self.rollout;
        for (key, value) in [
            ("rollout.drain_timeout_s", r.drain_timeout_s),
            ("rollout.converge_timeout_s", r.converge_timeout_s),
            ("rollout.health_timeout_s", r.health_timeout_s),
        ] {
            if !(5..=86_400).contains(&value) {
                p.push(format!("{key} = {value}: must be between 5 and 86400"));
            }
        }
        if self.timing.events_retained < 10 || self.timing.session_events_retained < 10 {
            p.push(
                "timing.events_retained and timing.session_events_retained must be at least 10"
                    .into(),
            );
        }
        if !(10..=self.limits.handshake_timeout_ms.max(10))
            .contains(&self.limits.handshake_evict_after_ms)
        {
            p.push(format!(
                "limits.handshake_evict_after_ms = {}: must be between 10 and limits.handshake_timeout_ms",
                self.limits.handshake_evict_after_ms
            ));
        }
        if !(100..=120_000).contains(&self.limits.handshake_timeout_ms) {
            p.push(format!(
                "limits.handshake_timeout_ms = {}: must be between 100 and 120000",
                self.limits.handshake_timeout_ms
            ));
        }
        for (key, value) in [
            ("max_pending_handshakes", self.limits.max_pending_handshakes),
            ("max_connections", self.limits.max_connections),
            ("max_join_connections", self.limits.max_join_connections),
        ] {
            if !(1..=1_000_000).contains(&value) {
                p.push(format!(
                    "limits.{key} = {value}: must be between 1 and 1000000"
                ));
            }
        }
        if self.metrics_listen == Some(self.listen) {
            p.push("metrics_listen: must differ from listen".into());
        }
        if let Err(problems) = self.vip.params(DEFAULT_REPLICAS) {
            p.extend(problems);
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(p)
        }
    }

    pub fn member_lease_ttl(&self) -> Duration {
        Duration::from_secs(self.timing.member_lease_ttl_s)
    }

    /// The lease protocol's parameters (validated at load).
    pub fn lease_params(&self) -> LeaseParams {
        self.vip
            .params(DEFAULT_REPLICAS)
            .unwrap_or(LeaseParams::DEFAULT)
    }

    /// The URL joining nodes use: `advertise` with the bootstrap port.
    pub fn bootstrap_advertise(&self) -> Option<String> {
        let port = self.pki.as_ref()?.bootstrap_listen?.port();
        let rest = self.advertise.strip_prefix("https://")?;
        let authority = rest.split('/').next()?;
        let host = match authority.rsplit_once(':') {
            // An IPv6 literal without a port ends in ']'.
            Some((host, port)) if !port.contains(']') => host,
            _ => authority,
        };
        Some(format!("https://{host}:{port}"))
    }

    pub fn agent_unreachable_after(&self) -> Duration {
        Duration::from_millis(self.timing.agent_unreachable_after_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packaged(path: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// The packaged unit's open-file limit holds every connection the
    /// default caps allow at once, plus room for etcd, the metrics
    /// endpoint and the files a replica reads.
    #[test]
    fn the_default_connection_caps_fit_the_packaged_file_limit() {
        let unit = packaged("packaging/systemd/steward-coordinator.service");
        let nofile: usize = unit
            .lines()
            .find_map(|l| l.strip_prefix("LimitNOFILE="))
            .expect("the unit sets LimitNOFILE=")
            .parse()
            .expect("a number");
        let l = Limits::default();
        // The pending handshakes are among the open connections on each
        // listener; the metrics endpoint holds 16 more.
        let connections = l.max_connections + l.max_join_connections + 16;
        assert!(
            connections + 1024 <= nofile,
            "{connections} connections and a margin of 1,024 exceed LimitNOFILE={nofile}"
        );
        assert!(l.max_pending_handshakes <= l.max_join_connections);
    }

    /// The example config writes the defaults down as they are.
    #[test]
    fn the_example_config_states_the_default_limits() {
        let table: toml::Table = packaged("packaging/coordinator.example.toml")
            .parse()
            .expect("toml");
        let limits: Limits = table["limits"].clone().try_into().expect("[limits]");
        assert_eq!(limits.grpc(), Limits::default().grpc());
        assert_eq!(limits.join(), Limits::default().join());
    }
}
