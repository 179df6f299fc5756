//! The leader's rollout duty: moves the active rollout's nodes through
//! their steps, one fenced write per step.
//!
//! Each tick reads where the rollout stands from the spec cache (its
//! records live under `cluster/`), looks at the world (the node's
//! maintenance, what its agent applied and reported, its VIP health
//! checks), and writes the next step when the current one is complete.
//! Every write is a transaction fenced on the leader epoch and guarded on
//! the node record's mod revision, and the writes that act (the drain, the
//! change, the undrain) go in the same transaction as the step that
//! records them: a new leader finds either both or neither, re-checks the
//! step it reads, and never repeats one.
//!
//! **Architecture invariant:** nothing here decides from a clock but the
//! step timeouts; etcd is read per node in flight each tick (at most
//! `max_unavailable` nodes), and the records the gates read (the VIP
//! candidates, control planes and brick nodes: `maintenance::gated_nodes`,
//! never the whole fleet) at most once a [`GATED_READ_EVERY`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use steward_proto::domain::{EventKind, NodeHealth, NodeId, Role};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

use super::model::{
    ActiveRollout, Phase, RolloutControl, RolloutEntry, RolloutKind, RolloutNodeRecord,
    RolloutSpec, RolloutState, Step, StepTimes,
};
use crate::agent_service::SessionContext;
use crate::cache::SpecSnapshot;
use crate::error::{Error, Result};
use crate::orchestrate::state::OrchestrationSnapshot;
use crate::replica::{Fence, Leadership};
use crate::store::kv::{Cmp, Op, Txn};
use crate::store::{encode, unix_ms, MaintenanceRecord, NodeRecord, Store};
use crate::vip::lease_api::LeaseHub;
use crate::vip::VipSnapshot;

/// How often the leader looks at the active rollout (and at once when the
/// spec or VIP cache changes; the agents' reports are read each tick, so a
/// node's converge and health figures are in steps of this).
pub const TICK: Duration = Duration::from_millis(250);
/// The gated nodes' records (statuses and gluster reports, for the gates)
/// are read at most this often.
pub const GATED_READ_EVERY: Duration = Duration::from_secs(1);

/// Finished rollouts kept in etcd for `rollout list` and `status`; older
/// ones go (never one whose target a node still has: an aborted rollout's,
/// until the settings are next written).
pub const ROLLOUTS_RETAINED: usize = 20;
/// How often the leader looks for finished rollouts to delete.
const TRIM_EVERY: Duration = Duration::from_secs(60);

/// How long each step may take before the node fails the rollout
/// (`[rollout]` in the coordinator config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepTimeouts {
    /// A gate refusing the drain, then the drain itself.
    pub drain: Duration,
    /// The agent applying and converging the change.
    pub converge: Duration,
    /// The agent healthy and the roles ready again.
    pub health: Duration,
}

impl Default for StepTimeouts {
    fn default() -> Self {
        Self {
            drain: Duration::from_secs(300),
            converge: Duration::from_secs(600),
            health: Duration::from_secs(300),
        }
    }
}

/// The reason a rollout's maintenance records carry.
pub fn drain_reason(id: &str) -> String {
    format!("rollout {id}")
}

/// What a tick looks at besides etcd.
pub struct World<'a> {
    pub specs: &'a SpecSnapshot,
    pub vips: &'a VipSnapshot,
    pub orchestration: &'a OrchestrationSnapshot,
    pub lease: &'a LeaseHub,
}

/// The leader's rollout duty; state kept between ticks is only a cache.
pub struct Driver {
    timeouts: StepTimeouts,
    gated: Option<(Instant, Arc<BTreeMap<NodeId, NodeRecord>>)>,
    trimmed_at: Option<Instant>,
    /// When the maintenance window was last looked at (it reads every
    /// node's facts: at most once a [`WINDOW_CHECK_EVERY`]).
    window_checked_at: Option<Instant>,
}

/// How often the leader, with no rollout active, looks for nodes the
/// maintenance window should reboot.
pub const WINDOW_CHECK_EVERY: Duration = Duration::from_secs(30);

