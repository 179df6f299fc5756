//! VIP failover, Steward against keepalived, on the same test hosts with the
//! same client (prints figures; not a pass/fail test).
//!
//! Each contender runs the same front door (see `steward_tests::vip_bed`):
//! two LB hosts with real HAProxy, two backends, a client sending an HTTP
//! request through the VIP every 10 ms. Steward: three coordinators on a
//! real etcd, an agent per LB. keepalived: Debian's package, VRRPv3 over
//! unicast between the LBs, `nopreempt`, HAProxy tracked by a script, at
//! `advert_int 1` (its default) and `0.1` (tuned).
//!
//! Per scenario and contender, N trials: the client-observed outage (the
//! longest run of failed requests, first failure to next success) p50/p99/
//! max, failed requests, the trials in which two hosts held the VIP at
//! once (from `ip monitor address` on every LB), and Steward/keepalived.
//!
//!     cargo build --release --workspace --bins
//!     target/release/bench-vip [--trials N] [--only steward|keepalived]
//!         [--scenarios crash,haproxy,move,leader,etcd,partition]

use std::collections::BTreeMap;
use std::thread::sleep;
use std::time::{Duration, Instant};

use steward_tests::netns::{ClientOptions, ClientReport, ClientRun};
use steward_tests::vip_bed::{BedOptions, FrontDoor, KeepalivedBed, VipBed};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Scenario {
    Crash,
    Haproxy,
    Move,
    Leader,
    Etcd,
    Partition,
}

impl Scenario {
    const ALL: [Scenario; 6] = [
        Scenario::Crash,
        Scenario::Haproxy,
        Scenario::Move,
        Scenario::Leader,
        Scenario::Etcd,
        Scenario::Partition,
    ];

    fn key(self) -> &'static str {
        match self {
            Scenario::Crash => "crash",
            Scenario::Haproxy => "haproxy",
            Scenario::Move => "move",
            Scenario::Leader => "leader",
            Scenario::Etcd => "etcd",
            Scenario::Partition => "partition",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Scenario::Crash => "silent crash of the active LB (link down)",
            Scenario::Haproxy => "HAProxy killed on the active LB",
            Scenario::Move => "planned move (stewardctl vip move / keepalived stopped)",
            Scenario::Leader => "leader coordinator SIGKILL",
            Scenario::Etcd => "etcd stopped for 4 s",
            Scenario::Partition => "LB-LB partition for 5 s",
        }
    }

    fn target(self) -> &'static str {
        match self {
            Scenario::Crash => "steward default p50 <= 1.0 s, p99 <= 1.5 s; fast p50 <= 300 ms",
            Scenario::Haproxy | Scenario::Move => "<= 200 ms",
            Scenario::Leader | Scenario::Etcd => "0 failed requests",
            Scenario::Partition => "0 dual holders",
        }
    }
}

#[allow(clippy::large_enum_variant)] // one of each, alive for the whole run
enum Contender {
    Steward(VipBed),
    Keepalived(KeepalivedBed),
}

impl Contender {
    fn door(&self) -> &FrontDoor {
        match self {
            Contender::Steward(b) => &b.door,
            Contender::Keepalived(b) => &b.door,
        }
    }

    fn supports(&self, s: Scenario) -> bool {
        matches!(self, Contender::Steward(_)) || !matches!(s, Scenario::Leader | Scenario::Etcd)
    }
}

#[derive(Default)]
struct Figures {
    outages_ms: Vec<f64>,
    failed: u64,
    requests: u64,
    dual_trials: usize,
    trials: usize,
}

impl Figures {
    fn percentile(&self, p: f64) -> Option<f64> {
        let mut v = self.outages_ms.clone();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
        Some(v[rank.clamp(1, v.len()) - 1])
    }
}

const CLIENT: ClientOptions = ClientOptions {
    interval: Duration::from_millis(10),
    timeout: Duration::from_millis(100),
};

