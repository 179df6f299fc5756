//! Taking a node out of service (issue 15, item 1) on a real front door:
//! two LB hosts in network namespaces with real HAProxy and real agents
//! holding the VIP under the lease protocol, three coordinator replicas on
//! a real etcd, and a client sending a request through the VIP every 10 ms.

use std::thread::sleep;
use std::time::{Duration, Instant};

use steward_tests::netns::ClientRun;
use steward_tests::vip_bed::{BedOptions, VipBed};

#[test]
fn draining_the_vip_holder_moves_the_vip_first_and_the_last_lb_is_refused() {
    let bed = VipBed::start("drain", BedOptions::default());
    let old = bed.wait_for_single_holder(Duration::from_secs(5));
    let other = 1 - old;
    let holder = bed.lbs[old].host.name().to_owned();
    let standby = bed.lbs[other].host.name().to_owned();

    let run = ClientRun::start(&bed.client, bed.target(), Duration::from_secs(6));
    sleep(Duration::from_millis(500));
    let started = Instant::now();
    let out = bed.cluster.ctl(&[
        "node",
        "drain",
        &holder,
        "--reason",
        "kernel update",
        "--timeout",
        "30s",
    ]);
    assert!(out.ok(), "node drain {holder}: {}", out.stderr);
    let drained_after = started.elapsed();
    assert!(
        out.stdout.contains(&format!("node {holder}: drained")),
        "{}",
        out.stdout
    );
    // Drained means the VIP is already elsewhere.
    let now = bed.holder();
    assert_eq!(
        now,
        Some(other),
        "drained while the VIP was not on {standby}"
    );
    let report = run.finish();
    println!(
        "drain of the VIP holder: drained in {:.2} s; client every 10 ms: {} requests, {} \
         failed, longest outage {:.0} ms (the planned handover)",
        drained_after.as_secs_f64(),
        report.requests,
        report.failed,
        report.longest_outage_ms
    );
    assert!(report.recovered(), "{report:?}");
    assert!(
        report.longest_outage_ms < 2_000.0,
        "a planned handover, not a failover: {report:?}"
    );
    let dual = bed.watch().dual_holder_time();
    assert_eq!(dual, Duration::ZERO, "two holders for {dual:?}");

    // The operator sees it.
    let show = bed.cluster.ctl(&["node", "show", &holder, "-o", "json"]);
    assert!(show.ok(), "{}", show.stderr);
    let m = &show.json()["maintenance"];
    assert_eq!(m["state"], "drained", "{m}");
    assert_eq!(m["reason"], "kernel update", "{m}");
    let table = bed.cluster.ctl(&["nodes"]);
    assert!(table.stdout.contains(", drained"), "{}", table.stdout);

    // The other LB is now the last candidate: its drain is refused, naming
    // the gate, and nothing changes.
    let out = bed.cluster.ctl(&["node", "drain", &standby]);
    assert!(!out.ok(), "draining the last lb must be refused");
    assert!(
        out.stderr
            .contains("lb gate: VIP front would have no healthy candidate"),
        "{}",
        out.stderr
    );
    let show = bed.cluster.ctl(&["node", "show", &standby, "-o", "json"]);
    assert!(show.json()["maintenance"].is_null(), "{}", show.stdout);
    sleep(Duration::from_millis(500));
    assert_eq!(bed.holder(), Some(other), "a refused drain moves nothing");

    // Back into service: a candidate again, the VIP stays where it is
    // (no preemption), the audit trail has both.
    let out = bed.cluster.ctl(&["node", "undrain", &holder]);
    assert!(out.ok(), "{}", out.stderr);
    let show = bed.cluster.ctl(&["node", "show", &holder, "-o", "json"]);
    assert!(show.json()["maintenance"].is_null(), "{}", show.stdout);
    let out = bed
        .cluster
        .ctl(&["node", "drain", &standby, "--timeout", "30s"]);
    assert!(
        out.ok(),
        "with {holder} back, {standby} may go: {}",
        out.stderr
    );
    bed.wait_for_holder(old, Duration::from_secs(6));
    let events = bed.cluster.ctl(&["events", "-o", "json"]);
    let text = events.stdout;
    assert!(
        text.contains(&format!("{holder} draining (by admin: kernel update)")),
        "{text}"
    );
    assert!(
        text.contains(&format!("{holder} back in service")),
        "{text}"
    );
}