/// Runs until `shutdown`; acts only while this replica leads.
pub async fn run_rollouts(
    ctx: SessionContext,
    mut leadership: watch::Receiver<Leadership>,
    timeouts: StepTimeouts,
    shutdown: CancellationToken,
) {
    let mut specs_rx = ctx.specs.clone();
    let mut vips_rx = ctx.vips.clone();
    let mut driver = Driver::new(timeouts);
    loop {
        let lead = leadership.borrow_and_update().clone();
        if let Leadership::Leader(fence) = lead {
            let specs = specs_rx.borrow_and_update().clone();
            let vips = vips_rx.borrow_and_update().clone();
            let orchestration = ctx.orchestration.borrow().clone();
            if specs.synced && vips.synced && orchestration.synced {
                let world = World {
                    specs: &specs,
                    vips: &vips,
                    orchestration: &orchestration,
                    lease: &ctx.lease,
                };
                let span = tracing::info_span!("rollout_tick", leader.epoch = fence.epoch);
                match driver
                    .tick(&ctx.store, &fence, &world)
                    .instrument(span)
                    .await
                {
                    Ok(()) => {}
                    // The membership task notices too and steps down.
                    Err(error @ Error::LostLeadership { .. }) => {
                        warn!(%error, "rollout duty stopped: not the leader")
                    }
                    Err(error) => warn!(%error, "rollout step failed; retrying"),
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = specs_rx.changed() => if r.is_err() { return },
            // A VIP that moved off a draining node ends its drain.
            r = vips_rx.changed() => if r.is_err() { return },
            r = leadership.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(TICK) => {}
        }
    }
}

impl Driver {
    pub fn new(timeouts: StepTimeouts) -> Self {
        Self {
            timeouts,
            gated: None,
            trimmed_at: None,
            window_checked_at: None,
        }
    }

    /// Deletes the oldest finished rollouts beyond [`ROLLOUTS_RETAINED`],
    /// at most once a [`TRIM_EVERY`].
    pub async fn trim(&mut self, store: &Store, fence: &Fence, specs: &SpecSnapshot) -> Result<()> {
        if self.trimmed_at.is_some_and(|at| at.elapsed() < TRIM_EVERY) {
            return Ok(());
        }
        self.trimmed_at = Some(Instant::now());
        let settings_rev = specs.settings.as_ref().map_or(0, |s| s.mod_revision);
        let finished: Vec<&String> = specs
            .rollouts
            .iter()
            .filter(|(_, r)| r.phase().is_some_and(|p| !p.active()))
            .filter(|(_, r)| !r.changed.values().any(|rev| *rev > settings_rev))
            .map(|(id, _)| id)
            .collect();
        let excess = finished.len().saturating_sub(ROLLOUTS_RETAINED);
        for id in &finished[..excess] {
            let prefix = store.keys().rollout(id);
            fence
                .txn(store, Txn::new().and_then([Op::delete_prefix(prefix)]))
                .await?;
            info!(rollout.id = %id, "finished rollout deleted (retention)");
        }
        Ok(())
    }

    /// One look at the active rollout, at most one write per node.
    pub async fn tick(&mut self, store: &Store, fence: &Fence, world: &World<'_>) -> Result<()> {
        self.trim(store, fence, world.specs).await?;
        let Some((id, entry)) = world.specs.active_rollout() else {
            return self.window(store, fence, world).await;
        };
        let Some(spec) = entry.spec.as_ref().map(|s| &s.value) else {
            return Ok(());
        };
        let Some(phase) = entry.phase() else {
            return Ok(());
        };
        let run = Run {
            id,
            entry,
            spec,
            store,
            fence,
            world,
        };
        match phase {
            Phase::Running if entry.abort_requested() => {
                run.set_phase(Phase::Aborting, "rollout abort asked".into(), false)
                    .await
            }
            Phase::Running => self.running(&run).await,
            Phase::Failed if entry.abort_requested() => {
                run.set_phase(Phase::Aborting, "rollout abort asked".into(), false)
                    .await
            }
            Phase::Failed if entry.retry_requested() => run.retry().await,
            Phase::Failed => Ok(()),
            Phase::Aborting => self.aborting(&run).await,
            Phase::Done | Phase::Aborted => Ok(()),
        }
    }

    async fn running(&mut self, run: &Run<'_>) -> Result<()> {
        let entry = run.entry;
        if let Some((node, record)) = entry
            .nodes
            .iter()
            .find(|(_, r)| r.value.step == Step::Failed)
        {
            let reason = format!("node {node} failed: {}", record.value.reason);
            return run.set_phase(Phase::Failed, reason, false).await;
        }
        // A batch is over when its nodes are done and, for Kubernetes, a
        // control plane has uncordoned them (`upgrade::uncordon_pending`).
        let world = run.world;
        let current = run.spec.batches.iter().position(|batch| {
            batch.iter().any(|n| {
                entry.step(n) != Some(Step::Done)
                    || super::upgrade::uncordon_pending(n, world.specs, world.orchestration)
            })
        });
        let Some(batch) = current else {
            return run.finish().await;
        };
        let canary = run.spec.canary_batches as usize;
        let control = entry.control.as_ref();
        if batch == canary
            && canary > 0
            && run.spec.options.pause_after_canary
            && !control.is_some_and(|c| c.value.after_canary)
            && !run.spec.batches[batch]
                .iter()
                .any(|n| entry.nodes.contains_key(n))
        {
            return run.pause_after_canary().await;
        }
        for node in &run.spec.batches[batch] {
            match entry.step(node) {
                None if entry.paused() => {}
                None | Some(Step::Waiting) => self.start(run, node).await?,
                Some(_) => self.advance(run, node).await?,
            }
        }
        Ok(())
    }

    /// `rollout abort`: nodes not yet changed are undrained and left out;
    /// nodes changed finish their steps; then the rollout is aborted.
    async fn aborting(&mut self, run: &Run<'_>) -> Result<()> {
        let mut in_flight = false;
        for (node, record) in &run.entry.nodes {
            let r = &record.value;
            match r.step {
                Step::Waiting | Step::Draining | Step::Drained => {
                    in_flight = true;
                    let mut next = r.clone();
                    next.step = Step::Aborted;
                    next.reason = "left out by rollout abort before its change".into();
                    next.times.finished = unix_ms();
                    run.release(node, record.mod_revision, next).await?;
                }
                Step::Changed | Step::Converged | Step::Healthy => {
                    in_flight = true;
                    self.advance(run, node).await?;
                }
                Step::Failed if r.holds_drain => {
                    in_flight = true;
                    run.release(node, record.mod_revision, r.clone()).await?;
                }
                Step::Failed | Step::Done | Step::Aborted => {}
            }
            // Undrained, but not yet uncordoned in Kubernetes.
            let world = run.world;
            in_flight |= super::upgrade::uncordon_pending(node, world.specs, world.orchestration);
        }
        if in_flight {
            return Ok(());
        }
        // A node has the target once its marker exists, done or failed.
        let changed = run.entry.changed.len();
        let reason = format!(
            "aborted: {changed} of {} nodes have the new settings, the others the old ones",
            run.spec.node_count()
        );
        run.set_phase(Phase::Aborted, reason, true).await
    }

    /// The node's turn: drain it through the gates, or wait while a gate
    /// refuses.
    async fn start(&mut self, run: &Run<'_>, node: &NodeId) -> Result<()> {
        let world = run.world;
        let existing = run.entry.nodes.get(node);
        let expected = existing.map_or(0, |r| r.mod_revision);
        let now = unix_ms();
        let mut next = existing
            .map(|r| r.value.clone())
            .unwrap_or(RolloutNodeRecord {
                step: Step::Waiting,
                reason: String::new(),
                holds_drain: false,
                changed_revision: 0,
                times: StepTimes {
                    started: now,
                    ..Default::default()
                },
                boot_id_before: String::new(),
                boot_id_after: String::new(),
            });
        if super::upgrade::in_place(run.spec, world.specs, node) {
            // A control plane's Kubernetes upgrade: in place, one at a
            // time (`super::upgrade`); no drain to wait for.
            next.step = Step::Drained;
            next.reason = "upgraded in place (control plane)".into();
            next.times.drained = now;
            run.write_node(node, expected, &next, Vec::new(), Vec::new())
                .await?;
            return Ok(());
        }
        let maintenance = world.specs.maintenance.get(node);
        if maintenance.is_some_and(|m| m.value.active) {
            // Out of service already (an operator's drain): the rollout
            // uses it and leaves it drained.
            next.step = Step::Draining;
            next.reason.clear();
            next.holds_drain = maintenance.is_some_and(|m| m.value.reason == drain_reason(run.id));
            run.write_node(node, expected, &next, Vec::new(), Vec::new())
                .await?;
            return Ok(());
        }
        let refusals = {
            let nodes = self.gated(run.store, node, world).await?;
            crate::maintenance::Fleet {
                nodes: &nodes,
                specs: world.specs,
                vips: world.vips,
                lease: world.lease,
                orchestration: world.orchestration,
            }
            .refusals(node)
        };
        if refusals.is_empty() {
            let record = MaintenanceRecord {
                active: true,
                reason: drain_reason(run.id),
                by: drain_reason(run.id),
                at_unix_ms: now,
                forced: false,
            };
            let key = run.store.keys().node_maintenance(node);
            let guard = Cmp::mod_revision(key.clone(), maintenance.map_or(0, |m| m.mod_revision));
            let event = run.store.event(
                EventKind::NodeMaintenance,
                Some(node.clone()),
                format!("{node} draining for rollout {}", run.id),
            );
            next.step = Step::Draining;
            next.reason.clear();
            next.holds_drain = true;
            let ops = vec![Op::put(key, encode(&record)), run.store.event_op(&event)];
            if run
                .write_node(node, expected, &next, vec![guard], ops)
                .await?
            {
                info!(rollout.id = run.id, node.id = %node, "draining");
            }
            return Ok(());
        }
        let reason = refusals.join("; ");
        let waited = Duration::from_millis(now.saturating_sub(next.times.started));
        if waited > self.timeouts.drain {
            next.step = Step::Failed;
            next.reason = format!(
                "could not drain within {} s: {reason}",
                self.timeouts.drain.as_secs()
            );
            next.times.finished = now;
        } else if existing.is_some_and(|r| r.value.reason == reason) {
            return Ok(());
        } else {
            next.reason = reason;
        }
        run.write_node(node, expected, &next, Vec::new(), Vec::new())
            .await?;
        Ok(())
    }

    /// Moves a node on from the step it is at, if that step is complete.
    async fn advance(&mut self, run: &Run<'_>, node: &NodeId) -> Result<()> {
        let Some(record) = run.entry.nodes.get(node) else {
            return Ok(());
        };
        let expected = record.mod_revision;
        let mut next = record.value.clone();
        let now = unix_ms();
        let world = run.world;
        let since = |at: u64| Duration::from_millis(now.saturating_sub(at));
        match next.step {
            Step::Waiting => return Ok(()),
            Step::Draining => {
                if !world.specs.in_maintenance(node) {
                    // Undrained by an operator meanwhile: drain again.
                    next.step = Step::Waiting;
                    next.holds_drain = false;
                    next.reason = "undrained during the rollout; draining again".into();
                } else {
                    let pending = crate::maintenance::pending(
                        node,
                        world.specs,
                        world.vips,
                        world.orchestration,
                    );
                    if pending.is_empty() {
                        next.step = Step::Drained;
                        next.reason.clear();
                        next.times.drained = now;
                    } else if since(next.times.started) > self.timeouts.drain {
                        next = failed(next, format!("drain not done: {}", pending.join("; ")));
                    } else {
                        return Ok(());
                    }
                }
                run.write_node(node, expected, &next, Vec::new(), Vec::new())
                    .await?;
            }
            Step::Drained if run.spec.kind == RolloutKind::Reboot => {
                super::reboot::ask(run, node, expected, next).await?;
            }
            Step::Changed if run.spec.kind == RolloutKind::Reboot => {
                let observed = run.store.node(node).await?;
                match super::reboot::progress(&next.boot_id_before, &observed) {
                    super::reboot::Progress::Back(boot_id) => {
                        next.step = Step::Converged;
                        next.reason.clear();
                        next.boot_id_after = boot_id;
                        next.times.converged = now;
                    }
                    super::reboot::Progress::Pending(what)
                        if since(next.times.changed) > self.timeouts.converge =>
                    {
                        next = failed(
                            next,
                            format!(
                                "not back from its reboot within {} s ({what})",
                                self.timeouts.converge.as_secs()
                            ),
                        );
                    }
                    super::reboot::Progress::Pending(what) if next.reason != what => {
                        next.reason = what;
                    }
                    super::reboot::Progress::Pending(_) => return Ok(()),
                }
                run.write_node(node, expected, &next, Vec::new(), Vec::new())
                    .await?;
            }
            Step::Drained => {
                // The change: the node's desired state takes the target
                // from the marker's revision on (`SpecSnapshot::rollout_target`).
                next.step = Step::Changed;
                next.times.changed = now;
                let marker = run.store.keys().rollout_changed(run.id, node);
                let guard = Cmp::mod_revision(marker.clone(), 0);
                let ops = vec![Op::put(marker, Vec::new())];
                if run
                    .write_node(node, expected, &next, vec![guard], ops)
                    .await?
                {
                    info!(rollout.id = run.id, node.id = %node, "changed");
                }
            }
            Step::Changed => {
                let Some(&changed) = run.entry.changed.get(node) else {
                    return Ok(());
                };
                // A Kubernetes upgrade's second stage, once written, is
                // what the agent must converge (`super::upgrade`).
                let upgraded = run.entry.upgraded.get(node).copied();
                let target = upgraded.unwrap_or(changed);
                let observed = run.store.node(node).await?;
                match converge_progress(&observed, target.max(0) as u64) {
                    Converge::Done
                        if upgraded.is_none()
                            && super::upgrade::stage(world.specs, node).is_some() =>
                    {
                        // `kubeadm upgrade` converged: kubelet and kubectl
                        // move now (marker and step in one transaction).
                        next.changed_revision = target;
                        next.reason = "kubeadm upgraded; kubelet and kubectl next".into();
                        let marker = run.store.keys().rollout_upgraded(run.id, node);
                        let guard = Cmp::mod_revision(marker.clone(), 0);
                        let ops = vec![Op::put(marker, Vec::new())];
                        if run
                            .write_node(node, expected, &next, vec![guard], ops)
                            .await?
                        {
                            info!(rollout.id = run.id, node.id = %node, "kubeadm upgraded");
                        }
                        return Ok(());
                    }
                    Converge::Done => {
                        next.step = Step::Converged;
                        next.changed_revision = target;
                        next.times.converged = now;
                    }
                    Converge::Failed(error) => {
                        next.changed_revision = target;
                        next = failed(
                            next,
                            format!("converge of revision {target} failed: {error}"),
                        );
                    }
                    Converge::Pending(what)
                        if since(next.times.changed) > self.timeouts.converge =>
                    {
                        next = failed(
                            next,
                            format!(
                                "revision {target} not converged within {} s ({what})",
                                self.timeouts.converge.as_secs()
                            ),
                        );
                    }
                    Converge::Pending(_) => return Ok(()),
                }
                run.write_node(node, expected, &next, Vec::new(), Vec::new())
                    .await?;
            }
            Step::Converged => {
                let observed = run.store.node(node).await?;
                let mut problems = health_problems(node, &observed, world);
                // A joined Kubernetes node: Ready, as a control plane sees it.
                let checker = super::upgrade::ready_checker(world.specs, world.orchestration);
                let checker_record = match &checker {
                    Some(c) if super::upgrade::is_kubernetes(world.specs, node) => {
                        Some(run.store.node(c).await?)
                    }
                    _ => None,
                };
                problems.extend(super::upgrade::readiness_problem(
                    node,
                    world.specs,
                    world.orchestration,
                    expected,
                    checker.as_ref().zip(checker_record.as_ref()),
                ));
                if world
                    .specs
                    .specs
                    .get(node)
                    .is_some_and(|s| s.value.roles.contains(&Role::GlusterBrick))
                {
                    // Bricks online and heals done (DESIGN.md §7).
                    let nodes = self.gated(run.store, node, world).await?;
                    problems.extend(crate::maintenance::brick_problems(
                        node,
                        &observed,
                        &nodes,
                        world.orchestration,
                        next.changed_revision.max(0) as u64,
                    ));
                }
                if problems.is_empty() {
                    next.step = Step::Healthy;
                    next.reason.clear();
                    next.times.healthy = now;
                } else if since(next.times.converged) > self.timeouts.health {
                    next = failed(
                        next,
                        format!(
                            "not healthy within {} s: {}",
                            self.timeouts.health.as_secs(),
                            problems.join("; ")
                        ),
                    );
                } else if next.reason == problems.join("; ") {
                    return Ok(());
                } else {
                    next.reason = problems.join("; ");
                }
                run.write_node(node, expected, &next, Vec::new(), Vec::new())
                    .await?;
            }
            Step::Healthy => {
                next.step = Step::Done;
                next.reason.clear();
                next.times.finished = now;
                if run.release(node, expected, next).await? {
                    info!(rollout.id = run.id, node.id = %node, "done");
                }
            }
            Step::Done | Step::Failed | Step::Aborted => {}
        }
        Ok(())
    }

    /// No rollout active: the maintenance window may start a reboot
    /// ([`super::reboot::window_tick`]), looked at once a
    /// [`WINDOW_CHECK_EVERY`] while the settings have a window.
    async fn window(&mut self, store: &Store, fence: &Fence, world: &World<'_>) -> Result<()> {
        let has_window = world
            .specs
            .settings
            .as_ref()
            .is_some_and(|s| s.value.maintenance_window.is_some());
        if !has_window
            || self
                .window_checked_at
                .is_some_and(|at| at.elapsed() < WINDOW_CHECK_EVERY)
        {
            return Ok(());
        }
        self.window_checked_at = Some(Instant::now());
        let t = self.timeouts;
        let longest = t.drain + t.converge + t.health;
        super::reboot::window_tick(store, fence, world, longest, unix_ms()).await?;
        Ok(())
    }

    /// The records the gates read for `node` (`maintenance::gated_nodes`:
    /// statuses and gluster reports), read at most once a
    /// [`GATED_READ_EVERY`] unless `node` is not among them yet.
    async fn gated(
        &mut self,
        store: &Store,
        node: &NodeId,
        world: &World<'_>,
    ) -> Result<Arc<BTreeMap<NodeId, NodeRecord>>> {
        if let Some((at, nodes)) = &self.gated {
            if at.elapsed() < GATED_READ_EVERY && nodes.contains_key(node) {
                return Ok(nodes.clone());
            }
        }
        let ids =
            crate::maintenance::gated_nodes(node, world.specs, world.vips, world.orchestration);
        let nodes = Arc::new(store.gate_records(ids).await?);
        self.gated = Some((Instant::now(), nodes.clone()));
        Ok(nodes)
    }
}

/// A failed node given another try (`rollout resume` of a failed
/// rollout), from the step it failed at: a node whose change was written
/// waits for its converge again (then the health check), a node out of
/// service for its drain, any other for the gates. The step's timeout
/// starts again.
pub fn retried(
    record: &RolloutNodeRecord,
    changed: bool,
    in_maintenance: bool,
    by: &str,
    now: u64,
) -> RolloutNodeRecord {
    let mut next = record.clone();
    next.times.finished = 0;
    if changed {
        next.step = Step::Changed;
        next.times.changed = now;
        next.times.converged = 0;
        next.times.healthy = 0;
    } else {
        next.step = if in_maintenance {
            Step::Draining
        } else {
            Step::Waiting
        };
        next.times.started = now;
        next.times.drained = 0;
    }
    next.reason = format!(
        "tried again (rollout resume by {by}) after: {}",
        record.reason
    );
    next
}

fn failed(mut record: RolloutNodeRecord, reason: String) -> RolloutNodeRecord {
    record.step = Step::Failed;
    record.reason = reason;
    record.times.finished = unix_ms();
    record
}

/// Where a node stands with the revision that changed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Converge {
    Done,
    Failed(String),
    /// What it waits for.
    Pending(String),
}

/// Whether `node` applied revision `target` and converged it (the same
/// reading as `stewardctl --wait`).
pub fn converge_progress(node: &NodeRecord, target: u64) -> Converge {
    let Some(status) = node.status.as_ref().map(|s| &s.value) else {
        return Converge::Pending("never connected".into());
    };
    if status.applied_revision < target {
        return Converge::Pending(match status.replica {
            None => format!("disconnected, at revision {}", status.applied_revision),
            Some(_) => format!("receiving (at revision {})", status.applied_revision),
        });
    }
    match node.converge.as_ref().map(|c| &c.value) {
        // Convergence off on the node: holding the revision is all.
        None => Converge::Done,
        Some(report) if report.revision < target => Converge::Pending(format!(
            "converging (last report for revision {})",
            report.revision
        )),
        Some(report) => match report.failed().next() {
            Some(f) => Converge::Failed(format!("{}: {}", f.id, f.detail)),
            None if report.converged() => Converge::Done,
            None => Converge::Pending("converging".into()),
        },
    }
}

/// Why `node` is not healthy yet (empty: it is): its agent connected and
/// healthy, and for an lb node the health check of every VIP it may hold
/// passing (HAProxy answering).
pub fn health_problems(node: &NodeId, observed: &NodeRecord, world: &World<'_>) -> Vec<String> {
    let mut problems = Vec::new();
    match observed.status.as_ref().map(|s| &s.value) {
        Some(s)
            if s.replica.is_some()
                && matches!(s.health, NodeHealth::Healthy | NodeHealth::Degraded) => {}
        Some(s) => problems.push(format!("agent {}", s.health)),
        None => problems.push("agent never connected".into()),
    }
    let lb = world
        .specs
        .specs
        .get(node)
        .is_some_and(|s| s.value.roles.contains(&Role::Lb));
    if lb {
        for (name, state) in &world.vips.vips {
            let Some(spec) = &state.spec else { continue };
            let candidate =
                spec.value.candidates.is_empty() || spec.value.candidates.contains(node);
            if candidate && !world.lease.healthy_candidate(node, name) {
                problems.push(format!("VIP {name} health check not passing here"));
            }
        }
    }
    problems
}

/// One tick's view of the active rollout, and its writes.
pub(super) struct Run<'a> {
    pub(super) id: &'a str,
    entry: &'a RolloutEntry,
    spec: &'a RolloutSpec,
    pub(super) store: &'a Store,
    fence: &'a Fence,
    pub(super) world: &'a World<'a>,
}

