//! The agent's side of the VIP lease protocol (DESIGN.md §3): while the node
//! has the lb role it keeps a lease stream to **every** coordinator replica,
//! heartbeats them all, and drives a [`Holder`] — the same IO-free protocol
//! code the simulation checks — carrying out what it decides: probe, bind,
//! announce, unbind. The host's network is behind [`Network`]
//! ([`crate::network`]): the real one in the daemon, a scripted fake in the
//! unit tests below.
//!
//! Every address this agent binds is first written to `vips.json` in its
//! state directory, so that whatever ends the agent, `steward-agent
//! release-vips` (the unit's `ExecStopPost=`) and the next start remove it:
//! a VIP is never left behind without a lease.
//!
//! **Architecture invariants:**
//! - The holding rule is applied on this host's monotonic clock only;
//!   replicas echo our send times and never compare clocks.
//! - Nothing in the driver loop or the lease streams awaits without a
//!   deadline: the driver wraps every [`Network`] call it awaits in
//!   [`crate::address::NETLINK_DEADLINE`] (whatever the implementation
//!   does; the unit tests hang the fake to check it), dials and stream
//!   opens time out, events reach the driver with
//!   [`EVENT_DEADLINE`]. A driver blocked in an await could not drop a VIP
//!   whose lease ran out. The driver marks its [`Beat`] on every wake-up for
//!   the systemd watchdog ([`crate::watchdog`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use steward_lease::messages::{LeaseHeartbeat, LeaseReply};
use steward_lease::{Claim, Holder, HolderAction, Target};
use steward_proto::domain::{NodeId, Role};
use steward_proto::pb;
use steward_proto::pb::agent_service_client::AgentServiceClient;
use steward_proto::vip::VipCheck;
use steward_runtime::backoff::Backoff;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::address::{HostNetwork, NetError, NETLINK_DEADLINE};
use crate::config::{Settings, VipSettings};
use crate::network::Network;
use crate::session::Credentials;
use crate::state::RecordedState;
use crate::watchdog::{Beat, KEEPALIVE};

/// How often the addresses actually on the host are compared with what the
/// holder believes (drift: somebody removed or added the VIP by hand).
const OBSERVE_INTERVAL: Duration = Duration::from_secs(1);
/// How long a stopping agent waits for its last heartbeat ("released") to
/// go out.
const FAREWELL: Duration = Duration::from_millis(300);
/// How long a lease stream, probe or health check waits for room in the
/// driver's event queue before giving up (the stream reconnects; a check
/// result is dropped and the check runs again).
pub const EVENT_DEADLINE: Duration = Duration::from_secs(2);
/// Opening a replica's lease stream (the dial has its own deadline).
const OPEN_DEADLINE: Duration = Duration::from_secs(4);

/// What `vips.json` holds: addresses this agent has bound (or is binding).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldAddresses {
    pub held: Vec<HeldAddress>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct HeldAddress {
    pub vip: String,
    pub address: std::net::IpAddr,
    pub prefix: u8,
    pub interface: String,
}

impl HeldAddress {
    fn target(&self) -> Target {
        Target {
            address: self.address,
            prefix: self.prefix,
            interface: Some(self.interface.clone()),
        }
    }
}

/// `vips.json` in the state directory, written atomically.
#[derive(Debug, Clone)]
pub struct HeldFile {
    path: PathBuf,
}

impl HeldFile {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join("vips.json"),
        }
    }

    pub fn load(&self) -> HeldAddresses {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|error| {
                warn!(%error, path = %self.path.display(), "unreadable held-VIP record; ignoring it");
                HeldAddresses::default()
            }),
            Err(_) => HeldAddresses::default(),
        }
    }

    pub fn save(&self, held: &HeldAddresses) -> std::io::Result<()> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let tmp = self.path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(held).unwrap_or_default())?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &self.path)
    }
}

/// Removes every address `vips.json` lists (agent start, and
/// `steward-agent release-vips` after the agent stopped). Returns how many
/// were removed.
pub async fn release_recorded(state_dir: &Path) -> Result<usize, NetError> {
    if HeldFile::new(state_dir).load().held.is_empty() {
        return Ok(0);
    }
    release_recorded_on(&HostNetwork::connect()?, state_dir).await
}

/// [`release_recorded`] on a given network.
pub async fn release_recorded_on(net: &impl Network, state_dir: &Path) -> Result<usize, NetError> {
    let file = HeldFile::new(state_dir);
    let held = file.load();
    let mut removed = 0;
    for h in &held.held {
        let target = h.target();
        if bounded("address lookup", net.has_address(&target))
            .await
            .unwrap_or(true)
        {
            bounded("address delete", net.remove_address(&target)).await?;
            removed += 1;
            info!(vip.name = %h.vip, address = %h.address, interface = %h.interface, "removed VIP held without a lease");
        }
    }
    if let Err(error) = file.save(&HeldAddresses::default()) {
        warn!(%error, "cannot clear the held-VIP record");
    }
    Ok(removed)
}

