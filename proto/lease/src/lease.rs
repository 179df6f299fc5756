//! The VIP lease protocol (DESIGN.md §3, "quorum-acknowledged leases"),
//! free of IO and of clocks, so that the agent, the coordinator and the
//! deterministic simulation (`proto/tests/vip_sim.rs`) run the same code.
//!
//! Three parts:
//! - [`Holder`] — the agent side: which VIPs this node may keep bound, right
//!   now, by the holding rule (a quorum of replicas acked a heartbeat younger
//!   than `lease × (1 − drift margin)` on the node's own monotonic clock).
//! - [`Acker`] — a coordinator replica: acks heartbeats for the epoch its
//!   view of etcd names, stops acking an epoch once it marks it (for good,
//!   unless it takes the mark back while that epoch still stands), and
//!   decides when to write an expiry mark.
//! - [`place`] — the leader: whom to give a VIP next, and when.
//!
//! Time is a [`Duration`] since an arbitrary origin on the caller's monotonic
//! clock; nothing here reads a clock. Callers feed events in, carry out the
//! returned actions, and call `tick` again no later than `next_deadline`.
//!
//! **Why it is safe.** A holder keeps the address only while `Q` replicas
//! acked one of its heartbeats sent less than `L·(1−m)` ago. A replica marks
//! epoch `E` expired only when it has not acked `E` for `L`, and acks `E`
//! no more while its mark stands; a release is a mark written at once, because the holder
//! dropped the address before it said so. The leader moves a VIP only after
//! `Q` marks for its epoch, and any `Q` marks and any `Q` acks share a replica
//! — so by then the old holder's quorum has lapsed, as long as clock rates
//! differ by less than about `m/2`.
//!
//! A replica may take its expiry mark back when the holder turns out to be
//! alive (a stalled host, a stream that broke for a lease): it deletes the
//! mark while the owner is still at `E`, and acks `E` again only after that
//! delete succeeded. The leader's move is a txn that also requires every mark
//! it counted to still exist. etcd orders the two: a withdrawn mark never
//! counts towards a move, and a mark a move counted is never withdrawn (the
//! owner changed), so "a mark that moved the VIP means no ack for a lease
//! before it and none since" still holds. Without this, a hiccup at one
//! replica and, minutes later, one at another would move a healthy holder.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use crate::domain::NodeId;

/// Epoch of a VIP assignment: the etcd revision at which the leader wrote
/// the owner, so epochs only grow, even across removal and re-creation.
pub type Epoch = u64;

/// A coordinator replica's id (its certificate's common name).
pub type ReplicaId = String;

/// Timing of the lease protocol.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LeaseParams {
    /// How often a candidate heartbeats every replica (`H`).
    pub heartbeat: Duration,
    /// How long an ack keeps a holder entitled (`L`).
    pub lease: Duration,
    /// Fraction of the lease the holder gives up to clock-rate drift and to
    /// the time it takes to remove an address (`m`).
    pub drift_margin: f64,
    /// Coordinator replicas in the cluster (`R`); quorum is `R/2 + 1`.
    pub replicas: usize,
}

impl LeaseParams {
    /// Defaults: a silently dead holder is replaced in about `L` plus a
    /// round trip, i.e. well under a second.
    pub const DEFAULT: LeaseParams = LeaseParams {
        heartbeat: Duration::from_millis(150),
        lease: Duration::from_millis(700),
        drift_margin: 0.1,
        replicas: 3,
    };

    /// The fast profile: failover in about 250 ms, for networks with
    /// sub-millisecond latency and hosts that are not overloaded.
    pub const FAST: LeaseParams = LeaseParams {
        heartbeat: Duration::from_millis(30),
        lease: Duration::from_millis(150),
        drift_margin: 0.1,
        replicas: 3,
    };

    /// Smallest lease, in heartbeats: a holder must survive a lost heartbeat
    /// or two without dropping the address.
    pub const MIN_HEARTBEATS_PER_LEASE: u32 = 3;

    pub fn quorum(&self) -> usize {
        self.replicas / 2 + 1
    }

    /// How long after sending a heartbeat its acks entitle the holder.
    pub fn hold_window(&self) -> Duration {
        self.lease.mul_f64(1.0 - self.drift_margin)
    }

    /// How long a replica that just started waits, beyond the lease, before
    /// it may mark an epoch expired: holders need time to reconnect to it,
    /// and a hasty mark would cost the holder this replica's acks until the
    /// mark is taken back (an etcd round trip after the holder is heard
    /// again). Waiting is always safe (a mark only permits a
    /// reassignment) and does not slow failover while the other replicas
    /// are up: a quorum of marks is enough.
    pub fn restart_grace(&self) -> Duration {
        (self.lease * 3).max(Duration::from_secs(2))
    }

    /// Every problem with these parameters, or nothing.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.heartbeat < Duration::from_millis(10) {
            problems.push(format!(
                "heartbeat {:?} is too short (at least 10ms)",
                self.heartbeat
            ));
        }
        if self.lease < self.heartbeat * Self::MIN_HEARTBEATS_PER_LEASE {
            problems.push(format!(
                "lease {:?} must be at least {} heartbeats ({:?})",
                self.lease,
                Self::MIN_HEARTBEATS_PER_LEASE,
                self.heartbeat * Self::MIN_HEARTBEATS_PER_LEASE
            ));
        }
        if !(0.02..=0.5).contains(&self.drift_margin) {
            problems.push(format!(
                "drift margin {} must be between 0.02 and 0.5",
                self.drift_margin
            ));
        }
        if self.replicas == 0 {
            problems.push("replicas must be at least 1".into());
        }
        problems
    }
}

/// Where a VIP lives on a host.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Target {
    pub address: IpAddr,
    pub prefix: u8,
    /// `None`: the interface with an address in the VIP's subnet.
    pub interface: Option<String>,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)?;
        if let Some(interface) = &self.interface {
            write!(f, " on {interface}")?;
        }
        Ok(())
    }
}

/// What a replica tells a candidate about one VIP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub vip: String,
    pub epoch: Epoch,
    pub owner: Option<NodeId>,
    pub target: Target,
    /// An operator asked the holder of `epoch` to let go (`vip move`).
    pub release_requested: bool,
}

/// What a candidate says about one VIP in every heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub vip: String,
    pub epoch: Epoch,
    /// The node let go of `epoch` and will never hold it again.
    pub released: bool,
}

