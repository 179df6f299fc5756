//! Converging the host onto the desired state: the roles' planners
//! ([`crate::roles`]) say what the host needs, the [`engine::Engine`]
//! observes, diffs and applies it through the [`host::Host`] traits.
//!
//! The loop runs again at once when the desired state changes, every
//! `recheck` to catch drift, and sooner (with backoff) while something
//! failed. Runs happen on a blocking thread: a slow `apt-get` never delays
//! a heartbeat or a VIP lease. Every step is idempotent, so an agent killed
//! mid-run simply runs again after its restart.

pub mod engine;
pub mod fake;
pub mod gluster;
pub mod host;
pub mod resource;
pub mod system;

use std::time::Duration;

use steward_proto::converge::ConvergeReport;
use steward_runtime::backoff::Backoff;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::state::RecordedState;

#[derive(Debug, Clone)]
pub struct ConvergeSettings {
    /// Off: the agent records and reports its roles but leaves the host
    /// alone (for agents sharing a machine, as in the demo and tests).
    pub enabled: bool,
    /// How often an unchanged desired state is checked for drift.
    pub recheck: Duration,
    /// First retry after a failed run; doubles up to `recheck`.
    pub retry: Duration,
}

/// Converges the host until `shutdown`, publishing every run's report.
pub async fn run_converge(
    settings: ConvergeSettings,
    mut in_force: watch::Receiver<RecordedState>,
    reports: watch::Sender<Option<ConvergeReport>>,
    shutdown: CancellationToken,
) {
    if !settings.enabled {
        info!("converging is off ([converge] enabled = false): the host is left as it is");
        // Keep `reports` open: a closed channel would wake its readers
        // forever.
        shutdown.cancelled().await;
        drop(reports);
        return;
    }
    let mut engine = engine::Engine::default();
    let mut retry = Backoff::new(settings.retry, settings.recheck.max(settings.retry));
    loop {
        let desired = in_force.borrow_and_update().desired.clone();
        let plan = crate::roles::plan(&desired);
        let revision = desired.revision;
        let joined = tokio::task::spawn_blocking(move || {
            let host = system::System::detect();
            let report = engine.run(&host, &plan, revision);
            (engine, report)
        })
        .await;
        let report = match joined {
            Ok((e, report)) => {
                engine = e;
                report
            }
            Err(error) => {
                // A panic in a run is a bug; keep the agent up and retry.
                warn!(%error, "converge run panicked");
                engine = engine::Engine::default();
                tokio::time::sleep(settings.retry).await;
                continue;
            }
        };
        let failed: Vec<&str> = report.failed().map(|r| r.id.as_str()).collect();
        let changed = report
            .resources
            .iter()
            .filter(|r| r.status == steward_proto::converge::ResourceStatus::Changed)
            .count();
        let next = if failed.is_empty() {
            retry.reset();
            settings.recheck
        } else {
            retry.next_delay()
        };
        if !failed.is_empty() {
            warn!(revision, ?failed, retry_in = ?next, "converge run failed");
        } else if changed > 0 {
            info!(revision, changed, ms = report.duration_ms, "host converged");
        }
        for r in report.failed() {
            warn!(resource = %r.id, error = %r.detail, "resource failed");
        }
        crate::metrics::metrics().converge_run(&report);
        reports.send_replace(Some(report));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = in_force.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(next) => {}
        }
    }
}

#[cfg(test)]
mod tests;
