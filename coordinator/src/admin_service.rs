//! `AdminService`: what `stewardctl` talks to. Admin certificates only.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::time::Instant;

use steward_proto::admin::{
    ClusterStatus, EventsQuery, NodeFilter, NodeQuery, ReplicaStatus, VipMove, VipStatus,
};
use steward_proto::convert::roles_display;
use steward_proto::domain::{
    Event, EventKind, NodeHealth, NodeId, NodeView, RevocableKind, RoleChange, RoleSet,
};
use steward_proto::pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::agent_service::SessionContext;
use crate::auth::require_admin;
use crate::cluster_spec;
use crate::error::{Error, Result};
use crate::peers::Peers;
use crate::replica::Leadership;
use crate::store::kv::Change;
use crate::store::{decode, unix_ms, NodeRecord, Store};
use crate::vip::admin as vip_admin;

/// Past events sent by default before following.
pub const DEFAULT_EVENTS: u32 = steward_proto::admin::DEFAULT_EVENTS;

pub struct AdminApi {
    ctx: SessionContext,
    leadership: tokio::sync::watch::Receiver<Leadership>,
    version: String,
    peers: Peers,
    /// `sha256:` hash of the cluster CA, for join commands.
    ca_hash: String,
    /// The name in this replica's own (coordinator) certificate, which
    /// `RevokeCertificate` revokes only when forced.
    own_certificate: Option<String>,
}

impl AdminApi {
    pub fn new(
        ctx: SessionContext,
        leadership: tokio::sync::watch::Receiver<Leadership>,
        version: String,
        peers: Peers,
    ) -> Self {
        Self {
            ctx,
            leadership,
            version,
            peers,
            ca_hash: String::new(),
            own_certificate: None,
        }
    }

    /// The name in this replica's own certificate.
    pub fn with_own_certificate(mut self, name: String) -> Self {
        self.own_certificate = Some(name);
        self
    }

    /// The calling admin, if its certificate may use the admin API here.
    fn admin<T>(&self, request: &Request<T>) -> Result<crate::pki::Identity> {
        require_admin(request, &self.ctx.specs.borrow())
    }

    /// Why revoking `wanted` needs `--force`, if it does: it would lock
    /// out the caller itself, or this replica from its peers.
    fn revocation_refusal(
        &self,
        admin: &crate::pki::Identity,
        wanted: &steward_proto::domain::RevokeCertificate,
    ) -> Option<String> {
        if wanted.force {
            return None;
        }
        let (kind, name) = (wanted.kind, wanted.name.as_str());
        match kind {
            RevocableKind::Admin if admin.name == name => Some(format!(
                "{name:?} is the admin certificate this request was made with: revoking it \
                 locks you out of the admin API until you use one issued after now. Revoke \
                 it from another admin certificate, or pass --force"
            )),
            RevocableKind::Coordinator if self.own_certificate.as_deref() == Some(name) => {
                Some(format!(
                    "{name:?} is the coordinator certificate of the replica answering \
                     ({}): once revoked, its peers refuse its calls until it runs with one \
                     issued after now. Pass --force to revoke it anyway",
                    self.ctx.store.replica()
                ))
            }
            RevocableKind::Admin | RevocableKind::Coordinator => None,
        }
    }