/// What the agent must do to its host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HolderAction {
    /// Ask the network whether anybody uses the address (RFC 5227 probe),
    /// then report with [`Holder::on_probe_result`].
    Probe {
        vip: String,
        epoch: Epoch,
        target: Target,
    },
    /// Add the address to the interface.
    Bind { vip: String, target: Target },
    /// Remove the address from the interface, now.
    Unbind {
        vip: String,
        target: Target,
        why: &'static str,
    },
    /// Gratuitous ARP / unsolicited neighbour advertisement.
    Announce { vip: String, target: Target },
}

/// Where the agent stands with one VIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binding {
    Unbound,
    Probing { since: Duration },
    Bound,
}

/// Announcements after binding: one at once, then this many more...
const REPEAT_ANNOUNCEMENTS: u32 = 4;
/// ...this far apart.
const ANNOUNCE_INTERVAL: Duration = Duration::from_secs(1);
/// A probe that has not reported by then is given up and retried.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
struct HeldVip {
    epoch: Epoch,
    mine: bool,
    target: Target,
    /// Per replica, the send time of the newest heartbeat it acked for `epoch`.
    acks: BTreeMap<ReplicaId, Duration>,
    released: bool,
    healthy: bool,
    binding: Binding,
    /// Announcements still due, and when the next one is.
    announcements: Option<(u32, Duration)>,
    /// A probe found the address in use; do not probe again before this.
    probe_after: Duration,
}

impl HeldVip {
    /// When fewer than `quorum` acks will still be fresh; `None`: already.
    fn quorum_until(&self, params: &LeaseParams) -> Option<Duration> {
        let mut expiries: Vec<Duration> = self
            .acks
            .values()
            .map(|sent| *sent + params.hold_window())
            .collect();
        expiries.sort_unstable_by(|a, b| b.cmp(a));
        expiries.get(params.quorum() - 1).copied()
    }

    fn entitled(&self, params: &LeaseParams, now: Duration) -> bool {
        self.mine
            && !self.released
            && self.healthy
            && self.quorum_until(params).is_some_and(|until| now < until)
    }
}

/// The agent's side of the protocol, for every VIP the node is a candidate of.
#[derive(Debug)]
pub struct Holder {
    params: LeaseParams,
    me: NodeId,
    vips: BTreeMap<String, HeldVip>,
}

/// One VIP as the holder sees it, for status reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HolderView {
    pub vip: String,
    pub epoch: Epoch,
    pub mine: bool,
    pub binding: Binding,
    pub released: bool,
    pub healthy: bool,
    pub target: Target,
    /// Replicas whose acks are fresh now.
    pub fresh_acks: usize,
}

impl Holder {
    pub fn new(me: NodeId, params: LeaseParams) -> Self {
        Self {
            params,
            me,
            vips: BTreeMap::new(),
        }
    }

    pub fn params(&self) -> &LeaseParams {
        &self.params
    }

    /// A replica's view of a VIP. Older epochs are ignored; a newer one
    /// replaces whatever the node held.
    pub fn on_assignment(&mut self, a: Assignment, now: Duration) -> Vec<HolderAction> {
        let mut actions = Vec::new();
        let mine = a.owner.as_ref() == Some(&self.me);
        match self.vips.get_mut(&a.vip) {
            Some(vip) if a.epoch < vip.epoch => return actions,
            Some(vip) if a.epoch == vip.epoch => {
                if vip.target != a.target {
                    unbind(&a.vip, vip, "the VIP's address changed", &mut actions);
                    vip.target = a.target.clone();
                }
                if a.release_requested && vip.mine && !vip.released {
                    vip.released = true;
                    unbind(&a.vip, vip, "released on request", &mut actions);
                }
            }
            Some(vip) => {
                unbind(&a.vip, vip, "a newer epoch was assigned", &mut actions);
                let healthy = vip.healthy;
                *vip = fresh(&a, mine, healthy);
            }
            None => {
                self.vips.insert(a.vip.clone(), fresh(&a, mine, true));
            }
        }
        actions.extend(self.tick(now));
        actions
    }

    /// A replica acked the heartbeat this node sent at `sent_at`, for these
    /// epochs.
    pub fn on_ack(
        &mut self,
        replica: &str,
        sent_at: Duration,
        acked: &[(String, Epoch)],
        now: Duration,
    ) -> Vec<HolderAction> {
        // An ack cannot be for a heartbeat from the future.
        let sent_at = sent_at.min(now);
        for (name, epoch) in acked {
            if let Some(vip) = self.vips.get_mut(name) {
                if vip.epoch == *epoch && vip.mine {
                    let newest = vip.acks.entry(replica.to_owned()).or_insert(sent_at);
                    *newest = (*newest).max(sent_at);
                }
            }
        }
        self.tick(now)
    }

    /// The local health check of `vip` (HAProxy answers, ...). A failing
    /// check releases the VIP.
    pub fn set_health(&mut self, vip: &str, ok: bool, now: Duration) -> Vec<HolderAction> {
        let mut actions = Vec::new();
        if let Some(held) = self.vips.get_mut(vip) {
            held.healthy = ok;
            if !ok && held.mine && !held.released {
                held.released = true;
                unbind(vip, held, "the local health check failed", &mut actions);
            }
        }
        actions.extend(self.tick(now));
        actions
    }

    /// Let go of `vip` (planned move, drain, shutdown).
    pub fn release(&mut self, vip: &str, now: Duration) -> Vec<HolderAction> {
        let mut actions = Vec::new();
        if let Some(held) = self.vips.get_mut(vip) {
            if held.mine && !held.released {
                held.released = true;
                unbind(vip, held, "released", &mut actions);
            }
        }
        actions.extend(self.tick(now));
        actions
    }

    /// Let go of everything (the agent is stopping).
    pub fn release_all(&mut self, now: Duration) -> Vec<HolderAction> {
        let names: Vec<String> = self.vips.keys().cloned().collect();
        names
            .iter()
            .flat_map(|name| self.release(name, now))
            .collect()
    }

    /// The answer to a [`HolderAction::Probe`].
    pub fn on_probe_result(
        &mut self,
        name: &str,
        epoch: Epoch,
        in_use: bool,
        now: Duration,
    ) -> Vec<HolderAction> {
        let mut actions = Vec::new();
        let params = self.params;
        if let Some(vip) = self.vips.get_mut(name) {
            if vip.epoch == epoch && matches!(vip.binding, Binding::Probing { .. }) {
                if in_use {
                    vip.binding = Binding::Unbound;
                    vip.probe_after = now + params.heartbeat;
                } else if vip.entitled(&params, now) {
                    vip.binding = Binding::Bound;
                    vip.announcements = Some((REPEAT_ANNOUNCEMENTS, now + ANNOUNCE_INTERVAL));
                    actions.push(HolderAction::Bind {
                        vip: name.to_owned(),
                        target: vip.target.clone(),
                    });
                    actions.push(HolderAction::Announce {
                        vip: name.to_owned(),
                        target: vip.target.clone(),
                    });
                } else {
                    vip.binding = Binding::Unbound;
                }
            }
        }
        actions.extend(self.tick(now));
        actions
    }

