//! Conversions between wire types ([`crate::pb`]) and domain types
//! ([`crate::domain`]). Inbound conversions validate and fail with a
//! [`ProtoError`] that names the offending field.

use std::collections::BTreeSet;

use crate::domain::{
    AgentMessage, CertName, CertRevocation, CoordinatorMessage, CoordinatorRevocation,
    DesiredState, Disk, Event, EventKind, Facts, GlusterBrickReport, GlusterReport,
    GlusterVolumeReport, Health, InvalidCertName, InvalidNodeId, LogChunk, LogQuery,
    MaintenanceView, NetworkInterface, NodeHealth, NodeId, NodeView, RebootRequest, RebootRequired,
    RevocableKind, RevokeCertificate, Role, RoleChange, RoleSet, MAX_COORDINATOR_REVOCATIONS,
    MAX_GLUSTER_BRICKS, MAX_GLUSTER_VOLUMES, MAX_LOG_CHUNK, MAX_LOG_LINE,
};
use crate::pb;

/// Longest string field we accept from a peer.
pub const MAX_STRING_LEN: usize = 1024;
/// Longest repeated field we accept from a peer.
pub const MAX_LIST_LEN: usize = 1024;

/// Why an inbound message is invalid.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProtoError {
    #[error("missing field `{0}`")]
    MissingField(&'static str),
    #[error(transparent)]
    InvalidNodeId(#[from] InvalidNodeId),
    #[error(transparent)]
    InvalidCertName(#[from] InvalidCertName),
    #[error("field `{field}` holds unknown role number {value}")]
    UnknownRole { field: &'static str, value: i32 },
    #[error("field `{field}` holds unknown enum number {value}")]
    UnknownEnum { field: &'static str, value: i32 },
    #[error("field `{field}` is longer than {limit}")]
    TooLong { field: &'static str, limit: usize },
    #[error("field `{field}` is not a finite number")]
    NotFinite { field: &'static str },
    #[error("field `{field}` holds an invalid value")]
    Invalid { field: &'static str },
    #[error("label filter {0:?}: use key=value")]
    LabelFilter(String),
}

pub fn bounded_str(field: &'static str, s: String) -> Result<String, ProtoError> {
    if s.len() > MAX_STRING_LEN {
        return Err(ProtoError::TooLong {
            field,
            limit: MAX_STRING_LEN,
        });
    }
    Ok(s)
}

pub fn bounded_list<T>(field: &'static str, v: Vec<T>) -> Result<Vec<T>, ProtoError> {
    bounded_list_of(field, v, MAX_LIST_LEN)
}

/// Members a cluster view may list: an lb node sees every node with a
/// role, a control plane every Kubernetes node, so this list grows with
/// the fleet (designed for 10,000 nodes; ~70 bytes each on the wire).
pub const MAX_MEMBERS: usize = 20_000;

pub fn bounded_list_of<T>(
    field: &'static str,
    v: Vec<T>,
    limit: usize,
) -> Result<Vec<T>, ProtoError> {
    if v.len() > limit {
        return Err(ProtoError::TooLong { field, limit });
    }
    Ok(v)
}

fn finite(field: &'static str, x: f64) -> Result<f64, ProtoError> {
    if x.is_finite() {
        Ok(x)
    } else {
        Err(ProtoError::NotFinite { field })
    }
}

pub fn role_from_pb(field: &'static str, value: i32) -> Result<Role, ProtoError> {
    match pb::Role::try_from(value) {
        Ok(pb::Role::Lb) => Ok(Role::Lb),
        Ok(pb::Role::K8sControlPlane) => Ok(Role::K8sControlPlane),
        Ok(pb::Role::K8sWorker) => Ok(Role::K8sWorker),
        Ok(pb::Role::GlusterBrick) => Ok(Role::GlusterBrick),
        Ok(pb::Role::Unspecified) | Err(_) => Err(ProtoError::UnknownRole { field, value }),
    }
}

pub fn role_to_pb(role: Role) -> pb::Role {
    match role {
        Role::Lb => pb::Role::Lb,
        Role::K8sControlPlane => pb::Role::K8sControlPlane,
        Role::K8sWorker => pb::Role::K8sWorker,
        Role::GlusterBrick => pb::Role::GlusterBrick,
    }
}

pub fn roles_from_pb(field: &'static str, values: &[i32]) -> Result<RoleSet, ProtoError> {
    bounded_list(field, values.to_vec())?
        .into_iter()
        .map(|v| role_from_pb(field, v))
        .collect()
}

pub fn roles_to_pb(roles: &RoleSet) -> Vec<i32> {
    roles.iter().map(|r| role_to_pb(*r) as i32).collect()
}

impl TryFrom<pb::Facts> for Facts {
    type Error = ProtoError;
    fn try_from(f: pb::Facts) -> Result<Self, ProtoError> {
        Ok(Facts {
            hostname: bounded_str("facts.hostname", f.hostname)?,
            os: bounded_str("facts.os", f.os)?,
            kernel: bounded_str("facts.kernel", f.kernel)?,
            cpus: f.cpus,
            memory_bytes: f.memory_bytes,
            disks: bounded_list("facts.disks", f.disks)?
                .into_iter()
                .map(|d| {
                    Ok(Disk {
                        mount_point: bounded_str("facts.disks.mount_point", d.mount_point)?,
                        total_bytes: d.total_bytes,
                        available_bytes: d.available_bytes,
                    })
                })
                .collect::<Result<_, ProtoError>>()?,
            interfaces: bounded_list("facts.interfaces", f.interfaces)?
                .into_iter()
                .map(|i| {
                    Ok(NetworkInterface {
                        name: bounded_str("facts.interfaces.name", i.name)?,
                        mac: bounded_str("facts.interfaces.mac", i.mac)?,
                        addresses: bounded_list("facts.interfaces.addresses", i.addresses)?
                            .into_iter()
                            .map(|a| bounded_str("facts.interfaces.addresses", a))
                            .collect::<Result<_, _>>()?,
                    })
                })
                .collect::<Result<_, ProtoError>>()?,
            boot_id: bounded_str("facts.boot_id", f.boot_id)?,
            reboot_required: f
                .reboot_required
                .map(|r| {
                    Ok::<_, ProtoError>(RebootRequired {
                        since_unix_ms: r.since_unix_ms,
                        source: bounded_str("facts.reboot_required.source", r.source)?,
                        packages: bounded_list("facts.reboot_required.packages", r.packages)?
                            .into_iter()
                            .map(|p| bounded_str("facts.reboot_required.packages", p))
                            .collect::<Result<_, _>>()?,
                    })
                })
                .transpose()?,
        })
    }
}

impl From<Facts> for pb::Facts {
    fn from(f: Facts) -> Self {
        pb::Facts {
            hostname: f.hostname,
            os: f.os,
            kernel: f.kernel,
            cpus: f.cpus,
            memory_bytes: f.memory_bytes,
            disks: f
                .disks
                .into_iter()
                .map(|d| pb::Disk {
                    mount_point: d.mount_point,
                    total_bytes: d.total_bytes,
                    available_bytes: d.available_bytes,
                })
                .collect(),
            interfaces: f
                .interfaces
                .into_iter()
                .map(|i| pb::NetworkInterface {
                    name: i.name,
                    mac: i.mac,
                    addresses: i.addresses,
                })
                .collect(),
            boot_id: f.boot_id,
            reboot_required: f.reboot_required.map(|r| pb::RebootRequired {
                since_unix_ms: r.since_unix_ms,
                source: r.source,
                packages: r.packages,
            }),
        }
    }
}

impl TryFrom<pb::Health> for Health {
    type Error = ProtoError;
    fn try_from(h: pb::Health) -> Result<Self, ProtoError> {
        Ok(Health {
            load1: finite("health.load1", h.load1)?,
            memory_used_bytes: h.memory_used_bytes,
            memory_total_bytes: h.memory_total_bytes,
            max_disk_used_fraction: finite(
                "health.max_disk_used_fraction",
                h.max_disk_used_fraction,
            )?,
        })
    }
}

impl From<Health> for pb::Health {
    fn from(h: Health) -> Self {
        pb::Health {
            load1: h.load1,
            memory_used_bytes: h.memory_used_bytes,
            memory_total_bytes: h.memory_total_bytes,
            max_disk_used_fraction: h.max_disk_used_fraction,
        }
    }
}

impl TryFrom<pb::AgentMessage> for AgentMessage {
    type Error = ProtoError;
    fn try_from(m: pb::AgentMessage) -> Result<Self, ProtoError> {
        use pb::agent_message::Kind;
        match m.kind.ok_or(ProtoError::MissingField("kind"))? {
            Kind::Hello(h) => Ok(AgentMessage::Hello {
                node: NodeId::new(h.node_id)?,
                facts: h
                    .facts
                    .ok_or(ProtoError::MissingField("hello.facts"))?
                    .try_into()?,
                last_applied_revision: h.last_applied_revision,
                agent_version: bounded_str("hello.agent_version", h.agent_version)?,
                advertise_address: match h.advertise_address.as_str() {
                    "" => None,
                    a => Some(a.parse().map_err(|_| ProtoError::Invalid {
                        field: "hello.advertise_address",
                    })?),
                },
            }),
            Kind::Heartbeat(hb) => Ok(AgentMessage::Heartbeat {
                seq: hb.seq,
                sent_at_unix_ms: hb.sent_at_unix_ms,
                health: hb
                    .health
                    .ok_or(ProtoError::MissingField("heartbeat.health"))?
                    .try_into()?,
            }),
            Kind::Report(r) => Ok(AgentMessage::Report {
                applied_revision: r.applied_revision,
                converge: r.converge.map(TryInto::try_into).transpose()?,
            }),
            Kind::LogChunk(c) => Ok(AgentMessage::LogChunk(c.try_into()?)),
            Kind::Facts(f) => Ok(AgentMessage::Facts(f.try_into()?)),
            Kind::Gluster(g) => Ok(AgentMessage::Gluster(g.try_into()?)),
        }
    }
}

impl TryFrom<pb::GlusterReport> for GlusterReport {
    type Error = ProtoError;
    fn try_from(g: pb::GlusterReport) -> Result<Self, ProtoError> {
        let volumes = bounded_list_of("gluster.volumes", g.volumes, MAX_GLUSTER_VOLUMES)?;
        let volumes = volumes
            .into_iter()
            .map(|v| {
                let bricks =
                    bounded_list_of("gluster.volumes.bricks", v.bricks, MAX_GLUSTER_BRICKS)?;
                Ok(GlusterVolumeReport {
                    volume: bounded_str("gluster.volumes.volume", v.volume)?,
                    bricks: bricks
                        .into_iter()
                        .map(|b| {
                            Ok(GlusterBrickReport {
                                brick: bounded_str("gluster.volumes.bricks.brick", b.brick)?,
                                online: b.online,
                                pending_heals: b.heal_known.then_some(b.pending_heals),
                            })
                        })
                        .collect::<Result<_, ProtoError>>()?,
                    error: match v.error.as_str() {
                        "" => None,
                        _ => Some(bounded_str("gluster.volumes.error", v.error)?),
                    },
                })
            })
            .collect::<Result<_, ProtoError>>()?;
        Ok(GlusterReport {
            after_converge_revision: g.after_converge_revision,
            volumes,
        })
    }
}

impl From<GlusterReport> for pb::GlusterReport {
    fn from(g: GlusterReport) -> Self {
        pb::GlusterReport {
            after_converge_revision: g.after_converge_revision,
            volumes: g
                .volumes
                .into_iter()
                .map(|v| pb::GlusterVolumeReport {
                    volume: v.volume,
                    bricks: v
                        .bricks
                        .into_iter()
                        .map(|b| pb::GlusterBrickReport {
                            brick: b.brick,
                            online: b.online,
                            heal_known: b.pending_heals.is_some(),
                            pending_heals: b.pending_heals.unwrap_or(0),
                        })
                        .collect(),
                    error: v.error.unwrap_or_default(),
                })
                .collect(),
        }
    }
}

impl TryFrom<pb::LogChunk> for LogChunk {
    type Error = ProtoError;
    fn try_from(c: pb::LogChunk) -> Result<Self, ProtoError> {
        if c.lines.len() > MAX_LOG_CHUNK {
            return Err(ProtoError::TooLong {
                field: "log_chunk.lines",
                limit: MAX_LOG_CHUNK,
            });
        }
        // A line is cut at MAX_LOG_LINE bytes plus the cut marker.
        let limit = MAX_LOG_LINE + 64;
        if c.lines.iter().any(|l| l.len() > limit) {
            return Err(ProtoError::TooLong {
                field: "log_chunk.lines",
                limit,
            });
        }
        Ok(LogChunk {
            id: c.id,
            lines: c.lines,
            done: c.done,
            error: match c.error.as_str() {
                "" => None,
                _ => Some(bounded_str("log_chunk.error", c.error)?),
            },
        })
    }
}

impl From<LogChunk> for pb::LogChunk {
    fn from(c: LogChunk) -> Self {
        pb::LogChunk {
            id: c.id,
            lines: c.lines,
            done: c.done,
            error: c.error.unwrap_or_default(),
        }
    }
}

impl TryFrom<pb::LogQuery> for LogQuery {
    type Error = ProtoError;
    fn try_from(q: pb::LogQuery) -> Result<Self, ProtoError> {
        LogQuery::new(&q.unit, q.since_s, q.follow, q.lines)
            .map_err(|_| ProtoError::Invalid { field: "log_query" })
    }
}

impl From<LogQuery> for pb::LogQuery {
    fn from(q: LogQuery) -> Self {
        pb::LogQuery {
            unit: q.unit,
            since_s: q.since_s,
            follow: q.follow,
            lines: q.lines,
        }
    }
}

impl From<AgentMessage> for pb::AgentMessage {
    fn from(m: AgentMessage) -> Self {
        use pb::agent_message::Kind;
        let kind = match m {
            AgentMessage::Hello {
                node,
                facts,
                last_applied_revision,
                agent_version,
                advertise_address,
            } => Kind::Hello(pb::Hello {
                node_id: node.into(),
                facts: Some(facts.into()),
                last_applied_revision,
                agent_version,
                advertise_address: advertise_address.map(|a| a.to_string()).unwrap_or_default(),
            }),
            AgentMessage::Heartbeat {
                seq,
                sent_at_unix_ms,
                health,
            } => Kind::Heartbeat(pb::Heartbeat {
                seq,
                sent_at_unix_ms,
                health: Some(health.into()),
            }),
            AgentMessage::Report {
                applied_revision,
                converge,
            } => Kind::Report(pb::Report {
                applied_revision,
                converge: converge.map(Into::into),
            }),
            AgentMessage::LogChunk(c) => Kind::LogChunk(c.into()),
            AgentMessage::Gluster(g) => Kind::Gluster(g.into()),
            AgentMessage::Facts(f) => Kind::Facts(f.into()),
        };
        pb::AgentMessage { kind: Some(kind) }
    }
}

impl TryFrom<pb::CoordinatorMessage> for CoordinatorMessage {
    type Error = ProtoError;
    fn try_from(m: pb::CoordinatorMessage) -> Result<Self, ProtoError> {
        use pb::coordinator_message::Kind;
        match m.kind.ok_or(ProtoError::MissingField("kind"))? {
            Kind::DesiredState(d) => Ok(CoordinatorMessage::DesiredState(Box::new(DesiredState {
                revision: d.revision,
                roles: roles_from_pb("desired_state.roles", &d.roles)?,
                cluster: d.cluster.unwrap_or_default().try_into()?,
                tasks: bounded_list("desired_state.tasks", d.tasks)?
                    .into_iter()
                    .map(TryInto::try_into)
                    .collect::<Result<_, _>>()?,
                files: bounded_list("desired_state.files", d.files)?
                    .into_iter()
                    .map(TryInto::try_into)
                    .collect::<Result<_, _>>()?,
                coordinator_revocations: bounded_list_of(
                    "desired_state.coordinator_revocations",
                    d.coordinator_revocations,
                    MAX_COORDINATOR_REVOCATIONS,
                )?
                .into_iter()
                .map(|r| {
                    Ok(CoordinatorRevocation {
                        name: CertName::new(r.name)?,
                        revoked_unix_s: r.revoked_unix_s,
                    })
                })
                .collect::<Result<_, ProtoError>>()?,
                reboot: d
                    .reboot
                    .map(|r| {
                        Ok::<_, ProtoError>(RebootRequest {
                            generation: r.generation,
                            boot_id: bounded_str("desired_state.reboot.boot_id", r.boot_id)?,
                        })
                    })
                    .transpose()?,
            }))),
            Kind::HeartbeatAck(a) => Ok(CoordinatorMessage::HeartbeatAck {
                seq: a.seq,
                replica: bounded_str("heartbeat_ack.replica_id", a.replica_id)?,
                interval_ms: a.heartbeat_interval_ms,
            }),
            Kind::LogRequest(r) => Ok(CoordinatorMessage::LogRequest {
                id: r.id,
                query: r
                    .query
                    .ok_or(ProtoError::MissingField("log_request.query"))?
                    .try_into()?,
            }),
            Kind::LogCancel(c) => Ok(CoordinatorMessage::LogCancel { id: c.id }),
        }
    }
}

impl From<CoordinatorMessage> for pb::CoordinatorMessage {
    fn from(m: CoordinatorMessage) -> Self {
        use pb::coordinator_message::Kind;
        let kind = match m {
            CoordinatorMessage::DesiredState(d) => Kind::DesiredState(pb::DesiredState {
                revision: d.revision,
                roles: roles_to_pb(&d.roles),
                cluster: Some(d.cluster.into()),
                tasks: d.tasks.into_iter().map(Into::into).collect(),
                files: d.files.into_iter().map(Into::into).collect(),
                coordinator_revocations: d
                    .coordinator_revocations
                    .into_iter()
                    .map(|r| pb::CoordinatorRevocation {
                        name: r.name.into(),
                        revoked_unix_s: r.revoked_unix_s,
                    })
                    .collect(),
                reboot: d.reboot.map(|r| pb::RebootRequest {
                    generation: r.generation,
                    boot_id: r.boot_id,
                }),
            }),
            CoordinatorMessage::HeartbeatAck {
                seq,
                replica,
                interval_ms,
            } => Kind::HeartbeatAck(pb::HeartbeatAck {
                seq,
                replica_id: replica,
                heartbeat_interval_ms: interval_ms,
            }),
            CoordinatorMessage::LogRequest { id, query } => Kind::LogRequest(pb::LogRequest {
                id,
                query: Some(query.into()),
            }),
            CoordinatorMessage::LogCancel { id } => Kind::LogCancel(pb::LogCancel { id }),
        };
        pb::CoordinatorMessage { kind: Some(kind) }
    }
}

pub fn node_health_to_pb(h: NodeHealth) -> pb::NodeHealth {
    match h {
        NodeHealth::Healthy => pb::NodeHealth::Healthy,
        NodeHealth::Degraded => pb::NodeHealth::Degraded,
        NodeHealth::Unreachable => pb::NodeHealth::Unreachable,
        NodeHealth::Disconnected => pb::NodeHealth::Disconnected,
    }
}

pub fn node_health_from_pb(value: i32) -> Result<NodeHealth, ProtoError> {
    match pb::NodeHealth::try_from(value) {
        Ok(pb::NodeHealth::Healthy) => Ok(NodeHealth::Healthy),
        Ok(pb::NodeHealth::Degraded) => Ok(NodeHealth::Degraded),
        Ok(pb::NodeHealth::Unreachable) => Ok(NodeHealth::Unreachable),
        Ok(pb::NodeHealth::Disconnected) => Ok(NodeHealth::Disconnected),
        Ok(pb::NodeHealth::Unspecified) | Err(_) => Err(ProtoError::UnknownEnum {
            field: "node.health",
            value,
        }),
    }
}

impl From<NodeView> for pb::Node {
    fn from(n: NodeView) -> Self {
        pb::Node {
            id: n.id.into(),
            roles: roles_to_pb(&n.roles),
            health: node_health_to_pb(n.health) as i32,
            last_seen_unix_ms: n.last_seen_unix_ms,
            replica: n.replica.unwrap_or_default(),
            facts: Some(n.facts.into()),
            last_health: Some(n.last_health.into()),
            desired_revision: n.desired_revision,
            applied_revision: n.applied_revision,
            address: n.address.map(|a| a.to_string()).unwrap_or_default(),
            converge: n.converge.map(Into::into),
            revoked_unix_ms: n.revoked_unix_ms.unwrap_or(0),
            maintenance: n.maintenance.map(|m| pb::Maintenance {
                state: m.state().into(),
                reason: m.reason,
                by: m.by,
                since_unix_ms: m.since_unix_ms,
                forced: m.forced,
                pending: m.pending,
            }),
            gluster: n.gluster.map(Into::into),
        }
    }
}

impl TryFrom<pb::Node> for NodeView {
    type Error = ProtoError;
    fn try_from(n: pb::Node) -> Result<Self, ProtoError> {
        Ok(NodeView {
            id: NodeId::new(n.id)?,
            roles: roles_from_pb("node.roles", &n.roles)?,
            health: node_health_from_pb(n.health)?,
            last_seen_unix_ms: n.last_seen_unix_ms,
            replica: Some(n.replica).filter(|r| !r.is_empty()),
            facts: n.facts.unwrap_or_default().try_into()?,
            last_health: n.last_health.unwrap_or_default().try_into()?,
            desired_revision: n.desired_revision,
            applied_revision: n.applied_revision,
            address: match n.address.as_str() {
                "" => None,
                a => Some(a.parse().map_err(|_| ProtoError::Invalid {
                    field: "node.address",
                })?),
            },
            converge: n.converge.map(TryInto::try_into).transpose()?,
            revoked_unix_ms: Some(n.revoked_unix_ms).filter(|&t| t != 0),
            maintenance: n
                .maintenance
                .map(|m| {
                    let drained = match m.state.as_str() {
                        "drained" => true,
                        "draining" => false,
                        _ => {
                            return Err(ProtoError::Invalid {
                                field: "node.maintenance.state",
                            })
                        }
                    };
                    Ok(MaintenanceView {
                        drained,
                        reason: m.reason,
                        by: m.by,
                        since_unix_ms: m.since_unix_ms,
                        forced: m.forced,
                        pending: m.pending,
                    })
                })
                .transpose()?,
            gluster: n.gluster.map(TryInto::try_into).transpose()?,
        })
    }
}

pub fn event_kind_to_pb(k: EventKind) -> pb::EventKind {
    match k {
        EventKind::RolesChanged => pb::EventKind::RolesChanged,
        EventKind::NodeRegistered => pb::EventKind::NodeRegistered,
        EventKind::NodeConnected => pb::EventKind::NodeConnected,
        EventKind::NodeDisconnected => pb::EventKind::NodeDisconnected,
        EventKind::LeaderElected => pb::EventKind::LeaderElected,
        EventKind::VipChanged => pb::EventKind::VipChanged,
        EventKind::VipMoved => pb::EventKind::VipMoved,
        EventKind::NodeJoined => pb::EventKind::NodeJoined,
        EventKind::NodeRevoked => pb::EventKind::NodeRevoked,
        EventKind::NodeMaintenance => pb::EventKind::NodeMaintenance,
        EventKind::CertificateRevoked => pb::EventKind::CertificateRevoked,
    }
}

impl TryFrom<pb::ChangeRolesRequest> for RoleChange {
    type Error = ProtoError;
    fn try_from(r: pb::ChangeRolesRequest) -> Result<Self, ProtoError> {
        Ok(RoleChange {
            node: NodeId::new(r.node_id)?,
            roles: roles_from_pb("roles", &r.roles)?,
        })
    }
}

impl From<RoleChange> for pb::ChangeRolesRequest {
    fn from(c: RoleChange) -> Self {
        pb::ChangeRolesRequest {
            node_id: c.node.into(),
            roles: roles_to_pb(&c.roles),
        }
    }
}

impl From<Event> for pb::Event {
    fn from(e: Event) -> Self {
        pb::Event {
            revision: e.revision,
            at_unix_ms: e.at_unix_ms,
            kind: event_kind_to_pb(e.kind) as i32,
            node_id: e.node.map(String::from).unwrap_or_default(),
            replica_id: e.replica,
            message: e.message,
        }
    }
}

impl TryFrom<pb::Event> for Event {
    type Error = ProtoError;
    fn try_from(e: pb::Event) -> Result<Self, ProtoError> {
        let kind = match pb::EventKind::try_from(e.kind) {
            Ok(pb::EventKind::RolesChanged) => EventKind::RolesChanged,
            Ok(pb::EventKind::NodeRegistered) => EventKind::NodeRegistered,
            Ok(pb::EventKind::NodeConnected) => EventKind::NodeConnected,
            Ok(pb::EventKind::NodeDisconnected) => EventKind::NodeDisconnected,
            Ok(pb::EventKind::LeaderElected) => EventKind::LeaderElected,
            Ok(pb::EventKind::VipChanged) => EventKind::VipChanged,
            Ok(pb::EventKind::VipMoved) => EventKind::VipMoved,
            Ok(pb::EventKind::NodeJoined) => EventKind::NodeJoined,
            Ok(pb::EventKind::NodeRevoked) => EventKind::NodeRevoked,
            Ok(pb::EventKind::NodeMaintenance) => EventKind::NodeMaintenance,
            Ok(pb::EventKind::CertificateRevoked) => EventKind::CertificateRevoked,
            Ok(pb::EventKind::Unspecified) | Err(_) => {
                return Err(ProtoError::UnknownEnum {
                    field: "event.kind",
                    value: e.kind,
                })
            }
        };
        Ok(Event {
            revision: e.revision,
            at_unix_ms: e.at_unix_ms,
            kind,
            node: if e.node_id.is_empty() {
                None
            } else {
                Some(NodeId::new(e.node_id)?)
            },
            replica: e.replica_id,
            message: e.message,
        })
    }
}

/// A set of roles as the comma-separated names operators type.
pub fn roles_display(roles: &BTreeSet<Role>) -> String {
    roles
        .iter()
        .map(|r| r.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

pub fn revocable_kind_to_pb(k: RevocableKind) -> pb::CertificateKind {
    match k {
        RevocableKind::Admin => pb::CertificateKind::Admin,
        RevocableKind::Coordinator => pb::CertificateKind::Coordinator,
    }
}

pub fn revocable_kind_from_pb(
    field: &'static str,
    value: i32,
) -> Result<RevocableKind, ProtoError> {
    match pb::CertificateKind::try_from(value) {
        Ok(pb::CertificateKind::Admin) => Ok(RevocableKind::Admin),
        Ok(pb::CertificateKind::Coordinator) => Ok(RevocableKind::Coordinator),
        Ok(pb::CertificateKind::Unspecified) | Err(_) => {
            Err(ProtoError::UnknownEnum { field, value })
        }
    }
}

impl TryFrom<pb::RevokeCertificateRequest> for RevokeCertificate {
    type Error = ProtoError;
    fn try_from(r: pb::RevokeCertificateRequest) -> Result<Self, ProtoError> {
        Ok(RevokeCertificate {
            kind: revocable_kind_from_pb("kind", r.kind)?,
            name: CertName::new(bounded_str("name", r.name)?)?,
            force: r.force,
        })
    }
}

impl From<CertRevocation> for pb::CertificateRevocation {
    fn from(r: CertRevocation) -> Self {
        pb::CertificateRevocation {
            kind: revocable_kind_to_pb(r.kind) as i32,
            name: r.name.into(),
            revoked_unix_s: r.revoked_unix_s,
            at_unix_ms: r.at_unix_ms,
            by: r.by,
        }
    }
}

impl TryFrom<pb::CertificateRevocation> for CertRevocation {
    type Error = ProtoError;
    fn try_from(r: pb::CertificateRevocation) -> Result<Self, ProtoError> {
        Ok(CertRevocation {
            kind: revocable_kind_from_pb("kind", r.kind)?,
            name: CertName::new(bounded_str("name", r.name)?)?,
            revoked_unix_s: r.revoked_unix_s,
            at_unix_ms: r.at_unix_ms,
            by: bounded_str("by", r.by)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_revocations_are_validated_at_the_edge() {
        let request = |kind: pb::CertificateKind, name: &str| pb::RevokeCertificateRequest {
            kind: kind as i32,
            name: name.into(),
            force: false,
        };
        let ok = RevokeCertificate::try_from(request(pb::CertificateKind::Coordinator, "c-1.x"))
            .unwrap();
        assert_eq!(
            (ok.kind, ok.name.as_str(), ok.force),
            (RevocableKind::Coordinator, "c-1.x", false)
        );
        for (kind, name) in [
            (pb::CertificateKind::Unspecified, "ops"),
            (pb::CertificateKind::Admin, ""),
            (pb::CertificateKind::Admin, "a/b"),
            (pb::CertificateKind::Admin, "white space"),
            (pb::CertificateKind::Admin, &"x".repeat(64)),
        ] {
            assert!(
                RevokeCertificate::try_from(request(kind, name)).is_err(),
                "{kind:?} {name:?} accepted"
            );
        }
        assert!(RevokeCertificate::try_from(pb::RevokeCertificateRequest {
            kind: 7,
            name: "ops".into(),
            force: true,
        })
        .is_err());
        for kind in RevocableKind::ALL {
            assert_eq!(kind.as_str().parse::<RevocableKind>(), Ok(kind));
        }
        let agent = "agent".parse::<RevocableKind>().unwrap_err();
        assert!(agent.contains("node revoke"), "{agent}");
        let revocation = CertRevocation {
            kind: RevocableKind::Admin,
            name: CertName::new("ops").unwrap(),
            revoked_unix_s: 1_000,
            at_unix_ms: 1_000_500,
            by: "root".into(),
        };
        let wire = pb::CertificateRevocation::from(revocation.clone());
        assert_eq!(CertRevocation::try_from(wire), Ok(revocation));
    }

    #[test]
    fn role_changes_convert_once_at_the_edge() {
        let change = RoleChange {
            node: NodeId::new("n1").unwrap(),
            roles: RoleSet::from([Role::Lb, Role::GlusterBrick]),
        };
        let wire = pb::ChangeRolesRequest::from(change.clone());
        assert_eq!(RoleChange::try_from(wire.clone()).unwrap(), change);
        let bad_node = pb::ChangeRolesRequest {
            node_id: "Not A Node".into(),
            ..wire.clone()
        };
        assert!(matches!(
            RoleChange::try_from(bad_node),
            Err(ProtoError::InvalidNodeId(_))
        ));
        let bad_role = pb::ChangeRolesRequest {
            roles: vec![99],
            ..wire
        };
        assert!(RoleChange::try_from(bad_role).is_err());
    }

    #[test]
    fn hello_without_facts_is_rejected() {
        let m = pb::AgentMessage {
            kind: Some(pb::agent_message::Kind::Hello(pb::Hello {
                node_id: "n1".into(),
                facts: None,
                last_applied_revision: 0,
                agent_version: String::new(),
                advertise_address: String::new(),
            })),
        };
        assert_eq!(
            AgentMessage::try_from(m),
            Err(ProtoError::MissingField("hello.facts"))
        );
    }

    #[test]
    fn hostile_values_are_rejected() {
        assert!(matches!(
            role_from_pb("roles", 99),
            Err(ProtoError::UnknownRole { value: 99, .. })
        ));
        assert!(role_from_pb("roles", 0).is_err());
        let facts = pb::Facts {
            hostname: "x".repeat(MAX_STRING_LEN + 1),
            ..Default::default()
        };
        assert!(matches!(
            Facts::try_from(facts),
            Err(ProtoError::TooLong { .. })
        ));
        let health = pb::Health {
            load1: f64::NAN,
            ..Default::default()
        };
        assert!(Health::try_from(health).is_err());
        let empty = pb::AgentMessage { kind: None };
        assert_eq!(
            AgentMessage::try_from(empty),
            Err(ProtoError::MissingField("kind"))
        );
    }

    #[test]
    fn messages_round_trip() {
        let hello = AgentMessage::Hello {
            node: NodeId::new("n1").unwrap(),
            facts: Facts {
                hostname: "n1".into(),
                cpus: 2,
                boot_id: "0f8c8b2a-5a6e-4b53-9a49-3d2f4c0e1b7d".into(),
                reboot_required: Some(RebootRequired {
                    since_unix_ms: 1_700_000_000_000,
                    source: "reboot-required".into(),
                    packages: vec!["linux-image-amd64".into()],
                }),
                ..Default::default()
            },
            last_applied_revision: 7,
            agent_version: "0.1.0".into(),
            advertise_address: Some("198.18.0.9".parse().unwrap()),
        };
        let wire: pb::AgentMessage = hello.clone().into();
        assert_eq!(AgentMessage::try_from(wire), Ok(hello.clone()));
        let AgentMessage::Hello { facts, .. } = hello else {
            unreachable!("a hello")
        };
        let again = AgentMessage::Facts(facts);
        let wire: pb::AgentMessage = again.clone().into();
        assert_eq!(AgentMessage::try_from(wire), Ok(again));
        let gluster = AgentMessage::Gluster(GlusterReport {
            after_converge_revision: 4,
            volumes: vec![GlusterVolumeReport {
                volume: "data".into(),
                bricks: vec![
                    GlusterBrickReport {
                        brick: "198.18.0.2:/data/brick".into(),
                        online: true,
                        pending_heals: Some(3),
                    },
                    GlusterBrickReport {
                        brick: "198.18.0.3:/data/brick".into(),
                        online: false,
                        pending_heals: None,
                    },
                ],
                error: None,
            }],
        });
        let wire: pb::AgentMessage = gluster.clone().into();
        assert_eq!(AgentMessage::try_from(wire), Ok(gluster));
        let too_many = pb::GlusterReport {
            volumes: vec![pb::GlusterVolumeReport::default(); MAX_GLUSTER_VOLUMES + 1],
            ..Default::default()
        };
        assert!(matches!(
            GlusterReport::try_from(too_many),
            Err(ProtoError::TooLong { .. })
        ));
        let desired = CoordinatorMessage::DesiredState(Box::new(DesiredState {
            revision: 9,
            roles: [Role::Lb, Role::GlusterBrick].into(),
            cluster: crate::converge::ClusterView {
                members: vec![crate::converge::Member {
                    node: NodeId::new("n1").unwrap(),
                    roles: [Role::Lb].into(),
                    address: None,
                }],
                vips: Vec::new(),
                settings: Default::default(),
            },
            tasks: vec![crate::converge::Task {
                id: "kubeadm-join".into(),
                argv: vec!["kubeadm".into(), "join".into()],
                creates: Some("/etc/kubernetes/kubelet.conf".into()),
                unless: None,
                summary: "kubeadm join".into(),
                inputs: vec![crate::converge::SecretFile {
                    path: "/run/steward-agent/kubeadm/kubeadm-join.yaml".into(),
                    content: b"token: x".to_vec(),
                    mode: 0o600,
                }],
            }],
            files: vec![crate::converge::SecretFile {
                path: "/etc/kubernetes/pki/ca.key".into(),
                content: b"k".to_vec(),
                mode: 0o600,
            }],
            coordinator_revocations: vec![CoordinatorRevocation {
                name: CertName::new("coord-2").unwrap(),
                revoked_unix_s: 1_800_000_000,
            }],
            reboot: Some(RebootRequest {
                generation: 42,
                boot_id: "0f8c8b2a-5a6e-4b53-9a49-3d2f4c0e1b7d".into(),
            }),
        }));
        let wire: pb::CoordinatorMessage = desired.clone().into();
        assert_eq!(CoordinatorMessage::try_from(wire), Ok(desired));
    }

    #[test]
    fn coordinator_revocations_are_bounded_and_named() {
        let message = |names: Vec<String>| pb::CoordinatorMessage {
            kind: Some(pb::coordinator_message::Kind::DesiredState(
                pb::DesiredState {
                    coordinator_revocations: names
                        .into_iter()
                        .map(|name| pb::CoordinatorRevocation {
                            name,
                            revoked_unix_s: 1,
                        })
                        .collect(),
                    ..Default::default()
                },
            )),
        };
        let full = (0..MAX_COORDINATOR_REVOCATIONS)
            .map(|i| format!("c-{i}"))
            .collect::<Vec<_>>();
        assert!(CoordinatorMessage::try_from(message(full.clone())).is_ok());
        let mut over = full;
        over.push("c-x".into());
        assert_eq!(
            CoordinatorMessage::try_from(message(over)),
            Err(ProtoError::TooLong {
                field: "desired_state.coordinator_revocations",
                limit: MAX_COORDINATOR_REVOCATIONS,
            })
        );
        assert!(matches!(
            CoordinatorMessage::try_from(message(vec!["no such/name".into()])),
            Err(ProtoError::InvalidCertName(_))
        ));
    }
}