    /// `stream`, ended with PERMISSION_DENIED as soon as a revocation in
    /// this replica's cache covers `admin`: a `--follow` opened before the
    /// revocation does not outlive it.
    fn until_revoked<T: Send + 'static>(
        &self,
        mut stream: AdminStream<T>,
        admin: crate::pki::Identity,
    ) -> AdminStream<T> {
        let mut specs = self.ctx.specs.clone();
        let shutdown = self.ctx.shutdown.clone();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            enum Next<T> {
                Item(Option<Result<T, Status>>),
                Specs,
                Done,
            }
            loop {
                let next = tokio::select! {
                    _ = shutdown.cancelled() => Next::Done,
                    _ = tx.closed() => Next::Done,
                    changed = specs.changed() => match changed {
                        Ok(()) => Next::Specs,
                        // The cache is gone: the replica is stopping.
                        Err(_) => Next::Done,
                    },
                    item = tokio_stream::StreamExt::next(&mut stream) => Next::Item(item),
                };
                match next {
                    Next::Done | Next::Item(None) => return,
                    Next::Item(Some(item)) => {
                        if tx.send(item).await.is_err() {
                            return;
                        }
                    }
                    Next::Specs => {
                        let verdict = crate::auth::check_not_revoked(
                            &admin,
                            RevocableKind::Admin,
                            &specs.borrow_and_update(),
                        );
                        if let Err(error) = verdict {
                            info!(admin = %admin, "revoked; ending its stream");
                            let _ = tx.send(Err(error.into())).await;
                            return;
                        }
                    }
                }
            }
        });
        Box::pin(ReceiverStream::new(rx))
    }

    /// The CA hash `token create` hands out with each token.
    pub fn with_ca_hash(mut self, ca_hash: String) -> Self {
        self.ca_hash = ca_hash;
        self
    }

    /// Views of `records`, with live data from whichever replica serves each
    /// node (this one from memory, peers over `PeerService`).
    async fn views(&self, records: BTreeMap<NodeId, NodeRecord>) -> Vec<NodeView> {
        let me = self.ctx.store.replica();
        let mut remote: BTreeMap<String, Vec<NodeId>> = BTreeMap::new();
        for (id, record) in &records {
            if let Some(r) = record
                .status
                .as_ref()
                .and_then(|s| s.value.replica.as_deref())
            {
                if r != me {
                    remote.entry(r.to_owned()).or_default().push(id.clone());
                }
            }
        }
        let live = if remote.is_empty() {
            Default::default()
        } else {
            match self.ctx.store.members().await {
                Ok(members) => self.peers.live_nodes(remote, &members).await,
                Err(error) => {
                    warn!(%error, "cannot list replicas; showing recorded status");
                    Default::default()
                }
            }
        };
        records
            .into_iter()
            .map(|(id, record)| {
                let desired = self.ctx.desired_revision_for(&id);
                let mut view = self.view(id, record, desired);
                if let Some(l) = live.get(&view.id) {
                    view.health = l.health;
                    view.last_seen_unix_ms = l.last_seen_unix_ms;
                    view.last_health = l.last_health;
                    view.applied_revision = l.applied_revision;
                }
                view
            })
            .collect()
    }

    /// `node` as etcd holds it now, as an answer (after a change to it).
    async fn node_answer(&self, node: NodeId) -> Result<Response<pb::Node>, Status> {
        let record = self.ctx.store.node(&node).await?;
        let view = self
            .one_view(node.clone(), record)
            .await
            .ok_or(Error::UnknownNode(node))?;
        Ok(Response::new(view.into()))
    }

    async fn one_view(&self, id: NodeId, record: NodeRecord) -> Option<NodeView> {
        self.views(BTreeMap::from([(id, record)])).await.pop()
    }

    /// A node as operators see it: etcd's record, refreshed with this
    /// replica's live session when it serves the node.
    ///
    /// The desired revision is `cached`, what this replica's caches would
    /// push (it depends on the whole cluster view), but never older than
    /// the spec just read from etcd, which the cache may not have seen yet.
    fn view(&self, id: NodeId, record: NodeRecord, cached: u64) -> NodeView {
        let maintenance = crate::maintenance::view(
            &id,
            &record,
            &self.ctx.specs.borrow(),
            &self.ctx.vips.borrow(),
            &self.ctx.orchestration.borrow(),
        );
        let spec = record.spec.as_ref();
        let mut view = NodeView {
            id,
            roles: spec.map(|s| s.value.roles.clone()).unwrap_or_default(),
            health: NodeHealth::Disconnected,
            last_seen_unix_ms: 0,
            replica: None,
            last_health: Default::default(),
            desired_revision: spec.map(|s| s.mod_revision as u64).unwrap_or(0).max(cached),
            applied_revision: 0,
            address: record.address.map(|a| a.value),
            facts: record.facts.map(|f| f.value).unwrap_or_default(),
            converge: record.converge.map(|c| c.value),
            revoked_unix_ms: record.revoked.as_ref().map(|r| r.value.at_unix_ms),
            maintenance,
            gluster: record.gluster.map(|g| g.value),
        };
        if let Some(status) = record.status {
            let s = status.value;
            view.health = s.health;
            view.last_seen_unix_ms = s.last_seen_unix_ms;
            view.replica = s.replica;
            view.last_health = s.last_health;
            view.applied_revision = s.applied_revision;
        }
        let me = self.ctx.store.replica();
        if let Some(live) = self.ctx.sessions.get(&view.id) {
            view.health = live.node_health(Instant::now(), self.ctx.unreachable_after);
            view.last_seen_unix_ms = live.last_seen_unix_ms;
            view.last_health = live.health;
            view.applied_revision = live.applied_revision;
            view.replica = Some(me.to_owned());
        } else if view.replica.as_deref() == Some(me) {
            // We would be serving it; we are not (the session just ended,
            // or the record predates this replica's restart).
            view.health = NodeHealth::Disconnected;
            view.replica = None;
        }
        view
    }

    async fn one_vip(&self, name: &str) -> Result<VipStatus> {
        vip_admin::list_vips(&self.ctx, &self.peers)
            .await?
            .into_iter()
            .find(|v| v.spec.name == name)
            .ok_or_else(|| Error::UnknownVip(name.to_owned()))
    }

    async fn change_roles(&self, change: RoleChange, add: bool) -> Result<NodeView> {
        let RoleChange { node, roles } = change;
        if roles.is_empty() {
            return Err(Error::NoRolesNamed);
        }
        let mut before = BTreeSet::new();
        let spec = self
            .ctx
            .store
            .update_spec(&node, |current| {
                before = current.roles.clone();
                let mut next = current.clone();
                if add {
                    next.roles.extend(roles.iter().copied());
                } else {
                    for role in &roles {
                        if !next.roles.remove(role) {
                            return Err(Error::RoleNotAssigned {
                                node: node.clone(),
                                role: *role,
                            });
                        }
                    }
                }
                Ok((next != *current).then_some(next))
            })
            .await?;
        if spec.value.roles != before {
            record_roles_changed(&self.ctx.store, &node, &before, &spec.value.roles).await;
        }
        let record = self.ctx.store.node(&node).await?;
        self.one_view(node.clone(), record)
            .await
            .ok_or(Error::UnknownNode(node))
    }
}

