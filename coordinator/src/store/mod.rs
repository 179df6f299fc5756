//! Steward's state in etcd: the key layout and typed, validated access.
//!
//! Layout under `/steward/<cluster>/` (DESIGN.md §2):
//!
//! | key | writer | value |
//! |---|---|---|
//! | `coordinators/election` | election API | leader key; its create revision is the leader epoch |
//! | `coordinators/members/<id>` | each replica, on its lease | [`MemberRecord`] |
//! | `nodes/<id>/spec` | admin API | [`NodeSpec`] |
//! | `nodes/<id>/status` | the replica serving the node, on change only | [`NodeStatusRecord`] |
//! | `nodes/<id>/address` | the replica serving the node, when it differs at session open | [`NodeAddressRecord`] |
//! | `nodes/<id>/converge` | the replica serving the node, when the outcome changes | [`ConvergeReport`] |
//! | `vips/.removed` | admin API, with every VIP removal | [`VipRemovedRecord`] |
//! | `cluster/settings` | admin API (`Apply`), whole, never deleted | [`ClusterSettings`] |
//! | `orchestration/kubernetes/bootstrap` | leader | sealed CA, token, certificate key ([`crate::orchestrate::kubernetes::BootstrapRecord`]) |
//! | `orchestration/kubernetes/joined/<id>` | the replica serving the node, when its init/join reports done | `{"at_unix_ms"}` |
//! | `orchestration/kubernetes/drained/<id>` | the replica serving the remover, when its drain/delete of the leaving node reports done; both records go when the node's `kubeadm reset` reports done | `{"at_unix_ms"}` |
//! | `orchestration/gluster/<volume>` | leader | brick placement ([`crate::orchestrate::gluster::VolumeRecord`]) |
//! | `events/<ms>-<replica>-<seq>` | any replica; trimmed by the leader | [`Event`] |

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, SortOrder, SortTarget,
    TlsOptions, Txn, TxnOp,
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use steward_proto::converge::{ClusterSettings, ConvergeReport};
use steward_proto::domain::{Event, EventKind, Facts, Health, NodeHealth, NodeId, NodeSpec};

use crate::config::EtcdConfig;
use crate::error::{Error, Result};
use crate::tokens::TokenRecord;

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
    Converge,
    Revoked,
}

impl Keys {
    pub fn new(cluster: &str) -> Self {
        Self {
            prefix: format!("/steward/{cluster}/"),
        }
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
    pub fn node_converge(&self, id: &NodeId) -> String {
        format!("{}{id}/converge", self.nodes())
    }
    pub fn node_revoked(&self, id: &NodeId) -> String {
        format!("{}{id}/revoked", self.nodes())
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
    pub fn events(&self) -> String {
        format!("{}events/", self.prefix)
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
            "converge" => NodeKey::Converge,
            "revoked" => NodeKey::Revoked,
            _ => return None,
        };
        Some((NodeId::new(id).ok()?, kind))
    }
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
/// when something here changes (never per heartbeat).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatusRecord {
    pub facts: Facts,
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
        Err(Error::PermissionDenied(format!(
            "the certificates of node {node} were revoked at {} by {}; join again with a \
             token made for it (stewardctl token create --node {node}, then steward-agent \
             join ... --force on the node)",
            steward_proto::runtime::format_unix_ms(self.at_unix_ms),
            self.by
        )))
    }
}

/// `vips/.removed`: the last VIP removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipRemovedRecord {
    pub name: String,
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
    /// The last converge report whose outcome differed from the one before.
    pub converge: Option<Versioned<ConvergeReport>>,
    /// The node's last certificate revocation.
    pub revoked: Option<Versioned<NodeRevokedRecord>>,
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

