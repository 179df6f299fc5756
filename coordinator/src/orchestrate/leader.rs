//! The leader's side of orchestration: pick the `kubeadm init` node and
//! make the cluster secrets once, renew them when a join needs them, and
//! keep each Gluster volume's brick placement. Every write is fenced on the
//! leader epoch and on the record's own revision.

use std::sync::Arc;
use std::time::Duration;

use steward_proto::converge::ClusterView;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::gluster;
use super::kubernetes::{self, Bootstrap, Progress, Secret};
use super::secrets::SecretBox;
use super::state::OrchestrationSnapshot;
use crate::cache::SpecSnapshot;
use crate::error::{Error, Result};
use crate::replica::{Fence, Leadership};
use crate::store::{encode, unix_ms, Store};
use crate::vip::VipSnapshot;

/// How often secret lifetimes are looked at without any other change.
const RECHECK: Duration = Duration::from_secs(5);

pub struct OrchestratorInputs {
    pub leadership: watch::Receiver<Leadership>,
    pub specs: watch::Receiver<Arc<SpecSnapshot>>,
    pub vips: watch::Receiver<Arc<VipSnapshot>>,
    pub orchestration: watch::Receiver<Arc<OrchestrationSnapshot>>,
}

/// Runs until `shutdown`; acts only while this replica leads.
pub async fn run_orchestrator(
    store: Store,
    mut inputs: OrchestratorInputs,
    sealer: Option<Arc<SecretBox>>,
    shutdown: CancellationToken,
) {
    loop {
        let leadership = inputs.leadership.borrow_and_update().clone();
        if let Leadership::Leader(fence) = leadership {
            let specs = inputs.specs.borrow_and_update().clone();
            let vips = inputs.vips.borrow_and_update().clone();
            let orch = inputs.orchestration.borrow_and_update().clone();
            if specs.synced && vips.synced && orch.synced {
                let view = cluster_view(&specs, &vips);
                let duties = [
                    kubernetes_duty(&store, &fence, &view, &orch, sealer.as_deref()).await,
                    gluster_duty(&store, &fence, &view, &orch, &specs.zones()).await,
                ];
                for duty in duties {
                    if let Err(error) = duty {
                        warn!(%error, "orchestration failed; retrying");
                    }
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = inputs.leadership.changed() => if r.is_err() { return },
            r = inputs.specs.changed() => if r.is_err() { return },
            r = inputs.vips.changed() => if r.is_err() { return },
            r = inputs.orchestration.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(RECHECK) => {}
        }
    }
}

/// The whole cluster view, which the leader orchestrates from.
pub fn cluster_view(specs: &SpecSnapshot, vips: &VipSnapshot) -> ClusterView {
    specs.full_view(vips)
}

/// Puts `value` at `key` while this replica leads and nobody else wrote the
/// key since `expected_rev` (0: the key must not exist); whether it did.
async fn fenced_put_if(
    store: &Store,
    fence: &Fence,
    key: String,
    expected_rev: i64,
    value: Vec<u8>,
) -> Result<bool> {
    let inner = Store::put_if_txn(key, expected_rev, value);
    Ok(fence.txn(store, inner).await?.succeeded)
}

async fn kubernetes_duty(
    store: &Store,
    fence: &Fence,
    view: &ClusterView,
    orch: &OrchestrationSnapshot,
    sealer: Option<&SecretBox>,
) -> Result<()> {
    if view.settings.kubernetes.is_none() || kubernetes::endpoint(view).is_none() {
        return Ok(());
    }
    let key = store.keys().kubernetes_bootstrap();
    let current_rev = orch.bootstrap.as_ref().map(|b| b.mod_revision).unwrap_or(0);
    let Some(sealer) = sealer else {
        if orch.bootstrap.is_none() {
            warn!("Kubernetes needs cluster secrets: set [secrets] key_file on every replica");
        }
        return Ok(());
    };
    let joined = orch.joined_set();
    let mut boot = orch.open_bootstrap(Some(sealer));
    let now = unix_ms();
    // The chosen init node lost its role before it ran init: choose again.
    if let Some(b) = &boot {
        let still_cp = view
            .with_role(steward_proto::domain::Role::K8sControlPlane)
            .any(|m| m.node == b.init_node);
        if !still_cp && !joined.contains(&b.init_node) {
            info!(node.id = %b.init_node, "init node lost its control-plane role before init; choosing again");
            boot = None;
        }
    }
    let next = match boot {
        None => {
            let Some(init) = kubernetes::pick_init_node(view) else {
                return Ok(());
            };
            info!(node.id = %init, "picked for kubeadm init; made the cluster CA, token and certificate key");
            Bootstrap::generate(init, now).map_err(Error::SecretGeneration)?
        }
        Some(mut b) => {
            let drained = orch.drained_set();
            let progress = Progress {
                bootstrap: Some(&b),
                joined: &joined,
                drained: &drained,
                maintenance: &kubernetes::NO_NODES,
                cordoned: &kubernetes::NO_NODES,
            };
            let (token, certificate_key) = kubernetes::renewals_due(view, progress, now);
            if !token && !certificate_key {
                return Ok(());
            }
            if token {
                b.token = renewed(&b.token, kubernetes::new_token, now)?;
                info!(
                    generation = b.token.generation,
                    "renewed the kubeadm join token"
                );
            }
            if certificate_key {
                b.certificate_key =
                    renewed(&b.certificate_key, kubernetes::new_certificate_key, now)?;
                info!(
                    generation = b.certificate_key.generation,
                    "renewed the kubeadm certificate key"
                );
            }
            b
        }
    };
    let record = next.seal(sealer).map_err(secret_error)?;
    if !fenced_put_if(store, fence, key, current_rev, encode(&record)).await? {
        // Someone else wrote first (or we lost leadership): the watch will
        // show us, and the next round decides again.
        info!("Kubernetes bootstrap record changed underneath; will look again");
    }
    Ok(())
}

/// The next generation of `old`, made now.
fn renewed(
    old: &Secret,
    make: fn() -> std::result::Result<String, super::secrets::SecretError>,
    now: u64,
) -> Result<Secret> {
    Ok(Secret {
        value: make().map_err(secret_error)?,
        created_unix_ms: now,
        generation: old.generation + 1,
    })
}

fn secret_error(e: super::secrets::SecretError) -> Error {
    Error::SecretGeneration(e.to_string())
}

async fn gluster_duty(
    store: &Store,
    fence: &Fence,
    view: &ClusterView,
    orch: &OrchestrationSnapshot,
    zones: &std::collections::BTreeMap<steward_proto::domain::NodeId, String>,
) -> Result<()> {
    for volume in &view.settings.gluster_volumes {
        let current = orch.volumes.get(&volume.name);
        let Some(next) = gluster::next_record(volume, view, current.map(|c| &c.value), zones)
        else {
            continue;
        };
        if current.map(|c| &c.value) == Some(&next) {
            continue;
        }
        let bricks: Vec<&str> = next.bricks.iter().map(|b| b.node.as_str()).collect();
        info!(volume = %volume.name, ?bricks, "gluster brick placement");
        let rev = current.map(|c| c.mod_revision).unwrap_or(0);
        fenced_put_if(
            store,
            fence,
            store.keys().gluster_volume(&volume.name),
            rev,
            encode(&next),
        )
        .await?;
    }
    Ok(())
}
