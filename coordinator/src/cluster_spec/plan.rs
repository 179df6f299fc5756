//! A [`ClusterSpec`] checked against the cluster as etcd holds it
//! ([`Current`]), and what writing it would change ([`Plan`]).
//!
//! Pure: no IO, no clock. Every problem is collected before anything is
//! planned, so the operator sees them all at once; the checks that depend
//! on roles see the roles the cluster would have *after* the spec (the
//! spec's roles for the nodes it lists, the current ones for the rest).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Display;
use std::net::IpAddr;

use steward_proto::converge::{
    apt_suite_problem, apt_url_problem, debian_version_problem, ClusterSettings, Frontend,
    GlusterVolume, KubernetesSettings,
};
use steward_proto::convert::roles_display;
use steward_proto::domain::{NodeId, NodeSpec, Role, RoleSet};
use steward_proto::vip::VipSpec;

use super::{ClusterSpec, FrontendEntry, NodeEntry};
use crate::store::{NodeRecord, Versioned};
use crate::vip::admin::fleet_problems;

/// The HAProxy frontends every lb node always has, with their ports.
pub const BUILT_IN_FRONTENDS: [(&str, u16); 3] = [
    ("kube-apiserver", 6443),
    ("ingress-http", 80),
    ("ingress-https", 443),
];

/// The state a spec is planned against, as read from etcd.
#[derive(Debug, Clone, Default)]
pub struct Current {
    /// Every node etcd knows anything about (`Store::nodes`).
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    /// Every defined VIP, by name.
    pub vips: BTreeMap<String, Versioned<VipSpec>>,
    /// `cluster/settings`, if ever written.
    pub settings: Option<Versioned<ClusterSettings>>,
}

/// A node spec to write, if its key is still at `expected_revision`
/// (0: the key must not exist).
#[derive(Debug, Clone, PartialEq)]
pub struct NodeWrite {
    pub node: NodeId,
    pub before: NodeSpec,
    pub after: NodeSpec,
    pub expected_revision: i64,
}

