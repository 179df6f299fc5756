//! Replica-to-replica queries: each replica serves `PeerService` for what
//! only its memory holds (live sessions), and asks its peers when an
//! operator wants the whole picture. Peers authenticate with coordinator
//! certificates.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use steward_proto::admin::{LeaseStates, LiveSession};
use steward_proto::domain::{Health, NodeHealth, NodeId};
use steward_proto::pb;
use steward_proto::pb::peer_service_client::PeerServiceClient;
use steward_runtime::mtls_endpoint;
use tonic::transport::{Certificate, Channel, Identity};
use tonic::{Request, Response, Status};
use tracing::debug;

use crate::agent_service::SessionContext;
use crate::auth::peer_identity;
use crate::error::Error;
use crate::pki::IdentityKind;
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
        require_coordinator(&request)?;
        let wanted = request
            .into_inner()
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
            .collect();
        Ok(Response::new(pb::LiveSessionsResponse {
            replica_id: self.ctx.store.replica().to_owned(),
            sessions,
        }))
    }

    async fn lease_states(
        &self,
        request: Request<pb::LeaseStatesRequest>,
    ) -> Result<Response<pb::LeaseStatesResponse>, Status> {
        require_coordinator(&request)?;
        Ok(Response::new(
            crate::vip::admin::local_lease_states(&self.ctx).into(),
        ))
    }
}

fn require_coordinator<T>(request: &Request<T>) -> Result<(), Status> {
    let identity = peer_identity(request)?;
    if identity.kind != IdentityKind::Coordinator {
        return Err(Error::WrongCertificateKind {
            identity: identity.to_string(),
            may: "use the peer API",
            only: "coordinator",
        }
        .into());
    }
    Ok(())
}

/// Clients to peer replicas, one lazily connected channel per address.
#[derive(Clone)]
pub struct Peers {
    ca: Certificate,
    identity: Identity,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

impl Peers {
    pub fn new(ca: Certificate, identity: Identity) -> Self {
        Self {
            ca,
            identity,
            channels: Arc::default(),
        }
    }

    fn channel(&self, address: &str) -> Option<Channel> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = channels.get(address) {
            return Some(c.clone());
        }
        let channel = mtls_endpoint(address, self.ca.clone(), self.identity.clone())
            .ok()?
            .connect_timeout(PEER_TIMEOUT)
            .timeout(PEER_TIMEOUT)
            .connect_lazy();
        channels.insert(address.to_owned(), channel.clone());
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
                let mut client = PeerServiceClient::new(channel);
                let request = pb::LiveSessionsRequest {
                    node_ids: nodes.into_iter().map(String::from).collect(),
                };
                match tokio::time::timeout(PEER_TIMEOUT, client.live_sessions(request)).await {
                    Ok(Ok(resp)) => resp.into_inner().sessions,
                    Ok(Err(status)) => {
                        debug!(%replica, %status, "peer query failed");
                        Vec::new()
                    }
                    Err(_) => {
                        debug!(%replica, "peer query timed out");
                        Vec::new()
                    }
                }
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
