//! Fixtures for unit tests of the middle layer (sessions, lease streams,
//! admin and bootstrap calls, placement, the leader's duties): replicas on
//! the in-memory store, with their real watch caches following it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use steward_lease::LeaseParams;
use steward_proto::domain::{Facts, Health, NodeHealth, NodeId, NodeSpec, Role};
use steward_proto::vip::{VipCheck, VipSpec};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::agent_service::SessionContext;
use crate::cache::{self, SpecSnapshot};
use crate::orchestrate::state::OrchestrationSnapshot;
use crate::pki::{Identity, IdentityKind};
use crate::replica::Fence;
use crate::store::kv::{Op, Txn};
use crate::store::{encode, Keys, MemberRecord, MemoryBackend, NodeStatusRecord, Store};
use crate::vip::lease_api::LeaseHub;
use crate::vip::VipSnapshot;

/// How long a test waits for a condition before it fails.
pub const DEADLINE: Duration = Duration::from_secs(3);

pub fn node(id: &str) -> NodeId {
    NodeId::new(id).expect("a valid node id")
}

/// The identity of a certificate issued a second ago.
pub fn identity(name: &str, kind: IdentityKind) -> Identity {
    Identity {
        name: name.to_owned(),
        kind,
        issued_unix_s: i64::try_from(crate::store::unix_ms() / 1000).unwrap_or(0) - 1,
    }
}

/// Polls `check` until it gives a value, failing the test after
/// [`DEADLINE`].
pub async fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// [`eventually`] for conditions that read the store.
pub async fn eventually_async<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// One replica of cluster `test` on a shared in-memory store: its caches
/// run until the fixture is dropped.
pub struct TestReplica {
    pub ctx: SessionContext,
    pub memory: Arc<MemoryBackend>,
    pub lease: i64,
    tasks: CancellationToken,
}

impl TestReplica {
    /// A replica `id` on `memory`, registered as a member, with its caches
    /// synced.
    pub async fn start(memory: Arc<MemoryBackend>, id: &str) -> Self {
        let keys = Keys::new("test");
        let store = Store::in_memory(memory.clone(), keys.clone(), id.to_owned());
        let tasks = CancellationToken::new();
        let (specs_tx, specs) = watch::channel(Arc::new(SpecSnapshot::default()));
        let (vips_tx, vips) = watch::channel(Arc::new(VipSnapshot::default()));
        let (orch_tx, orchestration) = watch::channel(Arc::new(OrchestrationSnapshot::default()));
        let (cut_tx, cut) = watch::channel(Arc::new(cache::Cut::default()));
        let (seen_tx, specs_seen) = watch::channel(0);
        let senders = cache::CutSenders {
            cut: cut_tx,
            specs: specs_tx,
            vips: vips_tx,
            orchestration: orch_tx,
        };
        tokio::spawn(cache::run_caches(
            store.clone(),
            senders,
            seen_tx,
            tasks.clone(),
        ));
        let lease = store
            .grant_lease(Duration::from_secs(10))
            .await
            .expect("lease");
        let member = MemberRecord {
            id: id.to_owned(),
            address: format!("https://{id}.invalid:7400"),
            version: "test".into(),
            started_unix_ms: crate::store::unix_ms(),
            bootstrap: Some(format!("https://{id}.invalid:7401")),
        };
        store.register_member(&member, lease).await.expect("member");
        let ctx = SessionContext {
            store,
            sessions: Default::default(),
            specs,
            specs_seen,
            cut,
            vips,
            orchestration,
            sealer: None,
            lease: LeaseHub::new(id.to_owned(), LeaseParams::DEFAULT),
            unreachable_after: Duration::from_secs(5),
            shutdown: CancellationToken::new(),
            cluster: "test".into(),
            logs: Default::default(),
            views: Default::default(),
            admission: std::sync::Arc::new(crate::agent_service::Admission::new(
                &Default::default(),
            )),
            status_writes: std::sync::Arc::new(tokio::sync::Semaphore::new(
                crate::config::SessionLimits::default().max_concurrent_status_writes,
            )),
            limits: Default::default(),
            fanout: Default::default(),
        };
        tokio::spawn(crate::fanout::run(ctx.clone()));
        let replica = Self {
            ctx,
            memory,
            lease,
            tasks,
        };
        let ctx = &replica.ctx;
        eventually("the caches to sync", || {
            (ctx.specs.borrow().synced
                && ctx.vips.borrow().synced
                && ctx.orchestration.borrow().synced)
                .then_some(())
        })
        .await;
        replica
    }

