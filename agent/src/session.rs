//! The agent's side of `AgentService.Session`: connect, hello, heartbeat,
//! record desired state, and on any failure move to the next replica with
//! jittered exponential backoff. The last desired state stays in force while
//! no coordinator is reachable.
//!
//! **Invariant: the session loop never awaits without a deadline.** Dialing
//! and opening the stream are bounded; messages to the coordinator are
//! queued with `try_send`, and a full queue ends the session (the
//! coordinator, or HTTP/2 flow control, stopped taking them: waiting for
//! room would stop the heartbeat tick and the ack timeout with it, which is
//! how an agent once hung for good). The loop marks its [`Beat`] on every
//! wake-up for the systemd watchdog ([`crate::watchdog`]).

use std::time::{Duration, Instant};

use steward_proto::converge::ConvergeReport;
use steward_proto::domain::{
    AgentMessage, CoordinatorMessage, DesiredState, GlusterReport, Health, LogChunk, LogQuery,
};
use steward_proto::pb;
use steward_proto::pb::agent_service_client::AgentServiceClient;
use steward_runtime::backoff::Backoff;
use steward_runtime::cadence::Cadence;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

use crate::config::Settings;
use crate::facts::HostProbe;
use crate::state::{RecordedState, StateStore};
use crate::unix_ms;
use crate::watchdog::{Beat, KEEPALIVE};

/// A session that lasted this long resets the backoff.
const STABLE_SESSION: Duration = Duration::from_secs(10);
/// From the first request bytes to the coordinator's response headers.
const OPEN_DEADLINE: Duration = Duration::from_secs(4);
/// Messages queued for the coordinator. Heartbeats go one per interval and
/// reports one per converge outcome, so a full queue means the stream does
/// not move at all.
const OUTBOUND_QUEUE: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("connect to {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("{url} refused the session: {status}")]
    Refused { url: String, status: tonic::Status },
    #[error("session with {url} failed: {reason}")]
    Lost { url: String, reason: String },
    #[error("cannot record desired state: {0}")]
    State(#[from] crate::state::StateError),
    #[error(
        "{url} offers desired revision {offered}, older than the {held} in force (a lagging \
         replica; refused for {waited:?} so far)"
    )]
    Older {
        url: String,
        offered: u64,
        held: u64,
        waited: Duration,
    },
}

impl SessionError {
    /// When the replica asked to be tried again (a busy replica's hint,
    /// `steward_proto::retry`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            SessionError::Refused { status, .. } => steward_proto::retry::retry_after(status),
            _ => None,
        }
    }
}

/// How long every replica must have offered only older desired states
/// before the agent takes one: etcd was restored from a backup and the
/// revisions went back for good. A lagging replica catches up in seconds,
/// and the agent tries the next replica meanwhile.
pub const ROLLBACK_ACCEPTED_AFTER: Duration = Duration::from_secs(600);

/// What to do with a desired state's revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// Not older than the one in force: take it.
    Current,
    /// Older: refuse it and try another replica.
    Older { waited: Duration },
    /// Older, but nothing else was offered for [`ROLLBACK_ACCEPTED_AFTER`]:
    /// take it (and say so).
    RolledBack,
}

/// Refuses desired states older than the one in force (a lagging replica
/// must not roll a node back), across sessions.
#[derive(Debug, Default)]
pub struct RollbackGuard {
    older_since: Option<Instant>,
}

impl RollbackGuard {
    pub fn judge(&mut self, held: u64, offered: u64, now: Instant) -> Offer {
        if offered >= held {
            self.older_since = None;
            return Offer::Current;
        }
        let since = *self.older_since.get_or_insert(now);
        let waited = now.duration_since(since);
        if waited >= ROLLBACK_ACCEPTED_AFTER {
            self.older_since = None;
            Offer::RolledBack
        } else {
            Offer::Older { waited }
        }
    }
}

pub use crate::certs::Credentials;

/// Log chunks go out only while at least this much of the queue is free, so
/// that a busy journal never crowds out heartbeats and reports.
const LOG_HEADROOM: usize = OUTBOUND_QUEUE / 2;

