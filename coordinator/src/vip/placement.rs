//! The leader's half of the lease protocol: who holds each VIP next.
//!
//! The decision is [`steward_lease::place`]; this module gathers its
//! input (etcd's view, this replica's live candidates) and carries it out
//! with fenced writes: a new owner only while the owner key is still at the
//! epoch the decision was made for, together with deleting the old epoch's
//! marks and move request and recording the move as an event.

use std::sync::Arc;
use std::time::Duration;

use steward_lease::{place, Candidate, MarkReason, Placement, PlacementInput};
use steward_proto::domain::{EventKind, NodeId};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::cache::SpecSnapshot;
use crate::error::Result;
use crate::replica::{Fence, Leadership};
use crate::store::Store;
use crate::vip::lease_api::LeaseHub;
use crate::vip::{candidates, VipSnapshot, VipState};

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
    let zone_of = |node: &NodeId| {
        specs
            .specs
            .get(node)
            .and_then(|s| s.value.labels.get(crate::cache::ZONE_LABEL))
            .filter(|z| !z.is_empty())
            .cloned()
    };
    let candidates: Vec<Candidate> = candidates(spec, specs)
        .into_iter()
        .map(|node| Candidate {
            priority: spec.priority.get(&node).copied().unwrap_or(0),
            healthy: hub.healthy_candidate(&node, name),
            zone: zone_of(&node),
            node,
        })
        .collect();
    // The next holder prefers another zone than the one it replaces
    // (DESIGN.md §7; a tiebreak after priority, see `place`).
    let owner_zone = state.owner_node().and_then(zone_of);
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
        owner_zone: owner_zone.as_deref(),
    };
    match place(&input) {
        Placement::Keep => Ok(()),
        Placement::RequestRelease => {
            if current_move.is_some() {
                return Ok(());
            }
            let epoch = state.epoch();
            info!(vip.name = %name, vip.epoch = epoch, "asking the holder to release");
            let inner = store.vip_release_request_txn(name, epoch, None);
            fence.txn(store, inner).await?;
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
    let from = state
        .owner_node()
        .map_or_else(|| "nobody".to_owned(), |n| n.to_string());
    let to = next
        .as_ref()
        .map_or_else(|| "nobody".to_owned(), |n| n.to_string());
    let event = store.event(
        EventKind::VipMoved,
        next.clone(),
        format!("VIP {name}: {from} -> {to} ({})", why(state)),
    );
    let current = state.owner.as_ref().map(|(_, epoch)| *epoch);
    let counted: Vec<String> = state
        .marks
        .get(&state.epoch())
        .map(|marks| marks.keys().cloned().collect())
        .unwrap_or_default();
    let inner = store.vip_assign_txn(name, current, &counted, next, &event);
    // The owner key may have moved past the epoch decided on, or a counted
    // mark was taken back: then nothing moved, and the next look decides
    // again.
    if !fence.txn(store, inner).await?.succeeded {
        return Ok(());
    }
    crate::metrics::metrics()
        .vip_owner_moves
        .with(&[name])
        .inc();
    info!(vip.name = %name, from = %from, to = %to, "{}", event.message);
    Ok(())
}

#[cfg(test)]
mod tests {
    use steward_proto::domain::Role;

    use super::*;
    use crate::error::Error;
    use crate::store::MemoryBackend;
    use crate::testing::{eventually, node, put_roles, put_vip, vip_spec, TestReplica};
    use crate::vip::lease_api::tests::{candidate, heartbeat};

    /// A holder taken out of service is asked to release (a planned
    /// handover), and hears it on its lease stream although it is no
    /// candidate any more.
    #[tokio::test]
    async fn a_drained_holder_is_asked_to_release() {
        let replica = TestReplica::start(MemoryBackend::new(), "c-1").await;
        let store = replica.store();
        put_roles(store, "n1", &[Role::Lb]).await;
        put_roles(store, "n2", &[Role::Lb]).await;
        put_vip(store, &vip_spec("front", "198.18.0.100/24")).await;
        let fence = replica.lead().await;
        let _n1 = candidate(&replica, "n1", heartbeat("n1", 1, Vec::new()))
            .await
            .expect("stream");
        let _n2 = candidate(&replica, "n2", heartbeat("n2", 1, Vec::new()))
            .await
            .expect("stream");
        let hub = &replica.ctx.lease;
        let ctx = &replica.ctx;
        let (specs, state) = eventually("the caches and candidates", || {
            let specs = ctx.specs.borrow().clone();
            let state = ctx.vips.borrow().vips.get("front")?.clone();
            let ready = specs.specs.len() == 2
                && state.spec.is_some()
                && hub.healthy_candidate(&node("n1"), "front")
                && hub.healthy_candidate(&node("n2"), "front");
            ready.then_some((specs, state))
        })
        .await;
        decide(store, hub, &fence, &specs, "front", &state)
            .await
            .expect("assigned");
        let (holder, _) = store.vips().await.unwrap().vips["front"]
            .owner
            .clone()
            .unwrap();
        let holder = holder.expect("a holder");
        let record = crate::store::MaintenanceRecord {
            active: true,
            reason: String::new(),
            by: "ops".into(),
            at_unix_ms: 1,
            forced: false,
        };
        let event = store.event(EventKind::NodeMaintenance, Some(holder.clone()), "t".into());
        assert!(store
            .put_maintenance_if(&holder, 0, &record, &event)
            .await
            .unwrap());
        let (specs, state) = eventually("the drain and the owner in the caches", || {
            let specs = ctx.specs.borrow().clone();
            let state = ctx.vips.borrow().vips.get("front")?.clone();
            (specs.in_maintenance(&holder) && state.owner_node() == Some(&holder))
                .then_some((specs, state))
        })
        .await;
        // The holder still hears about the VIP, to release it.
        let vips = ctx.vips.borrow().clone();
        let told = vips.assignments_for(&holder, &specs);
        assert_eq!(told.len(), 1, "the holder is told about the VIP it holds");
        decide(store, hub, &fence, &specs, "front", &state)
            .await
            .expect("release requested");
        let vips = store.vips().await.unwrap();
        assert!(
            vips.vips["front"].current_move().is_some(),
            "a release request for the drained holder"
        );
        assert!(
            vips.assignments_for(&holder, &specs)[0]
                .assignment
                .release_requested
        );
    }

    #[tokio::test]
    async fn the_leader_assigns_a_first_holder_once_and_only_while_it_leads() {
        let replica = TestReplica::start(MemoryBackend::new(), "c-1").await;
        let store = replica.store();
        put_roles(store, "n1", &[Role::Lb]).await;
        put_roles(store, "n2", &[Role::Lb]).await;
        put_vip(store, &vip_spec("front", "198.18.0.100/24")).await;
        let fence = replica.lead().await;
        let _n1 = candidate(&replica, "n1", heartbeat("n1", 1, Vec::new()))
            .await
            .expect("stream");
        let _n2 = candidate(&replica, "n2", heartbeat("n2", 1, Vec::new()))
            .await
            .expect("stream");
        let hub = &replica.ctx.lease;
        let ctx = &replica.ctx;
        let (specs, state) = eventually("the caches and candidates", || {
            let specs = ctx.specs.borrow().clone();
            let state = ctx.vips.borrow().vips.get("front")?.clone();
            let ready = specs.specs.len() == 2
                && state.spec.is_some()
                && hub.healthy_candidate(&node("n1"), "front")
                && hub.healthy_candidate(&node("n2"), "front");
            ready.then_some((specs, state))
        })
        .await;

        decide(store, hub, &fence, &specs, "front", &state)
            .await
            .expect("assigned");
        let owner = store.vips().await.unwrap().vips["front"].owner.clone();
        let (holder, epoch) = owner.expect("an owner");
        assert!(matches!(holder, Some(n) if n == node("n1") || n == node("n2")));
        let (events, _) = store.recent_events(10).await.unwrap();
        let moved = events.last().expect("an event");
        assert_eq!(moved.kind, EventKind::VipMoved);
        assert!(moved.message.contains("first holder"), "{}", moved.message);
        assert_eq!(moved.replica, "c-1");

        // The same decision made on the stale view moves nothing: the owner
        // key is past the epoch it was made for.
        let revision = replica.memory.revision();
        decide(store, hub, &fence, &specs, "front", &state)
            .await
            .expect("nothing to do");
        assert_eq!(replica.memory.revision(), revision);
        assert_eq!(
            store.vips().await.unwrap().vips["front"].epoch(),
            epoch,
            "the owner stays"
        );

        // Once the leader's lease ended, its fence refuses every write.
        store.revoke_lease(replica.lease).await.unwrap();
        let error = decide(store, hub, &fence, &specs, "front", &state)
            .await
            .expect_err("not the leader any more");
        assert!(matches!(error, Error::LostLeadership { .. }), "{error}");
    }

    /// The holder's epoch expired (a quorum of replicas marked it): the
    /// next holder is the healthy candidate in another zone than the old
    /// holder's, although by id alone a node of its own zone came first.
    #[tokio::test]
    async fn the_next_holder_is_taken_from_another_zone() {
        use crate::store::kv::{Op, Txn};
        use crate::store::{encode, Store};
        use steward_proto::domain::NodeSpec;

        async fn lb_in(store: &Store, id: &str, zone: &str) {
            let spec = NodeSpec {
                roles: [Role::Lb].into_iter().collect(),
                labels: [(crate::cache::ZONE_LABEL.to_owned(), zone.to_owned())]
                    .into_iter()
                    .collect(),
                ..Default::default()
            };
            let key = store.keys().node_spec(&node(id));
            store
                .txn(Txn::new().and_then([Op::put(key, encode(&spec))]), "test")
                .await
                .unwrap();
        }

        let replica = TestReplica::start(MemoryBackend::new(), "c-1").await;
        let store = replica.store();
        lb_in(store, "n1", "a").await;
        lb_in(store, "n2", "a").await;
        lb_in(store, "n3", "b").await;
        put_vip(store, &vip_spec("front", "198.18.0.100/24")).await;
        let fence = replica.lead().await;
        let mut streams = Vec::new();
        for id in ["n1", "n2", "n3"] {
            streams.push(
                candidate(&replica, id, heartbeat(id, 1, Vec::new()))
                    .await
                    .expect("stream"),
            );
        }
        let hub = &replica.ctx.lease;
        let ctx = &replica.ctx;
        let ready = || {
            let specs = ctx.specs.borrow().clone();
            let state = ctx.vips.borrow().vips.get("front")?.clone();
            let all = ["n1", "n2", "n3"]
                .iter()
                .all(|n| hub.healthy_candidate(&node(n), "front"));
            (specs.specs.len() == 3 && state.spec.is_some() && all).then_some((specs, state))
        };
        let (specs, state) = eventually("the caches and candidates", ready).await;
        decide(store, hub, &fence, &specs, "front", &state)
            .await
            .expect("assigned");
        let (_, state) = eventually("n1 holds", || {
            let (specs, state) = ready()?;
            (state.owner_node() == Some(&node("n1"))).then_some((specs, state))
        })
        .await;
        // A quorum of replicas marked n1's epoch expired.
        let epoch = state.epoch();
        let quorum = hub.params().quorum();
        let marks: Vec<Op> = (0..quorum)
            .map(|i| {
                Op::put(
                    store
                        .keys()
                        .vip_mark("front", epoch, &format!("c-{}", i + 1)),
                    encode(&crate::vip::MarkRecord::new(MarkReason::Expired)),
                )
            })
            .collect();
        store.txn(Txn::new().and_then(marks), "test").await.unwrap();
        let (specs, state) = eventually("the marks in the cache", || {
            let (specs, state) = ready()?;
            (state.current_marks() >= quorum).then_some((specs, state))
        })
        .await;
        decide(store, hub, &fence, &specs, "front", &state)
            .await
            .expect("reassigned");
        let owner = store.vips().await.unwrap().vips["front"].owner.clone();
        assert_eq!(
            owner.and_then(|(n, _)| n),
            Some(node("n3")),
            "n2 shares n1's zone a; n3 is in zone b"
        );
        drop(streams);
    }
}