/// Records that `node`'s roles went from `before` to `after` (best effort:
/// the change is made already, a lost event is only logged). Role changes
/// through `stewardctl role` and `stewardctl apply` both record it.
pub(crate) async fn record_roles_changed(
    store: &Store,
    node: &NodeId,
    before: &RoleSet,
    after: &RoleSet,
) {
    let event = Event {
        revision: 0,
        at_unix_ms: unix_ms(),
        kind: EventKind::RolesChanged,
        node: Some(node.clone()),
        replica: store.replica().to_owned(),
        message: format!(
            "{node} roles: [{}] -> [{}]",
            roles_display(before),
            roles_display(after)
        ),
    };
    if let Err(error) = store.record_event(&event).await {
        warn!(%error, "could not record event");
    }
}

/// Whether the node etcd holds as `record` passes `filter`.
fn filter_matches(filter: &NodeFilter, record: &NodeRecord) -> bool {
    let spec = record.spec.as_ref().map(|s| &s.value);
    let status = record.status.as_ref().map(|s| &s.value);
    filter
        .role
        .is_none_or(|r| spec.is_some_and(|s| s.roles.contains(&r)))
        && filter
            .label
            .as_ref()
            .is_none_or(|(k, v)| spec.is_some_and(|s| s.labels.get(k).is_some_and(|x| x == v)))
        && filter
            .health
            .is_none_or(|h| status.map_or(NodeHealth::Disconnected, |s| s.health) == h)
        && filter
            .replica
            .as_ref()
            .is_none_or(|r| status.is_some_and(|s| s.replica.as_ref() == Some(r)))
}

type AdminStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;
type EventStream = AdminStream<pb::Event>;
type LogChunkStream = AdminStream<pb::LogChunk>;

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for AdminApi {
    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        self.admin(&request)?;
        let store = &self.ctx.store;
        let me = store.replica().to_owned();
        let gathered = async {
            let members = store.members().await?;
            let leader = store.leader().await?;
            Ok::<_, Error>((members, leader))
        }
        .await;
        let own_sessions = u32::try_from(self.ctx.sessions.len()).unwrap_or(u32::MAX);
        let status = match gathered {
            Ok((members, leader)) => {
                // Each replica counts its own sessions (no read of every
                // node's record, which grows with the fleet).
                let others: Vec<_> = members.iter().filter(|m| m.id != me).cloned().collect();
                let counts = self.peers.session_counts(&others).await;
                let replicas = members
                    .into_iter()
                    .map(|m| {
                        let connected_agents = if m.id == me {
                            Some(own_sessions)
                        } else {
                            counts.get(&m.id).copied()
                        };
                        ReplicaStatus {
                            leader: leader.as_deref() == Some(&m.id),
                            id: m.id,
                            address: m.address,
                            version: m.version,
                            connected_agents,
                        }
                    })
                    .collect();
                ClusterStatus {
                    replicas,
                    leader,
                    etcd_reachable: true,
                    served_by: me,
                    cluster: self.ctx.cluster.clone(),
                }
            }
            Err(error) => {
                warn!(%error, "status: etcd unreachable");
                ClusterStatus {
                    replicas: vec![ReplicaStatus {
                        id: me.clone(),
                        address: String::new(),
                        version: self.version.clone(),
                        leader: matches!(*self.leadership.borrow(), Leadership::Leader(_)),
                        connected_agents: Some(own_sessions),
                    }],
                    leader: None,
                    etcd_reachable: false,
                    served_by: me,
                    cluster: self.ctx.cluster.clone(),
                }
            }
        };
        Ok(Response::new(status.into()))
    }

    async fn list_nodes(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        self.admin(&request)?;
        let NodeQuery {
            filter,
            page_size: size,
            after: mut cursor,
            without_facts,
        } = NodeQuery::try_from(request.into_inner()).map_err(Error::from)?;
        let store = &self.ctx.store;
        let mut picked = BTreeMap::new();
        let mut more = true;
        'pages: while more {
            let page = store.nodes_page(cursor.as_ref(), size, 0).await?;
            more = page.more;
            for (id, record) in page.nodes {
                cursor = Some(id.clone());
                if filter_matches(&filter, &record) {
                    picked.insert(id, record);
                    if picked.len() == size {
                        break 'pages;
                    }
                }
            }
        }
        store.fill_details(&mut picked).await?;
        if without_facts {
            // Only what the table shows of them: whether a reboot is needed.
            for r in picked.values_mut() {
                if let Some(f) = &mut r.facts {
                    f.value = steward_proto::domain::Facts {
                        boot_id: std::mem::take(&mut f.value.boot_id),
                        reboot_required: f.value.reboot_required.take(),
                        ..Default::default()
                    };
                }
            }
        }
        let done = !more && picked.len() < size;
        Ok(Response::new(pb::ListNodesResponse {
            nodes: self
                .views(picked)
                .await
                .into_iter()
                .map(Into::into)
                .collect(),
            next_page_token: match (done, cursor) {
                (false, Some(id)) => id.as_str().to_owned(),
                _ => String::new(),
            },
        }))
    }

    async fn get_node(
        &self,
        request: Request<pb::GetNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        self.admin(&request)?;
        let id = NodeId::new(request.into_inner().node_id)
            .map_err(|e| Error::from(steward_proto::ProtoError::from(e)))?;
        let record = self.ctx.store.node(&id).await?;
        if record.spec.is_none() && record.status.is_none() {
            return Err(Error::UnknownNode(id).into());
        }
        let view = self
            .one_view(id.clone(), record)
            .await
            .ok_or(Error::UnknownNode(id))?;
        Ok(Response::new(view.into()))
    }

    async fn add_roles(
        &self,
        request: Request<pb::ChangeRolesRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        self.admin(&request)?;
        let change = RoleChange::try_from(request.into_inner()).map_err(Error::from)?;
        let view = self.change_roles(change, true).await?;
        Ok(Response::new(view.into()))
    }

    async fn remove_roles(
        &self,
        request: Request<pb::ChangeRolesRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        self.admin(&request)?;
        let change = RoleChange::try_from(request.into_inner()).map_err(Error::from)?;
        let view = self.change_roles(change, false).await?;
        Ok(Response::new(view.into()))
    }

    async fn revoke_node(
        &self,
        request: Request<pb::RevokeNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        let admin = self.admin(&request)?;
        let node = NodeId::new(request.into_inner().node_id)
            .map_err(|e| Error::from(steward_proto::ProtoError::from(e)))?;
        let store = &self.ctx.store;
        if store.revoke_node(&node, &admin.name).await?.is_none() {
            return Err(Error::UnknownNode(node).into());
        }
        warn!(node.id = %node, by = %admin.name, "node certificates revoked");
        self.node_answer(node).await
    }

    async fn revoke_certificate(
        &self,
        request: Request<pb::RevokeCertificateRequest>,
    ) -> Result<Response<pb::CertificateRevocation>, Status> {
        let admin = self.admin(&request)?;
        let wanted = steward_proto::domain::RevokeCertificate::try_from(request.into_inner())
            .map_err(Error::from)?;
        if let Some(refusal) = self.revocation_refusal(&admin, &wanted) {
            return Err(Error::RevocationNeedsForce(refusal).into());
        }
        let record = self
            .ctx
            .store
            .revoke_certificate(wanted.kind, &wanted.name, &admin.name)
            .await?;
        warn!(
            cert.kind = %wanted.kind,
            cert.name = %wanted.name,
            cert.revoked_unix_s = record.revoked_unix_s,
            by = %admin.name,
            "certificates revoked"
        );
        Ok(Response::new(record.view(wanted.kind, wanted.name).into()))
    }

    async fn drain_node(
        &self,
        request: Request<pb::DrainNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        let admin = self.admin(&request)?;
        let request = request.into_inner();
        let node = NodeId::new(&request.node_id)
            .map_err(|e| Error::from(steward_proto::ProtoError::from(e)))?;
        let reason =
            steward_proto::convert::bounded_str("reason", request.reason).map_err(Error::from)?;
        let store = &self.ctx.store;
        let record = store.node(&node).await?;
        if record.spec.is_none() && record.status.is_none() {
            return Err(Error::UnknownNode(node).into());
        }
        let current = record.maintenance.as_ref();
        if !current.is_some_and(|m| m.value.active) {
            let specs = self.ctx.specs.borrow().clone();
            let vips = self.ctx.vips.borrow().clone();
            let orchestration = self.ctx.orchestration.borrow().clone();
            let gated = crate::maintenance::gated_nodes(&node, &specs, &vips, &orchestration);
            let nodes = store.gate_records(gated).await?;
            let refusals = {
                crate::maintenance::Fleet {
                    nodes: &nodes,
                    specs: &specs,
                    vips: &vips,
                    lease: &self.ctx.lease,
                    orchestration: &orchestration,
                }
                .refusals(&node)
            };
            if !refusals.is_empty() && !request.force {
                return Err(Error::DrainRefused { node, refusals }.into());
            }
            let forced = !refusals.is_empty();
            if forced {
                warn!(node.id = %node, by = %admin.name, refusals = %refusals.join("; "), "DRAIN FORCED past its gates");
            }
            let m = crate::store::MaintenanceRecord {
                active: true,
                reason: reason.clone(),
                by: admin.name.clone(),
                at_unix_ms: unix_ms(),
                forced,
            };
            let mut message = format!("{node} draining (by {}", admin.name);
            if !reason.is_empty() {
                message.push_str(&format!(": {reason}"));
            }
            message.push(')');
            if forced {
                message.push_str(&format!("; FORCED past: {}", refusals.join("; ")));
            }
            let event = store.event(EventKind::NodeMaintenance, Some(node.clone()), message);
            let expected = current.map_or(0, |m| m.mod_revision);
            if !store
                .put_maintenance_if(&node, expected, &m, &event)
                .await?
            {
                return Err(Error::Conflict {
                    key: store.keys().node_maintenance(&node),
                }
                .into());
            }
            info!(node.id = %node, by = %admin.name, "node draining");
        }
        self.node_answer(node).await
    }

    async fn undrain_node(
        &self,
        request: Request<pb::UndrainNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        let admin = self.admin(&request)?;
        let node = NodeId::new(request.into_inner().node_id)
            .map_err(|e| Error::from(steward_proto::ProtoError::from(e)))?;
        let store = &self.ctx.store;
        let record = store.node(&node).await?;
        let Some(current) = record.maintenance.filter(|m| m.value.active) else {
            return Err(Error::NotDrained(node).into());
        };
        let m = crate::store::MaintenanceRecord {
            active: false,
            reason: String::new(),
            by: admin.name.clone(),
            at_unix_ms: unix_ms(),
            forced: false,
        };
        let event = store.event(
            EventKind::NodeMaintenance,
            Some(node.clone()),
            format!("{node} back in service (undrained by {})", admin.name),
        );
        if !store
            .put_maintenance_if(&node, current.mod_revision, &m, &event)
            .await?
        {
            return Err(Error::Conflict {
                key: store.keys().node_maintenance(&node),
            }
            .into());
        }
        info!(node.id = %node, by = %admin.name, "node undrained");
        self.node_answer(node).await
    }

    async fn set_vip(&self, request: Request<pb::VipSpec>) -> Result<Response<pb::Vip>, Status> {
        self.admin(&request)?;
        let spec =
            steward_proto::vip::VipSpec::try_from(request.into_inner()).map_err(Error::from)?;
        let name = spec.name.clone();
        vip_admin::set_vip(&self.ctx, spec).await?;
        Ok(Response::new(self.one_vip(&name).await?.into()))
    }

    async fn list_vips(
        &self,
        request: Request<pb::ListVipsRequest>,
    ) -> Result<Response<pb::ListVipsResponse>, Status> {
        self.admin(&request)?;
        let vips = vip_admin::list_vips(&self.ctx, &self.peers).await?;
        Ok(Response::new(pb::ListVipsResponse {
            vips: vips.into_iter().map(Into::into).collect(),
        }))
    }

    async fn move_vip(
        &self,
        request: Request<pb::MoveVipRequest>,
    ) -> Result<Response<pb::Vip>, Status> {
        self.admin(&request)?;
        let VipMove { name, to } = VipMove::try_from(request.into_inner()).map_err(Error::from)?;
        vip_admin::move_vip(&self.ctx, &name, to).await?;
        Ok(Response::new(self.one_vip(&name).await?.into()))
    }

    async fn remove_vip(
        &self,
        request: Request<pb::RemoveVipRequest>,
    ) -> Result<Response<pb::RemoveVipResponse>, Status> {
        self.admin(&request)?;
        vip_admin::remove_vip(&self.ctx, &request.into_inner().name).await?;
        Ok(Response::new(pb::RemoveVipResponse {}))
    }

    async fn apply(
        &self,
        request: Request<pb::ApplyRequest>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        let admin = self.admin(&request)?;
        let request = request.into_inner();
        let rollout = request
            .rollout
            .map(steward_proto::admin::RolloutOptions::from);
        let outcome = cluster_spec::apply::apply(
            &self.ctx,
            &request.spec_toml,
            request.dry_run,
            rollout,
            &admin.name,
        )
        .await?;
        Ok(Response::new(pb::ApplyResponse {
            changes: outcome.changes,
            applied: outcome.applied,
            warnings: outcome.warnings,
            rollout_id: outcome.rollout.unwrap_or_default(),
        }))
    }

    async fn list_rollouts(
        &self,
        request: Request<pb::ListRolloutsRequest>,
    ) -> Result<Response<pb::ListRolloutsResponse>, Status> {
        self.admin(&request)?;
        let rollouts = crate::rollout::list(&self.ctx.store).await?;
        Ok(Response::new(pb::ListRolloutsResponse {
            rollouts: rollouts.into_iter().map(Into::into).collect(),
        }))
    }

    async fn get_rollout(
        &self,
        request: Request<pb::GetRolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        self.admin(&request)?;
        let id = request.into_inner().id;
        Ok(Response::new(
            crate::rollout::get(&self.ctx.store, &id).await?.into(),
        ))
    }

    async fn control_rollout(
        &self,
        request: Request<pb::ControlRolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        let admin = self.admin(&request)?;
        let wanted = steward_proto::admin::RolloutControl::try_from(request.into_inner())
            .map_err(Error::from)?;
        let view = crate::rollout::control(&self.ctx.store, &wanted.id, wanted.action, &admin.name);
        Ok(Response::new(view.await?.into()))
    }

    async fn reboot_rollout(
        &self,
        request: Request<pb::RebootRolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        let admin = self.admin(&request)?;
        let wanted = steward_proto::admin::RebootRollout::try_from(request.into_inner())
            .map_err(Error::from)?;
        let id = crate::rollout::reboot::create(&self.ctx, &wanted, &admin.name).await?;
        Ok(Response::new(
            crate::rollout::get(&self.ctx.store, &id).await?.into(),
        ))
    }

    async fn gluster_pv(
        &self,
        request: Request<pb::GlusterPvRequest>,
    ) -> Result<Response<pb::GlusterPvResponse>, Status> {
        self.admin(&request)?;
        let name = request.into_inner().volume;
        let view = {
            let specs = self.ctx.specs.borrow().clone();
            let vips = self.ctx.vips.borrow().clone();
            // The whole view, as the control plane that applies it sees
            // the volume and the nodes that mount it.
            specs.full_view(&vips)
        };
        let volume = view
            .settings
            .gluster_volumes
            .iter()
            .find(|v| v.name == name)
            .ok_or_else(|| Error::UnknownVolume(name.clone()))?;
        let capacity = self.ctx.orchestration.borrow().capacity(&name);
        let manifest = crate::orchestrate::gluster::pv_manifest(volume, &view, capacity)
            .ok_or_else(|| Error::NoGlusterMounter {
                volume: name.clone(),
                mount_on: roles_display(&volume.mount_on),
            })?;
        Ok(Response::new(pb::GlusterPvResponse {
            manifest,
            nodes: crate::orchestrate::gluster::mounting_nodes(volume, &view)
                .into_iter()
                .map(String::from)
                .collect(),
        }))
    }

    async fn create_token(
        &self,
        request: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let admin = self.admin(&request)?;
        let terms = steward_proto::admin::TokenRequest::try_from(request.into_inner())
            .map_err(Error::from)?;
        let created =
            crate::bootstrap::create_token(&self.ctx.store, &admin.name, terms, &self.ca_hash)
                .await?;
        Ok(Response::new(created.into()))
    }

    async fn list_tokens(
        &self,
        request: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        self.admin(&request)?;
        let tokens = crate::bootstrap::list_tokens(&self.ctx.store).await?;
        Ok(Response::new(pb::ListTokensResponse {
            tokens: tokens.into_iter().map(Into::into).collect(),
        }))
    }

    async fn delete_token(
        &self,
        request: Request<pb::DeleteTokenRequest>,
    ) -> Result<Response<pb::DeleteTokenResponse>, Status> {
        self.admin(&request)?;
        crate::bootstrap::delete_token(&self.ctx.store, &request.get_ref().id).await?;
        Ok(Response::new(pb::DeleteTokenResponse {}))
    }

    type EventsStream = EventStream;
    type LogsStream = LogChunkStream;

    async fn logs(
        &self,
        request: Request<pb::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let admin = self.admin(&request)?;
        let request = request.into_inner();
        let node = NodeId::new(&request.node_id)
            .map_err(|e| Error::from(steward_proto::ProtoError::from(e)))?;
        let query = request.query.ok_or(Error::InvalidRequest(
            steward_proto::ProtoError::MissingField("query"),
        ))?;
        let query = steward_proto::domain::LogQuery::new(
            &query.unit,
            query.since_s,
            query.follow,
            query.lines,
        )
        .map_err(Error::InvalidLogQuery)?;
        let stream = match self.ctx.logs.open(&node, query) {
            Ok(stream) => stream,
            Err(crate::logs::LogError::NotHere(_)) => {
                // Say where the node is, so the caller can ask there.
                let record = self.ctx.store.node(&node).await?;
                if record.spec.is_none() && record.status.is_none() {
                    return Err(Error::UnknownNode(node).into());
                }
                return Err(match record.status.and_then(|s| s.value.replica) {
                    Some(replica) => Error::NodeServedElsewhere { node, replica },
                    None => Error::NodeNotConnected(node),
                }
                .into());
            }
            Err(e) => return Err(Error::from(e).into()),
        };
        let stream: LogChunkStream = Box::pin(tokio_stream::StreamExt::map(stream, |chunk| {
            Ok(chunk.into())
        }));
        Ok(Response::new(self.until_revoked(stream, admin)))
    }

    async fn events(
        &self,
        request: Request<pb::EventsRequest>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        let admin = self.admin(&request)?;
        let query = EventsQuery::from(request.into_inner());
        let (past, revision) = self.ctx.store.recent_events(query.limit).await?;
        let (tx, rx) = mpsc::channel(64);
        let store = self.ctx.store.clone();
        let shutdown = self.ctx.shutdown.clone();
        tokio::spawn(async move {
            for event in past {
                if tx.send(Ok(event.into())).await.is_err() {
                    return;
                }
            }
            if !query.follow {
                return;
            }
            let mut stream = match store.watch_events(revision + 1).await {
                Ok(s) => s,
                Err(error) => {
                    let _ = tx.send(Err(error.into())).await;
                    return;
                }
            };
            loop {
                let message = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tx.closed() => return,
                    m = stream.next() => m,
                };
                let changes = match message {
                    Ok(Some(changes)) => changes,
                    Ok(None) => return,
                    Err(error) => {
                        let _ = tx.send(Err(error.into())).await;
                        return;
                    }
                };
                for change in changes {
                    let Change::Put(kv) = change else {
                        continue;
                    };
                    match decode::<Event>(&kv.key, &kv.value) {
                        Ok(mut event) => {
                            event.revision = kv.mod_revision as u64;
                            if tx.send(Ok(event.into())).await.is_err() {
                                return;
                            }
                        }
                        Err(error) => warn!(%error, "skipping corrupt event"),
                    }
                }
            }
        });
        let stream: EventStream = Box::pin(ReceiverStream::new(rx));
        Ok(Response::new(self.until_revoked(stream, admin)))
    }
}

