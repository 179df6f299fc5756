//! `AgentService`: one bidirectional session per agent.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use steward_proto::converge::ConvergeReport;
use steward_proto::domain::{
    AgentMessage, CoordinatorMessage, DesiredState, Event, EventKind, Facts, GlusterReport, Health,
    NodeHealth, NodeId,
};
use steward_proto::pb;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn, Instrument};

use crate::auth::peer_identity;
use crate::cache::SpecSnapshot;
use crate::error::{Error, Result};
use crate::pki::{Identity, IdentityKind};
use crate::sessions::Sessions;
use crate::store::{encode, unix_ms, NodeStatusRecord, Store, Versioned};

/// How long a new session may take to say hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long after a node would count as unreachable its session checks
/// (a session checks its node's status on each message, when a deferred
/// status write has budget again, and when the node has been silent for
/// `agent_unreachable_after`: no periodic tick per session).
const SILENCE_MARGIN: Duration = Duration::from_millis(20);
/// Largest converge report stored (encoded). Reports are bounded by the
/// proto's limits, which allow more than etcd takes in one request.
pub const MAX_CONVERGE_REPORT_BYTES: usize = 64 * 1024;

/// What every session of this replica shares.
#[derive(Clone)]
pub struct SessionContext {
    pub store: Store,
    pub sessions: Sessions,
    /// This replica's view of node specs and addresses.
    pub specs: watch::Receiver<Arc<SpecSnapshot>>,
    /// The newest read barrier `specs` includes
    /// ([`crate::cache::caught_up`]).
    pub specs_seen: watch::Receiver<i64>,
    /// `specs`, `vips` and `orchestration` as of one etcd revision: what
    /// desired states are built from ([`crate::cache::Cut`]).
    pub cut: watch::Receiver<Arc<crate::cache::Cut>>,
    /// This replica's view of `vips/`.
    pub vips: watch::Receiver<Arc<crate::vip::VipSnapshot>>,
    /// This replica's view of `orchestration/` (kubeadm, Gluster).
    pub orchestration: watch::Receiver<Arc<crate::orchestrate::state::OrchestrationSnapshot>>,
    /// Opens the sealed cluster secrets; `None` without `[secrets]`.
    pub sealer: Option<Arc<crate::orchestrate::secrets::SecretBox>>,
    /// This replica's side of the VIP lease protocol.
    pub lease: Arc<crate::vip::lease_api::LeaseHub>,
    pub unreachable_after: Duration,
    pub shutdown: CancellationToken,
    pub cluster: String,
    /// `stewardctl logs` through this replica's sessions.
    pub logs: Arc<crate::logs::LogRouter>,
    /// The slices of the cluster view, shared by sessions.
    pub views: Arc<crate::desired::ViewCache>,
    pub limits: crate::config::SessionLimits,
    /// Sessions being admitted, and waiting to be.
    pub admission: Arc<Admission>,
    /// Node status writes in flight to etcd
    /// (`sessions.max_concurrent_status_writes`).
    pub status_writes: Arc<tokio::sync::Semaphore>,
    /// Wakes the sessions a cache change concerns (`crate::fanout::run`).
    pub fanout: Arc<crate::fanout::Fanout>,
}

impl SessionContext {
    /// How far apart this replica asks its agents' heartbeats to be now
    /// (`sessions.heartbeats_per_s`; 0: the agents' own interval). Agents
    /// waiting to be admitted heartbeat too, and count.
    pub fn heartbeat_interval_ms(&self) -> u32 {
        crate::sessions::heartbeat_interval_ms(
            self.sessions.count() + self.admission.waiting(),
            self.limits.heartbeats_per_s,
        )
    }

    /// This replica's spec snapshot once it holds every write to `nodes/`
    /// made before the call ([`crate::cache::caught_up`]).
    pub async fn fresh_specs(&self) -> Result<Arc<SpecSnapshot>> {
        crate::cache::caught_up(&self.store, &self.specs, &self.specs_seen).await
    }

    /// What `node` must be, from this replica's caches; `None` before
    /// they have all read etcd (an empty snapshot is not a state).
    pub fn desired_for(&self, node: &NodeId) -> Option<DesiredState> {
        let cut = self.cut.borrow().clone();
        self.desired_from(&cut, node)
    }

    /// What `node` must be, from `cut` (one revision of every cache a
    /// desired state is built from).
    fn desired_from(&self, cut: &crate::cache::Cut, node: &NodeId) -> Option<DesiredState> {
        if !cut.synced() {
            return None;
        }
        let crate::cache::Cut {
            specs,
            vips,
            orchestration,
        } = cut;
        let roles = specs
            .specs
            .get(node)
            .map(|s| s.value.roles.clone())
            .unwrap_or_default();
        let target = specs.rollout_target(node);
        let interest = crate::desired::Interest::for_node(&roles, specs.settings_for(node));
        let view = self.views.get(specs, vips, &interest, target.map(|t| t.0));
        let mut desired = crate::desired::desired_base(specs, &view, node);
        // The rollout's change of this node is one of its inputs.
        desired.revision = desired
            .revision
            .max(target.map_or(0, |t| t.2.max(0) as u64));
        let maintenance = specs.maintenance_set();
        orchestration.add_steps(
            &mut desired,
            node,
            &interest,
            &maintenance,
            self.sealer.as_deref(),
        );
        // A Kubernetes upgrade's stage, and readiness checks.
        crate::rollout::upgrade::add_steps(&mut desired, node, specs, orchestration);
        Some(desired)
    }

    /// The revision [`SessionContext::desired_for`] would give `node`,
    /// without building its state (listing a fleet stays linear); 0 before
    /// the caches are read.
    pub fn desired_revision_for(&self, node: &NodeId) -> u64 {
        let cut = self.cut.borrow().clone();
        let roles = match cut.specs.specs.get(node) {
            Some(s) if !s.value.roles.is_empty() => s.value.roles.clone(),
            // No role: the state is small, and steps (a reset after
            // leaving Kubernetes) may still count.
            _ => return self.desired_from(&cut, node).map_or(0, |d| d.revision),
        };
        if !cut.synced() {
            return 0;
        }
        let crate::cache::Cut {
            specs,
            vips,
            orchestration,
        } = &*cut;
        let target = specs.rollout_target(node);
        let interest = crate::desired::Interest::for_node(&roles, specs.settings_for(node));
        let view = self.views.get(specs, vips, &interest, target.map(|t| t.0));
        let steps = orchestration.revision_for(&interest);
        view.revision
            .max(crate::desired::own_revision(specs, node))
            .max(crate::desired::coordinator_revocations_revision(specs))
            .max(steps)
            .max(target.map_or(0, |t| t.2.max(0) as u64))
            .max(crate::rollout::upgrade::revision_for(
                node,
                specs,
                orchestration,
            ))
    }
}

/// Bounds the sessions a replica admits at once (each costs etcd reads and
/// writes), so that a cold start or a reconnect storm queues instead of
/// overwhelming etcd. A hello that would wait too long, or find the queue
/// full, is refused with a hint of when to come back ([`Pace`]): a fleet
/// reconnecting at once is spread over the time the replica needs to admit
/// it, instead of retrying into the same queue (each retry costs a TLS
/// handshake and, answered late, a session opened for nobody).
pub struct Admission {
    permits: Arc<tokio::sync::Semaphore>,
    waiting: std::sync::atomic::AtomicUsize,
    max_waiting: usize,
    max_wait: Duration,
    pace: Mutex<Pace>,
    /// Each node's hello budget: a node that reconnects in a loop (a stolen
    /// key, a broken agent) costs etcd a bounded amount.
    hellos: Mutex<HashMap<NodeId, StatusBudget>>,
    hello_limits: crate::config::SessionLimits,
}

/// Nodes whose hello budgets are remembered before idle ones are forgotten.
const MAX_TRACKED_HELLOS: usize = 65_536;

/// The shortest retry hint a busy replica gives.
const MIN_RETRY_HINT: Duration = Duration::from_millis(250);

/// How fast this replica admits sessions, and the retry times it has
/// handed out: each refused hello books the next free admission slot
/// after those already booked, so the hints spread the refused over the
/// time their admissions take.
#[derive(Debug)]
struct Pace {
    /// Smoothed time one admission holds its turn.
    turn: Duration,
    /// Turns held at once.
    concurrent: u32,
    /// The last booked slot.
    booked_until: Instant,
}

impl Pace {
    /// Time between admissions at the current rate.
    fn per_admission(&self) -> Duration {
        self.turn / self.concurrent.max(1)
    }

    fn observe(&mut self, turn: Duration) {
        // An exponentially weighted mean over the last ~20 admissions.
        self.turn = self.turn.mul_f64(0.95) + turn.mul_f64(0.05);
    }

    /// A retry time for a hello refused now, with `waiting` queued ahead.
    fn book(&mut self, now: Instant, waiting: usize) -> Duration {
        let per = self.per_admission();
        let queue_drained = now + per * u32::try_from(waiting).unwrap_or(u32::MAX);
        self.booked_until = self.booked_until.max(queue_drained) + per;
        let hint = self.booked_until - now;
        if hint > steward_proto::retry::MAX_RETRY_AFTER {
            // Past what agents honour: start the spread over.
            self.booked_until = now + steward_proto::retry::MAX_RETRY_AFTER;
        }
        hint.clamp(MIN_RETRY_HINT, steward_proto::retry::MAX_RETRY_AFTER)
    }
}

/// A turn to do a session's etcd work; its length feeds the pace.
pub struct Turn {
    admission: Arc<Admission>,
    _permit: tokio::sync::OwnedSemaphorePermit,
    started: Instant,
}

/// A place in the admission queue, until its turn comes.
type WaitForTurn = Pin<Box<dyn std::future::Future<Output = Result<Turn>> + Send>>;

/// Counts a hello as waiting while it exists.
struct Waiting(Arc<Admission>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0
            .waiting
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let held = self.started.elapsed();
        lock(&self.admission.pace).observe(held);
    }
}

/// Longest a session waits for its turn on an answered stream (heartbeats
/// acked) before it is told to come back later.
const MAX_QUEUED_WAIT: Duration = Duration::from_secs(120);

