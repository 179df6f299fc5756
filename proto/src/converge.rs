//! What a node's roles plan from ([`ClusterView`]) and what the agent reports
//! back about converging its host ([`ConvergeReport`]), with their wire
//! conversions.

use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::convert::{bounded_list, bounded_str, roles_from_pb, roles_to_pb, ProtoError};
use crate::domain::{NodeId, RoleSet};
use crate::pb;

/// The part of the cluster a node's roles plan from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterView {
    /// Every node with at least one role, ordered by id.
    pub members: Vec<Member>,
    /// Ordered by name.
    pub vips: Vec<VipView>,
}

impl ClusterView {
    /// Members that have `role`, ordered by id.
    pub fn with_role(&self, role: crate::domain::Role) -> impl Iterator<Item = &Member> {
        self.members.iter().filter(move |m| m.roles.contains(&role))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub node: NodeId,
    pub roles: RoleSet,
    /// Where the cluster reaches the node; `None` until it first connected.
    pub address: Option<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipView {
    pub name: String,
    pub address: IpAddr,
    pub prefix: u8,
}

/// How one resource stands after a converge run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResourceStatus {
    /// Already as wanted.
    Ok,
    /// Put right in this run.
    Changed,
    Failed,
    /// Cannot apply on this host (e.g. a kernel setting inside a container).
    NotApplicable,
    /// Not attempted because a resource it needs failed.
    Skipped,
}

impl ResourceStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceStatus::Ok => "ok",
            ResourceStatus::Changed => "changed",
            ResourceStatus::Failed => "failed",
            ResourceStatus::NotApplicable => "not-applicable",
            ResourceStatus::Skipped => "skipped",
        }
    }

    /// Whether the resource is where it should be (or cannot be here).
    pub fn settled(self) -> bool {
        matches!(
            self,
            ResourceStatus::Ok | ResourceStatus::Changed | ResourceStatus::NotApplicable
        )
    }
}

impl fmt::Display for ResourceStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceState {
    /// Kind and name, e.g. `package:haproxy`.
    pub id: String,
    pub status: ResourceStatus,
    /// The error, the reason, or what was changed.
    pub detail: String,
    /// When the resource entered this status.
    pub since_unix_ms: u64,
}

/// The last finished run of the converge loop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvergeReport {
    pub revision: u64,
    pub finished_unix_ms: u64,
    pub duration_ms: u32,
    pub resources: Vec<ResourceState>,
}

impl ConvergeReport {
    /// Resources that failed, in order.
    pub fn failed(&self) -> impl Iterator<Item = &ResourceState> {
        self.resources
            .iter()
            .filter(|r| r.status == ResourceStatus::Failed)
    }

    /// Whether every resource is settled.
    pub fn converged(&self) -> bool {
        self.resources.iter().all(|r| r.status.settled())
    }

    /// The same report without the per-run timing: two runs that found the
    /// host in the same state have equal outcomes.
    pub fn outcome(&self) -> (u64, &[ResourceState]) {
        (self.revision, &self.resources)
    }
}

fn ip(field: &'static str, s: &str) -> Result<IpAddr, ProtoError> {
    s.parse().map_err(|_| ProtoError::Invalid { field })
}

impl TryFrom<pb::ClusterView> for ClusterView {
    type Error = ProtoError;
    fn try_from(v: pb::ClusterView) -> Result<Self, ProtoError> {
        let members = bounded_list("cluster.members", v.members)?
            .into_iter()
            .map(|m| {
                Ok(Member {
                    node: NodeId::new(m.node_id)?,
                    roles: roles_from_pb("cluster.members.roles", &m.roles)?,
                    address: match m.address.as_str() {
                        "" => None,
                        a => Some(ip("cluster.members.address", a)?),
                    },
                })
            })
            .collect::<Result<_, ProtoError>>()?;
        let vips = bounded_list("cluster.vips", v.vips)?
            .into_iter()
            .map(|v| {
                let field = "cluster.vips.address";
                let (address, prefix) = v
                    .address
                    .split_once('/')
                    .ok_or(ProtoError::Invalid { field })?;
                let address = ip(field, address)?;
                let prefix: u8 = prefix.parse().map_err(|_| ProtoError::Invalid { field })?;
                let max = if address.is_ipv4() { 32 } else { 128 };
                if prefix > max {
                    return Err(ProtoError::Invalid { field });
                }
                Ok(VipView {
                    name: bounded_str("cluster.vips.name", v.name)?,
                    address,
                    prefix,
                })
            })
            .collect::<Result<_, ProtoError>>()?;
        Ok(ClusterView { members, vips })
    }
}

