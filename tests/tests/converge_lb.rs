//! The lb role end to end on hosts that boot real systemd
//! (`steward_tests::converge_bed`): two nspawn machines run
//! `steward-agent.service` as packaged, with converge on; the agent installs
//! HAProxy through a real `apt-get` from the local repository, renders
//! `haproxy.cfg` from the cluster and holds the VIP on `host0`. Backends are
//! netns hosts with `http-backend` and an agent; a client goes through the
//! VIP.
//!
//! Steps, in one bed (each boot and install is paid once):
//! 1. lb roles, the VIP, a k8s-worker backend: HAProxy installed, active,
//!    configured with the backend; every resource settled, the kernel-wide
//!    ones (if any) not applicable in a container, never failed.
//! 2. The client is answered through the VIP; exactly one machine holds it.
//! 3. A second backend joins: both LBs gain it with a reload (HAProxy's
//!    master process survives), not a restart; the client sees both.
//! 4. Drift on lb1 (the file edited, HAProxy stopped) is put right within
//!    the recheck interval.
//! 5. The agent on lb2 is SIGKILLed (its whole unit, dpkg included) in the
//!    middle of installing GlusterFS; systemd restarts it and it converges:
//!    dpkg finished, glusterd active, no lock left held.
//!
//! `a_failed_reload_is_retried`, in a bed of its own: a reload that fails
//! once (injected) is retried once it can succeed.
//!
//! Needs root, systemd-nspawn, etcd, and `cargo build --workspace --bins`
//! first. The first run builds the machines' base image and repository.
//!
//! The machines are the harness's minimal Debian, as shipped: whatever
//! HAProxy needs (procps for its reload) the lb role must install itself.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::Value;
use steward_tests::converge_bed::{
    every_resource_ok, poll, report_resources, Clock, ConvergeBed, AGENT_UNIT, BACKEND_PORT,
    HAPROXY_CFG, RECHECK_S,
};
use steward_tests::netns::run_client;
use steward_tests::nspawn::Machine;

const LBS: [&str; 2] = ["lb1", "lb2"];

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// Whether `cfg` has the line `server NAME IP:80` (the ingress backend).
fn has_server(cfg: &str, name: &str, ip: std::net::Ipv4Addr) -> bool {
    let want = format!("server {name} {ip}:{BACKEND_PORT}");
    cfg.lines().any(|l| l.trim() == want)
}

fn ids(report: &Value) -> Vec<String> {
    report_resources(report)
        .iter()
        .filter_map(|r| r["id"].as_str().map(str::to_owned))
        .collect()
}

/// Accepts a report that has every resource in `want`.
fn has_all<'a>(want: &'a [&'a str]) -> impl Fn(&Value) -> Result<(), String> + 'a {
    move |report| {
        let have = ids(report);
        let missing: Vec<&&str> = want
            .iter()
            .filter(|w| !have.iter().any(|h| h == **w))
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("report lacks {missing:?} (has {have:?})"))
        }
    }
}

/// Sysctls outside `net.*`, kernel modules and swap belong to the whole
/// kernel: a container cannot set them.
fn kernel_wide(id: &str) -> bool {
    id.starts_with("kernel-module:")
        || id.starts_with("swap:")
        || id
            .strip_prefix("sysctl:")
            .is_some_and(|key| !key.starts_with("net."))
}

