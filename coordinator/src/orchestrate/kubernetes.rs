//! Bootstrapping Kubernetes with kubeadm: exactly one control-plane node runs
//! `kubeadm init --control-plane-endpoint VIP:6443 --upload-certs`, the
//! other control-plane nodes join one at a time, workers join once the
//! first control plane is up.
//!
//! The coordinator makes the cluster CA itself (so it knows the CA hash
//! every join needs before anything ran) and the join token and
//! certificate key, and keeps them sealed in etcd with their lifetimes:
//! 24 h for the token, 2 h for the certificate key. When a node still has
//! to join and a secret is about to expire, the leader makes a new one and
//! the init node registers it (`kubeadm token create`, `kubeadm init phase
//! upload-certs`).

use std::collections::BTreeSet;
use std::net::SocketAddr;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use serde::{Deserialize, Serialize};
use steward_proto::converge::{ClusterView, SecretFile, Task, TaskId};
use steward_proto::domain::{NodeId, Role};

use super::secrets::{hex, random_bytes, SecretBox, SecretError};

pub const TOKEN_TTL_MS: u64 = 24 * 3600 * 1000;
pub const CERTIFICATE_KEY_TTL_MS: u64 = 2 * 3600 * 1000;
/// A secret this close to expiry is replaced before a join uses it.
pub const RENEW_MARGIN_MS: u64 = 15 * 60 * 1000;

pub const ADMIN_CONF: &str = "/etc/kubernetes/admin.conf";
pub const KUBELET_CONF: &str = "/etc/kubernetes/kubelet.conf";
/// Where the agent records one-shot steps that leave no file of their own.
pub const DONE_DIR: &str = "/var/lib/steward-agent/done";
/// Where kubeadm's configuration files (which carry the token and the
/// certificate key) exist while kubeadm runs: tmpfs, never on disk.
pub const KUBEADM_CONFIG_DIR: &str = "/run/steward-agent/kubeadm";

/// The kubeadm configuration file a task passes with `--config`: only
/// root may read it, and the agent removes it once kubeadm returns.
fn kubeadm_config(task_id: &str, yaml: String) -> SecretFile {
    SecretFile {
        path: format!("{KUBEADM_CONFIG_DIR}/{task_id}.yaml"),
        content: yaml.into_bytes(),
        mode: 0o600,
    }
}

/// A YAML scalar: JSON's quoted string is one (YAML is a superset).
fn q(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// `kubeadm.k8s.io/v1beta4` from Kubernetes 1.31 on, `v1beta3` before.
/// (The fields used here are the same in both.)
fn kubeadm_api(version: &str) -> &'static str {
    let minor = version
        .split(':')
        .next_back()
        .and_then(|v| v.strip_prefix("1."))
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse::<u32>().ok());
    match minor {
        Some(m) if m < 31 => "kubeadm.k8s.io/v1beta3",
        _ => "kubeadm.k8s.io/v1beta4",
    }
}

/// `cluster/kubernetes/bootstrap`, secrets sealed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootstrapRecord {
    pub init_node: NodeId,
    pub ca_cert_pem: String,
    pub ca_key_sealed: String,
    /// `sha256:<hex>` of the CA's SubjectPublicKeyInfo, as kubeadm wants it.
    pub ca_hash: String,
    pub token: SealedSecret,
    pub certificate_key: SealedSecret,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealedSecret {
    pub sealed: String,
    pub created_unix_ms: u64,
    /// 0 for the one `kubeadm init` used; each renewal adds one.
    pub generation: u32,
}

/// A secret in the clear, in memory only.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    pub value: String,
    pub created_unix_ms: u64,
    pub generation: u32,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret(generation {}, <withheld>)", self.generation)
    }
}

impl Secret {
    pub fn expires_unix_ms(&self, ttl_ms: u64) -> u64 {
        self.created_unix_ms + ttl_ms
    }
}

/// The bootstrap record, opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bootstrap {
    pub init_node: NodeId,
    pub ca_cert_pem: String,
    pub ca_key_pem: String,
    pub ca_hash: String,
    pub token: Secret,
    pub certificate_key: Secret,
}

/// `abcdef.0123456789abcdef`, as kubeadm's token format requires.
pub fn new_token() -> Result<String, SecretError> {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let bytes = random_bytes::<22>()?;
    let chars: String = bytes
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect();
    Ok(format!("{}.{}", &chars[..6], &chars[6..]))
}

/// 32 random bytes as hex, as `kubeadm --certificate-key` wants.
pub fn new_certificate_key() -> Result<String, SecretError> {
    Ok(hex(&random_bytes::<32>()?))
}

