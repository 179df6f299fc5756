//! Which nodes a rollout changes, and in what order (DESIGN.md §7). Pure:
//! no IO, no clock.
//!
//! A node is in the plan only when the slice of the settings its roles
//! consume differs between what it has now and the target. The order:
//! one failure domain (`zone` label) at a time, the zones that hold a VIP
//! last; within a zone control planes, then bricks, then workers, then lb
//! nodes; within a role the VIP holders last. Batches hold nodes of one
//! zone and role class, at most the limit of each role a node has
//! ([`RolloutOptions::max_unavailable_for`]: `--max-unavailable-per-role`,
//! else `max_unavailable`; lb: 1), and control planes never more than
//! etcd's quorum lets go at once ([`control_plane_cap`]); the first
//! `canary` nodes make batches of their own.

use std::collections::{BTreeMap, BTreeSet};

use steward_proto::converge::ClusterSettings;
use steward_proto::domain::{NodeId, Role, RoleSet};

use super::model::RolloutOptions;
use crate::desired::{Interest, Section};

/// One node as the planner sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub node: NodeId,
    pub roles: RoleSet,
    /// Its `zone` label ("" without one).
    pub zone: String,
    /// It holds a VIP now.
    pub holds_vip: bool,
    /// The settings it plans from now (a rollout's target or the cluster's).
    pub current: ClusterSettings,
}

/// The ordered batches and how many of them are the canary.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batches {
    pub batches: Vec<Vec<NodeId>>,
    pub canary_batches: u32,
}

/// The part of `settings` that `interest` consumes.
fn slice(settings: &ClusterSettings, interest: &Interest) -> ClusterSettings {
    let mut out = ClusterSettings::default();
    for section in &interest.sections {
        match section {
            Section::Kubernetes => out.kubernetes = settings.kubernetes.clone(),
            Section::Gluster => out.gluster_volumes = settings.gluster_volumes.clone(),
            Section::Frontends => out.frontends = settings.frontends.clone(),
        }
    }
    out
}

/// Whether a node with `roles` sees a difference between `a` and `b`.
pub fn changes(roles: &RoleSet, a: &ClusterSettings, b: &ClusterSettings) -> bool {
    if roles.is_empty() {
        return false;
    }
    let (ia, ib) = (
        Interest::for_node(roles, Some(a)),
        Interest::for_node(roles, Some(b)),
    );
    ia != ib || slice(a, &ia) != slice(b, &ib)
}

/// The order of role classes: control planes, bricks, workers, lb.
fn class(roles: &RoleSet) -> u8 {
    if roles.contains(&Role::K8sControlPlane) {
        0
    } else if roles.contains(&Role::GlusterBrick) {
        1
    } else if roles.contains(&Role::K8sWorker) {
        2
    } else {
        3
    }
}

/// The batches that take `candidates` from their current settings to
/// `target` (nodes that would see no difference are left out).
pub fn plan(
    candidates: &[Candidate],
    target: &ClusterSettings,
    options: &RolloutOptions,
) -> Batches {
    let changed: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| changes(&c.roles, &c.current, target))
        .collect();
    order(changed, control_plane_cap(candidates), options)
}

/// The batches for `nodes`, every one of them (a reboot rollout's): the
/// order and limits of [`plan`], at most `cp_cap` control planes at once
/// ([`control_plane_cap`] of the whole cluster).
pub fn order(nodes: Vec<&Candidate>, cp_cap: usize, options: &RolloutOptions) -> Batches {
    let changed = nodes;
    let holder_zones: BTreeSet<&str> = changed
        .iter()
        .filter(|c| c.holds_vip)
        .map(|c| c.zone.as_str())
        .collect();
    let mut ordered = changed;
    ordered.sort_by(|a, b| {
        let key = |c: &Candidate| {
            (
                holder_zones.contains(c.zone.as_str()),
                c.zone.clone(),
                class(&c.roles),
                c.holds_vip,
                c.node.clone(),
            )
        };
        key(a).cmp(&key(b))
    });
    let limit = |c: &Candidate| {
        let mut n = c
            .roles
            .iter()
            .map(|r| options.max_unavailable_for(*r) as usize)
            .min()
            .unwrap_or(1);
        if c.roles.contains(&Role::K8sControlPlane) {
            n = n.min(cp_cap);
        }
        n.max(1)
    };
    let canary = (options.canary as usize).min(ordered.len());
    let (first, rest) = ordered.split_at(canary);
    let canary_batches = chunk(first, &limit);
    let mut batches = canary_batches.clone();
    batches.extend(chunk(rest, &limit));
    Batches {
        canary_batches: canary_batches.len() as u32,
        batches,
    }
}

/// Control planes that may be out at once with etcd keeping its quorum:
/// of `n` members, `n - (n/2 + 1)`, at least 1 (a lone control plane is
/// the maintenance gate's to refuse).
pub fn control_plane_cap(candidates: &[Candidate]) -> usize {
    quorum_cap(
        candidates
            .iter()
            .filter(|c| c.roles.contains(&Role::K8sControlPlane))
            .count(),
    )
}

