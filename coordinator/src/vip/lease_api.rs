//! `AgentService.Lease`: the replica's end of the lease protocol. One stream
//! per candidate node; every heartbeat is answered with the epochs this
//! replica acks and the node's assignments, and assignment changes are
//! pushed at once.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use steward_lease::messages::{AssignedVip, LeaseHeartbeat, LeaseReply};
use steward_lease::{Acker, Epoch, LeaseParams};
use steward_proto::domain::NodeId;
use steward_proto::pb;
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, Instrument};

use crate::agent_service::{still_trusted, SessionContext};
use crate::auth::peer_identity;
use crate::error::Error;
use crate::pki::{Identity, IdentityKind};

/// How long a new lease stream may take to send its first heartbeat.
const FIRST_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(5);

/// A candidate heartbeating this replica.
#[derive(Debug, Clone)]
struct LiveCandidate {
    stream: u64,
    last_heartbeat: Instant,
    /// Local check per VIP, as last reported.
    health: BTreeMap<String, bool>,
}

/// What this replica knows of the lease protocol, shared by its lease
/// streams, its marker and (on the leader) placement.
pub struct LeaseHub {
    params: LeaseParams,
    origin: Instant,
    acker: Mutex<Acker>,
    candidates: Mutex<HashMap<NodeId, LiveCandidate>>,
    next_stream: AtomicU64,
    /// A release was heard, or a marked holder again: marks (or their
    /// withdrawal) are due now.
    pub marks_due: Notify,
    /// A candidate appeared, vanished or changed its health.
    pub candidates_changed: Notify,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain data behind these locks; a panic elsewhere leaves it usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl LeaseHub {
    /// A hub for a replica that starts now (its acker writes no expiry mark
    /// for a lease, since it cannot know what it acked in a previous life).
    pub fn new(replica: String, params: LeaseParams) -> Arc<Self> {
        Arc::new(Self {
            params,
            origin: Instant::now(),
            acker: Mutex::new(Acker::new(replica, params, Duration::ZERO)),
            candidates: Mutex::default(),
            next_stream: AtomicU64::new(1),
            marks_due: Notify::new(),
            candidates_changed: Notify::new(),
        })
    }

    pub fn params(&self) -> &LeaseParams {
        &self.params
    }

    /// This replica's monotonic clock, as the acker reads it.
    pub fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    pub fn with_acker<R>(&self, f: impl FnOnce(&mut Acker) -> R) -> R {
        f(&mut lock(&self.acker))
    }

    /// A candidate counts as live while it heartbeats at least every three
    /// intervals.
    fn live_window(&self) -> Duration {
        self.params.heartbeat * 3
    }

    /// Whether `node` heartbeats this replica and its check for `vip` passes.
    pub fn healthy_candidate(&self, node: &NodeId, vip: &str) -> bool {
        lock(&self.candidates).get(node).is_some_and(|c| {
            c.last_heartbeat.elapsed() <= self.live_window() && c.health.get(vip) == Some(&true)
        })
    }

    fn on_heartbeat(&self, stream: u64, hb: &LeaseHeartbeat) -> Vec<(String, Epoch)> {
        let health: BTreeMap<String, bool> = hb.health.iter().cloned().collect();
        let changed = {
            let mut candidates = lock(&self.candidates);
            let previous = candidates.insert(
                hb.node.clone(),
                LiveCandidate {
                    stream,
                    last_heartbeat: Instant::now(),
                    health: health.clone(),
                },
            );
            !matches!(previous, Some(p)
                if p.health == health && p.last_heartbeat.elapsed() <= self.live_window())
        };
        if changed {
            self.candidates_changed.notify_one();
        }
        let now = self.now();
        let (acked, withdraw) = self.with_acker(|a| {
            let acked = a.on_heartbeat(&hb.node, &hb.claims, now);
            (acked, a.has_pending_withdrawals())
        });
        // A release is marked at once; a mark of a holder heard again is
        // taken back at once.
        if withdraw || hb.claims.iter().any(|c| c.released) {
            self.marks_due.notify_one();
        }
        acked
    }

    fn close_stream(&self, node: &NodeId, stream: u64) {
        let mut candidates = lock(&self.candidates);
        if candidates.get(node).is_some_and(|c| c.stream == stream) {
            candidates.remove(node);
            drop(candidates);
            self.candidates_changed.notify_one();
        }
    }
}

/// The reply stream of `AgentService.Lease`.
pub type LeaseStream = Pin<Box<dyn Stream<Item = Result<pb::LeaseReply, Status>> + Send>>;

/// Opens a lease stream for the calling agent.
pub async fn open(
    ctx: &SessionContext,
    request: Request<Streaming<pb::LeaseHeartbeat>>,
) -> Result<Response<LeaseStream>, Status> {
    let identity = peer_identity(&request)?;
    let stream = open_stream(ctx, identity, request.into_inner()).await?;
    Ok(Response::new(stream))
}

/// Opens the lease stream of the agent with the verified certificate
/// `identity`, whose heartbeats arrive on `inbound`, and serves it on a
/// task of its own.
pub(crate) async fn open_stream<S>(
    ctx: &SessionContext,
    identity: Identity,
    mut inbound: S,
) -> Result<LeaseStream, Status>
where
    S: Stream<Item = Result<pb::LeaseHeartbeat, Status>> + Unpin + Send + 'static,
{
    if identity.kind != IdentityKind::Agent {
        return Err(Error::WrongCertificateKind {
            identity: identity.to_string(),
            may: "open a lease stream",
            only: "agent",
        }
        .into());
    }
    let first = tokio::time::timeout(FIRST_HEARTBEAT_TIMEOUT, inbound.next())
        .await
        .map_err(|_| Error::FirstMessageLate {
            first: "heartbeat",
            within: FIRST_HEARTBEAT_TIMEOUT,
        })?
        .transpose()?
        .ok_or(Error::ClosedBeforeFirstMessage {
            first: "first heartbeat",
        })?;
    let first = LeaseHeartbeat::try_from(first).map_err(Error::from)?;
    if first.node.as_str() != identity.name {
        return Err(Error::SpeaksForAnotherNode {
            certificate: identity.name,
            claimed: first.node.into(),
        }
        .into());
    }
    ctx.specs
        .borrow()
        .check_revoked(&first.node, identity.issued_unix_s)?;
    let params = *ctx.lease.params();
    if first.replicas as usize != params.replicas || first.lease > params.lease {
        return Err(Error::LeaseParamsDisagree {
            agent_lease: first.lease,
            agent_replicas: first.replicas,
            lease: params.lease,
            replicas: params.replicas,
        }
        .into());
    }

    let (tx, rx) = mpsc::channel(16);
    let stream = ctx.lease.next_stream.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!("lease", node.id = %first.node, stream);
    let task = LeaseStreamTask {
        ctx: ctx.clone(),
        node: first.node.clone(),
        issued_unix_s: identity.issued_unix_s,
        stream,
        last_assignments: None,
    };
    tokio::spawn(task.run(first, inbound, tx).instrument(span));
    Ok(Box::pin(ReceiverStream::new(rx)))
}

struct LeaseStreamTask {
    ctx: SessionContext,
    node: NodeId,
    /// When the stream's certificate was issued (for revocation).
    issued_unix_s: i64,
    stream: u64,
    last_assignments: Option<Vec<AssignedVip>>,
}

impl LeaseStreamTask {
    fn assignments(&self) -> Vec<AssignedVip> {
        let nodes = self.ctx.specs.borrow().clone();
        self.ctx.vips.borrow().assignments_for(&self.node, &nodes)
    }

