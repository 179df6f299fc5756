//! The agent's real host-network code against the real kernel: each test
//! moves its own thread into a fresh, empty network namespace (nothing in
//! it reaches the machine's network; it vanishes with the thread), builds a
//! veth pair there, and drives `address` and `arp` against it.
//!
//! Needs root (CAP_NET_ADMIN, CAP_NET_RAW), as the agent does.

use std::net::IpAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use steward_agent::address::{enable_nonlocal_bind, HostNetwork, NetError};
use steward_agent::arp;
use steward_lease::Target;

/// Runs `test` on this thread inside a new network namespace with
/// `veth-a` (198.18.250.1/24) and `veth-b` (198.18.252.2/24) up: one wire,
/// two subnets, so that "the interface in the VIP's subnet" is unambiguous;
/// the same in IPv6 (fd00:250::1/64, fd00:252::2/64).
fn in_fresh_netns<F: std::future::Future<Output = ()>>(test: impl FnOnce() -> F) {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .expect("unshare(CLONE_NEWNET): these tests need root");
    for args in [
        "link set lo up",
        "link add veth-a type veth peer name veth-b",
        "addr add 198.18.250.1/24 dev veth-a",
        "addr add 198.18.252.2/24 dev veth-b",
        "addr add fd00:250::1/64 dev veth-a nodad",
        "addr add fd00:252::2/64 dev veth-b nodad",
        "link set veth-a up",
        "link set veth-b up",
    ] {
        ip(args);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(test());
}

/// `ip ARGS` in this thread's namespace (a child inherits it); panics on failure.
fn ip(args: &str) -> String {
    let out = Command::new("ip")
        .args(args.split_whitespace())
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "ip {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn target(address: &str, prefix: u8, interface: Option<&str>) -> Target {
    Target {
        address: address.parse().expect("address"),
        prefix,
        interface: interface.map(str::to_owned),
    }
}

fn mac(interface: &str) -> String {
    std::fs::read_to_string(format!("/sys/class/net/{interface}/address"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| {
            // /sys belongs to the namespace that mounted it; ask ip instead.
            let out = ip(&format!("-o link show {interface}"));
            let at = out.find("link/ether ").expect("ether line") + "link/ether ".len();
            out[at..at + 17].to_owned()
        })
}

#[test]
fn finds_the_interface_by_subnet_or_name_and_says_why_not() {
    in_fresh_netns(|| async {
        let net = HostNetwork::connect().expect("netlink");
        let (name, _) = net
            .resolve_interface(&target("198.18.252.100", 32, None))
            .await
            .expect("by subnet");
        assert_eq!(name, "veth-b");
        let (name, _) = net
            .resolve_interface(&target("198.18.250.100", 32, None))
            .await
            .expect("by subnet");
        assert_eq!(name, "veth-a");

        let (name, _) = net
            .resolve_interface(&target("198.18.252.100", 32, Some("veth-a")))
            .await
            .expect("by name");
        assert_eq!(name, "veth-a", "an explicit interface wins over the subnet");

        match net
            .resolve_interface(&target("198.18.99.1", 32, None))
            .await
        {
            Err(NetError::NoInterfaceInSubnet(_)) => {}
            other => panic!("expected no interface in subnet, got {other:?}"),
        }
        match net
            .resolve_interface(&target("198.18.250.100", 32, Some("nope0")))
            .await
        {
            Err(NetError::NoSuchInterface(name)) => assert_eq!(name, "nope0"),
            other => panic!("expected no such interface, got {other:?}"),
        }
    });
}

#[test]
fn add_and_remove_are_idempotent_and_real() {
    in_fresh_netns(|| async {
        let net = HostNetwork::connect().expect("netlink");
        let vip = target("198.18.250.200", 24, None);
        assert!(!net.has_address(&vip).await.expect("read"));

        net.add_address(&vip).await.expect("add");
        net.add_address(&vip).await.expect("add again is fine");
        assert!(net.has_address(&vip).await.expect("read"));
        let shown = ip("-o addr show dev veth-a");
        assert!(shown.contains("198.18.250.200/24"), "kernel shows: {shown}");
        assert_eq!(
            ip("-o addr show").matches("198.18.250.200").count(),
            1,
            "bound once, on one interface"
        );
        // Named on another interface: not "ours" there.
        assert!(!net
            .has_address(&target("198.18.250.200", 24, Some("veth-b")))
            .await
            .expect("read"));

        net.remove_address(&vip).await.expect("remove");
        net.remove_address(&vip)
            .await
            .expect("remove again is fine");
        assert!(!net.has_address(&vip).await.expect("read"));
        assert!(!ip("-o addr show").contains("198.18.250.200"));

        // The node's own address is untouched by all this.
        assert!(ip("-o addr show dev veth-a").contains("198.18.250.1/24"));
    });
}

#[test]
fn nonlocal_bind_is_enabled_in_this_namespace_only() {
    in_fresh_netns(|| async {
        let read = || {
            std::fs::read_to_string("/proc/sys/net/ipv4/ip_nonlocal_bind")
                .expect("read sysctl")
                .trim()
                .to_owned()
        };
        assert_eq!(read(), "0", "a fresh namespace starts with it off");
        enable_nonlocal_bind().expect("enable");
        assert_eq!(read(), "1");
        let addr: IpAddr = "198.18.250.222".parse().expect("ip");
        std::net::TcpListener::bind((addr, 0)).expect("bind a non-local address");
    });
}

#[test]
fn probe_sees_a_live_holder_and_not_a_free_address() {
    in_fresh_netns(|| async {
        // Nobody has .201: the probe waits its time and says free.
        let started = Instant::now();
        let in_use = arp::probe(
            "veth-a",
            "198.18.250.201".parse().expect("ip"),
            Duration::from_millis(150),
        )
        .await
        .expect("probe");
        assert!(!in_use, "nobody holds 198.18.250.201");
        assert!(started.elapsed() >= Duration::from_millis(150));

        // The far end holds .202: the kernel there answers the probe.
        ip("addr add 198.18.250.202/32 dev veth-b");
        let in_use = arp::probe(
            "veth-a",
            "198.18.250.202".parse().expect("ip"),
            Duration::from_millis(500),
        )
        .await
        .expect("probe");
        assert!(in_use, "veth-b holds 198.18.250.202 and answers ARP for it");
    });
}

#[test]
fn gratuitous_arp_moves_a_neighbour_entry() {
    in_fresh_netns(|| async {
        // veth-b's side believes the VIP lives at some other MAC (the old
        // holder); our announcement from veth-a must correct it.
        ip("neigh replace 198.18.250.203 lladdr 02:00:00:00:00:99 dev veth-b nud stale");
        let want = mac("veth-a");
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut announced_at: Option<Instant> = None;
        loop {
            // Repeated, as the agent repeats its announcements: the kernel
            // may take no notice of one that comes within its ARP locktime
            // of the entry's last update.
            if announced_at.is_none_or(|at| at.elapsed() >= Duration::from_millis(300)) {
                arp::announce("veth-a", "198.18.250.203".parse().expect("ip")).expect("announce");
                announced_at = Some(Instant::now());
            }
            let entry = ip("neigh show 198.18.250.203 dev veth-b");
            if entry.contains(&want) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "neighbour entry not moved to {want}: {entry}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}

#[test]
fn ipv6_vips_bind_by_subnet_without_kernel_dad() {
    in_fresh_netns(|| async {
        let net = HostNetwork::connect().expect("netlink");
        let vip = target("fd00:250::200", 64, None);
        net.add_address(&vip).await.expect("add");
        net.add_address(&vip).await.expect("add again is fine");
        let shown = ip("-o -6 addr show dev veth-a");
        let line = shown
            .lines()
            .find(|l| l.contains("fd00:250::200/64"))
            .unwrap_or_else(|| panic!("kernel shows: {shown}"));
        assert!(
            !line.contains("tentative"),
            "usable at once, no kernel DAD delay: {line}"
        );
        net.remove_address(&vip).await.expect("remove");
        assert!(!net.has_address(&vip).await.expect("read"));
    });
}

#[test]
fn ipv6_probe_sees_a_live_holder_and_not_a_free_address() {
    in_fresh_netns(|| async {
        let free = arp::probe(
            "veth-a",
            "fd00:250::201".parse().expect("ip"),
            Duration::from_millis(150),
        )
        .await
        .expect("probe");
        assert!(!free, "nobody holds fd00:250::201");

        // The far end holds it: its kernel defends it against our DAD probe.
        ip("addr add fd00:250::202/128 dev veth-b nodad");
        let in_use = arp::probe(
            "veth-a",
            "fd00:250::202".parse().expect("ip"),
            Duration::from_millis(500),
        )
        .await
        .expect("probe");
        assert!(
            in_use,
            "veth-b holds fd00:250::202 and answers neighbour discovery"
        );
    });
}

#[test]
fn unsolicited_advertisement_moves_a_neighbour_entry() {
    in_fresh_netns(|| async {
        ip("-6 neigh replace fd00:250::203 lladdr 02:00:00:00:00:99 dev veth-b nud stale");
        // Let link-local addresses settle: a just-upped interface may drop ND.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let want = mac("veth-a");
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            arp::announce("veth-a", "fd00:250::203".parse().expect("ip")).expect("announce");
            let entry = ip("-6 neigh show fd00:250::203 dev veth-b");
            if entry.contains(&want) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "neighbour entry not moved to {want}: {entry}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}
