//! A front door converged by Steward on hosts that boot real systemd: the
//! lb role end to end.
//!
//! ```text
//!   root namespace (the gateway .1): etcd, coord-1..3, the test itself
//!   TestNet wire:
//!     lb1, lb2   nspawn machines (.199, .198 ...): systemd as PID 1,
//!                steward-agent.service as packaged, converge on; the agent
//!                installs HAProxy with a real apt-get from the local repo
//!     be1, be2   netns hosts (.10, .11): `http-backend` on :80 answering
//!                its name, and a steward agent (converge off) so it is a
//!                cluster member with an address
//!     client     netns host: `vip-client` to VIP:80
//! ```
//!
//! [`ConvergeBed::start_machines`] builds the same bed without backends
//! and with machines of any names and [`MachineOptions`] (the Gluster and
//! Kubernetes tests).
//!
//! Each LB machine gets the freshly built `steward-agent` bound read-only
//! at `/usr/bin/steward-agent` (the path `packaging/systemd/
//! steward-agent.service` runs), its certificate, key and the CA in
//! `/etc/steward/pki/` as the package lays them out (`node.crt`,
//! `node.key`, `ca.crt`: the unit starts only once they exist),
//! `/etc/steward/agent.toml` derived from
//! `packaging/agent.example.toml` (converge on, a short recheck, state in
//! `/var/lib/steward-agent`, the unit's `StateDirectory=`), and the packaged
//! unit, unchanged, enabled and started.
//!
//! Dropping the bed halts the machines first (printing the agents'
//! journals if the test failed), then the backends, the cluster and the
//! network.

use std::fs;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::netns::{Host, TestNet};
use crate::nspawn::{Machine, MachineOptions};
use crate::{bin, repo_root, Cluster, Ctl, Proc};

pub const VIP_NAME: &str = "front";
/// The lb role sends `VIP:80` to the k8s-worker members on this port.
pub const BACKEND_PORT: u16 = 80;
/// `[converge] recheck_interval_s` of the agents in the machines.
pub const RECHECK_S: u64 = 3;
/// `reboot_check_interval_s` of the agents in the machines.
pub const REBOOT_CHECK_S: u64 = 1;
pub const AGENT_UNIT: &str = "steward-agent.service";
/// Where the packaged unit's `ExecStart=` finds the agent.
pub const AGENT_IN_MACHINE: &str = "/usr/bin/steward-agent";
pub const AGENT_CONFIG_IN_MACHINE: &str = "/etc/steward/agent.toml";
const PKI_IN_MACHINE: &str = "/etc/steward/pki";
const STATE_IN_MACHINE: &str = "/var/lib/steward-agent";
pub const HAPROXY_CFG: &str = "/etc/haproxy/haproxy.cfg";

/// Polls `check` every `every` until it returns `Ok` or `timeout` passes;
/// then panics with `what` and the last `Err` (why it was not there yet).
pub fn poll<T>(
    timeout: Duration,
    every: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        crate::check_interrupt(what);
        match check() {
            Ok(v) => return v,
            Err(why) => assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}; last: {why}"
            ),
        }
        std::thread::sleep(every);
    }
}

/// A backend host: `http-backend` on `:80` and, once it joined, an agent.
pub struct Backend {
    pub host: Host,
    pub http: Proc,
    /// Index into `cluster.agents`, once started.
    pub agent: Option<usize>,
}

pub struct ConvergeBed {
    // Drop order: the machines first (their agents go with them), then the
    // backends, the cluster (agents, coordinators, etcd, directory), the
    // network last.
    pub lbs: Vec<Machine>,
    pub backends: Vec<Backend>,
    pub client: Host,
    pub vip: Ipv4Addr,
    pub cluster: Cluster,
    pub net: TestNet,
    /// Units whose journals (last 20 lines) are printed for every machine
    /// when the test fails, besides the agent's (default: HAProxy's).
    pub dump_units: Vec<String>,
}