    fn reply(&mut self, hb: Option<&LeaseHeartbeat>, acked: Vec<(String, Epoch)>) -> LeaseReply {
        let assignments = self.assignments();
        self.last_assignments = Some(assignments.clone());
        LeaseReply {
            replica: self.ctx.store.replica().to_owned(),
            seq: hb.map_or(0, |h| h.seq),
            sent_at: hb.map_or(Duration::ZERO, |h| h.sent_at),
            acked,
            assignments,
        }
    }

    async fn answer(
        &mut self,
        hb: &LeaseHeartbeat,
        tx: &mpsc::Sender<Result<pb::LeaseReply, Status>>,
    ) -> bool {
        let acked = self.ctx.lease.on_heartbeat(self.stream, hb);
        for (vip, _) in &acked {
            crate::metrics::metrics()
                .vip_lease_acks
                .with(&[vip.as_str()])
                .inc();
        }
        let reply = self.reply(Some(hb), acked);
        tx.send(Ok(reply.into())).await.is_ok()
    }

    async fn run<S>(
        mut self,
        first: LeaseHeartbeat,
        mut inbound: S,
        tx: mpsc::Sender<Result<pb::LeaseReply, Status>>,
    ) where
        S: Stream<Item = Result<pb::LeaseHeartbeat, Status>> + Unpin,
    {
        info!("lease stream open");
        let mut vips = self.ctx.vips.clone();
        let mut specs = self.ctx.specs.clone();
        let shutdown = self.ctx.shutdown.clone();
        let mut open = self.answer(&first, &tx).await;
        while open {
            open = tokio::select! {
                _ = shutdown.cancelled() => {
                    let _ = tx.send(Err(Error::ShuttingDown.into())).await;
                    false
                }
                changed = vips.changed() => changed.is_ok() && self.push_changes(&tx).await,
                // A revoked node gets no more acknowledgements: its leases
                // run out.
                changed = specs.changed() => changed.is_ok()
                    && still_trusted(&self.ctx, &self.node, self.issued_unix_s, &tx).await
                    && self.push_changes(&tx).await,
                message = inbound.next() => match message {
                    Some(Ok(m)) => match LeaseHeartbeat::try_from(m) {
                        Ok(hb) if hb.node == self.node => self.answer(&hb, &tx).await,
                        Ok(hb) => {
                            let _ = tx.send(Err(Error::StreamSpeaksForAnotherNode {
                                stream: self.node.clone(),
                                claimed: hb.node,
                            }.into())).await;
                            false
                        }
                        Err(e) => {
                            let _ = tx.send(Err(Error::from(e).into())).await;
                            false
                        }
                    },
                    None => false,
                    Some(Err(status)) => {
                        debug!(%status, "lease stream failed");
                        false
                    }
                },
            };
        }
        self.ctx.lease.close_stream(&self.node, self.stream);
        info!("lease stream closed");
    }

