//! Fleet benchmark: N simulated agents against a real etcd and 1 or 3
//! release-built coordinator replicas (prints figures; not a pass/fail
//! test). Issue 13 item 5.
//!
//! Every simulated agent (`src/fleet.rs`) has its own certificate, signed
//! by the cluster CA with `steward-pki`, and its own mutual-TLS HTTP/2
//! connection (one tonic channel each), and speaks the real
//! `AgentService.Session` protocol as `agent/src/session.rs` does: `Hello`
//! with small facts, a heartbeat every second (the agent's default), a
//! `Report` of each new applied revision, and on failure the next replica
//! after jittered exponential backoff. They all run as tasks of one tokio
//! runtime with `--workers` threads (2), over loopback. Connections open at
//! `--rate` per second at most (1,000; a session that fails retries at
//! once, with backoff) so that the bench measures the coordinator more than
//! its own TLS handshakes.
//!
//! Phases, each bounded by a deadline (a phase that runs out is reported
//! as incomplete; the bench always ends by itself):
//!
//! - **setup**: certificate issuance and TLS configs for all agents.
//! - **cold**: all agents start; time until every one has a session and its
//!   first desired state; failed session attempts (dials, opens, sessions
//!   lost) meanwhile, and what they said.
//! - **idle** (after `--settle-secs`, over `--idle-secs`): CPU % of a core
//!   and peak RSS of each replica (etcd's and the bench's own for
//!   reference), etcd writes/s (`etcd_mvcc_put_total` +
//!   `etcd_mvcc_delete_total`, puts inside transactions included) and
//!   reads/s (`etcd_mvcc_range_total`) and bytes sent to its clients
//!   (`etcd_network_client_grpc_sent_bytes_total`: a whole-prefix read
//!   counts once as a range, its size shows here) from etcd's own
//!   `/metrics`, sessions lost.
//! - **nodes**: wall time of the real `stewardctl nodes -o json` against each
//!   replica, as admin; then of `stewardctl status -o json` (each replica's
//!   agent count, asked of the others), with the agents it counts.
//! - **role**: `--reps` times, `AddRoles` (the admin RPC `stewardctl role
//!   add` calls, on a channel opened beforehand, so the time is the
//!   coordinator's) of `lb` to one connected node: time until that
//!   node receives a desired state with the role, how many other agents
//!   received any desired state meanwhile (until 1 s without any), etcd
//!   puts and deletes in that window.
//! - **every**: a change every node consumes. Under per-node desired
//!   states a node gets only what its roles use, so the fleet first
//!   becomes Kubernetes workers (node 0 the control plane, `AddRoles` for
//!   each, 16 in flight: the setup time is printed), then `--reps` times (3 at most)
//!   `Apply` (what `stewardctl apply` calls) of a `[kubernetes]` section
//!   with a new version, which every worker's state carries: time until
//!   each agent has it (p50/p99/max over agents), etcd writes.
//! - **kill** (3 replicas): SIGKILL of `coord-2` (by pid, a process the bench
//!   started): time until each of its agents has a session on another
//!   replica, and whether any agent saw its desired revision go backwards
//!   (counted over the whole run as well).
//!
//! Cold start always runs; `--only` picks the phases after it. The
//! report is printed at the end (stdout) and each line as it is measured
//! (stderr), with the load average: the machine's other work skews every
//! figure.
//!
//! Usage:
//!
//!     cargo build --release -p steward-coordinator -p stewardctl --bins
//!     cargo build --release -p steward-tests --bin bench-fleet
//!     target/release/bench-fleet [--agents 1000] [--replicas 1|3]
//!         [--idle-secs 20] [--settle-secs 5] [--reps 5] [--rate 1000]
//!         [--workers 2] [--only idle,nodes,role,every,kill]
//!         [--heartbeats-per-s 2000/replicas] [--agents-nice -10]
//!
//! The replicas run on this one machine, so by default they split one
//! replica's heartbeat budget (`sessions.heartbeats_per_s`, 2,000/s): three
//! replicas on three machines would each carry 2,000/s, but here the same
//! two cores (and the one bench process that sends them all) would carry
//! 6,000/s. The value is printed in the report.
//!
//! The coordinators and stewardctl come from the directory of the bench's
//! own executable (target/release for a release-built bench; see
//! `steward_tests::bin_dir`, `STEWARD_BIN_DIR` overrides). RLIMIT_NOFILE is
//! raised to its hard limit first (the replicas inherit it). Everything
//! started is killed by pid and the temporary directory removed at the
//! end, on panic and on SIGINT/SIGTERM too.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use steward_proto::domain::Role;
use steward_proto::pb;
use steward_proto::pb::admin_service_client::AdminServiceClient;
use steward_tests::fleet::{self, Fleet, Obs, PROBE_ROLE};
use steward_tests::{check_interrupt, grpc_channel, proc_usage, Cluster};

