//! Reboot rollouts (`stewardctl rollout reboot`, DESIGN.md §7): the
//! rollout machinery of [`super::driver`] with a reboot as each node's
//! change.
//!
//! - [`create`] (any replica) picks the nodes (`--nodes`, `--role`,
//!   `--all`, `--only-required`), orders them as [`super::plan::order`]
//!   does, and writes the rollout (`kind = reboot`).
//! - The driver drains a node through its gates, then [`ask`]s: in one
//!   fenced transaction the node's step becomes `changed` (with the boot id
//!   it runs now, from its facts) and `nodes/<id>/reboot` is written. That
//!   record is an input of the node's desired state: its agent reboots
//!   once for it (its mod revision is the generation), and only while it
//!   still runs the boot named there (`steward_agent::reboot`).
//! - The step after `changed` is the agent back with another boot id
//!   ([`progress`]); then healthy (the driver's health check) and undrained,
//!   and the next node's turn.
//!
//! **Architecture invariant:** a reboot is asked once per node and rollout:
//! the ask and the step that records it are one transaction, so a new
//! leader finds the node `changed` and waits for it to come back; it never
//! asks again.

use std::collections::{BTreeMap, BTreeSet};

use steward_proto::admin::{RebootRollout, RebootSelector};
use steward_proto::domain::{EventKind, NodeId, Role};
use tracing::info;

use super::driver::Run;
use super::model::{RolloutKind, RolloutNodeRecord, RolloutSpec, Step};
use super::plan;
use crate::agent_service::SessionContext;
use crate::error::{Error, Result};
use crate::store::kv::{Cmp, Op};
use crate::store::{encode, unix_ms, NodeRecord, RebootRecord};

/// The first line of a reboot rollout's `changes`.
pub fn describe(request: &RebootRollout) -> String {
    let which = which(&request.selector);
    let only = if request.only_required {
        " that need it"
    } else {
        ""
    };
    format!("reboot {which}{only}")
}

/// `--nodes a,b`, `--role r`, `--all` in words.
fn which(selector: &RebootSelector) -> String {
    match selector {
        RebootSelector::Nodes(ids) => format!(
            "nodes {}",
            ids.iter().map(NodeId::as_str).collect::<Vec<_>>().join(",")
        ),
        RebootSelector::Role(role) => format!("role {role}"),
        RebootSelector::All => "all nodes".to_owned(),
    }
}

/// The nodes of `fleet` (with their facts) that `request` selects, in
/// name order; refuses an unknown node, a selection that leaves none, and
/// a node that reports no boot id (whose return could not be told).
pub fn select(
    fleet: &std::collections::BTreeMap<NodeId, NodeRecord>,
    request: &RebootRollout,
) -> Result<Vec<NodeId>> {
    let roles = |r: &NodeRecord| r.spec.as_ref().map(|s| s.value.roles.clone());
    let mut chosen: Vec<NodeId> = match &request.selector {
        RebootSelector::Nodes(ids) => {
            if let Some(unknown) = ids.iter().find(|id| !fleet.contains_key(*id)) {
                return Err(Error::UnknownNode(unknown.clone()));
            }
            let mut ids = ids.clone();
            ids.sort();
            ids
        }
        RebootSelector::Role(role) => fleet
            .iter()
            .filter(|(_, r)| roles(r).is_some_and(|rs| rs.contains(role)))
            .map(|(id, _)| id.clone())
            .collect(),
        RebootSelector::All => fleet.keys().cloned().collect(),
    };
    let facts = |id: &NodeId| {
        fleet
            .get(id)
            .and_then(|r| r.facts.as_ref())
            .map(|f| &f.value)
    };
    let selected = chosen.len();
    if request.only_required {
        chosen.retain(|id| facts(id).is_some_and(|f| f.reboot_required.is_some()));
    }
    if chosen.is_empty() {
        let which = which(&request.selector);
        return Err(Error::RebootRefused(match selected {
            0 => format!("no node to reboot: {which} selects none"),
            n => format!(
                "no node to reboot: none of the {n} node(s) {which} selects reports needing \
                 a reboot (stewardctl nodes --reboot-required)"
            ),
        }));
    }
    let blind: Vec<&str> = chosen
        .iter()
        .filter(|id| facts(id).is_none_or(|f| f.boot_id.is_empty()))
        .map(NodeId::as_str)
        .collect();
    if !blind.is_empty() {
        return Err(Error::RebootRefused(format!(
            "{} reported no boot id (never connected, or an agent older than reboot \
             rollouts): the leader could not tell when it is back",
            blind.join(", ")
        )));
    }
    let away: Vec<&str> = chosen
        .iter()
        .filter(|id| {
            fleet
                .get(*id)
                .and_then(|r| r.status.as_ref())
                .is_none_or(|s| s.value.replica.is_none())
        })
        .map(NodeId::as_str)
        .collect();
    if !away.is_empty() {
        return Err(Error::RebootRefused(format!(
            "{} not connected: its agent could not be asked (select the others with --nodes)",
            away.join(", ")
        )));
    }
    Ok(chosen)
}