impl Bootstrap {
    /// A new CA, token and certificate key for `init_node`.
    pub fn generate(init_node: NodeId, now_ms: u64) -> Result<Self, String> {
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "kubernetes");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(3650);
        let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
        let secret = |value: String| Secret {
            value,
            created_unix_ms: now_ms,
            generation: 0,
        };
        // kubeadm hashes the certificate's SubjectPublicKeyInfo, as encoded.
        let ca_hash = steward_proto::pki::CaHash::of_der(cert.der())
            .map_err(|e| format!("cannot read back the new CA: {e}"))?;
        Ok(Bootstrap {
            init_node,
            ca_cert_pem: cert.pem(),
            ca_key_pem: key.serialize_pem(),
            ca_hash: ca_hash.to_string(),
            token: secret(new_token().map_err(|e| e.to_string())?),
            certificate_key: secret(new_certificate_key().map_err(|e| e.to_string())?),
        })
    }

    pub fn seal(&self, sealer: &SecretBox) -> Result<BootstrapRecord, SecretError> {
        let seal = |s: &Secret| -> Result<SealedSecret, SecretError> {
            Ok(SealedSecret {
                sealed: sealer.seal(s.value.as_bytes())?,
                created_unix_ms: s.created_unix_ms,
                generation: s.generation,
            })
        };
        Ok(BootstrapRecord {
            init_node: self.init_node.clone(),
            ca_cert_pem: self.ca_cert_pem.clone(),
            ca_key_sealed: sealer.seal(self.ca_key_pem.as_bytes())?,
            ca_hash: self.ca_hash.clone(),
            token: seal(&self.token)?,
            certificate_key: seal(&self.certificate_key)?,
        })
    }

    pub fn open(record: &BootstrapRecord, sealer: &SecretBox) -> Result<Self, SecretError> {
        let open = |s: &SealedSecret| -> Result<Secret, SecretError> {
            Ok(Secret {
                value: String::from_utf8(sealer.open(&s.sealed)?).map_err(|_| SecretError::Open)?,
                created_unix_ms: s.created_unix_ms,
                generation: s.generation,
            })
        };
        Ok(Bootstrap {
            init_node: record.init_node.clone(),
            ca_cert_pem: record.ca_cert_pem.clone(),
            ca_key_pem: String::from_utf8(sealer.open(&record.ca_key_sealed)?)
                .map_err(|_| SecretError::Open)?,
            ca_hash: record.ca_hash.clone(),
            token: open(&record.token)?,
            certificate_key: open(&record.certificate_key)?,
        })
    }
}

/// What the Kubernetes bootstrap needs to know besides the view.
#[derive(Debug, Clone, Copy)]
pub struct Progress<'a> {
    pub bootstrap: Option<&'a Bootstrap>,
    /// Nodes whose `kubeadm init`/`join` reported done.
    pub joined: &'a BTreeSet<NodeId>,
    /// Leaving nodes a control plane has drained and deleted.
    pub drained: &'a BTreeSet<NodeId>,
    /// Nodes taken out of service (`stewardctl node drain`).
    pub maintenance: &'a BTreeSet<NodeId>,
    /// Nodes a control plane has cordoned and drained for maintenance.
    pub cordoned: &'a BTreeSet<NodeId>,
}

/// No nodes (for a [`Progress`] without maintenance).
pub static NO_NODES: BTreeSet<NodeId> = BTreeSet::new();

/// Task id of cordoning and draining `node` for maintenance; a report of
/// it done records the node cordoned.
pub fn cordon_task_id(node: &NodeId) -> String {
    TaskId::KubernetesDrain(node.clone()).into()
}

/// Task id of putting `node` back into service; a report of it done
/// forgets the cordon.
pub fn uncordon_task_id(node: &NodeId) -> String {
    TaskId::KubernetesUncordon(node.clone()).into()
}

/// Joined nodes that no longer have a Kubernetes role, by id.
pub fn leaving(view: &ClusterView, progress: Progress<'_>) -> Vec<NodeId> {
    progress
        .joined
        .iter()
        .filter(|n| !is_kubernetes_member(view, n))
        .cloned()
        .collect()
}

/// The control plane that drains and deletes leaving nodes: the init node
/// while it is one, else the first joined control plane.
pub fn remover(view: &ClusterView, progress: Progress<'_>) -> Option<NodeId> {
    let boot = progress.bootstrap?;
    let mut cps = control_planes(view).filter(|n| progress.joined.contains(*n));
    if control_planes(view).any(|n| *n == boot.init_node)
        && progress.joined.contains(&boot.init_node)
    {
        return Some(boot.init_node.clone());
    }
    cps.next().cloned()
}

