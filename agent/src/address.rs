//! The host's addresses, over rtnetlink: where a VIP goes, whether it is
//! there, binding and unbinding it. Every operation is idempotent: adding
//! an address that is there, or removing one that is not, succeeds.

use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressHeaderFlags, AddressMessage};
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::Handle;
use steward_lease::Target;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot open a netlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error("netlink {op}: {source}")]
    Netlink {
        op: &'static str,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("netlink {op}: no answer in {after:?}")]
    Timeout { op: &'static str, after: Duration },
    #[error("no interface named {0:?} on this host")]
    NoSuchInterface(String),
    #[error(
        "no interface on this host has an address in the subnet of {0}; name the VIP's interface"
    )]
    NoInterfaceInSubnet(Target),
    #[error("cannot write {path}: {source}")]
    Sysctl {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{op} on {interface}: {source}")]
    Packet {
        op: &'static str,
        interface: String,
        #[source]
        source: io::Error,
    },
}

/// The kernel answers netlink requests in microseconds; a request with no
/// answer after this long will never get one (a lost reply, a dead
/// connection task). The VIP driver awaits these calls and its lease
/// deadlines are a second or less, so none of them may wait longer.
pub const NETLINK_DEADLINE: Duration = Duration::from_millis(500);

/// `call` with [`NETLINK_DEADLINE`].
async fn bounded<T>(
    op: &'static str,
    call: impl std::future::Future<Output = Result<T, NetError>>,
) -> Result<T, NetError> {
    tokio::time::timeout(NETLINK_DEADLINE, call)
        .await
        .map_err(|_| NetError::Timeout {
            op,
            after: NETLINK_DEADLINE,
        })?
}

fn netlink(op: &'static str) -> impl FnOnce(rtnetlink::Error) -> NetError {
    move |source| NetError::Netlink { op, source }
}

/// The kernel's errno in a netlink error, if that is what it is.
fn errno(error: &rtnetlink::Error) -> Option<i32> {
    match error {
        rtnetlink::Error::NetlinkError(message) => Some(-message.raw_code()),
        _ => None,
    }
}

/// One address on one interface, as the kernel reports it.
#[derive(Debug, Clone)]
struct HostAddress {
    index: u32,
    address: IpAddr,
    prefix: u8,
    message: AddressMessage,
}

/// A connection to the kernel's routing netlink in this network namespace.
pub struct HostNetwork {
    handle: Handle,
}

