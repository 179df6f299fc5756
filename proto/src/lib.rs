//! Steward's wire protocol (`steward.v1`) and the domain types the rest of the
//! code works with.
//!
//! Generated protobuf types live in [`pb`] and stop at the edge: every inbound
//! message is converted once, with a typed [`ProtoError`] when it is invalid,
//! into the types of [`domain`]; business logic never matches on prost structs.
//!
//! [`runtime`] holds the few helpers every binary shares (dialing over mutual
//! TLS, stop signals, config errors, the metrics endpoint); [`metrics`] the
//! registry both daemons export in the Prometheus text format.
//!
//! **Architecture invariant:** apart from [`runtime`], this crate does no IO.
//! It must stay cheap to depend on for the agent, the coordinator and the
//! tests alike.

pub mod backoff;
pub mod converge;
pub mod convert;
pub mod domain;
pub mod lease;
pub mod metrics;
pub mod pki;
pub mod runtime;
pub mod vip;

pub use convert::ProtoError;

/// Generated code for `proto/steward/v1/steward.proto`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("steward.v1");
}
