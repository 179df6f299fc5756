//! Several "machines" on one wire, on one Linux box: network namespaces
//! joined by a Linux bridge, for tests that need real hosts, real ARP and a
//! real floating address (the VIP tests, the failover benchmark).
//!
//! ```text
//!   root namespace                 switch namespace            hosts
//!   stg<I>  198.18.N.1/24 ──veth── uplink ┐
//!   (etcd, coordinators,                  br0 ── p10 ──veth── eth0 198.18.N.10/24  (stw-<pid>-<k>-a)
//!    the test itself)                         ── p11 ──veth── eth0 198.18.N.11/24  (stw-<pid>-<k>-b)
//! ```
//!
//! - Each [`TestNet`] gets its own /24 in 198.18.0.0/15 (RFC 2544, meant
//!   for benchmarks), claimed atomically: the root-namespace interface is
//!   named after the subnet (`stg<I>`, I = 0..511), so two test processes
//!   cannot take the same one, and subnets already used on this machine
//!   (addresses, routes) are skipped.
//! - The bridge lives in a namespace of its own (`stw-<pid>-<k>`), not in
//!   the root namespace: if `br_netfilter` is loaded with
//!   `bridge-nf-call-iptables = 1` (it often is, e.g. next to Docker, which
//!   also sets the FORWARD policy to DROP), bridged frames go through the
//!   iptables of the bridge's namespace. A fresh namespace has no rules, so
//!   traffic between hosts flows whatever the machine's firewall says, and
//!   no global setting is changed. Only traffic to the gateway (`.1`) passes
//!   the root namespace's INPUT rules, as any local traffic does.
//! - Hosts have `lo` and `eth0` (address `.10`, `.11`, ... /24) and no
//!   default route: nothing they do leaves the test's wire.
//! - Namespace names carry the test process's pid; [`TestNet::new`] first
//!   removes leftovers of test processes that no longer exist (and only
//!   those). Dropping a `TestNet` removes everything it created, also when
//!   the test panics. Nothing here kills a process it did not start.
//!
//! Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) and iproute2's `ip`.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The range test networks are carved from: 198.18.0.0/15, 512 /24s.
const RANGE_BASE: u32 = u32::from_be_bytes([198, 18, 0, 0]);
const RANGE_SLOTS: u32 = 512;
/// Host addresses are `.10 ..= .199`; `.200` and above are for VIPs.
pub(crate) const FIRST_HOST_OCTET: u8 = 10;
pub(crate) const LAST_HOST_OCTET: u8 = 199;
const NS_PREFIX: &str = "stw-";
const ROOT_IFACE_PREFIX: &str = "stg";
const ALIAS_PREFIX: &str = "steward-tests pid=";

/// Per-process counter: the `<k>` in namespace names.
static NEXT_NET: AtomicU32 = AtomicU32::new(0);
/// Serializes setup and teardown within this process (`ip netns add`
/// races on the first mount of /run/netns; fewer concurrent `ip`s anyway).
static SETUP: Mutex<()> = Mutex::new(());

fn setup_lock() -> MutexGuard<'static, ()> {
    SETUP.lock().unwrap_or_else(|e| e.into_inner())
}

