//! What a node's roles plan from ([`ClusterView`]) and what the agent reports
//! back about converging its host ([`ConvergeReport`]), with their wire
//! conversions.

use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::convert::{bounded_list, bounded_str, roles_from_pb, roles_to_pb, ProtoError};
use crate::domain::{NodeId, RoleSet};
use crate::pb;

/// The part of the cluster a node's roles plan from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterView {
    /// Every node with at least one role, ordered by id.
    pub members: Vec<Member>,
    /// Ordered by name.
    pub vips: Vec<VipView>,
    #[serde(default)]
    pub settings: ClusterSettings,
}

/// Cluster-wide settings (`stewardctl apply`), stored at `cluster/settings`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSettings {
    /// `None`: the cluster runs no Kubernetes.
    #[serde(default)]
    pub kubernetes: Option<KubernetesSettings>,
    #[serde(default)]
    pub gluster_volumes: Vec<GlusterVolume>,
    #[serde(default)]
    pub frontends: Vec<Frontend>,
    /// `[maintenance] window` ("Sat 02:00-04:00", UTC): when the leader
    /// reboots the nodes that need it by itself. Read by the coordinators
    /// only: in no node's slice, never sent to agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance_window: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesSettings {
    /// Package version kubeadm, kubelet and kubectl are held at.
    pub version: String,
    pub pod_subnet: String,
    pub service_subnet: String,
    pub repository: PackageRepository,
    /// Where kubelet and kubectl stay held while this node's Kubernetes
    /// upgrade runs `kubeadm upgrade` with kubeadm already at `version`
    /// (`None`: at `version` too). Set by the coordinator for one node at a
    /// time (`coordinator::rollout::upgrade`), never in a spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubelet_version: Option<String>,
}

impl KubernetesSettings {
    /// The version kubelet and kubectl are held at.
    pub fn kubelet_version(&self) -> &str {
        self.kubelet_version.as_deref().unwrap_or(&self.version)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackageRepository {
    pub url: String,
    /// apt: suite and components, e.g. `/` or `bookworm main`.
    #[serde(default = "default_suite")]
    pub suite: String,
    /// ASCII-armoured signing key; `None`: trusted as it is.
    #[serde(default)]
    pub key: Option<String>,
}

fn default_suite() -> String {
    "/".into()
}

/// What is wrong with `v` as a Debian package version,
/// `[epoch:]upstream_version[-debian_revision]` (Debian Policy 5.6.12):
/// epoch digits; upstream starting with a digit, of letters, digits and
/// `. + ~ -` (a hyphen only when a revision follows); revision of letters,
/// digits and `. + ~`. It goes into `apt-get install NAME=VERSION` and
/// apt preferences, so nothing else may pass.
pub fn debian_version_problem(v: &str) -> Option<String> {
    if v.is_empty() {
        return Some("must not be empty (e.g. \"1.31.2-1.1\")".into());
    }
    if v.len() > 128 {
        return Some("longer than 128 characters".into());
    }
    if let Some(c) = v
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || ".+~-:".contains(*c)))
    {
        return Some(format!(
            "{c:?} is not allowed in a version (letters, digits and . + ~ - only; \
             ':' only after a numeric epoch)"
        ));
    }
    let rest = match v.split_once(':') {
        Some((epoch, rest)) => {
            if epoch.is_empty() || !epoch.bytes().all(|b| b.is_ascii_digit()) {
                return Some(format!("epoch {epoch:?} is not a number"));
            }
            rest
        }
        None => v,
    };
    let (upstream, revision) = match rest.rsplit_once('-') {
        Some((u, r)) => (u, Some(r)),
        None => (rest, None),
    };
    if !upstream.starts_with(|c: char| c.is_ascii_digit()) {
        return Some(format!(
            "the upstream version {upstream:?} must start with a digit"
        ));
    }
    if upstream.contains(':') {
        return Some("':' is allowed only once, after a numeric epoch".into());
    }
    if let Some(r) = revision {
        if r.is_empty() {
            return Some("the revision after '-' is empty".into());
        }
        if let Some(c) = r
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || ".+~".contains(*c)))
        {
            return Some(format!(
                "{c:?} is not allowed in the revision (letters, digits and . + ~ only)"
            ));
        }
    }
    None
}

/// Characters a repository URL may carry into a sources.list line: RFC
/// 3986's, without `#` (a comment there) and without quotes.
fn is_url_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~:/?[]@!$&()*+,;=%".contains(c)
}