/// A reboot rollout of the nodes `request` selects, by admin `by`; its id.
pub async fn create(ctx: &SessionContext, request: &RebootRollout, by: &str) -> Result<String> {
    let store = &ctx.store;
    let active_revision = super::ensure_none_active(store).await?;
    let specs = ctx.fresh_specs().await?;
    let fleet = selection_fleet(store, &specs, request).await?;
    let vips = ctx.vips.borrow().clone();
    let spec = build(&fleet, &specs, &vips, request, by)?;
    let txn = super::insert_txn(store, &spec, active_revision, Vec::new());
    if !store.txn(txn, "create rollout").await?.succeeded {
        return Err(Error::Conflict {
            key: "the active rollout".into(),
        });
    }
    info!(rollout.id = %spec.id, nodes = spec.node_count(), "reboot rollout created");
    Ok(spec.id)
}

/// Every node the spec cache knows of (a spec, an address, a revocation,
/// a maintenance, reboot or reboot-required record), with its spec.
fn known_nodes(specs: &crate::cache::SpecSnapshot) -> BTreeMap<NodeId, NodeRecord> {
    let mut ids: BTreeSet<&NodeId> = specs.specs.keys().collect();
    ids.extend(specs.addresses.keys());
    ids.extend(specs.revoked.keys());
    ids.extend(specs.maintenance.keys());
    ids.extend(specs.reboots.keys());
    ids.extend(specs.reboot_required.keys());
    ids.into_iter()
        .map(|id| {
            let record = NodeRecord {
                spec: specs.specs.get(id).cloned(),
                ..NodeRecord::default()
            };
            (id.clone(), record)
        })
        .collect()
}

/// The fleet as [`select`] needs it for `request`, without reading every
/// node from etcd: every node the spec cache knows ([`known_nodes`]), and
/// the status and facts of those `request` may pick only: the named ones,
/// or those of the role or all, narrowed with `--only-required` to the
/// nodes the cache's reboot-required markers list (the facts decide; the
/// markers only spare the reads of nodes that cannot qualify).
pub(crate) async fn selection_fleet(
    store: &crate::store::Store,
    specs: &crate::cache::SpecSnapshot,
    request: &RebootRollout,
) -> Result<BTreeMap<NodeId, NodeRecord>> {
    let mut fleet = known_nodes(specs);
    let picked: BTreeSet<NodeId> = match &request.selector {
        RebootSelector::Nodes(ids) => ids.iter().cloned().collect(),
        RebootSelector::Role(role) => fleet
            .iter()
            .filter(|(_, r)| {
                r.spec
                    .as_ref()
                    .is_some_and(|s| s.value.roles.contains(role))
            })
            .map(|(id, _)| id.clone())
            .collect(),
        RebootSelector::All => fleet.keys().cloned().collect(),
    };
    let narrow = request.only_required && !matches!(request.selector, RebootSelector::Nodes(_));
    let picked = picked
        .into_iter()
        .filter(|id| !narrow || specs.reboot_required.contains_key(id));
    for (id, mut read) in store.node_details(picked).await? {
        read.spec = specs.specs.get(&id).cloned();
        if fleet.contains_key(&id) || read.status.is_some() {
            fleet.insert(id, read);
        }
    }
    Ok(fleet)
}

