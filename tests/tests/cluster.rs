//! End to end: a real etcd, real coordinator replicas and agents as
//! processes, driven through `stewardctl` as an operator would.

use std::time::{Duration, Instant};

use steward_tests::{eventually, Cluster};

fn roles_of(node: &serde_json::Value) -> Vec<String> {
    node["roles"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|r| r.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn three_agents_register_within_two_seconds_and_roles_arrive_within_one() {
    let mut cluster = Cluster::new();
    cluster.start_coordinators(1);
    let started = Instant::now();
    for node in ["node-1", "node-2", "node-3"] {
        cluster.start_agent(node);
    }
    let nodes = eventually(Duration::from_secs(2), "three healthy nodes", || {
        let nodes = cluster.nodes();
        (nodes.len() == 3 && nodes.iter().all(|n| n["health"] == "healthy")).then_some(nodes)
    });
    println!("three agents registered after {:?}", started.elapsed());
    for n in &nodes {
        assert!(n["last_seen"].as_u64().is_some_and(|t| t > 0), "{n}");
        assert_eq!(n["replica"], "coord-1");
        assert!(roles_of(n).is_empty());
    }

    let out = cluster.ctl(&["role", "add", "node-2", "lb", "gluster-brick"]);
    assert!(out.ok(), "{}", out.stderr);
    let changed = Instant::now();
    let (revision, roles) = eventually(Duration::from_secs(1), "roles at the agent", || {
        cluster
            .agent_desired(1)
            .filter(|(_, roles)| roles.len() == 2)
    });
    println!(
        "role change reached the agent after {:?}",
        changed.elapsed()
    );
    assert_eq!(roles, ["lb", "gluster-brick"]);
    // The agent reports what it recorded; the coordinator shows it.
    eventually(Duration::from_secs(2), "applied revision reported", || {
        let n = cluster.node("node-2")?;
        (n["applied_revision"].as_u64() == Some(revision)).then_some(())
    });
    // Other agents were left alone.
    assert_eq!(cluster.agent_desired(0).map(|(_, r)| r), Some(vec![]));

    let out = cluster.ctl(&["role", "rm", "node-2", "lb"]);
    assert!(out.ok(), "{}", out.stderr);
    eventually(Duration::from_secs(1), "role removal at the agent", || {
        cluster
            .agent_desired(1)
            .filter(|(_, roles)| roles == &["gluster-brick"])
    });

    let events = cluster.ctl(&["events", "-o", "json"]);
    assert!(events.ok(), "{}", events.stderr);
    let kinds: Vec<String> = events
        .stdout
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("json line")["kind"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    for expected in [
        "leader-elected",
        "node-registered",
        "node-connected",
        "roles-changed",
    ] {
        assert!(
            kinds.iter().any(|k| k == expected),
            "no {expected} event in {kinds:?}"
        );
    }
}

#[test]
fn leader_kill_fails_over_and_loses_nothing() {
    let mut cluster = Cluster::new();
    cluster.start_coordinators(3);
    for node in ["node-1", "node-2", "node-3", "node-4"] {
        cluster.start_agent(node);
    }
    eventually(Duration::from_secs(5), "four healthy nodes", || {
        let nodes = cluster.nodes();
        (nodes.len() == 4 && nodes.iter().all(|n| n["health"] == "healthy")).then_some(())
    });
    assert!(cluster.ctl(&["role", "add", "node-1", "lb"]).ok());
    assert!(cluster
        .ctl(&["role", "add", "node-3", "k8s-control-plane"])
        .ok());

    let leader = eventually(Duration::from_secs(5), "a leader", || cluster.leader());
    let leader_index = cluster.coordinator_index(&leader);
    // Make sure some agent is served by the leader so we see it move.
    let on_leader: Vec<String> = cluster
        .nodes()
        .iter()
        .filter(|n| n["replica"] == leader.as_str())
        .map(|n| n["id"].as_str().unwrap_or("").to_owned())
        .collect();
    println!("leader {leader} serves {on_leader:?}");

    cluster.coordinators[leader_index].proc.kill(); // SIGKILL
    let killed = Instant::now();
    let dead_url = cluster.coordinators[leader_index].url.clone();
    let live: Vec<String> = cluster
        .coordinator_urls()
        .into_iter()
        .filter(|u| *u != dead_url)
        .collect();
    let live: Vec<&str> = live.iter().map(|s| s.as_str()).collect();

    let new_leader = eventually(Duration::from_secs(15), "a new leader", || {
        let out = cluster.ctl_at(&live, &["status", "-o", "json"]);
        let l = out
            .ok()
            .then(|| out.json()["leader"].as_str().map(String::from))??;
        (l != leader).then_some(l)
    });
    println!("new leader {new_leader} after {:?}", killed.elapsed());

    // Every agent ends up healthy on a live replica.
    eventually(Duration::from_secs(15), "agents on live replicas", || {
        let out = cluster.ctl_at(&live, &["nodes", "-o", "json"]);
        let nodes = out.ok().then(|| out.json().as_array().cloned())??;
        (nodes.len() == 4
            && nodes.iter().all(|n| {
                n["health"] == "healthy" && n["replica"].as_str().is_some_and(|r| r != leader)
            }))
        .then_some(())
    });
    println!("agents reconnected after {:?}", killed.elapsed());

    // Nothing written before the kill is lost.
    let out = cluster.ctl_at(&live, &["nodes", "-o", "json"]);
    let nodes = out.json();
    let by_id = |id: &str| {
        nodes
            .as_array()
            .and_then(|a| a.iter().find(|n| n["id"] == id).cloned())
            .expect("node")
    };
    assert_eq!(roles_of(&by_id("node-1")), ["lb"]);
    assert_eq!(roles_of(&by_id("node-3")), ["k8s-control-plane"]);

    // A change made after the failover still arrives.
    let out = cluster.ctl_at(&live, &["role", "add", "node-4", "k8s-worker"]);
    assert!(out.ok(), "{}", out.stderr);
    eventually(
        Duration::from_secs(2),
        "post-failover role at the agent",
        || {
            cluster
                .agent_desired(3)
                .filter(|(_, roles)| roles == &["k8s-worker"])
        },
    );
    let events = cluster.ctl_at(&live, &["events", "-o", "json"]);
    let elections = events
        .stdout
        .lines()
        .filter(|l| l.contains("\"leader-elected\""))
        .count();
    assert!(
        elections >= 2,
        "expected two leader elections:\n{}",
        events.stdout
    );
}

#[test]
fn coordinator_and_agent_restarts_lose_nothing() {
    let mut cluster = Cluster::new();
    cluster.start_coordinators(1);
    let agent = cluster.start_agent("node-1");
    eventually(Duration::from_secs(5), "node registered", || {
        cluster.node("node-1")
    });
    assert!(cluster
        .ctl(&["role", "add", "node-1", "lb", "k8s-worker"])
        .ok());
    let (revision, _) = eventually(Duration::from_secs(2), "roles at agent", || {
        cluster.agent_desired(agent).filter(|(_, r)| r.len() == 2)
    });

    // Graceful coordinator stop: exits 0, and the agent keeps its roles
    // while no coordinator is reachable.
    assert_eq!(
        cluster.coordinators[0].proc.stop(Duration::from_secs(15)),
        Some(0),
        "coordinator did not exit cleanly"
    );
    std::thread::sleep(Duration::from_millis(1500)); // let the agent notice and retry
    assert!(
        cluster.agents[agent].proc.is_running(),
        "agent died without a coordinator"
    );
    assert_eq!(cluster.agent_desired(agent).map(|d| d.0), Some(revision));

    cluster.restart_coordinator(0);
    eventually(
        Duration::from_secs(15),
        "node back and healthy with its roles",
        || {
            let n = cluster.node("node-1")?;
            (n["health"] == "healthy" && roles_of(&n) == ["lb", "k8s-worker"]).then_some(())
        },
    );

    // SIGKILL the coordinator: same outcome.
    cluster.coordinators[0].proc.kill();
    cluster.restart_coordinator(0);
    eventually(Duration::from_secs(15), "node back after SIGKILL", || {
        let n = cluster.node("node-1")?;
        (n["health"] == "healthy" && roles_of(&n) == ["lb", "k8s-worker"]).then_some(())
    });

    // Agent restart: it resumes from its recorded state and reports it.
    cluster.agents[agent].proc.kill();
    eventually(Duration::from_secs(5), "node disconnected", || {
        (cluster.node("node-1")?["health"] == "disconnected").then_some(())
    });
    cluster.restart_agent(agent);
    eventually(Duration::from_secs(5), "agent resumed", || {
        let n = cluster.node("node-1")?;
        (n["health"] == "healthy" && n["applied_revision"].as_u64() == Some(revision)).then_some(())
    });
    assert!(
        cluster.agents[agent]
            .proc
            .log_text()
            .contains("resuming with recorded desired state"),
        "agent did not resume from its state file"
    );
    assert!(cluster.ctl(&["role", "rm", "node-1", "k8s-worker"]).ok());
    eventually(Duration::from_secs(2), "change after restarts", || {
        cluster.agent_desired(agent).filter(|(_, r)| r == &["lb"])
    });
}

#[test]
fn etcd_outage_keeps_sessions_and_recovers() {
    let mut cluster = Cluster::new();
    cluster.start_coordinators(1);
    let agent = cluster.start_agent("node-1");
    eventually(Duration::from_secs(5), "node registered", || {
        cluster.node("node-1")
    });
    assert!(cluster
        .ctl(&["role", "add", "node-1", "gluster-brick"])
        .ok());
    eventually(Duration::from_secs(2), "roles at agent", || {
        cluster.agent_desired(agent).filter(|(_, r)| r.len() == 1)
    });

    cluster.etcd.kill();
    let status = cluster.ctl(&["status", "-o", "json"]);
    assert!(
        status.ok(),
        "status must answer without etcd: {}",
        status.stderr
    );
    assert_eq!(status.json()["etcd_reachable"], false);
    let refused = cluster.ctl(&["role", "add", "node-1", "lb"]);
    assert!(!refused.ok(), "a write without etcd must fail");
    assert!(!refused.stderr.is_empty());
    assert!(cluster.agents[agent].proc.is_running());

    cluster.etcd.restart();
    eventually(Duration::from_secs(20), "writes work again", || {
        cluster
            .ctl(&["role", "add", "node-1", "lb"])
            .ok()
            .then_some(())
    });
    eventually(
        Duration::from_secs(5),
        "change after etcd recovery at agent",
        || cluster.agent_desired(agent).filter(|(_, r)| r.len() == 2),
    );
}

#[test]
fn graceful_leader_stop_hands_over_at_once() {
    let mut cluster = Cluster::new();
    cluster.start_coordinators(2);
    let leader = eventually(Duration::from_secs(5), "a leader", || cluster.leader());
    let index = cluster.coordinator_index(&leader);
    let other = cluster.coordinators[1 - index].url.clone();
    let stopped = Instant::now();
    assert_eq!(
        cluster.coordinators[index]
            .proc
            .stop(Duration::from_secs(15)),
        Some(0)
    );
    // Resigning hands over without waiting for the lease (2 s here) to expire.
    let new_leader = eventually(Duration::from_secs(2), "the other replica to lead", || {
        let out = cluster.ctl_at(&[other.as_str()], &["status", "-o", "json"]);
        let l = out
            .ok()
            .then(|| out.json()["leader"].as_str().map(String::from))??;
        (l != leader).then_some(l)
    });
    let handover = stopped.elapsed();
    println!("{new_leader} leads {handover:?} after {leader} was asked to stop");
    assert!(
        handover < Duration::from_millis(1500),
        "handover took {handover:?}: leadership was not resigned"
    );
}

#[test]
fn events_follow_streams_new_events() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let mut cluster = Cluster::new();
    cluster.start_coordinators(1);
    cluster.start_agent("node-1");
    eventually(Duration::from_secs(5), "node-1", || cluster.node("node-1"));
    let pki = cluster.pki();
    let mut follower = Command::new(steward_tests::bin("stewardctl"))
        .env("STEWARD_ENDPOINTS", &cluster.coordinators[0].url)
        .env("STEWARD_CA", pki.join("ca.crt"))
        .env("STEWARD_CERT", pki.join("admin.crt"))
        .env("STEWARD_KEY", pki.join("admin.key"))
        .args(["events", "--follow", "-o", "json", "--limit", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("stewardctl events --follow");
    let stdout = follower.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    // The one past event we asked for comes first.
    rx.recv_timeout(Duration::from_secs(5)).expect("past event");
    assert!(cluster.ctl(&["role", "add", "node-1", "k8s-worker"]).ok());
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = Vec::new();
    let found = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains("\"roles-changed\"") && line.contains("k8s-worker") => {
                break true
            }
            Ok(line) => seen.push(line),
            Err(_) => break false,
        }
    };
    let _ = follower.kill();
    let _ = follower.wait();
    assert!(found, "no roles-changed event streamed; saw {seen:?}");
}

#[test]
fn any_replica_shows_live_last_seen_for_every_node() {
    let mut cluster = Cluster::new();
    cluster.start_coordinators(2);
    let second = cluster.coordinators[1].url.clone();
    let first = cluster.coordinators[0].url.clone();
    cluster.start_agent_on("node-1", &[second]);
    let last_seen_via_first = |cluster: &Cluster| {
        let out = cluster.ctl_at(&[first.as_str()], &["nodes", "-o", "json"]);
        let nodes = out.ok().then(|| out.json())?;
        let node = nodes
            .as_array()?
            .iter()
            .find(|n| n["id"] == "node-1")?
            .clone();
        (node["replica"] == "coord-2" && node["health"] == "healthy")
            .then(|| node["last_seen"].as_u64())?
    };
    // Generous windows: on a loaded 2-core machine (the other tests of
    // this binary run alongside) a peer query can miss its 500 ms timeout
    // now and then; what is checked stays the same.
    let a = eventually(Duration::from_secs(15), "node-1 via coord-1", || {
        last_seen_via_first(&cluster)
    });
    // Heartbeats every 200 ms never reach etcd; only coord-2's memory has
    // them, so a moving last_seen on coord-1 proves the peer query works.
    let b = eventually(Duration::from_secs(10), "last_seen to advance", || {
        last_seen_via_first(&cluster).filter(|b| *b >= a + 500)
    });
    println!("last_seen via the other replica advanced by {} ms", b - a);
}
