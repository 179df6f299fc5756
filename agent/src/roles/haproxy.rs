//! `haproxy.cfg` rendered from the cluster view: the Kubernetes API on
//! `VIP:6443` to the control-plane nodes (checked on `/readyz`), and ingress
//! on `VIP:80`/`VIP:443` to the workers. Deterministic: the same view always
//! renders the same bytes, so an unchanged cluster never reloads HAProxy.

use std::fmt::Write;
use std::net::{IpAddr, SocketAddr};

use steward_proto::converge::ClusterView;
use steward_proto::domain::Role;

/// Where HAProxy's admin socket lives (the agent's `haproxy` VIP check
/// reads it).
pub const ADMIN_SOCKET: &str = "/run/haproxy/admin.sock";

struct Frontend<'a> {
    name: &'a str,
    port: u16,
    role: Role,
    backend_port: u16,
    /// Extra lines for the backend (health checks).
    check: &'a [&'a str],
}

const FRONTENDS: &[Frontend] = &[
    Frontend {
        name: "kube-apiserver",
        port: 6443,
        role: Role::K8sControlPlane,
        backend_port: 6443,
        check: &[
            "option httpchk GET /readyz",
            "http-check expect status 200",
            "default-server check check-ssl verify none inter 2s fall 3 rise 2",
        ],
    },
    Frontend {
        name: "ingress-http",
        port: 80,
        role: Role::K8sWorker,
        backend_port: 80,
        check: &["default-server check inter 2s fall 3 rise 2"],
    },
    Frontend {
        name: "ingress-https",
        port: 443,
        role: Role::K8sWorker,
        backend_port: 443,
        check: &["default-server check inter 2s fall 3 rise 2"],
    },
];

