//! `stewardctl`, the operators' CLI: status, nodes, roles, VIPs, events,
//! cluster specs, join tokens (over the admin API, mutual TLS to any
//! replica) and the development CA (`stewardctl pki`, files only).
//!
//! **Architecture invariant:** no etcd client and no daemon runtime here:
//! stewardctl speaks only the admin API (`steward-proto`) and the CA
//! (`steward-pki`), so it stays small to build and to ship.

pub mod completion;
mod ctl;
pub mod logs;
pub mod rollout;
pub mod wait;

pub use ctl::*;
