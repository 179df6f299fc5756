//! GlusterFS volumes across the `gluster-brick` nodes. The leader keeps, per
//! volume, which node holds each brick (`cluster/gluster/<volume>`): a brick
//! whose node lost the role is replaced by an unused brick node, and new
//! brick nodes are added a whole replica set at a time. Each node holds at
//! most one brick of a volume, so no replica set ever has two bricks on one
//! node. Exactly one peer (the first brick node by id) runs the `gluster`
//! commands, each guarded so that it runs once.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use steward_proto::converge::{ClusterView, GlusterVolume, SecretFile, Task, TaskId};
use steward_proto::domain::{NodeId, Role};

/// Where a node's brick of `volume` lives (the agent plans the directory).
pub fn brick_path(volume: &str) -> String {
    format!("/data/glusterfs/{volume}/brick1/brick")
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Brick {
    pub node: NodeId,
    pub address: IpAddr,
}

impl Brick {
    /// `host:/path`: how glusterd names the brick of `volume`.
    pub fn spec(&self, volume: &str) -> String {
        format!("{}:{}", host(self.address), brick_path(volume))
    }
}

fn host(address: IpAddr) -> String {
    match address {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    }
}

/// `cluster/gluster/<volume>`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeRecord {
    /// In replica-set order: bricks `[k*replica, (k+1)*replica)` form set k.
    pub bricks: Vec<Brick>,
    /// Replacements made, oldest first: (old, new).
    #[serde(default)]
    pub replaced: Vec<(Brick, Brick)>,
}

/// Brick nodes with an address, by id.
fn brick_nodes(view: &ClusterView) -> Vec<Brick> {
    view.with_role(Role::GlusterBrick)
        .filter_map(|m| {
            Some(Brick {
                node: m.node.clone(),
                address: m.address?,
            })
        })
        .collect()
}

/// `nodes` reordered so that consecutive nodes come from different zones
/// as far as possible (one from each zone in turn; nodes without a zone
/// form their own group): cut into replica sets, each set spans as many
/// zones as there are.
fn across_zones(nodes: Vec<Brick>, zones: &BTreeMap<NodeId, String>) -> Vec<Brick> {
    let mut groups: BTreeMap<Option<&String>, std::collections::VecDeque<Brick>> = BTreeMap::new();
    for n in nodes {
        groups.entry(zones.get(&n.node)).or_default().push_back(n);
    }
    let mut out = Vec::new();
    while groups.values().any(|g| !g.is_empty()) {
        for g in groups.values_mut() {
            if let Some(n) = g.pop_front() {
                out.push(n);
            }
        }
    }
    out
}

/// The leader's next record for `volume`, or `None` while there are too
/// few brick nodes to create it. Replica sets take their bricks from
/// distinct zones (`zones`: each node's `zone` label) when they can.
pub fn next_record(
    volume: &GlusterVolume,
    view: &ClusterView,
    current: Option<&VolumeRecord>,
    zones: &BTreeMap<NodeId, String>,
) -> Option<VolumeRecord> {
    let replica = volume.replica.max(1) as usize;
    let nodes = across_zones(brick_nodes(view), zones);
    let Some(current) = current.filter(|c| !c.bricks.is_empty()) else {
        if nodes.len() < replica {
            return None;
        }
        let sets = nodes.len() / replica;
        return Some(VolumeRecord {
            bricks: nodes.into_iter().take(sets * replica).collect(),
            replaced: Vec::new(),
        });
    };
    let mut next = current.clone();
    let in_use = |r: &VolumeRecord, n: &NodeId| r.bricks.iter().any(|b| &b.node == n);
    for i in 0..next.bricks.len() {
        let still_brick = nodes.iter().any(|n| n.node == next.bricks[i].node);
        if still_brick {
            continue;
        }
        // A spare from a zone this replica set does not use yet, if any.
        let set = i / replica * replica;
        let set_zones: Vec<Option<&String>> = next.bricks
            [set..(set + replica).min(next.bricks.len())]
            .iter()
            .enumerate()
            .filter(|(j, _)| set + j != i)
            .map(|(_, b)| zones.get(&b.node))
            .collect();
        let spare = nodes
            .iter()
            .filter(|n| !in_use(&next, &n.node))
            .find(|n| {
                zones
                    .get(&n.node)
                    .is_none_or(|z| !set_zones.contains(&Some(z)))
            })
            .or_else(|| nodes.iter().find(|n| !in_use(&next, &n.node)))
            .cloned();
        if let Some(spare) = spare {
            let old = std::mem::replace(&mut next.bricks[i], spare.clone());
            next.replaced.push((old, spare));
        }
    }
    let spares: Vec<Brick> = nodes
        .iter()
        .filter(|n| !in_use(&next, &n.node))
        .cloned()
        .collect();
    for set in spares.chunks_exact(replica) {
        next.bricks.extend(set.iter().cloned());
    }
    // Keep the history short: the guards only need recent replacements.
    let excess = next.replaced.len().saturating_sub(16);
    next.replaced.drain(..excess);
    Some(next)
}

