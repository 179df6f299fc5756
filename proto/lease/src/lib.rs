//! Steward's VIP lease protocol: quorum-acknowledged leases (the design's
//! §3), implemented once and run three ways — unit tests here, the
//! deterministic simulation in `tests/vip_sim.rs`, and the daemons (the
//! agent's VIP driver, the coordinator's lease hub, marker and placement).
//!
//! - the protocol: `Holder` (agent), `Acker` (replica), `place` (leader);
//! - [`messages`]: the lease stream's validated messages and their wire
//!   conversions;
//! - [`config`]: `[vip]`, the timing both sides must agree on.
//!
//! **Architecture invariant:** no IO and no clock: time comes in as a
//! `Duration` on the caller's monotonic clock, so the simulation drives the
//! very same types the daemons run.

pub mod config;
mod lease;
pub mod messages;

pub use lease::*;

// `lease` names nodes as the domain does.
use steward_proto::domain;
