//! The lease stream's messages as the daemons see them, validated, and
//! their wire conversions (`pb::LeaseHeartbeat`, `pb::LeaseReply`,
//! `pb::VipAssignment`).

use std::time::Duration;

use steward_proto::convert::{bounded_list, bounded_str, ProtoError};
use steward_proto::domain::NodeId;
use steward_proto::pb;
use steward_proto::vip::{Cidr, InvalidCidr, VipCheck, VipSpec};

use crate::{Assignment, Claim, Epoch, Target};

fn invalid(field: &'static str) -> ProtoError {
    ProtoError::Invalid { field }
}

impl Target {
    /// Where the VIP `spec` goes: its address, prefix and interface.
    pub fn of(spec: &VipSpec) -> Result<Target, InvalidCidr> {
        let cidr = spec.cidr()?;
        Ok(Target {
            address: cidr.address,
            prefix: cidr.prefix,
            interface: spec.interface.clone(),
        })
    }
}

/// A VIP as a node is told about it: the assignment and the check to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssignedVip {
    pub assignment: Assignment,
    pub check: VipCheck,
}

/// A candidate's heartbeat to one replica, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseHeartbeat {
    pub node: NodeId,
    pub seq: u64,
    /// On the agent's monotonic clock; opaque to replicas.
    pub sent_at: Duration,
    pub claims: Vec<Claim>,
    /// Local check result per VIP.
    pub health: Vec<(String, bool)>,
    /// The agent's lease `L` and replica count `R`.
    pub lease: Duration,
    pub replicas: u32,
}

/// A replica's answer (or an unsolicited assignment update), validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseReply {
    pub replica: String,
    /// 0: answers no heartbeat.
    pub seq: u64,
    pub sent_at: Duration,
    pub acked: Vec<(String, Epoch)>,
    pub assignments: Vec<AssignedVip>,
}

impl TryFrom<pb::LeaseHeartbeat> for LeaseHeartbeat {
    type Error = ProtoError;
    fn try_from(m: pb::LeaseHeartbeat) -> Result<Self, ProtoError> {
        Ok(LeaseHeartbeat {
            node: NodeId::new(m.node_id)?,
            seq: m.seq,
            sent_at: Duration::from_micros(m.sent_at_us),
            claims: bounded_list("claims", m.claims)?
                .into_iter()
                .map(|c| {
                    Ok(Claim {
                        vip: bounded_str("claims.vip", c.vip)?,
                        epoch: c.epoch,
                        released: c.released,
                    })
                })
                .collect::<Result<_, ProtoError>>()?,
            health: bounded_list("health", m.health)?
                .into_iter()
                .map(|h| Ok((bounded_str("health.vip", h.vip)?, h.healthy)))
                .collect::<Result<_, ProtoError>>()?,
            lease: Duration::from_millis(m.lease_ms.into()),
            replicas: m.replicas,
        })
    }
}

impl From<LeaseHeartbeat> for pb::LeaseHeartbeat {
    fn from(m: LeaseHeartbeat) -> Self {
        pb::LeaseHeartbeat {
            node_id: m.node.to_string(),
            seq: m.seq,
            sent_at_us: m.sent_at.as_micros() as u64,
            claims: m
                .claims
                .into_iter()
                .map(|c| pb::VipClaim {
                    vip: c.vip,
                    epoch: c.epoch,
                    released: c.released,
                })
                .collect(),
            health: m
                .health
                .into_iter()
                .map(|(vip, healthy)| pb::VipHealth { vip, healthy })
                .collect(),
            lease_ms: m.lease.as_millis().min(u32::MAX.into()) as u32,
            replicas: m.replicas,
        }
    }
}

