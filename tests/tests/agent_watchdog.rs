//! systemd's watchdog restarts an agent that stopped turning, its VIP is
//! released before the restart, and the VIP is never on two hosts meanwhile
//! (issue 18).
//!
//! Two nspawn machines booting real systemd run `steward-agent.service` as
//! packaged (`Type=notify`, `WatchdogSec=`, `ExecStopPost=steward-agent
//! release-vips`), both with the lb role, one VIP (`--check none`: no
//! HAProxy needed for what is tested here). The holder's agent is frozen
//! with SIGSTOP — from the outside exactly what a hung agent looks like:
//! the process lives, its sockets stay open, it says nothing. Its kernel
//! still holds the address and answers ARP for it, so the other candidate,
//! once the lease expired and the VIP was reassigned, must find it in use
//! and wait. systemd must then abort the frozen agent (no watchdog pings),
//! run `release-vips` and start a new one; the other candidate binds.
//!
//! The watchdog's own rule (pings only while *every* loop turns) is unit
//! tested in `agent/src/watchdog.rs`; the hang it guards against has its
//! regression test in `agent_liveness.rs`.

use std::time::{Duration, Instant};

use steward_tests::converge_bed::{poll, Clock, ConvergeBed, AGENT_UNIT};
use steward_tests::nspawn::MachineOptions;

#[test]
fn the_watchdog_restarts_a_frozen_agent_and_its_vip_moves_without_overlap() {
    let clock = Clock::start();
    let bed = ConvergeBed::start_machines(
        "watchdog",
        vec![
            ("lb1", MachineOptions::default()),
            ("lb2", MachineOptions::default()),
        ],
    );
    clock.say("machines booted, agents connected");
    for m in ["lb1", "lb2"] {
        assert_eq!(
            bed.unit_property(bed.machine(m), AGENT_UNIT, "WatchdogUSec"),
            "20s",
            "{m}: the packaged unit has no watchdog"
        );
    }
    bed.ctl_ok(&["role", "add", "lb1", "lb"]);
    bed.ctl_ok(&["role", "add", "lb2", "lb"]);
    let address = bed.set_vip(&["--check", "none"]);
    let holder = poll(
        Duration::from_secs(60),
        Duration::from_millis(200),
        "one VIP holder",
        || match bed.vip_holders().as_slice() {
            [one] => Ok(one.clone()),
            other => Err(format!("holders: {other:?}")),
        },
    );
    let other = if holder == "lb1" { "lb2" } else { "lb1" };
    clock.say(format!("{holder} holds {address}"));
    let m = bed.machine(&holder);
    let frozen_pid = bed.unit_property(m, AGENT_UNIT, "MainPID");
    assert_ne!(frozen_pid, "0", "no agent process");
    m.sh(&format!("kill -STOP {frozen_pid}"));
    let frozen_at = Instant::now();
    clock.say(format!(
        "{holder}: agent (pid {frozen_pid}) frozen with SIGSTOP"
    ));

    // Until the frozen agent was replaced and the other candidate holds
    // the VIP: never two holders (sampled every ~100 ms).
    let mut restarted_after = None;
    let moved_after = poll(
        Duration::from_secs(90),
        Duration::from_millis(100),
        &format!("{holder}'s agent restarted by the watchdog and {other} holding the VIP"),
        || {
            let holders = bed.vip_holders();
            assert!(
                holders.len() <= 1,
                "two VIP holders at once {:?} after the freeze: {holders:?}",
                frozen_at.elapsed()
            );
            if restarted_after.is_none() {
                let pid = bed.unit_property(m, AGENT_UNIT, "MainPID");
                if pid != frozen_pid && pid != "0" && bed.unit_state(m, AGENT_UNIT) == "active" {
                    restarted_after = Some(frozen_at.elapsed());
                    clock.say(format!(
                        "{holder}: new agent pid {pid}, {:?} after the freeze",
                        frozen_at.elapsed()
                    ));
                }
            }
            match (restarted_after, holders.as_slice()) {
                (Some(_), [h]) if h == other => Ok(frozen_at.elapsed()),
                (r, h) => Err(format!("restarted: {r:?}; holders: {h:?}")),
            }
        },
    );
    let restarted_after = restarted_after.expect("restart seen");
    clock.say(format!(
        "{other} holds the VIP {moved_after:?} after the freeze (agent restarted after {restarted_after:?})"
    ));
    // systemd's word for it, and the VIP released by ExecStopPost= before
    // the new agent started.
    let journal = m.journal(AGENT_UNIT);
    let at = |needle: &str| {
        journal
            .find(needle)
            .unwrap_or_else(|| panic!("{holder}: no {needle:?} in the agent's journal:\n{journal}"))
    };
    let timeout = at("Watchdog timeout");
    let released = at("released 1 VIP address(es)");
    let last_start = journal.rfind("agent starting").expect("a restarted agent");
    assert!(
        timeout < released && released < last_start,
        "{holder}: expected watchdog timeout, then the VIP released, then a new agent:\n{journal}"
    );
    // Restarted by the watchdog: 20 s without pings, not much more.
    assert!(
        restarted_after >= Duration::from_secs(15) && restarted_after < Duration::from_secs(45),
        "restart {restarted_after:?} after the freeze"
    );
    // The new agent is back in the cluster.
    poll(
        Duration::from_secs(30),
        Duration::from_millis(200),
        &format!("{holder} connected again"),
        || {
            let node = bed.node_json(&holder)?;
            match node["health"].as_str() {
                Some("healthy") => Ok(()),
                other => Err(format!("health {other:?}")),
            }
        },
    );
    clock.say(format!("{holder} is back and healthy"));
}
