//! Domain types: what a node is, what it must be, and what happened.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest node id we accept (a DNS label).
pub const MAX_NODE_ID_LEN: usize = 63;

/// A node's identity: a DNS label (lowercase letters, digits, `-`), as in its
/// certificate's common name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeId(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid node id {id:?}: {reason}")]
pub struct InvalidNodeId {
    pub id: String,
    pub reason: &'static str,
}

impl NodeId {
    pub fn new(id: impl Into<String>) -> Result<Self, InvalidNodeId> {
        let id = id.into();
        let reason = if id.is_empty() {
            Some("must not be empty")
        } else if id.len() > MAX_NODE_ID_LEN {
            Some("must be at most 63 characters")
        } else if !id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            Some("may contain only lowercase letters, digits and '-'")
        } else if id.starts_with('-') || id.ends_with('-') {
            Some("must start and end with a letter or digit")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(InvalidNodeId { id, reason }),
            None => Ok(Self(id)),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for NodeId {
    type Err = InvalidNodeId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for NodeId {
    type Error = InvalidNodeId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl From<NodeId> for String {
    fn from(id: NodeId) -> Self {
        id.0
    }
}

/// What a node is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// HAProxy, active/passive behind a floating IP.
    Lb,
    K8sControlPlane,
    K8sWorker,
    GlusterBrick,
}

impl Role {
    pub const ALL: [Role; 4] = [
        Role::Lb,
        Role::K8sControlPlane,
        Role::K8sWorker,
        Role::GlusterBrick,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Lb => "lb",
            Role::K8sControlPlane => "k8s-control-plane",
            Role::K8sWorker => "k8s-worker",
            Role::GlusterBrick => "gluster-brick",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {0:?} (known roles: lb, k8s-control-plane, k8s-worker, gluster-brick)")]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownRole(s.to_owned()))
    }
}

pub type RoleSet = BTreeSet<Role>;

/// `AdminService.AddRoles` / `RemoveRoles` (`stewardctl role add|rm`): roles
/// to add to, or take from, one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleChange {
    pub node: NodeId,
    pub roles: RoleSet,
}

/// Desired configuration of one node, as stored at `nodes/<id>/spec`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    #[serde(default)]
    pub roles: RoleSet,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub cordoned: bool,
}

/// What the node must be, as pushed to its agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredState {
    /// etcd revision of the newest input (node specs, addresses, VIPs);
    /// 0: there are no inputs at all.
    pub revision: u64,
    pub roles: RoleSet,
    /// What the roles need to know of the rest of the cluster.
    #[serde(default)]
    pub cluster: crate::converge::ClusterView,
    /// Cluster-wide steps this node was picked for, in order.
    #[serde(default)]
    pub tasks: Vec<crate::converge::Task>,
    /// Files placed before the tasks run.
    #[serde(default)]
    pub files: Vec<crate::converge::SecretFile>,
    /// The coordinator certificates revoked, newest first, at most
    /// [`MAX_COORDINATOR_REVOCATIONS`]: the agent refuses a replica that
    /// presents one of them. Every node consumes them.
    #[serde(default)]
    pub coordinator_revocations: Vec<CoordinatorRevocation>,
    /// A reboot asked by a reboot rollout (the newest), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reboot: Option<RebootRequest>,
}

/// How many coordinator revocations a desired state carries (the newest).
pub const MAX_COORDINATOR_REVOCATIONS: usize = 256;

/// Every coordinator certificate of `name` issued (notBefore) up to
/// `revoked_unix_s` is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordinatorRevocation {
    pub name: CertName,
    pub revoked_unix_s: i64,
}

impl CoordinatorRevocation {
    /// The revocation in `list` that covers the coordinator certificate
    /// of `name` issued at `issued_unix_s`, if any.
    pub fn covering<'a>(
        list: &'a [CoordinatorRevocation],
        name: &str,
        issued_unix_s: i64,
    ) -> Option<&'a CoordinatorRevocation> {
        list.iter()
            .find(|r| r.name.as_str() == name && issued_unix_s <= r.revoked_unix_s)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Facts {
    pub hostname: String,
    pub os: String,
    pub kernel: String,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub disks: Vec<Disk>,
    pub interfaces: Vec<NetworkInterface>,
    /// `/proc/sys/kernel/random/boot_id`: a new one every boot.
    #[serde(default)]
    pub boot_id: String,
    /// Set while the host needs a reboot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reboot_required: Option<RebootRequired>,
}

/// Why and since when a host needs a reboot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebootRequired {
    /// The marker file's mtime, or when the agent first saw the need (unix ms).
    pub since_unix_ms: u64,
    /// `reboot-required` (`/run/reboot-required`) or `needs-restarting`.
    pub source: String,
    /// The packages that asked for it (`/run/reboot-required.pkgs`).
    #[serde(default)]
    pub packages: Vec<String>,
}

