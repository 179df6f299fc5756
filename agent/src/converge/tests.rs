//! The engine and the planners against the in-memory host.

use std::collections::BTreeMap;

use steward_proto::converge::{ClusterView, ConvergeReport, Member, ResourceStatus, VipView};
use steward_proto::domain::{DesiredState, NodeId, Role};

use super::engine::Engine;
use super::fake::FakeHost;
use super::resource::{CommandSpec, Planned, Resource};

fn lb_host() -> FakeHost {
    let host = FakeHost::new(&[
        ("haproxy", "2.6.12-1"),
        ("procps", "2:4.0.2-3"),
        ("glusterfs-server", "10.3-5"),
    ]);
    {
        let mut s = host.state.borrow_mut();
        s.ships_units
            .insert("haproxy".into(), vec!["haproxy.service".into()]);
        s.ships_units
            .insert("glusterfs-server".into(), vec!["glusterd.service".into()]);
        s.sysctls
            .insert("net.ipv4.ip_nonlocal_bind".into(), "0".into());
        s.sysctls
            .insert("net.ipv6.ip_nonlocal_bind".into(), "0".into());
    }
    host
}

fn member(id: &str, role: Role, address: &str) -> Member {
    Member {
        node: NodeId::new(id.to_owned()).unwrap(),
        roles: [role].into(),
        address: Some(address.parse().unwrap()),
    }
}

fn lb_desired(workers: &[&str]) -> DesiredState {
    let mut members = vec![member("lb-1", Role::Lb, "198.18.0.2")];
    for (i, w) in workers.iter().enumerate() {
        members.push(member(w, Role::K8sWorker, &format!("198.18.0.{}", 20 + i)));
    }
    DesiredState {
        revision: 5,
        roles: [Role::Lb].into(),
        cluster: ClusterView {
            members,
            vips: vec![VipView {
                name: "front".into(),
                address: "198.18.0.200".parse().unwrap(),
                prefix: 24,
            }],
            settings: Default::default(),
        },
        ..Default::default()
    }
}

/// A Kubernetes node of a cluster at 1.31.2-1.1 (see `offer_kubernetes`
/// for a fake host that has its packages).
/// A Kubernetes node in a cluster without Gluster volumes (their mounts
/// are tested in `roles::gluster`).
fn kubernetes_desired(role: Role) -> DesiredState {
    let mut d = crate::roles::tests::desired(&[role]);
    d.cluster.settings.gluster_volumes.clear();
    d
}

fn offer_kubernetes(host: &FakeHost) {
    let mut s = host.state.borrow_mut();
    s.available.insert("containerd".into(), "1.6".into());
    s.ships_units
        .insert("containerd".into(), vec!["containerd.service".into()]);
    for p in ["kubelet", "kubeadm", "kubectl"] {
        s.available.insert(p.into(), "1.31.2-1.1".into());
    }
    s.ships_units
        .insert("kubelet".into(), vec!["kubelet.service".into()]);
}

fn statuses(report: &ConvergeReport) -> BTreeMap<String, ResourceStatus> {
    report
        .resources
        .iter()
        .map(|r| (r.id.clone(), r.status))
        .collect()
}

#[test]
fn lb_converges_then_a_second_run_changes_nothing() {
    let host = lb_host();
    let plan = crate::roles::plan(&lb_desired(&["w-1"]));
    let mut engine = Engine::default();

    let first = engine.run(&host, &plan, 5);
    assert!(first.converged(), "{first:#?}");
    let changes = host.take_changes();
    assert!(
        changes.contains(&"install haproxy".to_owned()),
        "{changes:?}"
    );
    assert!(
        changes.contains(&"write /etc/haproxy/haproxy.cfg".to_owned()),
        "{changes:?}"
    );
    assert!(
        changes.contains(&"sysctl net.ipv4.ip_nonlocal_bind=1".to_owned()),
        "{changes:?}"
    );
    // The config is validated by haproxy itself before it is put in place.
    assert!(
        changes
            .iter()
            .any(|c| c.starts_with("run haproxy -c -q -f /etc/haproxy/haproxy.steward-new")),
        "{changes:?}"
    );
    assert!(host
        .file("/etc/haproxy/haproxy.cfg")
        .unwrap()
        .contains("server w-1 198.18.0.20:80"));

    let second = engine.run(&host, &plan, 5);
    assert!(
        second
            .resources
            .iter()
            .all(|r| r.status == ResourceStatus::Ok),
        "{second:#?}"
    );
    assert_eq!(host.take_changes(), Vec::<String>::new());
    // Unchanged statuses keep the time they were entered.
    let cfg = |r: &ConvergeReport| {
        r.resources
            .iter()
            .find(|s| s.id == "file:/etc/haproxy/haproxy.cfg")
            .unwrap()
            .clone()
    };
    let third = engine.run(&host, &plan, 5);
    assert_eq!(cfg(&second).since_unix_ms, cfg(&third).since_unix_ms);
}

