//! Replica membership and leader election through etcd.
//!
//! Each replica holds one etcd lease (TTL `timing.member_lease_ttl_s`) kept
//! alive by our own loop (etcd-client does not reconnect streams by itself).
//! On it hang the replica's member key and its election candidacy. The
//! create revision of the leader key is the **leader epoch**: every write the
//! leader makes is a txn guarded by it ([`Fence`]), and a failed guard makes
//! the replica step down at once.

use std::time::Duration;

use steward_proto::domain::{Event, EventKind};
use steward_runtime::backoff::Backoff;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

use crate::error::{Error, Result};
use crate::store::kv::{Cmp, LeaderKey, Op, Txn, TxnOutcome};
use crate::store::{MemberRecord, Store};

/// Whether this replica leads, and with which epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leadership {
    Follower,
    Leader(Fence),
}

/// The guard on every leader write: the leader key must still have the
/// create revision (epoch) it had when this replica was elected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub epoch: i64,
    pub leader_key: Vec<u8>,
}

impl Fence {
    pub fn compare(&self) -> Cmp {
        Cmp::create_revision(self.leader_key.clone(), self.epoch)
    }

    /// Runs `inner` only while this replica still leads at this epoch, and
    /// returns what `inner` answered (its own guards may fail: then it
    /// wrote nothing, and the caller decides again). A failed fence is
    /// [`Error::LostLeadership`].
    pub async fn txn(&self, store: &Store, inner: Txn) -> Result<TxnOutcome> {
        let outer = Txn::new().when([self.compare()]).and_then([Op::Txn(inner)]);
        let outcome = store.txn(outer, "fenced txn").await?;
        if !outcome.succeeded {
            return Err(Error::LostLeadership { epoch: self.epoch });
        }
        // The one nested transaction's outcome.
        Ok(outcome.inner.into_iter().next().unwrap_or(TxnOutcome {
            succeeded: true,
            revision: outcome.revision,
            inner: Vec::new(),
        }))
    }

    /// Runs `ops` only while this replica still leads at this epoch.
    pub async fn write(&self, store: &Store, ops: Vec<Op>) -> Result<()> {
        self.txn(store, Txn::new().and_then(ops)).await.map(drop)
    }
}

/// Knobs of membership and leadership, from the config's `[timing]`.
#[derive(Debug, Clone)]
pub struct LeaderSettings {
    pub lease_ttl: Duration,
    pub events_retained: crate::leader::EventsRetained,
}

/// Runs this replica's membership and candidacy until `shutdown`; publishes
/// the current [`Leadership`] on `leadership`. On shutdown it resigns and
/// revokes its lease, so a planned restart hands leadership over at once.
pub async fn run_membership(
    store: Store,
    member: MemberRecord,
    settings: LeaderSettings,
    leadership: watch::Sender<Leadership>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(3));
    while !shutdown.is_cancelled() {
        match one_term(&store, &member, &settings, &leadership, &shutdown).await {
            Ok(()) => backoff.reset(),
            Err(error) => {
                warn!(%error, "membership lost; re-registering");
            }
        }
        leadership.send_replace(Leadership::Follower);
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

/// One lease's lifetime: register, campaign, lead until the lease or the
/// fence is lost, or shutdown.
async fn one_term(
    store: &Store,
    member: &MemberRecord,
    settings: &LeaderSettings,
    leadership: &watch::Sender<Leadership>,
    shutdown: &CancellationToken,
) -> Result<()> {
    let ttl = settings.lease_ttl;
    let lease = store.grant_lease(ttl).await?;
    let mut keeper = store.keep_alive(lease).await?;
    let lease_lost = CancellationToken::new();
    let keepalive = {
        let lease_lost = lease_lost.clone();
        let shutdown = shutdown.clone();
        let period = ttl / 3;
        tokio::spawn(
            async move {
                let _guard = lease_lost.clone().drop_guard();
                let mut tick = tokio::time::interval(period);
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    match keeper.renew(period.max(Duration::from_millis(500))).await {
                        Ok(ttl) if ttl > 0 => {}
                        Ok(_) => {
                            warn!("lease expired");
                            return;
                        }
                        Err(error) => {
                            warn!(%error, "lease keep-alive failed");
                            return;
                        }
                    }
                }
            }
            .instrument(tracing::info_span!("lease_keepalive", lease)),
        )
    };

    let result = async {
        store.register_member(member, lease).await?;
        info!(lease, "registered; campaigning for leadership");

        let leader_key: LeaderKey = tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = lease_lost.cancelled() => return Err(Error::ShuttingDown),
            r = store.campaign(lease) => r?,
        };
        let fence = Fence {
            epoch: leader_key.revision,
            leader_key: leader_key.key.clone(),
        };
        info!(epoch = fence.epoch, "elected leader");
        leadership.send_replace(Leadership::Leader(fence.clone()));
        let event = store.event(
            EventKind::LeaderElected,
            None,
            format!("{} leads with epoch {}", member.id, fence.epoch),
        );
        record_event_fenced(store, &fence, &event).await?;

        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = lease_lost.cancelled() => {
                warn!(epoch = fence.epoch, "lease lost; stepping down");
            }
            r = crate::leader::run_duties(store.clone(), fence.clone(), settings.events_retained) => {
                // Duties only return on a failed fence or a persistent error.
                if let Err(error) = r {
                    warn!(%error, epoch = fence.epoch, "stepping down");
                }
            }
        }
        Ok(Some(leader_key))
    }
    .await;

    leadership.send_replace(Leadership::Follower);
    // Hand over at once on a planned stop: resign, then revoke the lease
    // (which also removes the member key).
    if let Ok(Some(key)) = &result {
        if let Err(error) = store.resign(key).await {
            warn!(%error, "resign failed");
        }
    }
    if shutdown.is_cancelled() || result.is_err() || matches!(result, Ok(Some(_))) {
        if let Err(error) = store.revoke_lease(lease).await {
            warn!(%error, "lease revoke failed");
        }
    }
    keepalive.abort();
    result.map(drop)
}

pub async fn record_event_fenced(store: &Store, fence: &Fence, event: &Event) -> Result<()> {
    fence.write(store, vec![store.event_op(event)]).await
}
