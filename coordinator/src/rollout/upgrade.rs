//! Kubernetes upgrades as rollouts (DESIGN.md §7): a `kubernetes.version`
//! change of a running cluster never moves every kubelet at once.
//!
//! - [`skew_problem`]: the version skew policy, checked by `apply` (and
//!   `--dry-run`): one minor version at a time, no minor downgrade.
//! - [`detect`] and [`order`]: a rollout whose target changes the version
//!   of a cluster with a joined control plane is an upgrade: control
//!   planes first, one per batch, the one that runs `kubeadm upgrade
//!   apply` ([`first_control_plane`]) leading, then the other nodes in
//!   the plan's batches. Control planes are upgraded in place (kubeadm
//!   restarts their static pods one by one; a maintenance drain of one of
//!   two would lose etcd's quorum); workers are drained first.
//! - Per node, two stages, each a marker the leader writes: from
//!   `changed/<node>` its desired state holds kubeadm at the new version,
//!   kubelet and kubectl at the old one, and runs `kubeadm upgrade`
//!   ([`Stage::Kubeadm`]); once that converged, `upgraded/<node>` moves
//!   kubelet and kubectl and restarts the kubelet ([`Stage::Kubelet`]).
//!   Package holds move with each node, never ahead of it.
//! - Readiness: after a joined Kubernetes node's change, the control plane
//!   that runs kubectl ([`ready_checker`]) is given a task asking whether
//!   the node reports Ready, and the node is healthy only once that
//!   task's report for the node's current record says so
//!   ([`readiness_problem`]).
//!
//! Every task is guarded by a file it leaves in the agent's done
//! directory: a leader that dies while one runs leaves it to the agent,
//! and the new leader reads its outcome from the node's converge report
//! (it never asks for it again). No IO here.

use serde::{Deserialize, Serialize};
use steward_proto::converge::{command_resource_id, ClusterSettings, Task, TaskId};
use steward_proto::domain::{DesiredState, NodeId, Role};

use super::model::{RolloutSpec, Step};
use crate::cache::SpecSnapshot;
use crate::orchestrate::kubernetes::{ADMIN_CONF, DONE_DIR};
use crate::orchestrate::state::OrchestrationSnapshot;
use crate::store::NodeRecord;

/// A rollout's Kubernetes upgrade (in its spec).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesUpgrade {
    /// The package version the cluster runs.
    pub from: String,
    /// The package version it goes to.
    pub to: String,
    /// The control plane that runs `kubeadm upgrade plan` and `apply`.
    pub first_control_plane: NodeId,
}

/// The rule [`skew_problem`] enforces, as operators read it.
pub const SKEW_RULE: &str = "the Kubernetes version skew policy allows upgrading one minor \
                             version at a time and never a minor downgrade";

/// `(major, minor)` of a Kubernetes package version
/// (`[epoch:]MAJOR.MINOR.PATCH[-revision]`, e.g. `1.31.2-1.1`).
pub fn minor_version(version: &str) -> Option<(u32, u32)> {
    let upstream = version.split_once(':').map_or(version, |(_, v)| v);
    let upstream = upstream.split('-').next()?;
    let mut parts = upstream.split('.');
    let number = |p: Option<&str>| p?.parse::<u32>().ok();
    let major = number(parts.next())?;
    let minor = number(parts.next())?;
    number(parts.next())?;
    parts.next().is_none().then_some((major, minor))
}

/// The version kubeadm names for package version `version`: `v1.31.2`.
pub fn kubeadm_version(version: &str) -> String {
    let upstream = version.split_once(':').map_or(version, |(_, v)| v);
    let upstream = upstream.split('-').next().unwrap_or(upstream);
    format!("v{upstream}")
}

