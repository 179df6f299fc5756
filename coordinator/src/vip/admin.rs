//! The admin API's VIP calls (`stewardctl vip ...`) and the peer call that
//! reports this replica's ack state. Every write is validated against the
//! fleet first and changes nothing when refused.

use std::collections::BTreeMap;
use std::net::IpAddr;

use etcd_client::{Compare, CompareOp, DeleteOptions, GetOptions, Txn, TxnOp};
use steward_proto::domain::{Event, EventKind, NodeId, Role};
use steward_proto::pb;
use steward_proto::vip::VipSpec;

use crate::agent_service::SessionContext;
use crate::cache::CachedPrefix;
use crate::error::{Error, Result};
use crate::peers::Peers;
use crate::store::{encode, unix_ms, NodeRecord, Store, VipRemovedRecord};
use crate::vip::{MoveRecord, VipSnapshot, VipState};

/// A linearizable read of every VIP (not the watch cache: an operator
/// expects to see their own write).
pub(crate) async fn read_vips(store: &Store) -> Result<VipSnapshot> {
    let resp = store
        .client()
        .kv_client()
        .get(store.keys().vips(), Some(GetOptions::new().with_prefix()))
        .await
        .map_err(Error::etcd("read VIPs"))?;
    let mut snapshot = VipSnapshot::default();
    for kv in resp.kvs() {
        snapshot.apply(
            store.keys(),
            kv.key(),
            Some((kv.value(), kv.mod_revision())),
        );
    }
    snapshot.set_revision(resp.header().map(|h| h.revision()).unwrap_or_default());
    Ok(snapshot)
}

async fn read_vip(store: &Store, name: &str) -> Result<VipState> {
    read_vips(store)
        .await?
        .vips
        .remove(name)
        .filter(|s| s.spec.is_some())
        .ok_or_else(|| Error::UnknownVip(name.to_owned()))
}

/// The candidates of `spec` among `nodes`: named ones must be known nodes.
fn fleet_candidates(
    spec: &VipSpec,
    nodes: &BTreeMap<NodeId, NodeRecord>,
    problems: &mut Vec<String>,
) -> Vec<NodeId> {
    if spec.candidates.is_empty() {
        return nodes
            .iter()
            .filter(|(_, r)| {
                r.spec
                    .as_ref()
                    .is_some_and(|s| s.value.roles.contains(&Role::Lb))
            })
            .map(|(id, _)| id.clone())
            .collect();
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
            .and_then(|r| r.status.as_ref())
            .map(|s| s.value.facts.interfaces.clone())
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

fn event(store: &Store, kind: EventKind, message: String) -> (String, Event) {
    let event = Event {
        revision: 0,
        at_unix_ms: unix_ms(),
        kind,
        node: None,
        replica: store.replica().to_owned(),
        message,
    };
    (store.event_key(&event), event)
}

/// The writes that define or replace the VIP `spec`: the spec and its
/// event. `set_vip` and `stewardctl apply` write these.
pub(crate) fn set_ops(store: &Store, spec: &VipSpec) -> Vec<TxnOp> {
    let (event_key, event) = event(
        store,
        EventKind::VipChanged,
        format!("VIP {} set to {}", spec.name, spec.address),
    );
    vec![
        TxnOp::put(store.keys().vip_spec(&spec.name), encode(spec), None),
        TxnOp::put(event_key, encode(&event), None),
    ]
}

/// The writes that remove the VIPs `names`: every key of each, one event
/// each, and one touch of `vips/.removed`, which moves every node's
/// desired-state revision past the removal. `remove_vip` and `stewardctl
/// apply` write these.
pub(crate) fn removal_ops(store: &Store, names: &[&str]) -> Vec<TxnOp> {
    let mut ops = Vec::with_capacity(2 * names.len() + 1);
    for name in names {
        let (event_key, event) = event(store, EventKind::VipChanged, format!("VIP {name} removed"));
        ops.push(TxnOp::delete(
            store.keys().vip(name),
            Some(DeleteOptions::new().with_prefix()),
        ));
        ops.push(TxnOp::put(event_key, encode(&event), None));
    }
    ops.push(TxnOp::put(
        store.keys().vips_removed(),
        encode(&VipRemovedRecord {
            name: names.join(","),
        }),
        None,
    ));
    ops
}

/// Creates or replaces a VIP definition.
pub async fn set_vip(ctx: &SessionContext, spec: VipSpec) -> Result<()> {
    let store = &ctx.store;
    let problems = fleet_problems(&spec, &store.nodes().await?);
    if !problems.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "VIP {:?}: {}",
            spec.name,
            problems.join("; ")
        )));
    }
    store
        .client()
        .kv_client()
        .txn(Txn::new().and_then(set_ops(store, &spec)))
        .await
        .map_err(Error::etcd("write VIP"))?;
    Ok(())
}