/// A VIP spec to write (`expected_revision` 0: a new VIP).
#[derive(Debug, Clone, PartialEq)]
pub struct VipWrite {
    pub spec: VipSpec,
    pub expected_revision: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VipRemoval {
    pub name: String,
    pub expected_revision: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SettingsWrite {
    pub settings: ClusterSettings,
    pub expected_revision: i64,
    /// The settings' lines of [`Plan::changes`] (for the audit event).
    pub changes: Vec<String>,
}

/// What applying a spec writes, and the same as lines for operators.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// One line per change, e.g. `node node-1: roles [] -> [lb]`.
    pub changes: Vec<String>,
    pub vip_writes: Vec<VipWrite>,
    pub vip_removals: Vec<VipRemoval>,
    pub settings: Option<SettingsWrite>,
    pub nodes: Vec<NodeWrite>,
    /// Failure-domain risks of the cluster as the spec leaves it (a zone
    /// whose loss takes the lb pair, the control plane majority or a
    /// replica set's quorum); shown, not refused.
    pub warnings: Vec<String>,
}

impl Plan {
    /// Whether the cluster already matches the spec.
    pub fn is_empty(&self) -> bool {
        self.vip_writes.is_empty()
            && self.vip_removals.is_empty()
            && self.settings.is_none()
            && self.nodes.is_empty()
    }
}

/// Checks `spec` against `current`; the plan, or every problem found.
pub fn plan(spec: &ClusterSpec, current: &Current) -> Result<Plan, Vec<String>> {
    let mut problems = Vec::new();
    let listed = listed_nodes(&spec.nodes, current, &mut problems);
    // Every node as it would be: the listed ones with their new spec.
    let mut after = current.nodes.clone();
    for (id, spec) in &listed {
        if let Some(record) = after.get_mut(id) {
            record.spec = Some(Versioned {
                value: spec.clone(),
                mod_revision: 0,
            });
        }
    }
    let roles: BTreeMap<NodeId, RoleSet> = after
        .iter()
        .filter_map(|(id, r)| Some((id.clone(), r.spec.as_ref()?.value.roles.clone())))
        .collect();
    if let Some(vips) = &spec.vips {
        vip_problems(vips, &after, &mut problems);
    }
    let frontends = frontends(&spec.frontends, &mut problems);
    if let Some(k) = &spec.kubernetes {
        kubernetes_problems(k, &mut problems);
        // A running version moves as the version skew policy allows.
        let running = current
            .settings
            .as_ref()
            .and_then(|s| s.value.kubernetes.as_ref());
        if let Some(running) = running {
            problems.extend(crate::rollout::upgrade::skew_problem(
                &running.version,
                &k.version,
            ));
        }
    }
    role_problems(spec.kubernetes.is_some(), &roles, &mut problems);
    gluster_problems(&spec.gluster_volumes, &roles, &mut problems);
    let window = spec.maintenance.as_ref().and_then(|m| m.window.as_deref());
    if let Some(Err(e)) = window.map(str::parse::<crate::rollout::window::MaintenanceWindow>) {
        problems.push(e);
    }
    if !problems.is_empty() {
        return Err(problems);
    }

    let mut plan = Plan {
        warnings: zone_warnings(&after, &spec.gluster_volumes),
        ..Plan::default()
    };
    if let Some(vips) = &spec.vips {
        plan_vips(vips, &current.vips, &mut plan);
    }
    let settings = canonical(ClusterSettings {
        kubernetes: spec.kubernetes.clone(),
        gluster_volumes: spec.gluster_volumes.clone(),
        frontends,
        maintenance_window: window.map(|w| w.trim().to_owned()),
    });
    let before = current
        .settings
        .as_ref()
        .map(|s| canonical(s.value.clone()))
        .unwrap_or_default();
    if settings != before {
        let changes = settings_changes(&before, &settings);
        plan.changes.extend(changes.iter().cloned());
        plan.settings = Some(SettingsWrite {
            settings,
            expected_revision: current.settings.as_ref().map_or(0, |s| s.mod_revision),
            changes,
        });
    }
    for (id, next) in listed {
        let (before, expected_revision) = current
            .nodes
            .get(&id)
            .and_then(|r| r.spec.as_ref())
            .map_or((NodeSpec::default(), 0), |s| {
                (s.value.clone(), s.mod_revision)
            });
        if next == before {
            continue;
        }
        if next.roles != before.roles {
            plan.changes.push(format!(
                "node {id}: roles [{}] -> [{}]",
                roles_display(&before.roles),
                roles_display(&next.roles)
            ));
        }
        if next.labels != before.labels {
            plan.changes.push(format!(
                "node {id}: labels {} -> {}",
                labels_display(&before.labels),
                labels_display(&next.labels)
            ));
        }
        plan.nodes.push(NodeWrite {
            node: id,
            before,
            after: next,
            expected_revision,
        });
    }
    Ok(plan)
}

/// What one zone's loss would take, for the nodes as the spec leaves them
/// (their `zone` labels; nodes without one count as a zone of their own).
fn zone_warnings(nodes: &BTreeMap<NodeId, NodeRecord>, volumes: &[GlusterVolume]) -> Vec<String> {
    let zone_of = |id: &NodeId| -> String {
        nodes
            .get(id)
            .and_then(|r| r.spec.as_ref())
            .and_then(|s| s.value.labels.get(crate::cache::ZONE_LABEL).cloned())
            .unwrap_or_else(|| format!("(node {id}, no zone)"))
    };
    let with_role = |role: Role| -> Vec<NodeId> {
        nodes
            .iter()
            .filter(|(_, r)| {
                r.spec
                    .as_ref()
                    .is_some_and(|s| s.value.roles.contains(&role))
            })
            .map(|(id, _)| id.clone())
            .collect()
    };
    let by_zone = |ids: &[NodeId]| -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for id in ids {
            *m.entry(zone_of(id)).or_insert(0) += 1;
        }
        m
    };
    let mut warnings = Vec::new();
    let lbs = with_role(Role::Lb);
    if lbs.len() >= 2 {
        let zones = by_zone(&lbs);
        if zones.len() == 1 {
            let zone = zones.keys().next().cloned().unwrap_or_default();
            warnings.push(format!(
                "every lb node ({}) is in zone {zone}: losing it takes the VIP with it",
                lbs.iter()
                    .map(NodeId::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    let cps = with_role(Role::K8sControlPlane);
    if cps.len() >= 2 {
        let quorum = cps.len() / 2 + 1;
        let cp_zones = by_zone(&cps);
        // Where control planes could go instead: labelled zones that have
        // nodes but none of the control planes.
        let mut spare: BTreeMap<String, Vec<&str>> = BTreeMap::new();
        for (id, record) in nodes {
            let zone = record
                .spec
                .as_ref()
                .and_then(|s| s.value.labels.get(crate::cache::ZONE_LABEL))
                .filter(|z| !z.is_empty());
            if let Some(zone) = zone.filter(|z| !cp_zones.contains_key(z.as_str())) {
                spare.entry(zone.clone()).or_default().push(id.as_str());
            }
        }
        let hint = if spare.is_empty() {
            String::new()
        } else {
            let zones: Vec<String> = spare
                .iter()
                .map(|(zone, ids)| {
                    let more = match ids.len() {
                        n if n > 3 => format!(" and {} more", n - 3),
                        _ => String::new(),
                    };
                    let shown: Vec<&str> = ids.iter().take(3).copied().collect();
                    format!("{zone} ({}{more})", shown.join(", "))
                })
                .collect();
            format!(
                "; zones with nodes but no control plane, to spread them: {}",
                zones.join(", ")
            )
        };
        for (zone, n) in cp_zones {
            if cps.len() - n < quorum {
                warnings.push(format!(
                    "zone {zone} holds {n} of {} control planes: losing it loses the etcd \
                     quorum of {quorum}{hint}",
                    cps.len()
                ));
            }
        }
    }
    let bricks = with_role(Role::GlusterBrick);
    let zones = by_zone(&bricks).len();
    for v in volumes {
        let replica = v.replica.max(1) as usize;
        let quorum = replica / 2 + 1;
        // Bricks spread over `zones` zones at best: one zone then holds
        // at least ceil(replica / zones) bricks of a set.
        let worst = replica.div_ceil(zones.max(1));
        if bricks.len() >= replica && replica > 1 && replica - worst < quorum {
            warnings.push(format!(
                "volume {}: replica {replica} over {zones} zone(s): losing one zone can take \
                 {worst} bricks of a replica set, below its quorum of {quorum}",
                v.name
            ));
        }
    }
    warnings
}

/// The new spec of every node the spec lists: its current spec (or an
/// empty one) with the spec's roles and labels.
fn listed_nodes(
    entries: &BTreeMap<String, NodeEntry>,
    current: &Current,
    problems: &mut Vec<String>,
) -> BTreeMap<NodeId, NodeSpec> {
    let mut listed = BTreeMap::new();
    for (name, entry) in entries {
        let at = format!("nodes.{name}");
        let mut roles = RoleSet::new();
        for role in &entry.roles {
            match role.parse::<Role>() {
                Ok(r) if !roles.insert(r) => {
                    problems.push(format!("{at}: role {r} is listed twice"));
                }
                Ok(_) => {}
                Err(e) => problems.push(format!("{at}: {e}")),
            }
        }
        for (key, value) in &entry.labels {
            for p in label_problems(key, value) {
                problems.push(format!("{at}.labels: {p}"));
            }
        }
        let id = match NodeId::new(name.clone()) {
            Ok(id) => id,
            Err(e) => {
                problems.push(format!("{at}: {e}"));
                continue;
            }
        };
        let record = current.nodes.get(&id);
        if !record.is_some_and(|r| r.spec.is_some() || r.status.is_some()) {
            problems.push(format!(
                "{at}: unknown node (no agent with this id has ever connected)"
            ));
            continue;
        }
        // With the roles that are valid, even if some are not, so that the
        // checks below do not report what follows from a typo.
        let mut spec = record
            .and_then(|r| r.spec.as_ref())
            .map(|s| s.value.clone())
            .unwrap_or_default();
        spec.roles = roles;
        spec.labels = entry.labels.clone();
        listed.insert(id, spec);
    }
    listed
}

/// Label keys and values as Kubernetes takes them: an optional DNS
/// subdomain prefix and `/`, then a name of 1-63 letters, digits, `-`, `_`
/// and `.` beginning and ending with a letter or digit; the value the same,
/// or empty.
fn label_problems(key: &str, value: &str) -> Vec<String> {
    fn name_ok(s: &str) -> bool {
        (1..=63).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            && s.starts_with(|c: char| c.is_ascii_alphanumeric())
            && s.ends_with(|c: char| c.is_ascii_alphanumeric())
    }
    let mut p = Vec::new();
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(|prefix| {
        prefix.len() <= 253
            && prefix
                .split('.')
                .all(|part| NodeId::new(part.to_owned()).is_ok())
    });
    if !prefix_ok || !name_ok(name) {
        p.push(format!(
            "key {key:?}: expected [PREFIX/]NAME, NAME 1-63 letters, digits, '-', '_' or '.' \
             beginning and ending with a letter or digit, PREFIX a DNS name"
        ));
    }
    if !value.is_empty() && !name_ok(value) {
        p.push(format!(
            "{key} = {value:?}: a value is empty or 1-63 letters, digits, '-', '_' or '.' \
             beginning and ending with a letter or digit"
        ));
    }
    p
}

/// Each VIP on its own and in this fleet (the checks of `stewardctl vip
/// set`, with the roles after the spec), and the VIPs together.
fn vip_problems(
    vips: &[VipSpec],
    nodes: &BTreeMap<NodeId, NodeRecord>,
    problems: &mut Vec<String>,
) {
    let mut names = BTreeSet::new();
    let mut addresses: BTreeMap<IpAddr, &str> = BTreeMap::new();
    for vip in vips {
        if !names.insert(vip.name.as_str()) {
            problems.push(format!("vip {}: defined twice", vip.name));
            continue;
        }
        if let Ok(cidr) = vip.cidr() {
            if let Some(other) = addresses.insert(cidr.address, &vip.name) {
                problems.push(format!(
                    "vip {} and vip {}: both have the address {}",
                    other, vip.name, cidr.address
                ));
            }
        }
        for p in fleet_problems(vip, nodes) {
            problems.push(format!("vip {}: {p}", vip.name));
        }
    }
}

/// The frontends as settings, checked: names, ports (1-65535, none shared
/// with another frontend or a built-in one), roles.
fn frontends(entries: &[FrontendEntry], problems: &mut Vec<String>) -> Vec<Frontend> {
    let mut names = BTreeSet::new();
    let mut ports: BTreeMap<u16, String> = BUILT_IN_FRONTENDS
        .iter()
        .map(|(name, port)| (*port, format!("the built-in frontend {name}")))
        .collect();
    let mut out = Vec::new();
    for f in entries {
        let at = format!("frontend {}", f.name);
        let before = problems.len();
        if let Err(e) = NodeId::new(f.name.clone()) {
            problems.push(format!("{at}: name: {}", e.reason));
        }
        if BUILT_IN_FRONTENDS.iter().any(|(name, _)| *name == f.name) {
            problems.push(format!("{at}: the name is taken by a built-in frontend"));
        }
        if !names.insert(f.name.as_str()) {
            problems.push(format!("{at}: defined twice"));
        }
        let frontend_port = port(&at, "port", f.port, problems);
        let backend_port = port(&at, "backend_port", f.backend_port, problems);
        if let Some(p) = frontend_port {
            if let Some(other) = ports.get(&p) {
                problems.push(format!("{at}: port {p} is taken by {other}"));
            } else {
                ports.insert(p, format!("frontend {}", f.name));
            }
        }
        let role = f
            .backend_role
            .parse::<Role>()
            .map_err(|e| problems.push(format!("{at}: backend_role: {e}")))
            .ok();
        if let (Some(port), Some(backend_port), Some(role), true) =
            (frontend_port, backend_port, role, problems.len() == before)
        {
            out.push(Frontend {
                name: f.name.clone(),
                port,
                backend_role: role,
                backend_port,
            });
        }
    }
    out
}

/// A port number as written: 1-65535.
fn port(at: &str, field: &str, value: i64, problems: &mut Vec<String>) -> Option<u16> {
    match u16::try_from(value) {
        Ok(p) if p != 0 => Some(p),
        _ => {
            problems.push(format!("{at}: {field} {value} is not a port (1-65535)"));
            None
        }
    }
}

fn kubernetes_problems(k: &KubernetesSettings, problems: &mut Vec<String>) {
    if k.kubelet_version.is_some() {
        problems.push(
            "kubernetes.kubelet_version: not a spec setting (rollouts set it per node during \
             a Kubernetes upgrade); remove it"
                .into(),
        );
    }
    match debian_version_problem(&k.version) {
        None => {}
        Some(p) if k.version.is_empty() => problems.push(format!("kubernetes.version: {p}")),
        Some(p) => problems.push(format!("kubernetes.version {:?}: {p}", k.version)),
    }
    let pods = subnet(&k.pod_subnet)
        .map_err(|e| problems.push(format!("kubernetes.pod_subnet: {e}")))
        .ok();
    let services = subnet(&k.service_subnet)
        .map_err(|e| problems.push(format!("kubernetes.service_subnet: {e}")))
        .ok();
    if let (Some(a), Some(b)) = (pods, services) {
        if overlap(a, b) {
            problems.push(format!(
                "kubernetes.pod_subnet {} and kubernetes.service_subnet {} overlap",
                k.pod_subnet, k.service_subnet
            ));
        }
    }
    let url = &k.repository.url;
    if let Some(p) = apt_url_problem(url) {
        problems.push(format!("kubernetes.repository.url {url:?}: {p}"));
    }
    let suite = &k.repository.suite;
    if let Some(p) = apt_suite_problem(suite) {
        problems.push(format!("kubernetes.repository.suite {suite:?}: {p}"));
    }
    if let Some(key) = &k.repository.key {
        if !(key.contains("-----BEGIN PGP PUBLIC KEY BLOCK-----")
            && key.contains("-----END PGP PUBLIC KEY BLOCK-----"))
        {
            problems.push(
                "kubernetes.repository.key: expected an ASCII-armoured PGP public key \
                 (-----BEGIN PGP PUBLIC KEY BLOCK----- ... -----END PGP PUBLIC KEY BLOCK-----)"
                    .into(),
            );
        }
    }
}

/// A network in CIDR form (`10.244.0.0/16`): host bits clear.
fn subnet(s: &str) -> Result<(IpAddr, u8), String> {
    let (address, prefix) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?}: expected NETWORK/PREFIX, e.g. 10.244.0.0/16"))?;
    let address: IpAddr = address
        .parse()
        .map_err(|_| format!("{s:?}: {address:?} is not an IP address"))?;
    let max = if address.is_ipv4() { 32 } else { 128 };
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| (1..=max).contains(p))
        .ok_or_else(|| format!("{s:?}: the prefix length must be 1..={max}"))?;
    let network = steward_proto::vip::Cidr { address, prefix }.network();
    if network != address {
        return Err(format!(
            "{s:?}: host bits are set (the network is {network}/{prefix})"
        ));
    }
    Ok((address, prefix))
}

/// Whether two networks share an address: the wider one holds the other.
fn overlap(a: (IpAddr, u8), b: (IpAddr, u8)) -> bool {
    let shorter = a.1.min(b.1);
    steward_proto::vip::Cidr {
        address: a.0,
        prefix: shorter,
    }
    .contains(b.0)
}

/// Kubernetes roles need the `[kubernetes]` settings, and workers need a
/// control plane.
fn role_problems(
    has_kubernetes: bool,
    roles: &BTreeMap<NodeId, RoleSet>,
    problems: &mut Vec<String>,
) {
    let with = |role: Role| -> Vec<&NodeId> {
        roles
            .iter()
            .filter(|(_, r)| r.contains(&role))
            .map(|(id, _)| id)
            .collect()
    };
    let control_planes = with(Role::K8sControlPlane);
    let workers = with(Role::K8sWorker);
    let kubernetes_roles = !control_planes.is_empty() || !workers.is_empty();
    if kubernetes_roles && !has_kubernetes {
        let mut nodes: Vec<&NodeId> = control_planes.iter().chain(&workers).copied().collect();
        nodes.sort();
        nodes.dedup();
        problems.push(format!(
            "Kubernetes roles on {} but no [kubernetes] section",
            list(&nodes)
        ));
    }
    if !workers.is_empty() && control_planes.is_empty() {
        problems.push(format!(
            "k8s-worker on {} but no node has k8s-control-plane",
            list(&workers)
        ));
    }
}

/// Volume names, and enough gluster-brick nodes for each replica count.
fn gluster_problems(
    volumes: &[GlusterVolume],
    roles: &BTreeMap<NodeId, RoleSet>,
    problems: &mut Vec<String>,
) {
    let bricks: Vec<&NodeId> = roles
        .iter()
        .filter(|(_, r)| r.contains(&Role::GlusterBrick))
        .map(|(id, _)| id)
        .collect();
    let mut names = BTreeSet::new();
    for v in volumes {
        let at = format!("gluster.volume {}", v.name);
        if let Err(e) = NodeId::new(v.name.clone()) {
            problems.push(format!("{at}: name: {}", e.reason));
        }
        if !names.insert(v.name.as_str()) {
            problems.push(format!("{at}: defined twice"));
        }
        if v.replica == 0 {
            problems.push(format!("{at}: replica must be at least 1"));
        } else if v.replica as usize > bricks.len() {
            problems.push(format!(
                "{at}: replica {} needs {} gluster-brick nodes; the cluster would have {}{}",
                v.replica,
                v.replica,
                bricks.len(),
                if bricks.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", list(&bricks))
                }
            ));
        }
    }
}

/// `[lb,k8s-worker]`, as role changes are shown.
fn role_list(roles: &RoleSet) -> String {
    format!("[{}]", roles_display(roles))
}

fn list<T: Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Settings in one order, so that equal settings compare equal.
fn canonical(mut s: ClusterSettings) -> ClusterSettings {
    s.gluster_volumes.sort_by(|a, b| a.name.cmp(&b.name));
    s.frontends.sort_by(|a, b| a.name.cmp(&b.name));
    s
}

/// VIPs to write and remove: the spec's VIPs are all there are.
fn plan_vips(vips: &[VipSpec], current: &BTreeMap<String, Versioned<VipSpec>>, plan: &mut Plan) {
    let wanted: BTreeSet<&str> = vips.iter().map(|v| v.name.as_str()).collect();
    for (name, spec) in current {
        if !wanted.contains(name.as_str()) {
            plan.changes.push(format!("vip {name}: remove"));
            plan.vip_removals.push(VipRemoval {
                name: name.clone(),
                expected_revision: spec.mod_revision,
            });
        }
    }
    let mut vips: Vec<&VipSpec> = vips.iter().collect();
    vips.sort_by(|a, b| a.name.cmp(&b.name));
    for vip in vips {
        let existing = current.get(&vip.name);
        match existing {
            None => plan
                .changes
                .push(format!("vip {}: add {}", vip.name, vip.address)),
            Some(e) if e.value == *vip => continue,
            Some(e) => plan.changes.push(format!(
                "vip {}: {}",
                vip.name,
                vip_diff(&e.value, vip).join(", ")
            )),
        }
        plan.vip_writes.push(VipWrite {
            spec: vip.clone(),
            expected_revision: existing.map_or(0, |e| e.mod_revision),
        });
    }
}

fn vip_diff(a: &VipSpec, b: &VipSpec) -> Vec<String> {
    let mut d = Vec::new();
    let mut field = |name: &str, x: String, y: String| {
        if x != y {
            d.push(format!("{name} {x} -> {y}"));
        }
    };
    field("address", a.address.clone(), b.address.clone());
    let interface = |s: &VipSpec| s.interface.clone().unwrap_or_else(|| "-".into());
    field("interface", interface(a), interface(b));
    field("check", a.check.to_string(), b.check.to_string());
    let candidates = |s: &VipSpec| format!("[{}]", list(&s.candidates));
    field("candidates", candidates(a), candidates(b));
    let priority = |s: &VipSpec| {
        let p: Vec<String> = s.priority.iter().map(|(n, p)| format!("{n}={p}")).collect();
        format!("{{{}}}", p.join(","))
    };
    field("priority", priority(a), priority(b));
    field("preempt", a.preempt.to_string(), b.preempt.to_string());
    d
}

/// One line per difference between two canonical settings.
fn settings_changes(a: &ClusterSettings, b: &ClusterSettings) -> Vec<String> {
    let mut out = Vec::new();
    by_name(
        &a.frontends,
        &b.frontends,
        |f| &f.name,
        |f| format!("port {} -> {}:{}", f.port, f.backend_role, f.backend_port),
        |x, y| {
            let mut d = Vec::new();
            if x.port != y.port {
                d.push(format!("port {} -> {}", x.port, y.port));
            }
            if (x.backend_role, x.backend_port) != (y.backend_role, y.backend_port) {
                d.push(format!(
                    "backend {}:{} -> {}:{}",
                    x.backend_role, x.backend_port, y.backend_role, y.backend_port
                ));
            }
            d
        },
        "frontend",
        &mut out,
    );
    match (&a.kubernetes, &b.kubernetes) {
        (None, None) => {}
        (Some(_), None) => out.push("cluster settings: kubernetes: remove".into()),
        (None, Some(k)) => out.push(format!(
            "cluster settings: kubernetes: add (version {}, pod subnet {}, service subnet {}, \
             repository {})",
            k.version, k.pod_subnet, k.service_subnet, k.repository.url
        )),
        (Some(x), Some(y)) => {
            let mut field = |name: &str, x: &str, y: &str| {
                if x != y {
                    out.push(format!("cluster settings: kubernetes {name} {x} -> {y}"));
                }
            };
            field("version", &x.version, &y.version);
            field("pod_subnet", &x.pod_subnet, &y.pod_subnet);
            field("service_subnet", &x.service_subnet, &y.service_subnet);
            field("repository url", &x.repository.url, &y.repository.url);
            field(
                "repository suite",
                &format!("{:?}", x.repository.suite),
                &format!("{:?}", y.repository.suite),
            );
            // Keys are long: say what happened, not what they are.
            match (&x.repository.key, &y.repository.key) {
                (None, Some(_)) => {
                    out.push("cluster settings: kubernetes repository key: add".into())
                }
                (Some(_), None) => {
                    out.push("cluster settings: kubernetes repository key: remove".into())
                }
                (Some(k), Some(l)) if k != l => {
                    out.push("cluster settings: kubernetes repository key: change".into())
                }
                _ => {}
            }
        }
    }
    by_name(
        &a.gluster_volumes,
        &b.gluster_volumes,
        |v| &v.name,
        |v| format!("replica {}, mount on {}", v.replica, role_list(&v.mount_on)),
        |x, y| {
            let mut diff = Vec::new();
            if x.replica != y.replica {
                diff.push(format!("replica {} -> {}", x.replica, y.replica));
            }
            if x.mount_on != y.mount_on {
                diff.push(format!(
                    "mount on {} -> {}",
                    role_list(&x.mount_on),
                    role_list(&y.mount_on)
                ));
            }
            diff
        },
        "gluster volume",
        &mut out,
    );
    if a.maintenance_window != b.maintenance_window {
        let shown =
            |w: &Option<String>| w.as_deref().map_or("none".to_owned(), |w| format!("{w:?}"));
        out.push(format!(
            "cluster settings: maintenance window {} -> {}",
            shown(&a.maintenance_window),
            shown(&b.maintenance_window)
        ));
    }
    out
}

/// `what NAME: add (...)`, `what NAME: remove` and `what NAME: diff` lines
/// for two lists of named items.
fn by_name<T>(
    a: &[T],
    b: &[T],
    name: impl Fn(&T) -> &String,
    describe: impl Fn(&T) -> String,
    diff: impl Fn(&T, &T) -> Vec<String>,
    what: &str,
    out: &mut Vec<String>,
) {
    let a: BTreeMap<&String, &T> = a.iter().map(|x| (name(x), x)).collect();
    let b: BTreeMap<&String, &T> = b.iter().map(|x| (name(x), x)).collect();
    let names: BTreeSet<&&String> = a.keys().chain(b.keys()).collect();
    for n in names {
        match (a.get(*n), b.get(*n)) {
            (Some(_), None) => out.push(format!("{what} {n}: remove")),
            (None, Some(y)) => out.push(format!("{what} {n}: add ({})", describe(y))),
            (Some(x), Some(y)) => {
                let d = diff(x, y);
                if !d.is_empty() {
                    out.push(format!("{what} {n}: {}", d.join(", ")));
                }
            }
            (None, None) => {}
        }
    }
}

fn labels_display(labels: &BTreeMap<String, String>) -> String {
    let pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{{{}}}", pairs.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster_spec::parse;
    use crate::store::NodeStatusRecord;
    use steward_proto::domain::{Facts, Health, NetworkInterface, NodeHealth};

    fn id(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    /// A connected node with `eth0` at `address`, and roles if any.
    fn node(address: &str, roles: &[Role]) -> NodeRecord {
        NodeRecord {
            spec: (!roles.is_empty()).then(|| Versioned {
                value: NodeSpec {
                    roles: roles.iter().copied().collect(),
                    ..Default::default()
                },
                mod_revision: 7,
            }),
            status: Some(Versioned {
                value: NodeStatusRecord {
                    health: NodeHealth::Healthy,
                    last_health: Health::default(),
                    replica: None,
                    last_seen_unix_ms: 0,
                    applied_revision: 0,
                    agent_version: String::new(),
                },
                mod_revision: 3,
            }),
            address: None,
            converge: None,
            revoked: None,
            maintenance: None,
            gluster: None,
            reboot_required: None,
            facts: Some(Versioned {
                value: Facts {
                    interfaces: vec![NetworkInterface {
                        name: "eth0".into(),
                        mac: String::new(),
                        addresses: vec![address.into()],
                    }],
                    ..Default::default()
                },
                mod_revision: 3,
            }),
        }
    }

    /// Three connected nodes without roles, in 198.18.0.0/24.
    fn fleet() -> Current {
        Current {
            nodes: (1..=3)
                .map(|i| {
                    (
                        id(&format!("node-{i}")),
                        node(&format!("198.18.0.1{i}/24"), &[]),
                    )
                })
                .collect(),
            ..Default::default()
        }
    }

    fn planned(text: &str, current: &Current) -> Result<Plan, Vec<String>> {
        plan(&parse(text).unwrap_or_else(|p| panic!("{p:#?}")), current)
    }

    /// Every problem of `text`, one per line.
    fn problems(text: &str, current: &Current) -> String {
        match planned(text, current) {
            Ok(plan) => panic!("accepted: {plan:#?}"),
            Err(p) => p.join("\n"),
        }
    }

    /// Strings that reach apt (the package version, the sources.list line)
    /// follow apt's grammar: an injected line, option or word is refused,
    /// naming the field.
    #[test]
    fn apt_strings_cannot_inject_into_sources_list_or_install() {
        let spec = |version: &str, url: &str, suite: &str| {
            format!(
                "[kubernetes]\nversion = {version:?}\npod_subnet = \"10.244.0.0/16\"\n\
                 service_subnet = \"10.96.0.0/12\"\n[kubernetes.repository]\n\
                 url = {url:?}\nsuite = {suite:?}\n"
            )
        };
        let good = (
            "1.31.2-1.1",
            "https://pkgs.k8s.io/core:/stable:/v1.31/deb/",
            "/",
        );
        assert!(planned(&spec(good.0, good.1, good.2), &fleet()).is_ok());
        for (version, url, suite, expected) in [
            (
                "1.31.2-1.1\nPin: release *",
                good.1,
                good.2,
                "kubernetes.version \"1.31.2-1.1\\nPin: release *\": '\\n' is not allowed",
            ),
            (
                "1.31 2",
                good.1,
                good.2,
                "kubernetes.version \"1.31 2\": ' ' is not allowed",
            ),
            (
                good.0,
                "https://pkgs.k8s.io/ /\ndeb [trusted=yes] http://evil.example/",
                good.2,
                "kubernetes.repository.url \"https://pkgs.k8s.io/ /\\ndeb",
            ),
            (
                good.0,
                "https:///deb",
                good.2,
                "kubernetes.repository.url \"https:///deb\": expected a host",
            ),
            (
                good.0,
                good.1,
                "/\ndeb [trusted=yes] http://evil.example/ ./",
                "kubernetes.repository.suite \"/\\ndeb [trusted=yes]",
            ),
            (
                good.0,
                good.1,
                "bookworm [trusted=yes]",
                "kubernetes.repository.suite \"bookworm [trusted=yes]\": '[' is not allowed",
            ),
        ] {
            let p = problems(&spec(version, url, suite), &fleet());
            assert!(p.contains(expected), "no {expected:?} in:\n{p}");
        }
    }

    /// `current` with `plan` written, as etcd would hold it.
    fn written(current: &Current, plan: &Plan) -> Current {
        let mut next = current.clone();
        for n in &plan.nodes {
            next.nodes.get_mut(&n.node).unwrap().spec = Some(Versioned {
                value: n.after.clone(),
                mod_revision: 100,
            });
        }
        for r in &plan.vip_removals {
            next.vips.remove(&r.name);
        }
        for w in &plan.vip_writes {
            next.vips.insert(
                w.spec.name.clone(),
                Versioned {
                    value: w.spec.clone(),
                    mod_revision: 100,
                },
            );
        }
        if let Some(s) = &plan.settings {
            next.settings = Some(Versioned {
                value: s.settings.clone(),
                mod_revision: 100,
            });
        }
        next
    }

    const EXAMPLE: &str = include_str!("../../../packaging/cluster.example.toml");

    #[test]
    fn a_maintenance_window_is_a_setting_and_a_bad_one_is_refused() {
        let current = fleet();
        let plan = planned("[maintenance]\nwindow = \"Sat 02:00-04:00\"\n", &current)
            .unwrap_or_else(|p| panic!("{p:#?}"));
        assert_eq!(
            plan.changes,
            ["cluster settings: maintenance window none -> \"Sat 02:00-04:00\""]
        );
        let settings = &plan.settings.as_ref().expect("a settings write").settings;
        assert_eq!(
            settings.maintenance_window.as_deref(),
            Some("Sat 02:00-04:00")
        );
        let problems = planned(
            "[maintenance]\nwindow = \"Caturday 02:00-04:00\"\n",
            &current,
        )
        .expect_err("an unknown day");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with("maintenance.window \"Caturday 02:00-04:00\": unknown day"),
            "{problems:?}"
        );
        let unknown =
            parse("[maintenance]\nwindows = \"Sat 02:00-04:00\"\n").expect_err("an unknown key");
        assert!(
            unknown[0].contains("unknown field `windows`"),
            "{unknown:?}"
        );
    }

    #[test]
    fn the_example_applies_to_a_fresh_fleet_and_then_changes_nothing() {
        let current = fleet();
        let plan = planned(EXAMPLE, &current).unwrap_or_else(|p| panic!("{p:#?}"));
        assert_eq!(
            plan.changes,
            [
                "vip front: add 198.18.0.200/24",
                "frontend grafana: add (port 3000 -> k8s-worker:30300)",
                "cluster settings: kubernetes: add (version 1.31.2-1.1, pod subnet \
                 10.244.0.0/16, service subnet 10.96.0.0/12, repository \
                 https://pkgs.k8s.io/core:/stable:/v1.31/deb/)",
                "gluster volume data: add (replica 3, mount on [k8s-worker])",
                "node node-1: roles [] -> [lb,k8s-control-plane,gluster-brick]",
                "node node-1: labels {} -> {zone=a}",
                "node node-2: roles [] -> [lb,k8s-worker,gluster-brick]",
                "node node-2: labels {} -> {zone=b}",
                "node node-3: roles [] -> [k8s-worker,gluster-brick]",
                "node node-3: labels {} -> {zone=c}",
            ]
        );
        assert_eq!(plan.nodes.len(), 3);
        assert!(plan.nodes.iter().all(|n| n.expected_revision == 0));
        assert_eq!(plan.vip_writes.len(), 1);
        let settings = &plan.settings.as_ref().unwrap().settings;
        assert_eq!(settings.frontends[0].backend_role, Role::K8sWorker);
        assert_eq!(settings.gluster_volumes[0].replica, 3);

        let after = written(&current, &plan);
        let again = planned(EXAMPLE, &after).unwrap();
        assert!(again.is_empty(), "{again:#?}");
        assert!(again.changes.is_empty());
    }

    /// Issue 15 item 3: the version skew policy, on the running version.
    #[test]
    fn a_version_change_the_skew_policy_forbids_is_refused() {
        let current = written(&fleet(), &planned(EXAMPLE, &fleet()).unwrap());
        for (to, expected) in [
            (
                "1.33.0-1.1",
                "kubernetes.version 1.31.2-1.1 -> 1.33.0-1.1 jumps 2 minor versions \
                 (1.31 -> 1.33)",
            ),
            (
                "1.30.9-1.1",
                "kubernetes.version 1.31.2-1.1 -> 1.30.9-1.1 is a minor downgrade",
            ),
            (
                "1.31-1.1",
                "kubernetes.version \"1.31-1.1\" is not a Kubernetes version",
            ),
        ] {
            let problems = planned(&EXAMPLE.replace("1.31.2-1.1", to), &current).unwrap_err();
            let problem = problems
                .iter()
                .find(|p| p.starts_with(expected))
                .unwrap_or_else(|| panic!("{to}: {problems:#?}"));
            assert!(problem.contains("version skew policy"), "{problem}");
        }
        // One minor up is allowed; a new cluster may start at any version.
        assert!(planned(&EXAMPLE.replace("1.31.2-1.1", "1.32.0-1.1"), &current).is_ok());
        assert!(planned(&EXAMPLE.replace("1.31.2-1.1", "1.29.0-1.1"), &fleet()).is_ok());
        // Set by rollouts only.
        let problems = planned(
            &EXAMPLE.replace(
                "version = \"1.31.2-1.1\"",
                "version = \"1.31.2-1.1\"\nkubelet_version = \"1.30.0-1.1\"",
            ),
            &fleet(),
        )
        .unwrap_err();
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("kubernetes.kubelet_version: not a spec setting")),
            "{problems:#?}"
        );
    }

