//! Floating IPs (VIPs) as the rest of the code sees them: the operator's
//! definition ([`VipSpec`], stored at `vips/<name>/spec`), the local health
//! check ([`VipCheck`]), and the validated messages of the lease stream
//! ([`LeaseHeartbeat`], [`LeaseReply`]) with their wire conversions.
//!
//! The protocol itself lives in [`crate::lease`].

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::convert::{bounded_list, bounded_str, ProtoError};
use crate::domain::NodeId;
use crate::lease::{Assignment, Claim, Epoch, LeaseParams, Target};
use crate::pb;

/// An address with its prefix length, e.g. `198.18.0.100/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub address: IpAddr,
    pub prefix: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid address {input:?}: {reason}")]
pub struct InvalidCidr {
    pub input: String,
    pub reason: &'static str,
}

impl Cidr {
    /// The network: this address with its host bits cleared.
    pub fn network(&self) -> IpAddr {
        match self.address {
            IpAddr::V4(a) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        }
    }

    /// Whether `other` lies in this address's subnet (the same family, the
    /// same network at this prefix length).
    pub fn contains(&self, other: IpAddr) -> bool {
        let other = Cidr {
            address: other,
            prefix: self.prefix,
        };
        self.address.is_ipv4() == other.address.is_ipv4() && self.network() == other.network()
    }
}

impl FromStr for Cidr {
    type Err = InvalidCidr;
    fn from_str(s: &str) -> Result<Self, InvalidCidr> {
        let err = |reason| InvalidCidr {
            input: s.to_owned(),
            reason,
        };
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| err("expected ADDRESS/PREFIX, e.g. 198.18.0.100/24"))?;
        let address: IpAddr = addr.parse().map_err(|_| err("not an IP address"))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| err("the prefix length is not a number"))?;
        let max = if address.is_ipv4() { 32 } else { 128 };
        if prefix == 0 || prefix > max {
            return Err(err(if address.is_ipv4() {
                "the prefix length must be 1..=32"
            } else {
                "the prefix length must be 1..=128"
            }));
        }
        if address.is_unspecified() || address.is_multicast() || address.is_loopback() {
            return Err(err(
                "a VIP must be a unicast address (not unspecified, multicast or loopback)",
            ));
        }
        if let IpAddr::V4(v4) = address {
            if v4.is_broadcast() {
                return Err(err("a VIP must be a unicast address"));
            }
        }
        Ok(Cidr { address, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)
    }
}

/// How a node decides it can serve a VIP.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum VipCheck {
    /// HAProxy runs on this node: its admin socket answers `show info`.
    #[default]
    Haproxy,
    /// A TCP connection to `host:port` succeeds.
    Tcp(String),
    /// `GET url` answers 2xx or 3xx.
    Http(String),
    /// Always healthy.
    None,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid check {input:?}: expected \"haproxy\", \"tcp:HOST:PORT\", \"http://HOST:PORT/PATH\" or \"none\"")]
pub struct InvalidCheck {
    pub input: String,
}

impl FromStr for VipCheck {
    type Err = InvalidCheck;
    fn from_str(s: &str) -> Result<Self, InvalidCheck> {
        let err = || InvalidCheck {
            input: s.to_owned(),
        };
        let has_port = |hostport: &str| {
            hostport
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
        };
        match s {
            "" | "haproxy" => Ok(VipCheck::Haproxy),
            "none" => Ok(VipCheck::None),
            _ => {
                if let Some(hostport) = s.strip_prefix("tcp:") {
                    return has_port(hostport)
                        .then(|| VipCheck::Tcp(hostport.to_owned()))
                        .ok_or_else(err);
                }
                if let Some(rest) = s.strip_prefix("http://") {
                    let hostport = rest.split('/').next().unwrap_or_default();
                    return has_port(hostport)
                        .then(|| VipCheck::Http(s.to_owned()))
                        .ok_or_else(err);
                }
                Err(err())
            }
        }
    }
}

