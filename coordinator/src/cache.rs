//! The replica's watch caches of etcd prefixes (node specs and addresses
//! with the cluster settings, VIPs, orchestration), one [`Cut`]: read once,
//! then follow one etcd watch from the read revision + 1; after a
//! compaction or a broken stream, read again. Sessions subscribe to push
//! changes.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use steward_proto::converge::{ClusterSettings, ClusterView};
use steward_proto::domain::{CertName, DesiredState, NodeId, NodeSpec, RevocableKind, Role};
use steward_runtime::backoff::Backoff;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::error::{Error, Result};
use crate::orchestrate::state::OrchestrationSnapshot;
use crate::store::kv::Change;
use crate::store::{
    decode, CertRevokedRecord, Keys, MaintenanceRecord, Marker, NodeAddressRecord, NodeKey,
    NodeRevokedRecord, Store, Versioned,
};
use crate::vip::VipSnapshot;

/// The label that names a node's failure domain (DESIGN.md §7).
pub const ZONE_LABEL: &str = "zone";

/// A per-node map of a snapshot, shared between the snapshots published
/// one after another: a change copies only the maps it touches (the
/// others stay shared, so publishing a snapshot does not copy 10,000
/// specs because one address changed), and the fan-out skips comparing
/// maps that are still the same allocation.
pub type Shared<K, V> = Arc<BTreeMap<K, V>>;

/// All node specs and addresses, and the cluster settings, as of one etcd
/// revision.
#[derive(Debug, Clone, Default)]
pub struct SpecSnapshot {
    pub revision: i64,
    /// False until the first read succeeded.
    pub synced: bool,
    pub specs: Shared<NodeId, Versioned<NodeSpec>>,
    /// Where the cluster reaches each node (`nodes/<id>/address`).
    pub addresses: Shared<NodeId, Versioned<IpAddr>>,
    /// `cluster/settings`; `None` until a `stewardctl apply` wrote it.
    pub settings: Option<Versioned<ClusterSettings>>,
    /// Certificate revocations (`nodes/<id>/revoked`), which end live
    /// sessions and lease streams. Not an input of desired states.
    pub revoked: Shared<NodeId, Versioned<NodeRevokedRecord>>,
    /// Admin and coordinator certificate revocations
    /// (`cluster/revoked/<kind>/<name>`), checked on every admin and peer
    /// call. Not an input of desired states.
    pub cert_revoked: Shared<(RevocableKind, CertName), Versioned<CertRevokedRecord>>,
    /// Maintenance records (`nodes/<id>/maintenance`), active or not.
    pub maintenance: Shared<NodeId, Versioned<MaintenanceRecord>>,
    /// The last reboot asked of each node (`nodes/<id>/reboot`): an input
    /// of its desired state.
    pub reboots: Shared<NodeId, Versioned<crate::store::RebootRecord>>,
    /// The nodes whose facts say they need a reboot
    /// (`nodes/<id>/reboot-required`, kept in step with the facts by the
    /// sessions): what reboot selection starts from. Not an input of
    /// desired states.
    pub reboot_required: Shared<NodeId, Versioned<crate::store::RebootRequiredRecord>>,
    /// When a node last lost each role (`cluster/departed/<role>`).
    pub departed: BTreeMap<Role, i64>,
    /// When each section of the settings last changed
    /// (`cluster/changed/<section>`).
    pub sections: BTreeMap<crate::desired::Section, i64>,
    /// Every rollout (`cluster/rollouts/<id>/`), by id: the leader drives
    /// the active one, and a node it changed takes its target settings.
    pub rollouts: BTreeMap<String, crate::rollout::model::RolloutEntry>,
}

impl SpecSnapshot {
    /// The rollout target `node` has: the newest rollout that changed it
    /// after the cluster settings were last written (a finished rollout
    /// writes its target as the settings, which then win), with the
    /// rollout's id and the revision of the change (an input of the node's
    /// desired state, so its revision only grows).
    pub fn rollout_target(&self, node: &NodeId) -> Option<(&str, &ClusterSettings, i64)> {
        let settings_rev = self.settings.as_ref().map_or(0, |s| s.mod_revision);
        self.rollouts
            .iter()
            .filter_map(|(id, r)| {
                let rev = *r.changed.get(node)?;
                let spec = r.spec.as_ref()?;
                Some((id.as_str(), &spec.value.target, rev))
            })
            .filter(|(_, _, rev)| *rev > settings_rev)
            .max_by_key(|(_, _, rev)| *rev)
    }

    /// The targets of rollouts some node still plans from (it was changed
    /// after the settings were last written: an aborted rollout).
    pub fn targets_in_effect(&self) -> Vec<&ClusterSettings> {
        let settings_rev = self.settings.as_ref().map_or(0, |s| s.mod_revision);
        self.rollouts
            .values()
            .filter(|r| r.changed.values().any(|rev| *rev > settings_rev))
            .filter_map(|r| Some(&r.spec.as_ref()?.value.target))
            .collect()
    }

