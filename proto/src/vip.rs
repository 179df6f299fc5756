//! Floating IPs (VIPs) as the rest of the code sees them: the operator's
//! definition ([`VipSpec`], stored at `vips/<name>/spec`), the local health
//! check ([`VipCheck`]) and the address with its prefix ([`Cidr`]).
//!
//! The lease protocol and its stream's messages are `steward-lease`'s.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::convert::{bounded_list, bounded_str, ProtoError};
use crate::domain::NodeId;
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

fn invalid(field: &'static str) -> ProtoError {
    ProtoError::Invalid { field }
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
}