struct Args {
    agents: usize,
    replicas: usize,
    idle_secs: u64,
    settle_secs: u64,
    reps: usize,
    rate: f64,
    workers: usize,
    only: Option<Vec<String>>,
    /// `sessions.heartbeats_per_s` of each replica (default: the
    /// coordinator's default divided among the replicas on this machine).
    heartbeats_per_s: Option<u32>,
    /// The simulated agents' nice value (0: as the replicas).
    agents_nice: i32,
}

impl Args {
    fn parse() -> Args {
        let mut a = Args {
            agents: 1000,
            replicas: 1,
            idle_secs: 20,
            settle_secs: 5,
            reps: 5,
            rate: 1000.0,
            workers: 2,
            only: None,
            heartbeats_per_s: None,
            agents_nice: -10,
        };
        let argv: Vec<String> = std::env::args().skip(1).collect();
        let mut it = argv.iter();
        while let Some(flag) = it.next() {
            let mut value = || {
                it.next()
                    .unwrap_or_else(|| usage(&format!("{flag} needs a value")))
                    .clone()
            };
            let num = |v: String| -> f64 { v.parse().unwrap_or_else(|_| usage(&v)) };
            match flag.as_str() {
                "--agents" => a.agents = num(value()) as usize,
                "--replicas" => a.replicas = num(value()) as usize,
                "--idle-secs" => a.idle_secs = num(value()) as u64,
                "--settle-secs" => a.settle_secs = num(value()) as u64,
                "--reps" => a.reps = num(value()) as usize,
                "--rate" => a.rate = num(value()),
                "--workers" => a.workers = num(value()) as usize,
                "--heartbeats-per-s" => a.heartbeats_per_s = Some(num(value()) as u32),
                "--agents-nice" => a.agents_nice = num(value()) as i32,
                "--only" => a.only = Some(value().split(',').map(str::to_owned).collect()),
                "-h" | "--help" => usage(""),
                other => usage(&format!("unknown argument {other}")),
            }
        }
        if !matches!(a.replicas, 1 | 3) || a.agents == 0 || a.rate <= 0.0 || a.workers == 0 {
            usage("--replicas is 1 or 3; --agents, --rate, --workers > 0");
        }
        a
    }

    fn wants(&self, phase: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|p| p == phase))
    }
}

fn usage(problem: &str) -> ! {
    eprintln!(
        "{problem}\nusage: bench-fleet [--agents N] [--replicas 1|3] [--idle-secs S] \
         [--settle-secs S] [--reps N] [--rate PER_S] [--workers N] \
         [--only idle,nodes,role,every,kill]"
    );
    std::process::exit(2)
}

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns (soft, hard).
fn raise_nofile() -> (u64, u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return (0, 0);
    };
    let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((0, 0))
}

/// etcd's own counters from its `/metrics` (on the client URL).
#[derive(Debug, Clone, Copy, Default)]
struct EtcdCounts {
    puts: f64,
    deletes: f64,
    ranges: f64,
    txns: f64,
    /// gRPC requests by method, for reference.
    grpc_range: f64,
    grpc_txn: f64,
    grpc_put: f64,
    /// Bytes etcd sent to its gRPC clients (responses: what reads cost).
    sent_bytes: f64,
}

impl EtcdCounts {
    fn writes(&self) -> f64 {
        self.puts + self.deletes
    }

    fn minus(&self, o: &EtcdCounts) -> EtcdCounts {
        EtcdCounts {
            puts: self.puts - o.puts,
            deletes: self.deletes - o.deletes,
            ranges: self.ranges - o.ranges,
            txns: self.txns - o.txns,
            grpc_range: self.grpc_range - o.grpc_range,
            grpc_txn: self.grpc_txn - o.grpc_txn,
            grpc_put: self.grpc_put - o.grpc_put,
            sent_bytes: self.sent_bytes - o.sent_bytes,
        }
    }
}

fn etcd_counts(addr: SocketAddr) -> EtcdCounts {
    let body = http_get(addr, "/metrics").unwrap_or_else(|e| panic!("etcd /metrics: {e}"));
    let mut c = EtcdCounts::default();
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let name = series.split('{').next().unwrap_or("");
        let method = |m: &str| series.contains(&format!("grpc_method=\"{m}\""));
        match name {
            "etcd_mvcc_put_total" => c.puts += value,
            "etcd_mvcc_delete_total" => c.deletes += value,
            "etcd_mvcc_range_total" => c.ranges += value,
            "etcd_mvcc_txn_total" => c.txns += value,
            "grpc_server_handled_total" if method("Range") => c.grpc_range += value,
            "grpc_server_handled_total" if method("Txn") => c.grpc_txn += value,
            "grpc_server_handled_total" if method("Put") => c.grpc_put += value,
            "etcd_network_client_grpc_sent_bytes_total" => c.sent_bytes += value,
            _ => {}
        }
    }
    c
}

fn http_get(addr: SocketAddr, path: &str) -> Result<String, String> {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: etcd\r\n\r\n").map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no HTTP head")?;
    if !head.contains(" 200 ") {
        return Err(head.to_owned());
    }
    Ok(body.to_owned())
}