/// Why the skew policy forbids going from `from` to `to` (`None`: it
/// allows it, or nothing changes).
pub fn skew_problem(from: &str, to: &str) -> Option<String> {
    if from == to {
        return None;
    }
    let read = |v: &str| {
        minor_version(v).ok_or_else(|| {
            format!(
                "kubernetes.version {v:?} is not a Kubernetes version (MAJOR.MINOR.PATCH with \
                 the package revision, e.g. 1.31.2-1.1): cannot check the change {from} -> {to} \
                 against the version skew policy"
            )
        })
    };
    let (a, b) = match (read(from), read(to)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => return Some(e),
    };
    let change = format!("kubernetes.version {from} -> {to}");
    if a.0 != b.0 {
        return Some(format!(
            "{change} changes the major version ({} -> {}): {SKEW_RULE}",
            a.0, b.0
        ));
    }
    if b.1 > a.1 + 1 {
        return Some(format!(
            "{change} jumps {} minor versions ({}.{} -> {}.{}): {SKEW_RULE}; upgrade to {}.{} \
             first",
            b.1 - a.1,
            a.0,
            a.1,
            b.0,
            b.1,
            a.0,
            a.1 + 1
        ));
    }
    if b.1 < a.1 {
        return Some(format!(
            "{change} is a minor downgrade ({}.{} -> {}.{}): {SKEW_RULE}",
            a.0, a.1, b.0, b.1
        ));
    }
    None
}

fn has_role(specs: &SpecSnapshot, node: &NodeId, role: Role) -> bool {
    specs
        .specs
        .get(node)
        .is_some_and(|s| s.value.roles.contains(&role))
}

/// Whether `node` has a Kubernetes role.
pub fn is_kubernetes(specs: &SpecSnapshot, node: &NodeId) -> bool {
    has_role(specs, node, Role::K8sControlPlane) || has_role(specs, node, Role::K8sWorker)
}

/// The control plane that runs kubectl and `kubeadm upgrade apply`: the
/// node that ran `kubeadm init` while it is a joined control plane, else
/// the first joined control plane (as `orchestrate::kubernetes::remover`
/// picks it).
pub fn ready_checker(
    specs: &SpecSnapshot,
    orchestration: &OrchestrationSnapshot,
) -> Option<NodeId> {
    let eligible = |n: &NodeId| {
        has_role(specs, n, Role::K8sControlPlane) && orchestration.joined.contains_key(n)
    };
    if let Some(boot) = &orchestration.bootstrap {
        if eligible(&boot.value.init_node) {
            return Some(boot.value.init_node.clone());
        }
    }
    specs.specs.keys().find(|n| eligible(n)).cloned()
}

/// The first control plane of an upgrade (see [`ready_checker`]).
pub fn first_control_plane(
    specs: &SpecSnapshot,
    orchestration: &OrchestrationSnapshot,
) -> Option<NodeId> {
    ready_checker(specs, orchestration)
}

/// The upgrade a rollout from `before` to `target` is: the Kubernetes
/// version changes and a control plane runs (`first`).
pub fn detect(
    before: Option<&ClusterSettings>,
    target: &ClusterSettings,
    first: Option<NodeId>,
) -> Option<KubernetesUpgrade> {
    let from = &before?.kubernetes.as_ref()?.version;
    let to = &target.kubernetes.as_ref()?.version;
    (from != to).then_some(KubernetesUpgrade {
        from: from.clone(),
        to: to.clone(),
        first_control_plane: first?,
    })
}

/// An upgrade's batches from the plan's: every control plane in a batch
/// of its own, `first` leading, then the other nodes in the plan's order
/// and batches.
pub fn order(
    batches: &[Vec<NodeId>],
    is_control_plane: impl Fn(&NodeId) -> bool,
    first: &NodeId,
) -> Vec<Vec<NodeId>> {
    let mut control_planes: Vec<NodeId> = batches
        .iter()
        .flatten()
        .filter(|n| is_control_plane(n))
        .cloned()
        .collect();
    // Stable: the others keep the plan's order (zones, VIP holders last).
    control_planes.sort_by_key(|n| n != first);
    let mut out: Vec<Vec<NodeId>> = control_planes.into_iter().map(|n| vec![n]).collect();
    for batch in batches {
        let rest: Vec<NodeId> = batch
            .iter()
            .filter(|n| !is_control_plane(n))
            .cloned()
            .collect();
        if !rest.is_empty() {
            out.push(rest);
        }
    }
    out
}

