//! Fleet scale (issue 13), end to end against a real etcd and real
//! replicas: lists past etcd-client's 4 MB message limit, a change to one
//! node pushing to that node only, and an idle fleet writing nothing.
//!
//! The large fleet is seeded straight into etcd through the coordinator's
//! own `Store` (what thousands of sessions would have written), because
//! running thousands of agents here would measure the machine, not the
//! listing; `bench-fleet` runs real sessions at scale.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use steward_coordinator::store::kv::{Op, Txn};
use steward_coordinator::store::{encode, Keys, NodeStatusRecord, Store};
use steward_proto::converge::{ConvergeReport, ResourceState, ResourceStatus};
use steward_proto::domain::{
    Disk, Facts, Health, NetworkInterface, NodeHealth, NodeId, NodeSpec, Role,
};
use steward_tests::scrape::scrape;

/// One at a time: the idle test counts etcd writes and heartbeat timing,
/// which the 2,500-node seeding next to it would disturb.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}
use steward_tests::{eventually, Cluster};

/// Writes `count` nodes as their sessions would have: a spec with labels
/// (every tenth with the lb role), a status, facts (`facts_bytes` of them)
/// and a converge report. Returns the bytes written under `nodes/`.
fn seed(cluster: &Cluster, count: usize, facts_bytes: usize) -> usize {
    let rt = tokio::runtime::Runtime::new().expect("as the test set it up");
    rt.block_on(async {
        let keys = Keys::new(&cluster.name);
        let store = Store::connect(&cluster.etcd.config(), keys, "seed".into())
            .await
            .expect("etcd");
        let mut under_nodes = 0;
        let ids: Vec<usize> = (0..count).collect();
        for chunk in ids.chunks(20) {
            let mut ops = Vec::new();
            for i in chunk {
                let id = NodeId::new(format!("seeded-{i:05}")).expect("as the test set it up");
                let mut spec = NodeSpec::default();
                if i % 10 == 0 {
                    spec.roles.insert(Role::Lb);
                }
                for l in 0..20 {
                    spec.labels.insert(format!("label-{l}"), "v".repeat(80));
                }
                let status = NodeStatusRecord {
                    health: NodeHealth::Disconnected,
                    last_health: Health::default(),
                    replica: None,
                    last_seen_unix_ms: 1,
                    applied_revision: 0,
                    agent_version: "seeded".into(),
                };
                let facts = Facts {
                    hostname: id.to_string(),
                    disks: (0..facts_bytes / 150)
                        .map(|d| Disk {
                            mount_point: format!("/srv/seeded/{d}/{}", "m".repeat(80)),
                            total_bytes: 1 << 40,
                            available_bytes: 1 << 39,
                        })
                        .collect(),
                    interfaces: vec![NetworkInterface {
                        name: "eth0".into(),
                        mac: String::new(),
                        addresses: vec![format!("198.18.{}.{}/16", i / 250, i % 250 + 1)],
                    }],
                    ..Default::default()
                };
                let report = ConvergeReport {
                    revision: 1,
                    finished_unix_ms: 1,
                    duration_ms: 1,
                    resources: (0..20)
                        .map(|r| ResourceState {
                            id: format!("file:/etc/seeded/{r}"),
                            status: ResourceStatus::Ok,
                            detail: "d".repeat(150),
                            since_unix_ms: 1,
                        })
                        .collect(),
                };
                let k = store.keys();
                let (spec, status) = (encode(&spec), encode(&status));
                under_nodes += spec.len() + status.len();
                ops.push(Op::put(k.node_spec(&id), spec));
                ops.push(Op::put(k.node_status(&id), status));
                ops.push(Op::put(k.node_facts(&id), encode(&facts)));
                ops.push(Op::put(k.node_converge(&id), encode(&report)));
            }
            store
                .txn(Txn::new().and_then(ops), "seed")
                .await
                .expect("seed write");
        }
        under_nodes
    })
}

fn json_nodes(cluster: &Cluster, url: &str, extra: &[&str]) -> Vec<serde_json::Value> {
    let mut args = vec!["nodes", "-o", "json"];
    args.extend(extra);
    let out = cluster.ctl_at(&[url], &args);
    assert!(out.ok(), "stewardctl nodes at {url}: {}", out.stderr);
    out.json().as_array().cloned().unwrap_or_default()
}

