//! Converge time, Steward against Puppet, on the same host (prints figures;
//! not a pass/fail test).
//!
//! One nspawn machine booting real systemd (`ConvergeBed::start`, as
//! `tests/converge_lb.rs` uses it) runs `steward-agent.service` as packaged
//! with converge on; the bench sets its recheck to 1 s (config rewritten,
//! agent restarted). A netns backend with an agent is a k8s-worker member
//! and a VIP is defined, so the lb role's `haproxy.cfg` has frontends and a
//! server. The local apt repository of the bed's packages plus Debian's
//! `puppet` is built into the test cache (the first run downloads it) and
//! copied into the machine, where apt is told of it only when Puppet's
//! turn comes; this binary is copied in too, for `probe`.
//!
//! 1. **Role assignment to converged** (lb), `--trials` times: `stewardctl
//!    role add lb1 lb`, then `stewardctl node show -o json` polled every
//!    100 ms until the report is at the new desired revision with every
//!    resource settled. Figures: the agent's report `finished` time minus
//!    the moment before `role add` (exact: same kernel clock), the moment
//!    the poll saw it (adds the report's trip to etcd and the poll), and the
//!    converging run's own `duration_ms`. Removing the role leaves the host
//!    as it is (by design), so between trials the bench also puts the
//!    machine back: `apt-get purge --autoremove haproxy procps`, haproxy.cfg
//!    and the two sysctl files removed, both sysctls set to 0. Every trial
//!    is thus a fresh install from the local repository (no network
//!    download) plus config, sysctls and service start.
//! 2. **No-op converge time per role** (every resource `ok`). The agent
//!    sends a report only when its outcome changes (timing aside), so the
//!    coordinator gets one `duration_ms` per change, not one per run: the
//!    bench shows that (distinct reports over 6 s of 1 s rechecks) and
//!    prints those agent-reported samples, but measures in-process: this
//!    binary's `probe` subcommand, run in the machine, does what the
//!    agent's loop does: `roles::plan` of the recorded `desired.json` (its
//!    roles narrowed to those measured), one `converge::engine::Engine`
//!    kept across runs, `System::detect()` per run, `Engine::run` timed
//!    (the span of `duration_ms`, in µs). One warm-up run is left out; runs
//!    are `--gap-ms` apart; only runs with every resource `ok` count. The
//!    agent is stopped meanwhile so its own runs do not overlap. Kubernetes
//!    roles are measured only if the machine's repository has kubeadm
//!    (Debian has none and the upstream repository is out of reach).
//! 3. **Puppet** (Debian's puppet 7), per role, an equivalent manifest. lb:
//!    packages haproxy and procps; haproxy.cfg with the bytes the agent
//!    rendered, `validate_cmd` haproxy -c, reloading the service; both
//!    `ip_nonlocal_bind` sysctls persisted in the agent's own
//!    `/etc/sysctl.d` files and applied by an exec guarded with `unless`
//!    (the live value is checked every run, as Steward checks it); haproxy
//!    running and enabled. gluster-brick (no volumes, as here): the package,
//!    glusterd running and enabled. One `puppet apply` to converge, then
//!    `--puppet-runs` no-op runs (`--detailed-exitcodes` must say 0: no
//!    change, no failure), each timed inside the machine (wall time of the
//!    command) with Puppet's own "Applied catalog in X seconds" (10 ms
//!    resolution). The agent stays stopped while Puppet runs; afterwards
//!    the agent's engine must find the host all ok.
//!
//! Both contenders run through `nsenter` into the machine with the same
//! privileges. The host's other load is not controlled.
//!
//!     cargo build --release --workspace --bins
//!     target/release/bench-converge [--trials N] [--runs N] [--puppet-runs N]

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use steward_tests::converge_bed::{
    self, every_resource_ok, report_resources, Clock, ConvergeBed, AGENT_CONFIG_IN_MACHINE,
    AGENT_IN_MACHINE, AGENT_UNIT, HAPROXY_CFG,
};
use steward_tests::nspawn::{LocalRepo, Machine};

const USAGE: &str = "\
bench-converge: converge time, Steward against Puppet, on one nspawn machine
booting systemd. Prints: no-op converge time per role (Steward in-process
p50/p99/max; Puppet no-op `puppet apply` of an equivalent lb manifest, wall
and catalog p50/p99; the ratio) and the time from `stewardctl role add lb`
to converged, each trial a fresh install of HAProxy.