impl From<ClusterView> for pb::ClusterView {
    fn from(v: ClusterView) -> Self {
        pb::ClusterView {
            members: v
                .members
                .into_iter()
                .map(|m| pb::Member {
                    node_id: m.node.into(),
                    roles: roles_to_pb(&m.roles),
                    address: m.address.map(|a| a.to_string()).unwrap_or_default(),
                })
                .collect(),
            vips: v
                .vips
                .into_iter()
                .map(|v| pb::VipView {
                    name: v.name,
                    address: format!("{}/{}", v.address, v.prefix),
                })
                .collect(),
        }
    }
}

fn status_from_pb(value: i32) -> Result<ResourceStatus, ProtoError> {
    match pb::ResourceStatus::try_from(value) {
        Ok(pb::ResourceStatus::Ok) => Ok(ResourceStatus::Ok),
        Ok(pb::ResourceStatus::Changed) => Ok(ResourceStatus::Changed),
        Ok(pb::ResourceStatus::Failed) => Ok(ResourceStatus::Failed),
        Ok(pb::ResourceStatus::NotApplicable) => Ok(ResourceStatus::NotApplicable),
        Ok(pb::ResourceStatus::Skipped) => Ok(ResourceStatus::Skipped),
        Ok(pb::ResourceStatus::Unspecified) | Err(_) => Err(ProtoError::UnknownEnum {
            field: "converge.resources.status",
            value,
        }),
    }
}

fn status_to_pb(s: ResourceStatus) -> pb::ResourceStatus {
    match s {
        ResourceStatus::Ok => pb::ResourceStatus::Ok,
        ResourceStatus::Changed => pb::ResourceStatus::Changed,
        ResourceStatus::Failed => pb::ResourceStatus::Failed,
        ResourceStatus::NotApplicable => pb::ResourceStatus::NotApplicable,
        ResourceStatus::Skipped => pb::ResourceStatus::Skipped,
    }
}

impl TryFrom<pb::ConvergeReport> for ConvergeReport {
    type Error = ProtoError;
    fn try_from(r: pb::ConvergeReport) -> Result<Self, ProtoError> {
        Ok(ConvergeReport {
            revision: r.revision,
            finished_unix_ms: r.finished_unix_ms,
            duration_ms: r.duration_ms,
            resources: bounded_list("converge.resources", r.resources)?
                .into_iter()
                .map(|s| {
                    Ok(ResourceState {
                        id: bounded_str("converge.resources.id", s.id)?,
                        status: status_from_pb(s.status)?,
                        detail: bounded_str("converge.resources.detail", s.detail)?,
                        since_unix_ms: s.since_unix_ms,
                    })
                })
                .collect::<Result<_, ProtoError>>()?,
        })
    }
}

impl From<ConvergeReport> for pb::ConvergeReport {
    fn from(r: ConvergeReport) -> Self {
        pb::ConvergeReport {
            revision: r.revision,
            finished_unix_ms: r.finished_unix_ms,
            duration_ms: r.duration_ms,
            resources: r
                .resources
                .into_iter()
                .map(|s| pb::ResourceState {
                    id: s.id,
                    status: status_to_pb(s.status) as i32,
                    detail: s.detail,
                    since_unix_ms: s.since_unix_ms,
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Role;

    fn view() -> ClusterView {
        ClusterView {
            members: vec![Member {
                node: NodeId::new("cp-1".to_owned()).unwrap(),
                roles: [Role::K8sControlPlane].into(),
                address: Some("198.18.0.5".parse().unwrap()),
            }],
            vips: vec![VipView {
                name: "front".into(),
                address: "198.18.0.200".parse().unwrap(),
                prefix: 24,
            }],
        }
    }

    #[test]
    fn cluster_view_round_trips() {
        let wire: pb::ClusterView = view().into();
        assert_eq!(ClusterView::try_from(wire).unwrap(), view());
    }

    #[test]
    fn bad_addresses_in_a_view_are_refused() {
        let mut wire: pb::ClusterView = view().into();
        wire.vips[0].address = "198.18.0.200/33".into();
        assert_eq!(
            ClusterView::try_from(wire.clone()),
            Err(ProtoError::Invalid {
                field: "cluster.vips.address"
            })
        );
        wire.vips.clear();
        wire.members[0].address = "not-an-ip".into();
        assert!(ClusterView::try_from(wire).is_err());
    }

    #[test]
    fn report_round_trips_and_rejects_unknown_status() {
        let report = ConvergeReport {
            revision: 7,
            finished_unix_ms: 1,
            duration_ms: 2,
            resources: vec![ResourceState {
                id: "package:haproxy".into(),
                status: ResourceStatus::NotApplicable,
                detail: "in a container".into(),
                since_unix_ms: 3,
            }],
        };
        let mut wire: pb::ConvergeReport = report.clone().into();
        assert_eq!(ConvergeReport::try_from(wire.clone()).unwrap(), report);
        wire.resources[0].status = 99;
        assert!(ConvergeReport::try_from(wire).is_err());
    }
}