/// The first three fields of /proc/loadavg: other work on the machine
/// skews every figure.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Value at quantile `q` (nearest rank) of sorted `v`.
fn quantile(v: &[Duration], q: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms >= 10_000.0 {
        format!("{:.1} s", ms / 1000.0)
    } else {
        format!("{ms:.0} ms")
    }
}

/// "p50 / p99 / max" of `v` (sorted here).
fn spread(v: &mut [Duration]) -> String {
    v.sort();
    format!(
        "{} / {} / {}",
        ms(quantile(v, 0.5)),
        ms(quantile(v, 0.99)),
        ms(quantile(v, 1.0))
    )
}

/// Polls `check` every 50 ms until it returns true or `timeout` passes;
/// whether it did.
fn wait_until(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        check_interrupt(what);
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            eprintln!("bench-fleet: timed out after {timeout:?} waiting for {what}");
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until no agent has received a desired state for `quiet` (at most
/// `timeout`); returns the snapshot then.
fn wait_quiet(fleet: &Fleet, quiet: Duration, timeout: Duration) -> Vec<Obs> {
    let deadline = Instant::now() + timeout;
    let mut last = fleet.counters.desired.load(Ordering::Relaxed);
    let mut since = Instant::now();
    loop {
        check_interrupt("the fleet to settle");
        std::thread::sleep(Duration::from_millis(50));
        let now = fleet.counters.desired.load(Ordering::Relaxed);
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= quiet || Instant::now() >= deadline {
            return fleet.snapshot();
        }
    }
}

/// Before a phase: waits up to 120 s for every agent to have a session
/// again, and says so in the report if some had none.
fn recover(fleet: &Fleet, report: &mut Report) {
    let n = fleet.agents.len();
    let before = connected(fleet);
    if before == n {
        return;
    }
    let started = Instant::now();
    let back = wait_until(Duration::from_secs(120), "every agent to reconnect", || {
        connected(fleet) == n
    });
    report.row(
        "  (fleet before the next step)",
        format!(
            "{before} of {n} connected; {} after {}",
            if back { "all back" } else { "NOT all back" },
            ms(started.elapsed())
        ),
    );
}

fn connected(fleet: &Fleet) -> usize {
    fleet
        .snapshot()
        .iter()
        .filter(|o| o.connected.is_some())
        .count()
}

/// Lines of the final report, printed at the end (and as they come, to
/// stderr).
#[derive(Default)]
struct Report(Vec<String>);

impl Report {
    fn row(&mut self, what: &str, value: String) {
        let line = format!("{what:<44} {value}");
        eprintln!("bench-fleet: {line}");
        self.0.push(line);
    }
    fn section(&mut self, title: &str) {
        self.0.push(String::new());
        self.0.push(format!("## {title}"));
    }
}

fn main() {
    let args = Args::parse();
    steward_tests::interrupt_on_signals("bench-fleet");
    let (soft, hard) = raise_nofile();
    let needed = (args.agents as u64) * 2 + 1024;
    if soft < needed {
        eprintln!("bench-fleet: RLIMIT_NOFILE is {soft} (hard {hard}); {needed} may be needed");
    }
    let mut report = Report::default();
    report.section(&format!(
        "bench-fleet: {} agents × {} replica(s), {} CPUs, heartbeat 1 s, connect rate ≤ {}/s, {} bench worker threads, RLIMIT_NOFILE {soft}",
        args.agents,
        args.replicas,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        args.rate,
        args.workers
    ));
    report.row("binaries", steward_tests::bin_dir().display().to_string());
    report.row("load average at start (shared machine)", loadavg());

    let mut cluster = Cluster::new();
    // The replicas share this machine's two cores (with etcd and the
    // simulated agents): by default they share one replica's heartbeat
    // budget too, as three machines would each have their own.
    let heartbeats_per_s = args
        .heartbeats_per_s
        .unwrap_or(steward_coordinator::config::DEFAULT_HEARTBEATS_PER_S / args.replicas as u32);
    cluster.coordinator_extra.push((
        "sessions.heartbeats_per_s".into(),
        toml::Value::Integer(heartbeats_per_s.into()),
    ));
    report.row(
        "sessions.heartbeats_per_s per replica",
        heartbeats_per_s.to_string(),
    );
    cluster.start_coordinators(args.replicas);
    let etcd_addr: SocketAddr = cluster
        .etcd
        .client_url
        .trim_start_matches("http://")
        .parse()
        .expect("etcd address");
    etcd_counts(etcd_addr);
    let urls = cluster.coordinator_urls();

    // The simulated agents' threads (started below, from this thread, whose
    // priority they inherit) run at nice -10; etcd and the replicas, started
    // above, keep 0. The load generator must not be what runs late: with
    // every process sharing two cores, the bench's timers ran up to 10 s
    // late, so its agents sent heartbeats late and gave up on acks that had
    // arrived. How late its timers run is printed with the progress lines.
    report.row(
        "simulated agents' priority",
        match set_thread_nice(args.agents_nice) {
            Ok(()) => format!(
                "nice {} (etcd, replicas and stewardctl: 0)",
                args.agents_nice
            ),
            Err(e) => format!("unchanged ({e})"),
        },
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.workers)
        .enable_all()
        .build()
        .expect("runtime");

    // Setup: identities.
    let setup_started = Instant::now();
    let (fleet, times) =
        fleet::make_fleet(&cluster.pki(), args.agents, &urls, Duration::from_secs(1));
    let fleet = Arc::new(fleet);
    report.row(
        "setup (certs + TLS configs)",
        format!(
            "{} total: issuance {}, TLS configs {} ({} per agent)",
            ms(setup_started.elapsed()),
            ms(times.issue),
            ms(times.tls),
            ms((times.issue + times.tls) / args.agents as u32)
        ),
    );

    // Cold start.
    report.section("cold start");
    let n = args.agents;
    let spacing = Duration::from_secs_f64(1.0 / args.rate);
    let cold_started = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|i| rt.spawn(fleet::run_agent(fleet.clone(), i, spacing * i as u32)))
        .collect();
    let cold_deadline = Duration::from_secs(60) + spacing * n as u32 * 4;
    let mut done = 0;
    // How late the simulated agents' runtime runs its timers (the worst
    // over each progress window): a late bench sends late heartbeats.
    let lag = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let lag_probe = {
        let lag = lag.clone();
        rt.spawn(async move {
            let every = Duration::from_millis(50);
            loop {
                let asked = Instant::now();
                tokio::time::sleep(every).await;
                let late = asked.elapsed().saturating_sub(every).as_millis() as u64;
                lag.fetch_max(late, Ordering::Relaxed);
            }
        })
    };
    let mut progress = ColdProgress::new(&cluster, cold_started, lag.clone());
    wait_until(cold_deadline, "every agent's first desired state", || {
        done = fleet
            .snapshot()
            .iter()
            .filter(|o| o.first_desired_at.is_some())
            .count();
        progress.maybe_print(&fleet, done);
        done == n
    });
    lag_probe.abort();
    let cold = fleet.snapshot();
    let mut firsts: Vec<Duration> = cold
        .iter()
        .filter_map(|o| o.first_desired_at.map(|t| t - cold_started))
        .collect();
    let cold_failures = fleet.counters.failures();
    report.row(
        "all agents with a session and a desired state",
        if done == n {
            ms(firsts.iter().copied().max().unwrap_or_default())
        } else {
            format!("INCOMPLETE: {done} of {n} within {}", ms(cold_deadline))
        },
    );
    report.row("  first desired state p50 / p99 / max", spread(&mut firsts));
    report.row(
        "  failed session attempts (dial/open/lost)",
        format!(
            "{cold_failures} ({}/{}/{})",
            fleet.counters.dial_failed.load(Ordering::Relaxed),
            fleet.counters.open_failed.load(Ordering::Relaxed),
            fleet.counters.lost.load(Ordering::Relaxed)
        ),
    );
    report.row(
        "  sessions opened",
        fleet.counters.opened.load(Ordering::Relaxed).to_string(),
    );

    // Idle.
    if args.wants("idle") {
        report.section(&format!(
            "idle ({} s after {} s settling)",
            args.idle_secs, args.settle_secs
        ));
        std::thread::sleep(Duration::from_secs(args.settle_secs));
        check_interrupt("settling");
        let mut watched: Vec<(String, u32, Duration, u64, Duration)> = cluster
            .coordinators
            .iter()
            .map(|c| (c.id.clone(), c.proc.pid()))
            .chain([
                ("etcd (reference)".to_owned(), cluster.etcd.proc.pid()),
                ("bench-fleet itself".to_owned(), std::process::id()),
            ])
            .map(|(name, pid)| {
                let (rss, cpu) = proc_usage(pid).expect("usage");
                (name, pid, cpu, rss, cpu)
            })
            .collect();
        let etcd0 = etcd_counts(etcd_addr);
        let lost0 = fleet.counters.failures();
        let opened0 = fleet.counters.opened.load(Ordering::Relaxed);
        let desired0 = fleet.counters.desired.load(Ordering::Relaxed);
        let heartbeats0 = fleet.counters.heartbeats.load(Ordering::Relaxed);
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(args.idle_secs) {
            check_interrupt("the idle window");
            std::thread::sleep(Duration::from_secs(1));
            for w in &mut watched {
                if let Some((rss, cpu)) = proc_usage(w.1) {
                    w.3 = w.3.max(rss);
                    w.4 = cpu;
                }
            }
        }
        let wall = started.elapsed().as_secs_f64();
        let etcd = etcd_counts(etcd_addr).minus(&etcd0);
        for (name, _, cpu0, rss, cpu1) in &watched {
            report.row(
                &format!("  {name}: CPU % of a core, peak RSS"),
                format!(
                    "{:.1} %, {:.0} MB",
                    (*cpu1 - *cpu0).as_secs_f64() / wall * 100.0,
                    *rss as f64 / 1_048_576.0
                ),
            );
        }
        report.row(
            "  etcd writes/s (puts + deletes)",
            format!(
                "{:.1} (puts {:.0}, deletes {:.0}, txns {:.0})",
                etcd.writes() / wall,
                etcd.puts,
                etcd.deletes,
                etcd.txns
            ),
        );
        report.row(
            "  etcd reads/s (mvcc ranges)",
            format!(
                "{:.1} (gRPC Range {:.1}/s, Txn {:.1}/s); etcd sent {:.2} MB/s",
                etcd.ranges / wall,
                etcd.grpc_range / wall,
                etcd.grpc_txn / wall,
                etcd.sent_bytes / wall / 1e6
            ),
        );
        report.row(
            "  heartbeats/s (sparsest interval asked for)",
            format!(
                "{:.0} ({} ms; 0: the agents' own {} ms)",
                (fleet.counters.heartbeats.load(Ordering::Relaxed) - heartbeats0) as f64 / wall,
                fleet.counters.widest_interval_ms.load(Ordering::Relaxed),
                fleet.heartbeat.as_millis()
            ),
        );
        report.row(
            "  failed/new sessions, desired states pushed",
            format!(
                "{} / {}, {}",
                fleet.counters.failures() - lost0,
                fleet.counters.opened.load(Ordering::Relaxed) - opened0,
                fleet.counters.desired.load(Ordering::Relaxed) - desired0
            ),
        );
        report.row(
            "  agents connected at the end",
            format!("{} of {n}", connected(&fleet)),
        );
    }

    // stewardctl nodes.
    if args.wants("nodes") {
        recover(&fleet, &mut report);
    }
    // `stewardctl ARGS` against one replica, timed, from a thread at the
    // priority everything else has (0), so stewardctl runs at it too.
    let timed_ctl = |url: &str, ctl_args: &[&str]| {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let _ = set_thread_nice(0);
                    let started = Instant::now();
                    let out = cluster.ctl_at(&[url], ctl_args);
                    (out, started.elapsed())
                })
                .join()
                .expect("stewardctl thread")
        })
    };
    if args.wants("nodes") {
        // What one answer says, beside its time.
        let listed = |stdout: &str| {
            let listed = serde_json::from_str::<serde_json::Value>(stdout)
                .ok()
                .and_then(|v| v.as_array().map(Vec::len))
                .unwrap_or(0);
            format!("{listed} nodes, {} KB of JSON", stdout.len() / 1024)
        };
        let counted = |stdout: &str| {
            let replicas = serde_json::from_str::<serde_json::Value>(stdout)
                .ok()
                .and_then(|v| v["replicas"].as_array().cloned())
                .unwrap_or_default();
            let counts: Vec<String> = replicas
                .iter()
                .map(|r| match r["connected_agents"].as_u64() {
                    Some(n) => n.to_string(),
                    None => "?".into(),
                })
                .collect();
            format!("agents per replica: {}", counts.join(" + "))
        };
        type Describe<'a> = &'a dyn Fn(&str) -> String;
        let commands: [(&str, &[&str], Describe); 2] = [
            ("nodes", &["nodes", "-o", "json"], &listed),
            ("status", &["status", "-o", "json"], &counted),
        ];
        for (name, ctl_args, describe) in commands {
            report.section(&format!("stewardctl {name} -o json (as admin)"));
            for c in &cluster.coordinators {
                let (out, wall) = timed_ctl(&c.url, ctl_args);
                let what = if out.ok() {
                    format!("{} ({})", ms(wall), describe(&out.stdout))
                } else {
                    format!(
                        "FAILED after {}: {}",
                        ms(wall),
                        out.stderr.trim().chars().take(200).collect::<String>()
                    )
                };
                report.row(&format!("  on {}", c.id), what);
            }
        }
    }

    let admin = |index: usize| {
        let url = urls[index].clone();
        let cluster = &cluster;
        rt.block_on(async move {
            AdminServiceClient::new(
                grpc_channel(cluster, &url, Some("admin"))
                    .await
                    .expect("admin channel"),
            )
        })
    };

    // One-node role change.
    if args.wants("role") {
        recover(&fleet, &mut report);
    }
    if args.wants("role") {
        report.section(&format!(
            "one-node role change (AddRoles {PROBE_ROLE}, {} times, each on another node)",
            args.reps
        ));
        let mut client = admin(0);
        let mut latencies = Vec::new();
        let mut pushed = Vec::new();
        let mut rows = Vec::new();
        for rep in 0..args.reps {
            let before = fleet.snapshot();
            let candidates = || (0..n).map(|k| (rep * 7919 + 13 + k) % n);
            let Some(target) = candidates()
                .find(|&i| before[i].connected.is_some() && !before[i].has_role)
                .or_else(|| candidates().find(|&i| !before[i].has_role))
            else {
                rows.push("every node has the role already".to_owned());
                break;
            };
            let failures0 = fleet.counters.failures();
            let connected0 = before.iter().filter(|o| o.connected.is_some()).count();
            let etcd0 = etcd_counts(etcd_addr);
            let t0 = Instant::now();
            let request = pb::ChangeRolesRequest {
                node_id: fleet::node_name(target),
                roles: steward_proto::convert::roles_to_pb(&[PROBE_ROLE].into()),
            };
            let rpc = rt.block_on(client.add_roles(request));
            let rpc_time = t0.elapsed();
            if let Err(status) = rpc {
                rows.push(format!(
                    "AddRoles failed after {}: {}; {connected0} connected before, failed sessions {}",
                    ms(rpc_time),
                    status.message().chars().take(200).collect::<String>(),
                    fleet.counters.failures() - failures0
                ));
                recover(&fleet, &mut report);
                continue;
            }
            let got = wait_until(Duration::from_secs(30), "the node's new role", || {
                fleet.agents[target].obs.lock().expect("obs").has_role
            });
            let after = wait_quiet(&fleet, Duration::from_secs(1), Duration::from_secs(60));
            let etcd = etcd_counts(etcd_addr).minus(&etcd0);
            let others = (0..n)
                .filter(|&i| i != target && after[i].desired_count > before[i].desired_count)
                .count();
            let latency = after[target].role_changed_at.map(|t| t - t0);
            // The cluster-wide revision moves for everyone: when the
            // others got it.
            pushed.extend(
                (0..n)
                    .filter(|&i| i != target && after[i].desired_count > before[i].desired_count)
                    .filter_map(|i| after[i].last_desired_at.map(|t| t - t0)),
            );
            if let (true, Some(l)) = (got, latency) {
                latencies.push(l);
            }
            rows.push(format!(
                "{}{}: {} (RPC {}); others pushed {others} of {}; etcd puts {:.0}, deletes {:.0}, ranges {:.0}, {:.1} MB sent; {connected0} connected before, failed sessions {}",
                fleet::node_name(target),
                if before[target].connected.is_some() { "" } else { " (not connected)" },
                latency.filter(|_| got).map_or("NOT RECEIVED in 30 s".to_owned(), ms),
                ms(rpc_time),
                n - 1,
                etcd.puts,
                etcd.deletes,
                etcd.ranges,
                etcd.sent_bytes / 1e6,
                fleet.counters.failures() - failures0
            ));
        }
        for (i, row) in rows.into_iter().enumerate() {
            report.row(&format!("  #{}", i + 1), row);
        }
        report.row("  that node: p50 / p99 / max", spread(&mut latencies));
        report.row(
            "  others pushed (last push): p50 / p99 / max",
            spread(&mut pushed),
        );
    }

    // A change every node consumes.
    if args.wants("every") {
        recover(&fleet, &mut report);
    }
    if args.wants("every") {
        // Every node must consume something for a change to reach every
        // node: under per-node desired states a node gets only what its
        // roles use. So the fleet becomes Kubernetes workers (node 0 the
        // control plane; AddRoles for each, reaching that node and the
        // control plane only), and the change is the Kubernetes
        // version, which every worker's state carries.
        report.section(&format!(
            "cluster-wide change (Apply [kubernetes] version to {n} workers, {} times)",
            args.reps.min(3)
        ));
        let mut client = admin(0);
        let t_setup = Instant::now();
        // Sixteen RPCs in flight on the one channel: setting up 10,000
        // workers one round trip at a time took minutes.
        let setup_failures = rt.block_on(async {
            let mut calls = tokio::task::JoinSet::new();
            let mut failures = 0;
            for i in 0..n {
                if calls.len() >= 16 && !matches!(calls.join_next().await, Some(Ok(true))) {
                    failures += 1;
                }
                let role = if i == 0 {
                    Role::K8sControlPlane
                } else {
                    Role::K8sWorker
                };
                let request = pb::ChangeRolesRequest {
                    node_id: fleet::node_name(i),
                    roles: steward_proto::convert::roles_to_pb(&[role].into()),
                };
                let mut client = client.clone();
                calls.spawn(async move { client.add_roles(request).await.is_ok() });
            }
            while let Some(done) = calls.join_next().await {
                if !matches!(done, Ok(true)) {
                    failures += 1;
                }
            }
            failures
        });
        report.row(
            "  setup: roles for the whole fleet",
            format!(
                "{} ({setup_failures} failed AddRoles)",
                ms(t_setup.elapsed())
            ),
        );
        wait_quiet(&fleet, Duration::from_secs(1), Duration::from_secs(120));
        let mut all = Vec::new();
        for rep in 0..args.reps.min(3) {
            let version = format!("1.31.{}-1.1", rep + 2);
            let spec = format!(
                "[kubernetes]\nversion = \"{version}\"\npod_subnet = \"10.244.0.0/16\"\n\
                 service_subnet = \"10.96.0.0/12\"\n\
                 repository = {{ url = \"https://pkgs.k8s.io/core:/stable:/v1.31/deb/\" }}\n"
            );
            let etcd0 = etcd_counts(etcd_addr);
            let failures0 = fleet.counters.failures();
            let t0 = Instant::now();
            let rpc = rt.block_on(client.apply(pb::ApplyRequest {
                spec_toml: spec,
                dry_run: false,
                rollout: None,
            }));
            let rpc_time = t0.elapsed();
            match rpc {
                Err(status) => {
                    report.row(
                        &format!("  #{}", rep + 1),
                        format!("Apply failed after {}: {status}", ms(rpc_time)),
                    );
                    continue;
                }
                Ok(r) if !r.get_ref().applied => {
                    report.row(
                        &format!("  #{}", rep + 1),
                        format!("not applied: {:?}", r.get_ref().changes),
                    );
                    continue;
                }
                Ok(_) => {}
            }
            let deadline = Duration::from_secs(30) + Duration::from_millis(n as u64 * 10);
            let mut have = 0;
            wait_until(deadline, "every agent's new Kubernetes version", || {
                have = fleet
                    .snapshot()
                    .iter()
                    .filter(|o| o.version == version)
                    .count();
                have == n
            });
            let after = wait_quiet(&fleet, Duration::from_secs(1), Duration::from_secs(60));
            let etcd = etcd_counts(etcd_addr).minus(&etcd0);
            let mut lat: Vec<Duration> = after
                .iter()
                .filter(|o| o.version == version)
                .filter_map(|o| o.version_changed_at.map(|t| t - t0))
                .collect();
            all.extend(lat.iter().copied());
            report.row(
                &format!("  #{}", rep + 1),
                format!(
                    "{have} of {n} in p50/p99/max {} (RPC {}); etcd puts {:.0}, deletes {:.0}, ranges {:.0}, {:.1} MB sent; failed sessions {}",
                    spread(&mut lat),
                    ms(rpc_time),
                    etcd.puts,
                    etcd.deletes,
                    etcd.ranges,
                    etcd.sent_bytes / 1e6,
                    fleet.counters.failures() - failures0
                ),
            );
        }
        report.row(
            "  all agents, all changes: p50 / p99 / max",
            spread(&mut all),
        );
    }

    // SIGKILL of a replica.
    if args.wants("kill") {
        recover(&fleet, &mut report);
    }
    if args.replicas == 3 && args.wants("kill") {
        let victim = 1;
        let leader = cluster.leader().unwrap_or_default();
        let id = cluster.coordinators[victim].id.clone();
        report.section(&format!(
            "SIGKILL of {id} ({}leader)",
            if leader == id { "the " } else { "not the " }
        ));
        let before = fleet.snapshot();
        let moved: Vec<usize> = (0..n)
            .filter(|&i| before[i].connected == Some(victim))
            .collect();
        let backwards0: u32 = before.iter().map(|o| o.backwards).sum();
        let failures0 = fleet.counters.failures();
        let lost0 = fleet.counters.lost.load(Ordering::Relaxed);
        let t0 = Instant::now();
        cluster.coordinators[victim].proc.kill();
        let deadline = Duration::from_secs(120);
        let mut back = 0;
        wait_until(deadline, "the killed replica's agents to reconnect", || {
            let now = fleet.snapshot();
            back = moved
                .iter()
                .filter(|&&i| {
                    now[i].connected.is_some_and(|r| r != victim)
                        && now[i].session_opened_at.is_some_and(|t| t > t0)
                })
                .count();
            back == moved.len()
        });
        let after = wait_quiet(&fleet, Duration::from_secs(1), Duration::from_secs(30));
        let mut lat: Vec<Duration> = moved
            .iter()
            .filter(|&&i| after[i].connected.is_some())
            .filter_map(|&i| after[i].session_opened_at.map(|t| t - t0))
            .collect();
        let desired_again = moved
            .iter()
            .filter(|&&i| after[i].desired_count > before[i].desired_count)
            .count();
        let backwards: u32 = after.iter().map(|o| o.backwards).sum();
        report.row(
            "  its agents back on other replicas",
            format!("{back} of {}", moved.len()),
        );
        report.row("  reconnect p50 / p99 / max", spread(&mut lat));
        report.row(
            "  of them with a desired state again",
            format!("{desired_again} of {}", moved.len()),
        );
        report.row(
            "  desired revision went backwards (this phase)",
            format!("{} times", backwards - backwards0),
        );
        report.row(
            "  sessions ended / failed dials+opens (phase)",
            format!(
                "{} / {} (the killed replica's sessions end: {} expected)",
                fleet.counters.lost.load(Ordering::Relaxed) - lost0,
                fleet.counters.failures()
                    - failures0
                    - (fleet.counters.lost.load(Ordering::Relaxed) - lost0),
                moved.len()
            ),
        );
    }

    // The whole run.
    report.section("whole run");
    let end = fleet.snapshot();
    report.row(
        "desired revision went backwards",
        format!(
            "{} times, on {} agents",
            end.iter().map(|o| o.backwards).sum::<u32>(),
            end.iter().filter(|o| o.backwards > 0).count()
        ),
    );
    report.row(
        "sessions opened / failed attempts",
        format!(
            "{} / {}",
            fleet.counters.opened.load(Ordering::Relaxed),
            fleet.counters.failures()
        ),
    );
    report.row(
        "desired states received / reports sent",
        format!(
            "{} / {}",
            fleet.counters.desired.load(Ordering::Relaxed),
            fleet.counters.reports.load(Ordering::Relaxed)
        ),
    );
    let errors: BTreeMap<String, u64> = fleet.counters.errors.lock().expect("errors").clone();
    let mut errors: Vec<(String, u64)> = errors.into_iter().collect();
    errors.sort_by_key(|e| std::cmp::Reverse(e.1));
    for (text, count) in errors.iter().take(6) {
        report.row(&format!("  {count} ×"), text.clone());
    }

    for c in &cluster.coordinators {
        let text = c.proc.log_text();
        for level in [" ERROR ", " WARN "] {
            let lines: Vec<&str> = text.lines().filter(|l| l.contains(level)).collect();
            if let Some(first) = lines.first() {
                report.row(
                    &format!("{} log:{}lines", c.id, level.to_lowercase()),
                    format!(
                        "{}, first: {}",
                        lines.len(),
                        first.chars().take(240).collect::<String>()
                    ),
                );
            }
        }
    }
    report.row("load average at the end", loadavg());
    for task in tasks {
        task.abort();
    }
    rt.shutdown_timeout(Duration::from_secs(2));
    println!();
    for line in &report.0 {
        println!("{line}");
    }
}

