//! Node bootstrap end to end: real etcd, three coordinators and the real
//! `steward-agent join` / `stewardctl token` binaries. A node joins with a
//! token and a pinned CA hash, appears in `stewardctl nodes`, and every bad
//! join (reused, expired, wrong or malformed token, wrong CA hash, an
//! existing node's id) is refused with its reason and writes nothing.
//! Renewal: with 30 s certificates the agent renews before expiry while its
//! session stays up, and once the first certificate expired a restarted
//! agent connects with the renewed one.
//! Revocation: `stewardctl node revoke` ends a joined node's session at
//! once; its certificate can neither reconnect nor renew on any replica
//! until the node joins again with a token made for it.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use steward_coordinator::pki::IdentityKind;
use steward_proto::pb;
use steward_proto::pb::agent_service_client::AgentServiceClient;
use steward_proto::pki::Validity;
use steward_tests::{bin, eventually, grpc_channel, repo_root, AgentProc, Cluster, JoinToken};

/// A would-be node: its own config (the packaged example, as the .deb
/// installs it, with a test state directory and converging off) and PKI
/// directory.
struct Host {
    node: String,
    dir: PathBuf,
}

impl Host {
    fn new(cluster: &Cluster, node: &str) -> Host {
        Host::in_dir(cluster, node, &format!("host-{node}"))
    }

    /// A second host claiming the same node id gets its own directory.
    fn in_dir(cluster: &Cluster, node: &str, dir: &str) -> Host {
        let dir = cluster.dir.path().join(dir);
        fs::create_dir_all(&dir).expect("host dir");
        let example =
            fs::read_to_string(repo_root().join("packaging/agent.example.toml")).expect("example");
        let config = example
            .replace(
                "# state_dir = \"/var/lib/steward-agent\"",
                &format!("state_dir = \"{}\"", dir.join("state").display()),
            )
            .replace("enabled = true", "enabled = false")
            // Tests run side by side: no fixed metrics port.
            .replace("metrics_listen = \"127.0.0.1:9471\"", "")
            .replace(
                "# heartbeat_interval_ms = 1000",
                "heartbeat_interval_ms = 200",
            );
        assert_ne!(
            config, example,
            "the example's keys changed; update this test"
        );
        fs::write(dir.join("agent.toml"), config).expect("config");
        Host {
            node: node.to_owned(),
            dir,
        }
    }

    fn config(&self) -> PathBuf {
        self.dir.join("agent.toml")
    }

    fn pki(&self) -> PathBuf {
        self.dir.join("pki")
    }

    fn join_with(&self, token: &str, urls: &[String], ca_hash: &str, extra: &[&str]) -> Output {
        let mut cmd = Command::new(bin("steward-agent"));
        cmd.arg("--config")
            .arg(self.config())
            .args(["join", "--token", token, "--ca-hash", ca_hash])
            .args(["--node-id", &self.node, "--no-start", "--pki-dir"])
            .arg(self.pki())
            .args(extra)
            .stdin(Stdio::null());
        for url in urls {
            cmd.args(["--coordinator", url]);
        }
        cmd.output().expect("run steward-agent join")
    }

    fn join(&self, t: &JoinToken) -> Output {
        self.join_with(&t.token, &t.join_urls, &t.ca_hash, &[])
    }

