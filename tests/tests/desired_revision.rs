//! An agent never takes a desired state older than the one in force
//! (issue 14, item 9): a coordinator whose etcd went back (here: a fresh,
//! empty etcd, so every revision is lower than before) offers the node a
//! state with a lower revision and no roles; the agent keeps its recorded
//! roles and says why, rather than being rolled back.

use std::time::Duration;

use steward_tests::{eventually, Cluster};

#[test]
fn an_older_desired_state_does_not_roll_the_node_back() {
    let mut cluster = Cluster::new();
    cluster.start_coordinators(1);
    let agent = cluster.start_agent("node-1");
    eventually(Duration::from_secs(5), "node-1", || cluster.node("node-1"));
    // Enough writes that the state in force has a revision a fresh etcd
    // does not reach while the test runs.
    for _ in 0..15 {
        assert!(cluster
            .ctl(&["role", "add", "node-1", "gluster-brick"])
            .ok());
        assert!(cluster.ctl(&["role", "rm", "node-1", "gluster-brick"]).ok());
    }
    assert!(cluster.ctl(&["role", "add", "node-1", "lb"]).ok());
    let (held, roles) = eventually(Duration::from_secs(5), "lb at the agent", || {
        cluster
            .agent_desired(agent)
            .filter(|(_, roles)| roles == &["lb"])
    });
    println!("in force: revision {held}, roles {roles:?}");

    // The coordinator comes back on an etcd that forgot everything.
    cluster.coordinators[0].proc.kill();
    cluster.etcd.restart_empty();
    cluster.restart_coordinator(0);
    // The agent's session reaches the new etcd (the node is known again),
    // and the coordinator offers it what that etcd says.
    eventually(Duration::from_secs(15), "node-1 back in etcd", || {
        cluster.node("node-1")
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        cluster.agent_desired(agent),
        Some((held, vec!["lb".to_owned()])),
        "the agent was rolled back"
    );
    let log = cluster.agents[agent].proc.log_text();
    let refusal = log
        .lines()
        .find(|l| l.contains("older than the") && l.contains("in force"))
        .unwrap_or_else(|| panic!("no refusal in the agent's log:\n{log}"));
    println!("{refusal}");
}
