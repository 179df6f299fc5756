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
//! once (from `ip monitor address` on every LB), and Steward/keepalived;
//! for each direction of the move (`lb1->lb2`, `lb2->lb1`) separately too.
//! After each fault is undone, the VIP is watched for 8 s: every change of
//! its sole holder then counts as a "move after heal" (a healed host must
//! never cost a healthy holder the VIP: target 0).
//!
//! Two crashes: `crash` pulls the switch-side end of the holder's cable
//! (the holder sees carrier loss), `silent` takes its port off the bridge
//! with every link up (a hung or partitioned machine: nobody, the holder
//! included, sees a link change). Their trials also print a timeline of
//! the failover from the daemons' logs, in ms from the fault.
//!
//!     cargo build --release --workspace --bins
//!     target/release/bench-vip [--trials N] [--only steward|keepalived|steward-fast,keepalived-advert-1|...]
//!         [--scenarios crash,silent,haproxy,move,leader,etcd,partition]

use std::collections::{BTreeMap, BTreeSet};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use steward_tests::netns::{AddrEvent, ClientOptions, ClientReport, ClientRun};
use steward_tests::vip_bed::{BedOptions, FrontDoor, KeepalivedBed, VipBed};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Scenario {
    Crash,
    Silent,
    Haproxy,
    Move,
    Leader,
    Etcd,
    Partition,
}

impl Scenario {
    const ALL: [Scenario; 7] = [
        Scenario::Crash,
        Scenario::Silent,
        Scenario::Haproxy,
        Scenario::Move,
        Scenario::Leader,
        Scenario::Etcd,
        Scenario::Partition,
    ];