/// The peer that runs the volume's commands: the first brick node (by id)
/// that has the role.
pub fn operator(view: &ClusterView) -> Option<NodeId> {
    brick_nodes(view).first().map(|b| b.node.clone())
}

fn sh(script: String) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script]
}

fn task(id: String, argv: Vec<String>, unless: Vec<String>) -> Task {
    let summary = argv.join(" ");
    Task {
        id,
        argv,
        creates: None,
        unless: Some(unless),
        summary,
        inputs: Vec::new(),
    }
}

/// The tasks `node` runs for `volume` given the leader's record.
pub fn steps(
    node: &NodeId,
    view: &ClusterView,
    volume: &GlusterVolume,
    record: &VolumeRecord,
) -> Vec<Task> {
    if operator(view).as_ref() != Some(node) || record.bricks.is_empty() {
        return Vec::new();
    }
    let name = &volume.name;
    let mut tasks = Vec::new();
    let mut peers: Vec<&Brick> = record.bricks.iter().filter(|b| &b.node != node).collect();
    peers.dedup();
    for peer in peers {
        let address = peer.address.to_string();
        tasks.push(task(
            TaskId::GlusterProbe(peer.node.clone()).into(),
            vec![
                "gluster".into(),
                "peer".into(),
                "probe".into(),
                address.clone(),
            ],
            sh(format!(
                "gluster pool list | awk 'NR>1 {{print $2}}' | grep -qxF '{address}'"
            )),
        ));
    }
    let replica = volume.replica.max(1) as usize;
    let first_set = &record.bricks[..replica.min(record.bricks.len())];
    let mut create = vec![
        "gluster".into(),
        "volume".into(),
        "create".into(),
        name.clone(),
        "replica".into(),
        replica.to_string(),
    ];
    create.extend(first_set.iter().map(|b| b.spec(name)));
    // Bricks on the root file system need `force`; Steward's brick
    // directories are plain directories.
    create.push("force".into());
    tasks.push(task(
        TaskId::GlusterCreate(name.clone()).into(),
        create,
        vec![
            "gluster".into(),
            "volume".into(),
            "info".into(),
            name.clone(),
        ],
    ));
    tasks.push(task(
        TaskId::GlusterStart(name.clone()).into(),
        vec![
            "gluster".into(),
            "volume".into(),
            "start".into(),
            name.clone(),
        ],
        sh(format!(
            "gluster volume info {name} | grep -q '^Status: Started'"
        )),
    ));
    let has_brick = |b: &Brick| {
        sh(format!(
            "gluster volume info {name} | grep -qF ': {}'",
            b.spec(name)
        ))
    };
    for (old, new) in &record.replaced {
        // Only replacements that reached the record's current bricks.
        if !record.bricks.contains(new) {
            continue;
        }
        tasks.push(task(
            TaskId::GlusterReplace {
                volume: name.clone(),
                old: old.node.clone(),
                new: new.node.clone(),
            }
            .into(),
            vec![
                "gluster".into(),
                "volume".into(),
                "replace-brick".into(),
                name.clone(),
                old.spec(name),
                new.spec(name),
                "commit".into(),
                "force".into(),
            ],
            has_brick(new),
        ));
    }
    for set in record.bricks[first_set.len()..].chunks(replica) {
        let mut add = vec![
            "gluster".into(),
            "volume".into(),
            "add-brick".into(),
            name.clone(),
            "replica".into(),
            replica.to_string(),
        ];
        add.extend(set.iter().map(|b| b.spec(name)));
        add.push("force".into());
        tasks.push(task(
            TaskId::GlusterAdd {
                volume: name.clone(),
                first: set[0].node.clone(),
            }
            .into(),
            add,
            has_brick(&set[set.len() - 1]),
        ));
    }
    tasks
}

