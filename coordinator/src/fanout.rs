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
use crate::cache::{Cut, SpecSnapshot};
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
    let mut cut = ctx.cut.clone();
    let seen_now = |cut: &Cut| Seen {
        specs: cut.specs.clone(),
        vips: cut.vips.clone(),
        orchestration: cut.orchestration.clone(),
    };
    let mut seen = seen_now(&cut.borrow_and_update());
    // What each slice was last seen built from.
    let mut slices: HashMap<Slice, SliceInputs> = HashMap::new();
    loop {
        let changed = tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            c = cut.changed() => c,
        };
        if changed.is_err() {
            return;
        }
        let now = seen_now(&cut.borrow_and_update());
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
        || changed_any(&before.maintenance, &now.maintenance)
        || before.departed != now.departed
        || before.sections != now.sections
        || now.specs.len() < before.specs.len()
        || now.addresses.len() < before.addresses.len()
        || now.revoked.len() < before.revoked.len()
        || !now.rollouts.keys().eq(before.rollouts.keys())
        || crate::desired::coordinator_revocations_revision(before)
            != crate::desired::coordinator_revocations_revision(now)
}

/// Whether any entry of `before` and `now` differs (added, removed, or
/// written again).
fn changed_any<K: Ord, V>(
    before: &BTreeMap<K, Versioned<V>>,
    now: &BTreeMap<K, Versioned<V>>,
) -> bool {
    let mut any = false;
    diff(before, now, |_| any = true, |v| v.mod_revision);
    any
}

/// Calls `changed` with every key whose entry differs between `before` and
/// `now` (added, removed, or at another revision), walking both maps in
/// order once.
///
/// Entry by entry, not "newer than the revision `before` was published
/// at": the cache follows several prefixes, and one transaction's writes
/// under two of them (a rollout step under `cluster/` and the node's
/// `nodes/<id>/reboot`) can arrive in two publications at the same
/// revision; a watermark would miss the second.
fn diff<'a, K: Ord + 'a, V: 'a>(
    before: &'a BTreeMap<K, V>,
    now: &'a BTreeMap<K, V>,
    mut changed: impl FnMut(&'a K),
    revision: impl Fn(&V) -> i64,
) {
    // A map no change touched is still shared with the snapshot before
    // (`cache::Shared`): nothing to compare.
    if std::ptr::eq(before, now) {
        return;
    }
    let (mut a, mut b) = (before.iter().peekable(), now.iter().peekable());
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => return,
            (Some((k, _)), None) => {
                changed(k);
                a.next();
            }
            (None, Some((k, _))) => {
                changed(k);
                b.next();
            }
            (Some((ka, va)), Some((kb, vb))) => match ka.cmp(kb) {
                std::cmp::Ordering::Less => {
                    changed(ka);
                    a.next();
                }
                std::cmp::Ordering::Greater => {
                    changed(kb);
                    b.next();
                }
                std::cmp::Ordering::Equal => {
                    if revision(va) != revision(vb) {
                        changed(ka);
                    }
                    a.next();
                    b.next();
                }
            },
        }
    }
}

/// The nodes whose own records changed between `before` and `now`.
fn changed_nodes(before: &SpecSnapshot, now: &SpecSnapshot) -> HashSet<NodeId> {
    let mut nodes = HashSet::new();
    let mut add = |id: &NodeId| {
        nodes.insert(id.clone());
    };
    diff(&before.specs, &now.specs, &mut add, |v| v.mod_revision);
    diff(&before.addresses, &now.addresses, &mut add, |v| {
        v.mod_revision
    });
    diff(&before.revoked, &now.revoked, &mut add, |v| v.mod_revision);
    diff(&before.reboots, &now.reboots, &mut add, |v| v.mod_revision);
    // A rollout's change of a node (`changed/<node>`, and an upgrade's
    // `upgraded/<node>`) is one of its inputs.
    let empty = crate::rollout::model::RolloutEntry::default();
    let mut kubernetes_moved = false;
    for (id, rollout) in &now.rollouts {
        let was = before.rollouts.get(id).unwrap_or(&empty);
        diff(&was.changed, &rollout.changed, &mut add, |rev| *rev);
        diff(&was.upgraded, &rollout.upgraded, &mut add, |rev| *rev);
        diff(
            &was.nodes,
            &rollout.nodes,
            |node| kubernetes_moved |= crate::rollout::upgrade::is_kubernetes(now, node),
            |v| v.mod_revision,
        );
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
    use std::collections::HashSet;
    use std::time::Duration;

    use steward_proto::domain::{CertName, RevocableKind, Role};

    use super::changed_nodes;
    use crate::cache::SpecSnapshot;
    use crate::store::kv::{Op, Txn};
    use crate::store::Versioned;
    use crate::store::{encode, MemoryBackend};
    use crate::testing::{node, put_roles, TestReplica};

    async fn woken(wake: &tokio::sync::Notify, within: Duration) -> bool {
        tokio::time::timeout(within, wake.notified()).await.is_ok()
    }

    /// One transaction wrote a rollout step (under `cluster/`) and the
    /// node's reboot request (under `nodes/`); the cache published them in
    /// two snapshots at the same revision. The second still changes the
    /// node (a watermark "newer than the last revision" missed it, and the
    /// node never heard of its reboot: a reboot rollout stalled in CI).
    #[test]
    fn a_record_published_after_its_revision_still_changes_its_node() {
        let rb1 = node("rb1");
        let before = SpecSnapshot {
            revision: 41,
            ..Default::default()
        };
        let mut first = before.clone();
        first.revision = 42;
        let mut second = first.clone();
        std::sync::Arc::make_mut(&mut second.reboots).insert(
            rb1.clone(),
            Versioned {
                value: crate::store::RebootRecord {
                    boot_id: "b".into(),
                    rollout: "r1".into(),
                    at_unix_ms: 1,
                },
                mod_revision: 42,
            },
        );
        assert!(changed_nodes(&before, &first).is_empty());
        assert_eq!(changed_nodes(&first, &second), HashSet::from([rb1.clone()]));
        assert_eq!(changed_nodes(&second, &second.clone()), HashSet::new());
        let mut third = second.clone();
        std::sync::Arc::make_mut(&mut third.reboots).clear();
        assert_eq!(
            changed_nodes(&second, &third),
            HashSet::from([rb1]),
            "a removal too"
        );
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