/// What is wrong with `url` as an apt repository: `http://HOST[:PORT][/PATH]`,
/// `https://...`, or `file:/PATH` (local mirrors, air-gapped sites); one
/// word of URL characters, so a sources.list line cannot be split or
/// extended through it.
pub fn apt_url_problem(url: &str) -> Option<String> {
    if let Some(c) = url.chars().find(|c| !is_url_char(*c)) {
        return Some(format!(
            "{c:?} is not allowed in a repository URL (no spaces, line breaks, quotes or '#')"
        ));
    }
    if let Some(path) = url.strip_prefix("file:") {
        return (!path.starts_with('/')).then(|| "a file: URL needs an absolute path".into());
    }
    let Some(rest) = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
    else {
        return Some("expected an http://, https:// or file:/ URL".into());
    };
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split_once(']').map(|(h, _)| h).unwrap_or_default(),
        None => authority.split(':').next().unwrap_or_default(),
    };
    if host.is_empty() || authority.contains('@') {
        return Some("expected a host after the scheme (and no user or password)".into());
    }
    None
}

/// What is wrong with `suite` as apt's suite and components (`/`, `./`,
/// `bookworm main contrib`): words of letters, digits and `. _ / -`
/// separated by single spaces.
pub fn apt_suite_problem(suite: &str) -> Option<String> {
    if suite.is_empty() {
        return Some("must not be empty (e.g. \"/\" or \"bookworm main\")".into());
    }
    if suite.len() > 256 {
        return Some("longer than 256 characters".into());
    }
    for word in suite.split(' ') {
        if word.is_empty() {
            return Some("words are separated by single spaces".into());
        }
        if let Some(c) = word
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || "._/-".contains(*c)))
        {
            return Some(format!(
                "{c:?} is not allowed (suite and components: letters, digits and . _ / - \
                 separated by single spaces)"
            ));
        }
    }
    None
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GlusterVolume {
    pub name: String,
    pub replica: u32,
    /// Nodes with any of these roles mount the volume at
    /// [`gluster_mount_point`]; settings stored before there was a choice
    /// mount on the Kubernetes workers.
    #[serde(default = "default_mount_on")]
    pub mount_on: RoleSet,
}

/// The report resource in which the agent of the node that runs a
/// volume's `gluster` commands states its capacity (from `gluster volume
/// status <volume> detail`), its detail written by
/// [`gluster_capacity_detail`]: the one definition both sides use.
pub fn gluster_capacity_resource_id(volume: &str) -> String {
    format!("gluster-capacity:{volume}")
}

/// `<bytes> bytes`: how a capacity resource's detail states it.
pub fn gluster_capacity_detail(bytes: u64) -> String {
    format!("{bytes} bytes")
}

/// The bytes a capacity resource's detail states.
pub fn parse_gluster_capacity_detail(detail: &str) -> Option<u64> {
    detail
        .strip_suffix(" bytes")?
        .parse()
        .ok()
        .filter(|b| *b > 0)
}

/// Where the volume is mounted: `/mnt/steward/gluster/<volume>`.
pub fn gluster_mount_point(volume: &str) -> String {
    format!("{GLUSTER_MOUNT_ROOT}/{volume}")
}

/// Under which every Gluster volume is mounted.
pub const GLUSTER_MOUNT_ROOT: &str = "/mnt/steward/gluster";

/// Who mounts a volume that does not say: the Kubernetes workers.
pub fn default_mount_on() -> RoleSet {
    RoleSet::from([crate::domain::Role::K8sWorker])
}

impl GlusterVolume {
    /// Whether a node with `roles` mounts this volume.
    pub fn mounted_by(&self, roles: &RoleSet) -> bool {
        self.mount_on.iter().any(|r| roles.contains(r))
    }
}

impl ClusterView {
    /// The members that mount `volume`, by id.
    pub fn mounting<'a>(
        &'a self,
        volume: &'a GlusterVolume,
    ) -> impl Iterator<Item = &'a Member> + 'a {
        self.members.iter().filter(|m| volume.mounted_by(&m.roles))
    }
}

/// A user-defined HAProxy frontend on every VIP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Frontend {
    pub name: String,
    pub port: u16,
    pub backend_role: crate::domain::Role,
    pub backend_port: u16,
}

/// A one-shot step the coordinator assigned to a node, run until its guard
/// says it is done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    /// Stable name; reports call it [`command_resource_id`]`(id)`.
    pub id: String,
    pub argv: Vec<String>,
    pub creates: Option<String>,
    pub unless: Option<Vec<String>>,
    /// How reports show it: argv without its secrets.
    pub summary: String,
    /// Written just before argv runs and removed right after, whatever the
    /// outcome (secrets for the command, kept off its command line).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<SecretFile>,
}

