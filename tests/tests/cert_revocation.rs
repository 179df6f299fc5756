//! Admin and coordinator keys can be revoked, and a certificate's kind is
//! bound to its extended key usage (issue 14, item 9c), against real
//! replicas, a real etcd and the real `stewardctl`. Hostile certificates are
//! made here with rcgen and signed by the cluster's real CA.

use std::path::Path;
use std::time::{Duration, Instant};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair,
    KeyUsagePurpose,
};
use steward_coordinator::pki::IdentityKind;
use steward_proto::pb;
use steward_proto::pb::peer_service_client::PeerServiceClient;
use steward_tests::fake_coordinator::{FakeCoordinator, Script};
use steward_tests::{bin, eventually, grpc_channel, Cluster, Ctl, Proc};

/// How long a revocation may take to reach every replica (their watched
/// caches); in practice milliseconds.
const PROMPTLY: Duration = Duration::from_secs(5);

/// Writes `pki/NAME.crt` and `pki/NAME.key`: a certificate for NAME whose
/// organizational unit (the kind) is `kind`, with exactly `usages` and the
/// subject alternative names `sans`, signed by the cluster's CA.
fn forge(cluster: &Cluster, name: &str, kind: &str, usages: &[ExtendedKeyUsagePurpose]) {
    let pki = cluster.pki();
    let read = |p: &Path| std::fs::read_to_string(p).expect("as the cluster wrote it");
    let ca_key = KeyPair::from_pem(&read(&pki.join("ca.key"))).expect("CA key");
    let issuer = Issuer::from_ca_cert_pem(&read(&pki.join("ca.crt")), ca_key).expect("CA");
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .expect("subject alternative names");
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params
        .distinguished_name
        .push(DnType::OrganizationalUnitName, kind);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = usages.to_vec();
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, &issuer).expect("signed");
    std::fs::write(pki.join(format!("{name}.crt")), cert.pem()).expect("write crt");
    std::fs::write(pki.join(format!("{name}.key")), key.serialize_pem()).expect("write key");
}

/// `PeerService.LiveSessions` on `url`, presenting `cert`.
fn peer_call(cluster: &Cluster, url: &str, cert: &str) -> Result<(), tonic::Status> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let channel = grpc_channel(cluster, url, Some(cert))
            .await
            .map_err(|e| tonic::Status::unavailable(format!("connect: {e:?}")))?;
        PeerServiceClient::new(channel)
            .live_sessions(pb::LiveSessionsRequest {
                node_ids: vec![],
                count_only: false,
            })
            .await
            .map(drop)
    })
}

fn refused(out: &Ctl, why: &str) -> bool {
    !out.ok() && out.stderr.contains(why)
}

fn certificate_revoked_events(cluster: &Cluster) -> usize {
    let out = cluster.ctl(&["events", "--limit", "1000"]);
    assert!(out.ok(), "events: {}", out.stderr);
    out.stdout.matches("certificate-revoked").count()
}