/// Whether `node` is upgraded in place (no maintenance drain): a control
/// plane in an upgrade.
pub fn in_place(spec: &RolloutSpec, specs: &SpecSnapshot, node: &NodeId) -> bool {
    spec.upgrade.is_some() && has_role(specs, node, Role::K8sControlPlane)
}

/// A node's stage in its upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// kubeadm at the new version, `kubeadm upgrade` runs; kubelet and
    /// kubectl held at the old one.
    Kubeadm,
    /// Everything at the new version, the kubelet restarted.
    Kubelet,
}

/// Where `node`'s upgrade stands in the rollout whose target it has, with
/// the revision of the marker that put it there.
pub fn stage<'a>(specs: &'a SpecSnapshot, node: &NodeId) -> Option<NodeStage<'a>> {
    let (rollout, _, changed) = specs.rollout_target(node)?;
    let entry = specs.rollouts.get(rollout)?;
    let upgrade = entry.spec.as_ref()?.value.upgrade.as_ref()?;
    if !is_kubernetes(specs, node) {
        return None;
    }
    let (stage, revision) = match entry.upgraded.get(node) {
        Some(&rev) => (Stage::Kubelet, rev),
        None => (Stage::Kubeadm, changed),
    };
    Some(NodeStage {
        rollout,
        upgrade,
        stage,
        revision,
    })
}

/// A node's place in its upgrade ([`stage`]).
#[derive(Debug, Clone, Copy)]
pub struct NodeStage<'a> {
    pub rollout: &'a str,
    pub upgrade: &'a KubernetesUpgrade,
    pub stage: Stage,
    /// The revision of the marker that put it there.
    pub revision: i64,
}

/// A task that runs `script` once: done when its file in the agent's done
/// directory exists.
fn once(id: TaskId, script: &str, summary: String) -> Task {
    let id = id.to_string();
    let done = format!("{DONE_DIR}/{id}");
    Task {
        argv: vec![
            "sh".into(),
            "-c".into(),
            format!("{script} && mkdir -p {DONE_DIR} && touch '{done}'"),
        ],
        id,
        creates: Some(done),
        unless: None,
        summary,
        inputs: Vec::new(),
    }
}

/// The tasks of `node`'s upgrade at `stage`: `kubeadm upgrade`, then (at
/// [`Stage::Kubelet`]) the kubelet's restart.
pub fn upgrade_tasks(
    upgrade: &KubernetesUpgrade,
    rollout: &str,
    node: &NodeId,
    stage: Stage,
) -> Vec<Task> {
    let version = kubeadm_version(&upgrade.to);
    let (script, summary) = if *node == upgrade.first_control_plane {
        (
            format!("kubeadm upgrade plan {version} && kubeadm upgrade apply -y {version}"),
            format!("kubeadm upgrade plan {version}; kubeadm upgrade apply {version}"),
        )
    } else {
        (
            "kubeadm upgrade node".to_owned(),
            "kubeadm upgrade node".to_owned(),
        )
    };
    let mut tasks = vec![once(
        TaskId::KubeadmUpgrade {
            version: upgrade.to.clone(),
            rollout: rollout.to_owned(),
        },
        &script,
        summary,
    )];
    if stage == Stage::Kubelet {
        tasks.push(once(
            TaskId::KubeletRestart {
                version: upgrade.to.clone(),
                rollout: rollout.to_owned(),
            },
            "systemctl daemon-reload && systemctl restart kubelet.service",
            format!("restart the kubelet at {version}"),
        ));
    }
    tasks
}