usage: bench-converge [--trials N] [--runs N] [--puppet-runs N] [--gap-ms MS]

  --trials N        role-assignment trials (default 5)
  --runs N          Steward no-op runs per role (default 30)
  --puppet-runs N   Puppet no-op runs (default 10)
  --gap-ms MS       pause between Steward no-op runs (default 1000: the
                    bed's recheck interval)

Build first: cargo build --release --workspace --bins. Needs root,
systemd-nspawn, etcd (scripts/deps.sh) and, the first time, the Debian
mirror (puppet and its dependencies go into the test cache). About 10
minutes with the defaults.";

/// Where this binary is copied in the machine (for `probe`).
const PROBE_IN_MACHINE: &str = "/usr/local/bin/bench-converge";
const STATE_IN_MACHINE: &str = "/var/lib/steward-agent";
const MANIFEST_IN_MACHINE: &str = "/root/steward-lb.pp";
/// The repository with puppet (the bed's own has no puppet).
const BENCH_REPO_IN_MACHINE: &str = "/srv/bench-repo";
/// The agent's `[converge] recheck_interval_s` here.
const RECHECK_S_HERE: u64 = 1;
const NODE: &str = "lb1";
const BACKEND: &str = "be1";
const LB_RESOURCES: [&str; 3] = [
    "packages:haproxy",
    "file:/etc/haproxy/haproxy.cfg",
    "unit:haproxy.service",
];
const SYSCTLS: [&str; 2] = ["net.ipv4.ip_nonlocal_bind", "net.ipv6.ip_nonlocal_bind"];
const LB_NOOP_TARGET_MS: f64 = 100.0;
const PUPPET_RATIO_TARGET: f64 = 20.0;

fn check_interrupted() {
    steward_tests::check_interrupt("the next step (signal): dropping the bed");
}

/// [`converge_bed::poll`], stopping early on a signal.
fn poll<T>(
    timeout: Duration,
    every: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    converge_bed::poll(timeout, every, what, || {
        check_interrupted();
        check()
    })
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Nearest-rank percentile (as bench-vip).
fn percentile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

fn fmt_ms(v: Option<f64>) -> String {
    match v {
        Some(v) if v < 100.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.0}"),
        None => "-".into(),
    }
}

fn arg(name: &str) -> Option<String> {
    std::env::args().skip_while(|a| a != name).nth(1)
}

/// `--NAME N` with `min <= N <= max`, else `default`; exits on a bad value.
fn number(name: &str, default: u64, min: u64, max: u64) -> u64 {
    let Some(s) = arg(name) else {
        return default;
    };
    match s.parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => n,
        _ => {
            eprintln!("bench-converge: {name} wants a number from {min} to {max}, got {s:?}");
            std::process::exit(2);
        }
    }
}

fn has_all(report: &Value, want: &[&str]) -> Result<(), String> {
    let have: Vec<&str> = report_resources(report)
        .iter()
        .filter_map(|r| r["id"].as_str())
        .collect();
    let missing: Vec<&&str> = want.iter().filter(|w| !have.contains(w)).collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("report lacks {missing:?} (has {have:?})"))
    }
}

fn desired_revision(bed: &ConvergeBed) -> u64 {
    bed.node_json(NODE)
        .ok()
        .and_then(|v| v["desired_revision"].as_u64())
        .unwrap_or(0)
}

/// Waits until the coordinator shows a report at the desired revision with
/// `want` and every resource ok (the first no-op run after converging: a
/// new outcome, so it is reported); its `duration_ms`.
fn agent_noop_ms(bed: &ConvergeBed, want: &[&str]) -> u64 {
    let report = poll(
        Duration::from_secs(20),
        Duration::from_millis(200),
        &format!("{NODE}: a reported run with every resource ok"),
        || {
            bed.converged_report(NODE, |r| {
                has_all(r, want)?;
                every_resource_ok(r)
            })
        },
    );
    report["duration_ms"].as_u64().unwrap_or(0)
}

struct Trial {
    /// Report `finished` − the moment before `role add`.
    exact_ms: f64,
    /// When the poll saw it.
    observed_ms: f64,
    /// The converging run's own `duration_ms`.
    run_ms: u64,
    /// The next (no-op) run's `duration_ms`, as the agent reported it.
    noop_reported_ms: u64,
}

/// Puts the machine back to before the first trial (see the module docs).
fn reset_lb(bed: &ConvergeBed, clock: &Clock) {
    let before = desired_revision(bed);
    bed.ctl_ok(&["role", "rm", NODE, "lb"]);
    poll(
        Duration::from_secs(60),
        Duration::from_millis(200),
        &format!("{NODE}: converged without the lb role"),
        || {
            if desired_revision(bed) <= before {
                return Err("desired revision not yet past the role removal".into());
            }
            bed.converged_report(NODE, |r| {
                if report_resources(r).is_empty() {
                    Ok(())
                } else {
                    Err(format!("still {} resources", report_resources(r).len()))
                }
            })
        },
    );
    let m = bed.lb(NODE);
    let sysctl_files: Vec<String> = SYSCTLS
        .iter()
        .map(|k| format!("/etc/sysctl.d/90-steward-{k}.conf"))
        .collect();
    m.sh(&format!(
        "apt-get purge -y -q --autoremove haproxy procps >/dev/null && \
         rm -f {HAPROXY_CFG} {} && \
         echo 0 > /proc/sys/net/ipv4/ip_nonlocal_bind && \
         echo 0 > /proc/sys/net/ipv6/ip_nonlocal_bind",
        sysctl_files.join(" ")
    ));
    let left = m.sh(
        "dpkg-query -W -f='${db:Status-Abbrev} ${Package}\\n' haproxy procps 2>/dev/null || true",
    );
    assert!(
        !left.lines().any(|l| l.starts_with("ii")),
        "{NODE}: haproxy or procps still installed after purge:\n{left}"
    );
    clock.say(format!(
        "{NODE}: lb role removed; haproxy and procps purged, haproxy.cfg and sysctls reset"
    ));
}