#[cfg(test)]
mod tests {
    use steward_proto::domain::{Facts, Health, NetworkInterface, Role};

    use super::*;
    use crate::store::{MemoryBackend, NodeStatusRecord};
    use crate::testing::{node, vip_spec, TestReplica};

    async fn admin() -> (TestReplica, AdminApi) {
        let replica = TestReplica::start(MemoryBackend::new(), "c-1").await;
        let (_, leadership) = tokio::sync::watch::channel(Leadership::Follower);
        // Never dialled: every node here is served by this replica.
        let peers = Peers::new(Default::default(), replica.ctx.specs.clone());
        let api = AdminApi::new(replica.ctx.clone(), leadership, "test".into(), peers);
        (replica, api)
    }

    /// Node `id` as its first session records it, on 198.18.0.0/24.
    async fn connected(store: &Store, id: &str) {
        let facts = Facts {
            interfaces: vec![NetworkInterface {
                name: "eth0".into(),
                mac: String::new(),
                addresses: vec!["198.18.0.7/24".into()],
            }],
            ..Default::default()
        };
        store.put_facts(&node(id), &facts, None).await.unwrap();
        let status = NodeStatusRecord {
            health: NodeHealth::Healthy,
            last_health: Health::default(),
            replica: None,
            last_seen_unix_ms: 1,
            applied_revision: 0,
            agent_version: "test".into(),
        };
        store.put_status_if(&node(id), 0, &status).await.unwrap();
    }