/// The task asking whether `node` reports Ready (run by [`ready_checker`]).
pub fn ready_task(node: &NodeId) -> Task {
    let script = format!(
        "s=$(kubectl --kubeconfig {ADMIN_CONF} get node {node} -o \
         'jsonpath={{.status.conditions[?(@.type==\"Ready\")].status}}') && test \"$s\" = True \
         || {{ echo \"node {node} is not Ready (Ready condition: $s)\" >&2; exit 1; }}"
    );
    Task {
        id: TaskId::KubernetesReady(node.clone()).into(),
        argv: vec!["sh".into(), "-c".into(), script],
        creates: None,
        unless: None,
        summary: format!("kubectl get node {node}: Ready?"),
        inputs: Vec::new(),
    }
}

/// Whether `node` is back in service but still cordoned in Kubernetes (the
/// control plane's `kubectl uncordon` not reported yet): the rollout waits
/// for it before the next batch and before it is done.
pub fn uncordon_pending(
    node: &NodeId,
    specs: &SpecSnapshot,
    orchestration: &OrchestrationSnapshot,
) -> bool {
    orchestration.cordoned.contains_key(node) && !specs.in_maintenance(node)
}

/// Whether `node`'s readiness is asked after its change: a joined
/// Kubernetes node.
fn checked(specs: &SpecSnapshot, orchestration: &OrchestrationSnapshot, node: &NodeId) -> bool {
    is_kubernetes(specs, node) && orchestration.joined.contains_key(node)
}

/// The nodes whose readiness `node` is asked now (it is the checker; they
/// are at `converged` in the active rollout), and the newest revision of
/// the rollout records it follows for that: every record of a checked
/// node, so that its revision only grows as they move.
pub fn ready_checks(
    specs: &SpecSnapshot,
    orchestration: &OrchestrationSnapshot,
    node: &NodeId,
) -> (Vec<NodeId>, i64) {
    // Only a joined control plane can be the checker. Asked first: this
    // runs for every node's desired state, and finding the checker may
    // scan every spec (with no control plane joined, all of them), which
    // made a change every node consumes O(N²) at 10,000 nodes.
    let eligible =
        has_role(specs, node, Role::K8sControlPlane) && orchestration.joined.contains_key(node);
    if !eligible || ready_checker(specs, orchestration).as_ref() != Some(node) {
        return (Vec::new(), 0);
    }
    let revision = specs
        .rollouts
        .values()
        .flat_map(|r| r.nodes.iter())
        .filter(|(n, _)| checked(specs, orchestration, n))
        .map(|(_, r)| r.mod_revision)
        .max()
        .unwrap_or(0);
    let asked = specs
        .active_rollout()
        .map(|(_, entry)| {
            entry
                .nodes
                .iter()
                .filter(|(n, r)| {
                    r.value.step == Step::Converged && checked(specs, orchestration, n)
                })
                .map(|(n, _)| n.clone())
                .collect()
        })
        .unwrap_or_default();
    (asked, revision)
}

/// Adds `node`'s upgrade and readiness steps to `desired` (after the
/// orchestration's): the kubelet hold of its stage, its tasks, and the
/// revisions of the records they come from.
pub fn add_steps(
    desired: &mut DesiredState,
    node: &NodeId,
    specs: &SpecSnapshot,
    orchestration: &OrchestrationSnapshot,
) {
    if let Some(at) = stage(specs, node) {
        if let Some(k) = desired.cluster.settings.kubernetes.as_mut() {
            if at.stage == Stage::Kubeadm && k.version == at.upgrade.to {
                k.kubelet_version = Some(at.upgrade.from.clone());
            }
        }
        desired
            .tasks
            .extend(upgrade_tasks(at.upgrade, at.rollout, node, at.stage));
        desired.revision = desired.revision.max(at.revision.max(0) as u64);
    }
    let (asked, rev) = ready_checks(specs, orchestration, node);
    desired.tasks.extend(asked.iter().map(ready_task));
    desired.revision = desired.revision.max(rev.max(0) as u64);
}

