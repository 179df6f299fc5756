//! `stewardctl ... --wait` against real convergence (issue 16): a node
//! booting real systemd whose agent converges its host (HAProxy from the
//! local apt repository). The wait times out while the install runs, fails
//! with the node and its first error when the node cannot converge (a
//! Kubernetes role without Kubernetes settings), and succeeds once the node
//! converged; `stewardctl` shows per-node progress lines when piped.

use std::time::Instant;

use steward_tests::converge_bed::{Clock, ConvergeBed};
use steward_tests::nspawn::MachineOptions;

#[test]
fn wait_follows_real_convergence_to_success_failure_and_timeout() {
    let clock = Clock::start();
    let bed = ConvergeBed::start_machines("ctl-wait", vec![("n1", MachineOptions::default())]);
    clock.say("machine booted, agent connected");

    // Runs stewardctl, says how it ended and shows its progress lines.
    let ctl = |args: &[&str]| {
        let t = Instant::now();
        let out = bed.cluster.ctl(args);
        clock.say(format!(
            "stewardctl {}: {:?} after {:?}",
            args.join(" "),
            out.code,
            t.elapsed()
        ));
        eprint!("{}", out.stderr);
        out
    };

    // 1. Timeout: installing HAProxy takes longer than a second.
    let out = ctl(&["role", "add", "n1", "lb", "--wait", "--timeout", "1s"]);
    assert!(
        !out.ok(),
        "a 1 s wait on a HAProxy install succeeded:\n{}{}",
        out.stdout,
        out.stderr
    );
    assert!(
        out.stderr.contains("timed out after 1s") && out.stderr.contains("n1: "),
        "no timeout naming n1:\n{}",
        out.stderr
    );
    assert!(out.stdout.contains("n1: roles now [lb]"), "{}", out.stdout);

    // 2. Failure: a Kubernetes role with no Kubernetes settings cannot
    // converge; the wait says which node and why, and exits non-zero.
    let out = ctl(&[
        "role",
        "add",
        "n1",
        "k8s-worker",
        "--wait",
        "--timeout",
        "5m",
    ]);
    assert!(
        !out.ok(),
        "a failing converge passed the wait:\n{}{}",
        out.stdout,
        out.stderr
    );
    assert!(
        out.stderr.contains("1 node(s) failed to converge")
            && out.stderr.contains("n1: ")
            && out.stderr.contains("no [kubernetes] settings"),
        "no failure naming n1 and its first error:\n{}",
        out.stderr
    );
    // Piped: plain progress lines, no terminal control sequences.
    assert!(out.stderr.contains("n1: FAILED revision"), "{}", out.stderr);
    assert!(
        !out.stderr.contains('\x1b'),
        "escape sequences when piped:\n{:?}",
        out.stderr
    );

    // 3. Success: without the Kubernetes role the node converges (HAProxy
    // installed and running), and the wait ends 0.
    let out = ctl(&[
        "role",
        "rm",
        "n1",
        "k8s-worker",
        "--wait",
        "--timeout",
        "5m",
    ]);
    assert!(out.ok(), "the wait failed:\n{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("n1: converged revision") && out.stderr.contains("1 node(s) converged"),
        "{}",
        out.stderr
    );
    let m = bed.machine("n1");
    assert_eq!(
        bed.unit_state(m, "haproxy.service"),
        "active",
        "converged, but HAProxy is not running"
    );

    // 4. A change that reaches no node: nothing to wait for.
    let out = bed.cluster.ctl(&["role", "add", "n1", "lb", "--wait"]);
    assert!(out.ok(), "{}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("nothing to wait for"), "{}", out.stderr);
}
