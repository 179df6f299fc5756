//! Simulated agents for the fleet benchmark (`src/bin/bench-fleet.rs`):
//! many agents in one process, each with its own certificate (issued by the
//! cluster CA with `steward-pki`'s [`Signer`], as joins do) and its own
//! mutual-TLS HTTP/2 connection, speaking the real `AgentService.Session`
//! protocol the way `agent/src/session.rs` does: `Hello` with small facts,
//! heartbeats at the agent's default interval, a `Report` of the applied
//! revision whenever a desired state brings a new one, the next replica
//! after jittered exponential backoff when a session fails (4 s dial and
//! open deadlines, no ack for three heartbeats ends the session; at least
//! as long as a busy replica's `retry-after-ms` hint).
//!
//! What each agent saw is kept in an [`Obs`] per agent for the benchmark to
//! read; failures are counted in [`Counters`].

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use steward_coordinator::pki::Signer;
use steward_proto::domain::{
    AgentMessage, CoordinatorMessage, DesiredState, Disk, Facts, Health, NetworkInterface, NodeId,
    Role,
};
use steward_proto::pb;
use steward_proto::pb::agent_service_client::AgentServiceClient;
use steward_runtime::backoff::Backoff;
use steward_runtime::cadence::Cadence;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// As the agent: TCP connect, then the whole dial (TLS included), then the
/// session request up to the response headers.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const DIAL_DEADLINE: Duration = Duration::from_secs(4);
const OPEN_DEADLINE: Duration = Duration::from_secs(4);
const OUTBOUND_QUEUE: usize = 16;
const STABLE_SESSION: Duration = Duration::from_secs(10);
/// The role the one-node change adds; a node's desired state has it or not.
pub const PROBE_ROLE: Role = Role::Lb;

/// What one simulated agent has seen.
#[derive(Debug, Default, Clone)]
pub struct Obs {
    /// The replica (index into the URLs) serving its open session.
    pub connected: Option<usize>,
    pub session_opened_at: Option<Instant>,
    pub sessions: u32,
    pub first_desired_at: Option<Instant>,
    /// Desired states received (every message, repeated ones too).
    pub desired_count: u64,
    pub last_desired_at: Option<Instant>,
    pub last_rev: u64,
    /// Desired states whose revision was below the last one received.
    pub backwards: u32,
    /// Whether the last desired state had [`PROBE_ROLE`], and since when.
    pub has_role: bool,
    pub role_changed_at: Option<Instant>,
    /// The Kubernetes version in the last desired state (what the
    /// every-node change sets; empty: none), and since when.
    pub version: String,
    pub version_changed_at: Option<Instant>,
}

#[derive(Debug, Default)]
pub struct Counters {
    pub opened: AtomicU64,
    pub dial_failed: AtomicU64,
    pub open_failed: AtomicU64,
    pub lost: AtomicU64,
    pub desired: AtomicU64,
    pub reports: AtomicU64,
    /// Heartbeats sent (at the replicas' cadence: they may ask for sparser ones).
    pub heartbeats: AtomicU64,
    /// The sparsest heartbeat interval a replica asked for, in ms.
    pub widest_interval_ms: AtomicU64,
    /// Error texts (cut at 160 characters) and their counts.
    pub errors: Mutex<BTreeMap<String, u64>>,
}

impl Counters {
    /// Failed session attempts so far: dials, opens and sessions lost.
    pub fn failures(&self) -> u64 {
        self.dial_failed.load(Ordering::Relaxed)
            + self.open_failed.load(Ordering::Relaxed)
            + self.lost.load(Ordering::Relaxed)
    }