    /// Sends the assignments if they changed since the last reply.
    async fn push_changes(&mut self, tx: &mpsc::Sender<Result<pb::LeaseReply, Status>>) -> bool {
        if self.last_assignments.as_ref() == Some(&self.assignments()) {
            return true;
        }
        let reply = self.reply(None, Vec::new());
        tx.send(Ok(reply.into())).await.is_ok()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use steward_lease::Claim;
    use steward_proto::domain::{EventKind, Role};
    use tokio_stream::wrappers::ReceiverStream;

    use super::*;
    use crate::store::MemoryBackend;
    use crate::testing::{eventually, identity, node, put_roles, put_vip, vip_spec, TestReplica};
    use crate::vip::marker;

    pub(crate) struct Candidate {
        pub to_replica: mpsc::Sender<Result<pb::LeaseHeartbeat, Status>>,
        pub replies: LeaseStream,
    }

    pub(crate) fn heartbeat(id: &str, seq: u64, claims: Vec<Claim>) -> pb::LeaseHeartbeat {
        LeaseHeartbeat {
            node: node(id),
            seq,
            sent_at: Duration::from_millis(seq),
            claims,
            health: vec![("front".into(), true)],
            lease: LeaseParams::DEFAULT.lease,
            replicas: LeaseParams::DEFAULT.replicas as u32,
        }
        .into()
    }

    pub(crate) fn claim(epoch: Epoch) -> Claim {
        Claim {
            vip: "front".into(),
            epoch,
            released: false,
        }
    }

    /// Opens the lease stream of `cert` with `first`.
    pub(crate) async fn candidate(
        replica: &TestReplica,
        cert: &str,
        first: pb::LeaseHeartbeat,
    ) -> Result<Candidate, Status> {
        let (to_replica, inbound) = mpsc::channel(8);
        to_replica.send(Ok(first)).await.expect("open channel");
        let replies = open_stream(
            &replica.ctx,
            identity(cert, IdentityKind::Agent),
            ReceiverStream::new(inbound),
        )
        .await?;
        Ok(Candidate {
            to_replica,
            replies,
        })
    }

    impl Candidate {
        pub(crate) async fn reply(&mut self) -> LeaseReply {
            let reply = tokio::time::timeout(Duration::from_secs(3), self.replies.next())
                .await
                .expect("a reply within the deadline")
                .expect("the stream is open")
                .expect("not an error");
            LeaseReply::try_from(reply).expect("a valid reply")
        }
    }

    /// Two lb nodes, VIP `front` owned by n1 at the returned epoch, which
    /// the replica's acker knows.
    async fn owned_by_n1(replica: &TestReplica) -> Epoch {
        let store = replica.store();
        put_roles(store, "n1", &[Role::Lb]).await;
        put_roles(store, "n2", &[Role::Lb]).await;
        put_vip(store, &vip_spec("front", "198.18.0.100/24")).await;
        let fence = replica.lead().await;
        let event = store.event(EventKind::VipMoved, Some(node("n1")), "test".into());
        let inner = store.vip_assign_txn("front", None, &[], Some(node("n1")), &event);
        let epoch = fence.txn(store, inner).await.expect("fenced").revision as Epoch;
        let snapshot = eventually("the VIP cache to show the owner", || {
            let vips = replica.ctx.vips.borrow().clone();
            let owner = vips.vips.get("front")?.owner.clone()?;
            (owner == (Some(node("n1")), epoch)).then_some(vips)
        })
        .await;
        let hub = &replica.ctx.lease;
        hub.with_acker(|a| marker::feed(a, &snapshot, hub.now()));
        epoch
    }

    #[tokio::test]
    async fn the_hub_acks_only_the_owner_at_the_epoch_etcd_names() {
        let replica = TestReplica::start(MemoryBackend::new(), "c-1").await;
        let epoch = owned_by_n1(&replica).await;
        let hub = replica.ctx.lease.clone();

        let mut n1 = candidate(&replica, "n1", heartbeat("n1", 1, vec![claim(epoch)]))
            .await
            .expect("stream");
        let reply = n1.reply().await;
        assert_eq!(reply.acked, [("front".to_owned(), epoch)]);
        assert_eq!((reply.replica.as_str(), reply.seq), ("c-1", 1));
        let assignment = &reply.assignments[0].assignment;
        assert_eq!(
            (assignment.epoch, assignment.owner.clone()),
            (epoch, Some(node("n1")))
        );
        assert!(hub.healthy_candidate(&node("n1"), "front"));

        // Another node claiming the epoch, or the owner an older one: no ack.
        let mut n2 = candidate(&replica, "n2", heartbeat("n2", 1, vec![claim(epoch)]))
            .await
            .expect("stream");
        assert!(n2.reply().await.acked.is_empty());
        assert!(hub.healthy_candidate(&node("n2"), "front"));
        n1.to_replica
            .send(Ok(heartbeat("n1", 2, vec![claim(epoch - 1)])))
            .await
            .unwrap();
        let reply = n1.reply().await;
        assert_eq!(reply.seq, 2);
        assert!(reply.acked.is_empty());

        // A closed stream is no candidate any more.
        drop(n1);
        eventually("n1 to stop being a candidate", || {
            (!hub.healthy_candidate(&node("n1"), "front")).then_some(())
        })
        .await;
        assert!(hub.healthy_candidate(&node("n2"), "front"));
    }

    #[tokio::test]
    async fn lease_streams_refuse_other_nodes_and_disagreeing_timing() {
        let replica = TestReplica::start(MemoryBackend::new(), "c-1").await;
        let error = candidate(&replica, "n1", heartbeat("n2", 1, Vec::new()))
            .await
            .err()
            .expect("n1 may not speak for n2");
        assert_eq!(error.code(), tonic::Code::PermissionDenied, "{error}");

        let mut longer = LeaseHeartbeat::try_from(heartbeat("n1", 1, Vec::new())).unwrap();
        longer.lease = LeaseParams::DEFAULT.lease * 2;
        let error = candidate(&replica, "n1", longer.into())
            .await
            .err()
            .expect("a longer lease than the replica's");
        assert_eq!(error.code(), tonic::Code::InvalidArgument, "{error}");
        assert!(
            error.message().contains("lease parameters disagree"),
            "{error}"
        );

        // Mid-stream, a heartbeat for another node ends the stream.
        let mut n1 = candidate(&replica, "n1", heartbeat("n1", 1, Vec::new()))
            .await
            .expect("stream");
        n1.reply().await;
        n1.to_replica
            .send(Ok(heartbeat("n2", 2, Vec::new())))
            .await
            .unwrap();
        let error = tokio::time::timeout(Duration::from_secs(3), n1.replies.next())
            .await
            .expect("an answer within the deadline")
            .expect("an answer")
            .expect_err("refused");
        assert_eq!(error.code(), tonic::Code::PermissionDenied, "{error}");
    }
}