impl Run<'_> {
    /// Writes `record` for `node` if its key is still at `expected`, with
    /// `guards` and `ops`; whether it did (a stale cache: next tick).
    pub(super) async fn write_node(
        &self,
        node: &NodeId,
        expected: i64,
        record: &RolloutNodeRecord,
        guards: Vec<Cmp>,
        ops: Vec<Op>,
    ) -> Result<bool> {
        let key = self.store.keys().rollout_node(self.id, node);
        let mut compares = vec![Cmp::mod_revision(key.clone(), expected)];
        compares.extend(guards);
        let mut writes = vec![Op::put(key, encode(record))];
        writes.extend(ops);
        let inner = Txn::new().when(compares).and_then(writes);
        Ok(self.fence.txn(self.store, inner).await?.succeeded)
    }

    /// Writes `next` and, if the rollout holds the node's drain, undoes it
    /// in the same transaction.
    async fn release(
        &self,
        node: &NodeId,
        expected: i64,
        mut next: RolloutNodeRecord,
    ) -> Result<bool> {
        if !next.holds_drain {
            return self
                .write_node(node, expected, &next, Vec::new(), Vec::new())
                .await;
        }
        let current = self.world.specs.maintenance.get(node);
        let mut guards = Vec::new();
        let mut ops = Vec::new();
        // Only its own record: an operator who took the node over keeps it.
        if let Some(m) =
            current.filter(|m| m.value.active && m.value.reason == drain_reason(self.id))
        {
            let key = self.store.keys().node_maintenance(node);
            guards.push(Cmp::mod_revision(key.clone(), m.mod_revision));
            let record = MaintenanceRecord {
                active: false,
                reason: drain_reason(self.id),
                by: drain_reason(self.id),
                at_unix_ms: unix_ms(),
                forced: false,
            };
            ops.push(Op::put(key, encode(&record)));
            let event = self.store.event(
                EventKind::NodeMaintenance,
                Some(node.clone()),
                format!(
                    "{node} undrained by rollout {} ({})",
                    self.id,
                    next.step.as_str()
                ),
            );
            ops.push(self.store.event_op(&event));
        }
        next.holds_drain = false;
        self.write_node(node, expected, &next, guards, ops).await
    }

    async fn set_phase(&self, phase: Phase, reason: String, release_active: bool) -> Result<()> {
        let key = self.store.keys().rollout_state(self.id);
        let expected = self.entry.state.as_ref().map_or(0, |s| s.mod_revision);
        let state = RolloutState {
            phase,
            reason: reason.clone(),
            at_unix_ms: unix_ms(),
        };
        let mut writes = vec![Op::put(key.clone(), encode(&state))];
        if release_active {
            writes.push(Op::put(
                self.store.keys().rollout_active(),
                encode(&ActiveRollout { id: None }),
            ));
        }
        let event = self.store.event(
            EventKind::RolesChanged,
            None,
            format!("rollout {} {}: {reason}", self.id, phase.as_str()),
        );
        writes.push(self.store.event_op(&event));
        let inner = Txn::new()
            .when([Cmp::mod_revision(key, expected)])
            .and_then(writes);
        if self.fence.txn(self.store, inner).await?.succeeded {
            info!(rollout.id = self.id, phase = phase.as_str(), %reason, "rollout phase");
        }
        Ok(())
    }

    /// `rollout resume` of a failed rollout: its failed nodes go back to
    /// the step they failed at, the rollout runs again and the request is
    /// cleared, in one transaction (a new leader finds all or nothing).
    async fn retry(&self) -> Result<()> {
        let keys = self.store.keys();
        let now = unix_ms();
        let by = self
            .entry
            .control
            .as_ref()
            .map_or_else(String::new, |c| c.value.by.clone());
        let mut compares = Vec::new();
        let mut writes = Vec::new();
        let mut nodes = Vec::new();
        for (node, record) in &self.entry.nodes {
            if record.value.step != Step::Failed {
                continue;
            }
            let next = retried(
                &record.value,
                self.entry.changed.contains_key(node),
                self.world.specs.in_maintenance(node),
                &by,
                now,
            );
            let key = keys.rollout_node(self.id, node);
            compares.push(Cmp::mod_revision(key.clone(), record.mod_revision));
            writes.push(Op::put(key, encode(&next)));
            nodes.push(format!("{node} (from {})", next.step.as_str()));
        }
        let reason = match nodes.is_empty() {
            true => format!("resumed by {by}"),
            false => format!("resumed by {by}: trying {} again", nodes.join(", ")),
        };
        let state_key = keys.rollout_state(self.id);
        compares.push(Cmp::mod_revision(
            state_key.clone(),
            self.entry.state.as_ref().map_or(0, |s| s.mod_revision),
        ));
        writes.push(Op::put(
            state_key,
            encode(&RolloutState {
                phase: Phase::Running,
                reason: reason.clone(),
                at_unix_ms: now,
            }),
        ));
        if let Some(control) = &self.entry.control {
            let key = keys.rollout_control(self.id);
            compares.push(Cmp::mod_revision(key.clone(), control.mod_revision));
            let mut next = control.value.clone();
            next.retry = false;
            writes.push(Op::put(key, encode(&next)));
        }
        let event = self.store.event(
            EventKind::RolesChanged,
            None,
            format!("rollout {} running: {reason}", self.id),
        );
        writes.push(self.store.event_op(&event));
        let inner = Txn::new().when(compares).and_then(writes);
        if self.fence.txn(self.store, inner).await?.succeeded {
            info!(rollout.id = self.id, %reason, "rollout resumed after a failure");
        }
        Ok(())
    }

    async fn pause_after_canary(&self) -> Result<()> {
        let key = self.store.keys().rollout_control(self.id);
        let current = self.entry.control.as_ref();
        let mut control = current.map(|c| c.value.clone()).unwrap_or_default();
        control.paused = true;
        control.after_canary = true;
        control.by = "leader: after the canary batch".into();
        control.at_unix_ms = unix_ms();
        let inner = Store::put_if_txn(key, current.map_or(0, |c| c.mod_revision), encode(&control));
        if self.fence.txn(self.store, inner).await?.succeeded {
            info!(rollout.id = self.id, "paused after the canary batch");
        }
        Ok(())
    }

    /// Every node done: the target becomes the cluster settings (with the
    /// change markers, whose revisions are newer than every node's change,
    /// so no node's revision goes back and none changes again).
    async fn finish(&self) -> Result<()> {
        if self.spec.kind == RolloutKind::Reboot {
            // Nothing to write but the end: no settings change.
            let n = self.spec.node_count();
            let reason = format!("{n} node{} rebooted", if n == 1 { "" } else { "s" });
            return self.set_phase(Phase::Done, reason, true).await;
        }
        let keys = self.store.keys();
        let current = self.world.specs.settings.as_ref();
        let current_rev = current.map_or(0, |s| s.mod_revision);
        if current_rev != self.spec.base_settings_revision {
            return self
                .set_phase(
                    Phase::Failed,
                    format!(
                        "the cluster settings changed during the rollout (revision {} -> \
                         {current_rev}): not overwriting them",
                        self.spec.base_settings_revision
                    ),
                    false,
                )
                .await;
        }
        let before = current.map(|s| s.value.clone()).unwrap_or_default();
        let state_key = keys.rollout_state(self.id);
        let state = RolloutState {
            phase: Phase::Done,
            reason: format!("{} nodes changed", self.spec.node_count()),
            at_unix_ms: unix_ms(),
        };
        let mut writes = vec![
            Op::put(keys.cluster_settings(), encode(&self.spec.target)),
            Op::put(state_key.clone(), encode(&state)),
            Op::put(keys.rollout_active(), encode(&ActiveRollout { id: None })),
        ];
        let mut from = vec![&before];
        from.extend(self.world.specs.targets_in_effect());
        writes.extend(
            self.store
                .settings_change_ops_from(&from, &self.spec.target),
        );
        let event = self.store.event(
            EventKind::RolesChanged,
            None,
            format!(
                "rollout {} done: cluster settings changed: {}",
                self.id,
                self.spec.changes.join("; ")
            ),
        );
        writes.push(self.store.event_op(&event));
        let inner = Txn::new()
            .when([
                Cmp::mod_revision(keys.cluster_settings(), current_rev),
                Cmp::mod_revision(
                    state_key,
                    self.entry.state.as_ref().map_or(0, |s| s.mod_revision),
                ),
            ])
            .and_then(writes);
        if self.fence.txn(self.store, inner).await?.succeeded {
            info!(rollout.id = self.id, "rollout done");
        }
        Ok(())
    }
}

