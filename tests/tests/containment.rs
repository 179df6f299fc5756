//! A stolen node key must only ever hurt that node (issue 14, items 2, 3
//! and 6), against real replicas and a real etcd. The hostile client is
//! written with the project's own proto crate, holding a valid agent
//! certificate for the node `evil`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use steward_proto::pb;
use steward_proto::pb::agent_service_client::AgentServiceClient;
use steward_tests::{eventually, grpc_channel, proc_usage, Cluster};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

/// Facts of about `bytes`, as a broken or hostile agent would send them
/// (within the wire limits: 1,024 entries, 1,024-byte strings).
fn big_facts(host: &str, bytes: usize) -> pb::Facts {
    let per = 1_000;
    pb::Facts {
        hostname: host.into(),
        interfaces: (0..(bytes / per).min(1_024))
            .map(|i| pb::NetworkInterface {
                name: format!("eth{i}"),
                mac: "m".repeat(per - 20),
                addresses: vec![],
            })
            .collect(),
        ..Default::default()
    }
}

fn hello(node: &str, facts: pb::Facts) -> pb::AgentMessage {
    pb::AgentMessage {
        kind: Some(pb::agent_message::Kind::Hello(pb::Hello {
            node_id: node.into(),
            facts: Some(facts),
            last_applied_revision: 0,
            agent_version: "hostile".into(),
            advertise_address: String::new(),
        })),
    }
}

fn heartbeat(seq: u64, degraded: bool) -> pb::AgentMessage {
    pb::AgentMessage {
        kind: Some(pb::agent_message::Kind::Heartbeat(pb::Heartbeat {
            seq,
            sent_at_unix_ms: 1,
            health: Some(pb::Health {
                load1: 0.1,
                memory_used_bytes: if degraded { 99 } else { 1 },
                memory_total_bytes: 100,
                max_disk_used_fraction: 0.1,
            }),
        })),
    }
}

/// An open session: what to send on, and what comes back.
struct Session {
    tx: mpsc::Sender<pb::AgentMessage>,
    rx: tonic::Streaming<pb::CoordinatorMessage>,
}

async fn open(
    cluster: &Cluster,
    url: &str,
    cert: &str,
    hello: pb::AgentMessage,
) -> Result<Session, tonic::Status> {
    let (tx, rx) = mpsc::channel(64);
    tx.send(hello).await.expect("queue hello");
    let channel = grpc_channel(cluster, url, Some(cert))
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let rx = AgentServiceClient::new(channel)
        .session(ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok(Session { tx, rx })
}

fn etcd_addr(cluster: &Cluster) -> SocketAddr {
    cluster
        .etcd
        .client_url
        .trim_start_matches("http://")
        .parse()
        .expect("as the test set it up")
}

/// A counter or gauge of etcd's own `/metrics`.
fn etcd_metric(addr: SocketAddr, name: &str) -> f64 {
    let text = steward_tests::scrape::etcd_metrics(addr);
    steward_tests::scrape::unlabelled(&text, name)
}

fn etcd_writes(addr: SocketAddr) -> f64 {
    etcd_metric(addr, "etcd_mvcc_put_total") + etcd_metric(addr, "etcd_mvcc_txn_total")
}

/// Item 2: one agent key flapping its health every 300 ms for 10 s, with
/// 1 MB of facts, used to grow etcd by 56 MB (every flip rewrote the
/// status with the facts). Now the facts are cut to 16 KiB and stored once,
/// and the status (small) is written at most at the node's rate.
#[test]
fn a_flapping_node_key_cannot_fill_etcd() {
    let mut cluster = Cluster::new();
    cluster.start_coordinators(1);
    cluster.cert("evil", steward_coordinator::pki::IdentityKind::Agent);
    let url = cluster.coordinators[0].url.clone();
    let etcd = etcd_addr(&cluster);
    let size_before = etcd_metric(etcd, "etcd_mvcc_db_total_size_in_use_in_bytes");
    let writes_before = etcd_writes(etcd);
    let rt = tokio::runtime::Runtime::new().expect("as the test set it up");
    let flips = rt.block_on(async {
        let mut s = open(
            &cluster,
            &url,
            "evil",
            hello("evil", big_facts("evil", 1_000_000)),
        )
        .await
        .expect("session");
        let mut flips = 0;
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            s.tx.send(heartbeat(flips, flips % 2 == 0))
                .await
                .expect("as the test set it up");
            flips += 1;
            tokio::time::sleep(Duration::from_millis(300)).await;
            // Drain acks and pushes so the session stays healthy.
            while let Ok(Some(_)) =
                tokio::time::timeout(Duration::from_millis(1), s.rx.next()).await
            {}
        }
        flips
    });
    let size_after = etcd_metric(etcd, "etcd_mvcc_db_total_size_in_use_in_bytes");
    let writes = etcd_writes(etcd) - writes_before;
    let grown = size_after - size_before;
    println!(
        "{flips} health flips in 10 s with 1 MB of facts: {writes} etcd writes, \
         db in use grew {:.2} MB",
        grown / 1e6
    );
    assert!(grown < 5e6, "etcd grew {grown} bytes");
    // The hello (address, facts, status, two events), then the status at
    // most every 2 s after a burst of 4: 14 here; every flip was a write.
    assert!(writes <= 20.0, "{writes} etcd writes for {flips} flips");
    let shown = cluster.ctl(&["node", "show", "evil", "-o", "json"]);
    assert!(shown.ok(), "{}", shown.stderr);
    let facts = shown.json()["facts"].to_string();
    assert!(
        facts.len() <= 16 * 1024 + 1024,
        "facts shown: {} bytes",
        facts.len()
    );
}

