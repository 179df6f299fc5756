//! Bad input of every kind gets a clear error and changes nothing.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use steward_proto::pb;
use steward_proto::pb::admin_service_client::AdminServiceClient;
use steward_proto::pb::agent_service_client::AgentServiceClient;
use steward_tests::{bin, eventually, grpc_channel, repo_root, Cluster};

fn check_config(binary: &str, fixture: &str) -> (Option<i32>, String) {
    let path = repo_root().join("tests/fixtures/invalid").join(fixture);
    let out = Command::new(bin(binary))
        .arg("--config")
        .arg(&path)
        .arg("--check")
        .output()
        .expect("run");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn invalid_configs_are_rejected_with_every_problem() {
    let (code, err) = check_config("steward-coordinator", "coordinator-unknown-key.toml");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("unknown field `listen_port`"), "{err}");

    let (code, err) = check_config("steward-coordinator", "coordinator-malformed.toml");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("TOML parse error"), "{err}");

    let (code, err) = check_config("steward-coordinator", "coordinator-many-problems.toml");
    assert_eq!(code, Some(2), "{err}");
    for expected in [
        "id \"coord 1!\"",
        "advertise",
        "tls.ca",
        "tls.cert",
        "tls.key",
        "etcd.endpoints",
        "member_lease_ttl_s",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }

    let (code, err) = check_config("steward-agent", "agent-unknown-key.toml");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("unknown field `heartbeat_secs`"), "{err}");

    let (code, err) = check_config("steward-agent", "agent-plaintext-coordinator.toml");
    assert_eq!(code, Some(2), "{err}");
    for expected in [
        "node_id",
        "must be an https:// URL",
        "heartbeat_interval_ms",
        "tls.ca",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
}

#[test]
fn packaged_example_configs_are_valid_apart_from_their_files() {
    // The examples point at /etc/steward/pki, which does not exist here, so
    // the only problems reported must be those missing files.
    for (binary, example) in [
        ("steward-coordinator", "coordinator.example.toml"),
        ("steward-agent", "agent.example.toml"),
    ] {
        let out = Command::new(bin(binary))
            .arg("--config")
            .arg(repo_root().join("packaging").join(example))
            .arg("--check")
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        if Path::new("/etc/steward/pki/ca.crt").exists() {
            continue;
        }
        let problems: Vec<&str> = err
            .lines()
            .filter(|l| l.trim_start().starts_with("- "))
            .collect();
        assert!(!problems.is_empty(), "{err}");
        assert!(
            problems.iter().all(|p| p.contains("No such file")),
            "{example} has problems beyond missing certificate files:\n{err}"
        );
    }
}

/// Everything an operator can observe, to prove a rejected request changed nothing.
fn observable(cluster: &Cluster) -> (String, usize) {
    let nodes = cluster.ctl(&["nodes", "-o", "json"]);
    assert!(nodes.ok(), "{}", nodes.stderr);
    let mut v = nodes.json();
    // last_seen and health samples move on their own; roles and revisions must not.
    for n in v.as_array_mut().into_iter().flatten() {
        let o = n.as_object_mut().expect("object");
        for volatile in [
            "last_seen",
            "last_health",
            "applied_revision",
            "facts",
            "health",
        ] {
            o.remove(volatile);
        }
    }
    let events = cluster.ctl(&["events", "-o", "json", "--limit", "1000"]);
    (v.to_string(), events.stdout.lines().count())
}