impl ConvergeBed {
    /// The network, the hosts, etcd and three coordinators on the gateway,
    /// `http-backend` on every backend (no agents yet: see
    /// [`ConvergeBed::join_backend`]), and the LB machines booted with the
    /// agent running as a systemd service, connected but without roles.
    pub fn start(tag: &str, lb_names: &[&str], backend_names: &[&str]) -> ConvergeBed {
        Self::build(tag, default_machines(lb_names), backend_names, true)
    }

    /// Like [`ConvergeBed::start`], but the LB machines' agents have no
    /// identity yet: the binary, the packaged unit and a config without
    /// certificates are in place, and [`ConvergeBed::join_machine`] joins
    /// each with a token as an operator would.
    pub fn start_unjoined(tag: &str, lb_names: &[&str], backend_names: &[&str]) -> ConvergeBed {
        Self::build(tag, default_machines(lb_names), backend_names, false)
    }

    /// A bed of agent machines and nothing else: the network, etcd and
    /// three coordinators on the gateway, and each machine booted with its
    /// own `MachineOptions` (the agent binary is bound in here) and the
    /// agent running as a systemd service, connected but without roles. No
    /// backends; `client` is an idle netns host and `vip` the address `.200`
    /// as with [`ConvergeBed::start`]. The machines are in `lbs` (the field's
    /// name is historical) and found with [`ConvergeBed::machine`].
    pub fn start_machines(tag: &str, machines: Vec<(&str, MachineOptions)>) -> ConvergeBed {
        Self::build(tag, machines, &[], true)
    }

    fn build(
        tag: &str,
        machines: Vec<(&str, MachineOptions)>,
        backend_names: &[&str],
        install_agents: bool,
    ) -> ConvergeBed {
        let t0 = Instant::now();
        let mut net = TestNet::new(tag);
        let backend_hosts: Vec<Host> = backend_names.iter().map(|n| net.add_host(n)).collect();
        let client = net.add_host("client");
        let vip = net.addr(200);

        let mut cluster = Cluster::new();
        cluster.coordinator_host = net.gateway().to_string();
        cluster.start_coordinators(3);
        eprintln!(
            "[bed {:>6.1}s] etcd and 3 coordinators on {}",
            t0.elapsed().as_secs_f64(),
            net.gateway()
        );

        let backends = backend_hosts
            .into_iter()
            .map(|host| {
                let mut cmd = host.command(bin("http-backend"));
                cmd.arg("--listen")
                    .arg(format!("{}:{BACKEND_PORT}", host.ip()))
                    .arg("--name")
                    .arg(host.name());
                let http = Proc::spawn(
                    &format!("http-backend {}", host.name()),
                    cmd,
                    cluster
                        .dir
                        .path()
                        .join(format!("http-backend-{}.log", host.name())),
                );
                Backend {
                    host,
                    http,
                    agent: None,
                }
            })
            .collect();

        // Boot in parallel: most of it is waiting for systemd.
        let agent_bin = bin("steward-agent");
        let lbs: Vec<Machine> = std::thread::scope(|s| {
            let booting: Vec<_> = machines
                .into_iter()
                .map(|(name, opts)| {
                    let net = &net;
                    let opts = opts.bind_ro(&agent_bin, AGENT_IN_MACHINE);
                    s.spawn(move || Machine::boot(net, name, opts))
                })
                .collect();
            booting
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        });
        eprintln!(
            "[bed {:>6.1}s] machines booted: {}",
            t0.elapsed().as_secs_f64(),
            lbs.iter()
                .map(|m| format!("{} {}", m.name(), m.ip()))
                .collect::<Vec<_>>()
                .join(", ")
        );

        let bed = ConvergeBed {
            lbs,
            backends,
            client,
            vip,
            cluster,
            net,
            dump_units: vec!["haproxy.service".into()],
        };
        if !install_agents {
            return bed;
        }
        for m in &bed.lbs {
            bed.install_agent(m);
        }
        for m in &bed.lbs {
            bed.wait_known(m.name(), Duration::from_secs(30));
        }
        eprintln!(
            "[bed {:>6.1}s] agents in the machines connected",
            t0.elapsed().as_secs_f64()
        );
        bed
    }

