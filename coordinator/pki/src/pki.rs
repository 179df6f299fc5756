//! The cluster's certificate authority and the identities it issues.
//!
//! Every certificate names one identity: its subject common name is the
//! identity's name (a node id for agents) and its organizational unit is the
//! identity's [`IdentityKind`]. The coordinator authorizes every call from
//! the identity in the peer's verified certificate, never from what a message
//! claims.
//!
//! The kind is bound to the certificate's extended key usage: agent and
//! admin certificates carry clientAuth only (they cannot serve TLS: agents
//! and stewardctl, through webpki, refuse a server without serverAuth);
//! coordinator certificates carry serverAuth and clientAuth (they serve,
//! and call their peers). [`identity_from_der`] refuses a certificate whose
//! usages disagree with its kind, or that has none.

use std::fmt;
use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use steward_proto::domain::{CertName, NodeId};
use time::{Duration, OffsetDateTime};

/// Validity of the CA certificate.
pub const CA_VALIDITY_DAYS: i64 = 3650;
/// Validity of issued certificates.
pub const LEAF_VALIDITY_DAYS: i64 = 365;

/// What an identity may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdentityKind {
    /// A node agent: may speak only for its own node.
    Agent,
    /// A coordinator replica: serves agents and admins, talks to peers.
    Coordinator,
    /// An operator: may use the admin API.
    Admin,
}

impl IdentityKind {
    pub fn as_str(self) -> &'static str {
        match self {
            IdentityKind::Agent => "agent",
            IdentityKind::Coordinator => "coordinator",
            IdentityKind::Admin => "admin",
        }
    }
}

impl fmt::Display for IdentityKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for IdentityKind {
    type Err = PkiError;
    fn from_str(s: &str) -> Result<Self, PkiError> {
        match s {
            "agent" => Ok(IdentityKind::Agent),
            "coordinator" => Ok(IdentityKind::Coordinator),
            "admin" => Ok(IdentityKind::Admin),
            other => Err(PkiError::UnknownKind(other.to_owned())),
        }
    }
}

/// A verified peer identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub kind: IdentityKind,
    /// The certificate's notBefore, in seconds since the Unix epoch: when
    /// it was issued, as far as revocation is concerned.
    pub issued_unix_s: i64,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:?}", self.kind, self.name)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("unknown identity kind {0:?} (expected agent, coordinator or admin)")]
    UnknownKind(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} already exists; refusing to overwrite it")]
    Exists { path: PathBuf },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("invalid name {name:?} for an {kind} certificate: {reason}")]
    InvalidName {
        name: String,
        kind: IdentityKind,
        reason: String,
    },
    #[error("peer certificate cannot be parsed: {0}")]
    Parse(String),
    #[error("invalid certificate signing request: {0}")]
    Csr(String),
    #[error("peer certificate has no {0}")]
    MissingAttribute(&'static str),
    #[error(
        "{kind} certificate {name:?} has the wrong extended key usage ({found}); {kind} \
         certificates carry {expected}: issue it again with stewardctl pki issue"
    )]
    WrongUsage {
        name: String,
        kind: IdentityKind,
        found: String,
        expected: &'static str,
    },
}

fn read(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.to_owned(),
        source,
    })
}

fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| PkiError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                PkiError::Exists {
                    path: path.to_owned(),
                }
            } else {
                io(e)
            }
        })?;
    file.write_all(contents.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = OffsetDateTime::now_utc();
    // Tolerate modest clock skew between the issuing host and its peers.
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(days);
}

/// Writes `dir/secrets.key`: the key that seals cluster secrets in etcd
/// (`[secrets] key_file`). Refuses to overwrite one.
pub fn init_secrets_key(dir: &Path) -> Result<PathBuf, PkiError> {
    let path = dir.join("secrets.key");
    if path.exists() {
        return Err(PkiError::Exists { path });
    }
    let key = crate::new_key_hex().map_err(|e| PkiError::Io {
        path: path.clone(),
        source: std::io::Error::other(e.to_string()),
    })?;
    write_new(&path, &format!("{key}\n"), 0o600)?;
    Ok(path)
}

/// Paths of a CA in a directory: `ca.crt` and `ca.key`.
pub fn ca_paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("ca.crt"), dir.join("ca.key"))
}

