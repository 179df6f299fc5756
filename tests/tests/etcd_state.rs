//! Invariants checked directly against the real etcd.

use std::time::Duration;

use steward_coordinator::config::EtcdConfig;
use steward_coordinator::error::Error;
use steward_coordinator::replica::Fence;
use steward_coordinator::store;
use steward_tests::{eventually, Cluster};

fn etcd_config(cluster: &Cluster) -> EtcdConfig {
    EtcdConfig {
        endpoints: vec![cluster.etcd.client_url.clone()],
        tls: None,
        dial_timeout_ms: 2000,
        request_timeout_ms: 5000,
    }
}

#[test]
fn heartbeats_never_become_etcd_writes() {
    let mut cluster = Cluster::new();
    cluster.start_coordinators(1);
    for node in ["node-1", "node-2", "node-3"] {
        cluster.start_agent(node); // heartbeat every 200 ms
    }
    eventually(Duration::from_secs(5), "three healthy nodes", || {
        let nodes = cluster.nodes();
        (nodes.len() == 3 && nodes.iter().all(|n| n["health"] == "healthy")).then_some(())
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    let config = etcd_config(&cluster);
    let revision = || {
        rt.block_on(async {
            let client = store::connect(&config, true).await.unwrap();
            let resp = client.kv_client().get("/", None).await.unwrap();
            resp.header().unwrap().revision()
        })
    };
    // Let connection-time writes (status, events) land.
    std::thread::sleep(Duration::from_millis(500));
    let before = revision();
    // 3 agents x 5 heartbeats/s x 3 s = 45 heartbeats.
    std::thread::sleep(Duration::from_secs(3));
    let after = revision();
    assert_eq!(
        after,
        before,
        "etcd saw {} writes while the cluster was idle",
        after - before
    );
    // ...while a real change does reach etcd.
    assert!(cluster.ctl(&["role", "add", "node-1", "lb"]).ok());
    assert!(revision() > after);
}

#[test]
fn a_fence_from_a_lost_leadership_is_refused() {
    let cluster = Cluster::new();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = store::connect(&etcd_config(&cluster), true).await.unwrap();
        let lease = client.lease_client().grant(10, None).await.unwrap().id();
        let mut election = client.election_client();
        let leader = election
            .campaign("/steward/test/coordinators/election", "a", lease)
            .await
            .unwrap()
            .take_leader()
            .unwrap();
        let fence = Fence {
            epoch: leader.rev(),
            leader_key: leader.key().to_vec(),
        };
        let op = |v: &str| vec![etcd_client_put("/steward/test/fenced", v)];
        fence
            .txn(&client, op("while leading"))
            .await
            .expect("leader write");

        // Losing the lease deletes the leader key: the old epoch is dead.
        client.lease_client().revoke(lease).await.unwrap();
        let err = fence.txn(&client, op("after losing it")).await.unwrap_err();
        assert!(
            matches!(err, Error::LostLeadership { epoch } if epoch == fence.epoch),
            "{err}"
        );

        // A new leader gets a higher epoch; the old fence still fails.
        let lease2 = client.lease_client().grant(10, None).await.unwrap().id();
        let leader2 = election
            .campaign("/steward/test/coordinators/election", "b", lease2)
            .await
            .unwrap()
            .take_leader()
            .unwrap();
        assert!(leader2.rev() > fence.epoch);
        assert!(fence.txn(&client, op("stale")).await.is_err());
        let value = client
            .kv_client()
            .get("/steward/test/fenced", None)
            .await
            .unwrap();
        assert_eq!(value.kvs()[0].value(), b"while leading");
    });
}

fn etcd_client_put(key: &str, value: &str) -> steward_coordinator::replica::TxnOp {
    steward_coordinator::replica::TxnOp::put(key, value, None)
}
