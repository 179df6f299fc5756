//! Rollouts (`stewardctl apply --rollout`, DESIGN.md §7): a change to the
//! cluster settings applied node by node through the maintenance gates,
//! driven by the leader from state in etcd.
//!
//! - [`create`] (any replica, on `Apply` with rollout options) plans the
//!   nodes whose desired state the change touches ([`plan`]) and writes
//!   the rollout in one transaction; nobody's desired state changes yet.
//! - [`driver`] (the leader) moves each node through draining, drained,
//!   changed, converged, healthy and done; a node is "changed" when its
//!   `changed/<node>` marker exists, and from then on its desired state
//!   plans from the rollout's target (`SpecSnapshot::rollout_target`).
//! - When every node is done, the leader writes the target as the cluster
//!   settings; the nodes' revisions only grow and none changes twice.
//! - [`control`] writes `rollout pause/resume/abort`; [`list`] and [`get`]
//!   read for `rollout list/status`. `resume` of a failed rollout asks the
//!   leader to try its failed node again from the step it failed at
//!   ([`driver::retried`]).
//!
//! At most one rollout is active (`cluster/rollouts/.active`), and a plain
//! apply is refused while one is.

pub mod driver;
pub mod model;
pub mod plan;
pub mod reboot;
pub mod upgrade;
pub mod window;

use steward_proto::admin::{RolloutNodeView, RolloutView};
use steward_proto::converge::ClusterSettings;
use steward_proto::domain::{EventKind, NodeId};
use tracing::info;

use self::model::{
    ActiveRollout, Phase, RolloutControl, RolloutEntry, RolloutOptions, RolloutSpec, RolloutState,
    Step,
};
use crate::agent_service::SessionContext;
use crate::error::{Error, Result};
use crate::store::kv::{Cmp, Op, Txn};
use crate::store::{encode, unix_ms, Store};

pub use steward_proto::admin::RolloutAction as Action;

/// Refuses when a rollout holds the cluster; else the mod revision of
/// `cluster/rollouts/.active`, which the caller's write must compare.
pub async fn ensure_none_active(store: &Store) -> Result<i64> {
    let (active, revision) = store.active_rollout().await?;
    match active.id {
        Some(id) => Err(Error::RolloutInProgress(id)),
        None => Ok(revision),
    }
}

/// A new rollout of `target` (planned from the settings at
/// `base_revision`), unless no node's desired state would change
/// (`Ok(None)`: the caller writes the settings at once).
pub async fn create(
    ctx: &SessionContext,
    target: &ClusterSettings,
    base_revision: i64,
    changes: Vec<String>,
    options: RolloutOptions,
    by: &str,
) -> Result<Option<String>> {
    let store = &ctx.store;
    let active_revision = ensure_none_active(store).await?;
    let specs = ctx.specs.borrow().clone();
    let vips = ctx.vips.borrow().clone();
    let holders: std::collections::BTreeSet<NodeId> = vips
        .vips
        .values()
        .filter_map(|v| v.owner_node().cloned())
        .collect();
    let candidates: Vec<plan::Candidate> = specs
        .specs
        .iter()
        .filter(|(_, s)| !s.value.roles.is_empty())
        .map(|(id, s)| plan::Candidate {
            node: id.clone(),
            roles: s.value.roles.clone(),
            zone: s
                .value
                .labels
                .get(crate::cache::ZONE_LABEL)
                .cloned()
                .unwrap_or_default(),
            holds_vip: holders.contains(id),
            current: specs.settings_for(id).cloned().unwrap_or_default(),
        })
        .collect();
    let mut batches = plan::plan(&candidates, target, &options);
    if batches.batches.is_empty() {
        return Ok(None);
    }
    // A Kubernetes version change of a running cluster: control planes
    // first, one at a time (`upgrade`).
    let orchestration = ctx.orchestration.borrow().clone();
    let upgrade = upgrade::detect(
        specs.settings.as_ref().map(|s| &s.value),
        target,
        upgrade::first_control_plane(&specs, &orchestration),
    );
    if let Some(u) = &upgrade {
        let is_cp = |n: &NodeId| {
            specs.specs.get(n).is_some_and(|s| {
                s.value
                    .roles
                    .contains(&steward_proto::domain::Role::K8sControlPlane)
            })
        };
        batches.batches = upgrade::order(&batches.batches, is_cp, &u.first_control_plane);
        batches.canary_batches = batches.canary_batches.min(batches.batches.len() as u32);
    }
    let id = format!("r{}", unix_ms());
    let spec = RolloutSpec {
        id: id.clone(),
        target: target.clone(),
        base_settings_revision: base_revision,
        options,
        batches: batches.batches,
        canary_batches: batches.canary_batches,
        changes,
        created_by: by.to_owned(),
        created_at_unix_ms: unix_ms(),
        upgrade,
        kind: model::RolloutKind::Settings,
    };
    let guards = vec![Cmp::mod_revision(
        store.keys().cluster_settings(),
        base_revision,
    )];
    let txn = insert_txn(store, &spec, active_revision, guards);
    if !store.txn(txn, "create rollout").await?.succeeded {
        return Err(Error::Conflict {
            key: "the cluster settings or the active rollout".into(),
        });
    }
    info!(rollout.id = %id, nodes = spec.node_count(), "rollout created");
    Ok(Some(id))
}

