//! A real front door on one machine, for the VIP failover tests and the
//! failover benchmark: network namespaces on a bridge in 198.18.0.0/15,
//!
//! - `lb1`, `lb2`: a real HAProxy each (frontend `VIP:80`) and a real
//!   `steward-agent` holding the VIP under the lease protocol;
//! - `be1`, `be2`: HTTP backends;
//! - `client`: where load comes from;
//! - the root namespace (the bridge's `.1`): etcd and three coordinator
//!   replicas, reached by the agents over the bridge.
//!
//! Everything is torn down on drop, processes first (by pid), then the
//! namespaces and the bridge.

use std::fs;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::netns::{run_client, AddressWatch, Host, TestNet};
use crate::{bin, eventually, Cluster, Proc};

pub const VIP_NAME: &str = "front";
pub const BACKEND_PORT: u16 = 8080;
/// HAProxy's monitor frontend on each LB's loopback (keepalived's check).
pub const MONITOR_PORT: u16 = 8404;

/// One load balancer host: its namespace, HAProxy and agent.
pub struct Lb {
    pub host: Host,
    pub haproxy: Option<Proc>,
    pub haproxy_config: PathBuf,
    pub haproxy_socket: PathBuf,
    /// Index into `cluster.agents`.
    pub agent: usize,
}

/// What both the Steward bed and the keepalived bed stand on: the network,
/// the LB hosts with HAProxy, the backends and the client.
pub struct FrontDoor {
    // Drop order: processes first, the network last.
    pub watch: Option<AddressWatch>,
    pub lbs: Vec<Lb>,
    pub backends: Vec<Proc>,
    pub client: Host,
    pub vip: Ipv4Addr,
    pub dir: tempfile::TempDir,
    pub net: TestNet,
}

impl FrontDoor {
    /// Hosts, backends and HAProxy on both LBs (bound to the VIP, which no
    /// host holds yet).
    pub fn build(tag: &str) -> FrontDoor {
        let mut net = TestNet::new(tag);
        let lb_hosts = [net.add_host("lb1"), net.add_host("lb2")];
        let backend_hosts = [net.add_host("be1"), net.add_host("be2")];
        let client = net.add_host("client");
        let vip = net.addr(200);
        let dir = tempfile::Builder::new()
            .prefix("steward-frontdoor-")
            .tempdir()
            .expect("tempdir");

        let backends = backend_hosts
            .iter()
            .map(|h| {
                let mut cmd = h.command(bin("http-backend"));
                cmd.arg("--listen")
                    .arg(format!("{}:{BACKEND_PORT}", h.ip()))
                    .arg("--name")
                    .arg(h.name());
                Proc::spawn(
                    &format!("http-backend {}", h.name()),
                    cmd,
                    dir.path().join(format!("{}.log", h.name())),
                )
            })
            .collect();

        let mut lbs = Vec::new();
        for host in lb_hosts {
            let haproxy_socket = dir.path().join(format!("{}-haproxy.sock", host.name()));
            let haproxy_config = dir.path().join(format!("{}-haproxy.cfg", host.name()));
            fs::write(
                &haproxy_config,
                haproxy_config_text(&haproxy_socket, vip, &backend_hosts),
            )
            .expect("write haproxy config");
            // What the lb role's convergence sets before HAProxy starts: the
            // passive node must bind the VIP's frontend without holding it.
            host.set_sysctl("net.ipv4.ip_nonlocal_bind", "1");
            let mut lb = Lb {
                host,
                haproxy: None,
                haproxy_config,
                haproxy_socket,
                agent: 0,
            };
            lb.start_haproxy(dir.path());
            lbs.push(lb);
        }
        FrontDoor {
            watch: None,
            lbs,
            backends,
            client,
            vip,
            dir,
            net,
        }
    }

    /// Starts recording who holds the VIP.
    pub fn start_watch(&mut self) {
        let hosts: Vec<Host> = self.lbs.iter().map(|l| l.host.clone()).collect();
        self.watch = Some(AddressWatch::start(&hosts, self.vip));
    }

    pub fn watch(&self) -> &AddressWatch {
        self.watch.as_ref().expect("address watch")
    }

