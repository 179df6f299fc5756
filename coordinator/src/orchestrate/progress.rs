//! What a node's converge report means for the Kubernetes records, recorded
//! by the session that received it (any replica, no leader needed):
//!
//! - its `kubeadm init` or `kubeadm join` done → `joined/<node>`, which
//!   releases the joins that wait for it;
//! - its drain-and-delete of a leaving node done → `drained/<gone>`, which
//!   releases that node's `kubeadm reset`;
//! - its own `kubeadm reset` done after it was drained → both records go.
//!
//! Each record is written once (create-only) and only when the replica's
//! cache does not show it yet.
//!
//! The same reports carry each Gluster volume's capacity, read by the node
//! that runs the volume's `gluster` commands (`gluster-capacity:<volume>`,
//! see `steward_proto::converge::gluster_capacity_resource_id`); it is
//! recorded at `gluster-capacity/<volume>` when it differs from the cached
//! record, and only from the node that was given the volume's
//! `gluster-create-*` task. **A report moves orchestration only through
//! steps the coordinator assigned to the reporting node** (the tasks of the
//! desired state its session last sent): a node key cannot report another
//! node's drain, or a join it was never asked to run.

use steward_proto::converge::{
    gluster_capacity_resource_id, parse_gluster_capacity_detail, ConvergeReport, ResourceStatus,
    TaskId,
};
use steward_proto::domain::NodeId;
use tracing::{info, warn};

use super::kubernetes::{cordon_task_id, remove_task_id, uncordon_task_id};
use super::state::{CapacityRecord, JoinedRecord, OrchestrationSnapshot};
use crate::store::kv::{Op, Txn};
use crate::store::{encode, unix_ms, Store};

/// One change to the Kubernetes records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KubernetesProgress {
    /// `node` ran `kubeadm init` or `join`.
    Joined(NodeId),
    /// The reporting node drained and deleted the leaving `node`.
    Drained(NodeId),
    /// `node` ran `kubeadm reset`: it left.
    Left(NodeId),
    /// The reporting control plane cordoned and drained `node` for
    /// maintenance.
    Cordoned(NodeId),
    /// The reporting control plane put `node` back into service.
    Uncordoned(NodeId),
}

/// What `node`'s `report` changes, given the records as `orchestration`
/// shows them.
pub fn kubernetes_progress(
    node: &NodeId,
    report: &ConvergeReport,
    assigned: &[&str],
    orchestration: &OrchestrationSnapshot,
) -> Vec<KubernetesProgress> {
    let done = |task: &str| assigned.contains(&task) && report.command_settled(task);
    let mut changes = Vec::new();
    let done_as = |id: TaskId| {
        assigned
            .iter()
            .any(|t| id.is(t) && report.command_settled(t))
    };
    if (done_as(TaskId::KubeadmInit) || done_as(TaskId::KubeadmJoin))
        && !orchestration.joined.contains_key(node)
    {
        changes.push(KubernetesProgress::Joined(node.clone()));
    }
    for gone in orchestration.joined.keys() {
        if done(&remove_task_id(gone)) && !orchestration.drained.contains_key(gone) {
            changes.push(KubernetesProgress::Drained(gone.clone()));
        }
    }
    for (down, _) in orchestration.joined.iter() {
        if done(&cordon_task_id(down)) && !orchestration.cordoned.contains_key(down) {
            changes.push(KubernetesProgress::Cordoned(down.clone()));
        }
    }
    for back in orchestration.cordoned.keys() {
        if done(&uncordon_task_id(back)) {
            changes.push(KubernetesProgress::Uncordoned(back.clone()));
        }
    }
    if done_as(TaskId::KubeadmReset) && orchestration.drained.contains_key(node) {
        changes.push(KubernetesProgress::Left(node.clone()));
    }
    changes
}