    fn roles(id: &str, roles: &[Role]) -> RoleChange {
        RoleChange {
            node: node(id),
            roles: roles.iter().copied().collect(),
        }
    }

    #[tokio::test]
    async fn revoking_the_callers_own_certificate_needs_force() {
        use steward_proto::domain::CertName;
        use steward_proto::domain::RevokeCertificate;

        let (_replica, api) = admin().await;
        let api = api.with_own_certificate("c-1.example".into());
        let ops = crate::testing::identity("ops", crate::pki::IdentityKind::Admin);
        let wanted = |kind, name: &str, force| RevokeCertificate {
            kind,
            name: CertName::new(name).unwrap(),
            force,
        };
        let refusal = api
            .revocation_refusal(&ops, &wanted(RevocableKind::Admin, "ops", false))
            .expect("refused");
        assert!(refusal.contains("--force"), "{refusal}");
        let refusal = api
            .revocation_refusal(
                &ops,
                &wanted(RevocableKind::Coordinator, "c-1.example", false),
            )
            .expect("refused");
        assert!(refusal.contains("c-1"), "{refusal}");
        for allowed in [
            wanted(RevocableKind::Admin, "ops", true),
            wanted(RevocableKind::Admin, "alice", false),
            wanted(RevocableKind::Coordinator, "ops", false),
            wanted(RevocableKind::Coordinator, "c-2.example", false),
            wanted(RevocableKind::Coordinator, "c-1.example", true),
        ] {
            assert_eq!(api.revocation_refusal(&ops, &allowed), None, "{allowed:?}");
        }
    }

