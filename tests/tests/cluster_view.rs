//! The cluster view in every node's desired state: the members its roles
//! consume with their roles and addresses, and the VIPs, computed alike by
//! every replica.

use std::net::IpAddr;
use std::time::Duration;

use steward_proto::domain::DesiredState;
use steward_tests::{eventually, AgentProc, Cluster};

/// The desired state agent `index` has recorded (`desired.json`).
fn recorded(cluster: &Cluster, index: usize) -> Option<DesiredState> {
    let path = cluster.agents[index].state_dir.join("desired.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    serde_json::from_value(v["desired"].clone()).ok()
}

/// (node, roles, address) of every member, as strings.
fn members(d: &DesiredState) -> Vec<(String, Vec<String>, Option<IpAddr>)> {
    d.cluster
        .members
        .iter()
        .map(|m| {
            (
                m.node.to_string(),
                m.roles.iter().map(|r| r.to_string()).collect(),
                m.address,
            )
        })
        .collect()
}

#[test]
fn every_agent_gets_members_with_addresses_and_vips() {
    let mut cluster = Cluster::new();
    cluster.start_coordinators(2);
    let urls = cluster.coordinator_urls();
    // Different replicas serve different agents: they must agree.
    cluster.start_agent_on("node-1", &urls[..1]);
    cluster.start_agent_on("node-2", &urls[1..]);
    let advertised: IpAddr = "198.18.0.77".parse().unwrap();
    let config = cluster.agent_config_with(
        "node-3",
        "node-3",
        &urls[..1],
        &[("advertise_address", advertised.to_string().into())],
    );
    let proc = cluster.spawn_agent("node-3", &config, None);
    cluster.agents.push(AgentProc {
        node: "node-3".into(),
        netns: None,
        state_dir: cluster.dir.path().join("state-node-3"),
        config,
        proc,
    });
    eventually(Duration::from_secs(5), "three healthy nodes", || {
        let nodes = cluster.nodes();
        (nodes.len() == 3 && nodes.iter().all(|n| n["health"] == "healthy")).then_some(())
    });

    for (node, role) in [
        ("node-1", "lb"),
        ("node-2", "lb"),
        ("node-3", "k8s-control-plane"),
    ] {
        let out = cluster.ctl(&["role", "add", node, role]);
        assert!(out.ok(), "{}", out.stderr);
    }
    let loopback: IpAddr = "127.0.0.1".parse().unwrap();
    let expected = vec![
        ("node-1".to_owned(), vec!["lb".to_owned()], Some(loopback)),
        ("node-2".to_owned(), vec!["lb".to_owned()], Some(loopback)),
        (
            "node-3".to_owned(),
            vec!["k8s-control-plane".to_owned()],
            Some(advertised),
        ),
    ];
    // The lb nodes see every member (HAProxy backends may be any role); the
    // control plane sees the Kubernetes members only: itself.
    let want = |i: usize| {
        if i < 2 {
            expected.clone()
        } else {
            expected[2..].to_vec()
        }
    };
    let states = eventually(Duration::from_secs(3), "the view at every agent", || {
        let states: Vec<DesiredState> = (0..3)
            .map(|i| recorded(&cluster, i))
            .collect::<Option<_>>()?;
        (0..3)
            .all(|i| members(&states[i]) == want(i))
            .then_some(states)
    });
    // One view, one revision, whichever replica computed it.
    assert_eq!(states[0].cluster, states[1].cluster);
    assert_eq!(states[0].revision, states[1].revision);
    assert_eq!(
        states.iter().map(|d| d.roles.len()).collect::<Vec<_>>(),
        [1, 1, 1]
    );
    let first_revision = states.iter().map(|d| d.revision).min().unwrap();

    // The operator sees the same addresses.
    let nodes = cluster.nodes();
    for (node, _, address) in &expected {
        let n = nodes.iter().find(|n| n["id"] == node.as_str()).expect(node);
        assert_eq!(n["address"], address.map(|a| a.to_string()).unwrap(), "{n}");
    }

    // A VIP appears in every member's view. Its only candidate has no lb
    // role, so no agent binds it on this machine.
    let out = cluster.ctl(&[
        "vip",
        "set",
        "front",
        "--address",
        "198.18.255.77/32",
        "--interface",
        "lo",
        "--candidate",
        "node-3",
        "--check",
        "none",
    ]);
    assert!(out.ok(), "{}", out.stderr);
    let states = eventually(Duration::from_secs(3), "the VIP at every agent", || {
        let states: Vec<DesiredState> = (0..3)
            .map(|i| recorded(&cluster, i))
            .collect::<Option<_>>()?;
        states
            .iter()
            .all(|d| {
                d.cluster.vips.len() == 1
                    && d.cluster.vips[0].name == "front"
                    && d.cluster.vips[0].address.to_string() == "198.18.255.77"
                    && d.cluster.vips[0].prefix == 32
            })
            .then_some(states)
    });
    assert!(states.iter().all(|d| d.revision > first_revision));
    // The agents report what they recorded, and the operator sees it.
    let revisions: Vec<u64> = states.iter().map(|d| d.revision).collect();
    eventually(Duration::from_secs(3), "applied revisions reported", || {
        let nodes = cluster.nodes();
        (0..3)
            .all(|i| {
                let n = nodes
                    .iter()
                    .find(|n| n["id"] == expected[i].0.as_str())
                    .expect("listed");
                n["applied_revision"] == revisions[i] && n["desired_revision"] == revisions[i]
            })
            .then_some(())
    });
    let revision = *revisions.iter().max().unwrap();

    // Removing the VIP moves the revision forward too (a removal leaves no
    // key behind to take a revision from).
    let out = cluster.ctl(&["vip", "rm", "front"]);
    assert!(out.ok(), "{}", out.stderr);
    eventually(
        Duration::from_secs(3),
        "the VIP gone at every agent",
        || {
            (0..3)
                .map(|i| recorded(&cluster, i))
                .collect::<Option<Vec<_>>>()?
                .iter()
                .all(|d| d.cluster.vips.is_empty() && d.revision > revision)
                .then_some(())
        },
    );
}
