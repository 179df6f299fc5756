//! The replica's metrics (Prometheus text format, served on
//! `metrics_listen`): one process-wide set, updated where things happen
//! (sessions, leadership, placement, lease acks, the etcd channel) and read
//! at scrape time where the numbers already live (sessions in memory, the
//! `vips/` cache, the acker).
//!
//! **Invariant:** updates are a few atomics, never IO or an etcd call;
//! heartbeats stay as cheap as they were.

use std::sync::{Arc, LazyLock};

use steward_proto::converge::ConvergeReport;
use steward_runtime::listener::ListenerStats;
use steward_runtime::metrics::{
    Counter, Family, Gauge, Histogram, Registry, LATENCY_BUCKETS, RUN_BUCKETS,
};
use tokio::sync::watch;

use crate::replica::Leadership;

/// Every series a replica exports.
pub struct Metrics {
    pub registry: Arc<Registry>,
    pub heartbeats: Arc<Counter>,
    pub is_leader: Arc<Gauge>,
    pub leader_epoch: Arc<Gauge>,
    pub leader_transitions: Arc<Family<Counter>>,
    pub vip_owner_moves: Arc<Family<Counter>>,
    pub vip_release_requests: Arc<Family<Counter>>,
    pub vip_lease_acks: Arc<Family<Counter>>,
    pub converge_reports: Arc<Family<Counter>>,
    pub converge_duration: Arc<Family<Histogram>>,
    pub converge_failed_resources: Arc<Counter>,
    pub etcd_duration: Arc<Family<Histogram>>,
    pub etcd_errors: Arc<Family<Counter>>,
    pub joins: Arc<Family<Counter>>,
    pub certificates_issued: Arc<Family<Counter>>,
    pub desired_pushes: Arc<Counter>,
    pub sessions_refused_busy: Arc<Counter>,
    pub sessions_queued: Arc<Counter>,
    pub status_writes_deferred: Arc<Counter>,
    pub facts_truncated: Arc<Counter>,
    pub session_events_suppressed: Arc<Family<Counter>>,
    /// The gRPC listener's dropped connections.
    pub grpc_listener: Arc<ListenerStats>,
    /// The join listener's dropped connections.
    pub join_listener: Arc<ListenerStats>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// This process's metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    fn new() -> Self {
        let r = Registry::new();
        r.build_info("coordinator", crate::VERSION);
        let connections_dropped = r.counter_vec(
            "steward_connections_dropped_total",
            "Connections a listener (grpc, join) closed before serving them, by reason: connection_limit (max_connections open), handshake_evicted (max_pending_handshakes reached and the oldest stalled one, waiting for its client, older than handshake_evict_after_ms), handshake_timeout, handshake_failed, abandoned_before_handshake (the client had closed it by the time its handshake turn came).",
            &["listener", "reason"],
        );
        Self {
            desired_pushes: r.counter(
                "steward_desired_state_pushes_total",
                "Desired states this replica sent to agents (only when a node's own state changed).",
            ),
            sessions_refused_busy: r.counter(
                "steward_sessions_refused_busy_total",
                "Session hellos refused with a retry hint: sessions.max_queued_opens were already waiting to be admitted, the node's hello budget was spent, or no turn came within 120 s.",
            ),
            sessions_queued: r.counter(
                "steward_sessions_queued_total",
                "Sessions whose turn had not come within sessions.max_open_wait_ms: answered at once and admitted later, their heartbeats acked meanwhile.",
            ),
            status_writes_deferred: r.counter(
                "steward_status_writes_deferred_total",
                "Node status changes held back by the per-node status write rate (written later, coalesced).",
            ),
            facts_truncated: r.counter(
                "steward_facts_truncated_total",
                "Agent facts cut down to sessions.max_facts_bytes before being stored.",
            ),
            heartbeats: r.counter(
                "steward_heartbeats_received_total",
                "Agent session heartbeats this replica received (each is acked).",
            ),
            is_leader: r.gauge(
                "steward_is_leader",
                "1 while this replica is the elected leader, else 0.",
            ),
            leader_epoch: r.gauge(
                "steward_leader_epoch",
                "The leader epoch (create revision of the leader key) while this replica leads, else 0.",
            ),
            leader_transitions: r.counter_vec(
                "steward_leader_transitions_total",
                "Changes of this replica's role: to=\"leader\" when it was elected, to=\"follower\" when it stepped down.",
                &["to"],
            ),
            vip_owner_moves: r.counter_vec(
                "steward_vip_owner_moves_total",
                "New VIP owners written by this replica as leader (fenced placement), by VIP.",
                &["vip"],
            ),
            vip_release_requests: r.counter_vec(
                "steward_vip_release_requests_total",
                "Requests to a VIP's holder to let go, written by this replica as leader.",
                &["vip"],
            ),
            vip_lease_acks: r.counter_vec(
                "steward_vip_lease_acks_sent_total",
                "VIP lease epochs this replica acked to their holders, by VIP.",
                &["vip"],
            ),
            converge_reports: r.counter_vec(
                "steward_converge_reports_received_total",
                "Converge reports received from agents (sent when an outcome changes and once per new session), by result.",
                &["result"],
            ),
            converge_duration: r.histogram_vec(
                "steward_converge_report_duration_seconds",
                "Run time of the converge runs agents reported, by result.",
                &["result"],
                RUN_BUCKETS,
            ),
            converge_failed_resources: r.counter(
                "steward_converge_failed_resources_total",
                "Failed resources in the converge reports received.",
            ),
            etcd_duration: r.histogram_vec(
                "steward_etcd_request_duration_seconds",
                "etcd request latency by operation, every call of this replica (streams: until opened).",
                &["op"],
                LATENCY_BUCKETS,
            ),
            etcd_errors: r.counter_vec(
                "steward_etcd_request_errors_total",
                "etcd requests that failed (transport errors and gRPC errors answered at once), by operation.",
                &["op"],
            ),
            joins: r.counter_vec(
                "steward_joins_total",
                "Node joins this replica answered, by result (joined, refused).",
                &["result"],
            ),
            certificates_issued: r.counter_vec(
                "steward_certificates_issued_total",
                "Agent certificates this replica signed, by reason (join, renewal).",
                &["reason"],
            ),
            session_events_suppressed: r.counter_vec(
                "steward_session_events_suppressed_total",
                "Session events (node-connected, node-disconnected) this replica did not record: beyond one pair per node per 10 s, by kind.",
                &["kind"],
            ),
            grpc_listener: Arc::new(ListenerStats::in_family(&connections_dropped, "grpc")),
            join_listener: Arc::new(ListenerStats::in_family(&connections_dropped, "join")),
            registry: Arc::new(r),
        }
    }

    /// A converge report an agent sent.
    pub fn converge_report(&self, report: &ConvergeReport) {
        let result = report.result_label();
        self.converge_reports.with(&[result]).inc();
        self.converge_duration
            .with(&[result])
            .observe(std::time::Duration::from_millis(report.duration_ms.into()));
        self.converge_failed_resources
            .add(report.failed().count() as u64);
    }

    /// Follows `leadership` until its sender is gone: `is_leader`, the epoch
    /// and the transitions.
    pub async fn follow_leadership(&self, mut leadership: watch::Receiver<Leadership>) {
        let mut leading = false;
        loop {
            let epoch = match &*leadership.borrow_and_update() {
                Leadership::Leader(fence) => Some(fence.epoch),
                Leadership::Follower => None,
            };
            leading = self.note_leadership(leading, epoch);
            if leadership.changed().await.is_err() {
                return;
            }
        }
    }

    /// Records the leadership now (`epoch` while leading) after `leading`;
    /// returns whether this replica leads.
    fn note_leadership(&self, leading: bool, epoch: Option<i64>) -> bool {
        let now_leading = epoch.is_some();
        if now_leading != leading {
            let to = if now_leading { "leader" } else { "follower" };
            self.leader_transitions.with(&[to]).inc();
        }
        self.is_leader.set(i64::from(now_leading));
        self.leader_epoch.set(epoch.unwrap_or(0));
        now_leading
    }
}

