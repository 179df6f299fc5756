//! The admin API's VIP calls (`stewardctl vip ...`) and the peer call that
//! reports this replica's ack state. Every write is validated against the
//! fleet first and changes nothing when refused.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use steward_proto::admin::{LeaseStates, VipReplicaState, VipStatus};
use steward_proto::domain::{EventKind, NodeId, Role};
use steward_proto::vip::VipSpec;

use crate::agent_service::SessionContext;
use crate::error::{Error, Result};
use crate::peers::Peers;
use crate::store::kv::Txn;
use crate::store::{NodeRecord, Store};
use crate::vip::VipState;

async fn read_vip(store: &Store, name: &str) -> Result<VipState> {
    store
        .vips()
        .await?
        .vips
        .remove(name)
        .filter(|s| s.spec.is_some())
        .ok_or_else(|| Error::UnknownVip(name.to_owned()))
}

/// The nodes of `nodes` whose spec has the lb role.
fn lb_nodes(nodes: &BTreeMap<NodeId, NodeRecord>) -> impl Iterator<Item = &NodeId> {
    nodes
        .iter()
        .filter(|(_, r)| {
            r.spec
                .as_ref()
                .is_some_and(|s| s.value.roles.contains(&Role::Lb))
        })
        .map(|(id, _)| id)
}

/// The candidates of `spec` among `nodes`: named ones must be known nodes.
fn fleet_candidates(
    spec: &VipSpec,
    nodes: &BTreeMap<NodeId, NodeRecord>,
    problems: &mut Vec<String>,
) -> Vec<NodeId> {
    if spec.candidates.is_empty() {
        return lb_nodes(nodes).cloned().collect();
    }
    for c in &spec.candidates {
        if !nodes.contains_key(c) {
            problems.push(format!(
                "candidate {c}: unknown node (no agent with this id has ever connected)"
            ));
        }
    }
    spec.candidates.clone()
}

/// The fleet as VIP and spec checks need it, without reading every node
/// from etcd: every node's spec from this replica's spec cache, caught up
/// with etcd first ([`SessionContext::fresh_specs`]: an operator sees
/// their own last write), and the status and facts of the nodes that can
/// hold a VIP (the lb nodes, and the `named` ones: candidates, or nodes a
/// spec lists), read per node.
///
/// A node is in the map if it has a spec, or is named or an lb node and
/// has a status (it connected once). A node with neither spec nor role,
/// not named, is left out: no check looks at it.
pub(crate) async fn read_fleet(
    ctx: &SessionContext,
    named: &BTreeSet<NodeId>,
) -> Result<BTreeMap<NodeId, NodeRecord>> {
    let specs = ctx.fresh_specs().await?;
    let mut nodes: BTreeMap<NodeId, NodeRecord> = specs
        .specs
        .iter()
        .map(|(id, spec)| {
            let record = NodeRecord {
                spec: Some(spec.clone()),
                ..NodeRecord::default()
            };
            (id.clone(), record)
        })
        .collect();
    let holders: BTreeSet<NodeId> = lb_nodes(&nodes).chain(named).cloned().collect();
    for (id, mut read) in ctx.store.node_details(holders).await? {
        read.spec = nodes.get(&id).and_then(|r| r.spec.clone());
        if read.spec.is_some() || read.status.is_some() {
            nodes.insert(id, read);
        }
    }
    Ok(nodes)
}

/// Every problem with `spec` in this fleet.
pub(crate) fn fleet_problems(spec: &VipSpec, nodes: &BTreeMap<NodeId, NodeRecord>) -> Vec<String> {
    let mut problems = spec.problems();
    let Ok(cidr) = spec.cidr() else {
        return problems;
    };
    let candidates = fleet_candidates(spec, nodes, &mut problems);
    if candidates.is_empty() {
        problems.push(
            "no candidates: no node has the lb role (stewardctl role add NODE lb) and no \
             --candidate was named"
                .into(),
        );
        return problems;
    }
    let interfaces = |id: &NodeId| {
        nodes
            .get(id)
            .and_then(|r| r.facts.as_ref())
            .map(|f| f.value.interfaces.clone())
            .unwrap_or_default()
    };
    match &spec.interface {
        Some(name) => {
            if !candidates
                .iter()
                .any(|c| interfaces(c).iter().any(|i| &i.name == name))
            {
                problems.push(format!(
                    "interface {name}: no candidate ({}) has it",
                    join(&candidates)
                ));
            }
        }
        None => {
            let in_subnet = |a: &String| {
                a.split_once('/')
                    .and_then(|(addr, _)| addr.parse::<IpAddr>().ok())
                    .is_some_and(|addr| cidr.contains(addr))
            };
            if !candidates.iter().any(|c| {
                interfaces(c)
                    .iter()
                    .any(|i| i.addresses.iter().any(in_subnet))
            }) {
                problems.push(format!(
                    "no candidate ({}) has an address in the subnet of {cidr}; name the \
                     interface with --interface",
                    join(&candidates)
                ));
            }
        }
    }
    problems
}

