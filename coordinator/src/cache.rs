//! The replica's watch caches of etcd prefixes (node specs, VIPs): read once,
//! then follow the etcd watch from the read revision + 1; after a compaction
//! or a broken stream, read again. Sessions subscribe to push changes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use steward_proto::backoff::Backoff;
use steward_proto::domain::{DesiredState, NodeId, NodeSpec};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::error::{Error, Result};
use crate::store::{decode, Keys, NodeKey, Versioned};

/// All node specs as of one etcd revision.
#[derive(Debug, Clone, Default)]
pub struct SpecSnapshot {
    pub revision: i64,
    /// False until the first read succeeded.
    pub synced: bool,
    pub specs: BTreeMap<NodeId, Versioned<NodeSpec>>,
}

impl SpecSnapshot {
    /// What `node` must be according to this snapshot.
    pub fn desired_state(&self, node: &NodeId) -> DesiredState {
        match self.specs.get(node) {
            Some(v) => DesiredState {
                revision: v.mod_revision as u64,
                roles: v.value.roles.clone(),
            },
            None => DesiredState::default(),
        }
    }
}

/// A snapshot of the keys under one etcd prefix, rebuilt from a full read and
/// then kept current from the watch.
pub trait CachedPrefix: Clone + Default + Send + Sync + 'static {
    /// What the cache is of, for logs and errors.
    const WHAT: &'static str;
    /// Applies one key's new value (`None`: deleted) and its mod revision.
    fn apply(&mut self, keys: &Keys, key: &[u8], value: Option<(&[u8], i64)>);
    /// The revision the snapshot is current at; `synced` once read.
    fn set_revision(&mut self, revision: i64);
}

impl CachedPrefix for SpecSnapshot {
    const WHAT: &'static str = "node specs";
    fn apply(&mut self, keys: &Keys, key: &[u8], value: Option<(&[u8], i64)>) {
        let Some((id, NodeKey::Spec)) = keys.parse_node_key(key) else {
            return;
        };
        match value {
            None => {
                self.specs.remove(&id);
            }
            Some((bytes, mod_revision)) => match decode::<NodeSpec>(key, bytes) {
                Ok(value) => {
                    self.specs.insert(
                        id,
                        Versioned {
                            value,
                            mod_revision,
                        },
                    );
                }
                // Keep the last good spec; the admin API never writes bad ones.
                Err(error) => warn!(%error, "ignoring corrupt node spec"),
            },
        }
    }
    fn set_revision(&mut self, revision: i64) {
        self.revision = self.revision.max(revision);
        self.synced = true;
    }
}

/// Follows node specs until `shutdown`.
pub async fn run_spec_cache(
    client: Client,
    keys: Keys,
    publish: watch::Sender<Arc<SpecSnapshot>>,
    shutdown: CancellationToken,
) {
    let prefix = keys.nodes();
    run_prefix_cache(client, keys, prefix, publish, shutdown).await
}

/// Follows everything under `prefix` until `shutdown`: read, watch from the
/// read revision + 1, and after a compaction or a broken stream read again
/// (with jittered backoff). The last snapshot stays published meanwhile.
pub async fn run_prefix_cache<S: CachedPrefix>(
    client: Client,
    keys: Keys,
    prefix: String,
    publish: watch::Sender<Arc<S>>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(3));
    loop {
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = follow(&client, &keys, &prefix, &publish, &mut backoff) => r,
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
    client: &Client,
    keys: &Keys,
    prefix: &str,
    publish: &watch::Sender<Arc<S>>,
    backoff: &mut Backoff,
) -> Result<()> {
    let resp = client
        .kv_client()
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await
        .map_err(Error::etcd("read prefix"))?;
    let revision = resp.header().map(|h| h.revision()).unwrap_or_default();
    let mut snapshot = S::default();
    for kv in resp.kvs() {
        snapshot.apply(keys, kv.key(), Some((kv.value(), kv.mod_revision())));
    }
    snapshot.set_revision(revision);
    publish.send_replace(Arc::new(snapshot.clone()));

    let mut stream = client
        .watch_client()
        .watch(
            prefix,
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1)
                    .with_progress_notify(),
            ),
        )
        .await
        .map_err(Error::etcd("watch prefix"))?;
    backoff.reset();
    debug!(revision, what = S::WHAT, "following");
    while let Some(resp) = stream
        .message()
        .await
        .map_err(Error::etcd("watch prefix"))?
    {
        if resp.canceled() || resp.compact_revision() > 0 {
            return Err(Error::WatchInterrupted(format!(
                "watch canceled (compacted at {}): {}",
                resp.compact_revision(),
                resp.cancel_reason()
            )));
        }
        let mut changed = false;
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            let value = match event.event_type() {
                EventType::Put => Some((kv.value(), kv.mod_revision())),
                EventType::Delete => None,
            };
            snapshot.apply(keys, kv.key(), value);
            snapshot.set_revision(kv.mod_revision());
            changed = true;
        }
        if changed {
            publish.send_replace(Arc::new(snapshot.clone()));
        }
    }
    Err(Error::WatchInterrupted("stream ended".into()))
}