/// Registers the series read at scrape time from this replica's state.
pub fn register_views(
    sessions: crate::sessions::Sessions,
    vips: watch::Receiver<Arc<crate::vip::VipSnapshot>>,
    hub: Arc<crate::vip::lease_api::LeaseHub>,
) {
    let r = &metrics().registry;
    r.gauge_fn(
        "steward_connected_agents",
        "Agent sessions this replica serves now.",
        &[],
        move |s| s.add(&[], sessions.len() as f64),
    );
    let owners = vips.clone();
    r.gauge_fn(
        "steward_vip_owner",
        "1 for each VIP's owner as etcd records it (this replica's view); a VIP without an owner has none.",
        &["vip", "node"],
        move |s| {
            for (name, state) in &owners.borrow().vips {
                if let Some(node) = state.owner_node() {
                    s.add(&[name, node.as_str()], 1.0);
                }
            }
        },
    );
    let epochs = vips.clone();
    r.gauge_fn(
        "steward_vip_epoch",
        "Each VIP's current epoch (mod revision of its owner key), 0 if never assigned.",
        &["vip"],
        move |s| {
            for (name, state) in &epochs.borrow().vips {
                s.add(&[name], state.epoch() as f64);
            }
        },
    );
    let marks = vips;
    r.gauge_fn(
        "steward_vip_expiry_marks",
        "Replicas that marked each VIP's current epoch expired or released.",
        &["vip"],
        move |s| {
            for (name, state) in &marks.borrow().vips {
                s.add(&[name], state.current_marks() as f64);
            }
        },
    );
    r.gauge_fn(
        "steward_vip_acking",
        "1 while this replica acks each VIP's current epoch and its holder's last ack is within a lease, else 0.",
        &["vip"],
        move |s| {
            let now = hub.now();
            let lease = hub.params().lease;
            hub.with_acker(|acker| {
                for vip in acker.known() {
                    let acking = match acker.ack_state(&vip) {
                        Some((true, Some(last))) => now.saturating_sub(last) <= lease,
                        _ => false,
                    };
                    s.add(&[&vip], if acking { 1.0 } else { 0.0 });
                }
            });
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_is_rendered_with_its_type() {
        let m = metrics();
        m.heartbeats.inc();
        m.etcd_duration
            .with(&["get"])
            .observe(std::time::Duration::from_millis(2));
        let text = m.registry.render();
        for (name, kind) in [
            ("steward_build_info", "gauge"),
            ("steward_heartbeats_received_total", "counter"),
            ("steward_is_leader", "gauge"),
            ("steward_leader_transitions_total", "counter"),
            ("steward_vip_owner_moves_total", "counter"),
            ("steward_vip_lease_acks_sent_total", "counter"),
            ("steward_converge_reports_received_total", "counter"),
            ("steward_converge_report_duration_seconds", "histogram"),
            ("steward_etcd_request_duration_seconds", "histogram"),
        ] {
            assert!(
                text.contains(&format!("# TYPE {name} {kind}\n")),
                "{name} missing:\n{text}"
            );
        }
        assert!(text.contains("steward_etcd_request_duration_seconds_count{op=\"get\"} "));
        assert!(text.contains(&format!(
            "steward_build_info{{component=\"coordinator\",version=\"{}\"}} 1\n",
            crate::VERSION
        )));
    }

    #[test]
    fn leadership_transitions_are_counted() {
        let m = Metrics::new();
        let to = |r: &str| m.leader_transitions.get(&[r]).map_or(0, |c| c.get());
        let mut leading = m.note_leadership(false, None);
        assert_eq!((to("leader"), to("follower"), m.is_leader.get()), (0, 0, 0));
        leading = m.note_leadership(leading, Some(42));
        assert_eq!((m.is_leader.get(), m.leader_epoch.get()), (1, 42));
        // Still leading (e.g. a watch wake-up with the same value).
        leading = m.note_leadership(leading, Some(42));
        assert_eq!(to("leader"), 1);
        leading = m.note_leadership(leading, None);
        assert!(!leading);
        assert_eq!((to("leader"), to("follower")), (1, 1));
        assert_eq!((m.is_leader.get(), m.leader_epoch.get()), (0, 0));
    }
}
