//! The replica's acker, fed from etcd, and its expiry marks written back.
//!
//! Runs on every replica, leader or not. The acker learns owners and marks
//! from the VIP watch cache; when it decides a mark (no ack for a lease, or a
//! release heard), the mark is written to
//! `vips/<name>/expired/<epoch>/<replica>` — only while the owner key is
//! still at that epoch, so reassigned epochs leave no garbage behind. When
//! the holder of a marked epoch heartbeats this replica again, the mark is
//! deleted (again only while the owner is at that epoch) before the acker
//! acks it again; placement moves a VIP only if every mark it counted is
//! still there (see `steward_lease`, "Why it is safe").

use std::sync::Arc;
use std::time::Duration;

use steward_lease::Acker;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::store::Store;
use crate::vip::lease_api::LeaseHub;
use crate::vip::VipSnapshot;

/// Retry delay for marks etcd did not take.
const RETRY: Duration = Duration::from_millis(100);
/// Resync even when nothing happens.
const RESYNC: Duration = Duration::from_secs(1);

/// Tells the acker what etcd says: owners and their epochs, this replica's
/// own marks (written in a previous life, say), VIPs that are gone.
pub fn feed(acker: &mut Acker, snapshot: &VipSnapshot, now: Duration) {
    if !snapshot.synced {
        return;
    }
    for name in acker.known() {
        let gone = snapshot.vips.get(&name).is_none_or(|s| s.spec.is_none());
        if gone {
            acker.on_removed(&name);
        }
    }
    for (name, state) in &snapshot.vips {
        if state.spec.is_none() {
            continue;
        }
        let Some((owner, epoch)) = &state.owner else {
            continue;
        };
        acker.on_owner(name, owner.clone(), *epoch, now);
        if let Some(marks) = state.marks.get(epoch) {
            for (replica, reason) in marks {
                acker.on_mark(name, *epoch, replica, *reason);
            }
        }
        let requested = state.current_move().is_some();
        acker.set_release_requested(name, *epoch, requested);
    }
}

/// Runs until `shutdown`.
pub async fn run_marker(
    store: Store,
    hub: Arc<LeaseHub>,
    mut vips: watch::Receiver<Arc<VipSnapshot>>,
    shutdown: CancellationToken,
) {
    loop {
        let snapshot = vips.borrow_and_update().clone();
        let now = hub.now();
        let pending = hub.with_acker(|a| {
            feed(a, &snapshot, now);
            a.tick(now);
            a.pending_marks()
        });
        let mut failed = false;
        for mark in pending {
            match store.write_mark(&mark.vip, mark.epoch, mark.reason).await {
                Ok(written) => {
                    if written {
                        // How long this replica had been quiet for the
                        // epoch: failover timelines start from its last ack.
                        let since_last_ack_ms = hub
                            .with_acker(|a| a.quiet_since(&mark.vip))
                            .map_or(-1, |since| {
                                hub.now().saturating_sub(since).as_millis() as i64
                            });
                        info!(vip.name = %mark.vip, vip.epoch = mark.epoch, reason = mark.reason.as_str(), since_last_ack_ms, "expiry mark written");
                    }
                    // Written, or the epoch is already over: either way this
                    // replica never acks it again.
                    hub.with_acker(|a| a.on_mark_written(&mark.vip, mark.epoch, mark.reason));
                }
                Err(error) => {
                    failed = true;
                    warn!(%error, vip.name = %mark.vip, vip.epoch = mark.epoch, "cannot write expiry mark yet");
                }
            }
        }
        let withdrawals = hub.with_acker(|a| a.pending_withdrawals());
        for (vip, epoch) in withdrawals {
            match store.withdraw_mark(&vip, epoch).await {
                Ok(true) => {
                    info!(vip.name = %vip, vip.epoch = epoch, "expiry mark withdrawn: the holder heartbeats this replica again");
                    hub.with_acker(|a| a.on_withdrawn(&vip, epoch, hub.now()));
                }
                Ok(false) => hub.with_acker(|a| a.on_withdraw_refused(&vip, epoch)),
                Err(error) => {
                    failed = true;
                    warn!(%error, vip.name = %vip, vip.epoch = epoch, "cannot withdraw expiry mark yet");
                }
            }
        }
        let wait = if failed {
            RETRY
        } else {
            hub.with_acker(|a| a.next_deadline())
                .map_or(RESYNC, |at| at.saturating_sub(hub.now()).min(RESYNC))
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = vips.changed() => if changed.is_err() { return },
            _ = hub.marks_due.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
