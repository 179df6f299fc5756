//! Roles as pure planners: from the desired state (roles and the cluster
//! view) to the resources the host needs. No IO here; the converge engine
//! applies what these return.
//!
//! Planned here is what each node does on its own. Steps that need one
//! node picked for the whole cluster (`kubeadm init`, `gluster volume
//! create`) come from the coordinator as tasks, with the files they need;
//! they run last, in the order given, each after the one before.

pub mod gluster;
pub mod haproxy;

use steward_proto::converge::{KubernetesSettings, Task};
use steward_proto::domain::{DesiredState, Role};

use crate::converge::resource::{
    CommandSpec, FileSpec, Notify, NotifyAction, PackageSpec, Planned, Repository, Resource,
    UnitSpec,
};

/// The resources `desired` needs, in the order they are applied.
pub fn plan(desired: &DesiredState) -> Vec<Planned> {
    let mut plan = Vec::new();
    let kubernetes =
        desired.roles.contains(&Role::K8sControlPlane) || desired.roles.contains(&Role::K8sWorker);
    if desired.roles.contains(&Role::Lb) {
        plan.extend(lb(desired));
    }
    if kubernetes {
        plan.extend(match &desired.cluster.settings.kubernetes {
            Some(settings) => kubernetes_node(settings),
            None => vec![Planned::new(Resource::Blocked {
                name: "kubernetes".into(),
                reason: "this node has a Kubernetes role but the cluster has no [kubernetes] \
                         settings yet (stewardctl apply)"
                    .into(),
            })],
        });
    }
    if desired.roles.contains(&Role::GlusterBrick) {
        plan.extend(gluster_brick(desired));
    }
    plan.extend(gluster::plan_mounts(desired));
    plan.extend(coordinator_steps(desired, &plan));
    plan.extend(gluster::plan_capacity(desired));
    plan
}

/// The coordinator's files and tasks, after everything the roles need.
fn coordinator_steps(desired: &DesiredState, before: &[Planned]) -> Vec<Planned> {
    // Checks and clean-ups of the node's mounts are no prerequisite: a file
    // held open on a dropped volume must not hold up a `kubeadm join`.
    let role_ids: Vec<String> = before
        .iter()
        .filter(|p| {
            !matches!(
                p.resource,
                Resource::MountCheck { .. } | Resource::StaleMounts { .. }
            )
        })
        .map(|p| p.resource.id())
        .collect();
    let mut steps = Vec::new();
    for file in &desired.files {
        let mut spec = FileSpec::new(&file.path, file.content.clone(), file.mode);
        spec.validate = None;
        steps.push(Planned::new(Resource::File(spec)));
    }
    let mut previous: Option<String> = None;
    for task in &desired.tasks {
        let mut step = Planned::new(Resource::Command(command(task)));
        // A task needs what the roles set up, and the task before it.
        step.requires = role_ids.clone();
        step.requires
            .extend(steps.iter().map(|p: &Planned| p.resource.id()));
        step.requires.dedup();
        if let Some(p) = previous.take() {
            if !step.requires.contains(&p) {
                step.requires.push(p);
            }
        }
        previous = Some(step.resource.id());
        steps.push(step);
    }
    steps
}

fn command(task: &Task) -> CommandSpec {
    CommandSpec {
        name: task.id.clone(),
        argv: task.argv.clone(),
        creates: task.creates.as_ref().map(Into::into),
        unless: task.unless.clone(),
        summary: task.summary.clone(),
        inputs: task.inputs.clone(),
    }
}

fn sysctl(key: &str, value: &str) -> Planned {
    Planned::new(Resource::Sysctl {
        key: key.into(),
        value: value.into(),
    })
}

fn packages(name: &str, names: &[&str]) -> Planned {
    Planned::new(Resource::Packages {
        name: name.into(),
        packages: names.iter().map(|n| PackageSpec::any(n)).collect(),
        hold: false,
    })
}