/// The transaction that writes the new rollout `spec` and makes it the
/// active one, guarded on `cluster/rollouts/.active` being at
/// `active_revision` and on `guards`.
pub(crate) fn insert_txn(
    store: &Store,
    spec: &RolloutSpec,
    active_revision: i64,
    guards: Vec<Cmp>,
) -> Txn {
    let id = spec.id.clone();
    let by = &spec.created_by;
    let keys = store.keys();
    let state = RolloutState {
        phase: Phase::Running,
        reason: String::new(),
        at_unix_ms: unix_ms(),
    };
    let event = store.event(
        EventKind::RolesChanged,
        None,
        format!(
            "rollout {id} created by {by}: {} nodes in {} batches: {}",
            spec.node_count(),
            spec.batches.len(),
            spec.changes.join("; ")
        ),
    );
    Txn::new()
        .when([
            Cmp::mod_revision(keys.rollout_active(), active_revision),
            Cmp::mod_revision(keys.rollout_spec(&id), 0),
        ])
        .when(guards)
        .and_then([
            Op::put(keys.rollout_spec(&id), encode(spec)),
            Op::put(keys.rollout_state(&id), encode(&state)),
            Op::put(
                keys.rollout_control(&id),
                encode(&RolloutControl::default()),
            ),
            Op::put(
                keys.rollout_active(),
                encode(&ActiveRollout {
                    id: Some(id.clone()),
                }),
            ),
            store.event_op(&event),
        ])
}

/// Every rollout, oldest first, without per-node detail.
pub async fn list(store: &Store) -> Result<Vec<RolloutView>> {
    let rollouts = store.rollouts().await?;
    Ok(rollouts
        .iter()
        .filter_map(|(id, entry)| {
            let mut view = view(id, entry)?;
            view.nodes.clear();
            Some(view)
        })
        .collect())
}

/// Rollout `id` with every node.
pub async fn get(store: &Store, id: &str) -> Result<RolloutView> {
    let entry = store.rollout(id).await?;
    entry
        .as_ref()
        .and_then(|e| view(id, e))
        .ok_or_else(|| Error::UnknownRollout(id.to_owned()))
}

