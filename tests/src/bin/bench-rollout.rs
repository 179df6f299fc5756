//! Rollout time per node and in total, with the breakdown per step (prints
//! figures; not a pass/fail test).
//!
//! The bed of `tests/rollout.rs`: two nspawn lb machines booting real
//! systemd whose agents run real HAProxy and hold the VIP, three coordinator
//! replicas on a real etcd, and three netns nodes with the gluster-brick role
//! (their agents run with convergence off, as the bed's backends do: for
//! them a node is converged once its agent holds the new revision, so their
//! figures are the coordinator's steps and the agents' receipt, not a
//! Gluster change on a host).
//!
//! Each round, two rollouts (`apply --rollout`, max unavailable 1):
//! - the three brick nodes: a Gluster volume added (or removed again);
//! - the lb pair: an HAProxy frontend added (or removed again), a real
//!   `haproxy.cfg` render and reload on each machine, the VIP holder last
//!   (its drain is the VIP's planned handover).
//!
//! For every node: drain (maintenance record to drained), change (drained
//! to the change written), converge (change to the agent's converged
//! report), health (to the health checks passing), undrain, total; and for
//! the rollout the wall time from `apply` to the phase `done` as
//! `stewardctl rollout status` polls it (every 100 ms).
//!
//!     cargo build --release --workspace --bins
//!     target/release/bench-rollout [--rounds N]

use std::time::{Duration, Instant};

use serde_json::Value;
use steward_tests::converge_bed::{poll, Clock, ConvergeBed};

const USAGE: &str = "usage: bench-rollout [--rounds N]   (N: 1..20, default 3)";

const LBS: [&str; 2] = ["lb1", "lb2"];
const BRICKS: [&str; 3] = ["be1", "be2", "be3"];

const WEB: &str = r#"
[[frontend]]
name = "web"
port = 8080
backend_role = "gluster-brick"
backend_port = 80
"#;

/// The spec of round `round`'s brick rollout (`bricks`) or lb rollout: the
/// brick rollout toggles the volume, the lb rollout the `bench` frontend;
/// each leaves the other's part as it was.
fn spec(round: u64, bricks: bool) -> String {
    let even = round.is_multiple_of(2);
    let mut text = WEB.to_owned();
    let bench_frontend = if bricks { !even } else { even };
    if bench_frontend {
        text.push_str(
            "\n[[frontend]]\nname = \"bench\"\nport = 8090\nbackend_role = \"gluster-brick\"\n\
             backend_port = 80\n",
        );
    }
    if even {
        text.push_str("\n[[gluster.volume]]\nname = \"bench\"\nreplica = 3\nmount_on = []\n");
    }
    text
}

fn number(name: &str, default: u64, min: u64, max: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    let Some(i) = args.iter().position(|a| a == name) else {
        return default;
    };
    match args.get(i + 1).and_then(|v| v.parse::<u64>().ok()) {
        Some(v) if (min..=max).contains(&v) => v,
        _ => {
            eprintln!("bench-rollout: {name} takes a number in {min}..{max}\n\n{USAGE}");
            std::process::exit(2);
        }
    }
}

/// One rollout from `apply` to done: the status at the end and the wall
/// time.
fn roll(bed: &ConvergeBed, text: &str, name: &str) -> (Value, Duration) {
    let path = bed.cluster.dir.path().join(name);
    std::fs::write(&path, text).expect("write spec");
    let path = path.display().to_string();
    let started = Instant::now();
    let out = bed.ctl_ok(&["apply", "-f", &path, "--rollout"]);
    let id = out
        .stdout
        .lines()
        .find_map(|l| {
            Some(
                l.strip_prefix("rollout ")?
                    .split_once(" created")?
                    .0
                    .to_owned(),
            )
        })
        .unwrap_or_else(|| panic!("no rollout created: {}", out.stdout));
    let done = poll(
        Duration::from_secs(300),
        Duration::from_millis(100),
        &format!("rollout {id} done"),
        || {
            let r = bed.ctl_ok(&["rollout", "status", &id, "-o", "json"]).json();
            match r["phase"].as_str() {
                Some("done") => Ok(r),
                Some("failed") | Some("aborted") => panic!("rollout {id} stopped: {r}"),
                _ => Err(format!("{}", r["phase"])),
            }
        },
    );
    (done, started.elapsed())
}