    #[test]
    fn changes_are_planned_against_the_current_revisions() {
        let current = written(&fleet(), &planned(EXAMPLE, &fleet()).unwrap());
        let text = EXAMPLE
            .replace("1.31.2-1.1", "1.31.3-1.1")
            .replace("replica = 3", "replica = 2")
            .replace(
                "mount_on = [\"k8s-worker\"]",
                "mount_on = [\"k8s-worker\", \"k8s-control-plane\"]",
            )
            .replace("check = \"haproxy\"", "check = \"none\"")
            .replace("labels = { zone = \"c\" }", "");
        let plan = planned(&text, &current).unwrap();
        assert_eq!(
            plan.changes,
            [
                "vip front: check haproxy -> none",
                "cluster settings: kubernetes version 1.31.2-1.1 -> 1.31.3-1.1",
                "gluster volume data: replica 3 -> 2, mount on [k8s-worker] -> \
                 [k8s-control-plane,k8s-worker]",
                "node node-3: labels {zone=c} -> {}",
            ]
        );
        assert_eq!(plan.settings.as_ref().unwrap().expected_revision, 100);
        assert_eq!(plan.vip_writes[0].expected_revision, 100);
        assert_eq!(plan.nodes[0].expected_revision, 100);
    }

    #[test]
    fn vips_are_pruned_only_by_a_spec_that_has_a_vip_key() {
        let mut current = fleet();
        current
            .nodes
            .insert(id("lb-1"), node("198.18.0.2/24", &[Role::Lb]));
        current.vips.insert(
            "old".into(),
            Versioned {
                value: VipSpec {
                    name: "old".into(),
                    address: "198.18.0.99/24".into(),
                    interface: None,
                    check: Default::default(),
                    candidates: vec![],
                    priority: Default::default(),
                    preempt: false,
                },
                mod_revision: 42,
            },
        );
        // No `vip` key: the VIPs are not the spec's business.
        let plan = planned("[nodes.node-1]\nroles = [\"lb\"]\n", &current).unwrap();
        assert!(plan.vip_removals.is_empty());
        assert_eq!(plan.changes, ["node node-1: roles [] -> [lb]"]);
        // `vip = []`: there are none.
        let plan = planned("vip = []\n", &current).unwrap();
        assert_eq!(plan.changes, ["vip old: remove"]);
        assert_eq!(
            plan.vip_removals,
            [VipRemoval {
                name: "old".into(),
                expected_revision: 42
            }]
        );
        // Listed VIPs replace the rest.
        let plan = planned(
            "[[vip]]\nname = \"new\"\naddress = \"198.18.0.98/24\"\n",
            &current,
        )
        .unwrap();
        assert_eq!(
            plan.changes,
            ["vip old: remove", "vip new: add 198.18.0.98/24"]
        );
    }

