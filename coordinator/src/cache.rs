//! The replica's watch cache of node specs: read once, then follow the etcd
//! watch from the read revision + 1; after a compaction or a broken stream,
//! read again. Sessions subscribe to it to push desired state.

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

pub async fn run_spec_cache(
    client: Client,
    keys: Keys,
    publish: watch::Sender<Arc<SpecSnapshot>>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(3));
    loop {
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = follow(&client, &keys, &publish, &mut backoff) => r,
        };
        if let Err(error) = result {
            warn!(%error, "spec watch interrupted; re-reading");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

fn apply(
    keys: &Keys,
    specs: &mut BTreeMap<NodeId, Versioned<NodeSpec>>,
    key: &[u8],
    value: Option<(&[u8], i64)>,
) {
    let Some((id, NodeKey::Spec)) = keys.parse_node_key(key) else {
        return;
    };
    match value {
        None => {
            specs.remove(&id);
        }
        Some((bytes, mod_revision)) => match decode::<NodeSpec>(key, bytes) {
            Ok(value) => {
                specs.insert(
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

/// One read + watch cycle. Returns when the watch must be re-established.
async fn follow(
    client: &Client,
    keys: &Keys,
    publish: &watch::Sender<Arc<SpecSnapshot>>,
    backoff: &mut Backoff,
) -> Result<()> {
    let resp = client
        .kv_client()
        .get(keys.nodes(), Some(GetOptions::new().with_prefix()))
        .await
        .map_err(Error::etcd("read specs"))?;
    let revision = resp.header().map(|h| h.revision()).unwrap_or_default();
    let mut specs = BTreeMap::new();
    for kv in resp.kvs() {
        apply(
            keys,
            &mut specs,
            kv.key(),
            Some((kv.value(), kv.mod_revision())),
        );
    }
    let mut snapshot = SpecSnapshot {
        revision,
        synced: true,
        specs,
    };
    publish.send_replace(Arc::new(snapshot.clone()));

    let mut stream = client
        .watch_client()
        .watch(
            keys.nodes(),
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1)
                    .with_progress_notify(),
            ),
        )
        .await
        .map_err(Error::etcd("watch specs"))?;
    backoff.reset();
    debug!(revision, "following node specs");
    while let Some(resp) = stream.message().await.map_err(Error::etcd("watch specs"))? {
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
            apply(keys, &mut snapshot.specs, kv.key(), value);
            snapshot.revision = snapshot.revision.max(kv.mod_revision());
            changed = true;
        }
        if changed {
            publish.send_replace(Arc::new(snapshot.clone()));
        }
    }
    Err(Error::WatchInterrupted("stream ended".into()))
}