/// The rollout of the nodes of `fleet` (with their facts) that `request`
/// selects, in the planner's order (zone by zone, VIP holders last).
pub fn build(
    fleet: &std::collections::BTreeMap<NodeId, NodeRecord>,
    specs: &crate::cache::SpecSnapshot,
    vips: &crate::vip::VipSnapshot,
    request: &RebootRollout,
    by: &str,
) -> Result<RolloutSpec> {
    let chosen = select(fleet, request)?;
    let holders: BTreeSet<NodeId> = vips
        .vips
        .values()
        .filter_map(|v| v.owner_node().cloned())
        .collect();
    let candidates: Vec<plan::Candidate> = chosen
        .iter()
        .map(|id| {
            let spec = specs.specs.get(id).map(|s| &s.value);
            plan::Candidate {
                node: id.clone(),
                roles: spec.map(|s| s.roles.clone()).unwrap_or_default(),
                zone: spec
                    .and_then(|s| s.labels.get(crate::cache::ZONE_LABEL).cloned())
                    .unwrap_or_default(),
                holds_vip: holders.contains(id),
                current: Default::default(),
            }
        })
        .collect();
    let control_planes = specs
        .specs
        .values()
        .filter(|s| s.value.roles.contains(&Role::K8sControlPlane))
        .count();
    let batches = plan::order(
        candidates.iter().collect(),
        plan::quorum_cap(control_planes),
        &request.options,
    );
    let id = format!("r{}", unix_ms());
    let spec = RolloutSpec {
        id: id.clone(),
        // Not written at the end: a reboot changes no settings.
        target: specs
            .settings
            .as_ref()
            .map(|s| s.value.clone())
            .unwrap_or_default(),
        base_settings_revision: specs.settings.as_ref().map_or(0, |s| s.mod_revision),
        options: request.options,
        batches: batches.batches,
        canary_batches: batches.canary_batches,
        upgrade: None,
        changes: vec![describe(request)],
        created_by: by.to_owned(),
        created_at_unix_ms: unix_ms(),
        kind: RolloutKind::Reboot,
    };
    Ok(spec)
}

/// The nodes the maintenance window may reboot: they report needing it,
/// report a boot id, are connected, and were not rebooted by Steward since
/// the need appeared (a need that outlives its reboot waits for an
/// operator).
pub fn window_candidates(
    fleet: &std::collections::BTreeMap<NodeId, NodeRecord>,
    reboots: &std::collections::BTreeMap<NodeId, crate::store::Versioned<RebootRecord>>,
) -> Vec<NodeId> {
    fleet
        .iter()
        .filter(|(id, r)| {
            let Some(facts) = r.facts.as_ref().map(|f| &f.value) else {
                return false;
            };
            let Some(need) = &facts.reboot_required else {
                return false;
            };
            let connected = r.status.as_ref().is_some_and(|s| s.value.replica.is_some());
            let rebooted_since = reboots
                .get(*id)
                .is_some_and(|b| b.value.at_unix_ms >= need.since_unix_ms);
            !facts.boot_id.is_empty() && connected && !rebooted_since
        })
        .map(|(id, _)| id.clone())
        .collect()
}

/// How many nodes needing a reboot a window tick reads at a time.
const WINDOW_READ_CHUNK: usize = 64;