/// The PersistentVolume Steward publishes for `volume`.
pub fn pv_name(volume: &str) -> String {
    format!("gluster-{volume}")
}

/// The capacity a PersistentVolume states while Steward knows none.
/// Kubernetes enforces no size on `local` volumes; it only binds claims
/// that ask for at most this much, so it is deliberately modest.
pub const FALLBACK_CAPACITY: &str = "1Gi";

/// Task id of applying `volume`'s PersistentVolume.
pub fn pv_task_id(volume: &str) -> String {
    TaskId::GlusterPv(volume.to_owned()).into()
}

/// The nodes that mount `volume` (Kubernetes node names are node ids), by
/// id.
pub fn mounting_nodes(volume: &GlusterVolume, view: &ClusterView) -> Vec<NodeId> {
    view.mounting(volume).map(|m| m.node.clone()).collect()
}

/// A `local` PersistentVolume (YAML) on the volume's FUSE mount, usable by
/// pods on exactly the nodes that mount it; `None` while none does (a node
/// affinity cannot be empty). `capacity_bytes`: the volume's size if known.
pub fn pv_manifest(
    volume: &GlusterVolume,
    view: &ClusterView,
    capacity_bytes: Option<u64>,
) -> Option<String> {
    let nodes = mounting_nodes(volume, view);
    if nodes.is_empty() {
        return None;
    }
    let name = &volume.name;
    let (storage, source) = match capacity_bytes {
        Some(bytes) => (bytes.to_string(), "gluster volume status detail".to_owned()),
        None => (
            FALLBACK_CAPACITY.to_owned(),
            "unknown; a placeholder".to_owned(),
        ),
    };
    let values: String = nodes
        .iter()
        .map(|n| format!("                - {n}\n"))
        .collect();
    Some(format!(
        "# Gluster volume {name} (replica {replica}), mounted by steward-agent at {path}\n\
         # on the nodes listed under nodeAffinity. Made by Steward; applied with\n\
         # kubectl by the coordinator once Kubernetes is up.\n\
         apiVersion: v1\n\
         kind: PersistentVolume\n\
         metadata:\n\
         \x20 name: {pv}\n\
         \x20 labels:\n\
         \x20   app.kubernetes.io/managed-by: steward\n\
         \x20   steward.io/gluster-volume: {name}\n\
         \x20 annotations:\n\
         \x20   steward.io/capacity-source: \"{source}\"\n\
         spec:\n\
         \x20 capacity:\n\
         \x20   storage: \"{storage}\"\n\
         \x20 accessModes:\n\
         \x20   - ReadWriteMany\n\
         \x20 persistentVolumeReclaimPolicy: Retain\n\
         \x20 storageClassName: steward-gluster\n\
         \x20 volumeMode: Filesystem\n\
         \x20 local:\n\
         \x20   path: {path}\n\
         \x20 nodeAffinity:\n\
         \x20   required:\n\
         \x20     nodeSelectorTerms:\n\
         \x20       - matchExpressions:\n\
         \x20           - key: kubernetes.io/hostname\n\
         \x20             operator: In\n\
         \x20             values:\n\
         {values}",
        replica = volume.replica,
        pv = pv_name(name),
        path = steward_proto::converge::gluster_mount_point(name),
    ))
}

/// `nodes a, b` for a summary; past eight nodes, how many (the summary
/// is bounded; `stewardctl gluster pv` shows them all).
fn node_list(nodes: &[NodeId]) -> String {
    let names: Vec<&str> = nodes.iter().map(NodeId::as_str).collect();
    if names.len() <= 8 {
        format!("nodes {}", names.join(", "))
    } else {
        format!("{} nodes: {}, ...", names.len(), names[..8].join(", "))
    }
}

/// Where the kubectl control plane gets `volume`'s manifest.
pub fn pv_file(volume: &str) -> String {
    format!("/var/lib/steward-agent/gluster/pv-{volume}.yaml")
}

