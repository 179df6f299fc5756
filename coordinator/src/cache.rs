//! The replica's watch caches of etcd prefixes (node specs and addresses
//! with the cluster settings, VIPs): read once, then follow the etcd watch
//! from the read revision + 1; after a compaction or a broken stream, read
//! again. Sessions subscribe to push changes.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use steward_proto::converge::{ClusterSettings, ClusterView, Member};
use steward_proto::domain::{DesiredState, NodeId, NodeSpec};
use steward_runtime::backoff::Backoff;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::error::{Error, Result};
use crate::store::kv::Change;
use crate::store::{decode, Keys, NodeAddressRecord, NodeKey, NodeRevokedRecord, Store, Versioned};
use crate::vip::VipSnapshot;

/// All node specs and addresses, and the cluster settings, as of one etcd
/// revision.
#[derive(Debug, Clone, Default)]
pub struct SpecSnapshot {
    pub revision: i64,
    /// False until the first read succeeded.
    pub synced: bool,
    pub specs: BTreeMap<NodeId, Versioned<NodeSpec>>,
    /// Where the cluster reaches each node (`nodes/<id>/address`).
    pub addresses: BTreeMap<NodeId, Versioned<IpAddr>>,
    /// `cluster/settings`; `None` until a `stewardctl apply` wrote it.
    pub settings: Option<Versioned<ClusterSettings>>,
    /// Certificate revocations (`nodes/<id>/revoked`), which end live
    /// sessions and lease streams. Not an input of desired states.
    pub revoked: BTreeMap<NodeId, Versioned<NodeRevokedRecord>>,
}

impl SpecSnapshot {
    /// Refuses a certificate of `node` issued at `issued_unix_s` if a
    /// revocation this snapshot holds covers it.
    pub fn check_revoked(&self, node: &NodeId, issued_unix_s: i64) -> crate::error::Result<()> {
        match self.revoked.get(node) {
            Some(r) => r.value.check(node, issued_unix_s),
            None => Ok(()),
        }
    }

    /// What `node` must be according to this snapshot and `vips`.
    ///
    /// Every node, with a spec or without, gets the cluster view (every
    /// node with a role, every VIP, the cluster settings); a node without a
    /// spec has no roles.
    /// The revision is [`SpecSnapshot::desired_revision`].
    pub fn desired_state(&self, node: &NodeId, vips: &VipSnapshot) -> DesiredState {
        let members = self
            .specs
            .iter()
            .filter(|(_, spec)| !spec.value.roles.is_empty())
            .map(|(id, spec)| Member {
                node: id.clone(),
                roles: spec.value.roles.clone(),
                address: self.addresses.get(id).map(|a| a.value),
            })
            .collect();
        DesiredState {
            revision: self.desired_revision(vips),
            roles: self
                .specs
                .get(node)
                .map(|s| s.value.roles.clone())
                .unwrap_or_default(),
            cluster: ClusterView {
                members,
                vips: vips.views(),
                settings: self
                    .settings
                    .as_ref()
                    .map(|s| s.value.clone())
                    .unwrap_or_default(),
            },
            tasks: Vec::new(),
            files: Vec::new(),
        }
    }

    /// The newest mod revision among the inputs of desired states: every
    /// node spec (role-less ones too, so that a node losing its last role
    /// still moves it forward), every member's address, the cluster
    /// settings, every VIP spec and the last VIP removal; 0 when there are
    /// none.
    ///
    /// It is the same for every node (each node's state holds the whole
    /// view), only grows (inputs are overwritten, never deleted; a VIP
    /// removal touches `vips/.removed`; the settings are rewritten whole),
    /// and depends on etcd's state alone, so every replica computes the
    /// same desired state.
    pub fn desired_revision(&self, vips: &VipSnapshot) -> u64 {
        let specs = self.specs.values().map(|s| s.mod_revision);
        let addresses = self
            .addresses
            .iter()
            .filter(|(id, _)| {
                self.specs
                    .get(*id)
                    .is_some_and(|s| !s.value.roles.is_empty())
            })
            .map(|(_, a)| a.mod_revision);
        let settings = self.settings.iter().map(|s| s.mod_revision);
        let newest = specs
            .chain(addresses)
            .chain(settings)
            .chain([vips.views_revision()])
            .max()
            .unwrap_or(0);
        newest.max(0) as u64
    }
}