/// A line on stderr every 5 s of the cold start: agents done, sessions
/// opened, failed attempts by kind, the replicas' CPU over the last 5 s and
/// the commonest error texts since the last line (what a storm is made of).
struct ColdProgress {
    started: Instant,
    last: Instant,
    pids: Vec<(String, u32, Duration)>,
    errors: BTreeMap<String, u64>,
    lag: Arc<std::sync::atomic::AtomicU64>,
}

impl ColdProgress {
    fn new(cluster: &Cluster, started: Instant, lag: Arc<std::sync::atomic::AtomicU64>) -> Self {
        let pids = cluster
            .coordinators
            .iter()
            .map(|c| {
                let pid = c.proc.pid();
                let cpu = proc_usage(pid).map(|u| u.1).unwrap_or_default();
                (c.id.clone(), pid, cpu)
            })
            .collect();
        Self {
            started,
            last: started,
            pids,
            errors: BTreeMap::new(),
            lag,
        }
    }

    fn maybe_print(&mut self, fleet: &Fleet, done: usize) {
        let window = self.last.elapsed();
        if window < Duration::from_secs(5) {
            return;
        }
        self.last = Instant::now();
        let c = &fleet.counters;
        let cpu: Vec<String> = self
            .pids
            .iter_mut()
            .map(|(id, pid, before)| {
                let now = proc_usage(*pid).map(|u| u.1).unwrap_or(*before);
                let share = (now.saturating_sub(*before)).as_secs_f64() / window.as_secs_f64();
                *before = now;
                format!("{id} {:.0}%", share * 100.0)
            })
            .collect();
        let errors = c.errors.lock().expect("errors").clone();
        let mut delta: Vec<(String, u64)> = errors
            .iter()
            .map(|(k, v)| (k.clone(), v - self.errors.get(k).copied().unwrap_or(0)))
            .filter(|(_, v)| *v > 0)
            .collect();
        delta.sort_by_key(|e| std::cmp::Reverse(e.1));
        self.errors = errors;
        eprintln!(
            "bench-fleet: cold +{:.0}s: {done} done, {} opened, failed {}/{}/{} (dial/open/lost); cpu {}; bench timers up to {} ms late",
            self.started.elapsed().as_secs_f64(),
            c.opened.load(Ordering::Relaxed),
            c.dial_failed.load(Ordering::Relaxed),
            c.open_failed.load(Ordering::Relaxed),
            c.lost.load(Ordering::Relaxed),
            cpu.join(", "),
            self.lag.swap(0, Ordering::Relaxed)
        );
        for (text, count) in delta.iter().take(4) {
            eprintln!("bench-fleet:     {count} × {text}");
        }
    }
}

/// Sets the calling thread's nice value (threads and processes it starts
/// afterwards inherit it; those already started keep theirs), with
/// `renice`, which on Linux sets the priority of the thread whose id it is
/// given.
fn set_thread_nice(nice: i32) -> Result<(), String> {
    let tid = nix::unistd::gettid().to_string();
    let out = std::process::Command::new("renice")
        .args(["-n", &nice.to_string(), "-p", &tid])
        .output()
        .map_err(|e| format!("renice: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "renice failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