    /// The config keys every machine's agent gets besides its identity:
    /// the packaged layout's paths, converging on, a short recheck.
    fn machine_agent_keys() -> [(&'static str, toml::Value); 7] {
        let inside = |file: &str| format!("{PKI_IN_MACHINE}/{file}");
        [
            ("tls.ca", toml::Value::from(inside("ca.crt"))),
            ("tls.cert", toml::Value::from(inside("node.crt"))),
            ("tls.key", toml::Value::from(inside("node.key"))),
            ("state_dir", toml::Value::from(STATE_IN_MACHINE)),
            // This agent has a host of its own: converge it.
            ("converge.enabled", toml::Value::from(true)),
            (
                "converge.recheck_interval_s",
                toml::Value::from(RECHECK_S as i64),
            ),
            // Whether the host needs a reboot: soon seen (a file read).
            (
                "reboot_check_interval_s",
                toml::Value::from(REBOOT_CHECK_S as i64),
            ),
        ]
    }

    /// Puts `config` at [`AGENT_CONFIG_IN_MACHINE`] and the packaged unit in
    /// `m` (not started).
    fn put_agent_files(&self, m: &Machine, config: &Path) {
        let root = m.root();
        let etc = root.join("etc/steward");
        fs::create_dir_all(&etc).unwrap_or_else(|e| panic!("cannot create {}: {e}", etc.display()));
        copy_file(
            config,
            root.join(AGENT_CONFIG_IN_MACHINE.trim_start_matches('/')),
            0o644,
        );
        // The unit as shipped.
        copy_file(
            &repo_root().join("packaging/systemd").join(AGENT_UNIT),
            root.join("etc/systemd/system").join(AGENT_UNIT),
            0o644,
        );
        m.sh("systemctl daemon-reload");
    }

    /// Joins the agent in `m` (a machine of [`ConvergeBed::start_unjoined`])
    /// as an operator would: `steward-agent join` with `token`'s command
    /// and `--node-id NAME`, run inside, which writes the certificate and
    /// config and starts the packaged unit. Returns what join printed;
    /// panics if it fails or the unit is not active after it.
    pub fn join_machine(&self, m: &Machine, token: &crate::JoinToken) -> String {
        let node = m.name();
        let keys = Self::machine_agent_keys();
        let config = self.cluster.joining_agent_config(node, &keys);
        self.put_agent_files(m, &config);
        let mut argv = vec![
            AGENT_IN_MACHINE.to_owned(),
            "--config".to_owned(),
            AGENT_CONFIG_IN_MACHINE.to_owned(),
        ];
        argv.extend(token.join_args(node));
        let printed = crate::output_text(&m.exec(&argv));
        // join exits non-zero on any failure (and says why); the unit's
        // state is what counts.
        let active = self.unit_state(m, AGENT_UNIT);
        assert_eq!(
            active,
            "active",
            "{node}: {AGENT_UNIT} is not active after join ({printed}):\n{}",
            m.journal(AGENT_UNIT)
        );
        printed
    }

    /// Puts the agent into `m` as a package would, and starts it with the
    /// packaged unit.
    /// Installs and starts the agent in `m` (booted on this bed's net with
    /// the agent binary bound at [`AGENT_IN_MACHINE`]): certificate, config
    /// with converging on, the packaged unit, `systemctl enable --now`.
    pub fn install_agent(&self, m: &Machine) {
        let node = m.name();
        let root = m.root();
        let pki = root.join(PKI_IN_MACHINE.trim_start_matches('/'));
        fs::create_dir_all(&pki).expect("mkdir /etc/steward/pki");
        // The packaged layout: the unit starts only once these exist
        // (ConditionPathExists=).
        let extra = Self::machine_agent_keys();
        // Issues the node's certificate too.
        let config =
            self.cluster
                .agent_config_with(node, node, &self.cluster.coordinator_urls(), &extra);
        let host_pki = self.cluster.pki();
        copy_file(&host_pki.join("ca.crt"), pki.join("ca.crt"), 0o644);
        copy_file(
            &host_pki.join(format!("{node}.crt")),
            pki.join("node.crt"),
            0o644,
        );
        copy_file(
            &host_pki.join(format!("{node}.key")),
            pki.join("node.key"),
            0o600,
        );
        self.put_agent_files(m, &config);
        m.sh(&format!(
            "{AGENT_IN_MACHINE} --config {AGENT_CONFIG_IN_MACHINE} --check"
        ));
        m.sh(&format!("systemctl enable --now {AGENT_UNIT}"));
        let active = self.exec_text(m, &["systemctl", "is-active", AGENT_UNIT]);
        assert_eq!(
            active.trim(),
            "active",
            "{node}: {AGENT_UNIT} did not start:\n{}",
            m.journal(AGENT_UNIT)
        );
    }

    /// Waits until `node` is listed by the coordinators.
    pub fn wait_known(&self, node: &str, timeout: Duration) {
        poll(
            timeout,
            Duration::from_millis(200),
            &format!("node {node} to connect"),
            || {
                self.cluster
                    .node(node)
                    .map(|_| ())
                    .ok_or_else(|| "not listed".to_owned())
            },
        );
    }

    /// Starts the backend's agent (converge off: it shares this machine)
    /// and waits until the cluster knows it.
    pub fn join_backend(&mut self, name: &str) {
        let i = self.backend_index(name);
        assert!(self.backends[i].agent.is_none(), "{name} joined already");
        let ns = self.backends[i].host.ns().to_owned();
        let agent = self.cluster.start_agent_in(&ns, name, &[]);
        self.backends[i].agent = Some(agent);
        self.wait_known(name, Duration::from_secs(20));
    }

    /// Like [`ConvergeBed::join_backend`], but the backend's agent joins
    /// with `token` (see [`crate::Cluster::join_agent_in`]); returns what
    /// `steward-agent join` printed.
    pub fn join_backend_with_token(&mut self, name: &str, token: &crate::JoinToken) -> String {
        let i = self.backend_index(name);
        assert!(self.backends[i].agent.is_none(), "{name} joined already");
        let ns = self.backends[i].host.ns().to_owned();
        let (agent, printed) = self.cluster.join_agent_in(&ns, name, token, &[]);
        self.backends[i].agent = Some(agent);
        self.wait_known(name, Duration::from_secs(20));
        printed
    }

    fn backend_index(&self, name: &str) -> usize {
        self.backends
            .iter()
            .position(|b| b.host.name() == name)
            .unwrap_or_else(|| panic!("no backend {name}"))
    }

    pub fn backend(&self, name: &str) -> &Backend {
        &self.backends[self.backend_index(name)]
    }

    pub fn lb(&self, name: &str) -> &Machine {
        self.lbs
            .iter()
            .find(|m| m.name() == name)
            .unwrap_or_else(|| panic!("no LB machine {name}"))
    }

    /// The agent machine named `name` (any machine of the bed).
    pub fn machine(&self, name: &str) -> &Machine {
        self.lbs
            .iter()
            .find(|m| m.name() == name)
            .unwrap_or_else(|| panic!("no machine {name}"))
    }

    /// `stewardctl apply -f FILE` with `spec` written to a file in the
    /// cluster's directory; must succeed. Returns what it printed.
    pub fn apply_spec(&self, spec: &str) -> Ctl {
        let path = self
            .cluster
            .dir
            .path()
            .join(format!("spec-{}.toml", crate::unique()));
        fs::write(&path, spec).expect("write spec");
        let path = path.display().to_string();
        self.ctl_ok(&["apply", "-f", &path])
    }

    /// `stewardctl ARGS`, which must succeed.
    pub fn ctl_ok(&self, args: &[&str]) -> Ctl {
        let out = self.cluster.ctl(args);
        assert!(
            out.ok(),
            "stewardctl {} failed: {}{}",
            args.join(" "),
            out.stdout,
            out.stderr
        );
        out
    }

    /// `stewardctl vip set front --address VIP/len EXTRA...`, which must
    /// succeed; returns the address it set.
    pub fn set_vip(&self, extra: &[&str]) -> String {
        let address = format!("{}/{}", self.vip, self.net.prefix_len());
        let mut args = vec!["vip", "set", VIP_NAME, "--address", &address];
        args.extend_from_slice(extra);
        self.ctl_ok(&args);
        address
    }

    /// `stewardctl node show NODE -o json`; `Err` if it fails.
    pub fn node_json(&self, node: &str) -> Result<serde_json::Value, String> {
        let out = self.cluster.ctl(&["node", "show", node, "-o", "json"]);
        if !out.ok() {
            return Err(format!("node show {node}: {}", out.stderr.trim()));
        }
        serde_json::from_str(&out.stdout).map_err(|e| format!("node show {node}: {e}"))
    }

    /// `stewardctl node show NODE` as an operator reads it.
    pub fn node_table(&self, node: &str) -> String {
        let out = self.cluster.ctl(&["node", "show", node]);
        format!("{}{}", out.stdout, out.stderr)
    }

    /// The node's converge report once it is converged (every resource
    /// settled) at the current desired revision and `accept` likes it.
    pub fn converged_report(
        &self,
        node: &str,
        accept: impl Fn(&serde_json::Value) -> Result<(), String>,
    ) -> Result<serde_json::Value, String> {
        let view = self.node_json(node)?;
        let report = &view["converge"];
        if report.is_null() {
            return Err(format!("{node}: no converge report yet"));
        }
        let desired = view["desired_revision"].as_u64().unwrap_or(0);
        let revision = report["revision"].as_u64().unwrap_or(0);
        if revision != desired {
            return Err(format!(
                "{node}: report for revision {revision}, desired {desired}"
            ));
        }
        if report["converged"] != true {
            return Err(format!("{node}: not converged: {}", unsettled(report)));
        }
        accept(report)?;
        Ok(report.clone())
    }

    /// The revision of the desired state the agent in `m` has recorded
    /// (`desired.json` in its state directory): what it was given, whatever
    /// the admin API says.
    pub fn recorded_revision(&self, m: &Machine) -> Option<u64> {
        let text = self.read_file(m, &format!("{STATE_IN_MACHINE}/desired.json"))?;
        let json: serde_json::Value = serde_json::from_str(&text).ok()?;
        json["desired"]["revision"].as_u64()
    }

    /// Like [`ConvergeBed::converged_report`], but judged against the
    /// revision the agent in `m` has recorded rather than the admin API's
    /// `desired_revision`: the node's last report is for the desired state
    /// the agent holds, every resource is settled, and `accept` likes it.
    /// Returns the report and the admin API's `desired_revision`, which a
    /// test can compare with [`ConvergeBed::recorded_revision`].
    pub fn settled_report(
        &self,
        m: &Machine,
        accept: impl Fn(&serde_json::Value) -> Result<(), String>,
    ) -> Result<(serde_json::Value, u64), String> {
        let node = m.name();
        let view = self.node_json(node)?;
        let report = &view["converge"];
        if report.is_null() {
            return Err(format!("{node}: no converge report yet"));
        }
        let recorded = self
            .recorded_revision(m)
            .ok_or_else(|| format!("{node}: no desired.json yet"))?;
        let revision = report["revision"].as_u64().unwrap_or(0);
        if revision != recorded {
            return Err(format!(
                "{node}: report for revision {revision}, the agent holds {recorded}"
            ));
        }
        if report["converged"] != true {
            return Err(format!("{node}: not converged: {}", unsettled(report)));
        }
        accept(report)?;
        Ok((
            report.clone(),
            view["desired_revision"].as_u64().unwrap_or(0),
        ))
    }

    /// Waits up to `bound` until `name`'s report is settled at the revision
    /// its agent holds and `accept` likes it (see
    /// [`ConvergeBed::settled_report`]); notes a finding if `stewardctl
    /// node show` then gives a desired revision older than the one the
    /// agent was given and reports.
    pub fn settled(
        &self,
        findings: &Findings,
        name: &str,
        bound: Duration,
        accept: impl Fn(&serde_json::Value) -> Result<(), String>,
    ) -> serde_json::Value {
        let m = self.machine(name);
        let (report, admin_desired) = poll(
            bound,
            Duration::from_secs(1),
            &format!("{name}: converged at the revision its agent holds"),
            || {
                let (r, admin) = self.settled_report(m, &accept)?;
                let held = r["revision"].as_u64().unwrap_or(0);
                if admin > held {
                    return Err(format!(
                        "{name}: the admin API wants revision {admin}, the agent holds {held}"
                    ));
                }
                Ok((r, admin))
            },
        );
        let held = report["revision"].as_u64().unwrap_or(0);
        if admin_desired != held {
            findings.note_kind(
                "admin desired_revision behind the agent's",
                format!(
                    "`stewardctl node show {name} -o json` says desired_revision \
                     {admin_desired}, but the agent was given revision {held} (its desired.json) \
                     and reports that one converged: either the admin API leaves an input of the \
                     desired revision out, or a replica built the node's state from caches at two \
                     revisions (the agent then refuses the true, older state as a rollback)"
                ),
            );
        }
        report
    }

    /// Runs `argv` in `m`; stdout and stderr, whatever the exit status.
    pub fn exec_text(&self, m: &Machine, argv: &[&str]) -> String {
        crate::output_text(&m.exec(argv))
    }

    /// `systemctl is-active UNIT` in `m`.
    pub fn unit_state(&self, m: &Machine, unit: &str) -> String {
        self.exec_text(m, &["systemctl", "is-active", unit])
            .trim()
            .to_owned()
    }

    /// One property of a unit (`systemctl show -p NAME --value`).
    pub fn unit_property(&self, m: &Machine, unit: &str, property: &str) -> String {
        m.sh(&format!("systemctl show {unit} -p {property} --value"))
            .trim()
            .to_owned()
    }

    /// A file in `m`, read through its root from here.
    pub fn read_file(&self, m: &Machine, path: &str) -> Option<String> {
        fs::read_to_string(m.root().join(path.trim_start_matches('/'))).ok()
    }

    /// The names of the LB machines that have the VIP on an interface
    /// (`ip -o addr` inside each).
    pub fn vip_holders(&self) -> Vec<String> {
        let needle = format!(" {}/", self.vip);
        self.lbs
            .iter()
            .filter(|m| {
                m.sh("ip -o -4 addr show")
                    .lines()
                    .any(|l| l.contains(&needle))
            })
            .map(|m| m.name().to_owned())
            .collect()
    }

    /// Whether a TCP socket listens on `addr` in `m`'s network namespace
    /// (its `/proc/net/tcp`, read from here: the minimal root has no `ss`).
    pub fn listens(&self, m: &Machine, addr: SocketAddrV4) -> bool {
        let Some(leader) = m.leader_pid() else {
            return false;
        };
        // "0100007F:1F90" (127.0.0.1:8080 here): the address's bytes as
        // the kernel's u32 printed in host order, the port; 0A is LISTEN.
        let want = format!(
            "{:08X}:{:04X}",
            u32::from_ne_bytes(addr.ip().octets()),
            addr.port()
        );
        fs::read_to_string(format!("/proc/{leader}/net/tcp"))
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 3 && f[1] == want && f[3] == "0A"
            })
    }

    pub fn target(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.vip, 80)
    }

    /// Processes running in `m` (host pids) whose command name is one of
    /// `names`, with their command lines: read from this side through
    /// /proc (the machine's minimal root has no `ps`).
    pub fn processes_in(&self, m: &Machine, names: &[&str]) -> Vec<(u32, String)> {
        let Some(leader) = m.leader_pid() else {
            return Vec::new();
        };
        let Ok(ns) = fs::read_link(format!("/proc/{leader}/ns/pid")) else {
            return Vec::new();
        };
        let mut found = Vec::new();
        for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(comm) = fs::read_to_string(format!("/proc/{pid}/comm")) else {
                continue;
            };
            if !names.contains(&comm.trim()) {
                continue;
            }
            if fs::read_link(format!("/proc/{pid}/ns/pid")).ok().as_ref() != Some(&ns) {
                continue;
            }
            let cmdline = fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    c.split(|b| *b == 0)
                        .map(|a| String::from_utf8_lossy(a).into_owned())
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default();
            found.push((pid, cmdline.trim().to_owned()));
        }
        found
    }

    /// Processes (host pids) that have `path` in `m` open, by `fuser` run
    /// here on the machine's root: the same files, so the same inodes.
    /// `None` if the file does not exist.
    pub fn fuser(&self, m: &Machine, path: &str) -> Option<String> {
        let file = m.root().join(path.trim_start_matches('/'));
        if !file.exists() {
            return None;
        }
        let out = Command::new("fuser")
            .arg(&file)
            .output()
            .expect("run fuser (psmisc)");
        // fuser prints the file name on stderr and the pids on stdout.
        Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

fn default_machines<'a>(names: &[&'a str]) -> Vec<(&'a str, MachineOptions)> {
    names
        .iter()
        .map(|n| (*n, MachineOptions::default()))
        .collect()
}

