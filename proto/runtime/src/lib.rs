//! What Steward's daemons share at run time: dialing a replica over mutual
//! TLS (and the agent's join dial, pinned to a CA hash), stop signals,
//! config reading and its errors, tracing set-up, jittered retry
//! [`backoff`], the agents' heartbeat [`cadence`], and the [`metrics`]
//! registry with its HTTP endpoint.
//!
//! **Architecture invariant:** `stewardctl` does not depend on this crate;
//! the wire crate (`steward-proto`) never does. Everything with sockets,
//! signals or a subscriber lives here, so the wire crate stays free of IO.

pub mod backoff;
pub mod cadence;
pub mod listener;
pub mod metrics;
mod runtime;

// `runtime` pins the join dial to a `pki::CaHash`.
use steward_proto::pki;

pub use runtime::*;
