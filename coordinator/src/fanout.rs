//! Waking only the sessions a change concerns.
//!
//! Every agent session of a replica pushes its node's desired state when
//! that state changes. Woken on every change of the replica's caches, each
//! of N sessions would rebuild and compare its state for each of the N
//! address records written while a fleet connects: O(N²) work at a cold
//! start, which is what kept 10,000 agents from ever all connecting to one
//! replica. Instead one task follows the caches and wakes a session only
//! when one of its node's inputs (DESIGN: a desired state's revision is the
//! newest of exactly its inputs, `crate::desired`) moved:
//! - the node's own records (spec, address, revocation, a rollout's change
//!   of it) changed;
//! - the slice of the cluster its roles consume, or the orchestration steps
//!   for them, moved to a new revision ([`Interest`]: a handful of distinct
//!   interests across a fleet, each checked once per change);
//! - or something rare that everyone may consume changed (cluster settings,
//!   maintenance, removal markers, a record deleted, the caches' first
//!   read): then every session is woken, as before.
//!
//! A session registers before its first push, so no change falls between.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use steward_proto::domain::{NodeId, Role};
use tokio::sync::Notify;

use crate::agent_service::SessionContext;
use crate::cache::SpecSnapshot;
use crate::desired::Interest;
use crate::orchestrate::state::OrchestrationSnapshot;
use crate::store::Versioned;
use crate::vip::VipSnapshot;

/// The sessions of this replica that wait to be told of a change.
#[derive(Debug, Default)]
pub struct Fanout {
    sessions: Mutex<HashMap<NodeId, Registered>>,
}

#[derive(Debug)]
struct Registered {
    session: u64,
    wake: Arc<Notify>,
    /// What the node consumes, and the rollout whose target settings it
    /// plans from (cached; recomputed when its own records or the settings
    /// change).
    interest: Option<Slice>,
}

impl Fanout {
    fn lock(&self) -> MutexGuard<'_, HashMap<NodeId, Registered>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers session `session` of `node`; it is woken (the permit is
    /// kept until it waits) whenever a change concerns the node.
    pub fn register(&self, node: &NodeId, session: u64) -> Arc<Notify> {
        let wake = Arc::new(Notify::new());
        self.lock().insert(
            node.clone(),
            Registered {
                session,
                wake: wake.clone(),
                interest: None,
            },
        );
        wake
    }