fn copy_file(from: &Path, to: PathBuf, mode: u32) {
    fs::copy(from, &to)
        .unwrap_or_else(|e| panic!("copy {} -> {}: {e}", from.display(), to.display()));
    fs::set_permissions(&to, fs::Permissions::from_mode(mode)).expect("chmod");
}

/// Progress lines with the time since the test began.
pub struct Clock(pub Instant);

impl Clock {
    pub fn start() -> Clock {
        Clock(Instant::now())
    }

    pub fn say(&self, msg: impl std::fmt::Display) {
        eprintln!("[{:>6.1}s] {msg}", self.0.elapsed().as_secs_f64());
    }
}

/// Product problems a test found but could step past to check the rest:
/// each is printed when noted, and [`Findings::assert_none`] fails the
/// test at the end with all of them. Problems of one kind (see
/// [`Findings::note_kind`]) are listed once, with how often they were seen.
#[derive(Default)]
pub struct Findings(std::sync::Mutex<Vec<Finding>>);

struct Finding {
    kind: Option<String>,
    first: String,
    seen: usize,
}

impl Findings {
    pub fn note(&self, what: impl Into<String>) {
        let what = what.into();
        eprintln!("FINDING: {what}");
        self.0.lock().expect("findings lock").push(Finding {
            kind: None,
            first: what,
            seen: 1,
        });
    }