/// A file the coordinator hands a node; its content is never reported.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretFile {
    pub path: String,
    pub content: Vec<u8>,
    pub mode: u32,
}

impl fmt::Debug for SecretFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretFile")
            .field("path", &self.path)
            .field("content", &format_args!("<{} bytes>", self.content.len()))
            .field("mode", &format_args!("{:o}", self.mode))
            .finish()
    }
}

impl ClusterView {
    /// Members that have `role`, ordered by id.
    pub fn with_role(&self, role: crate::domain::Role) -> impl Iterator<Item = &Member> {
        self.members.iter().filter(move |m| m.roles.contains(&role))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub node: NodeId,
    pub roles: RoleSet,
    /// Where the cluster reaches the node; `None` until it first connected.
    pub address: Option<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipView {
    pub name: String,
    pub address: IpAddr,
    pub prefix: u8,
}

/// How one resource stands after a converge run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResourceStatus {
    /// Already as wanted.
    Ok,
    /// Put right in this run.
    Changed,
    Failed,
    /// Cannot apply on this host (e.g. a kernel setting inside a container).
    NotApplicable,
    /// Not attempted because a resource it needs failed.
    Skipped,
}

impl ResourceStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceStatus::Ok => "ok",
            ResourceStatus::Changed => "changed",
            ResourceStatus::Failed => "failed",
            ResourceStatus::NotApplicable => "not-applicable",
            ResourceStatus::Skipped => "skipped",
        }
    }

    /// Whether the resource is where it should be (or cannot be here).
    pub fn settled(self) -> bool {
        matches!(
            self,
            ResourceStatus::Ok | ResourceStatus::Changed | ResourceStatus::NotApplicable
        )
    }
}

impl fmt::Display for ResourceStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceState {
    /// Kind and name, e.g. `package:haproxy`.
    pub id: String,
    pub status: ResourceStatus,
    /// The error, the reason, or what was changed.
    pub detail: String,
    /// When the resource entered this status.
    pub since_unix_ms: u64,
}

/// The id of a task the coordinator gives a node: the one definition of
/// every id's format (`kubeadm-init`, `gluster-create-<volume>`, ...), which
/// the coordinator writes into desired states and looks for in reports,
/// and the agent recognises. On the wire (and in [`Task::id`]) it is its
/// string form.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TaskId {
    KubeadmInit,
    KubeadmJoin,
    KubeadmReset,
    /// A fresh bootstrap token, generation `n`.
    KubeadmToken(u32),
    /// Control-plane certificates uploaded again, generation `n`.
    KubeadmUploadCerts(u32),
    /// Cordon and drain `node` for maintenance.
    KubernetesDrain(NodeId),
    /// Put `node` back into service.
    KubernetesUncordon(NodeId),
    /// Drain and delete the leaving `node`.
    KubernetesRemove(NodeId),
    /// Add `node` to the Gluster pool.
    GlusterProbe(NodeId),
    /// Create volume `volume`.
    GlusterCreate(String),
    /// Start volume `volume`.
    GlusterStart(String),
    /// Move a brick of `volume` from `old` to `new`.
    GlusterReplace {
        volume: String,
        old: NodeId,
        new: NodeId,
    },
    /// Add the replica set whose first brick is on `first` to `volume`.
    GlusterAdd {
        volume: String,
        first: NodeId,
    },
    /// Apply `volume`'s PersistentVolume.
    GlusterPv(String),
    /// `kubeadm upgrade` (plan and apply on the first control plane, node
    /// elsewhere) to package version `version`, in rollout `rollout` (an
    /// upgrade to a version the node had before runs again).
    KubeadmUpgrade {
        version: String,
        rollout: String,
    },
    /// Restart the kubelet once it is at `version`, in rollout `rollout`.
    KubeletRestart {
        version: String,
        rollout: String,
    },
    /// Ask a control plane whether `node` reports Ready.
    KubernetesReady(NodeId),
}

impl TaskId {
    const GLUSTER_CREATE: &'static str = "gluster-create-";

    /// The volume of a `gluster-create-<volume>` id.
    pub fn gluster_created_volume(id: &str) -> Option<&str> {
        id.strip_prefix(Self::GLUSTER_CREATE)
    }