    fn files(&self) -> Vec<String> {
        fs::read_dir(self.pki())
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn start(&self, cluster: &mut Cluster) -> usize {
        let proc = cluster.spawn_agent(&self.node, &self.config(), None);
        cluster.agents.push(AgentProc {
            node: self.node.clone(),
            netns: None,
            config: self.config(),
            state_dir: self.dir.join("state"),
            proc,
        });
        cluster.agents.len() - 1
    }

    fn cert_validity(&self) -> Validity {
        Validity::of_pem(&fs::read_to_string(self.pki().join("node.crt")).expect("node.crt"))
            .expect("certificate")
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_refused(out: &Output, host: &Host, config_before: &str, reason: &str) {
    assert!(!out.status.success(), "join succeeded: {}", stderr(out));
    assert!(
        stderr(out).contains(reason),
        "expected {reason:?} in: {}",
        stderr(out)
    );
    assert!(host.files().is_empty(), "files written: {:?}", host.files());
    assert_eq!(
        fs::read_to_string(host.config()).expect("config"),
        config_before,
        "config changed"
    );
}

fn connected(cluster: &Cluster, node: &str) -> bool {
    cluster
        .node(node)
        .is_some_and(|n| n["health"] == "healthy" || n["health"] == "degraded")
}

#[test]
fn a_node_joins_with_a_token_and_every_bad_join_is_refused() {
    let mut cluster = Cluster::new();
    cluster.coordinator_metrics = true;
    cluster.start_coordinators(3);
    let token = cluster.create_token(&["--ttl", "10m"]);
    assert_eq!(token.join_urls.len(), 3, "one join URL per replica");
    assert!(token.command.starts_with("steward-agent join --token "));
    assert!(token.command.contains(&token.ca_hash));

    // The printed join command works as printed (plus test paths).
    let a = Host::new(&cluster, "joined-a");
    let out = a.join(&token);
    assert!(out.status.success(), "join failed: {}", stderr(&out));
    let mut files = a.files();
    files.sort();
    assert_eq!(files, ["ca.crt", "node.crt", "node.key"]);
    let key_mode = fs::metadata(a.pki().join("node.key"))
        .expect("key")
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600, "node.key must be private");
    // The config kept its comments and other settings and names the
    // replicas' agent URLs.
    let config = fs::read_to_string(a.config()).expect("config");
    assert!(config.contains("# Converging the host onto its roles"));
    let table: toml::Table = config.parse().expect("toml");
    assert_eq!(table["node_id"].as_str(), Some("joined-a"));
    let mut listed: Vec<String> = table["coordinators"]
        .as_array()
        .expect("coordinators")
        .iter()
        .map(|v| v.as_str().expect("url").to_owned())
        .collect();
    listed.sort();
    let mut urls = cluster.coordinator_urls();
    urls.sort();
    assert_eq!(listed, urls);
    let check = Command::new(bin("steward-agent"))
        .arg("--config")
        .arg(a.config())
        .arg("--check")
        .output()
        .expect("check");
    assert!(
        check.status.success(),
        "joined config invalid: {}",
        stderr(&check)
    );

    a.start(&mut cluster);
    eventually(Duration::from_secs(10), "joined node connected", || {
        connected(&cluster, "joined-a").then_some(())
    });
    let events = cluster.ctl(&["events", "-o", "json"]).stdout;
    assert!(
        events.contains("node-joined") && events.contains("joined-a"),
        "no node-joined event: {events}"
    );

    // The same token again: used up.
    let b = Host::new(&cluster, "joined-b");
    let b_config = fs::read_to_string(b.config()).expect("config");
    let out = b.join(&token);
    assert_refused(&out, &b, &b_config, "already used (by joined-a)");

    // A wrong CA hash: the coordinator is not trusted, nothing is sent.
    let fresh = cluster.create_token(&["--ttl", "10m"]);
    let wrong_hash = format!("sha256:{}", "00".repeat(32));
    let out = b.join_with(&fresh.token, &fresh.join_urls, &wrong_hash, &[]);
    assert_refused(&out, &b, &b_config, "pinned hash");
    // ... and the token was not used by that attempt.
    let listed = cluster.ctl(&["token", "list", "-o", "json"]).json();
    let id = fresh.token.split('.').next().expect("id");
    let entry = listed
        .as_array()
        .expect("list")
        .iter()
        .find(|t| t["id"] == id)
        .expect("token listed")
        .clone();
    assert_eq!(entry["used_by"], serde_json::json!([]));

    // A wrong secret, a malformed token.
    let wrong_secret = format!("{id}.0000000000000000");
    let out = b.join_with(&wrong_secret, &fresh.join_urls, &fresh.ca_hash, &[]);
    assert_refused(&out, &b, &b_config, "unknown or wrong token");
    let out = b.join_with("not-a-token", &fresh.join_urls, &fresh.ca_hash, &[]);
    assert_refused(&out, &b, &b_config, "malformed");

    // An expired token (its record moved into the past in etcd, as time
    // would).
    let key = format!("/steward/{}/tokens/{id}", cluster.name);
    let etcdctl = |args: &[&str]| {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", cluster.etcd.client_url))
            .args(args)
            .output()
            .expect("etcdctl");
        assert!(out.status.success(), "etcdctl: {}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mut record: serde_json::Value =
        serde_json::from_str(etcdctl(&["get", "--print-value-only", &key]).trim())
            .expect("token record");
    record["expires_unix_ms"] = serde_json::json!(1000);
    etcdctl(&["put", &key, &record.to_string()]);
    let out = b.join(&fresh);
    assert_refused(&out, &b, &b_config, "expired");

    // An existing node's id needs a token made for it.
    let again = Host::in_dir(&cluster, "joined-a", "impostor");
    let reuse = cluster.create_token(&["--ttl", "10m"]);
    let again_config = fs::read_to_string(again.config()).expect("config");
    let out = again.join_with(&reuse.token, &reuse.join_urls, &reuse.ca_hash, &["--force"]);
    assert_refused(&out, &again, &again_config, "already known");
    let bound = cluster.create_token(&["--ttl", "10m", "--node", "joined-a"]);
    let out = b.join(&bound);
    assert_refused(&out, &b, &b_config, "only for node joined-a");
    // The host already joined refuses to overwrite its certificate...
    let out = a.join(&bound);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--force"), "{}", stderr(&out));
    // ... and re-joins with --force and the node's own token.
    let out = a.join_with(&bound.token, &bound.join_urls, &bound.ca_hash, &["--force"]);
    assert!(out.status.success(), "re-join failed: {}", stderr(&out));

    // Only admins make tokens; the join endpoint serves nothing else.
    cluster.cert("node-x", IdentityKind::Agent);
    let urls = cluster.coordinator_urls();
    let as_agent = cluster.ctl_as("node-x", &[urls[0].as_str()], &["token", "create"]);
    assert!(!as_agent.ok());
    assert!(as_agent.stderr.contains("admin"), "{}", as_agent.stderr);
    let at_join = cluster.ctl_at(&[token.join_urls[0].as_str()], &["nodes"]);
    assert!(!at_join.ok(), "the join endpoint served the admin API");

    // Every replica counted what it answered: two joins (a, then a's
    // re-join) and the refusals above (the wrong CA hash never reached one).
    let (mut joined, mut refused, mut issued) = (0.0, 0.0, 0.0);
    for c in &cluster.coordinators {
        let addr = steward_tests::metrics_listen(&c.config).expect("metrics_listen");
        let m = steward_tests::scrape::scrape(addr).expect("scrape");
        joined += m.sum("steward_joins_total", &[("result", "joined")]);
        refused += m.sum("steward_joins_total", &[("result", "refused")]);
        issued += m.sum("steward_certificates_issued_total", &[("reason", "join")]);
    }
    assert_eq!((joined, issued), (2.0, 2.0));
    // Used, wrong secret, malformed, expired, a known node's id, bound to
    // another node (the refusal to overwrite never left the host).
    assert_eq!(refused, 6.0);

    // `token rm` deletes at once.
    let out = cluster.ctl(&["token", "rm", id]);
    assert!(out.ok(), "{}", out.stderr);
    let out = b.join(&fresh);
    assert_refused(&out, &b, &b_config, "unknown or wrong token");
}

#[test]
fn agents_renew_their_certificates_before_expiry_without_dropping_the_session() {
    let mut cluster = Cluster::new();
    cluster.agent_cert_validity_s = 30;
    cluster.start_coordinators(3);
    let token = cluster.create_token(&["--ttl", "10m"]);
    let host = Host::new(&cluster, "renewing");
    let out = host.join(&token);
    assert!(out.status.success(), "join failed: {}", stderr(&out));
    let first = host.cert_validity();
    assert!(
        (25..=40).contains(&(first.not_after - first.not_before)),
        "{first:?}"
    );
    let agent = host.start(&mut cluster);
    eventually(Duration::from_secs(10), "agent connected", || {
        connected(&cluster, "renewing").then_some(())
    });

    // Renewal is due at two thirds of the lifetime: about 20 s in.
    let renewed = eventually(Duration::from_secs(40), "certificate renewed", || {
        let v = host.cert_validity();
        (v.not_after > first.not_after).then_some(v)
    });
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    assert!(now < first.not_after, "renewed only after expiry");
    assert!(renewed.not_after - now >= 20, "{renewed:?}");
    // The session lived through it: one connection, never dropped.
    // (The log line follows the file's rename.)
    let log = eventually(Duration::from_secs(2), "renewal logged", || {
        let log = cluster.agents[agent].proc.log_text();
        log.contains("certificate renewed").then_some(log)
    });
    assert!(!log.contains("no session"), "session dropped:\n{log}");

    // Once the first certificate has expired, a restarted agent connects:
    // with the renewed one.
    let wait = Duration::from_secs(u64::try_from(first.not_after - now + 1).unwrap_or(0));
    let started = Instant::now();
    while started.elapsed() < wait {
        std::thread::sleep(Duration::from_millis(200));
    }
    cluster.agents[agent].proc.kill();
    eventually(Duration::from_secs(10), "node shown disconnected", || {
        (!connected(&cluster, "renewing")).then_some(())
    });
    cluster.restart_agent(agent);
    eventually(Duration::from_secs(10), "restarted agent connected", || {
        connected(&cluster, "renewing").then_some(())
    });
}

/// An agent certificate (`<name>.crt`/`.key` in the cluster's PKI
/// folder) of node `node`, tried against one replica at a time.
struct AgentCert<'a> {
    cluster: &'a Cluster,
    name: &'a str,
    node: &'a str,
    rt: tokio::runtime::Runtime,
}

impl<'a> AgentCert<'a> {
    fn new(cluster: &'a Cluster, name: &'a str, node: &'a str) -> Self {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        AgentCert {
            cluster,
            name,
            node,
            rt,
        }
    }

    fn client(&self, url: &str) -> AgentServiceClient<tonic::transport::Channel> {
        let channel = self
            .rt
            .block_on(grpc_channel(self.cluster, url, Some(self.name)))
            .expect("dial");
        AgentServiceClient::new(channel)
    }

    /// A renewal with a real CSR for the certificate's key.
    fn renew(&self, url: &str) -> Result<(), tonic::Status> {
        let key_pem =
            fs::read_to_string(self.cluster.pki().join(format!("{}.key", self.name))).expect("key");
        let key = rcgen::KeyPair::from_pem(&key_pem).expect("node key");
        let csr = steward_agent::certs::csr_pem(self.node, &key).expect("csr");
        let mut client = self.client(url);
        self.rt
            .block_on(client.renew_certificate(pb::RenewCertificateRequest { csr_pem: csr }))
            .map(|_| ())
    }

    /// A session hello; `Ok` if the session was accepted.
    fn session(&self, url: &str) -> Result<(), tonic::Status> {
        let hello = pb::AgentMessage {
            kind: Some(pb::agent_message::Kind::Hello(pb::Hello {
                node_id: self.node.into(),
                facts: Some(pb::Facts::default()),
                last_applied_revision: 0,
                agent_version: "test".into(),
                advertise_address: String::new(),
            })),
        };
        let mut client = self.client(url);
        self.rt
            .block_on(client.session(tokio_stream::iter(vec![hello])))
            .map(|_| ())
    }

    /// A lease stream (the VIP protocol's); `Ok` if it was accepted.
    fn lease(&self, url: &str) -> Result<(), tonic::Status> {
        let heartbeat = pb::LeaseHeartbeat {
            node_id: self.node.into(),
            seq: 1,
            sent_at_us: 0,
            claims: Vec::new(),
            health: Vec::new(),
            // Shorter than the test coordinators' lease: acceptable but
            // for the revocation.
            lease_ms: 500,
            replicas: 3,
        };
        let mut client = self.client(url);
        self.rt
            .block_on(client.lease(tokio_stream::iter(vec![heartbeat])))
            .map(|_| ())
    }
}

fn assert_revoked(answer: Result<(), tonic::Status>, what: &str) {
    let status = answer.expect_err(&format!("{what} with a revoked certificate was accepted"));
    assert_eq!(
        status.code(),
        tonic::Code::PermissionDenied,
        "{what}: {status}"
    );
    assert!(
        status.message().contains("were revoked at"),
        "{what}: {status}"
    );
}

#[test]
fn a_revoked_node_is_shut_out_until_it_joins_again() {
    let mut cluster = Cluster::new();
    cluster.start_coordinators(3);
    let urls = cluster.coordinator_urls();
    let token = cluster.create_token(&["--ttl", "10m"]);
    let host = Host::new(&cluster, "revoked-a");
    let out = host.join(&token);
    assert!(out.status.success(), "join failed: {}", stderr(&out));
    // Keep the first certificate to try it once it is revoked.
    for ext in ["crt", "key"] {
        fs::copy(
            host.pki().join(format!("node.{ext}")),
            cluster.pki().join(format!("revoked-a-old.{ext}")),
        )
        .expect("copy the first certificate");
    }
    let agent = host.start(&mut cluster);
    eventually(Duration::from_secs(10), "agent connected", || {
        connected(&cluster, "revoked-a").then_some(())
    });
    // Before revocation the certificate renews, on any replica.
    AgentCert::new(&cluster, "revoked-a-old", "revoked-a")
        .renew(&urls[2])
        .expect("renewal before revocation");

    // Only admins revoke, only known nodes; neither refusal changes a thing.
    cluster.cert("node-x", IdentityKind::Agent);
    let as_agent = cluster.ctl_as(
        "node-x",
        &[urls[0].as_str()],
        &["node", "revoke", "revoked-a"],
    );
    assert!(!as_agent.ok());
    assert!(as_agent.stderr.contains("admin"), "{}", as_agent.stderr);
    let unknown = cluster.ctl(&["node", "revoke", "no-such-node"]);
    assert!(!unknown.ok());
    assert!(
        unknown.stderr.contains("unknown node no-such-node"),
        "{}",
        unknown.stderr
    );
    let bad = cluster.ctl(&["node", "revoke", "Not_A_Node"]);
    assert!(!bad.ok());
    assert!(bad.stderr.contains("node id"), "{}", bad.stderr);
    assert!(connected(&cluster, "revoked-a"));
    assert!(cluster.node("revoked-a").expect("node")["revoked"].is_null());

    // A node that joined but never connected can be revoked too; its agent
    // then never gets a session.
    let early = Host::new(&cluster, "revoked-b");
    let token_b = cluster.create_token(&["--ttl", "10m"]);
    let out = early.join(&token_b);
    assert!(out.status.success(), "join failed: {}", stderr(&out));
    let out = cluster.ctl(&["node", "revoke", "revoked-b"]);
    assert!(
        out.ok(),
        "revoking a joined, never connected node: {}",
        out.stderr
    );
    let b = early.start(&mut cluster);
    eventually(Duration::from_secs(10), "revoked-b's agent refused", || {
        let log = cluster.agents[b].proc.log_text();
        log.contains("were revoked at").then_some(())
    });
    assert!(
        !connected(&cluster, "revoked-b"),
        "a revoked node connected"
    );

    let revoked = cluster.ctl(&["node", "revoke", "revoked-a"]);
    assert!(revoked.ok(), "{}", revoked.stderr);
    assert!(
        revoked
            .stdout
            .contains("stewardctl token create --node revoked-a"),
        "{}",
        revoked.stdout
    );
    let started = Instant::now();
    eventually(Duration::from_secs(10), "the session to end", || {
        (!connected(&cluster, "revoked-a")).then_some(())
    });
    println!("session ended {:?} after the revocation", started.elapsed());
    let log = eventually(Duration::from_secs(5), "the agent to log why", || {
        let log = cluster.agents[agent].proc.log_text();
        log.contains("were revoked at").then_some(log)
    });
    assert!(log.contains("no session"), "{log}");
    // It keeps trying and stays out.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert!(
            !connected(&cluster, "revoked-a"),
            "a revoked node reconnected"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let shown = cluster
        .ctl(&["node", "show", "revoked-a", "-o", "json"])
        .json();
    assert!(shown["revoked"].as_u64().is_some(), "{shown}");
    let events = cluster.ctl(&["events"]).stdout;
    assert!(events.contains("node-revoked"), "{events}");
    // Nowhere: no renewal, no session, no lease stream.
    let old = AgentCert::new(&cluster, "revoked-a-old", "revoked-a");
    for url in &urls {
        assert_revoked(old.renew(url), &format!("renewal at {url}"));
        assert_revoked(old.session(url), &format!("session at {url}"));
        assert_revoked(old.lease(url), &format!("lease stream at {url}"));
    }

    // Back in with a token made for it; the running agent picks up the new
    // certificate at its next attempt.
    let bound = cluster.create_token(&["--ttl", "10m", "--node", "revoked-a"]);
    let out = host.join_with(&bound.token, &bound.join_urls, &bound.ca_hash, &["--force"]);
    assert!(out.status.success(), "re-join failed: {}", stderr(&out));
    let revoked_at_s = i64::try_from(shown["revoked"].as_u64().expect("ms") / 1000).expect("s");
    assert!(
        host.cert_validity().not_before > revoked_at_s,
        "the new certificate starts before the revocation"
    );
    eventually(
        Duration::from_secs(15),
        "the re-joined agent connected",
        || connected(&cluster, "revoked-a").then_some(()),
    );
    // The old certificate stays revoked.
    assert_revoked(old.renew(&urls[1]), "renewal after the re-join");
    assert_revoked(old.session(&urls[1]), "session after the re-join");
    assert!(
        connected(&cluster, "revoked-a"),
        "the old certificate's attempt took over"
    );
}
