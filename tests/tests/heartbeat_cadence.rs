//! The agent keeps the heartbeat cadence a busy replica asks for (issue 13:
//! a replica serving more agents than `sessions.heartbeats_per_s` asks them
//! for sparser heartbeats in each ack, so 10,000 agents do not cost it half
//! a core of TLS and HTTP/2 framing while idle).
//!
//! The real `steward-agent` binary, with its own interval at 200 ms and its
//! ack timeout at 600 ms, against a scripted fake coordinator
//! ([`steward_tests::fake_coordinator`]) over real mTLS whose acks ask for
//! 1 s. The agent must beat once a second, and keep its session: with the
//! unstretched 600 ms ack timeout it would give up on a replica that acks
//! once a second.

use std::fs;
use std::time::{Duration, Instant};

use steward_tests::fake_coordinator::{FakeCoordinator, Script};
use steward_tests::{bin, Proc};

const OWN_MS: u64 = 200;
const ASKED_MS: u32 = 1000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_beats_at_the_cadence_the_replica_asks_for() {
    let dir = tempfile::Builder::new()
        .prefix("steward-cadence-")
        .tempdir()
        .expect("tempdir");
    let pki_dir = dir.path().join("pki");
    let fake = FakeCoordinator::start_with_new_pki(
        &pki_dir,
        "w1",
        1,
        vec![Script::Paced(ASKED_MS)],
        65_535,
        Duration::from_secs(60),
    )
    .await;
    let config = dir.path().join("agent.toml");
    fs::write(
        &config,
        format!(
            "node_id = \"w1\"\n\
             coordinators = [{url:?}]\n\
             heartbeat_interval_ms = {OWN_MS}\n\
             ack_timeout_ms = {ack}\n\
             state_dir = \"{state}\"\n\
             [tls]\n\
             ca = \"{ca}\"\n\
             cert = \"{crt}\"\n\
             key = \"{key}\"\n\
             [converge]\n\
             enabled = false\n",
            url = fake.urls[0],
            ack = 3 * OWN_MS,
            state = dir.path().join("state").display(),
            ca = pki_dir.join("ca.crt").display(),
            crt = pki_dir.join("w1.crt").display(),
            key = pki_dir.join("w1.key").display(),
        ),
    )
    .expect("write config");
    let mut cmd = std::process::Command::new(bin("steward-agent"));
    cmd.arg("--config")
        .arg(&config)
        .env("RUST_LOG", "steward_agent=debug");
    let mut agent = Proc::spawn("agent w1", cmd, dir.path().join("agent.log"));

    // Eight heartbeats after the first ack: about 7 s at the asked cadence
    // (at its own 200 ms the agent would send them in under 2 s).
    let deadline = Instant::now() + Duration::from_secs(20);
    let log = loop {
        let log = fake.log();
        if log.heartbeat_times.len() >= 9 {
            break log;
        }
        assert!(
            Instant::now() < deadline,
            "only {} heartbeats in 20 s; agent log:\n{}",
            log.heartbeat_times.len(),
            agent.log_text()
        );
        assert!(
            agent.is_running(),
            "the agent exited:\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let gaps: Vec<Duration> = log
        .heartbeat_times
        .windows(2)
        .map(|w| w[1] - w[0])
        .collect();
    eprintln!("heartbeat gaps: {gaps:?}");
    // The first ack is the first the agent hears of the cadence.
    let asked = Duration::from_millis(u64::from(ASKED_MS));
    for gap in &gaps[1..] {
        assert!(
            *gap >= asked.mul_f64(0.9) && *gap <= asked * 2,
            "a gap of {gap:?} between heartbeats; the replica asked for {asked:?} \
             (all gaps: {gaps:?})"
        );
    }
    assert_eq!(
        log.sessions.len(),
        1,
        "the agent left a replica that acks every heartbeat at the cadence it asked for \
         (its own ack timeout is {} ms); agent log:\n{}",
        3 * OWN_MS,
        agent.log_text()
    );
    agent.stop(Duration::from_secs(10));
}