/// Task id of draining and deleting `node`; a report of it done releases
/// the node's own `kubeadm reset`.
pub fn remove_task_id(node: &NodeId) -> String {
    TaskId::KubernetesRemove(node.clone()).into()
}

fn removal_steps(node: &NodeId, view: &ClusterView, progress: Progress<'_>) -> Vec<Task> {
    let mut tasks = Vec::new();
    if remover(view, progress).as_ref() == Some(node) {
        // Maintenance: cordon and drain nodes taken out of service, uncordon
        // those put back.
        for down in progress.maintenance {
            if progress.cordoned.contains(down)
                || !progress.joined.contains(down)
                || !is_kubernetes_member(view, down)
            {
                continue;
            }
            let script = format!(
                "kubectl --kubeconfig {ADMIN_CONF} cordon {down} && \
                 kubectl --kubeconfig {ADMIN_CONF} drain {down} --ignore-daemonsets \
                 --delete-emptydir-data --timeout=300s"
            );
            tasks.push(Task {
                id: cordon_task_id(down),
                argv: vec!["sh".into(), "-c".into(), script],
                creates: None,
                unless: None,
                inputs: Vec::new(),
                summary: format!("kubectl cordon {down} and drain it"),
            });
        }
        for back in progress.cordoned {
            if progress.maintenance.contains(back) {
                continue;
            }
            tasks.push(Task {
                id: uncordon_task_id(back),
                argv: [
                    "kubectl",
                    "--kubeconfig",
                    ADMIN_CONF,
                    "uncordon",
                    back.as_str(),
                ]
                .map(String::from)
                .to_vec(),
                creates: None,
                unless: None,
                inputs: Vec::new(),
                summary: format!("kubectl uncordon {back}"),
            });
        }
        for gone in leaving(view, progress) {
            if progress.drained.contains(&gone) {
                continue;
            }
            let script = format!(
                "kubectl --kubeconfig {ADMIN_CONF} drain {gone} --ignore-daemonsets \
                 --delete-emptydir-data --force --timeout=120s; \
                 kubectl --kubeconfig {ADMIN_CONF} delete node {gone} --ignore-not-found"
            );
            tasks.push(Task {
                id: remove_task_id(&gone),
                argv: vec!["sh".into(), "-c".into(), script],
                creates: None,
                unless: None,
                summary: format!("kubectl drain {gone} and delete node {gone}"),
                inputs: Vec::new(),
            });
        }
    }
    if progress.joined.contains(node) && !is_kubernetes_member(view, node) {
        // Only once a control plane has drained and deleted it.
        if progress.drained.contains(node) {
            tasks.push(Task {
                id: TaskId::KubeadmReset.into(),
                argv: ["kubeadm", "reset", "-f"].map(String::from).to_vec(),
                creates: None,
                unless: Some(
                    [
                        "sh",
                        "-c",
                        &format!("test ! -e {KUBELET_CONF} && test ! -e {ADMIN_CONF}"),
                    ]
                    .map(String::from)
                    .to_vec(),
                ),
                summary: "kubeadm reset -f".into(),
                inputs: Vec::new(),
            });
        }
    }
    tasks
}

/// `VIP:6443` of the first VIP; Kubernetes waits until there is one.
pub fn endpoint(view: &ClusterView) -> Option<String> {
    view.vips
        .first()
        .map(|v| SocketAddr::new(v.address, 6443).to_string())
}

fn control_planes(view: &ClusterView) -> impl Iterator<Item = &NodeId> {
    view.with_role(Role::K8sControlPlane).map(|m| &m.node)
}

fn is_kubernetes_member(view: &ClusterView, node: &NodeId) -> bool {
    view.members.iter().any(|m| {
        &m.node == node
            && (m.roles.contains(&Role::K8sControlPlane) || m.roles.contains(&Role::K8sWorker))
    })
}

/// The control-plane node that should run `kubeadm init`: the first (by
/// id) that has an address. The leader records its choice; this is only
/// consulted when there is none yet.
pub fn pick_init_node(view: &ClusterView) -> Option<NodeId> {
    view.with_role(Role::K8sControlPlane)
        .find(|m| m.address.is_some())
        .map(|m| m.node.clone())
}

/// Nodes that still have to join, control planes first (by id).
pub fn pending_joins(view: &ClusterView, progress: Progress<'_>) -> Vec<NodeId> {
    let Some(boot) = progress.bootstrap else {
        return Vec::new();
    };
    let mut cps: Vec<NodeId> = control_planes(view)
        .filter(|n| **n != boot.init_node && !progress.joined.contains(*n))
        .cloned()
        .collect();
    let workers = view
        .with_role(Role::K8sWorker)
        .filter(|m| !m.roles.contains(&Role::K8sControlPlane))
        .map(|m| &m.node)
        .filter(|n| **n != boot.init_node && !progress.joined.contains(*n))
        .cloned();
    cps.extend(workers);
    cps
}

