//! Agent sessions served by this replica: the live, in-memory half of node
//! status. Heartbeats update memory only; etcd hears about a node only when
//! what an operator would see changes (connected, health class, applied
//! revision, facts).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use steward_proto::domain::{Health, NodeHealth, NodeId};

/// What this replica knows right now about a node it serves.
#[derive(Debug, Clone)]
pub struct LiveSession {
    pub session: u64,
    pub last_heartbeat: Instant,
    pub last_seen_unix_ms: u64,
    pub health: Health,
    pub applied_revision: u64,
    /// Cancelled when a newer session of the node replaces this one.
    pub replaced: tokio_util::sync::CancellationToken,
}

impl LiveSession {
    /// Health class as an operator sees it.
    pub fn node_health(&self, now: Instant, unreachable_after: Duration) -> NodeHealth {
        if now.duration_since(self.last_heartbeat) > unreachable_after {
            NodeHealth::Unreachable
        } else if self.health.under_pressure() {
            NodeHealth::Degraded
        } else {
            NodeHealth::Healthy
        }
    }
}

/// The sessions of this replica, by node.
#[derive(Debug, Default, Clone)]
pub struct Sessions {
    inner: Arc<Mutex<HashMap<NodeId, LiveSession>>>,
    next: Arc<AtomicU64>,
}

impl Sessions {
    fn lock(&self) -> MutexGuard<'_, HashMap<NodeId, LiveSession>> {
        // A panic while holding this lock leaves plain data behind; keep going.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a session for `node`, replacing any older one (whose
    /// `replaced` token is cancelled, so that it ends: one live session per
    /// node); returns its id.
    pub fn open(
        &self,
        node: &NodeId,
        health: Health,
        applied_revision: u64,
        now_ms: u64,
        replaced: tokio_util::sync::CancellationToken,
    ) -> u64 {
        let session = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let old = self.lock().insert(
            node.clone(),
            LiveSession {
                session,
                last_heartbeat: Instant::now(),
                last_seen_unix_ms: now_ms,
                health,
                applied_revision,
                replaced,
            },
        );
        if let Some(old) = old {
            old.replaced.cancel();
        }
        session
    }

    /// Tells this replica's session of `node`, if any, to end (another
    /// replica serves the node now); whether there was one.
    pub fn supersede(&self, node: &NodeId) -> bool {
        match self.lock().get(node) {
            Some(live) => {
                live.replaced.cancel();
                true
            }
            None => false,
        }
    }

    /// Updates the session `session` of `node` if it is still the current one.
    pub fn update(&self, node: &NodeId, session: u64, f: impl FnOnce(&mut LiveSession)) -> bool {
        match self.lock().get_mut(node) {
            Some(live) if live.session == session => {
                f(live);
                true
            }
            _ => false,
        }
    }

    /// Ends `session`; a newer session of the same node is left alone.
    pub fn close(&self, node: &NodeId, session: u64) {
        let mut map = self.lock();
        if map.get(node).is_some_and(|l| l.session == session) {
            map.remove(node);
        }
    }

    pub fn get(&self, node: &NodeId) -> Option<LiveSession> {
        self.lock().get(node).cloned()
    }

    /// Every live session, for peers asking what this replica serves.
    pub fn snapshot(&self) -> Vec<(NodeId, LiveSession)> {
        self.lock()
            .iter()
            .map(|(id, live)| (id.clone(), live.clone()))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newer_session_wins_and_old_close_is_harmless() {
        let s = Sessions::default();
        let n = NodeId::new("n1").unwrap();
        let replaced = tokio_util::sync::CancellationToken::new();
        let a = s.open(&n, Health::default(), 0, 1, replaced.clone());
        assert!(!replaced.is_cancelled());
        let b = s.open(&n, Health::default(), 0, 2, Default::default());
        // The older session is told to end.
        assert!(replaced.is_cancelled());
        assert!(!s.update(&n, a, |l| l.applied_revision = 9));
        s.close(&n, a);
        assert_eq!(s.get(&n).map(|l| l.session), Some(b));
        s.close(&n, b);
        assert!(s.is_empty());
    }

    #[test]
    fn silence_makes_a_node_unreachable() {
        let live = LiveSession {
            session: 1,
            last_heartbeat: Instant::now(),
            last_seen_unix_ms: 0,
            health: Health::default(),
            applied_revision: 0,
            replaced: Default::default(),
        };
        let later = Instant::now() + Duration::from_secs(5);
        assert_eq!(
            live.node_health(Instant::now(), Duration::from_secs(3)),
            NodeHealth::Healthy
        );
        assert_eq!(
            live.node_health(later, Duration::from_secs(3)),
            NodeHealth::Unreachable
        );
    }
}
