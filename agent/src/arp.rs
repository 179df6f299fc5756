//! ARP on the wire: the probe before a VIP is bound (RFC 5227: is anyone
//! using this address?) and the gratuitous ARP after (neighbours, switches
//! and routers: this address now lives at this MAC).
//!
//! Both go through an `AF_PACKET` socket bound to the interface, so they
//! work whether or not the address is configured. IPv4 only: IPv6 VIPs are
//! refused when they are defined (see `VipSpec::problems`).

// The only unsafe code in the agent: opening and binding the packet socket
// (libc calls nix has no safe wrapper for with `sockaddr_ll`).
#![allow(unsafe_code)]

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use nix::libc;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::time::Instant;

use crate::address::NetError;

const ETH_P_ARP: u16 = 0x0806;
const BROADCAST: [u8; 6] = [0xff; 6];
const FRAME_LEN: usize = 14 + 28;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Request = 1,
    Reply = 2,
}

/// An Ethernet frame carrying ARP for IPv4.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ArpFrame {
    destination: [u8; 6],
    op: u16,
    sender_mac: [u8; 6],
    sender_ip: Ipv4Addr,
    target_mac: [u8; 6],
    target_ip: Ipv4Addr,
}

impl ArpFrame {
    fn encode(&self) -> [u8; FRAME_LEN] {
        let mut f = [0u8; FRAME_LEN];
        f[0..6].copy_from_slice(&self.destination);
        f[6..12].copy_from_slice(&self.sender_mac);
        f[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
        f[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
        f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
        f[18] = 6;
        f[19] = 4;
        f[20..22].copy_from_slice(&self.op.to_be_bytes());
        f[22..28].copy_from_slice(&self.sender_mac);
        f[28..32].copy_from_slice(&self.sender_ip.octets());
        f[32..38].copy_from_slice(&self.target_mac);
        f[38..42].copy_from_slice(&self.target_ip.octets());
        f
    }

    fn decode(f: &[u8]) -> Option<ArpFrame> {
        if f.len() < FRAME_LEN
            || f[12..14] != ETH_P_ARP.to_be_bytes()
            || f[14..16] != 1u16.to_be_bytes()
            || f[16..18] != 0x0800u16.to_be_bytes()
            || f[18] != 6
            || f[19] != 4
        {
            return None;
        }
        let mac = |r: std::ops::Range<usize>| <[u8; 6]>::try_from(&f[r]).ok();
        let ip = |r: std::ops::Range<usize>| <[u8; 4]>::try_from(&f[r]).ok().map(Ipv4Addr::from);
        Some(ArpFrame {
            destination: mac(0..6)?,
            op: u16::from_be_bytes([f[20], f[21]]),
            sender_mac: mac(22..28)?,
            sender_ip: ip(28..32)?,
            target_mac: mac(32..38)?,
            target_ip: ip(38..42)?,
        })
    }

    /// RFC 5227 §2.1.1: a conflict is any ARP packet from another host
    /// whose sender is the address, or another probe for it.
    fn conflicts(&self, address: Ipv4Addr, own_mac: [u8; 6]) -> bool {
        if self.sender_mac == own_mac {
            return false;
        }
        self.sender_ip == address
            || (self.op == Op::Request as u16
                && self.sender_ip.is_unspecified()
                && self.target_ip == address)
    }
}

/// A packet socket for ARP bound to one interface.
struct ArpSocket {
    fd: AsyncFd<OwnedFd>,
    mac: [u8; 6],
    interface: String,
}

impl ArpSocket {
    fn open(interface: &str) -> Result<ArpSocket, NetError> {
        let fail = |op: &'static str| {
            let interface = interface.to_owned();
            move |source: io::Error| NetError::Packet {
                op,
                interface,
                source,
            }
        };
        let (index, mac) = link_of(interface)?;
        let protocol = ETH_P_ARP.to_be();
        // SAFETY: plain socket(2) call; the returned descriptor is checked
        // and owned by the OwnedFd at once.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                i32::from(protocol),
            )
        };
        if raw < 0 {
            return Err(fail("packet socket")(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh, valid descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        address.sll_family = libc::AF_PACKET as u16;
        address.sll_protocol = protocol;
        address.sll_ifindex = index as i32;
        // SAFETY: the pointer and length describe `address`, which lives
        // across the call; bind(2) only reads it.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::addr_of!(address).cast::<libc::sockaddr>(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(fail("bind packet socket")(io::Error::last_os_error()));
        }
        // SAFETY: an OwnedFd's descriptor stays open and the same for as
        // long as the AsyncFd owns it.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(|e| fail("register packet socket")(e.into()))?;
        Ok(ArpSocket {
            fd,
            mac,
            interface: interface.to_owned(),
        })
    }

    fn send(&self, frame: &ArpFrame) -> Result<(), NetError> {
        nix::sys::socket::send(
            self.fd.get_ref().as_raw_fd(),
            &frame.encode(),
            nix::sys::socket::MsgFlags::empty(),
        )
        .map(|_| ())
        .map_err(|e| NetError::Packet {
            op: "send ARP",
            interface: self.interface.clone(),
            source: e.into(),
        })
    }

    /// The next ARP frame, or `None` at `deadline`.
    async fn receive(&self, deadline: Instant) -> Result<Option<ArpFrame>, NetError> {
        let mut buf = [0u8; 1514];
        loop {
            let ready = tokio::time::timeout_at(deadline, self.fd.readable()).await;
            let Ok(ready) = ready else { return Ok(None) };
            let mut guard = ready.map_err(|source| NetError::Packet {
                op: "wait for ARP",
                interface: self.interface.clone(),
                source,
            })?;
            let received = guard.try_io(|fd| {
                nix::sys::socket::recv(
                    fd.get_ref().as_raw_fd(),
                    &mut buf,
                    nix::sys::socket::MsgFlags::empty(),
                )
                .map_err(io::Error::from)
            });
            match received {
                Ok(Ok(n)) => {
                    if let Some(frame) = ArpFrame::decode(&buf[..n]) {
                        return Ok(Some(frame));
                    }
                }
                Ok(Err(source)) => {
                    return Err(NetError::Packet {
                        op: "receive ARP",
                        interface: self.interface.clone(),
                        source,
                    })
                }
                Err(_would_block) => continue,
            }
        }
    }
}

/// The interface's index and MAC address.
fn link_of(interface: &str) -> Result<(u32, [u8; 6]), NetError> {
    let addresses = nix::ifaddrs::getifaddrs().map_err(|e| NetError::Packet {
        op: "list interfaces",
        interface: interface.to_owned(),
        source: e.into(),
    })?;
    for a in addresses {
        if a.interface_name != interface {
            continue;
        }
        if let Some(link) = a.address.as_ref().and_then(|s| s.as_link_addr()) {
            if let Some(mac) = link.addr() {
                return Ok((link.ifindex() as u32, mac));
            }
        }
    }
    Err(NetError::NoSuchInterface(interface.to_owned()))
}

fn ipv4(address: IpAddr) -> Result<Ipv4Addr, NetError> {
    match address {
        IpAddr::V4(a) => Ok(a),
        IpAddr::V6(_) => Err(NetError::Unsupported(
            "IPv6 VIPs are not supported yet (no neighbour discovery)",
        )),
    }
}

/// Whether another host answers for `address` on `interface`: sends ARP
/// probes (sender 0.0.0.0, RFC 5227) at the start and halfway through
/// `wait`, and listens for a conflict until `wait` has passed.
pub async fn probe(interface: &str, address: IpAddr, wait: Duration) -> Result<bool, NetError> {
    let address = ipv4(address)?;
    let socket = ArpSocket::open(interface)?;
    let probe = ArpFrame {
        destination: BROADCAST,
        op: Op::Request as u16,
        sender_mac: socket.mac,
        sender_ip: Ipv4Addr::UNSPECIFIED,
        target_mac: [0; 6],
        target_ip: address,
    };
    let start = Instant::now();
    let deadline = start + wait;
    let mut second_probe = Some(start + wait / 2);
    socket.send(&probe)?;
    loop {
        let until = second_probe.map_or(deadline, |t| t.min(deadline));
        match socket.receive(until).await? {
            Some(frame) if frame.conflicts(address, socket.mac) => return Ok(true),
            Some(_) => {}
            None if Instant::now() >= deadline => return Ok(false),
            None => {
                second_probe = None;
                socket.send(&probe)?;
            }
        }
    }
}

/// Gratuitous ARP for `address` from `interface`: a request and a reply,
/// both broadcast, so that every neighbour with an entry for the address
/// moves it to this MAC whichever kind its stack honours.
pub fn announce(interface: &str, address: IpAddr) -> Result<(), NetError> {
    let address = ipv4(address)?;
    let socket = ArpSocket::open(interface)?;
    for op in [Op::Request, Op::Reply] {
        socket.send(&ArpFrame {
            destination: BROADCAST,
            op: op as u16,
            sender_mac: socket.mac,
            sender_ip: address,
            target_mac: if op == Op::Reply { BROADCAST } else { [0; 6] },
            target_ip: address,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const OURS: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const THEIRS: [u8; 6] = [2, 0, 0, 0, 0, 2];

    fn frame(op: Op, mac: [u8; 6], sender: &str, target: &str) -> ArpFrame {
        ArpFrame {
            destination: BROADCAST,
            op: op as u16,
            sender_mac: mac,
            sender_ip: sender.parse().expect("ip"),
            target_mac: [0; 6],
            target_ip: target.parse().expect("ip"),
        }
    }

    #[test]
    fn frames_round_trip_and_junk_is_ignored() {
        let f = frame(Op::Reply, THEIRS, "198.18.0.200", "198.18.0.10");
        let bytes = f.encode();
        assert_eq!(ArpFrame::decode(&bytes), Some(f));
        assert_eq!(&bytes[12..14], &[0x08, 0x06]);
        assert_eq!(ArpFrame::decode(&bytes[..30]), None);
        let mut ipv6_ethertype = bytes;
        ipv6_ethertype[12..14].copy_from_slice(&[0x86, 0xdd]);
        assert_eq!(ArpFrame::decode(&ipv6_ethertype), None);
    }

    #[test]
    fn conflicts_per_rfc5227() {
        let vip: Ipv4Addr = "198.18.0.200".parse().expect("ip");
        // The holder answering our probe, or announcing.
        assert!(frame(Op::Reply, THEIRS, "198.18.0.200", "0.0.0.0").conflicts(vip, OURS));
        assert!(frame(Op::Request, THEIRS, "198.18.0.200", "198.18.0.200").conflicts(vip, OURS));
        // Someone else probing for it at the same time.
        assert!(frame(Op::Request, THEIRS, "0.0.0.0", "198.18.0.200").conflicts(vip, OURS));
        // Our own frames, and unrelated traffic, are not conflicts.
        assert!(!frame(Op::Request, OURS, "0.0.0.0", "198.18.0.200").conflicts(vip, OURS));
        assert!(!frame(Op::Request, THEIRS, "198.18.0.10", "198.18.0.200").conflicts(vip, OURS));
        assert!(!frame(Op::Reply, THEIRS, "198.18.0.11", "198.18.0.10").conflicts(vip, OURS));
    }
}