/// What `rollout pause/resume/abort` write.
pub fn control_after(
    current: Option<&RolloutControl>,
    action: super::Action,
    by: &str,
) -> RolloutControl {
    let mut next = current.cloned().unwrap_or_default();
    match action {
        super::Action::Pause => next.paused = true,
        super::Action::Resume => next.paused = false,
        super::Action::Abort => next.abort = true,
    }
    next.by = by.to_owned();
    next.at_unix_ms = unix_ms();
    next
}

#[cfg(test)]
mod tests {
    use steward_proto::converge::{
        ClusterSettings, ConvergeReport, KubernetesSettings, PackageRepository, ResourceState,
        ResourceStatus,
    };
    use steward_proto::domain::Health;

    use super::*;
    use crate::rollout::model::RolloutOptions;
    use crate::store::{MemoryBackend, NodeStatusRecord};
    use crate::testing::{eventually, node, put_roles, TestReplica};

    fn kubernetes(version: &str) -> ClusterSettings {
        ClusterSettings {
            kubernetes: Some(KubernetesSettings {
                version: version.into(),
                pod_subnet: "10.244.0.0/16".into(),
                service_subnet: "10.96.0.0/12".into(),
                repository: PackageRepository {
                    url: "https://pkgs.k8s.io/core:/stable:/v1.31/deb/".into(),
                    suite: "/".into(),
                    key: None,
                },
                kubelet_version: None,
            }),
            ..Default::default()
        }
    }

    /// The agent of `id`: reports what it applied and how the converge went.
    async fn report(replica: &TestReplica, id: &str, failure: Option<&str>) {
        let store = replica.store();
        let desired = replica.ctx.desired_for(&node(id)).expect("caches read");
        let current = store.node(&node(id)).await.unwrap();
        let status = NodeStatusRecord {
            health: NodeHealth::Healthy,
            last_health: Health::default(),
            replica: Some("c-1".into()),
            last_seen_unix_ms: 1,
            applied_revision: desired.revision,
            agent_version: "test".into(),
        };
        let rev = current.status.map_or(0, |s| s.mod_revision);
        store.put_status_if(&node(id), rev, &status).await.unwrap();
        let resource = ResourceState {
            id: "package:kubelet".into(),
            status: if failure.is_some() {
                ResourceStatus::Failed
            } else {
                ResourceStatus::Ok
            },
            detail: failure.unwrap_or_default().into(),
            since_unix_ms: 1,
        };
        let converge = ConvergeReport {
            revision: desired.revision,
            finished_unix_ms: 1,
            duration_ms: 1,
            resources: vec![resource],
        };
        let rev = current.converge.map_or(0, |c| c.mod_revision);
        store
            .put_converge_if(&node(id), rev, encode(&converge))
            .await
            .unwrap();
    }

    struct Bed {
        replica: TestReplica,
        fence: Fence,
        driver: Driver,
    }

    impl Bed {
        async fn new(workers: &[&str]) -> Self {
            let replica = TestReplica::start(MemoryBackend::new(), "c-1").await;
            for id in workers {
                put_roles(replica.store(), id, &[Role::K8sWorker]).await;
            }
            let fence = replica.lead().await;
            eventually("the spec cache", || {
                let specs = replica.ctx.specs.borrow();
                (specs.synced && specs.specs.len() == workers.len()).then_some(())
            })
            .await;
            eventually("the caches", || replica.ctx.desired_for(&node(workers[0]))).await;
            for id in workers {
                report(&replica, id, None).await;
            }
            Self {
                replica,
                fence,
                driver: Driver::new(StepTimeouts::default()),
            }
        }