/// A reboot asked of a node (a reboot rollout): its agent reboots once per
/// `generation`, and only while it still runs boot `boot_id`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebootRequest {
    pub generation: u64,
    pub boot_id: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Disk {
    pub mount_point: String,
    pub total_bytes: u64,
    pub available_bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NetworkInterface {
    pub name: String,
    pub mac: String,
    pub addresses: Vec<String>,
}

/// Resource usage sampled with every heartbeat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Health {
    pub load1: f64,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    pub max_disk_used_fraction: f64,
}

/// Above this fraction of memory or of its fullest disk in use, a node is degraded.
pub const PRESSURE_THRESHOLD: f64 = 0.95;

impl Health {
    /// True when the node is short of memory or disk.
    pub fn under_pressure(&self) -> bool {
        let memory = if self.memory_total_bytes == 0 {
            0.0
        } else {
            self.memory_used_bytes as f64 / self.memory_total_bytes as f64
        };
        memory > PRESSURE_THRESHOLD || self.max_disk_used_fraction > PRESSURE_THRESHOLD
    }
}

/// Health as an operator sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NodeHealth {
    Healthy,
    Degraded,
    Unreachable,
    Disconnected,
}

impl NodeHealth {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeHealth::Healthy => "healthy",
            NodeHealth::Degraded => "degraded",
            NodeHealth::Unreachable => "unreachable",
            NodeHealth::Disconnected => "disconnected",
        }
    }
}

impl fmt::Display for NodeHealth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A node as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    pub id: NodeId,
    pub roles: RoleSet,
    pub health: NodeHealth,
    /// Milliseconds since the Unix epoch; 0 when never seen.
    pub last_seen_unix_ms: u64,
    /// The replica serving the node's session, if any.
    pub replica: Option<String>,
    pub facts: Facts,
    pub last_health: Health,
    pub desired_revision: u64,
    pub applied_revision: u64,
    /// Where the cluster reaches the node; `None` until it connected.
    pub address: Option<std::net::IpAddr>,
    pub converge: Option<crate::converge::ConvergeReport>,
    /// When its certificates were last revoked, if ever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_unix_ms: Option<u64>,
    /// Out of service (`stewardctl node drain`), if it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance: Option<MaintenanceView>,
    /// Its bricks and pending heals, as its agent last reported them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gluster: Option<GlusterReport>,
}

/// A node taken out of service, as operators see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaintenanceView {
    /// Done taking it out: its VIPs moved, its Kubernetes drain finished.
    pub drained: bool,
    pub reason: String,
    pub by: String,
    pub since_unix_ms: u64,
    pub forced: bool,
    /// What it still waits for, while draining.
    pub pending: Vec<String>,
}

impl MaintenanceView {
    pub fn state(&self) -> &'static str {
        if self.drained {
            "drained"
        } else {
            "draining"
        }
    }
}

/// The certificate kinds revoked by name (`stewardctl cert revoke`); agent
/// certificates are revoked per node (`stewardctl node revoke`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RevocableKind {
    Admin,
    Coordinator,
}

impl RevocableKind {
    pub const ALL: [RevocableKind; 2] = [RevocableKind::Admin, RevocableKind::Coordinator];

    /// The kind as certificates spell it (their organizational unit).
    pub fn as_str(self) -> &'static str {
        match self {
            RevocableKind::Admin => "admin",
            RevocableKind::Coordinator => "coordinator",
        }
    }
}

impl fmt::Display for RevocableKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RevocableKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "{s:?} is not a kind revoked by name: use admin or coordinator \
                     (agent certificates: stewardctl node revoke ID)"
                )
            })
    }
}

/// The name of an admin or coordinator certificate (its common name): 1-63
/// letters, digits, `-` or `.`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CertName(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid certificate name {name:?}: use 1-63 letters, digits, '-' or '.'")]
pub struct InvalidCertName {
    pub name: String,
}