/// `rollout pause/resume/abort` by admin `by`.
pub async fn control(store: &Store, id: &str, action: Action, by: &str) -> Result<RolloutView> {
    for _ in 0..8 {
        let entry = store
            .rollout(id)
            .await?
            .ok_or_else(|| Error::UnknownRollout(id.to_owned()))?;
        let phase = entry.phase().unwrap_or(Phase::Running);
        if !phase.active() {
            return Err(Error::RolloutOver {
                id: id.to_owned(),
                phase: phase.as_str(),
                action: action_word(action),
            });
        }
        let retry = action == Action::Resume && phase == Phase::Failed;
        if action == Action::Resume && phase != Phase::Running && !retry {
            return Err(Error::RolloutCannotResume {
                id: id.to_owned(),
                phase: phase.as_str(),
            });
        }
        let current = entry.control.as_ref();
        let mut next = driver::control_after(current.map(|c| &c.value), action, by);
        // A failed rollout resumes by trying its failed node again.
        next.retry = retry;
        let txn = Store::put_if_txn(
            store.keys().rollout_control(id),
            current.map_or(0, |c| c.mod_revision),
            encode(&next),
        )
        .and_then([store.event_op(&store.event(
            EventKind::RolesChanged,
            None,
            format!(
                "rollout {id}: {} asked by {by}{}",
                action_word(action),
                if retry {
                    " (the failed node is tried again)"
                } else {
                    ""
                }
            ),
        ))]);
        if store.txn(txn, "control rollout").await?.succeeded {
            info!(rollout.id = %id, action = action_word(action), %by, "rollout control");
            return get(store, id).await;
        }
    }
    Err(Error::Conflict {
        key: format!("rollout {id} control"),
    })
}

fn action_word(action: Action) -> &'static str {
    match action {
        Action::Pause => "pause",
        Action::Resume => "resume",
        Action::Abort => "abort",
    }
}

/// The phase operators see: "paused" for a running rollout paused.
pub fn shown_phase(entry: &RolloutEntry) -> &'static str {
    match entry.phase() {
        Some(Phase::Running) if entry.paused() => "paused",
        Some(phase) => phase.as_str(),
        None => "creating",
    }
}

/// `entry` for `rollout status` (`None`: no spec).
pub fn view(id: &str, entry: &RolloutEntry) -> Option<RolloutView> {
    let spec = &entry.spec.as_ref()?.value;
    let mut reason = entry
        .state
        .as_ref()
        .map(|s| s.value.reason.clone())
        .unwrap_or_default();
    if entry.paused() && entry.phase() == Some(Phase::Running) {
        if let Some(c) = &entry.control {
            reason = format!("paused by {}", c.value.by);
        }
    }
    if entry.retry_requested() && entry.phase() == Some(Phase::Failed) {
        reason = format!("{reason} (resume asked: the failed node is tried again)");
    }
    let mut nodes = Vec::new();
    for (batch, members) in spec.batches.iter().enumerate() {
        for node in members {
            let record = entry.nodes.get(node).map(|r| &r.value);
            let times = record.map(|r| r.times.clone()).unwrap_or_default();
            nodes.push(RolloutNodeView {
                node: node.clone(),
                batch: batch as u32,
                step: record.map_or("pending", |r| r.step.as_str()).to_owned(),
                reason: record.map(|r| r.reason.clone()).unwrap_or_default(),
                started_unix_ms: times.started,
                drained_unix_ms: times.drained,
                changed_unix_ms: times.changed,
                converged_unix_ms: times.converged,
                healthy_unix_ms: times.healthy,
                finished_unix_ms: times.finished,
                changed_revision: entry.changed.get(node).copied().unwrap_or(0).max(0) as u64,
                boot_id_before: record.map(|r| r.boot_id_before.clone()).unwrap_or_default(),
                boot_id_after: record.map(|r| r.boot_id_after.clone()).unwrap_or_default(),
            });
        }
    }
    let done = entry
        .nodes
        .values()
        .filter(|r| r.value.step == Step::Done)
        .count();
    Some(RolloutView {
        id: id.to_owned(),
        phase: shown_phase(entry).to_owned(),
        reason,
        created_by: spec.created_by.clone(),
        created_at_unix_ms: spec.created_at_unix_ms,
        changes: spec.changes.clone(),
        options: spec.options,
        canary_batches: spec.canary_batches,
        batches: spec.batches.len() as u32,
        nodes_total: spec.node_count() as u32,
        nodes_done: done as u32,
        nodes,
    })
}
