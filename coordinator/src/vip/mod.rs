//! Floating IPs on the coordinator side of the lease protocol (DESIGN.md §3).
//!
//! - [`VipSnapshot`]: this replica's watch cache of `vips/` (specs, owners,
//!   move requests, expiry marks). Owners' epochs are the etcd mod revision
//!   of their owner key, so they only grow.
//! - [`lease_api::LeaseHub`]: the replica's [`Acker`](steward_lease::Acker)
//!   and the live lease streams of candidates; serves `AgentService.Lease`.
//! - [`marker`]: feeds the acker from etcd and writes its expiry marks.
//! - [`placement`]: the leader's decisions — who holds each VIP next.
//!
//! **Architecture invariants:** acks never touch etcd and need no leader
//! (static stability); the only etcd writes are marks (one per replica and
//! epoch; deleted again if the holder turns out to be alive) and the
//! leader's fenced owner writes.

pub mod admin;
pub mod lease_api;
pub mod marker;
pub mod placement;

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use steward_lease::messages::AssignedVip;
use steward_lease::{Assignment, Epoch, MarkReason};
use steward_proto::converge::VipView;
use steward_proto::domain::{NodeId, Role};
use steward_proto::vip::VipSpec;
use tracing::warn;

use crate::cache::{CachedPrefix, SpecSnapshot};
use crate::store::{decode, Keys, Versioned, VipKey};

/// `vips/<name>/owner`. The epoch is the key's mod revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OwnerRecord {
    /// `None`: nobody may hold the VIP at this epoch.
    pub node: Option<NodeId>,
}

/// `vips/<name>/move`: an operator asked the holder of `epoch` to let go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveRecord {
    pub epoch: Epoch,
    /// Where to, if the operator said.
    pub to: Option<NodeId>,
}

/// `vips/<name>/expired/<epoch>/<replica>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MarkRecord {
    pub reason: String,
}

impl MarkRecord {
    pub fn new(reason: MarkReason) -> Self {
        Self {
            reason: reason.as_str().to_owned(),
        }
    }
    pub fn reason(&self) -> MarkReason {
        match self.reason.as_str() {
            "released" => MarkReason::Released,
            _ => MarkReason::Expired,
        }
    }
}

/// Everything etcd says about one VIP.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VipState {
    pub spec: Option<Versioned<VipSpec>>,
    /// Owner and epoch; `None`: never assigned.
    pub owner: Option<(Option<NodeId>, Epoch)>,
    pub move_request: Option<MoveRecord>,
    /// Marks by epoch, then replica.
    pub marks: BTreeMap<Epoch, BTreeMap<String, MarkReason>>,
}

impl VipState {
    pub fn epoch(&self) -> Epoch {
        self.owner.as_ref().map_or(0, |(_, e)| *e)
    }

    pub fn owner_node(&self) -> Option<&NodeId> {
        self.owner.as_ref().and_then(|(n, _)| n.as_ref())
    }

    /// Distinct replicas that marked the current epoch.
    pub fn current_marks(&self) -> usize {
        self.marks.get(&self.epoch()).map_or(0, BTreeMap::len)
    }

    /// The move request for the current epoch, if any.
    pub fn current_move(&self) -> Option<&MoveRecord> {
        self.move_request
            .as_ref()
            .filter(|m| self.owner.is_some() && m.epoch == self.epoch())
    }
}

/// This replica's view of `vips/`.
#[derive(Debug, Clone, Default)]
pub struct VipSnapshot {
    pub revision: i64,
    pub synced: bool,
    pub vips: BTreeMap<String, VipState>,
    /// Mod revision of `vips/.removed` (the last VIP removal), 0 if none.
    pub removed_revision: i64,
}

