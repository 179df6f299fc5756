//! Steward's state in etcd: the key layout and typed, validated access.
//!
//! Layout under `/steward/<cluster>/` (DESIGN.md §2):
//!
//! | key | writer | value |
//! |---|---|---|
//! | `coordinators/election` | election API | leader key; its create revision is the leader epoch |
//! | `coordinators/members/<id>` | each replica, on its lease | [`MemberRecord`] |
//! | `nodes/<id>/spec` | admin API | [`NodeSpec`] |
//! | `nodes/<id>/status` | the replica serving the node, on change only, rate-limited per node | [`NodeStatusRecord`] (small: no facts) |
//! | `nodes/<id>/address` | the replica serving the node, when it differs at session open | [`NodeAddressRecord`] |
//! | `nodes/<id>/reboot` | leader, fenced (a reboot rollout's reboot step), overwritten, never deleted | [`RebootRecord`]: its mod revision is the reboot's generation |
//! | `facts/<id>` | the replica serving the node, at session open and when the agent sends them again, when they changed | [`Facts`], bounded |
//! | `converge/<id>` | the replica serving the node, when the outcome changes | [`ConvergeReport`], bounded |
//! | `vips/.removed` | admin API, with every VIP removal | [`VipRemovedRecord`] |
//! | `cluster/settings` | admin API (`Apply`), whole, never deleted | [`ClusterSettings`] |
//! | `cluster/revoked/<kind>/<name>` | admin API (`RevokeCertificate`), never deleted | [`CertRevokedRecord`]: admin and coordinator certificates of `<name>` issued up to its second are refused |
//! | `cluster/rollouts/.active` | admin API (rollout creation), leader (its end) | [`ActiveRollout`] |
//! | `cluster/rollouts/<id>/spec` | admin API (`Apply` with a rollout), once | `crate::rollout::model::RolloutSpec` |
//! | `cluster/rollouts/<id>/state`, `nodes/<node>`, `changed/<node>` | leader, fenced | `RolloutState`, `RolloutNodeRecord`, empty marker |
//! | `cluster/rollouts/<id>/control` | admin API (`rollout pause/resume/abort`), leader (pause after the canary) | `RolloutControl` |
//! | `orchestration/kubernetes/bootstrap` | leader | sealed CA, token, certificate key ([`crate::orchestrate::kubernetes::BootstrapRecord`]) |
//! | `orchestration/kubernetes/joined/<id>` | the replica serving the node, when its init/join reports done | `{"at_unix_ms"}` |
//! | `orchestration/kubernetes/drained/<id>` | the replica serving the remover, when its drain/delete of the leaving node reports done; both records go when the node's `kubeadm reset` reports done | `{"at_unix_ms"}` |
//! | `orchestration/gluster/<volume>` | leader | brick placement ([`crate::orchestrate::gluster::VolumeRecord`]) |
//! | `events/<ms>-<replica>-<seq>` | any replica; trimmed by the leader to `events_retained` | [`Event`]: the audit log (everything but session churn) |
//! | `session-events/<ms>-<replica>-<seq>` | any replica, rate-limited per node ([`session_events`]); trimmed by the leader to `session_events_retained` | [`Event`]: `node-connected`, `node-disconnected` |

//!
//! **Architecture invariant:** this module is the only one that speaks to
//! etcd (`etcd` is its backend; `coordinator/tests/tidy.rs` fails on an
//! `etcd_client` anywhere else). Everything above it takes a [`Store`],
//! which is etcd in production and [`MemoryBackend`] in unit tests.
//!
//! **Fleet-scale invariant:** no read is unbounded. Everything under
//! `nodes/` is small (the big per-node records, facts and converge
//! reports, live under their own prefixes and are read per node or per
//! page), and every list is read in pages of at most [`SCAN_CHUNK`] keys
//! at one pinned revision ([`Store::scan`]), so no etcd response nears
//! etcd-client's 4 MB limit however large the fleet.

mod etcd;
pub mod kv;
mod memory;
pub mod session_events;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use steward_lease::MarkReason;
use steward_proto::converge::{ClusterSettings, ConvergeReport};
use steward_proto::domain::{
    CertName, CertRevocation, Event, EventKind, Facts, GlusterReport, Health, NodeHealth, NodeId,
    NodeSpec, RebootRequired, RevocableKind, Role,
};
use steward_proto::vip::VipSpec;

pub use self::etcd::{connect, EtcdError};
use self::kv::{Change, Cmp, Kv, LeaderKey, Op, PutLease, Range, RangeOptions, Txn, TxnOutcome};
pub use self::memory::MemoryBackend;
use crate::cache::CachedPrefix;
use crate::config::EtcdConfig;
use crate::desired::Section;
use crate::error::{Error, Result};
use crate::rollout::model::{ActiveRollout, RolloutEntry, RolloutKey};
use crate::tokens::TokenRecord;
use crate::vip::{MarkRecord, MoveRecord, OwnerRecord, VipSnapshot};

/// Milliseconds since the Unix epoch, for records and events.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The key layout of one cluster.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

/// What a key under `nodes/` holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKey {
    Spec,
    Status,
    Address,
    Revoked,
    Maintenance,
    Gluster,
    Reboot,
    RebootRequired,
}

impl Keys {
    pub fn new(cluster: &str) -> Self {
        Self {
            prefix: format!("/steward/{cluster}/"),
        }
    }
    /// The prefix of every key of the cluster.
    pub fn root(&self) -> String {
        self.prefix.clone()
    }
    pub fn election(&self) -> String {
        format!("{}coordinators/election", self.prefix)
    }
    pub fn members(&self) -> String {
        format!("{}coordinators/members/", self.prefix)
    }
    pub fn member(&self, id: &str) -> String {
        format!("{}{id}", self.members())
    }
    pub fn nodes(&self) -> String {
        format!("{}nodes/", self.prefix)
    }
    pub fn node_spec(&self, id: &NodeId) -> String {
        format!("{}{id}/spec", self.nodes())
    }
    pub fn node_status(&self, id: &NodeId) -> String {
        format!("{}{id}/status", self.nodes())
    }
    pub fn node_address(&self, id: &NodeId) -> String {
        format!("{}{id}/address", self.nodes())
    }
    /// The node's last converge report: not under `nodes/`, which holds
    /// only small records (the spec cache and node lists read all of it).
    pub fn node_converge(&self, id: &NodeId) -> String {
        format!("{}converge/{id}", self.prefix)
    }
    /// The node's facts, written only when they change.
    pub fn node_facts(&self, id: &NodeId) -> String {
        format!("{}facts/{id}", self.prefix)
    }
    pub fn node_revoked(&self, id: &NodeId) -> String {
        format!("{}{id}/revoked", self.nodes())
    }
    /// The node id's claim by a token join: written in the transaction that
    /// uses the token, so two tokens cannot both admit one new id.
    pub fn node_joined(&self, id: &NodeId) -> String {
        format!("{}{id}/joined", self.nodes())
    }
    pub fn orchestration(&self) -> String {
        format!("{}orchestration/", self.prefix)
    }
    pub fn kubernetes_bootstrap(&self) -> String {
        format!("{}orchestration/kubernetes/bootstrap", self.prefix)
    }
    pub fn kubernetes_joined(&self, id: &NodeId) -> String {
        format!("{}orchestration/kubernetes/joined/{id}", self.prefix)
    }
    pub fn kubernetes_drained(&self, id: &NodeId) -> String {
        format!("{}orchestration/kubernetes/drained/{id}", self.prefix)
    }
    pub fn kubernetes_cordoned(&self, id: &NodeId) -> String {
        format!("{}orchestration/kubernetes/cordoned/{id}", self.prefix)
    }
    /// Whether the node is out of service (`stewardctl node drain`):
    /// overwritten on undrain, never deleted, so that its mod revision
    /// keeps growing.
    pub fn node_maintenance(&self, id: &NodeId) -> String {
        format!("{}{id}/maintenance", self.nodes())
    }
    /// What a gluster-brick node's agent last said of its volumes' bricks
    /// and pending heals (written when it changes; small, so under
    /// `nodes/`, where the gates read it with the statuses).
    pub fn node_gluster(&self, id: &NodeId) -> String {
        format!("{}{id}/gluster", self.nodes())
    }