/// One trial: the fault, the client through it, the restoration after.
fn trial(c: &mut Contender, s: Scenario) -> (ClientReport, bool) {
    let door = c.door();
    let holder = door.wait_for_single_holder(Duration::from_secs(30));
    let other = 1 - holder;
    let dual_before = door.watch().dual_holder_time();
    let run = ClientRun::start_with(&door.client, door.target(), window(s), &CLIENT);
    sleep(Duration::from_millis(500));

    match s {
        Scenario::Crash => {
            door.vanish(holder);
            door.wait_for_holder_on_wire(other, Duration::from_secs(30));
        }
        Scenario::Haproxy => {
            kill_haproxy(c, holder);
            c.door().wait_for_holder(other, Duration::from_secs(30));
        }
        Scenario::Move => match c {
            Contender::Steward(bed) => {
                let out = bed.cluster.ctl(&["vip", "move", "front"]);
                assert!(out.ok(), "vip move: {}", out.stderr);
                bed.wait_for_holder(other, Duration::from_secs(30));
            }
            Contender::Keepalived(bed) => {
                bed.stop_instance(holder);
                bed.wait_for_holder(other, Duration::from_secs(30));
            }
        },
        Scenario::Leader => {
            if let Contender::Steward(bed) = c {
                if std::env::var_os("BENCH_DEBUG").is_some() {
                    eprintln!("{}", bed.vip_status());
                }
                let leader = bed.index_of_leader();
                bed.cluster.coordinators[leader].proc.kill();
                sleep(Duration::from_secs(3));
                bed.cluster.restart_coordinator(leader);
            }
        }
        Scenario::Etcd => {
            if let Contender::Steward(bed) = c {
                bed.cluster.etcd.kill();
                sleep(Duration::from_secs(4));
                bed.cluster.etcd.restart();
            }
        }
        Scenario::Partition => {
            let door = c.door();
            let (a, b) = (&door.lbs[0].host, &door.lbs[1].host);
            a.block(b.ip());
            b.block(a.ip());
            sleep(Duration::from_secs(5));
            a.unblock(b.ip());
            b.unblock(a.ip());
        }
    }
    let report = run.finish();
    let dual = c.door().watch().dual_holder_time() > dual_before;
    if std::env::var_os("BENCH_DEBUG").is_some() {
        let events = c.door().watch().events();
        let tail = &events[events.len().saturating_sub(4)..];
        eprintln!("{tail:?} outages {:?}", report.outages);
    }

    // Put the failed part back, and let things settle before the next trial.
    match s {
        Scenario::Crash => c.door().reappear(holder),
        Scenario::Haproxy => restart_haproxy(c, holder),
        Scenario::Move => {
            if let Contender::Keepalived(bed) = c {
                bed.start_instance(holder);
            }
        }
        _ => {}
    }
    let door = c.door();
    door.wait_for_single_holder(Duration::from_secs(30));
    sleep(Duration::from_secs(2));
    (report, dual)
}

/// How long the client runs in a trial.
fn window(s: Scenario) -> Duration {
    match s {
        Scenario::Crash => Duration::from_secs(6),
        Scenario::Haproxy | Scenario::Move => Duration::from_secs(4),
        Scenario::Leader => Duration::from_secs(5),
        Scenario::Etcd => Duration::from_secs(6),
        Scenario::Partition => Duration::from_secs(7),
    }
}

fn kill_haproxy(c: &mut Contender, lb: usize) {
    match c {
        Contender::Steward(bed) => bed.lbs[lb].kill_haproxy(),
        Contender::Keepalived(bed) => bed.door.lbs[lb].kill_haproxy(),
    }
}

fn restart_haproxy(c: &mut Contender, lb: usize) {
    let door = match c {
        Contender::Steward(bed) => &mut bed.door,
        Contender::Keepalived(bed) => &mut bed.door,
    };
    let dir = door.dir.path().to_path_buf();
    door.lbs[lb].start_haproxy(&dir);
}

/// Longer than the replicas' restart grace.
const SETTLE: Duration = Duration::from_secs(3);

fn arg(name: &str) -> Option<String> {
    std::env::args().skip_while(|a| a != name).nth(1)
}

/// What the module documentation says about running it.
const USAGE: &str = "\
bench-vip: VIP failover, Steward against keepalived, on the same test hosts
with the same client (a request through the VIP every 10 ms). Prints, per
scenario and contender, the client-observed outage p50/p99/max, failed
requests, trials with two holders, and the ratio to keepalived at its default.

usage: bench-vip [--trials N] [--only steward|keepalived]
                 [--scenarios crash,haproxy,move,leader,etcd,partition]

Build first: cargo build --release --workspace --bins. Needs root (network
namespaces), etcd, haproxy and keepalived (scripts/deps.sh). About 25 minutes
with the default 10 trials.";

