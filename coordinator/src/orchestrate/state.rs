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
    /// Newest mod revision of anything here (part of every desired state's
    /// revision).
    pub fn inputs_revision(&self) -> i64 {
        self.bootstrap
            .iter()
            .map(|b| b.mod_revision)
            .chain(self.joined.values().copied())
            .chain(self.drained.values().copied())
            .chain(self.volumes.values().map(|v| v.mod_revision))
            .chain(self.capacities.values().map(|c| c.mod_revision))
            .max()
            .unwrap_or(0)
    }

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

    /// Adds the cluster-wide steps for `node` to `desired`.
    pub fn add_steps(&self, desired: &mut DesiredState, node: &NodeId, sealer: Option<&SecretBox>) {
        desired.revision = desired.revision.max(self.inputs_revision().max(0) as u64);
        let view = &desired.cluster;
        let bootstrap = self.open_bootstrap(sealer);
        let joined = self.joined_set();
        let drained = self.drained_set();
        let (tasks, files) = kubernetes::steps(
            node,
            view,
            Progress {
                bootstrap: bootstrap.as_ref(),
                joined: &joined,
                drained: &drained,
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
    const WHAT: &'static str = "orchestration";

    fn apply(&mut self, keys: &Keys, key: &[u8], value: Option<(&[u8], i64)>) -> bool {
        let Some(rest) = std::str::from_utf8(key)
            .ok()
            .and_then(|k| k.strip_prefix(&keys.orchestration()))
        else {
            return false;
        };
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