/// The tasks and files the bootstrap gives `node` now.
pub fn steps(
    node: &NodeId,
    view: &ClusterView,
    progress: Progress<'_>,
) -> (Vec<Task>, Vec<SecretFile>) {
    let (Some(settings), Some(boot), Some(endpoint)) = (
        view.settings.kubernetes.as_ref(),
        progress.bootstrap,
        endpoint(view),
    ) else {
        return (Vec::new(), Vec::new());
    };
    let removals = removal_steps(node, view, progress);
    if !is_kubernetes_member(view, node) {
        return (removals, Vec::new());
    }
    let initialized = progress.joined.contains(&boot.init_node);
    let mut tasks = Vec::new();
    let mut files = Vec::new();
    if *node == boot.init_node {
        files.push(SecretFile {
            path: "/etc/kubernetes/pki/ca.crt".into(),
            content: boot.ca_cert_pem.clone().into_bytes(),
            mode: 0o644,
        });
        files.push(SecretFile {
            path: "/etc/kubernetes/pki/ca.key".into(),
            content: boot.ca_key_pem.clone().into_bytes(),
            mode: 0o600,
        });
        let api = kubeadm_api(&settings.version);
        let init_config = format!(
            "apiVersion: {api}\n\
             kind: InitConfiguration\n\
             bootstrapTokens:\n\
             - token: {token}\n\
            \x20 ttl: \"24h0m0s\"\n\
             certificateKey: {key}\n\
             nodeRegistration:\n\
            \x20 name: {name}\n\
             ---\n\
             apiVersion: {api}\n\
             kind: ClusterConfiguration\n\
             controlPlaneEndpoint: {endpoint_q}\n\
             networking:\n\
            \x20 podSubnet: {pods}\n\
            \x20 serviceSubnet: {services}\n",
            token = q(&boot.token.value),
            key = q(&boot.certificate_key.value),
            name = q(node.as_str()),
            endpoint_q = q(&endpoint),
            pods = q(&settings.pod_subnet),
            services = q(&settings.service_subnet),
        );
        let config = kubeadm_config(&TaskId::KubeadmInit.to_string(), init_config);
        tasks.push(Task {
            id: TaskId::KubeadmInit.into(),
            argv: [
                "kubeadm",
                "init",
                "--config",
                &config.path,
                "--upload-certs",
            ]
            .map(String::from)
            .to_vec(),
            creates: Some(ADMIN_CONF.into()),
            unless: None,
            summary: format!(
                "kubeadm init --control-plane-endpoint {endpoint} --upload-certs \
                 (token and certificate key withheld)"
            ),
            inputs: vec![config],
        });
        let pending = pending_joins(view, progress);
        if initialized && !pending.is_empty() {
            // Secrets renewed after init must be registered before use.
            if boot.token.generation > 0 {
                let id = TaskId::KubeadmToken(boot.token.generation).to_string();
                let config = kubeadm_config(
                    &id,
                    format!(
                        "apiVersion: {api}\n\
                         kind: InitConfiguration\n\
                         bootstrapTokens:\n\
                         - token: {}\n\
                        \x20 ttl: \"24h0m0s\"\n",
                        q(&boot.token.value)
                    ),
                );
                // The token's id (before the '.') is public; its secret
                // half never leaves the config file.
                let token_id = boot.token.value.split('.').next().unwrap_or_default();
                tasks.push(Task {
                    id,
                    argv: [
                        "kubeadm",
                        "token",
                        "create",
                        "--config",
                        &config.path,
                        "--kubeconfig",
                        ADMIN_CONF,
                    ]
                    .map(String::from)
                    .to_vec(),
                    creates: None,
                    unless: Some(
                        [
                            "sh",
                            "-c",
                            &format!(
                                "kubeadm token list --kubeconfig {ADMIN_CONF} 2>/dev/null | grep -q '^{token_id}\\.'"
                            ),
                        ]
                        .map(String::from)
                        .to_vec(),
                    ),
                    summary: format!(
                        "kubeadm token create (generation {}, withheld)",
                        boot.token.generation
                    ),
                    inputs: vec![config],
                });
            }
            let cp_pending = pending.iter().any(|n| control_planes(view).any(|c| c == n));
            if boot.certificate_key.generation > 0 && cp_pending {
                let done = format!(
                    "{DONE_DIR}/upload-certs-{}",
                    boot.certificate_key.generation
                );
                let id = TaskId::KubeadmUploadCerts(boot.certificate_key.generation).to_string();
                let config = kubeadm_config(
                    &id,
                    format!(
                        "apiVersion: {api}\n\
                         kind: InitConfiguration\n\
                         certificateKey: {}\n",
                        q(&boot.certificate_key.value)
                    ),
                );
                tasks.push(Task {
                    id,
                    argv: [
                        "sh",
                        "-c",
                        &format!(
                            "kubeadm init phase upload-certs --upload-certs --config {} \
                             && mkdir -p {DONE_DIR} && touch {done}",
                            config.path
                        ),
                    ]
                    .map(String::from)
                    .to_vec(),
                    creates: Some(done),
                    unless: None,
                    summary: format!(
                        "kubeadm init phase upload-certs (generation {}, key withheld)",
                        boot.certificate_key.generation
                    ),
                    inputs: vec![config],
                });
            }
        }
        tasks.extend(removals);
        return (tasks, files);
    }
    if !initialized {
        return (tasks, files);
    }
    let pending = pending_joins(view, progress);
    let is_control_plane = control_planes(view).any(|c| c == node);
    if is_control_plane {
        // One control plane at a time: etcd grows by one member per join.
        let next_cp = pending
            .iter()
            .find(|n| control_planes(view).any(|c| c == *n));
        let already = progress.joined.contains(node);
        if !already && next_cp != Some(node) {
            return (tasks, files);
        }
    }
    let api = kubeadm_api(&settings.version);
    let control_plane = if is_control_plane {
        format!(
            "controlPlane:\n  certificateKey: {}\n",
            q(&boot.certificate_key.value)
        )
    } else {
        String::new()
    };
    let config = kubeadm_config(
        &TaskId::KubeadmJoin.to_string(),
        format!(
            "apiVersion: {api}\n\
             kind: JoinConfiguration\n\
             discovery:\n\
            \x20 bootstrapToken:\n\
            \x20   apiServerEndpoint: {}\n\
            \x20   token: {}\n\
            \x20   caCertHashes:\n\
            \x20   - {}\n\
             nodeRegistration:\n\
            \x20 name: {}\n\
             {control_plane}",
            q(&endpoint),
            q(&boot.token.value),
            q(&boot.ca_hash),
            q(node.as_str()),
        ),
    );
    tasks.push(Task {
        id: TaskId::KubeadmJoin.into(),
        argv: ["kubeadm", "join", "--config", &config.path]
            .map(String::from)
            .to_vec(),
        creates: Some(KUBELET_CONF.into()),
        unless: None,
        summary: format!(
            "kubeadm join {endpoint}{} --discovery-token-ca-cert-hash {} (token{} withheld)",
            if is_control_plane {
                " --control-plane"
            } else {
                ""
            },
            boot.ca_hash,
            if is_control_plane {
                " and certificate key"
            } else {
                ""
            },
        ),
        inputs: vec![config],
    });
    // A joined control plane other than the init node may be the remover.
    tasks.extend(removals);
    (tasks, files)
}