    /// Notes `what`, counting it under `kind` if one was noted before.
    pub fn note_kind(&self, kind: &str, what: impl Into<String>) {
        let what = what.into();
        eprintln!("FINDING: {what}");
        let mut all = self.0.lock().expect("findings lock");
        match all.iter_mut().find(|f| f.kind.as_deref() == Some(kind)) {
            Some(f) => f.seen += 1,
            None => all.push(Finding {
                kind: Some(kind.to_owned()),
                first: what,
                seen: 1,
            }),
        }
    }

    /// Notes `what()` unless `ok`.
    pub fn check(&self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.note(what());
        }
    }

    pub fn assert_none(&self) {
        let all = self.0.lock().expect("findings lock");
        let lines: Vec<String> = all
            .iter()
            .map(|f| match f.seen {
                1 => f.first.clone(),
                n => format!("{} (seen {n} times; the first shown)", f.first),
            })
            .collect();
        assert!(
            lines.is_empty(),
            "{} product problem(s) found:\n- {}",
            lines.len(),
            lines.join("\n- ")
        );
    }
}

/// `12.3 s`.
pub fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// The resources of a converge report (`stewardctl node show -o json`).
pub fn report_resources(report: &serde_json::Value) -> Vec<&serde_json::Value> {
    report["resources"]
        .as_array()
        .into_iter()
        .flatten()
        .collect()
}