fn assignment_trial(bed: &ConvergeBed, clock: &Clock, i: u64, n: u64) -> Trial {
    let before = desired_revision(bed);
    let t0 = Instant::now();
    let t0_unix = unix_ms();
    bed.ctl_ok(&["role", "add", NODE, "lb"]);
    let report = poll(
        Duration::from_secs(300),
        Duration::from_millis(100),
        &format!("{NODE}: converged with the lb role"),
        || {
            if desired_revision(bed) <= before {
                return Err("desired revision not yet past the role add".into());
            }
            bed.converged_report(NODE, |r| has_all(r, &LB_RESOURCES))
        },
    );
    let observed_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let finished = report["finished"].as_u64().unwrap_or(0);
    let exact_ms = finished.saturating_sub(t0_unix) as f64;
    let run_ms = report["duration_ms"].as_u64().unwrap_or(0);
    let changed: Vec<String> = report_resources(&report)
        .iter()
        .filter(|r| r["status"] == "changed")
        .map(|r| {
            format!(
                "{} ({})",
                r["id"].as_str().unwrap_or(""),
                r["detail"].as_str().unwrap_or("")
            )
        })
        .collect();
    let noop_reported_ms = agent_noop_ms(bed, &LB_RESOURCES);
    clock.say(format!(
        "trial {i}/{n}: converged {exact_ms:.0} ms after role add (seen after {observed_ms:.0} ms); \
         that run took {run_ms} ms and changed {}; next run (no-op) {noop_reported_ms} ms",
        changed.join(", ")
    ));
    Trial {
        exact_ms,
        observed_ms,
        run_ms,
        noop_reported_ms,
    }
}

/// Whether unchanged runs reach the coordinator: the distinct reports
/// seen over `window` with everything ok.
fn distinct_reports(bed: &ConvergeBed, window: Duration) -> (usize, usize) {
    let start = Instant::now();
    let mut finished = std::collections::BTreeSet::new();
    let mut polls = 0;
    while start.elapsed() < window {
        check_interrupted();
        if let Ok(v) = bed.node_json(NODE) {
            if let Some(f) = v["converge"]["finished"].as_u64() {
                finished.insert(f);
            }
        }
        polls += 1;
        std::thread::sleep(Duration::from_millis(250));
    }
    (finished.len(), polls)
}

// ---- the in-machine probe: the agent's engine, in-process ----

#[derive(Default)]
struct ProbeResult {
    /// Engine::run wall time of the runs where every resource was ok.
    ms: Vec<f64>,
    resources: usize,
    /// Runs that were not all ok, with what was not.
    not_ok: Vec<String>,
}

