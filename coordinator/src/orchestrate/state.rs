//! Every replica's cache of `orchestration/`, and the tasks it adds to a
//! node's desired state.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use steward_proto::domain::{DesiredState, NodeId};
use tracing::warn;

use super::gluster::{self, VolumeRecord};
use super::kubernetes::{self, Bootstrap, BootstrapRecord, Progress};
use super::secrets::SecretBox;
use crate::cache::CachedPrefix;
use crate::desired::{Interest, Section};
use crate::store::{decode, Keys, Versioned};

/// `orchestration/kubernetes/joined/<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinedRecord {
    pub at_unix_ms: u64,
}

#[derive(Debug, Clone, Default)]
pub struct OrchestrationSnapshot {
    pub revision: i64,
    pub synced: bool,
    pub bootstrap: Option<Versioned<BootstrapRecord>>,
    pub joined: BTreeMap<NodeId, i64>,
    /// Leaving nodes a control plane has drained and deleted.
    pub drained: BTreeMap<NodeId, i64>,
    /// Nodes in maintenance a control plane has cordoned and drained.
    pub cordoned: BTreeMap<NodeId, i64>,
    /// `orchestration/.removed`: the last deletion of a record here.
    pub removed_revision: i64,
    pub volumes: BTreeMap<String, Versioned<VolumeRecord>>,
    /// Each volume's capacity as its operator node last reported it
    /// (`orchestration/gluster-capacity/<volume>`).
    pub capacities: BTreeMap<String, Versioned<CapacityRecord>>,
}

/// `orchestration/gluster-capacity/<volume>`: written by the session that
/// received the operator node's report of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapacityRecord {
    pub bytes: u64,
    pub reported_by: NodeId,
    pub at_unix_ms: u64,
}

impl OrchestrationSnapshot {
    pub fn joined_set(&self) -> BTreeSet<NodeId> {
        self.joined.keys().cloned().collect()
    }

    pub fn drained_set(&self) -> BTreeSet<NodeId> {
        self.drained.keys().cloned().collect()
    }

    /// `volume`'s capacity in bytes, if a report stated it.
    pub fn capacity(&self, volume: &str) -> Option<u64> {
        self.capacities.get(volume).map(|c| c.value.bytes)
    }

    /// The bootstrap record opened, if there is one and it opens.
    pub fn open_bootstrap(&self, sealer: Option<&SecretBox>) -> Option<Bootstrap> {
        let record = &self.bootstrap.as_ref()?.value;
        // Said once at start (see `crate::run`), not on every push.
        let sealer = sealer?;
        Bootstrap::open(record, sealer)
            .map_err(|error| warn!(%error, "cannot open the Kubernetes bootstrap secrets"))
            .ok()
    }

    /// Newest mod revision of the records a node with `interest` is given
    /// steps from: the Kubernetes ones for Kubernetes nodes, the volume
    /// placements for Gluster ones.
    pub fn inputs_revision_for(&self, interest: &Interest) -> i64 {
        let mut newest = 0;
        if interest.sections.contains(&Section::Kubernetes) {
            newest = self
                .bootstrap
                .iter()
                .map(|b| b.mod_revision)
                .chain(self.joined.values().copied())
                .chain(self.drained.values().copied())
                .chain(self.cordoned.values().copied())
                .chain([self.removed_revision])
                .fold(newest, i64::max);
        }
        if interest.sections.contains(&Section::Gluster) {
            newest = self
                .volumes
                .values()
                .map(|v| v.mod_revision)
                .chain(self.capacities.values().map(|c| c.mod_revision))
                .fold(newest, i64::max);
        }
        newest
    }

    /// What a node with `interest` adds to its revision from here: the
    /// records it takes steps from, and for a node outside Kubernetes the
    /// Kubernetes records too (it may have left Kubernetes and have its
    /// reset to run, then none: it follows them throughout, so that its
    /// revision never goes back).
    pub fn revision_for(&self, interest: &Interest) -> u64 {
        let mut newest = self.inputs_revision_for(interest);
        if !interest.sections.contains(&Section::Kubernetes) {
            let kubernetes = Interest {
                sections: [Section::Kubernetes].into(),
                ..Interest::default()
            };
            newest = newest.max(self.inputs_revision_for(&kubernetes));
        }
        newest.max(0) as u64
    }

    /// Adds the cluster-wide steps for `node` to `desired`, whose cluster
    /// view is the slice a node with `interest` consumes.
    pub fn add_steps(
        &self,
        desired: &mut DesiredState,
        node: &NodeId,
        interest: &Interest,
        maintenance: &BTreeSet<NodeId>,
        sealer: Option<&SecretBox>,
    ) {
        desired.revision = desired.revision.max(self.revision_for(interest));
        let view = &desired.cluster;
        let bootstrap = self.open_bootstrap(sealer);
        let joined = self.joined_set();
        let drained = self.drained_set();
        let cordoned: BTreeSet<NodeId> = self.cordoned.keys().cloned().collect();
        let (tasks, files) = kubernetes::steps(
            node,
            view,
            Progress {
                bootstrap: bootstrap.as_ref(),
                joined: &joined,
                drained: &drained,
                maintenance,
                cordoned: &cordoned,
            },
        );
        let mut all_tasks = tasks;
        for volume in &view.settings.gluster_volumes {
            if let Some(record) = self.volumes.get(&volume.name) {
                all_tasks.extend(gluster::steps(node, view, volume, &record.value));
            }
        }
        // Each created volume's PersistentVolume, applied by the control
        // plane that runs kubectl once Kubernetes is up.
        let progress = Progress {
            bootstrap: bootstrap.as_ref(),
            joined: &joined,
            drained: &drained,
            maintenance,
            cordoned: &cordoned,
        };
        let mut pv_files = Vec::new();
        if kubernetes::remover(view, progress).as_ref() == Some(node) {
            for volume in &view.settings.gluster_volumes {
                if !self.volumes.contains_key(&volume.name) {
                    continue;
                }
                if let Some((task, file)) = gluster::pv_task(
                    volume,
                    view,
                    self.capacity(&volume.name),
                    kubernetes::ADMIN_CONF,
                    kubernetes::DONE_DIR,
                ) {
                    all_tasks.push(task);
                    pv_files.push(file);
                }
            }
        }
        desired.tasks = all_tasks;
        desired.files = files;
        desired.files.extend(pv_files);
    }
}