    #[test]
    fn unlisted_nodes_keep_their_roles_and_count_in_the_checks() {
        let mut current = fleet();
        current
            .nodes
            .insert(id("w-1"), node("198.18.0.21/24", &[Role::K8sWorker]));
        let text = r#"
[kubernetes]
version = "1.31.2-1.1"
pod_subnet = "10.244.0.0/16"
service_subnet = "10.96.0.0/12"
[kubernetes.repository]
url = "https://pkgs.k8s.io/core:/stable:/v1.31/deb/"
[nodes.node-1]
roles = ["lb"]
"#;
        let p = problems(text, &current);
        assert_eq!(p, "k8s-worker on w-1 but no node has k8s-control-plane");
        let plan = planned(
            &text.replace("roles = [\"lb\"]", "roles = [\"k8s-control-plane\"]"),
            &current,
        )
        .unwrap();
        assert!(plan.nodes.iter().all(|n| n.node != id("w-1")));
        // A node's other fields stay as they are.
        let mut cordoned = current.clone();
        cordoned
            .nodes
            .get_mut(&id("w-1"))
            .unwrap()
            .spec
            .as_mut()
            .unwrap()
            .value
            .cordoned = true;
        let plan = planned(
            &format!("{text}\n[nodes.w-1]\nroles = [\"k8s-worker\", \"k8s-control-plane\"]\n"),
            &cordoned,
        )
        .unwrap();
        let w1 = plan.nodes.iter().find(|n| n.node == id("w-1")).unwrap();
        assert!(w1.after.cordoned);
        assert_eq!(w1.expected_revision, 7);
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = r#"
[[vip]]
name = "front"
address = "198.51.100.10/24"
[[vip]]
name = "front"
address = "198.18.0.201/24"
[[vip]]
name = "back"
address = "198.18.0.202/24"
candidates = ["ghost"]
[[frontend]]
name = "api"
port = 6443
backend_role = "k8s-worker"
backend_port = 30000
[[frontend]]
name = "grafana"
port = 3000
backend_role = "k8s-worker"
backend_port = 0
[[frontend]]
name = "grafana"
port = 3000
backend_role = "database"
backend_port = 3000
[[frontend]]
name = "ingress-http"
port = 8080
backend_role = "k8s-worker"
backend_port = 8080
[kubernetes]
version = ""
pod_subnet = "10.244.1.0/16"
service_subnet = "10.96.0.0/40"
[kubernetes.repository]
url = "ftp://mirror"
suite = ""
key = "not a key"
[[gluster.volume]]
name = "data"
replica = 3
[[gluster.volume]]
name = "scratch"
replica = 0
[[gluster.volume]]
name = "data"
replica = 1
[nodes.node-1]
roles = ["lb", "db", "lb"]
labels = { "bad key!" = "x", zone = "-a" }
[nodes.node-2]
roles = ["k8s-worker", "gluster-brick"]
[nodes.ghost]
roles = []
[nodes.Node_4]
roles = []
"#;
        let p = problems(text, &fleet());
        for expected in [
            // VIPs: the fleet checks of `vip set`, and duplicates.
            "vip front: no candidate (node-1) has an address in the subnet of 198.51.100.10/24",
            "vip front: defined twice",
            "vip back: candidate ghost: unknown node",
            // Frontends.
            "frontend api: port 6443 is taken by the built-in frontend kube-apiserver",
            "frontend grafana: backend_port 0 is not a port (1-65535)",
            "frontend grafana: defined twice",
            "frontend grafana: port 3000 is taken by frontend grafana",
            "frontend grafana: backend_role: unknown role \"database\"",
            "frontend ingress-http: the name is taken by a built-in frontend",
            // Kubernetes.
            "kubernetes.version: must not be empty",
            "kubernetes.pod_subnet: \"10.244.1.0/16\": host bits are set (the network is 10.244.0.0/16)",
            "kubernetes.service_subnet: \"10.96.0.0/40\": the prefix length must be 1..=32",
            "kubernetes.repository.url \"ftp://mirror\": expected an http://, https:// or file:/ URL",
            "kubernetes.repository.suite \"\": must not be empty",
            "kubernetes.repository.key: expected an ASCII-armoured PGP public key",
            // Roles after the spec: node-2 is a worker, nobody is a control plane.
            "k8s-worker on node-2 but no node has k8s-control-plane",
            // Gluster.
            "gluster.volume data: replica 3 needs 3 gluster-brick nodes; the cluster would have 1 (node-2)",
            "gluster.volume scratch: replica must be at least 1",
            "gluster.volume data: defined twice",
            // Nodes.
            "nodes.node-1: unknown role \"db\"",
            "nodes.node-1: role lb is listed twice",
            "nodes.node-1.labels: key \"bad key!\"",
            "nodes.node-1.labels: zone = \"-a\"",
            "nodes.ghost: unknown node (no agent with this id has ever connected)",
            "nodes.Node_4: invalid node id \"Node_4\"",
        ] {
            assert!(p.contains(expected), "no {expected:?} in:\n{p}");
        }
    }

