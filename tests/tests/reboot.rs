//! Reboots through the gates (issue 15, item 4) on hosts that boot real
//! systemd: three nspawn machines with the agent as packaged, three
//! coordinator replicas on a real etcd. The harness boots a machine again
//! when its systemd reboots (nspawn exits with 133), on the same name,
//! root and network, as `systemd-nspawn@.service` would.
//!
//! 1. `/run/reboot-required` (and `.pkgs`) appear on every host:
//!    `stewardctl nodes` shows them needing a reboot (the REBOOT column,
//!    `--reboot-required`, JSON), `node show` says since when and why.
//! 2. `stewardctl rollout reboot --all --only-required --wait`: from the
//!    rollout's records (boot ids, step times) and the harness's own
//!    observations: the nodes rebooted one at a time, each back (agent
//!    reconnected with a new boot id, reboot-required cleared, healthy,
//!    undrained) before the next one began, every one exactly once, and
//!    none again afterwards (the same request is still in its desired
//!    state: its agent acted on it once).
//!
//! Needs root, systemd-nspawn, etcd, and `cargo build --workspace --bins`
//! first.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use steward_tests::converge_bed::{poll, Clock, ConvergeBed};
use steward_tests::nspawn::MachineOptions;

const NODES: [&str; 3] = ["rb1", "rb2", "rb3"];

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The boot id the machine's kernel interface shows inside it.
fn machine_boot_id(bed: &ConvergeBed, name: &str) -> String {
    bed.exec_text(
        bed.machine(name),
        &["cat", "/proc/sys/kernel/random/boot_id"],
    )
    .trim()
    .to_owned()
}

/// `stewardctl nodes -o json`, by node id.
fn nodes_json(bed: &ConvergeBed, extra: &[&str]) -> BTreeMap<String, Value> {
    let mut args = vec!["nodes", "-o", "json"];
    args.extend_from_slice(extra);
    let all = bed.ctl_ok(&args).json();
    all.as_array()
        .expect("a list of nodes")
        .iter()
        .map(|n| (n["id"].as_str().expect("id").to_owned(), n.clone()))
        .collect()
}

