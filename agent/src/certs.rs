//! The agent's certificate: read from its files at every dial (so a renewed
//! one is used by the next connection while open streams go on), renewed
//! over `AgentService.RenewCertificate` once two thirds of its lifetime have
//! passed, and written atomically.
//!
//! Every dial checks the replica's certificate against the coordinator
//! revocations of the desired state in force ([`Credentials::dial`]): a
//! stolen, revoked coordinator key cannot pose as a replica to this agent.
//!
//! Renewal keeps the node's key (the CSR proves possession of it) and
//! replaces only the certificate, in one rename: a crash at any moment
//! leaves a matching key and certificate.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use steward_proto::domain::CoordinatorRevocation;
use steward_proto::pb;
use steward_proto::pb::agent_service_client::AgentServiceClient;
use steward_proto::pki::{CertSubject, Validity};
use steward_runtime::backoff::Backoff;
use steward_runtime::{MtlsPem, ServerCheck, TlsFiles};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, Identity};
use tracing::{info, warn};

/// TCP connect to a replica.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A whole dial to a replica, TLS handshake included.
pub const DIAL_DEADLINE: Duration = Duration::from_secs(4);
/// How long one renewal call to one replica may take.
const RENEW_DEADLINE: Duration = Duration::from_secs(10);

/// Writes `bytes` to `path` through a staged file and a rename, synced, so
/// readers see the old content or the new, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other(format!("{}: not a file path", path.display())))?;
    let staged = path.with_file_name(format!(".{}.new", name.to_string_lossy()));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&staged)?;
        // `mode` applies only to new files; a stale staged file keeps its own.
        file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&staged, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&staged);
    }
    result?;
    if let Some(dir) = path.parent().and_then(|d| std::fs::File::open(d).ok()) {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// The coordinator revocations in force, shared by every dial.
pub type Revocations = Arc<Vec<CoordinatorRevocation>>;

/// Whether a replica presenting `subject` may serve this agent: it must
/// show a coordinator certificate that no revocation in `revoked` covers.
pub fn check_replica(
    subject: &CertSubject,
    revoked: &[CoordinatorRevocation],
) -> Result<(), String> {
    if subject.kind != "coordinator" {
        return Err(format!(
            "the replica presented a {subject}, not a coordinator certificate"
        ));
    }
    match CoordinatorRevocation::covering(revoked, &subject.name, subject.issued_unix_s) {
        Some(r) => Err(format!(
            "the replica presented a revoked {subject}: coordinator certificates of {:?} \
             issued up to {} are refused",
            r.name.as_str(),
            r.revoked_unix_s
        )),
        None => Ok(()),
    }
}

/// A connection to a replica, and who its certificate names.
pub struct Dialed {
    pub channel: Channel,
    pub replica: CertSubject,
}

/// Where the agent's CA, certificate and key are (read at every dial), and
/// the coordinator revocations in force.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub files: TlsFiles,
    revoked: Arc<watch::Sender<Revocations>>,
}

impl Credentials {
    pub fn new(files: TlsFiles) -> Self {
        Self {
            files,
            revoked: Arc::new(watch::Sender::new(Arc::default())),
        }
    }

    /// The CA and our identity as they are on disk now.
    pub fn load(&self) -> Result<(Certificate, Identity), String> {
        let pem = self.load_pem()?;
        Ok((
            Certificate::from_pem(pem.ca),
            Identity::from_pem(pem.cert, pem.key),
        ))
    }

    fn load_pem(&self) -> Result<MtlsPem, String> {
        let read = |what: &str, path: &Path| {
            std::fs::read(path).map_err(|e| format!("tls.{what} {}: {e}", path.display()))
        };
        Ok(MtlsPem {
            ca: read("ca", &self.files.ca)?,
            cert: read("cert", &self.files.cert)?,
            key: read("key", &self.files.key)?,
        })
    }

    /// Puts `revoked` (from the desired state in force) in force for the
    /// next dials and tells the open streams ([`Credentials::revocations`]).
    pub fn set_coordinator_revocations(&self, revoked: &[CoordinatorRevocation]) {
        self.revoked.send_if_modified(|now| {
            if now.as_slice() == revoked {
                return false;
            }
            *now = Arc::new(revoked.to_vec());
            true
        });
    }