/// `call` with [`NETLINK_DEADLINE`]: the driver bounds every network call it
/// awaits itself, whatever the [`Network`] implementation does.
async fn bounded<T>(
    op: &'static str,
    call: impl std::future::Future<Output = Result<T, NetError>>,
) -> Result<T, NetError> {
    tokio::time::timeout(NETLINK_DEADLINE, call)
        .await
        .map_err(|_| NetError::Timeout {
            op,
            after: NETLINK_DEADLINE,
        })?
}

enum DriverEvent {
    Reply(LeaseReply),
    Probed {
        vip: String,
        epoch: u64,
        in_use: bool,
    },
    Checked {
        vip: String,
        ok: bool,
    },
}

struct Driver<N: Network> {
    node: NodeId,
    settings: VipSettings,
    holder: Holder,
    origin: Instant,
    net: Arc<N>,
    checks: BTreeMap<String, VipCheck>,
    targets: BTreeMap<String, Target>,
    health: BTreeMap<String, bool>,
    /// Checks under way, since when: one whose result was lost is started
    /// again after twice its timeout.
    checking: BTreeMap<String, Instant>,
    held_file: HeldFile,
    held: HeldAddresses,
    seq: u64,
    last_claims: Vec<Claim>,
    nonlocal_bind: bool,
    heartbeats: watch::Sender<Option<Arc<LeaseHeartbeat>>>,
    events: mpsc::Sender<DriverEvent>,
}

impl<N: Network> Driver<N> {
    fn new(
        node: NodeId,
        settings: VipSettings,
        net: Arc<N>,
        held_file: HeldFile,
        events: mpsc::Sender<DriverEvent>,
    ) -> Self {
        let (heartbeats, _) = watch::channel(None);
        Driver {
            holder: Holder::new(node.clone(), settings.lease),
            node,
            settings,
            origin: Instant::now(),
            net,
            checks: BTreeMap::new(),
            targets: BTreeMap::new(),
            health: BTreeMap::new(),
            checking: BTreeMap::new(),
            held_file,
            held: HeldAddresses::default(),
            seq: 0,
            last_claims: Vec::new(),
            nonlocal_bind: false,
            heartbeats,
            events,
        }
    }

    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    fn heartbeat(&mut self) {
        self.seq += 1;
        let claims = self.holder.claims();
        self.last_claims = claims.clone();
        let hb = LeaseHeartbeat {
            node: self.node.clone(),
            seq: self.seq,
            sent_at: self.now(),
            claims,
            health: self.health.iter().map(|(v, ok)| (v.clone(), *ok)).collect(),
            lease: self.settings.lease.lease,
            replicas: self.settings.lease.replicas as u32,
        };
        self.heartbeats.send_replace(Some(Arc::new(hb)));
    }

    /// Heartbeats at once when what we claim changed (a new epoch to get
    /// acked, a release to report): failover waits for no timer.
    fn heartbeat_if_claims_changed(&mut self) {
        if self.holder.claims() != self.last_claims {
            self.heartbeat();
        }
    }

    async fn on_event(&mut self, event: DriverEvent) {
        let now = self.now();
        let actions = match event {
            DriverEvent::Reply(reply) => {
                if !reply.assignments.is_empty() && !self.nonlocal_bind {
                    // Only once a VIP exists: a node without one keeps its
                    // kernel settings as they are.
                    match self.net.enable_nonlocal_bind() {
                        Ok(()) => info!("ip_nonlocal_bind enabled: HAProxy can bind VIPs this node does not hold"),
                        Err(error) => warn!(%error, "cannot enable ip_nonlocal_bind; HAProxy on the passive node may fail to bind the VIP"),
                    }
                    self.nonlocal_bind = true;
                }
                let mut actions = Vec::new();
                for assigned in reply.assignments {
                    let name = assigned.assignment.vip.clone();
                    self.checks.insert(name.clone(), assigned.check);
                    self.targets
                        .insert(name, assigned.assignment.target.clone());
                    actions.extend(self.holder.on_assignment(assigned.assignment, now));
                }
                if reply.seq != 0 {
                    crate::metrics::metrics()
                        .vip_lease_rtt
                        .observe(now.saturating_sub(reply.sent_at));
                    actions.extend(self.holder.on_ack(
                        &reply.replica,
                        reply.sent_at,
                        &reply.acked,
                        now,
                    ));
                }
                actions
            }
            DriverEvent::Probed { vip, epoch, in_use } => {
                if in_use {
                    warn!(vip.name = %vip, vip.epoch = epoch, "address in use by another host; not binding yet");
                }
                self.holder.on_probe_result(&vip, epoch, in_use, now)
            }
            DriverEvent::Checked { vip, ok } => {
                self.checking.remove(&vip);
                let previous = self.health.insert(vip.clone(), ok);
                if previous != Some(ok) {
                    info!(vip.name = %vip, healthy = ok, "local health check changed");
                    self.holder.set_health(&vip, ok, now)
                } else {
                    Vec::new()
                }
            }
        };
        self.carry_out(actions).await;
    }