    /// Whether `id` is this task's.
    pub fn is(&self, id: &str) -> bool {
        // Compared without allocating for the fixed ids (the common case).
        match self {
            TaskId::KubeadmInit => id == "kubeadm-init",
            TaskId::KubeadmJoin => id == "kubeadm-join",
            TaskId::KubeadmReset => id == "kubeadm-reset",
            other => other.to_string() == id,
        }
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TaskId::KubeadmInit => f.write_str("kubeadm-init"),
            TaskId::KubeadmJoin => f.write_str("kubeadm-join"),
            TaskId::KubeadmReset => f.write_str("kubeadm-reset"),
            TaskId::KubeadmToken(n) => write!(f, "kubeadm-token-{n}"),
            TaskId::KubeadmUploadCerts(n) => write!(f, "kubeadm-upload-certs-{n}"),
            TaskId::KubernetesDrain(node) => write!(f, "kubernetes-drain-{node}"),
            TaskId::KubernetesUncordon(node) => write!(f, "kubernetes-uncordon-{node}"),
            TaskId::KubernetesRemove(node) => write!(f, "kubernetes-remove-{node}"),
            TaskId::GlusterProbe(node) => write!(f, "gluster-probe-{node}"),
            TaskId::GlusterCreate(volume) => write!(f, "{}{volume}", Self::GLUSTER_CREATE),
            TaskId::GlusterStart(volume) => write!(f, "gluster-start-{volume}"),
            TaskId::GlusterReplace { volume, old, new } => {
                write!(f, "gluster-replace-{volume}-{old}-{new}")
            }
            TaskId::GlusterAdd { volume, first } => write!(f, "gluster-add-{volume}-{first}"),
            TaskId::GlusterPv(volume) => write!(f, "gluster-pv-{volume}"),
            TaskId::KubeadmUpgrade { version, rollout } => {
                write!(f, "kubeadm-upgrade-{version}-{rollout}")
            }
            TaskId::KubeletRestart { version, rollout } => {
                write!(f, "kubelet-restart-{version}-{rollout}")
            }
            TaskId::KubernetesReady(node) => write!(f, "kubernetes-ready-{node}"),
        }
    }
}

impl From<TaskId> for String {
    fn from(id: TaskId) -> String {
        id.to_string()
    }
}

/// How a report names the command resource of task `task_id`
/// (`command:<id>`): the agent names it so, the coordinator looks it up so.
pub fn command_resource_id(task_id: &str) -> String {
    format!("command:{task_id}")
}

/// The last finished run of the converge loop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvergeReport {
    pub revision: u64,
    pub finished_unix_ms: u64,
    pub duration_ms: u32,
    pub resources: Vec<ResourceState>,
}

impl ConvergeReport {
    /// Whether the command of task `task_id` is in this report and settled
    /// (done, or not needed).
    pub fn command_settled(&self, task_id: &str) -> bool {
        let id = command_resource_id(task_id);
        self.resources
            .iter()
            .any(|r| r.id == id && r.status.settled())
    }

    /// Resources that failed, in order.
    pub fn failed(&self) -> impl Iterator<Item = &ResourceState> {
        self.resources
            .iter()
            .filter(|r| r.status == ResourceStatus::Failed)
    }

    /// Whether every resource is settled.
    pub fn converged(&self) -> bool {
        self.resources.iter().all(|r| r.status.settled())
    }

    /// The run in one word, for metrics: `failed` if any resource failed,
    /// else `changed` if any was put right, else `ok`.
    pub fn result_label(&self) -> &'static str {
        let any = |s: ResourceStatus| self.resources.iter().any(|r| r.status == s);
        if any(ResourceStatus::Failed) {
            "failed"
        } else if any(ResourceStatus::Changed) {
            "changed"
        } else {
            "ok"
        }
    }

    /// The same report without the per-run timing: two runs that found the
    /// host in the same state have equal outcomes.
    pub fn outcome(&self) -> (u64, &[ResourceState]) {
        (self.revision, &self.resources)
    }
}

fn ip(field: &'static str, s: &str) -> Result<IpAddr, ProtoError> {
    s.parse().map_err(|_| ProtoError::Invalid { field })
}

impl TryFrom<pb::ClusterView> for ClusterView {
    type Error = ProtoError;
    fn try_from(v: pb::ClusterView) -> Result<Self, ProtoError> {
        let members = crate::convert::bounded_list_of(
            "cluster.members",
            v.members,
            crate::convert::MAX_MEMBERS,
        )?
        .into_iter()
        .map(|m| {
            Ok(Member {
                node: NodeId::new(m.node_id)?,
                roles: roles_from_pb("cluster.members.roles", &m.roles)?,
                address: match m.address.as_str() {
                    "" => None,
                    a => Some(ip("cluster.members.address", a)?),
                },
            })
        })
        .collect::<Result<_, ProtoError>>()?;
        let vips = bounded_list("cluster.vips", v.vips)?
            .into_iter()
            .map(|v| {
                let field = "cluster.vips.address";
                let (address, prefix) = v
                    .address
                    .split_once('/')
                    .ok_or(ProtoError::Invalid { field })?;
                let address = ip(field, address)?;
                let prefix: u8 = prefix.parse().map_err(|_| ProtoError::Invalid { field })?;
                let max = if address.is_ipv4() { 32 } else { 128 };
                if prefix > max {
                    return Err(ProtoError::Invalid { field });
                }
                Ok(VipView {
                    name: bounded_str("cluster.vips.name", v.name)?,
                    address,
                    prefix,
                })
            })
            .collect::<Result<_, ProtoError>>()?;
        Ok(ClusterView {
            members,
            vips,
            settings: v.settings.unwrap_or_default().try_into()?,
        })
    }
}