/// An admin key revoked from one replica is refused on every replica at
/// once, for every command, while other admin certificates keep working;
/// bad requests write nothing; a certificate issued for the name after the
/// revocation works.
#[test]
fn a_revoked_admin_certificate_is_refused_on_every_replica() {
    let mut cluster = Cluster::new();
    cluster.start_coordinators(2);
    let urls = cluster.coordinator_urls();
    cluster.cert("ops", IdentityKind::Admin);
    for url in &urls {
        let out = cluster.ctl_as("ops", &[url], &["status"]);
        assert!(out.ok(), "ops before the revocation: {}", out.stderr);
    }

    // Guard rails, each refused with nothing written.
    let own = cluster.ctl_as(
        "ops",
        &[&urls[0]],
        &["cert", "revoke", "--kind", "admin", "ops"],
    );
    assert!(refused(&own, "--force"), "own certificate: {own:?}");
    let agent = cluster.ctl(&["cert", "revoke", "--kind", "agent", "n1"]);
    assert!(
        refused(&agent, "stewardctl node revoke"),
        "agent kind: {agent:?}"
    );
    let bad = cluster.ctl(&["cert", "revoke", "--kind", "admin", "no such/name"]);
    assert!(
        refused(&bad, "invalid certificate name"),
        "bad name: {bad:?}"
    );
    assert_eq!(certificate_revoked_events(&cluster), 0);
    let out = cluster.ctl_as("ops", &[&urls[1]], &["status"]);
    assert!(out.ok(), "ops after the refusals: {}", out.stderr);

    // A stream ops opened before the revocation does not outlive it.
    let pki = cluster.pki();
    let mut follow = std::process::Command::new(bin("stewardctl"));
    follow
        .env("STEWARD_ENDPOINTS", &urls[1])
        .env("STEWARD_CA", pki.join("ca.crt"))
        .env("STEWARD_CERT", pki.join("ops.crt"))
        .env("STEWARD_KEY", pki.join("ops.key"))
        .args(["events", "--follow"]);
    let mut follow = Proc::spawn(
        "ops events --follow",
        follow,
        cluster.dir.path().join("ops-follow.log"),
    );
    eventually(PROMPTLY, "ops following the events", || {
        follow.log_text().contains("leader-elected").then_some(())
    });

    // Revoked from replica 1 by the other admin.
    let revoked = cluster.ctl_at(
        &[&urls[0]],
        &["cert", "revoke", "--kind", "admin", "ops", "-o", "json"],
    );
    assert!(revoked.ok(), "revoke: {revoked:?}");
    let revoked = revoked.json();
    assert_eq!(revoked["by"], "admin");
    let second = revoked["revoked_unix_s"].as_i64().expect("cut-off second");
    let start = Instant::now();
    for url in &urls {
        for command in [&["status"][..], &["nodes"], &["events"], &["token", "list"]] {
            eventually(PROMPTLY, "ops refused", || {
                let out = cluster.ctl_as("ops", &[url], command);
                refused(&out, "were revoked at").then_some(())
            });
        }
        let out = cluster.ctl_at(&[url], &["nodes"]);
        assert!(out.ok(), "the other admin on {url}: {}", out.stderr);
    }
    println!(
        "ops refused by every command on both replicas {:?} after the revocation",
        start.elapsed()
    );
    assert_eq!(certificate_revoked_events(&cluster), 1);
    eventually(PROMPTLY, "ops's follow ended", || {
        (!follow.is_running()).then_some(())
    });
    let text = follow.log_text();
    assert!(text.contains("were revoked at"), "{text}");

    // A new certificate for the name, issued after the cut-off.
    std::fs::remove_file(pki.join("ops.crt")).expect("old crt");
    std::fs::remove_file(pki.join("ops.key")).expect("old key");
    let issue = std::process::Command::new(bin("stewardctl"))
        .args(["pki", "issue"])
        .arg(&pki)
        .args([
            "ops",
            "--kind",
            "admin",
            "--revoked-at",
            &second.to_string(),
        ])
        .output()
        .expect("run stewardctl pki issue");
    assert!(issue.status.success(), "pki issue: {issue:?}");
    for url in &urls {
        let out = cluster.ctl_as("ops", &[url], &["status"]);
        assert!(out.ok(), "the new ops certificate on {url}: {}", out.stderr);
    }
}

/// `last_seen` of `node` as the replica at `url` shows it.
fn last_seen(cluster: &Cluster, url: &str, node: &str) -> Option<u64> {
    let out = cluster.ctl_at(&[url], &["nodes", "-o", "json"]);
    if !out.ok() {
        return None;
    }
    out.json().as_array()?.iter().find(|n| n["id"] == node)?["last_seen"].as_u64()
}

/// Whether the replica at `url` shows `node`'s live `last_seen` (from the
/// peer serving it: it moves with the heartbeats) rather than the one in
/// etcd (written at session open only).
fn shows_live(cluster: &Cluster, url: &str, node: &str) -> Option<bool> {
    let first = last_seen(cluster, url, node)?;
    std::thread::sleep(Duration::from_millis(800));
    Some(last_seen(cluster, url, node)? != first)
}

