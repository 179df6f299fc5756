//! Steward's certificate authority, shared by the coordinator (it signs
//! agent certificates and reads every caller's identity from its verified
//! certificate) and stewardctl (`stewardctl pki`: the development CA, the
//! certificates it issues, the secrets key file).
//!
//! **Architecture invariant:** no network IO and no etcd: files in, files
//! and certificates out.

mod pki;

pub use pki::*;

use ring::rand::{SecureRandom, SystemRandom};

/// 32 random bytes as hex: the content of a new secrets key file
/// (`stewardctl pki init`; the coordinator seals cluster secrets with it).
pub fn new_key_hex() -> Result<String, String> {
    let mut key = [0u8; 32];
    SystemRandom::new()
        .fill(&mut key)
        .map_err(|_| "the system's random generator failed".to_owned())?;
    Ok(key.iter().map(|b| format!("{b:02x}")).collect())
}
