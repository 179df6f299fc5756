//! The IO of `stewardctl apply`: read the cluster (the replica's spec
//! cache, caught up with etcd, and per node the status and facts of the
//! nodes the checks look at; never a record of every node), [`plan`] the
//! spec against it, write the plan in one transaction.
//!
//! Any replica serves it, like every admin write: the writes are the admin
//! API's own (node specs as `stewardctl role` writes them, VIPs through
//! `Store::vip_set_ops` and `Store::vip_removal_ops`), guarded on the
//! mod revision of every key written. When one of them changed since it
//! was read, the whole spec is read, checked and planned again.

use steward_proto::converge::ClusterSettings;
use steward_proto::domain::{EventKind, NodeId};
use tracing::{debug, info};

use super::plan::{self, Current, Plan};
use crate::admin_service::record_roles_changed;
use crate::agent_service::SessionContext;
use crate::error::{Error, Result};
use crate::rollout::model::RolloutOptions;
use crate::store::kv::{Cmp, Op, Txn};
use crate::store::{encode, Store};

/// etcd's default `--max-txn-ops`: the most compares, and the most writes,
/// one transaction may have.
pub const MAX_TXN_OPS: usize = 128;

/// How many times a spec is planned again after a concurrent change.
const ATTEMPTS: usize = 8;

/// What `Apply` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// One line per change; empty when the cluster matched the spec.
    pub changes: Vec<String>,
    /// False for a dry run.
    pub applied: bool,
    /// Failure-domain risks (`plan::Plan::warnings`).
    pub warnings: Vec<String>,
    /// The rollout created (`--rollout`), if one was.
    pub rollout: Option<String>,
}