#[test]
fn every_command_works_with_nodes_far_past_etcds_message_limit() {
    let _serial = serial();
    const SEEDED: usize = 2_500;
    let mut cluster = Cluster::new();
    cluster.start_coordinators(2);
    cluster.start_agent("node-1");
    eventually(Duration::from_secs(10), "node-1 healthy", || {
        let n = cluster.node("node-1")?;
        (n["health"] == "healthy").then_some(())
    });
    let bytes = seed(&cluster, SEEDED, 12 * 1024);
    assert!(
        bytes > 4 * 1024 * 1024,
        "nodes/ must exceed etcd-client's 4 MB limit; seeded {bytes} bytes"
    );
    println!(
        "seeded {SEEDED} nodes: {:.1} MB under nodes/, plus facts and converge reports",
        bytes as f64 / 1e6
    );

    for url in cluster.coordinator_urls() {
        let started = Instant::now();
        let all = json_nodes(&cluster, &url, &[]);
        println!(
            "{url}: stewardctl nodes -o json, {} nodes, {:.2} s",
            all.len(),
            started.elapsed().as_secs_f64()
        );
        assert_eq!(all.len(), SEEDED + 1);
        let seeded = all
            .iter()
            .find(|n| n["id"] == "seeded-00042")
            .expect("as the test set it up");
        assert_eq!(seeded["facts"]["hostname"], "seeded-00042", "facts listed");
        assert!(seeded["converge"].is_object(), "converge listed: {seeded}");
        // The table.
        let out = cluster.ctl_at(&[&url], &["nodes"]);
        assert!(out.ok(), "{}", out.stderr);
        assert_eq!(out.stdout.lines().count(), SEEDED + 2, "header and rows");
        // Server-side filters.
        let lbs = json_nodes(&cluster, &url, &["--role", "lb"]);
        assert_eq!(lbs.len(), SEEDED / 10);
        let healthy = json_nodes(&cluster, &url, &["--health", "healthy"]);
        let ids: Vec<&str> = healthy.iter().filter_map(|n| n["id"].as_str()).collect();
        assert_eq!(ids, ["node-1"]);
        // Status counts the sessions: each replica its own (asked by the
        // one answering), node-1's alone among 2,501 nodes.
        let out = cluster.ctl_at(&[&url], &["status", "-o", "json"]);
        assert!(out.ok(), "{}", out.stderr);
        let status = out.json();
        assert_eq!(status["etcd_reachable"], true, "{}", out.stdout);
        let replicas = status["replicas"].as_array().cloned().unwrap_or_default();
        assert_eq!(replicas.len(), 2, "{}", out.stdout);
        let mut counted = Vec::new();
        for r in &replicas {
            let Some(n) = r["connected_agents"].as_u64() else {
                panic!("every replica answered: {}", out.stdout);
            };
            counted.extend((0..n).map(|_| r["id"].clone()));
        }
        assert_eq!(counted, [healthy[0]["replica"].clone()], "{}", out.stdout);
    }
    // A VIP over the 250 lb nodes: their facts are read to check the subnet.
    let out = cluster.ctl(&[
        "vip",
        "set",
        "front",
        "--address",
        "198.18.200.1/16",
        "--check",
        "none",
    ]);
    assert!(out.ok(), "vip set: {}", out.stderr);

    // A restarted replica reads it all again and admits sessions.
    cluster.coordinators[0].proc.kill();
    cluster.restart_coordinator(0);
    let first = cluster.coordinator_urls()[0].clone();
    cluster.restart_agent(0);
    eventually(
        Duration::from_secs(20),
        "node-1 back through the restarted replica",
        || {
            let nodes = cluster.ctl_at(&[&first], &["nodes", "-o", "json", "--health", "healthy"]);
            (nodes.ok() && nodes.stdout.contains("\"node-1\"")).then_some(())
        },
    );
}

/// `desired.json` of agent `index`: (revision, the file's bytes).
fn desired_file(cluster: &Cluster, index: usize) -> Option<(u64, String)> {
    let path = cluster.agents[index].state_dir.join("desired.json");
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some((v["desired"]["revision"].as_u64()?, v["desired"].to_string()))
}

fn counter(addr: SocketAddr, name: &str) -> f64 {
    scrape(addr).expect("metrics").sum(name, &[])
}