/// `Ok` if every resource of a report is `ok` (a no-op run), else which are
/// not.
pub fn every_resource_ok(report: &serde_json::Value) -> Result<(), String> {
    let busy: Vec<String> = report_resources(report)
        .iter()
        .filter(|r| r["status"] != "ok")
        .map(|r| format!("{} {}", r["id"], r["status"]))
        .collect();
    if busy.is_empty() {
        Ok(())
    } else {
        Err(format!("not a no-op run: {busy:?}"))
    }
}

/// The resource `id` of a report.
pub fn report_resource<'a>(
    report: &'a serde_json::Value,
    id: &str,
) -> Option<&'a serde_json::Value> {
    report_resources(report).into_iter().find(|r| r["id"] == id)
}

/// Accepts a report that has every resource in `want`, each settled.
pub fn has_settled<'a>(
    want: &'a [&'a str],
) -> impl Fn(&serde_json::Value) -> Result<(), String> + 'a {
    move |report| {
        let missing: Vec<&str> = want
            .iter()
            .copied()
            .filter(|w| {
                !report_resource(report, w).is_some_and(|r| {
                    matches!(
                        r["status"].as_str(),
                        Some("ok" | "changed" | "not-applicable")
                    )
                })
            })
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            let have: Vec<String> = report_resources(report)
                .iter()
                .map(|r| format!("{} {}", r["id"], r["status"]))
                .collect();
            Err(format!("report lacks settled {missing:?} (has {have:?})"))
        }
    }
}

