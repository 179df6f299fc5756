//! Taking a node out of service and back (`stewardctl node drain` /
//! `undrain`, DESIGN.md §7), through the gates of its roles.
//!
//! A drain is a record (`nodes/<id>/maintenance`) and what follows from it
//! everywhere else, with no extra state machine:
//! - lb: a node out of service is no VIP candidate (`vip::candidates`), so
//!   placement asks the holder to release and assigns another healthy
//!   candidate (a planned handover);
//! - Kubernetes: the remover control plane is given `kubectl cordon` +
//!   `kubectl drain` for the node, and `uncordon` once it is back
//!   (`orchestrate::kubernetes`); its report records the cordon;
//! - the node shows "draining" while something is pending (a VIP it still
//!   holds, the Kubernetes drain), then "drained".
//!
//! The gates are checked when the drain is asked for; a refusal names the
//! gate and the numbers. `--force` skips them, loudly.
//!
//! The gluster-brick heal gate reads what the brick nodes' agents report
//! (`nodes/<id>/gluster`, from `gluster volume heal VOL info summary`;
//! [`volume_heal`]): only reports of connected nodes count, and a volume
//! none of whose brick nodes reported (agents without the probe) is not
//! held back by it.

use std::collections::BTreeMap;

use steward_proto::domain::{MaintenanceView, NodeHealth, NodeId, Role};

use crate::cache::SpecSnapshot;
use crate::orchestrate::gluster::VolumeRecord;
use crate::orchestrate::state::OrchestrationSnapshot;
use crate::store::NodeRecord;
use crate::vip::lease_api::LeaseHub;
use crate::vip::{candidates, VipSnapshot};

/// What the gates look at.
pub struct Fleet<'a> {
    /// Every node (statuses: who is connected and healthy).
    pub nodes: &'a BTreeMap<NodeId, NodeRecord>,
    pub specs: &'a SpecSnapshot,
    pub vips: &'a VipSnapshot,
    /// Which candidates heartbeat their lease streams, healthy.
    pub lease: &'a LeaseHub,
    pub orchestration: &'a OrchestrationSnapshot,
}

/// The nodes whose records ([`Fleet::nodes`]) the gates read: every VIP's
/// candidates, the control planes, the brick nodes (their statuses and
/// gluster reports), and `node` itself. Bounded by the gated roles, not
/// by the fleet: the gates never ask about a plain worker.
pub fn gated_nodes(
    node: &NodeId,
    specs: &SpecSnapshot,
    vips: &VipSnapshot,
    orchestration: &OrchestrationSnapshot,
) -> std::collections::BTreeSet<NodeId> {
    let gated = |roles: &std::collections::BTreeSet<Role>| {
        roles.contains(&Role::K8sControlPlane) || roles.contains(&Role::GlusterBrick)
    };
    let mut ids: std::collections::BTreeSet<NodeId> = specs
        .specs
        .iter()
        .filter(|(_, s)| gated(&s.value.roles))
        .map(|(id, _)| id.clone())
        .collect();
    for state in vips.vips.values() {
        if let Some(spec) = &state.spec {
            ids.extend(candidates(&spec.value, specs));
        }
    }
    for record in orchestration.volumes.values() {
        ids.extend(record.value.bricks.iter().map(|b| b.node.clone()));
    }
    ids.insert(node.clone());
    ids
}

