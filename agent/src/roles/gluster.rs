//! Gluster volumes on the nodes that use them: the FUSE client and one
//! systemd mount unit per volume at `/mnt/steward/gluster/<volume>`, with
//! every brick node as a volfile server, checked on every run and removed
//! when the volume leaves the spec. Pure: the engine applies it.

use std::net::IpAddr;

use steward_proto::converge::{gluster_mount_point, ClusterView, GlusterVolume, TaskId};
use steward_proto::domain::{DesiredState, Role};

use crate::converge::resource::{PackageSpec, Planned, Resource, UnitSpec};

/// Every unit this module writes starts so (`systemd-escape --path` of
/// `/mnt/steward/gluster/`).
pub const UNIT_PREFIX: &str = "mnt-steward-gluster-";

/// The volumes a node with the desired state's roles mounts.
pub fn mounted_here(desired: &DesiredState) -> impl Iterator<Item = &GlusterVolume> {
    desired
        .cluster
        .settings
        .gluster_volumes
        .iter()
        .filter(|v| v.mounted_by(&desired.roles))
}

/// Whether a node with these roles could have mounts to clean up.
pub fn may_have_mounts(desired: &DesiredState) -> bool {
    !desired.roles.is_empty() || !desired.cluster.settings.gluster_volumes.is_empty()
}

/// `systemd-escape --path --suffix=mount PATH`: the unit name systemd
/// requires for a mount at `path`.
pub fn mount_unit_name(path: &str) -> String {
    let trimmed: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    if trimmed.is_empty() {
        return "-.mount".into();
    }
    let mut out = String::new();
    for (i, part) in trimmed.iter().enumerate() {
        if i > 0 {
            out.push('-');
        }
        for b in part.bytes() {
            // A dot only where it would start the name.
            let plain = b.is_ascii_alphanumeric()
                || b == b':'
                || b == b'_'
                || (b == b'.' && !out.is_empty());
            if plain {
                out.push(b as char);
            } else {
                out.push_str(&format!("\\x{b:02x}"));
            }
        }
    }
    out.push_str(".mount");
    out
}

/// How the client names a server: IPv6 in brackets.
fn server(address: IpAddr) -> String {
    match address {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    }
}

/// The volfile servers: every brick node with an address, by id. Any
/// glusterd of the pool serves the volume's layout; the client then talks
/// to the bricks themselves.
pub fn volfile_servers(view: &ClusterView) -> Vec<String> {
    view.with_role(Role::GlusterBrick)
        .filter_map(|m| m.address.map(server))
        .collect()
}

/// The mount unit for `volume` from `servers` (not empty): the first
/// serves the volume file, the others take over if it is down.
pub fn mount_unit(volume: &str, servers: &[String]) -> String {
    let mut options = "_netdev".to_owned();
    if servers.len() > 1 {
        options.push_str(&format!(
            ",backup-volfile-servers={}",
            servers[1..].join(":")
        ));
    }
    format!(
        "# Managed by steward-agent: Gluster volume {volume}.\n\
         [Unit]\n\
         Description=Gluster volume {volume} (steward)\n\
         Wants=network-online.target\n\
         After=network-online.target\n\
         \n\
         [Mount]\n\
         What={first}:/{volume}\n\
         Where={point}\n\
         Type=glusterfs\n\
         Options={options}\n\
         \n\
         [Install]\n\
         WantedBy=remote-fs.target\n",
        first = servers[0],
        point = gluster_mount_point(volume),
    )
}

/// The client package, a mount unit and its check per volume mounted
/// here, and the removal of the mounts the spec dropped.
pub fn plan_mounts(desired: &DesiredState) -> Vec<Planned> {
    let mut plan = Vec::new();
    let volumes: Vec<&GlusterVolume> = mounted_here(desired).collect();
    let keep: Vec<String> = volumes
        .iter()
        .map(|v| mount_unit_name(&gluster_mount_point(&v.name)))
        .collect();
    if !volumes.is_empty() {
        plan.push(Planned::new(Resource::Packages {
            name: "glusterfs-client".into(),
            packages: vec![PackageSpec::any("glusterfs-client")],
            hold: false,
        }));
    }
    let servers = volfile_servers(&desired.cluster);
    for volume in volumes {
        let point = gluster_mount_point(&volume.name);
        let unit = mount_unit_name(&point);
        if servers.is_empty() {
            plan.push(Planned::new(Resource::Blocked {
                name: format!("gluster-mount-{}", volume.name),
                reason: format!(
                    "volume {} is to be mounted here but no gluster-brick node has an \
                     address yet",
                    volume.name
                ),
            }));
            continue;
        }
        let mount = Planned::new(Resource::Unit(UnitSpec {
            content: Some(mount_unit(&volume.name, &servers)),
            restart_on_change: false,
            ..UnitSpec::running(&unit)
        }))
        .after("packages:glusterfs-client");
        let mount_id = mount.resource.id();
        plan.push(mount);
        plan.push(
            Planned::new(Resource::MountCheck {
                unit,
                target: point.into(),
            })
            .after(mount_id),
        );
    }
    if may_have_mounts(desired) {
        plan.push(Planned::new(Resource::StaleMounts {
            name: "gluster".into(),
            unit_prefix: UNIT_PREFIX.into(),
            keep,
        }));
    }
    plan
}

