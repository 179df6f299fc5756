//! Rollouts (issue 15, part 2) on hosts that boot real systemd
//! (`steward_tests::converge_bed`): two nspawn lb machines whose agents
//! install and configure real HAProxy and hold the VIP under the lease
//! protocol, three coordinator replicas on a real etcd, a netns backend and
//! a client sending a request through the VIP every 10 ms.
//!
//! In one bed (each boot and install is paid once):
//! 0. A plain apply sets the frontend the client uses (VIP:8080 to the
//!    backend be1).
//! 1. `apply --rollout` of a second HAProxy frontend: the follower goes first,
//!    then the VIP holder (the VIP moves away by planned handover before
//!    its change); the VIP never has two holders and the client sees at
//!    most the handover; each machine reloads HAProxy exactly once (the
//!    final write of the settings changes no node again); the new frontend
//!    serves.
//! 2. A second frontend, with HAProxy reloads broken on the follower (a
//!    local unit drop-in whose ExecReload fails, as a stale override
//!    would): the rollout stops at the follower, `rollout status` says
//!    why, nothing else proceeds, a plain apply is refused meanwhile, and
//!    `rollout abort` leaves no node drained; the VIP keeps serving.
//! 3. The leader is SIGKILLed while the VIP holder's change is in flight
//!    (its HAProxy reload made slow): the new leader resumes the same step;
//!    every node ends done with the change, none reloads twice.
//!
//! Needs root, systemd-nspawn, etcd, and `cargo build --workspace --bins`
//! first.

use std::time::{Duration, Instant};

use serde_json::Value;
use steward_tests::converge_bed::{poll, Clock, ConvergeBed, HAPROXY_CFG};
use steward_tests::netns::{AddressWatch, ClientRun};

const LBS: [&str; 2] = ["lb1", "lb2"];

/// What the bed starts from (a plain apply): the client's frontend, to be1
/// (a gluster-brick member: a role whose settings need nothing else; its
/// agent does not converge).
const BASE: &str = r#"
[[frontend]]
name = "web"
port = 8080
backend_role = "gluster-brick"
backend_port = 80
"#;

/// Rolled out: a second frontend.
const WITH_API: &str = r#"
[[frontend]]
name = "web"
port = 8080
backend_role = "gluster-brick"
backend_port = 80

[[frontend]]
name = "api"
port = 8081
backend_role = "gluster-brick"
backend_port = 80
"#;

/// Rolled out with HAProxy reloads broken on the follower.
const WITH_ADMIN: &str = r#"
[[frontend]]
name = "web"
port = 8080
backend_role = "gluster-brick"
backend_port = 80

[[frontend]]
name = "api"
port = 8081
backend_role = "gluster-brick"
backend_port = 80

[[frontend]]
name = "admin"
port = 8082
backend_role = "gluster-brick"
backend_port = 80
"#;

/// Rolled out while the leader is killed.
const WITH_METRICS: &str = r#"
[[frontend]]
name = "web"
port = 8080
backend_role = "gluster-brick"
backend_port = 80

[[frontend]]
name = "api"
port = 8081
backend_role = "gluster-brick"
backend_port = 80

[[frontend]]
name = "admin"
port = 8082
backend_role = "gluster-brick"
backend_port = 80

[[frontend]]
name = "metrics"
port = 8083
backend_role = "gluster-brick"
backend_port = 80
"#;

/// Lines systemd logged about haproxy.service starting with `prefix`.
fn systemd_count(bed: &ConvergeBed, m: &str, prefix: &str) -> usize {
    let out = bed.lb(m).exec(&[
        "journalctl",
        "--no-pager",
        "-o",
        "cat",
        "_PID=1",
        "UNIT=haproxy.service",
    ]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with(prefix))
        .count()
}

fn spec_file(bed: &ConvergeBed, text: &str, name: &str) -> String {
    let path = bed.cluster.dir.path().join(name);
    std::fs::write(&path, text).expect("write spec");
    path.display().to_string()
}

/// `stewardctl rollout status ID -o json`.
fn status(bed: &ConvergeBed, id: &str) -> Value {
    bed.ctl_ok(&["rollout", "status", id, "-o", "json"]).json()
}