/// The leader with no rollout active: inside the maintenance window, with
/// time left for `longest` (a node's step timeouts, see
/// [`super::window`]), a reboot rollout of one node that needs it (the
/// first in the planner's order among the first [`WINDOW_READ_CHUNK`]
/// marked nodes, by name, that hold one that may go); fenced. Its id, if
/// it started one.
pub async fn window_tick(
    store: &crate::store::Store,
    fence: &crate::replica::Fence,
    world: &super::driver::World<'_>,
    longest: std::time::Duration,
    now_unix_ms: u64,
) -> Result<Option<String>> {
    let Some(text) = world
        .specs
        .settings
        .as_ref()
        .and_then(|s| s.value.maintenance_window.as_deref())
    else {
        return Ok(None);
    };
    let window = match text.parse::<super::window::MaintenanceWindow>() {
        Ok(w) => w,
        Err(error) => {
            tracing::warn!(%error, "ignoring the maintenance window");
            return Ok(None);
        }
    };
    if !window.may_start(now_unix_ms, longest) {
        return Ok(None);
    }
    // The nodes whose markers say they need a reboot Steward has not yet
    // done since: only these are read (status and facts, which decide).
    let needing: BTreeSet<NodeId> = world
        .specs
        .reboot_required
        .iter()
        .filter(|(id, need)| {
            world
                .specs
                .reboots
                .get(*id)
                .is_none_or(|b| b.value.at_unix_ms < need.value.since_unix_ms)
        })
        .map(|(id, _)| id.clone())
        .collect();
    // Read a chunk at a time (in name order) until one holds a node that
    // qualifies: a need across the fleet (a kernel update everywhere)
    // costs a window tick one chunk's reads, not the fleet's.
    let needing: Vec<NodeId> = needing.into_iter().collect();
    let mut found = None;
    for chunk in needing.chunks(WINDOW_READ_CHUNK) {
        let mut fleet = store.node_details(chunk.iter().cloned()).await?;
        for (id, record) in &mut fleet {
            record.spec = world.specs.specs.get(id).cloned();
        }
        let candidates = window_candidates(&fleet, &world.specs.reboots);
        if !candidates.is_empty() {
            found = Some((fleet, candidates));
            break;
        }
    }
    let Some((fleet, candidates)) = found else {
        return Ok(None);
    };
    let all = RebootRollout {
        selector: RebootSelector::Nodes(candidates),
        only_required: true,
        options: Default::default(),
    };
    let ordered = build(&fleet, world.specs, world.vips, &all, "")?;
    let Some(first) = ordered.batches.first().and_then(|b| b.first()) else {
        return Ok(None);
    };
    let one = RebootRollout {
        selector: RebootSelector::Nodes(vec![first.clone()]),
        ..all
    };
    let by = format!("leader: maintenance window {text}");
    let spec = build(&fleet, world.specs, world.vips, &one, &by)?;
    let (active, active_revision) = store.active_rollout().await?;
    if active.id.is_some() {
        return Ok(None);
    }
    let txn = super::insert_txn(store, &spec, active_revision, Vec::new());
    if !fence.txn(store, txn).await?.succeeded {
        return Ok(None);
    }
    info!(rollout.id = %spec.id, node.id = %first, window = %text, "maintenance window: reboot rollout started");
    Ok(Some(spec.id))
}

/// The reboot step of a drained `node` whose record is at `expected`:
/// records the boot it runs and asks its agent to reboot, in one fenced
/// transaction (or fails the node if it reports no boot id).
pub(super) async fn ask(
    run: &Run<'_>,
    node: &NodeId,
    expected: i64,
    mut next: RolloutNodeRecord,
) -> Result<()> {
    let now = unix_ms();
    let observed = run.store.node(node).await?;
    let boot_id = observed.facts.map(|f| f.value.boot_id).unwrap_or_default();
    if boot_id.is_empty() {
        next.step = Step::Failed;
        next.reason = "its agent reports no boot id: its return could not be told".into();
        next.times.finished = now;
        run.write_node(node, expected, &next, Vec::new(), Vec::new())
            .await?;
        return Ok(());
    }
    let key = run.store.keys().node_reboot(node);
    let current = run
        .world
        .specs
        .reboots
        .get(node)
        .map_or(0, |r| r.mod_revision);
    let record = RebootRecord {
        boot_id: boot_id.clone(),
        rollout: run.id.to_owned(),
        at_unix_ms: now,
    };
    let event = run.store.event(
        EventKind::NodeMaintenance,
        Some(node.clone()),
        format!(
            "{node} asked to reboot by rollout {} (boot {boot_id})",
            run.id
        ),
    );
    next.step = Step::Changed;
    next.reason.clear();
    next.boot_id_before = boot_id;
    next.times.changed = now;
    let guards = vec![Cmp::mod_revision(key.clone(), current)];
    let ops = vec![Op::put(key, encode(&record)), run.store.event_op(&event)];
    if run.write_node(node, expected, &next, guards, ops).await? {
        info!(rollout.id = run.id, node.id = %node, "reboot asked");
    }
    Ok(())
}