#[test]
fn a_reboot_rollout_reboots_one_node_at_a_time_each_back_healthy_before_the_next() {
    let clock = Clock(Instant::now());
    let machines = NODES
        .iter()
        .map(|n| (*n, MachineOptions::default()))
        .collect();
    let mut bed = ConvergeBed::start_machines("reboot", machines);
    clock.say("bed up: three machines, agents connected");

    // ---- 1. The hosts need a reboot; the fleet shows it.
    let before: BTreeMap<String, String> = NODES
        .iter()
        .map(|n| (n.to_string(), machine_boot_id(&bed, n)))
        .collect();
    for (name, boot) in &before {
        assert_eq!(boot.len(), 36, "{name}: boot id {boot:?}");
    }
    let distinct: std::collections::BTreeSet<&String> = before.values().collect();
    assert_eq!(
        distinct.len(),
        3,
        "each machine its own boot id: {before:?}"
    );
    for name in NODES {
        bed.machine(name).sh(
            "echo '*** System restart required ***' > /run/reboot-required; \
             printf 'linux-image-steward-test\\nlibc6\\n' > /run/reboot-required.pkgs",
        );
    }
    let listed = poll(
        Duration::from_secs(30),
        Duration::from_millis(250),
        "every node reported needing a reboot",
        || {
            let nodes = nodes_json(&bed, &[]);
            for name in NODES {
                let n = nodes.get(name).ok_or(format!("{name} not listed"))?;
                if n["reboot_required"].is_null() {
                    return Err(format!("{name}: {}", n["reboot_required"]));
                }
            }
            Ok(nodes)
        },
    );
    for name in NODES {
        let n = &listed[name];
        assert_eq!(n["boot_id"], before[name].as_str(), "{name}: {n}");
        assert_eq!(n["reboot_required"]["source"], "reboot-required", "{n}");
        assert_eq!(
            n["reboot_required"]["packages"],
            serde_json::json!(["linux-image-steward-test", "libc6"]),
            "{n}"
        );
    }
    let table = bed.ctl_ok(&["nodes"]).stdout;
    assert!(
        table.lines().next().is_some_and(|h| h.contains("REBOOT")),
        "{table}"
    );
    for name in NODES {
        let row = table
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("{name} not in the table:\n{table}"));
        assert!(row.trim_end().ends_with("needed"), "{row}");
    }
    assert_eq!(
        nodes_json(&bed, &["--reboot-required"]).len(),
        3,
        "--reboot-required lists the three"
    );
    let shown = bed.node_table("rb2");
    assert!(
        shown.contains("reboot:    needed since")
            && shown.contains("linux-image-steward-test, libc6"),
        "{shown}"
    );
    clock.say("every node shows it needs a reboot");

    // Bad requests are refused, saying why, and start nothing.
    for (args, says) in [
        (
            &["rollout", "reboot"][..],
            "<--nodes <NODES>|--role <ROLE>|--all>",
        ),
        (
            &["rollout", "reboot", "--all", "--nodes", "rb1"][..],
            "cannot be used with",
        ),
        (
            &["rollout", "reboot", "--nodes", "rb1,nope"][..],
            "unknown node nope",
        ),
        (
            &["rollout", "reboot", "--role", "lb", "--only-required"][..],
            "cannot reboot: no node to reboot: role lb selects none",
        ),
        (
            &["rollout", "reboot", "--all", "--max-unavailable", "0"][..],
            "--max-unavailable 0",
        ),
    ] {
        let out = bed.cluster.ctl(args);
        assert!(!out.ok(), "stewardctl {args:?} succeeded: {}", out.stdout);
        assert!(
            out.stderr.contains(says),
            "stewardctl {args:?}: {}",
            out.stderr
        );
    }
    let none = bed.ctl_ok(&["rollout", "list", "-o", "json"]).json();
    assert_eq!(
        none,
        serde_json::json!([]),
        "a refused request started a rollout"
    );

    // ---- 2. The reboot rollout, the machines booted again as they reboot.
    let started = Instant::now();
    let cluster = &bed.cluster;
    let (rollout, rebooted_at) = std::thread::scope(|s| {
        let ctl = s.spawn(|| {
            cluster.ctl(&[
                "rollout",
                "reboot",
                "--all",
                "--only-required",
                "--wait",
                "-o",
                "json",
            ])
        });
        let mut rebooted_at: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        let deadline = Instant::now() + Duration::from_secs(600);
        while !ctl.is_finished() {
            assert!(
                Instant::now() < deadline,
                "the reboot rollout took over 600 s"
            );
            for m in bed.lbs.iter_mut() {
                let seen = unix_ms();
                if m.restart_if_rebooted() {
                    clock.say(format!("{} rebooted; booted it again", m.name()));
                    rebooted_at
                        .entry(m.name().to_owned())
                        .or_default()
                        .push(seen);
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let out = ctl.join().expect("the stewardctl thread");
        assert!(out.ok(), "rollout reboot: {}{}", out.stdout, out.stderr);
        (out.json(), rebooted_at)
    });
    let took = started.elapsed();
    assert_eq!(rollout["phase"], "done", "{rollout}");
    assert_eq!(rollout["nodes_total"], 3, "{rollout}");
    let nodes = rollout["nodes"].as_array().expect("nodes");
    let at = |n: &Value, step: &str| n["at"][step].as_u64().unwrap_or(0);
    let mut previous_finished = 0;
    for (i, n) in nodes.iter().enumerate() {
        let name = n["node"].as_str().expect("node");
        assert_eq!(n["step"], "done", "{n}");
        assert_eq!(n["batch"], i, "one node per batch: {rollout}");
        // Recorded boot ids: asked in the boot it had, back in another.
        assert_eq!(n["boot_id_before"], before[name].as_str(), "{n}");
        let after = n["boot_id_after"].as_str().expect("boot_id_after");
        assert!(after.len() == 36 && after != before[name], "{n}");
        // One at a time: this node began (its drain) only after the one
        // before it was back healthy and undrained.
        let (began, changed, back, healthy, finished) = (
            at(n, "started"),
            at(n, "changed"),
            at(n, "converged"),
            at(n, "healthy"),
            at(n, "finished"),
        );
        assert!(
            previous_finished > 0 || i == 0,
            "{name}: the node before never finished"
        );
        assert!(
            began >= previous_finished,
            "{name} began at {began}, before the node before finished at {previous_finished}"
        );
        assert!(
            began <= changed && changed <= back && back <= healthy && healthy <= finished,
            "{name}: steps out of order: {n}"
        );
        // The harness saw exactly one reboot, between the ask and the
        // return.
        let seen = rebooted_at.get(name).cloned().unwrap_or_default();
        assert_eq!(seen.len(), 1, "{name} rebooted {} times", seen.len());
        assert!(
            changed <= seen[0] && seen[0] <= back,
            "{name}: reboot seen at {} outside ask {changed} .. back {back}",
            seen[0]
        );
        println!(
            "{name}: drain {} ms, reboot asked -> back {} ms, health {} ms, undrain {} ms",
            at(n, "drained").saturating_sub(began),
            back - changed,
            healthy - back,
            finished - healthy
        );
        previous_finished = finished;
    }
    println!(
        "reboot rollout of {} nodes: {:.1} s in all",
        nodes.len(),
        took.as_secs_f64()
    );

    // ---- 3. Back as they should be, and no node reboots again.
    let settle = Instant::now();
    poll(
        Duration::from_secs(30),
        Duration::from_millis(250),
        "every node back: new boot, no reboot needed, healthy, in service",
        || {
            let listed = nodes_json(&bed, &[]);
            for n in nodes {
                let name = n["node"].as_str().expect("node");
                let now = &listed[name];
                if now["boot_id"] != n["boot_id_after"] {
                    return Err(format!(
                        "{name}: boot {} (rollout said {})",
                        now["boot_id"], n["boot_id_after"]
                    ));
                }
                if !now["reboot_required"].is_null() {
                    return Err(format!(
                        "{name} still needs a reboot: {}",
                        now["reboot_required"]
                    ));
                }
                if now["health"] != "healthy" || !now["maintenance"].is_null() {
                    return Err(format!("{name}: {} {}", now["health"], now["maintenance"]));
                }
            }
            Ok(())
        },
    );
    for name in NODES {
        assert_eq!(
            machine_boot_id(&bed, name),
            nodes
                .iter()
                .find(|n| n["node"] == name)
                .map(|n| n["boot_id_after"].as_str().unwrap_or_default().to_owned())
                .unwrap_or_default(),
            "{name}: the machine runs the boot the rollout recorded"
        );
    }
    assert!(nodes_json(&bed, &["--reboot-required"]).is_empty());
    // The request stays in the desired states: give the agents time to act
    // on it again (they must not), then look.
    while settle.elapsed() < Duration::from_secs(8) {
        for m in bed.lbs.iter_mut() {
            assert!(
                !m.restart_if_rebooted(),
                "{} rebooted a second time for the same request",
                m.name()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    for m in &bed.lbs {
        assert_eq!(
            m.reboots(),
            1,
            "{} rebooted {} times",
            m.name(),
            m.reboots()
        );
        let record = bed
            .read_file(m, "/var/lib/steward-agent/reboot.json")
            .unwrap_or_else(|| panic!("{}: no reboot.json", m.name()));
        let record: Value = serde_json::from_str(&record).expect("reboot.json is JSON");
        assert_eq!(record["boot_id"], before[m.name()].as_str(), "{record}");
    }
    clock.say("every node back once, none again");

    // ---- 4. The maintenance window: the leader reboots by itself the one
    // node that needs it, inside the window (a daily one from a minute ago
    // for an hour: the 20 min of step timeouts are left).
    bed.machine("rb2")
        .sh("echo '*** System restart required ***' > /run/reboot-required");
    poll(
        Duration::from_secs(30),
        Duration::from_millis(250),
        "rb2 reported needing a reboot",
        || match nodes_json(&bed, &["--reboot-required"])
            .keys()
            .collect::<Vec<_>>()[..]
        {
            [one] if one == "rb2" => Ok(()),
            ref other => Err(format!("{other:?}")),
        },
    );
    let boot_rb2 = machine_boot_id(&bed, "rb2");
    let minute = |offset: i64| {
        let m = (unix_ms() / 60_000) as i64 + offset;
        let m = m.rem_euclid(24 * 60);
        format!("{:02}:{:02}", m / 60, m % 60)
    };
    let window = format!("daily {}-{}", minute(-1), minute(60));
    let spec = format!("[maintenance]\nwindow = \"{window}\"\n");
    let applied = bed.apply_spec(&spec);
    assert!(
        applied
            .stdout
            .contains("cluster settings: maintenance window none -> "),
        "{}",
        applied.stdout
    );
    let by_window = |list: &Value| -> Vec<Value> {
        list.as_array()
            .expect("rollouts")
            .iter()
            .filter(|r| {
                r["created_by"]
                    .as_str()
                    .is_some_and(|b| b.contains("maintenance window"))
            })
            .cloned()
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let done = loop {
        assert!(Instant::now() < deadline, "no window reboot within 120 s");
        for m in bed.lbs.iter_mut() {
            if m.restart_if_rebooted() {
                clock.say(format!("{} rebooted (maintenance window)", m.name()));
            }
        }
        let list = bed.ctl_ok(&["rollout", "list", "-o", "json"]).json();
        if let [one] = &by_window(&list)[..] {
            if one["phase"] == "done" {
                break one.clone();
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let id = done["id"].as_str().expect("id");
    let status = bed.ctl_ok(&["rollout", "status", id, "-o", "json"]).json();
    let rebooted: Vec<&str> = status["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| n["node"].as_str().expect("node"))
        .collect();
    assert_eq!(rebooted, ["rb2"], "{status}");
    assert_eq!(
        status["nodes"][0]["boot_id_before"],
        boot_rb2.as_str(),
        "{status}"
    );
    assert_ne!(machine_boot_id(&bed, "rb2"), boot_rb2);
    let counts: Vec<(String, u32)> = bed
        .lbs
        .iter()
        .map(|m| (m.name().to_owned(), m.reboots()))
        .collect();
    assert_eq!(
        counts,
        [
            ("rb1".to_owned(), 1),
            ("rb2".to_owned(), 2),
            ("rb3".to_owned(), 1)
        ],
        "only rb2 rebooted again"
    );
    poll(
        Duration::from_secs(30),
        Duration::from_millis(250),
        "rb2 back needing no reboot",
        || {
            let n = &nodes_json(&bed, &[])["rb2"];
            (n["reboot_required"].is_null()
                && n["health"] == "healthy"
                && n["maintenance"].is_null())
            .then_some(())
            .ok_or(format!("{n}"))
        },
    );
    clock.say(format!("window {window}: the leader rebooted rb2 alone"));
    let list = bed.ctl_ok(&["rollout", "list", "-o", "json"]).json();
    assert_eq!(by_window(&list).len(), 1, "one window rollout: {list}");
    println!("rollout list: {list}");
    clock.say("done");
}