    fn error(&self, kind: ErrorKind, text: String) {
        let counter = match kind {
            ErrorKind::Dial => &self.dial_failed,
            ErrorKind::Open => &self.open_failed,
            ErrorKind::Lost => &self.lost,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let key: String = format!("{kind:?}: {text}").chars().take(160).collect();
        let mut errors = self.errors.lock().expect("errors");
        // Bounded: texts past the first thousand distinct ones are lumped.
        let key = if errors.len() < 1000 || errors.contains_key(&key) {
            key
        } else {
            format!("{kind:?}: (other texts)")
        };
        *errors.entry(key).or_default() += 1;
    }
}

#[derive(Debug, Clone, Copy)]
enum ErrorKind {
    Dial,
    Open,
    Lost,
}

pub struct SimAgent {
    pub node: NodeId,
    /// One per replica, each with this agent's own identity.
    endpoints: Vec<Endpoint>,
    index: usize,
    pub obs: Mutex<Obs>,
}

pub struct Fleet {
    pub agents: Vec<SimAgent>,
    pub counters: Counters,
    pub heartbeat: Duration,
    pub ack_timeout: Duration,
}

/// How long making the fleet's identities took.
#[derive(Debug, Clone, Copy)]
pub struct SetupTimes {
    /// Key pairs, CSRs and signing.
    pub issue: Duration,
    /// tonic TLS configs (one per agent and replica).
    pub tls: Duration,
}

/// `n` agents `fleet-00000` ... with certificates signed by the CA in
/// `pki_dir` (its `ca.crt` and `ca.key`), each with an endpoint per URL.
pub fn make_fleet(
    pki_dir: &Path,
    n: usize,
    urls: &[String],
    heartbeat: Duration,
) -> (Fleet, SetupTimes) {
    let ca_pem = std::fs::read(pki_dir.join("ca.crt")).expect("ca.crt");
    let ca = Certificate::from_pem(&ca_pem);
    let signer = Signer::from_files(
        &pki_dir.join("ca.crt"),
        &pki_dir.join("ca.key"),
        Duration::from_secs(365 * 24 * 3600),
    )
    .expect("signer");
    let mut issue = Duration::ZERO;
    let mut tls = Duration::ZERO;
    let mut agents = Vec::with_capacity(n);
    for index in 0..n {
        let started = Instant::now();
        let node = NodeId::new(node_name(index)).expect("node id");
        let key = rcgen::KeyPair::generate().expect("key pair");
        let csr = steward_agent::certs::csr_pem(node.as_str(), &key).expect("csr");
        let issued = signer.issue_agent(&node, &csr, None).expect("issue");
        let identity = Identity::from_pem(issued.certificate_pem, key.serialize_pem());
        let tls_started = Instant::now();
        issue += tls_started - started;
        let endpoints = urls
            .iter()
            .map(|url| {
                let host = url
                    .trim_start_matches("https://")
                    .rsplit_once(':')
                    .map(|(h, _)| h.to_owned())
                    .unwrap_or_default();
                Endpoint::from_shared(url.clone())
                    .expect("url")
                    .tls_config(
                        ClientTlsConfig::new()
                            .ca_certificate(ca.clone())
                            .identity(identity.clone())
                            .domain_name(host),
                    )
                    .expect("tls config")
                    .connect_timeout(CONNECT_TIMEOUT)
                    .tcp_nodelay(true)
            })
            .collect();
        tls += tls_started.elapsed();
        agents.push(SimAgent {
            node,
            endpoints,
            index,
            obs: Mutex::new(Obs::default()),
        });
    }
    let fleet = Fleet {
        agents,
        counters: Counters::default(),
        heartbeat,
        ack_timeout: heartbeat * 3,
    };
    (fleet, SetupTimes { issue, tls })
}

pub fn node_name(index: usize) -> String {
    format!("fleet-{index:05}")
}

impl Fleet {
    /// A copy of every agent's observations.
    pub fn snapshot(&self) -> Vec<Obs> {
        self.agents
            .iter()
            .map(|a| a.obs.lock().expect("obs").clone())
            .collect()
    }
}

/// Runs agent `index` until the task is dropped, after `delay`.
pub async fn run_agent(fleet: Arc<Fleet>, index: usize, delay: Duration) {
    tokio::time::sleep(delay).await;
    let agent = &fleet.agents[index];
    let replicas = agent.endpoints.len();
    // As the agent: start at a node-dependent replica.
    let mut next = agent
        .node
        .as_str()
        .bytes()
        .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b.into()))
        % replicas;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let started = Instant::now();
        let result = session(&fleet, agent, next).await;
        agent.obs.lock().expect("obs").connected = None;
        let (kind, text, hint) = result;
        fleet.counters.error(kind, text);
        if started.elapsed() >= STABLE_SESSION {
            backoff.reset();
        }
        next = (next + 1) % replicas;
        tokio::time::sleep(backoff.next_delay_hinted(hint)).await;
    }
}

