//! One agent key must not be able to flush the audit trail (issue 14,
//! item 5): a hostile client with a valid agent certificate opens and
//! closes sessions in a loop, far more than the 1,000 events the log keeps,
//! and afterwards the earlier revocation and role change are still listed
//! by `stewardctl events`, while the churn itself left only a few lines.

use std::time::{Duration, Instant};

use steward_coordinator::pki::IdentityKind;
use steward_proto::domain::{AgentMessage, Facts, NodeId};
use steward_proto::pb::agent_service_client::AgentServiceClient;
use steward_tests::{eventually, grpc_channel, Cluster};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Sessions the hostile client opens and closes (each one a connected and
/// a disconnected event before the fix: 2,500 against a window of 1,000).
const CYCLES: usize = 1_250;

fn events(cluster: &Cluster) -> Vec<serde_json::Value> {
    let out = cluster.ctl(&["events", "-o", "json", "--limit", "10000"]);
    assert!(out.ok(), "{}", out.stderr);
    out.stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

/// Opens a session for `node` on `channel`, waits for the coordinator's
/// first message (the session is open and recorded), then drops it.
async fn one_session(channel: tonic::transport::Channel, node: &str) {
    let (tx, rx) = mpsc::channel(4);
    let hello = AgentMessage::Hello {
        node: NodeId::new(node).expect("node id"),
        facts: Facts::default(),
        last_applied_revision: 0,
        agent_version: "churn".into(),
        advertise_address: None,
    };
    tx.send(hello.into()).await.expect("send hello");
    let mut inbound = AgentServiceClient::new(channel)
        .session(ReceiverStream::new(rx))
        .await
        .expect("session opens")
        .into_inner();
    tokio::time::timeout(Duration::from_secs(5), inbound.message())
        .await
        .expect("the coordinator answers the hello")
        .expect("stream")
        .expect("a first message");
}

#[test]
fn session_churn_does_not_flush_revocations_and_role_changes() {
    let mut cluster = Cluster::new();
    // The hello budget (10, then one per 5 s) would refuse the churner's
    // sessions long before 1,250: lifted here so that the session events
    // themselves are what is rate-limited and kept apart.
    cluster
        .coordinator_extra
        .push(("sessions.hello_burst".into(), toml::Value::Integer(100_000)));
    cluster.start_coordinators(1);
    cluster.start_agent("node-a");
    eventually(Duration::from_secs(5), "node-a", || cluster.node("node-a"));
    let out = cluster.ctl(&["role", "add", "node-a", "lb"]);
    assert!(out.ok(), "{}", out.stderr);
    let out = cluster.ctl(&["node", "revoke", "node-a"]);
    assert!(out.ok(), "{}", out.stderr);
    let audit = |events: &[serde_json::Value]| {
        let has = |kind: &str| {
            events
                .iter()
                .any(|e| e["kind"] == kind && e["node"] == "node-a")
        };
        (has("node-revoked"), has("roles-changed"))
    };
    assert_eq!(audit(&events(&cluster)), (true, true));

    cluster.cert("churner", IdentityKind::Agent);
    let url = cluster.coordinators[0].url.clone();
    let started = Instant::now();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let channel = grpc_channel(&cluster, &url, Some("churner"))
            .await
            .expect("dial");
        for _ in 0..CYCLES {
            one_session(channel.clone(), "churner").await;
        }
    });
    println!(
        "{CYCLES} sessions opened and closed in {:?}",
        started.elapsed()
    );

    // The leader trims every second; give it a few.
    std::thread::sleep(Duration::from_secs(3));
    let listed = events(&cluster);
    let churn: Vec<&serde_json::Value> = listed.iter().filter(|e| e["node"] == "churner").collect();
    println!(
        "{} events listed, {} of them the churner's",
        listed.len(),
        churn.len()
    );
    assert_eq!(
        audit(&listed),
        (true, true),
        "the revocation and the role change are still listed"
    );
    // One pair per 10 s (and the first registration), not one per session.
    let seconds = started.elapsed().as_secs() as usize;
    assert!(
        churn.len() <= 2 * (seconds / 10 + 1) + 3,
        "{} churn events in {seconds} s",
        churn.len()
    );
}