        async fn tick(&mut self) {
            let specs = self.replica.ctx.specs.borrow().clone();
            let vips = self.replica.ctx.vips.borrow().clone();
            let orchestration = self.replica.ctx.orchestration.borrow().clone();
            let world = World {
                specs: &specs,
                vips: &vips,
                orchestration: &orchestration,
                lease: &self.replica.ctx.lease,
            };
            self.driver
                .tick(self.replica.store(), &self.fence, &world)
                .await
                .unwrap();
        }

        fn step(&self, id: &str, node_id: &str) -> Option<Step> {
            self.replica
                .ctx
                .specs
                .borrow()
                .rollouts
                .get(id)?
                .step(&node(node_id))
        }

        fn phase(&self, id: &str) -> Option<Phase> {
            self.replica.ctx.specs.borrow().rollouts.get(id)?.phase()
        }

        /// Ticks (the cache following each write) until `node_id` is at `step`.
        async fn until(&mut self, id: &str, node_id: &str, step: Step) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.step(id, node_id) != Some(step) {
                assert!(
                    Instant::now() < deadline,
                    "{node_id} stuck at {:?}, wanted {step:?}",
                    self.step(id, node_id)
                );
                self.tick().await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }

        async fn until_phase(&mut self, id: &str, phase: Phase) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.phase(id) != Some(phase) {
                assert!(
                    Instant::now() < deadline,
                    "rollout at {:?}, wanted {phase:?}",
                    self.phase(id)
                );
                self.tick().await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }

        async fn create(&self, target: &ClusterSettings) -> String {
            let base = self
                .replica
                .ctx
                .specs
                .borrow()
                .settings
                .as_ref()
                .map_or(0, |s| s.mod_revision);
            let id = crate::rollout::create(
                &self.replica.ctx,
                target,
                base,
                vec!["kubernetes: set".into()],
                RolloutOptions::default(),
                "ops",
            )
            .await
            .unwrap()
            .expect("nodes to change");
            self.cached(&id).await;
            id
        }

        /// Waits until the spec cache has rollout `id`.
        async fn cached(&self, id: &str) {
            eventually("the rollout in the cache", || {
                self.replica
                    .ctx
                    .specs
                    .borrow()
                    .rollouts
                    .contains_key(id)
                    .then_some(())
            })
            .await;
        }
    }

    #[tokio::test]
    async fn nodes_go_one_at_a_time_and_the_target_becomes_the_settings() {
        let mut bed = Bed::new(&["w-1", "w-2"]).await;
        let before: Vec<u64> = ["w-1", "w-2"]
            .iter()
            .map(|id| bed.replica.ctx.desired_for(&node(id)).unwrap().revision)
            .collect();
        let id = bed.create(&kubernetes("1.31.2-1.1")).await;
        // Nobody's desired state changed yet.
        for (i, w) in ["w-1", "w-2"].iter().enumerate() {
            let desired = bed.replica.ctx.desired_for(&node(w)).unwrap();
            assert_eq!(desired.cluster.settings.kubernetes, None);
            assert_eq!(desired.revision, before[i]);
        }
        bed.until(&id, "w-1", Step::Drained).await;
        assert!(bed.replica.ctx.specs.borrow().in_maintenance(&node("w-1")));
        bed.until(&id, "w-1", Step::Changed).await;
        let changed = bed.replica.ctx.desired_for(&node("w-1")).unwrap();
        assert_eq!(changed.cluster.settings, kubernetes("1.31.2-1.1"));
        assert!(changed.revision > before[0]);
        // w-2 waits its turn, on the old settings.
        assert_eq!(bed.step(&id, "w-2"), None);
        assert_eq!(
            bed.replica
                .ctx
                .desired_for(&node("w-2"))
                .unwrap()
                .cluster
                .settings
                .kubernetes,
            None
        );
        // Until its agent reports the revision converged, w-1 stays changed.
        for _ in 0..5 {
            bed.tick().await;
        }
        assert_eq!(bed.step(&id, "w-1"), Some(Step::Changed));
        report(&bed.replica, "w-1", None).await;
        bed.until(&id, "w-1", Step::Done).await;
        assert!(!bed.replica.ctx.specs.borrow().in_maintenance(&node("w-1")));
        // A new leader (a driver with no memory) takes over mid-rollout.
        bed.driver = Driver::new(StepTimeouts::default());
        bed.until(&id, "w-2", Step::Changed).await;
        report(&bed.replica, "w-2", None).await;
        bed.until(&id, "w-2", Step::Done).await;
        let w1_changed = bed.replica.ctx.desired_for(&node("w-1")).unwrap().revision;
        bed.until_phase(&id, Phase::Done).await;
        let specs = bed.replica.ctx.specs.borrow().clone();
        assert_eq!(
            specs.settings.as_ref().unwrap().value,
            kubernetes("1.31.2-1.1")
        );
        assert!(specs.active_rollout().is_none());
        // Same content for both, revisions never went back.
        for w in ["w-1", "w-2"] {
            let desired = bed.replica.ctx.desired_for(&node(w)).unwrap();
            assert_eq!(desired.cluster.settings, kubernetes("1.31.2-1.1"));
            assert!(desired.revision >= w1_changed, "{w} went back");
        }
        // Each node changed once: one marker each.
        let entry = bed.replica.store().rollout(&id).await.unwrap().unwrap();
        assert_eq!(entry.changed.len(), 2);
        // A new plain apply would be allowed again.
        crate::rollout::ensure_none_active(bed.replica.store())
            .await
            .unwrap();
    }

    /// The agent of `id` reports running boot `boot_id`.
    async fn boot(replica: &TestReplica, id: &str, boot_id: &str) {
        let facts = steward_proto::domain::Facts {
            boot_id: boot_id.into(),
            ..Default::default()
        };
        replica
            .store()
            .put_facts(&node(id), &facts, None)
            .await
            .unwrap();
    }

    /// A bed of w-1 and w-2 (running boots `boot-1a`, `boot-2a`) and a
    /// reboot rollout of both, in the cache: the bed, the request, its id.
    async fn reboot_all() -> (Bed, steward_proto::admin::RebootRollout, String) {
        let bed = Bed::new(&["w-1", "w-2"]).await;
        boot(&bed.replica, "w-1", "boot-1a").await;
        boot(&bed.replica, "w-2", "boot-2a").await;
        let request = steward_proto::admin::RebootRollout {
            selector: steward_proto::admin::RebootSelector::All,
            only_required: false,
            options: RolloutOptions::default(),
        };
        let id = crate::rollout::reboot::create(&bed.replica.ctx, &request, "ops")
            .await
            .unwrap();
        bed.cached(&id).await;
        (bed, request, id)
    }

    #[tokio::test]
    async fn a_reboot_rollout_asks_each_node_once_and_waits_for_a_new_boot() {
        let (mut bed, request, id) = reboot_all().await;
        // A second one is refused while it runs.
        let again = crate::rollout::reboot::create(&bed.replica.ctx, &request, "ops").await;
        assert!(
            matches!(again, Err(Error::RolloutInProgress(_))),
            "{again:?}"
        );
        bed.until(&id, "w-1", Step::Changed).await;
        assert!(bed.replica.ctx.specs.borrow().in_maintenance(&node("w-1")));
        let asked = bed.replica.ctx.desired_for(&node("w-1")).unwrap();
        let request_1 = asked.reboot.clone().expect("w-1 asked to reboot");
        assert_eq!(request_1.boot_id, "boot-1a");
        assert!(asked.revision >= request_1.generation);
        assert_eq!(
            bed.replica.ctx.desired_for(&node("w-2")).unwrap().reboot,
            None
        );
        // Still the old boot: it waits, and a new leader does not ask again.
        for _ in 0..5 {
            bed.tick().await;
        }
        bed.driver = Driver::new(StepTimeouts::default());
        for _ in 0..5 {
            bed.tick().await;
        }
        assert_eq!(bed.step(&id, "w-1"), Some(Step::Changed));
        assert_eq!(bed.step(&id, "w-2"), None, "w-2 waits for w-1");
        let still = bed.replica.ctx.desired_for(&node("w-1")).unwrap().reboot;
        assert_eq!(still.as_ref(), Some(&request_1), "asked once");
        // Back with a new boot: healthy, undrained, then w-2's turn.
        boot(&bed.replica, "w-1", "boot-1b").await;
        bed.until(&id, "w-1", Step::Done).await;
        assert!(!bed.replica.ctx.specs.borrow().in_maintenance(&node("w-1")));
        bed.until(&id, "w-2", Step::Changed).await;
        boot(&bed.replica, "w-2", "boot-2b").await;
        bed.until_phase(&id, Phase::Done).await;
        let entry = bed.replica.store().rollout(&id).await.unwrap().unwrap();
        let w1 = &entry.nodes[&node("w-1")].value;
        assert_eq!(
            (w1.boot_id_before.as_str(), w1.boot_id_after.as_str()),
            ("boot-1a", "boot-1b")
        );
        let w2 = &entry.nodes[&node("w-2")].value;
        assert!(w1.times.finished <= w2.times.started, "one at a time");
        // A reboot changes no settings, and the rollout holds nothing.
        let specs = bed.replica.ctx.specs.borrow().clone();
        assert!(specs.settings.is_none());
        assert!(specs.active_rollout().is_none());
        assert!(specs.maintenance_set().is_empty());
        // Only the requests stay: one each, never asked again.
        assert_eq!(
            bed.replica.ctx.desired_for(&node("w-1")).unwrap().reboot,
            Some(request_1)
        );
    }