/// The capacity of each volume this node runs the `gluster` commands of
/// (the coordinator gives exactly one node a volume's `gluster-create-*`
/// task), read once the volume is started: the node that already talks to
/// glusterd for the volume is the only one that asks it.
pub fn plan_capacity(desired: &DesiredState) -> Vec<Planned> {
    desired
        .cluster
        .settings
        .gluster_volumes
        .iter()
        .filter(|v| {
            desired
                .tasks
                .iter()
                .any(|t| TaskId::GlusterCreate(v.name.clone()).is(&t.id))
        })
        .map(|v| {
            let start = TaskId::GlusterStart(v.name.clone()).to_string();
            let mut p = Planned::new(Resource::GlusterCapacity {
                volume: v.name.clone(),
                replica: v.replica,
            });
            if desired.tasks.iter().any(|t| t.id == start) {
                p = p.after(steward_proto::converge::command_resource_id(&start));
            }
            p
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::converge::engine::Engine;
    use crate::converge::fake::FakeHost;
    use steward_proto::converge::{Member, ResourceStatus};
    use steward_proto::domain::{NodeId, RoleSet};

    fn member(id: &str, roles: &[Role], address: Option<&str>) -> Member {
        Member {
            node: NodeId::new(id.to_owned()).unwrap(),
            roles: roles.iter().copied().collect(),
            address: address.map(|a| a.parse().unwrap()),
        }
    }

    /// Three brick nodes, two workers, a control plane; volume `data` on
    /// the workers (the default).
    fn desired(roles: &[Role]) -> DesiredState {
        let mut d = crate::roles::tests::desired(roles);
        d.cluster.members = vec![
            member("brick-1", &[Role::GlusterBrick], Some("198.18.0.10")),
            member("brick-2", &[Role::GlusterBrick], Some("198.18.0.11")),
            member("brick-3", &[Role::GlusterBrick], Some("198.18.0.12")),
            member("brick-4", &[Role::GlusterBrick], None),
            member("cp-1", &[Role::K8sControlPlane], Some("198.18.0.20")),
            member("worker-1", &[Role::K8sWorker], Some("198.18.0.30")),
        ];
        d
    }

    fn ids(plan: &[Planned]) -> Vec<String> {
        plan.iter().map(|p| p.resource.id()).collect()
    }

    #[test]
    fn unit_names_are_systemd_path_escapes() {
        assert_eq!(
            mount_unit_name("/mnt/steward/gluster/data"),
            "mnt-steward-gluster-data.mount"
        );
        // As `systemd-escape --path --suffix=mount` prints them.
        assert_eq!(
            mount_unit_name("/mnt/steward/gluster/my-vol"),
            "mnt-steward-gluster-my\\x2dvol.mount"
        );
        assert_eq!(
            mount_unit_name("//mnt/steward/gluster/.x/"),
            "mnt-steward-gluster-.x.mount"
        );
        assert_eq!(mount_unit_name("/.x/a b"), "\\x2ex-a\\x20b.mount");
        assert_eq!(mount_unit_name("/"), "-.mount");
        assert!(mount_unit_name(&gluster_mount_point("data")).starts_with(UNIT_PREFIX));
    }

    #[test]
    fn the_unit_names_every_brick_node_with_an_address() {
        let servers = volfile_servers(&desired(&[]).cluster);
        assert_eq!(servers, ["198.18.0.10", "198.18.0.11", "198.18.0.12"]);
        let unit = mount_unit("data", &servers);
        for line in [
            "What=198.18.0.10:/data",
            "Where=/mnt/steward/gluster/data",
            "Type=glusterfs",
            "Options=_netdev,backup-volfile-servers=198.18.0.11:198.18.0.12",
            "After=network-online.target",
            "WantedBy=remote-fs.target",
        ] {
            assert!(unit.lines().any(|l| l == line), "{line} not in\n{unit}");
        }
        let one = mount_unit("data", &["[2001:db8::1]".into()]);
        assert!(one.contains("What=[2001:db8::1]:/data\n"), "{one}");
        assert!(one.contains("Options=_netdev\n"), "{one}");
    }

    #[test]
    fn workers_mount_by_default_and_mount_on_chooses_the_roles() {
        let worker = plan_mounts(&desired(&[Role::K8sWorker]));
        assert_eq!(
            ids(&worker),
            [
                "packages:glusterfs-client",
                "unit:mnt-steward-gluster-data.mount",
                "mount-check:/mnt/steward/gluster/data",
                "stale-mounts:gluster",
            ]
        );
        let cp = plan_mounts(&desired(&[Role::K8sControlPlane]));
        assert_eq!(ids(&cp), ["stale-mounts:gluster"]);
        let Resource::StaleMounts { keep, .. } = &cp[0].resource else {
            panic!("{cp:?}");
        };
        assert!(keep.is_empty());

        let mut d = desired(&[Role::K8sControlPlane]);
        d.cluster.settings.gluster_volumes[0].mount_on =
            RoleSet::from([Role::K8sControlPlane, Role::K8sWorker]);
        assert_eq!(plan_mounts(&d).len(), 4);
        d.cluster.settings.gluster_volumes[0].mount_on = RoleSet::new();
        assert_eq!(ids(&plan_mounts(&d)), ["stale-mounts:gluster"]);
    }

    #[test]
    fn no_brick_node_with_an_address_blocks_the_mount_clearly() {
        let mut d = desired(&[Role::K8sWorker]);
        d.cluster.members.retain(|m| m.address.is_none());
        let plan = plan_mounts(&d);
        assert_eq!(
            ids(&plan),
            [
                "packages:glusterfs-client",
                "plan:gluster-mount-data",
                "stale-mounts:gluster"
            ]
        );
    }

    #[test]
    fn a_node_with_no_roles_in_a_cluster_without_volumes_plans_nothing() {
        let mut d = desired(&[]);
        d.cluster.settings.gluster_volumes.clear();
        assert!(plan_mounts(&d).is_empty());
    }

    fn host() -> FakeHost {
        FakeHost::new(&[("glusterfs-client", "11.1")])
    }

    #[test]
    fn a_worker_mounts_once_and_a_second_run_changes_nothing() {
        let host = host();
        let plan = plan_mounts(&desired(&[Role::K8sWorker]));
        let mut engine = Engine::default();
        let first = engine.run(&host, &plan, 1);
        assert!(first.converged(), "{first:?}");
        let changes = host.take_changes();
        for c in [
            "install glusterfs-client",
            "write /etc/systemd/system/mnt-steward-gluster-data.mount",
            "enable mnt-steward-gluster-data.mount",
            "start mnt-steward-gluster-data.mount",
        ] {
            assert!(changes.contains(&c.to_owned()), "{c} not in {changes:?}");
        }
        let second = engine.run(&host, &plan, 1);
        assert!(second
            .resources
            .iter()
            .all(|r| r.status == ResourceStatus::Ok));
        assert!(host.take_changes().is_empty());
    }

    #[test]
    fn new_brick_servers_rewrite_the_unit_without_a_remount() {
        let host = host();
        let mut d = desired(&[Role::K8sWorker]);
        let mut engine = Engine::default();
        assert!(engine.run(&host, &plan_mounts(&d), 1).converged());
        host.take_changes();
        d.cluster.members[3].address = Some("198.18.0.13".parse().unwrap());
        let report = engine.run(&host, &plan_mounts(&d), 2);
        assert!(report.converged(), "{report:?}");
        let changes = host.take_changes();
        assert!(
            !changes.iter().any(|c| c.starts_with("restart")),
            "{changes:?}"
        );
        assert!(host
            .file("/etc/systemd/system/mnt-steward-gluster-data.mount")
            .unwrap()
            .contains("backup-volfile-servers=198.18.0.11:198.18.0.12:198.18.0.13"));
    }

    #[test]
    fn a_hung_mount_is_detached_remounted_and_reported() {
        let host = host();
        let plan = plan_mounts(&desired(&[Role::K8sWorker]));
        let mut engine = Engine::default();
        assert!(engine.run(&host, &plan, 1).converged());
        host.take_changes();
        host.state
            .borrow_mut()
            .hung_mounts
            .insert("/mnt/steward/gluster/data".into());
        // One unanswered probe: a failure, no remount (a silent brick can
        // hold calls that long).
        let first = engine.run(&host, &plan, 1);
        let check = first
            .resources
            .iter()
            .find(|r| r.id == "mount-check:/mnt/steward/gluster/data")
            .unwrap();
        assert_eq!(check.status, ResourceStatus::Failed);
        assert!(check.detail.contains("next check"), "{}", check.detail);
        assert!(host.take_changes().is_empty());
        let report = engine.run(&host, &plan, 1);
        let check = report
            .resources
            .iter()
            .find(|r| r.id == "mount-check:/mnt/steward/gluster/data")
            .unwrap();
        assert_eq!(check.status, ResourceStatus::Changed);
        assert!(check.detail.contains("two checks"), "{}", check.detail);
        assert_eq!(
            host.take_changes(),
            [
                "umount -l /mnt/steward/gluster/data",
                "run systemctl kill --signal=SIGKILL mnt-steward-gluster-data.mount",
                "restart mnt-steward-gluster-data.mount"
            ]
        );
        assert!(engine.run(&host, &plan, 1).converged());
        assert!(host.take_changes().is_empty());
    }

    #[test]
    fn a_mount_that_answers_again_is_left_alone() {
        let host = host();
        let plan = plan_mounts(&desired(&[Role::K8sWorker]));
        let mut engine = Engine::default();
        assert!(engine.run(&host, &plan, 1).converged());
        let point = std::path::PathBuf::from("/mnt/steward/gluster/data");
        host.state.borrow_mut().hung_mounts.insert(point.clone());
        assert!(!engine.run(&host, &plan, 1).converged());
        host.state.borrow_mut().hung_mounts.remove(&point);
        assert!(engine.run(&host, &plan, 1).converged());
        // Silent once more: a first miss again, not a second.
        host.state.borrow_mut().hung_mounts.insert(point);
        host.take_changes();
        assert!(!engine.run(&host, &plan, 1).converged());
        assert_eq!(host.take_changes(), Vec::<String>::new());
    }

    #[test]
    fn a_dropped_volume_is_unmounted_but_never_under_open_files() {
        let host = host();
        let mut d = desired(&[Role::K8sWorker]);
        let mut engine = Engine::default();
        assert!(engine.run(&host, &plan_mounts(&d), 1).converged());
        host.take_changes();
        host.state.borrow_mut().open_files.insert(
            "/mnt/steward/gluster/data/db/x".into(),
            vec!["pid 42 (postgres): /mnt/steward/gluster/data/db/x".into()],
        );
        d.cluster.settings.gluster_volumes.clear();
        let plan = plan_mounts(&d);
        let refused = engine.run(&host, &plan, 2);
        let stale = refused.resources.last().unwrap();
        assert_eq!(stale.id, "stale-mounts:gluster");
        assert_eq!(stale.status, ResourceStatus::Failed);
        assert!(
            stale.detail.contains("files are open") && stale.detail.contains("pid 42 (postgres)"),
            "{}",
            stale.detail
        );
        assert!(host.take_changes().is_empty(), "nothing may be touched");

        host.state.borrow_mut().open_files.clear();
        let done = engine.run(&host, &plan, 2);
        assert!(done.converged(), "{done:?}");
        assert_eq!(
            host.take_changes(),
            [
                "stop mnt-steward-gluster-data.mount",
                "disable mnt-steward-gluster-data.mount",
                "rm /etc/systemd/system/mnt-steward-gluster-data.mount",
                "daemon-reload"
            ]
        );
        assert!(!host
            .state
            .borrow()
            .mounted
            .contains(std::path::Path::new("/mnt/steward/gluster/data")));
        assert!(engine.run(&host, &plan, 2).converged());
        assert!(host.take_changes().is_empty());
    }

    #[test]
    fn units_steward_did_not_write_are_left_alone() {
        let host = host();
        host.state.borrow_mut().dirs.insert(
            "/etc/systemd/system".into(),
            crate::converge::host::Meta {
                is_dir: true,
                mode: 0o755,
                owner: "root".into(),
                group: "root".into(),
            },
        );
        for name in ["mnt-backup.mount", "mnt-steward-gluster-data.service"] {
            host.state.borrow_mut().files.insert(
                format!("/etc/systemd/system/{name}").into(),
                (
                    b"[Mount]\nWhere=/mnt/backup\n".to_vec(),
                    crate::converge::host::Meta {
                        is_dir: false,
                        mode: 0o644,
                        owner: "root".into(),
                        group: "root".into(),
                    },
                ),
            );
        }
        let mut d = desired(&[Role::K8sWorker]);
        d.cluster.settings.gluster_volumes.clear();
        let report = Engine::default().run(&host, &plan_mounts(&d), 1);
        assert!(report.converged(), "{report:?}");
        assert!(host.take_changes().is_empty());
    }

    #[test]
    fn only_the_node_that_creates_a_volume_reads_its_capacity_once_started() {
        let mut d = desired(&[Role::GlusterBrick]);
        assert!(plan_capacity(&d).is_empty());
        for id in ["gluster-create-data", "gluster-start-data"] {
            d.tasks.push(steward_proto::converge::Task {
                id: id.into(),
                argv: vec!["gluster".into()],
                creates: None,
                unless: None,
                inputs: Vec::new(),
                summary: id.into(),
            });
        }
        let plan = crate::roles::plan(&d);
        let last = plan.last().unwrap();
        assert_eq!(last.resource.id(), "gluster-capacity:data");
        assert_eq!(last.requires, ["command:gluster-start-data"]);
    }
}