/// Asks the holder to let go; the leader assigns the next epoch.
pub async fn move_vip(ctx: &SessionContext, name: &str, to: Option<NodeId>) -> Result<()> {
    let store = &ctx.store;
    let state = read_vip(store, name).await?;
    let Some(owner) = state.owner_node().cloned() else {
        return Err(Error::FailedPrecondition(format!(
            "VIP {name} has no holder to move away from"
        )));
    };
    if let Some(to) = &to {
        if *to == owner {
            return Err(Error::FailedPrecondition(format!(
                "VIP {name} is already held by {to}"
            )));
        }
        let nodes = store.nodes().await?;
        let mut problems = Vec::new();
        let spec = state.spec.as_ref().map(|s| &s.value);
        let candidates = spec.map_or_else(Vec::new, |s| fleet_candidates(s, &nodes, &mut problems));
        if !candidates.contains(to) {
            return Err(Error::InvalidArgument(format!(
                "{to} is not a candidate for VIP {name} (candidates: {})",
                join(&candidates)
            )));
        }
    }
    let epoch = state.epoch();
    let owner_key = store.keys().vip_owner(name);
    let (event_key, event) = event(
        store,
        EventKind::VipChanged,
        format!(
            "VIP {name}: move away from {owner} requested{}",
            to.as_ref()
                .map(|t| format!(" (to {t})"))
                .unwrap_or_default()
        ),
    );
    let resp = store
        .client()
        .kv_client()
        .txn(
            Txn::new()
                .when([Compare::mod_revision(
                    owner_key.as_str(),
                    CompareOp::Equal,
                    epoch as i64,
                )])
                .and_then([
                    TxnOp::put(
                        store.keys().vip_move(name),
                        encode(&MoveRecord { epoch, to }),
                        None,
                    ),
                    TxnOp::put(event_key, encode(&event), None),
                ]),
        )
        .await
        .map_err(Error::etcd("request VIP move"))?;
    if !resp.succeeded() {
        return Err(Error::Conflict {
            key: owner_key.clone(),
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
        .client()
        .kv_client()
        .txn(Txn::new().and_then(removal_ops(store, &[name])))
        .await
        .map_err(Error::etcd("remove VIP"))?;
    Ok(())
}

/// This replica's side of every VIP it knows an owner of.
pub fn local_lease_states(ctx: &SessionContext) -> pb::LeaseStatesResponse {
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
                .map(|r| r.as_str().to_owned())
                .unwrap_or_default();
            pb::VipReplicaState {
                replica_id: me.to_owned(),
                vip: name.clone(),
                epoch: state.epoch(),
                acking: acking && state.owner_node().is_some(),
                last_ack_ms_ago: last_ack
                    .map_or(0, |at| now.saturating_sub(at).as_millis().max(1) as u64),
                mark,
                unreachable: false,
            }
        })
        .collect();
    pb::LeaseStatesResponse {
        replica_id: me.to_owned(),
        vips,
    }
}

/// Every VIP with its owner and each replica's ack state.
pub async fn list_vips(ctx: &SessionContext, peers: &Peers) -> Result<Vec<pb::Vip>> {
    let store = &ctx.store;
    let snapshot = read_vips(store).await?;
    let members = store.members().await?;
    let mut states: Vec<pb::VipReplicaState> = local_lease_states(ctx).vips;
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
                    states.push(pb::VipReplicaState {
                        replica_id: member.clone(),
                        vip: name.clone(),
                        unreachable: true,
                        ..Default::default()
                    });
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
            replicas.sort_by(|a, b| a.replica_id.cmp(&b.replica_id));
            Some(pb::Vip {
                spec: Some(spec.into()),
                epoch: state.epoch(),
                owner: state
                    .owner_node()
                    .map(|n| n.to_string())
                    .unwrap_or_default(),
                move_requested: state.current_move().is_some(),
                replicas,
            })
        })
        .collect())
}