    #[tokio::test]
    async fn aborting_a_reboot_rollout_lets_the_node_in_flight_come_back_and_asks_no_other() {
        let (mut bed, _, id) = reboot_all().await;
        bed.until(&id, "w-1", Step::Changed).await;
        crate::rollout::control(
            bed.replica.store(),
            &id,
            crate::rollout::Action::Abort,
            "ops",
        )
        .await
        .unwrap();
        bed.until_phase(&id, Phase::Aborting).await;
        // The node asked finishes: it is not left drained mid-reboot.
        for _ in 0..5 {
            bed.tick().await;
        }
        assert_eq!(bed.phase(&id), Some(Phase::Aborting));
        assert!(bed.replica.ctx.specs.borrow().in_maintenance(&node("w-1")));
        boot(&bed.replica, "w-1", "boot-1b").await;
        bed.until_phase(&id, Phase::Aborted).await;
        assert_eq!(bed.step(&id, "w-1"), Some(Step::Done));
        assert_eq!(bed.step(&id, "w-2"), None);
        let specs = bed.replica.ctx.specs.borrow().clone();
        assert!(specs.maintenance_set().is_empty());
        assert!(specs.active_rollout().is_none());
        assert!(!specs.reboots.contains_key(&node("w-2")), "w-2 never asked");
        assert_eq!(
            bed.replica.ctx.desired_for(&node("w-2")).unwrap().reboot,
            None
        );
    }

    #[tokio::test]
    async fn the_maintenance_window_reboots_one_node_that_needs_it_only_with_time_left() {
        let mut bed = Bed::new(&["w-1", "w-2"]).await;
        boot(&bed.replica, "w-1", "boot-1a").await;
        let needs = steward_proto::domain::Facts {
            boot_id: "boot-2a".into(),
            reboot_required: Some(steward_proto::domain::RebootRequired {
                since_unix_ms: 1,
                source: "reboot-required".into(),
                packages: Vec::new(),
            }),
            ..Default::default()
        };
        let store = bed.replica.store().clone();
        store.put_facts(&node("w-2"), &needs, None).await.unwrap();
        put_saturday_window(&store).await;
        eventually("the settings in the cache", || {
            bed.replica.ctx.specs.borrow().settings.as_ref().map(|_| ())
        })
        .await;
        // 2026-12-05 was a Saturday.
        let saturday = 20_792 * 86_400_000u64;
        let at = |hh: u64, mm: u64| saturday + (hh * 60 + mm) * 60_000;
        let longest = Duration::from_secs(20 * 60);
        let (ctx, fence) = (bed.replica.ctx.clone(), bed.fence.clone());
        let tick = |now: u64| {
            let specs = ctx.specs.borrow().clone();
            let vips = ctx.vips.borrow().clone();
            let orchestration = ctx.orchestration.borrow().clone();
            let (store, fence, lease) = (store.clone(), fence.clone(), &ctx.lease);
            async move {
                let world = World {
                    specs: &specs,
                    vips: &vips,
                    orchestration: &orchestration,
                    lease,
                };
                crate::rollout::reboot::window_tick(&store, &fence, &world, longest, now)
                    .await
                    .unwrap()
            }
        };
        assert_eq!(tick(at(1, 59)).await, None, "before the window");
        assert_eq!(tick(at(3, 41)).await, None, "it would run past 04:00");
        assert_eq!(tick(at(4, 0)).await, None, "after the window");
        let id = tick(at(2, 30)).await.expect("a reboot rollout");
        let entry = store.rollout(&id).await.unwrap().unwrap();
        let spec = entry.spec.unwrap().value;
        assert_eq!(spec.kind, RolloutKind::Reboot);
        assert_eq!(spec.batches, [[node("w-2")]]);
        assert!(
            spec.created_by.contains("maintenance window"),
            "{}",
            spec.created_by
        );
        // One at a time: none while it is active.
        assert_eq!(tick(at(2, 31)).await, None);
        bed.until(&id, "w-2", Step::Changed).await;
        boot(&bed.replica, "w-2", "boot-2b").await;
        bed.until_phase(&id, Phase::Done).await;
        // Its need was before this reboot: not again (the facts above
        // still say it needs one, as an agent whose need outlived the
        // reboot would).
        store.put_facts(&node("w-2"), &needs, None).await.unwrap();
        assert_eq!(tick(at(2, 40)).await, None);
    }

    /// Settings with a maintenance window on Saturdays, 02:00-04:00.
    async fn put_saturday_window(store: &Store) {
        let settings = ClusterSettings {
            maintenance_window: Some("Sat 02:00-04:00".into()),
            ..Default::default()
        };
        store
            .txn(
                Txn::new().and_then([Op::put(store.keys().cluster_settings(), encode(&settings))]),
                "test",
            )
            .await
            .unwrap();
    }

    /// Issue 13: with many nodes needing a reboot, a window tick reads a
    /// chunk of them at a time until one may go, not all of them, and
    /// passes over chunks where none may (here: never connected).
    #[tokio::test]
    async fn the_maintenance_window_reads_a_chunk_of_the_nodes_needing_a_reboot() {
        const NEEDING: usize = 400;
        const AWAY: usize = 70;
        let memory = MemoryBackend::new();
        let replica = TestReplica::start(memory.clone(), "c-1").await;
        let store = replica.store().clone();
        let fence = replica.lead().await;
        let id = |i: usize| format!("w-{i:03}");
        for i in 0..NEEDING {
            let facts = steward_proto::domain::Facts {
                boot_id: format!("boot-{i}"),
                reboot_required: Some(steward_proto::domain::RebootRequired {
                    since_unix_ms: 1,
                    source: "reboot-required".into(),
                    packages: Vec::new(),
                }),
                ..Default::default()
            };
            if i < AWAY {
                store.put_facts(&node(&id(i)), &facts, None).await.unwrap();
            } else {
                crate::testing::put_connected(&store, &id(i), &facts).await;
            }
        }
        put_saturday_window(&store).await;
        let specs = replica.ctx.fresh_specs().await.expect("caught up");
        assert_eq!(specs.reboot_required.len(), NEEDING);
        let vips = replica.ctx.vips.borrow().clone();
        let orchestration = replica.ctx.orchestration.borrow().clone();
        let world = World {
            specs: &specs,
            vips: &vips,
            orchestration: &orchestration,
            lease: &replica.ctx.lease,
        };
        // 2026-12-05 was a Saturday; 02:30.
        let now = 20_792 * 86_400_000u64 + 150 * 60_000;
        let before = memory.keys_read();
        let id_started = crate::rollout::reboot::window_tick(
            &store,
            &fence,
            &world,
            Duration::from_secs(60),
            now,
        )
        .await
        .unwrap()
        .expect("a reboot rollout");
        let read = memory.keys_read() - before;
        let spec = store
            .rollout(&id_started)
            .await
            .unwrap()
            .unwrap()
            .spec
            .unwrap()
            .value;
        let chosen = spec.batches.concat();
        assert_eq!(chosen.len(), 1, "{chosen:?}");
        let index: usize = chosen[0].as_str()[2..].parse().unwrap();
        assert!(
            (AWAY..128).contains(&index),
            "{} is connected and in the second chunk",
            chosen[0]
        );
        // Two chunks of facts, one of statuses (and the active rollout),
        // not the facts and statuses of all 400.
        assert!(read < 2 * 128 + 8, "a window tick read {read} keys");
    }

    #[tokio::test]
    async fn only_the_newest_finished_rollouts_are_kept() {
        let mut bed = Bed::new(&["w-1"]).await;
        let store = bed.replica.store().clone();
        let total = ROLLOUTS_RETAINED + 3;
        for i in 0..total {
            let id = format!("r{i:04}");
            let spec = RolloutSpec {
                id: id.clone(),
                target: kubernetes("1.31.2-1.1"),
                base_settings_revision: 0,
                options: RolloutOptions::default(),
                batches: vec![vec![node("w-1")]],
                canary_batches: 0,
                changes: Vec::new(),
                created_by: "ops".into(),
                created_at_unix_ms: 1,
                upgrade: None,
                kind: Default::default(),
            };
            let state = RolloutState {
                phase: if i == 0 { Phase::Aborted } else { Phase::Done },
                reason: String::new(),
                at_unix_ms: 1,
            };
            let keys = store.keys();
            let mut ops = vec![
                Op::put(keys.rollout_spec(&id), encode(&spec)),
                Op::put(keys.rollout_state(&id), encode(&state)),
            ];
            // The first, aborted, changed w-1, which still has its target.
            if i == 0 {
                ops.push(Op::put(keys.rollout_changed(&id, &node("w-1")), Vec::new()));
            }
            store.txn(Txn::new().and_then(ops), "test").await.unwrap();
        }
        eventually("the rollouts in the cache", || {
            (bed.replica.ctx.specs.borrow().rollouts.len() == total).then_some(())
        })
        .await;
        bed.tick().await;
        let left = store.rollouts().await.unwrap();
        let ids: Vec<&str> = left.keys().map(String::as_str).collect();
        assert_eq!(ids.len(), ROLLOUTS_RETAINED + 1, "{ids:?}");
        assert_eq!(ids[0], "r0000", "a target in effect is kept");
        assert_eq!(ids[1], "r0003", "the oldest finished ones go");
        eventually("the cache forgets them", || {
            (bed.replica.ctx.specs.borrow().rollouts.len() == ROLLOUTS_RETAINED + 1).then_some(())
        })
        .await;
    }

