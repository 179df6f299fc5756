//! The metrics endpoints end to end: real coordinators and agents with
//! `metrics_listen` on free ports, scraped over TCP, the text format parsed
//! strictly ([`steward_tests::scrape`]), and the numbers checked against
//! what the cluster did: sessions, heartbeats, etcd calls, leadership
//! (with a leader SIGKILL), converge runs, and the VIP lease on a real
//! network namespace.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use steward_tests::scrape::{
    exported, http_exchange, scrape, status_code, steward_series_in, Exported, Exposition,
};
use steward_tests::{eventually, free_port, metrics_listen, Cluster};

fn coordinator_metrics(cluster: &Cluster, index: usize) -> SocketAddr {
    metrics_listen(&cluster.coordinators[index].config).expect("coordinator has metrics_listen")
}

/// Scrapes `addr`, `None` while it does not answer (for `eventually`).
fn try_scrape(addr: SocketAddr) -> Option<Exposition> {
    match scrape(addr) {
        Ok(e) => Some(e),
        Err(error) => {
            eprintln!("scrape: {error}");
            None
        }
    }
}

fn must_scrape(addr: SocketAddr) -> Exposition {
    scrape(addr).unwrap_or_else(|e| panic!("scrape failed: {e}"))
}

fn now_unix_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[test]
fn metrics_follow_sessions_heartbeats_etcd_converge_and_leadership() {
    let mut cluster = Cluster::new();
    cluster.coordinator_metrics = true;
    cluster.start_coordinators(3);
    let replicas: Vec<SocketAddr> = (0..3).map(|i| coordinator_metrics(&cluster, i)).collect();

    // node-1 converges for real: it has no roles, so its plan is empty and
    // the host is left alone, but runs happen and are reported.
    let mut agents = Vec::new();
    for node in ["node-1", "node-2", "node-3", "node-4"] {
        let extra: Vec<(&str, toml::Value)> = if node == "node-1" {
            vec![("converge.enabled", true.into())]
        } else {
            Vec::new()
        };
        agents.push(cluster.start_agent_with_metrics(node, &extra));
    }
    eventually(Duration::from_secs(10), "four healthy nodes", || {
        let nodes = cluster.nodes();
        (nodes.len() == 4 && nodes.iter().all(|n| n["health"] == "healthy")).then_some(())
    });

    // Connected agents on the replicas add up to the agents started, and
    // exactly one replica leads: the one stewardctl names.
    let scrapes = eventually(
        Duration::from_secs(10),
        "sessions and a leader in metrics",
        || {
            let s: Vec<Exposition> = replicas
                .iter()
                .map(|a| try_scrape(*a))
                .collect::<Option<_>>()?;
            let connected: f64 = s
                .iter()
                .map(|e| e.sum("steward_connected_agents", &[]))
                .sum();
            let leaders = s
                .iter()
                .filter(|e| e.get("steward_is_leader", &[]) == Some(1.0))
                .count();
            (connected == 4.0 && leaders == 1).then_some(s)
        },
    );
    let leader = cluster.leader().expect("a leader");
    let leader_index = cluster.coordinator_index(&leader);
    assert_eq!(
        scrapes[leader_index].get("steward_is_leader", &[]),
        Some(1.0),
        "stewardctl says {leader} leads"
    );
    for (i, e) in scrapes.iter().enumerate() {
        assert_eq!(
            e.get(
                "steward_build_info",
                &[
                    ("component", "coordinator"),
                    ("version", env!("CARGO_PKG_VERSION"))
                ]
            ),
            Some(1.0)
        );
        let leads = i == leader_index;
        assert_eq!(
            e.get("steward_leader_epoch", &[]).is_some_and(|v| v > 0.0),
            leads,
            "replica {i}: epoch only on the leader"
        );
        // Several etcd operations, each timed: reads, txns (status writes,
        // fenced writes), the member put, watches, the lease.
        for op in [
            "get",
            "put",
            "txn",
            "watch_open",
            "lease_grant",
            "lease_keepalive_open",
        ] {
            let count = e.get("steward_etcd_request_duration_seconds_count", &[("op", op)]);
            assert!(
                count.is_some_and(|c| c >= 1.0),
                "replica {i}: no etcd {op} timed ({count:?})"
            );
            let inf = e.get(
                "steward_etcd_request_duration_seconds_bucket",
                &[("op", op), ("le", "+Inf")],
            );
            assert_eq!(inf, count, "replica {i}: +Inf bucket is the count for {op}");
        }
    }
    let gets = scrapes[0].get(
        "steward_etcd_request_duration_seconds_sum",
        &[("op", "get")],
    );
    assert!(
        gets.is_some_and(|s| s > 0.0 && s < 60.0),
        "etcd get time sum is sane: {gets:?}"
    );

    // Each agent is connected to the replica the cluster says serves it,
    // and its heartbeat round trips are measured, more over time.
    let nodes = cluster.nodes();
    let mut first_rtt = Vec::new();
    for (index, addr) in &agents {
        let node = cluster.agents[*index].node.clone();
        let e = eventually(Duration::from_secs(5), "agent heartbeats measured", || {
            try_scrape(*addr).filter(|e| {
                e.get("steward_agent_heartbeat_rtt_seconds_count", &[])
                    .is_some_and(|c| c >= 1.0)
            })
        });
        assert_eq!(e.get("steward_agent_session_connected", &[]), Some(1.0));
        let serving = nodes
            .iter()
            .find(|n| n["id"] == node.as_str())
            .and_then(|n| n["replica"].as_str())
            .expect("serving replica")
            .to_owned();
        let url = cluster.coordinators[cluster.coordinator_index(&serving)]
            .url
            .clone();
        assert_eq!(
            e.get(
                "steward_agent_session_replica",
                &[("replica", url.as_str())]
            ),
            Some(1.0),
            "{node} is served by {serving}"
        );
        assert_eq!(
            e.matching("steward_agent_session_replica", &[]).count(),
            1,
            "one replica at a time"
        );
        let recorded = cluster.agent_desired(*index).expect("desired state").0;
        assert_eq!(
            e.get("steward_agent_desired_revision", &[]),
            Some(recorded as f64),
            "{node}: the revision in force"
        );
        let count = e
            .get("steward_agent_heartbeat_rtt_seconds_count", &[])
            .unwrap_or(0.0);
        let sum = e
            .get("steward_agent_heartbeat_rtt_seconds_sum", &[])
            .unwrap_or(-1.0);
        assert!(
            sum >= 0.0 && sum / count < 1.0,
            "{node}: mean loopback heartbeat RTT under a second ({sum} / {count})"
        );
        first_rtt.push(count);
    }
    for ((_, addr), before) in agents.iter().zip(&first_rtt) {
        eventually(Duration::from_secs(5), "more heartbeat round trips", || {
            let e = try_scrape(*addr)?;
            (e.get("steward_agent_heartbeat_rtt_seconds_count", &[])? > *before).then_some(())
        });
    }
    let heartbeats = |s: &[Exposition]| -> f64 {
        s.iter()
            .map(|e| e.sum("steward_heartbeats_received_total", &[]))
            .sum()
    };
    let received = heartbeats(&scrapes);
    eventually(Duration::from_secs(5), "replicas count heartbeats", || {
        let s: Vec<Exposition> = replicas
            .iter()
            .map(|a| try_scrape(*a))
            .collect::<Option<_>>()?;
        (heartbeats(&s) > received).then_some(())
    });

    // node-1 converged (an empty plan: ok), the others never ran.
    let (converging, converging_addr) = agents[0];
    let e = eventually(Duration::from_secs(10), "a converge run", || {
        try_scrape(converging_addr).filter(|e| {
            e.get(
                "steward_agent_converge_duration_seconds_count",
                &[("result", "ok")],
            )
            .is_some_and(|c| c >= 1.0)
        })
    });
    assert_eq!(
        e.get("steward_agent_converge_failed_runs_total", &[]),
        Some(0.0)
    );
    assert_eq!(
        e.get("steward_agent_converge_failed_resources", &[]),
        Some(0.0)
    );
    let last = e
        .get("steward_agent_converge_last_run_timestamp_seconds", &[])
        .unwrap_or(0.0);
    assert!(
        (now_unix_s() - last).abs() < 120.0,
        "last run is recent: {last}"
    );
    assert_eq!(
        e.sum(
            "steward_agent_converge_duration_seconds_count",
            &[("result", "failed")]
        ),
        0.0
    );
    let idle = must_scrape(agents[1].1);
    assert_eq!(
        idle.sum("steward_agent_converge_duration_seconds_count", &[]),
        0.0,
        "converging is off on node-2"
    );
    assert_eq!(
        idle.types
            .get("steward_agent_converge_duration_seconds")
            .map(String::as_str),
        Some("histogram")
    );
    // The report reached the replica serving node-1.
    let node1_replica = cluster
        .node(&cluster.agents[converging].node)
        .and_then(|n| n["replica"].as_str().map(String::from))
        .expect("node-1 is served");
    let served_by = coordinator_metrics(&cluster, cluster.coordinator_index(&node1_replica));
    eventually(
        Duration::from_secs(5),
        "the converge report at the replica",
        || {
            let e = try_scrape(served_by)?;
            (e.get(
                "steward_converge_reports_received_total",
                &[("result", "ok")],
            )? >= 1.0
                && e.get(
                    "steward_converge_report_duration_seconds_count",
                    &[("result", "ok")],
                )? >= 1.0)
                .then_some(())
        },
    );

    // SIGKILL the leader: a survivor becomes leader, and its transitions
    // counter says so; the agents fail over and count it.
    let before: Vec<f64> = scrapes
        .iter()
        .map(|e| e.sum("steward_leader_transitions_total", &[("to", "leader")]))
        .collect();
    let on_leader: Vec<SocketAddr> = agents
        .iter()
        .filter(|(i, _)| {
            let node = cluster.agents[*i].node.as_str();
            nodes
                .iter()
                .any(|n| n["id"] == node && n["replica"] == leader.as_str())
        })
        .map(|(_, addr)| *addr)
        .collect();
    cluster.coordinators[leader_index].proc.kill();
    let live: Vec<usize> = (0..3).filter(|i| *i != leader_index).collect();
    let new_leader = eventually(Duration::from_secs(20), "a new leader in metrics", || {
        let s: Vec<(usize, Exposition)> = live
            .iter()
            .map(|i| Some((*i, try_scrape(replicas[*i])?)))
            .collect::<Option<_>>()?;
        let leading: Vec<usize> = s
            .iter()
            .filter(|(_, e)| e.get("steward_is_leader", &[]) == Some(1.0))
            .map(|(i, _)| *i)
            .collect();
        match leading[..] {
            [one] => Some(one),
            _ => None,
        }
    });
    let after = must_scrape(replicas[new_leader]);
    let transitions = after.sum("steward_leader_transitions_total", &[("to", "leader")]);
    assert!(
        transitions > before[new_leader],
        "leader transitions on the new leader: {} before, {transitions} after",
        before[new_leader]
    );
    eventually(
        Duration::from_secs(20),
        "all agents on the survivors",
        || {
            let connected: f64 = live
                .iter()
                .map(|i| try_scrape(replicas[*i]).map(|e| e.sum("steward_connected_agents", &[])))
                .sum::<Option<f64>>()?;
            (connected == 4.0).then_some(())
        },
    );
    println!("agents served by the killed leader: {on_leader:?}");
    for addr in &on_leader {
        let e = must_scrape(*addr);
        assert!(
            e.get("steward_agent_reconnects_total", &[])
                .is_some_and(|r| r >= 1.0),
            "an agent of the killed leader reconnected"
        );
    }
}

