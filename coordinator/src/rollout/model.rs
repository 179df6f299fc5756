//! The records of a rollout as etcd holds them (`cluster/rollouts/<id>/`),
//! and one rollout as read back ([`RolloutEntry`]). No IO.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use steward_proto::converge::ClusterSettings;
use steward_proto::domain::NodeId;

use crate::store::Versioned;

pub use steward_proto::admin::RolloutOptions;

/// `cluster/rollouts/<id>/spec`: what the rollout changes and in which
/// order; written once, when it is created.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutSpec {
    pub id: String,
    /// The cluster settings once every node is done.
    pub target: ClusterSettings,
    /// The mod revision of `cluster/settings` the rollout was planned from
    /// (0: never written); the final write is guarded on it.
    pub base_settings_revision: i64,
    pub options: RolloutOptions,
    /// The nodes, in the order they go, batch by batch.
    pub batches: Vec<Vec<NodeId>>,
    /// How many of `batches` are the canary.
    pub canary_batches: u32,
    /// The settings' lines of the apply plan.
    pub changes: Vec<String>,
    pub created_by: String,
    pub created_at_unix_ms: u64,
    /// A `kubernetes.version` change: the nodes go control planes first
    /// and run `kubeadm upgrade` ([`crate::rollout::upgrade`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade: Option<super::upgrade::KubernetesUpgrade>,
    /// What each node's change is (absent in rollouts written before
    /// reboot rollouts existed: a settings change).
    #[serde(default, skip_serializing_if = "RolloutKind::is_settings")]
    pub kind: RolloutKind,
}

/// What a rollout changes on each node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RolloutKind {
    /// The node's desired state takes the target settings (`apply --rollout`).
    #[default]
    Settings,
    /// The node reboots (`rollout reboot`, or the maintenance window): its
    /// `nodes/<id>/reboot` record is written, and the step after is its
    /// agent back with a new boot id ([`crate::rollout::reboot`]).
    Reboot,
}

impl RolloutKind {
    pub fn is_settings(&self) -> bool {
        *self == RolloutKind::Settings
    }
}

impl RolloutSpec {
    pub fn batch_of(&self, node: &NodeId) -> Option<usize> {
        self.batches.iter().position(|b| b.contains(node))
    }
    pub fn node_count(&self) -> usize {
        self.batches.iter().map(Vec::len).sum()
    }
}

/// Where a whole rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Nodes go through their steps (unless paused by the control record).
    Running,
    /// A node failed: nothing else proceeds until `rollout abort`, or
    /// `rollout resume`, which tries the failed node again.
    Failed,
    /// `rollout abort` asked: the nodes in flight finish or are undrained.
    Aborting,
    /// Every node done and the target written as the cluster settings.
    Done,
    /// Stopped by `rollout abort`: nodes changed before keep the target,
    /// the others the old settings; the rollout holds no node drained.
    Aborted,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Running => "running",
            Phase::Failed => "failed",
            Phase::Aborting => "aborting",
            Phase::Done => "done",
            Phase::Aborted => "aborted",
        }
    }
    /// Whether the rollout still holds the cluster (no other may start,
    /// no plain apply may change the settings).
    pub fn active(self) -> bool {
        matches!(self, Phase::Running | Phase::Failed | Phase::Aborting)
    }
}

/// `cluster/rollouts/<id>/state`: written by the leader only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutState {
    pub phase: Phase,
    /// Why it failed or stopped.
    pub reason: String,
    pub at_unix_ms: u64,
}

/// `cluster/rollouts/<id>/control`: what operators asked (`rollout pause`,
/// `resume`, `abort`), and the pause after the canary (leader).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutControl {
    pub paused: bool,
    pub abort: bool,
    /// The leader paused it once the canary batches were done (it pauses
    /// there once only).
    #[serde(default)]
    pub after_canary: bool,
    /// `rollout resume` of a failed rollout: the leader gives its failed
    /// nodes another try and runs it again (and clears this).
    #[serde(default)]
    pub retry: bool,
    /// Who asked last, and why (`after the canary batch`).
    pub by: String,
    pub at_unix_ms: u64,
}

/// One node's step ([`crate::rollout::driver`] moves it on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    /// Its turn came; a gate refuses its drain (the reason says which).
    Waiting,
    /// Its maintenance record is written; its VIPs and workloads move.
    Draining,
    /// Nothing pending: out of service.
    Drained,
    /// Its desired state carries the rollout's target.
    Changed,
    /// Its agent applied the new revision and converged it.
    Converged,
    /// Agent healthy and its roles' readiness checked.
    Healthy,
    /// Back in service.
    Done,
    /// Stopped the rollout (the reason says why).
    Failed,
    /// Taken out of the rollout by `rollout abort`.
    Aborted,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Waiting => "waiting",
            Step::Draining => "draining",
            Step::Drained => "drained",
            Step::Changed => "changed",
            Step::Converged => "converged",
            Step::Healthy => "healthy",
            Step::Done => "done",
            Step::Failed => "failed",
            Step::Aborted => "aborted",
        }
    }
    /// Whether the node has the rollout's target.
    pub fn changed(self) -> bool {
        matches!(
            self,
            Step::Changed | Step::Converged | Step::Healthy | Step::Done
        )
    }
    /// Whether nothing more happens to the node.
    pub fn terminal(self) -> bool {
        matches!(self, Step::Done | Step::Failed | Step::Aborted)
    }
}

