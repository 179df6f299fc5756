//! Test support for Steward's end-to-end tests and benchmarks: a real etcd,
//! real `steward-coordinator` and `steward-agent` processes, `stewardctl`.
//!
//! Every process a test starts is owned by a [`Proc`] and killed by its pid
//! when dropped (also when the test fails); every file lives in the
//! cluster's temporary directory, removed at the end. Nothing here touches a
//! process or file it did not create.
//!
//! The binaries come from the cargo target directory (`cargo build
//! --workspace --bins` first; `scripts/test.sh` does), or from
//! `STEWARD_BIN_DIR`.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use steward_coordinator::pki::{self, IdentityKind};

pub mod converge_bed;
pub mod fake_coordinator;
pub mod fleet;
pub mod metered_lb;
pub mod netns;
pub mod nspawn;
pub mod scrape;
pub mod standins;
pub mod vip_bed;

/// Where the workspace's binaries are.
pub fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("STEWARD_BIN_DIR") {
        return dir.into();
    }
    // target/<profile>/deps/<test-binary> -> target/<profile>
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} not found: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        path.display()
    );
    path
}

/// Repository root (for `packaging/` and fixtures).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Asks every wait of this harness ([`eventually`],
/// [`converge_bed::poll`]) to give up: the next check panics, and the
/// unwinding drops (and so removes) everything started. For programs that
/// end on a signal, such as the demo.
pub fn interrupt() {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Whether [`interrupt`] was called.
pub fn interrupted() -> bool {
    INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst)
}

/// Has SIGINT and SIGTERM call [`interrupt`] (for programs, such as the
/// demo and the benchmarks, that end on a signal): the harness's next wait
/// panics and unwinding removes what was started. A second signal exits at
/// once (130); the next start of any bed sweeps what is left.
pub fn interrupt_on_signals(program: &'static str) {
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            eprintln!("{program}: no signal handling (cannot start a runtime)");
            return;
        };
        rt.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut int), Ok(mut term)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) else {
                eprintln!("{program}: cannot handle SIGINT/SIGTERM");
                return;
            };
            for n in 0.. {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
                if n > 0 {
                    eprintln!("{program}: second signal: exiting without cleanup");
                    std::process::exit(130);
                }
                interrupt();
                eprintln!("{program}: interrupted: cleaning up after the current step");
            }
        });
    });
}

/// A command's stdout then stderr, as text.
pub fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Panics if [`interrupt`] was called (waits call it at every check).
pub fn check_interrupt(what: &str) {
    assert!(!interrupted(), "interrupted while waiting for {what}");
}

/// Polls `check` until it returns `Some` or `timeout` passes.
pub fn eventually<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        check_interrupt(what);
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A free TCP port on loopback (the listener is closed again at once).
pub fn free_port() -> u16 {
    free_port_on([127, 0, 0, 1].into())
}

/// A free TCP port on `ip`, an address of this host (the listener is
/// closed again at once).
pub fn free_port_on(ip: std::net::IpAddr) -> u16 {
    TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port on {ip}: {e}"))
}