    #[test]
    fn kubernetes_roles_need_the_kubernetes_section() {
        let p = problems(
            "[nodes.node-1]\nroles = [\"k8s-control-plane\"]\n[nodes.node-2]\nroles = [\"k8s-worker\"]\n",
            &fleet(),
        );
        assert_eq!(
            p,
            "Kubernetes roles on node-1, node-2 but no [kubernetes] section"
        );
        // Taking the roles away is fine without it.
        let mut current = fleet();
        current
            .nodes
            .insert(id("cp-1"), node("198.18.0.5/24", &[Role::K8sControlPlane]));
        assert!(planned("[nodes.cp-1]\nroles = []\n", &current).is_ok());
    }

    #[test]
    fn a_vip_must_be_in_a_candidate_subnet_unless_its_interface_is_named() {
        let mut current = fleet();
        current
            .nodes
            .insert(id("lb-1"), node("198.18.0.2/24", &[Role::Lb]));
        let vip = |address: &str, extra: &str| {
            format!("[[vip]]\nname = \"front\"\naddress = \"{address}\"\n{extra}")
        };
        assert!(planned(&vip("198.18.0.200/24", ""), &current).is_ok());
        let p = problems(&vip("203.0.113.7/24", ""), &current);
        assert!(
            p.contains("no candidate (lb-1) has an address in the subnet"),
            "{p}"
        );
        // The lb role given in the same spec makes node-1 a candidate.
        let mut far = fleet();
        far.nodes.insert(id("node-4"), node("203.0.113.5/24", &[]));
        let text = format!(
            "{}\n[nodes.node-4]\nroles = [\"lb\"]\n",
            vip("203.0.113.7/24", "")
        );
        assert!(planned(&text, &far).is_ok());
        // A named interface must exist on a candidate instead.
        assert!(planned(&vip("203.0.113.7/24", "interface = \"eth0\""), &current).is_ok());
        let p = problems(&vip("203.0.113.7/24", "interface = \"eth9\""), &current);
        assert!(
            p.contains("interface eth9: no candidate (lb-1) has it"),
            "{p}"
        );
    }