    /// What the host actually has: corrects the holder's belief (an address
    /// removed behind its back is bound again; one it should not have, for
    /// instance left over from before a restart, is removed).
    pub fn observe(&mut self, name: &str, present: bool, now: Duration) -> Vec<HolderAction> {
        let mut actions = Vec::new();
        if let Some(vip) = self.vips.get_mut(name) {
            match (vip.binding, present) {
                (Binding::Bound, false) => vip.binding = Binding::Unbound,
                (Binding::Unbound, true) => actions.push(HolderAction::Unbind {
                    vip: name.to_owned(),
                    target: vip.target.clone(),
                    why: "bound without a lease",
                }),
                _ => {}
            }
        }
        actions.extend(self.tick(now));
        actions
    }

    /// Applies the holding rule to every VIP: drops what lapsed, probes what
    /// became due, repeats announcements.
    pub fn tick(&mut self, now: Duration) -> Vec<HolderAction> {
        let mut actions = Vec::new();
        let params = self.params;
        for (name, vip) in &mut self.vips {
            let entitled = vip.entitled(&params, now);
            match vip.binding {
                Binding::Bound if !entitled => {
                    let why = if vip.released {
                        "released"
                    } else if !vip.healthy {
                        "the local health check failed"
                    } else if !vip.mine {
                        "no longer the owner"
                    } else {
                        "lost the quorum of acks"
                    };
                    unbind(name, vip, why, &mut actions);
                }
                Binding::Bound => {
                    if let Some((left, at)) = vip.announcements {
                        if now >= at {
                            actions.push(HolderAction::Announce {
                                vip: name.clone(),
                                target: vip.target.clone(),
                            });
                            vip.announcements =
                                (left > 1).then(|| (left - 1, now + ANNOUNCE_INTERVAL));
                        }
                    }
                }
                Binding::Probing { since } if !entitled || now >= since + PROBE_TIMEOUT => {
                    vip.binding = Binding::Unbound;
                }
                Binding::Probing { .. } => {}
                Binding::Unbound if entitled && now >= vip.probe_after => {
                    vip.binding = Binding::Probing { since: now };
                    actions.push(HolderAction::Probe {
                        vip: name.clone(),
                        epoch: vip.epoch,
                        target: vip.target.clone(),
                    });
                }
                Binding::Unbound => {}
            }
        }
        actions
    }

    /// The latest instant `tick` must run again for the holding rule to be
    /// kept: when a bound address's quorum lapses, an announcement is due, or
    /// a probe times out.
    pub fn next_deadline(&self) -> Option<Duration> {
        self.vips
            .values()
            .filter_map(|vip| match vip.binding {
                Binding::Bound => {
                    let lapse = vip.quorum_until(&self.params);
                    let announce = vip.announcements.map(|(_, at)| at);
                    [lapse, announce].into_iter().flatten().min()
                }
                Binding::Probing { since } => Some(since + PROBE_TIMEOUT),
                Binding::Unbound if vip.probe_after > Duration::ZERO => Some(vip.probe_after),
                Binding::Unbound => None,
            })
            .min()
    }

    /// What to say about each VIP in the next heartbeat.
    pub fn claims(&self) -> Vec<Claim> {
        self.vips
            .iter()
            .filter(|(_, vip)| vip.mine)
            .map(|(name, vip)| Claim {
                vip: name.clone(),
                epoch: vip.epoch,
                released: vip.released,
            })
            .collect()
    }

    /// Health of each VIP's local check, as the leader needs it for placement.
    pub fn health(&self) -> Vec<(String, bool)> {
        self.vips
            .iter()
            .map(|(name, vip)| (name.clone(), vip.healthy))
            .collect()
    }

    /// Whether `vip` is bound (or about to be) on this node.
    pub fn binding(&self, vip: &str) -> Binding {
        self.vips
            .get(vip)
            .map_or(Binding::Unbound, |vip| vip.binding)
    }

    pub fn view(&self, now: Duration) -> Vec<HolderView> {
        let window = self.params.hold_window();
        self.vips
            .iter()
            .map(|(name, vip)| HolderView {
                vip: name.clone(),
                epoch: vip.epoch,
                mine: vip.mine,
                binding: vip.binding,
                released: vip.released,
                healthy: vip.healthy,
                target: vip.target.clone(),
                fresh_acks: vip.acks.values().filter(|s| now < **s + window).count(),
            })
            .collect()
    }
}

fn fresh(a: &Assignment, mine: bool, healthy: bool) -> HeldVip {
    HeldVip {
        epoch: a.epoch,
        mine,
        target: a.target.clone(),
        acks: BTreeMap::new(),
        // Asked to let go of an epoch it never held: it will not take it.
        released: mine && a.release_requested,
        healthy,
        binding: Binding::Unbound,
        announcements: None,
        probe_after: Duration::ZERO,
    }
}

fn unbind(name: &str, vip: &mut HeldVip, why: &'static str, actions: &mut Vec<HolderAction>) {
    if vip.binding == Binding::Bound {
        actions.push(HolderAction::Unbind {
            vip: name.to_owned(),
            target: vip.target.clone(),
            why,
        });
    }
    vip.binding = Binding::Unbound;
    vip.announcements = None;
}

// ---------------------------------------------------------------------------
// Replica side
// ---------------------------------------------------------------------------

/// Why a replica marked an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MarkReason {
    /// No ack for the lease time.
    Expired,
    /// The holder said it let go.
    Released,
}

impl MarkReason {
    pub fn as_str(self) -> &'static str {
        match self {
            MarkReason::Expired => "expired",
            MarkReason::Released => "released",
        }
    }
}

/// An expiry mark to write to etcd: `vips/<vip>/expired/<epoch>/<replica>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Mark {
    pub vip: String,
    pub epoch: Epoch,
    pub reason: MarkReason,
}

#[derive(Debug, Clone)]
struct AckedVip {
    epoch: Epoch,
    owner: Option<NodeId>,
    /// When this replica learnt of `epoch`.
    seen_at: Duration,
    last_ack: Option<Duration>,
    /// Decided: no more acks for `epoch` (for good if released). Carries
    /// the reason of the mark.
    stopped: Option<MarkReason>,
    mark_written: bool,
    /// The owner heartbeats this replica again after it marked `epoch`
    /// expired: the mark is to be taken back (see
    /// [`Acker::pending_withdrawals`]).
    withdraw: bool,
    /// This replica took its own mark for `epoch` back: an own mark etcd
    /// still shows is that one, seen late (its own later marks it records
    /// through [`Acker::on_mark_written`]).
    withdrawn: bool,
    release_requested: bool,
}