impl Fleet<'_> {
    fn roles(&self, node: &NodeId) -> Vec<Role> {
        self.specs
            .specs
            .get(node)
            .map(|s| s.value.roles.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Connected, not failing, not out of service.
    fn in_service(&self, node: &NodeId) -> bool {
        let up = self
            .nodes
            .get(node)
            .and_then(|r| r.status.as_ref())
            .is_some_and(|s| matches!(s.value.health, NodeHealth::Healthy | NodeHealth::Degraded));
        up && !self.specs.in_maintenance(node)
    }

    fn describe(&self, node: &NodeId) -> String {
        let state = if self.specs.in_maintenance(node) {
            "out of service".to_owned()
        } else {
            self.nodes
                .get(node)
                .and_then(|r| r.status.as_ref())
                .map_or_else(|| "never connected".into(), |s| s.value.health.to_string())
        };
        format!("{node} ({state})")
    }

    /// Why `node` may not be drained now, one line per gate that refuses
    /// (empty: every gate holds).
    pub fn refusals(&self, node: &NodeId) -> Vec<String> {
        let roles = self.roles(node);
        let mut refusals = Vec::new();
        // lb: every VIP it may hold needs another healthy candidate.
        for (name, state) in &self.vips.vips {
            let Some(spec) = &state.spec else { continue };
            let all = candidates(&spec.value, self.specs);
            if !all.contains(node) {
                continue;
            }
            let others: Vec<&NodeId> = all.iter().filter(|c| *c != node).collect();
            let healthy = others
                .iter()
                .filter(|c| self.lease.healthy_candidate(c, name))
                .count();
            if healthy == 0 {
                let listed = if others.is_empty() {
                    "none".to_owned()
                } else {
                    others
                        .iter()
                        .map(|c| self.describe(c))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                refusals.push(format!(
                    "lb gate: VIP {name} would have no healthy candidate left to move to \
                     (other candidates: {listed})"
                ));
            }
        }
        // k8s-control-plane: the others in service keep etcd's quorum.
        if roles.contains(&Role::K8sControlPlane) {
            let cps: Vec<&NodeId> = self
                .specs
                .specs
                .iter()
                .filter(|(_, s)| s.value.roles.contains(&Role::K8sControlPlane))
                .map(|(id, _)| id)
                .collect();
            let left = cps
                .iter()
                .filter(|c| **c != node && self.in_service(c))
                .count();
            let quorum = cps.len() / 2 + 1;
            if left < quorum {
                refusals.push(format!(
                    "k8s-control-plane gate: {} control planes; without {node}, {left} stay \
                     healthy in service, below the etcd quorum of {quorum}",
                    cps.len()
                ));
            }
        }
        // gluster-brick: each replica set keeps its quorum of bricks.
        if roles.contains(&Role::GlusterBrick) {
            let settings = self.specs.settings.as_ref().map(|s| &s.value);
            for (volume, record) in &self.orchestration.volumes {
                let replica = settings
                    .and_then(|s| s.gluster_volumes.iter().find(|v| &v.name == volume))
                    .map_or(3, |v| v.replica.max(1) as usize);
                for (k, set) in record.value.bricks.chunks(replica).enumerate() {
                    if !set.iter().any(|b| &b.node == node) {
                        continue;
                    }
                    let up = set
                        .iter()
                        .filter(|b| &b.node != node && self.in_service(&b.node))
                        .count();
                    let quorum = replica / 2 + 1;
                    if up < quorum {
                        refusals.push(format!(
                            "gluster-brick gate: volume {volume} replica set {k} keeps {up} of \
                             {replica} bricks up without {node}, below its quorum of {quorum}"
                        ));
                    }
                }
            }
            // Heals: no volume with a brick here may still have entries to
            // heal (its only good copy could be the one going away).
            for (volume, record) in &self.orchestration.volumes {
                if !record.value.bricks.iter().any(|b| &b.node == node) {
                    continue;
                }
                match volume_heal(self.nodes, volume, &record.value) {
                    VolumeHeal::Pending { entries, by } => refusals.push(format!(
                        "gluster-brick heal gate: volume {volume} has {entries} entries pending \
                         heal (reported by {by}); wait for the self-heal to finish"
                    )),
                    VolumeHeal::Unknown { why } => refusals.push(format!(
                        "gluster-brick heal gate: volume {volume}: pending heals unknown ({why})"
                    )),
                    VolumeHeal::Done | VolumeHeal::Unreported => {}
                }
            }
        }
        refusals
    }
}

/// Where a volume's self-heal stands, as its brick nodes report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeHeal {
    /// Every connected brick node that reported counts no entry.
    Done,
    /// The most entries pending heal a connected brick node counts.
    Pending { entries: u64, by: NodeId },
    /// Brick nodes reported, but none could read the heal info.
    Unknown { why: String },
    /// No connected brick node reported the volume.
    Unreported,
}

/// Whether `node`'s agent is connected (its reports are current).
fn connected(nodes: &BTreeMap<NodeId, NodeRecord>, node: &NodeId) -> bool {
    nodes
        .get(node)
        .and_then(|r| r.status.as_ref())
        .is_some_and(|s| s.value.replica.is_some())
}

/// The heal state of `volume` from the gluster reports of its brick nodes
/// that are connected (any brick node's `heal info` sees every brick).
pub fn volume_heal(
    nodes: &BTreeMap<NodeId, NodeRecord>,
    volume: &str,
    record: &VolumeRecord,
) -> VolumeHeal {
    let mut reporters: Vec<&NodeId> = record.bricks.iter().map(|b| &b.node).collect();
    reporters.sort();
    reporters.dedup();
    let mut state = VolumeHeal::Unreported;
    for reporter in reporters {
        if !connected(nodes, reporter) {
            continue;
        }
        let Some(report) = nodes
            .get(reporter)
            .and_then(|r| r.gluster.as_ref())
            .and_then(|g| g.value.volume(volume))
        else {
            continue;
        };
        match (report.pending_heals(), &state) {
            (Some(n), VolumeHeal::Pending { entries, .. }) if n <= *entries => {}
            (Some(n), _) if n > 0 => {
                state = VolumeHeal::Pending {
                    entries: n,
                    by: reporter.clone(),
                }
            }
            (Some(_), VolumeHeal::Pending { .. }) => {}
            (Some(_), _) => state = VolumeHeal::Done,
            (None, VolumeHeal::Unreported) => {
                state = VolumeHeal::Unknown {
                    why: format!(
                        "{reporter}: {}",
                        report
                            .error
                            .as_deref()
                            .unwrap_or("no brick reachable by the heal info")
                    ),
                }
            }
            (None, _) => {}
        }
    }
    state
}

/// Why `node`'s bricks are not ready yet (empty: they are), from the
/// reports: each of its bricks online as its own agent (`observed`, read
/// now) saw it in a probe made after the converge of `revision` (when the
/// node reports converge runs at all), and no entries pending heal on its
/// volumes (the brick nodes' reports in `nodes`).
pub fn brick_problems(
    node: &NodeId,
    observed: &NodeRecord,
    nodes: &BTreeMap<NodeId, NodeRecord>,
    orchestration: &OrchestrationSnapshot,
    revision: u64,
) -> Vec<String> {
    let mut problems = Vec::new();
    let report = observed.gluster.as_ref().map(|g| &g.value);
    let converges = observed.converge.is_some();
    for (volume, vr) in &orchestration.volumes {
        let mine: Vec<_> = vr.value.bricks.iter().filter(|b| &b.node == node).collect();
        if mine.is_empty() {
            continue;
        }
        let fresh = report.filter(|r| !converges || r.after_converge_revision >= revision);
        let Some(seen) = fresh.and_then(|r| r.volume(volume)) else {
            problems.push(format!(
                "volume {volume}: no brick report from {node} since revision {revision} yet"
            ));
            continue;
        };
        for brick in mine {
            let name = brick.spec(volume);
            if !seen.bricks.iter().any(|b| b.brick == name && b.online) {
                problems.push(format!("volume {volume}: brick {name} not online"));
            }
        }
        match volume_heal(nodes, volume, &vr.value) {
            VolumeHeal::Pending { entries, by } => problems.push(format!(
                "volume {volume}: {entries} entries pending heal (reported by {by})"
            )),
            VolumeHeal::Unknown { why } => {
                problems.push(format!("volume {volume}: pending heals unknown ({why})"))
            }
            VolumeHeal::Done | VolumeHeal::Unreported => {}
        }
    }
    problems
}

/// What `node`, out of service, still waits for (empty: drained).
pub fn pending(
    node: &NodeId,
    specs: &SpecSnapshot,
    vips: &VipSnapshot,
    orchestration: &OrchestrationSnapshot,
) -> Vec<String> {
    let mut pending = Vec::new();
    for (name, state) in &vips.vips {
        if state.owner_node() == Some(node) {
            pending.push(format!(
                "VIP {name} still held here (moving by planned handover)"
            ));
        }
    }
    let kubernetes = specs.specs.get(node).is_some_and(|s| {
        s.value.roles.contains(&Role::K8sControlPlane) || s.value.roles.contains(&Role::K8sWorker)
    });
    if kubernetes
        && orchestration.joined.contains_key(node)
        && !orchestration.cordoned.contains_key(node)
    {
        pending.push("kubectl cordon and drain (run by a control plane)".into());
    }
    pending
}

/// The node's maintenance as operators see it, if it is out of service.
pub fn view(
    node: &NodeId,
    record: &NodeRecord,
    specs: &SpecSnapshot,
    vips: &VipSnapshot,
    orchestration: &OrchestrationSnapshot,
) -> Option<MaintenanceView> {
    let m = &record.maintenance.as_ref()?.value;
    if !m.active {
        return None;
    }
    let pending = pending(node, specs, vips, orchestration);
    Some(MaintenanceView {
        drained: pending.is_empty(),
        reason: m.reason.clone(),
        by: m.by.clone(),
        since_unix_ms: m.at_unix_ms,
        forced: m.forced,
        pending,
    })
}

#[cfg(test)]
mod tests {
    use steward_proto::domain::{
        Event, EventKind, GlusterBrickReport, GlusterReport, GlusterVolumeReport, Health,
    };

    use super::*;
    use crate::orchestrate::gluster::{Brick, VolumeRecord};
    use crate::store::{encode, MaintenanceRecord, MemoryBackend, NodeStatusRecord, Store};
    use crate::testing::{eventually, node, put_roles, put_vip, vip_spec, TestReplica};
    use crate::vip::lease_api::tests::{candidate, heartbeat};

    async fn connected(store: &Store, id: &str) {
        let status = crate::testing::connected_status();
        store.put_status_if(&node(id), 0, &status).await.unwrap();
    }

    async fn drain(store: &Store, id: &str) {
        let record = MaintenanceRecord {
            active: true,
            reason: String::new(),
            by: "ops".into(),
            at_unix_ms: 1,
            forced: false,
        };
        let event = Event {
            revision: 0,
            at_unix_ms: 1,
            kind: EventKind::NodeMaintenance,
            node: Some(node(id)),
            replica: "c-1".into(),
            message: "test".into(),
        };
        assert!(store
            .put_maintenance_if(&node(id), 0, &record, &event)
            .await
            .unwrap());
    }

    async fn refusals(replica: &TestReplica, id: &str) -> Vec<String> {
        let nodes = replica.store().nodes().await.unwrap();
        let specs = replica.ctx.specs.borrow().clone();
        let vips = replica.ctx.vips.borrow().clone();
        let orchestration = replica.ctx.orchestration.borrow().clone();
        Fleet {
            nodes: &nodes,
            specs: &specs,
            vips: &vips,
            lease: &replica.ctx.lease,
            orchestration: &orchestration,
        }
        .refusals(&node(id))
    }

    #[tokio::test]
    async fn the_lb_gate_needs_another_healthy_candidate() {
        let replica = TestReplica::start(MemoryBackend::new(), "c-1").await;
        let store = replica.store();
        put_roles(store, "n1", &[Role::Lb]).await;
        put_roles(store, "n2", &[Role::Lb]).await;
        put_vip(store, &vip_spec("front", "198.18.0.100/24")).await;
        eventually("the caches", || {
            let vips = replica.ctx.vips.borrow().vips.contains_key("front");
            let specs = replica.ctx.specs.borrow().specs.len() == 2;
            (vips && specs).then_some(())
        })
        .await;
        let refused = refusals(&replica, "n1").await;
        assert_eq!(
            refused,
            [
                "lb gate: VIP front would have no healthy candidate left to move to \
              (other candidates: n2 (never connected))"
            ]
        );
        // n2 heartbeats its lease stream, healthy for front: n1 may go.
        let _n2 = candidate(&replica, "n2", heartbeat("n2", 1, vec![]))
            .await
            .expect("lease stream");
        eventually("n2 a healthy candidate", || {
            replica
                .ctx
                .lease
                .healthy_candidate(&node("n2"), "front")
                .then_some(())
        })
        .await;
        assert!(refusals(&replica, "n1").await.is_empty());
        // Out of service, n1 is no candidate: nothing left for n2 to need.
        drain(store, "n1").await;
        eventually("n1 out of service", || {
            replica
                .ctx
                .specs
                .borrow()
                .in_maintenance(&node("n1"))
                .then_some(())
        })
        .await;
        let vips = replica.ctx.vips.borrow().clone();
        let spec = &vips.vips["front"].spec.as_ref().unwrap().value;
        let specs = replica.ctx.specs.borrow().clone();
        assert_eq!(
            candidates(spec, &specs).into_iter().collect::<Vec<_>>(),
            [node("n2")]
        );
        assert!(refusals(&replica, "n2").await[0].contains("other candidates: none"));
    }

    #[tokio::test]
    async fn the_control_plane_gate_keeps_etcd_quorum() {
        let replica = TestReplica::start(MemoryBackend::new(), "c-1").await;
        let store = replica.store();
        for id in ["cp-1", "cp-2", "cp-3"] {
            put_roles(store, id, &[Role::K8sControlPlane]).await;
            connected(store, id).await;
        }
        eventually("the spec cache", || {
            (replica.ctx.specs.borrow().specs.len() == 3).then_some(())
        })
        .await;
        assert!(refusals(&replica, "cp-1").await.is_empty());
        drain(store, "cp-2").await;
        eventually("cp-2 out of service", || {
            replica
                .ctx
                .specs
                .borrow()
                .in_maintenance(&node("cp-2"))
                .then_some(())
        })
        .await;
        assert_eq!(
            refusals(&replica, "cp-1").await,
            [
                "k8s-control-plane gate: 3 control planes; without cp-1, 1 stay healthy in \
              service, below the etcd quorum of 2"
            ]
        );
    }

    /// Volume `data` on `bricks` (three nodes), once the caches have it.
    async fn volume_data(replica: &TestReplica, bricks: Vec<Brick>) {
        let store = replica.store();
        let record = VolumeRecord {
            bricks,
            replaced: Vec::new(),
        };
        store
            .create_if_absent(store.keys().gluster_volume("data"), encode(&record))
            .await
            .unwrap();
        eventually("the caches", || {
            let o = replica
                .ctx
                .orchestration
                .borrow()
                .volumes
                .contains_key("data");
            (o && replica.ctx.specs.borrow().specs.len() == 3).then_some(())
        })
        .await;
    }

    #[tokio::test]
    async fn the_gluster_gate_keeps_each_replica_set_quorum() {
        let replica = TestReplica::start(MemoryBackend::new(), "c-1").await;
        let store = replica.store();
        let mut bricks = Vec::new();
        for (i, id) in ["b-1", "b-2", "b-3"].iter().enumerate() {
            put_roles(store, id, &[Role::GlusterBrick]).await;
            bricks.push(Brick {
                node: node(id),
                address: format!("198.18.0.{}", i + 1).parse().unwrap(),
            });
        }
        connected(store, "b-1").await;
        connected(store, "b-3").await;
        volume_data(&replica, bricks).await;
        // b-2 never connected: b-1 leaving would leave one brick of three.
        assert_eq!(
            refusals(&replica, "b-1").await,
            [
                "gluster-brick gate: volume data replica set 0 keeps 1 of 3 bricks up without \
              b-1, below its quorum of 2"
            ]
        );
        connected(store, "b-2").await;
        assert!(refusals(&replica, "b-1").await.is_empty());
    }

    fn heal_report(volume: &str, bricks: &[(&str, bool, Option<u64>)]) -> GlusterReport {
        GlusterReport {
            after_converge_revision: 0,
            volumes: vec![GlusterVolumeReport {
                volume: volume.into(),
                bricks: bricks
                    .iter()
                    .map(|(brick, online, pending)| GlusterBrickReport {
                        brick: (*brick).into(),
                        online: *online,
                        pending_heals: *pending,
                    })
                    .collect(),
                error: None,
            }],
        }
    }

    #[tokio::test]
    async fn the_heal_gate_refuses_while_a_volume_has_entries_pending_heal() {
        let replica = TestReplica::start(MemoryBackend::new(), "c-1").await;
        let store = replica.store();
        let mut bricks = Vec::new();
        for (i, id) in ["b-1", "b-2", "b-3"].iter().enumerate() {
            put_roles(store, id, &[Role::GlusterBrick]).await;
            connected(store, id).await;
            bricks.push(Brick {
                node: node(id),
                address: format!("198.18.0.{}", i + 1).parse().unwrap(),
            });
        }
        volume_data(&replica, bricks).await;
        // Nobody reported: the heal gate does not hold the drain back.
        assert!(refusals(&replica, "b-1").await.is_empty());
        // b-3's brick was down while a file was written: b-1 and b-2 hold
        // entries to heal onto it; b-2 says so, b-1 had not looked yet.
        let pending = heal_report(
            "data",
            &[
                (
                    "198.18.0.1:/data/glusterfs/data/brick1/brick",
                    true,
                    Some(2),
                ),
                (
                    "198.18.0.2:/data/glusterfs/data/brick1/brick",
                    true,
                    Some(2),
                ),
                ("198.18.0.3:/data/glusterfs/data/brick1/brick", false, None),
            ],
        );
        store.put_gluster(&node("b-2"), &pending).await.unwrap();
        let healed = heal_report(
            "data",
            &[
                (
                    "198.18.0.1:/data/glusterfs/data/brick1/brick",
                    true,
                    Some(0),
                ),
                (
                    "198.18.0.2:/data/glusterfs/data/brick1/brick",
                    true,
                    Some(0),
                ),
                (
                    "198.18.0.3:/data/glusterfs/data/brick1/brick",
                    true,
                    Some(0),
                ),
            ],
        );
        store.put_gluster(&node("b-1"), &healed).await.unwrap();
        let want = "gluster-brick heal gate: volume data has 4 entries pending heal (reported by \
                    b-2); wait for the self-heal to finish";
        assert_eq!(refusals(&replica, "b-1").await, [want]);
        assert_eq!(refusals(&replica, "b-3").await, [want]);
        // A report of a node no longer connected does not count.
        let mut status = store.node(&node("b-2")).await.unwrap().status.unwrap();
        status.value.replica = None;
        store
            .put_status_if(&node("b-2"), status.mod_revision, &status.value)
            .await
            .unwrap();
        assert!(refusals(&replica, "b-1").await.is_empty());
        connected_again(store, "b-2").await;
        assert_eq!(refusals(&replica, "b-1").await, [want]);
        // Healed: it may go.
        store.put_gluster(&node("b-2"), &healed).await.unwrap();
        assert!(refusals(&replica, "b-1").await.is_empty());
        // Nobody could read the heal info: refused, saying why.
        let unreadable = GlusterReport {
            after_converge_revision: 0,
            volumes: vec![GlusterVolumeReport {
                volume: "data".into(),
                bricks: Vec::new(),
                error: Some("heal info: killed after 8 s".into()),
            }],
        };
        for id in ["b-1", "b-2", "b-3"] {
            store.put_gluster(&node(id), &unreadable).await.unwrap();
        }
        assert_eq!(
            refusals(&replica, "b-1").await,
            [
                "gluster-brick heal gate: volume data: pending heals unknown (b-1: heal info: \
              killed after 8 s)"
            ]
        );
    }

    async fn connected_again(store: &Store, id: &str) {
        let current = store.node(&node(id)).await.unwrap().status.unwrap();
        let mut status = current.value;
        status.replica = Some("c-1".into());
        store
            .put_status_if(&node(id), current.mod_revision, &status)
            .await
            .unwrap();
    }

    #[test]
    fn a_brick_is_ready_once_online_in_a_report_newer_than_its_change_and_healed() {
        let volume = VolumeRecord {
            bricks: vec![
                Brick {
                    node: node("b-1"),
                    address: "198.18.0.1".parse().unwrap(),
                },
                Brick {
                    node: node("b-2"),
                    address: "198.18.0.2".parse().unwrap(),
                },
            ],
            replaced: Vec::new(),
        };
        let mut orchestration = OrchestrationSnapshot::default();
        orchestration.volumes.insert(
            "data".into(),
            crate::store::Versioned {
                value: volume,
                mod_revision: 1,
            },
        );
        let status = |replica: Option<&str>| crate::store::Versioned {
            value: NodeStatusRecord {
                health: NodeHealth::Healthy,
                last_health: Health::default(),
                replica: replica.map(Into::into),
                last_seen_unix_ms: 1,
                applied_revision: 9,
                agent_version: "test".into(),
            },
            mod_revision: 1,
        };
        let with_report = |report: GlusterReport| NodeRecord {
            status: Some(status(Some("c-1"))),
            converge: Some(crate::store::Versioned {
                value: steward_proto::converge::ConvergeReport {
                    revision: 9,
                    finished_unix_ms: 1,
                    duration_ms: 1,
                    resources: Vec::new(),
                },
                mod_revision: 1,
            }),
            gluster: Some(crate::store::Versioned {
                value: report,
                mod_revision: 1,
            }),
            ..Default::default()
        };
        let b1 = "198.18.0.1:/data/glusterfs/data/brick1/brick";
        let b2 = "198.18.0.2:/data/glusterfs/data/brick1/brick";
        let mut old = heal_report("data", &[(b1, true, Some(0)), (b2, true, Some(0))]);
        old.after_converge_revision = 8;
        let offline = GlusterReport {
            after_converge_revision: 9,
            ..heal_report("data", &[(b1, false, None), (b2, true, Some(3))])
        };
        let ready = GlusterReport {
            after_converge_revision: 9,
            ..heal_report("data", &[(b1, true, Some(0)), (b2, true, Some(0))])
        };
        let mut nodes = BTreeMap::new();
        let problems = |observed: &NodeRecord, nodes: &BTreeMap<NodeId, NodeRecord>| {
            brick_problems(&node("b-1"), observed, nodes, &orchestration, 9)
        };
        // A probe from before the change proves nothing.
        nodes.insert(node("b-1"), with_report(old.clone()));
        assert_eq!(
            problems(&with_report(old), &nodes),
            ["volume data: no brick report from b-1 since revision 9 yet"]
        );
        nodes.insert(node("b-1"), with_report(offline.clone()));
        assert_eq!(
            problems(&with_report(offline), &nodes),
            [
                format!("volume data: brick {b1} not online"),
                "volume data: 3 entries pending heal (reported by b-1)".to_owned()
            ]
        );
        nodes.insert(node("b-1"), with_report(ready.clone()));
        assert!(problems(&with_report(ready.clone()), &nodes).is_empty());
        // Another brick node still counting entries holds it back.
        nodes.insert(
            node("b-2"),
            with_report(heal_report(
                "data",
                &[(b1, true, Some(1)), (b2, true, Some(0))],
            )),
        );
        assert_eq!(
            problems(&with_report(ready), &nodes),
            ["volume data: 1 entries pending heal (reported by b-2)"]
        );
        // A node that is no brick of the volume has nothing to wait for.
        assert!(brick_problems(
            &node("w-1"),
            &NodeRecord::default(),
            &nodes,
            &orchestration,
            9
        )
        .is_empty());
    }
}