impl CachedPrefix for OrchestrationSnapshot {
    fn apply(&mut self, keys: &Keys, key: &[u8], value: Option<(&[u8], i64)>) -> bool {
        let Some(rest) = std::str::from_utf8(key)
            .ok()
            .and_then(|k| k.strip_prefix(&keys.orchestration()))
        else {
            return false;
        };
        if rest == ".removed" {
            let rev = value.map_or(0, |(_, rev)| rev);
            let changed = self.removed_revision != rev;
            self.removed_revision = rev;
            return changed;
        }
        if rest == "kubernetes/bootstrap" {
            self.bootstrap = match value {
                None => None,
                Some((bytes, mod_revision)) => match decode(key, bytes) {
                    Ok(value) => Some(Versioned {
                        value,
                        mod_revision,
                    }),
                    Err(error) => {
                        warn!(%error, "ignoring corrupt Kubernetes bootstrap record");
                        return false;
                    }
                },
            };
            return true;
        }
        for (prefix, set) in [
            ("kubernetes/joined/", &mut self.joined),
            ("kubernetes/drained/", &mut self.drained),
            ("kubernetes/cordoned/", &mut self.cordoned),
        ] {
            if let Some(node) = rest.strip_prefix(prefix) {
                let Ok(node) = NodeId::new(node.to_owned()) else {
                    return false;
                };
                match value {
                    None => set.remove(&node),
                    Some((_, rev)) => set.insert(node, rev),
                };
                return true;
            }
        }
        if let Some(volume) = rest.strip_prefix("gluster-capacity/") {
            match value {
                None => {
                    self.capacities.remove(volume);
                }
                Some((bytes, mod_revision)) => match decode(key, bytes) {
                    Ok(value) => {
                        self.capacities.insert(
                            volume.to_owned(),
                            Versioned {
                                value,
                                mod_revision,
                            },
                        );
                    }
                    Err(error) => {
                        warn!(%error, volume, "ignoring corrupt Gluster capacity record");
                        return false;
                    }
                },
            }
            return true;
        }
        if let Some(volume) = rest.strip_prefix("gluster/") {
            match value {
                None => {
                    self.volumes.remove(volume);
                }
                Some((bytes, mod_revision)) => match decode(key, bytes) {
                    Ok(value) => {
                        self.volumes.insert(
                            volume.to_owned(),
                            Versioned {
                                value,
                                mod_revision,
                            },
                        );
                    }
                    Err(error) => {
                        warn!(%error, volume, "ignoring corrupt Gluster volume record");
                        return false;
                    }
                },
            }
            return true;
        }
        false
    }

    fn set_revision(&mut self, revision: i64) {
        self.revision = self.revision.max(revision);
        self.synced = true;
    }
}

#[cfg(test)]
mod revision_tests {
    use super::*;
    use crate::store::Keys;

    fn id(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    /// A record's deletion leaves no revision behind: the `.removed` marker
    /// keeps every node's revision from going back (an agent refuses an
    /// older desired state).
    #[test]
    fn revisions_never_go_back_when_records_are_deleted() {
        let keys = Keys::new("t");
        let mut o = OrchestrationSnapshot::default();
        let put = |o: &mut OrchestrationSnapshot, key: String, rev: i64| {
            o.apply(&keys, key.as_bytes(), Some((br#"{"at_unix_ms":1}"#, rev)))
        };
        put(&mut o, keys.kubernetes_joined(&id("w-1")), 10);
        put(&mut o, keys.kubernetes_drained(&id("w-1")), 12);
        let worker = Interest::of(&[steward_proto::domain::Role::K8sWorker].into());
        let none = Interest::default();
        let brick = Interest::of(&[steward_proto::domain::Role::GlusterBrick].into());
        for i in [&worker, &none, &brick] {
            assert_eq!(o.revision_for(i), 12);
        }
        // w-1 left: both records go, the marker is touched in the same txn.
        o.apply(&keys, keys.kubernetes_joined(&id("w-1")).as_bytes(), None);
        o.apply(&keys, keys.kubernetes_drained(&id("w-1")).as_bytes(), None);
        let marker = format!("{}.removed", keys.orchestration());
        assert!(o.apply(&keys, marker.as_bytes(), Some((b"", 13))));
        for i in [&worker, &none, &brick] {
            assert_eq!(o.revision_for(i), 13);
        }
    }
}
