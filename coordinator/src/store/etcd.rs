//! The etcd backend of the store: the one module of the coordinator that
//! speaks etcd-client (checked by `coordinator/tests/tidy.rs`).
//!
//! Two clients: one with a per-request deadline for reads and writes, one
//! without for long-lived calls (watches, lease keep-alives, campaigns).
//! Every call goes through [`TimedEtcdChannel`], so each is timed by
//! operation (`steward_etcd_request_duration_seconds`).

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, PutOptions,
    ResignOptions, SortOrder, SortTarget, TlsOptions, TxnOp, TxnOpResponse, WatchOptions,
};

use super::kv::{Change, Cmp, Kv, LeaderKey, Op, PutLease, Range, RangeOptions, Txn, TxnOutcome};
use crate::config::EtcdConfig;
use crate::error::{Error, Result};
use crate::metrics::metrics;

/// What went wrong talking to etcd.
pub type EtcdError = etcd_client::Error;

fn etcd(op: &'static str) -> impl FnOnce(etcd_client::Error) -> Error {
    move |source| Error::Etcd {
        op,
        source: super::BackendError::Etcd(source),
    }
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
            std::fs::read(p).map_err(|e| Error::Config(format!("{}: {e}", p.display())))
        };
        let identity = etcd_client::Identity::from_pem(read(&tls.cert)?, read(&tls.key)?);
        options = options.with_tls(
            TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(read(&tls.ca)?))
                .identity(identity),
        );
    }
    // Every request is timed (`steward_etcd_request_duration_seconds`).
    Client::connect_with_balanced_channel(&config.endpoints, Some(options), TimedEtcdChannel)
        .await
        .map_err(etcd("connect"))
}

/// The two clients of one replica.
#[derive(Clone)]
pub struct EtcdBackend {
    client: Client,
    stream_client: Client,
}

fn compare(cmp: Cmp) -> Compare {
    match cmp {
        Cmp::ModRevision(key, rev) => Compare::mod_revision(key, CompareOp::Equal, rev),
        Cmp::CreateRevision(key, rev) => Compare::create_revision(key, CompareOp::Equal, rev),
        Cmp::Present(key) => Compare::version(key, CompareOp::Greater, 0),
    }
}

fn txn_op(op: Op) -> TxnOp {
    match op {
        Op::Put { key, value, lease } => {
            let options = match lease {
                PutLease::None => None,
                PutLease::Attach(id) => Some(PutOptions::new().with_lease(id)),
                PutLease::Keep => Some(PutOptions::new().with_ignore_lease()),
            };
            TxnOp::put(key, value, options)
        }
        Op::Delete(key) => TxnOp::delete(key, None),
        Op::DeletePrefix(prefix) => TxnOp::delete(prefix, Some(DeleteOptions::new().with_prefix())),
        Op::Txn(inner) => TxnOp::txn(etcd_txn(inner)),
    }
}

fn etcd_txn(txn: Txn) -> etcd_client::Txn {
    etcd_client::Txn::new()
        .when(txn.when.into_iter().map(compare).collect::<Vec<_>>())
        .and_then(txn.then.into_iter().map(txn_op).collect::<Vec<_>>())
}

fn outcome(succeeded: bool, revision: i64, responses: &[TxnOpResponse]) -> TxnOutcome {
    TxnOutcome {
        succeeded,
        revision,
        inner: responses
            .iter()
            .filter_map(|r| match r {
                TxnOpResponse::Txn(inner) => Some(outcome(
                    inner.succeeded(),
                    revision,
                    inner.op_responses().as_slice(),
                )),
                _ => None,
            })
            .collect(),
    }
}

