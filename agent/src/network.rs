//! The host's network as the VIP driver ([`crate::vip`]) sees it: the
//! addresses on its interfaces, gratuitous ARP / unsolicited neighbour
//! advertisements, and the duplicate-address probe. [`HostNetwork`] (rtnetlink
//! and raw packet sockets) is the real one; [`fake::FakeNetwork`] records the
//! calls and scripts failures and hangs for the driver's unit tests.
//!
//! **Architecture invariant:** the trait promises no deadline. The driver
//! bounds every call it awaits itself ([`crate::address::NETLINK_DEADLINE`]),
//! so an implementation that hangs cannot keep it from dropping a VIP whose
//! lease ran out.

use std::future::Future;
use std::net::IpAddr;
use std::time::Duration;

use steward_lease::Target;

use crate::address::{HostNetwork, NetError};

/// What the VIP driver does to the host's network. Every operation is
/// idempotent: adding an address that is there, or removing one that is
/// not, succeeds.
pub trait Network: Send + Sync + 'static {
    /// The interface the VIP goes on (name, index): the one it names, or
    /// else the one with an address in the VIP's subnet.
    fn resolve_interface(
        &self,
        target: &Target,
    ) -> impl Future<Output = Result<(String, u32), NetError>> + Send;
    /// Whether the VIP's address is on this host (on its interface, when
    /// the VIP names one).
    fn has_address(&self, target: &Target) -> impl Future<Output = Result<bool, NetError>> + Send;
    fn add_address(&self, target: &Target) -> impl Future<Output = Result<(), NetError>> + Send;
    fn remove_address(&self, target: &Target) -> impl Future<Output = Result<(), NetError>> + Send;
    /// Gratuitous ARP (IPv4) or an unsolicited neighbour advertisement
    /// (IPv6) for `address` on `interface`.
    fn announce(
        &self,
        interface: &str,
        address: IpAddr,
    ) -> impl Future<Output = Result<(), NetError>> + Send;
    /// Whether another host answers for `address` on `interface` within
    /// `wait`.
    fn probe(
        &self,
        interface: &str,
        address: IpAddr,
        wait: Duration,
    ) -> impl Future<Output = Result<bool, NetError>> + Send;
    /// Lets HAProxy bind addresses this host does not hold
    /// (`ip_nonlocal_bind`).
    fn enable_nonlocal_bind(&self) -> Result<(), NetError>;
}

impl Network for HostNetwork {
    fn resolve_interface(
        &self,
        target: &Target,
    ) -> impl Future<Output = Result<(String, u32), NetError>> + Send {
        HostNetwork::resolve_interface(self, target)
    }

    fn has_address(&self, target: &Target) -> impl Future<Output = Result<bool, NetError>> + Send {
        HostNetwork::has_address(self, target)
    }

    fn add_address(&self, target: &Target) -> impl Future<Output = Result<(), NetError>> + Send {
        HostNetwork::add_address(self, target)
    }

    fn remove_address(&self, target: &Target) -> impl Future<Output = Result<(), NetError>> + Send {
        HostNetwork::remove_address(self, target)
    }

    async fn announce(&self, interface: &str, address: IpAddr) -> Result<(), NetError> {
        crate::arp::announce(interface, address)
    }

    async fn probe(
        &self,
        interface: &str,
        address: IpAddr,
        wait: Duration,
    ) -> Result<bool, NetError> {
        crate::arp::probe(interface, address, wait).await
    }

    fn enable_nonlocal_bind(&self) -> Result<(), NetError> {
        crate::address::enable_nonlocal_bind()
    }
}

pub mod fake {
    //! A scripted, in-memory [`Network`] for unit tests.

    use std::collections::{BTreeMap, BTreeSet};
    use std::net::IpAddr;
    use std::sync::{Arc, Mutex, MutexGuard};
    use std::time::Duration;

    use steward_lease::Target;

    use super::Network;
    use crate::address::NetError;

