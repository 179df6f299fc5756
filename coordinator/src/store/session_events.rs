//! Session churn in the event log, kept from flushing the audit trail.
//!
//! A node's session opening and closing (`node-connected`,
//! `node-disconnected`) is something one agent key can do hundreds of times
//! a second. Those events live under their own prefix with their own bound
//! (so they can never push a revocation, a join or a role change out of the
//! audit log), and each replica records at most one connected/disconnected
//! pair per node per [`SESSION_EVENT_WINDOW`]; the others are counted in
//! `steward_session_events_suppressed_total` and in the message of the
//! node's next recorded session event.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use steward_proto::domain::{EventKind, NodeId};

/// Per node: one connected and one disconnected event recorded per window.
pub const SESSION_EVENT_WINDOW: Duration = Duration::from_secs(10);

/// Nodes remembered before windows that ended are forgotten.
const PRUNE_ABOVE: usize = 1024;

/// Whether an event kind is session churn (kept apart from the audit log).
pub fn is_session_event(kind: EventKind) -> bool {
    match kind {
        EventKind::NodeConnected | EventKind::NodeDisconnected => true,
        EventKind::RolesChanged
        | EventKind::NodeRegistered
        | EventKind::LeaderElected
        | EventKind::VipChanged
        | EventKind::VipMoved
        | EventKind::NodeJoined
        | EventKind::NodeRevoked
        | EventKind::NodeMaintenance
        | EventKind::CertificateRevoked => false,
    }
}

#[derive(Debug)]
struct Window {
    started: Instant,
    disconnect_recorded: bool,
    /// Session events not recorded since the last recorded one.
    suppressed: u64,
}

/// What to do with one session event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Record it; `suppressed` events of this node were not recorded since
    /// its last recorded one.
    Record { suppressed: u64 },
    /// Count it only.
    Suppress,
}

/// One replica's per-node rate limit of session events.
#[derive(Debug, Default)]
pub struct SessionEventLimiter {
    nodes: Mutex<HashMap<NodeId, Window>>,
}

impl SessionEventLimiter {
    /// Judges a session event of `node` at `now`.
    pub fn judge(&self, node: &NodeId, kind: EventKind, now: Instant) -> Verdict {
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        if nodes.len() > PRUNE_ABOVE {
            nodes.retain(|_, w| now.duration_since(w.started) < SESSION_EVENT_WINDOW);
        }
        let current = nodes
            .get(node)
            .filter(|w| now.duration_since(w.started) < SESSION_EVENT_WINDOW);
        let suppressed = nodes.get(node).map_or(0, |w| w.suppressed);
        match (kind, current) {
            // The first session of a window opens it.
            (EventKind::NodeConnected, None) => {
                nodes.insert(
                    node.clone(),
                    Window {
                        started: now,
                        disconnect_recorded: false,
                        suppressed: 0,
                    },
                );
                Verdict::Record { suppressed }
            }
            // The first close in a window, or any close after a quiet one
            // (a session that lasted longer than the window).
            (EventKind::NodeDisconnected, None) => {
                nodes.remove(node);
                Verdict::Record { suppressed }
            }
            (EventKind::NodeDisconnected, Some(w)) if !w.disconnect_recorded => {
                if let Some(w) = nodes.get_mut(node) {
                    w.disconnect_recorded = true;
                    w.suppressed = 0;
                }
                Verdict::Record { suppressed }
            }
            (_, Some(_)) => {
                if let Some(w) = nodes.get_mut(node) {
                    w.suppressed += 1;
                }
                Verdict::Suppress
            }
            // Other kinds are not session events: always recorded.
            (_, None) => Verdict::Record { suppressed: 0 },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_pair_per_node_per_window_then_the_count() {
        let limiter = SessionEventLimiter::default();
        let n1: NodeId = "n1".parse().expect("id");
        let n2: NodeId = "n2".parse().expect("id");
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let record = |suppressed| Verdict::Record { suppressed };
        use EventKind::{NodeConnected as C, NodeDisconnected as D};
        assert_eq!(limiter.judge(&n1, C, at(0)), record(0));
        assert_eq!(limiter.judge(&n1, D, at(10)), record(0));
        for i in 0..100 {
            assert_eq!(limiter.judge(&n1, C, at(20 + i * 2)), Verdict::Suppress);
            assert_eq!(limiter.judge(&n1, D, at(21 + i * 2)), Verdict::Suppress);
        }
        // Another node has its own window.
        assert_eq!(limiter.judge(&n2, C, at(500)), record(0));
        // After the window: recorded again, with what was left out.
        assert_eq!(limiter.judge(&n1, C, at(10_000)), record(200));
        assert_eq!(limiter.judge(&n1, D, at(10_001)), record(0));
        // A long session's close is recorded whenever it comes.
        assert_eq!(limiter.judge(&n1, C, at(30_000)), record(0));
        assert_eq!(limiter.judge(&n1, D, at(3_600_000)), record(0));
        assert_eq!(limiter.judge(&n1, C, at(3_600_001)), record(0));
    }
}