#[test]
fn bad_requests_get_clear_errors_and_change_nothing() {
    let mut cluster = Cluster::new();
    cluster.start_coordinators(1);
    cluster.start_agent("node-1");
    eventually(Duration::from_secs(5), "node-1", || cluster.node("node-1"));
    assert!(cluster.ctl(&["role", "add", "node-1", "lb"]).ok());
    let before = observable(&cluster);

    let out = cluster.ctl(&["role", "add", "ghost", "lb"]);
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("unknown node ghost"), "{}", out.stderr);
    assert_eq!(
        out.stderr.trim().lines().count(),
        1,
        "one line: {}",
        out.stderr
    );

    let out = cluster.ctl(&["role", "add", "node-1", "database"]);
    assert_eq!(out.code, Some(2));
    assert!(
        out.stderr.contains("unknown role \"database\""),
        "{}",
        out.stderr
    );

    let out = cluster.ctl(&["role", "rm", "node-1", "k8s-worker"]);
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr.contains("node-1 does not have role k8s-worker"),
        "{}",
        out.stderr
    );

    let out = cluster.ctl(&["node", "show", "ghost"]);
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("unknown node ghost"), "{}", out.stderr);

    // Hostile messages straight on the wire.
    let url = cluster.coordinators[0].url.clone();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut admin = AdminServiceClient::new(
            grpc_channel(&cluster, &url, Some("admin"))
                .await
                .expect("dial"),
        );
        let status = admin
            .add_roles(pb::ChangeRolesRequest {
                node_id: "node-1".into(),
                roles: vec![99],
            })
            .await
            .expect_err("role 99");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
        let status = admin
            .add_roles(pb::ChangeRolesRequest {
                node_id: "node-1".into(),
                roles: vec![],
            })
            .await
            .expect_err("no roles");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
        let status = admin
            .get_node(pb::GetNodeRequest {
                node_id: "../../etc".into(),
            })
            .await
            .expect_err("bad id");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
    });

    assert_eq!(
        observable(&cluster),
        before,
        "a rejected request changed state"
    );
}

#[test]
fn certificates_decide_who_may_do_what() {
    let mut cluster = Cluster::new();
    cluster.start_coordinators(1);
    cluster.start_agent("node-1");
    eventually(Duration::from_secs(5), "node-1", || cluster.node("node-1"));
    let url = cluster.coordinators[0].url.clone();
    let before = observable(&cluster);

    // An agent certificate may not use the admin API.
    let out = cluster.ctl_as("node-1", &[url.as_str()], &["role", "add", "node-1", "lb"]);
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr.contains("may not use the admin API"),
        "{}",
        out.stderr
    );

    // A certificate from another CA is refused at the handshake.
    let foreign = tempfile::tempdir().expect("tempdir");
    steward_coordinator::pki::init_ca(foreign.path(), "evil").expect("ca");
    steward_coordinator::pki::issue(
        foreign.path(),
        "admin",
        steward_coordinator::pki::IdentityKind::Admin,
        &[],
    )
    .expect("cert");
    let out = Command::new(bin("stewardctl"))
        .env("STEWARD_ENDPOINTS", &url)
        .env("STEWARD_CA", cluster.pki().join("ca.crt"))
        .env("STEWARD_CERT", foreign.path().join("admin.crt"))
        .env("STEWARD_KEY", foreign.path().join("admin.key"))
        .args(["role", "add", "node-1", "lb"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));

    cluster.cert("node-2", steward_coordinator::pki::IdentityKind::Agent);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let hello = |node: &str| pb::AgentMessage {
            kind: Some(pb::agent_message::Kind::Hello(pb::Hello {
                node_id: node.into(),
                facts: Some(pb::Facts::default()),
                last_applied_revision: 0,
                agent_version: "test".into(),
                advertise_address: String::new(),
            })),
        };
        // node-2's certificate claiming node-1.
        let mut agent = AgentServiceClient::new(
            grpc_channel(&cluster, &url, Some("node-2"))
                .await
                .expect("dial"),
        );
        let status = agent
            .session(tokio_stream::iter(vec![hello("node-1")]))
            .await
            .expect_err("impersonation");
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}");
        assert!(
            status
                .message()
                .contains("may not speak for node \"node-1\""),
            "{status}"
        );

        // An admin certificate may not open an agent session.
        let mut agent = AgentServiceClient::new(
            grpc_channel(&cluster, &url, Some("admin"))
                .await
                .expect("dial"),
        );
        let status = agent
            .session(tokio_stream::iter(vec![hello("node-1")]))
            .await
            .expect_err("admin as agent");
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}");

        // A session that does not start with a hello, or a hello without facts.
        let mut agent = AgentServiceClient::new(
            grpc_channel(&cluster, &url, Some("node-2"))
                .await
                .expect("dial"),
        );
        let heartbeat = pb::AgentMessage {
            kind: Some(pb::agent_message::Kind::Heartbeat(pb::Heartbeat {
                seq: 1,
                sent_at_unix_ms: 0,
                health: Some(pb::Health::default()),
            })),
        };
        let status = agent
            .session(tokio_stream::iter(vec![heartbeat]))
            .await
            .expect_err("no hello");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
        let bare = pb::AgentMessage {
            kind: Some(pb::agent_message::Kind::Hello(pb::Hello {
                node_id: "node-2".into(),
                facts: None,
                last_applied_revision: 0,
                agent_version: String::new(),
                advertise_address: String::new(),
            })),
        };
        let status = agent
            .session(tokio_stream::iter(vec![bare]))
            .await
            .expect_err("no facts");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");

        // No client certificate at all: refused.
        match grpc_channel(&cluster, &url, None).await {
            Err(_) => {}
            Ok(channel) => {
                let mut admin = AdminServiceClient::new(channel);
                let result = admin.status(pb::StatusRequest {}).await;
                assert!(
                    result.is_err(),
                    "a call without a client certificate succeeded"
                );
            }
        }
    });

    assert_eq!(
        observable(&cluster),
        before,
        "a refused caller changed state"
    );
    let nodes = cluster.nodes();
    assert!(
        nodes.iter().all(|n| n["id"] != "node-2"),
        "node-2 registered without a valid session"
    );
}