    pub fn target(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.vip, 80)
    }

    /// Index of the LB whose namespace holds the VIP (exactly one, or None).
    pub fn holder(&self) -> Option<usize> {
        let holders: Vec<usize> = (0..self.lbs.len())
            .filter(|&i| self.lbs[i].host.has_address(self.vip))
            .collect();
        (holders.len() == 1).then(|| holders[0])
    }

    pub fn wait_for_single_holder(&self, timeout: Duration) -> usize {
        eventually(timeout, "exactly one LB to hold the VIP", || self.holder())
    }

    /// Waits until the VIP sits on `lb` (by index) and nowhere else.
    pub fn wait_for_holder(&self, lb: usize, timeout: Duration) {
        let name = self.lbs[lb].host.name().to_owned();
        eventually(timeout, &format!("{name} to hold the VIP"), || {
            (self.holder() == Some(lb)).then_some(())
        });
    }

    /// Waits until `lb` holds the VIP, whoever else does (a host off the
    /// wire may still have it configured).
    pub fn wait_for_holder_on_wire(&self, lb: usize, timeout: Duration) {
        let host = &self.lbs[lb].host;
        eventually(timeout, &format!("{} to hold the VIP", host.name()), || {
            host.has_address(self.vip).then_some(())
        });
    }

    /// A short burst of requests through the VIP from the client host,
    /// all answered.
    pub fn serves(&self) -> bool {
        let report = run_client(&self.client, self.target(), Duration::from_millis(50));
        report.requests > 0 && report.failed == 0
    }

    /// Panics unless a burst through the VIP is all answered within
    /// `bound` (the new holder's announcement has to reach the client, and
    /// a loaded machine may slow the first requests).
    pub fn assert_serves_within(&self, bound: Duration) {
        eventually(bound, "the VIP to serve", || self.serves().then_some(()));
    }

    /// The holder vanishes from the network without a word (its cable is
    /// pulled); everything on it keeps running.
    pub fn vanish(&self, lb: usize) {
        self.lbs[lb].host.link_down();
    }

    pub fn reappear(&self, lb: usize) {
        self.lbs[lb].host.link_up();
    }

    /// The holder vanishes and cannot tell: its port leaves the switch,
    /// every link stays up (no carrier loss), so it looks exactly like a
    /// hung or partitioned machine, to its peers and to itself.
    pub fn vanish_silently(&self, lb: usize) {
        let host = &self.lbs[lb].host;
        host.detach();
        assert!(host.has_carrier(), "{} lost carrier", host.name());
    }

    /// Undoes [`FrontDoor::vanish_silently`].
    pub fn reappear_silently(&self, lb: usize) {
        self.lbs[lb].host.attach();
    }
}

/// Options for [`VipBed::start`].
#[derive(Clone, Debug)]
pub struct BedOptions {
    /// `[vip] profile` for agents and coordinators: "default" or "fast".
    pub profile: &'static str,
}

impl Default for BedOptions {
    fn default() -> Self {
        BedOptions { profile: "default" }
    }
}

/// The front door run by Steward: etcd and three coordinators in the root
/// namespace (on the bridge), an agent on each LB.
pub struct VipBed {
    pub cluster: Cluster,
    pub door: FrontDoor,
}

impl std::ops::Deref for VipBed {
    type Target = FrontDoor;
    fn deref(&self) -> &FrontDoor {
        &self.door
    }
}

impl std::ops::DerefMut for VipBed {
    fn deref_mut(&mut self) -> &mut FrontDoor {
        &mut self.door
    }
}

