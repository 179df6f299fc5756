//! `steward-demo [--exit]`: Steward's main job, live on this machine
//! (`scripts/demo.sh` runs it; root).
//!
//! On the test harness's hosts ([`ConvergeBed`]): a bridge in
//! 198.18.0.0/15 with no default route; etcd and three coordinator
//! replicas on its gateway; two lb machines booting systemd (nspawn, the
//! harness's image and local apt repository, built on first use) and two
//! web backends (network namespaces running `http-backend`), every agent
//! joined with a token (`stewardctl token create`, `steward-agent join`);
//! `stewardctl apply -f` a spec with the lb role, one frontend and a VIP;
//! the agents install and configure HAProxy themselves. Then, with a client
//! sending a request through the VIP every 10 ms:
//!
//! 1. the VIP holder goes silent (its link cut): who holds the VIP now, and
//!    how long the client saw no answers;
//! 2. it comes back: `ip monitor address` on both lb machines shows the VIP
//!    was never on two at once;
//! 3. the leader replica is SIGKILLed: no request fails.
//!
//! `--exit` removes everything and exits non-zero unless the outage was
//! under 2 s, no second holder was seen and no request failed on the leader
//! kill. Without it the cluster stays up, with how to reach every host
//! printed, until SIGINT or SIGTERM (Ctrl-C in `demo.sh`), which removes
//! everything. Only processes the harness started are stopped, by pid.

use std::collections::BTreeSet;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use steward_tests::converge_bed::{
    has_settled, poll, ConvergeBed, AGENT_UNIT, HAPROXY_CFG, VIP_NAME,
};
use steward_tests::netns::{run_client, AddressWatch, ClientRun};
use steward_tests::nspawn::{cache_dir, BaseImage, LocalRepo};
use steward_tests::{bin_dir, interrupted};

const LBS: [&str; 2] = ["lb1", "lb2"];
const BACKENDS: [&str; 2] = ["be1", "be2"];
/// The spec's frontend: `VIP:8080` to the web backends' port 80.
const FRONTEND_PORT: u16 = 8080;
/// The bar `--exit` holds the failover to.
const MAX_OUTAGE: Duration = Duration::from_secs(2);

/// A step's heading: bold on a terminal, plain when piped (CI logs).
fn step(title: &str) {
    use std::io::IsTerminal;
    if std::io::stdout().is_terminal() {
        println!("\n\x1b[1m==> {title}\x1b[0m");
    } else {
        println!("\n==> {title}");
    }
}

fn show(what: &str, text: &str) {
    println!("$ {what}");
    for line in text.lines() {
        println!("  {line}");
    }
}

fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

/// What the demo measured, judged by `--exit`.
struct Verdict {
    outage: Duration,
    max_holders: usize,
    dual_holder_time: Duration,
    leader_kill_failed: u64,
    leader_kill_requests: u64,
}

impl Verdict {
    fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.outage >= MAX_OUTAGE {
            p.push(format!(
                "the client saw no answers for {} (the bar is {})",
                ms(self.outage),
                ms(MAX_OUTAGE)
            ));
        }
        if self.max_holders > 1 {
            p.push(format!(
                "the VIP was on {} hosts at once, for {} in all",
                self.max_holders,
                ms(self.dual_holder_time)
            ));
        }
        if self.leader_kill_failed > 0 {
            p.push(format!(
                "{} of {} requests failed across the leader kill",
                self.leader_kill_failed, self.leader_kill_requests
            ));
        }
        p
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let keep = match args.as_slice() {
        [] => true,
        [a] if a == "--exit" => false,
        _ => {
            eprintln!("usage: steward-demo [--exit]");
            return ExitCode::from(2);
        }
    };
    steward_tests::interrupt_on_signals("steward-demo");
    let outcome = std::panic::catch_unwind(|| run(keep));
    match outcome {
        Ok(Some(problems)) if problems.is_empty() => {
            step("demo passed; everything it started is gone");
            ExitCode::SUCCESS
        }
        Ok(Some(problems)) => {
            step("demo FAILED; everything it started is gone");
            for p in problems {
                println!("  - {p}");
            }
            ExitCode::FAILURE
        }
        // Stopped by a signal in interactive mode after the demo ran.
        Ok(None) => {
            step("stopped; everything the demo started is gone");
            ExitCode::SUCCESS
        }
        Err(_) if interrupted() => {
            step("interrupted; everything the demo started is gone");
            ExitCode::from(130)
        }
        Err(_) => {
            step("demo FAILED (see the message above); everything it started is gone");
            ExitCode::FAILURE
        }
    }
}

