//! Replica-to-replica queries: each replica serves `PeerService` for what
//! only its memory holds (live sessions), and asks its peers when an
//! operator wants the whole picture. Peers authenticate with coordinator
//! certificates.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use steward_proto::admin::{LeaseStates, LiveSession};
use steward_proto::domain::RevocableKind;
use steward_proto::domain::{Health, NodeHealth, NodeId};
use steward_proto::pb;
use steward_proto::pb::peer_service_client::PeerServiceClient;
use steward_runtime::{mtls_channel_checked, MtlsPem, ServerCheck};
use tokio::sync::watch;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tracing::debug;

use crate::agent_service::SessionContext;
use crate::auth::{check_not_revoked, require_coordinator};
use crate::cache::SpecSnapshot;
use crate::error::Error;
use crate::pki::{identity_from_der, IdentityKind};
use crate::store::MemberRecord;

/// How long an operator's request waits for a peer.
pub const PEER_TIMEOUT: Duration = Duration::from_millis(500);

/// Live data about a node from the replica serving it.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveNode {
    pub last_seen_unix_ms: u64,
    pub health: NodeHealth,
    pub last_health: Health,
    pub applied_revision: u64,
}

pub struct PeerApi {
    ctx: SessionContext,
}

impl PeerApi {
    pub fn new(ctx: SessionContext) -> Self {
        Self { ctx }
    }
}

#[tonic::async_trait]
impl pb::peer_service_server::PeerService for PeerApi {
    async fn live_sessions(
        &self,
        request: Request<pb::LiveSessionsRequest>,
    ) -> Result<Response<pb::LiveSessionsResponse>, Status> {
        require_coordinator(&request, &self.ctx.specs.borrow())?;
        let request = request.into_inner();
        let replica_id = self.ctx.store.replica().to_owned();
        if request.count_only && request.node_ids.is_empty() {
            return Ok(Response::new(pb::LiveSessionsResponse {
                replica_id,
                sessions: Vec::new(),
                count: u32::try_from(self.ctx.sessions.len()).unwrap_or(u32::MAX),
            }));
        }
        let wanted = request
            .node_ids
            .into_iter()
            .map(NodeId::new)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::from(steward_proto::ProtoError::from(e)))?;
        let now = Instant::now();
        let sessions = self
            .ctx
            .sessions
            .snapshot()
            .into_iter()
            .filter(|(id, _)| wanted.is_empty() || wanted.contains(id))
            .map(|(id, live)| {
                LiveSession {
                    node: id,
                    last_seen_unix_ms: live.last_seen_unix_ms,
                    health: live.node_health(now, self.ctx.unreachable_after),
                    last_health: live.health,
                    applied_revision: live.applied_revision,
                }
                .into()
            })
            .collect::<Vec<pb::LiveSession>>();
        let count = u32::try_from(sessions.len()).unwrap_or(u32::MAX);
        Ok(Response::new(pb::LiveSessionsResponse {
            replica_id,
            sessions: if request.count_only {
                Vec::new()
            } else {
                sessions
            },
            count,
        }))
    }

    async fn lease_states(
        &self,
        request: Request<pb::LeaseStatesRequest>,
    ) -> Result<Response<pb::LeaseStatesResponse>, Status> {
        require_coordinator(&request, &self.ctx.specs.borrow())?;
        Ok(Response::new(
            crate::vip::admin::local_lease_states(&self.ctx).into(),
        ))
    }
}

/// Clients to peer replicas, one lazily connected channel per address.
///
/// A peer must present a coordinator certificate (serverAuth, from the
/// cluster CA, valid for its address) that no revocation in this replica's
/// cache covers; the check runs at every (re)connection, and the channels
/// are dropped whenever a coordinator revocation arrives, so an open
/// connection to a revoked peer is not reused.
#[derive(Clone)]
pub struct Peers {
    tls: Arc<MtlsPem>,
    specs: watch::Receiver<Arc<SpecSnapshot>>,
    channels: Arc<Mutex<PeerChannels>>,
}

