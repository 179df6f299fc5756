//! Idle resource use of an agent and a coordinator (prints figures; not a
//! pass/fail test).
//!
//! Starts a real etcd, one coordinator and three agents with the default
//! heartbeat interval (1 s) and, as the packaged configs ship, a metrics
//! endpoint on each, scraped every 15 s as Prometheus does by default;
//! waits until all agents are connected, then samples RSS (peak of 1 s
//! samples) and CPU time (from /proc) over the window, and prints them side
//! by side with the targets.
//!
//!     cargo build --release --workspace --bins
//!     cargo run --release -p steward-tests --bin bench-idle [-- --secs N]

use std::time::{Duration, Instant};

use steward_tests::{eventually, metrics_listen, proc_usage, scrape, Cluster};

const AGENT_RSS_TARGET_MB: f64 = 15.0;
const AGENT_CPU_TARGET_PCT: f64 = 0.2;
/// Prometheus' default `scrape_interval`.
const SCRAPE_EVERY: Duration = Duration::from_secs(15);

struct Sample {
    name: String,
    pid: u32,
    cpu_start: Duration,
    peak_rss: u64,
    cpu_end: Duration,
}

fn main() {
    let secs: u64 = std::env::args()
        .skip_while(|a| a != "--secs")
        .nth(1)
        .map(|s| s.parse().expect("--secs N"))
        .unwrap_or(60);
    let mut cluster = Cluster::new();
    cluster.agent_heartbeat_ms = 1000;
    cluster.coordinator_metrics = true;
    cluster.start_coordinators(1);
    let mut endpoints = vec![metrics_listen(&cluster.coordinators[0].config).expect("metrics")];
    for node in ["node-1", "node-2", "node-3"] {
        endpoints.push(cluster.start_agent_with_metrics(node, &[]).1);
    }
    eventually(Duration::from_secs(10), "three healthy agents", || {
        let nodes = cluster.nodes();
        (nodes.len() == 3 && nodes.iter().all(|n| n["health"] == "healthy")).then_some(())
    });
    // Let start-up work (TLS handshakes, first facts) settle.
    std::thread::sleep(Duration::from_secs(2));

    let mut samples: Vec<Sample> = Vec::new();
    let mut watch = |name: String, pid: u32| {
        let (rss, cpu) = proc_usage(pid).expect("process usage");
        samples.push(Sample {
            name,
            pid,
            cpu_start: cpu,
            peak_rss: rss,
            cpu_end: cpu,
        });
    };
    for a in &cluster.agents {
        watch(format!("agent {}", a.node), a.proc.pid());
    }
    watch(
        "coordinator (3 agents)".into(),
        cluster.coordinators[0].proc.pid(),
    );
    watch("etcd (reference)".into(), cluster.etcd.proc.pid());

    eprintln!("sampling for {secs} s ...");
    let start = Instant::now();
    let mut scrapes = 0;
    let mut next_scrape = start;
    while start.elapsed() < Duration::from_secs(secs) {
        if Instant::now() >= next_scrape {
            for &addr in &endpoints {
                scrape::scrape(addr).expect("scrape /metrics");
                scrapes += 1;
            }
            next_scrape += SCRAPE_EVERY;
        }
        std::thread::sleep(Duration::from_secs(1));
        for s in &mut samples {
            if let Some((rss, cpu)) = proc_usage(s.pid) {
                s.peak_rss = s.peak_rss.max(rss);
                s.cpu_end = cpu;
            }
        }
    }
    let wall = start.elapsed().as_secs_f64();

    println!(
        "\nidle resource use over {wall:.0} s (heartbeat 1 s, /metrics scraped every {} s: {scrapes} scrapes)",
        SCRAPE_EVERY.as_secs()
    );
    println!(
        "{:<24} {:>10} {:>14}   target",
        "process", "peak RSS", "CPU % of core"
    );
    for s in &samples {
        let rss_mb = s.peak_rss as f64 / 1_048_576.0;
        let cpu_pct = (s.cpu_end - s.cpu_start).as_secs_f64() / wall * 100.0;
        let target = if s.name.starts_with("agent") {
            let ok = |b: bool| if b { "ok" } else { "MISSED" };
            format!(
                "RSS <= {AGENT_RSS_TARGET_MB} MB ({}), CPU <= {AGENT_CPU_TARGET_PCT} % ({})",
                ok(rss_mb <= AGENT_RSS_TARGET_MB),
                ok(cpu_pct <= AGENT_CPU_TARGET_PCT)
            )
        } else {
            "-".into()
        };
        println!(
            "{:<24} {:>7.1} MB {:>13.3}%   {target}",
            s.name, rss_mb, cpu_pct
        );
    }
    println!(
        "\nCPU resolution: {:.3} % (one clock tick over the window)",
        1.0 / nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .unwrap_or(100) as f64
            / wall
            * 100.0
    );
}