/// The demo; `Some(problems)` when it ran to the end (in interactive
/// mode, after the signal), `None` never in `--exit` mode.
fn run(keep: bool) -> Option<Vec<String>> {
    let t0 = Instant::now();
    step("test hosts: the image and local apt repository (built on first use, cached)");
    let cache = cache_dir();
    let base = BaseImage::ensure();
    let repo = LocalRepo::ensure(LocalRepo::DEFAULT_PACKAGES);
    println!(
        "  {} and {} ready after {:.1} s",
        base.dir().display(),
        repo.dir().display(),
        t0.elapsed().as_secs_f64()
    );
    println!("  (cached in {}; delete it to rebuild)", cache.display());

    step("etcd, three coordinator replicas, two lb machines booting systemd, two web backends");
    let mut bed = ConvergeBed::start_unjoined("demo", &LBS, &BACKENDS);
    println!(
        "  network {} (no default route), gateway {}: etcd, {}",
        bed.net.subnet(),
        bed.net.gateway(),
        bed.cluster
            .coordinators
            .iter()
            .map(|c| c.id.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    for m in &bed.lbs {
        println!(
            "  {} {}: systemd, the agent's packaged unit",
            m.name(),
            m.ip()
        );
    }
    for b in &bed.backends {
        println!("  {} {}: http-backend on :80", b.host.name(), b.host.ip());
    }

    step("every agent joins with a token");
    let token = bed
        .cluster
        .create_token(&["--ttl", "15m", "--uses", "4", "--description", "demo"]);
    println!("$ stewardctl token create --ttl 15m --uses 4 --description demo");
    println!("  {}", token.command);
    for name in LBS {
        let m = bed.lb(name);
        let printed = bed.join_machine(m, &token);
        show(
            &format!("[{name}] {} --node-id {name}", token.command),
            &printed,
        );
    }
    for name in BACKENDS {
        let printed = bed.join_backend_with_token(name, &token);
        show(
            &format!("[{name}] {} --node-id {name} --no-start", token.command),
            &printed,
        );
    }
    for name in LBS {
        bed.wait_known(name, Duration::from_secs(30));
    }
    show("stewardctl nodes", &bed.ctl_ok(&["nodes"]).stdout);

    step("stewardctl apply -f: the lb role, a frontend and a VIP");
    let address = format!("{}/{}", bed.vip, bed.net.prefix_len());
    let spec = format!(
        "# Two load balancers, one floating IP, one frontend.\n\
         [[vip]]\nname = \"{VIP_NAME}\"\naddress = \"{address}\"\ncheck = \"haproxy\"\npreempt = false\n\n\
         [[frontend]]\nname = \"web\"\nport = {FRONTEND_PORT}\nbackend_role = \"k8s-worker\"\nbackend_port = 80\n\n\
         [nodes.lb1]\nroles = [\"lb\"]\n\n[nodes.lb2]\nroles = [\"lb\"]\n"
    );
    show("cat demo-cluster.toml", &spec);
    show(
        "stewardctl apply -f demo-cluster.toml",
        &bed.apply_spec(&spec).stdout,
    );
    // The frontend sends to the k8s-worker nodes (the role that serves the
    // web); a spec giving it needs a whole [kubernetes] section, so the
    // backends get it the short way.
    for name in BACKENDS {
        let out = bed.ctl_ok(&["role", "add", name, "k8s-worker"]);
        show(
            &format!("stewardctl role add {name} k8s-worker"),
            &out.stdout,
        );
    }

    step("the lb agents install and configure HAProxy (apt-get from the local repository)");
    let t_apply = Instant::now();
    let lb_resources = [
        "packages:haproxy",
        "file:/etc/haproxy/haproxy.cfg",
        "unit:haproxy.service",
    ];
    let target = std::net::SocketAddrV4::new(bed.vip, FRONTEND_PORT);
    let backend_ips: Vec<String> = bed
        .backends
        .iter()
        .map(|b| format!("{}:80", b.host.ip()))
        .collect();
    for name in LBS {
        let m = bed.lb(name);
        poll(
            Duration::from_secs(300),
            Duration::from_secs(1),
            &format!("{name}: HAProxy installed, configured with both backends, converged"),
            || {
                let cfg = bed.read_file(m, HAPROXY_CFG).unwrap_or_default();
                if let Some(missing) = backend_ips.iter().find(|ip| !cfg.contains(ip.as_str())) {
                    return Err(format!("haproxy.cfg lacks {missing}"));
                }
                let state = bed.unit_state(m, "haproxy.service");
                if state != "active" {
                    return Err(format!("haproxy.service is {state}"));
                }
                if !bed.listens(m, target) {
                    return Err(format!("HAProxy does not listen on {target} yet"));
                }
                bed.converged_report(name, has_settled(&lb_resources))
                    .map(|_| ())
            },
        );
        println!(
            "  {name}: converged {:.1} s after apply: haproxy installed, haproxy.cfg with be1 and \
             be2, listening on {target}",
            t_apply.elapsed().as_secs_f64()
        );
    }
    let holder = poll(
        Duration::from_secs(30),
        Duration::from_millis(100),
        "exactly one lb to hold the VIP",
        || match bed.vip_holders().as_slice() {
            [one] => Ok(one.clone()),
            other => Err(format!("holders: {other:?}")),
        },
    );
    show("stewardctl vip list", &bed.ctl_ok(&["vip", "list"]).stdout);
    show("stewardctl nodes", &bed.ctl_ok(&["nodes"]).stdout);

    // Who holds the VIP from now on, per `ip monitor address` in both lb
    // machines.
    let places: Vec<_> = bed.lbs.iter().map(|m| m.watched_ns()).collect();
    let watch = AddressWatch::start_in(&places, bed.vip);
    poll(
        Duration::from_secs(20),
        Duration::from_millis(100),
        "the client to be answered by both backends through the VIP",
        || {
            let r = run_client(&bed.client, target, Duration::from_millis(300));
            if r.failed == 0 && r.backends.len() == 2 {
                Ok(())
            } else {
                Err(format!(
                    "{} of {} failed, answers {:?}",
                    r.failed, r.requests, r.backends
                ))
            }
        },
    );
    let r = run_client(&bed.client, target, Duration::from_secs(1));
    println!(
        "  client (a request every 10 ms through {target}): {} requests, {} failed, answers {:?}",
        r.requests, r.failed, r.backends
    );

    step(&format!(
        "{holder} (the VIP holder) goes silent: its link is cut, the client keeps going"
    ));
    let other = LBS
        .iter()
        .find(|n| **n != holder)
        .map(|n| (*n).to_owned())
        .unwrap_or_default();
    let client = ClientRun::start(&bed.client, target, Duration::from_secs(8));
    // Baseline traffic before the fault (the client runs on a fixed clock).
    std::thread::sleep(Duration::from_secs(1));
    let cut = Instant::now();
    bed.lb(&holder).link_down();
    println!(
        "  {holder}: link down (the bridge side of host0); its agent and HAProxy keep running"
    );
    poll(
        Duration::from_secs(6),
        Duration::from_millis(10),
        &format!("{other} to hold the VIP"),
        || match watch.holders_now().as_slice() {
            [one] if *one == other => Ok(()),
            h => Err(format!("holders: {h:?}")),
        },
    );
    let moved = watch
        .events()
        .iter()
        .find(|e| e.at > cut && e.added && e.host == other)
        .map(|e| e.at - cut);
    let report = client.finish();
    let outage = report.longest_outage();
    println!(
        "  the VIP is on {other} now ({} after the cut, per ip monitor address)",
        moved.map(ms).unwrap_or_else(|| "?".into())
    );
    println!(
        "  the client saw no answers for {} ({} of {} requests failed; answers since: {:?})",
        ms(outage),
        report.failed,
        report.requests,
        report.backends
    );
    show("stewardctl vip list", &bed.ctl_ok(&["vip", "list"]).stdout);

    step(&format!("{holder} comes back"));
    bed.lb(&holder).link_up();
    poll(
        Duration::from_secs(30),
        Duration::from_millis(200),
        &format!("{holder} to be connected and healthy again"),
        || match bed.cluster.node(&holder) {
            Some(n) if n["health"] == "healthy" => Ok(()),
            n => Err(format!("{n:?}")),
        },
    );
    let r = run_client(&bed.client, target, Duration::from_secs(2));
    println!(
        "  {holder} is back and healthy; the VIP stays on {other} (preempt = false); \
         client for 2 s: {} requests, {} failed",
        r.requests, r.failed
    );
    println!(
        "  who held {} (ip monitor address in lb1 and lb2):",
        bed.vip
    );
    for e in watch.events() {
        let at = if e.at >= cut {
            format!("+{:.3} s", (e.at - cut).as_secs_f64())
        } else {
            format!("-{:.3} s", (cut - e.at).as_secs_f64())
        };
        println!(
            "    {at:>9} after the cut  {} {}",
            e.host,
            if e.added { "bound it" } else { "removed it" }
        );
    }
    let max_holders = watch.max_holders();
    let dual = watch.dual_holder_time();
    println!(
        "  most hosts holding it at once: {max_holders}{}",
        if max_holders <= 1 {
            " (never on two hosts)".to_owned()
        } else {
            format!(" (two holders for {})", ms(dual))
        }
    );

    step("SIGKILL the leader replica while the client runs");
    let leader = bed.cluster.leader().expect("a leader");
    let index = bed.cluster.coordinator_index(&leader);
    let client = ClientRun::start(&bed.client, target, Duration::from_secs(6));
    std::thread::sleep(Duration::from_secs(1));
    let pid = bed.cluster.coordinators[index].proc.pid();
    let killed = Instant::now();
    bed.cluster.coordinators[index].proc.kill();
    println!("  {leader} (pid {pid}) killed");
    let new_leader = poll(
        Duration::from_secs(20),
        Duration::from_millis(100),
        "a new leader",
        || match bed.cluster.leader() {
            Some(l) if l != leader => Ok(l),
            l => Err(format!("leader: {l:?}")),
        },
    );
    println!("  {new_leader} leads after {}", ms(killed.elapsed()));
    let report = client.finish();
    println!(
        "  the client: {} requests, {} failed, longest outage {}",
        report.requests,
        report.failed,
        ms(report.longest_outage())
    );
    let nodes: BTreeSet<&str> = LBS.iter().chain(BACKENDS.iter()).copied().collect();
    poll(
        Duration::from_secs(20),
        Duration::from_millis(200),
        "every node healthy on a live replica",
        || {
            let listed = bed.cluster.nodes();
            let bad: Vec<String> = listed
                .iter()
                .filter(|n| nodes.contains(n["id"].as_str().unwrap_or_default()))
                .filter(|n| n["health"] != "healthy" || n["replica"] == leader.as_str())
                .map(|n| format!("{} {} on {}", n["id"], n["health"], n["replica"]))
                .collect();
            if listed.len() >= nodes.len() && bad.is_empty() {
                Ok(())
            } else {
                Err(bad.join(", "))
            }
        },
    );
    show("stewardctl nodes", &bed.ctl_ok(&["nodes"]).stdout);
    bed.cluster.restart_coordinator(index);
    poll(
        Duration::from_secs(20),
        Duration::from_millis(200),
        &format!("{leader} to serve again"),
        || {
            let url = bed.cluster.coordinators[index].url.clone();
            let out = bed.cluster.ctl_at(&[url.as_str()], &["status"]);
            if out.ok() {
                Ok(())
            } else {
                Err(out.stderr)
            }
        },
    );
    println!("  {leader} restarted: it serves again, as a follower");
    show("stewardctl status", &bed.ctl_ok(&["status"]).stdout);

    // Over the whole watch, the leader kill included.
    let verdict = Verdict {
        outage,
        max_holders: watch.max_holders().max(max_holders),
        dual_holder_time: watch.dual_holder_time().max(dual),
        leader_kill_failed: report.failed,
        leader_kill_requests: report.requests,
    };
    step("summary");
    println!(
        "  failover on a cut link: {} without answers (bar: under {}); ip monitor address: the VIP on \
         at most {} host(s) at once, from before the cut to now",
        ms(verdict.outage),
        ms(MAX_OUTAGE),
        verdict.max_holders
    );
    println!(
        "  leader SIGKILL: {} of {} requests failed",
        verdict.leader_kill_failed, verdict.leader_kill_requests
    );
    println!("  took {:.0} s in all", t0.elapsed().as_secs_f64());
    let problems = verdict.problems();
    if problems.is_empty() {
        println!("  every check passed");
    }
    for p in &problems {
        println!("  FAILED: {p}");
    }
    if keep {
        print_access(&bed);
        while !interrupted() {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    drop(watch);
    drop(bed);
    Some(problems)
}

/// How to reach every host of the live cluster, as exact command lines.
fn print_access(bed: &ConvergeBed) {
    let pki = bed.cluster.pki();
    step("the cluster is up; in another shell, as root:");
    println!(
        "  export PATH={}:$PATH STEWARD_ENDPOINTS={}",
        bin_dir().display(),
        bed.cluster.coordinator_urls().join(",")
    );
    println!(
        "  export STEWARD_CA={} STEWARD_CERT={} STEWARD_KEY={}",
        pki.join("ca.crt").display(),
        pki.join("admin.crt").display(),
        pki.join("admin.key").display()
    );
    println!(
        "  stewardctl status; stewardctl nodes; stewardctl vip list; stewardctl events --follow"
    );
    println!("\n  The hosts (no machinectl: nsenter into their namespaces):");
    for m in &bed.lbs {
        let pid = m.leader_pid().unwrap_or_default();
        println!(
            "  {} {} (systemd is PID {pid} on this machine):",
            m.name(),
            m.ip()
        );
        println!("    nsenter -t {pid} -a systemctl status haproxy {AGENT_UNIT}");
        println!("    nsenter -t {pid} -a journalctl -u {AGENT_UNIT} -f");
        println!(
            "    nsenter -t {pid} -n ip -br addr    # who holds {}",
            bed.vip
        );
    }
    for b in &bed.backends {
        let pid = b.http.pid();
        println!(
            "  {} {} (http-backend is pid {pid}):  nsenter -t {pid} -n ip -br addr",
            b.host.name(),
            b.host.ip()
        );
    }
    println!(
        "  client {}:  nsenter --net=/run/netns/{} curl -s http://{}:{FRONTEND_PORT}/",
        bed.client.ip(),
        bed.client.ns(),
        bed.vip
    );
    println!(
        "  etcd and the replicas run on this machine ({}); logs in {}",
        bed.cluster
            .coordinators
            .iter()
            .map(|c| format!("{} pid {}", c.id, c.proc.pid()))
            .collect::<Vec<_>>()
            .join(", "),
        bed.cluster.dir.path().display()
    );
    if let Some(pid) = bed.lbs.first().and_then(|m| m.leader_pid()) {
        println!("\n  Try: take lb1 off the wire from inside, then back");
        println!("    nsenter -t {pid} -n ip link set host0 down; nsenter -t {pid} -n ip link set host0 up");
    }
    println!("\nPress Ctrl-C to stop and remove everything.");
}