/// Which secrets the leader must renew now: a node still has to join and
/// the secret expires within [`RENEW_MARGIN_MS`]. (token, certificate key)
pub fn renewals_due(view: &ClusterView, progress: Progress<'_>, now_ms: u64) -> (bool, bool) {
    let Some(boot) = progress.bootstrap else {
        return (false, false);
    };
    let pending = pending_joins(view, progress);
    if pending.is_empty() {
        return (false, false);
    }
    let near = |s: &Secret, ttl| now_ms + RENEW_MARGIN_MS >= s.expires_unix_ms(ttl);
    let cp_pending = pending.iter().any(|n| control_planes(view).any(|c| c == n));
    (
        near(&boot.token, TOKEN_TTL_MS),
        cp_pending && near(&boot.certificate_key, CERTIFICATE_KEY_TTL_MS),
    )
}

#[cfg(test)]
mod tests {
    use steward_proto::converge::{KubernetesSettings, Member, PackageRepository, VipView};

    use super::*;
    use ring::digest::{digest, SHA256};

    fn id(s: &str) -> NodeId {
        NodeId::new(s.to_owned()).unwrap()
    }

    fn view(cps: &[&str], workers: &[&str]) -> ClusterView {
        let mut members = Vec::new();
        for (i, (n, role)) in cps
            .iter()
            .map(|n| (n, Role::K8sControlPlane))
            .chain(workers.iter().map(|n| (n, Role::K8sWorker)))
            .enumerate()
        {
            members.push(Member {
                node: id(n),
                roles: [role].into(),
                address: Some(format!("198.18.0.{}", 10 + i).parse().unwrap()),
            });
        }
        members.sort_by(|a, b| a.node.cmp(&b.node));
        let mut v = ClusterView {
            members,
            vips: vec![VipView {
                name: "front".into(),
                address: "198.18.0.200".parse().unwrap(),
                prefix: 24,
            }],
            ..Default::default()
        };
        v.settings.kubernetes = Some(KubernetesSettings {
            version: "1.31.2-1.1".into(),
            pod_subnet: "10.244.0.0/16".into(),
            service_subnet: "10.96.0.0/12".into(),
            repository: PackageRepository {
                url: "file:/srv/k8s".into(),
                suite: "./".into(),
                key: None,
            },
            kubelet_version: None,
        });
        v
    }