const STEPS: [&str; 6] = ["drain", "change", "converge", "health", "undrain", "total"];

/// Per-step samples (ms) by group.
#[derive(Default)]
struct Samples(std::collections::BTreeMap<(String, &'static str), Vec<u64>>);

impl Samples {
    fn add(&mut self, group: &str, rollout: &Value) {
        for n in rollout["nodes"].as_array().into_iter().flatten() {
            for step in STEPS {
                if let Some(ms) = n["ms"][step].as_u64() {
                    self.0.entry((group.to_owned(), step)).or_default().push(ms);
                }
            }
        }
    }
}

fn print_rollout(group: &str, rollout: &Value, wall: Duration) {
    println!(
        "  {group}: {} nodes in {:.2} s (apply to done)",
        rollout["nodes_total"],
        wall.as_secs_f64()
    );
    for n in rollout["nodes"].as_array().into_iter().flatten() {
        let cell = |s: &str| {
            n["ms"][s]
                .as_u64()
                .map_or_else(|| "-".to_owned(), |v| format!("{v}"))
        };
        println!(
            "    {:<5} drain {:>5} ms  change {:>4} ms  converge {:>5} ms  health {:>4} ms  \
             undrain {:>4} ms  total {:>5} ms",
            n["node"].as_str().unwrap_or_default(),
            cell("drain"),
            cell("change"),
            cell("converge"),
            cell("health"),
            cell("undrain"),
            cell("total"),
        );
    }
}

fn main() -> std::process::ExitCode {
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--help" || a == "-h" {
            println!("{USAGE}");
            return std::process::ExitCode::SUCCESS;
        }
        if a != "--rounds" || args.next().is_none() {
            eprintln!("bench-rollout: unexpected argument {a:?}\n\n{USAGE}");
            return std::process::ExitCode::from(2);
        }
    }
    let rounds = number("--rounds", 3, 1, 20);
    steward_tests::interrupt_on_signals("bench-rollout");
    let clock = Clock(Instant::now());
    let build = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let mut bed = ConvergeBed::start("bench-rollout", &LBS, &BRICKS);
    for b in BRICKS {
        bed.join_backend(b);
    }
    for lb in LBS {
        bed.ctl_ok(&["role", "add", lb, "lb"]);
    }
    bed.set_vip(&[]);
    for b in BRICKS {
        bed.ctl_ok(&["role", "add", b, "gluster-brick"]);
    }
    bed.apply_spec(WEB);
    for lb in LBS {
        poll(
            Duration::from_secs(240),
            Duration::from_secs(1),
            &format!("{lb}: HAProxy converged"),
            || bed.converged_report(lb, |_| Ok(())),
        );
    }
    clock.say(format!("bed up ({build} build); {rounds} rounds"));
    let mut samples = Samples::default();
    let mut walls: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    for round in 0..rounds {
        println!("round {}", round + 1);
        let (r, wall) = roll(&bed, &spec(round, true), &format!("bricks-{round}.toml"));
        print_rollout("3 brick nodes (gluster volume)", &r, wall);
        samples.add("bricks", &r);
        walls.entry("bricks").or_default().push(wall.as_secs_f64());
        let (r, wall) = roll(&bed, &spec(round, false), &format!("lbs-{round}.toml"));
        print_rollout("lb pair (HAProxy frontend)", &r, wall);
        samples.add("lb", &r);
        walls.entry("lb").or_default().push(wall.as_secs_f64());
    }
    println!("\nmedian per node (ms) over {rounds} rounds, {build} build:");
    for group in ["bricks", "lb"] {
        let cells: Vec<String> = STEPS
            .iter()
            .map(|step| {
                let mut v = samples
                    .0
                    .get(&(group.to_owned(), *step))
                    .cloned()
                    .unwrap_or_default();
                v.sort_unstable();
                let median = v.get(v.len() / 2).map_or("-".into(), |m| m.to_string());
                format!("{step} {median}")
            })
            .collect();
        let mut w = walls.get(group).cloned().unwrap_or_default();
        w.sort_by(f64::total_cmp);
        let wall = w.get(w.len() / 2).copied().unwrap_or_default();
        println!(
            "  {group:<6} {}; rollout apply-to-done median {wall:.2} s",
            cells.join(", ")
        );
    }
    std::process::ExitCode::SUCCESS
}