/// Creates a new CA in `dir` (`ca.crt`, `ca.key`). Refuses to overwrite one.
pub fn init_ca(dir: &Path, cluster: &str) -> Result<(PathBuf, PathBuf), PkiError> {
    fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let (crt_path, key_path) = ca_paths(dir);
    for p in [&crt_path, &key_path] {
        if p.exists() {
            return Err(PkiError::Exists { path: p.clone() });
        }
    }
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("steward {cluster} CA"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut params, CA_VALIDITY_DAYS);
    let cert = params.self_signed(&key)?;
    write_new(&key_path, &key.serialize_pem(), 0o600)?;
    write_new(&crt_path, &cert.pem(), 0o644)?;
    Ok((crt_path, key_path))
}

fn validate_name(name: &str, kind: IdentityKind) -> Result<(), PkiError> {
    let invalid = |reason: String| PkiError::InvalidName {
        name: name.to_owned(),
        kind,
        reason,
    };
    match kind {
        // An agent's name is the node id it may speak for.
        IdentityKind::Agent => NodeId::new(name)
            .map(drop)
            .map_err(|e| invalid(e.reason.to_owned())),
        // The rule `stewardctl cert revoke` names them by.
        IdentityKind::Coordinator | IdentityKind::Admin => CertName::new(name)
            .map(drop)
            .map_err(|_| invalid("use 1-63 letters, digits, '-' or '.'".to_owned())),
    }
}

/// Issues `dir/NAME.crt` and `dir/NAME.key`, signed by the CA in `dir`.
///
/// Coordinator certificates are server certificates too: they carry `NAME`,
/// `localhost`, `127.0.0.1`, `::1` and every entry of `extra_sans` (host
/// names or IP addresses) as subject alternative names.
pub fn issue(
    dir: &Path,
    name: &str,
    kind: IdentityKind,
    extra_sans: &[String],
) -> Result<(PathBuf, PathBuf), PkiError> {
    issue_after(dir, name, kind, extra_sans, None)
}

/// [`issue`], valid from after `revoked_unix_s` at the earliest: the
/// cut-off of the name's last revocation (`stewardctl cert revoke`), which
/// refuses certificates issued (notBefore) up to that second. Without it a
/// certificate is backdated an hour for clock skew.
pub fn issue_after(
    dir: &Path,
    name: &str,
    kind: IdentityKind,
    extra_sans: &[String],
    revoked_unix_s: Option<i64>,
) -> Result<(PathBuf, PathBuf), PkiError> {
    validate_name(name, kind)?;
    let (ca_crt, ca_key) = ca_paths(dir);
    let ca_key = KeyPair::from_pem(&read(&ca_key)?)?;
    let issuer = Issuer::from_ca_cert_pem(&read(&ca_crt)?, ca_key)?;
    let crt_path = dir.join(format!("{name}.crt"));
    let key_path = dir.join(format!("{name}.key"));
    for p in [&crt_path, &key_path] {
        if p.exists() {
            return Err(PkiError::Exists { path: p.clone() });
        }
    }

    let key = KeyPair::generate()?;
    let mut params = leaf_params(name, kind);
    if kind == IdentityKind::Coordinator {
        params
            .extended_key_usages
            .push(ExtendedKeyUsagePurpose::ServerAuth);
        let mut sans: Vec<String> = vec![
            name.into(),
            "localhost".into(),
            "127.0.0.1".into(),
            "::1".into(),
        ];
        sans.extend(extra_sans.iter().cloned());
        sans.dedup();
        for san in sans {
            params.subject_alt_names.push(match san.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(san.try_into()?),
            });
        }
    }
    validity(&mut params, LEAF_VALIDITY_DAYS);
    if let Some(after) = revoked_unix_s {
        params.not_before = params.not_before.max(after_revocation(after));
    }
    let cert = params.signed_by(&key, &issuer)?;
    write_new(&key_path, &key.serialize_pem(), 0o600)?;
    write_new(&crt_path, &cert.pem(), 0o644)?;
    Ok((crt_path, key_path))
}

/// The first second a revocation at `revoked_unix_s` does not cover.
fn after_revocation(revoked_unix_s: i64) -> OffsetDateTime {
    OffsetDateTime::UNIX_EPOCH.saturating_add(Duration::seconds(revoked_unix_s.saturating_add(1)))
}

/// The extended key usages a certificate of `kind` carries, in words.
fn expected_usage(kind: IdentityKind) -> &'static str {
    match kind {
        IdentityKind::Agent | IdentityKind::Admin => "clientAuth only",
        IdentityKind::Coordinator => "serverAuth and clientAuth",
    }
}