impl CertName {
    pub fn new(name: impl Into<String>) -> Result<Self, InvalidCertName> {
        let name = name.into();
        let valid = !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        if valid {
            Ok(Self(name))
        } else {
            Err(InvalidCertName { name })
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CertName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for CertName {
    type Error = InvalidCertName;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl From<CertName> for String {
    fn from(name: CertName) -> Self {
        name.0
    }
}

/// `RevokeCertificate`, validated: what to revoke and whether the caller's
/// own certificate may be among it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokeCertificate {
    pub kind: RevocableKind,
    pub name: CertName,
    pub force: bool,
}

/// Every admin or coordinator certificate of `name` issued (notBefore) up
/// to `revoked_unix_s` is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertRevocation {
    pub kind: RevocableKind,
    pub name: CertName,
    pub revoked_unix_s: i64,
    pub at_unix_ms: u64,
    /// The admin who revoked them.
    pub by: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    RolesChanged,
    NodeRegistered,
    NodeConnected,
    NodeDisconnected,
    LeaderElected,
    /// A VIP was defined, changed or removed.
    VipChanged,
    /// A VIP got a new owner (epoch).
    VipMoved,
    /// A node joined with a token and got its first certificate.
    NodeJoined,
    NodeRevoked,
    /// A node was drained or undrained.
    NodeMaintenance,
    /// An admin or coordinator certificate name was revoked.
    CertificateRevoked,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::RolesChanged => "roles-changed",
            EventKind::NodeRegistered => "node-registered",
            EventKind::NodeConnected => "node-connected",
            EventKind::NodeDisconnected => "node-disconnected",
            EventKind::LeaderElected => "leader-elected",
            EventKind::VipChanged => "vip-changed",
            EventKind::VipMoved => "vip-moved",
            EventKind::NodeJoined => "node-joined",
            EventKind::NodeRevoked => "node-revoked",
            EventKind::NodeMaintenance => "node-maintenance",
            EventKind::CertificateRevoked => "certificate-revoked",
        }
    }
}

/// One entry of the audit trail at `events/`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// etcd revision that stored the event (0 before it is stored).
    #[serde(default, skip_serializing)]
    pub revision: u64,
    pub at_unix_ms: u64,
    pub kind: EventKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeId>,
    pub replica: String,
    pub message: String,
}

/// Messages from an agent, validated.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentMessage {
    Hello {
        node: NodeId,
        facts: Facts,
        last_applied_revision: u64,
        agent_version: String,
        /// Where the cluster should reach the node; `None`: the session's
        /// source address.
        advertise_address: Option<std::net::IpAddr>,
    },
    Heartbeat {
        seq: u64,
        sent_at_unix_ms: u64,
        health: Health,
    },
    Report {
        applied_revision: u64,
        converge: Option<crate::converge::ConvergeReport>,
    },
    /// Journal lines for a [`CoordinatorMessage::LogRequest`].
    LogChunk(LogChunk),
    /// The host's facts again, when they changed mid-session.
    Facts(Facts),
    /// A gluster-brick node's bricks and pending heals.
    Gluster(GlusterReport),
}

/// Volumes a [`GlusterReport`] may hold.
pub const MAX_GLUSTER_VOLUMES: usize = 64;
/// Bricks a [`GlusterVolumeReport`] may hold.
pub const MAX_GLUSTER_BRICKS: usize = 256;

/// What a gluster-brick node's agent read of the replicated volumes it has
/// a brick in (`gluster volume heal VOL info summary`). Stored as
/// `nodes/<id>/gluster`; the heal gate and the rollout's health step read
/// it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GlusterReport {
    /// The revision of the last converge report finished before the probe
    /// started (0: none): the report speaks for the host after it.
    pub after_converge_revision: u64,
    pub volumes: Vec<GlusterVolumeReport>,
}