/// A snapshot of the keys under one etcd prefix, rebuilt from a full read and
/// then kept current from the watch.
pub trait CachedPrefix: Clone + Default + Send + Sync + 'static {
    /// What the cache is of, for logs and errors.
    const WHAT: &'static str;
    /// Applies one key's new value (`None`: deleted) and its mod revision.
    /// Returns whether the snapshot changed (keys it does not cache do
    /// not wake its subscribers).
    fn apply(&mut self, keys: &Keys, key: &[u8], value: Option<(&[u8], i64)>) -> bool;
    /// The revision the snapshot is current at; `synced` once read.
    fn set_revision(&mut self, revision: i64);
}

/// Inserts or removes one cached value; whether anything changed.
fn apply_versioned<K: Ord, T: PartialEq>(
    map: &mut BTreeMap<K, Versioned<T>>,
    key: K,
    value: Option<(Result<T>, i64)>,
    what: &'static str,
) -> bool {
    match value {
        None => map.remove(&key).is_some(),
        Some((Ok(value), mod_revision)) => {
            let next = Versioned {
                value,
                mod_revision,
            };
            if map.get(&key) == Some(&next) {
                return false;
            }
            map.insert(key, next);
            true
        }
        // Keep the last good value; the coordinator never writes bad ones.
        Some((Err(error), _)) => {
            warn!(%error, what, "ignoring corrupt value");
            false
        }
    }
}

/// Sets or clears one cached value; whether anything changed.
fn apply_option<T: PartialEq>(
    slot: &mut Option<Versioned<T>>,
    value: Option<(Result<T>, i64)>,
    what: &'static str,
) -> bool {
    match value {
        None => slot.take().is_some(),
        Some((Ok(value), mod_revision)) => {
            let next = Versioned {
                value,
                mod_revision,
            };
            if slot.as_ref() == Some(&next) {
                return false;
            }
            *slot = Some(next);
            true
        }
        // Keep the last good value; the coordinator never writes bad ones.
        Some((Err(error), _)) => {
            warn!(%error, what, "ignoring corrupt value");
            false
        }
    }
}

impl CachedPrefix for SpecSnapshot {
    const WHAT: &'static str = "node specs and addresses, cluster settings";
    fn apply(&mut self, keys: &Keys, key: &[u8], value: Option<(&[u8], i64)>) -> bool {
        if key == keys.cluster_settings().as_bytes() {
            return apply_option(
                &mut self.settings,
                value.map(|(bytes, rev)| (decode::<ClusterSettings>(key, bytes), rev)),
                "cluster settings",
            );
        }
        match keys.parse_node_key(key) {
            Some((id, NodeKey::Spec)) => apply_versioned(
                &mut self.specs,
                id,
                value.map(|(bytes, rev)| (decode::<NodeSpec>(key, bytes), rev)),
                "node spec",
            ),
            Some((id, NodeKey::Address)) => apply_versioned(
                &mut self.addresses,
                id,
                value.map(|(bytes, rev)| {
                    (
                        decode::<NodeAddressRecord>(key, bytes).map(|r| r.address),
                        rev,
                    )
                }),
                "node address",
            ),
            Some((id, NodeKey::Revoked)) => apply_versioned(
                &mut self.revoked,
                id,
                value.map(|(bytes, rev)| (decode::<NodeRevokedRecord>(key, bytes), rev)),
                "node revocation",
            ),
            Some((_, NodeKey::Status | NodeKey::Converge)) | None => false,
        }
    }
    fn set_revision(&mut self, revision: i64) {
        self.revision = self.revision.max(revision);
        self.synced = true;
    }
}

/// Follows node specs and addresses (`nodes/`) and the cluster settings
/// (`cluster/`) until `shutdown`.
pub async fn run_spec_cache(
    store: Store,
    publish: watch::Sender<Arc<SpecSnapshot>>,
    shutdown: CancellationToken,
) {
    let prefixes = vec![store.keys().nodes(), store.keys().cluster()];
    run_prefixes_cache(store, prefixes, publish, shutdown).await
}

/// Follows everything under `prefix` until `shutdown`: read, watch from the
/// read revision + 1, and after a compaction or a broken stream read again
/// (with jittered backoff). The last snapshot stays published meanwhile.
pub async fn run_prefix_cache<S: CachedPrefix>(
    store: Store,
    prefix: String,
    publish: watch::Sender<Arc<S>>,
    shutdown: CancellationToken,
) {
    run_prefixes_cache(store, vec![prefix], publish, shutdown).await
}