/// Whether the usages `server_auth`, `client_auth` are those of `kind`.
fn usage_fits(kind: IdentityKind, server_auth: bool, client_auth: bool) -> bool {
    match kind {
        IdentityKind::Agent | IdentityKind::Admin => client_auth && !server_auth,
        IdentityKind::Coordinator => client_auth && server_auth,
    }
}

/// The subject and usages every certificate for `name` as `kind` carries.
fn leaf_params(name: &str, kind: IdentityKind) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params
        .distinguished_name
        .push(DnType::OrganizationalUnitName, kind.as_str());
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params
}

/// A certificate issued for a node: PEM, and when it stops being valid.
#[derive(Debug, Clone)]
pub struct Issued {
    pub certificate_pem: String,
    pub not_after_unix_ms: u64,
}

/// Signs agent certificates with the cluster CA (`[pki]`), for joins and
/// renewals. The name and kind come from the caller (a checked token or the
/// caller's own certificate), never from the CSR: only its public key is
/// used, and only after its signature proved the requester holds the key.
pub struct Signer {
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
    validity: std::time::Duration,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signer")
            .field("validity", &self.validity)
            .finish_non_exhaustive()
    }
}

impl Signer {
    pub fn from_files(
        ca_crt: &Path,
        ca_key: &Path,
        validity: std::time::Duration,
    ) -> Result<Self, PkiError> {
        let ca_pem = read(ca_crt)?;
        let key = KeyPair::from_pem(&read(ca_key)?)?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, key)?;
        Ok(Self {
            issuer,
            ca_pem,
            validity,
        })
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// An agent certificate for `node` with the public key of `csr_pem`,
    /// valid from after `after_unix_s` at the earliest (the node's last
    /// revocation: certificates issued up to then are refused; the caller
    /// waits until that second has passed).
    pub fn issue_agent(
        &self,
        node: &NodeId,
        csr_pem: &str,
        after_unix_s: Option<i64>,
    ) -> Result<Issued, PkiError> {
        if csr_pem.len() > 16 * 1024 {
            return Err(PkiError::Csr("longer than 16 KiB".into()));
        }
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| PkiError::Csr(e.to_string()))?;
        let mut params = leaf_params(node.as_str(), IdentityKind::Agent);
        let now = OffsetDateTime::now_utc();
        let validity = Duration::try_from(self.validity).unwrap_or(Duration::days(365));
        // Backdated a little for clock skew, by at most an hour and at most a
        // tenth of the lifetime, so renewal at two thirds stays meaningful
        // for short test lifetimes.
        params.not_before = now - (validity / 10_i32).min(Duration::hours(1));
        if let Some(after) = after_unix_s {
            params.not_before = params.not_before.max(after_revocation(after));
        }
        params.not_after = now + validity;
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        Ok(Issued {
            certificate_pem: cert.pem(),
            not_after_unix_ms: u64::try_from(params.not_after.unix_timestamp())
                .unwrap_or(0)
                .saturating_mul(1000),
        })
    }
}