    fn boot(init: &str) -> Bootstrap {
        Bootstrap::generate(id(init), 1_000).unwrap()
    }

    fn task_ids(node: &str, v: &ClusterView, b: &Bootstrap, joined: &[&str]) -> Vec<String> {
        let joined: BTreeSet<NodeId> = joined.iter().map(|n| id(n)).collect();
        let progress = Progress {
            bootstrap: Some(b),
            joined: &joined,
            drained: &BTreeSet::new(),
            maintenance: &NO_NODES,
            cordoned: &NO_NODES,
        };
        steps(&id(node), v, progress)
            .0
            .into_iter()
            .map(|t| t.id)
            .collect()
    }

    #[test]
    fn init_runs_on_exactly_one_control_plane_and_joins_wait_for_it() {
        let v = view(&["cp-1", "cp-2", "cp-3"], &["w-1", "w-2"]);
        assert_eq!(pick_init_node(&v), Some(id("cp-1")));
        let b = boot("cp-1");
        let inits: Vec<&str> = ["cp-1", "cp-2", "cp-3", "w-1", "w-2"]
            .into_iter()
            .filter(|n| task_ids(n, &v, &b, &[]).contains(&"kubeadm-init".to_owned()))
            .collect();
        assert_eq!(inits, ["cp-1"]);
        for n in ["cp-2", "cp-3", "w-1", "w-2"] {
            assert!(
                task_ids(n, &v, &b, &[]).is_empty(),
                "{n} must wait for init"
            );
        }
    }

    #[test]
    fn control_planes_join_one_at_a_time_workers_all_at_once() {
        let v = view(&["cp-1", "cp-2", "cp-3"], &["w-1", "w-2"]);
        let b = boot("cp-1");
        assert_eq!(task_ids("cp-2", &v, &b, &["cp-1"]), ["kubeadm-join"]);
        assert!(task_ids("cp-3", &v, &b, &["cp-1"]).is_empty());
        assert_eq!(
            task_ids("cp-3", &v, &b, &["cp-1", "cp-2"]),
            ["kubeadm-join"]
        );
        // A joined control plane keeps its (guarded) join task.
        assert_eq!(
            task_ids("cp-2", &v, &b, &["cp-1", "cp-2"]),
            ["kubeadm-join"]
        );
        assert_eq!(task_ids("w-1", &v, &b, &["cp-1"]), ["kubeadm-join"]);
        assert_eq!(task_ids("w-2", &v, &b, &["cp-1"]), ["kubeadm-join"]);
    }

    #[test]
    fn join_configs_carry_endpoint_token_hash_and_key_but_argv_and_reports_do_not() {
        let v = view(&["cp-1", "cp-2"], &["w-1"]);
        let b = boot("cp-1");
        let joined: BTreeSet<NodeId> = [id("cp-1")].into();
        let progress = Progress {
            bootstrap: Some(&b),
            joined: &joined,
            drained: &BTreeSet::new(),
            maintenance: &NO_NODES,
            cordoned: &NO_NODES,
        };
        let (cp, _) = steps(&id("cp-2"), &v, progress);
        let config_path = format!("{KUBEADM_CONFIG_DIR}/kubeadm-join.yaml");
        assert_eq!(cp[0].argv, ["kubeadm", "join", "--config", &config_path]);
        let [config] = &cp[0].inputs[..] else {
            panic!("one config: {:?}", cp[0].inputs)
        };
        assert_eq!(
            (config.path.as_str(), config.mode),
            (config_path.as_str(), 0o600)
        );
        let yaml = String::from_utf8(config.content.clone()).unwrap();
        assert_eq!(
            yaml,
            format!(
                "apiVersion: kubeadm.k8s.io/v1beta4\n\
                 kind: JoinConfiguration\n\
                 discovery:\n  \
                 bootstrapToken:\n    \
                 apiServerEndpoint: \"198.18.0.200:6443\"\n    \
                 token: \"{}\"\n    \
                 caCertHashes:\n    \
                 - \"{}\"\n\
                 nodeRegistration:\n  \
                 name: \"cp-2\"\n\
                 controlPlane:\n  \
                 certificateKey: \"{}\"\n",
                b.token.value, b.ca_hash, b.certificate_key.value
            )
        );
        let (w, _) = steps(&id("w-1"), &v, progress);
        let yaml = String::from_utf8(w[0].inputs[0].content.clone()).unwrap();
        assert!(yaml.contains(&b.token.value) && !yaml.contains("controlPlane"));
        assert_eq!(w[0].creates.as_deref(), Some(KUBELET_CONF));
        // No secret in any argv, guard or summary, on any node, for any step.
        let mut b = b.clone();
        b.token.generation = 1;
        b.certificate_key.generation = 1;
        let progress = Progress {
            bootstrap: Some(&b),
            joined: &joined,
            drained: &BTreeSet::new(),
            maintenance: &NO_NODES,
            cordoned: &NO_NODES,
        };
        let pending_cp = view(&["cp-1", "cp-2", "cp-3"], &["w-1"]);
        for node in ["cp-1", "cp-2", "cp-3", "w-1"] {
            for t in steps(&id(node), &pending_cp, progress).0 {
                let said = format!("{:?} {:?} {}", t.argv, t.unless, t.summary);
                let secret_half = b.token.value.split('.').nth(1).unwrap();
                assert!(
                    !said.contains(secret_half) && !said.contains(&b.certificate_key.value),
                    "{node} {}: {said}",
                    t.id
                );
            }
        }
    }