impl HostNetwork {
    /// Opens the netlink socket; its connection task runs on the current
    /// tokio runtime.
    pub fn connect() -> Result<HostNetwork, NetError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(NetError::Socket)?;
        tokio::spawn(connection);
        Ok(HostNetwork { handle })
    }

    async fn addresses(&self) -> Result<Vec<HostAddress>, NetError> {
        let mut dump = self.handle.address().get().execute();
        let mut out = Vec::new();
        while let Some(message) = dump.try_next().await.map_err(netlink("address dump"))? {
            // IFA_LOCAL is the interface's own address on point-to-point
            // links, where IFA_ADDRESS is the peer's; prefer it.
            let mut address = None;
            for attribute in &message.attributes {
                match attribute {
                    AddressAttribute::Local(a) => address = Some(*a),
                    AddressAttribute::Address(a) if address.is_none() => address = Some(*a),
                    _ => {}
                }
            }
            if let Some(address) = address {
                out.push(HostAddress {
                    index: message.header.index,
                    address,
                    prefix: message.header.prefix_len,
                    message,
                });
            }
        }
        Ok(out)
    }

    async fn link_name(&self, index: u32) -> Result<String, NetError> {
        let mut links = self.handle.link().get().match_index(index).execute();
        while let Some(link) = links.try_next().await.map_err(netlink("link lookup"))? {
            for attribute in link.attributes {
                if let LinkAttribute::IfName(name) = attribute {
                    return Ok(name);
                }
            }
        }
        Err(NetError::NoSuchInterface(format!("#{index}")))
    }

    async fn link_index(&self, name: &str) -> Result<u32, NetError> {
        let mut links = self.handle.link().get().match_name(name).execute();
        match links.try_next().await {
            Ok(Some(link)) => Ok(link.header.index),
            Ok(None) => Err(NetError::NoSuchInterface(name.to_owned())),
            // ENODEV: no such link.
            Err(e) if errno(&e) == Some(19) => Err(NetError::NoSuchInterface(name.to_owned())),
            Err(e) => Err(netlink("link lookup")(e)),
        }
    }

    /// The interface the VIP goes on: the one it names, or else the one
    /// with an address in the VIP's subnet (by that address's own prefix).
    pub async fn resolve_interface(&self, target: &Target) -> Result<(String, u32), NetError> {
        bounded("interface lookup", self.resolve_interface_now(target)).await
    }

    async fn resolve_interface_now(&self, target: &Target) -> Result<(String, u32), NetError> {
        if let Some(name) = &target.interface {
            let index = self.link_index(name).await?;
            return Ok((name.clone(), index));
        }
        let addresses = self.addresses().await?;
        let found = addresses
            .iter()
            .filter(|a| a.address != target.address)
            .find(|a| same_subnet(a.address, a.prefix, target.address))
            .or_else(|| addresses.iter().find(|a| a.address == target.address));
        match found {
            Some(a) => Ok((self.link_name(a.index).await?, a.index)),
            None => Err(NetError::NoInterfaceInSubnet(target.clone())),
        }
    }

    async fn find(&self, target: &Target) -> Result<Option<HostAddress>, NetError> {
        let wanted = match &target.interface {
            Some(name) => match self.link_index(name).await {
                Ok(index) => Some(index),
                Err(NetError::NoSuchInterface(_)) => return Ok(None),
                Err(e) => return Err(e),
            },
            None => None,
        };
        Ok(self
            .addresses()
            .await?
            .into_iter()
            .find(|a| a.address == target.address && wanted.is_none_or(|i| i == a.index)))
    }

    /// Whether the VIP's address is on this host (on its interface, when
    /// the VIP names one).
    pub async fn has_address(&self, target: &Target) -> Result<bool, NetError> {
        bounded("address lookup", async {
            Ok(self.find(target).await?.is_some())
        })
        .await
    }

    /// Adds the VIP's address. Duplicate address detection is ours (the
    /// ARP probe before binding), so IPv6 addresses skip the kernel's, which
    /// would leave them unusable for a second or more.
    pub async fn add_address(&self, target: &Target) -> Result<(), NetError> {
        bounded("address add", self.add_address_now(target)).await
    }

    async fn add_address_now(&self, target: &Target) -> Result<(), NetError> {
        let (_, index) = self.resolve_interface_now(target).await?;
        let mut request = self
            .handle
            .address()
            .add(index, target.address, target.prefix);
        if target.address.is_ipv6() {
            request.message_mut().header.flags |= AddressHeaderFlags::Nodad;
        }
        match request.execute().await {
            Ok(()) => Ok(()),
            // EEXIST: it is there already.
            Err(e) if errno(&e) == Some(17) => Ok(()),
            Err(e) => Err(netlink("address add")(e)),
        }
    }

    /// Removes the VIP's address wherever it is on this host.
    pub async fn remove_address(&self, target: &Target) -> Result<(), NetError> {
        bounded("address delete", self.remove_address_now(target)).await
    }

    async fn remove_address_now(&self, target: &Target) -> Result<(), NetError> {
        let Some(found) = self.find(target).await? else {
            return Ok(());
        };
        match self.handle.address().del(found.message).execute().await {
            Ok(()) => Ok(()),
            // EADDRNOTAVAIL / ENOENT: gone meanwhile.
            Err(e) if matches!(errno(&e), Some(99) | Some(2)) => Ok(()),
            Err(e) => Err(netlink("address delete")(e)),
        }
    }
}

/// Whether `b` lies in the subnet `a/prefix`.
pub fn same_subnet(a: IpAddr, prefix: u8, b: IpAddr) -> bool {
    steward_proto::vip::Cidr { address: a, prefix }.contains(b)
}

/// HAProxy on the passive node must bind the VIP's frontends before the
/// address is there: `net.ipv4.ip_nonlocal_bind` (and the IPv6 twin, if
/// IPv6 is on). Written in this network namespace only.
pub fn enable_nonlocal_bind() -> Result<(), NetError> {
    write_sysctl(Path::new("/proc/sys/net/ipv4/ip_nonlocal_bind"), "1")?;
    match write_sysctl(Path::new("/proc/sys/net/ipv6/ip_nonlocal_bind"), "1") {
        Err(NetError::Sysctl { source, .. }) if source.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

fn write_sysctl(path: &Path, value: &str) -> Result<(), NetError> {
    if std::fs::read_to_string(path).is_ok_and(|v| v.trim() == value) {
        return Ok(());
    }
    std::fs::write(path, value).map_err(|source| NetError::Sysctl {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert!(same_subnet(ip("198.18.5.10"), 24, ip("198.18.5.200")));
        assert!(!same_subnet(ip("198.18.5.10"), 24, ip("198.18.6.200")));
        assert!(same_subnet(ip("198.18.5.10"), 23, ip("198.18.4.1")));
        assert!(!same_subnet(ip("198.18.5.10"), 32, ip("198.18.5.11")));
        assert!(same_subnet(ip("10.0.0.1"), 0, ip("192.168.1.1")));
        assert!(same_subnet(ip("fd00::1"), 64, ip("fd00::ffff")));
        assert!(!same_subnet(ip("fd00::1"), 64, ip("fd00:0:0:1::1")));
        assert!(!same_subnet(ip("fd00::1"), 0, ip("10.0.0.1")));
    }
}