/// When a node reached each step (unix ms; 0: not yet).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepTimes {
    pub started: u64,
    pub drained: u64,
    pub changed: u64,
    pub converged: u64,
    pub healthy: u64,
    pub finished: u64,
}

/// `cluster/rollouts/<id>/nodes/<node>`: one node's progress (leader).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutNodeRecord {
    pub step: Step,
    /// A gate's refusal while waiting; the failure of a failed node.
    pub reason: String,
    /// The rollout wrote the node's maintenance record and has not undone
    /// it yet (false for a node an operator had drained already).
    pub holds_drain: bool,
    /// The revision of the write that changed it: its agent must apply and
    /// converge at least this one.
    pub changed_revision: i64,
    pub times: StepTimes,
    /// Reboot rollouts: the boot id the node ran when its reboot was asked
    /// (the step after waits for another).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub boot_id_before: String,
    /// Reboot rollouts: the boot id it came back with.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub boot_id_after: String,
}

/// One rollout, as read from etcd (or from the spec cache).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RolloutEntry {
    pub spec: Option<Versioned<RolloutSpec>>,
    pub state: Option<Versioned<RolloutState>>,
    pub control: Option<Versioned<RolloutControl>>,
    pub nodes: BTreeMap<NodeId, Versioned<RolloutNodeRecord>>,
    /// The mod revision of each node's `changed/<node>` marker: an input
    /// of its desired state.
    pub changed: BTreeMap<NodeId, i64>,
    /// Kubernetes upgrades: the mod revision of each node's
    /// `upgraded/<node>` marker (its `kubeadm upgrade` converged; kubelet
    /// and kubectl move from then on).
    pub upgraded: BTreeMap<NodeId, i64>,
}

impl RolloutEntry {
    /// Nothing left of it (its keys were deleted).
    pub fn is_empty(&self) -> bool {
        self.spec.is_none()
            && self.state.is_none()
            && self.control.is_none()
            && self.nodes.is_empty()
            && self.changed.is_empty()
            && self.upgraded.is_empty()
    }
    pub fn phase(&self) -> Option<Phase> {
        self.state.as_ref().map(|s| s.value.phase)
    }
    pub fn active(&self) -> bool {
        self.phase().is_some_and(Phase::active)
    }
    pub fn paused(&self) -> bool {
        self.control.as_ref().is_some_and(|c| c.value.paused)
    }
    pub fn abort_requested(&self) -> bool {
        self.control.as_ref().is_some_and(|c| c.value.abort)
    }
    pub fn retry_requested(&self) -> bool {
        self.control.as_ref().is_some_and(|c| c.value.retry)
    }
    pub fn step(&self, node: &NodeId) -> Option<Step> {
        self.nodes.get(node).map(|r| r.value.step)
    }
}

/// What a key under `cluster/rollouts/<id>/` holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RolloutKey {
    Spec,
    State,
    Control,
    Node(NodeId),
    Changed(NodeId),
    Upgraded(NodeId),
}

/// `cluster/rollouts/.active`: the rollout that holds the cluster, if any.
/// Every rollout creation, every plain apply that changes the settings and
/// every rollout end compares its mod revision, so that at most one
/// rollout is active and no apply slips in beside it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActiveRollout {
    pub id: Option<String>,
}

impl RolloutEntry {
    /// Applies one key's new value (`None`: deleted); whether anything
    /// changed. A corrupt value is ignored (the last good one stays).
    pub fn apply(&mut self, raw_key: &[u8], key: RolloutKey, value: Option<(&[u8], i64)>) -> bool {
        fn set<T: serde::de::DeserializeOwned + PartialEq>(
            slot: &mut Option<Versioned<T>>,
            raw_key: &[u8],
            value: Option<(&[u8], i64)>,
        ) -> bool {
            let Some((bytes, mod_revision)) = value else {
                return slot.take().is_some();
            };
            match crate::store::decode::<T>(raw_key, bytes) {
                Ok(value) => {
                    let next = Versioned {
                        value,
                        mod_revision,
                    };
                    let changed = slot.as_ref() != Some(&next);
                    *slot = Some(next);
                    changed
                }
                Err(error) => {
                    tracing::warn!(%error, "ignoring corrupt rollout record");
                    false
                }
            }
        }
        match key {
            RolloutKey::Spec => set(&mut self.spec, raw_key, value),
            RolloutKey::State => set(&mut self.state, raw_key, value),
            RolloutKey::Control => set(&mut self.control, raw_key, value),
            RolloutKey::Node(node) => {
                let mut slot = self.nodes.remove(&node);
                let changed = set(&mut slot, raw_key, value);
                if let Some(record) = slot {
                    self.nodes.insert(node, record);
                }
                changed
            }
            RolloutKey::Changed(node) => match value {
                Some((_, rev)) => self.changed.insert(node, rev) != Some(rev),
                None => self.changed.remove(&node).is_some(),
            },
            RolloutKey::Upgraded(node) => match value {
                Some((_, rev)) => self.upgraded.insert(node, rev) != Some(rev),
                None => self.upgraded.remove(&node).is_some(),
            },
        }
    }
}