    /// Session `session` of `node` ended (a newer one is left alone).
    pub fn unregister(&self, node: &NodeId, session: u64) {
        let mut sessions = self.lock();
        if sessions.get(node).is_some_and(|r| r.session == session) {
            sessions.remove(node);
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A slice of the cluster as sessions consume it: an interest, planned
/// from the cluster settings or a rollout's target.
type Slice = (Interest, Option<String>);

/// What a slice was last seen built from. Its revisions alone are not
/// enough: one etcd transaction can change records that two caches hold
/// (an apply that removes a VIP and changes the settings), and a pass that
/// saw one cache catch up before the other built the slice at the
/// transaction's revision already, from the other cache's old state; when
/// that cache catches up the slice's revision does not move again. So the
/// revisions of the other caches the slice reads count too (VIPs, for a
/// slice with VIPs; orchestration, which every node's steps follow anyway).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SliceInputs {
    view: u64,
    steps: u64,
    vips: i64,
    orchestration: i64,
}

/// The caches as one pass saw them.
#[derive(Clone)]
struct Seen {
    specs: Arc<SpecSnapshot>,
    vips: Arc<VipSnapshot>,
    orchestration: Arc<OrchestrationSnapshot>,
}

/// Follows this replica's caches and wakes the sessions each change
/// concerns, until shutdown.
pub async fn run(ctx: SessionContext) {
    let mut specs = ctx.specs.clone();
    let mut vips = ctx.vips.clone();
    let mut orchestration = ctx.orchestration.clone();
    let mut seen = Seen {
        specs: specs.borrow_and_update().clone(),
        vips: vips.borrow_and_update().clone(),
        orchestration: orchestration.borrow_and_update().clone(),
    };
    // What each slice was last seen built from.
    let mut slices: HashMap<Slice, SliceInputs> = HashMap::new();
    loop {
        let changed = tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            c = specs.changed() => c,
            c = vips.changed() => c,
            c = orchestration.changed() => c,
        };
        if changed.is_err() {
            return;
        }
        let now = Seen {
            specs: specs.borrow_and_update().clone(),
            vips: vips.borrow_and_update().clone(),
            orchestration: orchestration.borrow_and_update().clone(),
        };
        let woken = wake(&ctx, &seen, &now, &mut slices);
        tracing::trace!(woken, "cache change fanned out");
        seen = now;
    }
}

/// Wakes the sessions the change from `before` to `now` concerns; how many.
fn wake(
    ctx: &SessionContext,
    before: &Seen,
    now: &Seen,
    slices: &mut HashMap<Slice, SliceInputs>,
) -> usize {
    let everyone = concerns_everyone(&before.specs, &now.specs)
        || before.vips.synced != now.vips.synced
        || before.orchestration.synced != now.orchestration.synced;
    let own = changed_nodes(&before.specs, &now.specs);
    // The slices in use, each checked once.
    let interests: HashSet<Slice> = {
        let mut sessions = ctx.fanout.lock();
        for (node, registered) in sessions.iter_mut() {
            if registered.interest.is_none() || everyone || own.contains(node) {
                let roles = now
                    .specs
                    .specs
                    .get(node)
                    .map(|s| s.value.roles.clone())
                    .unwrap_or_default();
                let target = now.specs.rollout_target(node).map(|t| t.0.to_owned());
                let interest = Interest::for_node(&roles, now.specs.settings_for(node));
                registered.interest = Some((interest, target));
            }
        }
        sessions
            .values()
            .filter_map(|r| r.interest.clone())
            .collect()
    };
    let mut moved = HashSet::new();
    for slice in &interests {
        let (interest, target) = slice;
        let view = ctx
            .views
            .get(&now.specs, &now.vips, interest, target.as_deref())
            .revision;
        let inputs = SliceInputs {
            view,
            steps: now.orchestration.revision_for(interest),
            vips: if interest.vips { now.vips.revision } else { 0 },
            orchestration: now.orchestration.revision,
        };
        let last = slices.insert(slice.clone(), inputs);
        if last.is_some_and(|last| last != inputs) {
            moved.insert(slice.clone());
        }
    }
    slices.retain(|i, _| interests.contains(i));
    let sessions = ctx.fanout.lock();
    let mut woken = 0;
    for (node, registered) in sessions.iter() {
        let concerned = everyone
            || own.contains(node)
            || registered
                .interest
                .as_ref()
                .is_some_and(|i| moved.contains(i));
        if concerned {
            registered.wake.notify_one();
            woken += 1;
        }
    }
    woken
}

/// Whether the change is one that every node may consume: the first read,
/// the cluster settings, maintenance (gates and Kubernetes steps read it),
/// the removal markers, a rollout created or removed, a coordinator
/// revocation (every agent checks its replicas against them), or a record
/// deleted.
fn concerns_everyone(before: &SpecSnapshot, now: &SpecSnapshot) -> bool {
    let rev =
        |v: Option<&Versioned<steward_proto::converge::ClusterSettings>>| v.map(|s| s.mod_revision);
    before.synced != now.synced
        || rev(before.settings.as_ref()) != rev(now.settings.as_ref())
        || changed_any(&before.maintenance, &now.maintenance, before.revision)
        || before.departed != now.departed
        || before.sections != now.sections
        || now.specs.len() < before.specs.len()
        || now.addresses.len() < before.addresses.len()
        || now.revoked.len() < before.revoked.len()
        || !now.rollouts.keys().eq(before.rollouts.keys())
        || crate::desired::coordinator_revocations_revision(before)
            != crate::desired::coordinator_revocations_revision(now)
}

fn changed_any<K, V>(
    before: &BTreeMap<K, Versioned<V>>,
    now: &BTreeMap<K, Versioned<V>>,
    since: i64,
) -> bool {
    now.len() != before.len() || now.values().any(|v| v.mod_revision > since)
}

/// The nodes whose own records changed after `before`.
fn changed_nodes(before: &SpecSnapshot, now: &SpecSnapshot) -> HashSet<NodeId> {
    let since = before.revision;
    let newer = |map: &mut dyn Iterator<Item = (&NodeId, i64)>| -> Vec<NodeId> {
        map.filter(|(_, rev)| *rev > since)
            .map(|(id, _)| id.clone())
            .collect()
    };
    let mut nodes = HashSet::new();
    nodes.extend(newer(
        &mut now.specs.iter().map(|(id, v)| (id, v.mod_revision)),
    ));
    nodes.extend(newer(
        &mut now.addresses.iter().map(|(id, v)| (id, v.mod_revision)),
    ));
    nodes.extend(newer(
        &mut now.revoked.iter().map(|(id, v)| (id, v.mod_revision)),
    ));
    nodes.extend(newer(
        &mut now.reboots.iter().map(|(id, v)| (id, v.mod_revision)),
    ));
    // A rollout's change of a node (`changed/<node>`, and an upgrade's
    // `upgraded/<node>`) is one of its inputs.
    let mut kubernetes_moved = false;
    for rollout in now.rollouts.values() {
        nodes.extend(newer(
            &mut rollout.changed.iter().map(|(id, rev)| (id, *rev)),
        ));
        nodes.extend(newer(
            &mut rollout.upgraded.iter().map(|(id, rev)| (id, *rev)),
        ));
        kubernetes_moved |= rollout.nodes.iter().any(|(id, r)| {
            r.mod_revision > since && crate::rollout::upgrade::is_kubernetes(now, id)
        });
    }
    // A Kubernetes node's step moved: the control plane that asks for its
    // readiness follows its record (`rollout::upgrade::ready_checks`).
    if kubernetes_moved {
        nodes.extend(
            now.specs
                .iter()
                .filter(|(_, s)| s.value.roles.contains(&Role::K8sControlPlane))
                .map(|(id, _)| id.clone()),
        );
    }
    nodes
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use steward_proto::domain::{CertName, RevocableKind, Role};

    use crate::store::kv::{Op, Txn};
    use crate::store::{encode, MemoryBackend};
    use crate::testing::{node, put_roles, TestReplica};

    async fn woken(wake: &tokio::sync::Notify, within: Duration) -> bool {
        tokio::time::timeout(within, wake.notified()).await.is_ok()
    }

    #[tokio::test]
    async fn a_change_wakes_the_sessions_it_concerns_only() {
        let replica = TestReplica::start(MemoryBackend::new(), "c-1").await;
        let store = replica.store();
        put_roles(store, "lb-1", &[Role::Lb]).await;
        for id in ["n-1", "n-2", "n-3"] {
            put_roles(store, id, &[]).await;
        }
        let fanout = &replica.ctx.fanout;
        let wake: Vec<_> = ["lb-1", "n-1", "n-2", "n-3"]
            .iter()
            .enumerate()
            .map(|(i, id)| fanout.register(&node(id), i as u64))
            .collect();
        // Let the passes over the writes above settle (one more write),
        // and forget what they woke.
        put_roles(store, "n-3", &[]).await;
        assert!(woken(&wake[3], Duration::from_secs(5)).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
        for w in &wake {
            woken(w, Duration::from_millis(10)).await;
        }

        // A role-less node's address (what every agent writes when it
        // first connects): that node only.
        store
            .put_address_if(&node("n-2"), 0, "198.18.0.2".parse().expect("ip"))
            .await
            .expect("address");
        assert!(woken(&wake[2], Duration::from_secs(5)).await, "n-2 itself");
        for (i, w) in wake.iter().enumerate().filter(|(i, _)| *i != 2) {
            assert!(
                !woken(w, Duration::from_millis(100)).await,
                "session {i} woken"
            );
        }

        // n-1 becomes a worker: n-1, and the lb node that sees every
        // member; not the other role-less nodes.
        put_roles(store, "n-1", &[Role::K8sWorker]).await;
        assert!(woken(&wake[1], Duration::from_secs(5)).await, "n-1 itself");
        assert!(woken(&wake[0], Duration::from_millis(100)).await, "lb-1");
        assert!(!woken(&wake[2], Duration::from_millis(100)).await, "n-2");
        assert!(!woken(&wake[3], Duration::from_millis(100)).await, "n-3");

        // Cluster settings concern everyone.
        let settings = steward_proto::converge::ClusterSettings::default();
        let key = store.keys().cluster_settings();
        store
            .txn(
                Txn::new().and_then([Op::put(key, encode(&settings))]),
                "test",
            )
            .await
            .expect("settings written");
        for (i, w) in wake.iter().enumerate() {
            assert!(
                woken(w, Duration::from_secs(5)).await,
                "session {i} not woken"
            );
        }

        // A coordinator revocation concerns everyone (each agent checks
        // its replicas against it), and moves every node's revision; an
        // admin revocation concerns no node.
        let before: Vec<u64> = ["lb-1", "n-1", "n-2", "n-3"]
            .iter()
            .map(|id| replica.ctx.desired_revision_for(&node(id)))
            .collect();
        store
            .revoke_certificate(
                RevocableKind::Admin,
                &CertName::new("ops").expect("name"),
                "admin",
            )
            .await
            .expect("revoked");
        for (i, w) in wake.iter().enumerate() {
            assert!(
                !woken(w, Duration::from_millis(100)).await,
                "session {i} woken by an admin revocation"
            );
        }
        store
            .revoke_certificate(
                RevocableKind::Coordinator,
                &CertName::new("c-9").expect("name"),
                "admin",
            )
            .await
            .expect("revoked");
        for (i, w) in wake.iter().enumerate() {
            assert!(
                woken(w, Duration::from_secs(5)).await,
                "session {i} not woken by a coordinator revocation"
            );
        }
        for (i, id) in ["lb-1", "n-1", "n-2", "n-3"].iter().enumerate() {
            let desired = replica.ctx.desired_for(&node(id)).expect("synced");
            assert!(desired.revision > before[i], "{id}: {desired:?}");
            assert_eq!(
                desired.revision,
                replica.ctx.desired_revision_for(&node(id)),
                "{id}"
            );
            let names: Vec<_> = desired
                .coordinator_revocations
                .iter()
                .map(|r| r.name.as_str())
                .collect();
            assert_eq!(names, ["c-9"], "{id}");
        }

        // A rollout's change of a node (its `changed/<node>` marker) wakes
        // that node (the first marker creates the rollout: everyone).
        for (id, i) in [("n-1", 1), ("n-3", 3)] {
            let marker = store.keys().rollout_changed("r1", &node(id));
            store
                .txn(Txn::new().and_then([Op::put(marker, Vec::new())]), "test")
                .await
                .expect("marker written");
            assert!(
                woken(&wake[i], Duration::from_secs(5)).await,
                "{id} not woken by its rollout change"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
            for w in &wake {
                woken(w, Duration::from_millis(10)).await;
            }
        }

        // An ended session is not woken any more.
        fanout.unregister(&node("n-2"), 2);
        assert_eq!(fanout.len(), 3);
    }
}