impl CachedPrefix for VipSnapshot {
    fn apply(&mut self, keys: &Keys, key: &[u8], value: Option<(&[u8], i64)>) -> bool {
        if key == keys.vips_removed().as_bytes() {
            self.removed_revision = value.map_or(0, |(_, rev)| rev);
            return true;
        }
        let Some((name, kind)) = keys.parse_vip_key(key) else {
            return false;
        };
        let state = self.vips.entry(name.clone()).or_default();
        match (kind, value) {
            (VipKey::Spec, None) => state.spec = None,
            (VipKey::Spec, Some((bytes, mod_revision))) => match decode(key, bytes) {
                Ok(value) => {
                    state.spec = Some(Versioned {
                        value,
                        mod_revision,
                    })
                }
                Err(error) => warn!(%error, "ignoring corrupt VIP spec"),
            },
            (VipKey::Owner, None) => state.owner = None,
            (VipKey::Owner, Some((bytes, mod_revision))) => {
                match decode::<OwnerRecord>(key, bytes) {
                    Ok(o) => state.owner = Some((o.node, mod_revision as Epoch)),
                    // Unreadable owner: treat as owned by nobody, which only
                    // ever withholds acks (safe).
                    Err(error) => {
                        warn!(%error, "corrupt VIP owner");
                        state.owner = Some((None, mod_revision as Epoch));
                    }
                }
            }
            (VipKey::Move, None) => state.move_request = None,
            (VipKey::Move, Some((bytes, _))) => match decode(key, bytes) {
                Ok(m) => state.move_request = Some(m),
                Err(error) => warn!(%error, "ignoring corrupt VIP move request"),
            },
            (VipKey::Mark { epoch, replica }, None) => {
                if let Some(m) = state.marks.get_mut(&epoch) {
                    m.remove(&replica);
                    if m.is_empty() {
                        state.marks.remove(&epoch);
                    }
                }
            }
            (VipKey::Mark { epoch, replica }, Some((bytes, _))) => {
                // A mark is a mark, whatever its body says: it can only
                // withhold acks and allow a move, both of which are safe.
                let reason = decode::<MarkRecord>(key, bytes)
                    .map(|m| m.reason())
                    .unwrap_or(MarkReason::Expired);
                state
                    .marks
                    .entry(epoch)
                    .or_default()
                    .insert(replica, reason);
            }
        }
        if state.spec.is_none()
            && state.owner.is_none()
            && state.move_request.is_none()
            && state.marks.is_empty()
        {
            self.vips.remove(&name);
        }
        true
    }

    fn set_revision(&mut self, revision: i64) {
        self.revision = self.revision.max(revision);
        self.synced = true;
    }
}

/// The nodes that may hold `spec`'s VIP: its named candidates, or every node
/// with the lb role.
pub fn candidates(spec: &VipSpec, nodes: &SpecSnapshot) -> BTreeSet<NodeId> {
    let mut all: BTreeSet<NodeId> = if spec.candidates.is_empty() {
        nodes
            .specs
            .iter()
            .filter(|(_, s)| s.value.roles.contains(&Role::Lb))
            .map(|(id, _)| id.clone())
            .collect()
    } else {
        spec.candidates.iter().cloned().collect()
    };
    // A node out of service is no candidate: a VIP it holds moves by
    // planned handover (placement asks the holder to release).
    all.retain(|n| !nodes.in_maintenance(n));
    all
}

impl VipSnapshot {
    /// Every defined VIP as the cluster view shows it.
    pub fn views(&self) -> Vec<VipView> {
        self.vips
            .iter()
            .filter_map(|(name, state)| {
                // Specs are validated before they are stored.
                let cidr = state.spec.as_ref()?.value.cidr().ok()?;
                Some(VipView {
                    name: name.clone(),
                    address: cidr.address,
                    prefix: cidr.prefix,
                })
            })
            .collect()
    }

    /// The newest mod revision among VIP specs and the last removal: what
    /// [`VipSnapshot::views`] depends on.
    pub fn views_revision(&self) -> i64 {
        self.vips
            .values()
            .filter_map(|state| state.spec.as_ref().map(|s| s.mod_revision))
            .fold(self.removed_revision, i64::max)
    }