#[test]
fn a_joining_backend_rewrites_the_config_and_reloads_haproxy_only() {
    let host = lb_host();
    let mut engine = Engine::default();
    engine.run(&host, &crate::roles::plan(&lb_desired(&["w-1"])), 5);
    host.take_changes();

    let report = engine.run(&host, &crate::roles::plan(&lb_desired(&["w-1", "w-2"])), 6);
    assert!(report.converged(), "{report:#?}");
    let changes = host.take_changes();
    assert!(changes.contains(&"write /etc/haproxy/haproxy.cfg".to_owned()));
    assert!(
        changes.contains(&"reload haproxy.service".to_owned()),
        "{changes:?}"
    );
    assert!(!changes
        .iter()
        .any(|c| c.starts_with("install") || c.starts_with("restart")));
    let unit = report
        .resources
        .iter()
        .find(|r| r.id == "unit:haproxy.service")
        .unwrap();
    assert_eq!(unit.status, ResourceStatus::Changed);
    assert!(unit.detail.contains("reloaded"), "{unit:?}");
}

#[test]
fn a_rejected_config_keeps_the_old_one_and_skips_what_needs_it() {
    let host = lb_host();
    let mut engine = Engine::default();
    engine.run(&host, &crate::roles::plan(&lb_desired(&["w-1"])), 5);
    let good = host.file("/etc/haproxy/haproxy.cfg").unwrap();
    host.take_changes();
    host.state
        .borrow_mut()
        .failing_commands
        .insert("haproxy".into(), "[ALERT] parsing error".into());

    let report = engine.run(&host, &crate::roles::plan(&lb_desired(&["w-1", "w-2"])), 6);
    let s = statuses(&report);
    assert_eq!(s["file:/etc/haproxy/haproxy.cfg"], ResourceStatus::Failed);
    assert_eq!(s["unit:haproxy.service"], ResourceStatus::Skipped);
    let failed: Vec<_> = report.failed().collect();
    assert!(failed[0].detail.contains("parsing error"), "{failed:?}");
    assert_eq!(host.file("/etc/haproxy/haproxy.cfg").unwrap(), good);
    assert!(!host.take_changes().iter().any(|c| c.contains("reload")));
}

#[test]
fn a_failed_reload_stays_owed_until_it_succeeds() {
    let host = lb_host();
    let mut engine = Engine::default();
    engine.run(&host, &crate::roles::plan(&lb_desired(&["w-1"])), 5);
    host.state
        .borrow_mut()
        .failing_notify
        .insert("haproxy.service".into());
    let plan = crate::roles::plan(&lb_desired(&["w-1", "w-2"]));

    let failed = engine.run(&host, &plan, 6);
    assert_eq!(
        statuses(&failed)["unit:haproxy.service"],
        ResourceStatus::Failed
    );
    // The file is right now; the reload is still owed, not forgotten.
    let again = engine.run(&host, &plan, 6);
    assert_eq!(
        statuses(&again)["file:/etc/haproxy/haproxy.cfg"],
        ResourceStatus::Ok
    );
    assert_eq!(
        statuses(&again)["unit:haproxy.service"],
        ResourceStatus::Failed
    );
    assert!(!again.converged());

    host.state.borrow_mut().failing_notify.clear();
    host.take_changes();
    let fixed = engine.run(&host, &plan, 6);
    assert_eq!(
        statuses(&fixed)["unit:haproxy.service"],
        ResourceStatus::Changed
    );
    assert_eq!(
        host.take_changes(),
        vec!["reload haproxy.service".to_owned()]
    );
    let settled = engine.run(&host, &plan, 6);
    assert!(settled
        .resources
        .iter()
        .all(|r| r.status == ResourceStatus::Ok));
    assert!(host.take_changes().is_empty());
}

#[test]
fn drift_is_put_back() {
    let host = lb_host();
    let plan = crate::roles::plan(&lb_desired(&["w-1"]));
    let mut engine = Engine::default();
    engine.run(&host, &plan, 5);
    {
        let mut s = host.state.borrow_mut();
        s.files
            .get_mut(std::path::Path::new("/etc/haproxy/haproxy.cfg"))
            .unwrap()
            .0 = b"# edited by hand\n".to_vec();
        s.units.get_mut("haproxy.service").unwrap().active = false;
    }
    host.take_changes();
    let report = engine.run(&host, &plan, 5);
    let changes = host.take_changes();
    assert!(changes.contains(&"write /etc/haproxy/haproxy.cfg".to_owned()));
    assert!(
        changes.contains(&"start haproxy.service".to_owned()),
        "{changes:?}"
    );
    // Started with the new file: no reload on top.
    assert!(!changes.iter().any(|c| c.contains("reload")), "{changes:?}");
    assert!(report.converged());
}

