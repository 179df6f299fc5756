//! The coordinator's error type and its one mapping to `tonic::Status`.

use steward_proto::domain::{NodeId, Role};
use steward_proto::ProtoError;

use crate::pki::PkiError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("etcd {op}: {source}")]
    Etcd {
        op: &'static str,
        #[source]
        source: crate::store::BackendError,
    },
    #[error("corrupt value at etcd key {key}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("unknown node {0}: no agent with this id has ever connected")]
    UnknownNode(NodeId),
    #[error("unknown VIP {0:?} (stewardctl vip list shows the VIPs)")]
    UnknownVip(String),
    #[error("unknown Gluster volume {0:?}: the cluster settings have no such [[gluster.volume]]")]
    UnknownVolume(String),
    #[error("unknown rollout {0:?} (stewardctl rollout list shows the rollouts)")]
    UnknownRollout(String),
    /// A spec whose changes do not fit one etcd transaction.
    #[error(
        "this spec makes {changes} changes needing {writes} writes in one etcd transaction, \
         more than the {max} etcd allows: apply it in parts"
    )]
    SpecTooLarge {
        changes: usize,
        writes: usize,
        max: usize,
    },
    #[error(
        "--rollout rolls out a change of the cluster settings (frontends, kubernetes, \
         gluster), and this spec changes none"
    )]
    NothingToRollOut,
    /// A spec applied with `--rollout` that changes more than the settings.
    #[error(
        "--rollout rolls out a change of the cluster settings only; this spec also changes \
         {0}: apply those without --rollout first"
    )]
    RolloutChangesMore(String),
    /// A plain apply that changes the version of a running Kubernetes.
    #[error(
        "kubernetes.version {from} -> {to} upgrades a running Kubernetes cluster, which goes \
         node by node as a rollout (kubeadm upgrade on the control planes one at a time, then \
         the workers drained in batches): apply it with --rollout (e.g. stewardctl apply -f \
         FILE --rollout --wait), with no other change than the cluster settings"
    )]
    UpgradeNeedsRollout { from: String, to: String },
    #[error(
        "rollout {0} is in progress: the cluster settings change through it until it is \
         done (stewardctl rollout status {0}; stewardctl rollout abort {0} stops it)"
    )]
    RolloutInProgress(String),
    #[error("rollout {id} is {phase}: nothing to {action}")]
    RolloutOver {
        id: String,
        phase: &'static str,
        action: &'static str,
    },
    #[error("rollout {id} is {phase}: it cannot resume (stewardctl rollout abort {id} ends it)")]
    RolloutCannotResume { id: String, phase: &'static str },
    /// `rollout reboot` that cannot start (no node selected, or a node
    /// whose boot the leader could not follow).
    #[error("cannot reboot: {0}")]
    RebootRefused(String),
    /// A revocation that would lock out the caller or this replica,
    /// asked without `--force`.
    #[error("{0}")]
    RevocationNeedsForce(String),
    /// `role add`/`role remove` naming no role.
    #[error("invalid request: name at least one role")]
    NoRolesNamed,
    /// `stewardctl logs` for a unit or range the agent does not serve.
    #[error("invalid request: {0}")]
    InvalidLogQuery(String),
    /// `stewardctl logs` asked of a replica that does not serve the node.
    #[error("node {node} is connected to replica {replica}, not this one: ask {replica}")]
    NodeServedElsewhere { node: NodeId, replica: String },
    #[error("node {0} is not connected: its journal cannot be read now")]
    NodeNotConnected(NodeId),
    /// A drain its gates refuse (and no `--force`).
    #[error("cannot drain {node}: {} (--force drains anyway)", .refusals.join("; "))]
    DrainRefused { node: NodeId, refusals: Vec<String> },
    #[error("{0} is not drained (stewardctl node drain {0})")]
    NotDrained(NodeId),
    #[error(
        "no node mounts Gluster volume {volume}: no node has a role of its mount_on ({mount_on})"
    )]
    NoGlusterMounter { volume: String, mount_on: String },
    /// A VIP definition that does not fit the fleet: every problem.
    #[error("invalid request: VIP {name:?}: {}", .problems.join("; "))]
    InvalidVip { name: String, problems: Vec<String> },
    #[error("VIP {0} has no holder to move away from")]
    VipHasNoHolder(String),
    #[error("VIP {vip} is already held by {node}")]
    VipAlreadyHeld { vip: String, node: NodeId },
    #[error("invalid request: {node} is not a candidate for VIP {vip} (candidates: {})", join_nodes(.candidates))]
    NotACandidate {
        vip: String,
        node: NodeId,
        candidates: Vec<NodeId>,
    },
    /// A join the token does not allow.
    #[error(transparent)]
    JoinRefused(#[from] crate::tokens::Refusal),
    #[error(
        "invalid request: ttl {ttl_s} s: must be between {} s and {} days",
        crate::tokens::MIN_TTL_S,
        crate::tokens::MAX_TTL_S / 86_400
    )]
    TokenTtlOutOfRange { ttl_s: u64 },
    #[error("no replica serves joins: give at least one a [pki] section with bootstrap_listen")]
    NoJoinListener,
    #[error("cannot generate a join token: {0}")]
    TokenGeneration(String),
    #[error("no token {0:?} (stewardctl token list shows them)")]
    UnknownToken(String),
    /// A certificate that is not an agent's asked for an agent's renewal.
    #[error("{0} may not renew an agent certificate; only agents may")]
    NotAnAgent(String),
    #[error("{identity}: {reason}")]
    AgentNameInvalid {
        identity: String,
        reason: &'static str,
    },
    #[error("this replica issues no certificates (no [pki] in its config); try another")]
    NoPki,
    /// A certificate of the wrong kind for this API (`may`: what it tried,
    /// `only`: the kind that may).
    #[error("{identity} may not {may}; only {only} certificates may")]
    WrongCertificateKind {
        identity: String,
        may: &'static str,
        only: &'static str,
    },
    /// A message naming another node than the caller's certificate.
    #[error("certificate is for node {certificate:?}; it may not speak for node {claimed:?}")]
    SpeaksForAnotherNode {
        certificate: String,
        claimed: String,
    },
    /// A lease stream's heartbeat naming another node than the stream's.
    #[error("this stream speaks for {stream}; it may not speak for {claimed}")]
    StreamSpeaksForAnotherNode { stream: NodeId, claimed: NodeId },
    /// An agent whose `[vip]` lease timing the replicas cannot honour.
    #[error(
        "invalid request: lease parameters disagree: the agent uses lease {agent_lease:?} with \
         {agent_replicas} replicas, this replica lease {lease:?} with {replicas} replicas (set \
         [vip] alike on both, the agent's lease no longer than the coordinators')"
    )]
    LeaseParamsDisagree {
        agent_lease: std::time::Duration,
        agent_replicas: u32,
        lease: std::time::Duration,
        replicas: usize,
    },
    #[error("node {node} does not have role {role}")]
    RoleNotAssigned { node: NodeId, role: Role },
    #[error("invalid request: {0}")]
    InvalidRequest(#[from] ProtoError),
    /// A certificate a revocation covers.
    #[error("{0}")]
    CertificateRevoked(String),
    #[error("invalid request: the first message must be a hello")]
    FirstMessageNotHello,
    #[error("invalid request: advertise_address {0}: the cluster cannot reach a node there")]
    UnreachableAddress(std::net::IpAddr),
    /// A replica's own configuration (read at start).
    #[error("configuration: {0}")]
    Config(String),
    #[error("etcd campaign returned no leader key")]
    CampaignWithoutLeaderKey,
    /// Making a cluster secret failed.
    #[error("cluster secret: {0}")]
    SecretGeneration(String),
    /// `stewardctl apply` of a spec with problems: all of them.
    #[error("{}", spec_problems(.0))]
    InvalidSpec(Vec<String>),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("concurrent updates to {key} kept conflicting; try again")]
    Conflict { key: String },
    #[error("not the leader any more (fence on epoch {epoch} failed)")]
    LostLeadership { epoch: i64 },
    #[error("etcd watch interrupted: {0}")]
    WatchInterrupted(String),
    /// This replica's spec cache did not reach a read barrier in time
    /// (`crate::cache::caught_up`).
    #[error(
        "this replica's cache of the nodes did not reach etcd revision {revision} within {} s; \
         try again",
        .within.as_secs()
    )]
    CacheBehind {
        revision: i64,
        within: std::time::Duration,
    },
    #[error("coordinator shutting down")]
    ShuttingDown,
    /// Admission control: too many sessions waiting here, or this node
    /// opening sessions too often. The client is told when to come back.
    #[error("replica busy: {reason}; retry in {} ms", .retry_after.as_millis())]
    Busy {
        reason: String,
        retry_after: std::time::Duration,
    },
    /// A newer session of the same node replaced this one.
    #[error("a newer session of this node replaced this one")]
    Superseded,
    /// A stream's first message did not come in time.
    #[error("no {first} within {} s", .within.as_secs())]
    FirstMessageLate {
        first: &'static str,
        within: std::time::Duration,
    },
    /// The caller closed its stream before its first message.
    #[error("stream closed before the {first}")]
    ClosedBeforeFirstMessage { first: &'static str },
    /// A session's hello came again.
    #[error("hello sent twice")]
    HelloTwice,
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// `stewardctl logs` for a node served elsewhere, or too many readers.
    #[error(transparent)]
    Logs(#[from] crate::logs::LogError),
}

/// Bytes of problems shown per spec, at most: the message travels in an
/// HTTP/2 header, which peers limit to 16 KiB all told.
const MAX_SPEC_PROBLEMS_BYTES: usize = 8 * 1024;

/// `invalid cluster spec (N problems), nothing written:` and one line per
/// problem, as many as fit.
fn spec_problems(problems: &[String]) -> String {
    let mut text = format!(
        "invalid cluster spec ({} problem{}), nothing written:",
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    for (shown, p) in problems.iter().enumerate() {
        // One problem, one line, of a readable length.
        let line: String = p
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .chars()
            .take(300)
            .collect();
        if text.len() + line.len() > MAX_SPEC_PROBLEMS_BYTES {
            text.push_str(&format!("\n... and {} more", problems.len() - shown));
            break;
        }
        text.push('\n');
        text.push_str(&line);
    }
    text
}

fn join_nodes(nodes: &[NodeId]) -> String {
    nodes
        .iter()
        .map(NodeId::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        use tonic::Status;
        let msg = e.to_string();
        // Exhaustive on purpose: a new variant must decide what clients see.
        match e {
            Error::Etcd { .. } => Status::unavailable(msg),
            Error::Corrupt { .. } => Status::data_loss(msg),
            Error::UnknownNode(_)
            | Error::UnknownVip(_)
            | Error::UnknownVolume(_)
            | Error::UnknownRollout(_) => Status::not_found(msg),
            Error::SpecTooLarge { .. }
            | Error::NothingToRollOut
            | Error::RolloutChangesMore(_)
            | Error::UpgradeNeedsRollout { .. }
            | Error::RolloutInProgress(_)
            | Error::RolloutOver { .. }
            | Error::RolloutCannotResume { .. }
            | Error::RebootRefused(_)
            | Error::RevocationNeedsForce(_)
            | Error::NodeServedElsewhere { .. }
            | Error::NodeNotConnected(_)
            | Error::DrainRefused { .. }
            | Error::NotDrained(_)
            | Error::NoGlusterMounter { .. }
            | Error::VipHasNoHolder(_)
            | Error::VipAlreadyHeld { .. }
            | Error::NoJoinListener
            | Error::TokenGeneration(_)
            | Error::UnknownToken(_)
            | Error::NoPki => Status::failed_precondition(msg),
            Error::NoRolesNamed
            | Error::InvalidLogQuery(_)
            | Error::InvalidVip { .. }
            | Error::NotACandidate { .. }
            | Error::TokenTtlOutOfRange { .. }
            | Error::FirstMessageNotHello
            | Error::UnreachableAddress(_) => Status::invalid_argument(msg),
            Error::CertificateRevoked(_) => Status::permission_denied(msg),
            Error::Config(_) | Error::SecretGeneration(_) => Status::failed_precondition(msg),
            Error::CampaignWithoutLeaderKey => Status::unavailable(msg),
            Error::JoinRefused(crate::tokens::Refusal::Malformed) => Status::invalid_argument(msg),
            Error::JoinRefused(_) => Status::permission_denied(msg),
            Error::NotAnAgent(_)
            | Error::AgentNameInvalid { .. }
            | Error::WrongCertificateKind { .. }
            | Error::SpeaksForAnotherNode { .. }
            | Error::StreamSpeaksForAnotherNode { .. } => Status::permission_denied(msg),
            Error::LeaseParamsDisagree { .. } => Status::invalid_argument(msg),
            Error::RoleNotAssigned { .. } => Status::failed_precondition(msg),
            Error::InvalidRequest(_) | Error::InvalidSpec(_) => Status::invalid_argument(msg),
            Error::Unauthenticated(_) => Status::unauthenticated(msg),
            Error::Conflict { .. } => Status::aborted(msg),
            Error::LostLeadership { .. }
            | Error::WatchInterrupted(_)
            | Error::CacheBehind { .. }
            | Error::ShuttingDown => Status::unavailable(msg),
            Error::Busy { retry_after, .. } => {
                steward_proto::retry::with_retry_after(Status::unavailable(msg), retry_after)
            }
            Error::Superseded => Status::aborted(msg),
            Error::FirstMessageLate { .. } => Status::deadline_exceeded(msg),
            Error::ClosedBeforeFirstMessage { .. } => Status::cancelled(msg),
            Error::HelloTwice => Status::invalid_argument(msg),
            Error::Pki(PkiError::Csr(_)) => Status::invalid_argument(msg),
            Error::Pki(_) => Status::unauthenticated(msg),
            Error::Logs(crate::logs::LogError::NotHere(_)) => Status::failed_precondition(msg),
            Error::Logs(crate::logs::LogError::Busy) => Status::resource_exhausted(msg),
            Error::Logs(crate::logs::LogError::SessionGone(_)) => Status::unavailable(msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_problems_are_one_per_line_and_fit_in_a_header() {
        let e = Error::InvalidSpec(vec!["a: b\n  c".into(), "d".into()]);
        assert_eq!(
            e.to_string(),
            "invalid cluster spec (2 problems), nothing written:\na: b c\nd"
        );
        let many = Error::InvalidSpec(vec!["x".repeat(1000); 100]).to_string();
        assert!(many.len() <= MAX_SPEC_PROBLEMS_BYTES + 30, "{}", many.len());
        assert!(many.lines().nth(1).is_some_and(|l| l.len() == 300));
        assert!(many.ends_with("more"), "{many}");
        let status = tonic::Status::from(Error::InvalidSpec(vec!["p".into()]));
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }

    /// The named errors say what the string errors they replaced said, with
    /// the same gRPC code: clients and tests that read them see no change.
    #[test]
    fn named_errors_keep_the_messages_and_codes_clients_saw() {
        use tonic::Code;
        let n1 = || NodeId::new("n1").expect("node id");
        let cases: Vec<(Error, Code, &str)> = vec![
            (
                Error::NoRolesNamed,
                Code::InvalidArgument,
                "invalid request: name at least one role",
            ),
            (
                Error::InvalidRequest(ProtoError::LabelFilter("rack".into())),
                Code::InvalidArgument,
                "invalid request: label filter \"rack\": use key=value",
            ),
            (
                Error::DrainRefused {
                    node: n1(),
                    refusals: vec!["a".into(), "b".into()],
                },
                Code::FailedPrecondition,
                "cannot drain n1: a; b (--force drains anyway)",
            ),
            (
                Error::NotDrained(n1()),
                Code::FailedPrecondition,
                "n1 is not drained (stewardctl node drain n1)",
            ),
            (
                Error::NodeServedElsewhere {
                    node: n1(),
                    replica: "c-2".into(),
                },
                Code::FailedPrecondition,
                "node n1 is connected to replica c-2, not this one: ask c-2",
            ),
            (
                Error::NodeNotConnected(n1()),
                Code::FailedPrecondition,
                "node n1 is not connected: its journal cannot be read now",
            ),
            (
                Error::NoGlusterMounter {
                    volume: "data".into(),
                    mount_on: "k8s-worker".into(),
                },
                Code::FailedPrecondition,
                "no node mounts Gluster volume data: no node has a role of its mount_on (k8s-worker)",
            ),
            (
                Error::VipHasNoHolder("front".into()),
                Code::FailedPrecondition,
                "VIP front has no holder to move away from",
            ),
            (
                Error::TokenTtlOutOfRange { ttl_s: 5 },
                Code::InvalidArgument,
                "invalid request: ttl 5 s: must be between 60 s and 30 days",
            ),
            (
                Error::NoJoinListener,
                Code::FailedPrecondition,
                "no replica serves joins: give at least one a [pki] section with bootstrap_listen",
            ),
            (
                Error::UnknownToken("abc".into()),
                Code::FailedPrecondition,
                "no token \"abc\" (stewardctl token list shows them)",
            ),
            (
                Error::JoinRefused(crate::tokens::Refusal::Unknown),
                Code::PermissionDenied,
                "unknown or wrong token (deleted, mistyped, or expired more than a day ago); \
                 create a new one with `stewardctl token create`",
            ),
            (
                Error::NoPki,
                Code::FailedPrecondition,
                "this replica issues no certificates (no [pki] in its config); try another",
            ),
            (
                Error::WrongCertificateKind {
                    identity: "agent n1".into(),
                    may: "use the admin API",
                    only: "admin",
                },
                Code::PermissionDenied,
                "agent n1 may not use the admin API; only admin certificates may",
            ),
            (
                Error::SpeaksForAnotherNode {
                    certificate: "n2".into(),
                    claimed: "n1".into(),
                },
                Code::PermissionDenied,
                "certificate is for node \"n2\"; it may not speak for node \"n1\"",
            ),
            (
                Error::LeaseParamsDisagree {
                    agent_lease: std::time::Duration::from_millis(900),
                    agent_replicas: 3,
                    lease: std::time::Duration::from_millis(700),
                    replicas: 3,
                },
                Code::InvalidArgument,
                "invalid request: lease parameters disagree: the agent uses lease 900ms with 3 \
                 replicas, this replica lease 700ms with 3 replicas (set [vip] alike on both, the \
                 agent's lease no longer than the coordinators')",
            ),
        ];
        for (error, code, message) in cases {
            let status = tonic::Status::from(error);
            assert_eq!((status.code(), status.message()), (code, message));
        }
    }

    #[test]
    fn stream_openings_map_to_their_codes_at_the_edge() {
        let late = tonic::Status::from(Error::FirstMessageLate {
            first: "hello",
            within: std::time::Duration::from_secs(10),
        });
        assert_eq!(
            (late.code(), late.message()),
            (tonic::Code::DeadlineExceeded, "no hello within 10 s")
        );
        let closed = tonic::Status::from(Error::ClosedBeforeFirstMessage { first: "hello" });
        assert_eq!(closed.code(), tonic::Code::Cancelled);
        assert_eq!(
            tonic::Status::from(Error::HelloTwice).code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            tonic::Status::from(Error::ShuttingDown).code(),
            tonic::Code::Unavailable
        );
    }
}