/// One session; returns why it ended.
async fn session(
    fleet: &Fleet,
    agent: &SimAgent,
    replica: usize,
) -> (ErrorKind, String, Option<Duration>) {
    let channel =
        match tokio::time::timeout(DIAL_DEADLINE, agent.endpoints[replica].connect()).await {
            Err(_) => {
                return (
                    ErrorKind::Dial,
                    format!("no TLS session within {DIAL_DEADLINE:?}"),
                    None,
                )
            }
            Ok(Err(e)) => return (ErrorKind::Dial, error_chain(&e), None),
            Ok(Ok(c)) => c,
        };
    let mut client = AgentServiceClient::new(channel);
    let (tx, rx) = mpsc::channel::<pb::AgentMessage>(OUTBOUND_QUEUE);
    let last_rev = agent.obs.lock().expect("obs").last_rev;
    let hello = AgentMessage::Hello {
        node: agent.node.clone(),
        facts: facts(agent.index),
        last_applied_revision: last_rev,
        agent_version: "bench-fleet".to_owned(),
        advertise_address: Some(address(agent.index)),
    };
    if tx.try_send(hello.into()).is_err() {
        return (ErrorKind::Open, "cannot queue hello".into(), None);
    }
    let mut inbound =
        match tokio::time::timeout(OPEN_DEADLINE, client.session(ReceiverStream::new(rx))).await {
            Err(_) => {
                return (
                    ErrorKind::Open,
                    format!("no answer to the session request in {OPEN_DEADLINE:?}"),
                    None,
                )
            }
            Ok(Err(status)) => {
                // As the agent: a busy replica says when to come back.
                let hint = steward_proto::retry::retry_after(&status);
                return (ErrorKind::Open, format!("refused: {status}"), hint);
            }
            Ok(Ok(response)) => response.into_inner(),
        };
    {
        let mut obs = agent.obs.lock().expect("obs");
        obs.connected = Some(replica);
        obs.session_opened_at = Some(Instant::now());
        obs.sessions += 1;
    }
    fleet.counters.opened.fetch_add(1, Ordering::Relaxed);
    // As the agent: at the interval the replica asks for.
    let mut cadence = Cadence::new(fleet.heartbeat, fleet.ack_timeout);
    let mut tick = tokio::time::interval(cadence.interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    let mut last_ack = Instant::now();
    let mut reported: Option<u64> = None;
    let lost = |text: String| (ErrorKind::Lost, text, None);
    loop {
        // As the agent: biased, the replica's messages first (a late task
        // reads the ack waiting for it before judging it overdue).
        tokio::select! {
            biased;
            message = inbound.message() => {
                let message = match message {
                    Ok(Some(m)) => m,
                    Ok(None) => return lost("coordinator closed the session".into()),
                    Err(status) => {
                        let hint = steward_proto::retry::retry_after(&status);
                        return (ErrorKind::Lost, status.to_string(), hint);
                    }
                };
                match CoordinatorMessage::try_from(message) {
                    Ok(CoordinatorMessage::HeartbeatAck { interval_ms, .. }) => {
                        last_ack = Instant::now();
                        if let Some(every) = cadence.hinted(interval_ms) {
                            fleet
                                .counters
                                .widest_interval_ms
                                .fetch_max(u64::from(interval_ms), Ordering::Relaxed);
                            tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        }
                    }
                    Ok(CoordinatorMessage::DesiredState(desired)) => {
                        last_ack = Instant::now();
                        fleet.counters.desired.fetch_add(1, Ordering::Relaxed);
                        observe(agent, &desired);
                        // As the agent: report when the applied revision
                        // differs from what this session last reported.
                        if reported != Some(desired.revision) {
                            reported = Some(desired.revision);
                            let report = AgentMessage::Report {
                                applied_revision: desired.revision,
                                converge: None,
                            };
                            if let Err(e) = enqueue(&tx, report) {
                                return lost(e);
                            }
                            fleet.counters.reports.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => return lost(format!("invalid message from coordinator: {e}")),
                }
            }
            _ = tick.tick() => {
                if last_ack.elapsed() > cadence.ack_timeout() {
                    return lost("no heartbeat ack".into());
                }
                seq += 1;
                let hb = AgentMessage::Heartbeat {
                    seq,
                    sent_at_unix_ms: unix_ms(),
                    health: health(agent.index),
                };
                if let Err(e) = enqueue(&tx, hb) {
                    return lost(e);
                }
                fleet.counters.heartbeats.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn observe(agent: &SimAgent, desired: &DesiredState) {
    let now = Instant::now();
    let mut obs = agent.obs.lock().expect("obs");
    obs.desired_count += 1;
    obs.last_desired_at = Some(now);
    obs.first_desired_at.get_or_insert(now);
    if desired.revision < obs.last_rev {
        obs.backwards += 1;
    }
    obs.last_rev = desired.revision;
    let has_role = desired.roles.contains(&PROBE_ROLE);
    if has_role != obs.has_role {
        obs.has_role = has_role;
        obs.role_changed_at = Some(now);
    }
    let version = desired
        .cluster
        .settings
        .kubernetes
        .as_ref()
        .map_or_else(String::new, |k| k.version.clone());
    if version != obs.version {
        obs.version = version;
        obs.version_changed_at = Some(now);
    }
}

fn enqueue(tx: &mpsc::Sender<pb::AgentMessage>, message: AgentMessage) -> Result<(), String> {
    tx.try_send(message.into()).map_err(|e| match e {
        mpsc::error::TrySendError::Full(_) => "outbound queue full".to_owned(),
        mpsc::error::TrySendError::Closed(_) => "outbound stream closed".to_owned(),
    })
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg = format!("{msg}: {s}");
        source = s.source();
    }
    msg
}

/// A documentation-range address per node (never routed anywhere).
fn address(index: usize) -> std::net::IpAddr {
    let i = index as u32;
    std::net::Ipv4Addr::new(10, 200 + (i >> 16) as u8, (i >> 8) as u8, i as u8).into()
}

/// Small, realistic facts: a server with two disks and two interfaces.
fn facts(index: usize) -> Facts {
    Facts {
        hostname: node_name(index),
        os: "Debian GNU/Linux 12 (bookworm)".into(),
        kernel: "6.1.0-28-amd64".into(),
        cpus: 16,
        memory_bytes: 64 << 30,
        disks: vec![
            Disk {
                mount_point: "/".into(),
                total_bytes: 100 << 30,
                available_bytes: 71 << 30,
            },
            Disk {
                mount_point: "/var/lib".into(),
                total_bytes: 2 << 40,
                available_bytes: 1 << 40,
            },
        ],
        interfaces: vec![
            NetworkInterface {
                name: "eno1".into(),
                mac: format!("52:54:00:{:02x}:{:02x}:01", index >> 8 & 0xff, index & 0xff),
                addresses: vec![format!("{}/16", address(index)), "fe80::1/64".into()],
            },
            NetworkInterface {
                name: "eno2".into(),
                mac: format!("52:54:00:{:02x}:{:02x}:02", index >> 8 & 0xff, index & 0xff),
                addresses: vec![],
            },
        ],
        boot_id: format!("7b6c2f4e-0000-4000-8000-{index:012x}"),
        reboot_required: None,
    }
}

fn health(index: usize) -> Health {
    Health {
        load1: 0.5 + (index % 7) as f64 / 10.0,
        memory_used_bytes: 20 << 30,
        memory_total_bytes: 64 << 30,
        max_disk_used_fraction: 0.5,
    }
}
