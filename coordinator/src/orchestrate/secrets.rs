//! Cluster secrets at rest: sealed with ChaCha20-Poly1305 under a key every
//! replica reads from `[secrets] key_file` (written by `stewardctl pki init`),
//! so that etcd and its backups hold no usable join token or CA key.

use std::path::Path;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("secrets key {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("a sealed secret does not open with this key (another cluster's key, or damaged)")]
    Open,
    #[error("no randomness available")]
    Random,
}

/// 32 random bytes as hex: the content of a new key file
/// (`stewardctl pki init` writes one).
pub use steward_pki::new_key_hex;

pub fn random_bytes<const N: usize>() -> Result<[u8; N], SecretError> {
    let mut b = [0u8; N];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| SecretError::Random)?;
    Ok(b)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

pub struct SecretBox {
    key: LessSafeKey,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBox(<key>)")
    }
}

impl SecretBox {
    pub fn from_hex(key: &str) -> Option<Self> {
        let bytes = unhex(key.trim())?;
        let key = UnboundKey::new(&CHACHA20_POLY1305, &bytes).ok()?;
        Some(SecretBox {
            key: LessSafeKey::new(key),
        })
    }

    pub fn from_file(path: &Path) -> Result<Self, SecretError> {
        let err = |reason: String| SecretError::Key {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        Self::from_hex(&text).ok_or_else(|| err("expected 64 hex digits (32 bytes)".into()))
    }

    /// `hex(nonce || ciphertext || tag)`.
    pub fn seal(&self, plaintext: &[u8]) -> Result<String, SecretError> {
        let nonce_bytes = random_bytes::<NONCE_LEN>()?;
        let mut buf = plaintext.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce_bytes),
                Aad::empty(),
                &mut buf,
            )
            .map_err(|_| SecretError::Random)?;
        let mut out = nonce_bytes.to_vec();
        out.extend(buf);
        Ok(hex(&out))
    }

    pub fn open(&self, sealed: &str) -> Result<Vec<u8>, SecretError> {
        let bytes = unhex(sealed).ok_or(SecretError::Open)?;
        if bytes.len() < NONCE_LEN {
            return Err(SecretError::Open);
        }
        let (nonce, rest) = bytes.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SecretError::Open)?;
        let mut buf = rest.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::empty(), &mut buf)
            .map_err(|_| SecretError::Open)?;
        Ok(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_secrets_open_only_with_their_key() {
        let a = SecretBox::from_hex(&new_key_hex().unwrap()).unwrap();
        let b = SecretBox::from_hex(&new_key_hex().unwrap()).unwrap();
        let sealed = a.seal(b"abcdef.0123456789abcdef").unwrap();
        assert!(!sealed.contains(&hex(b"abcdef")));
        assert_eq!(a.open(&sealed).unwrap(), b"abcdef.0123456789abcdef");
        assert!(b.open(&sealed).is_err());
        let mut damaged = sealed.clone();
        damaged.replace_range(40..42, if &sealed[40..42] == "00" { "01" } else { "00" });
        assert!(a.open(&damaged).is_err());
        // Two seals of the same secret differ (fresh nonce).
        assert_ne!(a.seal(b"x").unwrap(), a.seal(b"x").unwrap());
    }

    #[test]
    fn bad_keys_are_refused() {
        assert!(SecretBox::from_hex("abc").is_none());
        assert!(SecretBox::from_hex(&"zz".repeat(32)).is_none());
        assert!(SecretBox::from_hex(&"00".repeat(16)).is_none());
    }
}