/// Item 3: three keys sending ~1.4 MB of facts each used to push `nodes/`
/// past etcd-client's 4 MB limit, breaking `nodes`, `status` and restarts
/// on every replica. Facts are cut to 16 KiB and every command works.
#[test]
fn oversized_facts_are_cut_and_every_command_keeps_working() {
    let mut cluster = Cluster::new();
    cluster.start_coordinators(2);
    let urls = cluster.coordinator_urls();
    for n in ["evil-1", "evil-2", "evil-3"] {
        cluster.cert(n, steward_coordinator::pki::IdentityKind::Agent);
    }
    let rt = tokio::runtime::Runtime::new().expect("as the test set it up");
    let _sessions: Vec<Session> = rt.block_on(async {
        let mut all = Vec::new();
        for (i, n) in ["evil-1", "evil-2", "evil-3"].iter().enumerate() {
            let url = &urls[i % 2];
            let s = open(&cluster, url, n, hello(n, big_facts(n, 1_400_000)))
                .await
                .expect("session");
            all.push(s);
        }
        all
    });
    for url in &urls {
        let nodes = eventually(Duration::from_secs(5), "three nodes listed", || {
            let out = cluster.ctl_at(&[url], &["nodes", "-o", "json"]);
            let nodes = out.json().as_array().cloned()?;
            (out.ok() && nodes.len() == 3).then_some(nodes)
        });
        for n in &nodes {
            let facts = n["facts"].to_string();
            assert!(
                facts.len() <= 17 * 1024,
                "{}: {} bytes",
                n["id"],
                facts.len()
            );
            assert_eq!(n["facts"]["hostname"], n["id"], "the small facts kept");
        }
        for args in [
            &["status"][..],
            &["nodes"][..],
            &["node", "show", "evil-2"][..],
        ] {
            let out = cluster.ctl_at(&[url], args);
            assert!(out.ok(), "stewardctl {args:?} at {url}: {}", out.stderr);
        }
    }
}

/// Item 6: 300 concurrent sessions for one node id kept 325 sessions and
/// 128 MB on a replica, and the node stayed "healthy" after they closed.
/// Now one remains (the rest are replaced or refused), memory stays
/// bounded, and the last close marks the node disconnected everywhere.
#[test]
fn one_node_key_holds_one_session() {
    let mut cluster = Cluster::new();
    cluster.start_coordinators(2);
    let urls = cluster.coordinator_urls();
    cluster.cert("evil", steward_coordinator::pki::IdentityKind::Agent);
    let rss_before: Vec<u64> = cluster
        .coordinators
        .iter()
        .map(|c| proc_usage(c.proc.pid()).expect("as the test set it up").0)
        .collect();
    let rt = tokio::runtime::Runtime::new().expect("as the test set it up");
    let mut sessions = rt.block_on(async {
        let opens = (0..300).map(|i| {
            let url = urls[i % 2].clone();
            let cluster = &cluster;
            async move {
                open(
                    cluster,
                    &url,
                    "evil",
                    hello("evil", big_facts("evil", 10_000)),
                )
                .await
            }
        });
        let results = futures_join_all(opens).await;
        let refused = results.iter().filter(|r| r.is_err()).count();
        println!("300 concurrent sessions for one node: {refused} refused at once");
        results
            .into_iter()
            .filter_map(Result::ok)
            .collect::<Vec<_>>()
    });
    // Every session but one ends (replaced by a newer one, here or on the
    // other replica).
    let live = rt.block_on(async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let mut live = Vec::new();
        for mut s in sessions.drain(..) {
            // A session that ended has sent its error or closed.
            let mut ended = false;
            while let Ok(next) = tokio::time::timeout(Duration::from_millis(20), s.rx.next()).await
            {
                match next {
                    Some(Ok(_)) => continue,
                    _ => {
                        ended = true;
                        break;
                    }
                }
            }
            if !ended {
                live.push(s);
            }
        }
        live
    });
    assert_eq!(live.len(), 1, "one live session for one node");
    for (i, c) in cluster.coordinators.iter().enumerate() {
        let rss = proc_usage(c.proc.pid()).expect("as the test set it up").0;
        println!(
            "replica {i}: RSS {:.1} MB before, {:.1} MB after",
            rss_before[i] as f64 / 1e6,
            rss as f64 / 1e6
        );
        assert!(rss < rss_before[i] + 40_000_000, "replica {i} RSS {rss}");
    }
    for url in &urls {
        let out = cluster.ctl_at(&[url], &["node", "show", "evil", "-o", "json"]);
        assert!(out.ok(), "{}", out.stderr);
        assert_ne!(
            out.json()["health"],
            "disconnected",
            "the live session counts"
        );
    }
    drop(live);
    let closed = Instant::now();
    for url in &urls {
        eventually(
            Duration::from_secs(10),
            "disconnected on every replica",
            || {
                let out = cluster.ctl_at(&[url], &["node", "show", "evil", "-o", "json"]);
                (out.ok() && out.json()["health"] == "disconnected").then_some(())
            },
        );
    }
    println!(
        "disconnected on both replicas {:.1} s after the last close",
        closed.elapsed().as_secs_f64()
    );
}

/// Runs futures concurrently and collects their outputs in order.
async fn futures_join_all<F: std::future::Future>(
    futures: impl Iterator<Item = F>,
) -> Vec<F::Output> {
    let mut pinned: Vec<std::pin::Pin<Box<F>>> = futures.map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = (0..pinned.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in pinned.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter()
        .map(|v| v.expect("polled to completion"))
        .collect()
}