/// Reads the identity from a DER certificate that TLS has already verified
/// against the cluster CA.
pub fn identity_from_der(der: &[u8]) -> Result<Identity, PkiError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::Parse(e.to_string()))?;
    let subject = cert.subject();
    let name = subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or(PkiError::MissingAttribute("common name"))?
        .to_owned();
    let kind = subject
        .iter_organizational_unit()
        .next()
        .and_then(|ou| ou.as_str().ok())
        .ok_or(PkiError::MissingAttribute(
            "organizational unit (identity kind)",
        ))?
        .parse()?;
    let usage = cert
        .extended_key_usage()
        .map_err(|e| PkiError::Parse(e.to_string()))?;
    let (server_auth, client_auth, found) = match usage {
        None => (false, false, "none".to_owned()),
        Some(usage) => {
            let u = usage.value;
            let mut names = Vec::new();
            if u.server_auth {
                names.push("serverAuth".to_owned());
            }
            if u.client_auth {
                names.push("clientAuth".to_owned());
            }
            if u.any {
                names.push("any".to_owned());
            }
            let others = usize::from(u.code_signing)
                + usize::from(u.email_protection)
                + usize::from(u.time_stamping)
                + usize::from(u.ocsp_signing)
                + u.other.len();
            if others > 0 {
                names.push(format!("{others} other"));
            }
            (u.server_auth, u.client_auth, names.join(", "))
        }
    };
    if !usage_fits(kind, server_auth, client_auth) {
        return Err(PkiError::WrongUsage {
            name,
            kind,
            found,
            expected: expected_usage(kind),
        });
    }
    Ok(Identity {
        name,
        kind,
        issued_unix_s: cert.validity().not_before.timestamp(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pem_to_der(pem: &str) -> Vec<u8> {
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64_decode(&body)
    }

    // Small decoder so the test needs no extra dependency.
    fn base64_decode(s: &str) -> Vec<u8> {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = Vec::new();
        let (mut buf, mut bits) = (0u32, 0);
        for c in s.bytes().filter(|c| *c != b'=') {
            let v = T.iter().position(|t| *t == c).unwrap() as u32;
            buf = (buf << 6) | v;
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                out.push((buf >> bits) as u8);
            }
        }
        out
    }

    #[test]
    fn issued_certificates_carry_name_and_kind() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), "test").unwrap();
        let (crt, _) = issue(dir.path(), "node-1", IdentityKind::Agent, &[]).unwrap();
        let id = identity_from_der(&pem_to_der(&fs::read_to_string(crt).unwrap())).unwrap();
        assert_eq!((id.name.as_str(), id.kind), ("node-1", IdentityKind::Agent));
        let (crt, _) = issue(dir.path(), "ops", IdentityKind::Admin, &[]).unwrap();
        let id = identity_from_der(&pem_to_der(&fs::read_to_string(crt).unwrap())).unwrap();
        assert_eq!(id.kind, IdentityKind::Admin);
    }

    /// A certificate for `name` as `kind` with exactly `usages`, signed by
    /// the CA in `dir`, as DER.
    fn with_usages(
        dir: &Path,
        name: &str,
        kind: IdentityKind,
        usages: Vec<ExtendedKeyUsagePurpose>,
    ) -> Vec<u8> {
        let (ca_crt, ca_key) = ca_paths(dir);
        let ca_key = KeyPair::from_pem(&read(&ca_key).unwrap()).unwrap();
        let issuer = Issuer::from_ca_cert_pem(&read(&ca_crt).unwrap(), ca_key).unwrap();
        let mut params = leaf_params(name, kind);
        params.extended_key_usages = usages;
        validity(&mut params, 1);
        let key = KeyPair::generate().unwrap();
        params.signed_by(&key, &issuer).unwrap().der().to_vec()
    }

    #[test]
    fn kinds_are_bound_to_extended_key_usage() {
        use ExtendedKeyUsagePurpose::{ClientAuth, CodeSigning, ServerAuth};
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), "test").unwrap();
        // What `issue` and the signer give each kind is accepted.
        for (name, kind) in [
            ("n1", IdentityKind::Agent),
            ("ops", IdentityKind::Admin),
            ("c1", IdentityKind::Coordinator),
        ] {
            let (crt, _) = issue(dir.path(), name, kind, &[]).unwrap();
            let id = identity_from_der(&pem_to_der(&fs::read_to_string(crt).unwrap()));
            assert_eq!(id.unwrap().kind, kind);
        }
        let (ca_crt, ca_key) = ca_paths(dir.path());
        let signer =
            Signer::from_files(&ca_crt, &ca_key, std::time::Duration::from_secs(3600)).unwrap();
        let key = KeyPair::generate().unwrap();
        let csr = CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let issued = signer
            .issue_agent(&NodeId::new("n2").unwrap(), &csr, None)
            .unwrap();
        identity_from_der(&pem_to_der(&issued.certificate_pem)).unwrap();

        // Anything else is refused, whatever the CA signed.
        for (kind, usages) in [
            (IdentityKind::Agent, vec![ServerAuth, ClientAuth]),
            (IdentityKind::Agent, vec![]),
            (IdentityKind::Admin, vec![ServerAuth, ClientAuth]),
            (IdentityKind::Admin, vec![ServerAuth]),
            (IdentityKind::Admin, vec![CodeSigning]),
            (IdentityKind::Coordinator, vec![ClientAuth]),
            (IdentityKind::Coordinator, vec![ServerAuth]),
            (IdentityKind::Coordinator, vec![]),
        ] {
            let der = with_usages(dir.path(), "x", kind, usages.clone());
            let error = identity_from_der(&der).unwrap_err();
            assert!(
                matches!(&error, PkiError::WrongUsage { kind: k, .. } if *k == kind),
                "{kind} with {usages:?}: {error}"
            );
        }
    }

    #[test]
    fn a_certificate_issued_after_a_revocation_starts_after_it() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), "test").unwrap();
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let (crt, _) = issue(dir.path(), "old", IdentityKind::Admin, &[]).unwrap();
        let old = identity_from_der(&pem_to_der(&fs::read_to_string(crt).unwrap())).unwrap();
        // Backdated for skew: a revocation now covers it.
        assert!(old.issued_unix_s <= now - 3600 + 5, "{old:?}");
        let (crt, _) = issue_after(dir.path(), "new", IdentityKind::Admin, &[], Some(now)).unwrap();
        let new = identity_from_der(&pem_to_der(&fs::read_to_string(crt).unwrap())).unwrap();
        assert_eq!(new.issued_unix_s, now + 1);
        // An old revocation changes nothing.
        let (crt, _) = issue_after(
            dir.path(),
            "again",
            IdentityKind::Admin,
            &[],
            Some(now - 86_400),
        )
        .unwrap();
        let again = identity_from_der(&pem_to_der(&fs::read_to_string(crt).unwrap())).unwrap();
        assert!(again.issued_unix_s < now, "{again:?}");
    }

    #[test]
    fn refuses_to_overwrite_and_bad_names() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), "test").unwrap();
        assert!(matches!(
            init_ca(dir.path(), "test"),
            Err(PkiError::Exists { .. })
        ));
        issue(dir.path(), "n1", IdentityKind::Agent, &[]).unwrap();
        assert!(matches!(
            issue(dir.path(), "n1", IdentityKind::Agent, &[]),
            Err(PkiError::Exists { .. })
        ));
        assert!(matches!(
            issue(dir.path(), "Bad_Node", IdentityKind::Agent, &[]),
            Err(PkiError::InvalidName { .. })
        ));
        assert!(matches!(
            "root".parse::<IdentityKind>(),
            Err(PkiError::UnknownKind(_))
        ));
    }

    #[test]
    fn signer_names_the_node_it_is_told_whatever_the_csr_claims() {
        let dir = tempfile::tempdir().unwrap();
        let (ca_crt, ca_key) = init_ca(dir.path(), "test").unwrap();
        let signer =
            Signer::from_files(&ca_crt, &ca_key, std::time::Duration::from_secs(3600)).unwrap();
        // A CSR asking to be an admin called "root".
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, "root");
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, "admin");
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let node = NodeId::new("web-1").unwrap();
        let issued = signer.issue_agent(&node, &csr, None).unwrap();
        let id = identity_from_der(&pem_to_der(&issued.certificate_pem)).unwrap();
        assert_eq!((id.name.as_str(), id.kind), ("web-1", IdentityKind::Agent));
        let validity = steward_proto::pki::Validity::of_pem(&issued.certificate_pem).unwrap();
        assert!((3600..=3600 + 360).contains(&(validity.not_after - validity.not_before)));
        assert_eq!(id.issued_unix_s, validity.not_before);

        // After a revocation, the certificate starts after it: not
        // backdated to before it, whatever the skew allowance.
        let revoked = validity.not_before + 300;
        let after = signer.issue_agent(&node, &csr, Some(revoked)).unwrap();
        let id = identity_from_der(&pem_to_der(&after.certificate_pem)).unwrap();
        assert_eq!(id.issued_unix_s, revoked + 1);
        // A revocation older than the backdating changes nothing.
        let old = signer
            .issue_agent(&node, &csr, Some(validity.not_before - 3600))
            .unwrap();
        let id = identity_from_der(&pem_to_der(&old.certificate_pem)).unwrap();
        assert!(id.issued_unix_s >= validity.not_before);

        // A request whose signature does not match its key is refused.
        let mut der = pem_to_der(&csr);
        let last = der.len() - 1;
        der[last] ^= 0xff;
        let tampered = format!(
            "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
            base64_encode(&der)
        );
        assert!(matches!(
            signer.issue_agent(&node, &tampered, None),
            Err(PkiError::Csr(_))
        ));
        assert!(matches!(
            signer.issue_agent(&node, "not a csr", None),
            Err(PkiError::Csr(_))
        ));
    }

    fn base64_encode(bytes: &[u8]) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(char::from(T[((n >> (18 - 6 * i)) & 63) as usize]));
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}