/// Runs `bench-converge probe` in the machine for `roles`.
fn probe(m: &Machine, roles: &[&str], runs: u64, gap_ms: u64) -> ProbeResult {
    let roles = roles.join(",");
    let out = m.exec(&[
        PROBE_IN_MACHINE,
        "probe",
        "--state-dir",
        STATE_IN_MACHINE,
        "--roles",
        &roles,
        "--runs",
        &runs.to_string(),
        "--gap-ms",
        &gap_ms.to_string(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "probe ({roles}) in {} failed ({}):\n{stdout}{}",
        m.name(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("probe ({roles}) printed no JSON ({e}): {stdout}"));
    let mut r = ProbeResult {
        resources: v["resources"].as_u64().unwrap_or(0) as usize,
        ..ProbeResult::default()
    };
    for run in v["runs"].as_array().into_iter().flatten() {
        let ms = run["ms"].as_f64().unwrap_or(f64::NAN);
        match run["not_ok"].as_array() {
            Some(list) if !list.is_empty() => r.not_ok.push(format!("{ms:.1} ms: {list:?}")),
            _ => r.ms.push(ms),
        }
    }
    r
}

/// `bench-converge probe ...`, inside the machine: prints one JSON object.
fn probe_main() -> std::process::ExitCode {
    use steward_agent::converge::engine::Engine;
    use steward_agent::converge::system::System;
    use steward_agent::state::StateStore;
    use steward_proto::converge::ResourceStatus;
    use steward_proto::domain::Role;

    let state_dir = arg("--state-dir").unwrap_or_else(|| STATE_IN_MACHINE.into());
    let roles: Vec<Role> = match arg("--roles")
        .unwrap_or_default()
        .split(',')
        .map(str::parse::<Role>)
        .collect::<Result<_, _>>()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("probe: --roles: {e:?}");
            return std::process::ExitCode::from(2);
        }
    };
    let runs = number("--runs", 30, 1, 10_000);
    let gap = Duration::from_millis(number("--gap-ms", 1000, 0, 60_000));
    let recorded = match StateStore::new(&state_dir).load() {
        Ok(Some(r)) => r,
        Ok(None) => {
            eprintln!("probe: no desired.json in {state_dir}");
            return std::process::ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("probe: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let mut desired = recorded.desired;
    let missing: Vec<&Role> = roles
        .iter()
        .filter(|r| !desired.roles.contains(r))
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "probe: the recorded desired state lacks {missing:?} (has {:?})",
            desired.roles
        );
        return std::process::ExitCode::FAILURE;
    }
    desired.roles.retain(|r| roles.contains(r));
    let plan = steward_agent::roles::plan(&desired);
    let revision = desired.revision;
    let mut engine = Engine::default();
    // Warm-up: the agent's engine is long-lived; its first run is not a
    // steady-state recheck.
    engine.run(&System::detect(), &plan, revision);
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut out = Vec::new();
    for _ in 0..runs {
        if Instant::now() > deadline {
            break;
        }
        std::thread::sleep(gap);
        // As the agent's loop: detect the host, then the timed run.
        let host = System::detect();
        let started = Instant::now();
        let report = engine.run(&host, &plan, revision);
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        let not_ok: Vec<String> = report
            .resources
            .iter()
            .filter(|r| r.status != ResourceStatus::Ok)
            .map(|r| format!("{} {} {}", r.id, r.status, r.detail))
            .collect();
        out.push(json!({"ms": ms, "duration_ms": report.duration_ms, "not_ok": not_ok}));
    }
    println!(
        "{}",
        json!({"revision": revision, "resources": plan.len(), "runs": out})
    );
    std::process::ExitCode::SUCCESS
}

// ---- Puppet ----

/// A Puppet single-quoted string.
fn puppet_quote(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

const MANIFEST_HEAD: &str = "# steward-agent's roles for puppet apply (bench-converge).\n\
     Exec { path => ['/usr/sbin', '/usr/bin', '/sbin', '/bin'] }\n\n";

/// The lb role as Puppet resources (see the module docs).
fn lb_manifest(haproxy_cfg: &str) -> String {
    let mut pp = String::from("package { ['haproxy', 'procps']: ensure => installed }\n\n");
    for key in SYSCTLS {
        let file = format!("/etc/sysctl.d/90-steward-{key}.conf");
        let proc = format!("/proc/sys/{}", key.replace('.', "/"));
        pp.push_str(&format!(
            "file {{ {file_q}:\n  ensure  => file,\n  owner   => 'root',\n  group   => 'root',\n  \
             mode    => '0644',\n  content => {content},\n}}\n\
             exec {{ 'sysctl {key}':\n  command => 'sysctl -w {key}=1',\n  \
             unless  => 'grep -qx 1 {proc}',\n  require => [File[{file_q}], Package['procps']],\n}}\n\n",
            file_q = puppet_quote(&file),
            content = puppet_quote(&format!("{key} = 1\n")),
        ));
    }
    pp.push_str(&format!(
        "file {{ '{HAPROXY_CFG}':\n  ensure       => file,\n  owner        => 'root',\n  \
         group        => 'root',\n  mode         => '0644',\n  \
         validate_cmd => '/usr/sbin/haproxy -c -q -f %',\n  content      => {},\n  \
         require      => Package['haproxy'],\n}}\n\n\
         service {{ 'haproxy':\n  ensure    => running,\n  enable    => true,\n  \
         provider  => systemd,\n  restart   => '/bin/systemctl reload haproxy',\n  \
         subscribe => File['{HAPROXY_CFG}'],\n  \
         require   => [Package['procps'], Exec['sysctl net.ipv4.ip_nonlocal_bind'], \
         Exec['sysctl net.ipv6.ip_nonlocal_bind']],\n}}\n",
        puppet_quote(haproxy_cfg)
    ));
    pp
}

/// The gluster-brick role without volumes (what the bench's node plans):
/// the package and glusterd running and enabled.
fn gluster_manifest() -> String {
    "package { 'glusterfs-server': ensure => installed }\n\n\
     service { 'glusterd':\n  ensure   => running,\n  enable   => true,\n  \
     provider => systemd,\n  require  => Package['glusterfs-server'],\n}\n"
        .to_owned()
}

/// Converges `manifest` with one `puppet apply`, then times `runs` no-op
/// runs of it.
fn puppet_noop_runs(
    m: &Machine,
    clock: &Clock,
    label: &str,
    manifest: &str,
    runs: u64,
) -> Vec<PuppetRun> {
    std::fs::write(
        m.root().join(MANIFEST_IN_MACHINE.trim_start_matches('/')),
        format!("{MANIFEST_HEAD}{manifest}"),
    )
    .expect("write the manifest into the machine");
    let first = puppet_apply(m);
    clock.say(format!(
        "puppet {label}: first apply (to converge): exit {}, {:.0} ms{}",
        first.code,
        first.wall_ms,
        if std::env::var_os("BENCH_DEBUG").is_some() || !matches!(first.code, 0 | 2) {
            format!("\n{}", first.output)
        } else {
            String::new()
        }
    ));
    assert!(
        matches!(first.code, 0 | 2),
        "the first puppet apply ({label}) failed (exit {}):\n{}",
        first.code,
        first.output
    );
    let mut done = Vec::new();
    for i in 1..=runs {
        check_interrupted();
        let r = puppet_apply(m);
        clock.say(format!(
            "puppet {label}: no-op {i}/{runs}: exit {}, wall {:.0} ms, catalog applied in {} ms \
             (compiled in {} ms)",
            r.code,
            r.wall_ms,
            fmt_ms(r.catalog_ms),
            fmt_ms(r.compile_ms)
        ));
        assert_eq!(
            r.code, 0,
            "a no-op puppet apply ({label}) changed or failed something:\n{}",
            r.output
        );
        done.push(r);
    }
    done
}

struct PuppetRun {
    wall_ms: f64,
    catalog_ms: Option<f64>,
    compile_ms: Option<f64>,
    code: i32,
    output: String,
}

/// "... in 0.05 seconds" on the line containing `marker`, in ms.
fn seconds_after(output: &str, marker: &str) -> Option<f64> {
    let line = output.lines().find(|l| l.contains(marker))?;
    let rest = &line[line.rfind(" in ")? + 4..];
    let secs: f64 = rest.split_whitespace().next()?.parse().ok()?;
    Some(secs * 1000.0)
}

/// One `puppet apply`, timed inside the machine.
fn puppet_apply(m: &Machine) -> PuppetRun {
    let script = format!(
        "s=$(date +%s%N); puppet apply --detailed-exitcodes --color=false {MANIFEST_IN_MACHINE} 2>&1; \
         rc=$?; e=$(date +%s%N); echo \"BENCH $((e - s)) $rc\""
    );
    let out = m.exec(&["sh", "-c", &script]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let last = text
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("BENCH "))
        .unwrap_or_else(|| {
            panic!(
                "puppet apply: no timing line:\n{text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
        .to_owned();
    let mut f = last.split_whitespace();
    let ns: f64 = f.next().and_then(|s| s.parse().ok()).unwrap_or(f64::NAN);
    let code: i32 = f.next().and_then(|s| s.parse().ok()).unwrap_or(-1);
    PuppetRun {
        wall_ms: ns / 1e6,
        catalog_ms: seconds_after(&text, "Applied catalog in"),
        compile_ms: seconds_after(&text, "Compiled catalog for"),
        code,
        output: text,
    }
}

// ---- main ----

/// The machine as this bench wants it, through its root (the bed's
/// `start` is used as it is): this binary at [`PROBE_IN_MACHINE`], the
/// repository with puppet at [`BENCH_REPO_IN_MACHINE`] (made known to apt
/// only when Puppet's turn comes, so the agent installs from the bed's own
/// repository), and the agent's recheck at [`RECHECK_S_HERE`] (restarted).
fn prepare_machine(bed: &ConvergeBed, repo: &LocalRepo) {
    let m = bed.lb(NODE);
    let root = m.root();
    let inside = |p: &str| root.join(p.trim_start_matches('/'));
    let me = std::env::current_exe().expect("current_exe");
    std::fs::create_dir_all(inside("/usr/local/bin")).expect("mkdir /usr/local/bin");
    std::fs::copy(&me, inside(PROBE_IN_MACHINE))
        .unwrap_or_else(|e| panic!("copy {} into the machine: {e}", me.display()));
    let target = inside(BENCH_REPO_IN_MACHINE);
    std::fs::create_dir_all(&target).expect("mkdir the bench repository");
    for entry in std::fs::read_dir(repo.dir())
        .expect("read the repository")
        .flatten()
    {
        let name = entry.file_name();
        let n = name.to_string_lossy();
        if n.ends_with(".deb") || n == "Packages" {
            std::fs::copy(entry.path(), target.join(&name))
                .unwrap_or_else(|e| panic!("copy {n} into the machine: {e}"));
        }
    }
    let config = inside(AGENT_CONFIG_IN_MACHINE);
    let text = std::fs::read_to_string(&config).expect("read the agent's config");
    let mut table: toml::Table = text.parse().expect("the agent's config is TOML");
    let converge = table
        .entry("converge")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if let toml::Value::Table(t) = converge {
        t.insert(
            "recheck_interval_s".into(),
            toml::Value::Integer(RECHECK_S_HERE as i64),
        );
        // The first retry must not be longer than the recheck.
        t.insert(
            "retry_s".into(),
            toml::Value::Integer(RECHECK_S_HERE as i64),
        );
    }
    std::fs::write(&config, toml::to_string(&table).expect("toml")).expect("write agent config");
    m.sh(&format!(
        "{AGENT_IN_MACHINE} --config {AGENT_CONFIG_IN_MACHINE} --check >/dev/null && \
         systemctl restart {AGENT_UNIT}"
    ));
    bed.wait_known(NODE, Duration::from_secs(30));
}

#[derive(Default)]
struct RoleRow {
    label: String,
    steward: Option<ProbeResult>,
    /// Why not measured.
    not_measured: Option<String>,
    /// duration_ms of agent-reported no-op runs (one per outcome change).
    agent_reported: Vec<u64>,
    puppet: Option<Vec<PuppetRun>>,
}

fn main() -> std::process::ExitCode {
    let mut args = std::env::args().skip(1);
    if std::env::args().nth(1).as_deref() == Some("probe") {
        return probe_main();
    }
    let known = ["--trials", "--runs", "--puppet-runs", "--gap-ms"];
    while let Some(a) = args.next() {
        if a == "--help" || a == "-h" {
            println!("{USAGE}");
            return std::process::ExitCode::SUCCESS;
        }
        if !known.contains(&a.as_str()) || args.next().is_none() {
            eprintln!("bench-converge: unexpected argument {a:?}\n\n{USAGE}");
            return std::process::ExitCode::from(2);
        }
    }
    let trials = number("--trials", 5, 1, 100);
    let runs = number("--runs", 30, 1, 1000);
    let puppet_runs = number("--puppet-runs", 10, 1, 200);
    let gap_ms = number("--gap-ms", 1000, 0, 60_000);
    steward_tests::interrupt_on_signals("bench-converge");
    run(trials, runs, puppet_runs, gap_ms);
    std::process::ExitCode::SUCCESS
}

fn run(trials: u64, runs: u64, puppet_runs: u64, gap_ms: u64) {
    let clock = Clock(Instant::now());
    let build = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    clock.say(format!(
        "bench-converge ({build} build): {trials} assignment trials, {runs} Steward no-op runs \
         per role, {puppet_runs} Puppet no-op runs"
    ));

    // ---- the bed
    let mut packages: Vec<&str> = LocalRepo::DEFAULT_PACKAGES.to_vec();
    packages.push("puppet");
    clock.say(format!(
        "local apt repository for {packages:?} (the first run downloads puppet and its \
         dependencies into the test cache)"
    ));
    let repo = LocalRepo::ensure(&packages);
    clock.say("starting the bed: etcd, 3 coordinators, machine lb1 (systemd), backend be1");
    let mut bed = ConvergeBed::start("bench-converge", &[NODE], &[BACKEND]);
    check_interrupted();
    prepare_machine(&bed, &repo);
    bed.join_backend(BACKEND);
    bed.ctl_ok(&["role", "add", BACKEND, "k8s-worker"]);
    let address = bed.set_vip(&["--candidate", NODE]);
    clock.say(format!(
        "bed up: {NODE} connected without roles (recheck {RECHECK_S_HERE} s); {BACKEND} \
         k8s-worker; VIP {address}"
    ));

    // ---- 1. role assignment to converged
    let mut done: Vec<Trial> = Vec::new();
    for i in 1..=trials {
        check_interrupted();
        if i > 1 {
            reset_lb(&bed, &clock);
        }
        done.push(assignment_trial(&bed, &clock, i, trials));
    }
    let cfg = bed
        .read_file(bed.lb(NODE), HAPROXY_CFG)
        .expect("haproxy.cfg after converging");
    assert!(
        cfg.contains(&format!("server {BACKEND} ")) && cfg.contains("frontend "),
        "haproxy.cfg lacks the backend or a frontend:\n{cfg}"
    );

    // ---- do unchanged runs reach the coordinator?
    let window = Duration::from_secs(6);
    let (distinct, polls) = distinct_reports(&bed, window);
    clock.say(format!(
        "over {window:?} of 1 s rechecks with nothing to do, the coordinator showed {distinct} \
         distinct report(s) in {polls} polls: only outcome changes are reported, so no-op runs \
         are timed in-process"
    ));

    // ---- gluster-brick too
    bed.ctl_ok(&["role", "add", NODE, "gluster-brick"]);
    let gluster = ["packages:glusterfs-server", "unit:glusterd.service"];
    let report = poll(
        Duration::from_secs(300),
        Duration::from_millis(500),
        &format!("{NODE}: converged with lb and gluster-brick"),
        || {
            bed.converged_report(NODE, |r| {
                has_all(r, &LB_RESOURCES)?;
                has_all(r, &gluster)
            })
        },
    );
    clock.say(format!(
        "{NODE}: lb + gluster-brick converged ({} resources: {})",
        report_resources(&report).len(),
        report["counts"]
    ));
    let both: Vec<&str> = LB_RESOURCES.iter().chain(&gluster).copied().collect();
    let gluster_reported = agent_noop_ms(&bed, &both);

    // ---- 2. no-op converge per role, in-process, agent stopped
    let m = bed.lb(NODE);
    m.sh(&format!("systemctl stop {AGENT_UNIT}"));
    clock.say(format!(
        "{AGENT_UNIT} stopped: no-op runs of the agent's engine in-process, {gap_ms} ms apart"
    ));
    let mut rows: Vec<RoleRow> = Vec::new();
    for (label, roles) in [
        ("lb", vec!["lb"]),
        ("gluster-brick", vec!["gluster-brick"]),
        ("lb + gluster-brick", vec!["lb", "gluster-brick"]),
    ] {
        check_interrupted();
        let r = probe(m, &roles, runs, gap_ms);
        clock.say(format!(
            "steward {label}: {} resources, {} no-op runs: p50 {} ms, max {} ms{}",
            r.resources,
            r.ms.len(),
            fmt_ms(percentile(&r.ms, 50.0)),
            fmt_ms(percentile(&r.ms, 100.0)),
            if r.not_ok.is_empty() {
                String::new()
            } else {
                format!("; {} runs not all ok: {:?}", r.not_ok.len(), r.not_ok)
            }
        ));
        let agent_reported = match label {
            "lb" => done.iter().map(|t| t.noop_reported_ms).collect(),
            "lb + gluster-brick" => vec![gluster_reported],
            _ => Vec::new(),
        };
        rows.push(RoleRow {
            label: label.into(),
            steward: Some(r),
            agent_reported,
            ..RoleRow::default()
        });
    }
    let kubeadm = m.exec(&["apt-cache", "show", "kubeadm"]);
    let k8s_why = if kubeadm.status.success() {
        "not measured: kubeadm is in the repository but this bench has no Kubernetes step yet"
            .to_owned()
    } else {
        "not measured: no Kubernetes packages here (kubeadm/kubelet/kubectl are not in \
         Debian; the upstream repository is out of reach)"
            .to_owned()
    };
    for role in ["k8s-control-plane", "k8s-worker"] {
        rows.push(RoleRow {
            label: role.into(),
            not_measured: Some(k8s_why.clone()),
            ..RoleRow::default()
        });
    }

    // ---- 3. Puppet, on the same machine, agent still stopped
    check_interrupted();
    let t = Instant::now();
    m.sh(&format!(
        "echo 'deb [trusted=yes] file:{BENCH_REPO_IN_MACHINE} ./' \
           > /etc/apt/sources.list.d/bench-converge.list && \
         apt-get update -q >/dev/null && apt-get install -y -q puppet >/dev/null"
    ));
    let version = m.sh("puppet --version").trim().to_owned();
    clock.say(format!(
        "puppet {version} installed in {:.1} s",
        t.elapsed().as_secs_f64()
    ));
    for row in rows.iter_mut() {
        let manifest = match row.label.as_str() {
            "lb" => lb_manifest(&cfg),
            "gluster-brick" => gluster_manifest(),
            "lb + gluster-brick" => format!("{}\n{}", lb_manifest(&cfg), gluster_manifest()),
            _ => continue,
        };
        check_interrupted();
        row.puppet = Some(puppet_noop_runs(
            m,
            &clock,
            &row.label,
            &manifest,
            puppet_runs,
        ));
    }
    // Steward agrees the host is as the role wants after Puppet's runs.
    let after = probe(m, &["lb", "gluster-brick"], 1, 0);
    clock.say(format!(
        "after Puppet: the agent's engine finds lb + gluster-brick {}",
        if after.not_ok.is_empty() {
            "all ok".to_owned()
        } else {
            format!("changed: {:?}", after.not_ok)
        }
    ));
    m.sh(&format!("systemctl start {AGENT_UNIT}"));

    print_table(&rows, &done, runs, puppet_runs, gap_ms, build);
    drop(bed);
    clock.say("bed removed");
}

fn print_table(
    rows: &[RoleRow],
    trials: &[Trial],
    runs: u64,
    puppet_runs: u64,
    gap_ms: u64,
    build: &str,
) {
    println!();
    println!(
        "no-op converge (every resource ok), one nspawn machine (Debian bookworm, systemd), \
         {build} build\n  Steward: the agent's engine in-process, {runs} runs per role, \
         {gap_ms} ms apart, agent stopped; Puppet: {puppet_runs} no-op `puppet apply` runs of \
         an equivalent manifest per role"
    );
    println!(
        "  {:<19} {:>4} {:>26} | {:>23} | {:>19} | {:>17} |",
        "", "", "Steward", "Puppet wall", "Puppet catalog", "Puppet / Steward"
    );
    println!(
        "  {:<19} {:>4} {:>8} {:>8} {:>8} | {:>11} {:>11} | {:>9} {:>9} | {:>8} {:>8} | target",
        "role",
        "res",
        "p50 ms",
        "p99 ms",
        "max ms",
        "p50 ms",
        "p99 ms",
        "p50 ms",
        "p99 ms",
        "wall",
        "catalog"
    );
    for row in rows {
        if let Some(why) = &row.not_measured {
            println!("  {:<19} {why}", row.label);
            continue;
        }
        let Some(s) = &row.steward else { continue };
        let p50 = percentile(&s.ms, 50.0);
        let (wall, cat): (Vec<f64>, Vec<f64>) = match &row.puppet {
            Some(p) => (
                p.iter().map(|r| r.wall_ms).collect(),
                p.iter().filter_map(|r| r.catalog_ms).collect(),
            ),
            None => (Vec::new(), Vec::new()),
        };
        let ratio = |puppet: Option<f64>| match (puppet, p50) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
        let wall_x = ratio(percentile(&wall, 50.0));
        let cat_x = ratio(percentile(&cat, 50.0));
        let x = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}x"));
        let target = if row.label == "lb" {
            let ok = |b: bool| if b { "ok" } else { "MISSED" };
            format!(
                "p50 <= {LB_NOOP_TARGET_MS:.0} ms ({}), >= {PUPPET_RATIO_TARGET:.0}x faster than \
                 Puppet's no-op run ({})",
                ok(p50.is_some_and(|v| v <= LB_NOOP_TARGET_MS)),
                ok(wall_x.is_some_and(|v| v >= PUPPET_RATIO_TARGET))
            )
        } else {
            "-".into()
        };
        let pup = |v: Option<f64>| {
            if row.puppet.is_some() {
                fmt_ms(v)
            } else {
                "-".into()
            }
        };
        println!(
            "  {:<19} {:>4} {:>8} {:>8} {:>8} | {:>11} {:>11} | {:>9} {:>9} | {:>8} {:>8} | {target}",
            row.label,
            s.resources,
            fmt_ms(p50),
            fmt_ms(percentile(&s.ms, 99.0)),
            fmt_ms(percentile(&s.ms, 100.0)),
            pup(percentile(&wall, 50.0)),
            pup(percentile(&wall, 99.0)),
            pup(percentile(&cat, 50.0)),
            pup(percentile(&cat, 99.0)),
            x(wall_x),
            x(cat_x),
        );
        if !s.not_ok.is_empty() {
            println!(
                "  {:<19} ({} runs left out: not every resource ok)",
                "",
                s.not_ok.len()
            );
        }
    }
    println!(
        "  (res: resources planned; Puppet wall: the `puppet apply` command; Puppet catalog: its \
         \"Applied catalog in\" (10 ms steps); ratios: Puppet p50 / Steward p50)"
    );
    let compile: Vec<String> = rows
        .iter()
        .filter_map(|r| {
            let p = r.puppet.as_ref()?;
            let v: Vec<f64> = p.iter().filter_map(|x| x.compile_ms).collect();
            Some(format!("{} {} ms", r.label, fmt_ms(percentile(&v, 50.0))))
        })
        .collect();
    println!(
        "  Puppet's \"Compiled catalog\" p50 (the rest of its wall time is Ruby, Facter and \
         loading): {}",
        compile.join("; ")
    );
    let reported: Vec<String> = rows
        .iter()
        .filter(|r| !r.agent_reported.is_empty())
        .map(|r| format!("{} {:?} ms", r.label, r.agent_reported))
        .collect();
    println!(
        "  agent-reported no-op runs (duration_ms of the one run per outcome change that \
         reaches the coordinator): {}",
        reported.join("; ")
    );

    println!();
    println!(
        "role assignment to converged (lb: stewardctl role add -> report at the new revision, \
         every resource settled), {} trials, each a fresh install of haproxy + procps",
        trials.len()
    );
    let col = |f: &dyn Fn(&Trial) -> f64| -> Vec<f64> { trials.iter().map(f).collect() };
    let exact = col(&|t| t.exact_ms);
    let observed = col(&|t| t.observed_ms);
    let run = col(&|t| t.run_ms as f64);
    println!("  {:<44} {:>9} {:>9}", "", "p50 ms", "max ms");
    for (name, v) in [
        ("agent's report finished - role add", &exact),
        ("seen by stewardctl node show (100 ms poll)", &observed),
        ("the converging run itself (duration_ms)", &run),
    ] {
        println!(
            "  {:<44} {:>9} {:>9}",
            name,
            fmt_ms(percentile(v, 50.0)),
            fmt_ms(percentile(v, 100.0))
        );
    }
    let by_trial: Vec<String> = trials
        .iter()
        .map(|t| format!("{:.0}", t.exact_ms))
        .collect();
    println!(
        "  per trial (report finished - role add, ms): {}",
        by_trial.join(", ")
    );
    if !rows.iter().any(|r| r.label == "lb" && r.puppet.is_some()) {
        println!("  (no Puppet figures)");
    }
}