    #[tokio::test]
    async fn roles_change_only_for_known_nodes_and_are_recorded() {
        let (replica, api) = admin().await;
        let error = api.change_roles(roles("n1", &[Role::Lb]), true).await;
        assert!(matches!(error, Err(Error::UnknownNode(_))), "{error:?}");

        connected(replica.store(), "n1").await;
        let view = api
            .change_roles(roles("n1", &[Role::Lb]), true)
            .await
            .expect("added");
        assert_eq!(view.roles, RoleSet::from([Role::Lb]));
        assert_eq!((view.id, view.replica), (node("n1"), None));
        let (events, _) = replica.store().recent_events(10).await.unwrap();
        let last = events.last().expect("an event");
        assert_eq!(
            (last.kind, last.message.as_str()),
            (EventKind::RolesChanged, "n1 roles: [] -> [lb]")
        );

        // Adding it again changes and records nothing.
        let revision = replica.memory.revision();
        api.change_roles(roles("n1", &[Role::Lb]), true)
            .await
            .expect("unchanged");
        assert_eq!(replica.memory.revision(), revision);

        let error = api
            .change_roles(roles("n1", &[Role::K8sWorker]), false)
            .await
            .expect_err("not assigned");
        assert!(matches!(error, Error::RoleNotAssigned { .. }), "{error}");
        let error = api
            .change_roles(roles("n1", &[]), true)
            .await
            .expect_err("empty");
        assert!(matches!(error, Error::NoRolesNamed), "{error}");
    }