/// `kubectl apply -f -` of the volume's PersistentVolume, for the control
/// plane that runs kubectl, with the manifest as a file placed before the
/// task runs (a task's arguments are bounded; a manifest is not) and fed
/// to kubectl on its standard input. Done once per manifest: the marker
/// file is named after the manifest's hash, so a change (a node more or
/// less, a capacity) applies again.
pub fn pv_task(
    volume: &GlusterVolume,
    view: &ClusterView,
    capacity_bytes: Option<u64>,
    admin_conf: &str,
    done_dir: &str,
) -> Option<(Task, SecretFile)> {
    let manifest = pv_manifest(volume, view, capacity_bytes)?;
    let digest = ring::digest::digest(&ring::digest::SHA256, manifest.as_bytes());
    let hash: String = digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let done = format!("{done_dir}/{}-{hash}", pv_task_id(&volume.name));
    let file = pv_file(&volume.name);
    let nodes = mounting_nodes(volume, view);
    let task = Task {
        id: pv_task_id(&volume.name),
        argv: sh(format!(
            "set -e; kubectl --kubeconfig {admin_conf} apply -f - < {file}; \
             mkdir -p {done_dir}; touch {done}"
        )),
        creates: Some(done),
        unless: None,
        inputs: Vec::new(),
        summary: format!(
            "kubectl apply PersistentVolume {} ({})",
            pv_name(&volume.name),
            node_list(&nodes)
        ),
    };
    let file = SecretFile {
        path: file,
        content: manifest.into_bytes(),
        mode: 0o644,
    };
    Some((task, file))
}

#[cfg(test)]
mod tests {
    use steward_proto::converge::Member;

    use super::*;

    fn view(bricks: &[&str]) -> ClusterView {
        ClusterView {
            // gN lives at 198.18.0.(30+N), whatever else is in the view.
            members: bricks
                .iter()
                .map(|n| Member {
                    node: NodeId::new(n.to_string()).unwrap(),
                    roles: [Role::GlusterBrick].into(),
                    address: Some(
                        format!("198.18.0.{}", 30 + n[1..].parse::<u8>().unwrap())
                            .parse()
                            .unwrap(),
                    ),
                })
                .collect(),
            ..Default::default()
        }
    }

    fn vol() -> GlusterVolume {
        GlusterVolume {
            name: "data".into(),
            replica: 3,
            mount_on: steward_proto::converge::default_mount_on(),
        }
    }

    fn nodes(r: &VolumeRecord) -> Vec<&str> {
        r.bricks.iter().map(|b| b.node.as_str()).collect()
    }

    #[test]
    fn a_volume_waits_for_enough_brick_nodes_then_uses_each_once() {
        assert_eq!(
            next_record(&vol(), &view(&["g1", "g2"]), None, &BTreeMap::new()),
            None
        );
        let r = next_record(
            &vol(),
            &view(&["g1", "g2", "g3", "g4"]),
            None,
            &BTreeMap::new(),
        )
        .unwrap();
        assert_eq!(nodes(&r), ["g1", "g2", "g3"]);
        // Stable: nothing changes without a membership change.
        assert_eq!(
            next_record(
                &vol(),
                &view(&["g1", "g2", "g3", "g4"]),
                Some(&r),
                &BTreeMap::new()
            )
            .unwrap(),
            r
        );
    }

    #[test]
    fn a_node_losing_the_role_is_replaced_by_a_spare() {
        let r = next_record(
            &vol(),
            &view(&["g1", "g2", "g3", "g4"]),
            None,
            &BTreeMap::new(),
        )
        .unwrap();
        let r2 = next_record(
            &vol(),
            &view(&["g1", "g3", "g4"]),
            Some(&r),
            &BTreeMap::new(),
        )
        .unwrap();
        assert_eq!(nodes(&r2), ["g1", "g4", "g3"]);
        assert_eq!(r2.replaced.len(), 1);
        assert_eq!(r2.replaced[0].0.node.as_str(), "g2");
        let tasks = steps(
            &NodeId::new("g1").unwrap(),
            &view(&["g1", "g3", "g4"]),
            &vol(),
            &r2,
        );
        let replace = tasks
            .iter()
            .find(|t| t.id.starts_with("gluster-replace"))
            .unwrap();
        assert_eq!(
            replace.argv[4..6],
            [
                "198.18.0.32:/data/glusterfs/data/brick1/brick".to_owned(),
                "198.18.0.34:/data/glusterfs/data/brick1/brick".to_owned()
            ]
        );
    }