    /// The last reboot asked of the node (a reboot rollout): overwritten,
    /// never deleted, so that its mod revision (the reboot's generation)
    /// keeps growing.
    pub fn node_reboot(&self, id: &NodeId) -> String {
        format!("{}{id}/reboot", self.nodes())
    }
    /// Present while the node's facts say it needs a reboot, with since
    /// when ([`RebootRequiredRecord`]): an index of the facts (which are not
    /// under `nodes/`) that the spec cache follows, so that reboot
    /// selection reads no facts but of the nodes it picks. Written with
    /// the facts, in their transaction, when it changes.
    pub fn node_reboot_required(&self, id: &NodeId) -> String {
        format!("{}{id}/reboot-required", self.nodes())
    }
    /// Replica `replica`'s read barrier ([`Store::sync_point`]): under
    /// `nodes/`, so that it comes down the spec cache's watch of that
    /// prefix, after every earlier write there. Not a node's key (`.` is
    /// no node id's first character): node listings skip it.
    pub fn cache_sync(&self, replica: &str) -> String {
        format!("{}.sync/{replica}", self.nodes())
    }
    /// Whether `key` is a replica's read barrier ([`Keys::cache_sync`]).
    pub fn is_cache_sync(&self, key: &[u8]) -> bool {
        key.starts_with(format!("{}.sync/", self.nodes()).as_bytes())
    }
    pub fn gluster_volume(&self, name: &str) -> String {
        format!("{}orchestration/gluster/{name}", self.prefix)
    }
    /// Cluster-wide records (followed by the spec cache).
    pub fn cluster(&self) -> String {
        format!("{}cluster/", self.prefix)
    }
    /// The [`ClusterSettings`] of the last `stewardctl apply`, stored whole.
    pub fn cluster_settings(&self) -> String {
        format!("{}settings", self.cluster())
    }
    /// Touched whenever a node loses `role` (so the slices of the cluster
    /// view that list `role` members move on; see `crate::desired`).
    pub fn role_departed(&self, role: Role) -> String {
        format!("{}departed/{}", self.cluster(), role.as_str())
    }
    /// Touched whenever `section` of the cluster settings changes.
    pub fn settings_changed(&self, section: Section) -> String {
        format!("{}changed/{}", self.cluster(), section.as_str())
    }
    /// The revocation of the `kind` certificates of `name` (under
    /// `cluster/`, so the spec cache follows it on every replica).
    pub fn cert_revoked(&self, kind: RevocableKind, name: &CertName) -> String {
        format!("{}revoked/{kind}/{name}", self.cluster())
    }
    /// Parses a [`Keys::cert_revoked`] key.
    pub fn parse_cert_revoked(&self, key: &[u8]) -> Option<(RevocableKind, CertName)> {
        let rest = std::str::from_utf8(key)
            .ok()?
            .strip_prefix(&self.cluster())?
            .strip_prefix("revoked/")?;
        let (kind, name) = rest.split_once('/')?;
        Some((kind.parse().ok()?, CertName::new(name).ok()?))
    }
    /// Parses a marker key under `cluster/`.
    pub fn parse_marker(&self, key: &[u8]) -> Option<Marker> {
        let rest = std::str::from_utf8(key)
            .ok()?
            .strip_prefix(&self.cluster())?;
        if let Some(role) = rest.strip_prefix("departed/") {
            return role.parse().ok().map(Marker::Departed);
        }
        Section::parse(rest.strip_prefix("changed/")?).map(Marker::Changed)
    }
    /// Rollouts (`crate::rollout`): under `cluster/`, so that the spec
    /// cache follows them (a changed node's desired state reads them).
    pub fn rollouts(&self) -> String {
        format!("{}rollouts/", self.cluster())
    }
    /// Everything of rollout `id`.
    pub fn rollout(&self, id: &str) -> String {
        format!("{}{id}/", self.rollouts())
    }
    pub fn rollout_spec(&self, id: &str) -> String {
        format!("{}spec", self.rollout(id))
    }
    pub fn rollout_state(&self, id: &str) -> String {
        format!("{}state", self.rollout(id))
    }
    pub fn rollout_control(&self, id: &str) -> String {
        format!("{}control", self.rollout(id))
    }
    pub fn rollout_node(&self, id: &str, node: &NodeId) -> String {
        format!("{}nodes/{node}", self.rollout(id))
    }
    /// Written once, when the node gets the rollout's target.
    pub fn rollout_changed(&self, id: &str, node: &NodeId) -> String {
        format!("{}changed/{node}", self.rollout(id))
    }
    /// Kubernetes upgrades: written once, when the node's `kubeadm
    /// upgrade` converged (kubelet and kubectl move from then on).
    pub fn rollout_upgraded(&self, id: &str, node: &NodeId) -> String {
        format!("{}upgraded/{node}", self.rollout(id))
    }
    /// The rollout that holds the cluster (`crate::rollout::model::ActiveRollout`).
    pub fn rollout_active(&self) -> String {
        format!("{}.active", self.rollouts())
    }
    /// Parses a key under `cluster/rollouts/<id>/`.
    pub fn parse_rollout_key(&self, key: &[u8]) -> Option<(String, RolloutKey)> {
        let rest = std::str::from_utf8(key)
            .ok()?
            .strip_prefix(&self.rollouts())?;
        let (id, what) = rest.split_once('/')?;
        if id.starts_with('.') {
            return None;
        }
        let key = match what {
            "spec" => RolloutKey::Spec,
            "state" => RolloutKey::State,
            "control" => RolloutKey::Control,
            _ => match what.split_once('/')? {
                ("nodes", node) => RolloutKey::Node(NodeId::new(node).ok()?),
                ("changed", node) => RolloutKey::Changed(NodeId::new(node).ok()?),
                ("upgraded", node) => RolloutKey::Upgraded(NodeId::new(node).ok()?),
                _ => return None,
            },
        };
        Some((id.to_owned(), key))
    }
    /// The audit log: every event but session churn.
    pub fn events(&self) -> String {
        format!("{}events/", self.prefix)
    }
    /// Session churn (`node-connected`, `node-disconnected`), bounded on
    /// its own so it cannot flush the audit log.
    pub fn session_events(&self) -> String {
        format!("{}session-events/", self.prefix)
    }
    /// Where events of `kind` are kept.
    pub fn events_of(&self, kind: EventKind) -> String {
        if session_events::is_session_event(kind) {
            self.session_events()
        } else {
            self.events()
        }
    }
    /// Join tokens (`tokens::TokenRecord`), each on an etcd lease that ends
    /// a day after the token expired.
    pub fn tokens(&self) -> String {
        format!("{}tokens/", self.prefix)
    }
    pub fn token(&self, id: &str) -> String {
        format!("{}{id}", self.tokens())
    }
    pub fn vips(&self) -> String {
        format!("{}vips/", self.prefix)
    }
    /// Touched by every VIP removal, so that a removal is an input of the
    /// desired state like any other change (its mod revision). VIP names
    /// are DNS labels: no VIP can be called `.removed`.
    pub fn vips_removed(&self) -> String {
        format!("{}.removed", self.vips())
    }
    /// Everything about one VIP (its removal deletes this prefix).
    pub fn vip(&self, name: &str) -> String {
        format!("{}{name}/", self.vips())
    }
    pub fn vip_spec(&self, name: &str) -> String {
        format!("{}spec", self.vip(name))
    }
    pub fn vip_owner(&self, name: &str) -> String {
        format!("{}owner", self.vip(name))
    }
    pub fn vip_move(&self, name: &str) -> String {
        format!("{}move", self.vip(name))
    }
    /// Expiry marks of one epoch.
    pub fn vip_marks(&self, name: &str) -> String {
        format!("{}expired/", self.vip(name))
    }
    pub fn vip_mark(&self, name: &str, epoch: u64, replica: &str) -> String {
        format!("{}{epoch}/{replica}", self.vip_marks(name))
    }

    /// Parses a key under `vips/`.
    pub fn parse_vip_key(&self, key: &[u8]) -> Option<(String, VipKey)> {
        let rest = std::str::from_utf8(key).ok()?.strip_prefix(&self.vips())?;
        let (name, kind) = rest.split_once('/')?;
        let kind = match kind {
            "spec" => VipKey::Spec,
            "owner" => VipKey::Owner,
            "move" => VipKey::Move,
            mark => {
                let (epoch, replica) = mark.strip_prefix("expired/")?.split_once('/')?;
                VipKey::Mark {
                    epoch: epoch.parse().ok()?,
                    replica: replica.to_owned(),
                }
            }
        };
        Some((name.to_owned(), kind))
    }

    /// Parses a key under `nodes/`.
    pub fn parse_node_key(&self, key: &[u8]) -> Option<(NodeId, NodeKey)> {
        let rest = std::str::from_utf8(key).ok()?.strip_prefix(&self.nodes())?;
        let (id, kind) = rest.split_once('/')?;
        let kind = match kind {
            "spec" => NodeKey::Spec,
            "status" => NodeKey::Status,
            "address" => NodeKey::Address,
            "revoked" => NodeKey::Revoked,
            "maintenance" => NodeKey::Maintenance,
            "gluster" => NodeKey::Gluster,
            "reboot" => NodeKey::Reboot,
            "reboot-required" => NodeKey::RebootRequired,
            _ => return None,
        };
        Some((NodeId::new(id).ok()?, kind))
    }
}

/// A marker key under `cluster/` (see `crate::desired`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marker {
    Departed(Role),
    Changed(Section),
}

/// What a key under `vips/<name>/` holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VipKey {
    Spec,
    Owner,
    Move,
    Mark { epoch: u64, replica: String },
}

/// `coordinators/members/<id>`: a live replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    pub id: String,
    pub address: String,
    pub version: String,
    pub started_unix_ms: u64,
    /// Where joining nodes reach it (`[pki] bootstrap_listen`), if anywhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap: Option<String>,
}

/// `nodes/<id>/status`: what the serving replica last recorded. Written only
/// when something here changes (never per heartbeat), at most at the
/// node's status write rate, and small: the facts have their own key.
/// (Records written before facts moved out still decode: unknown fields
/// are ignored.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatusRecord {
    pub health: NodeHealth,
    /// Health sample taken when this record was written.
    pub last_health: Health,
    /// The replica serving the session; `None` when disconnected.
    pub replica: Option<String>,
    pub last_seen_unix_ms: u64,
    pub applied_revision: u64,
    pub agent_version: String,
}

/// `nodes/<id>/address`: where the cluster reaches the node. Its own key,
/// not part of the status: it is an input of every node's desired state,
/// and the status changes with every applied revision (a push would cause
/// a status write would cause a push).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeAddressRecord {
    pub address: IpAddr,
}

/// `nodes/<id>/revoked`: the node's certificates issued up to
/// `revoked_unix_s` (their notBefore, seconds) are refused everywhere.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeRevokedRecord {
    pub revoked_unix_s: i64,
    pub at_unix_ms: u64,
    /// The admin who revoked them.
    pub by: String,
}

impl NodeRevokedRecord {
    /// Refuses a certificate of `node` issued at `issued_unix_s` if this
    /// revocation covers it.
    pub fn check(&self, node: &NodeId, issued_unix_s: i64) -> Result<()> {
        if issued_unix_s > self.revoked_unix_s {
            return Ok(());
        }
        Err(Error::CertificateRevoked(format!(
            "the certificates of node {node} were revoked at {} by {}; join again with a \
             token made for it (stewardctl token create --node {node}, then steward-agent \
             join ... --force on the node)",
            steward_runtime::format_unix_ms(self.at_unix_ms),
            self.by
        )))
    }
}