/// Kernel-wide resources must be not-applicable (with the container as the
/// reason), never failed; namespaced `net.*` sysctls must really be set in
/// the machine. Returns a one-line summary.
fn check_kernel_items(m: &Machine, report: &Value) -> String {
    let mut seen = Vec::new();
    for r in report_resources(report) {
        let id = r["id"].as_str().unwrap_or_default();
        let status = r["status"].as_str().unwrap_or_default();
        assert_ne!(
            status,
            "failed",
            "{}: {id} failed: {}",
            m.name(),
            r["detail"]
        );
        if kernel_wide(id) {
            assert_eq!(
                status,
                "not-applicable",
                "{}: kernel-wide {id} should be not-applicable in a container: {r}",
                m.name()
            );
            let detail = r["detail"].as_str().unwrap_or_default();
            assert!(
                detail.contains("container"),
                "{}: {id} is not-applicable without saying why: {detail:?}",
                m.name()
            );
            seen.push(format!("{id}: not-applicable ({detail})"));
        } else if let Some(key) = id.strip_prefix("sysctl:") {
            assert!(
                matches!(status, "ok" | "changed"),
                "{}: {key} is the machine's own (network namespace) and should be set: {r}",
                m.name()
            );
            let value = m.sh(&format!("cat /proc/sys/{}", key.replace('.', "/")));
            if key.ends_with("ip_nonlocal_bind") {
                assert_eq!(value.trim(), "1", "{}: {key} in the machine", m.name());
            }
            seen.push(format!("{id}: {status}, /proc/sys says {}", value.trim()));
        }
    }
    if seen.is_empty() {
        "no kernel settings planned".into()
    } else {
        seen.join("; ")
    }
}