/// The journal readers of one session, stopped when it ends.
#[derive(Default)]
struct LogReaders(std::collections::BTreeMap<u64, tokio::task::JoinHandle<()>>);

impl LogReaders {
    /// Starts request `id`; a refusal to send back instead when too many run.
    fn start(
        &mut self,
        id: u64,
        query: LogQuery,
        out: &mpsc::Sender<LogChunk>,
    ) -> Option<LogChunk> {
        self.0.retain(|_, task| !task.is_finished());
        if self.0.len() >= crate::logs::MAX_REQUESTS {
            return Some(LogChunk {
                id,
                lines: Vec::new(),
                done: true,
                error: Some(format!(
                    "this node already serves {} log requests; try again later",
                    crate::logs::MAX_REQUESTS
                )),
            });
        }
        info!(log.id = id, log.unit = %query.unit, log.follow = query.follow, "reading the journal for stewardctl logs");
        let task = tokio::spawn(crate::logs::read_journal(id, query, out.clone()));
        if let Some(old) = self.0.insert(id, task) {
            old.abort();
        }
        None
    }

    fn cancel(&mut self, id: u64) {
        if let Some(task) = self.0.remove(&id) {
            task.abort();
        }
    }

    fn finished(&mut self, id: u64) {
        self.0.remove(&id);
    }
}

impl Drop for LogReaders {
    fn drop(&mut self) {
        for task in self.0.values() {
            task.abort();
        }
    }
}

/// Queues `message` for the coordinator without waiting.
fn enqueue(tx: &mpsc::Sender<pb::AgentMessage>, message: AgentMessage) -> Result<(), String> {
    tx.try_send(message.into()).map_err(|e| match e {
        mpsc::error::TrySendError::Full(_) => format!(
            "{OUTBOUND_QUEUE} messages wait to go out: the coordinator stopped reading the stream"
        ),
        mpsc::error::TrySendError::Closed(_) => "outbound stream closed".to_owned(),
    })
}

/// Keeps a session to some replica until `shutdown`. `desired` always holds
/// the state in force (the recorded one until a coordinator says otherwise);
/// `reports` the last converge run, reported whenever its outcome changes;
/// `gluster` the brick probe's last report ([`crate::gluster_probe`]), sent
/// whenever it changes and once per session; `reboot` whether the host
/// needs a reboot, sent with the facts when it changes.
#[allow(clippy::too_many_arguments)]
pub async fn run_sessions(
    settings: Settings,
    creds: Credentials,
    state: StateStore,
    desired: watch::Sender<RecordedState>,
    mut reports: watch::Receiver<Option<ConvergeReport>>,
    mut gluster: watch::Receiver<Option<GlusterReport>>,
    mut reboot: watch::Receiver<Option<steward_proto::domain::RebootRequired>>,
    beat: Beat,
    shutdown: CancellationToken,
) {
    let mut probe = HostProbe::new();
    let mut rollback = RollbackGuard::default();
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let replicas = settings.coordinators.len();
    // Spread agents over replicas: start at a node-dependent position.
    let mut next = settings
        .node_id
        .as_str()
        .bytes()
        .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b.into()))
        % replicas;
    while !shutdown.is_cancelled() {
        let url = settings.coordinators[next].clone();
        let started = Instant::now();
        let span = tracing::info_span!("session", coordinator = %url);
        let result = one_session(
            &settings,
            &creds,
            &url,
            &mut probe,
            &state,
            &desired,
            &mut reports,
            &mut gluster,
            &mut reboot,
            &mut rollback,
            &beat,
            &shutdown,
        )
        .instrument(span)
        .await;
        crate::metrics::metrics().session_closed();
        let hint = match result {
            Ok(()) => return,
            Err(error) => {
                let hint = error.retry_after();
                match hint {
                    Some(after) => {
                        warn!(%error, retry_in_ms = after.as_millis(), "no session; the replica is busy")
                    }
                    None => warn!(%error, "no session; trying the next replica"),
                }
                hint
            }
        };
        if started.elapsed() >= STABLE_SESSION {
            backoff.reset();
        }
        next = (next + 1) % replicas;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = beat.sleep(backoff.next_delay_hinted(hint)) => {}
        }
    }
}

