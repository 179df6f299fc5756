//! IPv6 neighbour discovery on the wire, the twin of [`crate::arp`]: the
//! duplicate address detection probe before a VIP is bound (RFC 4862: a
//! neighbour solicitation from `::` to the solicited-node group) and the
//! unsolicited neighbour advertisement after (RFC 4861 §7.2.6: override
//! flag set, so neighbours move their entry to this MAC).
//!
//! Frames are built whole (Ethernet, IPv6, ICMPv6 with its checksum) and
//! sent through a packet socket: the kernel's ICMPv6 sockets cannot send
//! from the unspecified address that DAD requires.

use std::net::Ipv6Addr;
use std::time::Duration;

use crate::address::NetError;
use crate::packet::PacketSocket;

const ETH_P_IPV6: u16 = 0x86dd;
const ICMPV6: u8 = 58;
const NEIGHBOUR_SOLICITATION: u8 = 135;
const NEIGHBOUR_ADVERTISEMENT: u8 = 136;
/// RFC 4861: ND messages travel one hop and must arrive with 255.
const HOP_LIMIT: u8 = 255;
const OVERRIDE: u8 = 0x20;
const OPTION_TARGET_LINK_ADDRESS: u8 = 2;

/// ff02::1:ffXX:XXXX for `target`.
fn solicited_node(target: Ipv6Addr) -> Ipv6Addr {
    let t = target.octets();
    Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(t[13]),
        u16::from_be_bytes([t[14], t[15]]),
    )
}

/// The Ethernet multicast address for an IPv6 multicast group (RFC 2464).
fn multicast_mac(group: Ipv6Addr) -> [u8; 6] {
    let g = group.octets();
    [0x33, 0x33, g[12], g[13], g[14], g[15]]
}