fn service(name: &str, after: &str) -> Planned {
    Planned::new(Resource::Unit(UnitSpec::running(name))).after(after)
}

/// HAProxy in front of the cluster. The VIP itself is not a resource: the
/// agent's lease protocol binds it (see `crate::vip`).
pub fn lb(desired: &DesiredState) -> Vec<Planned> {
    let mut config = FileSpec::new(
        "/etc/haproxy/haproxy.cfg",
        haproxy::render(&desired.cluster),
        0o644,
    );
    config.validate = Some(
        ["haproxy", "-c", "-q", "-f", "{}"]
            .map(String::from)
            .to_vec(),
    );
    config.notify = Some(Notify {
        unit: "haproxy.service".into(),
        action: NotifyAction::Reload,
    });
    vec![
        // HAProxy on the passive node binds the VIP it does not hold.
        sysctl("net.ipv4.ip_nonlocal_bind", "1"),
        sysctl("net.ipv6.ip_nonlocal_bind", "1"),
        // Debian's haproxy.service reloads with /bin/kill, which is in
        // procps, which haproxy does not depend on (minimal images lack it).
        packages("haproxy", &["haproxy", "procps"]),
        Planned::new(Resource::File(config)).after("packages:haproxy"),
        service("haproxy.service", "file:/etc/haproxy/haproxy.cfg"),
    ]
}

/// A Kubernetes node: the host setup kubeadm's preflight checks ask for,
/// containerd, and kubelet/kubeadm/kubectl held at the cluster's version.
/// `kubeadm init`/`join` come from the coordinator as tasks.
fn kubernetes_node(settings: &KubernetesSettings) -> Vec<Planned> {
    let mut plan = kubernetes_host();
    plan.push(Planned::new(Resource::Repository(Repository {
        name: "kubernetes".into(),
        url: settings.repository.url.clone(),
        suite: settings.repository.suite.clone(),
        key: settings.repository.key.clone(),
    })));
    plan.push(
        Planned::new(Resource::Packages {
            name: "kubernetes".into(),
            // During this node's upgrade kubeadm moves first; kubelet and
            // kubectl follow once `kubeadm upgrade` ran (`kubelet_version`).
            packages: [
                ("kubelet", settings.kubelet_version()),
                ("kubeadm", settings.version.as_str()),
                ("kubectl", settings.kubelet_version()),
            ]
            .map(|(name, version)| PackageSpec {
                name: name.into(),
                version: Some(version.to_owned()),
            })
            .to_vec(),
            hold: true,
        })
        .after("repository:kubernetes"),
    );
    // kubeadm starts the kubelet when it has a configuration; until then
    // it would only crash-loop. Enabled, not started.
    plan.push(
        Planned::new(Resource::Unit(UnitSpec {
            active: None,
            ..UnitSpec::running("kubelet.service")
        }))
        .after("packages:kubernetes"),
    );
    plan
}

/// What kubeadm's preflight checks ask of every Kubernetes node.
fn kubernetes_host() -> Vec<Planned> {
    let containerd_config = FileSpec {
        notify: Some(Notify {
            unit: "containerd.service".into(),
            action: NotifyAction::Restart,
        }),
        ..FileSpec::new("/etc/containerd/config.toml", CONTAINERD_CONFIG, 0o644)
    };
    vec![
        Planned::new(Resource::SwapOff),
        Planned::new(Resource::KernelModule {
            name: "overlay".into(),
        }),
        Planned::new(Resource::KernelModule {
            name: "br_netfilter".into(),
        }),
        sysctl("net.bridge.bridge-nf-call-iptables", "1").after("kernel-module:br_netfilter"),
        sysctl("net.bridge.bridge-nf-call-ip6tables", "1").after("kernel-module:br_netfilter"),
        sysctl("net.ipv4.ip_forward", "1"),
        packages("containerd", &["containerd"]),
        Planned::new(Resource::File(containerd_config)).after("packages:containerd"),
        service("containerd.service", "file:/etc/containerd/config.toml"),
    ]
}