    #[tokio::test]
    async fn a_failed_converge_stops_the_rollout_and_abort_leaves_nothing_drained() {
        let mut bed = Bed::new(&["w-1", "w-2"]).await;
        let id = bed.create(&kubernetes("9.9.9")).await;
        let refused = crate::rollout::ensure_none_active(bed.replica.store()).await;
        assert!(
            matches!(&refused, Err(Error::RolloutInProgress(m)) if *m == id),
            "{refused:?}"
        );
        bed.until(&id, "w-1", Step::Changed).await;
        report(
            &bed.replica,
            "w-1",
            Some("E: Version '9.9.9' for 'kubelet' was not found"),
        )
        .await;
        bed.until(&id, "w-1", Step::Failed).await;
        bed.until_phase(&id, Phase::Failed).await;
        let view = crate::rollout::get(bed.replica.store(), &id).await.unwrap();
        assert_eq!(view.phase, "failed");
        assert!(view.reason.contains("node w-1 failed"), "{}", view.reason);
        assert!(
            view.reason.contains("'9.9.9' for 'kubelet' was not found"),
            "{}",
            view.reason
        );
        // Nothing else proceeds.
        for _ in 0..5 {
            bed.tick().await;
        }
        assert_eq!(bed.step(&id, "w-2"), None);
        assert!(bed.replica.ctx.specs.borrow().in_maintenance(&node("w-1")));
        crate::rollout::control(
            bed.replica.store(),
            &id,
            crate::rollout::Action::Abort,
            "ops",
        )
        .await
        .unwrap();
        bed.until_phase(&id, Phase::Aborted).await;
        let specs = bed.replica.ctx.specs.borrow().clone();
        assert!(
            specs.maintenance_set().is_empty(),
            "{:?}",
            specs.maintenance_set()
        );
        assert!(specs.active_rollout().is_none());
        // The changed node keeps the target; the other the old settings.
        let w1 = bed.replica.ctx.desired_for(&node("w-1")).unwrap();
        assert_eq!(w1.cluster.settings, kubernetes("9.9.9"));
        let w2 = bed.replica.ctx.desired_for(&node("w-2")).unwrap();
        assert_eq!(w2.cluster.settings.kubernetes, None);

        // The next settings write (as `apply` makes it) changes a section
        // the workers do not consume: w-1 goes back to the cluster's
        // settings, and its revision must still not go back.
        let specs = bed.replica.ctx.specs.borrow().clone();
        let targets = specs.targets_in_effect();
        assert_eq!(targets, [&kubernetes("9.9.9")]);
        let before = specs
            .settings
            .as_ref()
            .map(|s| s.value.clone())
            .unwrap_or_default();
        let mut after = before.clone();
        after.frontends.push(steward_proto::converge::Frontend {
            name: "web".into(),
            port: 8080,
            backend_role: Role::K8sWorker,
            backend_port: 30080,
        });
        let store = bed.replica.store();
        let mut from = vec![&before];
        from.extend(targets);
        let mut ops = vec![Op::put(store.keys().cluster_settings(), encode(&after))];
        ops.extend(store.settings_change_ops_from(&from, &after));
        store.txn(Txn::new().and_then(ops), "test").await.unwrap();
        eventually("the settings in the cache", || {
            let specs = bed.replica.ctx.specs.borrow();
            (specs.settings.as_ref().map(|s| &s.value) == Some(&after)).then_some(())
        })
        .await;
        let back = bed.replica.ctx.desired_for(&node("w-1")).unwrap();
        assert_eq!(back.cluster.settings.kubernetes, None);
        assert!(
            back.revision > w1.revision,
            "w-1 went from revision {} back to {}",
            w1.revision,
            back.revision
        );
    }

    /// The agent of `id` reports its desired revision converged, with the
    /// command resources `commands` (task id, status) besides.
    async fn report_commands(replica: &TestReplica, id: &str, commands: &[(&str, ResourceStatus)]) {
        report(replica, id, None).await;
        let store = replica.store();
        let current = store.node(&node(id)).await.unwrap();
        let converge = current.converge.expect("reported");
        let mut report = converge.value.clone();
        for (task, status) in commands {
            report.resources.push(ResourceState {
                id: steward_proto::converge::command_resource_id(task),
                status: *status,
                detail: if *status == ResourceStatus::Failed {
                    format!("node {id} is not Ready")
                } else {
                    String::new()
                },
                since_unix_ms: 1,
            });
        }
        store
            .put_converge_if(&node(id), converge.mod_revision, encode(&report))
            .await
            .unwrap();
    }

    fn task_ids(desired: &steward_proto::domain::DesiredState) -> Vec<String> {
        desired.tasks.iter().map(|t| t.id.clone()).collect()
    }