/// One session. `Ok` only on shutdown.
#[allow(clippy::too_many_arguments)]
async fn one_session(
    settings: &Settings,
    creds: &Credentials,
    url: &str,
    probe: &mut HostProbe,
    state: &StateStore,
    desired: &watch::Sender<RecordedState>,
    reports: &mut watch::Receiver<Option<ConvergeReport>>,
    gluster: &mut watch::Receiver<Option<GlusterReport>>,
    reboot: &mut watch::Receiver<Option<steward_proto::domain::RebootRequired>>,
    rollback: &mut RollbackGuard,
    beat: &Beat,
    shutdown: &CancellationToken,
) -> Result<(), SessionError> {
    beat.beat();
    let dialed = creds
        .dial(url)
        .await
        .map_err(|reason| SessionError::Connect {
            url: url.to_owned(),
            reason,
        })?;
    let mut revocations = creds.revocations();
    let mut client = AgentServiceClient::new(dialed.channel);
    let (tx, rx) = mpsc::channel::<pb::AgentMessage>(OUTBOUND_QUEUE);
    // The facts carry whether the host needs a reboot; a change is sent
    // again mid-session (below).
    let facts =
        |probe: &mut HostProbe,
         reboot: &mut watch::Receiver<Option<steward_proto::domain::RebootRequired>>| {
            let mut facts = probe.facts();
            facts.reboot_required = reboot.borrow_and_update().clone();
            facts
        };
    let hello = AgentMessage::Hello {
        node: settings.node_id.clone(),
        facts: facts(probe, reboot),
        last_applied_revision: desired.borrow().desired.revision,
        agent_version: crate::VERSION.to_owned(),
        advertise_address: settings.advertise_address,
    };
    let lost = |reason: String| SessionError::Lost {
        url: url.to_owned(),
        reason,
    };
    // The queue is empty and its receiver alive: this cannot fail.
    enqueue(&tx, hello).map_err(lost)?;
    let opened = tokio::time::timeout(OPEN_DEADLINE, client.session(ReceiverStream::new(rx)))
        .await
        .map_err(|_| {
            lost(format!(
                "no answer to the session request in {OPEN_DEADLINE:?}"
            ))
        })?;
    let mut inbound = opened
        .map_err(|status| SessionError::Refused {
            url: url.to_owned(),
            status,
        })?
        .into_inner();
    info!("session open");
    crate::metrics::metrics().session_opened(url);

    let mut keepalive = tokio::time::interval(KEEPALIVE);
    // Journal readers for `stewardctl logs` ([`crate::logs`]): their chunks
    // go out only while the queue has room for heartbeats too, and they end
    // with the session.
    let (log_tx, mut log_rx) = mpsc::channel::<LogChunk>(16);
    let mut readers = LogReaders::default();
    // The replica may ask for sparser heartbeats (`steward_runtime::cadence`).
    let mut cadence = Cadence::new(settings.heartbeat_interval, settings.ack_timeout);
    let mut tick = tokio::time::interval(cadence.interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    // The last heartbeat sent, for its round trip, and whether its health
    // was under pressure (a change of that is sent at once).
    let mut sent: Option<(u64, Instant)> = None;
    let mut pressure = false;
    let mut last_ack = Instant::now();
    // What this session last reported; a new replica hears it all once.
    let mut reported: Option<(u64, Option<ConvergeReport>)> = None;
    reports.mark_changed();
    let mut reports_open = true;
    gluster.mark_changed();
    let mut gluster_open = true;
    loop {
        beat.beat();
        // No branch body below awaits: each runs to completion at once, so
        // the ticks and the ack timeout are always polled. Biased, with the
        // replica's messages first: an agent that runs late (a loaded host)
        // reads the ack waiting for it before it judges the ack overdue.
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(()),
            message = inbound.message() => {
                let message = match message {
                    Ok(Some(m)) => m,
                    Ok(None) => return Err(lost("coordinator closed the session".into())),
                    // A busy replica that answered before admitting this
                    // session may still send it away with a retry hint.
                    Err(status) if steward_proto::retry::retry_after(&status).is_some() => {
                        return Err(SessionError::Refused {
                            url: url.to_owned(),
                            status,
                        })
                    }
                    Err(status) => return Err(lost(status.to_string())),
                };
                match CoordinatorMessage::try_from(message) {
                    Ok(CoordinatorMessage::HeartbeatAck { seq: acked, interval_ms, .. }) => {
                        last_ack = Instant::now();
                        if let Some(every) = cadence.hinted(interval_ms) {
                            info!(interval = ?every, "the replica asks for heartbeats this far apart");
                            tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        }
                        if let Some((_, at)) = sent.take_if(|(seq, _)| *seq == acked) {
                            crate::metrics::metrics().heartbeat_acked(at.elapsed());
                        }
                    }
                    Ok(CoordinatorMessage::DesiredState(next)) => {
                        last_ack = Instant::now();
                        let held = desired.borrow().desired.revision;
                        match rollback.judge(held, next.revision, Instant::now()) {
                            Offer::Current => {}
                            Offer::Older { waited } => {
                                return Err(SessionError::Older {
                                    url: url.to_owned(),
                                    offered: next.revision,
                                    held,
                                    waited,
                                })
                            }
                            Offer::RolledBack => warn!(
                                held,
                                offered = next.revision,
                                "every replica offered only older desired states for {:?}: \
                                 taking it (etcd restored from a backup?)",
                                ROLLBACK_ACCEPTED_AFTER
                            ),
                        }
                        let replica = url.to_owned();
                        record(state, desired, *next, replica)?;
                        creds.set_coordinator_revocations(
                            &desired.borrow().desired.coordinator_revocations,
                        );
                        report(&tx, desired, reports, &mut reported).map_err(lost)?;
                    }
                    Ok(CoordinatorMessage::LogRequest { id, query }) => {
                        if let Some(refused) = readers.start(id, query, &log_tx) {
                            enqueue(&tx, AgentMessage::LogChunk(refused)).map_err(lost)?;
                        }
                    }
                    Ok(CoordinatorMessage::LogCancel { id }) => readers.cancel(id),
                    Err(e) => return Err(lost(format!("invalid message from coordinator: {e}"))),
                }
            }
            _ = keepalive.tick() => {
                // Sparse heartbeats: a change of health class still goes
                // out within a second.
                if cadence.stretched() {
                    let health = probe.health();
                    if health.under_pressure() != pressure {
                        pressure = health.under_pressure();
                        sent = Some(heartbeat(&tx, &mut seq, health).map_err(lost)?);
                    }
                }
            }
            // New coordinator revocations (from a desired state recorded
            // below): end the session if they cover this replica.
            Ok(()) = revocations.changed() => {
                if let Some(refusal) = creds.refusal(&dialed.replica) {
                    crate::metrics::metrics().replicas_refused.inc();
                    return Err(lost(refusal));
                }
            }
            _ = tick.tick() => {
                if last_ack.elapsed() > cadence.ack_timeout() {
                    return Err(lost(format!("no heartbeat ack for {:?}", last_ack.elapsed())));
                }
                let health = probe.health();
                pressure = health.under_pressure();
                sent = Some(heartbeat(&tx, &mut seq, health).map_err(lost)?);
            }
            Ok(()) = reboot.changed() => {
                enqueue(&tx, AgentMessage::Facts(facts(probe, reboot))).map_err(lost)?;
            }
            // Guarded: a closed channel is always ready and would spin.
            changed = reports.changed(), if reports_open => {
                if changed.is_err() {
                    reports_open = false;
                } else {
                    report(&tx, desired, reports, &mut reported).map_err(lost)?;
                }
            }
            changed = gluster.changed(), if gluster_open => {
                if changed.is_err() {
                    gluster_open = false;
                } else if let Some(report) = gluster.borrow_and_update().clone() {
                    enqueue(&tx, AgentMessage::Gluster(report)).map_err(lost)?;
                }
            }
            chunk = log_rx.recv(), if tx.capacity() > LOG_HEADROOM => {
                // `log_tx` is held here, so the channel never closes.
                if let Some(chunk) = chunk {
                    if chunk.done {
                        readers.finished(chunk.id);
                    }
                    enqueue(&tx, AgentMessage::LogChunk(chunk)).map_err(lost)?;
                }
            }
        }
    }
}