/// A coordinator key revoked (say, stolen from a retired replica) is
/// refused on the peer API of every replica, and a replica no longer takes
/// answers from a peer serving with it; the replicas' own certificates keep
/// working, and revoking the answering replica's own certificate needs
/// --force.
#[test]
fn a_revoked_coordinator_certificate_is_refused_by_the_peers() {
    let mut cluster = Cluster::new();
    cluster.start_coordinators(2);
    let urls = cluster.coordinator_urls();
    cluster.cert("retired", IdentityKind::Coordinator);
    for url in &urls {
        peer_call(&cluster, url, "retired").expect("a coordinator certificate may call peers");
        // An admin certificate may not.
        let status = peer_call(&cluster, url, "admin").expect_err("admin on the peer API");
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    }

    let own = cluster.ctl_at(
        &[&urls[0]],
        &["cert", "revoke", "--kind", "coordinator", "coord-1"],
    );
    assert!(
        refused(&own, "--force"),
        "the answering replica's own: {own:?}"
    );

    let out = cluster.ctl_at(
        &[&urls[0]],
        &["cert", "revoke", "--kind", "coordinator", "retired"],
    );
    assert!(out.ok(), "revoke: {out:?}");
    for url in &urls {
        let status = eventually(PROMPTLY, "the retired key refused", || {
            peer_call(&cluster, url, "retired").err()
        });
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        assert!(status.message().contains("revoked"), "{status:?}");
        // The replicas' own keys are untouched.
        peer_call(&cluster, url, "coord-2").expect("a live replica's certificate");
    }

    // As a server: node-1's session is on coord-2; coord-1 shows its live
    // data, asked from coord-2, until coord-2's certificate is revoked.
    cluster.start_agent_on("node-1", &urls[1..]);
    eventually(PROMPTLY, "coord-1 showing node-1's live data", || {
        shows_live(&cluster, &urls[0], "node-1")
            .filter(|live| *live)
            .map(drop)
    });
    let out = cluster.ctl_at(
        &[&urls[0]],
        &["cert", "revoke", "--kind", "coordinator", "coord-2"],
    );
    assert!(out.ok(), "revoke coord-2 from coord-1: {out:?}");
    eventually(PROMPTLY, "coord-1 no longer asking coord-2", || {
        shows_live(&cluster, &urls[0], "node-1")
            .filter(|live| !*live)
            .map(drop)
    });
}

