//! ARP on the wire: the probe before a VIP is bound (RFC 5227: is anyone
//! using this address?) and the gratuitous ARP after (neighbours, switches
//! and routers: this address now lives at this MAC).
//!
//! Both go through a packet socket bound to the interface
//! ([`crate::packet`]), so they work whether or not the address is
//! configured. IPv6 addresses go to [`crate::ndp`].

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use crate::address::NetError;
use crate::packet::{PacketSocket, BROADCAST};

const ETH_P_ARP: u16 = 0x0806;
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

/// Whether another host answers for `address` on `interface`: sends
/// probes at the start and halfway through `wait` (ARP with sender 0.0.0.0,
/// RFC 5227; for IPv6, a duplicate address detection solicitation, RFC
/// 4862), and listens for a conflict until `wait` has passed.
pub async fn probe(interface: &str, address: IpAddr, wait: Duration) -> Result<bool, NetError> {
    let address = match address {
        IpAddr::V4(a) => a,
        IpAddr::V6(a) => return crate::ndp::probe(interface, a, wait).await,
    };
    let socket = PacketSocket::open(interface, ETH_P_ARP)?;
    let probe = ArpFrame {
        destination: BROADCAST,
        op: Op::Request as u16,
        sender_mac: socket.mac,
        sender_ip: Ipv4Addr::UNSPECIFIED,
        target_mac: [0; 6],
        target_ip: address,
    };
    let mac = socket.mac;
    socket
        .probe(&probe.encode(), wait, |bytes| {
            ArpFrame::decode(bytes).is_some_and(|f| f.conflicts(address, mac))
        })
        .await
}

/// Tells the link that `address` now lives at `interface`'s MAC: for IPv4
/// a gratuitous ARP request and reply, both broadcast, so that every
/// neighbour with an entry for the address moves it whichever kind its
/// stack honours; for IPv6 an unsolicited neighbour advertisement.
pub fn announce(interface: &str, address: IpAddr) -> Result<(), NetError> {
    let address = match address {
        IpAddr::V4(a) => a,
        IpAddr::V6(a) => return crate::ndp::announce(interface, a),
    };
    let socket = PacketSocket::open(interface, ETH_P_ARP)?;
    for op in [Op::Request, Op::Reply] {
        let frame = ArpFrame {
            destination: BROADCAST,
            op: op as u16,
            sender_mac: socket.mac,
            sender_ip: address,
            target_mac: if op == Op::Reply { BROADCAST } else { [0; 6] },
            target_ip: address,
        };
        socket.send(&frame.encode())?;
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