fn join(nodes: &[NodeId]) -> String {
    nodes
        .iter()
        .map(NodeId::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Creates or replaces a VIP definition.
pub async fn set_vip(ctx: &SessionContext, spec: VipSpec) -> Result<()> {
    let store = &ctx.store;
    let named = spec.candidates.iter().cloned().collect();
    let problems = fleet_problems(&spec, &read_fleet(ctx, &named).await?);
    if !problems.is_empty() {
        return Err(Error::InvalidVip {
            name: spec.name,
            problems,
        });
    }
    store
        .txn(Txn::new().and_then(store.vip_set_ops(&spec)), "write VIP")
        .await?;
    Ok(())
}

/// Asks the holder to let go; the leader assigns the next epoch.
pub async fn move_vip(ctx: &SessionContext, name: &str, to: Option<NodeId>) -> Result<()> {
    let store = &ctx.store;
    let state = read_vip(store, name).await?;
    let Some(owner) = state.owner_node().cloned() else {
        return Err(Error::VipHasNoHolder(name.to_owned()));
    };
    if let Some(to) = &to {
        if *to == owner {
            return Err(Error::VipAlreadyHeld {
                vip: name.to_owned(),
                node: owner,
            });
        }
        let nodes = read_fleet(ctx, &BTreeSet::from([to.clone()])).await?;
        let mut problems = Vec::new();
        let spec = state.spec.as_ref().map(|s| &s.value);
        let candidates = spec.map_or_else(Vec::new, |s| fleet_candidates(s, &nodes, &mut problems));
        if !candidates.contains(to) {
            return Err(Error::NotACandidate {
                vip: name.to_owned(),
                node: to.clone(),
                candidates,
            });
        }
    }
    let epoch = state.epoch();
    let event = store.event(
        EventKind::VipChanged,
        None,
        format!(
            "VIP {name}: move away from {owner} requested{}",
            to.as_ref()
                .map(|t| format!(" (to {t})"))
                .unwrap_or_default()
        ),
    );
    if !store.request_vip_move(name, epoch, to, &event).await? {
        return Err(Error::Conflict {
            key: store.keys().vip_owner(name),
        });
    }
    Ok(())
}

/// Removes a VIP: its holder stops being acked and drops the address
/// within a lease.
pub async fn remove_vip(ctx: &SessionContext, name: &str) -> Result<()> {
    let store = &ctx.store;
    read_vip(store, name).await?;
    store
        .txn(
            Txn::new().and_then(store.vip_removal_ops(&[name])),
            "remove VIP",
        )
        .await?;
    Ok(())
}

/// This replica's side of every VIP it knows an owner of.
pub fn local_lease_states(ctx: &SessionContext) -> LeaseStates {
    let me = ctx.store.replica();
    let snapshot = ctx.vips.borrow().clone();
    let now = ctx.lease.now();
    let vips = snapshot
        .vips
        .iter()
        .filter(|(_, s)| s.spec.is_some() && s.owner.is_some())
        .map(|(name, state)| {
            let (acking, last_ack) = ctx
                .lease
                .with_acker(|a| a.ack_state(name))
                .unwrap_or((false, None));
            let mark = state
                .marks
                .get(&state.epoch())
                .and_then(|m| m.get(me))
                .map(|r| r.as_str().to_owned());
            VipReplicaState {
                replica: me.to_owned(),
                vip: name.clone(),
                epoch: state.epoch(),
                acking: acking && state.owner_node().is_some(),
                last_ack_ms_ago: last_ack
                    .map(|at| now.saturating_sub(at).as_millis().max(1) as u64),
                mark,
                unreachable: false,
            }
        })
        .collect();
    LeaseStates {
        replica: me.to_owned(),
        vips,
    }
}

/// Every VIP with its owner and each replica's ack state.
pub async fn list_vips(ctx: &SessionContext, peers: &Peers) -> Result<Vec<VipStatus>> {
    let store = &ctx.store;
    let snapshot = store.vips().await?;
    let members = store.members().await?;
    let mut states: Vec<VipReplicaState> = local_lease_states(ctx).vips;
    let others: Vec<_> = members
        .iter()
        .filter(|m| m.id != store.replica())
        .cloned()
        .collect();
    for (member, answer) in peers.lease_states(&others).await {
        match answer {
            Some(resp) => states.extend(resp.vips),
            None => {
                for name in snapshot.vips.keys() {
                    states.push(VipReplicaState::unreachable(&member, name));
                }
            }
        }
    }
    Ok(snapshot
        .vips
        .iter()
        .filter_map(|(name, state)| {
            let spec = state.spec.as_ref()?.value.clone();
            let mut replicas: Vec<_> = states
                .iter()
                .filter(|s| &s.vip == name && (s.unreachable || s.epoch == state.epoch()))
                .cloned()
                .collect();
            replicas.sort_by(|a, b| a.replica.cmp(&b.replica));
            Some(VipStatus {
                spec,
                epoch: state.epoch(),
                owner: state.owner_node().cloned(),
                move_requested: state.current_move().is_some(),
                replicas,
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryBackend;
    use crate::testing::{eventually, node, put_roles, put_vip, vip_spec, TestReplica};

    /// Two lb nodes; VIP `front` owned by n1.
    async fn owned_by_n1() -> TestReplica {
        let replica = TestReplica::start(MemoryBackend::new(), "c-1").await;
        let store = replica.store();
        put_roles(store, "n1", &[Role::Lb]).await;
        put_roles(store, "n2", &[Role::Lb]).await;
        put_vip(store, &vip_spec("front", "198.18.0.100/24")).await;
        let fence = replica.lead().await;
        let event = store.event(EventKind::VipMoved, Some(node("n1")), "test".into());
        let inner = store.vip_assign_txn("front", None, &[], Some(node("n1")), &event);
        fence.txn(store, inner).await.expect("fenced");
        eventually("the VIP cache to show the owner", || {
            let vips = replica.ctx.vips.borrow().clone();
            (vips.vips.get("front")?.owner_node() == Some(&node("n1"))).then_some(())
        })
        .await;
        replica
    }

    #[tokio::test]
    async fn moves_name_what_is_wrong_and_keep_their_messages_and_codes() {
        let replica = owned_by_n1().await;
        let ctx = &replica.ctx;

        let error = move_vip(ctx, "front", Some(node("n1")))
            .await
            .expect_err("held there");
        assert!(
            matches!(&error, Error::VipAlreadyHeld { vip, node: n } if vip == "front" && *n == node("n1")),
            "{error}"
        );
        let status = tonic::Status::from(error);
        assert_eq!(
            (status.code(), status.message()),
            (
                tonic::Code::FailedPrecondition,
                "VIP front is already held by n1"
            )
        );

        let error = move_vip(ctx, "front", Some(node("n3")))
            .await
            .expect_err("not a candidate");
        assert!(
            matches!(&error, Error::NotACandidate { candidates, .. } if *candidates == [node("n1"), node("n2")]),
            "{error}"
        );
        let status = tonic::Status::from(error);
        assert_eq!(
            (status.code(), status.message()),
            (
                tonic::Code::InvalidArgument,
                "invalid request: n3 is not a candidate for VIP front (candidates: n1, n2)"
            )
        );

        let error = move_vip(ctx, "back", None).await.expect_err("no such VIP");
        assert!(matches!(error, Error::UnknownVip(_)), "{error}");

        move_vip(ctx, "front", Some(node("n2")))
            .await
            .expect("a move to the other candidate");
        let vips = replica.store().vips().await.expect("vips");
        assert!(vips.vips["front"].current_move().is_some());
    }

    #[tokio::test]
    async fn a_vip_that_fits_no_node_is_refused_with_every_problem() {
        let replica = TestReplica::start(MemoryBackend::new(), "c-1").await;
        let mut spec = vip_spec("front", "198.18.0.100/24");
        spec.candidates = vec![node("ghost")];
        let error = set_vip(&replica.ctx, spec)
            .await
            .expect_err("unknown candidate");
        let Error::InvalidVip { name, problems } = &error else {
            panic!("not InvalidVip: {error:?}");
        };
        assert_eq!(name, "front");
        assert!(
            problems[0].starts_with("candidate ghost: unknown node"),
            "{problems:?}"
        );
        let status = tonic::Status::from(error);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status
                .message()
                .starts_with("invalid request: VIP \"front\": candidate ghost: unknown node"),
            "{}",
            status.message()
        );
        assert!(replica.store().vips().await.expect("vips").vips.is_empty());
    }

    #[tokio::test]
    async fn lease_states_cross_the_wire_unchanged() {
        let replica = owned_by_n1().await;
        let states = local_lease_states(&replica.ctx);
        assert_eq!(states.replica, "c-1");
        assert_eq!(states.vips.len(), 1);
        assert_eq!(states.vips[0].vip, "front");
        assert_eq!(states.vips[0].last_ack_ms_ago, None);
        let wire = steward_proto::pb::LeaseStatesResponse::from(states.clone());
        assert_eq!(LeaseStates::try_from(wire), Ok(states));
    }
}