/// A node's own text (facts, converge details) reaches operators' terminals
/// through `stewardctl`: escape sequences in it (clear screen, window
/// title, OSC 52 clipboard write) are made harmless in table output, and
/// kept exact in JSON (issue 14, item 8).
#[test]
fn agent_supplied_text_cannot_drive_the_terminal() {
    let mut cluster = Cluster::new();
    cluster.start_coordinators(1);
    cluster.cert("evil", steward_coordinator::pki::IdentityKind::Agent);
    let url = cluster.coordinators[0].url.clone();
    const HOSTILE: &str = "host\x1b]0;owned\x07\x1b[2J\x1b]52;c;ZXZpbA==\x07\u{9b}31m\r";
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::AgentMessage>(4);
    let _session = rt.block_on(async {
        let facts = pb::Facts {
            hostname: HOSTILE.into(),
            os: HOSTILE.into(),
            kernel: HOSTILE.into(),
            interfaces: vec![pb::NetworkInterface {
                name: HOSTILE.into(),
                mac: HOSTILE.into(),
                addresses: vec![HOSTILE.into()],
            }],
            ..Default::default()
        };
        let hello = pb::AgentMessage {
            kind: Some(pb::agent_message::Kind::Hello(pb::Hello {
                node_id: "evil".into(),
                facts: Some(facts),
                last_applied_revision: 0,
                agent_version: "test".into(),
                advertise_address: String::new(),
            })),
        };
        tx.send(hello).await.expect("hello");
        AgentServiceClient::new(
            grpc_channel(&cluster, &url, Some("evil"))
                .await
                .expect("dial"),
        )
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("session")
        .into_inner()
    });
    eventually(Duration::from_secs(5), "evil listed", || {
        cluster.node("evil")
    });
    for args in [
        &["node", "show", "evil"][..],
        &["nodes"][..],
        &["events"][..],
    ] {
        let out = cluster.ctl(args);
        assert!(out.ok(), "stewardctl {args:?}: {}", out.stderr);
        assert!(
            !out.stdout.contains('\x1b')
                && !out.stdout.contains('\x07')
                && !out.stdout.contains('\u{9b}'),
            "stewardctl {args:?} printed control characters: {:?}",
            out.stdout
        );
    }
    let shown = cluster.ctl(&["node", "show", "evil"]).stdout;
    assert!(shown.contains("host?]0;owned?"), "{shown}");
    // JSON is exact: the hostile text, escaped by JSON itself.
    let json = cluster.ctl(&["node", "show", "evil", "-o", "json"]).json();
    assert_eq!(json["facts"]["hostname"], HOSTILE, "{json}");
    drop(tx);
}