    #[test]
    fn the_kubeadm_api_follows_the_version() {
        assert_eq!(kubeadm_api("1.31.2-1.1"), "kubeadm.k8s.io/v1beta4");
        assert_eq!(kubeadm_api("1.33.0-1.1"), "kubeadm.k8s.io/v1beta4");
        assert_eq!(kubeadm_api("1.30.4-1.1"), "kubeadm.k8s.io/v1beta3");
        assert_eq!(kubeadm_api("1:1.29.0-00"), "kubeadm.k8s.io/v1beta3");
    }

    #[test]
    fn the_init_node_gets_the_ca_and_the_hash_matches_it() {
        let v = view(&["cp-1"], &[]);
        let b = boot("cp-1");
        let joined = BTreeSet::new();
        let (tasks, files) = steps(
            &id("cp-1"),
            &v,
            Progress {
                bootstrap: Some(&b),
                joined: &joined,
                drained: &BTreeSet::new(),
                maintenance: &NO_NODES,
                cordoned: &NO_NODES,
            },
        );
        assert_eq!(files.len(), 2);
        assert_eq!(files[1].path, "/etc/kubernetes/pki/ca.key");
        assert_eq!(files[1].mode, 0o600);
        assert_eq!(tasks[0].creates.as_deref(), Some(ADMIN_CONF));
        // The hash is over the certificate's public key, as kubeadm computes it.
        let (_, pem) = x509_parser::pem::parse_x509_pem(b.ca_cert_pem.as_bytes()).unwrap();
        let cert = pem.parse_x509().unwrap();
        let spki = cert.tbs_certificate.subject_pki.raw;
        assert_eq!(
            b.ca_hash,
            format!("sha256:{}", hex(digest(&SHA256, spki).as_ref()))
        );
        assert!(new_token().unwrap().len() == 23 && new_token().unwrap().as_bytes()[6] == b'.');
    }

    #[test]
    fn secrets_are_renewed_only_when_needed_and_registered_by_the_init_node() {
        let v = view(&["cp-1", "cp-2"], &[]);
        let mut b = boot("cp-1");
        let joined: BTreeSet<NodeId> = [id("cp-1")].into();
        let none = BTreeSet::new();
        let progress = |b| Progress {
            bootstrap: Some(b),
            joined: &joined,
            drained: &none,
            maintenance: &NO_NODES,
            cordoned: &NO_NODES,
        };
        assert_eq!(renewals_due(&v, progress(&b), 1_000), (false, false));
        let late = 1_000 + CERTIFICATE_KEY_TTL_MS;
        assert_eq!(renewals_due(&v, progress(&b), late), (false, true));
        assert_eq!(
            renewals_due(&v, progress(&b), 1_000 + TOKEN_TTL_MS),
            (true, true)
        );
        // Everyone joined: nothing to renew.
        let all: BTreeSet<NodeId> = [id("cp-1"), id("cp-2")].into();
        let done = Progress {
            bootstrap: Some(&b),
            joined: &all,
            drained: &none,
            maintenance: &NO_NODES,
            cordoned: &NO_NODES,
        };
        assert_eq!(renewals_due(&v, done, late), (false, false));

        b.certificate_key = Secret {
            value: new_certificate_key().unwrap(),
            created_unix_ms: late,
            generation: 1,
        };
        let ids = task_ids("cp-1", &v, &b, &["cp-1"]);
        assert_eq!(ids, ["kubeadm-init", "kubeadm-upload-certs-1"]);
    }

