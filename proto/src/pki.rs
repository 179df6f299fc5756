//! Certificate facts both sides need, without IO: the CA hash a joining node
//! pins (`sha256:<hex>` of the CA's SubjectPublicKeyInfo, the form kubeadm's
//! `--discovery-token-ca-cert-hash` uses), a certificate's validity, from
//! which an agent decides when to renew, and its subject, which an agent
//! checks against coordinator revocations.

use std::fmt;
use std::str::FromStr;

use ring::digest::{digest, SHA256};

const PREFIX: &str = "sha256:";

/// The SHA-256 of a CA certificate's SubjectPublicKeyInfo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaHash(pub [u8; 32]);

impl CaHash {
    /// The hash of a DER certificate's public key.
    pub fn of_der(der: &[u8]) -> Result<Self, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("cannot parse certificate: {e}"))?;
        let spki = cert.tbs_certificate.subject_pki.raw;
        let mut hash = [0; 32];
        hash.copy_from_slice(digest(&SHA256, spki).as_ref());
        Ok(Self(hash))
    }

    /// The hash of the first certificate in a PEM text.
    pub fn of_pem(pem: &str) -> Result<Self, String> {
        Self::of_der(&first_certificate(pem)?)
    }
}

impl fmt::Display for CaHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(PREFIX)?;
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl FromStr for CaHash {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let hex = s.strip_prefix(PREFIX).ok_or_else(|| {
            format!(
                "CA hash {s:?} must start with {PREFIX:?} (as `stewardctl token create` prints it)"
            )
        })?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "CA hash {s:?}: expected {PREFIX} and 64 hex digits"
            ));
        }
        let mut hash = [0; 32];
        for (i, byte) in hash.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                .map_err(|e| format!("CA hash {s:?}: {e}"))?;
        }
        Ok(Self(hash))
    }
}

/// Every certificate in a PEM text, as DER.
pub fn pem_certificates(pem: &str) -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    for block in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()) {
        let block = block.map_err(|e| format!("invalid PEM: {e}"))?;
        if block.label == "CERTIFICATE" {
            out.push(block.contents);
        }
    }
    Ok(out)
}

fn first_certificate(pem: &str) -> Result<Vec<u8>, String> {
    pem_certificates(pem)?
        .into_iter()
        .next()
        .ok_or_else(|| "no certificate in PEM text".to_owned())
}

/// When a certificate is valid, in seconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: i64,
    pub not_after: i64,
}

impl Validity {
    pub fn of_der(der: &[u8]) -> Result<Self, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("cannot parse certificate: {e}"))?;
        let v = cert.validity();
        Ok(Self {
            not_before: v.not_before.timestamp(),
            not_after: v.not_after.timestamp(),
        })
    }

    /// The validity of the first certificate in a PEM text.
    pub fn of_pem(pem: &str) -> Result<Self, String> {
        Self::of_der(&first_certificate(pem)?)
    }

    /// When to renew: once two thirds of the lifetime have passed, so a
    /// renewal has a third of it (months, by default) to succeed.
    pub fn renew_at(&self) -> i64 {
        self.not_after - (self.not_after - self.not_before).max(0) / 3
    }
}

/// Who a certificate names: its common name, its kind (the organizational
/// unit: `agent`, `coordinator` or `admin`) and its issue time (notBefore,
/// in seconds since the Unix epoch), as revocations see it. Read from a
/// certificate TLS has already verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSubject {
    pub name: String,
    pub kind: String,
    pub issued_unix_s: i64,
}

impl CertSubject {
    pub fn of_der(der: &[u8]) -> Result<Self, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("cannot parse certificate: {e}"))?;
        let subject = cert.subject();
        let name = subject
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .ok_or("the certificate has no common name")?
            .to_owned();
        let kind = subject
            .iter_organizational_unit()
            .next()
            .and_then(|ou| ou.as_str().ok())
            .ok_or("the certificate has no organizational unit (identity kind)")?
            .to_owned();
        Ok(Self {
            name,
            kind,
            issued_unix_s: cert.validity().not_before.timestamp(),
        })
    }
}

impl fmt::Display for CertSubject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} certificate {:?} issued at {}",
            self.kind, self.name, self.issued_unix_s
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_hash_round_trips_and_rejects_bad_input() {
        let text = format!("sha256:{}", "ab".repeat(32));
        let hash: CaHash = text.parse().unwrap();
        assert_eq!(hash.0, [0xab; 32]);
        assert_eq!(hash.to_string(), text);
        for bad in [
            "ab".repeat(32),
            format!("sha1:{}", "ab".repeat(32)),
            "sha256:abc".to_owned(),
            format!("sha256:{}", "zz".repeat(32)),
        ] {
            assert!(bad.parse::<CaHash>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn renewal_is_at_two_thirds_of_the_lifetime() {
        let v = Validity {
            not_before: 1000,
            not_after: 1300,
        };
        assert_eq!(v.renew_at(), 1200);
    }
}
