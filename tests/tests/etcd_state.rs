//! Invariants checked directly against the real etcd.

use std::net::IpAddr;
use std::time::Duration;

use steward_coordinator::error::Error;
use steward_coordinator::pki::IdentityKind;
use steward_coordinator::replica::Fence;
use steward_coordinator::store::kv::{Cmp, Op, Txn};
use steward_coordinator::store::{self, Keys, Store};
use steward_proto::converge::{ConvergeReport, ResourceState, ResourceStatus};
use steward_proto::domain::{AgentMessage, CoordinatorMessage, Facts, Health, NodeId};
use steward_proto::pb;
use steward_proto::pb::agent_service_client::AgentServiceClient;
use steward_tests::{eventually, grpc_channel, Cluster};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

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
    let config = cluster.etcd.config();
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
        let config = cluster.etcd.config();
        let store = |id: &str| Store::connect(&config, Keys::new("test"), id.to_owned());
        let (a, b) = (store("a").await.unwrap(), store("b").await.unwrap());
        let lease = a.grant_lease(Duration::from_secs(10)).await.unwrap();
        let leader = a.campaign(lease).await.unwrap();
        let fence = Fence {
            epoch: leader.revision,
            leader_key: leader.key.clone(),
        };
        let key = "/steward/test/fenced";
        let write = |v: &str| Txn::new().and_then([Op::put(key, v.as_bytes().to_vec())]);
        let outcome = fence
            .txn(&a, write("while leading"))
            .await
            .expect("leader write");
        assert!(outcome.succeeded);
        // The inner transaction's own guard decides its writes, not the fence.
        let guarded = Txn::new()
            .when([Cmp::absent(key)])
            .and_then([Op::put(key, b"overwritten".to_vec())]);
        assert!(!fence.txn(&a, guarded).await.expect("fence held").succeeded);

        // Losing the lease deletes the leader key: the old epoch is dead.
        a.revoke_lease(lease).await.unwrap();
        let err = fence.txn(&a, write("after losing it")).await.unwrap_err();
        assert!(
            matches!(err, Error::LostLeadership { epoch } if epoch == fence.epoch),
            "{err}"
        );

        // A new leader gets a higher epoch; the old fence still fails.
        let lease2 = b.grant_lease(Duration::from_secs(10)).await.unwrap();
        let leader2 = b.campaign(lease2).await.unwrap();
        assert!(leader2.revision > fence.epoch);
        assert_eq!(a.leader().await.unwrap().as_deref(), Some("b"));
        assert!(fence.txn(&a, write("stale")).await.is_err());
        let client = store::connect(&config, true).await.unwrap();
        let value = client.kv_client().get(key, None).await.unwrap();
        assert_eq!(value.kvs()[0].value(), b"while leading");
    });
}

/// An agent session spoken by hand, to send exactly what a test needs.
struct RawSession {
    tx: mpsc::Sender<pb::AgentMessage>,
    inbound: tonic::Streaming<pb::CoordinatorMessage>,
    seq: u64,
}