    /// One operation of [`Network`], to script and to record.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    pub enum Op {
        Resolve,
        Has,
        Add,
        Remove,
        Announce,
        Probe,
        NonlocalBind,
    }

    /// A recorded call: the operation and the address it was about.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Call {
        pub op: Op,
        pub address: Option<IpAddr>,
        /// When it was made (tokio's clock, so paused time in tests).
        pub at: tokio::time::Instant,
    }

    /// What the fake answers.
    #[derive(Debug)]
    pub enum Script {
        /// Fails with a socket error.
        Fail,
        /// Never answers.
        Hang,
        /// Does what was asked, then never answers (a lost netlink reply).
        LoseReply,
    }

    #[derive(Debug, Default)]
    pub struct FakeState {
        /// Addresses on the host, with their interface.
        pub addresses: BTreeMap<IpAddr, String>,
        /// Addresses another host answers for (the probe reports a conflict).
        pub taken: BTreeSet<IpAddr>,
        pub scripts: BTreeMap<Op, Script>,
        pub calls: Vec<Call>,
    }

    /// One host with one interface, [`FakeNetwork::INTERFACE`], on which
    /// every VIP lands unless it names another.
    #[derive(Debug, Clone, Default)]
    pub struct FakeNetwork {
        pub state: Arc<Mutex<FakeState>>,
    }

    impl FakeNetwork {
        pub const INTERFACE: &'static str = "eth0";

        pub fn state(&self) -> MutexGuard<'_, FakeState> {
            // A test that panicked while holding the lock has failed anyway.
            self.state
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
        }

        pub fn script(&self, op: Op, script: Script) {
            self.state().scripts.insert(op, script);
        }

        pub fn clear_script(&self, op: Op) {
            self.state().scripts.remove(&op);
        }

        /// The calls made of `op`, in order.
        pub fn calls(&self, op: Op) -> Vec<Call> {
            self.state()
                .calls
                .iter()
                .filter(|c| c.op == op)
                .cloned()
                .collect()
        }

        pub fn holds(&self, address: IpAddr) -> bool {
            self.state().addresses.contains_key(&address)
        }

        /// Records the call, then answers as scripted, or with `ok`'s answer.
        async fn answer<T>(
            &self,
            op: Op,
            address: Option<IpAddr>,
            ok: impl FnOnce(&mut FakeState) -> T,
        ) -> Result<T, NetError> {
            let scripted = {
                let mut state = self.state();
                state.calls.push(Call {
                    op,
                    address,
                    at: tokio::time::Instant::now(),
                });
                match state.scripts.get(&op) {
                    None => Ok(ok(&mut state)),
                    Some(Script::LoseReply) => {
                        ok(&mut state);
                        Err(None)
                    }
                    Some(Script::Fail) => Err(Some(NetError::Socket(std::io::Error::other(
                        format!("scripted failure of {op:?}"),
                    )))),
                    Some(Script::Hang) => Err(None),
                }
            };
            match scripted {
                Ok(answer) => Ok(answer),
                Err(Some(error)) => Err(error),
                Err(None) => std::future::pending().await,
            }
        }

        fn interface(target: &Target) -> String {
            target
                .interface
                .clone()
                .unwrap_or_else(|| Self::INTERFACE.to_owned())
        }
    }

    impl Network for FakeNetwork {
        async fn resolve_interface(&self, target: &Target) -> Result<(String, u32), NetError> {
            let interface = Self::interface(target);
            self.answer(Op::Resolve, Some(target.address), |_| (interface, 2))
                .await
        }

        async fn has_address(&self, target: &Target) -> Result<bool, NetError> {
            let interface = Self::interface(target);
            self.answer(Op::Has, Some(target.address), |s| {
                s.addresses.get(&target.address) == Some(&interface)
            })
            .await
        }

        async fn add_address(&self, target: &Target) -> Result<(), NetError> {
            let interface = Self::interface(target);
            self.answer(Op::Add, Some(target.address), |s| {
                s.addresses.insert(target.address, interface);
            })
            .await
        }

        async fn remove_address(&self, target: &Target) -> Result<(), NetError> {
            self.answer(Op::Remove, Some(target.address), |s| {
                s.addresses.remove(&target.address);
            })
            .await
        }

        async fn announce(&self, _interface: &str, address: IpAddr) -> Result<(), NetError> {
            self.answer(Op::Announce, Some(address), |_| ()).await
        }

        async fn probe(
            &self,
            _interface: &str,
            address: IpAddr,
            wait: Duration,
        ) -> Result<bool, NetError> {
            let in_use = self
                .answer(Op::Probe, Some(address), |s| s.taken.contains(&address))
                .await?;
            // A probe listens for `wait` before it can say "free".
            tokio::time::sleep(wait).await;
            Ok(in_use)
        }

        fn enable_nonlocal_bind(&self) -> Result<(), NetError> {
            let mut state = self.state();
            state.calls.push(Call {
                op: Op::NonlocalBind,
                address: None,
                at: tokio::time::Instant::now(),
            });
            Ok(())
        }
    }
}