impl Admission {
    pub fn new(limits: &crate::config::SessionLimits) -> Self {
        Self {
            permits: Arc::new(tokio::sync::Semaphore::new(limits.max_concurrent_opens)),
            waiting: Default::default(),
            max_waiting: limits.max_queued_opens,
            max_wait: Duration::from_millis(limits.max_open_wait_ms),
            pace: Mutex::new(Pace {
                turn: Duration::from_millis(20),
                concurrent: u32::try_from(limits.max_concurrent_opens).unwrap_or(u32::MAX),
                booked_until: Instant::now(),
            }),
            hellos: Default::default(),
            hello_limits: crate::config::SessionLimits {
                status_write_burst: limits.hello_burst,
                status_write_interval_ms: limits.hello_interval_ms,
                ..limits.clone()
            },
        }
    }

    /// Takes one of `node`'s hellos; `UNAVAILABLE` when it has none left.
    fn hello(&self, node: &NodeId) -> Result<()> {
        let now = Instant::now();
        let mut hellos = lock(&self.hellos);
        if hellos.len() >= MAX_TRACKED_HELLOS {
            // Forget the nodes whose budget is full again anyway.
            hellos.retain(|_, b| !b.full(now));
        }
        let budget = hellos
            .entry(node.clone())
            .or_insert_with(|| StatusBudget::new(&self.hello_limits));
        if budget.take(now) {
            return Ok(());
        }
        crate::metrics::metrics().sessions_refused_busy.inc();
        Err(Error::Busy {
            reason: format!(
                "node {node} opened sessions more often than sessions.hello_burst / \
                 sessions.hello_interval_ms allow"
            ),
            retry_after: budget.next_in(now),
        })
    }