#[test]
fn a_missing_package_fails_and_a_later_run_recovers() {
    let host = FakeHost::new(&[]);
    let plan = crate::roles::plan(&lb_desired(&[]));
    let mut engine = Engine::default();
    host.state.borrow_mut().sysctls.extend([
        ("net.ipv4.ip_nonlocal_bind".into(), "1".into()),
        ("net.ipv6.ip_nonlocal_bind".into(), "1".into()),
    ]);
    let report = engine.run(&host, &plan, 1);
    let s = statuses(&report);
    assert_eq!(s["packages:haproxy"], ResourceStatus::Failed);
    assert_eq!(s["file:/etc/haproxy/haproxy.cfg"], ResourceStatus::Skipped);
    assert_eq!(
        s["sysctl:net.ipv4.ip_nonlocal_bind"],
        ResourceStatus::Changed
    );
    assert!(!report.converged());

    host.state.borrow_mut().available.extend([
        ("haproxy".into(), "2.6".into()),
        ("procps".into(), "4.0".into()),
    ]);
    host.state
        .borrow_mut()
        .ships_units
        .insert("haproxy".into(), vec!["haproxy.service".into()]);
    let report = engine.run(&host, &plan, 1);
    assert!(report.converged(), "{report:#?}");
}

#[test]
fn in_a_container_kernel_settings_are_not_applicable_not_failed() {
    let mut host = lb_host();
    host.container = Some("systemd-nspawn".into());
    offer_kubernetes(&host);
    {
        let mut s = host.state.borrow_mut();
        s.swaps.push("/swapfile".into());
        s.sysctls.insert("net.ipv4.ip_forward".into(), "0".into());
        for key in [
            "net.bridge.bridge-nf-call-iptables",
            "net.bridge.bridge-nf-call-ip6tables",
        ] {
            s.sysctls.insert(key.into(), "0".into());
            s.read_only_sysctls.insert(key.into());
        }
    }
    let desired = kubernetes_desired(Role::K8sWorker);
    let report = Engine::default().run(&host, &crate::roles::plan(&desired), 1);
    let s = statuses(&report);
    for id in [
        "swap:off",
        "kernel-module:overlay",
        "kernel-module:br_netfilter",
        "sysctl:net.bridge.bridge-nf-call-iptables",
    ] {
        assert_eq!(s[id], ResourceStatus::NotApplicable, "{id}: {report:#?}");
    }
    // net.* keys of the container's own namespace still apply.
    assert_eq!(s["sysctl:net.ipv4.ip_forward"], ResourceStatus::Changed);
    assert!(report.converged(), "{report:#?}");
    let swap = report
        .resources
        .iter()
        .find(|r| r.id == "swap:off")
        .unwrap();
    assert!(swap.detail.contains("systemd-nspawn"), "{swap:?}");
    assert!(host
        .file("/etc/containerd/config.toml")
        .unwrap()
        .contains("SystemdCgroup = true"));
}

#[test]
fn outside_a_container_the_same_settings_are_applied() {
    let host = FakeHost::new(&[]);
    offer_kubernetes(&host);
    {
        let mut s = host.state.borrow_mut();
        s.swaps.push("/dev/vda2".into());
        s.files.insert(
            "/etc/fstab".into(),
            (
                b"/dev/vda1 / ext4 defaults 0 1\n/dev/vda2 none swap sw 0 0\n".to_vec(),
                super::host::Meta {
                    is_dir: false,
                    mode: 0o644,
                    owner: "root".into(),
                    group: "root".into(),
                },
            ),
        );
        for key in [
            "net.ipv4.ip_forward",
            "net.bridge.bridge-nf-call-iptables",
            "net.bridge.bridge-nf-call-ip6tables",
        ] {
            s.sysctls.insert(key.into(), "0".into());
        }
        s.dirs.insert(
            "/etc".into(),
            super::host::Meta {
                is_dir: true,
                mode: 0o755,
                owner: "root".into(),
                group: "root".into(),
            },
        );
    }
    let desired = kubernetes_desired(Role::K8sControlPlane);
    let report = Engine::default().run(&host, &crate::roles::plan(&desired), 1);
    // Held at the cluster's version; the kubelet is left for kubeadm to start.
    assert_eq!(host.state.borrow().held.len(), 3);
    assert!(!host
        .state
        .borrow()
        .changes
        .contains(&"start kubelet.service".to_owned()));
    assert!(
        report
            .resources
            .iter()
            // The kubelet package enables its unit itself; no Gluster
            // mount was left to remove.
            .all(|r| r.status == ResourceStatus::Changed
                || r.id == "unit:kubelet.service"
                || r.id == "stale-mounts:gluster"),
        "{report:#?}"
    );
    let changes = host.take_changes();
    assert!(changes.contains(&"swapoff".to_owned()));
    assert!(changes.contains(&"modprobe br_netfilter".to_owned()));
    let fstab = host.file("/etc/fstab").unwrap();
    assert!(fstab.contains("# /dev/vda2 none swap sw 0 0"), "{fstab}");
    assert!(fstab.contains("/dev/vda1 / ext4"), "{fstab}");
    assert_eq!(
        host.file("/etc/modules-load.d/steward-br_netfilter.conf")
            .unwrap(),
        "br_netfilter\n"
    );
}