/// Connects to etcd. The channel is lazy and balanced over the endpoints, so
/// this succeeds while etcd is down; every request then has its own timeout.
///
/// With `request_timeout` false the client has no per-request deadline: use
/// it for long-lived calls (watches, lease keep-alives, campaigns).
pub async fn connect(config: &EtcdConfig, request_timeout: bool) -> Result<Client> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_millis(config.dial_timeout_ms))
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
        .with_keep_alive_while_idle(true);
    if request_timeout {
        options = options.with_timeout(Duration::from_millis(config.request_timeout_ms));
    }
    if let Some(tls) = &config.tls {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| Error::InvalidArgument(format!("{}: {e}", p.display())))
        };
        let identity = etcd_client::Identity::from_pem(read(&tls.cert)?, read(&tls.key)?);
        options = options.with_tls(
            TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(read(&tls.ca)?))
                .identity(identity),
        );
    }
    // Every request is timed (`steward_etcd_request_duration_seconds`).
    Client::connect_with_balanced_channel(
        &config.endpoints,
        Some(options),
        crate::metrics::TimedEtcdChannel,
    )
    .await
    .map_err(Error::etcd("connect"))
}

/// Typed access to one cluster's state.
#[derive(Clone)]
pub struct Store {
    client: Client,
    keys: Keys,
    replica: String,
}

/// How many times a read-modify-write retries on a concurrent change.
const CAS_ATTEMPTS: usize = 8;

static EVENT_SEQ: AtomicU64 = AtomicU64::new(0);

impl Store {
    pub fn new(client: Client, keys: Keys, replica: String) -> Self {
        Self {
            client,
            keys,
            replica,
        }
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    pub fn replica(&self) -> &str {
        &self.replica
    }

    pub async fn node(&self, id: &NodeId) -> Result<NodeRecord> {
        let mut kv = self.client.kv_client();
        let resp = kv
            .get(
                format!("{}{id}/", self.keys.nodes()),
                Some(GetOptions::new().with_prefix()),
            )
            .await
            .map_err(Error::etcd("get node"))?;
        let mut record = NodeRecord::default();
        for kv in resp.kvs() {
            self.fill_record(&mut record, kv)?;
        }
        Ok(record)
    }

    fn fill_record(&self, record: &mut NodeRecord, kv: &etcd_client::KeyValue) -> Result<()> {
        match self.keys.parse_node_key(kv.key()) {
            Some((_, NodeKey::Spec)) => {
                record.spec = Some(Versioned {
                    value: decode(kv.key(), kv.value())?,
                    mod_revision: kv.mod_revision(),
                })
            }
            Some((_, NodeKey::Status)) => {
                record.status = Some(Versioned {
                    value: decode(kv.key(), kv.value())?,
                    mod_revision: kv.mod_revision(),
                })
            }
            Some((_, NodeKey::Address)) => {
                record.address = Some(Versioned {
                    value: decode::<NodeAddressRecord>(kv.key(), kv.value())?.address,
                    mod_revision: kv.mod_revision(),
                })
            }
            Some((_, NodeKey::Converge)) => {
                record.converge = Some(Versioned {
                    value: decode(kv.key(), kv.value())?,
                    mod_revision: kv.mod_revision(),
                })
            }
            Some((_, NodeKey::Revoked)) => {
                record.revoked = Some(Versioned {
                    value: decode(kv.key(), kv.value())?,
                    mod_revision: kv.mod_revision(),
                })
            }
            None => {}
        }
        Ok(())
    }

    /// Every node with a spec or a status.
    pub async fn nodes(&self) -> Result<BTreeMap<NodeId, NodeRecord>> {
        let mut kv = self.client.kv_client();
        let resp = kv
            .get(self.keys.nodes(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(Error::etcd("list nodes"))?;
        let mut nodes: BTreeMap<NodeId, NodeRecord> = BTreeMap::new();
        for kv in resp.kvs() {
            if let Some((id, _)) = self.keys.parse_node_key(kv.key()) {
                self.fill_record(nodes.entry(id).or_default(), kv)?;
            }
        }
        Ok(nodes)
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
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    spec_key.as_str(),
                    CompareOp::Equal,
                    rev,
                )])
                .and_then([TxnOp::put(spec_key.as_str(), encode(&next), None)]);
            let resp = self
                .client
                .kv_client()
                .txn(txn)
                .await
                .map_err(Error::etcd("update spec"))?;
            if resp.succeeded() {
                let mod_revision = resp.header().map(|h| h.revision()).unwrap_or_default();
                return Ok(Versioned {
                    value: next,
                    mod_revision,
                });
            }
        }
        Err(Error::Conflict { key: spec_key })
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