impl RawSession {
    async fn open(
        cluster: &Cluster,
        node: &str,
        advertise: Option<IpAddr>,
    ) -> Result<RawSession, tonic::Status> {
        let url = cluster.coordinators[0].url.clone();
        let channel = grpc_channel(cluster, &url, Some(node)).await.expect("dial");
        let (tx, rx) = mpsc::channel(16);
        let hello = AgentMessage::Hello {
            node: NodeId::new(node).expect("node id"),
            facts: Facts::default(),
            last_applied_revision: 0,
            agent_version: "test".into(),
            advertise_address: advertise,
        };
        tx.send(hello.into()).await.expect("send hello");
        let inbound = AgentServiceClient::new(channel)
            .session(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(RawSession {
            tx,
            inbound,
            seq: 0,
        })
    }

    async fn send(&self, message: AgentMessage) {
        self.tx.send(message.into()).await.expect("send");
    }

    /// Returns once the coordinator has handled everything sent so far: it
    /// handles a session's messages in order, and acks heartbeats.
    async fn sync(&mut self) {
        self.seq += 1;
        self.send(AgentMessage::Heartbeat {
            seq: self.seq,
            sent_at_unix_ms: 0,
            health: Health::default(),
        })
        .await;
        loop {
            let message = self.inbound.message().await.expect("stream").expect("open");
            if let Ok(CoordinatorMessage::HeartbeatAck { seq, .. }) =
                CoordinatorMessage::try_from(message)
            {
                if seq == self.seq {
                    return;
                }
            }
        }
    }
}

fn report(finished_unix_ms: u64, haproxy: ResourceStatus) -> AgentMessage {
    AgentMessage::Report {
        applied_revision: 0,
        converge: Some(ConvergeReport {
            revision: 0,
            finished_unix_ms,
            duration_ms: (finished_unix_ms % 1000) as u32,
            resources: vec![
                ResourceState {
                    id: "sysctl:net.ipv4.ip_nonlocal_bind".into(),
                    status: ResourceStatus::Ok,
                    detail: String::new(),
                    since_unix_ms: 1,
                },
                ResourceState {
                    id: "package:haproxy".into(),
                    status: haproxy,
                    detail: match haproxy {
                        ResourceStatus::Failed => "apt-get: no network".into(),
                        _ => String::new(),
                    },
                    since_unix_ms: 2,
                },
            ],
        }),
    }
}

#[test]
fn converge_reports_and_addresses_are_written_on_change_only() {
    let mut cluster = Cluster::new();
    cluster.start_coordinators(1);
    cluster.cert("node-9", IdentityKind::Agent);
    let config = cluster.etcd.config();
    let keys = Keys::new(&cluster.name);
    let id = NodeId::new("node-9").unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let etcd = store::connect(&config, true).await.unwrap();
        // (value, version): the version counts the key's writes.
        let read = |key: String| {
            let etcd = etcd.clone();
            async move {
                let resp = etcd.kv_client().get(key, None).await.unwrap();
                resp.kvs().first().map(|kv| {
                    let v: serde_json::Value = serde_json::from_slice(kv.value()).unwrap();
                    (v, kv.version())
                })
            }
        };
        // Reports reach etcd through the session's writer task, after the
        // ack the test syncs on: wait for `key` to reach `want` writes, then
        // check that no further write follows.
        let settled = |key: String, want: i64| {
            let read = &read;
            async move {
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                loop {
                    let version = read(key.clone()).await.map_or(0, |(_, v)| v);
                    assert!(version <= want, "{key}: {version} writes, expected {want}");
                    if version == want {
                        break;
                    }
                    assert!(
                        std::time::Instant::now() < deadline,
                        "{key}: {version} writes after 5 s, expected {want}"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
                let (value, version) = read(key.clone()).await.expect("still there");
                assert_eq!(version, want, "{key}: written again");
                value
            }
        };
        let advertised: IpAddr = "198.18.0.9".parse().unwrap();

        let mut session = RawSession::open(&cluster, "node-9", Some(advertised))
            .await
            .expect("session");
        session.sync().await;
        let (address, version) = read(keys.node_address(&id)).await.expect("address");
        assert_eq!(address["address"], "198.18.0.9");
        assert_eq!(version, 1);

        session.send(report(1_000, ResourceStatus::Ok)).await;
        session.sync().await;
        let stored = settled(keys.node_converge(&id), 1).await;
        assert_eq!(stored["finished_unix_ms"], 1_000);
        // Later runs that found the same: only their timing differs.
        for finished in [2_000, 3_000, 4_321] {
            session.send(report(finished, ResourceStatus::Ok)).await;
        }
        // A report without a finished run, and heartbeats, write nothing.
        session
            .send(AgentMessage::Report {
                applied_revision: 0,
                converge: None,
            })
            .await;
        session.sync().await;
        settled(keys.node_converge(&id), 1).await;

        // A new outcome is written once.
        session.send(report(5_000, ResourceStatus::Failed)).await;
        session.send(report(6_000, ResourceStatus::Failed)).await;
        session.sync().await;
        let stored = settled(keys.node_converge(&id), 2).await;
        // Reports reach etcd through the session's writer, latest first:
        // of two with one outcome sent back to back, either is the one.
        let finished = stored["finished_unix_ms"].as_u64();
        assert!(matches!(finished, Some(5_000 | 6_000)), "{stored}");

        // The operator sees the address and the failure.
        let out = cluster.ctl(&["node", "show", "node-9", "-o", "json"]);
        assert!(out.ok(), "{}", out.stderr);
        let node = out.json();
        assert_eq!(node["address"], "198.18.0.9");
        assert_eq!(node["converge"]["counts"]["failed"], 1, "{node}");
        assert_eq!(
            node["converge"]["resources"][1]["detail"],
            "apt-get: no network"
        );
        let table = cluster.ctl(&["node", "show", "node-9"]);
        for expected in [
            "address:   198.18.0.9",
            "ms: 1 ok, 0 changed, 1 failed, 0 not applicable",
            "RESOURCE",
            "apt-get: no network",
        ] {
            assert!(table.stdout.contains(expected), "{}", table.stdout);
        }
        let nodes = cluster.ctl(&["nodes"]);
        assert!(nodes.stdout.contains("1 failed"), "{}", nodes.stdout);

        // Reconnecting with the same address and outcome writes neither.
        drop(session);
        let mut session = RawSession::open(&cluster, "node-9", Some(advertised))
            .await
            .expect("session");
        session.send(report(7_000, ResourceStatus::Failed)).await;
        session.sync().await;
        settled(keys.node_address(&id), 1).await;
        settled(keys.node_converge(&id), 2).await;

        // Without an advertised address, the session's source address.
        drop(session);
        let mut session = RawSession::open(&cluster, "node-9", None)
            .await
            .expect("session");
        session.sync().await;
        let (address, version) = read(keys.node_address(&id)).await.unwrap();
        assert_eq!(address["address"], "127.0.0.1");
        assert_eq!(version, 2);

        // An address nobody can reach is refused, and not recorded.
        drop(session);
        let refused = RawSession::open(&cluster, "node-9", Some("0.0.0.0".parse().unwrap()))
            .await
            .err()
            .expect("unspecified address refused");
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused}");
        assert_eq!(read(keys.node_address(&id)).await.unwrap().1, 2);
    });
}