/// Where a node asked to reboot stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Connected again with this boot id, not the one it was asked in.
    Back(String),
    /// What it waits for.
    Pending(String),
}

/// Whether the node (as read from etcd) came back from the reboot asked
/// while it ran boot `before`: its facts carry another boot id, and a
/// replica serves it.
pub fn progress(before: &str, observed: &NodeRecord) -> Progress {
    let boot_id = observed
        .facts
        .as_ref()
        .map(|f| f.value.boot_id.as_str())
        .unwrap_or_default();
    let connected = observed
        .status
        .as_ref()
        .is_some_and(|s| s.value.replica.is_some());
    if boot_id.is_empty() || boot_id == before {
        return Progress::Pending(if connected {
            format!("rebooting (still boot {})", short(before))
        } else {
            "rebooting (agent disconnected)".to_owned()
        });
    }
    if !connected {
        return Progress::Pending(format!("booted ({}), agent not connected", short(boot_id)));
    }
    Progress::Back(boot_id.to_owned())
}

/// The first 8 characters of a boot id, for messages.
fn short(boot_id: &str) -> &str {
    boot_id.get(..8).unwrap_or(boot_id)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use steward_proto::domain::{Facts, Health, NodeHealth, NodeSpec, RebootRequired, Role};

    use super::*;
    use crate::rollout::model::RolloutOptions;
    use crate::store::{NodeStatusRecord, Versioned};

    fn node(id: &str) -> NodeId {
        NodeId::new(id).expect("node id")
    }

    fn record(roles: &[Role], boot_id: &str, required: bool, connected: bool) -> NodeRecord {
        NodeRecord {
            spec: Some(Versioned {
                value: NodeSpec {
                    roles: roles.iter().copied().collect(),
                    ..Default::default()
                },
                mod_revision: 1,
            }),
            status: Some(Versioned {
                value: NodeStatusRecord {
                    health: if connected {
                        NodeHealth::Healthy
                    } else {
                        NodeHealth::Disconnected
                    },
                    last_health: Health::default(),
                    replica: connected.then(|| "c-1".to_owned()),
                    last_seen_unix_ms: 1,
                    applied_revision: 1,
                    agent_version: "test".into(),
                },
                mod_revision: 2,
            }),
            facts: Some(Versioned {
                value: Facts {
                    boot_id: boot_id.into(),
                    reboot_required: required.then(|| RebootRequired {
                        since_unix_ms: 1,
                        source: "reboot-required".into(),
                        packages: vec!["linux-image-amd64".into()],
                    }),
                    ..Default::default()
                },
                mod_revision: 3,
            }),
            ..Default::default()
        }
    }

    fn request(selector: RebootSelector, only_required: bool) -> RebootRollout {
        RebootRollout {
            selector,
            only_required,
            options: RolloutOptions::default(),
        }
    }

    fn fleet() -> BTreeMap<NodeId, NodeRecord> {
        BTreeMap::from([
            (node("lb-1"), record(&[Role::Lb], "b-lb1", true, true)),
            (node("w-1"), record(&[Role::K8sWorker], "b-w1", false, true)),
            (node("w-2"), record(&[Role::K8sWorker], "b-w2", true, true)),
        ])
    }

    #[test]
    fn the_selection_picks_by_id_role_all_and_need() {
        let fleet = fleet();
        let ids = |r: Result<Vec<NodeId>>| -> Vec<String> {
            r.expect("selected").iter().map(|n| n.to_string()).collect()
        };
        assert_eq!(
            ids(select(&fleet, &request(RebootSelector::All, false))),
            ["lb-1", "w-1", "w-2"]
        );
        assert_eq!(
            ids(select(&fleet, &request(RebootSelector::All, true))),
            ["lb-1", "w-2"]
        );
        assert_eq!(
            ids(select(
                &fleet,
                &request(RebootSelector::Role(Role::K8sWorker), true)
            )),
            ["w-2"]
        );
        assert_eq!(
            ids(select(
                &fleet,
                &request(
                    RebootSelector::Nodes(vec![node("w-2"), node("lb-1")]),
                    false
                )
            )),
            ["lb-1", "w-2"]
        );
        let unknown = select(
            &fleet,
            &request(RebootSelector::Nodes(vec![node("nope")]), false),
        );
        assert!(
            matches!(&unknown, Err(Error::UnknownNode(n)) if n.as_str() == "nope"),
            "{unknown:?}"
        );
        let none = select(
            &fleet,
            &request(RebootSelector::Nodes(vec![node("w-1")]), true),
        )
        .expect_err("w-1 needs no reboot");
        assert!(
            none.to_string()
                .contains("none of the 1 node(s) nodes w-1 selects reports needing a reboot"),
            "{none}"
        );
        let mut old = fleet.clone();
        old.insert(node("w-3"), record(&[Role::K8sWorker], "", false, true));
        let blind = select(&old, &request(RebootSelector::All, false)).expect_err("w-3 blind");
        assert!(
            blind.to_string().contains("w-3 reported no boot id"),
            "{blind}"
        );
        let mut gone = fleet.clone();
        gone.insert(node("w-4"), record(&[Role::K8sWorker], "b-w4", true, false));
        let away = select(&gone, &request(RebootSelector::All, true)).expect_err("w-4 away");
        assert!(away.to_string().contains("w-4 not connected"), "{away}");
    }

    #[test]
    fn a_node_is_back_only_connected_with_another_boot() {
        let asked_in = "boot-a";
        let same = record(&[], "boot-a", false, true);
        assert!(
            matches!(progress(asked_in, &same), Progress::Pending(w) if w.contains("still boot"))
        );
        let gone = record(&[], "boot-a", false, false);
        assert!(
            matches!(progress(asked_in, &gone), Progress::Pending(w) if w.contains("disconnected"))
        );
        // Facts of the new boot written, the session's status not yet.
        let booting = record(&[], "boot-b", false, false);
        assert!(
            matches!(progress(asked_in, &booting), Progress::Pending(w) if w.contains("not connected"))
        );
        let back = record(&[], "boot-b", false, true);
        assert_eq!(progress(asked_in, &back), Progress::Back("boot-b".into()));
    }

    #[test]
    fn the_window_reboots_only_connected_nodes_not_rebooted_since_the_need() {
        let mut fleet = fleet();
        fleet.insert(node("w-3"), record(&[], "b-w3", true, false));
        fleet.insert(node("w-4"), record(&[], "", true, true));
        let mut reboots = BTreeMap::new();
        // lb-1 was rebooted after its need appeared (since = 1): it waits
        // for an operator; w-2's reboot was before it.
        for (id, at) in [("lb-1", 5), ("w-2", 0)] {
            reboots.insert(
                node(id),
                Versioned {
                    value: RebootRecord {
                        boot_id: "old".into(),
                        rollout: "r1".into(),
                        at_unix_ms: at,
                    },
                    mod_revision: 9,
                },
            );
        }
        let ids: Vec<String> = window_candidates(&fleet, &reboots)
            .iter()
            .map(|n| n.to_string())
            .collect();
        // w-1 needs none, w-3 is not connected, w-4 has no boot id.
        assert_eq!(ids, ["w-2"]);
    }

    #[test]
    fn the_changes_line_says_what_is_rebooted() {
        assert_eq!(
            describe(&request(RebootSelector::Role(Role::Lb), true)),
            "reboot role lb that need it"
        );
        assert_eq!(
            describe(&request(
                RebootSelector::Nodes(vec![node("a"), node("b")]),
                false
            )),
            "reboot nodes a,b"
        );
    }

    /// Issue 13: a reboot selection reads the status and facts of the
    /// nodes that may qualify (with `--only-required`, those the markers
    /// list), not of the fleet; the facts still decide.
    #[tokio::test]
    async fn the_selection_reads_only_the_nodes_that_may_qualify() {
        use crate::store::MemoryBackend;
        use crate::testing::{put_connected, put_roles, TestReplica};
        const FLEET: usize = 300;
        let memory = MemoryBackend::new();
        let replica = TestReplica::start(memory.clone(), "c-1").await;
        let store = replica.store();
        let need = RebootRequired {
            since_unix_ms: 1,
            source: "reboot-required".into(),
            packages: Vec::new(),
        };
        let facts = |i: usize, needs: bool| Facts {
            boot_id: format!("boot-{i}"),
            reboot_required: needs.then(|| need.clone()),
            ..Default::default()
        };
        let id = |i: usize| format!("w-{i:03}");
        for i in 0..FLEET {
            put_connected(store, &id(i), &facts(i, i == 3 || i == 7)).await;
            put_roles(store, &id(i), &[Role::K8sWorker]).await;
        }
        put_roles(store, "lb-1", &[Role::Lb]).await;
        let specs = replica.ctx.fresh_specs().await.expect("caught up");
        assert_eq!(
            specs.reboot_required.keys().cloned().collect::<Vec<_>>(),
            [node("w-003"), node("w-007")]
        );
        let workers = |only: bool| request(RebootSelector::Role(Role::K8sWorker), only);
        let ids = |r: Result<Vec<NodeId>>| -> Vec<String> {
            r.expect("selected").iter().map(|n| n.to_string()).collect()
        };

        for selector in [RebootSelector::Role(Role::K8sWorker), RebootSelector::All] {
            let only = request(selector, true);
            let before = memory.keys_read();
            let fleet = selection_fleet(store, &specs, &only).await.expect("read");
            let read = memory.keys_read() - before;
            assert_eq!(ids(select(&fleet, &only)), ["w-003", "w-007"]);
            assert_eq!(read, 4, "the status and facts of w-003 and w-007");
        }
        // Without --only-required every worker is picked, so read.
        let fleet = selection_fleet(store, &specs, &workers(false))
            .await
            .expect("read");
        assert_eq!(select(&fleet, &workers(false)).expect("all").len(), FLEET);
        // Named nodes: read whether or not they need it; unknown ones named.
        let named = request(
            RebootSelector::Nodes(vec![node("w-001"), node("w-003")]),
            true,
        );
        let fleet = selection_fleet(store, &specs, &named).await.expect("read");
        assert_eq!(ids(select(&fleet, &named)), ["w-003"]);
        let ghost = request(RebootSelector::Nodes(vec![node("ghost")]), false);
        let fleet = selection_fleet(store, &specs, &ghost).await.expect("read");
        assert!(matches!(
            select(&fleet, &ghost),
            Err(Error::UnknownNode(n)) if n == node("ghost")
        ));
        // The lb node never connected: no boot id, refused as before.
        let lb = request(RebootSelector::Role(Role::Lb), false);
        let fleet = selection_fleet(store, &specs, &lb).await.expect("read");
        assert!(matches!(select(&fleet, &lb), Err(Error::RebootRefused(_))));

        // Rebooted: the needs go, and the count still names the selection.
        for i in [3, 7] {
            put_connected(store, &id(i), &facts(i, false)).await;
        }
        let specs = replica.ctx.fresh_specs().await.expect("caught up");
        assert!(specs.reboot_required.is_empty());
        let fleet = selection_fleet(store, &specs, &workers(true))
            .await
            .expect("read");
        let error = select(&fleet, &workers(true)).expect_err("none needs it");
        assert!(
            error.to_string().contains(&format!(
                "none of the {FLEET} node(s) role k8s-worker selects"
            )),
            "{error}"
        );
    }
}
