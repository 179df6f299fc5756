//! The gluster-brick heal gate (issue 15: "draining a brick with a pending
//! heal is refused; after the heal it drains") on real GlusterFS: four
//! nspawn machines (`g1`..`g4`, systemd as PID 1) run `steward-agent` as
//! packaged; the agent installs `glusterfs-server` and the coordinator
//! creates volume `data` (replica 3) on g1..g3, as in `converge_gluster.rs`.
//!
//! Steps, in one bed:
//! 1. Each brick node's agent reports the volume (`stewardctl node show
//!    -o json`, `gluster`): three bricks online, no entries pending heal.
//! 2. Self-heal held off (`cluster.self-heal-daemon off` and the client
//!    side heals off), g3's brick process is killed (by pid, inside g3) —
//!    g1's agent reports 2 of 3 bricks online —, files are written through
//!    a FUSE mount on g4, and the brick is started
//!    again (`gluster volume start data force`): g1 and g2 now hold
//!    entries to heal onto g3, and g1's agent reports them.
//! 3. `stewardctl node drain g1` is refused naming the heal gate, the
//!    volume and the count; nothing changes.
//! 4. Self-heal on again (`gluster volume heal data`): once every brick
//!    node reports no entry pending, the drain of g1 passes; undrain.
//!
//! Needs root, systemd-nspawn, etcd, `/dev/fuse`, and `cargo build
//! --workspace --bins` first.

use std::time::{Duration, Instant};

use serde_json::Value;
use steward_tests::converge_bed::{poll, secs, Clock, ConvergeBed};
use steward_tests::nspawn::{Machine, MachineOptions};

const VOLUME: &str = "data";
const BRICK: &str = "/data/glusterfs/data/brick1/brick";
const MOUNT: &str = "/mnt/data";
/// Boot, install and orchestration together.
const CONVERGE_BOUND: Duration = Duration::from_secs(240);
/// An agent probes every 10 s; a report reaches etcd within a few more.
const REPORT_BOUND: Duration = Duration::from_secs(40);

fn spec() -> String {
    let mut s = format!("[[gluster.volume]]\nname = \"{VOLUME}\"\nreplica = 3\n");
    for n in ["g1", "g2", "g3"] {
        s.push_str(&format!("\n[nodes.{n}]\nroles = [\"gluster-brick\"]\n"));
    }
    s
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `gluster ARGS` on `m`, which must succeed.
fn gluster(m: &Machine, args: &[&str]) -> String {
    let mut argv = vec!["gluster"];
    argv.extend_from_slice(args);
    let out = m.exec(&argv);
    assert!(
        out.status.success(),
        "{}: gluster {}: {}",
        m.name(),
        args.join(" "),
        text(&out)
    );
    text(&out)
}

/// What `node`'s agent last reported of the volume: (bricks online,
/// bricks, pending heal entries if known).
fn reported(bed: &ConvergeBed, node: &str) -> Result<(usize, usize, Option<u64>), String> {
    let view = bed.node_json(node)?;
    let volumes = view["gluster"]
        .as_array()
        .ok_or_else(|| format!("{node}: no gluster report yet"))?;
    let v: &Value = volumes
        .iter()
        .find(|v| v["volume"] == VOLUME)
        .ok_or_else(|| format!("{node}: no report of {VOLUME}: {volumes:?}"))?;
    let bricks = v["bricks"].as_array().cloned().unwrap_or_default();
    let online = bricks.iter().filter(|b| b["online"] == true).count();
    Ok((online, bricks.len(), v["pending_heals"].as_u64()))
}

/// The pid of `m`'s own brick process, as its glusterd says.
fn brick_pid(m: &Machine) -> u32 {
    let detail = gluster(m, &["volume", "status", VOLUME, "detail"]);
    let mine = format!("Brick {}:{BRICK}", m.ip());
    let mut in_mine = false;
    for line in detail.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        match key.trim() {
            "Brick" => in_mine = value.trim() == mine,
            "Pid" if in_mine => {
                return value
                    .trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("{}: brick pid {value:?}", m.name()))
            }
            _ => {}
        }
    }
    panic!("{}: no pid for {mine} in:\n{detail}", m.name());
}