/// A coordinator replica's side of the protocol.
#[derive(Debug)]
pub struct Acker {
    params: LeaseParams,
    me: ReplicaId,
    started: Duration,
    vips: BTreeMap<String, AckedVip>,
}

impl Acker {
    /// `started`: when this replica process started. Since it cannot know
    /// what it acked in a previous life, it writes no expiry mark before
    /// `started + lease`, and gives holders [`LeaseParams::restart_grace`]
    /// more to reconnect.
    pub fn new(me: ReplicaId, params: LeaseParams, started: Duration) -> Self {
        Self {
            params,
            me,
            started,
            vips: BTreeMap::new(),
        }
    }

    pub fn id(&self) -> &str {
        &self.me
    }

    /// etcd names `owner` for `vip` at `epoch` (initial load or watch).
    pub fn on_owner(&mut self, vip: &str, owner: Option<NodeId>, epoch: Epoch, now: Duration) {
        if self.vips.get(vip).is_some_and(|v| v.epoch >= epoch) {
            return;
        }
        self.vips.insert(
            vip.to_owned(),
            AckedVip {
                epoch,
                stopped: owner.is_none().then_some(MarkReason::Expired),
                // Nothing to mark when nobody owns the epoch.
                mark_written: owner.is_none(),
                withdraw: false,
                withdrawn: false,
                owner,
                seen_at: now,
                last_ack: None,
                release_requested: false,
            },
        );
    }

    /// The VIPs this replica knows an owner of.
    pub fn known(&self) -> Vec<String> {
        self.vips.keys().cloned().collect()
    }

    /// The VIP was removed: ack nothing more for it.
    pub fn on_removed(&mut self, vip: &str) {
        self.vips.remove(vip);
    }

    /// A mark seen in etcd. This replica's own mark (written before a
    /// restart, say) means it must not ack that epoch unless it takes the
    /// mark back first ([`Acker::pending_withdrawals`]).
    pub fn on_mark(&mut self, vip: &str, epoch: Epoch, replica: &str, reason: MarkReason) {
        if replica != self.me {
            return;
        }
        if self
            .vips
            .get(vip)
            .is_some_and(|v| v.epoch == epoch && v.withdrawn)
        {
            // The mark this replica withdrew, seen late.
            return;
        }
        self.on_mark_written(vip, epoch, reason);
    }

    /// This replica's own mark is in etcd (its write succeeded), or the
    /// epoch is over.
    pub fn on_mark_written(&mut self, vip: &str, epoch: Epoch, reason: MarkReason) {
        if let Some(v) = self.vips.get_mut(vip) {
            if v.epoch == epoch {
                v.stopped.get_or_insert(reason);
                v.mark_written = true;
            }
        }
    }

    /// Expiry marks to take back, because the owner heartbeats this replica
    /// again: delete each (only while the owner is still at that epoch),
    /// then call [`Acker::on_withdrawn`] — only then does this replica ack
    /// the epoch again. Safe because the leader moves a VIP only in a txn
    /// that finds every mark it counted still there: a withdrawn mark can
    /// never again count towards a move, and a mark a move counted can
    /// never be withdrawn (the owner changed).
    pub fn pending_withdrawals(&self) -> Vec<(String, Epoch)> {
        self.vips
            .iter()
            .filter(|(_, v)| wants_withdrawal(v))
            .map(|(name, v)| (name.clone(), v.epoch))
            .collect()
    }

    pub fn has_pending_withdrawals(&self) -> bool {
        self.vips.values().any(wants_withdrawal)
    }

    /// The own mark for `epoch` is deleted while the owner was still at
    /// `epoch`: ack it again, and mark it again only after a quiet lease
    /// from now.
    pub fn on_withdrawn(&mut self, vip: &str, epoch: Epoch, now: Duration) {
        if let Some(v) = self.vips.get_mut(vip) {
            if v.epoch == epoch && wants_withdrawal(v) {
                v.stopped = None;
                v.mark_written = false;
                v.withdraw = false;
                v.withdrawn = true;
                v.last_ack = None;
                v.seen_at = now;
            }
        }
    }

    /// The withdrawal was refused: the epoch is over.
    pub fn on_withdraw_refused(&mut self, vip: &str, epoch: Epoch) {
        if let Some(v) = self.vips.get_mut(vip) {
            if v.epoch == epoch {
                v.withdraw = false;
            }
        }
    }

    /// An operator asked the holder of `epoch` to let go, or withdrew that.
    pub fn set_release_requested(&mut self, vip: &str, epoch: Epoch, requested: bool) {
        if let Some(v) = self.vips.get_mut(vip) {
            if v.epoch == epoch {
                v.release_requested = requested;
            }
        }
    }

    /// A heartbeat from `node`: returns the epochs acked. Released epochs
    /// are marked at once (see [`Acker::pending_marks`]).
    pub fn on_heartbeat(
        &mut self,
        node: &NodeId,
        claims: &[Claim],
        now: Duration,
    ) -> Vec<(String, Epoch)> {
        let mut acked = Vec::new();
        for claim in claims {
            let Some(v) = self.vips.get_mut(&claim.vip) else {
                continue;
            };
            if v.epoch != claim.epoch || v.owner.as_ref() != Some(node) {
                continue;
            }
            if claim.released {
                v.stopped.get_or_insert(MarkReason::Released);
                v.withdraw = false;
            } else if v.stopped.is_none() {
                v.last_ack = Some(now);
                acked.push((claim.vip.clone(), claim.epoch));
            } else if v.stopped == Some(MarkReason::Expired) && v.mark_written {
                // A holder that was quiet for a lease (a stalled host, a
                // broken stream) is back: take the mark back rather than
                // leave it to add up with the next hiccup elsewhere.
                v.withdraw = true;
            }
        }
        acked
    }

    /// Decides the expiry marks that became due.
    pub fn tick(&mut self, now: Duration) {
        let lease = self.params.lease;
        let not_before = self.first_mark_at();
        for v in self.vips.values_mut() {
            if v.stopped.is_none() {
                let quiet_since = v.last_ack.unwrap_or(v.seen_at);
                if now >= quiet_since + lease && now >= not_before {
                    v.stopped = Some(MarkReason::Expired);
                }
            }
        }
    }

    fn first_mark_at(&self) -> Duration {
        self.started + self.params.lease + self.params.restart_grace()
    }