    /// The coordinator revocations in force; changes when new ones arrive.
    pub fn revocations(&self) -> watch::Receiver<Revocations> {
        self.revoked.subscribe()
    }

    /// Why a replica presenting `replica` may no longer serve this agent,
    /// under the revocations in force now.
    pub fn refusal(&self, replica: &CertSubject) -> Option<String> {
        check_replica(replica, &self.revoked.borrow()).err()
    }

    /// Connects to `url` over mutual TLS with the credentials on disk now.
    /// The replica must present a coordinator certificate from the CA,
    /// valid for the host, with serverAuth, that no coordinator revocation
    /// in force covers (checked again at every reconnection). The TCP
    /// connect gets [`CONNECT_TIMEOUT`], the whole dial (TLS handshake
    /// included) [`DIAL_DEADLINE`]: no caller waits longer.
    pub async fn dial(&self, url: &str) -> Result<Dialed, String> {
        let pem = self.load_pem()?;
        let revoked = self.revocations();
        let seen: Arc<Mutex<Option<CertSubject>>> = Arc::default();
        let check: ServerCheck = {
            let seen = seen.clone();
            Arc::new(move |der| {
                let subject = CertSubject::of_der(der)?;
                check_replica(&subject, &revoked.borrow())
                    .inspect_err(|_| crate::metrics::metrics().replicas_refused.inc())?;
                *seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(subject);
                Ok(())
            })
        };
        let channel = tokio::time::timeout(
            DIAL_DEADLINE,
            steward_runtime::dial_mtls_checked(url, &pem, check, CONNECT_TIMEOUT),
        )
        .await
        .map_err(|_| format!("no TLS session with {url} within {DIAL_DEADLINE:?}"))??;
        // Set by the check of the handshake that made `channel`.
        let replica = seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| format!("{url}: connected without a checked certificate"))?;
        Ok(Dialed { channel, replica })
    }

    fn validity(&self) -> Result<Validity, String> {
        let pem = std::fs::read_to_string(&self.files.cert)
            .map_err(|e| format!("tls.cert {}: {e}", self.files.cert.display()))?;
        Validity::of_pem(&pem).map_err(|e| format!("tls.cert {}: {e}", self.files.cert.display()))
    }
}

/// A PKCS#10 request for `node`, signed by `key` (PEM).
pub fn csr_pem(node: &str, key: &rcgen::KeyPair) -> Result<String, String> {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, node);
    params
        .serialize_request(key)
        .and_then(|csr| csr.pem())
        .map_err(|e| format!("cannot make a certificate request: {e}"))
}

fn unix_now() -> i64 {
    i64::try_from(crate::unix_ms() / 1000).unwrap_or(i64::MAX)
}

/// One renewal: a CSR with our key to one replica after another until one
/// signs it; the new certificate replaces the old in one rename.
async fn renew_once(
    node: &str,
    creds: &Credentials,
    coordinators: &[String],
) -> Result<Validity, String> {
    let key_pem = std::fs::read_to_string(&creds.files.key)
        .map_err(|e| format!("tls.key {}: {e}", creds.files.key.display()))?;
    let key = rcgen::KeyPair::from_pem(&key_pem)
        .map_err(|e| format!("tls.key {}: {e}", creds.files.key.display()))?;
    let csr_pem = csr_pem(node, &key)?;
    let mut errors = Vec::new();
    for url in coordinators {
        let channel = match creds.dial(url).await {
            Ok(c) => c.channel,
            Err(e) => {
                errors.push(format!("{url}: {e}"));
                continue;
            }
        };
        // Bounded, like every call the agent makes: a replica that never
        // answers must not hold renewal (and so the certificate) hostage.
        let mut client = AgentServiceClient::new(channel);
        let call = client.renew_certificate(pb::RenewCertificateRequest {
            csr_pem: csr_pem.clone(),
        });
        let issued = match tokio::time::timeout(RENEW_DEADLINE, call).await {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(status)) => {
                errors.push(format!("{url}: {}", status.message()));
                continue;
            }
            Err(_) => {
                errors.push(format!("{url}: no answer within {RENEW_DEADLINE:?}"));
                continue;
            }
        };
        let validity = Validity::of_pem(&issued.certificate_pem)
            .map_err(|e| format!("{url} sent an unreadable certificate: {e}"))?;
        write_atomic(&creds.files.cert, issued.certificate_pem.as_bytes(), 0o644)
            .map_err(|e| format!("tls.cert {}: {e}", creds.files.cert.display()))?;
        return Ok(validity);
    }
    Err(errors.join("; "))
}