/// A child process, killed (by pid) when dropped.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Proc {
        let out = fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            name: name.to_owned(),
            child: Some(child),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        if let Some(child) = &self.child {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, signal);
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, wait up to `timeout` for a clean exit; returns the exit code.
    pub fn stop(&mut self, timeout: Duration) -> Option<i32> {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let mut child = self.child.take()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{} did not stop within {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let text = self.log_text();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            eprintln!(
                "---- last lines of {} ({}) ----",
                self.name,
                self.log.display()
            );
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

fn http_get_ok(addr: SocketAddr, path: &str) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").is_err() {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.starts_with("HTTP/1.0 200") || body.starts_with("HTTP/1.1 200")
}

/// A single-member etcd (Debian's `etcd-server`), on loopback unless
/// started with [`Etcd::start_on`].
pub struct Etcd {
    pub proc: Proc,
    pub client_url: String,
    client_addr: SocketAddr,
    data_dir: PathBuf,
    peer_port: u16,
}

impl Etcd {
    /// How a coordinator (or a test's own client) reaches this etcd.
    pub fn config(&self) -> steward_coordinator::config::EtcdConfig {
        steward_coordinator::config::EtcdConfig {
            endpoints: vec![self.client_url.clone()],
            tls: None,
            dial_timeout_ms: 2000,
            request_timeout_ms: 5000,
        }
    }

    pub fn start(dir: &Path) -> Etcd {
        Self::start_on(dir, [127, 0, 0, 1].into())
    }

    /// An etcd whose client URL is on `ip`, an address of this host (e.g. a
    /// [`netns::TestNet`]'s gateway, for coordinators inside test
    /// machines); its peer URL stays on loopback.
    pub fn start_on(dir: &Path, ip: std::net::IpAddr) -> Etcd {
        let client_addr = SocketAddr::new(ip, free_port_on(ip));
        let peer_port = free_port();
        let data_dir = dir.join("etcd-data");
        let mut etcd = Etcd {
            proc: Self::spawn(dir, &data_dir, client_addr, peer_port),
            client_url: format!("http://{client_addr}"),
            client_addr,
            data_dir,
            peer_port,
        };
        etcd.wait_healthy();
        etcd
    }

    fn spawn(dir: &Path, data_dir: &Path, client_addr: SocketAddr, peer_port: u16) -> Proc {
        let etcd_bin = ["/usr/bin/etcd", "/usr/local/bin/etcd"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("etcd not installed (apt-get install etcd-server)");
        let mut cmd = Command::new(etcd_bin);
        cmd.arg("--name=test")
            .arg(format!("--data-dir={}", data_dir.display()))
            .arg(format!("--listen-client-urls=http://{client_addr}"))
            .arg(format!("--advertise-client-urls=http://{client_addr}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"
            ))
            .arg(format!(
                "--initial-cluster=test=http://127.0.0.1:{peer_port}"
            ))
            .arg("--log-level=warn");
        Proc::spawn("etcd", cmd, dir.join("etcd.log"))
    }

    fn wait_healthy(&mut self) {
        let addr = self.client_addr;
        eventually(Duration::from_secs(20), "etcd to become healthy", || {
            http_get_ok(addr, "/health").then_some(())
        });
    }

    /// Stops etcd (SIGKILL); its data stays for [`Etcd::restart`].
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Kills etcd and starts it again on the same address with no data:
    /// a cluster whose etcd lost everything (every revision starts over).
    pub fn restart_empty(&mut self) {
        self.proc.kill();
        if let Err(e) = fs::remove_dir_all(&self.data_dir) {
            panic!("{}: {e}", self.data_dir.display());
        }
        self.restart();
    }

    pub fn restart(&mut self) {
        self.proc.kill();
        let dir = self.data_dir.parent().expect("dir").to_path_buf();
        self.proc = Self::spawn(&dir, &self.data_dir, self.client_addr, self.peer_port);
        self.wait_healthy();
    }
}

/// A test cluster: a temp dir with a CA, an etcd, coordinators and agents.
pub struct Cluster {
    // Fields drop in order: processes first (their logs are printed when a
    // test fails), the directory holding those logs last.
    pub agents: Vec<AgentProc>,
    pub coordinators: Vec<CoordinatorProc>,
    pub etcd: Etcd,
    pub name: String,
    /// Heartbeat interval given to agents started from now on.
    pub agent_heartbeat_ms: u64,
    /// Address coordinators listen on and advertise (loopback unless a
    /// test puts agents in network namespaces).
    pub coordinator_host: String,
    /// `[vip] profile` for coordinators started from now on (the
    /// packaged default unless set).
    pub coordinator_profile: Option<String>,
    /// `[pki] agent_cert_validity_s` for coordinators started from now on.
    pub agent_cert_validity_s: u64,
    /// Coordinators started from now on serve metrics on a free port of
    /// `coordinator_host` (see [`metrics_listen`]); off unless set.
    pub coordinator_metrics: bool,
    /// Dotted config keys set last in coordinators started from now on.
    pub coordinator_extra: Vec<(String, toml::Value)>,
    /// `RLIMIT_NOFILE` of coordinators started from now on (the packaged
    /// unit's `LimitNOFILE=` in effect); inherited unless set.
    pub coordinator_nofile: Option<u64>,
    pub dir: tempfile::TempDir,
}

pub struct CoordinatorProc {
    pub id: String,
    pub url: String,
    /// Its join endpoint (`[pki] bootstrap_listen`).
    pub join_url: String,
    pub config: PathBuf,
    pub proc: Proc,
}

pub struct AgentProc {
    pub node: String,
    /// The network namespace it runs in (`ip netns exec`), if not the test's.
    pub netns: Option<String>,
    pub config: PathBuf,
    pub state_dir: PathBuf,
    pub proc: Proc,
}

/// A join token as `stewardctl token create -o json` gives it.
#[derive(Clone, Debug)]
pub struct JoinToken {
    pub token: String,
    pub ca_hash: String,
    pub join_urls: Vec<String>,
    /// The `steward-agent join ...` line to run on a new node.
    pub command: String,
}

impl JoinToken {
    /// `join --token T --coordinator URL... --ca-hash H --node-id NODE`:
    /// the printed command's arguments with the node's id.
    pub fn join_args(&self, node: &str) -> Vec<String> {
        let mut args = vec!["join".to_owned(), "--token".to_owned(), self.token.clone()];
        for url in &self.join_urls {
            args.extend(["--coordinator".to_owned(), url.clone()]);
        }
        args.extend([
            "--ca-hash".to_owned(),
            self.ca_hash.clone(),
            "--node-id".to_owned(),
            node.to_owned(),
        ]);
        args
    }
}

/// Result of a `stewardctl` run.
#[derive(Debug)]
pub struct Ctl {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Ctl {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stewardctl output is not JSON ({e}): {}", self.stdout))
    }
}

fn load_example(name: &str) -> toml::Table {
    let path = repo_root().join("packaging").join(name);
    let text = fs::read_to_string(&path).expect("example config");
    text.parse::<toml::Table>()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn set(table: &mut toml::Table, dotted: &str, value: impl Into<toml::Value>) {
    let mut parts: Vec<&str> = dotted.split('.').collect();
    let last = parts.pop().expect("key");
    let mut t = table;
    for p in parts {
        t = t
            .entry(p)
            .or_insert_with(|| toml::Value::Table(Default::default()))
            .as_table_mut()
            .expect("table");
    }
    t.insert(last.to_owned(), value.into());
}

impl Cluster {
    /// A CA (with an `admin` certificate) and a running etcd.
    pub fn new() -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("steward-test-")
            .tempdir()
            .expect("tempdir");
        let pki_dir = dir.path().join("pki");
        pki::init_ca(&pki_dir, "test").expect("ca");
        pki::init_secrets_key(&pki_dir).expect("secrets key");
        pki::issue(&pki_dir, "admin", IdentityKind::Admin, &[]).expect("admin cert");
        let etcd = Etcd::start(dir.path());
        Cluster {
            name: "test".into(),
            agent_heartbeat_ms: 200,
            coordinator_host: "127.0.0.1".into(),
            coordinator_profile: None,
            agent_cert_validity_s: 365 * 24 * 3600,
            coordinator_metrics: false,
            coordinator_extra: Vec::new(),
            coordinator_nofile: None,
            etcd,
            dir,
            coordinators: Vec::new(),
            agents: Vec::new(),
        }
    }

    pub fn pki(&self) -> PathBuf {
        self.dir.path().join("pki")
    }

    /// Issues a certificate unless it exists; returns (crt, key).
    pub fn cert(&self, name: &str, kind: IdentityKind) -> (PathBuf, PathBuf) {
        let crt = self.pki().join(format!("{name}.crt"));
        let key = self.pki().join(format!("{name}.key"));
        if !crt.exists() {
            pki::issue(&self.pki(), name, kind, &[]).expect("issue");
        }
        (crt, key)
    }

    /// Writes a coordinator config derived from the packaged example.
    pub fn coordinator_config(&self, id: &str, port: u16, join_port: u16) -> PathBuf {
        let host = self.coordinator_host.clone();
        let crt = self.pki().join(format!("{id}.crt"));
        let key = self.pki().join(format!("{id}.key"));
        if !crt.exists() {
            pki::issue(
                &self.pki(),
                id,
                IdentityKind::Coordinator,
                std::slice::from_ref(&host),
            )
            .expect("issue");
        }
        let mut t = load_example("coordinator.example.toml");
        set(&mut t, "id", id);
        set(&mut t, "cluster", self.name.as_str());
        set(&mut t, "listen", format!("{host}:{port}"));
        set(&mut t, "advertise", format!("https://{host}:{port}"));
        set(
            &mut t,
            "tls.ca",
            self.pki().join("ca.crt").display().to_string(),
        );
        set(&mut t, "tls.cert", crt.display().to_string());
        set(&mut t, "tls.key", key.display().to_string());
        set(&mut t, "etcd.endpoints", vec![self.etcd.client_url.clone()]);
        set(
            &mut t,
            "secrets.key_file",
            self.pki().join("secrets.key").display().to_string(),
        );
        set(
            &mut t,
            "pki.ca_key",
            self.pki().join("ca.key").display().to_string(),
        );
        set(
            &mut t,
            "pki.bootstrap_listen",
            format!("{host}:{join_port}"),
        );
        set(
            &mut t,
            "pki.agent_cert_validity_s",
            i64::try_from(self.agent_cert_validity_s).expect("validity"),
        );
        set(&mut t, "timing.member_lease_ttl_s", 2);
        if let Some(profile) = &self.coordinator_profile {
            set(&mut t, "vip.profile", profile.as_str());
        }
        // The example's fixed port would collide between replicas.
        t.remove("metrics_listen");
        if self.coordinator_metrics {
            set(&mut t, "metrics_listen", format!("{host}:{}", free_port()));
        }
        for (key, value) in &self.coordinator_extra {
            set(&mut t, key, value.clone());
        }
        let path = self.dir.path().join(format!("{id}.toml"));
        fs::write(&path, toml::to_string(&t).expect("toml")).expect("write config");
        path
    }

    /// Starts `n` coordinator replicas (`coord-1` ...) and waits until they serve.
    pub fn start_coordinators(&mut self, n: usize) {
        for i in 1..=n {
            let id = format!("coord-{i}");
            let port = free_port();
            let join_port = free_port();
            let config = self.coordinator_config(&id, port, join_port);
            let proc = self.spawn_coordinator(&id, &config);
            self.coordinators.push(CoordinatorProc {
                id,
                url: format!("https://{}:{port}", self.coordinator_host),
                join_url: format!("https://{}:{join_port}", self.coordinator_host),
                config,
                proc,
            });
        }
        for c in &self.coordinators {
            let url = c.url.clone();
            eventually(Duration::from_secs(20), "coordinator to serve", || {
                self.ctl_at(&[url.as_str()], &["status"]).ok().then_some(())
            });
        }
    }

    fn spawn_coordinator(&self, id: &str, config: &Path) -> Proc {
        let mut cmd = match self.coordinator_nofile {
            // prlimit sets the limit and execs: the pid is the coordinator's.
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}"))
                    .arg("--")
                    .arg(bin("steward-coordinator"));
                c
            }
            None => Command::new(bin("steward-coordinator")),
        };
        cmd.arg("--config").arg(config).env("RUST_LOG", "info");
        let log = self.dir.path().join(format!("{id}.{}.log", unique()));
        Proc::spawn(id, cmd, log)
    }

    pub fn restart_coordinator(&mut self, index: usize) {
        let c = &self.coordinators[index];
        let proc = self.spawn_coordinator(&c.id.clone(), &c.config.clone());
        self.coordinators[index].proc = proc;
    }

    pub fn coordinator_urls(&self) -> Vec<String> {
        self.coordinators.iter().map(|c| c.url.clone()).collect()
    }

    /// Writes an agent config derived from the packaged example.
    pub fn agent_config(&self, node: &str, cert_name: &str, coordinators: &[String]) -> PathBuf {
        self.agent_config_with(node, cert_name, coordinators, &[])
    }

    /// Like [`Cluster::agent_config`], with `extra` dotted keys set last.
    pub fn agent_config_with(
        &self,
        node: &str,
        cert_name: &str,
        coordinators: &[String],
        extra: &[(&str, toml::Value)],
    ) -> PathBuf {
        let (crt, key) = self.cert(cert_name, IdentityKind::Agent);
        let mut t = self.agent_table(node);
        set(&mut t, "coordinators", coordinators.to_vec());
        set(
            &mut t,
            "tls.ca",
            self.pki().join("ca.crt").display().to_string(),
        );
        set(&mut t, "tls.cert", crt.display().to_string());
        set(&mut t, "tls.key", key.display().to_string());
        for (key, value) in extra {
            set(&mut t, key, value.clone());
        }
        self.write_agent_config(node, &t)
    }

    /// The config of an agent that has yet to join with a token: like
    /// [`Cluster::agent_config_with`] but with no certificate issued, the
    /// example's `coordinators` and `[tls]` left for `steward-agent join`
    /// to set.
    pub fn joining_agent_config(&self, node: &str, extra: &[(&str, toml::Value)]) -> PathBuf {
        let mut t = self.agent_table(node);
        for (key, value) in extra {
            set(&mut t, key, value.clone());
        }
        self.write_agent_config(node, &t)
    }

    /// The example with this cluster's settings for `node`, before the
    /// callers' own keys.
    fn agent_table(&self, node: &str) -> toml::Table {
        let mut t = load_example("agent.example.toml");
        set(&mut t, "node_id", node);
        set(
            &mut t,
            "state_dir",
            self.dir
                .path()
                .join(format!("state-{node}"))
                .display()
                .to_string(),
        );
        set(
            &mut t,
            "heartbeat_interval_ms",
            self.agent_heartbeat_ms as i64,
        );
        // These agents share this machine (in namespaces at most): they must
        // never converge it. Tests of convergence boot their own hosts and
        // turn it on there.
        set(&mut t, "converge.enabled", false);
        // No metrics unless `extra` asks (the example's port is fixed).
        t.remove("metrics_listen");
        t
    }

    fn write_agent_config(&self, node: &str, t: &toml::Table) -> PathBuf {
        let path = self.dir.path().join(format!("agent-{node}.toml"));
        fs::write(&path, toml::to_string(t).expect("toml")).expect("write config");
        path
    }

    /// Starts an agent for `node` talking to every coordinator.
    pub fn start_agent(&mut self, node: &str) -> usize {
        self.start_agent_on(node, &self.coordinator_urls())
    }

    /// Starts an agent for `node` that knows only `coordinators`.
    pub fn start_agent_on(&mut self, node: &str, coordinators: &[String]) -> usize {
        let config = self.agent_config(node, node, coordinators);
        self.launch_agent(node, config, None)
    }

    /// Starts an agent for `node` on loopback, talking to every
    /// coordinator, with a metrics endpoint on a free port and `extra`
    /// config keys; returns its index and metrics address.
    pub fn start_agent_with_metrics(
        &mut self,
        node: &str,
        extra: &[(&str, toml::Value)],
    ) -> (usize, SocketAddr) {
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let mut keys = vec![("metrics_listen", toml::Value::from(addr.to_string()))];
        keys.extend(extra.iter().cloned());
        let config = self.agent_config_with(node, node, &self.coordinator_urls(), &keys);
        (self.launch_agent(node, config, None), addr)
    }

    /// Starts an agent for `node` inside the network namespace `netns`,
    /// talking to every coordinator, with `extra` config keys.
    pub fn start_agent_in(
        &mut self,
        netns: &str,
        node: &str,
        extra: &[(&str, toml::Value)],
    ) -> usize {
        let config = self.agent_config_with(node, node, &self.coordinator_urls(), extra);
        self.launch_agent(node, config, Some(netns))
    }

    /// Starts an agent for `node` inside the network namespace `netns`
    /// the way a new host gets one: a config without an identity
    /// ([`Cluster::joining_agent_config`] with `extra`), then `steward-agent
    /// join` with `token` (run in the namespace, `--no-start`: there is no
    /// systemd), then the agent. Returns its index and what join printed;
    /// panics if join fails.
    pub fn join_agent_in(
        &mut self,
        netns: &str,
        node: &str,
        token: &JoinToken,
        extra: &[(&str, toml::Value)],
    ) -> (usize, String) {
        let config = self.joining_agent_config(node, extra);
        let pki = self.dir.path().join(format!("pki-{node}"));
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns])
            .arg(bin("steward-agent"))
            .arg("--config")
            .arg(&config)
            .args(token.join_args(node))
            .arg("--pki-dir")
            .arg(&pki)
            .arg("--no-start")
            .stdin(Stdio::null());
        let out = cmd.output().expect("run steward-agent join");
        let printed = output_text(&out);
        assert!(
            out.status.success(),
            "steward-agent join as {node} failed: {printed}"
        );
        (self.launch_agent(node, config, Some(netns)), printed)
    }

    /// `stewardctl token create -o json` with `extra` arguments; panics if
    /// it fails.
    pub fn create_token(&self, extra: &[&str]) -> JoinToken {
        let mut args = vec!["token", "create", "-o", "json"];
        args.extend_from_slice(extra);
        let out = self.ctl(&args);
        assert!(out.ok(), "token create failed: {}", out.stderr);
        let v = out.json();
        let s = |k: &str| v[k].as_str().expect(k).to_owned();
        JoinToken {
            token: s("token"),
            ca_hash: s("ca_hash"),
            join_urls: v["join_urls"]
                .as_array()
                .expect("join_urls")
                .iter()
                .map(|u| u.as_str().expect("url").to_owned())
                .collect(),
            command: s("join_command"),
        }
    }

    /// Spawns the agent for `node` with `config` and keeps it in
    /// [`Cluster::agents`]; its index.
    fn launch_agent(&mut self, node: &str, config: PathBuf, netns: Option<&str>) -> usize {
        let proc = self.spawn_agent(node, &config, netns);
        self.agents.push(AgentProc {
            node: node.to_owned(),
            netns: netns.map(str::to_owned),
            state_dir: self.dir.path().join(format!("state-{node}")),
            config,
            proc,
        });
        self.agents.len() - 1
    }

    pub fn spawn_agent(&self, node: &str, config: &Path, netns: Option<&str>) -> Proc {
        let mut cmd = match netns {
            // `ip netns exec` execs the program: the pid is the agent's.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin("steward-agent"));
                c
            }
            None => Command::new(bin("steward-agent")),
        };
        cmd.arg("--config").arg(config).env("RUST_LOG", "info");
        let log = self
            .dir
            .path()
            .join(format!("agent-{node}.{}.log", unique()));
        Proc::spawn(&format!("agent {node}"), cmd, log)
    }

    pub fn restart_agent(&mut self, index: usize) {
        let a = &self.agents[index];
        let proc = self.spawn_agent(&a.node, &a.config, a.netns.as_deref());
        self.agents[index].proc = proc;
    }

    /// The desired state an agent has recorded: (revision, roles).
    pub fn agent_desired(&self, index: usize) -> Option<(u64, Vec<String>)> {
        let path = self.agents[index].state_dir.join("desired.json");
        let v: serde_json::Value = serde_json::from_str(&fs::read_to_string(path).ok()?).ok()?;
        let desired = &v["desired"];
        let roles = desired["roles"]
            .as_array()?
            .iter()
            .filter_map(|r| r.as_str().map(String::from))
            .collect();
        Some((desired["revision"].as_u64()?, roles))
    }

    /// Runs stewardctl against all live coordinators, as admin.
    pub fn ctl(&self, args: &[&str]) -> Ctl {
        let urls = self.coordinator_urls();
        let urls: Vec<&str> = urls.iter().map(|s| s.as_str()).collect();
        self.ctl_at(&urls, args)
    }

    pub fn ctl_at(&self, endpoints: &[&str], args: &[&str]) -> Ctl {
        self.ctl_as("admin", endpoints, args)
    }

    /// Runs stewardctl with the certificate `cert_name` (must exist).
    pub fn ctl_as(&self, cert_name: &str, endpoints: &[&str], args: &[&str]) -> Ctl {
        let pki = self.pki();
        let out: Output = Command::new(bin("stewardctl"))
            .env_remove("STEWARD_ENDPOINTS")
            .env("STEWARD_ENDPOINTS", endpoints.join(","))
            .env("STEWARD_CA", pki.join("ca.crt"))
            .env("STEWARD_CERT", pki.join(format!("{cert_name}.crt")))
            .env("STEWARD_KEY", pki.join(format!("{cert_name}.key")))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run stewardctl");
        Ctl {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// `stewardctl nodes -o json`, panicking on failure.
    pub fn nodes(&self) -> Vec<serde_json::Value> {
        let out = self.ctl(&["nodes", "-o", "json"]);
        assert!(out.ok(), "stewardctl nodes failed: {}", out.stderr);
        out.json().as_array().cloned().unwrap_or_default()
    }

    /// One node from `stewardctl nodes -o json`; `None` if it is not listed
    /// or no coordinator answers (for use inside [`eventually`]).
    pub fn node(&self, id: &str) -> Option<serde_json::Value> {
        let out = self.ctl(&["nodes", "-o", "json"]);
        if !out.ok() {
            return None;
        }
        out.json()
            .as_array()?
            .iter()
            .find(|n| n["id"] == id)
            .cloned()
    }

    /// The leader's replica id, as `stewardctl status` reports it.
    pub fn leader(&self) -> Option<String> {
        let out = self.ctl(&["status", "-o", "json"]);
        if !out.ok() {
            return None;
        }
        out.json()["leader"].as_str().map(String::from)
    }

    pub fn coordinator_index(&self, id: &str) -> usize {
        self.coordinators
            .iter()
            .position(|c| c.id == id)
            .expect("coordinator id")
    }
}

impl Default for Cluster {
    fn default() -> Self {
        Self::new()
    }
}

/// The `metrics_listen` of a coordinator or agent config file, if any.
pub fn metrics_listen(config: &Path) -> Option<SocketAddr> {
    let text = fs::read_to_string(config).ok()?;
    let table: toml::Table = text.parse().ok()?;
    table.get("metrics_listen")?.as_str()?.parse().ok()
}

pub fn unique() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Resident set size (bytes) and total CPU time of a process, from /proc.
pub fn proc_usage(pid: u32) -> Option<(u64, Duration)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    let cpu = Duration::from_millis((utime + stime) * 1000 / ticks);
    Some((rss_kib * 1024, cpu))
}

/// A gRPC channel to `url` trusting the cluster CA, presenting the
/// certificate `cert_name` (or none). For tests that speak the wire protocol
/// directly, e.g. to send what a well-behaved client never would.
pub async fn grpc_channel(
    cluster: &Cluster,
    url: &str,
    cert_name: Option<&str>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let pki = cluster.pki();
    let read = |p: PathBuf| fs::read(p).expect("read pem");
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(pki.join("ca.crt"))))
        .domain_name("127.0.0.1");
    if let Some(name) = cert_name {
        tls = tls.identity(Identity::from_pem(
            read(pki.join(format!("{name}.crt"))),
            read(pki.join(format!("{name}.key"))),
        ));
    }
    Endpoint::from_shared(url.to_owned())?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
}
