//! `steward-agent`: runs on every node. Reports facts and health, pulls the
//! node's desired state from a coordinator replica and keeps it in force.
//!
//! **Architecture invariants:**
//! - The agent opens every connection (agents pull); it never listens for
//!   control traffic. Its only listener is the optional, read-only metrics
//!   endpoint ([`metrics`], `metrics_listen`).
//! - The desired state in force survives coordinator outages and agent
//!   restarts: it is recorded atomically before it is acknowledged.
//! - A VIP is bound only under a quorum-acknowledged lease ([`vip`]), and
//!   recorded before it is bound so that nothing is left behind.
//! - The host is converged by pure planners ([`roles`]) and an engine that
//!   only changes what differs ([`converge`]), on a blocking thread so that
//!   a slow package install never delays a heartbeat or a lease.
//! - The session loop and the VIP driver never await without a deadline,
//!   and prove it to systemd's watchdog ([`watchdog`]): an agent whose
//!   loops stop is restarted, not left running deaf.

pub mod address;
pub mod arp;
pub mod certs;
pub mod config;
pub mod converge;
pub mod facts;
pub mod gluster_probe;
pub mod health_check;
pub mod join;
pub mod logs;
pub mod metrics;
pub mod ndp;
pub mod network;
pub mod packet;
pub mod reboot;
pub mod roles;
pub mod session;
pub mod state;
pub mod vip;
pub mod watchdog;

use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Settings;
use crate::session::{run_sessions, Credentials};
use crate::state::{RecordedState, StateStore};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{what} {path}: {source}")]
    ReadFile {
        what: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("VIP handling: {0}")]
    Network(#[from] crate::address::NetError),
    #[error("metrics endpoint on {addr}: {source}")]
    Metrics {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

fn read(what: &'static str, path: &std::path::Path) -> Result<Vec<u8>, AgentError> {
    std::fs::read(path).map_err(|source| AgentError::ReadFile {
        what,
        path: path.to_owned(),
        source,
    })
}

/// Runs the agent until `shutdown`.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> Result<(), AgentError> {
    // Read at every dial (a renewed certificate is picked up by the next
    // connection); read once here so that missing files fail the start.
    for (what, path) in [
        ("tls.ca", &settings.tls.ca),
        ("tls.cert", &settings.tls.cert),
        ("tls.key", &settings.tls.key),
    ] {
        read(what, path)?;
    }
    let creds = Credentials::new(settings.tls.clone());
    let renewal = certs::run_renewal(
        settings.node_id.to_string(),
        creds.clone(),
        settings.coordinators.clone(),
        shutdown.clone(),
    );
    // Bound first: a bad metrics address fails the start, not a scrape.
    let metrics_listener = match settings.metrics_listen {
        Some(addr) => Some(
            steward_runtime::bind_metrics(addr)
                .await
                .map_err(|source| AgentError::Metrics { addr, source })?,
        ),
        None => None,
    };
    let state = StateStore::new(&settings.state_dir);
    let recorded = match state.load() {
        Ok(Some(r)) => {
            info!(
                revision = r.desired.revision,
                roles = %steward_proto::convert::roles_display(&r.desired.roles),
                "resuming with recorded desired state"
            );
            r
        }
        Ok(None) => RecordedState::default(),
        Err(error) => {
            // The coordinator sends the full desired state on connect, so a
            // damaged record costs nothing but a fresh download.
            warn!(%error, "ignoring unreadable recorded state");
            RecordedState::default()
        }
    };
    // The replicas this agent refuses, until a newer desired state says.
    creds.set_coordinator_revocations(&recorded.desired.coordinator_revocations);
    metrics::metrics()
        .desired_revision
        .set(recorded.desired.revision as i64);
    if let Some(listener) = metrics_listener {
        steward_runtime::spawn_metrics_endpoint(
            listener,
            metrics::metrics().registry.clone(),
            shutdown.clone(),
        );
    }
    let (desired, in_force) = watch::channel(recorded);
    let reboots = reboot::run_reboots(
        settings.state_dir.clone(),
        desired.subscribe(),
        std::sync::Arc::new(reboot::SystemdReboot),
        shutdown.clone(),
    );
    let (reboot_tx, reboot_rx) = watch::channel(None);
    let reboot_check = reboot::run_reboot_check(
        reboot::RebootSigns::default(),
        settings.reboot_check_interval,
        reboot_tx,
        shutdown.clone(),
    );
    info!(node.id = %settings.node_id, coordinators = ?settings.coordinators, "agent starting");
    let (reports, reported) = watch::channel(None);
    let converge = converge::run_converge(
        settings.converge.clone(),
        in_force.clone(),
        reports,
        shutdown.clone(),
    );
    let (gluster_tx, gluster_rx) = watch::channel(None);
    let gluster = gluster_probe::run_gluster_probe(
        settings.node_id.clone(),
        in_force.clone(),
        reported.clone(),
        gluster_tx,
        shutdown.clone(),
    );
    let liveness = watchdog::Liveness::new();
    let vips = vip::run_vips(
        settings.clone(),
        creds.clone(),
        in_force,
        liveness.register("vips"),
        shutdown.clone(),
    );
    let sessions = run_sessions(
        settings,
        creds,
        state,
        desired,
        reported,
        gluster_rx,
        reboot_rx,
        liveness.register("session"),
        shutdown.clone(),
    );
    let watchdog =
        watchdog::run_watchdog(watchdog::Watchdog::from_env(), liveness, shutdown.clone());
    watchdog::notify_ready();
    let (vips, (), (), (), (), (), (), ()) = tokio::join!(
        async {
            let result = vips.await;
            if result.is_err() {
                // Without VIP handling the agent must not pretend to run.
                shutdown.cancel();
            }
            result
        },
        sessions,
        converge,
        renewal,
        watchdog,
        gluster,
        reboots,
        reboot_check
    );
    info!("agent stopped");
    vips.map_err(AgentError::from)
}
