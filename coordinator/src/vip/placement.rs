//! The leader's half of the lease protocol: who holds each VIP next.
//!
//! The decision is [`steward_proto::lease::place`]; this module gathers its
//! input (etcd's view, this replica's live candidates) and carries it out
//! with fenced writes: a new owner only while the owner key is still at the
//! epoch the decision was made for, together with deleting the old epoch's
//! marks and move request and recording the move as an event.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, DeleteOptions, Txn, TxnOp};
use steward_proto::domain::{Event, EventKind, NodeId};
use steward_proto::lease::{place, Candidate, MarkReason, Placement, PlacementInput};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::cache::SpecSnapshot;
use crate::error::{Error, Result};
use crate::replica::{Fence, Leadership};
use crate::store::{encode, unix_ms, Store};
use crate::vip::lease_api::LeaseHub;
use crate::vip::{candidates, MoveRecord, OwnerRecord, VipSnapshot, VipState};

/// Everything the placement loop watches.
pub struct PlacementInputs {
    pub vips: watch::Receiver<Arc<VipSnapshot>>,
    pub specs: watch::Receiver<Arc<SpecSnapshot>>,
    pub leadership: watch::Receiver<Leadership>,
}

/// Runs until `shutdown`; acts only while this replica leads.
pub async fn run_placement(
    store: Store,
    hub: Arc<LeaseHub>,
    mut inputs: PlacementInputs,
    shutdown: CancellationToken,
) {
    // A freshly started replica has not heard every candidate yet: give them
    // a few heartbeats to open their streams before judging them.
    let settle = hub.params().lease.max(hub.params().heartbeat * 3);
    loop {
        let leadership = inputs.leadership.borrow_and_update().clone();
        if let Leadership::Leader(fence) = leadership {
            if hub.now() >= settle {
                let vips = inputs.vips.borrow_and_update().clone();
                let specs = inputs.specs.borrow_and_update().clone();
                if vips.synced && specs.synced {
                    for (name, state) in &vips.vips {
                        if let Err(error) = decide(&store, &hub, &fence, &specs, name, state).await
                        {
                            warn!(%error, vip.name = %name, "placement failed");
                        }
                    }
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = inputs.leadership.changed() => if r.is_err() { return },
            r = inputs.vips.changed() => if r.is_err() { return },
            r = inputs.specs.changed() => if r.is_err() { return },
            _ = hub.candidates_changed.notified() => {}
            // Health ages out without an event: look again every heartbeat.
            _ = tokio::time::sleep(hub.params().heartbeat.max(Duration::from_millis(50))) => {}
        }
    }
}

async fn decide(
    store: &Store,
    hub: &LeaseHub,
    fence: &Fence,
    specs: &SpecSnapshot,
    name: &str,
    state: &VipState,
) -> Result<()> {
    let Some(spec) = &state.spec else {
        return Ok(());
    };
    let spec = &spec.value;
    let candidates: Vec<Candidate> = candidates(spec, specs)
        .into_iter()
        .map(|node| Candidate {
            priority: spec.priority.get(&node).copied().unwrap_or(0),
            healthy: hub.healthy_candidate(&node, name),
            node,
        })
        .collect();
    let owner = state
        .owner
        .as_ref()
        .map(|(node, epoch)| (node.as_ref(), *epoch));
    let current_move = state.current_move();
    let input = PlacementInput {
        owner,
        marks: state.current_marks(),
        quorum: hub.params().quorum(),
        candidates: &candidates,
        move_to: current_move.map(|m| m.to.as_ref()),
        preempt: spec.preempt,
    };
    match place(&input) {
        Placement::Keep => Ok(()),
        Placement::RequestRelease => {
            if current_move.is_some() {
                return Ok(());
            }
            let epoch = state.epoch();
            let owner_key = store.keys().vip_owner(name);
            let inner = Txn::new()
                .when([Compare::mod_revision(
                    owner_key.as_str(),
                    CompareOp::Equal,
                    epoch as i64,
                )])
                .and_then([TxnOp::put(
                    store.keys().vip_move(name),
                    encode(&MoveRecord { epoch, to: None }),
                    None,
                )]);
            info!(vip.name = %name, vip.epoch = epoch, "asking the holder to release");
            fence.txn(&store.client(), vec![TxnOp::txn(inner)]).await?;
            crate::metrics::metrics()
                .vip_release_requests
                .with(&[name])
                .inc();
            Ok(())
        }
        Placement::Assign(next) => assign(store, fence, name, state, next).await,
    }
}

fn why(state: &VipState) -> String {
    let Some((Some(_), epoch)) = &state.owner else {
        return "first holder".into();
    };
    let marks = state.marks.get(epoch);
    let released = marks.is_some_and(|m| m.values().any(|r| *r == MarkReason::Released));
    match (state.current_move(), released) {
        (Some(_), _) => "moved on request".into(),
        (None, true) => "released by its holder".into(),
        (None, false) => format!(
            "its holder stopped heartbeating ({} expiry marks)",
            marks.map_or(0, |m| m.len())
        ),
    }
}

async fn assign(
    store: &Store,
    fence: &Fence,
    name: &str,
    state: &VipState,
    next: Option<NodeId>,
) -> Result<()> {
    let keys = store.keys();
    let owner_key = keys.vip_owner(name);
    let mut guards = vec![match &state.owner {
        Some((_, epoch)) => {
            Compare::mod_revision(owner_key.as_str(), CompareOp::Equal, *epoch as i64)
        }
        None => Compare::version(owner_key.as_str(), CompareOp::Equal, 0),
    }];
    // Every mark counted must still be there: a replica that took its mark
    // back acks the holder again (see `steward_proto::lease`).
    if let Some(marks) = state.marks.get(&state.epoch()) {
        guards.extend(marks.keys().map(|replica| {
            Compare::version(
                keys.vip_mark(name, state.epoch(), replica),
                CompareOp::Greater,
                0,
            )
        }));
    }
    let from = state
        .owner_node()
        .map_or_else(|| "nobody".to_owned(), |n| n.to_string());
    let to = next
        .as_ref()
        .map_or_else(|| "nobody".to_owned(), |n| n.to_string());
    let event = Event {
        revision: 0,
        at_unix_ms: unix_ms(),
        kind: EventKind::VipMoved,
        node: next.clone(),
        replica: store.replica().to_owned(),
        message: format!("VIP {name}: {from} -> {to} ({})", why(state)),
    };
    let event_key = format!(
        "{}{:016}-{}-vip-{name}-{}",
        keys.events(),
        event.at_unix_ms,
        store.replica(),
        state.epoch()
    );
    let inner = Txn::new().when(guards).and_then([
        TxnOp::put(
            owner_key.as_str(),
            encode(&OwnerRecord { node: next }),
            None,
        ),
        TxnOp::delete(keys.vip_move(name), None),
        TxnOp::delete(
            keys.vip_marks(name),
            Some(DeleteOptions::new().with_prefix()),
        ),
        TxnOp::put(event_key, encode(&event), None),
    ]);
    let resp = store
        .client()
        .kv_client()
        .txn(
            Txn::new()
                .when([fence.compare()])
                .and_then([TxnOp::txn(inner)]),
        )
        .await
        .map_err(Error::etcd("assign VIP"))?;
    if !resp.succeeded() {
        return Err(Error::LostLeadership { epoch: fence.epoch });
    }
    // The inner guard (owner still at the epoch decided on, every counted
    // mark still there) may have failed: then nothing moved, and the next
    // look decides again.
    let moved = resp.op_responses().iter().any(|r| match r {
        etcd_client::TxnOpResponse::Txn(inner) => inner.succeeded(),
        _ => false,
    });
    if !moved {
        return Ok(());
    }
    crate::metrics::metrics()
        .vip_owner_moves
        .with(&[name])
        .inc();
    info!(vip.name = %name, from = %from, to = %to, "{}", event.message);
    Ok(())
}