    /// Puts `value` at `key` if the key's mod revision is `expected_rev`
    /// (0: the key must not exist).
    async fn put_if(
        &self,
        key: String,
        expected_rev: i64,
        value: Vec<u8>,
        op: &'static str,
    ) -> Result<Option<i64>> {
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.as_str(),
                CompareOp::Equal,
                expected_rev,
            )])
            .and_then([TxnOp::put(key.as_str(), value, None)]);
        let resp = self
            .client
            .kv_client()
            .txn(txn)
            .await
            .map_err(Error::etcd(op))?;
        Ok(resp
            .succeeded()
            .then(|| resp.header().map(|h| h.revision()).unwrap_or_default()))
    }

    /// Puts `value` at `key` unless the key exists; whether it was written.
    pub async fn create_if_absent(&self, key: String, value: Vec<u8>) -> Result<bool> {
        Ok(self.put_if(key, 0, value, "create record").await?.is_some())
    }

    /// A new key for `event` under `events/`: ordered by time, unique
    /// within this replica (so several events fit in one transaction).
    pub fn event_key(&self, event: &Event) -> String {
        let seq = EVENT_SEQ.fetch_add(1, Ordering::Relaxed);
        format!(
            "{}{:016}-{}-{seq}",
            self.keys.events(),
            event.at_unix_ms,
            self.replica
        )
    }

    /// The write that appends `event`, for a transaction.
    pub fn event_op(&self, event: &Event) -> TxnOp {
        TxnOp::put(self.event_key(event), encode(event), None)
    }

    /// Deletes `keys` in one transaction.
    pub async fn delete_all(&self, keys: &[String]) -> Result<()> {
        let ops: Vec<TxnOp> = keys
            .iter()
            .map(|k| TxnOp::delete(k.as_str(), None))
            .collect();
        self.client
            .kv_client()
            .txn(Txn::new().and_then(ops))
            .await
            .map_err(Error::etcd("delete records"))?;
        Ok(())
    }

    /// Appends an event to the audit trail.
    pub async fn record_event(&self, event: &Event) -> Result<()> {
        self.client
            .kv_client()
            .put(self.event_key(event), encode(event), None)
            .await
            .map_err(Error::etcd("record event"))?;
        Ok(())
    }

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
        let resp = self
            .client
            .kv_client()
            .get(key.as_str(), None)
            .await
            .map_err(Error::etcd(op))?;
        resp.kvs()
            .first()
            .map(|kv| {
                Ok(Versioned {
                    value: decode(kv.key(), kv.value())?,
                    mod_revision: kv.mod_revision(),
                })
            })
            .transpose()
    }

    /// The latest `limit` events, oldest first, and the revision read at.
    pub async fn recent_events(&self, limit: u32) -> Result<(Vec<Event>, i64)> {
        let resp = self
            .client
            .kv_client()
            .get(
                self.keys.events(),
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_sort(SortTarget::Key, SortOrder::Descend)
                        .with_limit(i64::from(limit)),
                ),
            )
            .await
            .map_err(Error::etcd("read events"))?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or_default();
        let mut events = resp
            .kvs()
            .iter()
            .map(|kv| {
                let mut e: Event = decode(kv.key(), kv.value())?;
                e.revision = kv.mod_revision() as u64;
                Ok(e)
            })
            .collect::<Result<Vec<_>>>()?;
        events.reverse();
        Ok((events, revision))
    }

    pub async fn members(&self) -> Result<Vec<MemberRecord>> {
        let resp = self
            .client
            .kv_client()
            .get(self.keys.members(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(Error::etcd("list members"))?;
        resp.kvs()
            .iter()
            .map(|kv| decode(kv.key(), kv.value()))
            .collect()
    }

    /// The current leader's replica id, if any replica leads.
    pub async fn leader(&self) -> Result<Option<String>> {
        match self
            .client
            .election_client()
            .leader(self.keys.election())
            .await
        {
            Ok(resp) => Ok(resp
                .kv()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())),
            // etcd answers "election: no leader" as an error.
            Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("no leader") => Ok(None),
            Err(source) => Err(Error::Etcd {
                op: "read leader",
                source,
            }),
        }
    }

    /// Stores a new token under a lease that outlives its expiry by
    /// [`crate::tokens::KEEP_AFTER_EXPIRY_S`]; `false` if the id is taken.
    pub async fn create_token(&self, record: &TokenRecord) -> Result<bool> {
        let ttl_s = record.expires_unix_ms.saturating_sub(unix_ms()) / 1000
            + crate::tokens::KEEP_AFTER_EXPIRY_S;
        let lease = self
            .client
            .lease_client()
            .grant(i64::try_from(ttl_s).unwrap_or(i64::MAX), None)
            .await
            .map_err(Error::etcd("grant token lease"))?;
        let key = self.keys.token(&record.id);
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.as_str(),
                encode(record),
                Some(PutOptions::new().with_lease(lease.id())),
            )]);
        let resp = self
            .client
            .kv_client()
            .txn(txn)
            .await
            .map_err(Error::etcd("create token"))?;
        Ok(resp.succeeded())
    }

    pub async fn token(&self, id: &str) -> Result<Option<Versioned<TokenRecord>>> {
        self.get_versioned(self.keys.token(id), "read token").await
    }

    pub async fn tokens(&self) -> Result<Vec<TokenRecord>> {
        let resp = self
            .client
            .kv_client()
            .get(self.keys.tokens(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(Error::etcd("list tokens"))?;
        resp.kvs()
            .iter()
            .map(|kv| decode(kv.key(), kv.value()))
            .collect()
    }

    /// Records a use of a token, if nobody used or changed it since
    /// `mod_revision`, together with `event`. The record keeps its lease.
    pub async fn consume_token(
        &self,
        record: &TokenRecord,
        mod_revision: i64,
        event: &Event,
    ) -> Result<bool> {
        let key = self.keys.token(&record.id);
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.as_str(),
                CompareOp::Equal,
                mod_revision,
            )])
            .and_then([
                TxnOp::put(
                    key.as_str(),
                    encode(record),
                    Some(PutOptions::new().with_ignore_lease()),
                ),
                self.event_op(event),
            ]);
        let resp = self
            .client
            .kv_client()
            .txn(txn)
            .await
            .map_err(Error::etcd("use token"))?;
        Ok(resp.succeeded())
    }

    /// Whether the token existed.
    pub async fn delete_token(&self, id: &str) -> Result<bool> {
        let resp = self
            .client
            .kv_client()
            .delete(self.keys.token(id), None)
            .await
            .map_err(Error::etcd("delete token"))?;
        Ok(resp.deleted() > 0)
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
        let event = Event {
            revision: 0,
            at_unix_ms: now,
            kind: EventKind::NodeRevoked,
            node: Some(id.clone()),
            replica: self.replica.clone(),
            message: format!("{id}: certificates revoked by {by}"),
        };
        self.client
            .kv_client()
            .txn(Txn::new().and_then(vec![
                TxnOp::put(self.keys.node_revoked(id), encode(&record), None),
                self.event_op(&event),
            ]))
            .await
            .map_err(Error::etcd("revoke node"))?;
        Ok(Some(record))
    }

    /// Node `id`'s last certificate revocation, if any.
    pub async fn revocation(&self, id: &NodeId) -> Result<Option<NodeRevokedRecord>> {
        let revoked = self
            .get_versioned(self.keys.node_revoked(id), "get revocation")
            .await?;
        Ok(revoked.map(|r| r.value))
    }

    /// Whether etcd has any record of node `id` (spec, status, address).
    pub async fn node_known(&self, id: &NodeId) -> Result<bool> {
        let resp = self
            .client
            .kv_client()
            .get(
                format!("{}{id}/", self.keys.nodes()),
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await
            .map_err(Error::etcd("look up node"))?;
        Ok(resp.count() > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(
            keys.parse_node_key(keys.node_converge(&id).as_bytes()),
            Some((id.clone(), NodeKey::Converge))
        );
        assert_eq!(
            keys.parse_node_key(keys.node_revoked(&id).as_bytes()),
            Some((id.clone(), NodeKey::Revoked))
        );
        assert_eq!(keys.parse_node_key(b"/steward/prod/nodes/n1/other"), None);
        assert_eq!(keys.parse_node_key(b"/steward/dev/nodes/n1/spec"), None);
        assert_eq!(keys.parse_node_key(b"/steward/prod/nodes/BAD/spec"), None);
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
            assert!(matches!(error, Error::PermissionDenied(_)), "{error}");
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