/// The capacities `node`'s `report` states that differ from the records:
/// (volume, bytes), only for volumes whose `gluster-create-*` task the
/// node was given.
pub fn gluster_capacities(
    report: &ConvergeReport,
    assigned: &[&str],
    orchestration: &OrchestrationSnapshot,
) -> Vec<(String, u64)> {
    assigned
        .iter()
        .filter_map(|task| TaskId::gluster_created_volume(task))
        .filter_map(|volume| {
            let id = gluster_capacity_resource_id(volume);
            let r = report.resources.iter().find(|r| r.id == id)?;
            if r.status != ResourceStatus::Ok {
                return None;
            }
            let bytes = parse_gluster_capacity_detail(&r.detail)?;
            (orchestration.capacity(volume) != Some(bytes)).then(|| (volume.to_owned(), bytes))
        })
        .collect()
}

/// Records what `node`'s `report` changes (best effort: the next report
/// tries again): the Kubernetes records, and the Gluster capacities.
pub async fn record_kubernetes_progress(
    store: &Store,
    node: &NodeId,
    report: &ConvergeReport,
    assigned: &[&str],
    orchestration: &OrchestrationSnapshot,
) {
    let keys = store.keys();
    let record = || {
        encode(&JoinedRecord {
            at_unix_ms: unix_ms(),
        })
    };
    for change in kubernetes_progress(node, report, assigned, orchestration) {
        let (result, what) = match &change {
            KubernetesProgress::Joined(n) => (
                store
                    .create_if_absent(keys.kubernetes_joined(n), record())
                    .await
                    .map(drop),
                "joined Kubernetes",
            ),
            KubernetesProgress::Drained(gone) => (
                store
                    .create_if_absent(keys.kubernetes_drained(gone), record())
                    .await
                    .map(drop),
                "drained and deleted a leaving node",
            ),
            KubernetesProgress::Cordoned(n) => (
                store
                    .create_if_absent(keys.kubernetes_cordoned(n), record())
                    .await
                    .map(drop),
                "cordoned and drained a node for maintenance",
            ),
            KubernetesProgress::Uncordoned(n) => (
                store
                    .delete_orchestration(&[keys.kubernetes_cordoned(n)])
                    .await,
                "put a node back into service",
            ),
            KubernetesProgress::Left(n) => (
                store
                    .delete_orchestration(&[keys.kubernetes_joined(n), keys.kubernetes_drained(n)])
                    .await,
                "left Kubernetes",
            ),
        };
        match result {
            Ok(()) => info!(node.id = %node, ?change, "{what}"),
            Err(error) => warn!(%error, ?change, "cannot record Kubernetes progress"),
        }
    }
    for (volume, bytes) in gluster_capacities(report, assigned, orchestration) {
        let record = CapacityRecord {
            bytes,
            reported_by: node.clone(),
            at_unix_ms: unix_ms(),
        };
        let key = format!("{}gluster-capacity/{volume}", keys.orchestration());
        let txn = Txn::new().and_then([Op::put(key, encode(&record))]);
        match store.txn(txn, "record gluster capacity").await {
            Ok(_) => info!(node.id = %node, gluster.volume = %volume, bytes, "Gluster capacity"),
            Err(error) => warn!(%error, gluster.volume = %volume, "cannot record Gluster capacity"),
        }
    }
}

#[cfg(test)]
mod tests {
    use steward_proto::converge::{ResourceState, ResourceStatus};

    use super::*;
    use crate::testing::node;

    fn report(done: &[&str]) -> ConvergeReport {
        ConvergeReport {
            revision: 1,
            finished_unix_ms: 1,
            duration_ms: 1,
            resources: done
                .iter()
                .map(|id| ResourceState {
                    id: steward_proto::converge::command_resource_id(id),
                    status: ResourceStatus::Changed,
                    detail: String::new(),
                    since_unix_ms: 1,
                })
                .collect(),
        }
    }

    const ALL: [&str; 3] = ["kubeadm-init", "kubeadm-join", "kubeadm-reset"];

    /// Issue 14, item 4: a node with no Kubernetes role reported another
    /// node's removal as done, releasing its `kubeadm reset` undrained.
    #[test]
    fn a_report_moves_only_the_steps_its_node_was_given() {
        let mut orch = OrchestrationSnapshot::default();
        orch.joined.insert(node("w-1"), 6);
        let spoof = report(&[
            remove_task_id(&node("w-1")).as_str(),
            "kubeadm-join",
            "kubeadm-reset",
        ]);
        assert!(kubernetes_progress(&node("lb-9"), &spoof, &[], &orch).is_empty());
        // The same report from the node that was given the removal counts.
        let removal = remove_task_id(&node("w-1"));
        assert_eq!(
            kubernetes_progress(&node("cp-1"), &spoof, &[removal.as_str()], &orch),
            [KubernetesProgress::Drained(node("w-1"))]
        );
    }