fn bounded_port(field: &'static str, port: u32) -> Result<u16, ProtoError> {
    u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or(ProtoError::Invalid { field })
}

impl TryFrom<pb::ClusterSettings> for ClusterSettings {
    type Error = ProtoError;
    fn try_from(s: pb::ClusterSettings) -> Result<Self, ProtoError> {
        let kubernetes = s
            .kubernetes
            .map(|k| -> Result<KubernetesSettings, ProtoError> {
                let repo = k.repository.unwrap_or_default();
                Ok(KubernetesSettings {
                    version: bounded_str("kubernetes.version", k.version)?,
                    pod_subnet: bounded_str("kubernetes.pod_subnet", k.pod_subnet)?,
                    service_subnet: bounded_str("kubernetes.service_subnet", k.service_subnet)?,
                    repository: PackageRepository {
                        url: bounded_str("kubernetes.repository.url", repo.url)?,
                        suite: bounded_str("kubernetes.repository.suite", repo.suite)?,
                        key: Some(repo.key).filter(|k| !k.is_empty()),
                    },
                    kubelet_version: Some(k.kubelet_version)
                        .filter(|v| !v.is_empty())
                        .map(|v| bounded_str("kubernetes.kubelet_version", v))
                        .transpose()?,
                })
            })
            .transpose()?;
        Ok(ClusterSettings {
            kubernetes,
            gluster_volumes: bounded_list("gluster_volumes", s.gluster_volumes)?
                .into_iter()
                .map(|v| {
                    Ok(GlusterVolume {
                        name: bounded_str("gluster_volumes.name", v.name)?,
                        replica: v.replica,
                        mount_on: roles_from_pb("gluster_volumes.mount_on", &v.mount_on)?,
                    })
                })
                .collect::<Result<_, ProtoError>>()?,
            frontends: bounded_list("frontends", s.frontends)?
                .into_iter()
                .map(|f| {
                    Ok(Frontend {
                        name: bounded_str("frontends.name", f.name)?,
                        port: bounded_port("frontends.port", f.port)?,
                        backend_role: crate::convert::role_from_pb(
                            "frontends.backend_role",
                            f.backend_role,
                        )?,
                        backend_port: bounded_port("frontends.backend_port", f.backend_port)?,
                    })
                })
                .collect::<Result<_, ProtoError>>()?,
            // Not on the wire: agents never consume it.
            maintenance_window: None,
        })
    }
}

impl From<ClusterSettings> for pb::ClusterSettings {
    fn from(s: ClusterSettings) -> Self {
        pb::ClusterSettings {
            kubernetes: s.kubernetes.map(|k| pb::KubernetesSettings {
                version: k.version,
                pod_subnet: k.pod_subnet,
                service_subnet: k.service_subnet,
                repository: Some(pb::PackageRepository {
                    url: k.repository.url,
                    suite: k.repository.suite,
                    key: k.repository.key.unwrap_or_default(),
                }),
                kubelet_version: k.kubelet_version.unwrap_or_default(),
            }),
            gluster_volumes: s
                .gluster_volumes
                .into_iter()
                .map(|v| pb::GlusterVolume {
                    name: v.name,
                    replica: v.replica,
                    mount_on: roles_to_pb(&v.mount_on),
                })
                .collect(),
            frontends: s
                .frontends
                .into_iter()
                .map(|f| pb::Frontend {
                    name: f.name,
                    port: f.port.into(),
                    backend_role: crate::convert::role_to_pb(f.backend_role) as i32,
                    backend_port: f.backend_port.into(),
                })
                .collect(),
        }
    }
}

