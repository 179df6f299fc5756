//! Agent sessions served by this replica: the live, in-memory half of node
//! status. Heartbeats update memory only; etcd hears about a node only when
//! what an operator would see changes (connected, health class, applied
//! revision, facts).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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
    /// The mod revision of this session's last status write (`i64::MAX`
    /// until its first: a session is not replaced before it has written).
    pub status_rev: i64,
    /// The newest status write by another replica seen for this node.
    pub foreign_rev: i64,
    /// How far apart this replica last asked the agent's heartbeats to be
    /// (zero: the agent's own interval).
    pub heartbeat_every: Duration,
}

impl LiveSession {
    /// Health class as an operator sees it.
    pub fn node_health(&self, now: Instant, unreachable_after: Duration) -> NodeHealth {
        if now.duration_since(self.last_heartbeat) > self.unreachable_after(unreachable_after) {
            NodeHealth::Unreachable
        } else if self.health.under_pressure() {
            NodeHealth::Degraded
        } else {
            NodeHealth::Healthy
        }
    }

    /// How long this node may stay silent before it counts as unreachable:
    /// `configured`, or three of its heartbeat intervals if this replica
    /// asked for sparser heartbeats.
    pub fn unreachable_after(&self, configured: Duration) -> Duration {
        configured.max(self.heartbeat_every * 3)
    }
}

/// How far apart a replica serving `sessions` agents asks their heartbeats
/// to be, in milliseconds, to stay within `per_s` heartbeats a second: 0
/// (the agent's own interval) while they fit at one a second each, then
/// whole seconds, at most `steward_runtime::cadence::MAX_INTERVAL`.
pub fn heartbeat_interval_ms(sessions: usize, per_s: u32) -> u32 {
    let per_s = u64::from(per_s.max(1));
    let sessions = sessions as u64;
    if sessions <= per_s {
        return 0;
    }
    let secs = sessions.div_ceil(per_s);
    let max = steward_runtime::cadence::MAX_INTERVAL.as_secs();
    (secs.min(max) * 1000) as u32
}

/// The sessions of this replica, by node.
#[derive(Debug, Default, Clone)]
pub struct Sessions {
    inner: Arc<Mutex<HashMap<NodeId, LiveSession>>>,
    /// The newest status write by another replica seen per node, also for
    /// nodes with no session here yet (one about to register checks it).
    foreign: Arc<Mutex<HashMap<NodeId, i64>>>,
    next: Arc<AtomicU64>,
    /// How many sessions there are, read on every heartbeat ack without
    /// taking the lock.
    count: Arc<AtomicUsize>,
}