#[test]
fn a_change_to_one_node_pushes_to_that_node_only() {
    let _serial = serial();
    let mut cluster = Cluster::new();
    cluster.coordinator_metrics = true;
    cluster.start_coordinators(1);
    let metrics = steward_tests::metrics_listen(&cluster.coordinators[0].config).expect("metrics");
    for node in ["node-1", "node-2", "node-3"] {
        cluster.start_agent(node);
    }
    eventually(Duration::from_secs(10), "three nodes connected", || {
        (cluster.nodes().len() == 3).then_some(())
    });
    for node in ["node-1", "node-2", "node-3"] {
        let out = cluster.ctl(&["role", "add", node, "k8s-worker"]);
        assert!(out.ok(), "{}", out.stderr);
    }
    eventually(Duration::from_secs(10), "three workers settled", || {
        let states: Vec<(u64, String)> = (0..3)
            .map(|i| desired_file(&cluster, i))
            .collect::<Option<_>>()?;
        states
            .iter()
            .all(|(_, d)| d.contains("k8s-worker"))
            .then_some(states)
    });
    // Let any push in flight land.
    std::thread::sleep(Duration::from_millis(500));
    let before: Vec<(u64, String)> = (0..3)
        .map(|i| desired_file(&cluster, i).expect("as the test set it up"))
        .collect();
    let pushes = counter(metrics, "steward_desired_state_pushes_total");

    // A role for node-2: the other workers do not consume lb members.
    let out = cluster.ctl(&["role", "add", "node-2", "lb"]);
    assert!(out.ok(), "{}", out.stderr);
    eventually(Duration::from_secs(5), "node-2's new state", || {
        let (rev, _) = desired_file(&cluster, 1)?;
        (rev > before[1].0).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    for i in [0, 2] {
        assert_eq!(
            desired_file(&cluster, i).expect("as the test set it up"),
            before[i],
            "node-{} was pushed a state for a change to node-2",
            i + 1
        );
    }
    let sent = counter(metrics, "steward_desired_state_pushes_total") - pushes;
    assert_eq!(sent, 1.0, "one push for one node's change");
}

#[test]
fn an_idle_fleet_writes_nothing_to_etcd() {
    let _serial = serial();
    let mut cluster = Cluster::new();
    cluster.agent_heartbeat_ms = 200;
    cluster.start_coordinators(2);
    for node in ["node-1", "node-2", "node-3", "node-4"] {
        cluster.start_agent(node);
    }
    eventually(Duration::from_secs(10), "node-1 connected", || {
        cluster.node("node-1")
    });
    let out = cluster.ctl(&["role", "add", "node-1", "gluster-brick"]);
    assert!(out.ok(), "{}", out.stderr);
    eventually(Duration::from_secs(10), "four healthy nodes", || {
        let nodes = cluster.nodes();
        (nodes.len() == 4
            && nodes.iter().all(|n| {
                n["health"] == "healthy" && n["applied_revision"] == n["desired_revision"]
            }))
        .then_some(())
    });
    // node-1's brick probe reports once after it became a brick node, up
    // to a probe interval (10 s) later: a start-up write, to land before
    // the window.
    eventually(
        Duration::from_secs(20),
        "node-1's first brick report stored",
        || {
            let out = cluster.ctl(&["node", "show", "node-1", "-o", "json"]);
            (out.ok() && !out.json()["gluster"].is_null()).then_some(())
        },
    );
    // Let start-up writes (facts, first converge reports) settle.
    std::thread::sleep(Duration::from_secs(3));
    let etcd: SocketAddr = cluster
        .etcd
        .client_url
        .trim_start_matches("http://")
        .parse()
        .expect("as the test set it up");
    let puts = |e: &str| {
        steward_tests::scrape::unlabelled(e, "etcd_mvcc_put_total")
            + steward_tests::scrape::unlabelled(e, "etcd_mvcc_delete_total")
            + steward_tests::scrape::unlabelled(e, "etcd_mvcc_txn_total")
    };
    let ranges = |e: &str| steward_tests::scrape::unlabelled(e, "etcd_mvcc_range_total");
    let before = steward_tests::scrape::etcd_metrics(etcd);
    let window = Duration::from_secs(10);
    std::thread::sleep(window);
    let after = steward_tests::scrape::etcd_metrics(etcd);
    let writes = puts(&after) - puts(&before);
    let reads = ranges(&after) - ranges(&before);
    println!(
        "idle for {} s, 4 agents heartbeating every 200 ms, 2 replicas: {writes} etcd writes, \
         {reads} range reads ({:.1}/s)",
        window.as_secs(),
        reads / window.as_secs_f64()
    );
    assert_eq!(writes, 0.0, "an idle fleet writes nothing to etcd");
    // Reads: the leader's duties and the replicas' own bookkeeping, not
    // one per agent heartbeat (4 agents x 5/s x 10 s would be 200).
    assert!(reads < 60.0, "{reads} range reads in {window:?}");
}