    pub fn store(&self) -> &Store {
        &self.ctx.store
    }

    /// Makes this replica the leader; its fence.
    pub async fn lead(&self) -> Fence {
        let key = self.store().campaign(self.lease).await.expect("elected");
        Fence {
            epoch: key.revision,
            leader_key: key.key,
        }
    }
}

impl Drop for TestReplica {
    fn drop(&mut self) {
        self.tasks.cancel();
        self.ctx.shutdown.cancel();
    }
}

/// Writes node `id`'s spec with `roles`, as `stewardctl role add` would.
pub async fn put_roles(store: &Store, id: &str, roles: &[Role]) {
    let spec = NodeSpec {
        roles: roles.iter().copied().collect(),
        ..Default::default()
    };
    let key = store.keys().node_spec(&node(id));
    store
        .txn(Txn::new().and_then([Op::put(key, encode(&spec))]), "test")
        .await
        .expect("spec written");
}

/// The status of a healthy node a session of replica `c-1` serves.
pub fn connected_status() -> NodeStatusRecord {
    NodeStatusRecord {
        health: NodeHealth::Healthy,
        last_health: Health::default(),
        replica: Some("c-1".into()),
        last_seen_unix_ms: 1,
        applied_revision: 0,
        agent_version: "test".into(),
    }
}

/// Node `id` as a session of replica `c-1` leaves it: connected there
/// (its status), with `facts` (and the reboot-required marker they imply).
pub async fn put_connected(store: &Store, id: &str, facts: &Facts) {
    let status = connected_status();
    let node = node(id);
    let rev = store
        .node(&node)
        .await
        .expect("node read")
        .status
        .map_or(0, |s| s.mod_revision);
    store
        .put_status_if(&node, rev, &status)
        .await
        .expect("status written");
    let marker = store
        .node(&node)
        .await
        .expect("node read")
        .reboot_required
        .map(|m| m.value);
    store
        .put_facts(&node, facts, marker.as_ref())
        .await
        .expect("facts written");
}

/// A VIP `name` at `address` for every lb node, with no health check.
pub fn vip_spec(name: &str, address: &str) -> VipSpec {
    VipSpec {
        name: name.into(),
        address: address.into(),
        interface: None,
        check: VipCheck::None,
        candidates: Vec::new(),
        priority: Default::default(),
        preempt: false,
    }
}

/// Defines `spec` as `stewardctl vip set` would (without its checks).
pub async fn put_vip(store: &Store, spec: &VipSpec) {
    store
        .txn(Txn::new().and_then(store.vip_set_ops(spec)), "test")
        .await
        .expect("VIP written");
}

/// Revokes the `kind` certificates of `name` as `by`, and waits until this
/// replica's cache has a certificate revocation; the snapshot then.
pub async fn revoke_certificate(
    replica: &TestReplica,
    kind: steward_proto::domain::RevocableKind,
    name: &str,
    by: &str,
) -> Arc<SpecSnapshot> {
    let name = steward_proto::domain::CertName::new(name).expect("name");
    replica
        .store()
        .revoke_certificate(kind, &name, by)
        .await
        .expect("revoked");
    eventually("the revocation in the cache", || {
        let specs = replica.ctx.specs.borrow().clone();
        (!specs.cert_revoked.is_empty()).then_some(specs)
    })
    .await
}