    fn key(self) -> &'static str {
        match self {
            Scenario::Crash => "crash",
            Scenario::Silent => "silent",
            Scenario::Haproxy => "haproxy",
            Scenario::Move => "move",
            Scenario::Leader => "leader",
            Scenario::Etcd => "etcd",
            Scenario::Partition => "partition",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Scenario::Crash => {
                "crash of the active LB (switch-side link down: it sees carrier loss)"
            }
            Scenario::Silent => {
                "silent crash of the active LB (port off the bridge, every link up)"
            }
            Scenario::Haproxy => "HAProxy killed on the active LB",
            Scenario::Move => "planned move (stewardctl vip move / keepalived stopped)",
            Scenario::Leader => "leader coordinator SIGKILL",
            Scenario::Etcd => "etcd stopped for 4 s",
            Scenario::Partition => "LB-LB partition for 5 s",
        }
    }

    fn target(self) -> &'static str {
        match self {
            Scenario::Crash | Scenario::Silent => {
                "steward default p50 <= 1.0 s, p99 <= 1.5 s; fast p50 <= 300 ms; \
                 both directions; 0 moves after heal"
            }
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

/// What one trial measured.
struct Trial {
    report: ClientReport,
    /// Two hosts held the VIP at once during the trial or after the heal.
    dual: bool,
    /// `lb1->lb2`: who held the VIP before the fault, and who took over.
    direction: String,
    /// Times the sole holder changed after the failed part was put back
    /// (a healthy holder must never lose the VIP to a healed host).
    moves_after_heal: usize,
    /// Requests that failed after the heal.
    failed_after_heal: u64,
}

#[derive(Default)]
struct Figures {
    outages_ms: Vec<f64>,
    failed: u64,
    requests: u64,
    dual_trials: usize,
    trials: usize,
    moves_after_heal: usize,
    failed_after_heal: u64,
}

impl Figures {
    fn add(&mut self, t: &Trial) {
        self.outages_ms.push(t.report.longest_outage_ms);
        self.failed += t.report.failed;
        self.requests += t.report.requests;
        self.dual_trials += usize::from(t.dual);
        self.trials += 1;
        self.moves_after_heal += t.moves_after_heal;
        self.failed_after_heal += t.failed_after_heal;
    }

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

/// How long the VIP is watched (and the client kept running) after the
/// failed part is put back: long enough for every replica's stream from the
/// healed host to be re-established or given up (TCP's retransmission
/// backoff after a few seconds off the wire reaches several seconds).
fn heal_watch() -> Duration {
    env_secs("BENCH_HEAL_WATCH_S", 8)
}

/// A duration from the environment (whole seconds), else `default`.
fn env_secs(name: &str, default: u64) -> Duration {
    let secs = std::env::var(name).ok().and_then(|v| v.parse().ok());
    Duration::from_secs(secs.unwrap_or(default))
}

/// One trial: the fault, the client through it, the restoration after.
fn trial(c: &mut Contender, s: Scenario) -> Trial {
    let door = c.door();
    let holder = door.wait_for_single_holder(Duration::from_secs(30));
    let other = 1 - holder;
    let names: Vec<String> = door.lbs.iter().map(|l| l.host.name().to_owned()).collect();
    let dual_before = door.watch().dual_holder_time();
    let client_started = Instant::now();
    let run = ClientRun::start_with(&door.client, door.target(), window(s), &CLIENT);
    sleep(Duration::from_millis(500));
    let fault = (Instant::now(), SystemTime::now());

    match s {
        Scenario::Crash => {
            door.vanish(holder);
            door.wait_for_holder_on_wire(other, Duration::from_secs(30));
        }
        Scenario::Silent => {
            door.vanish_silently(holder);
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
    if std::env::var_os("BENCH_DEBUG").is_some() {
        let events = c.door().watch().events();
        let tail = &events[events.len().saturating_sub(4)..];
        eprintln!("{tail:?} outages {:?}", report.outages);
    }
    if let (Contender::Steward(bed), Scenario::Crash | Scenario::Silent) = (&*c, s) {
        eprintln!(
            "      timeline: {}",
            failover_timeline(bed, holder, other, fault, client_started, &report)
        );
    }

    // Put the failed part back and watch what the VIP does afterwards.
    let healed = Instant::now();
    match s {
        Scenario::Crash => c.door().reappear(holder),
        Scenario::Silent => c.door().reappear_silently(holder),
        Scenario::Haproxy => restart_haproxy(c, holder),
        Scenario::Move => {
            if let Contender::Keepalived(bed) = c {
                bed.start_instance(holder);
            }
        }
        _ => {}
    }
    let healed_wall = SystemTime::now();
    let door = c.door();
    let after = ClientRun::start_with(&door.client, door.target(), heal_watch(), &CLIENT).finish();
    door.wait_for_single_holder(Duration::from_secs(30));
    let moves_after_heal = sole_holder_changes(&door.watch().events(), healed, &names[other]);
    if let (Contender::Steward(bed), true) = (&*c, moves_after_heal > 0) {
        eprintln!("      after heal (ms from the heal):");
        for line in heal_log(bed, healed_wall) {
            eprintln!("        {line}");
        }
    }
    let door = c.door();
    // Who held it before the fault, and who took over.
    let direction = format!("{}->{}", names[holder], names[other]);
    Trial {
        report,
        dual: door.watch().dual_holder_time() > dual_before,
        direction,
        moves_after_heal,
        failed_after_heal: after.failed,
    }
}

/// How often the sole holder changed after `since`, starting from
/// `serving` (the host that took over during the fault): each time exactly
/// one host holds the VIP and it is not the one that last held it alone. A
/// healed host that still had the VIP and wins it back (keepalived) counts.
fn sole_holder_changes(events: &[AddrEvent], since: Instant, serving: &str) -> usize {
    let mut holders: BTreeSet<&str> = BTreeSet::new();
    let mut sole: &str = serving;
    let mut changes = 0;
    for e in events {
        if e.added {
            holders.insert(&e.host);
        } else {
            holders.remove(e.host.as_str());
        }
        if e.at > since && holders.len() == 1 {
            let now = holders.iter().next().copied().unwrap_or(sole);
            if now != sole {
                changes += 1;
                sole = now;
            }
        }
    }
    changes
}

/// One failover as both sides logged it, in ms from the fault: the
/// replicas' last ack of the old holder and their expiry marks, the
/// leader's placement, the old holder letting go, the new one binding, and
/// the client's first good answer.
fn failover_timeline(
    bed: &VipBed,
    old: usize,
    new: usize,
    fault: (Instant, SystemTime),
    client_started: Instant,
    report: &ClientReport,
) -> String {
    let fault_us = unix_us(fault.1);
    let ms = |us: i64| (us - fault_us) as f64 / 1000.0;
    let mut items: Vec<(f64, String)> = Vec::new();
    let window = (fault_us - 2_000_000)..(fault_us + 5_000_000);
    for coordinator in &bed.cluster.coordinators {
        let id = &coordinator.id;
        for (us, line) in lines_within(&coordinator.proc.log_text(), &window) {
            if line.contains("expiry mark written") {
                items.push((ms(us), format!("mark {id}")));
                if let Some(quiet) = field(line, "since_last_ack_ms") {
                    if let Ok(quiet) = quiet.parse::<f64>() {
                        items.push((ms(us) - quiet, format!("last ack {id}")));
                    }
                }
            } else if line.contains("VIP front: ") {
                let what = line.split("VIP front: ").nth(1).unwrap_or("").trim();
                items.push((ms(us), format!("placed ({what})")));
            }
        }
    }
    for (lb, role) in [(old, "old"), (new, "new")] {
        for (us, line) in lines_within(&bed.agent(lb).log_text(), &window) {
            if line.contains("VIP bound") {
                items.push((ms(us), format!("{role} bound")));
            } else if line.contains("VIP removed") {
                items.push((ms(us), format!("{role} unbound")));
            } else if line.contains("lease stream") {
                items.push((ms(us), format!("{role} lease stream event")));
            }
        }
    }
    // The client's clock starts when it is spawned (a few ms early at most).
    let fault_in_client_ms = (fault.0 - client_started).as_secs_f64() * 1000.0;
    if let Some((_, end)) = report
        .outages
        .iter()
        .find(|(_, end)| *end > fault_in_client_ms)
    {
        items.push((end - fault_in_client_ms, "first good answer".into()));
    }
    items.sort_by(|a, b| a.0.total_cmp(&b.0));
    items
        .iter()
        .map(|(t, what)| format!("{t:+.0} {what}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// What the daemons logged about the VIP after a heal: why a healthy
/// holder lost it.
fn heal_log(bed: &VipBed, healed: SystemTime) -> Vec<String> {
    let healed_us = unix_us(healed);
    let mut lines: Vec<(i64, String)> = Vec::new();
    let interesting = [
        "expiry mark",
        "VIP front: ",
        "VIP bound",
        "VIP removed",
        "lease stream",
        "session",
    ];
    let mut logs: Vec<(String, String)> = bed
        .cluster
        .coordinators
        .iter()
        .map(|c| (c.id.clone(), c.proc.log_text()))
        .collect();
    for lb in 0..bed.lbs.len() {
        logs.push((bed.lbs[lb].host.name().to_owned(), bed.agent(lb).log_text()));
    }
    let window = (healed_us - 500_000)..(healed_us + heal_watch().as_micros() as i64);
    for (who, text) in logs {
        for (us, line) in lines_within(&text, &window) {
            if interesting.iter().any(|i| line.contains(i)) {
                let rest = line.split_once(' ').map_or(line, |(_, r)| r.trim());
                lines.push((
                    us,
                    format!("{:+.0} {who}: {rest}", (us - healed_us) as f64 / 1000.0),
                ));
            }
        }
    }
    lines.sort();
    lines.into_iter().map(|(_, l)| l).collect()
}

/// The log lines stamped within `window` (Unix microseconds), with their
/// stamps.
fn lines_within<'a>(
    text: &'a str,
    window: &'a std::ops::Range<i64>,
) -> impl Iterator<Item = (i64, &'a str)> + 'a {
    text.lines().filter_map(move |line| {
        let us = log_time_us(line)?;
        window.contains(&us).then_some((us, line))
    })
}

fn unix_us(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// The timestamp tracing's default format puts first on a line
/// (`2026-12-06T14:05:38.123456Z`), as Unix microseconds.
fn log_time_us(line: &str) -> Option<i64> {
    let ts = line.split_whitespace().next()?;
    let ts = ts.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.splitn(3, ':').map(|x| x.parse::<i64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    let frac_us = format!("{frac:0<6}")[..6].parse::<i64>().ok()?;
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1_000_000) + frac_us)
}

/// `name=value` in a tracing line.
fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let at = line.find(&format!("{name}="))?;
    line[at + name.len() + 1..].split_whitespace().next()
}

/// How long the client runs in a trial.
fn window(s: Scenario) -> Duration {
    match s {
        Scenario::Crash | Scenario::Silent => env_secs("BENCH_CRASH_WINDOW_S", 6),
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

usage: bench-vip [--trials N] [--only steward|keepalived|steward-fast,keepalived-advert-1|...]
                 [--scenarios crash,silent,haproxy,move,leader,etcd,partition]

Crash and silent trials print their direction, a timeline of the failover
as the logs show it (ms from the fault), and what the VIP did in the 8 s
after the crashed host came back (moves of the healthy holder: target 0).
BENCH_CRASH_WINDOW_S (default 6) sets how long the client runs in a crash
trial (the host stays off the wire until it ends, about 0.5 s less),
BENCH_HEAL_WATCH_S (default 8) how long the VIP is watched after the heal.

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
    let mut contenders: Vec<(&str, Make)> = vec![
        (
            "steward default",
            Box::new(|| Contender::Steward(VipBed::start("bdef", BedOptions::default()))),
        ),
        (
            "steward fast",
            Box::new(|| Contender::Steward(VipBed::start("bfast", BedOptions { profile: "fast" }))),
        ),
        (
            "keepalived advert 1",
            Box::new(|| Contender::Keepalived(KeepalivedBed::start("bka1", 1.0))),
        ),
        (
            "keepalived advert 0.1",
            Box::new(|| Contender::Keepalived(KeepalivedBed::start("bka01", 0.1))),
        ),
    ];
    // `--only steward`, `--only keepalived`, `--only steward-fast,keepalived-advert-1`:
    // contenders whose name (spaces as dashes) starts with one of these.
    if let Some(only) = &only {
        contenders.retain(|(name, _)| {
            let name = name.replace(' ', "-");
            only.split(',').any(|prefix| name.starts_with(prefix))
        });
    }

    // Per scenario and contender: all trials ("all"), then per direction.
    let mut results: BTreeMap<(Scenario, &str), BTreeMap<String, Figures>> = BTreeMap::new();
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
            let cell = results.entry((s, name)).or_default();
            for i in 1..=trials {
                let started = Instant::now();
                let t = trial(&mut c, s);
                eprintln!(
                    "    {name} / {}: trial {i}/{trials} {}: outage {:.0} ms, {} of {} failed{}; \
                     after heal: {} moves, {} failed ({:.1} s, load {})",
                    s.key(),
                    t.direction,
                    t.report.longest_outage_ms,
                    t.report.failed,
                    t.report.requests,
                    if t.dual { ", TWO HOLDERS" } else { "" },
                    t.moves_after_heal,
                    t.failed_after_heal,
                    started.elapsed().as_secs_f64(),
                    load_average(),
                );
                cell.entry("all".into()).or_default().add(&t);
                cell.entry(t.direction.clone()).or_default().add(&t);
            }
        }
    }

    println!();
    println!(
        "VIP failover, {trials} trials per cell; client request every 10 ms, 100 ms timeout; \
         load at the end: {}",
        load_average()
    );
    for &s in &scenarios {
        println!();
        println!("{} (target: {})", s.title(), s.target());
        println!(
            "  {:<24} {:<9} {:>7} {:>7} {:>7} {:>14} {:>6} {:>11} {:>13} {:>13}",
            "contender",
            "direction",
            "p50 ms",
            "p99 ms",
            "max ms",
            "failed/total",
            "dual",
            "heal moves",
            "heal failed",
            "p50 vs ka 1s"
        );
        let anchor = |direction: &str| {
            results
                .get(&(s, "keepalived advert 1"))
                .and_then(|cell| cell.get(direction))
                .and_then(|f| f.percentile(50.0))
        };
        for (name, _) in &contenders {
            let Some(cell) = results.get(&(s, *name)) else {
                println!("  {name:<24} (not applicable)");
                continue;
            };
            // "all" first, then each direction.
            let mut rows: Vec<(&String, &Figures)> = cell.iter().collect();
            rows.sort_by_key(|(d, _)| (d.as_str() != "all", d.to_string()));
            for (direction, f) in rows {
                let fmt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}"));
                let ratio = match (f.percentile(50.0), anchor(direction)) {
                    (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
                    _ => "-".into(),
                };
                println!(
                    "  {:<24} {:<9} {:>7} {:>7} {:>7} {:>14} {:>6} {:>11} {:>13} {:>13}",
                    name,
                    direction,
                    fmt(f.percentile(50.0)),
                    fmt(f.percentile(99.0)),
                    fmt(f.percentile(100.0)),
                    format!("{}/{}", f.failed, f.requests),
                    format!("{}/{}", f.dual_trials, f.trials),
                    f.moves_after_heal,
                    f.failed_after_heal,
                    ratio
                );
            }
        }
    }
}

/// `/proc/loadavg`'s three averages (the machine is shared: figures are
/// only comparable at similar load).
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}