    /// Issue 15 item 3: control planes first, one at a time and in place,
    /// the first one planning and applying; per node kubeadm moves first
    /// and kubelet/kubectl only once `kubeadm upgrade` converged; a node is
    /// healthy only once a control plane reports it Ready; a new leader
    /// resumes from etcd and asks for nothing twice.
    #[tokio::test]
    async fn a_kubernetes_upgrade_goes_control_plane_by_control_plane_then_the_workers() {
        let replica = TestReplica::start(MemoryBackend::new(), "c-1").await;
        let store = replica.store().clone();
        for (id, role) in [
            ("cp-1", Role::K8sControlPlane),
            ("cp-2", Role::K8sControlPlane),
            ("w-1", Role::K8sWorker),
        ] {
            put_roles(&store, id, &[role]).await;
        }
        let old = kubernetes("1.30.5-1.1");
        let new = kubernetes("1.31.2-1.1");
        let joined = |id: &str| {
            Op::put(
                store.keys().kubernetes_joined(&node(id)),
                br#"{"at_unix_ms":1}"#.to_vec(),
            )
        };
        store
            .txn(
                Txn::new().and_then([
                    Op::put(store.keys().cluster_settings(), encode(&old)),
                    joined("cp-1"),
                    joined("cp-2"),
                    joined("w-1"),
                ]),
                "test",
            )
            .await
            .unwrap();
        let fence = replica.lead().await;
        eventually("the caches", || {
            let specs = replica.ctx.specs.borrow();
            let orchestration = replica.ctx.orchestration.borrow();
            (specs.specs.len() == 3 && specs.settings.is_some() && orchestration.joined.len() == 3)
                .then_some(())
        })
        .await;
        for id in ["cp-1", "cp-2", "w-1"] {
            eventually("desired", || replica.ctx.desired_for(&node(id))).await;
            report(&replica, id, None).await;
        }
        let mut bed = Bed {
            replica,
            fence,
            driver: Driver::new(StepTimeouts::default()),
        };
        let id = bed.create(&new).await;
        let spec = bed.replica.ctx.specs.borrow().rollouts[&id]
            .spec
            .clone()
            .unwrap()
            .value;
        assert_eq!(
            spec.batches,
            vec![vec![node("cp-1")], vec![node("cp-2")], vec![node("w-1")]]
        );
        let upgrade = spec.upgrade.clone().expect("an upgrade");
        assert_eq!(upgrade.from, "1.30.5-1.1");
        assert_eq!(upgrade.first_control_plane, node("cp-1"));
        let version = |desired: &steward_proto::domain::DesiredState| {
            let k = desired
                .cluster
                .settings
                .kubernetes
                .clone()
                .expect("kubernetes");
            (k.version.clone(), k.kubelet_version().to_owned())
        };
        let desired = |bed: &Bed, id: &str| bed.replica.ctx.desired_for(&node(id)).unwrap();

        // cp-1: in place (no drain), kubeadm first.
        bed.until(&id, "cp-1", Step::Changed).await;
        assert!(!bed.replica.ctx.specs.borrow().in_maintenance(&node("cp-1")));
        let d = desired(&bed, "cp-1");
        assert_eq!(version(&d), ("1.31.2-1.1".into(), "1.30.5-1.1".into()));
        assert!(task_ids(&d).contains(&format!("kubeadm-upgrade-1.31.2-1.1-{id}")));
        let apply = d
            .tasks
            .iter()
            .find(|t| t.id == format!("kubeadm-upgrade-1.31.2-1.1-{id}"))
            .unwrap();
        assert!(apply.argv[2]
            .contains("kubeadm upgrade plan v1.31.2 && kubeadm upgrade apply -y v1.31.2"));
        assert!(!task_ids(&d)
            .iter()
            .any(|t| t.starts_with("kubelet-restart")));
        // The others: untouched, holds where they were.
        for other in ["cp-2", "w-1"] {
            let d = desired(&bed, other);
            assert_eq!(version(&d), ("1.30.5-1.1".into(), "1.30.5-1.1".into()));
            assert!(d.tasks.is_empty(), "{other}: {:?}", task_ids(&d));
        }
        // Until `kubeadm upgrade` converged, kubelet stays.
        for _ in 0..5 {
            bed.tick().await;
        }
        assert_eq!(version(&desired(&bed, "cp-1")).1, "1.30.5-1.1");
        let stage_one = desired(&bed, "cp-1").revision;
        report(&bed.replica, "cp-1", None).await;
        eventually_upgraded(&mut bed, &id, "cp-1").await;
        let d = desired(&bed, "cp-1");
        assert!(d.revision > stage_one);
        assert_eq!(version(&d), ("1.31.2-1.1".into(), "1.31.2-1.1".into()));
        assert_eq!(
            task_ids(&d),
            [
                format!("kubeadm-upgrade-1.31.2-1.1-{id}"),
                format!("kubelet-restart-1.31.2-1.1-{id}")
            ]
        );
        assert_eq!(bed.step(&id, "cp-1"), Some(Step::Changed));

        // The leader changes: the new one reads where cp-1 stands and
        // writes no marker twice (a second write would fail its guard).
        bed.driver = Driver::new(StepTimeouts::default());
        report(&bed.replica, "cp-1", None).await;
        bed.until(&id, "cp-1", Step::Converged).await;
        // Converged is not healthy: the checker (cp-1, the init node's
        // stand-in here: the first joined control plane) is asked.
        until_reason(
            &mut bed,
            &id,
            "cp-1",
            "kubectl get node cp-1 on cp-1: waiting for its answer",
        )
        .await;
        assert_eq!(bed.step(&id, "cp-1"), Some(Step::Converged));
        let d = desired(&bed, "cp-1");
        assert!(
            task_ids(&d).contains(&"kubernetes-ready-cp-1".to_owned()),
            "{:?}",
            task_ids(&d)
        );
        // Not Ready: still not healthy.
        report_commands(
            &bed.replica,
            "cp-1",
            &[("kubernetes-ready-cp-1", ResourceStatus::Failed)],
        )
        .await;
        until_reason(&mut bed, &id, "cp-1", "not Ready (node cp-1 is not Ready)").await;
        assert_eq!(bed.step(&id, "cp-1"), Some(Step::Converged));
        report_commands(
            &bed.replica,
            "cp-1",
            &[("kubernetes-ready-cp-1", ResourceStatus::Changed)],
        )
        .await;
        bed.until(&id, "cp-1", Step::Done).await;
        assert!(!task_ids(&desired(&bed, "cp-1")).contains(&"kubernetes-ready-cp-1".to_owned()));

        // cp-2: its turn only now; `kubeadm upgrade node`, in place.
        bed.until(&id, "cp-2", Step::Changed).await;
        assert!(!bed.replica.ctx.specs.borrow().in_maintenance(&node("cp-2")));
        let d = desired(&bed, "cp-2");
        assert_eq!(version(&d).1, "1.30.5-1.1");
        let node_task = d
            .tasks
            .iter()
            .find(|t| t.id == format!("kubeadm-upgrade-1.31.2-1.1-{id}"))
            .unwrap();
        assert!(node_task.argv[2].starts_with("kubeadm upgrade node && "));
        assert_eq!(
            bed.step(&id, "w-1"),
            None,
            "workers wait for every control plane"
        );
        report(&bed.replica, "cp-2", None).await;
        eventually_upgraded(&mut bed, &id, "cp-2").await;
        report(&bed.replica, "cp-2", None).await;
        bed.until(&id, "cp-2", Step::Converged).await;
        report_commands(
            &bed.replica,
            "cp-1",
            &[("kubernetes-ready-cp-2", ResourceStatus::Changed)],
        )
        .await;
        bed.until(&id, "cp-2", Step::Done).await;

        // w-1: drained (a control plane cordons it) before its change.
        bed.until(&id, "w-1", Step::Draining).await;
        assert!(bed.replica.ctx.specs.borrow().in_maintenance(&node("w-1")));
        // (The cordon and drain are the maintenance machinery's: a control
        // plane reports them done, as here.)
        assert_eq!(
            version(&desired(&bed, "w-1")).0,
            "1.30.5-1.1",
            "no hold moves before the drain"
        );
        store
            .txn(
                Txn::new().and_then([Op::put(
                    store.keys().kubernetes_cordoned(&node("w-1")),
                    br#"{"at_unix_ms":1}"#.to_vec(),
                )]),
                "test",
            )
            .await
            .unwrap();
        bed.until(&id, "w-1", Step::Changed).await;
        assert_eq!(
            version(&desired(&bed, "w-1")),
            ("1.31.2-1.1".into(), "1.30.5-1.1".into())
        );
        report(&bed.replica, "w-1", None).await;
        eventually_upgraded(&mut bed, &id, "w-1").await;
        report(&bed.replica, "w-1", None).await;
        bed.until(&id, "w-1", Step::Converged).await;
        report_commands(
            &bed.replica,
            "cp-1",
            &[("kubernetes-ready-w-1", ResourceStatus::Changed)],
        )
        .await;
        bed.until(&id, "w-1", Step::Done).await;
        assert!(!bed.replica.ctx.specs.borrow().in_maintenance(&node("w-1")));
        // Back in service, but not done before a control plane reports the
        // uncordon.
        for _ in 0..5 {
            bed.tick().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(
            bed.phase(&id),
            Some(Phase::Running),
            "done while w-1 is cordoned"
        );
        store
            .delete_orchestration(&[store.keys().kubernetes_cordoned(&node("w-1"))])
            .await
            .unwrap();
        bed.until_phase(&id, Phase::Done).await;
        let entry = store.rollout(&id).await.unwrap().unwrap();
        assert_eq!(entry.changed.len(), 3);
        assert_eq!(entry.upgraded.len(), 3);
        // Done: the settings are the target; no upgrade task is left.
        for n in ["cp-1", "cp-2", "w-1"] {
            let d = desired(&bed, n);
            assert_eq!(version(&d), ("1.31.2-1.1".into(), "1.31.2-1.1".into()));
            assert!(
                !task_ids(&d)
                    .iter()
                    .any(|t| t.starts_with("kubeadm-upgrade") || t.starts_with("kubelet-restart")),
                "{n}: {:?}",
                task_ids(&d)
            );
        }
    }

    /// Ticks until `node_id`'s reason says `text`.
    async fn until_reason(bed: &mut Bed, id: &str, node_id: &str, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            bed.tick().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
            let reason = bed.replica.ctx.specs.borrow().rollouts[id].nodes[&node(node_id)]
                .value
                .reason
                .clone();
            if reason.contains(text) {
                return;
            }
            assert!(Instant::now() < deadline, "{node_id}: {reason}");
        }
    }

    /// Ticks until `node_id`'s `upgraded/` marker is in the cache.
    async fn eventually_upgraded(bed: &mut Bed, id: &str, node_id: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let has = bed.replica.ctx.specs.borrow().rollouts[id]
                .upgraded
                .contains_key(&node(node_id));
            if has {
                return;
            }
            assert!(Instant::now() < deadline, "{node_id} never upgraded");
            bed.tick().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn resume_of_a_failed_rollout_tries_the_failed_node_again() {
        let mut bed = Bed::new(&["w-1", "w-2"]).await;
        let id = bed.create(&kubernetes("1.31.2-1.1")).await;
        bed.until(&id, "w-1", Step::Changed).await;
        report(
            &bed.replica,
            "w-1",
            Some("E: Could not get lock /var/lib/dpkg/lock"),
        )
        .await;
        bed.until_phase(&id, Phase::Failed).await;
        let store = bed.replica.store().clone();
        // Still failing when resumed: it fails again, saying why.
        let view = crate::rollout::control(&store, &id, crate::rollout::Action::Resume, "ops")
            .await
            .unwrap();
        assert!(
            view.reason.contains("the failed node is tried again"),
            "{}",
            view.reason
        );
        bed.until_phase(&id, Phase::Running).await;
        let view = crate::rollout::get(&store, &id).await.unwrap();
        assert_eq!(
            view.reason,
            "resumed by ops: trying w-1 (from changed) again"
        );
        bed.until_phase(&id, Phase::Failed).await;
        let entry = store.rollout(&id).await.unwrap().unwrap();
        assert!(
            !entry.retry_requested(),
            "the request is cleared once taken"
        );
        let w1 = &entry.nodes[&node("w-1")].value;
        assert_eq!(w1.step, Step::Failed);
        assert!(w1.reason.contains("Could not get lock"), "{}", w1.reason);
        assert_eq!(bed.step(&id, "w-2"), None, "nothing else went on");
        // The operator fixed the host; the agent converged: resume, and
        // w-1 goes on from its converge (not drained or changed twice).
        report(&bed.replica, "w-1", None).await;
        let changed_at = entry.changed[&node("w-1")];
        crate::rollout::control(&store, &id, crate::rollout::Action::Resume, "ops")
            .await
            .unwrap();
        bed.until(&id, "w-1", Step::Done).await;
        let entry = store.rollout(&id).await.unwrap().unwrap();
        assert_eq!(entry.changed[&node("w-1")], changed_at, "changed once");
        assert!(!bed.replica.ctx.specs.borrow().in_maintenance(&node("w-1")));
        bed.until(&id, "w-2", Step::Changed).await;
        report(&bed.replica, "w-2", None).await;
        bed.until_phase(&id, Phase::Done).await;
        // A finished rollout has nothing to resume.
        let over =
            crate::rollout::control(&store, &id, crate::rollout::Action::Resume, "ops").await;
        assert!(matches!(over, Err(Error::RolloutOver { .. })), "{over:?}");
    }

    #[test]
    fn a_retried_node_goes_back_to_the_step_it_failed_at() {
        let record = RolloutNodeRecord {
            step: Step::Failed,
            reason: "not healthy within 300 s: agent disconnected".into(),
            holds_drain: true,
            changed_revision: 40,
            times: StepTimes {
                started: 1,
                drained: 2,
                changed: 3,
                converged: 4,
                healthy: 0,
                finished: 5,
            },
            boot_id_before: String::new(),
            boot_id_after: String::new(),
        };
        let after_change = retried(&record, true, true, "ops", 100);
        assert_eq!(after_change.step, Step::Changed);
        assert_eq!(after_change.times.changed, 100);
        assert_eq!(after_change.times.converged, 0);
        assert_eq!(after_change.times.finished, 0);
        assert_eq!(after_change.times.started, 1);
        assert!(after_change.holds_drain);
        assert_eq!(
            after_change.reason,
            "tried again (rollout resume by ops) after: not healthy within 300 s: agent \
             disconnected"
        );
        let draining = retried(&record, false, true, "ops", 100);
        assert_eq!(
            (draining.step, draining.times.started),
            (Step::Draining, 100)
        );
        let gates = retried(&record, false, false, "ops", 100);
        assert_eq!(gates.step, Step::Waiting);
    }
}
