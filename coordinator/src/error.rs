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
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("node {node} does not have role {role}")]
    RoleNotAssigned { node: NodeId, role: Role },
    #[error("invalid request: {0}")]
    InvalidRequest(#[from] ProtoError),
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    /// `stewardctl apply` of a spec with problems: all of them.
    #[error("{}", spec_problems(.0))]
    InvalidSpec(Vec<String>),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("concurrent updates to {key} kept conflicting; try again")]
    Conflict { key: String },
    #[error("not the leader any more (fence on epoch {epoch} failed)")]
    LostLeadership { epoch: i64 },
    #[error("etcd watch interrupted: {0}")]
    WatchInterrupted(String),
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
            Error::FailedPrecondition(_) => Status::failed_precondition(msg),
            Error::RoleNotAssigned { .. } => Status::failed_precondition(msg),
            Error::InvalidRequest(_) | Error::InvalidArgument(_) | Error::InvalidSpec(_) => {
                Status::invalid_argument(msg)
            }
            Error::Unauthenticated(_) => Status::unauthenticated(msg),
            Error::PermissionDenied(_) => Status::permission_denied(msg),
            Error::Conflict { .. } => Status::aborted(msg),
            Error::LostLeadership { .. } | Error::WatchInterrupted(_) | Error::ShuttingDown => {
                Status::unavailable(msg)
            }
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