/// `cluster/revoked/<kind>/<name>`: the admin or coordinator certificates
/// of a name issued up to `revoked_unix_s` (their notBefore, seconds) are
/// refused by every replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertRevokedRecord {
    pub revoked_unix_s: i64,
    pub at_unix_ms: u64,
    /// The admin who revoked them.
    pub by: String,
}

impl CertRevokedRecord {
    /// Refuses a `kind` certificate of `name` issued at `issued_unix_s` if
    /// this revocation covers it.
    pub fn check(&self, kind: RevocableKind, name: &CertName, issued_unix_s: i64) -> Result<()> {
        if issued_unix_s > self.revoked_unix_s {
            return Ok(());
        }
        Err(Error::CertificateRevoked(format!(
            "the {kind} certificates of {:?} issued up to {} were revoked at {} by {}; \
             use one issued after that (stewardctl pki issue DIR {name} --kind {kind} \
             --revoked-at {})",
            name.as_str(),
            self.revoked_unix_s,
            steward_runtime::format_unix_ms(self.at_unix_ms),
            self.by,
            self.revoked_unix_s,
        )))
    }

    pub fn view(&self, kind: RevocableKind, name: CertName) -> CertRevocation {
        CertRevocation {
            kind,
            name,
            revoked_unix_s: self.revoked_unix_s,
            at_unix_ms: self.at_unix_ms,
            by: self.by.clone(),
        }
    }
}

/// `nodes/<id>/maintenance`: whether the node is out of service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceRecord {
    /// False once undrained (the record stays: see `Keys::node_maintenance`).
    pub active: bool,
    pub reason: String,
    /// The admin who drained (or undrained) it.
    pub by: String,
    pub at_unix_ms: u64,
    /// Drained although a gate refused.
    pub forced: bool,
}

/// `nodes/<id>/reboot`: the last reboot asked of the node. Its agent
/// reboots once for it (the record's mod revision is the generation), and
/// only while it runs boot `boot_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RebootRecord {
    /// The boot the reboot was asked of (from the node's facts).
    pub boot_id: String,
    /// The rollout that asked.
    pub rollout: String,
    pub at_unix_ms: u64,
}

/// `nodes/<id>/reboot-required`: the node's facts say it needs a reboot,
/// since when. Only what selection needs (the facts keep the source and
/// the packages): the spec cache holds one per node that needs a reboot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RebootRequiredRecord {
    pub since_unix_ms: u64,
}

impl From<&RebootRequired> for RebootRequiredRecord {
    fn from(need: &RebootRequired) -> Self {
        Self {
            since_unix_ms: need.since_unix_ms,
        }
    }
}

/// `vips/.removed`: the last VIP removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipRemovedRecord {
    pub name: String,
}

/// Nodes as [`Store::nodes_page`] read them.
#[derive(Debug, Default)]
pub struct NodesPage {
    /// In key order.
    pub nodes: Vec<(NodeId, NodeRecord)>,
    /// More nodes follow the last one.
    pub more: bool,
    /// The revision every page of one listing is read at.
    pub revision: i64,
}

/// A value read from etcd with the revision that last modified it.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned<T> {
    pub value: T,
    pub mod_revision: i64,
}

/// Everything etcd holds about one node.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeRecord {
    pub spec: Option<Versioned<NodeSpec>>,
    pub status: Option<Versioned<NodeStatusRecord>>,
    pub address: Option<Versioned<IpAddr>>,
    /// The last converge report whose outcome differed from the one before
    /// (`converge/<id>`; read per node and per page, not by [`Store::nodes`]).
    pub converge: Option<Versioned<ConvergeReport>>,
    /// The node's last certificate revocation.
    pub revoked: Option<Versioned<NodeRevokedRecord>>,
    /// What the agent last said about its host (`facts/<id>`; like
    /// `converge`, read per node and per page).
    pub facts: Option<Versioned<Facts>>,
    /// Out of service, if `active`.
    pub maintenance: Option<Versioned<MaintenanceRecord>>,
    /// Its bricks and pending heals (gluster-brick nodes).
    pub gluster: Option<Versioned<GlusterReport>>,
    /// Its reboot-required marker ([`Keys::node_reboot_required`]).
    pub reboot_required: Option<Versioned<RebootRequiredRecord>>,
}

pub fn decode<T: DeserializeOwned>(key: &[u8], value: &[u8]) -> Result<T> {
    serde_json::from_slice(value).map_err(|e| Error::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    })
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing our own plain structs to JSON cannot fail: no maps with
    // non-string keys, no custom serializers that error.
    serde_json::to_vec(value).unwrap_or_default()
}

/// What a backend call failed with.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Etcd(EtcdError),
    /// The in-memory backend, told to fail by a test.
    #[error("{0}")]
    Memory(String),
}

/// Where the state is: etcd, or the in-memory twin.
#[derive(Clone)]
enum Backend {
    // etcd-client's clients are large (kilobytes): one allocation, shared.
    Etcd(Arc<etcd::EtcdBackend>),
    Memory(Arc<MemoryBackend>),
}

/// A watch on some prefixes, from a revision.
pub enum Watch {
    Etcd(etcd::EtcdWatch),
    Memory(memory::MemoryWatch),
}

impl Watch {
    /// The next changes; `None` when the stream ended, an error when it
    /// broke or etcd compacted past it (read again, then watch again).
    pub async fn next(&mut self) -> Result<Option<Vec<Change>>> {
        match self {
            Watch::Etcd(w) => w.next().await,
            Watch::Memory(w) => w.next().await,
        }
    }
}

/// Keeps one lease alive.
pub enum LeaseKeeper {
    Etcd(Box<etcd::EtcdKeeper>),
    Memory {
        backend: Arc<MemoryBackend>,
        lease: i64,
    },
}

impl LeaseKeeper {
    /// Renews the lease once, waiting at most `wait` for the answer; the
    /// remaining TTL in seconds (0: the lease expired).
    pub async fn renew(&mut self, wait: Duration) -> Result<i64> {
        match self {
            LeaseKeeper::Etcd(k) => k.renew(wait).await,
            LeaseKeeper::Memory { backend, lease } => backend.lease_ttl(*lease, "keep lease alive"),
        }
    }
}

/// Typed access to one cluster's state.
#[derive(Clone)]
pub struct Store {
    backend: Backend,
    keys: Keys,
    replica: String,
    session_events: Arc<session_events::SessionEventLimiter>,
}

/// The two event logs, each trimmed to its own bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventLog {
    /// Security and admin events (`events/`).
    Audit,
    /// Session churn (`session-events/`).
    Sessions,
}

/// How many times a read-modify-write retries on a concurrent change.
const CAS_ATTEMPTS: usize = 8;

/// Keys per read of a list: with `nodes/` records of a few KiB at most, a
/// page stays far below etcd-client's 4 MB response limit.
pub const SCAN_CHUNK: usize = 256;

/// Single-key reads per transaction when fetching per-node records (facts
/// up to 16 KiB, converge reports up to 64 KiB: ~2.5 MB at most), also
/// under etcd's default of 128 operations per transaction.
const GET_MANY_CHUNK: usize = 32;

/// The first key after every key starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

static EVENT_SEQ: AtomicU64 = AtomicU64::new(0);

fn versioned<T: DeserializeOwned>(kv: &Kv) -> Result<Versioned<T>> {
    Ok(Versioned {
        value: decode(&kv.key, &kv.value)?,
        mod_revision: kv.mod_revision,
    })
}

impl Store {
    /// The store of replica `replica` on etcd (see [`connect`]).
    pub async fn connect(config: &EtcdConfig, keys: Keys, replica: String) -> Result<Self> {
        Ok(Self {
            backend: Backend::Etcd(Arc::new(etcd::EtcdBackend::connect(config).await?)),
            keys,
            replica,
            session_events: Arc::default(),
        })
    }

    /// The store of replica `replica` on `memory` (several replicas may
    /// share one).
    pub fn in_memory(memory: Arc<MemoryBackend>, keys: Keys, replica: String) -> Self {
        Self {
            backend: Backend::Memory(memory),
            keys,
            replica,
            session_events: Arc::default(),
        }
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub fn replica(&self) -> &str {
        &self.replica
    }

    // The backend's primitives, in the store's own words.

    async fn get(&self, key: &str, op: &'static str) -> Result<Option<Kv>> {
        match &self.backend {
            Backend::Etcd(b) => b.get(key.as_bytes(), op).await,
            Backend::Memory(b) => b.get(key.as_bytes(), op).await,
        }
    }

    async fn range(&self, prefix: &str, options: RangeOptions, op: &'static str) -> Result<Range> {
        match &self.backend {
            Backend::Etcd(b) => b.range(prefix.as_bytes(), options, op).await,
            Backend::Memory(b) => b.range(prefix.as_bytes(), options, op).await,
        }
    }

    async fn list(&self, prefix: &str, op: &'static str) -> Result<Range> {
        self.range(prefix, RangeOptions::default(), op).await
    }

    /// One unconditional write.
    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: PutLease,
        op: &'static str,
    ) -> Result<()> {
        match &self.backend {
            Backend::Etcd(b) => b.put(key.as_bytes(), value, lease, op).await,
            Backend::Memory(b) => b.put(key.as_bytes(), value, lease, op).await,
        }
    }

    /// Runs `txn`; what it answered, nested transactions included.
    pub async fn txn(&self, txn: Txn, op: &'static str) -> Result<TxnOutcome> {
        match &self.backend {
            Backend::Etcd(b) => b.txn(txn, op).await,
            Backend::Memory(b) => b.txn(txn, op).await,
        }
    }

    /// Everything under each of `prefixes`, read at one revision, in
    /// pages ([`Store::scan`]).
    pub async fn read_prefixes(&self, prefixes: &[String]) -> Result<Range> {
        let mut all = Range::default();
        for prefix in prefixes {
            let start = prefix.as_bytes();
            let read = self
                .scan(start, &prefix_end(start), all.revision, "read prefix")
                .await?;
            all.revision = read.revision;
            all.kvs.extend(read.kvs);
        }
        Ok(all)
    }