impl VipBed {
    /// Builds the bed and waits until the VIP is held and serving.
    pub fn start(tag: &str, options: BedOptions) -> VipBed {
        let mut door = FrontDoor::build(tag);
        let mut cluster = Cluster::new();
        cluster.coordinator_host = door.net.gateway().to_string();
        cluster.coordinator_profile = Some(options.profile.to_owned());
        cluster.start_coordinators(3);

        for lb in &mut door.lbs {
            let extra = [
                (
                    "vip.haproxy_socket",
                    toml::Value::from(lb.haproxy_socket.display().to_string()),
                ),
                ("vip.profile", toml::Value::from(options.profile)),
            ];
            lb.agent = cluster.start_agent_in(lb.host.ns(), lb.host.name(), &extra);
        }
        for lb in &door.lbs {
            let node = lb.host.name().to_owned();
            eventually(Duration::from_secs(20), "lb agent to connect", || {
                cluster.node(&node).is_some().then_some(())
            });
            let out = cluster.ctl(&["role", "add", &node, "lb"]);
            assert!(out.ok(), "role add {node} lb: {}", out.stderr);
        }
        door.start_watch();
        let address = format!("{}/{}", door.vip, door.net.prefix_len());
        let out = cluster.ctl(&["vip", "set", VIP_NAME, "--address", &address]);
        assert!(out.ok(), "vip set: {}", out.stderr);

        let bed = VipBed { cluster, door };
        bed.wait_for_single_holder(Duration::from_secs(30));
        bed.assert_serves_within(Duration::from_secs(10));
        bed
    }

    /// `stewardctl vip list -o json` entry for the VIP.
    pub fn vip_status(&self) -> serde_json::Value {
        let out = self.cluster.ctl(&["vip", "list", "-o", "json"]);
        assert!(out.ok(), "vip list: {}", out.stderr);
        out.json()
            .as_array()
            .and_then(|a| a.iter().find(|v| v["name"] == VIP_NAME).cloned())
            .expect("the VIP is listed")
    }

    /// The owner the coordinators record.
    pub fn recorded_owner(&self) -> Option<String> {
        self.vip_status()["owner"].as_str().map(str::to_owned)
    }

    pub fn index_of_leader(&self) -> usize {
        let leader = self.cluster.leader().expect("a leader");
        self.cluster.coordinator_index(&leader)
    }

    pub fn agent(&self, lb: usize) -> &Proc {
        &self.cluster.agents[self.door.lbs[lb].agent].proc
    }
}

/// The same front door run by keepalived (Debian's package, VRRPv3,
/// unicast adverts between the two LBs, `nopreempt`, HAProxy tracked by a
/// script), for the benchmark.
pub struct KeepalivedBed {
    pub keepalived: Vec<Option<Proc>>,
    configs: Vec<PathBuf>,
    pub door: FrontDoor,
}

impl std::ops::Deref for KeepalivedBed {
    type Target = FrontDoor;
    fn deref(&self) -> &FrontDoor {
        &self.door
    }
}

impl KeepalivedBed {
    /// `advert_int` in seconds (VRRPv3 allows centiseconds: 0.1 works).
    pub fn start(tag: &str, advert_int: f64) -> KeepalivedBed {
        let mut door = FrontDoor::build(tag);
        door.start_watch();
        let ips: Vec<Ipv4Addr> = door.lbs.iter().map(|l| l.host.ip()).collect();
        let mut configs = Vec::new();
        for (i, lb) in door.lbs.iter().enumerate() {
            let name = lb.host.name();
            let config = door.dir.path().join(format!("{name}-keepalived.conf"));
            let text = keepalived_config_text(
                name,
                ips[i],
                ips[1 - i],
                door.vip,
                door.net.prefix_len(),
                100 - 10 * i as u32,
                advert_int,
            );
            fs::write(&config, text).expect("write keepalived config");
            configs.push(config);
        }
        let keepalived = (0..door.lbs.len())
            .map(|i| Some(spawn_keepalived(&door, i, &configs[i])))
            .collect();
        let bed = KeepalivedBed {
            keepalived,
            configs,
            door,
        };
        bed.wait_for_single_holder(Duration::from_secs(30));
        bed.assert_serves_within(Duration::from_secs(10));
        bed
    }
}

impl KeepalivedBed {
    /// Stops keepalived on `lb` the planned way (SIGTERM: it sends a
    /// priority-0 advert so that the backup takes over at once).
    pub fn stop_instance(&mut self, lb: usize) {
        if let Some(mut k) = self.keepalived[lb].take() {
            k.stop(Duration::from_secs(5));
        }
    }