    async fn carry_out(&mut self, actions: Vec<HolderAction>) {
        for action in actions {
            match action {
                HolderAction::Probe { vip, epoch, target } => {
                    let net = self.net.clone();
                    let events = self.events.clone();
                    let wait = self.settings.probe_wait;
                    tokio::spawn(async move {
                        let in_use = match probe(net.as_ref(), &target, wait).await {
                            Ok(in_use) => in_use,
                            Err(error) => {
                                warn!(%error, vip.name = %vip, "cannot probe; will retry");
                                true
                            }
                        };
                        let event = DriverEvent::Probed { vip, epoch, in_use };
                        if events.send_timeout(event, EVENT_DEADLINE).await.is_err() {
                            warn!("probe result dropped: the VIP driver took no event for {EVENT_DEADLINE:?}");
                        }
                    });
                }
                HolderAction::Bind { vip, target } => self.bind(&vip, &target).await,
                HolderAction::Unbind { vip, target, why } => self.unbind(&vip, &target, why).await,
                HolderAction::Announce { vip, target } => {
                    match bounded("interface lookup", self.net.resolve_interface(&target)).await {
                        Ok((interface, _)) => {
                            let announced = bounded(
                                "announcement",
                                self.net.announce(&interface, target.address),
                            )
                            .await;
                            if let Err(error) = announced {
                                warn!(%error, vip.name = %vip, "announcement failed");
                            } else {
                                debug!(vip.name = %vip, %interface, "announced");
                            }
                        }
                        Err(error) => warn!(%error, vip.name = %vip, "cannot announce"),
                    }
                }
            }
        }
        self.heartbeat_if_claims_changed();
    }

    async fn bind(&mut self, vip: &str, target: &Target) {
        let interface = match bounded("interface lookup", self.net.resolve_interface(target)).await
        {
            Ok((name, _)) => name,
            Err(error) => {
                warn!(%error, vip.name = %vip, "cannot bind: no interface");
                let now = self.now();
                let actions = self.holder.observe(vip, false, now);
                Box::pin(self.carry_out(actions)).await;
                return;
            }
        };
        let record = HeldAddress {
            vip: vip.to_owned(),
            address: target.address,
            prefix: target.prefix,
            interface: interface.clone(),
        };
        if !self.held.held.contains(&record) {
            self.held.held.push(record);
            // Recorded before bound: a crash right after binding still leaves
            // a record for release-vips and the next start.
            if let Err(error) = self.held_file.save(&self.held) {
                warn!(%error, "cannot record held VIP; binding anyway");
            }
        }
        match bounded("address add", self.net.add_address(target)).await {
            Ok(()) => {
                info!(vip.name = %vip, address = %target.address, %interface, "VIP bound");
                let m = crate::metrics::metrics();
                m.vip_binds.with(&[vip]).inc();
                m.vip_holding.with(&[vip]).set(1);
            }
            Err(error) => warn!(%error, vip.name = %vip, "cannot bind"),
        }
    }

    async fn unbind(&mut self, vip: &str, target: &Target, why: &str) {
        match bounded("address delete", self.net.remove_address(target)).await {
            Ok(()) => {
                info!(vip.name = %vip, address = %target.address, why, "VIP removed");
                let m = crate::metrics::metrics();
                m.vip_releases.with(&[vip]).inc();
                m.vip_holding.with(&[vip]).set(0);
            }
            Err(error) => warn!(%error, vip.name = %vip, why, "cannot remove VIP"),
        }
        let before = self.held.held.len();
        self.held.held.retain(|h| h.vip != vip);
        if self.held.held.len() != before {
            if let Err(error) = self.held_file.save(&self.held) {
                warn!(%error, "cannot update held-VIP record");
            }
        }
    }

