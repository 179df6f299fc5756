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
        source: etcd_client::Error,
    },
    #[error("corrupt value at etcd key {key}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("unknown node {0}: no agent with this id has ever connected")]
    UnknownNode(NodeId),
    #[error("unknown VIP {0:?} (stewardctl vip list shows the VIPs)")]
    UnknownVip(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("node {node} does not have role {role}")]
    RoleNotAssigned { node: NodeId, role: Role },
    #[error("invalid request: {0}")]
    InvalidRequest(#[from] ProtoError),
    #[error("invalid request: {0}")]
    InvalidArgument(String),
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
    #[error("shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Pki(#[from] PkiError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn etcd(op: &'static str) -> impl FnOnce(etcd_client::Error) -> Error {
        move |source| Error::Etcd { op, source }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        use tonic::Status;
        let msg = e.to_string();
        // Exhaustive on purpose: a new variant must decide what clients see.
        match e {
            Error::Etcd { .. } => Status::unavailable(msg),
            Error::Corrupt { .. } => Status::data_loss(msg),
            Error::UnknownNode(_) | Error::UnknownVip(_) => Status::not_found(msg),
            Error::FailedPrecondition(_) => Status::failed_precondition(msg),
            Error::RoleNotAssigned { .. } => Status::failed_precondition(msg),
            Error::InvalidRequest(_) | Error::InvalidArgument(_) => Status::invalid_argument(msg),
            Error::Unauthenticated(_) => Status::unauthenticated(msg),
            Error::PermissionDenied(_) => Status::permission_denied(msg),
            Error::Conflict { .. } => Status::aborted(msg),
            Error::LostLeadership { .. } | Error::WatchInterrupted(_) | Error::ShuttingDown => {
                Status::unavailable(msg)
            }
            Error::Pki(_) => Status::unauthenticated(msg),
        }
    }
}