fn kv(kv: &etcd_client::KeyValue) -> Kv {
    Kv {
        key: kv.key().to_vec(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        version: kv.version(),
    }
}

impl EtcdBackend {
    pub async fn connect(config: &EtcdConfig) -> Result<Self> {
        Ok(Self {
            client: connect(config, true).await?,
            stream_client: connect(config, false).await?,
        })
    }

    pub async fn get(&self, key: &[u8], op: &'static str) -> Result<Option<Kv>> {
        let resp = self
            .client
            .kv_client()
            .get(key, None)
            .await
            .map_err(etcd(op))?;
        Ok(resp.kvs().first().map(kv))
    }

    pub async fn range(
        &self,
        prefix: &[u8],
        options: RangeOptions,
        op: &'static str,
    ) -> Result<Range> {
        let mut get = GetOptions::new().with_prefix();
        if options.descending {
            get = get.with_sort(SortTarget::Key, SortOrder::Descend);
        } else {
            get = get.with_sort(SortTarget::Key, SortOrder::Ascend);
        }
        if options.limit > 0 {
            get = get.with_limit(i64::try_from(options.limit).unwrap_or(i64::MAX));
        }
        if options.keys_only {
            get = get.with_keys_only();
        }
        let resp = self
            .client
            .kv_client()
            .get(prefix, Some(get))
            .await
            .map_err(etcd(op))?;
        Ok(Range {
            kvs: resp.kvs().iter().map(kv).collect(),
            revision: resp.header().map(|h| h.revision()).unwrap_or_default(),
        })
    }

    /// Up to `limit` keys in `[start, end)`, in key order, read at
    /// `revision` (0: the newest).
    pub async fn range_page(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
        revision: i64,
        op: &'static str,
    ) -> Result<Range> {
        let mut get = GetOptions::new()
            .with_range(end.to_vec())
            .with_sort(SortTarget::Key, SortOrder::Ascend)
            .with_limit(i64::try_from(limit).unwrap_or(i64::MAX));
        if revision > 0 {
            get = get.with_revision(revision);
        }
        let resp = self
            .client
            .kv_client()
            .get(start, Some(get))
            .await
            .map_err(etcd(op))?;
        Ok(Range {
            kvs: resp.kvs().iter().map(kv).collect(),
            revision: resp.header().map(|h| h.revision()).unwrap_or_default(),
        })
    }

    pub async fn count(&self, prefix: &[u8], op: &'static str) -> Result<i64> {
        let resp = self
            .client
            .kv_client()
            .get(
                prefix,
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await
            .map_err(etcd(op))?;
        Ok(resp.count())
    }

    /// Each of `keys` that exists, read in one transaction (one revision).
    pub async fn get_many(&self, keys: &[Vec<u8>], op: &'static str) -> Result<Vec<Kv>> {
        let reads: Vec<TxnOp> = keys.iter().map(|k| TxnOp::get(k.clone(), None)).collect();
        let resp = self
            .client
            .kv_client()
            .txn(etcd_client::Txn::new().and_then(reads))
            .await
            .map_err(etcd(op))?;
        let mut kvs = Vec::new();
        for response in resp.op_responses() {
            if let TxnOpResponse::Get(get) = response {
                kvs.extend(get.kvs().iter().map(kv));
            }
        }
        Ok(kvs)
    }

    /// One unconditional write (etcd's Put, not a transaction).
    pub async fn put(
        &self,
        key: &[u8],
        value: Vec<u8>,
        lease: PutLease,
        op: &'static str,
    ) -> Result<()> {
        let options = match lease {
            PutLease::None => None,
            PutLease::Attach(id) => Some(PutOptions::new().with_lease(id)),
            PutLease::Keep => Some(PutOptions::new().with_ignore_lease()),
        };
        self.client
            .kv_client()
            .put(key, value, options)
            .await
            .map_err(etcd(op))?;
        Ok(())
    }

    /// Deletes one key (etcd's DeleteRange); whether it existed.
    pub async fn delete(&self, key: &[u8], op: &'static str) -> Result<bool> {
        let resp = self
            .client
            .kv_client()
            .delete(key, None)
            .await
            .map_err(etcd(op))?;
        Ok(resp.deleted() > 0)
    }

    pub async fn txn(&self, txn: Txn, op: &'static str) -> Result<TxnOutcome> {
        let resp = self
            .client
            .kv_client()
            .txn(etcd_txn(txn))
            .await
            .map_err(etcd(op))?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or_default();
        Ok(outcome(
            resp.succeeded(),
            revision,
            resp.op_responses().as_slice(),
        ))
    }

    /// Watches every prefix on one stream from `start_revision`.
    pub async fn watch(&self, prefixes: &[Vec<u8>], start_revision: i64) -> Result<EtcdWatch> {
        let options = || {
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(start_revision)
                    .with_progress_notify(),
            )
        };
        let Some((first, others)) = prefixes.split_first() else {
            return Err(Error::WatchInterrupted("nothing to watch".into()));
        };
        let mut stream = self
            .stream_client
            .watch_client()
            .watch(first.clone(), options())
            .await
            .map_err(etcd("watch prefix"))?;
        // The other prefixes are further watches on the same stream.
        for prefix in others {
            stream
                .watch(prefix.clone(), options())
                .await
                .map_err(etcd("watch prefix"))?;
        }
        Ok(EtcdWatch { stream })
    }

    pub async fn grant_lease(&self, ttl_s: i64) -> Result<i64> {
        Ok(self
            .client
            .lease_client()
            .grant(ttl_s, None)
            .await
            .map_err(etcd("grant lease"))?
            .id())
    }

    pub async fn keep_alive(&self, lease: i64) -> Result<EtcdKeeper> {
        let (keeper, responses) = self
            .stream_client
            .lease_client()
            .keep_alive(lease)
            .await
            .map_err(etcd("keep lease alive"))?;
        Ok(EtcdKeeper { keeper, responses })
    }

    pub async fn revoke_lease(&self, lease: i64) -> Result<()> {
        self.client
            .lease_client()
            .revoke(lease)
            .await
            .map_err(etcd("revoke lease"))?;
        Ok(())
    }

    /// Waits until this candidate leads `name`.
    pub async fn campaign(&self, name: &[u8], value: &[u8], lease: i64) -> Result<LeaderKey> {
        let key = self
            .stream_client
            .election_client()
            .campaign(name, value, lease)
            .await
            .map_err(etcd("campaign"))?
            .take_leader()
            .ok_or(Error::CampaignWithoutLeaderKey)?;
        Ok(LeaderKey {
            name: key.name().to_vec(),
            key: key.key().to_vec(),
            revision: key.rev(),
            lease: key.lease(),
        })
    }

    /// The current leader's value, if anyone leads `name`.
    pub async fn leader(&self, name: &[u8]) -> Result<Option<Vec<u8>>> {
        match self.client.election_client().leader(name).await {
            Ok(resp) => Ok(resp.kv().map(|kv| kv.value().to_vec())),
            // etcd answers "election: no leader" as an error.
            Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("no leader") => Ok(None),
            Err(source) => Err(etcd("read leader")(source)),
        }
    }

    pub async fn resign(&self, key: &LeaderKey) -> Result<()> {
        let leader = etcd_client::LeaderKey::new()
            .with_name(key.name.clone())
            .with_key(key.key.clone())
            .with_rev(key.revision)
            .with_lease(key.lease);
        self.client
            .election_client()
            .resign(Some(ResignOptions::new().with_leader(leader)))
            .await
            .map_err(etcd("resign"))?;
        Ok(())
    }
}

/// A watch stream of several prefixes.
pub struct EtcdWatch {
    stream: etcd_client::WatchStream,
}

impl EtcdWatch {
    /// The next batch of changes; `None` when the stream ended.
    pub async fn next(&mut self) -> Result<Option<Vec<Change>>> {
        let Some(resp) = self.stream.message().await.map_err(etcd("watch prefix"))? else {
            return Ok(None);
        };
        if resp.canceled() || resp.compact_revision() > 0 {
            return Err(Error::WatchInterrupted(format!(
                "watch canceled (compacted at {}): {}",
                resp.compact_revision(),
                resp.cancel_reason()
            )));
        }
        Ok(Some(
            resp.events()
                .iter()
                .filter_map(|event| {
                    let kv = event.kv()?;
                    Some(match event.event_type() {
                        EventType::Put => Change::Put(self::kv(kv)),
                        EventType::Delete => Change::Delete {
                            key: kv.key().to_vec(),
                            revision: kv.mod_revision(),
                        },
                    })
                })
                .collect(),
        ))
    }
}

/// Keeps one lease alive.
pub struct EtcdKeeper {
    keeper: etcd_client::LeaseKeeper,
    responses: etcd_client::LeaseKeepAliveStream,
}

impl EtcdKeeper {
    /// Renews the lease once, waiting at most `wait` for the answer; its
    /// remaining TTL in seconds (0: it expired).
    pub async fn renew(&mut self, wait: Duration) -> Result<i64> {
        self.keeper
            .keep_alive()
            .await
            .map_err(etcd("keep lease alive"))?;
        match tokio::time::timeout(wait, self.responses.message()).await {
            Ok(Ok(Some(r))) => Ok(r.ttl()),
            Ok(Ok(None)) => Err(Error::WatchInterrupted(
                "lease keep-alive stream closed".into(),
            )),
            Ok(Err(source)) => Err(etcd("keep lease alive")(source)),
            Err(_) => Err(Error::WatchInterrupted("lease keep-alive timed out".into())),
        }
    }
}

/// The etcd operation a gRPC path is, as the `op` label says it; `None`
/// for calls whose duration is no latency (a campaign waits until this
/// replica is elected).
fn etcd_op(path: &str) -> Option<&'static str> {
    let (service, method) = path.trim_start_matches('/').split_once('/')?;
    let service = service.rsplit('.').next().unwrap_or(service);
    Some(match (service, method) {
        ("KV", "Range") => "get",
        ("KV", "Put") => "put",
        ("KV", "DeleteRange") => "delete",
        ("KV", "Txn") => "txn",
        ("KV", "Compact") => "compact",
        ("Watch", "Watch") => "watch_open",
        ("Lease", "LeaseGrant") => "lease_grant",
        ("Lease", "LeaseRevoke") => "lease_revoke",
        ("Lease", "LeaseKeepAlive") => "lease_keepalive_open",
        ("Lease", "LeaseTimeToLive") => "lease_ttl",
        ("Election", "Campaign") => return None,
        ("Election", "Leader") => "election_leader",
        ("Election", "Resign") => "election_resign",
        ("Election", "Proclaim") => "election_proclaim",
        ("Election", "Observe") => "election_observe_open",
        ("Auth", _) => "auth",
        ("Maintenance", _) | ("Cluster", _) => "maintenance",
        _ => "other",
    })
}