    /// Hellos queued or being admitted.
    pub fn waiting(&self) -> usize {
        self.waiting.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// `UNAVAILABLE` with a hint of when to come back.
    fn refuse(&self, reason: String) -> Error {
        crate::metrics::metrics().sessions_refused_busy.inc();
        let waiting = self.waiting.load(std::sync::atomic::Ordering::Acquire);
        let retry_after = lock(&self.pace).book(Instant::now(), waiting);
        Error::Busy {
            reason,
            retry_after,
        }
    }

    /// A place in the queue (turns come first come, first served), or
    /// `UNAVAILABLE` with a retry hint when `max_queued_opens` wait.
    fn queue(self: &Arc<Self>) -> Result<WaitForTurn> {
        use std::sync::atomic::Ordering;
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(self.refuse(format!(
                "{} sessions are waiting to be admitted here",
                self.max_waiting
            )));
        }
        let waiting = Waiting(self.clone());
        let admission = self.clone();
        Ok(Box::pin(async move {
            let permit = admission.permits.clone().acquire_owned().await;
            drop(waiting);
            let permit = permit.map_err(|_| Error::ShuttingDown)?;
            Ok(Turn {
                admission,
                _permit: permit,
                started: Instant::now(),
            })
        }))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct AgentApi {
    ctx: SessionContext,
    /// Signs renewed agent certificates (`[pki]`).
    signer: Option<Arc<crate::pki::Signer>>,
}

impl AgentApi {
    pub fn new(ctx: SessionContext) -> Self {
        Self { ctx, signer: None }
    }

    pub fn with_signer(mut self, signer: Option<Arc<crate::pki::Signer>>) -> Self {
        self.signer = signer;
        self
    }
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<pb::CoordinatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for AgentApi {
    type SessionStream = SessionStream;
    type LeaseStream = crate::vip::lease_api::LeaseStream;

    async fn lease(
        &self,
        request: Request<Streaming<pb::LeaseHeartbeat>>,
    ) -> Result<Response<Self::LeaseStream>, Status> {
        crate::vip::lease_api::open(&self.ctx, request).await
    }

    async fn renew_certificate(
        &self,
        request: Request<pb::RenewCertificateRequest>,
    ) -> Result<Response<pb::IssuedCertificate>, Status> {
        Ok(Response::new(
            crate::bootstrap::renew(self.signer.as_deref(), &self.ctx.store, &request).await?,
        ))
    }

    async fn session(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let identity = peer_identity(&request)?;
        // With TLS, tonic records the TCP peer in `TlsConnectInfo`, which
        // `remote_addr` reads too.
        let remote = request.remote_addr().map(|a| a.ip().to_canonical());
        let stream = open_session(self.ctx.clone(), identity, remote, request.into_inner()).await?;
        Ok(Response::new(stream))
    }
}

/// Opens the session of the agent with the verified certificate
/// `identity`, whose messages arrive on `inbound` from `remote`: checks its
/// hello, records it, and serves it on a task of its own.
pub(crate) async fn open_session<S>(
    ctx: SessionContext,
    identity: Identity,
    remote: Option<IpAddr>,
    mut inbound: S,
) -> Result<SessionStream, Status>
where
    S: Stream<Item = Result<pb::AgentMessage, Status>> + Unpin + Send + 'static,
{
    if identity.kind != IdentityKind::Agent {
        return Err(Error::WrongCertificateKind {
            identity: identity.to_string(),
            may: "open an agent session",
            only: "agent",
        }
        .into());
    }
    let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.next())
        .await
        .map_err(|_| Error::FirstMessageLate {
            first: "hello",
            within: HELLO_TIMEOUT,
        })?
        .transpose()?
        .ok_or(Error::ClosedBeforeFirstMessage { first: "hello" })?;
    let AgentMessage::Hello {
        node,
        facts,
        last_applied_revision,
        agent_version,
        advertise_address,
    } = AgentMessage::try_from(first).map_err(Error::from)?
    else {
        return Err(Error::FirstMessageNotHello.into());
    };
    if node.as_str() != identity.name {
        return Err(Error::SpeaksForAnotherNode {
            certificate: identity.name.clone(),
            claimed: node.as_str().to_owned(),
        }
        .into());
    }

    if let Some(a) = advertise_address.filter(|a| a.is_unspecified() || a.is_multicast()) {
        return Err(Error::UnreachableAddress(a).into());
    }

    let (tx, rx) = mpsc::channel(16);
    let admission = ctx.admission.clone();
    admission.hello(&node)?;
    let hello = Hello {
        node: node.clone(),
        issued_unix_s: identity.issued_unix_s,
        facts,
        applied_revision: last_applied_revision,
        agent_version,
        address: advertise_address.or(remote),
    };
    let mut turn = admission.queue()?;
    let span = tracing::info_span!("session", node.id = %node);
    // A turn within `max_open_wait_ms`: the session opens before the answer
    // (an error is the answer). Otherwise the answer goes out now and the
    // session waits for its turn on the stream, its heartbeats acked: queued,
    // not refused (the agent would give up on an unanswered request after
    // 4 s and come back, each time with a TLS handshake).
    match tokio::time::timeout(admission.max_wait, &mut turn).await {
        Ok(turn) => {
            let turn = turn?;
            let session = Box::pin(NodeSession::open(ctx, hello)).await?;
            drop(turn);
            tokio::spawn(session.run(inbound, tx).instrument(span));
        }
        Err(_) => {
            crate::metrics::metrics().sessions_queued.inc();
            tokio::spawn(wait_then_serve(ctx, turn, hello, inbound, tx).instrument(span));
        }
    }
    Ok(Box::pin(
        ReceiverStream::new(rx).map(|m| m.map(|boxed| *boxed)),
    ))
}

/// Serves a session whose turn had not come when its stream was answered:
/// acks its heartbeats (keeping the latest report for the session) until
/// the turn comes, then opens it. The agent leaving gives up its place.
async fn wait_then_serve<S>(
    ctx: SessionContext,
    turn: WaitForTurn,
    hello: Hello,
    mut inbound: S,
    tx: mpsc::Sender<Outgoing>,
) where
    S: Stream<Item = Result<pb::AgentMessage, Status>> + Unpin + Send + 'static,
{
    let mut report: Option<pb::AgentMessage> = None;
    // The heartbeat interval last asked for, which the session starts from.
    let mut told = 0;
    let deadline = tokio::time::sleep(MAX_QUEUED_WAIT);
    tokio::pin!(turn, deadline);
    let turn = loop {
        tokio::select! {
            turn = &mut turn => break turn,
            _ = &mut deadline => {
                let busy = ctx.admission.refuse(format!(
                    "no turn to be admitted within {} s",
                    MAX_QUEUED_WAIT.as_secs()
                ));
                let _ = tx.send(Err(busy.into())).await;
                return;
            }
            message = inbound.next() => {
                let Some(Ok(message)) = message else { return };
                match AgentMessage::try_from(message.clone()) {
                    Ok(AgentMessage::Heartbeat { seq, .. }) => {
                        told = ctx.heartbeat_interval_ms();
                        let ack = CoordinatorMessage::HeartbeatAck {
                            seq,
                            replica: ctx.store.replica().to_owned(),
                            interval_ms: told,
                        };
                        if tx.try_send(outgoing(ack)).is_err() {
                            return;
                        }
                    }
                    Ok(AgentMessage::Report { .. }) => report = Some(message),
                    // Nothing else is expected before a session opens.
                    _ => {}
                }
            }
        }
    };
    let opened = match turn {
        Ok(turn) => {
            // Boxed: its etcd futures would otherwise stay in this task's
            // state for the whole session.
            let opened = Box::pin(NodeSession::open(ctx, hello)).await;
            drop(turn);
            opened
        }
        Err(error) => Err(error),
    };
    match opened {
        Ok(session) => {
            session
                .ctx
                .sessions
                .update(&session.node, session.session, |live| {
                    live.heartbeat_every = Duration::from_millis(told.into());
                });
            let inbound = tokio_stream::iter(report.map(Ok)).chain(inbound);
            session.run(inbound, tx).await;
        }
        Err(error) => {
            let _ = tx.send(Err(error.into())).await;
        }
    }
}

/// False, after telling the agent why, once the certificate (issued at
/// `issued_unix_s`) a stream of `node` was opened with is revoked, as this
/// replica's spec cache sees it.
pub(crate) async fn still_trusted<M>(
    ctx: &SessionContext,
    node: &NodeId,
    issued_unix_s: i64,
    tx: &mpsc::Sender<Result<M, Status>>,
) -> bool {
    let verdict = ctx.specs.borrow().check_revoked(node, issued_unix_s);
    match verdict {
        Ok(()) => true,
        Err(error) => {
            warn!(node.id = %node, "certificate revoked; closing the stream");
            let _ = tx.send(Err(error.into())).await;
            false
        }
    }
}

/// What a session queues for its agent. Boxed: tokio allocates a queue's
/// slots 32 at a time, and 32 inline messages of 344 bytes were 11 KB per
/// session (110 MB at 10,000 agents) for queues that are nearly always
/// empty.
type Outgoing = std::result::Result<Box<pb::CoordinatorMessage>, Status>;

fn outgoing(message: CoordinatorMessage) -> Outgoing {
    Ok(Box::new(message.into()))
}

/// What a session starts from: the agent's hello, checked.
struct Hello {
    node: NodeId,
    /// When the caller's certificate was issued (revocation covers it or not).
    issued_unix_s: i64,
    facts: Facts,
    applied_revision: u64,
    agent_version: String,
    /// Where the cluster reaches the node: advertised, or the session's
    /// source address.
    address: Option<IpAddr>,
}

/// One agent's session on this replica: the loop that serves the agent
/// (heartbeat acks, desired-state pushes, log requests). It never waits on
/// etcd: what it has to record goes to its [`StatusWriter`], so a slow etcd
/// cannot hold up heartbeat acks (agents would give up on the session and
/// reconnect, which costs etcd more).
struct NodeSession {
    ctx: SessionContext,
    node: NodeId,
    issued_unix_s: i64,
    session: u64,
    last_sent: Option<DesiredState>,
    /// The status last handed to the writer.
    shown: NodeStatusRecord,
    /// The facts as stored (bounded), and facts the agent sent again that
    /// wait for [`FACTS_WRITE_EVERY`] to pass since the last write.
    facts: Facts,
    facts_pending: Option<Facts>,
    facts_written_at: Option<Instant>,
    /// Status writes this node may still make now (refilled over time).
    status_budget: StatusBudget,
    /// Cancelled when a newer session of the same node replaces this one
    /// (here, or recorded by another replica).
    superseded: CancellationToken,
    status_tx: watch::Sender<NodeStatusRecord>,
    reports_tx: watch::Sender<Option<ConvergeReport>>,
    writer: tokio::task::JoinHandle<bool>,
    /// The node's gluster reports, for [`write_gluster_reports`] (started
    /// at the first one).
    gluster_tx: Option<watch::Sender<Option<GlusterReport>>>,
}

/// Writes what a session has to record, off the session loop: the node's
/// status (the latest handed over; compare-and-set, so a stale session
/// never overwrites a newer one) and its converge report (on outcome
/// changes), retrying on etcd trouble.
struct StatusWriter {
    ctx: SessionContext,
    node: NodeId,
    session: u64,
    /// The status as last written by this session, and its revision.
    status: NodeStatusRecord,
    status_rev: i64,
    converge: ConvergeTracker,
    superseded: CancellationToken,
}

/// How often a writer retries what etcd did not take.
const WRITE_RETRY: Duration = Duration::from_secs(1);
/// Facts sent again mid-session (a reboot became needed) are written at
/// most this often per session; changes in between coalesce (the latest
/// is written with the next message after it).
const FACTS_WRITE_EVERY: Duration = Duration::from_secs(5);

impl NodeSession {
    async fn open(ctx: SessionContext, hello: Hello) -> Result<Self> {
        let Hello {
            node,
            issued_unix_s,
            facts,
            applied_revision,
            agent_version,
            address,
        } = hello;
        let now = unix_ms();
        let record = ctx.store.node(&node).await?;
        if let Some(revoked) = &record.revoked {
            revoked.value.check(&node, issued_unix_s)?;
        }
        let first_time = record.spec.is_none() && record.status.is_none();
        let facts = bound_facts(facts, ctx.limits.max_facts_bytes);
        let facts_changed = record.facts.as_ref().map(|f| &f.value) != Some(&facts);
        let status = NodeStatusRecord {
            health: NodeHealth::Healthy,
            last_health: Health::default(),
            replica: Some(ctx.store.replica().to_owned()),
            last_seen_unix_ms: now,
            applied_revision,
            agent_version,
        };
        let superseded = CancellationToken::new();
        let session = ctx.sessions.next_id();
        let mut writer = StatusWriter {
            ctx: ctx.clone(),
            node: node.clone(),
            session,
            status_rev: record.status.map(|s| s.mod_revision).unwrap_or(0),
            status: status.clone(),
            converge: ConvergeTracker::new(record.converge),
            superseded: superseded.clone(),
        };
        // The address, the facts and the status at once (each its own
        // compare-and-set or put; a session open waits for one round trip,
        // not three). The status decides: a session that cannot record
        // itself never replaces the one before it.
        let address_written = async {
            match address {
                Some(address) => {
                    record_address(&ctx.store, &node, address, record.address.clone()).await
                }
                None => Ok(()),
            }
        };
        // The reboot-required marker follows the facts (written with them;
        // alone when facts stored before the marker existed disagree).
        let marker = record.reboot_required.as_ref().map(|m| &m.value);
        let facts_written = async {
            if facts_changed {
                ctx.store.put_facts(&node, &facts, marker).await
            } else {
                let need = facts.reboot_required.as_ref();
                ctx.store.sync_reboot_marker(&node, need, marker).await
            }
        };
        let (address_written, facts_written, status_written) = tokio::join!(
            address_written,
            facts_written,
            writer.write_status(status.clone(), true)
        );
        address_written?;
        facts_written?;
        status_written?;
        ctx.sessions.open(
            &node,
            session,
            applied_revision,
            now,
            superseded.clone(),
            writer.status_rev,
        );
        // The events are the writer's first job, after the admission turn
        // (nothing waits for them).
        let mut opening_events = Vec::new();
        if first_time {
            opening_events.push((EventKind::NodeRegistered, format!("{node} registered")));
        }
        opening_events.push((
            EventKind::NodeConnected,
            format!("{node} connected to {}", ctx.store.replica()),
        ));
        info!(node.id = %node, node.address = ?address, "session opened");
        let (status_tx, status_rx) = watch::channel(status.clone());
        let (reports_tx, reports_rx) = watch::channel(None);
        let span = tracing::info_span!("status_writer", node.id = %node);
        let writer = tokio::spawn(
            async move {
                for (kind, message) in opening_events {
                    Box::pin(writer.event(kind, message)).await;
                }
                writer.run(status_rx, reports_rx).await
            }
            .instrument(span),
        );
        Ok(Self {
            status_budget: StatusBudget::new(&ctx.limits),
            ctx,
            node,
            issued_unix_s,
            session,
            last_sent: None,
            shown: status,
            facts,
            facts_pending: None,
            facts_written_at: None,
            superseded,
            status_tx,
            reports_tx,
            writer,
            gluster_tx: None,
        })
    }

    /// Hands the status to the writer if what an operator would see has
    /// changed, at most at the node's write rate (changes in between
    /// coalesce: the next check with budget hands over the latest). Returns
    /// when to check again if no message comes first: when the budget has
    /// a write again (a change is waiting), or when the node would count as
    /// unreachable without another heartbeat.
    fn sync_status(&mut self) -> tokio::time::Instant {
        let now = Instant::now();
        let unreachable_after = self.ctx.unreachable_after;
        let seen = self.ctx.sessions.with(&self.node, |live| {
            (
                live.last_heartbeat,
                live.node_health(now, unreachable_after),
                live.applied_revision,
                live.unreachable_after(unreachable_after),
            )
        });
        let Some((last_heartbeat, health, applied_revision, after)) = seen else {
            return (now + unreachable_after + SILENCE_MARGIN).into();
        };
        let silent_for = after + SILENCE_MARGIN;
        let silence = (last_heartbeat + silent_for).max(now + SILENCE_MARGIN);
        if health == self.shown.health && applied_revision == self.shown.applied_revision {
            return silence.into();
        }
        let Some(live) = self.ctx.sessions.get(&self.node) else {
            return (now + silent_for).into();
        };
        if !self.status_budget.take(now) {
            crate::metrics::metrics().status_writes_deferred.inc();
            let refill = now + self.status_budget.next_in(now) + SILENCE_MARGIN;
            return refill.min(silence).into();
        }
        let mut next = self.shown.clone();
        next.health = health;
        next.last_health = live.health;
        next.last_seen_unix_ms = live.last_seen_unix_ms;
        next.applied_revision = live.applied_revision;
        info!(node.id = %self.node, health = %health, applied = live.applied_revision, "node status changed");
        self.shown = next.clone();
        self.status_tx.send_replace(next);
        silence.into()
    }

    /// Sends the desired state if it differs from the last one sent (so
    /// changes elsewhere, e.g. VIP owners, push nothing). Nothing is sent
    /// before both caches have read etcd: an empty snapshot is not a state.
    async fn push_desired(&mut self, tx: &mpsc::Sender<Outgoing>) -> bool {
        let Some(desired) = self.ctx.desired_for(&self.node) else {
            return true;
        };
        if self.last_sent.as_ref() == Some(&desired) {
            return true;
        }
        crate::metrics::metrics().desired_pushes.inc();
        self.last_sent = Some(desired.clone());
        tx.send(outgoing(CoordinatorMessage::DesiredState(Box::new(
            desired,
        ))))
        .await
        .is_ok()
    }

    async fn run<S>(mut self, mut inbound: S, tx: mpsc::Sender<Outgoing>)
    where
        S: Stream<Item = Result<pb::AgentMessage, Status>> + Unpin,
    {
        // Registered before the first push: no change falls in between.
        let wake = self.ctx.fanout.register(&self.node, self.session);
        // The futures of the loop below are made once, not once per message
        // (each would register with and leave a `Notify` per heartbeat).
        let woken = wake.notified();
        let shutdown = self.ctx.shutdown.clone();
        let shutting_down = shutdown.cancelled();
        let replaced = self.superseded.clone();
        let is_replaced = replaced.cancelled();
        let check = tokio::time::sleep(self.ctx.unreachable_after);
        tokio::pin!(woken, shutting_down, is_replaced, check);
        let mut superseded = false;
        // Log requests for this node's agent (`crate::logs`).
        let (commands_tx, mut commands) = mpsc::channel::<CoordinatorMessage>(8);
        self.ctx.logs.attach(&self.node, self.session, commands_tx);
        if self.push_desired(&tx).await {
            loop {
                let keep_going = tokio::select! {
                    Some(command) = commands.recv() => tx.send(outgoing(command)).await.is_ok(),
                    _ = &mut shutting_down => {
                        let _ = tx.send(Err(Error::ShuttingDown.into())).await;
                        false
                    }
                    _ = &mut is_replaced => {
                        // A newer session of this node owns the status now.
                        let _ = tx.try_send(Err(Error::Superseded.into()));
                        superseded = true;
                        false
                    }
                    _ = &mut woken => {
                        woken.set(wake.notified());
                        still_trusted(&self.ctx, &self.node, self.issued_unix_s, &tx).await
                            && self.push_desired(&tx).await
                    }
                    _ = &mut check => {
                        check.as_mut().reset(self.sync_status());
                        true
                    }
                    msg = inbound.next() => match msg {
                        Some(Ok(m)) => {
                            let more = self.on_message(m, &tx).await;
                            // The check runs when the node would turn
                            // unreachable anyway; sooner only for a
                            // deferred status write.
                            let next = self.sync_status();
                            if next < check.deadline() {
                                check.as_mut().reset(next);
                            }
                            more
                        }
                        None => false,
                        Some(Err(status)) => {
                            info!(error = %status, "session stream failed");
                            false
                        }
                    },
                };
                if !keep_going {
                    break;
                }
            }
        }
        self.ctx.fanout.unregister(&self.node, self.session);
        self.close(superseded).await;
    }

    /// Writes facts the agent sent again, if they differ from the stored
    /// ones and the last such write is [`FACTS_WRITE_EVERY`] old (off the
    /// loop: the session never waits on etcd).
    fn flush_facts(&mut self) {
        if self.facts_pending.is_none()
            || self
                .facts_written_at
                .is_some_and(|at| at.elapsed() < FACTS_WRITE_EVERY)
        {
            return;
        }
        let Some(facts) = self.facts_pending.take() else {
            return;
        };
        // The marker as the last write left it.
        let marker = self
            .facts
            .reboot_required
            .as_ref()
            .map(crate::store::RebootRequiredRecord::from);
        self.facts = facts.clone();
        self.facts_written_at = Some(Instant::now());
        let (store, node) = (self.ctx.store.clone(), self.node.clone());
        tokio::spawn(
            async move {
                if let Err(error) = store.put_facts(&node, &facts, marker.as_ref()).await {
                    warn!(%error, "could not write the facts sent again");
                }
            }
            .instrument(tracing::info_span!("facts_write", node.id = %self.node)),
        );
    }

    async fn on_message(&mut self, message: pb::AgentMessage, tx: &mpsc::Sender<Outgoing>) -> bool {
        self.flush_facts();
        match AgentMessage::try_from(message) {
            Ok(AgentMessage::Heartbeat { seq, health, .. }) => {
                crate::metrics::metrics().heartbeats.inc();
                let now = unix_ms();
                let interval_ms = self.ctx.heartbeat_interval_ms();
                self.ctx.sessions.update(&self.node, self.session, |live| {
                    live.last_heartbeat = Instant::now();
                    live.last_seen_unix_ms = now;
                    live.health = health;
                    live.heartbeat_every = Duration::from_millis(interval_ms.into());
                });
                let ack = CoordinatorMessage::HeartbeatAck {
                    seq,
                    replica: self.ctx.store.replica().to_owned(),
                    interval_ms,
                };
                tx.send(outgoing(ack)).await.is_ok()
            }
            Ok(AgentMessage::Report {
                applied_revision,
                converge,
            }) => {
                self.ctx.sessions.update(&self.node, self.session, |live| {
                    live.applied_revision = applied_revision;
                });
                if let Some(report) = converge {
                    crate::metrics::metrics().converge_report(&report);
                    // Only steps this session assigned to this node count.
                    let assigned: Vec<String> = self
                        .last_sent
                        .iter()
                        .flat_map(|d| d.tasks.iter().map(|t| t.id.clone()))
                        .collect();
                    let (store, node) = (self.ctx.store.clone(), self.node.clone());
                    let orchestration = self.ctx.orchestration.borrow().clone();
                    let progress_report = report.clone();
                    // Rare (a step done) and idempotent: off the loop.
                    tokio::spawn(async move {
                        let assigned: Vec<&str> = assigned.iter().map(String::as_str).collect();
                        crate::orchestrate::progress::record_kubernetes_progress(
                            &store,
                            &node,
                            &progress_report,
                            &assigned,
                            &orchestration,
                        )
                        .await;
                    });
                    self.reports_tx.send_replace(Some(report));
                }
                true
            }
            Ok(AgentMessage::LogChunk(chunk)) => {
                self.ctx.logs.deliver(chunk);
                true
            }
            Ok(AgentMessage::Gluster(report)) => {
                match &self.gluster_tx {
                    Some(tx) => {
                        tx.send_replace(Some(report));
                    }
                    None => {
                        let (tx, rx) = watch::channel(Some(report));
                        let span = tracing::info_span!("gluster_writer", node.id = %self.node);
                        tokio::spawn(
                            write_gluster_reports(
                                self.ctx.store.clone(),
                                self.node.clone(),
                                rx,
                                self.superseded.clone(),
                            )
                            .instrument(span),
                        );
                        self.gluster_tx = Some(tx);
                    }
                }
                true
            }
            Ok(AgentMessage::Facts(facts)) => {
                let facts = bound_facts(facts, self.ctx.limits.max_facts_bytes);
                self.facts_pending = (facts != self.facts).then_some(facts);
                self.flush_facts();
                true
            }
            Ok(AgentMessage::Hello { .. }) => {
                let _ = tx.send(Err(Error::HelloTwice.into())).await;
                false
            }
            Err(e) => {
                warn!(error = %e, "invalid message from agent; closing session");
                let _ = tx.send(Err(Error::from(e).into())).await;
                false
            }
        }
    }

    async fn close(self, superseded: bool) {
        self.ctx.logs.detach(&self.node, self.session);
        self.ctx.sessions.close(&self.node, self.session);
        info!(node.id = %self.node, superseded, "session closed");
        if superseded {
            // Its successor owns the status: the writer stops as it is.
            self.superseded.cancel();
            return;
        }
        let mut last = self.shown.clone();
        last.replica = None;
        last.health = NodeHealth::Disconnected;
        last.last_seen_unix_ms = unix_ms();
        self.status_tx.send_replace(last);
        drop(self.status_tx);
        drop(self.reports_tx);
        // The writer records the disconnect (and its event) and ends.
        let _ = self.writer.await;
    }
}

/// Writes each gluster report of a session (the latest; an agent sends one
/// only when it changed) until the session ends or is replaced, retrying
/// on etcd trouble.
async fn write_gluster_reports(
    store: Store,
    node: NodeId,
    mut reports: watch::Receiver<Option<GlusterReport>>,
    superseded: CancellationToken,
) {
    loop {
        let Some(report) = reports.borrow_and_update().clone() else {
            return;
        };
        while let Err(error) = store.put_gluster(&node, &report).await {
            warn!(%error, "gluster report write failed");
            if reports.has_changed().is_err() {
                // The session is over: its next one sends the report again.
                return;
            }
            tokio::select! {
                _ = superseded.cancelled() => return,
                _ = tokio::time::sleep(WRITE_RETRY) => {}
            }
        }
        tokio::select! {
            _ = superseded.cancelled() => return,
            r = reports.changed() => if r.is_err() { return },
        }
    }
}

impl StatusWriter {
    async fn event(&self, kind: EventKind, message: String) {
        let event = Event {
            revision: 0,
            at_unix_ms: unix_ms(),
            kind,
            node: Some(self.node.clone()),
            replica: self.ctx.store.replica().to_owned(),
            message,
        };
        if let Err(error) = self.ctx.store.record_event(&event).await {
            warn!(%error, "could not record event");
        }
    }

    /// Writes the latest status and report handed over until the session
    /// ends (its senders dropped) or is replaced; the last status written
    /// is the disconnect, recorded with its event. Whether it was.
    async fn run(
        mut self,
        mut status: watch::Receiver<NodeStatusRecord>,
        mut reports: watch::Receiver<Option<ConvergeReport>>,
    ) -> bool {
        let (mut status_open, mut reports_open) = (true, true);
        // Something etcd did not take yet: retry after WRITE_RETRY (no
        // periodic tick otherwise: 10,000 idle sessions, 10,000 wake-ups
        // a second).
        let mut pending = false;
        loop {
            tokio::select! {
                _ = self.superseded.cancelled() => return false,
                r = status.changed(), if status_open => status_open = r.is_ok(),
                r = reports.changed(), if reports_open => match r {
                    Ok(()) => {
                        if let Some(report) = reports.borrow_and_update().clone() {
                            self.converge.observe(report);
                        }
                    }
                    Err(_) => reports_open = false,
                },
                _ = tokio::time::sleep(WRITE_RETRY), if pending => {}
            }
            pending = false;
            let next = status.borrow_and_update().clone();
            if next != self.status {
                // The etcd futures are boxed: held inline, their state would
                // sit in every idle session's task (10,000 of them).
                match Box::pin(self.write_status(next, false)).await {
                    Ok(true) => {}
                    Ok(false) => {
                        // Another replica serves the node now.
                        self.superseded.cancel();
                        return false;
                    }
                    // etcd trouble: the next tick tries again, unless the
                    // session is over (the leader's sweep marks it then).
                    Err(error) => {
                        warn!(%error, "status write failed");
                        if !status_open {
                            return false;
                        }
                        pending = true;
                        continue;
                    }
                }
            }
            if let Err(error) = Box::pin(self.flush_converge()).await {
                warn!(%error, "converge report write failed");
            }
            pending = pending || self.converge.pending().is_some();
            if !status_open {
                break;
            }
        }
        let disconnected = self.status.health == NodeHealth::Disconnected;
        if disconnected {
            let message = format!(
                "{} disconnected from {}",
                self.node,
                self.ctx.store.replica()
            );
            Box::pin(self.event(EventKind::NodeDisconnected, message)).await;
        }
        disconnected
    }

    /// Writes `next` if nobody else wrote the status since this session did.
    /// Returns false when another replica now serves the node.
    /// With `take_over`, it overwrites whatever another replica recorded
    /// (the agent is here now).
    async fn write_status(&mut self, next: NodeStatusRecord, take_over: bool) -> Result<bool> {
        for _ in 0..4 {
            // A replaced session writes nothing more: its successor owns
            // the status.
            if self.superseded.is_cancelled() {
                return Ok(false);
            }
            let written = {
                // Closed only if the replica is going away.
                let _turn = self
                    .ctx
                    .status_writes
                    .acquire()
                    .await
                    .map_err(|_| Error::ShuttingDown)?;
                self.ctx
                    .store
                    .put_status_if(&self.node, self.status_rev, &next)
                    .await?
            };
            if let Some(rev) = written {
                self.status = next;
                self.status_rev = rev;
                self.ctx
                    .sessions
                    .wrote_status(&self.node, self.session, rev);
                return Ok(true);
            }
            // Someone else wrote: the leader marking us gone, or another
            // replica that now serves this node.
            let current = self.ctx.store.node(&self.node).await?.status;
            match current {
                Some(s)
                    if !take_over
                        && s.value
                            .replica
                            .as_deref()
                            .is_some_and(|r| r != self.ctx.store.replica()) =>
                {
                    return Ok(false)
                }
                Some(s) => self.status_rev = s.mod_revision,
                None => self.status_rev = 0,
            }
        }
        Err(Error::Conflict {
            key: self.ctx.store.keys().node_status(&self.node),
        })
    }

    /// Stores the agent's latest converge report if etcd does not have its
    /// outcome yet. Compare-and-set like the status: when another session
    /// wrote in between, that one wins unless the status says this replica
    /// serves the node.
    async fn flush_converge(&mut self) -> Result<()> {
        for _ in 0..4 {
            let Some(report) = self.converge.pending() else {
                return Ok(());
            };
            let encoded = encode(report);
            if encoded.len() > MAX_CONVERGE_REPORT_BYTES {
                warn!(
                    bytes = encoded.len(),
                    limit = MAX_CONVERGE_REPORT_BYTES,
                    "converge report too large to store; dropped"
                );
                self.converge.drop_pending();
                return Ok(());
            }
            let store = &self.ctx.store;
            if let Some(rev) = store
                .put_converge_if(&self.node, self.converge.stored_rev, encoded)
                .await?
            {
                self.converge.written(rev);
                return Ok(());
            }
            let record = store.node(&self.node).await?;
            self.converge.reset(record.converge);
            let serving = record
                .status
                .is_some_and(|s| s.value.replica.as_deref() == Some(store.replica()));
            if !serving {
                self.converge.drop_pending();
                return Ok(());
            }
        }
        Err(Error::Conflict {
            key: self.ctx.store.keys().node_converge(&self.node),
        })
    }
}

/// Records where the cluster reaches `node` unless etcd already says so
/// (`stored`, as read at session open). The session that opens last wins.
async fn record_address(
    store: &Store,
    node: &NodeId,
    address: IpAddr,
    mut stored: Option<Versioned<IpAddr>>,
) -> Result<()> {
    for _ in 0..4 {
        if stored.as_ref().is_some_and(|s| s.value == address) {
            return Ok(());
        }
        let expected = stored.as_ref().map_or(0, |s| s.mod_revision);
        if store
            .put_address_if(node, expected, address)
            .await?
            .is_some()
        {
            info!(node.id = %node, node.address = %address, "node address recorded");
            return Ok(());
        }
        stored = store.node(node).await?.address;
    }
    Err(Error::Conflict {
        key: store.keys().node_address(node),
    })
}

/// A node's converge report as etcd holds it and as the agent last sent
/// it. etcd hears of a report only when its outcome changed: the agent
/// reports when its outcome or applied revision changed, and a new
/// run's timing alone is not worth a write.
#[derive(Debug, Default)]
struct ConvergeTracker {
    /// What etcd holds.
    stored: Option<ConvergeReport>,
    /// Its mod revision; 0: no key.
    stored_rev: i64,
    /// The agent's latest report, while etcd has another outcome.
    pending: Option<ConvergeReport>,
}

impl ConvergeTracker {
    fn new(stored: Option<Versioned<ConvergeReport>>) -> Self {
        let mut this = Self::default();
        this.reset(stored);
        this
    }

    /// Takes the agent's latest report; true when etcd must hear of it.
    fn observe(&mut self, report: ConvergeReport) -> bool {
        let changed = self
            .stored
            .as_ref()
            .is_none_or(|s| s.outcome() != report.outcome());
        self.pending = changed.then_some(report);
        changed
    }

    fn pending(&self) -> Option<&ConvergeReport> {
        self.pending.as_ref()
    }

    /// The pending report is now in etcd at `rev`.
    fn written(&mut self, rev: i64) {
        if let Some(report) = self.pending.take() {
            self.stored = Some(report);
            self.stored_rev = rev;
        }
    }

    fn drop_pending(&mut self) {
        self.pending = None;
    }

    /// etcd holds `stored` (someone else wrote it); a pending report with
    /// the same outcome is no longer pending.
    fn reset(&mut self, stored: Option<Versioned<ConvergeReport>>) {
        self.stored_rev = stored.as_ref().map_or(0, |s| s.mod_revision);
        self.stored = stored.map(|s| s.value);
        if let (Some(p), Some(s)) = (&self.pending, &self.stored) {
            if p.outcome() == s.outcome() {
                self.pending = None;
            }
        }
    }
}

/// How often one node's status may be written: a token bucket of
/// `status_write_burst` writes, one more every `status_write_interval_ms`.
#[derive(Debug)]
struct StatusBudget {
    tokens: f64,
    burst: f64,
    per_token: Duration,
    at: Instant,
}

impl StatusBudget {
    fn new(limits: &crate::config::SessionLimits) -> Self {
        let burst = f64::from(limits.status_write_burst.max(1));
        Self {
            tokens: burst,
            burst,
            per_token: Duration::from_millis(limits.status_write_interval_ms.max(1)),
            at: Instant::now(),
        }
    }

    /// Whether the bucket has refilled completely by `now`.
    fn full(&self, now: Instant) -> bool {
        let earned = now.duration_since(self.at).as_secs_f64() / self.per_token.as_secs_f64();
        self.tokens + earned >= self.burst
    }

    /// Takes one token if there is one.
    fn take(&mut self, now: Instant) -> bool {
        let earned = now.duration_since(self.at).as_secs_f64() / self.per_token.as_secs_f64();
        self.tokens = (self.tokens + earned).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Time from `now` until the next token (after a [`take`](Self::take)
    /// at `now`).
    fn next_in(&self, now: Instant) -> Duration {
        let missing = (1.0 - self.tokens).max(0.0);
        self.per_token
            .mul_f64(missing)
            .saturating_sub(now.duration_since(self.at))
    }
}

/// Longest string kept in stored facts.
const MAX_FACT_STRING: usize = 256;

/// `facts` cut down to at most `max_bytes` encoded: a real host's facts
/// (a few KiB) pass untouched; beyond, strings are cut and lists
/// shortened until they fit. Logged, because an agent that says this
/// much is broken or hostile.
pub fn bound_facts(mut facts: Facts, max_bytes: usize) -> Facts {
    let size = |f: &Facts| encode(f).len();
    let original = size(&facts);
    if original <= max_bytes {
        return facts;
    }
    let cut = |s: &mut String| {
        if s.len() > MAX_FACT_STRING {
            let mut end = MAX_FACT_STRING;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            s.truncate(end);
        }
    };
    cut(&mut facts.hostname);
    cut(&mut facts.os);
    cut(&mut facts.kernel);
    for d in &mut facts.disks {
        cut(&mut d.mount_point);
    }
    for i in &mut facts.interfaces {
        cut(&mut i.name);
        cut(&mut i.mac);
        i.addresses.truncate(16);
        i.addresses.iter_mut().for_each(cut);
    }
    cut(&mut facts.boot_id);
    // Whether a reboot is needed is kept whatever goes; its package list
    // is cut like the rest.
    fn packages(f: &mut Facts) -> Option<&mut Vec<String>> {
        f.reboot_required.as_mut().map(|r| &mut r.packages)
    }
    if let Some(r) = &mut facts.reboot_required {
        cut(&mut r.source);
        r.packages.truncate(64);
        r.packages.iter_mut().for_each(cut);
    }
    while size(&facts) > max_bytes
        && !(facts.disks.is_empty()
            && facts.interfaces.is_empty()
            && packages(&mut facts).is_none_or(|p| p.is_empty()))
    {
        facts.disks.truncate(facts.disks.len() / 2);
        facts.interfaces.truncate(facts.interfaces.len() / 2);
        if let Some(p) = packages(&mut facts) {
            p.truncate(p.len() / 2);
        }
    }
    warn!(
        bytes = original,
        limit = max_bytes,
        kept = size(&facts),
        "facts larger than sessions.max_facts_bytes; stored cut down"
    );
    crate::metrics::metrics().facts_truncated.inc();
    facts
}

/// Ends this replica's session of a node as soon as another replica
/// records that it serves the node (the agent moved, or a second agent
/// with the same key connected there): one live session per node
/// cluster-wide. Follows status writes under `nodes/` (rare: on change
/// only, rate-limited per node) until shutdown; a broken watch starts over
/// from the present (a takeover missed meanwhile is caught by the
/// session's own next compare-and-set status write).
pub async fn follow_takeovers(ctx: SessionContext) {
    use crate::store::kv::Change;
    let keys = ctx.store.keys().clone();
    let me = ctx.store.replica().to_owned();
    let mut backoff =
        steward_runtime::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        let followed = async {
            let from = ctx.store.current_revision().await? + 1;
            let mut watch = ctx.store.watch(&[keys.nodes()], from).await?;
            backoff.reset();
            while let Some(changes) = watch.next().await? {
                for change in changes {
                    let Change::Put(kv) = change else { continue };
                    let Some((node, crate::store::NodeKey::Status)) = keys.parse_node_key(&kv.key)
                    else {
                        continue;
                    };
                    let Ok(status) = crate::store::decode::<NodeStatusRecord>(&kv.key, &kv.value)
                    else {
                        continue;
                    };
                    if status.replica.as_deref().is_some_and(|r| r != me)
                        && ctx.sessions.supersede(&node, kv.mod_revision)
                    {
                        info!(node.id = %node, replica = ?status.replica, "node now served by another replica; ending the session here");
                    }
                }
            }
            Ok::<_, Error>(())
        };
        let result = tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            r = followed => r,
        };
        if let Err(error) = result {
            warn!(%error, "status watch interrupted; following again");
        }
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

/// At start, this replica serves no session, so any status naming it is left
/// over from a previous life of this replica (crash, SIGKILL): mark those
/// nodes disconnected. Compare-and-set, so a session that has meanwhile
/// reconnected here wins. Retries until etcd answers or shutdown.
pub async fn release_stale_sessions(ctx: SessionContext) {
    let mut backoff =
        steward_runtime::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        match release_once(&ctx).await {
            Ok(released) => {
                if released > 0 {
                    info!(
                        released,
                        "marked nodes of this replica's previous run disconnected"
                    );
                }
                return;
            }
            Err(error) => warn!(%error, "cannot sweep stale sessions yet"),
        }
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

async fn release_once(ctx: &SessionContext) -> Result<usize> {
    let me = ctx.store.replica();
    let mut released = 0;
    for (id, record) in ctx.store.nodes().await? {
        let Some(status) = record.status else {
            continue;
        };
        if status.value.replica.as_deref() != Some(me) || ctx.sessions.get(&id).is_some() {
            continue;
        }
        let mut next = status.value;
        next.replica = None;
        next.health = NodeHealth::Disconnected;
        if ctx
            .store
            .put_status_if(&id, status.mod_revision, &next)
            .await?
            .is_some()
        {
            released += 1;
            let event = Event {
                revision: 0,
                at_unix_ms: unix_ms(),
                kind: EventKind::NodeDisconnected,
                node: Some(id.clone()),
                replica: me.to_owned(),
                message: format!("{id} lost its session when {me} restarted"),
            };
            if let Err(error) = ctx.store.record_event(&event).await {
                warn!(%error, "could not record event");
            }
        }
    }
    Ok(released)
}

/// The session loop against the in-memory store: what an agent sees, what
/// etcd records.
#[cfg(test)]
mod session_tests {
    use std::time::Duration;

    use steward_proto::domain::{EventKind, Role};
    use tokio_stream::wrappers::ReceiverStream;

    use super::*;
    use crate::store::MemoryBackend;
    use crate::testing::{eventually_async, identity, node, TestReplica};

    type Outbound = SessionStream;

    struct Agent {
        to_replica: mpsc::Sender<Result<pb::AgentMessage, Status>>,
        from_replica: Outbound,
    }

    fn hello(id: &str) -> pb::AgentMessage {
        AgentMessage::Hello {
            node: node(id),
            facts: Facts {
                hostname: id.into(),
                ..Default::default()
            },
            last_applied_revision: 0,
            agent_version: "test".into(),
            advertise_address: Some("198.18.0.7".parse().unwrap()),
        }
        .into()
    }

    async fn connect(
        replica: &TestReplica,
        cert: &str,
        hello: pb::AgentMessage,
    ) -> Result<Agent, Status> {
        let (to_replica, inbound) = mpsc::channel(8);
        to_replica.send(Ok(hello)).await.unwrap();
        let from_replica = open_session(
            replica.ctx.clone(),
            identity(cert, IdentityKind::Agent),
            None,
            ReceiverStream::new(inbound),
        )
        .await?;
        Ok(Agent {
            to_replica,
            from_replica,
        })
    }

    impl Agent {
        async fn next(&mut self) -> CoordinatorMessage {
            let message = tokio::time::timeout(Duration::from_secs(3), self.from_replica.next())
                .await
                .expect("a message within the deadline")
                .expect("the session is open")
                .expect("not an error");
            CoordinatorMessage::try_from(message).expect("a valid message")
        }
        async fn desired(&mut self) -> DesiredState {
            loop {
                if let CoordinatorMessage::DesiredState(d) = self.next().await {
                    return *d;
                }
            }
        }
    }

    async fn events(store: &Store) -> Vec<(EventKind, String)> {
        let (events, _) = store.recent_events(100).await.unwrap();
        events.into_iter().map(|e| (e.kind, e.message)).collect()
    }

    #[tokio::test]
    async fn facts_sent_again_are_written_when_they_changed_at_most_every_few_seconds() {
        let replica = TestReplica::start(MemoryBackend::new(), "c-1").await;
        let mut agent = connect(&replica, "n1", hello("n1")).await.expect("session");
        agent.desired().await;
        let store = replica.store();
        let first = store.node(&node("n1")).await.unwrap().facts.expect("facts");
        let again = |reboot: Option<&str>| -> pb::AgentMessage {
            AgentMessage::Facts(Facts {
                hostname: "n1".into(),
                reboot_required: reboot.map(|p| steward_proto::domain::RebootRequired {
                    since_unix_ms: 5,
                    source: "reboot-required".into(),
                    packages: vec![p.into()],
                }),
                ..Default::default()
            })
            .into()
        };
        // The same facts: nothing written.
        agent.to_replica.send(Ok(again(None))).await.unwrap();
        // A reboot needed: written at once (no write before it).
        agent
            .to_replica
            .send(Ok(again(Some("linux-a"))))
            .await
            .unwrap();
        let written = eventually_async("the facts with the need", || async {
            let f = store.node(&node("n1")).await.unwrap().facts?;
            f.value.reboot_required.is_some().then_some(f)
        })
        .await;
        assert!(written.mod_revision > first.mod_revision);
        assert_eq!(
            written
                .value
                .reboot_required
                .as_ref()
                .map(|r| r.packages.clone()),
            Some(vec!["linux-a".to_owned()])
        );
        // Another change right after: it waits for the interval, then goes
        // with the next message (a heartbeat).
        agent
            .to_replica
            .send(Ok(again(Some("linux-b"))))
            .await
            .unwrap();
        let ack = |seq| -> pb::AgentMessage {
            AgentMessage::Heartbeat {
                seq,
                sent_at_unix_ms: 1,
                health: Health::default(),
            }
            .into()
        };
        agent.to_replica.send(Ok(ack(1))).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let held = store.node(&node("n1")).await.unwrap().facts.expect("facts");
        assert_eq!(held.mod_revision, written.mod_revision, "rate-limited");
        tokio::time::sleep(FACTS_WRITE_EVERY).await;
        agent.to_replica.send(Ok(ack(2))).await.unwrap();
        eventually_async("the latest facts", || async {
            let f = store.node(&node("n1")).await.unwrap().facts?;
            (f.value.reboot_required?.packages == ["linux-b"]).then_some(())
        })
        .await;
    }

    #[tokio::test]
    async fn a_session_records_its_node_pushes_its_state_and_acks_heartbeats() {
        let replica = TestReplica::start(MemoryBackend::new(), "c-1").await;
        let mut agent = connect(&replica, "n1", hello("n1")).await.expect("session");
        let store = replica.store();
        let record = store.node(&node("n1")).await.unwrap();
        let status = record.status.expect("status written").value;
        assert_eq!(status.replica.as_deref(), Some("c-1"));
        assert_eq!(status.health, NodeHealth::Healthy);
        assert_eq!(record.facts.expect("facts written").value.hostname, "n1");
        assert_eq!(record.address.map(|a| a.value), "198.18.0.7".parse().ok());
        // The events follow the open (off its admission turn).
        let kinds: Vec<EventKind> = eventually_async("the opening events", || async {
            let kinds: Vec<EventKind> = events(store).await.into_iter().map(|e| e.0).collect();
            (kinds.len() >= 2).then_some(kinds)
        })
        .await;
        assert_eq!(kinds, [EventKind::NodeRegistered, EventKind::NodeConnected]);

        // The desired state at once: no roles yet.
        assert!(agent.desired().await.roles.is_empty());
        agent
            .to_replica
            .send(Ok(AgentMessage::Heartbeat {
                seq: 7,
                sent_at_unix_ms: 1,
                health: Health::default(),
            }
            .into()))
            .await
            .unwrap();
        assert_eq!(
            agent.next().await,
            CoordinatorMessage::HeartbeatAck {
                seq: 7,
                replica: "c-1".into(),
                interval_ms: 0,
            }
        );
        // A heartbeat writes nothing.
        assert_eq!(
            store.node(&node("n1")).await.unwrap().status.unwrap().value,
            status
        );

        // A role added through the store reaches the agent.
        store
            .update_spec(&node("n1"), |s| {
                let mut next = s.clone();
                next.roles.insert(Role::Lb);
                Ok(Some(next))
            })
            .await
            .unwrap();
        let desired = agent.desired().await;
        assert!(desired.roles.contains(&Role::Lb), "{desired:?}");
        assert_eq!(replica.ctx.sessions.len(), 1);

        // The agent goes: disconnected, with its event.
        drop(agent);
        let status = eventually_async("the disconnect to be recorded", || async {
            let status = store.node(&node("n1")).await.unwrap().status?.value;
            (status.health == NodeHealth::Disconnected).then_some(status)
        })
        .await;
        assert_eq!(status.replica, None);
        assert!(replica.ctx.sessions.is_empty());
        let last = events(store).await.pop().unwrap();
        assert_eq!(
            last,
            (
                EventKind::NodeDisconnected,
                "n1 disconnected from c-1".into()
            )
        );
    }

    impl Agent {
        /// Asserts that nothing arrives for a while.
        async fn quiet(&mut self, what: &str) {
            let next = tokio::time::timeout(Duration::from_millis(400), self.from_replica.next());
            if let Ok(message) = next.await {
                panic!("{what}: expected nothing, got {message:?}");
            }
        }
    }

    /// Issue 13: a session whose turn does not come at once is answered and
    /// waits on its stream, its heartbeats acked, instead of being refused.
    #[tokio::test]
    async fn a_queued_session_is_answered_acked_and_admitted_in_its_turn() {
        let replica = TestReplica::start(MemoryBackend::new(), "c-1").await;
        let mut ctx = replica.ctx.clone();
        ctx.admission = Arc::new(Admission::new(&crate::config::SessionLimits {
            max_concurrent_opens: 1,
            max_open_wait_ms: 100,
            ..Default::default()
        }));
        let held = ctx
            .admission
            .queue()
            .expect("a place")
            .await
            .expect("a turn");
        let (to_replica, inbound) = mpsc::channel(8);
        to_replica.send(Ok(hello("q-1"))).await.unwrap();
        let from_replica = tokio::time::timeout(
            Duration::from_secs(2),
            open_session(
                ctx.clone(),
                identity("q-1", IdentityKind::Agent),
                None,
                ReceiverStream::new(inbound),
            ),
        )
        .await
        .expect("answered without waiting for the turn")
        .expect("not refused");
        let mut agent = Agent {
            to_replica,
            from_replica,
        };
        // Queued: heartbeats are acked, nothing is recorded yet.
        agent
            .to_replica
            .send(Ok(AgentMessage::Heartbeat {
                seq: 7,
                sent_at_unix_ms: 0,
                health: Health::default(),
            }
            .into()))
            .await
            .unwrap();
        let CoordinatorMessage::HeartbeatAck { seq: 7, .. } = agent.next().await else {
            panic!("no ack while queued");
        };
        assert!(replica
            .store()
            .node(&node("q-1"))
            .await
            .unwrap()
            .status
            .is_none());
        // Its turn: the session opens and the desired state follows.
        drop(held);
        agent.desired().await;
        let status = replica.store().node(&node("q-1")).await.unwrap().status;
        assert_eq!(
            status.expect("status written").value.health,
            NodeHealth::Healthy
        );
    }

    /// Issue 13: a replica serving more agents than its heartbeat budget
    /// asks them for sparser heartbeats, and for their own rhythm again
    /// once they fit.
    #[tokio::test]
    async fn acks_ask_for_sparser_heartbeats_beyond_the_budget() {
        let mut replica = TestReplica::start(MemoryBackend::new(), "c-1").await;
        replica.ctx.limits.heartbeats_per_s = 1;
        async fn beat(agent: &mut Agent, seq: u64) -> u32 {
            agent
                .to_replica
                .send(Ok(AgentMessage::Heartbeat {
                    seq,
                    sent_at_unix_ms: 0,
                    health: Health::default(),
                }
                .into()))
                .await
                .unwrap();
            loop {
                if let CoordinatorMessage::HeartbeatAck {
                    seq: s,
                    interval_ms,
                    ..
                } = agent.next().await
                {
                    if s == seq {
                        return interval_ms;
                    }
                }
            }
        }
        let mut a = connect(&replica, "w-1", hello("w-1"))
            .await
            .expect("session");
        a.desired().await;
        assert_eq!(beat(&mut a, 1).await, 0, "one agent fits the budget");
        let mut b = connect(&replica, "w-2", hello("w-2"))
            .await
            .expect("session");
        b.desired().await;
        let mut c = connect(&replica, "w-3", hello("w-3"))
            .await
            .expect("session");
        c.desired().await;
        assert_eq!(beat(&mut a, 2).await, 3000, "three agents at one a second");
        let every = replica
            .ctx
            .sessions
            .with(&node("w-1"), |live| live.heartbeat_every)
            .expect("w-1 served");
        assert_eq!(every, Duration::from_secs(3));
        drop((b, c));
        let deadline = Instant::now() + Duration::from_secs(3);
        while replica.ctx.sessions.count() > 1 {
            assert!(Instant::now() < deadline, "closed sessions still counted");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(beat(&mut a, 3).await, 0, "back to the agent's own rhythm");
    }

    /// Issue 13: a change for one node pushes to that node only.
    #[tokio::test]
    async fn a_change_to_one_node_pushes_to_that_node_only() {
        let replica = TestReplica::start(MemoryBackend::new(), "c-1").await;
        let mut agents = Vec::new();
        for id in ["w-1", "w-2", "w-3"] {
            let mut agent = connect(&replica, id, hello(id)).await.expect("session");
            agent.desired().await;
            replica
                .store()
                .update_spec(&node(id), |s| {
                    let mut next = s.clone();
                    next.roles.insert(Role::K8sWorker);
                    Ok(Some(next))
                })
                .await
                .unwrap();
            agents.push(agent);
        }
        // Each worker was told about its own role; now all are settled.
        for agent in &mut agents {
            while !agent.desired().await.roles.contains(&Role::K8sWorker) {}
        }
        for agent in &mut agents {
            agent.quiet("settled").await;
        }
        // Labels on w-2: only w-2 hears of it.
        replica
            .store()
            .update_spec(&node("w-2"), |s| {
                let mut next = s.clone();
                next.labels.insert("zone".into(), "b".into());
                Ok(Some(next))
            })
            .await
            .unwrap();
        let d = agents[1].desired().await;
        assert!(d.roles.contains(&Role::K8sWorker));
        // Listing computes the same revision without building the state.
        for id in ["w-1", "w-2", "w-3"] {
            let full = replica.ctx.desired_for(&node(id)).unwrap().revision;
            assert_eq!(replica.ctx.desired_revision_for(&node(id)), full, "{id}");
        }
        agents[0].quiet("w-1 after a change to w-2").await;
        agents[2].quiet("w-3 after a change to w-2").await;
    }

    /// Issue 14, item 6: one live session per node; a newer one replaces
    /// the older, which is told why.
    #[tokio::test]
    async fn a_node_has_one_live_session() {
        let replica = TestReplica::start(MemoryBackend::new(), "c-1").await;
        let mut old = Vec::new();
        for _ in 0..5 {
            let mut agent = connect(&replica, "n1", hello("n1")).await.expect("session");
            agent.desired().await;
            old.push(agent);
        }
        let newest = old.pop().unwrap();
        for mut agent in old {
            let ended = tokio::time::timeout(Duration::from_secs(3), async {
                loop {
                    match agent.from_replica.next().await {
                        Some(Err(status)) => return Some(status),
                        Some(Ok(_)) => continue,
                        None => return None,
                    }
                }
            })
            .await
            .expect("the replaced session ends");
            let status = ended.expect("told why");
            assert_eq!(status.code(), tonic::Code::Aborted, "{status}");
        }
        assert_eq!(replica.ctx.sessions.len(), 1);
        drop(newest);
        let store = replica.store();
        eventually_async("the last close to mark the node disconnected", || async {
            let status = store.node(&node("n1")).await.unwrap().status?.value;
            (status.health == NodeHealth::Disconnected).then_some(())
        })
        .await;
    }

    #[tokio::test]
    async fn a_node_speaks_only_for_itself_and_only_while_trusted() {
        let replica = TestReplica::start(MemoryBackend::new(), "c-1").await;
        let error = connect(&replica, "n1", hello("n2"))
            .await
            .err()
            .expect("refused");
        assert_eq!(error.code(), tonic::Code::PermissionDenied, "{error}");
        assert!(replica
            .store()
            .node(&node("n2"))
            .await
            .unwrap()
            .status
            .is_none());
        let (to_replica, inbound) = mpsc::channel(1);
        to_replica.send(Ok(hello("n1"))).await.unwrap();
        let error = open_session(
            replica.ctx.clone(),
            identity("n1", IdentityKind::Admin),
            None,
            ReceiverStream::new(inbound),
        )
        .await
        .err()
        .expect("an admin certificate opens no session");
        assert_eq!(error.code(), tonic::Code::PermissionDenied, "{error}");

        // A revoked certificate: refused at open, and a live session ends.
        let mut agent = connect(&replica, "n1", hello("n1")).await.expect("session");
        agent.desired().await;
        replica
            .store()
            .revoke_node(&node("n1"), "ops")
            .await
            .unwrap()
            .expect("a known node");
        let ended = tokio::time::timeout(Duration::from_secs(3), async {
            loop {
                match agent.from_replica.next().await {
                    Some(Err(status)) => return status,
                    Some(Ok(_)) => continue,
                    None => panic!("closed without telling the agent why"),
                }
            }
        })
        .await
        .expect("the session ends within the deadline");
        assert_eq!(ended.code(), tonic::Code::PermissionDenied, "{ended}");
        let error = connect(&replica, "n1", hello("n1"))
            .await
            .err()
            .expect("refused");
        assert!(error.message().contains("revoked"), "{error}");
    }

    #[tokio::test]
    async fn a_session_keeps_serving_while_etcd_is_down() {
        let replica = TestReplica::start(MemoryBackend::new(), "c-1").await;
        let mut agent = connect(&replica, "n1", hello("n1")).await.expect("session");
        agent.desired().await;
        replica.memory.set_unavailable(true);
        agent
            .to_replica
            .send(Ok(AgentMessage::Heartbeat {
                seq: 1,
                sent_at_unix_ms: 1,
                health: Health::default(),
            }
            .into()))
            .await
            .unwrap();
        assert!(matches!(
            agent.next().await,
            CoordinatorMessage::HeartbeatAck { seq: 1, .. }
        ));
        // ...but a new session cannot open without etcd.
        let error = connect(&replica, "n2", hello("n2"))
            .await
            .err()
            .expect("refused");
        assert_eq!(error.code(), tonic::Code::Unavailable, "{error}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use steward_proto::converge::{ResourceState, ResourceStatus};
    use steward_proto::domain::{Disk, NetworkInterface};

    #[test]
    fn facts_are_bounded() {
        let small = Facts {
            hostname: "n1".into(),
            ..Default::default()
        };
        assert_eq!(bound_facts(small.clone(), 16 * 1024), small);
        let huge = Facts {
            hostname: "h".repeat(100_000),
            disks: (0..5_000)
                .map(|i| Disk {
                    mount_point: format!("/mnt/{i}"),
                    ..Default::default()
                })
                .collect(),
            interfaces: (0..5_000)
                .map(|i| NetworkInterface {
                    name: format!("eth{i}"),
                    mac: "x".repeat(1000),
                    addresses: vec!["198.18.0.1/24".into(); 100],
                })
                .collect(),
            ..Default::default()
        };
        let kept = bound_facts(huge, 16 * 1024);
        assert!(encode(&kept).len() <= 16 * 1024, "{}", encode(&kept).len());
        assert_eq!(kept.hostname.len(), MAX_FACT_STRING);
        assert!(!kept.disks.is_empty(), "cut down, not emptied");
        // A reboot's package list is cut too; the need itself stays.
        let reboot = Facts {
            boot_id: "b".repeat(1000),
            reboot_required: Some(steward_proto::domain::RebootRequired {
                since_unix_ms: 1,
                source: "s".repeat(1000),
                packages: vec!["p".repeat(1000); 1000],
            }),
            ..Default::default()
        };
        let kept = bound_facts(reboot, 4 * 1024);
        assert!(encode(&kept).len() <= 4 * 1024, "{}", encode(&kept).len());
        let need = kept.reboot_required.expect("the need is kept");
        assert!(!need.packages.is_empty() && need.packages.len() <= 64);
        assert!(need.packages.iter().all(|p| p.len() <= MAX_FACT_STRING));
    }

    #[test]
    fn status_writes_are_rate_limited_per_node() {
        let limits = crate::config::SessionLimits {
            status_write_interval_ms: 1000,
            status_write_burst: 3,
            ..Default::default()
        };
        let mut budget = StatusBudget::new(&limits);
        let t0 = budget.at;
        let taken = (0..10).filter(|_| budget.take(t0)).count();
        assert_eq!(taken, 3, "the burst");
        assert!(!budget.take(t0 + Duration::from_millis(500)));
        assert!(budget.take(t0 + Duration::from_millis(1100)));
        // 300 ms flaps for 10 s: the burst and one per second.
        let mut budget = StatusBudget::new(&limits);
        let writes = (0..34)
            .filter(|i| budget.take(t0 + Duration::from_millis(300 * i)))
            .count();
        assert!((12..=14).contains(&writes), "{writes}");
    }

    #[test]
    fn busy_hints_spread_the_refused_over_the_time_their_admissions_take() {
        let t0 = Instant::now();
        // 32 turns of 32 ms at once: one admission per millisecond.
        let mut pace = Pace {
            turn: Duration::from_millis(32),
            concurrent: 32,
            booked_until: t0,
        };
        let hints: Vec<Duration> = (0..5_000).map(|_| pace.book(t0, 1_000)).collect();
        assert!(hints.windows(2).all(|w| w[0] <= w[1]), "hints go back");
        // The first comes after the 1,000 queued, the last after all 5,000.
        assert_eq!(hints[0], Duration::from_millis(1_001));
        assert_eq!(hints[4_999], Duration::from_millis(6_000));
        // Later refusals book after those already booked, not over them.
        let later = pace.book(t0 + Duration::from_secs(1), 0);
        assert_eq!(later, Duration::from_millis(5_001));
        // Slower admissions: longer hints.
        for _ in 0..200 {
            pace.observe(Duration::from_millis(320));
        }
        let slow = pace.book(t0 + Duration::from_secs(6), 100);
        assert!(slow >= Duration::from_millis(900), "{slow:?}");
        // Never more than an agent honours.
        let far = (0..100_000).map(|_| pace.book(t0, 0)).max().expect("hints");
        assert!(far <= steward_proto::retry::MAX_RETRY_AFTER);
    }

    #[tokio::test]
    async fn turns_come_in_order_and_a_full_queue_says_when_to_come_back() {
        let admission = Arc::new(Admission::new(&crate::config::SessionLimits {
            max_concurrent_opens: 1,
            max_queued_opens: 2,
            ..Default::default()
        }));
        let held = admission.queue().expect("a place").await.expect("a turn");
        let mut first = admission.queue().expect("a place");
        let mut second = admission.queue().expect("a place");
        // Two wait: a third is refused at once, with a hint.
        let Err(Error::Busy { retry_after, .. }) = admission.queue() else {
            panic!("a third place while two wait");
        };
        assert!(retry_after >= MIN_RETRY_HINT, "{retry_after:?}");
        let status = tonic::Status::from(Error::Busy {
            reason: "test".into(),
            retry_after,
        });
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(
            steward_proto::retry::retry_after(&status),
            Some(retry_after)
        );
        // Nobody is admitted while the turn is held; then the first in line.
        let quick = Duration::from_millis(50);
        assert!(tokio::time::timeout(quick, &mut first).await.is_err());
        drop(held);
        let turn = tokio::time::timeout(Duration::from_secs(1), &mut first)
            .await
            .expect("the first in line admitted")
            .expect("a turn");
        assert!(tokio::time::timeout(quick, &mut second).await.is_err());
        // A place given up frees its slot in the queue.
        drop(second);
        let _third = admission.queue().expect("a place again");
        drop(turn);
        // A node's own hello budget hints at its next token.
        let node = NodeId::new("n1").expect("id");
        let budget = crate::config::SessionLimits {
            hello_burst: 1,
            hello_interval_ms: 5_000,
            ..Default::default()
        };
        let admission = Admission::new(&budget);
        admission.hello(&node).expect("first hello");
        let Err(Error::Busy { retry_after, .. }) = admission.hello(&node) else {
            panic!("a second hello at once");
        };
        assert!(
            retry_after > Duration::from_millis(4_900) && retry_after <= Duration::from_secs(5),
            "{retry_after:?}"
        );
    }

    fn report(revision: u64, finished: u64, status: ResourceStatus) -> ConvergeReport {
        ConvergeReport {
            revision,
            finished_unix_ms: finished,
            duration_ms: (finished % 100) as u32,
            resources: vec![ResourceState {
                id: "package:haproxy".into(),
                status,
                detail: String::new(),
                since_unix_ms: 1,
            }],
        }
    }

    #[test]
    fn converge_reports_are_written_on_outcome_change_only() {
        let mut t = ConvergeTracker::new(None);
        assert!(t.observe(report(5, 1000, ResourceStatus::Ok)));
        t.written(10);
        assert_eq!(t.stored_rev, 10);
        assert!(t.pending().is_none());
        // Another run, same outcome: only the timing differs.
        assert!(!t.observe(report(5, 2000, ResourceStatus::Ok)));
        assert!(!t.observe(report(5, 3033, ResourceStatus::Ok)));
        assert!(t.pending().is_none());
        // A resource fails: written.
        assert!(t.observe(report(5, 4000, ResourceStatus::Failed)));
        t.written(11);
        // A new revision with the same resources is a new outcome too.
        assert!(t.observe(report(6, 5000, ResourceStatus::Failed)));
        assert_eq!(t.pending().map(|r| r.revision), Some(6));
    }

    #[test]
    fn a_failed_write_stays_pending_until_the_outcome_returns() {
        let stored = Versioned {
            value: report(5, 1000, ResourceStatus::Ok),
            mod_revision: 7,
        };
        // The outcome etcd already holds (e.g. from before a reconnect).
        let mut t = ConvergeTracker::new(Some(stored.clone()));
        assert!(!t.observe(report(5, 9000, ResourceStatus::Ok)));
        // A change whose write fails stays pending...
        assert!(t.observe(report(5, 9100, ResourceStatus::Failed)));
        assert!(t.pending().is_some());
        // ...until the agent is back at what etcd holds.
        assert!(!t.observe(report(5, 9200, ResourceStatus::Ok)));
        assert!(t.pending().is_none());
        // Another session wrote our outcome meanwhile: nothing left to do.
        assert!(t.observe(report(5, 9300, ResourceStatus::Failed)));
        t.reset(Some(Versioned {
            value: report(5, 1, ResourceStatus::Failed),
            mod_revision: 8,
        }));
        assert!(t.pending().is_none());
        assert_eq!(t.stored_rev, 8);
    }
}
/// The reboot-required marker (`nodes/<id>/reboot-required`, which reboot
/// selection reads instead of every node's facts) as sessions keep it.
#[cfg(test)]
mod session_open_tests {
    use super::*;
    use crate::store::kv::{Op, Txn};
    use crate::store::{encode, MemoryBackend};
    use crate::testing::TestReplica;
    use steward_proto::domain::RebootRequired;

    fn hello(facts: Facts) -> Hello {
        Hello {
            node: NodeId::new("n1").expect("id"),
            issued_unix_s: 0,
            facts,
            applied_revision: 0,
            agent_version: "test".into(),
            address: None,
        }
    }

    async fn marker(replica: &TestReplica) -> Option<crate::store::RebootRequiredRecord> {
        let specs = replica.ctx.fresh_specs().await.expect("caught up");
        let id = NodeId::new("n1").expect("id");
        specs.reboot_required.get(&id).map(|m| m.value.clone())
    }

    /// A status write waits for one of the replica's
    /// `max_concurrent_status_writes` turns: with every turn held, a
    /// session open (whose status write decides it) does not complete, and
    /// it does once a turn is free.
    #[tokio::test]
    async fn status_writes_wait_for_a_turn() {
        let replica = TestReplica::start(MemoryBackend::new(), "c-1").await;
        let mut ctx = replica.ctx.clone();
        ctx.status_writes = Arc::new(tokio::sync::Semaphore::new(1));
        let held = ctx
            .status_writes
            .clone()
            .acquire_owned()
            .await
            .expect("the only turn");
        let open = tokio::spawn(NodeSession::open(ctx.clone(), hello(Facts::default())));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!open.is_finished(), "a status was written without a turn");
        let id = NodeId::new("n1").expect("id");
        assert!(
            replica
                .store()
                .node(&id)
                .await
                .expect("read")
                .status
                .is_none(),
            "a status was written without a turn"
        );
        drop(held);
        let _session = tokio::time::timeout(Duration::from_secs(5), open)
            .await
            .expect("opened once a turn was free")
            .expect("task")
            .expect("opened");
        assert!(replica
            .store()
            .node(&id)
            .await
            .expect("read")
            .status
            .is_some());
    }

    #[tokio::test]
    async fn a_session_keeps_the_marker_in_step_with_the_facts() {
        let replica = TestReplica::start(MemoryBackend::new(), "c-1").await;
        let need = RebootRequired {
            since_unix_ms: 5,
            source: "reboot-required".into(),
            packages: vec!["linux-image-amd64".into()],
        };
        let needing = Facts {
            boot_id: "boot-a".into(),
            reboot_required: Some(need.clone()),
            ..Default::default()
        };
        let session = NodeSession::open(replica.ctx.clone(), hello(needing.clone()))
            .await
            .expect("opened");
        let held = crate::store::RebootRequiredRecord { since_unix_ms: 5 };
        assert_eq!(marker(&replica).await, Some(held.clone()), "set");
        drop(session);

        let rebooted = Facts {
            boot_id: "boot-b".into(),
            ..Default::default()
        };
        let session = NodeSession::open(replica.ctx.clone(), hello(rebooted))
            .await
            .expect("opened");
        assert_eq!(marker(&replica).await, None, "cleared");
        drop(session);

        // Facts stored before markers existed: the next session open puts
        // the marker right, though the facts themselves are unchanged.
        let store = replica.store();
        let facts_key = store.keys().node_facts(&NodeId::new("n1").expect("id"));
        store
            .txn(
                Txn::new().and_then([Op::put(facts_key, encode(&needing))]),
                "test",
            )
            .await
            .expect("facts written");
        assert_eq!(marker(&replica).await, None, "no marker yet");
        let _session = NodeSession::open(replica.ctx.clone(), hello(needing))
            .await
            .expect("opened");
        assert_eq!(marker(&replica).await, Some(held), "put right");
    }
}

/// Issue 13: what each of 10,000 idle sessions keeps in memory. Sizes are
/// the compiler's, so the bounds are generous; they catch a future that
/// starts carrying etcd calls inline again, or a queue of inline messages.
#[cfg(test)]
mod footprint_tests {
    use super::*;
    use crate::store::MemoryBackend;
    use crate::testing::TestReplica;

    #[tokio::test]
    async fn an_idle_session_keeps_little_in_memory() {
        assert!(
            std::mem::size_of::<Outgoing>() <= 16,
            "queued messages are boxed"
        );
        let replica = TestReplica::start(MemoryBackend::new(), "c-1").await;
        let hello = Hello {
            node: NodeId::new("n1").expect("id"),
            issued_unix_s: 0,
            facts: Default::default(),
            applied_revision: 0,
            agent_version: "test".into(),
            address: None,
        };
        let session = NodeSession::open(replica.ctx.clone(), hello)
            .await
            .expect("opened");
        let (tx, _rx) = mpsc::channel(1);
        let run = session.run(tokio_stream::empty(), tx);
        let size = std::mem::size_of_val(&run);
        eprintln!("a session's task: {size} bytes");
        assert!(size <= 8 * 1024, "a session's task is {size} bytes");
    }
}