    /// The cluster settings `node` plans from: a rollout's target
    /// ([`SpecSnapshot::rollout_target`]) or the cluster's.
    pub fn settings_for(&self, node: &NodeId) -> Option<&ClusterSettings> {
        match self.rollout_target(node) {
            Some((_, target, _)) => Some(target),
            None => self.settings.as_ref().map(|s| &s.value),
        }
    }

    /// The rollout that holds the cluster, if any.
    pub fn active_rollout(&self) -> Option<(&str, &crate::rollout::model::RolloutEntry)> {
        self.rollouts
            .iter()
            .rev()
            .find(|(_, r)| r.active())
            .map(|(id, r)| (id.as_str(), r))
    }

    /// Whether `node` is out of service.
    pub fn in_maintenance(&self, node: &NodeId) -> bool {
        self.maintenance.get(node).is_some_and(|m| m.value.active)
    }

    /// Each node's failure domain: its `zone` label, if it has one.
    pub fn zones(&self) -> BTreeMap<NodeId, String> {
        self.specs
            .iter()
            .filter_map(|(id, s)| Some((id.clone(), s.value.labels.get(ZONE_LABEL)?.clone())))
            .collect()
    }

    /// The nodes out of service.
    pub fn maintenance_set(&self) -> std::collections::BTreeSet<NodeId> {
        self.maintenance
            .iter()
            .filter(|(_, m)| m.value.active)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Refuses a certificate of `node` issued at `issued_unix_s` if a
    /// revocation this snapshot holds covers it.
    pub fn check_revoked(&self, node: &NodeId, issued_unix_s: i64) -> crate::error::Result<()> {
        match self.revoked.get(node) {
            Some(r) => r.value.check(node, issued_unix_s),
            None => Ok(()),
        }
    }

    /// Refuses a `kind` certificate of `name` issued at `issued_unix_s` if
    /// a revocation this snapshot holds covers it. A name that is not a
    /// valid certificate name was never issued by the pki, and no
    /// revocation can name it: nothing to refuse here.
    pub fn check_cert_revoked(
        &self,
        kind: RevocableKind,
        name: &str,
        issued_unix_s: i64,
    ) -> crate::error::Result<()> {
        let Ok(name) = CertName::new(name) else {
            return Ok(());
        };
        let key = (kind, name);
        match self.cert_revoked.get(&key) {
            Some(r) => r.value.check(kind, &key.1, issued_unix_s),
            None => Ok(()),
        }
    }

    /// What `node` must be according to this snapshot and `vips` (before
    /// orchestration steps): its roles and the slice of the cluster they
    /// consume, at that slice's revision ([`crate::desired`]). Sessions
    /// share slices through [`crate::desired::ViewCache`]; this computes
    /// one afresh.
    pub fn desired_state(&self, node: &NodeId, vips: &VipSnapshot) -> DesiredState {
        let roles = self
            .specs
            .get(node)
            .map(|s| s.value.roles.clone())
            .unwrap_or_default();
        let target = self.rollout_target(node);
        let interest = crate::desired::Interest::for_node(&roles, self.settings_for(node));
        let view = crate::desired::project_with(self, vips, &interest, target.map(|t| t.1));
        let mut desired = crate::desired::desired_base(self, &view, node);
        desired.revision = desired
            .revision
            .max(target.map_or(0, |t| t.2.max(0) as u64));
        desired
    }

    /// The whole cluster view: every node with a role, every VIP, all the
    /// settings (what the leader orchestrates from).
    pub fn full_view(&self, vips: &VipSnapshot) -> ClusterView {
        let everything = crate::desired::Interest {
            member_roles: Role::ALL.into_iter().collect(),
            vips: true,
            sections: crate::desired::Section::ALL.into_iter().collect(),
        };
        crate::desired::project(self, vips, &everything).view
    }
}

/// A snapshot of the keys under one etcd prefix (a part of the [`Cut`]),
/// rebuilt from a full read and then kept current from the watch.
pub trait CachedPrefix: Clone + Default + Send + Sync + 'static {
    /// Applies one key's new value (`None`: deleted) and its mod revision.
    /// Returns whether the snapshot changed (keys it does not cache do
    /// not wake its subscribers).
    fn apply(&mut self, keys: &Keys, key: &[u8], value: Option<(&[u8], i64)>) -> bool;
    /// The revision the snapshot is current at; `synced` once read.
    fn set_revision(&mut self, revision: i64);
    /// Applies one change the watch delivered at `revision` (see
    /// [`CachedPrefix::apply`]).
    fn apply_change(
        &mut self,
        keys: &Keys,
        key: &[u8],
        value: Option<(&[u8], i64)>,
        revision: i64,
    ) -> bool {
        let changed = self.apply(keys, key, value);
        self.set_revision(revision);
        changed
    }
}