    #[test]
    fn a_node_losing_its_role_is_drained_and_deleted_then_reset() {
        let v = view(&["cp-1", "cp-2"], &["w-1"]);
        let b = boot("cp-1");
        // w-1 joined, then lost its role.
        let mut v2 = v.clone();
        v2.members.retain(|m| m.node.as_str() != "w-1");
        let joined: BTreeSet<NodeId> = [id("cp-1"), id("cp-2"), id("w-1")].into();
        let none = BTreeSet::new();
        let before = Progress {
            bootstrap: Some(&b),
            joined: &joined,
            drained: &none,
            maintenance: &NO_NODES,
            cordoned: &NO_NODES,
        };
        assert_eq!(leaving(&v2, before), [id("w-1")]);
        assert_eq!(remover(&v2, before), Some(id("cp-1")));
        let ids = |node: &str, p| {
            steps(&id(node), &v2, p)
                .0
                .into_iter()
                .map(|t| t.id)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            ids("cp-1", before),
            ["kubeadm-init", "kubernetes-remove-w-1"]
        );
        assert!(ids("w-1", before).is_empty(), "no reset before the drain");
        assert_eq!(ids("cp-2", before), ["kubeadm-join"]);
        let drained: BTreeSet<NodeId> = [id("w-1")].into();
        let after = Progress {
            drained: &drained,
            maintenance: &NO_NODES,
            cordoned: &NO_NODES,
            ..before
        };
        assert_eq!(ids("cp-1", after), ["kubeadm-init"]);
        assert_eq!(ids("w-1", after), ["kubeadm-reset"]);
        // The remover is the init node while it is a control plane.
        let mut v3 = v2.clone();
        v3.members.retain(|m| m.node.as_str() != "cp-1");
        assert_eq!(remover(&v3, before), Some(id("cp-2")));
    }

    #[test]
    fn sealing_round_trips() {
        let sealer = SecretBox::from_hex(&super::super::secrets::new_key_hex().unwrap()).unwrap();
        let b = boot("cp-1");
        let record = b.seal(&sealer).unwrap();
        assert!(!serde_json::to_string(&record)
            .unwrap()
            .contains(&b.token.value));
        assert_eq!(Bootstrap::open(&record, &sealer).unwrap(), b);
    }

    /// Maintenance: the remover cordons and drains a node out of service,
    /// once, and uncordons it when it is back.
    #[test]
    fn a_node_out_of_service_is_cordoned_and_drained_then_uncordoned() {
        let v = view(&["cp-1", "cp-2"], &["w-1"]);
        let b = boot("cp-1");
        let joined: BTreeSet<NodeId> = [id("cp-1"), id("cp-2"), id("w-1")].into();
        let none = BTreeSet::new();
        let down: BTreeSet<NodeId> = [id("w-1")].into();
        let ids = |node: &str, maintenance: &BTreeSet<NodeId>, cordoned: &BTreeSet<NodeId>| {
            let progress = Progress {
                bootstrap: Some(&b),
                joined: &joined,
                drained: &none,
                maintenance,
                cordoned,
            };
            steps(&id(node), &v, progress)
                .0
                .into_iter()
                .map(|t| (t.id, t.argv.join(" ")))
                .filter(|(id, _)| id.starts_with("kubernetes-"))
                .collect::<Vec<_>>()
        };
        let tasks = ids("cp-1", &down, &none);
        assert_eq!(tasks.len(), 1, "{tasks:?}");
        assert_eq!(tasks[0].0, cordon_task_id(&id("w-1")));
        assert!(tasks[0].1.contains("cordon w-1"), "{}", tasks[0].1);
        assert!(
            tasks[0]
                .1
                .contains("drain w-1 --ignore-daemonsets --delete-emptydir-data"),
            "{}",
            tasks[0].1
        );
        // Only the remover runs it; the node itself and others do not.
        assert!(ids("cp-2", &down, &none).is_empty());
        assert!(ids("w-1", &down, &none).is_empty());
        // Done: nothing more while it is out.
        let cordoned = down.clone();
        assert!(ids("cp-1", &down, &cordoned).is_empty());
        // Back in service: uncordon.
        let tasks = ids("cp-1", &none, &cordoned);
        assert_eq!(tasks.len(), 1, "{tasks:?}");
        assert_eq!(tasks[0].0, uncordon_task_id(&id("w-1")));
        assert!(tasks[0].1.ends_with("uncordon w-1"), "{}", tasks[0].1);
    }
}