    #[test]
    fn joins_drains_and_resets_are_recorded_once() {
        let mut orch = OrchestrationSnapshot::default();
        let init = report(&["kubeadm-init"]);
        assert_eq!(
            kubernetes_progress(&node("cp-1"), &init, &ALL, &orch),
            [KubernetesProgress::Joined(node("cp-1"))]
        );
        orch.joined.insert(node("cp-1"), 5);
        orch.joined.insert(node("w-1"), 6);
        assert!(kubernetes_progress(&node("cp-1"), &init, &ALL, &orch).is_empty());

        let w1_removal = remove_task_id(&node("w-1"));
        let drained = report(&[w1_removal.as_str()]);
        assert_eq!(
            kubernetes_progress(&node("cp-1"), &drained, &[w1_removal.as_str()], &orch),
            [KubernetesProgress::Drained(node("w-1"))]
        );
        // The reset counts only once the node was drained.
        let reset = report(&["kubeadm-reset"]);
        assert!(kubernetes_progress(&node("w-1"), &reset, &ALL, &orch).is_empty());
        orch.drained.insert(node("w-1"), 7);
        assert_eq!(
            kubernetes_progress(&node("w-1"), &reset, &ALL, &orch),
            [KubernetesProgress::Left(node("w-1"))]
        );
        // A failed command is no progress.
        let mut failed = report(&["kubeadm-join"]);
        failed.resources[0].status = ResourceStatus::Failed;
        assert!(kubernetes_progress(&node("w-2"), &failed, &ALL, &orch).is_empty());
    }

    #[test]
    fn a_maintenance_drain_and_uncordon_are_recorded_from_the_remover() {
        let mut orch = OrchestrationSnapshot::default();
        orch.joined.insert(node("w-1"), 6);
        let drain = cordon_task_id(&node("w-1"));
        let done = report(&[drain.as_str()]);
        assert_eq!(
            kubernetes_progress(&node("cp-1"), &done, &[drain.as_str()], &orch),
            [KubernetesProgress::Cordoned(node("w-1"))]
        );
        // Not assigned to the reporter: nothing.
        assert!(kubernetes_progress(&node("w-2"), &done, &[], &orch).is_empty());
        orch.cordoned.insert(node("w-1"), 7);
        let back = uncordon_task_id(&node("w-1"));
        let done = report(&[back.as_str()]);
        assert_eq!(
            kubernetes_progress(&node("cp-1"), &done, &[back.as_str()], &orch),
            [KubernetesProgress::Uncordoned(node("w-1"))]
        );
    }

    #[test]
    fn a_capacity_counts_only_from_the_volumes_operator_and_when_it_changed() {
        let mut r = report(&[]);
        r.resources.push(ResourceState {
            id: "gluster-capacity:data".into(),
            status: ResourceStatus::Ok,
            detail: "42000 bytes".into(),
            since_unix_ms: 1,
        });
        let mut orch = OrchestrationSnapshot::default();
        assert!(gluster_capacities(&r, &["kubeadm-join"], &orch).is_empty());
        assert_eq!(
            gluster_capacities(&r, &["gluster-create-data"], &orch),
            [("data".to_owned(), 42000)]
        );
        orch.capacities.insert(
            "data".into(),
            crate::store::Versioned {
                value: CapacityRecord {
                    bytes: 42000,
                    reported_by: node("g-1"),
                    at_unix_ms: 1,
                },
                mod_revision: 3,
            },
        );
        assert!(gluster_capacities(&r, &["gluster-create-data"], &orch).is_empty());
        r.resources[0].detail = "capacity unknown".into();
        r.resources[0].status = ResourceStatus::NotApplicable;
        orch.capacities.clear();
        assert!(gluster_capacities(&r, &["gluster-create-data"], &orch).is_empty());
    }
}