impl GlusterReport {
    pub fn volume(&self, name: &str) -> Option<&GlusterVolumeReport> {
        self.volumes.iter().find(|v| v.volume == name)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GlusterVolumeReport {
    pub volume: String,
    /// Every brick of the volume, in glusterd's order.
    pub bricks: Vec<GlusterBrickReport>,
    /// Why the volume could not be read (`None`: it was).
    pub error: Option<String>,
}

impl GlusterVolumeReport {
    /// Entries pending heal, summed over the bricks whose count is known
    /// (`None`: no brick's is).
    pub fn pending_heals(&self) -> Option<u64> {
        let known: Vec<u64> = self.bricks.iter().filter_map(|b| b.pending_heals).collect();
        (!known.is_empty()).then(|| known.iter().sum())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GlusterBrickReport {
    /// `host:/path`, as glusterd names it.
    pub brick: String,
    /// The heal info's client reached it (`Status: Connected`).
    pub online: bool,
    /// Entries pending heal on it (`None`: the heal info could not reach it).
    pub pending_heals: Option<u64>,
}

impl GlusterBrickReport {
    /// The host part of [`GlusterBrickReport::brick`], if it is an address.
    pub fn address(&self) -> Option<std::net::IpAddr> {
        let (host, _) = self.brick.rsplit_once(":/")?;
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .ok()
    }
}

/// The journal units `stewardctl logs` may read: the agent's own and those
/// of the daemons Steward's roles run. Nothing else can be asked for.
pub const LOG_UNITS: [&str; 5] = [
    "steward-agent",
    "haproxy",
    "glusterd",
    "kubelet",
    "containerd",
];
/// Journal lines longer than this are cut (and marked so).
pub const MAX_LOG_LINE: usize = 4096;
/// At most this many past entries per request.
pub const MAX_LOG_LINES: u32 = 10_000;
/// At most this many lines per chunk.
pub const MAX_LOG_CHUNK: usize = 256;

/// A validated `stewardctl logs` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogQuery {
    /// One of [`LOG_UNITS`], without `.service`.
    pub unit: String,
    pub since_s: u32,
    pub follow: bool,
    pub lines: u32,
}

impl LogQuery {
    pub fn new(unit: &str, since_s: u32, follow: bool, lines: u32) -> Result<LogQuery, String> {
        let name = unit.strip_suffix(".service").unwrap_or(unit);
        if !LOG_UNITS.contains(&name) {
            return Err(format!(
                "unit {unit:?} is not one Steward manages; choose one of {}",
                LOG_UNITS.join(", ")
            ));
        }
        if !(1..=MAX_LOG_LINES).contains(&lines) {
            return Err(format!(
                "lines = {lines}: must be between 1 and {MAX_LOG_LINES}"
            ));
        }
        Ok(LogQuery {
            unit: name.to_owned(),
            since_s,
            follow,
            lines,
        })
    }
}

/// Journal lines of one request; `done` ends it (with `error` if it failed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogChunk {
    pub id: u64,
    pub lines: Vec<String>,
    pub done: bool,
    pub error: Option<String>,
}

/// Messages to an agent.
#[derive(Debug, Clone, PartialEq)]
pub enum CoordinatorMessage {
    DesiredState(Box<DesiredState>),
    HeartbeatAck {
        seq: u64,
        replica: String,
        /// How far apart the replica asks the heartbeats to be, in ms
        /// (0: the agent's own interval); see `steward_runtime::cadence`.
        interval_ms: u32,
    },
    /// Read the journal ([`LogQuery`]) and send it back as request `id`.
    LogRequest {
        id: u64,
        query: LogQuery,
    },
    /// Stop request `id`: its reader went away.
    LogCancel {
        id: u64,
    },
}

/// `2026-11-22 13:42:25` (UTC) from Unix milliseconds; `-` for 0 (never).
pub fn format_unix_ms(ms: u64) -> String {
    let at = i64::try_from(ms / 1000)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok());
    match at {
        Some(t) if ms > 0 => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        _ => "-".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_shown_in_utc_to_the_second() {
        assert_eq!(format_unix_ms(0), "-");
        assert_eq!(format_unix_ms(1_795_354_945_999), "2026-11-22 13:42:25");
        assert_eq!(format_unix_ms(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(format_unix_ms(u64::MAX), "-");
    }

    #[test]
    fn node_ids_are_dns_labels() {
        assert!(NodeId::new("node-1").is_ok());
        assert!(NodeId::new("a").is_ok());
        for bad in ["", "-a", "a-", "Node1", "a.b", "a_b", &"x".repeat(64)] {
            assert!(NodeId::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn roles_round_trip_through_their_names() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>(), Ok(role));
        }
        assert!("database".parse::<Role>().is_err());
    }

    #[test]
    fn node_spec_rejects_unknown_fields_and_roles() {
        let ok: NodeSpec = serde_json::from_str(r#"{"roles":["lb","k8s-worker"]}"#).unwrap();
        assert_eq!(ok.roles.len(), 2);
        assert!(serde_json::from_str::<NodeSpec>(r#"{"roles":["db"]}"#).is_err());
        assert!(serde_json::from_str::<NodeSpec>(r#"{"rolez":[]}"#).is_err());
    }

    #[test]
    fn pressure_means_memory_or_disk_nearly_full() {
        let mut h = Health {
            load1: 0.0,
            memory_used_bytes: 50,
            memory_total_bytes: 100,
            max_disk_used_fraction: 0.5,
        };
        assert!(!h.under_pressure());
        h.memory_used_bytes = 99;
        assert!(h.under_pressure());
        h.memory_used_bytes = 10;
        h.max_disk_used_fraction = 0.99;
        assert!(h.under_pressure());
    }

    #[test]
    fn a_coordinator_revocation_covers_its_name_up_to_its_second() {
        let list = [CoordinatorRevocation {
            name: CertName::new("coord-2").unwrap(),
            revoked_unix_s: 100,
        }];
        assert!(CoordinatorRevocation::covering(&list, "coord-2", 99).is_some());
        assert!(CoordinatorRevocation::covering(&list, "coord-2", 100).is_some());
        assert!(CoordinatorRevocation::covering(&list, "coord-2", 101).is_none());
        assert!(CoordinatorRevocation::covering(&list, "coord-1", 50).is_none());
        assert!(CoordinatorRevocation::covering(&[], "coord-2", 50).is_none());
    }
}