fn main() {
    let known = ["--trials", "--only", "--scenarios"];
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--help" || a == "-h" {
            println!("{USAGE}");
            return;
        }
        if !known.contains(&a.as_str()) || args.next().is_none() {
            eprintln!("bench-vip: unexpected argument {a:?}\n\n{USAGE}");
            std::process::exit(2);
        }
    }
    let trials: usize = arg("--trials")
        .map(|s| s.parse().expect("--trials N"))
        .unwrap_or(10);
    let only = arg("--only");
    let scenarios: Vec<Scenario> = match arg("--scenarios") {
        Some(list) => list
            .split(',')
            .map(|k| {
                *Scenario::ALL
                    .iter()
                    .find(|s| s.key() == k)
                    .unwrap_or_else(|| panic!("unknown scenario {k}"))
            })
            .collect(),
        None => Scenario::ALL.to_vec(),
    };

    type Make = Box<dyn Fn() -> Contender>;
    let mut contenders: Vec<(&str, Make)> = Vec::new();
    if only.as_deref() != Some("keepalived") {
        contenders.push((
            "steward default",
            Box::new(|| Contender::Steward(VipBed::start("bdef", BedOptions::default()))),
        ));
        contenders.push((
            "steward fast",
            Box::new(|| Contender::Steward(VipBed::start("bfast", BedOptions { profile: "fast" }))),
        ));
    }
    if only.as_deref() != Some("steward") {
        contenders.push((
            "keepalived advert 1",
            Box::new(|| Contender::Keepalived(KeepalivedBed::start("bka1", 1.0))),
        ));
        contenders.push((
            "keepalived advert 0.1",
            Box::new(|| Contender::Keepalived(KeepalivedBed::start("bka01", 0.1))),
        ));
    }

    let mut results: BTreeMap<(Scenario, &str), Figures> = BTreeMap::new();
    for (name, make) in &contenders {
        eprintln!("==> {name}: starting the front door");
        let mut c = make();
        // Replicas that just started hold off expiry marks for their
        // restart grace (max(3 leases, 2 s)); a crash in that window is
        // slower by design. Trials measure a settled cluster.
        sleep(SETTLE);
        for &s in &scenarios {
            if !c.supports(s) {
                continue;
            }
            let f = results.entry((s, name)).or_default();
            for i in 1..=trials {
                let started = Instant::now();
                let (report, dual) = trial(&mut c, s);
                eprintln!(
                    "    {name} / {}: trial {i}/{trials}: outage {:.0} ms, {} of {} failed{} ({:.1} s)",
                    s.key(),
                    report.longest_outage_ms,
                    report.failed,
                    report.requests,
                    if dual { ", TWO HOLDERS" } else { "" },
                    started.elapsed().as_secs_f64()
                );
                f.outages_ms.push(report.longest_outage_ms);
                f.failed += report.failed;
                f.requests += report.requests;
                f.dual_trials += usize::from(dual);
                f.trials += 1;
            }
        }
    }

    println!();
    println!("VIP failover, {trials} trials per cell; client request every 10 ms, 100 ms timeout");
    for &s in &scenarios {
        println!();
        println!("{} (target: {})", s.title(), s.target());
        println!(
            "  {:<24} {:>9} {:>9} {:>9} {:>14} {:>12} {:>16}",
            "contender",
            "p50 ms",
            "p99 ms",
            "max ms",
            "failed/total",
            "dual trials",
            "p50 vs ka 1s"
        );
        let anchor = results
            .get(&(s, "keepalived advert 1"))
            .and_then(|f| f.percentile(50.0));
        for (name, _) in &contenders {
            let Some(f) = results.get(&(s, *name)) else {
                println!("  {name:<24} (not applicable)");
                continue;
            };
            let fmt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}"));
            let ratio = match (f.percentile(50.0), anchor) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
                _ => "-".into(),
            };
            println!(
                "  {:<24} {:>9} {:>9} {:>9} {:>14} {:>12} {:>16}",
                name,
                fmt(f.percentile(50.0)),
                fmt(f.percentile(99.0)),
                fmt(f.percentile(100.0)),
                format!("{}/{}", f.failed, f.requests),
                format!("{}/{}", f.dual_trials, f.trials),
                ratio
            );
        }
    }
}
