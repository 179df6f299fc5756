//! What only the leader does. Every write here is fenced on the leader epoch.
//!
//! - Nodes whose status names a replica that is no longer a member (it died
//!   without a word) are marked disconnected, unless their agent has already
//!   reconnected elsewhere (compare on the status' mod revision).
//! - The event logs are trimmed: the audit log to `events_retained`
//!   entries, session churn to `session_events_retained`.

use std::collections::BTreeSet;
use std::time::Duration;

use steward_proto::domain::{EventKind, NodeHealth};
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::replica::Fence;
use crate::store::kv::{Op, Txn};
use crate::store::{EventLog, Store};

/// How often the leader re-checks the cluster (the resync safety net).
pub const DUTY_INTERVAL: Duration = Duration::from_secs(1);

/// Runs until the fence fails (returns the error) — never returns `Ok`.
pub async fn run_duties(store: Store, fence: Fence, retained: EventsRetained) -> Result<()> {
    let mut tick = tokio::time::interval(DUTY_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reaper = Reaper::default();
    loop {
        tick.tick().await;
        for duty in [
            reaper.run(&store, &fence).await,
            trim_events(&store, &fence, EventLog::Audit, retained.audit).await,
            trim_events(&store, &fence, EventLog::Sessions, retained.sessions).await,
        ] {
            match duty {
                Ok(()) => {}
                Err(e @ Error::LostLeadership { .. }) => return Err(e),
                // etcd trouble: keep leading, try again next tick.
                Err(error) => warn!(%error, "leader duty failed"),
            }
        }
    }
}

/// How often the leader sweeps every node's status although no replica
/// left (the safety net; a replica leaving triggers a sweep at once).
const FULL_SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// Sweeps the node statuses when the replica set lost a member, and
/// otherwise once a [`FULL_SWEEP_INTERVAL`]: reading every node each
/// second would cost a 10,000-node fleet megabytes a second.
#[derive(Default)]
struct Reaper {
    members: BTreeSet<String>,
    swept_at: Option<tokio::time::Instant>,
}

impl Reaper {
    async fn run(&mut self, store: &Store, fence: &Fence) -> Result<()> {
        let live: BTreeSet<String> = store.members().await?.into_iter().map(|m| m.id).collect();
        let lost_one = self.members.difference(&live).next().is_some();
        let due = self
            .swept_at
            .is_none_or(|at| at.elapsed() >= FULL_SWEEP_INTERVAL);
        self.members = live.clone();
        if lost_one || due {
            reap_orphaned_sessions(store, fence, &live).await?;
            self.swept_at = Some(tokio::time::Instant::now());
        }
        Ok(())
    }
}

async fn reap_orphaned_sessions(
    store: &Store,
    fence: &Fence,
    live: &BTreeSet<String>,
) -> Result<()> {
    for (id, record) in store.nodes().await? {
        let Some(status) = record.status else {
            continue;
        };
        let Some(replica) = status.value.replica.clone() else {
            continue;
        };
        if live.contains(&replica) {
            continue;
        }
        let mut next = status.value.clone();
        next.replica = None;
        next.health = NodeHealth::Disconnected;
        let event = store.event(
            EventKind::NodeDisconnected,
            Some(id.clone()),
            format!("{id} lost its session: replica {replica} is gone"),
        );
        // Only if nobody rewrote the status since we read it (the agent may
        // already have reconnected to another replica).
        let inner = store.status_if_txn(&id, status.mod_revision, &next, &event);
        if fence.txn(store, inner).await?.succeeded {
            info!(node.id = %id, %replica, "marked node disconnected: its replica is gone");
        }
    }
    Ok(())
}

/// How many events each log keeps (`[timing] events_retained`,
/// `session_events_retained`).
#[derive(Debug, Clone, Copy)]
pub struct EventsRetained {
    pub audit: u32,
    pub sessions: u32,
}

async fn trim_events(store: &Store, fence: &Fence, log: EventLog, retained: u32) -> Result<()> {
    let keys = store.event_keys(log).await?;
    let excess = keys.len().saturating_sub(retained as usize);
    if excess == 0 {
        return Ok(());
    }
    // etcd limits ops per txn (128 by default).
    for chunk in keys[..excess].chunks(100) {
        let deletes = chunk.iter().map(|k| Op::delete(k.clone()));
        fence.txn(store, Txn::new().and_then(deletes)).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use steward_proto::domain::{Event, Health};

    use super::*;
    use crate::store::{MemoryBackend, NodeStatusRecord};
    use crate::testing::{node, TestReplica};

    fn served_by(replica: &str) -> NodeStatusRecord {
        NodeStatusRecord {
            health: NodeHealth::Healthy,
            last_health: Health::default(),
            replica: Some(replica.to_owned()),
            last_seen_unix_ms: 1,
            applied_revision: 0,
            agent_version: "test".into(),
        }
    }

    #[tokio::test]
    async fn nodes_of_vanished_replicas_are_marked_disconnected() {
        let replica = TestReplica::start(MemoryBackend::new(), "c-1").await;
        let store = replica.store();
        let fence = replica.lead().await;
        for (id, serving) in [("n1", "c-gone"), ("n2", "c-1")] {
            let written = store
                .put_status_if(&node(id), 0, &served_by(serving))
                .await
                .unwrap();
            assert!(written.is_some());
        }
        let mut reaper = Reaper::default();
        reaper.run(store, &fence).await.unwrap();
        let n1 = store.node(&node("n1")).await.unwrap().status.unwrap().value;
        assert_eq!((n1.health, n1.replica), (NodeHealth::Disconnected, None));
        let n2 = store.node(&node("n2")).await.unwrap().status.unwrap().value;
        assert_eq!(n2, served_by("c-1"));
        let (events, _) = store.recent_events(10).await.unwrap();
        let last = events.last().expect("an event");
        assert_eq!(last.kind, EventKind::NodeDisconnected);
        assert_eq!(last.message, "n1 lost its session: replica c-gone is gone");
        // Nothing left to do: no more writes.
        let revision = replica.memory.revision();
        reaper.run(store, &fence).await.unwrap();
        assert_eq!(replica.memory.revision(), revision);
        // A node that a replica still in the set serves is not swept again
        // every tick; once the replica leaves, it is at once.
        store
            .put_status_if(&node("n3"), 0, &served_by("c-2"))
            .await
            .unwrap();
        reaper.members.insert("c-2".into());
        reaper.run(store, &fence).await.unwrap();
        let n3 = store.node(&node("n3")).await.unwrap().status.unwrap().value;
        assert_eq!(n3.health, NodeHealth::Disconnected, "c-2 left the set");
    }

    #[tokio::test]
    async fn the_event_log_keeps_the_newest_and_only_a_leader_trims_it() {
        let replica = TestReplica::start(MemoryBackend::new(), "c-1").await;
        let store = replica.store();
        let fence = replica.lead().await;
        for i in 0..10 {
            let mut event: Event = store.event(EventKind::RolesChanged, None, format!("e{i}"));
            event.at_unix_ms = 1_000 + i;
            store.record_event(&event).await.unwrap();
        }
        trim_events(store, &fence, EventLog::Audit, 3)
            .await
            .unwrap();
        let (events, _) = store.recent_events(100).await.unwrap();
        let messages: Vec<&str> = events.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(messages, ["e7", "e8", "e9"]);

        store.revoke_lease(replica.lease).await.unwrap();
        store
            .record_event(&store.event(EventKind::RolesChanged, None, "more".into()))
            .await
            .unwrap();
        let error = trim_events(store, &fence, EventLog::Audit, 3)
            .await
            .expect_err("fenced");
        assert!(matches!(error, Error::LostLeadership { .. }), "{error}");
        assert_eq!(store.event_keys(EventLog::Audit).await.unwrap().len(), 4);
    }
}