    /// Marks decided but not yet seen written; write each, then call
    /// [`Acker::on_mark`] (or wait for the watch to deliver it).
    pub fn pending_marks(&self) -> Vec<Mark> {
        self.vips
            .iter()
            .filter(|(_, v)| !v.mark_written)
            .filter_map(|(name, v)| {
                v.stopped.map(|reason| Mark {
                    vip: name.clone(),
                    epoch: v.epoch,
                    reason,
                })
            })
            .collect()
    }

    /// When `tick` must run next to write a mark on time.
    pub fn next_deadline(&self) -> Option<Duration> {
        let not_before = self.first_mark_at();
        self.vips
            .values()
            .filter(|v| v.stopped.is_none())
            .map(|v| (v.last_ack.unwrap_or(v.seen_at) + self.params.lease).max(not_before))
            .min()
    }

    /// What this replica tells `node` about every VIP it knows.
    pub fn release_requested(&self, vip: &str) -> bool {
        self.vips.get(vip).is_some_and(|v| v.release_requested)
    }

    /// The epoch and owner this replica knows for `vip`.
    pub fn owner(&self, vip: &str) -> Option<(Epoch, Option<&NodeId>)> {
        self.vips.get(vip).map(|v| (v.epoch, v.owner.as_ref()))
    }

    /// Since when this replica has not acked `vip`'s current epoch: its
    /// last ack, or when it learnt of the epoch if it never acked it.
    pub fn quiet_since(&self, vip: &str) -> Option<Duration> {
        self.vips.get(vip).map(|v| v.last_ack.unwrap_or(v.seen_at))
    }

    /// Whether this replica still acks `vip`'s current epoch, and when it
    /// last did.
    pub fn ack_state(&self, vip: &str) -> Option<(bool, Option<Duration>)> {
        self.vips
            .get(vip)
            .map(|v| (v.stopped.is_none(), v.last_ack))
    }
}

fn wants_withdrawal(v: &AckedVip) -> bool {
    v.withdraw && v.mark_written && v.stopped == Some(MarkReason::Expired)
}

// ---------------------------------------------------------------------------
// Leader side
// ---------------------------------------------------------------------------

/// A node that may hold a VIP, as the leader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub node: NodeId,
    pub priority: u32,
    /// Heartbeating this replica, and its local check passes.
    pub healthy: bool,
    /// Its failure domain (the `zone` label; `None`: none given).
    pub zone: Option<String>,
}

/// The leader's view of one VIP.
#[derive(Debug, Clone)]
pub struct PlacementInput<'a> {
    /// Current owner and epoch; `None`: never assigned.
    pub owner: Option<(Option<&'a NodeId>, Epoch)>,
    /// Distinct replicas that marked the current epoch.
    pub marks: usize,
    pub quorum: usize,
    pub candidates: &'a [Candidate],
    /// An operator asked for a move away from the current epoch, optionally
    /// to a given node.
    pub move_to: Option<Option<&'a NodeId>>,
    pub preempt: bool,
    /// The zone of the node being replaced (the owner), if it has one:
    /// among candidates of equal priority, one in another zone is taken.
    pub owner_zone: Option<&'a str>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// Nothing to do.
    Keep,
    /// Write a new owner (a new epoch); `None` leaves the VIP unowned until a
    /// healthy candidate appears.
    Assign(Option<NodeId>),
    /// Ask the holder to release (it is no longer a candidate, or preemption
    /// found a better one).
    RequestRelease,
}

/// Decides what the leader does with one VIP.
pub fn place(input: &PlacementInput<'_>) -> Placement {
    let healthy = |node: &NodeId| {
        input
            .candidates
            .iter()
            .any(|c| &c.node == node && c.healthy)
    };
    // The next holder should not share the failure domain of the one it
    // replaces: a tiebreak after priority, among the healthy only (it
    // never waits for anyone).
    let elsewhere = |c: &Candidate| match (input.owner_zone, c.zone.as_deref()) {
        (Some(owner), Some(zone)) => zone != owner,
        _ => false,
    };
    let best = |except: Option<&NodeId>| {
        input
            .candidates
            .iter()
            .filter(|c| c.healthy && Some(&c.node) != except)
            .max_by(|a, b| {
                a.priority
                    .cmp(&b.priority)
                    .then(elsewhere(a).cmp(&elsewhere(b)))
                    .then(b.node.cmp(&a.node))
            })
            .map(|c| c.node.clone())
    };
    match input.owner {
        None | Some((None, _)) => match best(None) {
            Some(node) => Placement::Assign(Some(node)),
            None => Placement::Keep,
        },
        Some((Some(owner), _)) if input.marks >= input.quorum => {
            let requested = input
                .move_to
                .flatten()
                .filter(|to| healthy(to) && *to != owner)
                .cloned();
            let next = requested
                .or_else(|| best(Some(owner)))
                .or_else(|| healthy(owner).then(|| owner.clone()));
            Placement::Assign(next)
        }
        Some((Some(owner), _)) => {
            if input.move_to.is_some() {
                return Placement::Keep;
            }
            let Some(current) = input.candidates.iter().find(|c| &c.node == owner) else {
                return Placement::RequestRelease;
            };
            let better = input
                .candidates
                .iter()
                .any(|c| c.healthy && c.priority > current.priority);
            if input.preempt && better {
                Placement::RequestRelease
            } else {
                Placement::Keep
            }
        }
    }
}