#[test]
fn a_brick_node_with_pending_heals_is_not_drained_until_the_heal_is_done() {
    let clock = Clock::start();
    let machines: Vec<(&str, MachineOptions)> = ["g1", "g2", "g3", "g4"]
        .into_iter()
        .map(|n| (n, MachineOptions::default().bind("/dev/fuse", "/dev/fuse")))
        .collect();
    let mut bed = ConvergeBed::start_machines("gluster-heal", machines);
    bed.dump_units = vec!["glusterd.service".into(), "steward-agent.service".into()];
    bed.apply_spec(&spec());
    let t0 = Instant::now();

    // ---- 1. the volume, and each brick node's report of it
    let g1 = bed.machine("g1");
    poll(
        CONVERGE_BOUND,
        Duration::from_secs(1),
        "volume data started on g1",
        || {
            let out = g1.exec(&["gluster", "volume", "info", VOLUME]);
            let t = text(&out);
            (out.status.success() && t.contains("Status: Started"))
                .then_some(())
                .ok_or(t)
        },
    );
    clock.say(format!(
        "volume {VOLUME} started after {}",
        secs(t0.elapsed())
    ));
    for node in ["g1", "g2", "g3"] {
        poll(
            REPORT_BOUND,
            Duration::from_secs(1),
            &format!("{node} reports 3 bricks online and nothing to heal"),
            || match reported(&bed, node)? {
                (3, 3, Some(0)) => Ok(()),
                other => Err(format!("{node}: {other:?}")),
            },
        );
    }
    clock.say(format!(
        "step 1: g1..g3 report 3 bricks online, 0 entries pending heal ({} after the apply)",
        secs(t0.elapsed())
    ));
    println!(
        "---- stewardctl node show g1 ----\n{}",
        bed.node_table("g1")
    );

    // ---- 2. a pending heal
    let g4 = bed.machine("g4");
    g4.sh("apt-get update -q >/dev/null && apt-get install -y -q glusterfs-client >/dev/null");
    g4.sh(&format!(
        "mkdir -p {MOUNT} && mount -t glusterfs {}:/{VOLUME} {MOUNT} && echo one > {MOUNT}/one.txt",
        g1.ip()
    ));
    for option in [
        "cluster.self-heal-daemon",
        "cluster.data-self-heal",
        "cluster.metadata-self-heal",
        "cluster.entry-self-heal",
    ] {
        gluster(g1, &["volume", "set", VOLUME, option, "off"]);
    }
    let g3 = bed.machine("g3");
    let pid = brick_pid(g3);
    g3.sh(&format!("kill -KILL {pid}"));
    poll(
        Duration::from_secs(30),
        Duration::from_millis(500),
        "g3's brick offline",
        || {
            let detail = gluster(g1, &["volume", "status", VOLUME, "detail"]);
            let offline = detail.split("------").any(|b| {
                b.contains(&g3.ip().to_string()) && b.contains("Online               : N")
            });
            offline.then_some(()).ok_or(detail)
        },
    );
    // The agents see it too: g3's brick not online (what the rollout's
    // health step waits for).
    let t_down = Instant::now();
    poll(
        REPORT_BOUND,
        Duration::from_secs(1),
        "g1 reports 2 of 3 bricks online",
        || match reported(&bed, "g1")? {
            (2, 3, _) => Ok(()),
            other => Err(format!("g1: {other:?}")),
        },
    );
    clock.say(format!(
        "g1 reports g3's brick offline {} after the kill",
        secs(t_down.elapsed())
    ));
    g4.sh(&format!(
        "echo two > {MOUNT}/two.txt && mkdir -p {MOUNT}/dir && echo three > {MOUNT}/dir/three.txt"
    ));
    gluster(g1, &["volume", "start", VOLUME, "force"]);
    let t_pending = Instant::now();
    let summary = gluster(g1, &["volume", "heal", VOLUME, "info", "summary"]);
    println!("---- g1: gluster volume heal {VOLUME} info summary (brick back, heal held off) ----\n{summary}");
    let entries = poll(
        REPORT_BOUND,
        Duration::from_secs(1),
        "g1 reports 3 bricks online and entries pending heal",
        || match reported(&bed, "g1")? {
            (3, 3, Some(n)) if n > 0 => Ok(n),
            other => Err(format!("g1: {other:?}")),
        },
    );
    clock.say(format!(
        "step 2: g3's brick (pid {pid}) killed, files written, brick started again: g1 reports \
         {entries} entries pending heal {} later",
        secs(t_pending.elapsed())
    ));
    println!(
        "---- stewardctl node show g1 ----\n{}",
        bed.node_table("g1")
    );

    // ---- 3. the drain is refused by the heal gate
    let out = bed
        .cluster
        .ctl(&["node", "drain", "g1", "--timeout", "30s"]);
    assert!(
        !out.ok(),
        "drain of g1 with entries pending heal must be refused: {}",
        out.stdout
    );
    assert!(
        out.stderr
            .contains("gluster-brick heal gate: volume data has ")
            && out.stderr.contains(" entries pending heal (reported by "),
        "{}",
        out.stderr
    );
    assert!(
        !out.stderr.contains("replica set"),
        "the quorum gate holds (g2, g3 in service): {}",
        out.stderr
    );
    clock.say(format!(
        "step 3: drain of g1 refused: {}",
        out.stderr.trim()
    ));
    let view = bed.node_json("g1").expect("node show g1");
    assert!(
        view["maintenance"].is_null(),
        "a refused drain changes nothing: {view}"
    );

    // ---- 4. after the heal it drains
    gluster(
        g1,
        &["volume", "set", VOLUME, "cluster.self-heal-daemon", "on"],
    );
    let t_heal = Instant::now();
    let healed = poll(
        Duration::from_secs(180),
        Duration::from_secs(2),
        "every brick node reports no entries pending heal",
        || {
            // Ask for an index heal now rather than wait for the crawl.
            let _ = g1.exec(&["gluster", "volume", "heal", VOLUME]);
            for node in ["g1", "g2", "g3"] {
                match reported(&bed, node)? {
                    (3, 3, Some(0)) => {}
                    other => return Err(format!("{node}: {other:?}")),
                }
            }
            Ok(t_heal.elapsed())
        },
    );
    clock.say(format!(
        "step 4: healed, as every brick node reports, {} after the self-heal daemon was back",
        secs(healed)
    ));
    let out = bed
        .cluster
        .ctl(&["node", "drain", "g1", "--timeout", "30s"]);
    assert!(out.ok(), "drain of g1 after the heal: {}", out.stderr);
    assert!(out.stdout.contains("node g1: drained"), "{}", out.stdout);
    bed.ctl_ok(&["node", "undrain", "g1"]);
    clock.say("drain of g1 passed after the heal; undrained");
    g4.sh(&format!("umount {MOUNT}"));
}
