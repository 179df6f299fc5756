//! `stewardctl apply`: a declarative cluster spec (TOML, documented in
//! `packaging/cluster.example.toml`) made true in etcd.
//!
//! - this module: the file's types and [`parse`], which reports every
//!   problem it can find at once, each with its key path;
//! - [`plan`]: pure — validates a parsed spec against the cluster as read
//!   from etcd ([`plan::Current`]) and computes the changes and writes
//!   ([`plan::Plan`]); no IO, unit-tested;
//! - [`apply`]: reads the cluster, plans, and writes the plan in one etcd
//!   transaction guarded on the mod revision of every key it writes.
//!
//! What the spec governs (the example file says the same to operators):
//!
//! - **VIPs**, when the spec has a `vip` key (`[[vip]]` tables, or
//!   `vip = []`): the VIPs are exactly those; others are removed. Without a
//!   `vip` key the VIPs are left alone (`stewardctl vip` manages them).
//! - **Cluster settings** (`[[frontend]]`, `[kubernetes]`,
//!   `[[gluster.volume]]`): always, stored whole at `cluster/settings`;
//!   leaving a section out removes it.
//! - **Nodes** it lists under `[nodes.<id>]`: their roles and labels are
//!   exactly those given. Nodes it does not list are left alone.
//!
//! **Architecture invariant:** a spec with any problem writes nothing, and
//! a valid one is written all at once or not at all.

pub mod apply;
pub mod plan;

use std::collections::BTreeMap;

use serde::Deserialize;
use steward_proto::converge::{GlusterVolume, KubernetesSettings};
use steward_proto::vip::VipSpec;

/// Longest spec accepted, in bytes.
pub const MAX_SPEC_BYTES: usize = 1 << 20;

/// A cluster spec as written. Roles and ports are kept as written so that
/// every bad one is reported, not only the first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterSpec {
    /// `None`: the spec says nothing about VIPs (they are left alone).
    pub vips: Option<Vec<VipSpec>>,
    pub frontends: Vec<FrontendEntry>,
    pub kubernetes: Option<KubernetesSettings>,
    pub gluster_volumes: Vec<GlusterVolume>,
    /// By node id as written (validated in [`plan`]).
    pub nodes: BTreeMap<String, NodeEntry>,
    /// `[maintenance]`.
    pub maintenance: Option<MaintenanceEntry>,
}

/// `[maintenance]`: when the fleet may reboot by itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceEntry {
    /// `"Sat 02:00-04:00"` (UTC; [`crate::rollout::window`]). Absent: the
    /// leader never reboots nodes by itself.
    pub window: Option<String>,
}

/// `[[frontend]]`: a user HAProxy frontend on every VIP.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FrontendEntry {
    pub name: String,
    pub port: i64,
    pub backend_role: String,
    pub backend_port: i64,
}

/// `[nodes.<id>]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeEntry {
    /// Required: `roles = []` says "no roles" explicitly.
    pub roles: Vec<String>,
    /// Absent: no labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

const TOP_LEVEL_KEYS: &str = "vip, frontend, kubernetes, gluster, nodes, maintenance";

/// Parses a spec. Syntax errors stop at the first; past those, every
/// unknown key, missing field and wrongly typed value is reported, each
/// with its key path (`nodes.node-1: unknown field ...`).
pub fn parse(text: &str) -> Result<ClusterSpec, Vec<String>> {
    if text.len() > MAX_SPEC_BYTES {
        return Err(vec![format!(
            "the spec is {} bytes; at most {MAX_SPEC_BYTES} are accepted",
            text.len()
        )]);
    }
    let table: toml::Table = text.parse().map_err(|e| vec![syntax_error(text, &e)])?;
    let mut problems = Vec::new();
    let mut spec = ClusterSpec::default();
    for (key, value) in table {
        match key.as_str() {
            "vip" => {
                spec.vips = Some(entries(&key, value, &mut problems));
            }
            "frontend" => spec.frontends = entries(&key, value, &mut problems),
            "kubernetes" => spec.kubernetes = item(&key, value, &mut problems),
            "maintenance" => spec.maintenance = item(&key, value, &mut problems),
            "gluster" => {
                let toml::Value::Table(gluster) = value else {
                    problems.push("gluster: expected a table ([[gluster.volume]])".into());
                    continue;
                };
                for (key, value) in gluster {
                    match key.as_str() {
                        "volume" => {
                            spec.gluster_volumes = entries("gluster.volume", value, &mut problems)
                        }
                        other => problems.push(format!(
                            "gluster.{other}: unknown key (expected [[gluster.volume]])"
                        )),
                    }
                }
            }
            "nodes" => {
                let toml::Value::Table(nodes) = value else {
                    problems.push("nodes: expected a table of nodes ([nodes.<id>])".into());
                    continue;
                };
                for (id, value) in nodes {
                    if let Some(entry) = item(&format!("nodes.{id}"), value, &mut problems) {
                        spec.nodes.insert(id, entry);
                    }
                }
            }
            other => problems.push(format!("{other}: unknown key (expected {TOP_LEVEL_KEYS})")),
        }
    }
    if problems.is_empty() {
        Ok(spec)
    } else {
        Err(problems)
    }
}