#[derive(Default)]
struct PeerChannels {
    /// The coordinator revocations they were opened under.
    revocations: u64,
    by_address: HashMap<String, Channel>,
}

/// Stands for the coordinator revocations in `specs`: the newest one's mod
/// revision (a new revocation always has a larger one).
fn coordinator_revocations(specs: &SpecSnapshot) -> u64 {
    crate::desired::coordinator_revocations_revision(specs)
}

/// Whether the certificate `der` a peer presented (already verified by
/// webpki) is a coordinator's that no revocation in `specs` covers.
pub fn check_peer_certificate(der: &[u8], specs: &SpecSnapshot) -> Result<(), String> {
    let identity = identity_from_der(der).map_err(|e| e.to_string())?;
    if identity.kind != IdentityKind::Coordinator {
        return Err(format!(
            "the peer presented {identity}, not a coordinator certificate"
        ));
    }
    check_not_revoked(&identity, RevocableKind::Coordinator, specs).map_err(|e| e.to_string())
}

impl Peers {
    pub fn new(tls: MtlsPem, specs: watch::Receiver<Arc<SpecSnapshot>>) -> Self {
        Self {
            tls: Arc::new(tls),
            specs,
            channels: Arc::default(),
        }
    }

    fn channel(&self, address: &str) -> Option<Channel> {
        let revocations = coordinator_revocations(&self.specs.borrow());
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if channels.revocations != revocations {
            channels.by_address.clear();
            channels.revocations = revocations;
        }
        if let Some(c) = channels.by_address.get(address) {
            return Some(c.clone());
        }
        let specs = self.specs.clone();
        let check: ServerCheck = Arc::new(move |der| check_peer_certificate(der, &specs.borrow()));
        let channel = match mtls_channel_checked(address, &self.tls, check, PEER_TIMEOUT) {
            Ok(channel) => channel,
            Err(error) => {
                debug!(%address, %error, "cannot make a peer channel");
                return None;
            }
        };
        channels
            .by_address
            .insert(address.to_owned(), channel.clone());
        Some(channel)
    }

    /// Live data for `nodes` from the replicas serving them. Replicas that do
    /// not answer in time are left out: callers fall back to etcd's record.
    pub async fn live_nodes(
        &self,
        wanted: BTreeMap<String, Vec<NodeId>>,
        members: &[MemberRecord],
    ) -> HashMap<NodeId, LiveNode> {
        let queries = wanted.into_iter().filter_map(|(replica, nodes)| {
            let member = members.iter().find(|m| m.id == replica)?;
            let channel = self.channel(&member.address)?;
            Some(async move {
                let request = pb::LiveSessionsRequest {
                    node_ids: nodes.into_iter().map(String::from).collect(),
                    count_only: false,
                };
                ask_live_sessions(channel, &replica, request)
                    .await
                    .map(|r| r.sessions)
                    .unwrap_or_default()
            })
        });
        let answers = futures_join_all(queries).await;
        answers
            .into_iter()
            .flatten()
            // An invalid entry is left out: etcd's record stands for it.
            .filter_map(|s| LiveSession::try_from(s).ok())
            .map(|s| {
                (
                    s.node,
                    LiveNode {
                        last_seen_unix_ms: s.last_seen_unix_ms,
                        health: s.health,
                        last_health: s.last_health,
                        applied_revision: s.applied_revision,
                    },
                )
            })
            .collect()
    }
}