impl TryFrom<pb::Task> for Task {
    type Error = ProtoError;
    fn try_from(t: pb::Task) -> Result<Self, ProtoError> {
        let argv = bounded_list("tasks.argv", t.argv)?
            .into_iter()
            .map(|a| bounded_str("tasks.argv", a))
            .collect::<Result<Vec<_>, _>>()?;
        if argv.is_empty() {
            return Err(ProtoError::MissingField("tasks.argv"));
        }
        let unless = bounded_list("tasks.unless", t.unless)?
            .into_iter()
            .map(|a| bounded_str("tasks.unless", a))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Task {
            id: bounded_str("tasks.id", t.id)?,
            argv,
            creates: Some(bounded_str("tasks.creates", t.creates)?).filter(|c| !c.is_empty()),
            unless: Some(unless).filter(|u| !u.is_empty()),
            summary: bounded_str("tasks.summary", t.summary)?,
            inputs: bounded_list("tasks.inputs", t.inputs)?
                .into_iter()
                .map(SecretFile::try_from)
                .collect::<Result<Vec<_>, _>>()?,
        })
    }
}

impl From<Task> for pb::Task {
    fn from(t: Task) -> Self {
        pb::Task {
            id: t.id,
            argv: t.argv,
            creates: t.creates.unwrap_or_default(),
            unless: t.unless.unwrap_or_default(),
            summary: t.summary,
            inputs: t.inputs.into_iter().map(Into::into).collect(),
        }
    }
}

/// Largest secret file accepted from a coordinator.
pub const MAX_SECRET_FILE: usize = 64 * 1024;

impl TryFrom<pb::SecretFile> for SecretFile {
    type Error = ProtoError;
    fn try_from(f: pb::SecretFile) -> Result<Self, ProtoError> {
        if !f.path.starts_with('/') || f.path.contains("/../") || f.path.ends_with("/..") {
            return Err(ProtoError::Invalid {
                field: "files.path",
            });
        }
        if f.content.len() > MAX_SECRET_FILE {
            return Err(ProtoError::TooLong {
                field: "files.content",
                limit: MAX_SECRET_FILE,
            });
        }
        Ok(SecretFile {
            path: bounded_str("files.path", f.path)?,
            content: f.content,
            mode: f.mode & 0o7777,
        })
    }
}

impl From<SecretFile> for pb::SecretFile {
    fn from(f: SecretFile) -> Self {
        pb::SecretFile {
            path: f.path,
            content: f.content,
            mode: f.mode,
        }
    }
}

impl From<ClusterView> for pb::ClusterView {
    fn from(v: ClusterView) -> Self {
        pb::ClusterView {
            members: v
                .members
                .into_iter()
                .map(|m| pb::Member {
                    node_id: m.node.into(),
                    roles: roles_to_pb(&m.roles),
                    address: m.address.map(|a| a.to_string()).unwrap_or_default(),
                })
                .collect(),
            vips: v
                .vips
                .into_iter()
                .map(|v| pb::VipView {
                    name: v.name,
                    address: format!("{}/{}", v.address, v.prefix),
                })
                .collect(),
            settings: Some(v.settings.into()),
        }
    }
}

fn status_from_pb(value: i32) -> Result<ResourceStatus, ProtoError> {
    match pb::ResourceStatus::try_from(value) {
        Ok(pb::ResourceStatus::Ok) => Ok(ResourceStatus::Ok),
        Ok(pb::ResourceStatus::Changed) => Ok(ResourceStatus::Changed),
        Ok(pb::ResourceStatus::Failed) => Ok(ResourceStatus::Failed),
        Ok(pb::ResourceStatus::NotApplicable) => Ok(ResourceStatus::NotApplicable),
        Ok(pb::ResourceStatus::Skipped) => Ok(ResourceStatus::Skipped),
        Ok(pb::ResourceStatus::Unspecified) | Err(_) => Err(ProtoError::UnknownEnum {
            field: "converge.resources.status",
            value,
        }),
    }
}

fn status_to_pb(s: ResourceStatus) -> pb::ResourceStatus {
    match s {
        ResourceStatus::Ok => pb::ResourceStatus::Ok,
        ResourceStatus::Changed => pb::ResourceStatus::Changed,
        ResourceStatus::Failed => pb::ResourceStatus::Failed,
        ResourceStatus::NotApplicable => pb::ResourceStatus::NotApplicable,
        ResourceStatus::Skipped => pb::ResourceStatus::Skipped,
    }
}

