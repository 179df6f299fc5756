//! A raw packet socket bound to one interface and one ethertype: what ARP
//! and neighbour discovery frames go through, whether or not an address is
//! configured.

// The only unsafe code in the agent: opening and binding the socket (libc
// calls nix has no safe wrapper for with `sockaddr_ll`).
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use nix::libc;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::time::Instant;

use crate::address::NetError;

pub const BROADCAST: [u8; 6] = [0xff; 6];

/// A packet socket bound to one interface, for one ethertype.
pub struct PacketSocket {
    fd: AsyncFd<OwnedFd>,
    pub mac: [u8; 6],
    interface: String,
}

impl PacketSocket {
    pub fn open(interface: &str, ethertype: u16) -> Result<PacketSocket, NetError> {
        let fail = |op: &'static str| {
            let interface = interface.to_owned();
            move |source: io::Error| NetError::Packet {
                op,
                interface,
                source,
            }
        };
        let (index, mac) = link_of(interface)?;
        let protocol = ethertype.to_be();
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
        Ok(PacketSocket {
            fd,
            mac,
            interface: interface.to_owned(),
        })
    }

    pub fn send(&self, frame: &[u8]) -> Result<(), NetError> {
        nix::sys::socket::send(
            self.fd.get_ref().as_raw_fd(),
            frame,
            nix::sys::socket::MsgFlags::empty(),
        )
        .map(|_| ())
        .map_err(|e| NetError::Packet {
            op: "send frame",
            interface: self.interface.clone(),
            source: e.into(),
        })
    }

    /// The next frame, or `None` at `deadline`.
    pub async fn receive(&self, deadline: Instant) -> Result<Option<Vec<u8>>, NetError> {
        let mut buf = [0u8; 1514];
        loop {
            let ready = tokio::time::timeout_at(deadline, self.fd.readable()).await;
            let Ok(ready) = ready else { return Ok(None) };
            let mut guard = ready.map_err(|source| NetError::Packet {
                op: "wait for frames",
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
                Ok(Ok(n)) => return Ok(Some(buf[..n].to_vec())),
                Ok(Err(source)) => {
                    return Err(NetError::Packet {
                        op: "receive frame",
                        interface: self.interface.clone(),
                        source,
                    })
                }
                Err(_would_block) => continue,
            }
        }
    }

    /// Sends `probe` now and again halfway through `wait`; true as soon as
    /// a received frame `conflicts`, false when `wait` has passed quietly.
    pub async fn probe(
        &self,
        probe: &[u8],
        wait: Duration,
        conflicts: impl Fn(&[u8]) -> bool,
    ) -> Result<bool, NetError> {
        let start = Instant::now();
        let deadline = start + wait;
        let mut second_probe = Some(start + wait / 2);
        self.send(probe)?;
        loop {
            let until = second_probe.map_or(deadline, |t| t.min(deadline));
            match self.receive(until).await? {
                Some(frame) if conflicts(&frame) => return Ok(true),
                Some(_) => {}
                None if Instant::now() >= deadline => return Ok(false),
                None => {
                    second_probe = None;
                    self.send(probe)?;
                }
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