    pub fn start_instance(&mut self, lb: usize) {
        if self.keepalived[lb].is_none() {
            self.keepalived[lb] = Some(spawn_keepalived(&self.door, lb, &self.configs[lb]));
        }
    }
}

fn spawn_keepalived(door: &FrontDoor, lb: usize, config: &std::path::Path) -> Proc {
    let name = door.lbs[lb].host.name();
    let file = |suffix: &str| door.dir.path().join(format!("{name}-{suffix}"));
    let mut cmd = door.lbs[lb].host.command("keepalived");
    cmd.args(["--dont-fork", "--log-console", "--vrrp", "--use-file"])
        .arg(config)
        .arg("--pid")
        .arg(file("keepalived.pid"))
        .arg("--vrrp_pid")
        .arg(file("vrrp.pid"));
    Proc::spawn(
        &format!("keepalived {name}"),
        cmd,
        file(&format!("keepalived.{}.log", crate::unique())),
    )
}

impl Drop for KeepalivedBed {
    fn drop(&mut self) {
        // SIGTERM first: keepalived's main process then stops its VRRP
        // child and removes the VIP; SIGKILL (Proc's drop) only if stuck.
        for k in self.keepalived.iter_mut().flatten() {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                k.stop(Duration::from_secs(5))
            }));
        }
    }
}

fn keepalived_config_text(
    name: &str,
    own: Ipv4Addr,
    peer: Ipv4Addr,
    vip: Ipv4Addr,
    prefix: u8,
    priority: u32,
    advert_int: f64,
) -> String {
    format!(
        "global_defs {{
    router_id {name}
    vrrp_version 3
    script_user root
    enable_script_security
    vrrp_garp_master_delay 0
}}

vrrp_script haproxy_up {{
    script \"/usr/bin/bash -c 'exec 3<>/dev/tcp/127.0.0.1/{MONITOR_PORT}'\"
    interval 1
    timeout 1
    fall 1
    rise 1
}}

vrrp_instance front {{
    state BACKUP
    nopreempt
    interface eth0
    virtual_router_id 51
    priority {priority}
    advert_int {advert_int}
    unicast_src_ip {own}
    unicast_peer {{
        {peer}
    }}
    virtual_ipaddress {{
        {vip}/{prefix} dev eth0
    }}
    track_script {{
        haproxy_up
    }}
}}
"
    )
}

impl Lb {
    pub fn start_haproxy(&mut self, dir: &std::path::Path) {
        let _ = fs::remove_file(&self.haproxy_socket);
        let mut cmd: Command = self.host.command("haproxy");
        cmd.arg("-db").arg("-f").arg(&self.haproxy_config);
        let log = dir.join(format!(
            "{}-haproxy.{}.log",
            self.host.name(),
            crate::unique()
        ));
        self.haproxy = Some(Proc::spawn(
            &format!("haproxy {}", self.host.name()),
            cmd,
            log,
        ));
        let socket = self.haproxy_socket.clone();
        eventually(Duration::from_secs(10), "HAProxy's admin socket", || {
            std::os::unix::net::UnixStream::connect(&socket)
                .ok()
                .map(|_| ())
        });
    }

    pub fn kill_haproxy(&mut self) {
        if let Some(mut haproxy) = self.haproxy.take() {
            haproxy.kill();
        }
    }
}

fn haproxy_config_text(socket: &std::path::Path, vip: Ipv4Addr, backends: &[Host]) -> String {
    let servers: String = backends
        .iter()
        .map(|b| {
            format!(
                "    server {} {}:{BACKEND_PORT} check inter 200ms fall 2 rise 1\n",
                b.name(),
                b.ip()
            )
        })
        .collect();
    format!(
        "global
    stats socket {socket} mode 600 level admin
    maxconn 2000

defaults
    mode http
    timeout connect 300ms
    timeout client 5s
    timeout server 5s
    retries 2
    option redispatch

frontend front
    bind {vip}:80
    default_backend web

frontend monitor
    bind 127.0.0.1:{MONITOR_PORT}
    monitor-uri /healthz

backend web
    balance roundrobin
{servers}",
        socket = socket.display()
    )
}