#[test]
fn guarded_commands_run_until_their_guard_says_done() {
    let host = FakeHost::new(&[]);
    let step = Planned::new(Resource::Command(CommandSpec {
        name: "init".into(),
        argv: vec!["touch".into(), "/done".into()],
        creates: Some("/done".into()),
        unless: None,
        summary: "touch /done".into(),
        inputs: Vec::new(),
    }));
    let mut engine = Engine::default();
    let first = engine.run(&host, std::slice::from_ref(&step), 1);
    assert_eq!(first.resources[0].status, ResourceStatus::Changed);
    assert_eq!(host.take_changes(), vec!["run touch /done".to_owned()]);
    // The fake does not run `touch`; the guard file appearing is what
    // marks the step done.
    host.state.borrow_mut().dirs.insert(
        "/done".into(),
        super::host::Meta {
            is_dir: true,
            mode: 0o755,
            owner: "root".into(),
            group: "root".into(),
        },
    );
    let second = engine.run(&host, std::slice::from_ref(&step), 1);
    assert_eq!(second.resources[0].status, ResourceStatus::Ok);
    assert!(host.take_changes().is_empty());
}

/// A command's secret inputs exist (0600, in a 0700 directory) only while
/// it runs, and are removed whether it succeeded or failed.
#[test]
fn command_inputs_exist_only_while_the_command_runs() {
    let host = FakeHost::new(&[]);
    let step = |program: &str| {
        Planned::new(Resource::Command(CommandSpec {
            name: "join".into(),
            argv: vec![program.into(), "--config".into(), "/run/k/join.yaml".into()],
            creates: None,
            unless: None,
            summary: "join (token withheld)".into(),
            inputs: vec![steward_proto::converge::SecretFile {
                path: "/run/k/join.yaml".into(),
                content: b"token: secret".to_vec(),
                mode: 0o600,
            }],
        }))
    };
    let mut engine = Engine::default();
    let report = engine.run(&host, &[step("kubeadm")], 1);
    assert_eq!(report.resources[0].status, ResourceStatus::Changed);
    assert_eq!(
        host.take_changes(),
        [
            "mkdir /run",
            "mkdir /run/k",
            "write /run/k/join.yaml",
            "run kubeadm --config /run/k/join.yaml",
            "rm /run/k/join.yaml",
        ]
    );
    assert_eq!(
        host.state.borrow().dirs[std::path::Path::new("/run/k")].mode,
        0o700
    );
    assert!(host.file("/run/k/join.yaml").is_none());
    // A failing command: removed all the same; the report keeps the secret out.
    host.state
        .borrow_mut()
        .failing_commands
        .insert("false".into(), "boom".into());
    let report = engine.run(&host, &[step("false")], 2);
    assert_eq!(report.resources[0].status, ResourceStatus::Failed);
    assert!(host.file("/run/k/join.yaml").is_none());
    assert!(host
        .take_changes()
        .contains(&"rm /run/k/join.yaml".to_owned()));
    assert!(!format!("{report:?}").contains("secret"));
}

#[test]
fn a_requirement_missing_from_the_plan_is_a_clear_failure() {
    let host = FakeHost::new(&[]);
    let plan = [
        Planned::new(Resource::Unit(super::resource::UnitSpec::running(
            "x.service",
        )))
        .after("packages:nowhere"),
    ];
    let report = Engine::default().run(&host, &plan, 1);
    assert_eq!(report.resources[0].status, ResourceStatus::Failed);
    assert!(report.resources[0].detail.contains("packages:nowhere"));
}