/// Checks the spec `text` against the cluster and, unless `dry_run`,
/// writes what differs. An invalid spec is [`Error::InvalidSpec`] with
/// every problem, and nothing is written.
///
/// With `rollout`, a change of the cluster settings is not written for
/// every node at once: it becomes a rollout (`crate::rollout::create`),
/// which the leader applies node by node. Such a spec may change nothing
/// but the settings. A plain apply is refused while a rollout is active.
pub async fn apply(
    ctx: &SessionContext,
    text: &str,
    dry_run: bool,
    rollout: Option<RolloutOptions>,
    by: &str,
) -> Result<Outcome> {
    let spec = super::parse(text).map_err(Error::InvalidSpec)?;
    let store = &ctx.store;
    for _ in 0..ATTEMPTS {
        let current = read_current(ctx, &spec).await?;
        let plan = plan::plan(&spec, &current).map_err(Error::InvalidSpec)?;
        if rollout.is_some() {
            rollout_problems(&plan)?;
        } else {
            upgrade_problems(ctx, &plan, &current)?;
        }
        if dry_run || plan.is_empty() {
            return Ok(Outcome {
                changes: plan.changes,
                applied: !dry_run,
                warnings: plan.warnings,
                rollout: None,
            });
        }
        let active_revision = crate::rollout::ensure_none_active(store).await?;
        if let (Some(options), Some(settings)) = (rollout, &plan.settings) {
            let created = crate::rollout::create(
                ctx,
                &settings.settings,
                settings.expected_revision,
                settings.changes.clone(),
                options,
                by,
            )
            .await;
            match created {
                Ok(Some(id)) => {
                    return Ok(Outcome {
                        changes: plan.changes,
                        applied: true,
                        warnings: plan.warnings,
                        rollout: Some(id),
                    })
                }
                // No node consumes the change: written at once below.
                Ok(None) => {}
                Err(Error::Conflict { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        let specs = ctx.specs.borrow().clone();
        let targets = specs.targets_in_effect();
        let (mut compares, writes) = transaction(store, &plan, &current, &targets);
        compares.push(Cmp::mod_revision(
            store.keys().rollout_active(),
            active_revision,
        ));
        let ops = compares.len().max(writes.len());
        if ops > MAX_TXN_OPS {
            return Err(Error::SpecTooLarge {
                changes: plan.changes.len(),
                writes: ops,
                max: MAX_TXN_OPS,
            });
        }
        let outcome = store
            .txn(
                Txn::new().when(compares).and_then(writes),
                "apply cluster spec",
            )
            .await?;
        if !outcome.succeeded {
            debug!("the cluster changed while applying; planning again");
            continue;
        }
        for node in &plan.nodes {
            if node.before.roles != node.after.roles {
                record_roles_changed(store, &node.node, &node.before.roles, &node.after.roles)
                    .await;
            }
        }
        info!(changes = plan.changes.len(), "cluster spec applied");
        return Ok(Outcome {
            changes: plan.changes,
            applied: true,
            warnings: plan.warnings,
            rollout: None,
        });
    }
    Err(Error::Conflict {
        key: "the nodes, VIPs and settings of the cluster spec".into(),
    })
}

/// A plain apply may not change the version of a running Kubernetes
/// (a joined node): that is an upgrade, and it goes as a rollout.
fn upgrade_problems(ctx: &SessionContext, plan: &Plan, current: &Current) -> Result<()> {
    let version = |s: Option<&ClusterSettings>| {
        s.and_then(|s| s.kubernetes.as_ref())
            .map(|k| k.version.clone())
    };
    let from = version(current.settings.as_ref().map(|s| &s.value));
    let to = version(plan.settings.as_ref().map(|s| &s.settings));
    let running = !ctx.orchestration.borrow().joined.is_empty();
    match (from, to) {
        (Some(from), Some(to)) if from != to && running => {
            Err(Error::UpgradeNeedsRollout { from, to })
        }
        _ => Ok(()),
    }
}

/// A rollout changes the cluster settings only: node roles and labels
/// and VIPs are applied without one first.
fn rollout_problems(plan: &Plan) -> Result<()> {
    let others: Vec<&String> = plan
        .changes
        .iter()
        .filter(|c| c.starts_with("node ") || c.starts_with("vip "))
        .collect();
    if plan.settings.is_none() {
        return Err(Error::NothingToRollOut);
    }
    if !plan.nodes.is_empty() || !plan.vip_writes.is_empty() || !plan.vip_removals.is_empty() {
        return Err(Error::RolloutChangesMore(
            others
                .iter()
                .map(|c| c.as_str())
                .collect::<Vec<_>>()
                .join("; "),
        ));
    }
    Ok(())
}

/// Linearizable reads (an operator expects to see their own last write),
/// and none of the whole fleet: the nodes come from the replica's spec
/// cache once caught up with etcd (`crate::vip::admin::read_fleet`),
/// with the status and facts of the named and lb nodes only.
async fn read_current(ctx: &SessionContext, spec: &super::ClusterSpec) -> Result<Current> {
    let store = &ctx.store;
    // Facts (for the VIP checks) of every node the spec names or a VIP may
    // land on.
    let named = spec
        .nodes
        .keys()
        .filter_map(|id| NodeId::new(id.as_str()).ok())
        .chain(
            spec.vips
                .iter()
                .flatten()
                .flat_map(|v| v.candidates.clone()),
        )
        .collect();
    let nodes = crate::vip::admin::read_fleet(ctx, &named).await?;
    let vips = store
        .vips()
        .await?
        .vips
        .into_iter()
        .filter_map(|(name, state)| Some((name, state.spec?)))
        .collect();
    let settings = store.cluster_settings().await?;
    Ok(Current {
        nodes,
        vips,
        settings,
    })
}

/// The guards (every written key still at the revision planned from) and
/// the writes of `plan`.
///
/// `targets`: the settings of rollouts still in effect on the nodes they
/// changed (an aborted rollout's), which those nodes leave for the new
/// settings: their sections' markers are touched too.
fn transaction(
    store: &Store,
    plan: &Plan,
    current: &Current,
    targets: &[&ClusterSettings],
) -> (Vec<Cmp>, Vec<Op>) {
    let keys = store.keys();
    let mut compares = Vec::new();
    let mut writes = Vec::new();
    let unchanged = |key: String, revision: i64| Cmp::mod_revision(key, revision);
    for vip in &plan.vip_writes {
        compares.push(unchanged(
            keys.vip_spec(&vip.spec.name),
            vip.expected_revision,
        ));
        writes.extend(store.vip_set_ops(&vip.spec));
    }
    if !plan.vip_removals.is_empty() {
        let names: Vec<&str> = plan.vip_removals.iter().map(|r| r.name.as_str()).collect();
        for removal in &plan.vip_removals {
            compares.push(unchanged(
                keys.vip_spec(&removal.name),
                removal.expected_revision,
            ));
        }
        writes.extend(store.vip_removal_ops(&names));
    }
    if let Some(settings) = &plan.settings {
        let key = keys.cluster_settings();
        compares.push(unchanged(key.clone(), settings.expected_revision));
        writes.push(Op::put(key, encode(&settings.settings)));
        let before = current
            .settings
            .as_ref()
            .map(|s| s.value.clone())
            .unwrap_or_default();
        let mut from = vec![&before];
        from.extend(targets.iter().copied());
        writes.extend(store.settings_change_ops_from(&from, &settings.settings));
        // No event kind is about settings; they configure what the roles
        // do, so the role kind is the closest.
        let event = store.event(
            EventKind::RolesChanged,
            None,
            format!("cluster settings changed: {}", settings.changes.join("; ")),
        );
        writes.push(store.event_op(&event));
    }
    // One touch per role any node loses (a key may be written once per
    // transaction).
    let mut departures = std::collections::BTreeSet::new();
    for node in &plan.nodes {
        let key = keys.node_spec(&node.node);
        compares.push(unchanged(key.clone(), node.expected_revision));
        writes.push(Op::put(key, encode(&node.after)));
        departures.extend(node.before.roles.difference(&node.after.roles).copied());
    }
    writes.extend(
        departures
            .into_iter()
            .map(|role| Op::put(keys.role_departed(role), Vec::new())),
    );
    (compares, writes)
}

#[cfg(test)]
mod tests {
    use steward_proto::domain::{Facts, Role};

    use super::*;
    use crate::store::MemoryBackend;
    use crate::testing::{eventually, node, put_connected, put_roles, TestReplica};

    const KUBERNETES: &str = "[kubernetes]\nversion = \"1.31.2-1.1\"\n\
        pod_subnet = \"10.244.0.0/16\"\nservice_subnet = \"10.96.0.0/12\"\n\
        repository = { url = \"https://pkgs.k8s.io/core:/stable:/v1.31/deb/\" }\n";

    fn facts(id: &str) -> Facts {
        Facts {
            hostname: id.into(),
            boot_id: format!("boot-{id}"),
            ..Default::default()
        }
    }

    /// Issue 13: an apply at fleet scale reads the nodes its checks look
    /// at (here the one it lists), not a record of every node.
    #[tokio::test]
    async fn an_apply_reads_the_nodes_it_checks_not_the_fleet() {
        const FLEET: usize = 2_000;
        let memory = MemoryBackend::new();
        let replica = TestReplica::start(memory.clone(), "c-1").await;
        let store = replica.store();
        for i in 0..FLEET {
            let id = format!("n{i:04}");
            put_connected(store, &id, &facts(&id)).await;
            let role = if i == 0 {
                Role::K8sControlPlane
            } else {
                Role::K8sWorker
            };
            put_roles(store, &id, &[role]).await;
        }
        eventually("the fleet in the spec cache", || {
            (replica.ctx.specs.borrow().specs.len() == FLEET).then_some(())
        })
        .await;
        let spec = format!("{KUBERNETES}[nodes.n0001]\nroles = [\"k8s-worker\", \"lb\"]\n");
        let before = memory.keys_read();
        let outcome = apply(&replica.ctx, &spec, false, None, "test")
            .await
            .expect("applied");
        let read = memory.keys_read() - before;
        assert!(outcome.applied);
        assert!(
            outcome
                .changes
                .iter()
                .any(|c| c.starts_with("node n0001: roles")),
            "{:?}",
            outcome.changes
        );
        assert!(
            outcome.changes.iter().any(|c| c.contains("kubernetes")),
            "{:?}",
            outcome.changes
        );
        // n0001's status and facts, the settings, the VIPs, the active
        // rollout: a handful of keys, where the listing apply read before
        // (`Store::nodes`) is 2 a node.
        let before = memory.keys_read();
        store.nodes().await.expect("listed");
        let listing = memory.keys_read() - before;
        eprintln!("apply at {FLEET} nodes read {read} keys; a listing of them reads {listing}");
        assert!(read < 20, "apply read {read} keys of a {FLEET}-node fleet");
        assert!(listing >= 2 * FLEET as u64, "the listing read {listing}");
        let written = store.node(&node("n0001")).await.expect("read");
        assert!(written.spec.expect("spec").value.roles.contains(&Role::Lb));
    }

    /// An operator sees their own last write: a role written to etcd just
    /// before (through this or another replica) is checked, even when the
    /// spec cache has not caught up yet.
    #[tokio::test]
    async fn an_apply_sees_a_write_made_just_before() {
        let replica = TestReplica::start(MemoryBackend::new(), "c-1").await;
        let store = replica.store();
        put_connected(store, "n1", &facts("n1")).await;
        put_roles(store, "n1", &[Role::K8sWorker]).await;
        // No wait for the cache here: apply must do it.
        let error = apply(&replica.ctx, "", true, None, "test")
            .await
            .expect_err("a worker without [kubernetes]");
        let Error::InvalidSpec(problems) = &error else {
            panic!("not InvalidSpec: {error:?}");
        };
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("Kubernetes roles on n1 but no [kubernetes] section")),
            "{problems:?}"
        );
    }

    /// A node the spec lists must have connected once (a status), whether
    /// or not it has a spec; one that never did is named.
    #[tokio::test]
    async fn listed_nodes_are_known_by_their_status_or_spec() {
        let replica = TestReplica::start(MemoryBackend::new(), "c-1").await;
        let store = replica.store();
        put_connected(store, "fresh", &facts("fresh")).await;
        put_roles(store, "spec-only", &[]).await;
        let spec = "[nodes.fresh]\nroles = [\"lb\"]\n[nodes.spec-only]\nroles = [\"lb\"]\n\
                    [nodes.ghost]\nroles = [\"lb\"]\n";
        let error = apply(&replica.ctx, spec, true, None, "test")
            .await
            .expect_err("ghost never connected");
        let Error::InvalidSpec(problems) = &error else {
            panic!("not InvalidSpec: {error:?}");
        };
        assert_eq!(
            problems,
            &["nodes.ghost: unknown node (no agent with this id has ever connected)"]
        );
        let spec = "[nodes.fresh]\nroles = [\"lb\"]\n[nodes.spec-only]\nroles = [\"lb\"]\n";
        let outcome = apply(&replica.ctx, spec, true, None, "test")
            .await
            .expect("both known");
        assert_eq!(outcome.changes.len(), 2, "{:?}", outcome.changes);
    }
}