impl Sessions {
    fn lock(&self) -> MutexGuard<'_, HashMap<NodeId, LiveSession>> {
        // A panic while holding this lock leaves plain data behind; keep going.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new session id.
    pub fn next_id(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Registers session `session` of `node`, which recorded its status at
    /// `status_rev`, replacing any older one (whose `replaced` token is
    /// cancelled, so that it ends: one live session per node). If another
    /// replica already recorded a newer status, the new session is
    /// cancelled at once.
    pub fn open(
        &self,
        node: &NodeId,
        session: u64,
        applied_revision: u64,
        now_ms: u64,
        replaced: tokio_util::sync::CancellationToken,
        status_rev: i64,
    ) {
        let foreign = self.foreign_rev(node);
        if foreign > status_rev {
            replaced.cancel();
        }
        let old = self.lock().insert(
            node.clone(),
            LiveSession {
                session,
                last_heartbeat: Instant::now(),
                last_seen_unix_ms: now_ms,
                health: Health::default(),
                applied_revision,
                replaced,
                status_rev,
                foreign_rev: foreign,
                heartbeat_every: Duration::ZERO,
            },
        );
        match old {
            Some(old) => old.replaced.cancel(),
            None => {
                self.count.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn foreign_rev(&self, node: &NodeId) -> i64 {
        let foreign = self.foreign.lock().unwrap_or_else(|p| p.into_inner());
        foreign.get(node).copied().unwrap_or(0)
    }

    /// Another replica recorded serving `node` at `rev`: this replica's
    /// session of it ends if its own last status write is older (of two
    /// sessions on two replicas, the later write wins); whether it ends.
    pub fn supersede(&self, node: &NodeId, rev: i64) -> bool {
        {
            let mut foreign = self.foreign.lock().unwrap_or_else(|p| p.into_inner());
            let seen = foreign.entry(node.clone()).or_default();
            *seen = (*seen).max(rev);
        }
        let mut map = self.lock();
        let Some(live) = map.get_mut(node) else {
            return false;
        };
        live.foreign_rev = live.foreign_rev.max(rev);
        let replaced = live.status_rev < rev;
        if replaced {
            live.replaced.cancel();
        }
        replaced
    }

    /// Session `session` of `node` wrote its status at `rev`; it ends at
    /// once if another replica already wrote a newer one.
    pub fn wrote_status(&self, node: &NodeId, session: u64, rev: i64) {
        if let Some(live) = self.lock().get_mut(node) {
            if live.session == session {
                live.status_rev = rev;
                if live.foreign_rev > rev {
                    tracing::info!(node.id = %node, rev, newer = live.foreign_rev, "another replica wrote this node's status after this session did; ending it");
                    live.replaced.cancel();
                }
            }
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
            self.count.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// How many sessions this replica serves (without the lock).
    pub fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// What `f` reads of `node`'s session, without copying it.
    pub fn with<T>(&self, node: &NodeId, f: impl FnOnce(&LiveSession) -> T) -> Option<T> {
        self.lock().get(node).map(f)
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

    /// Opens session `id` of `n` having written its status at `rev`.
    fn open(s: &Sessions, n: &NodeId, rev: i64) -> (u64, tokio_util::sync::CancellationToken) {
        let id = s.next_id();
        let token = tokio_util::sync::CancellationToken::new();
        s.open(n, id, 0, 1, token.clone(), rev);
        (id, token)
    }

    #[test]
    fn heartbeats_are_spread_out_beyond_the_budget_in_whole_seconds() {
        assert_eq!(heartbeat_interval_ms(0, 2000), 0);
        assert_eq!(heartbeat_interval_ms(2000, 2000), 0);
        assert_eq!(heartbeat_interval_ms(2001, 2000), 2000);
        assert_eq!(heartbeat_interval_ms(10_000, 2000), 5000);
        assert_eq!(heartbeat_interval_ms(10_001, 2000), 6000);
        assert_eq!(heartbeat_interval_ms(1_000_000, 2000), 30_000, "capped");
    }

    #[test]
    fn a_node_with_sparse_heartbeats_turns_unreachable_after_three_silent_intervals() {
        let s = Sessions::default();
        let n = NodeId::new("n1").unwrap();
        let (id, _) = open(&s, &n, 1);
        let configured = Duration::from_secs(3);
        let now = Instant::now();
        let silent = |live: &mut LiveSession, for_: Duration| live.last_heartbeat = now - for_;
        s.update(&n, id, |l| silent(l, Duration::from_secs(4)));
        let health = s.with(&n, |l| l.node_health(now, configured)).unwrap();
        assert_eq!(
            health,
            NodeHealth::Unreachable,
            "own rhythm: the configured 3 s"
        );
        s.update(&n, id, |l| l.heartbeat_every = Duration::from_secs(5));
        let health = s.with(&n, |l| l.node_health(now, configured)).unwrap();
        assert_eq!(
            health,
            NodeHealth::Healthy,
            "asked for 5 s: 4 s silent is normal"
        );
        s.update(&n, id, |l| silent(l, Duration::from_secs(16)));
        let health = s.with(&n, |l| l.node_health(now, configured)).unwrap();
        assert_eq!(
            health,
            NodeHealth::Unreachable,
            "three 5 s intervals missed"
        );
        assert_eq!(s.count(), 1);
        s.close(&n, id);
        s.close(&n, id);
        assert_eq!(s.count(), 0, "counted once, closed once");
    }

    #[test]
    fn newer_session_wins_and_old_close_is_harmless() {
        let s = Sessions::default();
        let n = NodeId::new("n1").unwrap();
        let (a, replaced) = open(&s, &n, 5);
        assert!(!replaced.is_cancelled());
        let (b, _) = open(&s, &n, 6);
        // The older session is told to end.
        assert!(replaced.is_cancelled());
        assert!(!s.update(&n, a, |l| l.applied_revision = 9));
        s.close(&n, a);
        assert_eq!(s.get(&n).map(|l| l.session), Some(b));
        s.close(&n, b);
        assert!(s.is_empty());
    }

    #[test]
    fn of_two_replicas_the_later_status_write_keeps_its_session() {
        let s = Sessions::default();
        let n = NodeId::new("n1").unwrap();
        let (b, mine) = open(&s, &n, 10);
        // Another replica's write: older than ours, we stay; newer, we go.
        assert!(!s.supersede(&n, 9));
        s.wrote_status(&n, b, 12);
        assert!(!s.supersede(&n, 11));
        assert!(!mine.is_cancelled());
        assert!(s.supersede(&n, 13));
        assert!(mine.is_cancelled());
        // A newer foreign write seen before a session registers.
        assert!(
            !s.supersede(&NodeId::new("n2").unwrap(), 20),
            "no session yet"
        );
        let (_, late) = open(&s, &NodeId::new("n2").unwrap(), 19);
        assert!(late.is_cancelled());
        let (_, later) = open(&s, &NodeId::new("n2").unwrap(), 21);
        assert!(!later.is_cancelled());
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
            status_rev: 0,
            foreign_rev: 0,
            heartbeat_every: Duration::ZERO,
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