    #[tokio::test]
    async fn vips_are_checked_against_the_fleet_then_set_listed_and_removed() {
        let (replica, api) = admin().await;
        let store = replica.store();
        let ctx = &replica.ctx;
        let spec = vip_spec("front", "198.18.0.100/24");
        let error = vip_admin::set_vip(ctx, spec.clone())
            .await
            .expect_err("no lb");
        assert!(error.to_string().contains("no candidates"), "{error}");

        connected(store, "n1").await;
        api.change_roles(roles("n1", &[Role::Lb]), true)
            .await
            .unwrap();
        let elsewhere = vip_spec("front", "203.0.113.10/24");
        let error = vip_admin::set_vip(ctx, elsewhere)
            .await
            .expect_err("subnet");
        assert!(error.to_string().contains("no candidate (n1)"), "{error}");

        vip_admin::set_vip(ctx, spec.clone()).await.expect("set");
        let listed = api.one_vip("front").await.expect("listed");
        assert_eq!(listed.spec.address, spec.address);
        assert_eq!((listed.epoch, listed.owner), (0, None));
        let error = vip_admin::move_vip(ctx, "front", None)
            .await
            .expect_err("no holder");
        assert!(matches!(error, Error::VipHasNoHolder(_)), "{error}");

        vip_admin::remove_vip(ctx, "front").await.expect("removed");
        assert!(store.vips().await.unwrap().vips.is_empty());
        let error = vip_admin::remove_vip(ctx, "front").await.expect_err("gone");
        assert!(matches!(error, Error::UnknownVip(_)), "{error}");
        let removed = store.txn(
            crate::store::kv::Txn::new()
                .when([crate::store::kv::Cmp::absent(store.keys().vips_removed())]),
            "test",
        );
        assert!(
            !removed.await.unwrap().succeeded,
            "vips/.removed was touched"
        );
    }
}