/// [`run_prefix_cache`] over several prefixes: one snapshot, read from all
/// of them at one revision and kept current from one watch stream.
pub async fn run_prefixes_cache<S: CachedPrefix>(
    store: Store,
    prefixes: Vec<String>,
    publish: watch::Sender<Arc<S>>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(3));
    loop {
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = follow(&store, &prefixes, &publish, &mut backoff) => r,
        };
        if let Err(error) = result {
            warn!(%error, what = S::WHAT, "watch interrupted; re-reading");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

/// One read + watch cycle. Returns when the watch must be re-established.
async fn follow<S: CachedPrefix>(
    store: &Store,
    prefixes: &[String],
    publish: &watch::Sender<Arc<S>>,
    backoff: &mut Backoff,
) -> Result<()> {
    let keys = store.keys();
    // Every prefix read at the same revision.
    let read = store.read_prefixes(prefixes).await?;
    let mut snapshot = S::default();
    for kv in &read.kvs {
        snapshot.apply(keys, &kv.key, Some((&kv.value, kv.mod_revision)));
    }
    snapshot.set_revision(read.revision);
    publish.send_replace(Arc::new(snapshot.clone()));

    let mut stream = store.watch(prefixes, read.revision + 1).await?;
    backoff.reset();
    debug!(revision = read.revision, what = S::WHAT, "following");
    while let Some(changes) = stream.next().await? {
        let mut changed = false;
        for change in &changes {
            let value = match change {
                Change::Put(kv) => Some((kv.value.as_slice(), kv.mod_revision)),
                Change::Delete { .. } => None,
            };
            changed |= snapshot.apply(keys, change.key(), value);
            snapshot.set_revision(change.revision());
        }
        if changed {
            publish.send_replace(Arc::new(snapshot.clone()));
        }
    }
    Err(Error::WatchInterrupted("stream ended".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{encode, NodeStatusRecord, VipRemovedRecord};
    use steward_proto::domain::{Facts, Health, NodeHealth, Role};
    use steward_proto::vip::VipSpec;

    fn node(id: &str) -> NodeId {
        NodeId::new(id).unwrap()
    }

    struct Fixture {
        keys: Keys,
        specs: SpecSnapshot,
        vips: VipSnapshot,
    }

    impl Fixture {
        fn new() -> Self {
            Self {
                keys: Keys::new("t"),
                specs: SpecSnapshot::default(),
                vips: VipSnapshot::default(),
            }
        }
        fn roles(&mut self, id: &str, roles: &[Role], rev: i64) -> bool {
            let spec = NodeSpec {
                roles: roles.iter().copied().collect(),
                ..Default::default()
            };
            let key = self.keys.node_spec(&node(id));
            self.specs
                .apply(&self.keys, key.as_bytes(), Some((&encode(&spec), rev)))
        }
        fn address(&mut self, id: &str, address: &str, rev: i64) -> bool {
            let record = NodeAddressRecord {
                address: address.parse().unwrap(),
            };
            let key = self.keys.node_address(&node(id));
            self.specs
                .apply(&self.keys, key.as_bytes(), Some((&encode(&record), rev)))
        }
        fn vip(&mut self, name: &str, address: &str, rev: i64) {
            let spec = VipSpec {
                name: name.into(),
                address: address.into(),
                interface: None,
                check: Default::default(),
                candidates: vec![],
                priority: Default::default(),
                preempt: false,
            };
            let key = self.keys.vip_spec(name);
            self.vips
                .apply(&self.keys, key.as_bytes(), Some((&encode(&spec), rev)));
        }
        fn remove_vip(&mut self, name: &str, rev: i64) {
            let key = self.keys.vip_spec(name);
            self.vips.apply(&self.keys, key.as_bytes(), None);
            let record = VipRemovedRecord { name: name.into() };
            let key = self.keys.vips_removed();
            self.vips
                .apply(&self.keys, key.as_bytes(), Some((&encode(&record), rev)));
        }
        fn desired(&self, id: &str) -> DesiredState {
            self.specs.desired_state(&node(id), &self.vips)
        }
    }

    #[test]
    fn every_node_gets_the_cluster_view_at_the_newest_input() {
        let mut f = Fixture::new();
        assert_eq!(f.desired("lb-1"), DesiredState::default());
        // An address alone (a node without roles) is no input.
        assert!(f.address("lb-1", "198.18.0.11", 3));
        assert_eq!(f.desired("lb-1").revision, 0);
        f.roles("lb-1", &[Role::Lb], 4);
        f.roles("lb-2", &[Role::Lb], 5);
        f.roles("cp-1", &[Role::K8sControlPlane], 6);
        f.address("cp-1", "198.18.0.21", 7);
        f.vip("front", "198.18.0.100/24", 8);

        let desired = f.desired("lb-1");
        assert_eq!(desired.revision, 8);
        assert_eq!(desired.roles, [Role::Lb].into());
        let members: Vec<_> = desired
            .cluster
            .members
            .iter()
            .map(|m| (m.node.as_str(), m.address.map(|a| a.to_string())))
            .collect();
        assert_eq!(
            members,
            [
                ("cp-1", Some("198.18.0.21".into())),
                ("lb-1", Some("198.18.0.11".into())),
                ("lb-2", None),
            ]
        );
        assert_eq!(desired.cluster.vips.len(), 1);
        assert_eq!(desired.cluster.vips[0].prefix, 24);
        // Everyone sees the same view; a node without spec has no roles.
        assert_eq!(f.desired("cp-1").cluster, desired.cluster);
        let outsider = f.desired("new-1");
        assert_eq!(outsider.revision, 8);
        assert!(outsider.roles.is_empty());
        assert_eq!(outsider.cluster, desired.cluster);

        // A member's new address is a new input.
        assert!(f.address("lb-2", "198.18.0.12", 9));
        assert_eq!(f.desired("lb-1").revision, 9);
    }

    #[test]
    fn the_revision_grows_when_members_and_vips_go_away() {
        let mut f = Fixture::new();
        f.roles("lb-1", &[Role::Lb], 4);
        f.roles("lb-2", &[Role::Lb], 5);
        f.address("lb-2", "198.18.0.12", 6);
        f.vip("front", "198.18.0.100/24", 7);
        assert_eq!(f.desired("lb-1").revision, 7);
        // lb-2 loses its last role: gone from the view, revision moves on.
        f.roles("lb-2", &[], 10);
        let d = f.desired("lb-1");
        assert_eq!(d.revision, 10);
        assert_eq!(d.cluster.members.len(), 1);
        f.remove_vip("front", 12);
        let d = f.desired("lb-1");
        assert_eq!(d.revision, 12);
        assert!(d.cluster.vips.is_empty());
    }

    #[test]
    fn the_cluster_settings_are_in_every_view_and_move_the_revision() {
        use steward_proto::converge::{ClusterSettings, GlusterVolume};
        let mut f = Fixture::new();
        f.roles("lb-1", &[Role::Lb], 4);
        assert_eq!(
            f.desired("lb-1").cluster.settings,
            ClusterSettings::default()
        );
        let settings = ClusterSettings {
            gluster_volumes: vec![GlusterVolume {
                name: "data".into(),
                replica: 3,
                mount_on: Default::default(),
            }],
            ..Default::default()
        };
        let key = f.keys.cluster_settings();
        assert!(f
            .specs
            .apply(&f.keys, key.as_bytes(), Some((&encode(&settings), 9))));
        // The same value again (a re-read) is no change.
        assert!(!f
            .specs
            .apply(&f.keys, key.as_bytes(), Some((&encode(&settings), 9))));
        for node in ["lb-1", "new-1"] {
            let d = f.desired(node);
            assert_eq!(d.cluster.settings, settings);
            assert_eq!(d.revision, 9);
        }
        // A newer node spec still wins; a corrupt value keeps the last good one.
        f.roles("lb-2", &[Role::Lb], 11);
        assert_eq!(f.desired("lb-1").revision, 11);
        assert!(!f.specs.apply(&f.keys, key.as_bytes(), Some((b"{", 12))));
        assert_eq!(f.desired("lb-1").cluster.settings, settings);
        // Other keys under cluster/ are not settings.
        let other = format!("{}other", f.keys.cluster());
        assert!(!f.specs.apply(&f.keys, other.as_bytes(), Some((b"{}", 13))));
    }

    #[test]
    fn status_and_converge_writes_do_not_wake_sessions() {
        let mut f = Fixture::new();
        assert!(f.roles("lb-1", &[Role::Lb], 4));
        // The same value again (a re-read) is no change.
        assert!(!f.roles("lb-1", &[Role::Lb], 4));
        let status = NodeStatusRecord {
            facts: Facts::default(),
            health: NodeHealth::Healthy,
            last_health: Health::default(),
            replica: None,
            last_seen_unix_ms: 0,
            applied_revision: 4,
            agent_version: String::new(),
        };
        let id = node("lb-1");
        for key in [f.keys.node_status(&id), f.keys.node_converge(&id)] {
            assert!(!f
                .specs
                .apply(&f.keys, key.as_bytes(), Some((&encode(&status), 5))));
        }
        assert!(f.address("lb-1", "10.0.0.1", 6));
        assert!(f
            .specs
            .apply(&f.keys, f.keys.node_address(&id).as_bytes(), None));
    }
}