/// Certificates signed by the real CA whose extended key usage disagrees
/// with their kind are refused: as admin clients, as peers, and, without
/// serverAuth, as a server (stewardctl refuses the handshake).
#[test]
fn certificates_with_the_wrong_usage_for_their_kind_are_refused() {
    use ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
    let mut cluster = Cluster::new();
    cluster.start_coordinators(1);
    let url = cluster.coordinator_urls()[0].clone();

    // A well-formed forged admin works: the test's certificates are sound.
    forge(&cluster, "good-admin", "admin", &[ClientAuth]);
    let out = cluster.ctl_as("good-admin", &[&url], &["status"]);
    assert!(out.ok(), "a clientAuth admin certificate: {out:?}");

    for (name, usages) in [
        ("admin-server", &[ServerAuth, ClientAuth][..]),
        ("admin-none", &[][..]),
    ] {
        forge(&cluster, name, "admin", usages);
        let out = cluster.ctl_as(name, &[&url], &["status"]);
        assert!(refused(&out, "wrong extended key usage"), "{name}: {out:?}");
    }
    // A coordinator certificate without serverAuth is not a peer.
    forge(&cluster, "peer-client-only", "coordinator", &[ClientAuth]);
    let status = peer_call(&cluster, &url, "peer-client-only").expect_err("refused");
    assert!(
        status.message().contains("wrong extended key usage"),
        "{status:?}"
    );

    // A server whose certificate has no serverAuth: stewardctl does not
    // finish the handshake. The same fake with a coordinator certificate is
    // reached (and answers that it serves no admin API).
    forge(&cluster, "server-client-only", "coordinator", &[ClientAuth]);
    forge(
        &cluster,
        "server-good",
        "coordinator",
        &[ServerAuth, ClientAuth],
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let pki = cluster.pki();
    for (name, reached) in [("server-good", true), ("server-client-only", false)] {
        let fake = rt.block_on(FakeCoordinator::start(
            1,
            &pki.join("ca.crt"),
            &pki.join(format!("{name}.crt")),
            &pki.join(format!("{name}.key")),
            vec![Script::Serve],
            65_535,
            Duration::from_secs(1),
        ));
        let out = cluster.ctl_at(&[&fake.urls[0]], &["status"]);
        assert!(!out.ok(), "{name}: {out:?}");
        let unreachable = out.stderr.contains("cannot reach any coordinator");
        assert_eq!(!unreachable, reached, "{name}: {}", out.stderr);
        println!("server {name}: {}", out.stderr.trim());
        drop(fake);
    }
}

/// The coordinator revocations `agent` recorded with its desired state.
fn recorded_coordinator_revocations(cluster: &Cluster, agent: usize) -> Vec<String> {
    let path = cluster.agents[agent].state_dir.join("desired.json");
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    let v: serde_json::Value = serde_json::from_str(&text).expect("desired.json is JSON");
    v["desired"]["coordinator_revocations"]
        .as_array()
        .map(|list| {
            list.iter()
                .filter_map(|r| r["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// A coordinator key revoked through another replica (here, the key of a
/// replica still serving: as if it had been stolen) no longer serves
/// agents: the replica itself tells its agents of the revocation, they end
/// their session with it and refuse it at every dial, even after a
/// restart (the list is recorded with the desired state); an agent that
/// knows another replica fails over to it and keeps working there.
#[test]
fn agents_refuse_a_revoked_coordinator_certificate() {
    let mut cluster = Cluster::new();
    cluster.start_coordinators(2);
    let urls = cluster.coordinator_urls();
    // node-1 knows coord-2 only; node-2 knows both, coord-2 first.
    let only = cluster.start_agent_on("node-1", &urls[1..]);
    let both = cluster.start_agent_on("node-2", &[urls[1].clone(), urls[0].clone()]);
    for node in ["node-1", "node-2"] {
        eventually(PROMPTLY * 2, "the agents connected", || {
            cluster.node(node).filter(|n| n["health"] == "healthy")
        });
    }
    assert!(recorded_coordinator_revocations(&cluster, only).is_empty());

    let out = cluster.ctl_at(
        &[&urls[0]],
        &["cert", "revoke", "--kind", "coordinator", "coord-2"],
    );
    assert!(out.ok(), "revoke coord-2 from coord-1: {out:?}");
    let start = Instant::now();

    // node-1 heard of it (from coord-2 itself), recorded it, and ended the
    // session: every later dial to coord-2 is refused at the handshake.
    eventually(PROMPTLY, "node-1 recorded the revocation", || {
        (recorded_coordinator_revocations(&cluster, only) == ["coord-2"]).then_some(())
    });
    eventually(PROMPTLY, "node-1 refusing coord-2", || {
        let log = cluster.agents[only].proc.log_text();
        let refusals = log
            .matches("the replica presented a revoked coordinator")
            .count();
        (refusals >= 2).then_some(())
    });
    println!(
        "node-1 refused coord-2 {:?} after the revocation",
        start.elapsed()
    );
    // node-2 failed over to coord-1, and stays there.
    eventually(PROMPTLY * 2, "node-2 served by coord-1", || {
        cluster
            .node("node-2")
            .filter(|n| n["replica"] == "coord-1" && n["health"] == "healthy")
    });
    assert_eq!(
        recorded_coordinator_revocations(&cluster, both),
        ["coord-2"]
    );
    std::thread::sleep(Duration::from_secs(2));
    let n2 = cluster.node("node-2").expect("node-2 listed");
    assert_eq!(n2["replica"], "coord-1", "{n2}");
    assert_eq!(n2["health"], "healthy", "{n2}");
    // node-1 has no replica left to serve it.
    eventually(PROMPTLY * 2, "node-1 unreachable", || {
        cluster.node("node-1").filter(|n| n["health"] != "healthy")
    });
    let log = cluster.agents[only].proc.log_text();
    let opened = log.matches("session open").count();

    // A restarted node-1 still refuses coord-2: the list is recorded.
    cluster.agents[only].proc.kill();
    cluster.restart_agent(only);
    eventually(PROMPTLY, "the restarted node-1 refusing coord-2", || {
        let log = cluster.agents[only].proc.log_text();
        log.contains("the replica presented a revoked coordinator")
            .then_some(())
    });
    let log = cluster.agents[only].proc.log_text();
    assert!(!log.contains("session open"), "{log}");
    assert_eq!(
        opened, 1,
        "node-1 opened one session, before the revocation"
    );
}