/// Of `n` etcd members, how many may be out at once (at least 1).
pub fn quorum_cap(n: usize) -> usize {
    n.saturating_sub(n / 2 + 1).max(1)
}

/// Consecutive nodes of one zone and role class, `limit` at most each.
fn chunk(nodes: &[&Candidate], limit: &dyn Fn(&Candidate) -> usize) -> Vec<Vec<NodeId>> {
    let mut groups: Vec<((String, u8), Vec<&Candidate>)> = Vec::new();
    for c in nodes {
        let key = (c.zone.clone(), class(&c.roles));
        match groups.last_mut() {
            Some((k, group)) if *k == key => group.push(c),
            _ => groups.push((key, vec![c])),
        }
    }
    let mut out = Vec::new();
    for (_, group) in groups {
        let size = group.iter().map(|c| limit(c)).min().unwrap_or(1).max(1);
        for batch in group.chunks(size) {
            out.push(batch.iter().map(|c| c.node.clone()).collect());
        }
    }
    out
}

/// Zones for display: every zone in the plan, in order.
pub fn zones_in_order(candidates: &[Candidate], batches: &Batches) -> Vec<String> {
    let zone: BTreeMap<&NodeId, &str> = candidates
        .iter()
        .map(|c| (&c.node, c.zone.as_str()))
        .collect();
    let mut out: Vec<String> = Vec::new();
    for node in batches.batches.iter().flatten() {
        let z = zone.get(node).copied().unwrap_or_default().to_owned();
        if out.last() != Some(&z) {
            out.push(z);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use steward_proto::converge::Frontend;

    use super::*;

    fn node(id: &str) -> NodeId {
        NodeId::new(id).unwrap()
    }

    fn candidate(id: &str, roles: &[Role], zone: &str, holds_vip: bool) -> Candidate {
        Candidate {
            node: node(id),
            roles: roles.iter().copied().collect(),
            zone: zone.into(),
            holds_vip,
            current: ClusterSettings::default(),
        }
    }

    fn frontends() -> ClusterSettings {
        ClusterSettings {
            frontends: vec![Frontend {
                name: "web".into(),
                port: 8080,
                backend_role: Role::K8sWorker,
                backend_port: 30080,
            }],
            ..Default::default()
        }
    }

    fn ids(batches: &Batches) -> Vec<Vec<String>> {
        batches
            .batches
            .iter()
            .map(|b| b.iter().map(|n| n.to_string()).collect())
            .collect()
    }

    #[test]
    fn only_nodes_that_consume_the_change_are_planned_and_the_holder_goes_last() {
        let nodes = [
            candidate("lb-1", &[Role::Lb], "", true),
            candidate("lb-2", &[Role::Lb], "", false),
            candidate("w-1", &[Role::K8sWorker], "", false),
            candidate("none", &[], "", false),
        ];
        let batches = plan(&nodes, &frontends(), &RolloutOptions::default());
        // Workers do not consume the frontends; lb is one at a time, the
        // VIP holder last.
        assert_eq!(ids(&batches), [["lb-2"], ["lb-1"]]);
        // Max unavailable does not apply to lb nodes.
        let wide = RolloutOptions {
            max_unavailable: 5,
            ..Default::default()
        };
        assert_eq!(
            ids(&plan(&nodes, &frontends(), &wide)),
            [["lb-2"], ["lb-1"]]
        );
        // Nothing differs: nothing planned.
        let mut same = nodes.clone();
        for c in &mut same {
            c.current = frontends();
        }
        assert!(plan(&same, &frontends(), &wide).batches.is_empty());
    }

    #[test]
    fn zone_by_zone_control_planes_first_in_batches_of_max_unavailable() {
        let nodes = [
            candidate("w-1", &[Role::K8sWorker], "b", false),
            candidate("w-2", &[Role::K8sWorker], "a", false),
            candidate("w-3", &[Role::K8sWorker], "a", false),
            candidate("w-4", &[Role::K8sWorker], "a", false),
            candidate("cp-1", &[Role::K8sControlPlane], "a", false),
            candidate("cp-2", &[Role::K8sControlPlane], "b", false),
        ];
        let target = kubernetes_only();
        let options = RolloutOptions {
            max_unavailable: 2,
            canary: 1,
            pause_after_canary: true,
            ..Default::default()
        };
        let batches = plan(&nodes, &target, &options);
        assert_eq!(
            ids(&batches),
            vec![
                vec!["cp-1"],
                vec!["w-2", "w-3"],
                vec!["w-4"],
                vec!["cp-2"],
                vec!["w-1"]
            ]
        );
        assert_eq!(batches.canary_batches, 1);
        assert_eq!(zones_in_order(&nodes, &batches), ["a", "b"]);
    }

    #[test]
    fn the_zone_of_a_vip_holder_goes_last() {
        let nodes = [
            candidate("lb-1", &[Role::Lb], "a", true),
            candidate("lb-2", &[Role::Lb], "b", false),
        ];
        let batches = plan(&nodes, &frontends(), &RolloutOptions::default());
        assert_eq!(ids(&batches), [["lb-2"], ["lb-1"]]);
    }

    /// A Kubernetes version change (workers and control planes see it).
    fn kubernetes_only() -> ClusterSettings {
        ClusterSettings {
            kubernetes: Some(steward_proto::converge::KubernetesSettings {
                version: "1.31.2-1.1".into(),
                pod_subnet: "10.244.0.0/16".into(),
                service_subnet: "10.96.0.0/12".into(),
                repository: steward_proto::converge::PackageRepository {
                    url: "https://pkgs.k8s.io/core:/stable:/v1.31/deb/".into(),
                    suite: "/".into(),
                    key: None,
                },
                kubelet_version: None,
            }),
            ..Default::default()
        }
    }

    /// ... and a volume (brick nodes see it too).
    fn kubernetes() -> ClusterSettings {
        ClusterSettings {
            gluster_volumes: vec![steward_proto::converge::GlusterVolume {
                name: "data".into(),
                replica: 3,
                mount_on: [Role::K8sWorker].into_iter().collect(),
            }],
            ..kubernetes_only()
        }
    }

    #[test]
    fn each_role_takes_its_own_limit_and_lb_stays_at_one() {
        let nodes = [
            candidate("w-1", &[Role::K8sWorker], "a", false),
            candidate("w-2", &[Role::K8sWorker], "a", false),
            candidate("w-3", &[Role::K8sWorker], "a", false),
            candidate("w-4", &[Role::K8sWorker], "a", false),
            candidate("b-1", &[Role::GlusterBrick], "a", false),
            candidate("b-2", &[Role::GlusterBrick], "a", false),
            candidate("b-3", &[Role::GlusterBrick], "a", false),
            // A worker that is also a brick takes the smaller limit.
            candidate("wb-1", &[Role::K8sWorker, Role::GlusterBrick], "b", false),
            candidate("wb-2", &[Role::K8sWorker, Role::GlusterBrick], "b", false),
        ];
        let options = RolloutOptions {
            max_unavailable: 2,
            per_role: "k8s-worker=3,gluster-brick=1".parse().unwrap(),
            ..Default::default()
        };
        assert_eq!(
            ids(&plan(&nodes, &kubernetes(), &options)),
            vec![
                vec!["b-1"],
                vec!["b-2"],
                vec!["b-3"],
                vec!["w-1", "w-2", "w-3"],
                vec!["w-4"],
                vec!["wb-1"],
                vec!["wb-2"],
            ]
        );
        // Without a per-role limit, max_unavailable for everyone.
        let plain = RolloutOptions {
            max_unavailable: 2,
            ..Default::default()
        };
        assert_eq!(
            ids(&plan(&nodes, &kubernetes(), &plain)),
            vec![
                vec!["b-1", "b-2"],
                vec!["b-3"],
                vec!["w-1", "w-2"],
                vec!["w-3", "w-4"],
                vec!["wb-1", "wb-2"],
            ]
        );
        // lb stays at one whatever is asked.
        let lbs = [
            candidate("lb-1", &[Role::Lb], "", false),
            candidate("lb-2", &[Role::Lb], "", false),
        ];
        let wide = RolloutOptions {
            max_unavailable: 9,
            per_role: "lb=1".parse().unwrap(),
            ..Default::default()
        };
        assert_eq!(ids(&plan(&lbs, &frontends(), &wide)), [["lb-1"], ["lb-2"]]);
    }

    #[test]
    fn control_planes_never_go_more_at_once_than_etcd_quorum_allows() {
        let cps = |n: usize| -> Vec<Candidate> {
            (1..=n)
                .map(|i| candidate(&format!("cp-{i}"), &[Role::K8sControlPlane], "a", false))
                .collect()
        };
        let options = RolloutOptions {
            max_unavailable: 5,
            per_role: "k8s-control-plane=4".parse().unwrap(),
            ..Default::default()
        };
        // 3 members keep quorum with 1 out; 5 with 2; 1 goes alone.
        for (n, biggest) in [(1, 1), (3, 1), (5, 2), (7, 3)] {
            let nodes = cps(n);
            assert_eq!(control_plane_cap(&nodes), biggest);
            let batches = plan(&nodes, &kubernetes(), &options);
            let largest = batches.batches.iter().map(Vec::len).max().unwrap();
            assert_eq!(largest, biggest, "{n} control planes: {:?}", ids(&batches));
            assert_eq!(batches.batches.iter().map(Vec::len).sum::<usize>(), n);
        }
        // Members not in the plan still count: 5 control planes, 2 changed.
        let mut nodes = cps(5);
        for c in &mut nodes[2..] {
            c.current = kubernetes();
        }
        assert_eq!(
            ids(&plan(&nodes, &kubernetes(), &options)),
            vec![vec!["cp-1", "cp-2"]]
        );
    }
}