    #[test]
    fn new_nodes_are_added_a_whole_replica_set_at_a_time() {
        let r = next_record(&vol(), &view(&["g1", "g2", "g3"]), None, &BTreeMap::new()).unwrap();
        let five = next_record(
            &vol(),
            &view(&["g1", "g2", "g3", "g4", "g5"]),
            Some(&r),
            &BTreeMap::new(),
        )
        .unwrap();
        assert_eq!(five.bricks.len(), 3);
        let six = next_record(
            &vol(),
            &view(&["g1", "g2", "g3", "g4", "g5", "g6"]),
            Some(&r),
            &BTreeMap::new(),
        )
        .unwrap();
        assert_eq!(nodes(&six), ["g1", "g2", "g3", "g4", "g5", "g6"]);
        for set in six.bricks.chunks(3) {
            let mut n: Vec<_> = set.iter().map(|b| &b.node).collect();
            n.dedup();
            assert_eq!(n.len(), 3, "two bricks of a set on one node");
        }
        let tasks = steps(
            &NodeId::new("g1").unwrap(),
            &view(&["g1", "g2", "g3", "g4", "g5", "g6"]),
            &vol(),
            &six,
        );
        assert!(tasks.iter().any(|t| t.id == "gluster-add-data-g4"));
    }

    #[test]
    fn only_the_first_brick_node_runs_commands_probe_create_start_in_order() {
        let v = view(&["g1", "g2", "g3"]);
        let r = next_record(&vol(), &v, None, &BTreeMap::new()).unwrap();
        for n in ["g2", "g3"] {
            assert!(steps(&NodeId::new(n).unwrap(), &v, &vol(), &r).is_empty());
        }
        let ids: Vec<String> = steps(&NodeId::new("g1").unwrap(), &v, &vol(), &r)
            .into_iter()
            .map(|t| t.id)
            .collect();
        assert_eq!(
            ids,
            [
                "gluster-probe-g2",
                "gluster-probe-g3",
                "gluster-create-data",
                "gluster-start-data"
            ]
        );
        let create = &steps(&NodeId::new("g1").unwrap(), &v, &vol(), &r)[2];
        assert_eq!(
            create.argv.join(" "),
            "gluster volume create data replica 3 198.18.0.31:/data/glusterfs/data/brick1/brick \
             198.18.0.32:/data/glusterfs/data/brick1/brick 198.18.0.33:/data/glusterfs/data/brick1/brick force"
        );
        assert!(create.unless.is_some(), "create must be guarded");
    }

    /// With zones a/b/c, each replica set takes one brick from each zone,
    /// and a replaced brick comes from the zone the set is missing.
    #[test]
    fn replica_sets_span_zones_when_they_can() {
        let ids = ["g1", "g2", "g3", "g4", "g5", "g6"];
        let zones: BTreeMap<NodeId, String> = ids
            .iter()
            .zip(["a", "a", "b", "b", "c", "c"])
            .map(|(n, z)| (NodeId::new(*n).unwrap(), z.to_owned()))
            .collect();
        let r = next_record(&vol(), &view(&ids), None, &zones).unwrap();
        assert_eq!(r.bricks.len(), 6);
        for set in r.bricks.chunks(3) {
            let mut z: Vec<&String> = set.iter().map(|b| &zones[&b.node]).collect();
            z.sort();
            assert_eq!(z, ["a", "b", "c"], "{:?}", nodes(&r));
        }
        // g1 (zone a) leaves; the spare must come from zone a.
        let mut zones7 = zones.clone();
        zones7.insert(NodeId::new("g7").unwrap(), "b".into());
        zones7.insert(NodeId::new("g8").unwrap(), "a".into());
        let after = next_record(
            &vol(),
            &view(&["g2", "g3", "g4", "g5", "g6", "g7", "g8"]),
            Some(&r),
            &zones7,
        )
        .unwrap();
        let (old, new) = after.replaced.last().unwrap();
        assert_eq!(old.node.as_str(), "g1");
        assert_eq!(new.node.as_str(), "g8", "the spare from the missing zone");
    }

    /// Bricks g1..g3, workers w1, w2, a control plane c1, and w3 with no
    /// role at all (not a member).
    fn cluster() -> ClusterView {
        let mut v = view(&["g1", "g2", "g3"]);
        for (n, roles) in [
            ("c1", vec![Role::K8sControlPlane]),
            ("w1", vec![Role::K8sWorker]),
            ("w2", vec![Role::K8sWorker, Role::Lb]),
        ] {
            v.members.push(Member {
                node: NodeId::new(n).unwrap(),
                roles: roles.into_iter().collect(),
                address: None,
            });
        }
        v.members.sort_by(|a, b| a.node.cmp(&b.node));
        v
    }