    /// One page: up to `limit` keys in `[start, end)` at `revision` (0: the
    /// newest).
    async fn range_page(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
        revision: i64,
        op: &'static str,
    ) -> Result<Range> {
        match &self.backend {
            Backend::Etcd(b) => b.range_page(start, end, limit, revision, op).await,
            Backend::Memory(b) => b.range_page(start, end, limit, revision, op).await,
        }
    }

    /// Every key in `[start, end)`, read in pages of [`SCAN_CHUNK`] keys,
    /// all at one revision: `revision`, or (0) the first page's.
    pub async fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        revision: i64,
        op: &'static str,
    ) -> Result<Range> {
        let mut all = Range {
            kvs: Vec::new(),
            revision,
        };
        let mut from = start.to_vec();
        loop {
            let page = self
                .range_page(&from, end, SCAN_CHUNK, all.revision, op)
                .await?;
            if all.revision == 0 {
                all.revision = page.revision;
            }
            let full = page.kvs.len() == SCAN_CHUNK;
            if let Some(last) = page.kvs.last() {
                from = last.key.clone();
                from.push(0);
            }
            all.kvs.extend(page.kvs);
            if !full {
                return Ok(all);
            }
        }
    }

    /// The keys `keys` (each exactly), read a bounded number at a time.
    async fn get_many(&self, keys: &[String], op: &'static str) -> Result<Vec<Kv>> {
        let mut found = Vec::new();
        for chunk in keys.chunks(GET_MANY_CHUNK) {
            let chunk: Vec<Vec<u8>> = chunk.iter().map(|k| k.as_bytes().to_vec()).collect();
            let read = match &self.backend {
                Backend::Etcd(b) => b.get_many(&chunk, op).await?,
                Backend::Memory(b) => b.get_many(&chunk, op).await?,
            };
            found.extend(read);
        }
        Ok(found)
    }

    /// The store's revision now (for following changes from the present).
    pub async fn current_revision(&self) -> Result<i64> {
        let election = self.keys.election();
        let read = self
            .range_page(
                election.as_bytes(),
                &prefix_end(election.as_bytes()),
                1,
                0,
                "read revision",
            )
            .await?;
        Ok(read.revision)
    }

    /// Follows every key under `prefixes` from `start_revision`, on one
    /// stream.
    pub async fn watch(&self, prefixes: &[String], start_revision: i64) -> Result<Watch> {
        let prefixes: Vec<Vec<u8>> = prefixes.iter().map(|p| p.as_bytes().to_vec()).collect();
        Ok(match &self.backend {
            Backend::Etcd(b) => Watch::Etcd(b.watch(&prefixes, start_revision).await?),
            Backend::Memory(b) => Watch::Memory(b.watch(&prefixes, start_revision).await?),
        })
    }

    // Membership and election (`replica`).

    /// A new lease of `ttl`.
    pub async fn grant_lease(&self, ttl: Duration) -> Result<i64> {
        let ttl_s = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
        match &self.backend {
            Backend::Etcd(b) => b.grant_lease(ttl_s).await,
            Backend::Memory(b) => b.grant_lease(ttl_s).await,
        }
    }

    pub async fn keep_alive(&self, lease: i64) -> Result<LeaseKeeper> {
        Ok(match &self.backend {
            Backend::Etcd(b) => LeaseKeeper::Etcd(Box::new(b.keep_alive(lease).await?)),
            Backend::Memory(b) => LeaseKeeper::Memory {
                backend: b.clone(),
                lease,
            },
        })
    }

    /// Ends `lease`; every key on it goes.
    pub async fn revoke_lease(&self, lease: i64) -> Result<()> {
        match &self.backend {
            Backend::Etcd(b) => b.revoke_lease(lease).await,
            Backend::Memory(b) => b.revoke_lease(lease).await,
        }
    }

    /// Writes this replica's member key on `lease`.
    pub async fn register_member(&self, member: &MemberRecord, lease: i64) -> Result<()> {
        self.put(
            &self.keys.member(&member.id),
            encode(member),
            PutLease::Attach(lease),
            "register member",
        )
        .await
    }

    /// Waits until this replica leads (on `lease`); its leader key, whose
    /// create revision is the epoch.
    pub async fn campaign(&self, lease: i64) -> Result<LeaderKey> {
        let name = self.keys.election();
        match &self.backend {
            Backend::Etcd(b) => {
                b.campaign(name.as_bytes(), self.replica.as_bytes(), lease)
                    .await
            }
            Backend::Memory(b) => {
                b.campaign(name.as_bytes(), self.replica.as_bytes(), lease)
                    .await
            }
        }
    }

    /// Gives up leadership at once.
    pub async fn resign(&self, key: &LeaderKey) -> Result<()> {
        match &self.backend {
            Backend::Etcd(b) => b.resign(key).await,
            Backend::Memory(b) => b.resign(key).await,
        }
    }

    /// The current leader's replica id, if any replica leads.
    pub async fn leader(&self) -> Result<Option<String>> {
        let name = self.keys.election();
        let value = match &self.backend {
            Backend::Etcd(b) => b.leader(name.as_bytes()).await?,
            Backend::Memory(b) => b.leader(name.as_bytes()).await?,
        };
        Ok(value.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    // Nodes.

    /// Everything about node `id`, its facts and converge report included.
    pub async fn node(&self, id: &NodeId) -> Result<NodeRecord> {
        // Its records under nodes/ and its details, read at once: a session
        // open waits for this (one round trip, not two).
        let prefix = format!("{}{id}/", self.keys.nodes());
        let details = [self.keys.node_facts(id), self.keys.node_converge(id)];
        let (resp, details) = tokio::join!(
            self.list(&prefix, "get node"),
            self.get_many(&details, "read node details")
        );
        let mut record = NodeRecord::default();
        for kv in &resp?.kvs {
            self.fill_record(&mut record, kv)?;
        }
        for kv in details? {
            if kv.key == self.keys.node_facts(id).as_bytes() {
                record.facts = Some(versioned(&kv)?);
            } else if kv.key == self.keys.node_converge(id).as_bytes() {
                record.converge = Some(versioned(&kv)?);
            }
        }
        Ok(record)
    }

    /// Adds the facts and converge reports of every node in `nodes`
    /// (read per node, a bounded number at a time).
    pub async fn fill_details(&self, nodes: &mut BTreeMap<NodeId, NodeRecord>) -> Result<()> {
        let keys: Vec<String> = nodes
            .keys()
            .flat_map(|id| [self.keys.node_facts(id), self.keys.node_converge(id)])
            .collect();
        for kv in self.get_many(&keys, "read node details").await? {
            let key = String::from_utf8_lossy(&kv.key);
            let Some((kind, id)) = key
                .strip_prefix(&self.keys.prefix)
                .and_then(|rest| rest.split_once('/'))
            else {
                continue;
            };
            let Some(record) = NodeId::new(id).ok().and_then(|id| nodes.get_mut(&id)) else {
                continue;
            };
            match kind {
                "facts" => record.facts = Some(versioned(&kv)?),
                "converge" => record.converge = Some(versioned(&kv)?),
                _ => {}
            }
        }
        Ok(())
    }

    /// Stores a node's gluster report (unconditionally, like its facts:
    /// only the session serving the node writes it).
    pub async fn put_gluster(&self, id: &NodeId, report: &GlusterReport) -> Result<()> {
        self.put(
            &self.keys.node_gluster(id),
            encode(report),
            PutLease::None,
            "write node gluster report",
        )
        .await
    }

    /// Stores a node's facts (unconditionally: only the session serving
    /// the node writes them, when they differ from what etcd holds), and
    /// in the same transaction its reboot-required marker if it differs
    /// from `marker` (the one etcd holds, as the session last read or
    /// wrote it).
    pub async fn put_facts(
        &self,
        id: &NodeId,
        facts: &Facts,
        marker: Option<&RebootRequiredRecord>,
    ) -> Result<()> {
        let mut ops = vec![Op::put(self.keys.node_facts(id), encode(facts))];
        ops.extend(self.reboot_marker_ops(id, facts.reboot_required.as_ref(), marker));
        self.txn(Txn::new().and_then(ops), "write node facts")
            .await?;
        Ok(())
    }

    /// Brings a node's reboot-required marker in step with `need` (its
    /// facts' `reboot_required`) when `marker` (what etcd holds) differs;
    /// nothing written otherwise. For facts stored before the marker
    /// existed: the session open puts it right.
    pub async fn sync_reboot_marker(
        &self,
        id: &NodeId,
        need: Option<&RebootRequired>,
        marker: Option<&RebootRequiredRecord>,
    ) -> Result<()> {
        let ops = self.reboot_marker_ops(id, need, marker);
        if !ops.is_empty() {
            self.txn(Txn::new().and_then(ops), "write reboot-required marker")
                .await?;
        }
        Ok(())
    }

    /// The write (if any) that turns the marker `marker` into `need`.
    fn reboot_marker_ops(
        &self,
        id: &NodeId,
        need: Option<&RebootRequired>,
        marker: Option<&RebootRequiredRecord>,
    ) -> Vec<Op> {
        let want = need.map(RebootRequiredRecord::from);
        if want.as_ref() == marker {
            return Vec::new();
        }
        let key = self.keys.node_reboot_required(id);
        vec![match want {
            Some(want) => Op::put(key, encode(&want)),
            None => Op::delete(key),
        }]
    }

    /// A read barrier: writes this replica's [`Keys::cache_sync`] key and
    /// returns the revision of that write. Once the spec cache has seen it
    /// ([`crate::cache::caught_up`]), the cache holds every write to
    /// `nodes/` etcd had committed before this call: a read from the cache
    /// is then as fresh as a linearizable read of etcd.
    pub async fn sync_point(&self) -> Result<i64> {
        let key = self.keys.cache_sync(&self.replica);
        let outcome = self
            .txn(
                Txn::new().and_then([Op::put(key, Vec::new())]),
                "write read barrier",
            )
            .await?;
        Ok(outcome.revision)
    }

    /// The status, facts and converge report of each of `ids` (read per
    /// node, a bounded number at a time; never a listing of the fleet).
    /// Every id has a record, empty if etcd holds none of these.
    pub async fn node_details(
        &self,
        ids: impl IntoIterator<Item = NodeId>,
    ) -> Result<BTreeMap<NodeId, NodeRecord>> {
        let mut nodes = self
            .records_of(
                ids,
                |id| vec![self.keys.node_status(id)],
                "read node statuses",
            )
            .await?;
        self.fill_details(&mut nodes).await?;
        Ok(nodes)
    }

    /// The status and gluster report of each of `ids` (what the drain
    /// gates read, `maintenance::gated_nodes`), per node; never a listing
    /// of the fleet. Every id has a record, empty if etcd holds neither.
    pub async fn gate_records(
        &self,
        ids: impl IntoIterator<Item = NodeId>,
    ) -> Result<BTreeMap<NodeId, NodeRecord>> {
        self.records_of(
            ids,
            |id| vec![self.keys.node_status(id), self.keys.node_gluster(id)],
            "read node statuses",
        )
        .await
    }

    /// Each of `ids` with what etcd holds under the keys `keys_of` names
    /// for it (a bounded number of keys per request).
    async fn records_of(
        &self,
        ids: impl IntoIterator<Item = NodeId>,
        keys_of: impl Fn(&NodeId) -> Vec<String>,
        what: &'static str,
    ) -> Result<BTreeMap<NodeId, NodeRecord>> {
        let mut nodes: BTreeMap<NodeId, NodeRecord> = ids
            .into_iter()
            .map(|id| (id, NodeRecord::default()))
            .collect();
        let keys: Vec<String> = nodes.keys().flat_map(&keys_of).collect();
        for kv in self.get_many(&keys, what).await? {
            if let Some((id, _)) = self.keys.parse_node_key(&kv.key) {
                if let Some(record) = nodes.get_mut(&id) {
                    self.fill_record(record, &kv)?;
                }
            }
        }
        Ok(nodes)
    }

    fn fill_record(&self, record: &mut NodeRecord, kv: &Kv) -> Result<()> {
        match self.keys.parse_node_key(&kv.key) {
            Some((_, NodeKey::Spec)) => record.spec = Some(versioned(kv)?),
            Some((_, NodeKey::Status)) => record.status = Some(versioned(kv)?),
            Some((_, NodeKey::Address)) => {
                record.address = Some(Versioned {
                    value: decode::<NodeAddressRecord>(&kv.key, &kv.value)?.address,
                    mod_revision: kv.mod_revision,
                })
            }
            Some((_, NodeKey::Revoked)) => record.revoked = Some(versioned(kv)?),
            Some((_, NodeKey::Maintenance)) => record.maintenance = Some(versioned(kv)?),
            Some((_, NodeKey::Gluster)) => record.gluster = Some(versioned(kv)?),
            Some((_, NodeKey::RebootRequired)) => record.reboot_required = Some(versioned(kv)?),
            Some((_, NodeKey::Reboot)) | None => {}
        }
        Ok(())
    }

    /// Every node with a spec or a status, without facts and converge
    /// reports ([`Store::fill_details`] adds them), read in pages.
    pub async fn nodes(&self) -> Result<BTreeMap<NodeId, NodeRecord>> {
        Ok(self
            .nodes_page(None, usize::MAX, 0)
            .await?
            .nodes
            .into_iter()
            .collect())
    }

    /// Up to `max` nodes after node `after` (in key order), without facts
    /// and converge reports, read at `revision` (0: now).
    pub async fn nodes_page(
        &self,
        after: Option<&NodeId>,
        max: usize,
        revision: i64,
    ) -> Result<NodesPage> {
        let prefix = self.keys.nodes();
        let end = prefix_end(prefix.as_bytes());
        let mut from = match after {
            // Past every key of `after`: `nodes/<after>/` then 0xff.
            Some(id) => {
                let mut k = format!("{prefix}{id}/").into_bytes();
                k.push(0xff);
                k
            }
            None => prefix.into_bytes(),
        };
        let mut page = NodesPage {
            nodes: Vec::new(),
            more: false,
            revision,
        };
        loop {
            let read = self
                .range_page(&from, &end, SCAN_CHUNK, page.revision, "list nodes")
                .await?;
            if page.revision == 0 {
                page.revision = read.revision;
            }
            let full = read.kvs.len() == SCAN_CHUNK;
            for kv in &read.kvs {
                let Some((id, _)) = self.keys.parse_node_key(&kv.key) else {
                    continue;
                };
                if page.nodes.last().is_none_or(|(last, _)| *last != id) {
                    if page.nodes.len() == max {
                        page.more = true;
                        return Ok(page);
                    }
                    page.nodes.push((id, NodeRecord::default()));
                }
                if let Some((_, record)) = page.nodes.last_mut() {
                    self.fill_record(record, kv)?;
                }
            }
            if let Some(last) = read.kvs.last() {
                from = last.key.clone();
                from.push(0);
            }
            if !full {
                return Ok(page);
            }
        }
    }

    /// Read-modify-write of a node's spec. `change` gets the current spec and
    /// returns the new one, `Ok(None)` for "nothing to change", or an error
    /// that aborts with nothing written. The node must be known (have
    /// connected at least once, or have a spec).
    pub async fn update_spec<F>(&self, id: &NodeId, mut change: F) -> Result<Versioned<NodeSpec>>
    where
        F: FnMut(&NodeSpec) -> Result<Option<NodeSpec>>,
    {
        let spec_key = self.keys.node_spec(id);
        for _ in 0..CAS_ATTEMPTS {
            let record = self.node(id).await?;
            if record.spec.is_none() && record.status.is_none() {
                return Err(Error::UnknownNode(id.clone()));
            }
            let (current, rev) = match &record.spec {
                Some(v) => (v.value.clone(), v.mod_revision),
                None => (NodeSpec::default(), 0),
            };
            let Some(next) = change(&current)? else {
                return Ok(Versioned {
                    value: current,
                    mod_revision: rev,
                });
            };
            let txn = Self::put_if_txn(spec_key.clone(), rev, encode(&next))
                .and_then(self.departure_ops(&current, &next));
            let outcome = self.txn(txn, "update spec").await?;
            if let Some(mod_revision) = outcome.succeeded.then_some(outcome.revision) {
                return Ok(Versioned {
                    value: next,
                    mod_revision,
                });
            }
        }
        Err(Error::Conflict { key: spec_key })
    }

    /// The marker writes that go with replacing spec `before` by `after`:
    /// one touch of `cluster/departed/<role>` per role the node loses.
    pub fn departure_ops(&self, before: &NodeSpec, after: &NodeSpec) -> Vec<Op> {
        before
            .roles
            .difference(&after.roles)
            .map(|role| Op::put(self.keys.role_departed(*role), Vec::new()))
            .collect()
    }

    /// The marker writes that go with replacing the cluster settings
    /// `before` by `after`: one touch of `cluster/changed/<section>` per
    /// section that differs.
    pub fn settings_change_ops(
        &self,
        before: &ClusterSettings,
        after: &ClusterSettings,
    ) -> Vec<Op> {
        self.settings_change_ops_from(&[before], after)
    }

    /// [`Store::settings_change_ops`] when nodes plan from several
    /// settings before the write (the cluster's, and the targets of
    /// rollouts still in effect on the nodes they changed): one touch per
    /// section that differs from any of them, so that no node's revision
    /// goes back when it moves to `after`.
    pub fn settings_change_ops_from(
        &self,
        before: &[&ClusterSettings],
        after: &ClusterSettings,
    ) -> Vec<Op> {
        let sections: std::collections::BTreeSet<Section> = before
            .iter()
            .flat_map(|b| Section::changed(b, after))
            .collect();
        sections
            .into_iter()
            .map(|section| Op::put(self.keys.settings_changed(section), Vec::new()))
            .collect()
    }

    /// Writes a node's status if nobody wrote it since `expected_rev`
    /// (0: the key must not exist). Returns the new revision, or `None` when
    /// someone else wrote in between.
    pub async fn put_status_if(
        &self,
        id: &NodeId,
        expected_rev: i64,
        status: &NodeStatusRecord,
    ) -> Result<Option<i64>> {
        self.put_if(
            self.keys.node_status(id),
            expected_rev,
            encode(status),
            "write node status",
        )
        .await
    }

    /// The write that marks a node's status `next` if nobody rewrote it
    /// since `expected_rev`, with `event`: a transaction for the leader's
    /// fence (the agent may have reconnected elsewhere meanwhile).
    pub fn status_if_txn(
        &self,
        id: &NodeId,
        expected_rev: i64,
        next: &NodeStatusRecord,
        event: &Event,
    ) -> Txn {
        let key = self.keys.node_status(id);
        Txn::new()
            .when([Cmp::mod_revision(key.clone(), expected_rev)])
            .and_then([Op::put(key, encode(next)), self.event_op(event)])
    }

    /// Writes a node's address like [`Store::put_status_if`].
    pub async fn put_address_if(
        &self,
        id: &NodeId,
        expected_rev: i64,
        address: IpAddr,
    ) -> Result<Option<i64>> {
        self.put_if(
            self.keys.node_address(id),
            expected_rev,
            encode(&NodeAddressRecord { address }),
            "write node address",
        )
        .await
    }

    /// Writes a node's converge report like [`Store::put_status_if`].
    pub async fn put_converge_if(
        &self,
        id: &NodeId,
        expected_rev: i64,
        encoded_report: Vec<u8>,
    ) -> Result<Option<i64>> {
        self.put_if(
            self.keys.node_converge(id),
            expected_rev,
            encoded_report,
            "write converge report",
        )
        .await
    }

    /// The write of `value` at `key` if the key's mod revision is
    /// `expected_rev` (0: the key must not exist).
    pub fn put_if_txn(key: String, expected_rev: i64, value: Vec<u8>) -> Txn {
        Txn::new()
            .when([Cmp::mod_revision(key.clone(), expected_rev)])
            .and_then([Op::put(key, value)])
    }

    /// Puts `value` at `key` if the key's mod revision is `expected_rev`
    /// (0: the key must not exist); the new revision if it did.
    async fn put_if(
        &self,
        key: String,
        expected_rev: i64,
        value: Vec<u8>,
        op: &'static str,
    ) -> Result<Option<i64>> {
        let outcome = self
            .txn(Self::put_if_txn(key, expected_rev, value), op)
            .await?;
        Ok(outcome.succeeded.then_some(outcome.revision))
    }

    /// Puts `value` at `key` unless the key exists; whether it was written.
    pub async fn create_if_absent(&self, key: String, value: Vec<u8>) -> Result<bool> {
        Ok(self.put_if(key, 0, value, "create record").await?.is_some())
    }

    /// Touched by every deletion under `orchestration/`, in the same
    /// transaction: desired-state revisions take their inputs' newest mod
    /// revision, and a deleted record leaves none behind.
    pub fn orchestration_removed(&self) -> String {
        format!("{}.removed", self.keys.orchestration())
    }

    /// Deletes orchestration records `keys` and touches
    /// [`Store::orchestration_removed`], in one transaction.
    pub async fn delete_orchestration(&self, keys: &[String]) -> Result<()> {
        let ops = keys
            .iter()
            .map(|k| Op::delete(k.as_str()))
            .chain([Op::put(self.orchestration_removed(), Vec::new())]);
        self.txn(Txn::new().and_then(ops), "delete orchestration records")
            .await?;
        Ok(())
    }

    /// Deletes `keys` in one transaction.
    pub async fn delete_all(&self, keys: &[String]) -> Result<()> {
        let ops = keys.iter().map(|k| Op::delete(k.as_str()));
        self.txn(Txn::new().and_then(ops), "delete records").await?;
        Ok(())
    }

    // Events.

    /// An event of this replica, now.
    pub fn event(&self, kind: EventKind, node: Option<NodeId>, message: String) -> Event {
        Event {
            revision: 0,
            at_unix_ms: unix_ms(),
            kind,
            node,
            replica: self.replica.clone(),
            message,
        }
    }

    /// A new key for `event` under `events/` or `session-events/` (by its
    /// kind), the only format there is: ordered by time, unique within
    /// this replica (so several events fit in one transaction, and a
    /// retried write never overwrites another).
    pub fn event_key(&self, event: &Event) -> String {
        let seq = EVENT_SEQ.fetch_add(1, Ordering::Relaxed);
        format!(
            "{}{:016}-{}-{seq}",
            self.keys.events_of(event.kind),
            event.at_unix_ms,
            self.replica
        )
    }

    /// The write that appends `event`, for a transaction.
    pub fn event_op(&self, event: &Event) -> Op {
        Op::put(self.event_key(event), encode(event))
    }

    /// Appends an event to its log. A node's session events beyond one
    /// connected/disconnected pair per [`session_events::SESSION_EVENT_WINDOW`]
    /// are only counted (`steward_session_events_suppressed_total`); the
    /// next one recorded says how many were left out.
    pub async fn record_event(&self, event: &Event) -> Result<()> {
        let mut event = std::borrow::Cow::Borrowed(event);
        if let (true, Some(node)) = (
            session_events::is_session_event(event.kind),
            event.node.as_ref(),
        ) {
            match self
                .session_events
                .judge(node, event.kind, std::time::Instant::now())
            {
                session_events::Verdict::Suppress => {
                    crate::metrics::metrics()
                        .session_events_suppressed
                        .with(&[event.kind.as_str()])
                        .inc();
                    return Ok(());
                }
                session_events::Verdict::Record { suppressed: 0 } => {}
                session_events::Verdict::Record { suppressed } => {
                    event.to_mut().message.push_str(&format!(
                        " ({suppressed} session events of this node before were not recorded)"
                    ));
                }
            }
        }
        self.put(
            &self.event_key(&event),
            encode(&*event),
            PutLease::None,
            "record event",
        )
        .await
    }

    /// The latest `limit` events of both logs, oldest first, and the
    /// revision they were read at (events written later come with a watch
    /// from the next one).
    pub async fn recent_events(&self, limit: u32) -> Result<(Vec<Event>, i64)> {
        let options = RangeOptions {
            descending: true,
            limit: limit as usize,
            keys_only: false,
        };
        let audit = self
            .range(&self.keys.events(), options, "read events")
            .await?;
        let sessions = self
            .range(&self.keys.session_events(), options, "read events")
            .await?;
        // Read later: what was written after the audit read is left to
        // the watch, so nothing is listed twice.
        let revision = audit.revision;
        let mut events = Vec::new();
        for kv in audit
            .kvs
            .iter()
            .chain(&sessions.kvs)
            .filter(|kv| kv.mod_revision <= revision)
        {
            let mut e: Event = decode(&kv.key, &kv.value)?;
            e.revision = kv.mod_revision as u64;
            events.push(e);
        }
        // By time, then in the order etcd took them.
        events.sort_by_key(|e| (e.at_unix_ms, e.revision));
        let skip = events.len().saturating_sub(limit as usize);
        Ok((events.into_iter().skip(skip).collect(), revision))
    }

    /// Every key of one event log, oldest first (for trimming it).
    pub async fn event_keys(&self, log: EventLog) -> Result<Vec<Vec<u8>>> {
        let prefix = match log {
            EventLog::Audit => self.keys.events(),
            EventLog::Sessions => self.keys.session_events(),
        };
        let options = RangeOptions {
            keys_only: true,
            ..RangeOptions::default()
        };
        let resp = self.range(&prefix, options, "list events").await?;
        Ok(resp.kvs.into_iter().map(|kv| kv.key).collect())
    }

    /// Events of both logs appended from `start_revision` on, as they come.
    pub async fn watch_events(&self, start_revision: i64) -> Result<Watch> {
        self.watch(
            &[self.keys.events(), self.keys.session_events()],
            start_revision,
        )
        .await
    }

    // Cluster-wide records.

    /// The cluster settings and their mod revision; `None` before the
    /// first `stewardctl apply` that set any.
    pub async fn cluster_settings(&self) -> Result<Option<Versioned<ClusterSettings>>> {
        self.get_versioned(self.keys.cluster_settings(), "read cluster settings")
            .await
    }

    /// One record and its mod revision, if the key exists.
    async fn get_versioned<T: DeserializeOwned>(
        &self,
        key: String,
        op: &'static str,
    ) -> Result<Option<Versioned<T>>> {
        self.get(&key, op)
            .await?
            .as_ref()
            .map(versioned)
            .transpose()
    }

    pub async fn members(&self) -> Result<Vec<MemberRecord>> {
        let resp = self.list(&self.keys.members(), "list members").await?;
        resp.kvs
            .iter()
            .map(|kv| decode(&kv.key, &kv.value))
            .collect()
    }

    // VIPs.

    /// A linearizable read of every VIP (not the watch cache: an operator
    /// expects to see their own write).
    pub async fn vips(&self) -> Result<VipSnapshot> {
        let resp = self.list(&self.keys.vips(), "read VIPs").await?;
        let mut snapshot = VipSnapshot::default();
        for kv in &resp.kvs {
            snapshot.apply(&self.keys, &kv.key, Some((&kv.value, kv.mod_revision)));
        }
        snapshot.set_revision(resp.revision);
        Ok(snapshot)
    }

    /// The writes that define or replace the VIP `spec`: the spec and its
    /// event.
    pub fn vip_set_ops(&self, spec: &VipSpec) -> Vec<Op> {
        let event = self.event(
            EventKind::VipChanged,
            None,
            format!("VIP {} set to {}", spec.name, spec.address),
        );
        vec![
            Op::put(self.keys.vip_spec(&spec.name), encode(spec)),
            self.event_op(&event),
        ]
    }

    /// The writes that remove the VIPs `names`: every key of each, one event
    /// each, and one touch of `vips/.removed`, which moves every node's
    /// desired-state revision past the removal.
    pub fn vip_removal_ops(&self, names: &[&str]) -> Vec<Op> {
        let mut ops = Vec::with_capacity(2 * names.len() + 1);
        for name in names {
            let event = self.event(EventKind::VipChanged, None, format!("VIP {name} removed"));
            ops.push(Op::delete_prefix(self.keys.vip(name)));
            ops.push(self.event_op(&event));
        }
        ops.push(Op::put(
            self.keys.vips_removed(),
            encode(&VipRemovedRecord {
                name: names.join(","),
            }),
        ));
        ops
    }

    /// Asks the holder of VIP `name` at `epoch` to let go (to `to`, if
    /// named), with `event`; `false` if the owner moved on meanwhile.
    pub async fn request_vip_move(
        &self,
        name: &str,
        epoch: u64,
        to: Option<NodeId>,
        event: &Event,
    ) -> Result<bool> {
        let txn = self
            .vip_release_request_txn(name, epoch, to)
            .and_then([self.event_op(event)]);
        Ok(self.txn(txn, "request VIP move").await?.succeeded)
    }

    /// The write of a move request for VIP `name` at `epoch`, guarded on
    /// the owner still being at that epoch.
    pub fn vip_release_request_txn(&self, name: &str, epoch: u64, to: Option<NodeId>) -> Txn {
        Txn::new()
            .when([Cmp::mod_revision(self.keys.vip_owner(name), epoch as i64)])
            .and_then([Op::put(
                self.keys.vip_move(name),
                encode(&MoveRecord { epoch, to }),
            )])
    }

    /// The owner write of VIP `name` (the leader's, to be fenced): `next`
    /// holds the next epoch if the owner key is still at `current` (`None`:
    /// it must not exist); the old epoch's marks and move request go, and
    /// `event` records the move.
    pub fn vip_assign_txn(
        &self,
        name: &str,
        current: Option<u64>,
        counted_marks: &[String],
        next: Option<NodeId>,
        event: &Event,
    ) -> Txn {
        let owner_key = self.keys.vip_owner(name);
        let mut guards = vec![match current {
            Some(epoch) => Cmp::mod_revision(owner_key.clone(), epoch as i64),
            None => Cmp::absent(owner_key.clone()),
        }];
        // Every mark the decision counted must still be there: a replica
        // that took its mark back acks the holder again (see
        // `steward_lease`).
        if let Some(epoch) = current {
            guards.extend(
                counted_marks
                    .iter()
                    .map(|replica| Cmp::present(self.keys.vip_mark(name, epoch, replica))),
            );
        }
        Txn::new().when(guards).and_then([
            Op::put(owner_key, encode(&OwnerRecord { node: next })),
            Op::delete(self.keys.vip_move(name)),
            Op::delete_prefix(self.keys.vip_marks(name)),
            self.event_op(event),
        ])
    }

    /// Writes this replica's expiry mark for `vip` at `epoch`, only while
    /// the owner key is still at that epoch; whether it was written.
    pub async fn write_mark(&self, vip: &str, epoch: u64, reason: MarkReason) -> Result<bool> {
        let txn = Txn::new()
            .when([Cmp::mod_revision(self.keys.vip_owner(vip), epoch as i64)])
            .and_then([Op::put(
                self.keys.vip_mark(vip, epoch, &self.replica),
                encode(&MarkRecord::new(reason)),
            )]);
        Ok(self.txn(txn, "write expiry mark").await?.succeeded)
    }

    /// Deletes this replica's mark for `epoch` of `vip` (the holder is heard
    /// again), only while the owner key is still at `epoch`; `false`: the
    /// epoch is over.
    pub async fn withdraw_mark(&self, vip: &str, epoch: u64) -> Result<bool> {
        let txn = Txn::new()
            .when([Cmp::mod_revision(self.keys.vip_owner(vip), epoch as i64)])
            .and_then([Op::delete(self.keys.vip_mark(vip, epoch, &self.replica))]);
        Ok(self.txn(txn, "withdraw expiry mark").await?.succeeded)
    }

    // Tokens and revocations.

    /// Stores a new token under a lease that outlives its expiry by
    /// [`crate::tokens::KEEP_AFTER_EXPIRY_S`]; `false` if the id is taken.
    pub async fn create_token(&self, record: &TokenRecord) -> Result<bool> {
        let ttl_s = record.expires_unix_ms.saturating_sub(unix_ms()) / 1000
            + crate::tokens::KEEP_AFTER_EXPIRY_S;
        let lease = self.grant_lease(Duration::from_secs(ttl_s)).await?;
        let key = self.keys.token(&record.id);
        let txn = Txn::new()
            .when([Cmp::absent(key.clone())])
            .and_then([Op::put_on_lease(
                key,
                encode(record),
                PutLease::Attach(lease),
            )]);
        Ok(self.txn(txn, "create token").await?.succeeded)
    }

    pub async fn token(&self, id: &str) -> Result<Option<Versioned<TokenRecord>>> {
        self.get_versioned(self.keys.token(id), "read token").await
    }

    pub async fn tokens(&self) -> Result<Vec<TokenRecord>> {
        let resp = self.list(&self.keys.tokens(), "list tokens").await?;
        resp.kvs
            .iter()
            .map(|kv| decode(&kv.key, &kv.value))
            .collect()
    }

    /// Records a use of a token by `node`, if nobody used or changed the
    /// token since `mod_revision`, together with `event` and the node id's
    /// claim (`nodes/<id>/joined`). `new_node`: the id must not be claimed
    /// yet (the join was judged on "this id is unknown"), so of two tokens
    /// joining one new id at once exactly one wins. The record keeps its
    /// lease.
    pub async fn consume_token(
        &self,
        record: &TokenRecord,
        mod_revision: i64,
        node: &NodeId,
        new_node: bool,
        event: &Event,
    ) -> Result<bool> {
        let key = self.keys.token(&record.id);
        let claim = self.keys.node_joined(node);
        let mut guards = vec![Cmp::mod_revision(key.clone(), mod_revision)];
        if new_node {
            guards.push(Cmp::absent(claim.clone()));
        }
        let txn = Txn::new().when(guards).and_then([
            Op::put_on_lease(key, encode(record), PutLease::Keep),
            Op::put(claim, encode(&event.at_unix_ms)),
            self.event_op(event),
        ]);
        Ok(self.txn(txn, "use token").await?.succeeded)
    }

    /// Whether the token existed.
    pub async fn delete_token(&self, id: &str) -> Result<bool> {
        let key = self.keys.token(id);
        match &self.backend {
            Backend::Etcd(b) => b.delete(key.as_bytes(), "delete token").await,
            Backend::Memory(b) => b.delete(key.as_bytes(), "delete token").await,
        }
    }

    /// Revokes node `id`'s certificates issued up to now (`by`: the admin),
    /// with its event, if the node is known (it has a spec or a status, or
    /// joined with a token and has not connected yet); `None` if it is not.
    /// Nodes are never deleted, so a node known here stays known.
    pub async fn revoke_node(&self, id: &NodeId, by: &str) -> Result<Option<NodeRevokedRecord>> {
        let node = self.node(id).await?;
        let known = node.spec.is_some()
            || node.status.is_some()
            || self
                .tokens()
                .await?
                .iter()
                .any(|t| t.used_by.iter().any(|u| &u.node == id));
        if !known {
            return Ok(None);
        }
        let now = unix_ms();
        let record = NodeRevokedRecord {
            revoked_unix_s: i64::try_from(now / 1000).unwrap_or(i64::MAX),
            at_unix_ms: now,
            by: by.to_owned(),
        };
        let mut event = self.event(
            EventKind::NodeRevoked,
            Some(id.clone()),
            format!("{id}: certificates revoked by {by}"),
        );
        event.at_unix_ms = now;
        self.txn(
            Txn::new().and_then([
                Op::put(self.keys.node_revoked(id), encode(&record)),
                self.event_op(&event),
            ]),
            "revoke node",
        )
        .await?;
        Ok(Some(record))
    }

    /// Revokes the `kind` certificates of `name` issued up to now (`by`:
    /// the admin), with its event. Revoking again moves the cut-off on.
    pub async fn revoke_certificate(
        &self,
        kind: RevocableKind,
        name: &CertName,
        by: &str,
    ) -> Result<CertRevokedRecord> {
        let now = unix_ms();
        let record = CertRevokedRecord {
            revoked_unix_s: i64::try_from(now / 1000).unwrap_or(i64::MAX),
            at_unix_ms: now,
            by: by.to_owned(),
        };
        let mut event = self.event(
            EventKind::CertificateRevoked,
            None,
            format!(
                "{kind} certificates of {:?} issued up to {} (second {}) revoked by {by}",
                name.as_str(),
                steward_runtime::format_unix_ms(now),
                record.revoked_unix_s,
            ),
        );
        event.at_unix_ms = now;
        self.txn(
            Txn::new().and_then([
                Op::put(self.keys.cert_revoked(kind, name), encode(&record)),
                self.event_op(&event),
            ]),
            "revoke certificate",
        )
        .await?;
        Ok(record)
    }

    /// Writes node `id`'s maintenance record with its event, if nobody
    /// changed it since `expected_rev` (0: no record yet); whether it did.
    pub async fn put_maintenance_if(
        &self,
        id: &NodeId,
        expected_rev: i64,
        record: &MaintenanceRecord,
        event: &Event,
    ) -> Result<bool> {
        let txn = Self::put_if_txn(self.keys.node_maintenance(id), expected_rev, encode(record))
            .and_then([self.event_op(event)]);
        Ok(self.txn(txn, "write maintenance").await?.succeeded)
    }

    /// Node `id`'s last certificate revocation, if any.
    pub async fn revocation(&self, id: &NodeId) -> Result<Option<NodeRevokedRecord>> {
        let revoked = self
            .get_versioned(self.keys.node_revoked(id), "get revocation")
            .await?;
        Ok(revoked.map(|r| r.value))
    }

    /// The rollout that holds the cluster, with the mod revision of its
    /// key (0: never written).
    pub async fn active_rollout(&self) -> Result<(ActiveRollout, i64)> {
        let active = self
            .get_versioned::<ActiveRollout>(self.keys.rollout_active(), "read active rollout")
            .await?;
        Ok(active.map_or((ActiveRollout::default(), 0), |a| (a.value, a.mod_revision)))
    }

    /// Every rollout etcd holds (read in pages), by id, oldest first.
    pub async fn rollouts(&self) -> Result<BTreeMap<String, RolloutEntry>> {
        let prefix = self.keys.rollouts();
        self.read_rollouts(&prefix, "list rollouts").await
    }

    /// Rollout `id`, if etcd has it.
    pub async fn rollout(&self, id: &str) -> Result<Option<RolloutEntry>> {
        let prefix = self.keys.rollout(id);
        Ok(self
            .read_rollouts(&prefix, "read rollout")
            .await?
            .remove(id))
    }

    async fn read_rollouts(
        &self,
        prefix: &str,
        op: &'static str,
    ) -> Result<BTreeMap<String, RolloutEntry>> {
        let start = prefix.as_bytes();
        let read = self.scan(start, &prefix_end(start), 0, op).await?;
        let mut all: BTreeMap<String, RolloutEntry> = BTreeMap::new();
        for kv in &read.kvs {
            if let Some((id, key)) = self.keys.parse_rollout_key(&kv.key) {
                all.entry(id)
                    .or_default()
                    .apply(&kv.key, key, Some((&kv.value, kv.mod_revision)));
            }
        }
        Ok(all)
    }

    /// Whether etcd has any record of node `id` (spec, status, address).
    pub async fn node_known(&self, id: &NodeId) -> Result<bool> {
        let prefix = format!("{}{id}/", self.keys.nodes());
        let count = match &self.backend {
            Backend::Etcd(b) => b.count(prefix.as_bytes(), "look up node").await?,
            Backend::Memory(b) => b.count(prefix.as_bytes(), "look up node").await?,
        };
        Ok(count > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> NodeStatusRecord {
        NodeStatusRecord {
            health: NodeHealth::Healthy,
            last_health: Health::default(),
            replica: None,
            last_seen_unix_ms: 1,
            applied_revision: 0,
            agent_version: "test".into(),
        }
    }

    /// Lists longer than a read page come whole, in pages, and node pages
    /// never split a node's keys.
    #[tokio::test]
    async fn lists_are_read_in_pages() {
        let store = Store::in_memory(MemoryBackend::new(), Keys::new("t"), "c-1".into());
        let count = SCAN_CHUNK * 2 + 17;
        for i in 0..count {
            let id = NodeId::new(format!("n{i:04}")).unwrap();
            store.put_status_if(&id, 0, &status()).await.unwrap();
            store
                .put_address_if(&id, 0, "198.18.0.1".parse().unwrap())
                .await
                .unwrap();
        }
        let all = store.nodes().await.unwrap();
        assert_eq!(all.len(), count);
        assert!(all
            .values()
            .all(|r| r.status.is_some() && r.address.is_some()));
        let read = store.read_prefixes(&[store.keys().nodes()]).await.unwrap();
        assert_eq!(read.kvs.len(), 2 * count);

        let mut seen = 0;
        let mut after = None;
        loop {
            let page = store.nodes_page(after.as_ref(), 100, 0).await.unwrap();
            for (_, record) in &page.nodes {
                assert!(record.status.is_some() && record.address.is_some());
            }
            seen += page.nodes.len();
            after = page.nodes.last().map(|(id, _)| id.clone());
            if !page.more {
                break;
            }
            assert_eq!(page.nodes.len(), 100);
        }
        assert_eq!(seen, count);
    }

    /// Facts and converge reports live apart from `nodes/` and come with
    /// one node, not with lists.
    #[tokio::test]
    async fn facts_come_with_one_node_not_with_lists() {
        let store = Store::in_memory(MemoryBackend::new(), Keys::new("t"), "c-1".into());
        let id = NodeId::new("n1").unwrap();
        store.put_status_if(&id, 0, &status()).await.unwrap();
        let facts = Facts {
            hostname: "n1".into(),
            ..Default::default()
        };
        store.put_facts(&id, &facts, None).await.unwrap();
        assert_eq!(store.node(&id).await.unwrap().facts.unwrap().value, facts);
        let mut all = store.nodes().await.unwrap();
        assert!(all[&id].facts.is_none());
        store.fill_details(&mut all).await.unwrap();
        assert_eq!(all[&id].facts.as_ref().unwrap().value, facts);
    }

    /// The reboot-required marker is written with the facts when their
    /// `reboot_required` changes, and only then; a stale one is put right.
    #[tokio::test]
    async fn the_reboot_marker_follows_the_facts() {
        let memory = MemoryBackend::new();
        let store = Store::in_memory(memory.clone(), Keys::new("t"), "c-1".into());
        let id = NodeId::new("n1").unwrap();
        let marker = |store: Store| {
            let id = id.clone();
            async move { store.node(&id).await.unwrap().reboot_required }
        };
        let need = RebootRequired {
            since_unix_ms: 7,
            source: "reboot-required".into(),
            packages: vec!["linux-image".into()],
        };
        let needing = Facts {
            hostname: "n1".into(),
            reboot_required: Some(need.clone()),
            ..Default::default()
        };
        store.put_facts(&id, &needing, None).await.unwrap();
        let set = marker(store.clone()).await.expect("set with the facts");
        let held = RebootRequiredRecord { since_unix_ms: 7 };
        assert_eq!(set.value, held);
        // The same need again (other facts changed): the marker stays as is.
        let renamed = Facts {
            hostname: "n1-renamed".into(),
            ..needing.clone()
        };
        store.put_facts(&id, &renamed, Some(&held)).await.unwrap();
        assert_eq!(marker(store.clone()).await, Some(set.clone()));
        // Rebooted: the need is gone, and the marker with it.
        let done = Facts {
            reboot_required: None,
            ..renamed
        };
        store.put_facts(&id, &done, Some(&held)).await.unwrap();
        assert_eq!(marker(store.clone()).await, None);
        assert!(store
            .node(&id)
            .await
            .unwrap()
            .facts
            .unwrap()
            .value
            .reboot_required
            .is_none());
        // Facts stored without a marker (before it existed): put right.
        store
            .sync_reboot_marker(&id, Some(&need), None)
            .await
            .unwrap();
        assert_eq!(
            marker(store.clone()).await.map(|m| m.value),
            Some(held.clone())
        );
        // Other packages, the same need: nothing to write.
        let more = RebootRequired {
            packages: vec!["libc6".into()],
            ..need.clone()
        };
        let revision = memory.revision();
        store
            .sync_reboot_marker(&id, Some(&more), Some(&held))
            .await
            .unwrap();
        assert_eq!(memory.revision(), revision, "in step: nothing written");
        // The read barrier is under nodes/ but no node: listings skip it.
        store.sync_point().await.unwrap();
        assert!(store
            .keys()
            .is_cache_sync(store.keys().cache_sync("c-1").as_bytes()));
        let all = store.nodes().await.unwrap();
        assert_eq!(all.keys().collect::<Vec<_>>(), [&id]);
    }

    #[test]
    fn node_keys_parse_back() {
        let keys = Keys::new("prod");
        let id = NodeId::new("n1").unwrap();
        assert_eq!(keys.node_spec(&id), "/steward/prod/nodes/n1/spec");
        assert_eq!(
            keys.parse_node_key(keys.node_status(&id).as_bytes()),
            Some((id.clone(), NodeKey::Status))
        );
        assert_eq!(
            keys.parse_node_key(keys.node_address(&id).as_bytes()),
            Some((id.clone(), NodeKey::Address))
        );
        // The big records live apart from nodes/.
        assert_eq!(
            keys.parse_node_key(keys.node_converge(&id).as_bytes()),
            None
        );
        assert_eq!(keys.parse_node_key(keys.node_facts(&id).as_bytes()), None);
        assert_eq!(
            keys.parse_node_key(keys.node_revoked(&id).as_bytes()),
            Some((id.clone(), NodeKey::Revoked))
        );
        assert_eq!(
            keys.parse_node_key(keys.node_reboot_required(&id).as_bytes()),
            Some((id.clone(), NodeKey::RebootRequired))
        );
        for replica in ["c-1", "spec"] {
            let barrier = keys.cache_sync(replica);
            assert!(keys.is_cache_sync(barrier.as_bytes()));
            assert_eq!(keys.parse_node_key(barrier.as_bytes()), None);
        }
        assert!(!keys.is_cache_sync(keys.node_spec(&id).as_bytes()));
        assert_eq!(keys.parse_node_key(b"/steward/prod/nodes/n1/other"), None);
        assert_eq!(keys.parse_node_key(b"/steward/dev/nodes/n1/spec"), None);
        assert_eq!(keys.parse_node_key(b"/steward/prod/nodes/BAD/spec"), None);
    }

    #[test]
    fn a_certificate_revocation_covers_its_kind_and_name_up_to_its_second() {
        let keys = Keys::new("t");
        let name = CertName::new("ops.example").unwrap();
        for kind in RevocableKind::ALL {
            let key = keys.cert_revoked(kind, &name);
            assert_eq!(
                keys.parse_cert_revoked(key.as_bytes()),
                Some((kind, name.clone()))
            );
            // Not a marker, a node key or the settings.
            assert_eq!(keys.parse_marker(key.as_bytes()), None);
        }
        assert_eq!(
            keys.parse_cert_revoked(b"/steward/t/cluster/revoked/agent/n1"),
            None
        );
        assert_eq!(
            keys.parse_cert_revoked(b"/steward/t/cluster/settings"),
            None
        );
        let revoked = CertRevokedRecord {
            revoked_unix_s: 1_000,
            at_unix_ms: 1_000_250,
            by: "root".into(),
        };
        for issued in [0, 999, 1_000] {
            let error = revoked
                .check(RevocableKind::Admin, &name, issued)
                .unwrap_err();
            let text = error.to_string();
            assert!(
                text.contains("revoked at")
                    && text.contains("by root")
                    && text.contains("--revoked-at 1000"),
                "{text}"
            );
        }
        revoked.check(RevocableKind::Admin, &name, 1_001).unwrap();
    }

    #[test]
    fn a_revocation_covers_certificates_issued_up_to_its_second() {
        let node = NodeId::new("n1").unwrap();
        let revoked = NodeRevokedRecord {
            revoked_unix_s: 1_000,
            at_unix_ms: 1_000_500,
            by: "ops".into(),
        };
        for issued in [0, 999, 1_000] {
            let error = revoked.check(&node, issued).unwrap_err();
            assert!(matches!(error, Error::CertificateRevoked(_)), "{error}");
            let text = error.to_string();
            assert!(
                text.contains("revoked at") && text.contains("by ops"),
                "{text}"
            );
            assert!(text.contains("token create --node n1"), "{text}");
        }
        revoked.check(&node, 1_001).unwrap();
    }

    #[test]
    fn vip_keys_parse_back() {
        let keys = Keys::new("prod");
        assert_eq!(
            keys.parse_vip_key(keys.vip_mark("front", 42, "c-1").as_bytes()),
            Some((
                "front".into(),
                VipKey::Mark {
                    epoch: 42,
                    replica: "c-1".into()
                }
            ))
        );
        assert_eq!(
            keys.parse_vip_key(keys.vip_owner("front").as_bytes()),
            Some(("front".into(), VipKey::Owner))
        );
        assert_eq!(
            keys.parse_vip_key(b"/steward/prod/vips/front/expired/x/c"),
            None
        );
        assert_eq!(keys.parse_vip_key(b"/steward/prod/vips/front/other"), None);
        assert_eq!(keys.parse_vip_key(keys.vips_removed().as_bytes()), None);
    }
}
