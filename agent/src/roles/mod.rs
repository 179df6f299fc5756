//! Roles as pure planners: from the desired state (roles and the cluster
//! view) to the resources the host needs. No IO here; the converge engine
//! applies what these return.
//!
//! Planned here is what each node does on its own. Steps that need one
//! node picked for the whole cluster (`kubeadm init`, `gluster volume
//! create`) come from the coordinator and are not planned yet.

pub mod haproxy;

use steward_proto::domain::{DesiredState, Role};

use crate::converge::resource::{
    FileSpec, Notify, NotifyAction, PackageSpec, Planned, Resource, UnitSpec,
};

/// The resources `desired` needs, in the order they are applied.
pub fn plan(desired: &DesiredState) -> Vec<Planned> {
    let mut plan = Vec::new();
    for role in &desired.roles {
        match role {
            Role::Lb => plan.extend(lb(desired)),
            Role::K8sControlPlane | Role::K8sWorker => {
                // Both Kubernetes roles need the same host preparation.
                if !plan
                    .iter()
                    .any(|p: &Planned| p.resource.id() == "packages:containerd")
                {
                    plan.extend(kubernetes_host());
                }
            }
            Role::GlusterBrick => plan.extend(gluster_brick()),
        }
    }
    plan
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
    Planned::new(Resource::Unit(UnitSpec {
        name: name.into(),
        content: None,
        enabled: true,
        active: true,
    }))
    .after(after)
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
        packages("haproxy", &["haproxy"]),
        Planned::new(Resource::File(config)).after("packages:haproxy"),
        service("haproxy.service", "file:/etc/haproxy/haproxy.cfg"),
    ]
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

fn gluster_brick() -> Vec<Planned> {
    vec![
        packages("glusterfs-server", &["glusterfs-server"]),
        service("glusterd.service", "packages:glusterfs-server"),
        Planned::new(Resource::Directory {
            path: "/data/glusterfs".into(),
            mode: 0o755,
        }),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desired(roles: &[Role]) -> DesiredState {
        DesiredState {
            revision: 1,
            roles: roles.iter().copied().collect(),
            cluster: Default::default(),
        }
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
    fn no_roles_no_resources() {
        assert!(plan(&desired(&[])).is_empty());
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