impl TryFrom<pb::VipAssignment> for AssignedVip {
    type Error = ProtoError;
    fn try_from(a: pb::VipAssignment) -> Result<Self, ProtoError> {
        let cidr: Cidr = a
            .address
            .parse()
            .map_err(|_| invalid("assignments.address"))?;
        let owner = if a.owner.is_empty() {
            None
        } else {
            Some(NodeId::new(a.owner)?)
        };
        let interface = (!a.interface.is_empty())
            .then(|| bounded_str("assignments.interface", a.interface))
            .transpose()?;
        Ok(AssignedVip {
            assignment: Assignment {
                vip: bounded_str("assignments.vip", a.vip)?,
                epoch: a.epoch,
                owner,
                target: Target {
                    address: cidr.address,
                    prefix: cidr.prefix,
                    interface,
                },
                release_requested: a.release_requested,
            },
            check: a.check.parse().map_err(|_| invalid("assignments.check"))?,
        })
    }
}

impl From<AssignedVip> for pb::VipAssignment {
    fn from(v: AssignedVip) -> Self {
        let a = v.assignment;
        pb::VipAssignment {
            vip: a.vip,
            epoch: a.epoch,
            owner: a.owner.map(String::from).unwrap_or_default(),
            address: format!("{}/{}", a.target.address, a.target.prefix),
            interface: a.target.interface.unwrap_or_default(),
            release_requested: a.release_requested,
            check: v.check.to_string(),
        }
    }
}

impl TryFrom<pb::LeaseReply> for LeaseReply {
    type Error = ProtoError;
    fn try_from(m: pb::LeaseReply) -> Result<Self, ProtoError> {
        Ok(LeaseReply {
            replica: bounded_str("replica_id", m.replica_id)?,
            seq: m.seq,
            sent_at: Duration::from_micros(m.sent_at_us),
            acked: bounded_list("acked", m.acked)?
                .into_iter()
                .map(|e| Ok((bounded_str("acked.vip", e.vip)?, e.epoch)))
                .collect::<Result<_, ProtoError>>()?,
            assignments: bounded_list("assignments", m.assignments)?
                .into_iter()
                .map(AssignedVip::try_from)
                .collect::<Result<_, ProtoError>>()?,
        })
    }
}

impl From<LeaseReply> for pb::LeaseReply {
    fn from(m: LeaseReply) -> Self {
        pb::LeaseReply {
            replica_id: m.replica,
            seq: m.seq,
            sent_at_us: m.sent_at.as_micros() as u64,
            acked: m
                .acked
                .into_iter()
                .map(|(vip, epoch)| pb::VipEpoch { vip, epoch })
                .collect(),
            assignments: m.assignments.into_iter().map(Into::into).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_messages_round_trip_and_reject_bad_assignments() {
        let hb = LeaseHeartbeat {
            node: NodeId::new("lb-1").unwrap(),
            seq: 9,
            sent_at: Duration::from_micros(123_456),
            claims: vec![Claim {
                vip: "front".into(),
                epoch: 7,
                released: true,
            }],
            health: vec![("front".into(), false)],
            lease: Duration::from_millis(700),
            replicas: 3,
        };
        assert_eq!(
            LeaseHeartbeat::try_from(pb::LeaseHeartbeat::from(hb.clone())).unwrap(),
            hb
        );
        let reply = LeaseReply {
            replica: "c1".into(),
            seq: 9,
            sent_at: Duration::from_micros(123_456),
            acked: vec![("front".into(), 7)],
            assignments: vec![AssignedVip {
                assignment: Assignment {
                    vip: "front".into(),
                    epoch: 7,
                    owner: Some(NodeId::new("lb-1").unwrap()),
                    target: Target {
                        address: "198.18.0.100".parse().unwrap(),
                        prefix: 24,
                        interface: Some("eth0".into()),
                    },
                    release_requested: false,
                },
                check: VipCheck::Tcp("127.0.0.1:80".into()),
            }],
        };
        let wire = pb::LeaseReply::from(reply.clone());
        assert_eq!(LeaseReply::try_from(wire.clone()).unwrap(), reply);
        let mut bad = wire;
        bad.assignments[0].address = "198.18.0.100".into();
        assert!(LeaseReply::try_from(bad).is_err());
    }
}