type EtcdRequest = tonic::codegen::http::Request<tonic::body::Body>;
type EtcdResponse = tonic::codegen::http::Response<tonic::body::Body>;
type EtcdUpdates = tokio::sync::mpsc::Sender<
    tonic::transport::channel::Change<tonic::codegen::http::Uri, tonic::transport::Endpoint>,
>;

/// etcd-client's balanced channel with every request timed: used by
/// [`connect`], so each etcd call of the replica (reads, txns, watches,
/// leases, elections) is measured whoever makes it. Streams count until
/// the response headers, i.e. until etcd accepted the stream.
pub struct TimedEtcdChannel;

impl etcd_client::BalancedChannelBuilder for TimedEtcdChannel {
    type Error = tonic::transport::Error;

    fn balanced_channel(
        self,
        buffer_size: usize,
    ) -> std::result::Result<(etcd_client::Channel, EtcdUpdates), Self::Error> {
        let (inner, updates) = tonic::transport::Channel::balance_channel(buffer_size);
        let timed = tower::util::BoxCloneSyncService::new(Timed { inner });
        Ok((etcd_client::Channel::Custom(timed), updates))
    }
}

#[derive(Clone)]
struct Timed {
    inner: tonic::transport::Channel,
}

impl tower::Service<EtcdRequest> for Timed {
    type Response = EtcdResponse;
    type Error = tower::BoxError;
    type Future = std::pin::Pin<
        Box<
            dyn std::future::Future<Output = std::result::Result<EtcdResponse, tower::BoxError>>
                + Send,
        >,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::result::Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: EtcdRequest) -> Self::Future {
        let op = etcd_op(request.uri().path());
        let response = self.inner.call(request);
        Box::pin(async move {
            let started = std::time::Instant::now();
            let result = response.await;
            if let Some(op) = op {
                let m = metrics();
                m.etcd_duration.with(&[op]).observe(started.elapsed());
                // A gRPC error answered at once comes as a header; others
                // arrive in trailers, after this point.
                let failed = match &result {
                    Ok(r) => r
                        .headers()
                        .get("grpc-status")
                        .is_some_and(|s| s.as_bytes() != b"0"),
                    Err(_) => true,
                };
                if failed {
                    m.etcd_errors.with(&[op]).inc();
                }
            }
            result.map_err(Into::into)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_paths_map_to_operations() {
        assert_eq!(etcd_op("/etcdserverpb.KV/Range"), Some("get"));
        assert_eq!(etcd_op("/etcdserverpb.KV/Txn"), Some("txn"));
        assert_eq!(etcd_op("/etcdserverpb.Watch/Watch"), Some("watch_open"));
        assert_eq!(
            etcd_op("/etcdserverpb.Lease/LeaseKeepAlive"),
            Some("lease_keepalive_open")
        );
        assert_eq!(
            etcd_op("/v3electionpb.Election/Leader"),
            Some("election_leader")
        );
        assert_eq!(etcd_op("/v3electionpb.Election/Campaign"), None);
        assert_eq!(etcd_op("/grpc.health.v1.Health/Check"), Some("other"));
        assert_eq!(etcd_op("nonsense"), None);
    }
}