    fn start_checks(&mut self) {
        let timeout = self.settings.check_interval.max(Duration::from_millis(200));
        for (vip, check) in &self.checks {
            let now = Instant::now();
            if self
                .checking
                .get(vip)
                .is_some_and(|since| now.duration_since(*since) < timeout * 2)
            {
                continue;
            }
            self.checking.insert(vip.clone(), now);
            let (vip, check) = (vip.clone(), check.clone());
            let socket = self.settings.haproxy_socket.clone();
            let events = self.events.clone();
            tokio::spawn(async move {
                let result = crate::health_check::run_check(&check, &socket, timeout).await;
                if let Err(reason) = &result {
                    debug!(vip.name = %vip, %reason, "health check failed");
                }
                let ok = result.is_ok();
                let event = DriverEvent::Checked { vip, ok };
                if events.send_timeout(event, EVENT_DEADLINE).await.is_err() {
                    warn!("health check result dropped: the VIP driver took no event for {EVENT_DEADLINE:?}");
                }
            });
        }
    }

    /// The lease state per VIP, for metrics (once per observe tick).
    fn export_lease_state(&self) {
        let m = crate::metrics::metrics();
        let view = self.holder.view(self.now());
        for v in &view {
            let bound = v.binding == steward_lease::Binding::Bound;
            m.vip_holding.with(&[&v.vip]).set(i64::from(bound));
            m.vip_acks.with(&[&v.vip]).set(v.fresh_acks as i64);
        }
        let known = |labels: &[String]| view.iter().any(|v| labels[0] == v.vip);
        m.vip_holding.retain(known);
        m.vip_acks.retain(known);
    }

    async fn observe(&mut self) {
        self.export_lease_state();
        let targets: Vec<(String, Target)> = self
            .targets
            .iter()
            .map(|(v, t)| (v.clone(), t.clone()))
            .collect();
        for (vip, target) in targets {
            match bounded("address lookup", self.net.has_address(&target)).await {
                Ok(present) => {
                    let now = self.now();
                    let actions = self.holder.observe(&vip, present, now);
                    self.carry_out(actions).await;
                }
                Err(error) => debug!(%error, vip.name = %vip, "cannot read addresses"),
            }
        }
    }

    /// A deadline of the holding rule passed (a lease lapsing, an
    /// announcement or a probe due).
    async fn on_deadline(&mut self) {
        let now = self.now();
        let actions = self.holder.tick(now);
        self.carry_out(actions).await;
    }

    /// When [`Driver::on_deadline`] must run next.
    fn next_deadline(&self) -> Option<Instant> {
        self.holder.next_deadline().map(|d| self.origin + d)
    }

    /// Lets go of everything and tells the replicas.
    async fn release_all(&mut self) {
        let now = self.now();
        let actions = self.holder.release_all(now);
        self.carry_out(actions).await;
        self.heartbeat();
    }
}

async fn probe(net: &impl Network, target: &Target, wait: Duration) -> Result<bool, NetError> {
    if bounded("address lookup", net.has_address(target)).await? {
        // Ours already (a restart's leftover we are entitled to again).
        return Ok(false);
    }
    let (interface, _) = bounded("interface lookup", net.resolve_interface(target)).await?;
    match tokio::time::timeout(
        wait + NETLINK_DEADLINE,
        net.probe(&interface, target.address, wait),
    )
    .await
    {
        Ok(answer) => answer,
        Err(_) => Err(NetError::Timeout {
            op: "probe",
            after: wait + NETLINK_DEADLINE,
        }),
    }
}