    /// Every VIP `node` is a candidate for, and every VIP it holds (a
    /// holder that stopped being a candidate, drained or without the lb
    /// role, must still hear the release request: a planned handover, not
    /// a lease running out), as the node is told about it.
    pub fn assignments_for(&self, node: &NodeId, nodes: &SpecSnapshot) -> Vec<AssignedVip> {
        self.vips
            .iter()
            .filter_map(|(name, state)| {
                let spec = &state.spec.as_ref()?.value;
                if state.owner_node() != Some(node) && !candidates(spec, nodes).contains(node) {
                    return None;
                }
                let target = steward_lease::Target::of(spec).ok()?;
                Some(AssignedVip {
                    assignment: Assignment {
                        vip: name.clone(),
                        epoch: state.epoch(),
                        owner: state.owner_node().cloned(),
                        target,
                        release_requested: state.current_move().is_some(),
                    },
                    check: spec.check.clone(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::encode;
    use steward_proto::domain::NodeSpec;

    fn node(id: &str) -> NodeId {
        NodeId::new(id).unwrap()
    }

    fn spec(name: &str) -> VipSpec {
        VipSpec {
            name: name.into(),
            address: "198.18.0.100/24".into(),
            interface: None,
            check: Default::default(),
            candidates: vec![],
            priority: Default::default(),
            preempt: false,
        }
    }

    #[test]
    fn snapshot_follows_owner_marks_and_moves() {
        let keys = Keys::new("t");
        let mut snap = VipSnapshot::default();
        let put = |snap: &mut VipSnapshot, key: String, value: Vec<u8>, rev: i64| {
            snap.apply(&keys, key.as_bytes(), Some((&value, rev)));
        };
        put(&mut snap, keys.vip_spec("front"), encode(&spec("front")), 5);
        put(
            &mut snap,
            keys.vip_owner("front"),
            encode(&OwnerRecord {
                node: Some(node("lb-1")),
            }),
            9,
        );
        put(
            &mut snap,
            keys.vip_mark("front", 9, "c1"),
            encode(&MarkRecord::new(MarkReason::Released)),
            10,
        );
        put(
            &mut snap,
            keys.vip_mark("front", 8, "c2"),
            encode(&MarkRecord::new(MarkReason::Expired)),
            11,
        );
        put(
            &mut snap,
            keys.vip_move("front"),
            encode(&MoveRecord { epoch: 9, to: None }),
            12,
        );
        let state = &snap.vips["front"];
        assert_eq!(state.epoch(), 9);
        assert_eq!(state.owner_node(), Some(&node("lb-1")));
        assert_eq!(state.current_marks(), 1);
        assert!(state.current_move().is_some());

        // Candidates: lb nodes only.
        let mut nodes = SpecSnapshot::default();
        for (id, roles) in [("lb-1", vec![Role::Lb]), ("w-1", vec![Role::K8sWorker])] {
            std::sync::Arc::make_mut(&mut nodes.specs).insert(
                node(id),
                Versioned {
                    value: NodeSpec {
                        roles: roles.into_iter().collect(),
                        ..Default::default()
                    },
                    mod_revision: 1,
                },
            );
        }
        let a = snap.assignments_for(&node("lb-1"), &nodes);
        assert_eq!(a.len(), 1);
        assert!(a[0].assignment.release_requested);
        assert!(snap.assignments_for(&node("w-1"), &nodes).is_empty());

        // Removing every key forgets the VIP.
        for key in [
            keys.vip_spec("front"),
            keys.vip_owner("front"),
            keys.vip_move("front"),
            keys.vip_mark("front", 9, "c1"),
            keys.vip_mark("front", 8, "c2"),
        ] {
            snap.apply(&keys, key.as_bytes(), None);
        }
        assert!(snap.vips.is_empty());
    }
}