impl TryFrom<pb::ConvergeReport> for ConvergeReport {
    type Error = ProtoError;
    fn try_from(r: pb::ConvergeReport) -> Result<Self, ProtoError> {
        Ok(ConvergeReport {
            revision: r.revision,
            finished_unix_ms: r.finished_unix_ms,
            duration_ms: r.duration_ms,
            resources: bounded_list("converge.resources", r.resources)?
                .into_iter()
                .map(|s| {
                    Ok(ResourceState {
                        id: bounded_str("converge.resources.id", s.id)?,
                        status: status_from_pb(s.status)?,
                        detail: bounded_str("converge.resources.detail", s.detail)?,
                        since_unix_ms: s.since_unix_ms,
                    })
                })
                .collect::<Result<_, ProtoError>>()?,
        })
    }
}

impl From<ConvergeReport> for pb::ConvergeReport {
    fn from(r: ConvergeReport) -> Self {
        pb::ConvergeReport {
            revision: r.revision,
            finished_unix_ms: r.finished_unix_ms,
            duration_ms: r.duration_ms,
            resources: r
                .resources
                .into_iter()
                .map(|s| pb::ResourceState {
                    id: s.id,
                    status: status_to_pb(s.status) as i32,
                    detail: s.detail,
                    since_unix_ms: s.since_unix_ms,
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn apt_strings_follow_their_grammar() {
        use super::{apt_suite_problem, apt_url_problem, debian_version_problem};
        for ok in [
            "1.31.2-1.1",
            "1:2.3~rc1+dfsg-4.1",
            "1.31.2",
            "2:1.0-a-b-1",
            "1.31.2-150500.1.1",
        ] {
            assert_eq!(debian_version_problem(ok), None, "{ok}");
        }
        for bad in [
            "",
            "v1.31",
            "1.31 ",
            "1.31\nkubeadm=1",
            "x:1.0",
            "1.0-",
            "1.0-1_1",
            "1.0;rm",
            "1.0*",
            ":1.0",
        ] {
            assert!(debian_version_problem(bad).is_some(), "{bad:?}");
        }
        for ok in [
            "https://pkgs.k8s.io/core:/stable:/v1.31/deb/",
            "http://10.0.0.1:8080/debian",
            "http://[fd00::1]/repo",
            "file:/srv/repo",
        ] {
            assert_eq!(apt_url_problem(ok), None, "{ok}");
        }
        for bad in [
            "https://",
            "https:///path",
            "ftp://mirror/debian",
            "https://x/ y",
            "https://x/\ndeb http://evil/ ./",
            "https://user:pw@host/",
            "https://x/#frag",
            "file:relative",
            "https://x/\"",
        ] {
            assert!(apt_url_problem(bad).is_some(), "{bad:?}");
        }
        for ok in [
            "/",
            "./",
            "bookworm main",
            "bookworm-backports main non-free-firmware",
        ] {
            assert_eq!(apt_suite_problem(ok), None, "{ok}");
        }
        for bad in [
            "",
            "bookworm  main",
            " main",
            "main\ndeb http://evil ./",
            "a\tb",
            "[trusted=yes]",
            "a#b",
        ] {
            assert!(apt_suite_problem(bad).is_some(), "{bad:?}");
        }
    }

    use super::*;
    use crate::domain::Role;

    fn view() -> ClusterView {
        ClusterView {
            members: vec![Member {
                node: NodeId::new("cp-1".to_owned()).unwrap(),
                roles: [Role::K8sControlPlane].into(),
                address: Some("198.18.0.5".parse().unwrap()),
            }],
            vips: vec![VipView {
                name: "front".into(),
                address: "198.18.0.200".parse().unwrap(),
                prefix: 24,
            }],
            settings: ClusterSettings {
                kubernetes: Some(KubernetesSettings {
                    version: "1.31.2-1.1".into(),
                    pod_subnet: "10.244.0.0/16".into(),
                    service_subnet: "10.96.0.0/12".into(),
                    repository: PackageRepository {
                        url: "file:/srv/repo".into(),
                        suite: "./".into(),
                        key: None,
                    },
                    kubelet_version: None,
                }),
                gluster_volumes: vec![GlusterVolume {
                    name: "data".into(),
                    replica: 3,
                    mount_on: [Role::K8sWorker, Role::K8sControlPlane].into(),
                }],
                frontends: vec![Frontend {
                    name: "grafana".into(),
                    port: 3000,
                    backend_role: Role::K8sWorker,
                    backend_port: 30300,
                }],
                // Not on the wire.
                maintenance_window: None,
            },
        }
    }

    #[test]
    fn tasks_and_files_are_checked() {
        let task = pb::Task {
            id: "kubeadm-join".into(),
            argv: vec![],
            ..Default::default()
        };
        assert!(Task::try_from(task).is_err(), "a task must have argv");
        for path in ["etc/passwd", "/etc/../root/x", "/a/.."] {
            let file = pb::SecretFile {
                path: path.into(),
                content: vec![],
                mode: 0o600,
            };
            assert!(SecretFile::try_from(file).is_err(), "{path}");
        }
        let file = SecretFile {
            path: "/etc/kubernetes/pki/ca.key".into(),
            content: b"secret".to_vec(),
            mode: 0o600,
        };
        assert!(!format!("{file:?}").contains("secret\""));
    }

    #[test]
    fn cluster_view_round_trips() {
        let wire: pb::ClusterView = view().into();
        assert_eq!(ClusterView::try_from(wire).unwrap(), view());
    }

    #[test]
    fn bad_addresses_in_a_view_are_refused() {
        let mut wire: pb::ClusterView = view().into();
        wire.vips[0].address = "198.18.0.200/33".into();
        assert_eq!(
            ClusterView::try_from(wire.clone()),
            Err(ProtoError::Invalid {
                field: "cluster.vips.address"
            })
        );
        wire.vips.clear();
        wire.members[0].address = "not-an-ip".into();
        assert!(ClusterView::try_from(wire).is_err());
    }

    #[test]
    fn report_round_trips_and_rejects_unknown_status() {
        let report = ConvergeReport {
            revision: 7,
            finished_unix_ms: 1,
            duration_ms: 2,
            resources: vec![ResourceState {
                id: "package:haproxy".into(),
                status: ResourceStatus::NotApplicable,
                detail: "in a container".into(),
                since_unix_ms: 3,
            }],
        };
        let mut wire: pb::ConvergeReport = report.clone().into();
        assert_eq!(ConvergeReport::try_from(wire.clone()).unwrap(), report);
        wire.resources[0].status = 99;
        assert!(ConvergeReport::try_from(wire).is_err());
    }
}

#[cfg(test)]
mod member_limit_tests {
    use super::*;

    /// An lb node's view lists every node with a role: a 5,000-node fleet
    /// must fit, an absurd one is refused.
    #[test]
    fn cluster_views_hold_a_large_fleet() {
        let view = |n: usize| pb::ClusterView {
            members: (0..n)
                .map(|i| pb::Member {
                    node_id: format!("node-{i}"),
                    roles: vec![pb::Role::K8sWorker as i32],
                    address: "198.18.0.1".into(),
                })
                .collect(),
            ..Default::default()
        };
        assert_eq!(
            ClusterView::try_from(view(5_000)).unwrap().members.len(),
            5_000
        );
        assert!(ClusterView::try_from(view(crate::convert::MAX_MEMBERS + 1)).is_err());
    }
}

#[cfg(test)]
mod task_id_tests {
    use super::*;

    /// The formats agents and coordinators of one release agree on; a
    /// change here is a protocol change.
    #[test]
    fn task_ids_keep_their_wire_form() {
        let n = |s: &str| NodeId::new(s).expect("node id");
        let cases = [
            (TaskId::KubeadmInit, "kubeadm-init"),
            (TaskId::KubeadmJoin, "kubeadm-join"),
            (TaskId::KubeadmReset, "kubeadm-reset"),
            (TaskId::KubeadmToken(3), "kubeadm-token-3"),
            (TaskId::KubeadmUploadCerts(2), "kubeadm-upload-certs-2"),
            (TaskId::KubernetesDrain(n("w-1")), "kubernetes-drain-w-1"),
            (
                TaskId::KubernetesUncordon(n("w-1")),
                "kubernetes-uncordon-w-1",
            ),
            (TaskId::KubernetesRemove(n("w-1")), "kubernetes-remove-w-1"),
            (TaskId::GlusterProbe(n("g2")), "gluster-probe-g2"),
            (TaskId::GlusterCreate("data".into()), "gluster-create-data"),
            (TaskId::GlusterStart("data".into()), "gluster-start-data"),
            (
                TaskId::GlusterReplace {
                    volume: "data".into(),
                    old: n("g1"),
                    new: n("g4"),
                },
                "gluster-replace-data-g1-g4",
            ),
            (
                TaskId::GlusterAdd {
                    volume: "data".into(),
                    first: n("g4"),
                },
                "gluster-add-data-g4",
            ),
            (TaskId::GlusterPv("data".into()), "gluster-pv-data"),
        ];
        for (id, wire) in cases {
            assert_eq!(id.to_string(), wire);
            assert!(id.is(wire), "{id:?}");
            assert!(!id.is("kubeadm-other"), "{id:?}");
        }
        assert_eq!(
            TaskId::gluster_created_volume("gluster-create-my-vol"),
            Some("my-vol")
        );
        assert_eq!(TaskId::gluster_created_volume("gluster-start-data"), None);
    }
}