/// Distinct replicas among marks (the leader counts these against quorum).
pub fn distinct_replicas<'a>(marks: impl IntoIterator<Item = &'a str>) -> usize {
    marks.into_iter().collect::<BTreeSet<_>>().len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str) -> NodeId {
        NodeId::new(id).unwrap()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn target() -> Target {
        Target {
            address: "198.18.0.100".parse().unwrap(),
            prefix: 24,
            interface: None,
        }
    }

    fn assignment(epoch: Epoch, owner: &str) -> Assignment {
        Assignment {
            vip: "front".into(),
            epoch,
            owner: Some(node(owner)),
            target: target(),
            release_requested: false,
        }
    }

    fn acked(epoch: Epoch) -> Vec<(String, Epoch)> {
        vec![("front".into(), epoch)]
    }

    fn probe_then_bind(h: &mut Holder, epoch: Epoch, now: Duration) -> Vec<HolderAction> {
        h.on_probe_result("front", epoch, false, now)
    }

    #[test]
    fn params_are_validated() {
        assert!(LeaseParams::DEFAULT.problems().is_empty());
        assert!(LeaseParams::FAST.problems().is_empty());
        let bad = LeaseParams {
            heartbeat: ms(300),
            lease: ms(600),
            drift_margin: 0.9,
            replicas: 0,
        };
        let problems = bad.problems();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].contains("at least 3 heartbeats"));
    }

    #[test]
    fn quorum_and_window_arithmetic() {
        let p = LeaseParams::DEFAULT;
        assert_eq!(p.quorum(), 2);
        assert_eq!(LeaseParams { replicas: 1, ..p }.quorum(), 1);
        assert_eq!(LeaseParams { replicas: 4, ..p }.quorum(), 3);
        assert_eq!(LeaseParams { replicas: 5, ..p }.quorum(), 3);
        assert_eq!(p.hold_window(), ms(630));
    }

    #[test]
    fn holder_binds_only_with_quorum_and_after_a_clean_probe() {
        let mut h = Holder::new(node("lb-1"), LeaseParams::DEFAULT);
        assert!(h.on_assignment(assignment(7, "lb-1"), ms(0)).is_empty());
        assert!(h.on_ack("r1", ms(0), &acked(7), ms(2)).is_empty());
        let actions = h.on_ack("r2", ms(0), &acked(7), ms(3));
        assert!(matches!(
            actions[..],
            [HolderAction::Probe { epoch: 7, .. }]
        ));
        let actions = probe_then_bind(&mut h, 7, ms(50));
        assert!(matches!(
            actions[..],
            [HolderAction::Bind { .. }, HolderAction::Announce { .. }]
        ));
        assert_eq!(h.binding("front"), Binding::Bound);
    }

    #[test]
    fn holder_drops_exactly_when_the_quorum_lapses() {
        let mut h = Holder::new(node("lb-1"), LeaseParams::DEFAULT);
        h.on_assignment(assignment(7, "lb-1"), ms(0));
        h.on_ack("r1", ms(0), &acked(7), ms(1));
        h.on_ack("r2", ms(100), &acked(7), ms(101));
        h.on_ack("r3", ms(200), &acked(7), ms(201));
        probe_then_bind(&mut h, 7, ms(210));
        // Second-newest ack (quorum 2) was sent at 100 ms: lapses at 730 ms.
        assert_eq!(h.next_deadline(), Some(ms(730)));
        assert!(h.tick(ms(729)).is_empty());
        let actions = h.tick(ms(730));
        assert!(
            matches!(
                actions[..],
                [HolderAction::Unbind {
                    why: "lost the quorum of acks",
                    ..
                }]
            ),
            "{actions:?}"
        );
        assert_eq!(h.binding("front"), Binding::Unbound);
    }

    #[test]
    fn acks_for_other_epochs_or_from_one_replica_twice_do_not_count() {
        let mut h = Holder::new(node("lb-1"), LeaseParams::DEFAULT);
        h.on_assignment(assignment(7, "lb-1"), ms(0));
        assert!(h.on_ack("r1", ms(0), &acked(6), ms(1)).is_empty());
        assert!(h.on_ack("r1", ms(0), &acked(7), ms(1)).is_empty());
        assert!(h.on_ack("r1", ms(10), &acked(7), ms(11)).is_empty());
        assert_eq!(h.binding("front"), Binding::Unbound);
    }

    #[test]
    fn not_the_owner_never_binds() {
        let mut h = Holder::new(node("lb-2"), LeaseParams::DEFAULT);
        h.on_assignment(assignment(7, "lb-1"), ms(0));
        h.on_ack("r1", ms(0), &acked(7), ms(1));
        assert!(h.on_ack("r2", ms(0), &acked(7), ms(1)).is_empty());
        assert!(h.claims().is_empty());
    }

    #[test]
    fn newer_epoch_for_someone_else_unbinds_at_once_and_older_is_ignored() {
        let mut h = Holder::new(node("lb-1"), LeaseParams::DEFAULT);
        h.on_assignment(assignment(7, "lb-1"), ms(0));
        h.on_ack("r1", ms(0), &acked(7), ms(1));
        h.on_ack("r2", ms(0), &acked(7), ms(1));
        probe_then_bind(&mut h, 7, ms(2));
        assert!(h.on_assignment(assignment(5, "lb-2"), ms(3)).is_empty());
        let actions = h.on_assignment(assignment(9, "lb-2"), ms(4));
        assert!(matches!(actions[..], [HolderAction::Unbind { .. }]));
        assert_eq!(h.binding("front"), Binding::Unbound);
    }

    #[test]
    fn failed_health_check_and_move_requests_release_for_good() {
        for how in ["health", "move"] {
            let mut h = Holder::new(node("lb-1"), LeaseParams::DEFAULT);
            h.on_assignment(assignment(7, "lb-1"), ms(0));
            h.on_ack("r1", ms(0), &acked(7), ms(1));
            h.on_ack("r2", ms(0), &acked(7), ms(1));
            probe_then_bind(&mut h, 7, ms(2));
            let actions = match how {
                "health" => h.set_health("front", false, ms(3)),
                _ => h.on_assignment(
                    Assignment {
                        release_requested: true,
                        ..assignment(7, "lb-1")
                    },
                    ms(3),
                ),
            };
            assert!(
                matches!(actions[..], [HolderAction::Unbind { .. }]),
                "{how}"
            );
            assert_eq!(
                h.claims(),
                vec![Claim {
                    vip: "front".into(),
                    epoch: 7,
                    released: true
                }]
            );
            // Fresh acks and a recovered check do not bring epoch 7 back.
            h.set_health("front", true, ms(4));
            h.on_ack("r1", ms(4), &acked(7), ms(5));
            assert!(h.on_ack("r2", ms(4), &acked(7), ms(5)).is_empty(), "{how}");
        }
    }

    #[test]
    fn probe_conflict_delays_and_probe_after_lapse_does_not_bind() {
        let mut h = Holder::new(node("lb-1"), LeaseParams::DEFAULT);
        h.on_assignment(assignment(7, "lb-1"), ms(0));
        h.on_ack("r1", ms(0), &acked(7), ms(1));
        h.on_ack("r2", ms(0), &acked(7), ms(1));
        assert!(h.on_probe_result("front", 7, true, ms(20)).is_empty());
        assert_eq!(h.next_deadline(), Some(ms(170)));
        let actions = h.tick(ms(170));
        assert!(matches!(actions[..], [HolderAction::Probe { .. }]));
        // The answer comes after the quorum lapsed: no bind.
        let actions = h.on_probe_result("front", 7, false, ms(700));
        assert!(actions.is_empty(), "{actions:?}");
    }

    #[test]
    fn announcements_repeat_then_stop() {
        let mut h = Holder::new(node("lb-1"), LeaseParams::DEFAULT);
        h.on_assignment(assignment(7, "lb-1"), ms(0));
        let mut announced = 0;
        let mut now = ms(0);
        let is_announce = |a: &HolderAction| matches!(a, HolderAction::Announce { .. });
        while now < ms(8000) {
            let mut actions = h.on_ack("r1", now, &acked(7), now);
            actions.extend(h.on_ack("r2", now, &acked(7), now));
            actions.extend(h.tick(now));
            for action in actions {
                if let HolderAction::Probe { epoch, .. } = action {
                    let result = h.on_probe_result("front", epoch, false, now);
                    announced += result.iter().filter(|a| is_announce(a)).count();
                } else if is_announce(&action) {
                    announced += 1;
                }
            }
            now += ms(150);
        }
        assert_eq!(announced, 1 + REPEAT_ANNOUNCEMENTS as usize);
    }

    #[test]
    fn leftover_address_is_removed() {
        let mut h = Holder::new(node("lb-1"), LeaseParams::DEFAULT);
        h.on_assignment(assignment(7, "lb-2"), ms(0));
        let actions = h.observe("front", true, ms(1));
        assert!(matches!(
            actions[..],
            [HolderAction::Unbind {
                why: "bound without a lease",
                ..
            }]
        ));
    }

    #[test]
    fn acker_acks_only_the_owner_at_its_epoch() {
        let mut a = Acker::new("r1".into(), LeaseParams::DEFAULT, ms(0));
        a.on_owner("front", Some(node("lb-1")), 7, ms(0));
        let claim = |epoch, released| Claim {
            vip: "front".into(),
            epoch,
            released,
        };
        assert_eq!(
            a.on_heartbeat(&node("lb-1"), &[claim(7, false)], ms(1)),
            acked(7)
        );
        assert!(a
            .on_heartbeat(&node("lb-2"), &[claim(7, false)], ms(1))
            .is_empty());
        assert!(a
            .on_heartbeat(&node("lb-1"), &[claim(6, false)], ms(1))
            .is_empty());
    }

    #[test]
    fn acker_marks_after_a_quiet_lease_and_then_never_acks_again() {
        let p = LeaseParams::DEFAULT;
        let mut a = Acker::new("r1".into(), p, ms(0));
        a.on_owner("front", Some(node("lb-1")), 7, ms(4000));
        let claim = [Claim {
            vip: "front".into(),
            epoch: 7,
            released: false,
        }];
        a.on_heartbeat(&node("lb-1"), &claim, ms(4100));
        assert_eq!(a.next_deadline(), Some(ms(4800)));
        a.tick(ms(4799));
        assert!(a.pending_marks().is_empty());
        a.tick(ms(4800));
        assert_eq!(
            a.pending_marks(),
            vec![Mark {
                vip: "front".into(),
                epoch: 7,
                reason: MarkReason::Expired
            }]
        );
        assert!(a.on_heartbeat(&node("lb-1"), &claim, ms(4801)).is_empty());
        a.on_mark("front", 7, "r1", MarkReason::Expired);
        assert!(a.pending_marks().is_empty());
    }

    #[test]
    fn restarted_acker_waits_a_lease_and_the_grace_before_marking_and_honours_old_marks() {
        let p = LeaseParams::DEFAULT;
        assert_eq!(p.restart_grace(), ms(2100));
        let mut a = Acker::new("r1".into(), p, ms(5000));
        a.on_owner("front", Some(node("lb-1")), 7, ms(5000));
        assert_eq!(a.next_deadline(), Some(ms(7800)));
        a.tick(ms(7799));
        assert!(
            a.pending_marks().is_empty(),
            "holders get time to reconnect"
        );
        a.tick(ms(7800));
        assert_eq!(a.pending_marks().len(), 1);

        let mut b = Acker::new("r1".into(), p, ms(5000));
        b.on_owner("front", Some(node("lb-1")), 7, ms(5000));
        b.on_mark("front", 7, "r2", MarkReason::Expired);
        let claim = [Claim {
            vip: "front".into(),
            epoch: 7,
            released: false,
        }];
        assert_eq!(b.on_heartbeat(&node("lb-1"), &claim, ms(5001)).len(), 1);
        b.on_mark("front", 7, "r1", MarkReason::Expired);
        assert!(b.on_heartbeat(&node("lb-1"), &claim, ms(5002)).is_empty());
    }

    fn claim7(released: bool) -> [Claim; 1] {
        [Claim {
            vip: "front".into(),
            epoch: 7,
            released,
        }]
    }

    #[test]
    fn a_mark_is_taken_back_when_the_holder_is_heard_again_and_only_then_acks_resume() {
        let p = LeaseParams::DEFAULT;
        let mut a = Acker::new("r1".into(), p, ms(0));
        a.on_owner("front", Some(node("lb-1")), 7, ms(4000));
        let claim = claim7(false);
        a.on_heartbeat(&node("lb-1"), &claim, ms(4000));
        a.tick(ms(4700));
        assert_eq!(a.pending_marks().len(), 1);
        // Heard again before the mark is written: nothing to take back yet,
        // and no ack (the write may be in flight).
        assert!(a.on_heartbeat(&node("lb-1"), &claim, ms(4710)).is_empty());
        assert!(a.pending_withdrawals().is_empty());
        a.on_mark_written("front", 7, MarkReason::Expired);
        assert!(a.on_heartbeat(&node("lb-1"), &claim, ms(4720)).is_empty());
        assert_eq!(a.pending_withdrawals(), vec![("front".to_owned(), 7)]);
        assert!(a.has_pending_withdrawals());
        // Still no ack while the withdrawal is pending.
        assert!(a.on_heartbeat(&node("lb-1"), &claim, ms(4730)).is_empty());
        a.on_withdrawn("front", 7, ms(4740));
        assert!(a.pending_withdrawals().is_empty());
        // The withdrawn mark seen late through the watch changes nothing.
        a.on_mark("front", 7, "r1", MarkReason::Expired);
        assert_eq!(a.on_heartbeat(&node("lb-1"), &claim, ms(4750)), acked(7));
        // Quiet for a lease again: a new mark, recorded when written.
        a.tick(ms(5450));
        assert_eq!(a.pending_marks().len(), 1);
        a.on_mark_written("front", 7, MarkReason::Expired);
        assert!(a.on_heartbeat(&node("lb-1"), &claim, ms(5460)).is_empty());
    }

    #[test]
    fn released_marks_and_refused_withdrawals_stay() {
        let mut a = Acker::new("r1".into(), LeaseParams::DEFAULT, ms(0));
        a.on_owner("front", Some(node("lb-1")), 7, ms(4000));
        let claim = claim7;
        a.on_heartbeat(&node("lb-1"), &claim(true), ms(4001));
        a.on_mark_written("front", 7, MarkReason::Released);
        assert!(a
            .on_heartbeat(&node("lb-1"), &claim(false), ms(4002))
            .is_empty());
        assert!(a.pending_withdrawals().is_empty(), "a release is for good");

        let mut b = Acker::new("r1".into(), LeaseParams::DEFAULT, ms(0));
        b.on_owner("front", Some(node("lb-1")), 7, ms(4000));
        b.tick(ms(4700));
        b.on_mark_written("front", 7, MarkReason::Expired);
        b.on_heartbeat(&node("lb-1"), &claim(false), ms(4800));
        b.on_withdraw_refused("front", 7);
        assert!(b.pending_withdrawals().is_empty());
        assert!(b
            .on_heartbeat(&node("lb-1"), &claim(false), ms(4810))
            .is_empty());
        // A later heartbeat asks again (the watch has not shown the new
        // owner yet); the epoch's acks stay withheld throughout.
        assert_eq!(b.pending_withdrawals().len(), 1);
    }

    #[test]
    fn release_is_marked_at_once() {
        let mut a = Acker::new("r1".into(), LeaseParams::DEFAULT, ms(0));
        a.on_owner("front", Some(node("lb-1")), 7, ms(0));
        let released = [Claim {
            vip: "front".into(),
            epoch: 7,
            released: true,
        }];
        assert!(a.on_heartbeat(&node("lb-1"), &released, ms(1)).is_empty());
        assert_eq!(a.pending_marks()[0].reason, MarkReason::Released);
    }

    fn cand(id: &str, priority: u32, healthy: bool) -> Candidate {
        Candidate {
            node: node(id),
            priority,
            healthy,
            zone: None,
        }
    }

    #[test]
    fn the_next_holder_prefers_another_zone_among_equals() {
        let zoned = |id: &str, zone: &str, priority: u32, healthy: bool| Candidate {
            zone: Some(zone.into()),
            ..cand(id, priority, healthy)
        };
        let lb1 = node("lb-1");
        let input = |candidates, owner_zone, marks| PlacementInput {
            owner: Some((Some(&lb1), 7)),
            marks,
            quorum: 2,
            candidates,
            move_to: None,
            preempt: false,
            owner_zone,
        };
        // lb-1 (zone a) failed: lb-2 shares its zone, lb-3 does not; by id
        // alone lb-2 would be next.
        let three = [
            zoned("lb-1", "a", 0, false),
            zoned("lb-2", "a", 0, true),
            zoned("lb-3", "b", 0, true),
        ];
        assert_eq!(
            place(&input(&three, Some("a"), 2)),
            Placement::Assign(Some(node("lb-3")))
        );
        // Without the owner's zone, by id as before.
        assert_eq!(
            place(&input(&three, None, 2)),
            Placement::Assign(Some(node("lb-2")))
        );
        // Only a tiebreak: priority first, and an unhealthy node in another
        // zone is never waited for.
        let prio = [zoned("lb-2", "a", 10, true), zoned("lb-3", "b", 0, true)];
        assert_eq!(
            place(&input(&prio, Some("a"), 2)),
            Placement::Assign(Some(node("lb-2")))
        );
        let down = [zoned("lb-2", "a", 0, true), zoned("lb-3", "b", 0, false)];
        assert_eq!(
            place(&input(&down, Some("a"), 2)),
            Placement::Assign(Some(node("lb-2")))
        );
        // The holder leaving by handover (drained: no candidate any more,
        // its marks in): the same choice.
        let handover = [zoned("lb-2", "a", 0, true), zoned("lb-3", "b", 0, true)];
        assert_eq!(
            place(&input(&handover, Some("a"), 2)),
            Placement::Assign(Some(node("lb-3")))
        );
    }

    #[test]
    fn placement_rules() {
        let lb1 = node("lb-1");
        let lb2 = node("lb-2");
        let candidates = [cand("lb-1", 0, true), cand("lb-2", 0, true)];
        let input = |owner, marks, move_to, preempt, candidates| PlacementInput {
            owner,
            marks,
            quorum: 2,
            candidates,
            move_to,
            preempt,
            owner_zone: None,
        };
        // First assignment: best healthy, ties by node id.
        assert_eq!(
            place(&input(None, 0, None, false, &candidates)),
            Placement::Assign(Some(lb1.clone()))
        );
        // Held, no quorum of marks: keep.
        assert_eq!(
            place(&input(Some((Some(&lb1), 7)), 1, None, false, &candidates)),
            Placement::Keep
        );
        // Quorum of marks: the other one.
        assert_eq!(
            place(&input(Some((Some(&lb1), 7)), 2, None, false, &candidates)),
            Placement::Assign(Some(lb2.clone()))
        );
        // Only the old owner is healthy: it gets the next epoch.
        let only1 = [cand("lb-1", 0, true), cand("lb-2", 0, false)];
        assert_eq!(
            place(&input(Some((Some(&lb1), 7)), 2, None, false, &only1)),
            Placement::Assign(Some(lb1.clone()))
        );
        // Nobody healthy: unowned.
        let none = [cand("lb-1", 0, false), cand("lb-2", 0, false)];
        assert_eq!(
            place(&input(Some((Some(&lb1), 7)), 3, None, false, &none)),
            Placement::Assign(None)
        );
        assert_eq!(
            place(&input(Some((None, 8)), 0, None, false, &none)),
            Placement::Keep
        );
        // Priority wins; preemption off keeps the holder, on asks it to go.
        let prio = [cand("lb-1", 0, true), cand("lb-2", 10, true)];
        assert_eq!(
            place(&input(None, 0, None, false, &prio)),
            Placement::Assign(Some(lb2.clone()))
        );
        assert_eq!(
            place(&input(Some((Some(&lb1), 7)), 0, None, false, &prio)),
            Placement::Keep
        );
        assert_eq!(
            place(&input(Some((Some(&lb1), 7)), 0, None, true, &prio)),
            Placement::RequestRelease
        );
        // Owner no longer a candidate: asked to go.
        let just2 = [cand("lb-2", 0, true)];
        assert_eq!(
            place(&input(Some((Some(&lb1), 7)), 0, None, false, &just2)),
            Placement::RequestRelease
        );
        // Move to a named node once the holder let go.
        let three = [
            cand("lb-1", 0, true),
            cand("lb-2", 0, true),
            cand("lb-3", 0, true),
        ];
        let lb3 = node("lb-3");
        assert_eq!(
            place(&input(
                Some((Some(&lb1), 7)),
                2,
                Some(Some(&lb3)),
                false,
                &three
            )),
            Placement::Assign(Some(lb3))
        );
    }
}
