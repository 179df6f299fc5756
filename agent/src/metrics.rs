//! The agent's metrics (Prometheus text format, served on `metrics_listen`):
//! its session, heartbeat round trips, VIP leases and converge runs.
//!
//! **Invariant:** updates are a few atomics (a labelled child is looked up
//! without allocating); nothing here does IO, so a heartbeat costs what it
//! did.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use steward_proto::converge::ConvergeReport;
use steward_runtime::metrics::{
    Counter, Family, Gauge, Histogram, Registry, LATENCY_BUCKETS, RUN_BUCKETS,
};

/// Every series the agent exports.
pub struct Metrics {
    pub registry: Arc<Registry>,
    pub session_connected: Arc<Gauge>,
    pub session_replica: Arc<Family<Gauge>>,
    pub sessions_opened: Arc<Counter>,
    pub reconnects: Arc<Counter>,
    pub heartbeats_sent: Arc<Counter>,
    pub heartbeat_rtt: Arc<Histogram>,
    pub desired_revision: Arc<Gauge>,
    pub vip_holding: Arc<Family<Gauge>>,
    pub vip_acks: Arc<Family<Gauge>>,
    pub vip_binds: Arc<Family<Counter>>,
    pub vip_releases: Arc<Family<Counter>>,
    pub vip_lease_rtt: Arc<Histogram>,
    pub converge_duration: Arc<Family<Histogram>>,
    pub converge_failed_runs: Arc<Counter>,
    pub converge_failed_resources: Arc<Gauge>,
    pub converge_last_run: Arc<Gauge>,
    pub certificate_expiry: Arc<Gauge>,
    pub certificate_renewals: Arc<Family<Counter>>,
    pub replicas_refused: Arc<Counter>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// This process's metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    fn new() -> Self {
        let r = Registry::new();
        r.build_info("agent", crate::VERSION);
        Self {
            session_connected: r.gauge(
                "steward_agent_session_connected",
                "1 while the agent has a session with a coordinator replica, else 0.",
            ),
            session_replica: r.gauge_vec(
                "steward_agent_session_replica",
                "1 for the replica the agent's session is with (no series while disconnected).",
                &["replica"],
            ),
            sessions_opened: r.counter(
                "steward_agent_sessions_opened_total",
                "Sessions opened with a coordinator replica.",
            ),
            reconnects: r.counter(
                "steward_agent_reconnects_total",
                "Sessions opened after an earlier one was lost (failovers and reconnects).",
            ),
            heartbeats_sent: r.counter(
                "steward_agent_heartbeats_sent_total",
                "Session heartbeats sent.",
            ),
            heartbeat_rtt: r.histogram(
                "steward_agent_heartbeat_rtt_seconds",
                "Session heartbeat round trip: send to the replica's ack.",
                LATENCY_BUCKETS,
            ),
            desired_revision: r.gauge(
                "steward_agent_desired_revision",
                "Revision of the desired state in force (recorded on disk).",
            ),
            vip_holding: r.gauge_vec(
                "steward_agent_vip_holding",
                "1 while the VIP is bound on this node under a lease, else 0 (lb nodes).",
                &["vip"],
            ),
            vip_acks: r.gauge_vec(
                "steward_agent_vip_lease_acks",
                "Replicas whose ack of this node's epoch is fresh (a quorum lets it hold), per VIP.",
                &["vip"],
            ),
            vip_binds: r.counter_vec(
                "steward_agent_vip_binds_total",
                "VIP addresses bound on this node.",
                &["vip"],
            ),
            vip_releases: r.counter_vec(
                "steward_agent_vip_releases_total",
                "VIP addresses removed from this node.",
                &["vip"],
            ),
            vip_lease_rtt: r.histogram(
                "steward_agent_vip_lease_rtt_seconds",
                "VIP lease heartbeat round trip to each replica: send to ack.",
                LATENCY_BUCKETS,
            ),
            converge_duration: r.histogram_vec(
                "steward_agent_converge_duration_seconds",
                "Converge run time, by result (ok, changed, failed).",
                &["result"],
                RUN_BUCKETS,
            ),
            converge_failed_runs: r.counter(
                "steward_agent_converge_failed_runs_total",
                "Converge runs in which some resource failed.",
            ),
            converge_failed_resources: r.gauge(
                "steward_agent_converge_failed_resources",
                "Resources that failed in the last converge run.",
            ),
            converge_last_run: r.gauge(
                "steward_agent_converge_last_run_timestamp_seconds",
                "When the last converge run finished (Unix time).",
            ),
            certificate_expiry: r.gauge(
                "steward_agent_certificate_expiry_timestamp_seconds",
                "When the agent's certificate on disk expires (Unix time); renewal is due at two thirds of its lifetime.",
            ),
            certificate_renewals: r.counter_vec(
                "steward_agent_certificate_renewals_total",
                "Certificate renewal attempts, by result (renewed, failed).",
                &["result"],
            ),
            replicas_refused: r.counter(
                "steward_agent_replicas_refused_total",
                "Connections to a replica refused, or sessions and lease streams ended, because its certificate is not a coordinator's or a coordinator revocation covers it.",
            ),
            registry: Arc::new(r),
        }
    }

    /// A session with `replica` is open.
    pub fn session_opened(&self, replica: &str) {
        if self.sessions_opened.get() > 0 {
            self.reconnects.inc();
        }
        self.sessions_opened.inc();
        self.session_replica.clear();
        self.session_replica.with(&[replica]).set(1);
        self.session_connected.set(1);
    }

    /// The session (if any) ended.
    pub fn session_closed(&self) {
        self.session_connected.set(0);
        self.session_replica.clear();
    }

    /// A heartbeat's ack came back `rtt` after it was sent.
    pub fn heartbeat_acked(&self, rtt: Duration) {
        self.heartbeat_rtt.observe(rtt);
    }

    /// A converge run finished.
    pub fn converge_run(&self, report: &ConvergeReport) {
        let result = report.result_label();
        self.converge_duration
            .with(&[result])
            .observe(Duration::from_millis(report.duration_ms.into()));
        let failed = report.failed().count();
        if failed > 0 {
            self.converge_failed_runs.inc();
        }
        self.converge_failed_resources.set(failed as i64);
        self.converge_last_run
            .set((report.finished_unix_ms / 1000) as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use steward_proto::converge::{ResourceState, ResourceStatus};

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn sessions_replicas_and_runs_are_counted() {
        let m = Metrics::new();
        m.session_opened("https://a:1");
        m.session_closed();
        m.session_opened("https://b:2");
        let failed = ConvergeReport {
            revision: 3,
            finished_unix_ms: 1_700_000_000_500,
            duration_ms: 1500,
            resources: vec![ResourceState {
                id: "package:haproxy".into(),
                status: ResourceStatus::Failed,
                detail: "no".into(),
                since_unix_ms: 1,
            }],
        };
        m.converge_run(&failed);
        let mut changed = failed.clone();
        changed.resources[0].status = ResourceStatus::Changed;
        m.converge_run(&changed);
        m.converge_run(&ConvergeReport {
            resources: Vec::new(),
            ..failed
        });
        let text = m.registry.render();
        let v = |s: &str| value(&text, s);
        assert_eq!(v("steward_agent_session_connected"), Some(1.0));
        assert_eq!(
            v("steward_agent_session_replica{replica=\"https://b:2\"}"),
            Some(1.0)
        );
        assert!(!text.contains("https://a:1"), "{text}");
        assert_eq!(v("steward_agent_sessions_opened_total"), Some(2.0));
        assert_eq!(v("steward_agent_reconnects_total"), Some(1.0));
        assert_eq!(
            v("steward_agent_converge_duration_seconds_count{result=\"failed\"}"),
            Some(1.0)
        );
        assert_eq!(
            v("steward_agent_converge_duration_seconds_sum{result=\"failed\"}"),
            Some(1.5)
        );
        assert_eq!(
            v("steward_agent_converge_duration_seconds_count{result=\"ok\"}"),
            Some(1.0)
        );
        assert_eq!(
            v("steward_agent_converge_duration_seconds_count{result=\"changed\"}"),
            Some(1.0)
        );
        assert_eq!(v("steward_agent_converge_failed_runs_total"), Some(1.0));
        assert_eq!(v("steward_agent_converge_failed_resources"), Some(0.0));
        assert_eq!(
            v("steward_agent_converge_last_run_timestamp_seconds"),
            Some(1_700_000_000.0)
        );
    }
}