    /// The `values:` of the manifest's node affinity.
    fn affinity(manifest: &str) -> Vec<&str> {
        manifest
            .split_once("values:\n")
            .unwrap()
            .1
            .lines()
            .map(|l| l.trim().trim_start_matches("- "))
            .collect()
    }

    #[test]
    fn the_pv_is_a_local_rwx_volume_on_exactly_the_mounting_nodes() {
        let m = pv_manifest(&vol(), &cluster(), Some(10 << 30)).unwrap();
        assert_eq!(affinity(&m), ["w1", "w2"], "{m}");
        for line in [
            "kind: PersistentVolume",
            "  name: gluster-data",
            "    storage: \"10737418240\"",
            "    - ReadWriteMany",
            "    path: /mnt/steward/gluster/data",
            "            - key: kubernetes.io/hostname",
            "              operator: In",
            "  persistentVolumeReclaimPolicy: Retain",
        ] {
            assert!(m.lines().any(|l| l == line), "{line:?} not in\n{m}");
        }
        let mut wide = vol();
        wide.mount_on = [Role::K8sWorker, Role::K8sControlPlane].into();
        let m = pv_manifest(&wide, &cluster(), None).unwrap();
        assert_eq!(affinity(&m), ["c1", "w1", "w2"]);
        assert!(
            m.contains(&format!("storage: \"{FALLBACK_CAPACITY}\"")),
            "{m}"
        );
        assert!(m.contains("capacity-source: \"unknown"), "{m}");
        wide.mount_on.clear();
        assert_eq!(pv_manifest(&wide, &cluster(), None), None);
    }

    #[test]
    fn the_pv_task_feeds_kubectl_on_stdin_once_per_manifest() {
        let (task, file) = pv_task(
            &vol(),
            &cluster(),
            None,
            "/etc/kubernetes/admin.conf",
            "/done",
        )
        .unwrap();
        assert_eq!(task.id, "gluster-pv-data");
        assert_eq!(file.path, "/var/lib/steward-agent/gluster/pv-data.yaml");
        assert_eq!(
            file.content,
            pv_manifest(&vol(), &cluster(), None).unwrap().into_bytes()
        );
        let done = task.creates.clone().unwrap();
        assert!(done.starts_with("/done/gluster-pv-data-"), "{done}");
        assert_eq!(
            task.argv,
            [
                "sh".to_owned(),
                "-c".to_owned(),
                format!(
                    "set -e; kubectl --kubeconfig /etc/kubernetes/admin.conf apply -f - < \
                     /var/lib/steward-agent/gluster/pv-data.yaml; mkdir -p /done; touch {done}"
                )
            ]
        );
        assert_eq!(
            task.summary,
            "kubectl apply PersistentVolume gluster-data (nodes w1, w2)"
        );
        // One node more: another manifest, so it is applied again.
        let mut more = cluster();
        more.members.push(Member {
            node: NodeId::new("w3").unwrap(),
            roles: [Role::K8sWorker].into(),
            address: None,
        });
        let (again, _) = pv_task(&vol(), &more, None, "/a", "/done").unwrap();
        assert_ne!(again.creates, task.creates);
    }

    /// The first end-to-end run: the manifest inline in the task's argv
    /// passed the 1 KiB string bound, and the agent refused the whole
    /// desired state (and with it its session).
    #[test]
    fn the_pv_task_and_file_pass_the_wire_checks_with_many_nodes() {
        let mut big = cluster();
        for i in 0..200 {
            big.members.push(Member {
                node: NodeId::new(format!("worker-with-a-long-name-{i:03}")).unwrap(),
                roles: [Role::K8sWorker].into(),
                address: None,
            });
        }
        let (task, file) = pv_task(&vol(), &big, Some(1 << 40), "/a", "/done").unwrap();
        use steward_proto::pb;
        let task = Task::try_from(pb::Task::from(task));
        assert!(task.is_ok(), "{task:?}");
        let file = SecretFile::try_from(pb::SecretFile::from(file));
        assert!(file.is_ok(), "{file:?}");
    }
}