    #[test]
    fn subnets_are_networks_that_do_not_overlap() {
        assert!(subnet("10.244.0.0/16").is_ok());
        assert!(subnet("fd00:10::/64").is_ok());
        assert!(subnet("10.244.0.1/16").is_err());
        assert!(subnet("10.244.0.0").is_err());
        assert!(subnet("10.244.0.0/0").is_err());
        assert!(subnet("banana/8").is_err());
        let s = |x: &str| subnet(x).unwrap();
        assert!(overlap(s("10.0.0.0/8"), s("10.96.0.0/12")));
        assert!(!overlap(s("10.244.0.0/16"), s("10.96.0.0/12")));
        assert!(!overlap(s("10.0.0.0/8"), s("fd00::/8")));
    }

    #[test]
    fn labels_follow_kubernetes_syntax() {
        assert!(label_problems("zone", "a").is_empty());
        assert!(label_problems("topology.kubernetes.io/zone", "eu-1").is_empty());
        assert!(label_problems("zone", "").is_empty());
        assert_eq!(label_problems("-zone", "a").len(), 1);
        assert_eq!(label_problems("Bad.Prefix/zone", "a").len(), 1);
        assert_eq!(label_problems("zone", "a b").len(), 1);
        assert_eq!(label_problems(&"x".repeat(64), &"y".repeat(64)).len(), 2);
    }