#[test]
fn the_metrics_endpoint_refuses_bad_requests_and_keeps_serving() {
    let mut cluster = Cluster::new();
    cluster.coordinator_metrics = true;
    cluster.start_coordinators(1);
    let (_, agent) = cluster.start_agent_with_metrics("node-1", &[]);
    let coordinator = coordinator_metrics(&cluster, 0);
    eventually(Duration::from_secs(10), "the agent's endpoint", || {
        try_scrape(agent)
    });

    for addr in [coordinator, agent] {
        let code = |request: &[u8]| {
            let response =
                http_exchange(addr, request).unwrap_or_else(|e| panic!("{addr}: no answer: {e}"));
            status_code(&response)
        };
        assert_eq!(code(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"), Some(404));
        assert_eq!(code(b"GET / HTTP/1.0\r\n\r\n"), Some(404));
        assert_eq!(code(b"DELETE /metrics HTTP/1.1\r\n\r\n"), Some(405));
        assert_eq!(
            code(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03garbage\r\n\r\n"),
            Some(400)
        );
        assert_eq!(code(b"hello there\n\n"), Some(400));
        let mut huge = b"GET /metrics HTTP/1.1\r\n".to_vec();
        while huge.len() < 64 * 1024 {
            huge.extend_from_slice(b"X-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        huge.extend_from_slice(b"\r\n");
        assert_eq!(code(&huge), Some(431));
        // Half a request, then silence: disconnected unanswered once the
        // 5 s read timeout has passed, not held.
        let started = std::time::Instant::now();
        let response = http_exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            .expect("closed, not reset or held");
        let took = started.elapsed();
        assert_eq!(response, "", "{addr}: a slow client gets no answer");
        assert!(
            took >= Duration::from_secs(4) && took < Duration::from_secs(7),
            "{addr}: cut off after {took:?}"
        );
        // Idle connections that never finish a request do not block a
        // scrape (each times out on its own).
        let idle: Vec<std::net::TcpStream> = (0..4)
            .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
            .collect();
        let e = must_scrape(addr);
        assert!(e.samples.iter().any(|s| s.name == "steward_build_info"));
        drop(idle);
        // Still serving, and the format still parses.
        let e = must_scrape(addr);
        assert!(!e.types.is_empty());
    }
}

#[test]
fn vip_lease_series_follow_the_holder() {
    let bed = steward_tests::metered_lb::MeteredLb::start("metrics");
    let (cluster, lb, vip) = (&bed.cluster, &bed.lb, bed.vip);
    let (replicas, agent_metrics) = (&bed.replicas, bed.agent_metrics);

    // The agent: bound once, holding, with a quorum of fresh acks, and
    // lease round trips measured.
    let e = eventually(Duration::from_secs(5), "the agent's lease state", || {
        try_scrape(agent_metrics).filter(|e| {
            e.get("steward_agent_vip_holding", &[("vip", "front")]) == Some(1.0)
                && e.get("steward_agent_vip_lease_acks", &[("vip", "front")])
                    .is_some_and(|a| a >= 2.0)
        })
    });
    assert_eq!(
        e.get("steward_agent_vip_binds_total", &[("vip", "front")]),
        Some(1.0)
    );
    assert!(e
        .get("steward_agent_vip_lease_acks", &[("vip", "front")])
        .is_some_and(|a| a <= 3.0));
    assert!(
        e.get("steward_agent_vip_lease_rtt_seconds_count", &[])
            .is_some_and(|c| c >= 3.0),
        "lease round trips measured"
    );

    // Every replica: lb1 owns it, at one epoch, acked by this replica.
    let scrapes = eventually(Duration::from_secs(5), "every replica's view", || {
        let s: Vec<Exposition> = replicas
            .iter()
            .map(|a| try_scrape(*a))
            .collect::<Option<_>>()?;
        s.iter()
            .all(|e| {
                e.get("steward_vip_owner", &[("vip", "front"), ("node", "lb1")]) == Some(1.0)
                    && e.get("steward_vip_acking", &[("vip", "front")]) == Some(1.0)
                    && e.get("steward_vip_lease_acks_sent_total", &[("vip", "front")])
                        .is_some_and(|a| a >= 1.0)
            })
            .then_some(s)
    });
    let epochs: Vec<Option<f64>> = scrapes
        .iter()
        .map(|e| e.get("steward_vip_epoch", &[("vip", "front")]))
        .collect();
    assert!(
        epochs[0].is_some_and(|e| e > 0.0) && epochs.iter().all(|e| *e == epochs[0]),
        "one epoch everywhere: {epochs:?}"
    );
    for e in &scrapes {
        assert_eq!(
            e.get("steward_vip_expiry_marks", &[("vip", "front")]),
            Some(0.0)
        );
        assert_eq!(
            e.matching("steward_vip_owner", &[("vip", "front")]).count(),
            1,
            "one owner"
        );
    }
    // The leader placed it, once; no other replica did.
    let moves: Vec<f64> = scrapes
        .iter()
        .map(|e| e.sum("steward_vip_owner_moves_total", &[("vip", "front")]))
        .collect();
    let leader = cluster.coordinator_index(&cluster.leader().expect("a leader"));
    assert_eq!(moves[leader], 1.0, "moves by replica: {moves:?}");
    assert_eq!(
        moves.iter().sum::<f64>(),
        1.0,
        "moves by replica: {moves:?}"
    );

    // The lb role goes: the agent lets go and counts it.
    let out = cluster.ctl(&["role", "rm", lb.name(), "lb"]);
    assert!(out.ok(), "{}", out.stderr);
    let e = eventually(Duration::from_secs(10), "the release in metrics", || {
        try_scrape(agent_metrics)
            .filter(|e| e.get("steward_agent_vip_releases_total", &[("vip", "front")]) == Some(1.0))
    });
    assert!(!lb.has_address(vip), "the VIP is gone from lb1");
    assert_ne!(
        e.get("steward_agent_vip_holding", &[("vip", "front")]),
        Some(1.0)
    );
}

/// Every series the packaged Grafana dashboard queries is one the daemons
/// export (a renamed metric would leave an empty panel), every exported
/// family has a panel, and the datasource is the import's input.
#[test]
fn the_grafana_dashboard_queries_exported_series_only() {
    use std::collections::BTreeSet;

    let path = steward_tests::repo_root().join("packaging/grafana/steward-dashboard.json");
    let text = std::fs::read_to_string(&path).expect("dashboard");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    assert_eq!(dash["__inputs"][0]["name"], "DS_PROMETHEUS");

    // What the daemons export, the scrape-time views included.
    let Exported { families, series } = exported();

    let mut used = BTreeSet::new();
    let panels = dash["panels"].as_array().expect("panels");
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        assert_eq!(
            panel["datasource"]["uid"], "${DS_PROMETHEUS}",
            "panel {}",
            panel["title"]
        );
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            for name in steward_series_in(expr) {
                assert!(
                    series.contains(&name),
                    "panel {} queries {name}, which nothing exports",
                    panel["title"]
                );
                used.insert(name);
            }
        }
    }
    // Counters of plain activity need no panel of their own.
    let unpanelled = [
        "steward_agent_heartbeats_sent_total",
        "steward_agent_sessions_opened_total",
    ];
    for family in &families {
        let shown = used.iter().any(|u| {
            u == family
                || u.strip_prefix(family.as_str())
                    .is_some_and(|s| s.starts_with('_'))
        });
        assert!(
            shown || unpanelled.contains(&family.as_str()),
            "{family} has no panel"
        );
    }
}

/// A `metrics_listen` that cannot be bound fails the start, with the
/// address in the error, rather than leaving a daemon without its endpoint.
#[test]
fn an_unbindable_metrics_address_fails_the_start() {
    use steward_tests::{bin, Proc};

    let cluster = Cluster::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();

    let coordinator = cluster.coordinator_config("coord-1", free_port(), free_port());
    let mut t: toml::Table = std::fs::read_to_string(&coordinator)
        .expect("config")
        .parse()
        .expect("toml");
    t.insert("metrics_listen".into(), addr.clone().into());
    std::fs::write(&coordinator, toml::to_string(&t).expect("toml")).expect("write");
    let agent = cluster.agent_config_with(
        "node-1",
        "node-1",
        &["https://127.0.0.1:1".to_owned()],
        &[("metrics_listen", addr.clone().into())],
    );

    for (binary, config) in [
        ("steward-coordinator", coordinator),
        ("steward-agent", agent),
    ] {
        let mut cmd = std::process::Command::new(bin(binary));
        cmd.arg("--config").arg(&config);
        let log = cluster.dir.path().join(format!("{binary}-bind.log"));
        let mut proc = Proc::spawn(binary, cmd, log);
        eventually(Duration::from_secs(10), "the daemon to give up", || {
            (!proc.is_running()).then_some(())
        });
        let text = proc.log_text();
        assert!(
            text.contains(&format!("metrics endpoint on {addr}")) && text.contains("in use"),
            "{binary} said: {text}"
        );
    }
    drop(taken);
}