/// The revision [`add_steps`] gives `node` at least.
pub fn revision_for(
    node: &NodeId,
    specs: &SpecSnapshot,
    orchestration: &OrchestrationSnapshot,
) -> u64 {
    let stage = stage(specs, node).map_or(0, |at| at.revision);
    let (_, checks) = ready_checks(specs, orchestration, node);
    stage.max(checks).max(0) as u64
}

/// Whether the checker's report says `node` is Ready, asked for its record
/// at `record_revision` (`None`: it is; `Some`: why not yet). Only for a
/// joined Kubernetes node; others need no answer.
pub fn readiness_problem(
    node: &NodeId,
    specs: &SpecSnapshot,
    orchestration: &OrchestrationSnapshot,
    record_revision: i64,
    checker: Option<(&NodeId, &NodeRecord)>,
) -> Option<String> {
    if !checked(specs, orchestration, node) {
        return None;
    }
    let Some((checker, record)) = checker else {
        return Some(format!(
            "kubectl get node {node}: no joined control plane to ask"
        ));
    };
    let id = command_resource_id(&TaskId::KubernetesReady(node.clone()).to_string());
    let report = record.converge.as_ref().map(|c| &c.value);
    let answer = report
        .filter(|r| r.revision >= record_revision.max(0) as u64)
        .and_then(|r| r.resources.iter().find(|res| res.id == id));
    match answer {
        Some(r) if r.status.settled() => None,
        Some(r) => Some(format!(
            "kubectl get node {node} on {checker}: not Ready ({})",
            r.detail.trim()
        )),
        None => Some(format!(
            "kubectl get node {node} on {checker}: waiting for its answer"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::node;

    #[test]
    fn the_skew_policy_allows_one_minor_at_a_time_and_no_minor_downgrade() {
        assert_eq!(skew_problem("1.31.2-1.1", "1.31.2-1.1"), None);
        assert_eq!(skew_problem("1.31.2-1.1", "1.31.3-1.1"), None);
        assert_eq!(skew_problem("1.30.5-1.1", "1.31.0-1.1"), None);
        assert_eq!(skew_problem("1:1.30.5-1.1", "1.31.0-1.1"), None);
        // A patch downgrade inside a minor is kubeadm's business, not skew.
        assert_eq!(skew_problem("1.31.3-1.1", "1.31.2-1.1"), None);
        let jump = skew_problem("1.29.4-1.1", "1.31.2-1.1").expect("refused");
        assert!(jump.contains("1.29.4-1.1 -> 1.31.2-1.1"), "{jump}");
        assert!(
            jump.contains("jumps 2 minor versions (1.29 -> 1.31)"),
            "{jump}"
        );
        assert!(jump.contains("upgrade to 1.30 first"), "{jump}");
        assert!(jump.contains(SKEW_RULE), "{jump}");
        let down = skew_problem("1.31.2-1.1", "1.30.9-1.1").expect("refused");
        assert!(down.contains("minor downgrade (1.31 -> 1.30)"), "{down}");
        let major = skew_problem("1.31.2-1.1", "2.0.0-1.1").expect("refused");
        assert!(major.contains("major version"), "{major}");
        for bad in ["1.31", "latest", "1.x.2-1", "1.31.2.4-1"] {
            let p = skew_problem("1.31.2-1.1", bad).expect("refused");
            assert!(p.contains("is not a Kubernetes version"), "{bad}: {p}");
            assert!(p.contains(bad), "{p}");
        }
    }

    #[test]
    fn kubeadm_names_the_upstream_version() {
        assert_eq!(kubeadm_version("1.31.2-1.1"), "v1.31.2");
        assert_eq!(kubeadm_version("1:1.32.0-150500.1.1"), "v1.32.0");
        assert_eq!(kubeadm_version("1.31.2"), "v1.31.2");
    }

    #[test]
    fn control_planes_go_first_one_at_a_time_then_workers_in_their_batches() {
        let batches = vec![
            vec![node("cp-2"), node("w-1")],
            vec![node("w-2"), node("w-3")],
            vec![node("cp-1")],
            vec![node("w-4")],
        ];
        let cp = |n: &NodeId| n.as_str().starts_with("cp-");
        let ordered = order(&batches, cp, &node("cp-1"));
        assert_eq!(
            ordered,
            vec![
                vec![node("cp-1")],
                vec![node("cp-2")],
                vec![node("w-1")],
                vec![node("w-2"), node("w-3")],
                vec![node("w-4")],
            ]
        );
    }

    fn upgrade() -> KubernetesUpgrade {
        KubernetesUpgrade {
            from: "1.31.2-1.1".into(),
            to: "1.32.0-1.1".into(),
            first_control_plane: node("cp-1"),
        }
    }

    #[test]
    fn the_first_control_plane_plans_and_applies_the_others_upgrade_node() {
        let u = upgrade();
        let first = upgrade_tasks(&u, "r1", &node("cp-1"), Stage::Kubeadm);
        assert_eq!(first.len(), 1);
        let script = &first[0].argv[2];
        assert!(
            script.starts_with(
                "kubeadm upgrade plan v1.32.0 && kubeadm upgrade apply -y v1.32.0 && "
            ),
            "{script}"
        );
        assert_eq!(first[0].id, "kubeadm-upgrade-1.32.0-1.1-r1");
        assert_eq!(
            first[0].creates.as_deref(),
            Some("/var/lib/steward-agent/done/kubeadm-upgrade-1.32.0-1.1-r1")
        );
        let other = upgrade_tasks(&u, "r1", &node("w-1"), Stage::Kubelet);
        let ids: Vec<&str> = other.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "kubeadm-upgrade-1.32.0-1.1-r1",
                "kubelet-restart-1.32.0-1.1-r1"
            ]
        );
        assert!(other[0].argv[2].starts_with("kubeadm upgrade node && "));
        assert!(other[1].argv[2].contains("systemctl restart kubelet.service"));
        // Named for the rollout: a later one to the same version runs again.
        let again = upgrade_tasks(&u, "r2", &node("w-1"), Stage::Kubelet);
        assert_eq!(again[0].id, "kubeadm-upgrade-1.32.0-1.1-r2");
        // Run once: each is guarded by the file it leaves.
        for t in &other {
            let done = t.creates.as_deref().expect("guarded");
            assert!(t.argv[2].ends_with(&format!("touch '{done}'")), "{t:?}");
        }
    }

    #[test]
    fn an_upgrade_needs_a_version_change_and_a_running_control_plane() {
        let settings = |v: &str| ClusterSettings {
            kubernetes: Some(steward_proto::converge::KubernetesSettings {
                version: v.into(),
                pod_subnet: "10.244.0.0/16".into(),
                service_subnet: "10.96.0.0/12".into(),
                repository: steward_proto::converge::PackageRepository {
                    url: "file:/srv/k8s".into(),
                    suite: "./".into(),
                    key: None,
                },
                kubelet_version: None,
            }),
            ..Default::default()
        };
        let a = settings("1.31.2-1.1");
        let b = settings("1.32.0-1.1");
        assert_eq!(detect(Some(&a), &b, Some(node("cp-1"))), Some(upgrade()));
        assert_eq!(detect(Some(&a), &a, Some(node("cp-1"))), None);
        assert_eq!(detect(Some(&a), &b, None), None, "nothing runs yet");
        assert_eq!(detect(None, &b, Some(node("cp-1"))), None);
    }
}