    #[test]
    fn zone_risks_are_warned_not_refused() {
        let in_zone = |roles: &[Role], zone: &str| {
            let mut r = node("198.18.0.7/24", roles);
            if let Some(spec) = &mut r.spec {
                spec.value.labels.insert("zone".into(), zone.into());
            }
            r
        };
        let mut nodes = BTreeMap::new();
        nodes.insert(id("lb-1"), in_zone(&[Role::Lb], "a"));
        nodes.insert(id("lb-2"), in_zone(&[Role::Lb], "a"));
        for (n, z) in [("cp-1", "a"), ("cp-2", "a"), ("cp-3", "b")] {
            nodes.insert(id(n), in_zone(&[Role::K8sControlPlane], z));
        }
        for (n, z) in [("g-1", "a"), ("g-2", "b"), ("g-3", "b")] {
            nodes.insert(id(n), in_zone(&[Role::GlusterBrick], z));
        }
        let volumes = [GlusterVolume {
            name: "data".into(),
            replica: 3,
            mount_on: steward_proto::converge::default_mount_on(),
        }];
        let w = zone_warnings(&nodes, &volumes);
        assert_eq!(w.len(), 3, "{w:#?}");
        assert!(
            w[0].starts_with("every lb node (lb-1, lb-2) is in zone a"),
            "{}",
            w[0]
        );
        assert_eq!(
            w[1],
            "zone a holds 2 of 3 control planes: losing it loses the etcd quorum of 2"
        );
        assert!(
            w[2].starts_with("volume data: replica 3 over 2 zone(s)"),
            "{}",
            w[2]
        );
        // A zone with nodes but no control plane is named as the place
        // to spread them to.
        nodes.insert(id("w-1"), in_zone(&[Role::K8sWorker], "c"));
        nodes.insert(id("w-2"), in_zone(&[Role::K8sWorker], "c"));
        let w = zone_warnings(&nodes, &volumes);
        assert_eq!(
            w[1],
            "zone a holds 2 of 3 control planes: losing it loses the etcd quorum of 2; zones \
             with nodes but no control plane, to spread them: c (w-1, w-2)"
        );
        // Spread over three zones: nothing to say.
        nodes.insert(id("lb-2"), in_zone(&[Role::Lb], "b"));
        nodes.insert(id("cp-2"), in_zone(&[Role::K8sControlPlane], "c"));
        nodes.insert(id("g-3"), in_zone(&[Role::GlusterBrick], "c"));
        assert!(zone_warnings(&nodes, &volumes).is_empty());
        // Without zone labels every node counts as its own failure domain.
        let mut bare = BTreeMap::new();
        bare.insert(id("lb-1"), node("198.18.0.7/24", &[Role::Lb]));
        bare.insert(id("lb-2"), node("198.18.0.8/24", &[Role::Lb]));
        assert!(zone_warnings(&bare, &[]).is_empty());
    }
}