/// The resources of a report that are not settled, for messages.
pub fn unsettled(report: &serde_json::Value) -> String {
    let list: Vec<String> = report["resources"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| {
            !matches!(
                r["status"].as_str(),
                Some("ok" | "changed" | "not-applicable")
            )
        })
        .map(|r| format!("{} {} ({})", r["id"], r["status"], r["detail"]))
        .collect();
    if list.is_empty() {
        "nothing unsettled".into()
    } else {
        list.join("; ")
    }
}

impl Drop for ConvergeBed {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for m in &self.lbs {
            if m.leader_pid().is_none() {
                continue;
            }
            let tail = |unit: &str, n: usize| {
                let out = m.exec(&[
                    "journalctl",
                    "--no-pager",
                    "-o",
                    "short-precise",
                    "-n",
                    &n.to_string(),
                    "-u",
                    unit,
                ]);
                String::from_utf8_lossy(&out.stdout).into_owned()
            };
            eprintln!(
                "---- machine {}: {AGENT_UNIT} journal (last 80) ----\n{}",
                m.name(),
                tail(AGENT_UNIT, 80)
            );
            for unit in &self.dump_units {
                eprintln!(
                    "---- machine {}: {unit} journal (last 20) ----\n{}",
                    m.name(),
                    tail(unit, 20)
                );
            }
            let failed = m.exec(&["systemctl", "--failed", "--no-pager"]);
            eprintln!(
                "---- machine {}: systemctl --failed ----\n{}",
                m.name(),
                String::from_utf8_lossy(&failed.stdout)
            );
        }
    }
}