/// containerd with the systemd cgroup driver, as the kubelet expects.
const CONTAINERD_CONFIG: &str = "\
# Managed by steward-agent (Kubernetes roles).
version = 2
[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]
  runtime_type = \"io.containerd.runc.v2\"
[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc.options]
  SystemdCgroup = true
";

/// Where a node's brick of `volume` lives.
pub fn brick_path(volume: &str) -> String {
    format!("/data/glusterfs/{volume}/brick1/brick")
}

fn gluster_brick(desired: &DesiredState) -> Vec<Planned> {
    let mut plan = vec![
        packages("glusterfs-server", &["glusterfs-server"]),
        service("glusterd.service", "packages:glusterfs-server"),
    ];
    for volume in &desired.cluster.settings.gluster_volumes {
        let brick = brick_path(&volume.name);
        let mut path = std::path::PathBuf::new();
        // Each level its own resource: mode and owner hold on all of them.
        for part in brick.trim_start_matches('/').split('/') {
            path.push(if path.as_os_str().is_empty() { "/" } else { "" });
            path.push(part);
            let dir = Planned::new(Resource::Directory {
                path: path.clone(),
                mode: 0o755,
            });
            if !plan.iter().any(|p| p.resource.id() == dir.resource.id()) {
                plan.push(dir);
            }
        }
    }
    plan
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A node with `roles` in a cluster running Kubernetes 1.31.2-1.1 from
    /// a local repository, and a Gluster volume `data`.
    pub(crate) fn desired(roles: &[Role]) -> DesiredState {
        let mut d = DesiredState {
            revision: 1,
            roles: roles.iter().copied().collect(),
            ..Default::default()
        };
        d.cluster.settings.kubernetes = Some(KubernetesSettings {
            version: "1.31.2-1.1".into(),
            pod_subnet: "10.244.0.0/16".into(),
            service_subnet: "10.96.0.0/12".into(),
            repository: steward_proto::converge::PackageRepository {
                url: "file:/srv/k8s".into(),
                suite: "./".into(),
                key: None,
            },
            kubelet_version: None,
        });
        d.cluster.settings.gluster_volumes = vec![steward_proto::converge::GlusterVolume {
            name: "data".into(),
            replica: 3,
            mount_on: steward_proto::converge::default_mount_on(),
        }];
        d
    }

    fn ids(plan: &[Planned]) -> Vec<String> {
        plan.iter().map(|p| p.resource.id()).collect()
    }

    #[test]
    fn every_requirement_is_planned_before_it_is_needed() {
        let all = desired(&Role::ALL);
        let plan = plan(&all);
        for (i, p) in plan.iter().enumerate() {
            for r in &p.requires {
                let before = ids(&plan[..i]);
                assert!(
                    before.contains(r),
                    "{} requires {r}, not before it",
                    p.resource.id()
                );
            }
        }
    }

    #[test]
    fn ids_are_unique_and_both_kubernetes_roles_share_the_host_setup() {
        let plan = plan(&desired(&[
            Role::K8sControlPlane,
            Role::K8sWorker,
            Role::Lb,
        ]));
        let mut seen = std::collections::HashSet::new();
        for id in ids(&plan) {
            assert!(seen.insert(id.clone()), "{id} planned twice");
        }
        assert!(seen.contains("swap:off"));
        assert!(seen.contains("file:/etc/haproxy/haproxy.cfg"));
    }

    #[test]
    fn no_roles_no_resources_but_the_cleanup_of_what_roles_left() {
        assert_eq!(ids(&plan(&desired(&[]))), ["stale-mounts:gluster"]);
        let mut d = desired(&[]);
        d.cluster.settings.gluster_volumes.clear();
        assert!(plan(&d).is_empty());
    }

    #[test]
    fn kubernetes_without_settings_is_a_clear_failure_not_a_guess() {
        let mut d = desired(&[Role::K8sWorker]);
        d.cluster.settings.kubernetes = None;
        d.cluster.settings.gluster_volumes.clear();
        let plan = plan(&d);
        assert_eq!(ids(&plan), ["plan:kubernetes", "stale-mounts:gluster"]);
    }

    /// The packages of `packages:kubernetes` in `d`'s plan, which must hold them.
    fn held_kubernetes_packages(d: &DesiredState) -> Vec<PackageSpec> {
        let plan = plan(d);
        let Some(Resource::Packages { packages, hold, .. }) = plan
            .iter()
            .map(|p| &p.resource)
            .find(|r| r.id() == "packages:kubernetes")
        else {
            panic!("no kubernetes packages: {:?}", ids(&plan));
        };
        assert!(hold);
        packages.clone()
    }

    #[test]
    fn kubernetes_packages_are_held_at_the_cluster_version() {
        let packages = held_kubernetes_packages(&desired(&[Role::K8sControlPlane]));
        assert_eq!(packages.len(), 3);
        assert!(packages
            .iter()
            .all(|p| p.version.as_deref() == Some("1.31.2-1.1")));
    }

    #[test]
    fn during_an_upgrade_kubeadm_moves_first_and_kubelet_kubectl_stay() {
        let mut d = desired(&[Role::K8sWorker]);
        if let Some(k) = d.cluster.settings.kubernetes.as_mut() {
            k.version = "1.32.0-1.1".into();
            k.kubelet_version = Some("1.31.2-1.1".into());
        }
        let packages = held_kubernetes_packages(&d);
        let versions: Vec<(&str, Option<&str>)> = packages
            .iter()
            .map(|p| (p.name.as_str(), p.version.as_deref()))
            .collect();
        assert_eq!(
            versions,
            [
                ("kubelet", Some("1.31.2-1.1")),
                ("kubeadm", Some("1.32.0-1.1")),
                ("kubectl", Some("1.31.2-1.1")),
            ]
        );
    }

    #[test]
    fn brick_directories_follow_the_volumes() {
        let ids = ids(&plan(&desired(&[Role::GlusterBrick])));
        assert!(
            ids.contains(&"directory:/data/glusterfs/data/brick1/brick".to_owned()),
            "{ids:?}"
        );
        assert!(ids.contains(&"directory:/data".to_owned()), "{ids:?}");
    }

    #[test]
    fn tasks_run_last_in_order_after_the_files_and_the_roles() {
        let mut d = desired(&[Role::GlusterBrick]);
        for id in ["peer-probe-b", "volume-create-data"] {
            d.tasks.push(Task {
                id: id.into(),
                argv: vec!["gluster".into()],
                creates: None,
                unless: None,
                summary: id.into(),
                inputs: Vec::new(),
            });
        }
        d.files.push(steward_proto::converge::SecretFile {
            path: "/etc/x/secret".into(),
            content: b"s".to_vec(),
            mode: 0o600,
        });
        let plan = plan(&d);
        let last = plan.last().unwrap();
        assert_eq!(last.resource.id(), "command:volume-create-data");
        assert!(last.requires.contains(&"command:peer-probe-b".to_owned()));
        assert!(last.requires.contains(&"file:/etc/x/secret".to_owned()));
        assert!(last.requires.contains(&"unit:glusterd.service".to_owned()));
        // Seen end to end: a refused unmount held up the node's tasks.
        assert!(!last.requires.contains(&"stale-mounts:gluster".to_owned()));
    }

    #[test]
    fn lb_config_is_validated_and_reloads_haproxy() {
        let plan = lb(&desired(&[Role::Lb]));
        let Some(Resource::File(f)) = plan
            .iter()
            .map(|p| &p.resource)
            .find(|r| matches!(r, Resource::File(_)))
        else {
            panic!("no haproxy.cfg planned");
        };
        assert_eq!(f.validate.as_ref().unwrap()[0], "haproxy");
        assert_eq!(f.notify.as_ref().unwrap().unit, "haproxy.service");
        assert_eq!(f.notify.as_ref().unwrap().action, NotifyAction::Reload);
    }
}