/// One lease stream to one replica, reconnecting with backoff until `stop`.
async fn lease_stream(
    url: String,
    creds: Credentials,
    mut heartbeats: watch::Receiver<Option<Arc<LeaseHeartbeat>>>,
    events: mpsc::Sender<DriverEvent>,
    silence: Duration,
    stop: CancellationToken,
) {
    // Short: a replica that restarted waits for its holders only so long
    // (`LeaseParams::restart_grace`), and a refused connection costs little.
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(500));
    loop {
        let started = Instant::now();
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            r = one_lease_stream(&url, &creds, &mut heartbeats, &events, silence) => r,
        };
        if let Err(error) = result {
            warn!(%error, "lease stream down; reconnecting");
        }
        if started.elapsed() > Duration::from_secs(10) {
            backoff.reset();
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

async fn one_lease_stream(
    url: &str,
    creds: &Credentials,
    heartbeats: &mut watch::Receiver<Option<Arc<LeaseHeartbeat>>>,
    events: &mpsc::Sender<DriverEvent>,
    silence: Duration,
) -> Result<(), String> {
    let dialed = creds.dial(url).await?;
    let mut revocations = creds.revocations();
    let mut client = AgentServiceClient::new(dialed.channel);
    let first = loop {
        if let Some(hb) = heartbeats.borrow_and_update().clone() {
            break hb;
        }
        tokio::time::timeout(silence, heartbeats.changed())
            .await
            .map_err(|_| format!("the VIP driver made no heartbeat in {silence:?}"))?
            .map_err(|_| "agent stopping".to_owned())?;
    };
    let (tx, rx) = mpsc::channel::<pb::LeaseHeartbeat>(4);
    // The receiver is alive (held by `rx` below), so this cannot fail.
    let _ = tx.try_send((*first).clone().into());
    let mut inbound = tokio::time::timeout(OPEN_DEADLINE, client.lease(ReceiverStream::new(rx)))
        .await
        .map_err(|_| format!("{url} did not answer the lease request in {OPEN_DEADLINE:?}"))?
        .map_err(|s| format!("{url} refused the lease stream: {}", s.message()))?
        .into_inner();
    info!("lease stream open");
    // Counted from the last reply, not from the last heartbeat sent: a
    // stream whose peer went away (a partition, a host taken off the wire)
    // must be given up, or it stays "open" until TCP's retransmission
    // backoff ends it, seconds after the network healed.
    let mut silent_after = tokio::time::Instant::now() + silence;
    loop {
        tokio::select! {
            changed = heartbeats.changed() => {
                changed.map_err(|_| "agent stopping".to_owned())?;
                if let Some(hb) = heartbeats.borrow_and_update().clone() {
                    // A heartbeat that cannot go out now is worthless later.
                    let _ = tx.try_send((*hb).clone().into());
                }
            }
            _ = tokio::time::sleep_until(silent_after) => {
                return Err(format!("no reply from {url} for {silence:?}"));
            }
            // A revocation arrived: end the stream if it covers this replica.
            Ok(()) = revocations.changed() => {
                if let Some(refusal) = creds.refusal(&dialed.replica) {
                    crate::metrics::metrics().replicas_refused.inc();
                    return Err(format!("{url}: {refusal}"));
                }
            }
            message = inbound.message() => {
                silent_after = tokio::time::Instant::now() + silence;
                let message = message
                    .map_err(|s| format!("{url}: {}", s.message()))?
                    .ok_or_else(|| format!("{url} closed the lease stream"))?;
                let reply = LeaseReply::try_from(message)
                    .map_err(|e| format!("invalid reply from {url}: {e}"))?;
                // Bounded: a stream blocked here would stop reading its
                // replica. The replica repeats our assignments when the
                // stream opens again, so nothing is lost by reconnecting.
                events
                    .send_timeout(DriverEvent::Reply(reply), EVENT_DEADLINE)
                    .await
                    .map_err(|e| match e {
                        mpsc::error::SendTimeoutError::Timeout(_) => format!(
                            "the VIP driver took no reply for {EVENT_DEADLINE:?}"
                        ),
                        mpsc::error::SendTimeoutError::Closed(_) => "agent stopping".to_owned(),
                    })?;
            }
        }
    }
}

/// Runs the VIP side of the agent until `shutdown`: idle while the node has
/// no lb role, a candidate of every VIP it is told about while it has.
pub async fn run_vips(
    settings: Settings,
    creds: Credentials,
    mut desired: watch::Receiver<RecordedState>,
    beat: Beat,
    shutdown: CancellationToken,
) -> Result<(), NetError> {
    match release_recorded(&settings.state_dir).await {
        Ok(0) => {}
        Ok(n) => info!(removed = n, "removed VIPs left from a previous run"),
        Err(error) => warn!(%error, "cannot remove VIPs left from a previous run"),
    }
    let vip = settings.vip.clone();
    let (events_tx, mut events_rx) = mpsc::channel(64);
    let mut driver = Driver::new(
        settings.node_id.clone(),
        vip.clone(),
        Arc::new(HostNetwork::connect()?),
        HeldFile::new(&settings.state_dir),
        events_tx.clone(),
    );
    let mut streams: Option<CancellationToken> = None;
    let mut hb_tick = tokio::time::interval(vip.lease.heartbeat);
    let mut check_tick = tokio::time::interval(vip.check_interval);
    let mut observe_tick = tokio::time::interval(OBSERVE_INTERVAL);
    let mut keepalive = tokio::time::interval(KEEPALIVE);
    for tick in [
        &mut hb_tick,
        &mut check_tick,
        &mut observe_tick,
        &mut keepalive,
    ] {
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    // Replies slower than this mean the stream is dead: reconnect.
    let silence = (vip.lease.lease * 3).max(Duration::from_secs(2));
    loop {
        beat.beat();
        let candidate = desired.borrow().desired.roles.contains(&Role::Lb);
        match (candidate, &streams) {
            (true, None) => {
                info!(
                    replicas = settings.coordinators.len(),
                    "lb role: VIP candidate, streaming to every replica"
                );
                let stop = CancellationToken::new();
                driver.heartbeat();
                for url in &settings.coordinators {
                    tokio::spawn(
                        lease_stream(
                            url.clone(),
                            creds.clone(),
                            driver.heartbeats.subscribe(),
                            events_tx.clone(),
                            silence,
                            stop.clone(),
                        )
                        .instrument(tracing::info_span!("lease", coordinator = %url)),
                    );
                }
                streams = Some(stop);
            }
            (false, Some(stop)) => {
                info!("lb role removed: releasing VIPs");
                driver.release_all().await;
                tokio::time::sleep(FAREWELL).await;
                stop.cancel();
                streams = None;
                driver.holder = Holder::new(driver.node.clone(), vip.lease);
                driver.checks.clear();
                driver.targets.clear();
                driver.health.clear();
                driver.export_lease_state();
            }
            _ => {}
        }
        let deadline = driver.next_deadline();
        tokio::select! {
            _ = keepalive.tick() => {}
            _ = shutdown.cancelled() => {
                if streams.is_some() {
                    driver.release_all().await;
                    tokio::time::sleep(FAREWELL).await;
                }
                if let Some(stop) = streams.take() {
                    stop.cancel();
                }
                return Ok(());
            }
            changed = desired.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
            }
            _ = hb_tick.tick(), if streams.is_some() => driver.heartbeat(),
            _ = check_tick.tick(), if streams.is_some() => driver.start_checks(),
            _ = observe_tick.tick(), if streams.is_some() => driver.observe().await,
            _ = sleep_until(deadline) => driver.on_deadline().await,
            Some(event) = events_rx.recv() => driver.on_event(event).await,
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use steward_lease::messages::AssignedVip;
    use steward_lease::{Assignment, Binding, LeaseParams};

    use super::*;
    use crate::network::fake::{FakeNetwork, Op, Script};

    const VIP: &str = "front";
    const PROBE_WAIT: Duration = Duration::from_millis(100);

    fn address() -> IpAddr {
        "198.18.0.100".parse().expect("address")
    }

    fn node(id: &str) -> NodeId {
        NodeId::new(id).expect("node id")
    }

    struct Rig {
        driver: Driver<FakeNetwork>,
        net: FakeNetwork,
        events: mpsc::Receiver<DriverEvent>,
        state_dir: tempfile::TempDir,
    }

    fn rig() -> Rig {
        let net = FakeNetwork::default();
        let state_dir = tempfile::tempdir().expect("temp dir");
        let (events_tx, events) = mpsc::channel(64);
        let settings = VipSettings {
            lease: LeaseParams::DEFAULT,
            probe_wait: PROBE_WAIT,
            check_interval: Duration::from_secs(1),
            haproxy_socket: state_dir.path().join("haproxy.sock"),
        };
        let driver = Driver::new(
            node("lb-1"),
            settings,
            Arc::new(net.clone()),
            HeldFile::new(state_dir.path()),
            events_tx,
        );
        Rig {
            driver,
            net,
            events,
            state_dir,
        }
    }

    fn assignment(epoch: u64, owner: &str) -> LeaseReply {
        LeaseReply {
            replica: "r1".into(),
            seq: 0,
            sent_at: Duration::ZERO,
            acked: Vec::new(),
            assignments: vec![AssignedVip {
                assignment: Assignment {
                    vip: VIP.into(),
                    epoch,
                    owner: Some(node(owner)),
                    target: Target {
                        address: address(),
                        prefix: 24,
                        interface: None,
                    },
                    release_requested: false,
                },
                check: VipCheck::None,
            }],
        }
    }

    impl Rig {
        /// Two of three replicas ack `epoch` for a heartbeat sent now.
        async fn quorum_acks(&mut self, epoch: u64) {
            for replica in ["r1", "r2"] {
                let reply = LeaseReply {
                    replica: replica.into(),
                    seq: 1,
                    sent_at: self.driver.now(),
                    acked: vec![(VIP.into(), epoch)],
                    assignments: Vec::new(),
                };
                self.driver.on_event(DriverEvent::Reply(reply)).await;
            }
        }

        /// The driver's loop, without the lease streams and health checks,
        /// for `duration`: events, observation, the holding rule's
        /// deadlines, and (with `acks`) a quorum
        /// of acks for `epoch` every heartbeat.
        async fn run_for(&mut self, duration: Duration, acks: Option<u64>) {
            let end = Instant::now() + duration;
            let mut heartbeat = tokio::time::interval(self.driver.settings.lease.heartbeat);
            let mut observe = tokio::time::interval(OBSERVE_INTERVAL);
            loop {
                let deadline = self.driver.next_deadline();
                tokio::select! {
                    _ = tokio::time::sleep_until(end) => return,
                    _ = heartbeat.tick(), if acks.is_some() => {
                        self.quorum_acks(acks.unwrap_or_default()).await;
                    }
                    _ = observe.tick() => self.driver.observe().await,
                    _ = sleep_until(deadline) => self.driver.on_deadline().await,
                    Some(event) = self.events.recv() => self.driver.on_event(event).await,
                }
            }
        }

        /// Assigns the VIP to this node, acks it and lets the probe run.
        async fn bind(&mut self, epoch: u64) {
            self.driver
                .on_event(DriverEvent::Reply(assignment(epoch, "lb-1")))
                .await;
            self.quorum_acks(epoch).await;
            let probed = self.events.recv().await.expect("a probe result");
            assert!(matches!(probed, DriverEvent::Probed { .. }));
            self.driver.on_event(probed).await;
        }

        fn binding(&self) -> Binding {
            self.driver.holder.binding(VIP)
        }
    }

    /// Fails a test whose driver awaits without a deadline, instead of
    /// hanging it (paused time runs on to the deadline at once).
    async fn within<T>(limit: Duration, test: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(limit, test)
            .await
            .expect("the VIP driver is stuck in an await")
    }

    #[tokio::test(start_paused = true)]
    async fn binds_records_and_announces_on_a_granted_lease() {
        let mut rig = rig();
        rig.bind(7).await;
        assert_eq!(rig.binding(), Binding::Bound);
        assert!(rig.net.holds(address()));
        assert_eq!(rig.net.calls(Op::Probe).len(), 1);
        assert_eq!(rig.net.calls(Op::Add).len(), 1);
        assert_eq!(rig.net.calls(Op::Announce).len(), 1);
        assert_eq!(rig.net.calls(Op::NonlocalBind).len(), 1);
        let held = HeldFile::new(rig.state_dir.path()).load();
        assert_eq!(held.held.len(), 1, "{held:?}");
        assert_eq!(held.held[0].address, address());
        assert_eq!(held.held[0].interface, FakeNetwork::INTERFACE);
        let claims = rig.driver.holder.claims();
        assert_eq!(claims.len(), 1);
        assert_eq!(claims[0].epoch, 7);
    }

    #[tokio::test(start_paused = true)]
    async fn no_bind_without_a_quorum_of_acks() {
        let mut rig = rig();
        rig.driver
            .on_event(DriverEvent::Reply(assignment(7, "lb-1")))
            .await;
        let reply = LeaseReply {
            replica: "r1".into(),
            seq: 1,
            sent_at: rig.driver.now(),
            acked: vec![(VIP.into(), 7)],
            assignments: Vec::new(),
        };
        rig.driver.on_event(DriverEvent::Reply(reply)).await;
        rig.run_for(Duration::from_secs(2), None).await;
        assert!(rig.net.calls(Op::Probe).is_empty());
        assert!(rig.net.calls(Op::Add).is_empty());
        assert!(!rig.net.holds(address()));
    }

    #[tokio::test(start_paused = true)]
    async fn drops_when_the_lease_runs_out_even_if_adding_hangs() {
        within(Duration::from_secs(10), async {
            let mut rig = rig();
            // The kernel adds the address but its answer is lost.
            rig.net.script(Op::Add, Script::LoseReply);
            let acked_at = Instant::now();
            rig.driver
                .on_event(DriverEvent::Reply(assignment(7, "lb-1")))
                .await;
            rig.quorum_acks(7).await;
            let probed = rig.events.recv().await.expect("a probe result");
            let before = Instant::now();
            rig.driver.on_event(probed).await;
            // The hanging add cost the driver its deadline, no more.
            assert!(
                before.elapsed() <= NETLINK_DEADLINE + Duration::from_millis(10),
                "the bind took {:?}",
                before.elapsed()
            );
            assert_eq!(rig.net.calls(Op::Add).len(), 1);
            // No more acks: the holding rule drops the address when the
            // quorum's window closes.
            rig.run_for(Duration::from_secs(2), None).await;
            let removes = rig.net.calls(Op::Remove);
            assert_eq!(removes.len(), 1, "{removes:?}");
            let dropped_after = removes[0].at - acked_at;
            let window = LeaseParams::DEFAULT.hold_window();
            assert!(
                dropped_after >= window && dropped_after <= window + Duration::from_millis(10),
                "dropped {dropped_after:?} after the acks; the window is {window:?}"
            );
            assert_eq!(rig.binding(), Binding::Unbound);
            assert!(!rig.net.holds(address()));
            assert!(HeldFile::new(rig.state_dir.path()).load().held.is_empty());
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn drops_at_once_when_the_lease_is_revoked() {
        within(Duration::from_secs(10), async {
            let mut rig = rig();
            rig.bind(7).await;
            assert!(rig.net.holds(address()));
            // The replicas give the VIP to lb-2 under a newer epoch; even a
            // hanging announcement cannot delay the drop.
            rig.net.script(Op::Announce, Script::Hang);
            let revoked_at = Instant::now();
            rig.driver
                .on_event(DriverEvent::Reply(assignment(9, "lb-2")))
                .await;
            assert!(!rig.net.holds(address()));
            let removes = rig.net.calls(Op::Remove);
            assert_eq!(removes.len(), 1);
            assert_eq!(removes[0].at, revoked_at);
            assert_eq!(rig.binding(), Binding::Unbound);
            assert!(rig.driver.holder.claims().is_empty());
            // Acks for the old epoch no longer entitle us to anything.
            rig.run_for(Duration::from_secs(2), Some(7)).await;
            assert_eq!(rig.net.calls(Op::Add).len(), 1);
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_remove_does_not_stop_the_driver() {
        within(Duration::from_secs(10), async {
            let mut rig = rig();
            rig.bind(7).await;
            rig.net.script(Op::Remove, Script::Hang);
            let before = Instant::now();
            rig.driver
                .on_event(DriverEvent::Reply(assignment(9, "lb-2")))
                .await;
            assert!(before.elapsed() <= NETLINK_DEADLINE + Duration::from_millis(10));
            assert_eq!(rig.binding(), Binding::Unbound);
            // The next observation finds the address still there and
            // removes it again once removal works.
            rig.net.clear_script(Op::Remove);
            rig.driver.observe().await;
            assert!(!rig.net.holds(address()));
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn refuses_to_bind_while_another_host_answers_for_the_address() {
        let mut rig = rig();
        rig.net.state().taken.insert(address());
        rig.bind(7).await;
        assert_eq!(rig.binding(), Binding::Unbound);
        assert!(rig.net.calls(Op::Add).is_empty());
        // It keeps probing while entitled, and binds once the other host
        // is gone.
        rig.run_for(Duration::from_secs(1), Some(7)).await;
        assert!(rig.net.calls(Op::Probe).len() >= 2);
        assert!(rig.net.calls(Op::Add).is_empty());
        rig.net.state().taken.clear();
        rig.run_for(Duration::from_secs(1), Some(7)).await;
        assert_eq!(rig.binding(), Binding::Bound);
        assert!(rig.net.holds(address()));
    }

    #[tokio::test(start_paused = true)]
    async fn re_announces_while_holding() {
        let mut rig = rig();
        rig.bind(7).await;
        let bound_at = Instant::now();
        rig.run_for(Duration::from_secs(6), Some(7)).await;
        assert_eq!(rig.binding(), Binding::Bound);
        let announced: Vec<Duration> = rig
            .net
            .calls(Op::Announce)
            .iter()
            .map(|c| c.at - bound_at)
            .collect();
        // Once on binding, then four repeats a second apart.
        assert_eq!(
            announced,
            [0, 1, 2, 3, 4].map(Duration::from_secs).to_vec(),
            "{announced:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_add_is_retried_by_observation() {
        let mut rig = rig();
        rig.net.script(Op::Add, Script::Fail);
        rig.bind(7).await;
        assert!(!rig.net.holds(address()));
        rig.net.clear_script(Op::Add);
        rig.run_for(Duration::from_secs(2), Some(7)).await;
        assert!(rig.net.holds(address()));
        assert_eq!(rig.binding(), Binding::Bound);
    }

    #[tokio::test(start_paused = true)]
    async fn release_recorded_removes_what_vips_json_lists() {
        let rig = rig();
        let file = HeldFile::new(rig.state_dir.path());
        let held = HeldAddress {
            vip: VIP.into(),
            address: address(),
            prefix: 24,
            interface: FakeNetwork::INTERFACE.into(),
        };
        file.save(&HeldAddresses { held: vec![held] })
            .expect("save");
        rig.net
            .state()
            .addresses
            .insert(address(), FakeNetwork::INTERFACE.into());
        let removed = release_recorded_on(&rig.net, rig.state_dir.path())
            .await
            .expect("release");
        assert_eq!(removed, 1);
        assert!(!rig.net.holds(address()));
        assert!(file.load().held.is_empty());
    }
}