impl Peers {
    /// Each member's lease state; `None` for members that did not answer in
    /// time.
    pub async fn lease_states(
        &self,
        members: &[MemberRecord],
    ) -> Vec<(String, Option<LeaseStates>)> {
        let queries = members.iter().map(|member| {
            let id = member.id.clone();
            let channel = self.channel(&member.address);
            async move {
                let Some(channel) = channel else {
                    return (id, None);
                };
                let mut client = PeerServiceClient::new(channel);
                let call = client.lease_states(pb::LeaseStatesRequest {});
                match tokio::time::timeout(PEER_TIMEOUT, call).await {
                    Ok(Ok(resp)) => match LeaseStates::try_from(resp.into_inner()) {
                        Ok(states) => (id, Some(states)),
                        Err(error) => {
                            debug!(replica = %id, %error, "invalid peer lease states");
                            (id, None)
                        }
                    },
                    Ok(Err(status)) => {
                        debug!(replica = %id, %status, "peer lease query failed");
                        (id, None)
                    }
                    Err(_) => (id, None),
                }
            }
        });
        futures_join_all(queries).await
    }

    /// How many agent sessions each member serves, as it says itself; a
    /// member that does not answer in time is left out. One small answer
    /// per replica, whatever the fleet's size.
    pub async fn session_counts(&self, members: &[MemberRecord]) -> HashMap<String, u32> {
        let queries = members.iter().map(|member| {
            let id = member.id.clone();
            let channel = self.channel(&member.address);
            async move {
                let request = pb::LiveSessionsRequest {
                    node_ids: Vec::new(),
                    count_only: true,
                };
                let resp = ask_live_sessions(channel?, &id, request).await?;
                // A replica that predates `count_only` lists them.
                let listed = u32::try_from(resp.sessions.len()).unwrap_or(u32::MAX);
                Some((id, resp.count.max(listed)))
            }
        });
        futures_join_all(queries)
            .await
            .into_iter()
            .flatten()
            .collect()
    }
}

/// `LiveSessions` of `replica`, within [`PEER_TIMEOUT`]; `None` (logged)
/// if it fails or is late.
async fn ask_live_sessions(
    channel: Channel,
    replica: &str,
    request: pb::LiveSessionsRequest,
) -> Option<pb::LiveSessionsResponse> {
    let mut client = PeerServiceClient::new(channel);
    match tokio::time::timeout(PEER_TIMEOUT, client.live_sessions(request)).await {
        Ok(Ok(resp)) => Some(resp.into_inner()),
        Ok(Err(status)) => {
            debug!(%replica, %status, "peer query failed");
            None
        }
        Err(_) => {
            debug!(%replica, "peer query timed out");
            None
        }
    }
}

/// Runs futures concurrently and collects their outputs (no `futures` crate).
async fn futures_join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        if let Ok(v) = h.await {
            out.push(v);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryBackend;
    use crate::testing::{revoke_certificate, TestReplica};

    fn der(dir: &std::path::Path, name: &str, kind: IdentityKind) -> Vec<u8> {
        let (crt, _) = crate::pki::issue(dir, name, kind, &[]).expect("issued");
        let pem = std::fs::read_to_string(crt).expect("written");
        steward_proto::pki::pem_certificates(&pem)
            .expect("PEM")
            .remove(0)
    }

    #[tokio::test]
    async fn a_peer_must_present_a_coordinator_certificate_not_revoked() {
        let dir = tempfile::tempdir().expect("tempdir");
        crate::pki::init_ca(dir.path(), "test").expect("CA");
        let c2 = der(dir.path(), "c-2", IdentityKind::Coordinator);
        let admin = der(dir.path(), "ops", IdentityKind::Admin);
        let replica = TestReplica::start(MemoryBackend::new(), "c-1").await;
        let specs = replica.ctx.specs.borrow().clone();
        check_peer_certificate(&c2, &specs).expect("a live peer");
        let error = check_peer_certificate(&admin, &specs).unwrap_err();
        assert!(error.contains("not a coordinator"), "{error}");
        assert_eq!(coordinator_revocations(&specs), 0);

        let specs = revoke_certificate(&replica, RevocableKind::Coordinator, "c-2", "ops").await;
        let error = check_peer_certificate(&c2, &specs).unwrap_err();
        assert!(error.contains("revoked"), "{error}");
        // Open channels are dropped: the revocations changed.
        assert!(coordinator_revocations(&specs) > 0);
    }
}
