//! What only the leader does. Every write here is fenced on the leader epoch.
//!
//! - Nodes whose status names a replica that is no longer a member (it died
//!   without a word) are marked disconnected, unless their agent has already
//!   reconnected elsewhere (compare on the status' mod revision).
//! - The event log is trimmed to `events_retained` entries.

use std::collections::BTreeSet;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, GetOptions, SortOrder, SortTarget, Txn, TxnOp};
use steward_proto::domain::{Event, EventKind, NodeHealth};
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::replica::Fence;
use crate::store::{encode, unix_ms, Store};

/// How often the leader re-checks the cluster (the resync safety net).
pub const DUTY_INTERVAL: Duration = Duration::from_secs(1);

/// Runs until the fence fails (returns the error) — never returns `Ok`.
pub async fn run_duties(store: Store, fence: Fence, events_retained: u32) -> Result<()> {
    let mut tick = tokio::time::interval(DUTY_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for duty in [
            reap_orphaned_sessions(&store, &fence).await,
            trim_events(&store, &fence, events_retained).await,
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

async fn reap_orphaned_sessions(store: &Store, fence: &Fence) -> Result<()> {
    let live: BTreeSet<String> = store.members().await?.into_iter().map(|m| m.id).collect();
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
        let event = Event {
            revision: 0,
            at_unix_ms: unix_ms(),
            kind: EventKind::NodeDisconnected,
            node: Some(id.clone()),
            replica: store.replica().to_owned(),
            message: format!("{id} lost its session: replica {replica} is gone"),
        };
        let status_key = store.keys().node_status(&id);
        let event_key = format!(
            "{}{:016}-{}-reap-{id}",
            store.keys().events(),
            event.at_unix_ms,
            store.replica()
        );
        // Inner txn: only if nobody rewrote the status since we read it (the
        // agent may already have reconnected to another replica).
        let inner = Txn::new()
            .when([Compare::mod_revision(
                status_key.as_str(),
                CompareOp::Equal,
                status.mod_revision,
            )])
            .and_then([
                TxnOp::put(status_key.as_str(), encode(&next), None),
                TxnOp::put(event_key, encode(&event), None),
            ]);
        fence.txn(&store.client(), vec![TxnOp::txn(inner)]).await?;
        info!(node.id = %id, %replica, "marked node disconnected: its replica is gone");
    }
    Ok(())
}

async fn trim_events(store: &Store, fence: &Fence, retained: u32) -> Result<()> {
    let resp = store
        .client()
        .kv_client()
        .get(
            store.keys().events(),
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_keys_only()
                    .with_sort(SortTarget::Key, SortOrder::Ascend),
            ),
        )
        .await
        .map_err(Error::etcd("list events"))?;
    let excess = resp.kvs().len().saturating_sub(retained as usize);
    if excess == 0 {
        return Ok(());
    }
    let ops = resp.kvs()[..excess]
        .iter()
        .map(|kv| TxnOp::delete(kv.key().to_vec(), None))
        .collect::<Vec<_>>();
    // etcd limits ops per txn (128 by default).
    for chunk in ops.chunks(100) {
        fence.txn(&store.client(), chunk.to_vec()).await?;
    }
    Ok(())
}
