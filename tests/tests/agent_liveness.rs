//! The agent never hangs for good on a coordinator whose HTTP/2 stream
//! stopped moving (issue 18: an agent went silent forever right after it
//! reconnected; its session loop was parked in a `send().await` on a full
//! outbound queue, so neither the heartbeat tick nor the ack timeout was
//! polled again).
//!
//! The real `steward-agent` binary against a scripted, in-process fake
//! coordinator ([`steward_tests::fake_coordinator`]) over real mTLS: the
//! first session stalls (the fake stops reading the request stream, whose
//! small HTTP/2 window then fills, while it keeps acking on a timer so the
//! agent's ack timeout does not save it), then falls silent or closes. The
//! agent must give up on it and open a session on the other replica, where
//! heartbeats flow again. Before the fix, it never did.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use steward_tests::fake_coordinator::{FakeCoordinator, Script};
use steward_tests::{bin, Proc};

/// Small enough that a few dozen heartbeats fill the stream.
const WINDOW: u32 = 2048;
/// How long the stalled session keeps acking, so that the agent's queue is
/// full before its acks stop.
const ACKING: Duration = Duration::from_secs(4);

fn agent_config(dir: &Path, urls: &[String]) -> std::path::PathBuf {
    let pki = dir.join("pki");
    let coordinators = urls
        .iter()
        .map(|u| format!("{u:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let text = format!(
        "node_id = \"lb1\"\n\
         coordinators = [{coordinators}]\n\
         heartbeat_interval_ms = 50\n\
         state_dir = \"{state}\"\n\
         [tls]\n\
         ca = \"{ca}\"\n\
         cert = \"{crt}\"\n\
         key = \"{key}\"\n\
         [converge]\n\
         enabled = false\n",
        state = dir.join("state").display(),
        ca = pki.join("ca.crt").display(),
        crt = pki.join("lb1.crt").display(),
        key = pki.join("lb1.key").display(),
    );
    let path = dir.join("agent.toml");
    fs::write(&path, text).expect("write config");
    path
}

/// Runs the agent against two fake replicas whose first session stalls;
/// returns how long after the stall's acks stopped a served session carried
/// 20 heartbeats, or panics with the agent's log.
async fn agent_recovers_from(stall: Script) -> Duration {
    let dir = tempfile::Builder::new()
        .prefix("steward-liveness-")
        .tempdir()
        .expect("tempdir");
    let pki_dir = dir.path().join("pki");
    let fake = FakeCoordinator::start_with_new_pki(
        &pki_dir,
        "lb1",
        2,
        vec![stall, Script::Serve],
        WINDOW,
        Duration::from_secs(120),
    )
    .await;
    let config = agent_config(dir.path(), &fake.urls);
    let mut cmd = std::process::Command::new(bin("steward-agent"));
    cmd.arg("--config")
        .arg(&config)
        .env("RUST_LOG", "steward_agent=debug");
    let mut agent = Proc::spawn("agent lb1", cmd, dir.path().join("agent.log"));

    let started = Instant::now();
    let deadline = started + ACKING + Duration::from_secs(30);
    loop {
        let log = fake.log();
        if let Some((_, opened)) = log.sessions.get(1) {
            if log.served_heartbeats >= 20 {
                let stall_began = log.sessions[0].1;
                assert!(
                    agent.is_running(),
                    "the agent exited:\n{}",
                    agent.log_text()
                );
                let took = opened.saturating_duration_since(stall_began);
                eprintln!(
                    "{stall:?}: second session {took:?} after the first opened; \
                     {} heartbeats served there",
                    log.served_heartbeats
                );
                agent.stop(Duration::from_secs(10));
                return took;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{stall:?}: the agent never left the stalled session ({} sessions, {} heartbeats \
             served) within {:?}; agent log:\n{}",
            log.sessions.len(),
            log.served_heartbeats,
            deadline - started,
            agent.log_text()
        );
        assert!(
            agent.is_running(),
            "the agent exited:\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_leaves_a_stalled_stream_that_goes_silent() {
    let took = agent_recovers_from(Script::Stall {
        acking: ACKING,
        then_close: false,
    })
    .await;
    // The queue fills well before the acks stop; the agent must not wait
    // for anything after that.
    assert!(took < ACKING + Duration::from_secs(5), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_leaves_a_stalled_stream_that_the_replica_closes() {
    let took = agent_recovers_from(Script::Stall {
        acking: ACKING,
        then_close: true,
    })
    .await;
    assert!(took < ACKING + Duration::from_secs(5), "{took:?}");
}