/// `cmd` as a shell would show it, for error messages.
pub(crate) fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd`; `Err(stderr)` if it cannot start or fails.
fn try_run(cmd: &mut Command) -> Result<Output, String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run: {e}"))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "{} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs `cmd`, panicking with its command line and stderr if it fails.
fn run(cmd: &mut Command) -> Output {
    try_run(cmd).unwrap_or_else(|e| panic!("`{}` failed: {e}", command_line(cmd)))
}

fn ip_cmd<S: AsRef<OsStr>>(args: &[S]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    cmd
}

/// `ip ARGS` in the root namespace; panics on failure; returns stdout.
fn ip(args: &[&str]) -> String {
    String::from_utf8_lossy(&run(&mut ip_cmd(args)).stdout).into_owned()
}

/// `ip ARGS`, for teardown: failures are reported, never fatal.
fn ip_quiet(args: &[&str]) {
    let mut cmd = ip_cmd(args);
    if let Err(e) = try_run(&mut cmd) {
        eprintln!("netns teardown: `{}` failed: {e}", command_line(&cmd));
    }
}

fn ip_json(args: &[&str]) -> Vec<serde_json::Value> {
    let mut all = vec!["-j"];
    all.extend_from_slice(args);
    let text = ip(&all);
    if text.trim().is_empty() {
        return Vec::new();
    }
    match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(serde_json::Value::Array(items)) => items,
        other => panic!("`ip {}`: unexpected output {other:?}", all.join(" ")),
    }
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn check_prerequisites() {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("?");
    assert!(
        euid == "0",
        "network-namespace tests need root (effective uid is {euid})"
    );
    if let Err(e) = try_run(Command::new("ip").arg("-V")) {
        panic!("network-namespace tests need iproute2's `ip` (apt-get install iproute2): {e}");
    }
}

/// Removes what test processes that no longer exist left behind: namespaces
/// named `stw-<pid>-...` and root interfaces `stg<I>` whose alias names the
/// pid. Anything of a live process, or not named so, is left alone.
fn remove_stale() {
    let own = std::process::id();
    let list = ip(&["netns", "list"]);
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let Some(Ok(pid)) = rest.split('-').next().map(str::parse::<u32>) else {
            continue;
        };
        if pid != own && !pid_alive(pid) {
            let _ = try_run(&mut ip_cmd(&["netns", "del", name]));
        }
    }
    for link in ip_json(&["link", "show"]) {
        let (Some(name), Some(alias)) = (link["ifname"].as_str(), link["ifalias"].as_str()) else {
            continue;
        };
        let ours = name
            .strip_prefix(ROOT_IFACE_PREFIX)
            .is_some_and(|n| n.parse::<u32>().is_ok());
        let pid = alias
            .strip_prefix(ALIAS_PREFIX)
            .and_then(|a| a.split_whitespace().next())
            .and_then(|p| p.parse::<u32>().ok());
        if let (true, Some(pid)) = (ours, pid) {
            if pid != own && !pid_alive(pid) {
                let _ = try_run(&mut ip_cmd(&["link", "del", name]));
            }
        }
    }
}

/// The /24 slots of 198.18.0.0/15 that `prefix/len` overlaps.
fn overlapping_slots(prefix: Ipv4Addr, len: u8) -> std::ops::Range<u32> {
    let len = u32::from(len.min(32));
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    let start = u32::from(prefix) & mask;
    let end = start | !mask; // inclusive
    let range_end = RANGE_BASE + RANGE_SLOTS * 256 - 1;
    if end < RANGE_BASE || start > range_end {
        return 0..0;
    }
    let lo = (start.max(RANGE_BASE) - RANGE_BASE) / 256;
    let hi = (end.min(range_end) - RANGE_BASE) / 256;
    lo..hi + 1
}

fn parse_prefix(text: &str) -> Option<(Ipv4Addr, u8)> {
    match text.split_once('/') {
        Some((a, l)) => Some((a.parse().ok()?, l.parse().ok()?)),
        None => Some((text.parse().ok()?, 32)),
    }
}

/// Slots already in use in the root namespace (addresses and routes).
fn used_slots() -> BTreeSet<u32> {
    let mut used = BTreeSet::new();
    for link in ip_json(&["-4", "addr", "show"]) {
        for a in link["addr_info"].as_array().into_iter().flatten() {
            let (Some(local), Some(len)) = (a["local"].as_str(), a["prefixlen"].as_u64()) else {
                continue;
            };
            if let Ok(addr) = local.parse() {
                used.extend(overlapping_slots(addr, len as u8));
            }
        }
    }
    for route in ip_json(&["-4", "route", "show", "table", "all"]) {
        if let Some((addr, len)) = route["dst"].as_str().and_then(parse_prefix) {
            used.extend(overlapping_slots(addr, len));
        }
    }
    used
}

/// One wire: a Linux bridge and a /24 in 198.18.0.0/15, with the root
/// namespace at `.1` and [`Host`]s at `.10`, `.11`, ... Dropping it removes
/// its namespaces and interfaces.
pub struct TestNet {
    tag: String,
    /// Index of the /24 in 198.18.0.0/15 (0..512).
    slot: u32,
    /// The namespace holding the bridge `br0`.
    switch_ns: String,
    /// The root namespace's end of the uplink veth (holds `.1`).
    root_iface: String,
    /// Namespace name prefix of this net's hosts: `stw-<pid>-<k>-`.
    host_prefix: String,
    hosts: Vec<Host>,
}

impl TestNet {
    /// Builds the wire. `tag` names it in interface aliases and messages.
    ///
    /// Panics with a clear message if not root, if `ip` is missing, or if a
    /// setup command fails (whatever was created is removed again).
    pub fn new(tag: &str) -> TestNet {
        check_prerequisites();
        let _guard = setup_lock();
        remove_stale();
        let pid = std::process::id();
        let k = NEXT_NET.fetch_add(1, Ordering::Relaxed);
        let switch_ns = format!("{NS_PREFIX}{pid}-{k}");
        run(&mut ip_cmd(&["netns", "add", &switch_ns]));
        let mut net = TestNet {
            tag: tag.to_owned(),
            slot: 0,
            host_prefix: format!("{switch_ns}-"),
            switch_ns,
            root_iface: String::new(),
            hosts: Vec::new(),
        };
        net.claim_slot(pid, k);
        net.build_switch();
        net
    }

    /// Picks a free /24 and claims it by creating the root interface named
    /// after it (`ip link add` fails if another process holds the name).
    fn claim_slot(&mut self, pid: u32, k: u32) {
        let used = used_slots();
        let start = pid.wrapping_mul(7).wrapping_add(k.wrapping_mul(37)) % RANGE_SLOTS;
        for slot in (0..RANGE_SLOTS).map(|i| (start + i) % RANGE_SLOTS) {
            if used.contains(&slot) {
                continue;
            }
            let name = format!("{ROOT_IFACE_PREFIX}{slot}");
            let mut cmd = ip_cmd(&[
                "link",
                "add",
                &name,
                "type",
                "veth",
                "peer",
                "name",
                "uplink",
                "netns",
                &self.switch_ns,
            ]);
            match try_run(&mut cmd) {
                Ok(_) => {
                    self.slot = slot;
                    self.root_iface = name;
                    return;
                }
                Err(e) if e.contains("File exists") => continue,
                Err(e) => panic!("`{}` failed: {e}", command_line(&cmd)),
            }
        }
        panic!("no free /24 left in 198.18.0.0/15 for a test network");
    }

    fn build_switch(&mut self) {
        let pid = std::process::id();
        let alias: String = format!("{ALIAS_PREFIX}{pid} tag={}", self.tag)
            .chars()
            .filter(|c| c.is_ascii_graphic() || *c == ' ')
            .take(200)
            .collect();
        let root = self.root_iface.clone();
        let sw = self.switch_ns.clone();
        ip(&["link", "set", &root, "alias", &alias]);
        // No IPv6 link-local (and its route) in the root namespace; this
        // is our own interface's setting, not a global one.
        let v6 = format!("/proc/sys/net/ipv6/conf/{root}/disable_ipv6");
        if Path::new(&v6).exists() {
            let _ = fs::write(&v6, "1");
        }
        let gateway = format!("{}/{}", self.gateway(), self.prefix_len());
        ip(&["addr", "add", &gateway, "dev", &root]);
        ip(&["link", "set", &root, "up"]);
        // STP off and no forward delay: ports forward as soon as they are up.
        ip(&[
            "-n",
            &sw,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
        ]);
        ip(&["-n", &sw, "link", "set", "uplink", "master", "br0", "up"]);
        ip(&["-n", &sw, "link", "set", "br0", "up"]);
    }

    /// The root namespace's address on the wire (`.1`): processes of the
    /// test itself (etcd, coordinators) listen here to be reachable.
    pub fn gateway(&self) -> Ipv4Addr {
        self.addr(1)
    }

    pub fn prefix_len(&self) -> u8 {
        24
    }

    /// `198.18.N.0/24` (or `198.19.N.0/24`).
    pub fn subnet(&self) -> String {
        format!("{}/{}", self.addr(0), self.prefix_len())
    }

    /// The address `.host_octet` of this net, e.g. for a VIP (use `.200`
    /// and above; hosts take `.10 ..= .199`).
    pub fn addr(&self, host_octet: u8) -> Ipv4Addr {
        Ipv4Addr::from(RANGE_BASE + self.slot * 256 + u32::from(host_octet))
    }

    /// The root namespace's interface on the wire (`stg<I>`).
    pub fn root_iface(&self) -> &str {
        &self.root_iface
    }

    /// The namespace holding the bridge (for `crate::nspawn`).
    pub(crate) fn switch_ns(&self) -> &str {
        &self.switch_ns
    }

    /// The bridge's name in [`TestNet::switch_ns`].
    pub(crate) fn bridge(&self) -> &str {
        "br0"
    }

    /// Every namespace this net created: the switch's, then the hosts'.
    pub fn namespaces(&self) -> Vec<String> {
        std::iter::once(self.switch_ns.clone())
            .chain(self.hosts.iter().map(|h| h.ns.clone()))
            .collect()
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// A new host: namespace `stw-<pid>-<k>-<name>` with `lo` up and `eth0`
    /// at the next address (`.10`, `.11`, ...) plugged into the bridge; no
    /// default route. `name`: lowercase letters, digits and `-`.
    pub fn add_host(&mut self, name: &str) -> Host {
        check_name("host", name);
        assert!(
            self.hosts.iter().all(|h| h.name != name),
            "host {name} exists already"
        );
        let octet = FIRST_HOST_OCTET + u8::try_from(self.hosts.len()).unwrap_or(u8::MAX);
        assert!(
            (FIRST_HOST_OCTET..=LAST_HOST_OCTET).contains(&octet),
            "too many hosts on one TestNet"
        );
        let _guard = setup_lock();
        let host = Host {
            name: name.to_owned(),
            ns: format!("{}{name}", self.host_prefix),
            ip: self.addr(octet),
            prefix_len: self.prefix_len(),
            switch_ns: self.switch_ns.clone(),
            port: format!("p{octet}"),
        };
        run(&mut ip_cmd(&["netns", "add", &host.ns]));
        // From here on, Drop removes it.
        self.hosts.push(host.clone());
        let sw = self.switch_ns.as_str();
        ip(&[
            "-n", sw, "link", "add", &host.port, "type", "veth", "peer", "name", "eth0", "netns",
            &host.ns,
        ]);
        ip(&["-n", sw, "link", "set", &host.port, "master", "br0", "up"]);
        let cidr = format!("{}/{}", host.ip, host.prefix_len);
        host.iproute(&["addr", "add", &cidr, "dev", "eth0"]);
        host.iproute(&["link", "set", "eth0", "up"]);
        host.iproute(&["link", "set", "lo", "up"]);
        host
    }
}

/// Panics unless `name` is 1..=32 of `[a-z0-9-]` (it ends up in interface,
/// namespace and machine names).
pub(crate) fn check_name(what: &str, name: &str) {
    assert!(
        !name.is_empty()
            && name.len() <= 32
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
        "{what} name {name:?}: use 1..=32 of [a-z0-9-]"
    );
}

impl Drop for TestNet {
    fn drop(&mut self) {
        let _guard = setup_lock();
        // Veths first: they go even if a leftover process pins a namespace.
        for host in &self.hosts {
            ip_quiet(&["-n", &self.switch_ns, "link", "del", &host.port]);
        }
        if !self.root_iface.is_empty() {
            ip_quiet(&["link", "del", &self.root_iface]);
        }
        for ns in self.namespaces().iter().rev() {
            ip_quiet(&["netns", "del", ns]);
        }
    }
}

/// One machine on a [`TestNet`]: a network namespace with `eth0`.
#[derive(Clone, Debug)]
pub struct Host {
    name: String,
    ns: String,
    ip: Ipv4Addr,
    prefix_len: u8,
    switch_ns: String,
    /// The bridge-side end of the host's veth, in the switch namespace.
    port: String,
}

impl Host {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The network namespace's name (for `ip netns exec`, `ip -n`).
    pub fn ns(&self) -> &str {
        &self.ns
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The host's interface on the wire.
    pub fn iface(&self) -> &str {
        "eth0"
    }

    /// `ip netns exec NS program`: runs `program` in this host. `ip` execs
    /// it, so the child's pid is the program's (safe to kill by pid).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns]).arg(program);
        cmd
    }

    /// Runs `program args` in this host and waits; panics with the command
    /// line and stderr if it fails.
    pub fn run<S: AsRef<OsStr>>(&self, program: impl AsRef<OsStr>, args: &[S]) -> Output {
        let mut cmd = self.command(program);
        cmd.args(args);
        run(&mut cmd)
    }

    /// `ip -n NS ARGS`; panics on failure; returns stdout.
    pub fn iproute(&self, args: &[&str]) -> String {
        let mut cmd = ip_cmd(&["-n", &self.ns]);
        cmd.args(args);
        String::from_utf8_lossy(&run(&mut cmd).stdout).into_owned()
    }

    /// Sets a sysctl inside this host's namespace, e.g.
    /// `("net.ipv4.ip_nonlocal_bind", "1")`.
    pub fn set_sysctl(&self, key: &str, value: &str) {
        assert!(
            !key.is_empty() && !key.contains("..") && !key.starts_with('/'),
            "sysctl key {key:?}"
        );
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        // sh must run in the namespace: /proc/sys/net is the writer's.
        self.run(
            "sh",
            &["-c", "printf '%s\\n' \"$1\" > \"$2\"", "sh", value, &path],
        );
    }

    /// Pulls the cable: the bridge-side end of the veth goes down, so the
    /// host vanishes from the wire (its `eth0` loses carrier; addresses
    /// stay).
    pub fn link_down(&self) {
        ip(&["-n", &self.switch_ns, "link", "set", &self.port, "down"]);
    }

    /// Plugs the cable back in.
    pub fn link_up(&self) {
        ip(&["-n", &self.switch_ns, "link", "set", &self.port, "up"]);
    }

    /// Takes the host's port off the bridge while every link stays up: the
    /// host sees carrier and sends as usual, but nothing it sends arrives
    /// and nothing reaches it — a hung or partitioned machine as its peers
    /// see it, and, unlike [`Host::link_down`], without carrier loss the
    /// host itself could notice.
    pub fn detach(&self) {
        ip(&["-n", &self.switch_ns, "link", "set", &self.port, "nomaster"]);
    }

    /// Puts the port back on the bridge (STP off, no forward delay: it
    /// forwards at once).
    pub fn attach(&self) {
        ip(&[
            "-n",
            &self.switch_ns,
            "link",
            "set",
            &self.port,
            "master",
            "br0",
        ]);
    }

    /// Whether the host's `eth0` has carrier (it does while detached).
    pub fn has_carrier(&self) -> bool {
        let out = self.iproute(&["-o", "link", "show", "eth0"]);
        !out.contains("NO-CARRIER") && out.contains("LOWER_UP")
    }

    /// Cuts this host off from `peer`, both ways: an nftables filter in
    /// this host's namespace drops every IP packet to or from `peer` (TCP,
    /// and raw-socket protocols such as VRRP that ignore the routing table
    /// alike); ARP still works.
    pub fn block(&self, peer: Ipv4Addr) {
        let listed = self
            .command("nft")
            .args(["list", "table", "inet", "steward_test"])
            .output()
            .expect("run nft");
        if !listed.status.success() {
            self.run("nft", &[FILTER_TABLE]);
        }
        self.run(
            "nft",
            &[
                "add",
                "element",
                "inet",
                "steward_test",
                "blocked",
                &format!("{{ {peer} }}"),
            ],
        );
    }

    /// Undoes [`Host::block`].
    pub fn unblock(&self, peer: Ipv4Addr) {
        self.run(
            "nft",
            &[
                "delete",
                "element",
                "inet",
                "steward_test",
                "blocked",
                &format!("{{ {peer} }}"),
            ],
        );
    }

    /// Whether `ip` is configured on any interface of this host.
    pub fn has_address(&self, ip: Ipv4Addr) -> bool {
        let out = self.iproute(&["-o", "-4", "addr", "show"]);
        out.lines()
            .any(|l| parse_addr_line(l, ip).is_some_and(|(added, _)| added))
    }
}

/// The filter [`Host::block`] installs on first use: drop everything from
/// or to an address in the `blocked` set.
const FILTER_TABLE: &str = "add table inet steward_test; \
     add set inet steward_test blocked { type ipv4_addr; }; \
     add chain inet steward_test input { type filter hook input priority 0; }; \
     add rule inet steward_test input ip saddr @blocked drop; \
     add chain inet steward_test output { type filter hook output priority 0; }; \
     add rule inet steward_test output ip daddr @blocked drop";

/// If `line` (`ip -o addr` / `ip -o monitor address` format) is about
/// `ip`: (added, "iface address/len"). `Deleted ...` lines are removals.
fn parse_addr_line(line: &str, ip: Ipv4Addr) -> Option<(bool, String)> {
    let (added, rest) = match line.strip_prefix("Deleted ") {
        Some(rest) => (false, rest),
        None => (true, line),
    };
    let tokens: Vec<&str> = rest.split_whitespace().collect();
    // "2: eth0 inet 198.18.3.200/32 scope global eth0 ..."
    if tokens.len() < 4 || tokens[2] != "inet" {
        return None;
    }
    let (addr, _) = tokens[3].split_once('/')?;
    (addr.parse::<Ipv4Addr>().ok()? == ip).then(|| (added, format!("{} {}", tokens[1], tokens[3])))
}

/// A change in who holds the watched address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddrEvent {
    pub at: Instant,
    pub host: String,
    /// `true`: the host got the address; `false`: it lost it.
    pub added: bool,
}

struct WatchState {
    /// Per host (in `hosts` order): the entries ("iface addr/len") it has.
    held: Vec<BTreeSet<String>>,
    events: Vec<AddrEvent>,
}

impl WatchState {
    fn apply(&mut self, host: usize, name: &str, added: bool, key: String) {
        let before = !self.held[host].is_empty();
        if added {
            self.held[host].insert(key);
        } else {
            self.held[host].remove(&key);
        }
        let after = !self.held[host].is_empty();
        if before != after {
            self.events.push(AddrEvent {
                at: Instant::now(),
                host: name.to_owned(),
                added: after,
            });
        }
    }
}

/// A child process killed (by pid) and reaped on drop.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A network namespace an [`AddressWatch`] follows: a name for its
/// events and the namespace file (`/run/netns/NS` for a [`Host`],
/// `/proc/PID/ns/net` for a machine).
#[derive(Clone, Debug)]
pub struct WatchedNs {
    pub name: String,
    pub net: PathBuf,
}

impl WatchedNs {
    /// `ip ARGS` run in this namespace (`nsenter` execs `ip`: the child's
    /// pid is `ip`'s).
    fn ip(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.net.display()))
            .arg("--")
            .arg("ip")
            .args(args);
        cmd
    }
}

impl From<&Host> for WatchedNs {
    fn from(host: &Host) -> WatchedNs {
        WatchedNs {
            name: host.name.clone(),
            net: PathBuf::from(format!("/run/netns/{}", host.ns)),
        }
    }
}

/// Watches which hosts hold an address over time: proves "never on two
/// hosts at once" and measures when it moved.
///
/// Per host, a long-lived `ip -o monitor address` in its namespace (killed by pid on
/// drop) plus a snapshot taken once the monitor is subscribed; a reader
/// thread per host records each change with the time it was read (the
/// monitor flushes per event; latency is well under a millisecond).
pub struct AddressWatch {
    ip: Ipv4Addr,
    hosts: Vec<String>,
    state: Arc<Mutex<WatchState>>,
    _monitors: Vec<ChildGuard>,
}

impl AddressWatch {
    pub fn start(hosts: &[Host], ip: Ipv4Addr) -> AddressWatch {
        let places: Vec<WatchedNs> = hosts.iter().map(WatchedNs::from).collect();
        Self::start_in(&places, ip)
    }

    /// Like [`AddressWatch::start`], for any network namespaces (e.g. a
    /// [`crate::nspawn::Machine`]'s, see its `watched_ns`).
    pub fn start_in(places: &[WatchedNs], ip: Ipv4Addr) -> AddressWatch {
        let state = Arc::new(Mutex::new(WatchState {
            held: vec![BTreeSet::new(); places.len()],
            events: Vec::new(),
        }));
        let mut monitors = Vec::new();
        for (i, place) in places.iter().enumerate() {
            let mut cmd = place.ip(&["-o", "monitor", "address"]);
            cmd.stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null());
            let child = cmd
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start `{}`: {e}", command_line(&cmd)));
            let mut guard = ChildGuard(child);
            wait_subscribed(&mut guard.0, &place.name);
            let stdout = guard.0.stdout.take().expect("monitor stdout");
            {
                // Snapshot after subscribing: no change can fall between.
                let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
                let out = run(&mut place.ip(&["-o", "-4", "addr", "show"]));
                for line in String::from_utf8_lossy(&out.stdout).lines() {
                    if let Some((true, key)) = parse_addr_line(line, ip) {
                        st.apply(i, &place.name, true, key);
                    }
                }
            }
            let state = Arc::clone(&state);
            let name = place.name.clone();
            // Ends at EOF, when the monitor is killed.
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if let Some((added, key)) = parse_addr_line(&line, ip) {
                        let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
                        st.apply(i, &name, added, key);
                    }
                }
            });
            monitors.push(guard);
        }
        AddressWatch {
            ip,
            hosts: places.iter().map(|p| p.name.clone()).collect(),
            state,
            _monitors: monitors,
        }
    }

    /// The watched address.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    fn state(&self) -> MutexGuard<'_, WatchState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hosts holding the address now, per the event log (in the order the
    /// hosts were given).
    pub fn holders_now(&self) -> Vec<String> {
        let st = self.state();
        self.hosts
            .iter()
            .zip(&st.held)
            .filter(|(_, held)| !held.is_empty())
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// The timeline: every change, in order. The snapshot at start shows
    /// as `added` events at the time the watch started.
    pub fn events(&self) -> Vec<AddrEvent> {
        self.state().events.clone()
    }

    /// The first change strictly after `t`.
    pub fn first_change_after(&self, t: Instant) -> Option<AddrEvent> {
        self.state().events.iter().find(|e| e.at > t).cloned()
    }

    /// Total time during which two or more hosts held the address at once
    /// (up to now if they still do).
    pub fn dual_holder_time(&self) -> Duration {
        let st = self.state();
        let mut holders: BTreeSet<&str> = BTreeSet::new();
        let mut since: Option<Instant> = None;
        let mut total = Duration::ZERO;
        for e in &st.events {
            if e.added {
                holders.insert(&e.host);
            } else {
                holders.remove(e.host.as_str());
            }
            match (holders.len() >= 2, since) {
                (true, None) => since = Some(e.at),
                (false, Some(s)) => {
                    total += e.at - s;
                    since = None;
                }
                _ => {}
            }
        }
        if let Some(s) = since {
            total += s.elapsed();
        }
        total
    }

    /// The largest number of hosts that held the address at once.
    pub fn max_holders(&self) -> usize {
        let st = self.state();
        let mut holders: BTreeSet<&str> = BTreeSet::new();
        let mut max = 0;
        for e in &st.events {
            if e.added {
                holders.insert(&e.host);
            } else {
                holders.remove(e.host.as_str());
            }
            max = max.max(holders.len());
        }
        max
    }
}

/// Waits until `child` (an `ip monitor`) has a netlink socket subscribed to
/// multicast groups: from then on it sees every change.
fn wait_subscribed(child: &mut Child, name: &str) {
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("`ip monitor address` in {name} exited at once: {status}");
        }
        let inodes: BTreeSet<String> = fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| fs::read_link(e.path()).ok())
            .filter_map(|l| {
                let l = l.to_string_lossy().into_owned();
                l.strip_prefix("socket:[")
                    .and_then(|s| s.strip_suffix(']'))
                    .map(str::to_owned)
            })
            .collect();
        let table = fs::read_to_string(format!("/proc/{pid}/net/netlink")).unwrap_or_default();
        // sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode
        let subscribed = table.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() >= 10 && f[3].chars().any(|c| c != '0') && inodes.contains(f[9])
        });
        if subscribed {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "`ip monitor address` in {name} did not subscribe within 10 s"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// What `vip-client` measured.
#[derive(Clone, Debug, Default)]
pub struct ClientReport {
    pub requests: u64,
    pub failed: u64,
    pub longest_outage_ms: f64,
    /// Runs of consecutive failures: (start, end) in ms since the client
    /// started; start is the first failed request's start, end the next
    /// successful request's start (or the end of the run).
    pub outages: Vec<(f64, f64)>,
    /// Successful responses per body (the backend's name).
    pub backends: BTreeMap<String, u64>,
    /// Whether the last request succeeded.
    pub last_ok: bool,
    /// How long the client ran, in ms.
    pub duration_ms: f64,
}

impl ClientReport {
    pub fn parse(json: &str) -> ClientReport {
        let v: serde_json::Value = serde_json::from_str(json.trim())
            .unwrap_or_else(|e| panic!("vip-client output is not JSON ({e}): {json}"));
        let num = |k: &str| {
            v[k].as_f64()
                .unwrap_or_else(|| panic!("vip-client output lacks {k}: {json}"))
        };
        ClientReport {
            requests: num("requests") as u64,
            failed: num("failed") as u64,
            longest_outage_ms: num("longest_outage_ms"),
            outages: v["outages"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|o| {
                    (
                        o[0].as_f64().unwrap_or_default(),
                        o[1].as_f64().unwrap_or_default(),
                    )
                })
                .collect(),
            backends: v["backends"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or_default()))
                .collect(),
            last_ok: v["last_ok"].as_bool().unwrap_or_default(),
            duration_ms: v["duration_ms"].as_f64().unwrap_or_default(),
        }
    }

    pub fn succeeded(&self) -> u64 {
        self.requests - self.failed
    }

    /// The longest run of failures, as a duration.
    pub fn longest_outage(&self) -> Duration {
        Duration::from_secs_f64(self.longest_outage_ms.max(0.0) / 1000.0)
    }

    /// Whether service was back at the end: the last request succeeded.
    pub fn recovered(&self) -> bool {
        self.last_ok
    }
}

/// Pacing and timeouts for [`ClientRun`].
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Time between request starts.
    pub interval: Duration,
    /// Connect timeout, and read timeout for the answer.
    pub timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            interval: Duration::from_millis(10),
            timeout: Duration::from_millis(200),
        }
    }
}

/// A `vip-client` running in a host (killed by pid if dropped unfinished),
/// so that a test can inject a fault while it runs.
pub struct ClientRun {
    child: Option<Child>,
    what: String,
}

impl ClientRun {
    /// Starts `vip-client` in `host` against `target` for `duration` (at
    /// least one request is made), with default options.
    pub fn start(host: &Host, target: SocketAddrV4, duration: Duration) -> ClientRun {
        Self::start_with(host, target, duration, &ClientOptions::default())
    }

    pub fn start_with(
        host: &Host,
        target: SocketAddrV4,
        duration: Duration,
        options: &ClientOptions,
    ) -> ClientRun {
        let mut cmd = host.command(crate::bin("vip-client"));
        cmd.arg("--target")
            .arg(target.to_string())
            .arg("--duration-ms")
            .arg(duration.as_millis().to_string())
            .arg("--interval-ms")
            .arg(options.interval.as_millis().max(1).to_string())
            .arg("--timeout-ms")
            .arg(options.timeout.as_millis().max(1).to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let what = command_line(&cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{what}`: {e}"));
        ClientRun {
            child: Some(child),
            what,
        }
    }

    /// Waits for the client to end by itself and returns its report.
    pub fn finish(mut self) -> ClientReport {
        let child = self.child.take().expect("client child");
        let out = child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("`{}`: {e}", self.what));
        assert!(
            out.status.success(),
            "`{}` failed ({}): {}",
            self.what,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        ClientReport::parse(&String::from_utf8_lossy(&out.stdout))
    }
}

impl Drop for ClientRun {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `vip-client` in `host` against `target` for `duration` and returns
/// its report (at least one request is made, even for a zero duration).
pub fn run_client(host: &Host, target: SocketAddrV4, duration: Duration) -> ClientReport {
    ClientRun::start(host, target, duration).finish()
}