/// Queues the next heartbeat; the sequence number and time it went out.
fn heartbeat(
    tx: &mpsc::Sender<pb::AgentMessage>,
    seq: &mut u64,
    health: Health,
) -> Result<(u64, Instant), String> {
    *seq += 1;
    let hb = AgentMessage::Heartbeat {
        seq: *seq,
        sent_at_unix_ms: unix_ms(),
        health,
    };
    enqueue(tx, hb)?;
    crate::metrics::metrics().heartbeats_sent.inc();
    Ok((*seq, Instant::now()))
}

/// Queues a `Report` if the applied revision or the converge outcome
/// differs from what was last reported.
fn report(
    tx: &mpsc::Sender<pb::AgentMessage>,
    desired: &watch::Sender<RecordedState>,
    reports: &mut watch::Receiver<Option<ConvergeReport>>,
    reported: &mut Option<(u64, Option<ConvergeReport>)>,
) -> Result<(), String> {
    let applied = desired.borrow().desired.revision;
    let converge = reports.borrow_and_update().clone();
    let same = reported.as_ref().is_some_and(|(rev, last)| {
        *rev == applied
            && last.as_ref().map(|r| r.outcome()) == converge.as_ref().map(|r| r.outcome())
    });
    if same {
        return Ok(());
    }
    *reported = Some((applied, converge.clone()));
    let message = AgentMessage::Report {
        applied_revision: applied,
        converge,
    };
    enqueue(tx, message)
}