fn node<'a>(rollout: &'a Value, name: &str) -> &'a Value {
    rollout["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["node"] == name)
        .unwrap_or_else(|| panic!("{name} not in the rollout: {rollout}"))
}

/// Polls the rollout until its phase is `phase`.
fn until_phase(bed: &ConvergeBed, id: &str, phase: &str, within: Duration) -> Value {
    poll(
        within,
        Duration::from_millis(250),
        &format!("rollout {id} {phase}"),
        || {
            let r = status(bed, id);
            if r["phase"] == phase {
                Ok(r)
            } else {
                Err(format!("{}: {}", r["phase"], r))
            }
        },
    )
}

/// The rollout id `apply --rollout` printed.
fn created_id(stdout: &str) -> String {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("rollout ")?.split_once(" created")?.0.into())
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no rollout created: {stdout}"))
}

#[test]
fn a_frontend_change_rolls_out_across_the_lb_pair_without_losing_the_vip() {
    let clock = Clock(Instant::now());
    let mut bed = ConvergeBed::start("rollout", &LBS, &["be1"]);
    bed.join_backend("be1");
    for lb in LBS {
        bed.ctl_ok(&["role", "add", lb, "lb"]);
    }
    bed.set_vip(&[]);
    bed.ctl_ok(&["role", "add", "be1", "gluster-brick"]);
    bed.apply_spec(BASE);
    let web = std::net::SocketAddrV4::new(bed.vip, 8080);
    for name in LBS {
        let m = bed.lb(name);
        poll(
            Duration::from_secs(240),
            Duration::from_secs(1),
            &format!("{name}: HAProxy installed, converged, serving the VIP"),
            || {
                bed.converged_report(name, |_| Ok(()))?;
                if bed.unit_state(m, "haproxy.service") != "active" {
                    return Err("haproxy not active".into());
                }
                if !bed.listens(m, web) {
                    return Err(format!("HAProxy does not listen on {web}"));
                }
                Ok(())
            },
        );
    }
    let holder = poll(
        Duration::from_secs(30),
        Duration::from_millis(250),
        "one VIP holder",
        || match bed.vip_holders().as_slice() {
            [one] => Ok(one.clone()),
            other => Err(format!("holders: {other:?}")),
        },
    );
    let follower = LBS
        .iter()
        .find(|n| **n != holder)
        .expect("two lbs")
        .to_string();
    clock.say(format!(
        "bed up: {holder} holds the VIP, {follower} follows"
    ));

    // ---- 1. the rollout, with a client through the VIP every 10 ms.
    let places: Vec<_> = LBS.iter().map(|n| bed.lb(n).watched_ns()).collect();
    let watch = AddressWatch::start_in(&places, bed.vip);
    let reloads_before: Vec<usize> = LBS
        .iter()
        .map(|n| systemd_count(&bed, n, "Reloaded"))
        .collect();
    let client = ClientRun::start(&bed.client, web, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let spec = spec_file(&bed, WITH_API, "api.toml");
    let out = bed.ctl_ok(&["apply", "-f", &spec, "--rollout"]);
    let id = created_id(&out.stdout);
    assert!(out.stdout.contains("api"), "{}", out.stdout);
    let done = until_phase(&bed, &id, "done", Duration::from_secs(18));
    let took = started.elapsed();
    let report = client.finish();
    let order: Vec<&str> = done["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| n["node"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        order,
        [follower.as_str(), holder.as_str()],
        "followers first: {done}"
    );
    let f = node(&done, &follower);
    let h = node(&done, &holder);
    assert!(
        f["ms"]["total"].as_u64().is_some() && h["ms"]["total"].as_u64().is_some(),
        "{done}"
    );
    for n in [f, h] {
        let ms = &n["ms"];
        clock.say(format!(
            "{}: drain {} ms, change {} ms, converge {} ms, health {} ms, undrain {} ms, total {} ms",
            n["node"], ms["drain"], ms["change"], ms["converge"], ms["health"], ms["undrain"], ms["total"]
        ));
    }
    println!(
        "rollout {id} over the lb pair: {:.1} s; client every 10 ms: {} requests, {} failed, \
         longest gap {:.0} ms",
        took.as_secs_f64(),
        report.requests,
        report.failed,
        report.longest_outage_ms
    );
    assert!(report.recovered(), "{report:?}");
    assert!(
        report.longest_outage_ms < 2_000.0,
        "only the planned handover may cost requests: {report:?}"
    );
    let dual = watch.dual_holder_time();
    assert_eq!(dual, Duration::ZERO, "two VIP holders for {dual:?}");
    // Both serve the new frontend; the settings carry it.
    for name in LBS {
        let cfg = bed.read_file(bed.lb(name), HAPROXY_CFG).unwrap_or_default();
        assert!(
            cfg.contains(":8080"),
            "{name}: no web frontend in haproxy.cfg:\n{cfg}"
        );
    }
    let web = std::net::SocketAddrV4::new(bed.vip, 8080);
    let served = steward_tests::netns::run_client(&bed.client, web, Duration::from_millis(500));
    assert_eq!(
        served.failed, 0,
        "the web frontend through the VIP: {served:?}"
    );
    // Each machine changed once: one reload each, none for the final write
    // of the settings (the revisions moved on; the rendered file did not).
    std::thread::sleep(Duration::from_secs(
        2 * steward_tests::converge_bed::RECHECK_S,
    ));
    for (i, name) in LBS.iter().enumerate() {
        let reloads = systemd_count(&bed, name, "Reloaded") - reloads_before[i];
        assert_eq!(reloads, 1, "{name} reloaded HAProxy {reloads} times");
    }
    let list = bed.ctl_ok(&["rollout", "list"]);
    assert!(
        list.stdout.contains(&id) && list.stdout.contains("done"),
        "{}",
        list.stdout
    );

    // ---- 2. a node whose converge fails stops the rollout. The VIP moved
    // in step 1: the roles of holder and follower may have changed.
    const FLAG: &str = "/run/steward-test-fail-reload";
    let holder = poll(
        Duration::from_secs(10),
        Duration::from_millis(250),
        "one VIP holder",
        || match bed.vip_holders().as_slice() {
            [one] => Ok(one.clone()),
            other => Err(format!("holders: {other:?}")),
        },
    );
    let follower = LBS
        .iter()
        .find(|n| **n != holder)
        .expect("two lbs")
        .to_string();
    let m = bed.lb(&follower);
    let dropin = m.root().join("etc/systemd/system/haproxy.service.d");
    std::fs::create_dir_all(&dropin).expect("mkdir drop-in dir");
    std::fs::write(
        dropin.join("stale-override.conf"),
        format!(
            "[Service]\nExecReload=\nExecReload=/bin/sh -c '! test -e {FLAG}'\n\
             ExecReload=/bin/kill -USR2 $MAINPID\n"
        ),
    )
    .expect("write drop-in");
    m.sh(&format!("touch {FLAG} && systemctl daemon-reload"));
    let spec = spec_file(&bed, WITH_ADMIN, "admin.toml");
    let out = bed.ctl_ok(&["apply", "-f", &spec, "--rollout"]);
    let id = created_id(&out.stdout);
    let failed = until_phase(&bed, &id, "failed", Duration::from_secs(60));
    let reason = failed["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&format!("node {follower} failed")),
        "{failed}"
    );
    assert!(
        reason.contains("haproxy"),
        "the reason names what failed: {failed}"
    );
    assert_eq!(node(&failed, &follower)["step"], "failed", "{failed}");
    assert_eq!(node(&failed, &holder)["step"], "pending", "{failed}");
    let table = bed.ctl_ok(&["rollout", "status", &id]).stdout;
    assert!(
        table.contains("failed") && table.contains("haproxy"),
        "{table}"
    );
    clock.say(format!("rollout {id} stopped: {reason}"));
    // Nothing else proceeds; a plain apply is refused meanwhile.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(node(&status(&bed, &id), &holder)["step"], "pending");
    let refused = bed.cluster.ctl(&["apply", "-f", &spec]);
    assert!(
        !refused.ok(),
        "a plain apply during a rollout must be refused"
    );
    assert!(
        refused
            .stderr
            .contains(&format!("rollout {id} is in progress")),
        "{}",
        refused.stderr
    );
    let cfg = bed
        .read_file(bed.lb(&holder), HAPROXY_CFG)
        .unwrap_or_default();
    assert!(
        !cfg.contains(":8082"),
        "{holder} changed although the rollout stopped"
    );

    bed.ctl_ok(&["rollout", "abort", &id]);
    let aborted = until_phase(&bed, &id, "aborted", Duration::from_secs(30));
    for name in LBS {
        let view = bed.node_json(name).expect("node show");
        assert!(view["maintenance"].is_null(), "{name} left drained: {view}");
    }
    let table = bed.ctl_ok(&["rollout", "status", &id]).stdout;
    assert!(table.contains("keep the new settings"), "{table}");
    assert!(
        aborted["reason"]
            .as_str()
            .is_some_and(|r| r.contains("1 of 2 nodes have the new settings")),
        "the failed node was changed: {aborted}"
    );
    clock.say(format!("aborted: {}", aborted["reason"]));
    let report = steward_tests::netns::run_client(&bed.client, web, Duration::from_secs(1));
    assert_eq!(
        report.failed, 0,
        "the VIP serves after the abort: {report:?}"
    );

    // ---- 3. SIGKILL of the leader while the VIP holder's change is in
    // flight (its HAProxy reloads slowly): the new leader resumes at the
    // same step; no node is changed twice or skipped.
    std::fs::remove_file(dropin.join("stale-override.conf")).expect("remove drop-in");
    m.sh(&format!("rm -f {FLAG} && systemctl daemon-reload"));
    let holder = poll(
        Duration::from_secs(10),
        Duration::from_millis(250),
        "one VIP holder",
        || match bed.vip_holders().as_slice() {
            [one] => Ok(one.clone()),
            other => Err(format!("holders: {other:?}")),
        },
    );
    let slow = bed
        .lb(&holder)
        .root()
        .join("etc/systemd/system/haproxy.service.d");
    std::fs::create_dir_all(&slow).expect("mkdir drop-in dir");
    std::fs::write(
        slow.join("slow-reload.conf"),
        "[Service]\nExecReload=\nExecReload=/bin/sleep 5\n\
         ExecReload=/bin/kill -USR2 $MAINPID\n",
    )
    .expect("write drop-in");
    bed.lb(&holder).sh("systemctl daemon-reload");
    // The follower converges again once its reloads work (its failed
    // change from step 2 is still what it has).
    poll(
        Duration::from_secs(30),
        Duration::from_millis(500),
        &format!("{follower}: converged again"),
        || bed.converged_report(&follower, |_| Ok(())),
    );
    let reloads_before: Vec<usize> = LBS
        .iter()
        .map(|n| systemd_count(&bed, n, "Reloaded"))
        .collect();
    let spec = spec_file(&bed, WITH_METRICS, "metrics.toml");
    let out = bed.ctl_ok(&["apply", "-f", &spec, "--rollout"]);
    let id = created_id(&out.stdout);
    let leader = bed.cluster.leader().expect("a leader");
    let step = poll(
        Duration::from_secs(30),
        Duration::from_millis(50),
        &format!("{holder} changed, converging"),
        || {
            let r = status(&bed, &id);
            match node(&r, &holder)["step"].as_str() {
                Some(s @ "changed") => Ok(s.to_owned()),
                other => Err(format!("{holder} at {other:?}")),
            }
        },
    );
    let index = bed.cluster.coordinator_index(&leader);
    bed.cluster.coordinators[index].proc.kill();
    clock.say(format!("SIGKILLed leader {leader} with {holder} {step}"));
    let done = until_phase(&bed, &id, "done", Duration::from_secs(60));
    let new_leader = bed.cluster.leader().expect("a new leader");
    assert_ne!(new_leader, leader, "a new leader finished it");
    for (i, name) in LBS.iter().enumerate() {
        assert_eq!(node(&done, name)["step"], "done", "{done}");
        let reloads = systemd_count(&bed, name, "Reloaded") - reloads_before[i];
        assert_eq!(reloads, 1, "{name} reloaded HAProxy {reloads} times");
        let cfg = bed.read_file(bed.lb(name), HAPROXY_CFG).unwrap_or_default();
        assert!(cfg.contains(":8083"), "{name} skipped:\n{cfg}");
    }
    let h = &node(&done, &holder)["ms"];
    clock.say(format!(
        "new leader {new_leader} resumed: {holder} converge {} ms (across the failover), \
         health {} ms, total {} ms",
        h["converge"], h["health"], h["total"]
    ));
    std::fs::remove_file(slow.join("slow-reload.conf")).expect("remove drop-in");
}