/// Inserts or removes one cached value; whether anything changed. The map
/// is copied (if a published snapshot still shares it) only for a change.
fn apply_versioned<K: Ord + Clone, T: PartialEq + Clone>(
    map: &mut Shared<K, Versioned<T>>,
    key: K,
    value: Option<(Result<T>, i64)>,
    what: &'static str,
) -> bool {
    match value {
        None => map.contains_key(&key) && Arc::make_mut(map).remove(&key).is_some(),
        Some((Ok(value), mod_revision)) => {
            let next = Versioned {
                value,
                mod_revision,
            };
            if map.get(&key) == Some(&next) {
                return false;
            }
            Arc::make_mut(map).insert(key, next);
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
    fn apply(&mut self, keys: &Keys, key: &[u8], value: Option<(&[u8], i64)>) -> bool {
        if key == keys.cluster_settings().as_bytes() {
            return apply_option(
                &mut self.settings,
                value.map(|(bytes, rev)| (decode::<ClusterSettings>(key, bytes), rev)),
                "cluster settings",
            );
        }
        if let Some(id) = keys.parse_cert_revoked(key) {
            return apply_versioned(
                &mut self.cert_revoked,
                id,
                value.map(|(bytes, rev)| (decode::<CertRevokedRecord>(key, bytes), rev)),
                "certificate revocation",
            );
        }
        if let Some((id, rollout_key)) = keys.parse_rollout_key(key) {
            let entry = self.rollouts.entry(id.clone()).or_default();
            let changed = entry.apply(key, rollout_key, value);
            if entry.is_empty() {
                self.rollouts.remove(&id);
            }
            return changed;
        }
        if let Some(marker) = keys.parse_marker(key) {
            let rev = value.map_or(0, |(_, rev)| rev);
            let slot = match marker {
                Marker::Departed(role) => self.departed.entry(role).or_default(),
                Marker::Changed(section) => self.sections.entry(section).or_default(),
            };
            let changed = *slot != rev;
            *slot = rev;
            return changed;
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
            Some((id, NodeKey::Maintenance)) => apply_versioned(
                &mut self.maintenance,
                id,
                value.map(|(bytes, rev)| (decode::<MaintenanceRecord>(key, bytes), rev)),
                "node maintenance",
            ),
            Some((id, NodeKey::Reboot)) => apply_versioned(
                &mut self.reboots,
                id,
                value.map(|(bytes, rev)| (decode::<crate::store::RebootRecord>(key, bytes), rev)),
                "node reboot",
            ),
            Some((id, NodeKey::RebootRequired)) => apply_versioned(
                &mut self.reboot_required,
                id,
                value.map(|(bytes, rev)| {
                    (
                        decode::<crate::store::RebootRequiredRecord>(key, bytes),
                        rev,
                    )
                }),
                "reboot-required marker",
            ),
            Some((_, NodeKey::Status | NodeKey::Gluster)) | None => false,
        }
    }
    fn set_revision(&mut self, revision: i64) {
        self.revision = self.revision.max(revision);
        self.synced = true;
    }
}

/// The caches a desired state is built from, published together as of one
/// etcd revision: node specs and addresses with the cluster settings, VIPs,
/// and orchestration.
///
/// A desired state's revision is the newest of its inputs
/// (`crate::desired`), which lie in all three. Followed on three watches,
/// one cache could publish a transaction the others had not yet seen: a
/// session that read the new orchestration record of a volume's brick
/// replacement next to the spec of a node that had just left the bricks
/// gave that node a state at the record's revision, built from its old
/// roles. Its true state was older, so its agent refused it as a rollback
/// (it stayed a brick). One watch of the whole cluster prefix delivers
/// every change in revision order, and one publication holds all three.
#[derive(Debug, Clone, Default)]
pub struct Cut {
    pub specs: Arc<SpecSnapshot>,
    pub vips: Arc<VipSnapshot>,
    pub orchestration: Arc<OrchestrationSnapshot>,
}

impl Cut {
    /// How often a new cut is published at most. Each publication wakes
    /// the subscribers, which compare it with the one before across the
    /// fleet: a cold start's 10,000 first addresses are a few hundred
    /// publications, not 10,000. A change after a quiet spell is never
    /// delayed, nor is VIP state ([`Cut::urgent`]).
    pub const PUBLISH_EVERY: Duration = Duration::from_millis(50);

    /// What is read, at one revision (the watch follows the whole cluster
    /// prefix, [`Keys::root`]).
    fn prefixes(keys: &Keys) -> Vec<String> {
        vec![
            keys.nodes(),
            keys.cluster(),
            keys.vips(),
            keys.orchestration(),
        ]
    }

    /// Whether a change of `key` is published at once: VIP state is never
    /// held back, a failover never waits.
    fn urgent(keys: &Keys, key: &[u8]) -> bool {
        matches!(part_of(keys, key), Some(Part::Vips))
    }

    /// Whether every part has read etcd (an empty snapshot is not a state).
    pub fn synced(&self) -> bool {
        self.specs.synced && self.vips.synced && self.orchestration.synced
    }

    fn apply_to_part(
        &mut self,
        keys: &Keys,
        key: &[u8],
        value: Option<(&[u8], i64)>,
        revision: Option<i64>,
    ) -> bool {
        match part_of(keys, key) {
            Some(Part::Specs) => apply_part(&mut self.specs, keys, key, value, revision),
            Some(Part::Vips) => apply_part(&mut self.vips, keys, key, value, revision),
            Some(Part::Orchestration) => {
                apply_part(&mut self.orchestration, keys, key, value, revision)
            }
            None => false,
        }
    }
}

/// Applies one key to `part`, copying it first if a published cut still
/// shares it; a key that changes nothing (a node's status, under `nodes/`)
/// leaves the shared part in place, so the part's subscribers are not
/// woken for it.
fn apply_part<T: CachedPrefix>(
    part: &mut Arc<T>,
    keys: &Keys,
    key: &[u8],
    value: Option<(&[u8], i64)>,
    revision: Option<i64>,
) -> bool {
    let shared = (Arc::strong_count(part) > 1).then(|| part.clone());
    let unique = Arc::make_mut(part);
    let changed = match revision {
        Some(revision) => unique.apply_change(keys, key, value, revision),
        None => unique.apply(keys, key, value),
    };
    if let (false, Some(shared)) = (changed, shared) {
        *part = shared;
    }
    changed
}

/// Which part of a [`Cut`] a key belongs to.
enum Part {
    Specs,
    Vips,
    Orchestration,
}

fn part_of(keys: &Keys, key: &[u8]) -> Option<Part> {
    let under = |prefix: String| key.starts_with(prefix.as_bytes());
    if under(keys.nodes()) || under(keys.cluster()) {
        Some(Part::Specs)
    } else if under(keys.vips()) {
        Some(Part::Vips)
    } else if under(keys.orchestration()) {
        Some(Part::Orchestration)
    } else {
        None
    }
}

impl CachedPrefix for Cut {
    fn apply(&mut self, keys: &Keys, key: &[u8], value: Option<(&[u8], i64)>) -> bool {
        self.apply_to_part(keys, key, value, None)
    }

    fn apply_change(
        &mut self,
        keys: &Keys,
        key: &[u8],
        value: Option<(&[u8], i64)>,
        revision: i64,
    ) -> bool {
        // Each part is current at the last change of its own keys, as when
        // each had its own watch.
        self.apply_to_part(keys, key, value, Some(revision))
    }

    fn set_revision(&mut self, revision: i64) {
        Arc::make_mut(&mut self.specs).set_revision(revision);
        Arc::make_mut(&mut self.vips).set_revision(revision);
        Arc::make_mut(&mut self.orchestration).set_revision(revision);
    }
}

/// Where the caches are published: each part on its own channel (most
/// readers need one), and the [`Cut`] for the readers that combine them.
pub struct CutSenders {
    pub cut: watch::Sender<Arc<Cut>>,
    pub specs: watch::Sender<Arc<SpecSnapshot>>,
    pub vips: watch::Sender<Arc<VipSnapshot>>,
    pub orchestration: watch::Sender<Arc<OrchestrationSnapshot>>,
}

impl CutSenders {
    fn publish(&self, cut: Arc<Cut>) {
        // A part's subscribers are woken only when it changed; the cut goes
        // last, so that whoever it wakes finds every part as new.
        fn send<T>(tx: &watch::Sender<Arc<T>>, part: &Arc<T>) {
            tx.send_if_modified(|held| {
                let changed = !Arc::ptr_eq(held, part);
                if changed {
                    *held = part.clone();
                }
                changed
            });
        }
        send(&self.specs, &cut.specs);
        send(&self.vips, &cut.vips);
        send(&self.orchestration, &cut.orchestration);
        self.cut.send_replace(cut);
    }
}

/// How long [`caught_up`] waits for the spec cache to reach a barrier.
const CATCH_UP: Duration = Duration::from_secs(10);

/// This replica's spec snapshot, as fresh as a linearizable read of
/// `nodes/` (an operator sees their own last write, made through any
/// replica): writes a read barrier ([`Store::sync_point`]) and waits until
/// the snapshot includes it. One small write and no read of the fleet;
/// [`Error::CacheBehind`] if the cache does not get there in time.
pub async fn caught_up(
    store: &Store,
    specs: &watch::Receiver<Arc<SpecSnapshot>>,
    seen: &watch::Receiver<i64>,
) -> Result<Arc<SpecSnapshot>> {
    caught_up_within(store, specs, seen, CATCH_UP).await
}

/// [`caught_up`], waiting at most `within`.
async fn caught_up_within(
    store: &Store,
    specs: &watch::Receiver<Arc<SpecSnapshot>>,
    seen: &watch::Receiver<i64>,
    within: Duration,
) -> Result<Arc<SpecSnapshot>> {
    let revision = store.sync_point().await?;
    let mut seen = seen.clone();
    let reached = tokio::time::timeout(within, async {
        seen.wait_for(|r| *r >= revision).await.map(|_| ())
    })
    .await;
    match reached {
        Ok(Ok(_)) => Ok(specs.borrow().clone()),
        // The cache task is gone: the replica is stopping.
        Ok(Err(_)) => Err(Error::ShuttingDown),
        Err(_) => Err(Error::CacheBehind { revision, within }),
    }
}

/// Follows node specs and addresses (`nodes/`), the cluster settings
/// (`cluster/`), VIPs (`vips/`) and orchestration (`orchestration/`) until
/// `shutdown`, as one [`Cut`]: read at one revision, then kept current from
/// one watch; after a compaction or a broken stream, read again (with
/// jittered backoff). The last cut stays published meanwhile. `seen`: the
/// revision of the newest read barrier ([`Store::sync_point`]) the
/// published specs include ([`caught_up`] waits on it).
pub async fn run_caches(
    store: Store,
    publish: CutSenders,
    seen: watch::Sender<i64>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(3));
    loop {
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = follow(&store, &publish, &seen, &mut backoff) => r,
        };
        if let Err(error) = result {
            warn!(%error, "cache watch interrupted; re-reading");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

/// One read + watch cycle. Returns when the watch must be re-established.
async fn follow(
    store: &Store,
    publish: &CutSenders,
    seen: &watch::Sender<i64>,
    backoff: &mut Backoff,
) -> Result<()> {
    // Only forwards: a re-read after a broken stream is at least as new.
    let reached = |revision: i64| {
        seen.send_if_modified(|r| {
            let newer = revision > *r;
            *r = (*r).max(revision);
            newer
        });
    };
    let keys = store.keys();
    // Every prefix read at the same revision.
    let read = store.read_prefixes(&Cut::prefixes(keys)).await?;
    let mut snapshot = Cut::default();
    for kv in &read.kvs {
        snapshot.apply(keys, &kv.key, Some((&kv.value, kv.mod_revision)));
    }
    snapshot.set_revision(read.revision);
    publish.publish(Arc::new(snapshot.clone()));
    // One read at one revision: every barrier written before it is in.
    reached(read.revision);

    // The cluster's whole prefix on one watch: one revision order for every
    // part (several watches on one stream may each fall behind on their
    // own).
    let mut stream = store.watch(&[keys.root()], read.revision + 1).await?;
    backoff.reset();
    debug!(revision = read.revision, "caches following");
    // A change after a quiet spell is published at once; changes that
    // follow within `Cut::PUBLISH_EVERY` are published together at its end,
    // unless a read barrier came with them (a reader waits on it) or an
    // urgent change (VIP state).
    let mut published_at = tokio::time::Instant::now();
    let mut pending = false;
    let mut urgent = false;
    let mut barrier = 0;
    loop {
        let next = if pending {
            tokio::select! {
                next = stream.next() => Some(next?),
                _ = tokio::time::sleep_until(published_at + Cut::PUBLISH_EVERY) => None,
            }
        } else {
            Some(stream.next().await?)
        };
        match next {
            // Due: published below.
            None => {}
            Some(None) => break,
            Some(Some(changes)) => {
                for change in &changes {
                    let value = match change {
                        Change::Put(kv) => Some((kv.value.as_slice(), kv.mod_revision)),
                        Change::Delete { .. } => None,
                    };
                    let changed =
                        snapshot.apply_change(keys, change.key(), value, change.revision());
                    pending |= changed;
                    urgent |= changed && Cut::urgent(keys, change.key());
                    if keys.is_cache_sync(change.key()) {
                        barrier = barrier.max(change.revision());
                    }
                }
            }
        }
        if pending && (urgent || barrier > 0 || published_at.elapsed() >= Cut::PUBLISH_EVERY) {
            publish.publish(Arc::new(snapshot.clone()));
            published_at = tokio::time::Instant::now();
            pending = false;
            urgent = false;
        }
        // Once published: a barrier is seen when what came down the same
        // watch before it is published. (A barrier is under `nodes/`; one
        // watch delivers its prefix in revision order.)
        if !pending && barrier > 0 {
            reached(barrier);
            barrier = 0;
        }
    }
    if pending {
        publish.publish(Arc::new(snapshot.clone()));
    }
    Err(Error::WatchInterrupted("stream ended".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{encode, NodeStatusRecord, VipRemovedRecord};
    use steward_proto::domain::{Health, NodeHealth, Role};
    use steward_proto::vip::VipSpec;

    /// A cache that never reaches the read barrier is an error the caller
    /// can retry (UNAVAILABLE), not a stale answer or a hang.
    #[tokio::test]
    async fn a_cache_behind_its_barrier_is_unavailable_not_stale() {
        let replica =
            crate::testing::TestReplica::start(crate::store::MemoryBackend::new(), "c-1").await;
        let ctx = &replica.ctx;
        // A barrier channel nobody advances: the cache is stuck.
        let (_stuck, seen) = watch::channel(0);
        let within = Duration::from_millis(50);
        let error = caught_up_within(&ctx.store, &ctx.specs, &seen, within)
            .await
            .expect_err("never caught up");
        assert!(
            matches!(error, Error::CacheBehind { revision, .. } if revision > 0),
            "{error:?}"
        );
        let status = tonic::Status::from(error);
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(
            status.message().contains("did not reach etcd revision"),
            "{}",
            status.message()
        );
        // The replica's own cache does reach it.
        replica.ctx.fresh_specs().await.expect("caught up");
    }

    /// A burst of changes is published in far fewer snapshots than changes,
    /// the last with all of them; maps and parts no change touched stay
    /// shared with the snapshot before; a change after a quiet spell is
    /// published at once, and so is a VIP change inside the window.
    #[tokio::test]
    async fn bursts_are_published_together_and_untouched_maps_stay_shared() {
        let memory = Arc::new(crate::store::MemoryBackend::default());
        let store = crate::store::Store::in_memory(memory, Keys::new("t"), "r1".into());
        let (tx, mut rx) = watch::channel(Arc::new(SpecSnapshot::default()));
        let (vips_tx, mut vips) = watch::channel(Arc::new(VipSnapshot::default()));
        let (orchestration_tx, orchestration) =
            watch::channel(Arc::new(OrchestrationSnapshot::default()));
        let (cut_tx, cut) = watch::channel(Arc::new(Cut::default()));
        let senders = CutSenders {
            cut: cut_tx,
            specs: tx,
            vips: vips_tx,
            orchestration: orchestration_tx,
        };
        let shutdown = CancellationToken::new();
        let _stop = shutdown.clone().drop_guard();
        let (seen, _) = watch::channel(0);
        tokio::spawn(run_caches(store.clone(), senders, seen, shutdown));
        crate::testing::put_roles(&store, "n0", &[Role::Lb]).await;
        let synced =
            tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| s.specs.len() == 1))
                .await
                .expect("first spec published")
                .expect("cache running")
                .clone();
        tokio::time::sleep(Cut::PUBLISH_EVERY * 2).await;

        let mut publications = 0;
        let burst = 200;
        let writer = {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 1..=burst {
                    let key = store
                        .keys()
                        .node_address(&crate::testing::node(&format!("n{i}")));
                    let record = crate::store::NodeAddressRecord {
                        address: IpAddr::from([198, 18, 0, (i % 250) as u8]),
                    };
                    store
                        .txn(
                            crate::store::kv::Txn::new()
                                .and_then([crate::store::kv::Op::put(key, encode(&record))]),
                            "test",
                        )
                        .await
                        .expect("address written");
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
        };
        let last = loop {
            tokio::time::timeout(Duration::from_secs(5), rx.changed())
                .await
                .expect("a publication")
                .expect("cache running");
            publications += 1;
            let now = rx.borrow_and_update().clone();
            if now.addresses.len() == burst {
                break now;
            }
        };
        writer.await.expect("writer");
        assert!(
            publications < burst / 4,
            "{publications} publications for {burst} changes"
        );
        assert!(
            Arc::ptr_eq(&synced.specs, &last.specs),
            "the specs map was copied though no spec changed"
        );
        let last_cut = cut.borrow().clone();
        assert!(
            Arc::ptr_eq(&last_cut.specs, &last),
            "the cut holds the specs published"
        );
        assert!(
            Arc::ptr_eq(&last_cut.orchestration, &orchestration.borrow()),
            "the orchestration part was replaced though nothing of it changed"
        );

        // After a quiet spell, one change is out within a few milliseconds.
        tokio::time::sleep(Cut::PUBLISH_EVERY * 2).await;
        let started = tokio::time::Instant::now();
        crate::testing::put_roles(&store, "n1", &[Role::Lb]).await;
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| s.specs.len() == 2))
            .await
            .expect("published")
            .expect("cache running");
        assert!(
            started.elapsed() < Cut::PUBLISH_EVERY,
            "a lone change waited {:?}",
            started.elapsed()
        );

        // A VIP change right after a publication is not held back.
        vips.borrow_and_update();
        crate::testing::put_roles(&store, "n2", &[Role::Lb]).await;
        let started = tokio::time::Instant::now();
        crate::testing::put_vip(&store, &crate::testing::vip_spec("front", "198.18.0.10")).await;
        tokio::time::timeout(
            Duration::from_secs(5),
            vips.wait_for(|v| v.vips.contains_key("front")),
        )
        .await
        .expect("published")
        .expect("cache running");
        assert!(
            started.elapsed() < Cut::PUBLISH_EVERY,
            "a VIP change waited {:?}",
            started.elapsed()
        );
    }

    /// A desired state is built from one revision of every cache. A node
    /// leaves the bricks just before an orchestration record the bricks
    /// consume is written: sampled whenever a cache publishes, its desired
    /// revision never goes down (with the caches on their own watches, the
    /// record came out while the spec waited for its publication window:
    /// the node was given the record's revision with its old roles, then an
    /// older state its agent refuses as a rollback).
    #[tokio::test]
    async fn a_desired_state_never_mixes_two_revisions_of_the_caches() {
        use crate::orchestrate::state::CapacityRecord;
        use crate::store::kv::{Op, Txn};
        use crate::testing::{eventually, put_roles};
        let replica =
            crate::testing::TestReplica::start(crate::store::MemoryBackend::new(), "c-1").await;
        let ctx = replica.ctx.clone();
        let g2 = node("g2");
        put_roles(&ctx.store, "g1", &[Role::GlusterBrick]).await;
        put_roles(&ctx.store, "g2", &[Role::GlusterBrick]).await;
        eventually("g2 a brick", || {
            ctx.desired_for(&g2).filter(|d| !d.roles.is_empty())
        })
        .await;

        // Samples g2's state each time a cache publishes.
        let sampler = {
            let ctx = ctx.clone();
            let g2 = g2.clone();
            tokio::spawn(async move {
                let mut specs = ctx.specs.clone();
                let mut orchestration = ctx.orchestration.clone();
                let mut samples = Vec::new();
                loop {
                    let changed = tokio::select! {
                        c = specs.changed() => c,
                        c = orchestration.changed() => c,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => break,
                    };
                    if changed.is_err() {
                        break;
                    }
                    specs.borrow_and_update();
                    orchestration.borrow_and_update();
                    if let Some(d) = ctx.desired_for(&g2) {
                        samples.push((d.revision, d.roles.len()));
                    }
                }
                samples
            })
        };
        let capacity = ctx.store.keys().orchestration() + "gluster-capacity/data";
        for round in 0..10u64 {
            // Another node's change opens the spec cache's window, g2's
            // change waits in it, and the record comes right after.
            put_roles(&ctx.store, &format!("x{round}"), &[Role::K8sWorker]).await;
            let roles: &[Role] = if round % 2 == 0 {
                &[]
            } else {
                &[Role::GlusterBrick]
            };
            put_roles(&ctx.store, "g2", roles).await;
            let record = CapacityRecord {
                bytes: round,
                reported_by: node("g1"),
                at_unix_ms: 1,
            };
            ctx.store
                .txn(
                    Txn::new().and_then([Op::put(capacity.clone(), encode(&record))]),
                    "test",
                )
                .await
                .expect("capacity written");
            tokio::time::sleep(Cut::PUBLISH_EVERY * 2).await;
        }
        let samples = sampler.await.expect("sampler");
        assert!(samples.len() >= 10, "{samples:?}");
        for pair in samples.windows(2) {
            assert!(
                pair[1].0 >= pair[0].0,
                "g2's desired revision went from {} ({} roles) to {} ({} roles): {samples:?}",
                pair[0].0,
                pair[0].1,
                pair[1].0,
                pair[1].1
            );
        }
    }

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

    impl Fixture {
        fn touch(&mut self, key: String, rev: i64) -> bool {
            self.specs
                .apply(&self.keys, key.as_bytes(), Some((b"", rev)))
        }
        /// `id` loses every role at `rev`, with the markers the store writes.
        fn drop_roles(&mut self, id: &str, lost: &[Role], rev: i64) {
            self.roles(id, &[], rev);
            for role in lost {
                let key = self.keys.role_departed(*role);
                self.touch(key, rev);
            }
        }
        fn member_ids(&self, id: &str) -> Vec<String> {
            self.desired(id)
                .cluster
                .members
                .iter()
                .map(|m| m.node.to_string())
                .collect()
        }
        fn revisions(&self, ids: &[&str]) -> Vec<u64> {
            ids.iter().map(|id| self.desired(id).revision).collect()
        }
    }

    /// lb-1, cp-1, w-1, b-1 and a node without roles, and a VIP.
    fn fleet() -> Fixture {
        let mut f = Fixture::new();
        f.roles("lb-1", &[Role::Lb], 4);
        f.roles("cp-1", &[Role::K8sControlPlane], 5);
        f.address("cp-1", "198.18.0.21", 6);
        f.roles("w-1", &[Role::K8sWorker], 7);
        f.roles("b-1", &[Role::GlusterBrick], 8);
        f.address("idle-1", "198.18.0.99", 9);
        f.vip("front", "198.18.0.100/24", 10);
        f
    }

    const ALL: [&str; 5] = ["lb-1", "cp-1", "w-1", "b-1", "idle-1"];

    #[test]
    fn a_node_sees_only_what_its_roles_consume() {
        let f = fleet();
        assert_eq!(f.member_ids("lb-1"), ["b-1", "cp-1", "lb-1", "w-1"]);
        assert_eq!(f.member_ids("cp-1"), ["cp-1", "w-1"]);
        assert_eq!(f.member_ids("w-1"), ["b-1", "cp-1", "w-1"]);
        assert_eq!(f.member_ids("b-1"), ["b-1"]);
        let idle = f.desired("idle-1");
        assert_eq!(idle, DesiredState::default(), "no role, nothing to know");
        let lb = f.desired("lb-1");
        assert_eq!(lb.roles, [Role::Lb].into());
        assert_eq!(lb.cluster.vips.len(), 1);
        assert_eq!(lb.cluster.vips[0].prefix, 24);
        assert!(f.desired("b-1").cluster.vips.is_empty());
        let cp = &f.desired("w-1").cluster.members[1];
        assert_eq!(
            cp.address.map(|a| a.to_string()),
            Some("198.18.0.21".into())
        );
        // Each at the newest input it consumes.
        assert_eq!(f.revisions(&ALL), [10, 10, 10, 8, 0]);
    }

    #[test]
    fn a_change_moves_only_the_nodes_that_consume_it() {
        let mut f = fleet();
        let before: Vec<DesiredState> = ALL.iter().map(|id| f.desired(id)).collect();
        let unchanged = |f: &Fixture, ids: &[&str]| {
            for id in ids {
                let i = ALL.iter().position(|x| x == id).unwrap();
                assert_eq!(f.desired(id), before[i], "{id} must not change");
            }
        };
        // A new worker: the lb (backends) and the control plane see it.
        f.roles("w-2", &[Role::K8sWorker], 20);
        assert_eq!(f.revisions(&["lb-1", "cp-1", "w-2"]), [20, 20, 20]);
        unchanged(&f, &["w-1", "b-1", "idle-1"]);
        // Labels of a node without roles: nobody else.
        f.roles("idle-1", &[], 21);
        assert_eq!(f.desired("idle-1").revision, 21);
        unchanged(&f, &["w-1", "b-1"]);
        // A new brick: bricks and workers (they mount volumes), the lb.
        f.roles("b-2", &[Role::GlusterBrick], 22);
        assert_eq!(f.revisions(&["b-1", "w-1", "lb-1"]), [22, 22, 22]);
        assert_eq!(f.desired("cp-1").revision, 20);
    }

    #[test]
    fn losing_a_role_moves_its_consumers_past_the_departure() {
        let mut f = fleet();
        f.roles("w-2", &[Role::K8sWorker], 20);
        f.drop_roles("w-2", &[Role::K8sWorker], 30);
        assert_eq!(f.member_ids("cp-1"), ["cp-1", "w-1"]);
        // The members went back to what they were; the revision did not.
        assert_eq!(f.revisions(&["cp-1", "lb-1", "w-2"]), [30, 30, 30]);
        assert_eq!(f.revisions(&["w-1", "b-1"]), [10, 8]);
        // A VIP removal moves whoever had VIPs in view.
        f.remove_vip("front", 31);
        assert_eq!(
            f.revisions(&["lb-1", "cp-1", "w-1", "b-1"]),
            [31, 31, 31, 8]
        );
        assert!(f.desired("lb-1").cluster.vips.is_empty());
    }

    #[test]
    fn a_settings_section_moves_only_its_consumers() {
        use crate::desired::Section;
        use steward_proto::converge::{ClusterSettings, GlusterVolume};
        let mut f = fleet();
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
            .apply(&f.keys, key.as_bytes(), Some((&encode(&settings), 40))));
        // The same value again (a re-read) is no change.
        assert!(!f
            .specs
            .apply(&f.keys, key.as_bytes(), Some((&encode(&settings), 40))));
        for section in Section::ALL {
            let key = f.keys.settings_changed(section);
            f.touch(key, if section == Section::Gluster { 40 } else { 3 });
        }
        // Bricks serve the volume, workers mount it, the control plane
        // applies its PersistentVolume; the lb and the idle node do not care.
        assert_eq!(f.revisions(&ALL), [10, 40, 40, 40, 0]);
        assert_eq!(f.desired("b-1").cluster.settings, settings);
        assert_eq!(
            f.desired("lb-1").cluster.settings,
            ClusterSettings::default(),
            "the lb consumes frontends only"
        );
        // A corrupt value keeps the last good one; other keys under
        // cluster/ are not settings.
        assert!(!f.specs.apply(&f.keys, key.as_bytes(), Some((b"{", 41))));
        assert_eq!(f.desired("w-1").cluster.settings.gluster_volumes.len(), 1);
        let other = format!("{}other", f.keys.cluster());
        assert!(!f.specs.apply(&f.keys, other.as_bytes(), Some((b"{}", 42))));
    }

    #[test]
    fn status_and_converge_writes_do_not_wake_sessions() {
        let mut f = Fixture::new();
        assert!(f.roles("lb-1", &[Role::Lb], 4));
        // The same value again (a re-read) is no change.
        assert!(!f.roles("lb-1", &[Role::Lb], 4));
        let status = NodeStatusRecord {
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