/// Whether dpkg's database (the status file and the journal entries in
/// `updates/` not yet merged into it) records a package dpkg is part way
/// through: half-installed, unpacked, half-configured. From that point a
/// kill leaves `dpkg --audit` something to say.
fn incomplete_in_dpkg_db(status: &str, updates_dir: &std::path::Path) -> bool {
    let journal: String = std::fs::read_dir(updates_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            // Numbered entries only; `tmp.i` is dpkg's scratch file.
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .collect();
    [status, journal.as_str()].iter().any(|text| {
        text.lines().any(|l| {
            l.starts_with("Status: ")
                && ["half-installed", "unpacked", "half-configured"]
                    .iter()
                    .any(|s| l.ends_with(s))
        })
    })
}

/// Lines systemd itself logged about `unit` (start, reload, stop).
fn systemd_lines(m: &Machine, unit: &str) -> Vec<String> {
    let out = m.exec(&[
        "journalctl",
        "--no-pager",
        "-o",
        "cat",
        "_PID=1",
        &format!("UNIT={unit}"),
    ]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

fn count_prefix(lines: &[String], prefix: &str) -> usize {
    lines.iter().filter(|l| l.starts_with(prefix)).count()
}

/// Waits until an lb node reports a run with every resource `ok` (nothing
/// to do) and returns its duration: the no-op converge time.
fn noop_run_ms(bed: &ConvergeBed, node: &str) -> u64 {
    let report = poll(
        Duration::from_secs(4 * RECHECK_S + 10),
        Duration::from_millis(500),
        &format!("{node}: a run with every resource ok"),
        || bed.converged_report(node, every_resource_ok),
    );
    report["duration_ms"].as_u64().expect("duration_ms")
}

#[test]
fn lb_role_converges_hosts_booting_systemd() {
    let clock = Clock(Instant::now());
    let mut bed = ConvergeBed::start("converge-lb", &LBS, &["be1", "be2"]);
    clock.say("bed up: machines booted, agents connected without roles");
    let be1_ip = bed.backend("be1").host.ip();
    let be2_ip = bed.backend("be2").host.ip();

    // ---- 1. roles, VIP, first backend → HAProxy installed and configured
    bed.join_backend("be1");
    bed.ctl_ok(&["role", "add", "lb1", "lb"]);
    bed.ctl_ok(&["role", "add", "lb2", "lb"]);
    let address = bed.set_vip(&[]);
    bed.ctl_ok(&["role", "add", "be1", "k8s-worker"]);
    let t1 = Instant::now();
    clock.say(format!(
        "step 1: lb1, lb2 lb; VIP {address}; be1 ({be1_ip}) k8s-worker"
    ));
    let lb_resources = [
        "packages:haproxy",
        "file:/etc/haproxy/haproxy.cfg",
        "unit:haproxy.service",
    ];
    for name in LBS {
        let m = bed.lb(name);
        let report = poll(
            Duration::from_secs(240),
            Duration::from_secs(1),
            &format!("{name}: HAProxy installed, active, configured with be1; converged"),
            || {
                let installed =
                    m.sh("dpkg-query -W -f='${db:Status-Abbrev}' haproxy 2>/dev/null || true");
                if installed.trim() != "ii" {
                    return Err(format!("haproxy not installed ({:?})", installed.trim()));
                }
                let cfg = bed.read_file(m, HAPROXY_CFG).unwrap_or_default();
                if !has_server(&cfg, "be1", be1_ip) {
                    return Err("haproxy.cfg has no `server be1`".into());
                }
                let state = bed.unit_state(m, "haproxy.service");
                if state != "active" {
                    return Err(format!("haproxy is {state}"));
                }
                bed.converged_report(name, has_all(&lb_resources))
            },
        );
        clock.say(format!(
            "{name}: converged after {} ({} resources: {})",
            secs(t1.elapsed()),
            report_resources(&report).len(),
            report["counts"]
        ));
        // The report and the file say done; HAProxy must also run what the
        // file says: only the rendered config binds the VIP's frontends.
        let vip80 = bed.target();
        poll(
            Duration::from_secs(15),
            Duration::from_millis(200),
            &format!("{name}: HAProxy listening on {vip80}"),
            || {
                if bed.listens(m, vip80) {
                    Ok(())
                } else {
                    Err(format!(
                        "nothing listens on {vip80}: HAProxy does not run the rendered \
                         haproxy.cfg although the report says converged;\n\
                         report: {}\nsystemd on haproxy.service:\n{}",
                        bed.node_table(name),
                        systemd_lines(m, "haproxy.service").join("\n")
                    ))
                }
            },
        );
        // Installed by the agent, through apt-get, from the local repository.
        let history = bed
            .read_file(m, "/var/log/apt/history.log")
            .unwrap_or_default();
        assert!(
            history
                .lines()
                .any(|l| l.starts_with("Commandline: apt-get install") && l.contains("haproxy")),
            "{name}: no `apt-get install ... haproxy` in /var/log/apt/history.log:\n{history}"
        );
        let policy = m.sh("apt-cache policy haproxy");
        assert!(
            policy.contains("/srv/repo"),
            "{name}: haproxy not from the local repository:\n{policy}"
        );
        eprintln!("{name}: kernel items: {}", check_kernel_items(m, &report));
        eprintln!(
            "---- stewardctl node show {name} ----\n{}",
            bed.node_table(name)
        );
    }
    for name in LBS {
        let ms = noop_run_ms(&bed, name);
        clock.say(format!(
            "{name}: no-op converge run (lb role, everything ok): {ms} ms"
        ));
    }

    // ---- 2. the client through the VIP; one holder
    let holders = poll(
        Duration::from_secs(30),
        Duration::from_millis(200),
        "exactly one LB machine to hold the VIP",
        || {
            let h = bed.vip_holders();
            if h.len() == 1 {
                Ok(h)
            } else {
                Err(format!("holders: {h:?}"))
            }
        },
    );
    clock.say(format!(
        "step 2: VIP held by {holders:?} (ip -o addr in both)"
    ));
    poll(
        Duration::from_secs(20),
        Duration::from_millis(200),
        "the client to be answered through the VIP",
        || {
            let r = run_client(&bed.client, bed.target(), Duration::from_millis(300));
            if r.requests > 0 && r.failed == 0 {
                Ok(())
            } else {
                Err(format!("{} of {} failed", r.failed, r.requests))
            }
        },
    );
    let r = run_client(&bed.client, bed.target(), Duration::from_secs(1));
    clock.say(format!(
        "client through {}: {} requests, {} failed, answers {:?}",
        bed.target(),
        r.requests,
        r.failed,
        r.backends
    ));
    assert_eq!(r.failed, 0, "requests through the VIP failed: {r:?}");
    assert_eq!(
        r.backends.keys().cloned().collect::<Vec<_>>(),
        ["be1"],
        "only be1 is a backend yet: {r:?}"
    );
    assert_eq!(
        bed.vip_holders().len(),
        1,
        "exactly one machine holds the VIP"
    );

    // ---- 3. a backend joins: reload, not restart
    let before: Vec<(String, Vec<String>)> = LBS
        .iter()
        .map(|name| {
            let m = bed.lb(name);
            (
                bed.unit_property(m, "haproxy.service", "ExecMainPID"),
                systemd_lines(m, "haproxy.service"),
            )
        })
        .collect();
    bed.join_backend("be2");
    bed.ctl_ok(&["role", "add", "be2", "k8s-worker"]);
    let t3 = Instant::now();
    clock.say(format!("step 3: be2 ({be2_ip}) joined as k8s-worker"));
    for (i, name) in LBS.iter().enumerate() {
        let m = bed.lb(name);
        poll(
            Duration::from_secs(60),
            Duration::from_millis(500),
            &format!("{name}: haproxy.cfg with be1 and be2, converged"),
            || {
                let cfg = bed.read_file(m, HAPROXY_CFG).unwrap_or_default();
                if !(has_server(&cfg, "be1", be1_ip) && has_server(&cfg, "be2", be2_ip)) {
                    return Err("haproxy.cfg lacks be1 or be2".into());
                }
                bed.converged_report(name, has_all(&lb_resources))
            },
        );
        let (pid_before, lines_before) = &before[i];
        let pid_after = bed.unit_property(m, "haproxy.service", "ExecMainPID");
        let lines_after = systemd_lines(m, "haproxy.service");
        let reloads = count_prefix(&lines_after, "Reloaded")
            .saturating_sub(count_prefix(lines_before, "Reloaded"));
        let starts = count_prefix(&lines_after, "Started")
            .saturating_sub(count_prefix(lines_before, "Started"));
        clock.say(format!(
            "{name}: be2 in haproxy.cfg after {}; HAProxy master pid {pid_before} -> {pid_after}, \
             {reloads} reload(s), {starts} start(s) since",
            secs(t3.elapsed())
        ));
        assert_eq!(
            &pid_after,
            pid_before,
            "{name}: HAProxy's master process changed: restarted, not reloaded\n{}",
            lines_after.join("\n")
        );
        assert!(
            reloads >= 1,
            "{name}: the journal shows no reload of haproxy.service:\n{}",
            lines_after.join("\n")
        );
        assert_eq!(
            starts,
            0,
            "{name}: haproxy.service was started again:\n{}",
            lines_after.join("\n")
        );
        assert_eq!(bed.unit_state(m, "haproxy.service"), "active");
    }
    poll(
        Duration::from_secs(30),
        Duration::from_millis(200),
        "the client to get answers from be1 and be2",
        || {
            let r = run_client(&bed.client, bed.target(), Duration::from_millis(500));
            if r.backends.contains_key("be1") && r.backends.contains_key("be2") {
                Ok(())
            } else {
                Err(format!("{r:?}"))
            }
        },
    );
    let r = run_client(&bed.client, bed.target(), Duration::from_secs(1));
    clock.say(format!(
        "client: {} requests, {} failed, answers {:?}",
        r.requests, r.failed, r.backends
    ));
    assert_eq!(r.failed, 0, "requests through the VIP failed: {r:?}");
    assert_eq!(
        r.backends.keys().cloned().collect::<BTreeSet<_>>(),
        BTreeSet::from(["be1".to_owned(), "be2".to_owned()])
    );

    // ---- 4. drift on lb1
    {
        let m = bed.lb("lb1");
        let rendered = bed.read_file(m, HAPROXY_CFG).expect("haproxy.cfg");
        m.sh(&format!(
            "printf '# drift: edited by hand\\n' >> {HAPROXY_CFG} && systemctl stop haproxy"
        ));
        assert_ne!(bed.read_file(m, HAPROXY_CFG).as_ref(), Some(&rendered));
        assert_eq!(bed.unit_state(m, "haproxy.service"), "inactive");
        let t4 = Instant::now();
        clock.say("step 4: lb1: haproxy.cfg edited, haproxy stopped");
        let bound = Duration::from_secs(2 * RECHECK_S + 5);
        poll(
            bound,
            Duration::from_millis(100),
            "lb1: haproxy.cfg rendered again and haproxy active",
            || {
                let same = bed.read_file(m, HAPROXY_CFG).as_ref() == Some(&rendered);
                let state = bed.unit_state(m, "haproxy.service");
                if same && state == "active" {
                    Ok(())
                } else {
                    Err(format!("file restored: {same}, haproxy {state}"))
                }
            },
        );
        clock.say(format!(
            "lb1: drift put right after {} (recheck interval {RECHECK_S} s, bound {})",
            secs(t4.elapsed()),
            secs(bound)
        ));
        poll(
            Duration::from_secs(20),
            Duration::from_millis(200),
            "the VIP to serve again",
            || {
                let r = run_client(&bed.client, bed.target(), Duration::from_millis(300));
                if r.requests > 0 && r.failed == 0 {
                    Ok(())
                } else {
                    Err(format!("{r:?}"))
                }
            },
        );
        clock.say(format!("VIP serves; held by {:?}", bed.vip_holders()));
    }

    // ---- 5. the agent on lb2 killed in the middle of an install
    {
        let m = bed.lb("lb2");
        let restart = bed.unit_property(m, AGENT_UNIT, "Restart");
        let restart_sec = bed.unit_property(m, AGENT_UNIT, "RestartUSec");
        let agent_pid = bed.unit_property(m, AGENT_UNIT, "MainPID");
        let restarts = bed.unit_property(m, AGENT_UNIT, "NRestarts");
        clock.say(format!(
            "step 5: {AGENT_UNIT} on lb2: Restart={restart} RestartSec={restart_sec}, \
             main pid {agent_pid}, {restarts} restarts so far"
        ));
        bed.ctl_ok(&["role", "add", "lb2", "gluster-brick"]);
        let t5 = Instant::now();
        let status_file = m.root().join("var/lib/dpkg/status");
        let updates_dir = m.root().join("var/lib/dpkg/updates");
        // dpkg run by apt-get (`--status-fd`), with the database mid-way:
        // a package unpacked but not configured, or a pending journal entry.
        let caught = poll(
            Duration::from_secs(120),
            Duration::from_millis(10),
            "lb2: apt-get's dpkg in the middle of installing glusterfs-server",
            || {
                let procs = bed.processes_in(m, &["dpkg", "apt-get"]);
                let status = std::fs::read_to_string(&status_file).unwrap_or_default();
                if status.contains("Package: glusterfs-server\nStatus: install ok installed") {
                    panic!(
                        "lb2: glusterfs-server got installed before the test caught dpkg at \
                         work; processes seen last: {procs:?}"
                    );
                }
                let dpkg: Vec<&(u32, String)> = procs
                    .iter()
                    .filter(|(_, c)| c.contains("dpkg") && c.contains("--status-fd"))
                    .collect();
                let midway = incomplete_in_dpkg_db(&status, &updates_dir);
                if !dpkg.is_empty() && midway {
                    Ok(procs.clone())
                } else {
                    Err(format!("processes: {procs:?}, dpkg midway: {midway}"))
                }
            },
        );
        m.sh(&format!("systemctl kill -s KILL {AGENT_UNIT}"));
        let t_kill = Instant::now();
        clock.say(format!(
            "lb2: SIGKILL to the whole {AGENT_UNIT} after {} of install; it was running: {:?}",
            secs(t_kill.duration_since(t5)),
            caught
        ));
        let audit = m.exec(&["dpkg", "--audit"]);
        let audit = String::from_utf8_lossy(&audit.stdout).into_owned();
        let pids: Vec<u32> = caught.iter().map(|(p, _)| *p).collect();
        let gone = poll(
            Duration::from_secs(5),
            Duration::from_millis(10),
            "the killed apt-get and dpkg to be gone",
            || {
                let alive: Vec<u32> = bed
                    .processes_in(m, &["dpkg", "apt-get"])
                    .into_iter()
                    .map(|(p, _)| p)
                    .filter(|p| pids.contains(p))
                    .collect();
                if alive.is_empty() {
                    Ok(t_kill.elapsed())
                } else {
                    Err(format!("still running: {alive:?}"))
                }
            },
        );
        clock.say(format!(
            "lb2: killed processes gone after {} ms; dpkg --audit right after the kill:\n{}",
            gone.as_millis(),
            audit.trim()
        ));
        assert!(
            !audit.trim().is_empty(),
            "the kill was meant to leave dpkg interrupted, but dpkg --audit is empty"
        );
        let restarted = poll(
            Duration::from_secs(15),
            Duration::from_millis(100),
            "systemd to restart steward-agent",
            || {
                let pid = bed.unit_property(m, AGENT_UNIT, "MainPID");
                let n = bed.unit_property(m, AGENT_UNIT, "NRestarts");
                let state = bed.unit_state(m, AGENT_UNIT);
                if state == "active" && pid != "0" && pid != agent_pid && n != restarts {
                    Ok(format!("main pid {pid}, NRestarts {n}"))
                } else {
                    Err(format!("{state}, main pid {pid}, NRestarts {n}"))
                }
            },
        );
        clock.say(format!(
            "lb2: systemd restarted the agent after {} ({restarted})",
            secs(t_kill.elapsed())
        ));
        let gluster_resources = [
            "packages:haproxy",
            "unit:haproxy.service",
            "packages:glusterfs-server",
            "unit:glusterd.service",
        ];
        let report = poll(
            Duration::from_secs(240),
            Duration::from_secs(1),
            "lb2 to converge with gluster-brick after the crash",
            || bed.converged_report("lb2", has_all(&gluster_resources)),
        );
        let recovery = t_kill.elapsed();
        clock.say(format!(
            "lb2: converged {} after the kill ({} after role add): {}",
            secs(recovery),
            secs(t5.elapsed()),
            report["counts"]
        ));
        eprintln!(
            "---- stewardctl node show lb2 ----\n{}",
            bed.node_table("lb2")
        );
        eprintln!("lb2: kernel items: {}", check_kernel_items(m, &report));
        let journal = m.journal(AGENT_UNIT);
        let recovery_log: Vec<&str> = journal
            .lines()
            .filter(|l| {
                l.contains("steward_agent::converge")
                    || l.contains("agent starting")
                    || l.contains("systemd[1]")
            })
            .collect();
        eprintln!(
            "---- lb2: {AGENT_UNIT}: the agent's converge lines and systemd's ----\n{}",
            recovery_log.join("\n")
        );
        let audit = m.exec(&["dpkg", "--audit"]);
        assert!(
            audit.status.success() && audit.stdout.is_empty(),
            "lb2: dpkg --audit after recovery:\n{}{}",
            String::from_utf8_lossy(&audit.stdout),
            String::from_utf8_lossy(&audit.stderr)
        );
        assert_eq!(
            bed.unit_state(m, "glusterd.service"),
            "active",
            "glusterd:\n{}",
            m.journal("glusterd.service")
        );
        for lock in [
            "/var/lib/dpkg/lock-frontend",
            "/var/lib/dpkg/lock",
            "/var/cache/apt/archives/lock",
        ] {
            if let Some(users) = bed.fuser(m, lock) {
                assert!(
                    users.is_empty(),
                    "lb2: {lock} is still held by pid(s) {users}"
                );
            }
        }
        assert_eq!(bed.unit_state(m, "haproxy.service"), "active");
        clock.say("lb2: dpkg --audit empty, glusterd active, no process holds a dpkg/apt lock");
        let ms = noop_run_ms(&bed, "lb2");
        clock.say(format!(
            "lb2: no-op converge run (lb + gluster-brick, everything ok): {ms} ms"
        ));
    }

    // The front door still works: one holder, answered.
    let holders = bed.vip_holders();
    assert_eq!(holders.len(), 1, "VIP holders at the end: {holders:?}");
    let r = run_client(&bed.client, bed.target(), Duration::from_millis(500));
    assert!(r.requests > 0 && r.failed == 0, "at the end: {r:?}");
    clock.say(format!(
        "done: VIP on {holders:?}, client answered by {:?}",
        r.backends
    ));
}

/// A reload that fails once must be tried again: the file is already
/// rendered, so nothing but the agent's memory of the failed notification
/// can bring HAProxy onto it. The failure is injected with a drop-in that
/// gates `ExecReload=` on a flag file; the reload itself is the packaged
/// one.
#[test]
fn a_failed_reload_is_retried() {
    const FLAG: &str = "/run/steward-test-fail-reload";
    let clock = Clock(Instant::now());
    let mut bed = ConvergeBed::start("converge-lb-retry", &["lb1"], &["be1"]);
    bed.ctl_ok(&["role", "add", "lb1", "lb"]);
    bed.set_vip(&[]);
    let m = bed.lb("lb1");
    poll(
        Duration::from_secs(240),
        Duration::from_secs(1),
        "lb1: converged",
        || bed.converged_report("lb1", has_all(&["unit:haproxy.service"])),
    );
    poll(
        Duration::from_secs(15),
        Duration::from_millis(200),
        "lb1: HAProxy listening on the VIP",
        || {
            if bed.listens(m, bed.target()) {
                Ok(())
            } else {
                Err(format!(
                    "HAProxy does not listen on {}; systemd on haproxy.service:\n{}",
                    bed.target(),
                    systemd_lines(m, "haproxy.service").join("\n")
                ))
            }
        },
    );
    clock.say("lb1 converged, HAProxy serves the rendered config");

    let dropin = m.root().join("etc/systemd/system/haproxy.service.d");
    std::fs::create_dir_all(&dropin).expect("mkdir drop-in dir");
    std::fs::write(
        dropin.join("steward-test-fail-reload.conf"),
        format!(
            "[Service]\nExecReload=\nExecReload=/bin/sh -c '! test -e {FLAG}'\n\
             ExecReload=/usr/sbin/haproxy -Ws -f $CONFIG -c -q $EXTRAOPTS\n\
             ExecReload=/bin/kill -USR2 $MAINPID\n"
        ),
    )
    .expect("write drop-in");
    m.sh(&format!("touch {FLAG} && systemctl daemon-reload"));
    let lines = systemd_lines(m, "haproxy.service");
    let (failed_before, reloaded_before) = (
        count_prefix(&lines, "Reload failed"),
        count_prefix(&lines, "Reloaded"),
    );

    // A config change whose reload fails.
    bed.join_backend("be1");
    bed.ctl_ok(&["role", "add", "be1", "k8s-worker"]);
    let be1_ip = bed.backend("be1").host.ip();
    let m = bed.lb("lb1");
    poll(
        Duration::from_secs(30),
        Duration::from_millis(200),
        "lb1: haproxy.cfg with be1 and a failed reload",
        || {
            let cfg = bed.read_file(m, HAPROXY_CFG).unwrap_or_default();
            let failed = count_prefix(&systemd_lines(m, "haproxy.service"), "Reload failed");
            if has_server(&cfg, "be1", be1_ip) && failed > failed_before {
                Ok(())
            } else {
                Err(format!(
                    "be1 in haproxy.cfg: {}, failed reloads: {failed}",
                    has_server(&cfg, "be1", be1_ip)
                ))
            }
        },
    );
    clock.say("lb1: be1 rendered into haproxy.cfg, its reload failed (injected)");

    // The cause goes away: the next runs must reload.
    m.sh(&format!("rm {FLAG}"));
    let t = Instant::now();
    let bound = Duration::from_secs(4 * RECHECK_S + 5);
    poll(
        bound,
        Duration::from_millis(200),
        "lb1: the failed reload to be retried once it can succeed",
        || {
            let lines = systemd_lines(m, "haproxy.service");
            let reloaded = count_prefix(&lines, "Reloaded");
            if reloaded > reloaded_before {
                Ok(())
            } else {
                Err(format!(
                    "no successful reload since the failed one; HAProxy runs the old \
                     config while haproxy.cfg has be1.\nreport:\n{}\nsystemd on \
                     haproxy.service:\n{}",
                    bed.node_table("lb1"),
                    lines.join("\n")
                ))
            }
        },
    );
    clock.say(format!(
        "lb1: reload retried {} after the cause went away",
        secs(t.elapsed())
    ));
    poll(
        Duration::from_secs(4 * RECHECK_S + 5),
        Duration::from_millis(500),
        "lb1: converged after the retried reload",
        || bed.converged_report("lb1", |_| Ok(())),
    );
}