fn checksum(source: Ipv6Addr, destination: Ipv6Addr, icmp: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for chunk in bytes.chunks(2) {
            let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
    };
    add(&source.octets());
    add(&destination.octets());
    add(&(icmp.len() as u32).to_be_bytes());
    add(&[0, 0, 0, ICMPV6]);
    add(icmp);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet frame carrying `icmp` (checksum field zero) in IPv6.
fn frame(mac: [u8; 6], source: Ipv6Addr, destination: Ipv6Addr, mut icmp: Vec<u8>) -> Vec<u8> {
    let sum = checksum(source, destination, &icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut f = Vec::with_capacity(14 + 40 + icmp.len());
    f.extend_from_slice(&multicast_mac(destination));
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    f.push(ICMPV6);
    f.push(HOP_LIMIT);
    f.extend_from_slice(&source.octets());
    f.extend_from_slice(&destination.octets());
    f.extend_from_slice(&icmp);
    f
}

/// The DAD probe: "who has `target`?", from `::`.
fn solicitation(mac: [u8; 6], target: Ipv6Addr) -> Vec<u8> {
    let mut icmp = vec![NEIGHBOUR_SOLICITATION, 0, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&target.octets());
    frame(mac, Ipv6Addr::UNSPECIFIED, solicited_node(target), icmp)
}

/// "`target` is at `mac`", to all nodes, overriding cached entries.
fn advertisement(mac: [u8; 6], target: Ipv6Addr) -> Vec<u8> {
    let mut icmp = vec![NEIGHBOUR_ADVERTISEMENT, 0, 0, 0, OVERRIDE, 0, 0, 0];
    icmp.extend_from_slice(&target.octets());
    icmp.extend_from_slice(&[OPTION_TARGET_LINK_ADDRESS, 1]);
    icmp.extend_from_slice(&mac);
    frame(
        mac,
        target,
        Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1),
        icmp,
    )
}

/// A received ND message: (type, IPv6 source, target, Ethernet source).
fn parse(f: &[u8]) -> Option<(u8, Ipv6Addr, Ipv6Addr, [u8; 6])> {
    if f.len() < 14 + 40 + 24
        || f[12..14] != ETH_P_IPV6.to_be_bytes()
        || f[14] >> 4 != 6
        || f[20] != ICMPV6
        || f[21] != HOP_LIMIT
    {
        return None;
    }
    let kind = f[54];
    if kind != NEIGHBOUR_SOLICITATION && kind != NEIGHBOUR_ADVERTISEMENT {
        return None;
    }
    let ip = |at: usize| {
        <[u8; 16]>::try_from(&f[at..at + 16])
            .ok()
            .map(Ipv6Addr::from)
    };
    let mac = <[u8; 6]>::try_from(&f[6..12]).ok()?;
    Some((kind, ip(22)?, ip(62)?, mac))
}

/// RFC 4862 §5.4.3/5.4.4: someone else advertises the address, or probes
/// for it at the same time.
fn conflicts(f: &[u8], address: Ipv6Addr, own_mac: [u8; 6]) -> bool {
    match parse(f) {
        Some((_, _, target, mac)) if mac == own_mac || target != address => false,
        Some((NEIGHBOUR_ADVERTISEMENT, ..)) => true,
        Some((NEIGHBOUR_SOLICITATION, source, ..)) => source.is_unspecified(),
        _ => false,
    }
}

/// Whether another host answers for `address` on `interface`.
pub async fn probe(interface: &str, address: Ipv6Addr, wait: Duration) -> Result<bool, NetError> {
    let socket = PacketSocket::open(interface, ETH_P_IPV6)?;
    let mac = socket.mac;
    socket
        .probe(&solicitation(mac, address), wait, |f| {
            conflicts(f, address, mac)
        })
        .await
}

/// Unsolicited neighbour advertisement for `address` from `interface`.
pub fn announce(interface: &str, address: Ipv6Addr) -> Result<(), NetError> {
    let socket = PacketSocket::open(interface, ETH_P_IPV6)?;
    socket.send(&advertisement(socket.mac, address))
}

#[cfg(test)]
mod tests {
    use super::*;

    const OURS: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const THEIRS: [u8; 6] = [2, 0, 0, 0, 0, 2];

    fn ip(s: &str) -> Ipv6Addr {
        s.parse().expect("ipv6")
    }

    #[test]
    fn solicited_node_group_and_its_mac() {
        let group = solicited_node(ip("2001:db8::12:3456"));
        assert_eq!(group, ip("ff02::1:ff12:3456"));
        assert_eq!(multicast_mac(group), [0x33, 0x33, 0xff, 0x12, 0x34, 0x56]);
    }

    #[test]
    fn checksum_verifies_to_zero() {
        // A checksum computed into the message makes the sum over it zero.
        let f = advertisement(OURS, ip("fd00::203"));
        let icmp = &f[54..];
        assert_eq!(checksum(ip("fd00::203"), ip("ff02::1"), icmp), 0);
        let f = solicitation(OURS, ip("fd00::203"));
        assert_eq!(
            checksum(Ipv6Addr::UNSPECIFIED, ip("ff02::1:ff00:203"), &f[54..]),
            0
        );
    }

    #[test]
    fn conflicts_per_rfc4862() {
        let vip = ip("fd00::200");
        // Another host advertising it, or probing for it too.
        assert!(conflicts(&advertisement(THEIRS, vip), vip, OURS));
        assert!(conflicts(&solicitation(THEIRS, vip), vip, OURS));
        // Our own frames, and other addresses, are not.
        assert!(!conflicts(&solicitation(OURS, vip), vip, OURS));
        assert!(!conflicts(
            &advertisement(THEIRS, ip("fd00::201")),
            vip,
            OURS
        ));
        // An ordinary resolution (from a real source) is not a probe.
        let mut resolution = solicitation(THEIRS, vip);
        resolution[22..38].copy_from_slice(&ip("fd00::10").octets());
        assert!(!conflicts(&resolution, vip, OURS));
        assert!(!conflicts(&[0u8; 40], vip, OURS));
    }
}