/// One table at `path`, or its problem.
fn item<T: serde::de::DeserializeOwned>(
    path: &str,
    value: toml::Value,
    problems: &mut Vec<String>,
) -> Option<T> {
    if !value.is_table() {
        problems.push(format!("{path}: expected a table"));
        return None;
    }
    value
        .try_into()
        .map_err(|e: toml::de::Error| problems.push(located(path, &e)))
        .ok()
}

/// An array of tables at `path` (`[[path]]`), each entry checked.
fn entries<T: serde::de::DeserializeOwned>(
    path: &str,
    value: toml::Value,
    problems: &mut Vec<String>,
) -> Vec<T> {
    let toml::Value::Array(items) = value else {
        problems.push(format!("{path}: expected [[{path}]] tables"));
        return Vec::new();
    };
    items
        .into_iter()
        .enumerate()
        .filter_map(|(i, value)| {
            // Name the entry by its name when it has one.
            let label = match value.get("name").and_then(toml::Value::as_str) {
                Some(name) => format!("{path} {name:?}"),
                None => format!("{path}[{i}]"),
            };
            item(&label, value, problems)
        })
        .collect()
}

/// `path.inner: message` from a deserialization error that says
/// `message\nin `inner``.
fn located(path: &str, error: &toml::de::Error) -> String {
    // Without the source text, the error displays as the message and
    // `in `keys`` (the key path is private otherwise).
    let text = error.to_string();
    let text = text.trim();
    match text.rsplit_once("\nin `") {
        Some((message, inner)) => {
            format!("{path}.{}: {}", inner.trim_end_matches('`'), message.trim())
        }
        None => format!("{path}: {text}"),
    }
}

/// `line L, column C: message` for a TOML syntax error.
fn syntax_error(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim();
    match error.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("TOML syntax error at line {line}, column {column}: {message}")
        }
        None => format!("TOML syntax error: {message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_packaged_example_parses() {
        let text = include_str!("../../../packaging/cluster.example.toml");
        let spec = parse(text).unwrap_or_else(|p| panic!("{p:#?}"));
        assert!(spec.vips.as_ref().is_some_and(|v| !v.is_empty()));
        assert!(!spec.frontends.is_empty());
        assert!(spec.kubernetes.is_some());
        assert!(!spec.gluster_volumes.is_empty());
        assert!(!spec.nodes.is_empty());
    }

    #[test]
    fn every_unknown_key_and_bad_value_is_reported_with_its_path() {
        let text = r#"
colour = "blue"
[[vip]]
name = "front"
address = "198.18.0.200/24"
chek = "none"
[[frontend]]
name = "grafana"
port = "3000"
backend_role = "k8s-worker"
backend_port = 30300
[kubernetes]
version = "1.31.2-1.1"
pod_subnet = "10.244.0.0/16"
service_subnet = "10.96.0.0/12"
[kubernetes.repository]
urll = "https://pkgs.k8s.io/core:/stable:/v1.31/deb/"
[[gluster.volume]]
name = "data"
[[gluster.volume]]
name = "logs"
replica = 3
mount_on = ["k8s-workers"]
[gluster.options]
x = 1
[nodes.node-1]
rolez = ["lb"]
[nodes.node-2]
roles = ["lb"]
labels = { zone = 1 }
"#;
        let problems = parse(text).unwrap_err();
        let all = problems.join("\n");
        for expected in [
            "colour: unknown key",
            "vip \"front\": unknown field `chek`",
            "frontend \"grafana\".port: invalid type: string \"3000\"",
            "kubernetes.repository: unknown field `urll`",
            "gluster.volume \"logs\".mount_on: unknown variant `k8s-workers`",
            "gluster.volume \"data\": missing field `replica`",
            "gluster.options: unknown key",
            "nodes.node-1: unknown field `rolez`",
            "nodes.node-2.labels.zone: invalid type: integer `1`",
        ] {
            assert!(all.contains(expected), "no {expected:?} in:\n{all}");
        }
        assert_eq!(problems.len(), 9, "{all}");
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let problems = parse("[nodes.a]\nroles = []\n[nodes.a]\nroles = []\n").unwrap_err();
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].starts_with("TOML syntax error at line 3"),
            "{problems:?}"
        );
    }

    #[test]
    fn an_absent_vip_key_differs_from_no_vips() {
        assert_eq!(parse("").unwrap().vips, None);
        assert_eq!(parse("vip = []").unwrap().vips, Some(vec![]));
        let roles_required = parse("[nodes.n1]\nlabels = {}\n").unwrap_err();
        assert!(
            roles_required[0].contains("missing field `roles`"),
            "{roles_required:?}"
        );
    }
}
