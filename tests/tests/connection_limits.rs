//! A reachable port must not be able to take a replica down (issue 14,
//! item 1): idle TCP connections held on the gRPC, join and metrics
//! listeners of a replica that has the 1,024 file descriptors systemd gives
//! a service by default, more connections than each listener's cap, and
//! meanwhile `stewardctl status` answers and a new agent session opens.
//!
//! `STEWARD_TEST_NO_CAPS=1` runs the same test with caps and timeout so large
//! that they never apply (the code before the limits): it fails.

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use steward_tests::{eventually, metrics_listen, Cluster};

/// Connections held on each listener: more than any cap, and more than
/// the replica's file descriptors.
const HELD: usize = 1_100;

fn addr_of(url: &str) -> SocketAddr {
    url.trim_start_matches("https://")
        .parse()
        .unwrap_or_else(|e| panic!("{url}: {e}"))
}

/// Opens `n` TCP connections to `addr` and sends nothing. Connections the
/// server closes stay open on this side (they still count as attempts).
fn hold(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => held.push(s),
            // A listener whose backlog is full no longer completes the
            // TCP handshake: that, too, is holding it.
            Err(e) => {
                println!("{addr}: connection {i} not established: {e}");
                break;
            }
        }
    }
    held
}

#[test]
fn idle_connections_beyond_the_caps_leave_the_replica_serving() {
    let uncapped = std::env::var_os("STEWARD_TEST_NO_CAPS").is_some();
    let mut cluster = Cluster::new();
    cluster.coordinator_metrics = true;
    cluster.coordinator_nofile = Some(1024);
    // Small caps so the test needs few connections; the defaults are
    // checked against LimitNOFILE= in the config's unit tests.
    let caps: [(&str, i64); 4] = if uncapped {
        [
            ("limits.handshake_timeout_ms", 120_000),
            ("limits.max_pending_handshakes", 1_000_000),
            ("limits.max_connections", 1_000_000),
            ("limits.max_join_connections", 1_000_000),
        ]
    } else {
        [
            ("limits.handshake_timeout_ms", 10_000),
            ("limits.max_pending_handshakes", 256),
            ("limits.max_connections", 512),
            ("limits.max_join_connections", 256),
        ]
    };
    cluster.coordinator_extra = caps
        .iter()
        .map(|(k, v)| ((*k).to_owned(), toml::Value::Integer(*v)))
        .collect();
    cluster.start_coordinators(1);
    let c = &cluster.coordinators[0];
    let grpc = addr_of(&c.url);
    let join = addr_of(&c.join_url);
    let metrics = metrics_listen(&c.config).expect("metrics_listen");

    let mut held = Vec::new();
    for addr in [grpc, join, metrics] {
        let h = hold(addr, HELD);
        println!("{addr}: holding {} connections", h.len());
        held.extend(h);
    }

    let started = Instant::now();
    let out = cluster.ctl(&["status"]);
    let took = started.elapsed();
    println!("stewardctl status took {took:?}");
    assert!(out.ok(), "status under load: {}", out.stderr);
    assert!(took < Duration::from_secs(5), "status took {took:?}");

    let started = Instant::now();
    cluster.start_agent("node-1");
    eventually(
        Duration::from_secs(10),
        "a new agent session while the ports are held",
        || {
            let n = cluster.node("node-1")?;
            (n["health"] == "healthy").then_some(())
        },
    );
    println!("the agent's session opened after {:?}", started.elapsed());

    let log = cluster.coordinators[0].proc.log_text();
    assert!(
        log.contains("too many TLS handshakes in progress"),
        "no warning about handshakes:\n{log}"
    );
    assert!(
        log.contains("metrics endpoint: connection limit reached"),
        "no warning about the metrics endpoint"
    );
    // Rate-limited: a few lines (at most one per listener per 10 s), not
    // one per dropped connection (hundreds here).
    let lines = log.matches("too many TLS handshakes").count();
    assert!(lines < 10, "{lines} warning lines");
    drop(held);
}