fn server_name(node: &str) -> String {
    node.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The whole configuration file.
pub fn render(view: &ClusterView) -> String {
    let mut out = String::new();
    out.push_str(
        "# Managed by steward-agent (lb role): rendered from the cluster, changes\n\
         # here are overwritten. Change the cluster with stewardctl instead.\n\
         global\n\
         \x20   log /dev/log local0\n\
         \x20   user haproxy\n\
         \x20   group haproxy\n",
    );
    let _ = writeln!(
        out,
        "    stats socket {ADMIN_SOCKET} mode 660 level admin expose-fd listeners"
    );
    out.push_str(
        "\ndefaults\n\
         \x20   log global\n\
         \x20   mode tcp\n\
         \x20   option tcplog\n\
         \x20   timeout connect 5s\n\
         \x20   timeout client 1m\n\
         \x20   timeout server 1m\n",
    );
    let user: Vec<Frontend> = view
        .settings
        .frontends
        .iter()
        .map(|f| Frontend {
            name: &f.name,
            port: f.port,
            role: f.backend_role,
            backend_port: f.backend_port,
            check: &["default-server check inter 2s fall 3 rise 2"],
        })
        .collect();
    for f in FRONTENDS.iter().chain(&user) {
        // Without a VIP there is nothing to listen on yet: the backends
        // are rendered (and checked), the frontends wait for a VIP.
        if !view.vips.is_empty() {
            let _ = writeln!(out, "\nfrontend {}", f.name);
            for vip in &view.vips {
                let _ = writeln!(out, "    bind {}", SocketAddr::new(vip.address, f.port));
            }
            let _ = writeln!(out, "    default_backend {}", f.name);
        }
        let _ = writeln!(out, "\nbackend {}", f.name);
        for line in f.check {
            let _ = writeln!(out, "    {line}");
        }
        for m in view.with_role(f.role) {
            if let Some(address) = m.address {
                let _ = writeln!(
                    out,
                    "    server {} {}",
                    server_name(m.node.as_str()),
                    backend_address(address, f.backend_port)
                );
            }
        }
    }
    out
}

fn backend_address(address: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(address, port)
}

#[cfg(test)]
mod tests {
    use steward_proto::converge::{Member, VipView};
    use steward_proto::domain::NodeId;

    use super::*;

    fn member(id: &str, role: Role, address: &str) -> Member {
        Member {
            node: NodeId::new(id.to_owned()).unwrap(),
            roles: [role].into(),
            address: Some(address.parse().unwrap()),
        }
    }

    fn view() -> ClusterView {
        let mut settings = steward_proto::converge::ClusterSettings::default();
        settings.frontends.push(steward_proto::converge::Frontend {
            name: "grafana".into(),
            port: 3000,
            backend_role: Role::K8sWorker,
            backend_port: 30300,
        });
        ClusterView {
            settings,
            members: vec![
                member("cp-1", Role::K8sControlPlane, "198.18.0.11"),
                member("lb-1", Role::Lb, "198.18.0.2"),
                member("w-1", Role::K8sWorker, "198.18.0.21"),
                member("w-2", Role::K8sWorker, "fd00::21"),
            ],
            vips: vec![VipView {
                name: "front".into(),
                address: "198.18.0.200".parse().unwrap(),
                prefix: 24,
            }],
        }
    }

    #[test]
    fn api_and_ingress_go_to_the_right_nodes() {
        let cfg = render(&view());
        let section = |name: &str| {
            let start = cfg.find(&format!("\nbackend {name}\n")).unwrap();
            let rest = &cfg[start + 1..];
            rest[..rest.find("\n\n").unwrap_or(rest.len())].to_owned()
        };
        assert!(cfg.contains("frontend kube-apiserver\n    bind 198.18.0.200:6443\n"));
        let api = section("kube-apiserver");
        assert!(api.contains("server cp-1 198.18.0.11:6443"), "{api}");
        assert!(api.contains("option httpchk GET /readyz"), "{api}");
        assert!(!api.contains("w-1"), "{api}");
        let http = section("ingress-http");
        assert!(http.contains("server w-1 198.18.0.21:80"), "{http}");
        assert!(http.contains("server w-2 [fd00::21]:80"), "{http}");
        assert!(!http.contains("cp-1") && !http.contains("lb-1"), "{http}");
        assert!(
            cfg.contains("frontend grafana\n    bind 198.18.0.200:3000\n"),
            "{cfg}"
        );
        assert!(
            section("grafana").contains("server w-1 198.18.0.21:30300"),
            "{cfg}"
        );
    }

    #[test]
    fn rendering_is_deterministic_and_follows_the_fleet() {
        let mut v = view();
        assert_eq!(render(&v), render(&v.clone()));
        let before = render(&v);
        v.members
            .push(member("w-3", Role::K8sWorker, "198.18.0.23"));
        let after = render(&v);
        assert_ne!(before, after);
        assert!(after.contains("server w-3 198.18.0.23:80"));
    }

    /// The real HAProxy (scripts/deps.sh installs it) accepts what we render,
    /// with and without VIPs and backends.
    #[test]
    fn haproxy_accepts_the_rendered_config() {
        let dir = tempfile::tempdir().unwrap();
        let mut empty = view();
        empty.vips.clear();
        empty.members.clear();
        for (i, v) in [view(), empty].iter().enumerate() {
            let path = dir.path().join(format!("haproxy-{i}.cfg"));
            std::fs::write(&path, render(v)).unwrap();
            let out = std::process::Command::new("haproxy")
                .arg("-c")
                .arg("-f")
                .arg(&path)
                .output()
                .expect("haproxy is installed (scripts/deps.sh)");
            assert!(
                out.status.success(),
                "haproxy -c refused:\n{}\n{}",
                String::from_utf8_lossy(&out.stderr),
                render(v)
            );
        }
    }

    #[test]
    fn without_a_vip_the_config_binds_nothing_public() {
        let mut v = view();
        v.vips.clear();
        let cfg = render(&v);
        assert!(!cfg.contains("198.18.0.200"));
        assert!(!cfg.contains("bind"), "{cfg}");
        assert!(cfg.contains("backend kube-apiserver"), "{cfg}");
    }
}
