//! Replica membership and leader election through etcd.
//!
//! Each replica holds one etcd lease (TTL `timing.member_lease_ttl_s`) kept
//! alive by our own loop (etcd-client does not reconnect streams by itself).
//! On it hang the replica's member key and its election candidacy. The
//! create revision of the leader key is the **leader epoch**: every write the
//! leader makes is a txn guarded by it ([`Fence`]), and a failed guard makes
//! the replica step down at once.

use std::time::Duration;

pub use etcd_client::TxnOp;
use etcd_client::{Client, Compare, CompareOp, LeaderKey, ResignOptions, Txn};
use steward_proto::backoff::Backoff;
use steward_proto::domain::{Event, EventKind};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

use crate::error::{Error, Result};
use crate::store::{encode, unix_ms, MemberRecord, Store};

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
    pub fn compare(&self) -> Compare {
        Compare::create_revision(self.leader_key.clone(), CompareOp::Equal, self.epoch)
    }

    /// Runs `ops` only while this replica still leads at this epoch.
    pub async fn txn(&self, client: &Client, ops: Vec<TxnOp>) -> Result<()> {
        let resp = client
            .kv_client()
            .txn(Txn::new().when([self.compare()]).and_then(ops))
            .await
            .map_err(Error::etcd("fenced txn"))?;
        if resp.succeeded() {
            Ok(())
        } else {
            Err(Error::LostLeadership { epoch: self.epoch })
        }
    }
}

/// Knobs of membership and leadership, from the config's `[timing]`.
#[derive(Debug, Clone)]
pub struct LeaderSettings {
    pub lease_ttl: Duration,
    pub events_retained: u32,
}

/// Runs this replica's membership and candidacy until `shutdown`; publishes
/// the current [`Leadership`] on `leadership`. On shutdown it resigns and
/// revokes its lease, so a planned restart hands leadership over at once.
pub async fn run_membership(
    store: Store,
    stream_client: Client,
    member: MemberRecord,
    settings: LeaderSettings,
    leadership: watch::Sender<Leadership>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(3));
    while !shutdown.is_cancelled() {
        match one_term(
            &store,
            &stream_client,
            &member,
            &settings,
            &leadership,
            &shutdown,
        )
        .await
        {
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
    client: &Client,
    member: &MemberRecord,
    settings: &LeaderSettings,
    leadership: &watch::Sender<Leadership>,
    shutdown: &CancellationToken,
) -> Result<()> {
    let ttl = settings.lease_ttl;
    let mut lease_client = client.lease_client();
    let lease = lease_client
        .grant(ttl.as_secs() as i64, None)
        .await
        .map_err(Error::etcd("grant lease"))?
        .id();
    let (mut keeper, mut responses) = lease_client
        .keep_alive(lease)
        .await
        .map_err(Error::etcd("keep lease alive"))?;
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
                    if let Err(error) = keeper.keep_alive().await {
                        warn!(%error, "lease keep-alive failed");
                        return;
                    }
                    match tokio::time::timeout(
                        period.max(Duration::from_millis(500)),
                        responses.message(),
                    )
                    .await
                    {
                        Ok(Ok(Some(r))) if r.ttl() > 0 => {}
                        Ok(Ok(Some(_))) => {
                            warn!("lease expired");
                            return;
                        }
                        Ok(Ok(None)) => {
                            warn!("lease keep-alive stream closed");
                            return;
                        }
                        Ok(Err(error)) => {
                            warn!(%error, "lease keep-alive failed");
                            return;
                        }
                        Err(_) => {
                            warn!("lease keep-alive timed out");
                            return;
                        }
                    }
                }
            }
            .instrument(tracing::info_span!("lease_keepalive", lease)),
        )
    };

    let result = async {
        client
            .kv_client()
            .put(
                store.keys().member(&member.id),
                encode(member),
                Some(etcd_client::PutOptions::new().with_lease(lease)),
            )
            .await
            .map_err(Error::etcd("register member"))?;
        info!(lease, "registered; campaigning for leadership");

        let mut election = client.election_client();
        let campaign = election.campaign(store.keys().election(), member.id.clone(), lease);
        let leader_key: LeaderKey = tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = lease_lost.cancelled() => return Err(Error::ShuttingDown),
            r = campaign => r.map_err(Error::etcd("campaign"))?
                .take_leader()
                .ok_or_else(|| Error::InvalidArgument("campaign returned no leader key".into()))?,
        };
        let fence = Fence {
            epoch: leader_key.rev(),
            leader_key: leader_key.key().to_vec(),
        };
        info!(epoch = fence.epoch, "elected leader");
        leadership.send_replace(Leadership::Leader(fence.clone()));
        let event = Event {
            revision: 0,
            at_unix_ms: unix_ms(),
            kind: EventKind::LeaderElected,
            node: None,
            replica: member.id.clone(),
            message: format!("{} leads with epoch {}", member.id, fence.epoch),
        };
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
        if let Err(error) = client
            .election_client()
            .resign(Some(ResignOptions::new().with_leader(key.clone())))
            .await
        {
            warn!(%error, "resign failed");
        }
    }
    if shutdown.is_cancelled() || result.is_err() || matches!(result, Ok(Some(_))) {
        if let Err(error) = client.lease_client().revoke(lease).await {
            warn!(%error, "lease revoke failed");
        }
    }
    keepalive.abort();
    result.map(drop)
}

pub async fn record_event_fenced(store: &Store, fence: &Fence, event: &Event) -> Result<()> {
    let key = format!(
        "{}{:016}-{}-leader-{}",
        store.keys().events(),
        event.at_unix_ms,
        store.replica(),
        fence.epoch
    );
    fence
        .txn(&store.client(), vec![TxnOp::put(key, encode(event), None)])
        .await
}