/// Renews the certificate before it expires, until `shutdown`. Re-reads the
/// file each round, so a certificate an operator replaced is followed too.
pub async fn run_renewal(
    node: String,
    creds: Credentials,
    coordinators: Vec<String>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        let metrics = crate::metrics::metrics();
        let validity = creds.validity();
        if let Ok(v) = &validity {
            metrics.certificate_expiry.set(v.not_after);
        }
        let wait = match validity {
            Ok(v) if unix_now() >= v.renew_at() => {
                match renew_once(&node, &creds, &coordinators).await {
                    Ok(new) => {
                        metrics.certificate_renewals.with(&["renewed"]).inc();
                        backoff.reset();
                        info!(
                            not_after_unix = new.not_after,
                            "certificate renewed; new connections use it"
                        );
                        continue;
                    }
                    Err(error) => {
                        metrics.certificate_renewals.with(&["failed"]).inc();
                        let left = v.not_after - unix_now();
                        warn!(%error, seconds_left = left, "certificate renewal failed; retrying");
                        backoff.next_delay()
                    }
                }
            }
            Ok(v) => {
                // Sleep until renewal is due, waking at least hourly to
                // notice a certificate replaced by hand.
                let secs = (v.renew_at() - unix_now()).clamp(1, 3600);
                Duration::from_secs(u64::try_from(secs).unwrap_or(1))
            }
            Err(error) => {
                warn!(%error, "cannot read the certificate; retrying");
                backoff.next_delay()
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use steward_proto::domain::CertName;

    use super::*;

    fn subject(kind: &str, name: &str, issued_unix_s: i64) -> CertSubject {
        CertSubject {
            name: name.into(),
            kind: kind.into(),
            issued_unix_s,
        }
    }

    #[test]
    fn a_replica_must_show_a_coordinator_certificate_no_revocation_covers() {
        let revoked = [CoordinatorRevocation {
            name: CertName::new("coord-2").expect("name"),
            revoked_unix_s: 1_000,
        }];
        check_replica(&subject("coordinator", "coord-1", 10), &revoked).expect("live");
        check_replica(&subject("coordinator", "coord-2", 1_001), &revoked)
            .expect("issued after the cut-off");
        let error = check_replica(&subject("coordinator", "coord-2", 1_000), &revoked)
            .expect_err("covered");
        assert!(
            error.contains("revoked coordinator certificate \"coord-2\""),
            "{error}"
        );
        let error =
            check_replica(&subject("admin", "coord-1", 10), &[]).expect_err("not a coordinator");
        assert!(error.contains("not a coordinator certificate"), "{error}");
    }

    #[test]
    fn open_streams_learn_of_new_revocations() {
        let creds = Credentials::new(TlsFiles {
            ca: "/nonexistent/ca.crt".into(),
            cert: "/nonexistent/node.crt".into(),
            key: "/nonexistent/node.key".into(),
        });
        let mut watching = creds.revocations();
        let coord2 = subject("coordinator", "coord-2", 5);
        assert_eq!(creds.refusal(&coord2), None);
        let revoked = [CoordinatorRevocation {
            name: CertName::new("coord-2").expect("name"),
            revoked_unix_s: 5,
        }];
        creds.set_coordinator_revocations(&revoked);
        assert!(watching.has_changed().expect("open"));
        watching.mark_unchanged();
        assert!(creds.refusal(&coord2).is_some());
        // The same list again is no change.
        creds.set_coordinator_revocations(&revoked);
        assert!(!watching.has_changed().expect("open"));
    }
}
