//! Steward's wire protocol (`steward.v1`) and the domain types the rest of the
//! code works with.
//!
//! Generated protobuf types live in [`pb`] and stop at the edge: every inbound
//! message is converted once, with a typed [`ProtoError`] when it is invalid,
//! into the types of [`domain`]; business logic never matches on prost structs.
//!
//! **Architecture invariant:** this crate does no IO and depends on nothing
//! that does (no tokio-rustls, hyper, tower or tracing-subscriber: the
//! daemons' shared IO is `steward-runtime`). It must stay cheap to depend
//! on for the agent, the coordinator, stewardctl and the tests alike.

pub mod admin;
pub mod codec;
pub mod converge;
pub mod convert;
pub mod domain;
pub mod pki;
pub mod retry;
pub mod vip;

pub use convert::ProtoError;

/// Generated code for `proto/steward/v1/steward.proto`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("steward.v1");
}