fn record(
    state: &StateStore,
    desired: &watch::Sender<RecordedState>,
    next: DesiredState,
    from_coordinator: String,
) -> Result<(), SessionError> {
    if desired.borrow().desired == next && state.desired_path().exists() {
        return Ok(());
    }
    let recorded = RecordedState {
        desired: next,
        from_coordinator,
        received_unix_ms: unix_ms(),
    };
    state.save(&recorded)?;
    crate::metrics::metrics()
        .desired_revision
        .set(recorded.desired.revision as i64);
    info!(
        revision = recorded.desired.revision,
        roles = %steward_proto::convert::roles_display(&recorded.desired.roles),
        "desired state recorded"
    );
    desired.send_replace(recorded);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn older_desired_states_are_refused_until_nothing_else_came_for_long() {
        let mut guard = RollbackGuard::default();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(guard.judge(0, 7, at(0)), Offer::Current);
        assert_eq!(guard.judge(50, 50, at(0)), Offer::Current);
        assert_eq!(guard.judge(50, 51, at(0)), Offer::Current);
        // A lagging replica: refused; a current one resets the wait.
        assert_eq!(
            guard.judge(51, 45, at(1)),
            Offer::Older {
                waited: Duration::ZERO
            }
        );
        assert_eq!(
            guard.judge(51, 45, at(3)),
            Offer::Older {
                waited: Duration::from_secs(2)
            }
        );
        assert_eq!(guard.judge(51, 52, at(4)), Offer::Current);
        assert_eq!(
            guard.judge(52, 45, at(5)),
            Offer::Older {
                waited: Duration::ZERO
            }
        );
        // Only older ones for the whole wait: etcd went back; taken.
        let after = 5 + ROLLBACK_ACCEPTED_AFTER.as_secs();
        assert!(matches!(
            guard.judge(52, 45, at(after - 1)),
            Offer::Older { .. }
        ));
        assert_eq!(guard.judge(52, 45, at(after)), Offer::RolledBack);
        assert_eq!(guard.judge(45, 46, at(after + 1)), Offer::Current);
    }
}