impl fmt::Display for VipCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VipCheck::Haproxy => f.write_str("haproxy"),
            VipCheck::Tcp(hostport) => write!(f, "tcp:{hostport}"),
            VipCheck::Http(url) => f.write_str(url),
            VipCheck::None => f.write_str("none"),
        }
    }
}

impl Serialize for VipCheck {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for VipCheck {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A VIP as an operator defines it (`vips/<name>/spec`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipSpec {
    pub name: String,
    /// `ADDRESS/PREFIX`.
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    #[serde(default)]
    pub check: VipCheck,
    /// Empty: every node with the lb role.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub candidates: Vec<NodeId>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub priority: BTreeMap<NodeId, u32>,
    #[serde(default)]
    pub preempt: bool,
}

impl VipSpec {
    /// The validated address (specs are validated before they are stored).
    pub fn cidr(&self) -> Result<Cidr, InvalidCidr> {
        self.address.parse()
    }

    pub fn target(&self) -> Result<Target, InvalidCidr> {
        let cidr = self.cidr()?;
        Ok(Target {
            address: cidr.address,
            prefix: cidr.prefix,
            interface: self.interface.clone(),
        })
    }

    /// Every problem with this spec on its own (what needs the fleet is
    /// checked by the coordinator).
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if let Err(e) = NodeId::new(self.name.clone()) {
            p.push(format!("name: {}", e.reason));
        }
        if let Err(e) = self.cidr() {
            p.push(e.to_string());
        }
        if let Some(interface) = &self.interface {
            if interface.is_empty()
                || interface.len() > 15
                || interface.contains('/')
                || interface.contains(char::is_whitespace)
            {
                p.push(format!(
                    "interface {interface:?}: not a valid interface name (1-15 characters, no '/' or spaces)"
                ));
            }
        }
        for node in self.priority.keys() {
            if !self.candidates.is_empty() && !self.candidates.contains(node) {
                p.push(format!("priority: {node} is not among the candidates"));
            }
        }
        p
    }
}

/// `[vip]` in the agent's and the coordinator's config: the lease protocol's
/// timing. Both sides must agree (replicas refuse agents that do not).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseConfig {
    /// "default" (failover in about 1 s) or "fast" (about 250 ms, for
    /// quiet LANs); the keys below override single values.
    pub profile: Option<String>,
    pub heartbeat_ms: Option<u64>,
    pub lease_ms: Option<u64>,
    pub drift_margin: Option<f64>,
    /// Coordinator replicas in the cluster (quorum = replicas/2 + 1).
    pub replicas: Option<usize>,
}

impl LeaseConfig {
    /// The parameters, or every problem with them (prefixed `vip.`).
    pub fn params(&self, default_replicas: usize) -> Result<LeaseParams, Vec<String>> {
        let base = match self.profile.as_deref() {
            None | Some("default") => LeaseParams::DEFAULT,
            Some("fast") => LeaseParams::FAST,
            Some(other) => {
                return Err(vec![format!(
                    "vip.profile = {other:?}: expected \"default\" or \"fast\""
                )])
            }
        };
        let params = LeaseParams {
            heartbeat: self
                .heartbeat_ms
                .map_or(base.heartbeat, Duration::from_millis),
            lease: self.lease_ms.map_or(base.lease, Duration::from_millis),
            drift_margin: self.drift_margin.unwrap_or(base.drift_margin),
            replicas: self.replicas.unwrap_or(default_replicas),
        };
        let problems: Vec<String> = params
            .problems()
            .into_iter()
            .map(|p| format!("vip: {p}"))
            .collect();
        if problems.is_empty() {
            Ok(params)
        } else {
            Err(problems)
        }
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

fn invalid(field: &'static str) -> ProtoError {
    ProtoError::Invalid { field }
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

impl TryFrom<pb::VipSpec> for VipSpec {
    type Error = ProtoError;
    fn try_from(s: pb::VipSpec) -> Result<Self, ProtoError> {
        Ok(VipSpec {
            name: bounded_str("name", s.name)?,
            address: bounded_str("address", s.address)?,
            interface: (!s.interface.is_empty())
                .then(|| bounded_str("interface", s.interface))
                .transpose()?,
            check: s.check.parse().map_err(|_| invalid("check"))?,
            candidates: bounded_list("candidates", s.candidates)?
                .into_iter()
                .map(NodeId::new)
                .collect::<Result<_, _>>()?,
            priority: s
                .priority
                .into_iter()
                .map(|(node, p)| Ok((NodeId::new(node)?, p)))
                .collect::<Result<_, ProtoError>>()?,
            preempt: s.preempt,
        })
    }
}

impl From<VipSpec> for pb::VipSpec {
    fn from(s: VipSpec) -> Self {
        pb::VipSpec {
            name: s.name,
            address: s.address,
            interface: s.interface.unwrap_or_default(),
            check: s.check.to_string(),
            candidates: s.candidates.into_iter().map(String::from).collect(),
            priority: s
                .priority
                .into_iter()
                .map(|(n, p)| (String::from(n), p))
                .collect(),
            preempt: s.preempt,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_and_reject_nonsense() {
        let c: Cidr = "198.18.0.100/24".parse().unwrap();
        assert_eq!(c.prefix, 24);
        assert!(c.contains("198.18.0.7".parse().unwrap()));
        assert!(!c.contains("198.18.1.7".parse().unwrap()));
        let v6: Cidr = "2001:db8::10/64".parse().unwrap();
        assert!(v6.contains("2001:db8::1".parse().unwrap()));
        assert!(!v6.contains("198.18.0.7".parse().unwrap()));
        for bad in [
            "198.18.0.100",
            "198.18.0.300/24",
            "198.18.0.1/33",
            "198.18.0.1/0",
            "0.0.0.0/8",
            "224.0.0.1/4",
            "127.0.0.1/8",
            "2001:db8::1/129",
            "x/24",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn checks_round_trip_and_reject_nonsense() {
        for s in [
            "haproxy",
            "none",
            "tcp:127.0.0.1:80",
            "http://127.0.0.1:8404/healthz",
        ] {
            assert_eq!(s.parse::<VipCheck>().unwrap().to_string(), s);
        }
        for bad in ["tcp:80", "tcp:host:x", "http://host/", "ftp://x:1", "bogus"] {
            assert!(bad.parse::<VipCheck>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn spec_problems_are_all_reported() {
        let spec = VipSpec {
            name: "Front".into(),
            address: "198.18.0.1/40".into(),
            interface: Some("eth0/1".into()),
            check: VipCheck::Haproxy,
            candidates: vec![NodeId::new("lb-1").unwrap()],
            priority: [(NodeId::new("lb-9").unwrap(), 5)].into(),
            preempt: false,
        };
        assert_eq!(spec.problems().len(), 4, "{:?}", spec.problems());
        let v6 = VipSpec {
            name: "front".into(),
            address: "2001:db8::10/64".into(),
            interface: None,
            priority: Default::default(),
            ..spec
        };
        assert_eq!(v6.problems(), Vec::<String>::new());
    }

    #[test]
    fn lease_config_profiles_overrides_and_problems() {
        let fast = LeaseConfig {
            profile: Some("fast".into()),
            ..Default::default()
        };
        assert_eq!(fast.params(3).unwrap(), LeaseParams::FAST);
        let custom = LeaseConfig {
            lease_ms: Some(900),
            ..Default::default()
        };
        let p = custom.params(5).unwrap();
        assert_eq!(p.lease, Duration::from_millis(900));
        assert_eq!(p.replicas, 5);
        let bad = LeaseConfig {
            heartbeat_ms: Some(400),
            lease_ms: Some(500),
            ..Default::default()
        };
        let problems = bad.params(3).unwrap_err();
        assert!(
            problems[0].contains("at least 3 heartbeats"),
            "{problems:?}"
        );
        let unknown = LeaseConfig {
            profile: Some("turbo".into()),
            ..Default::default()
        };
        assert!(unknown.params(3).is_err());
    }

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
