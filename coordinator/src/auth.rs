//! Who is calling: the identity in the peer's verified client certificate,
//! and whether it may make this call (its kind, and no revocation in this
//! replica's watched cache covers it; no etcd read per call).

use steward_proto::domain::RevocableKind;
use tonic::Request;

use crate::cache::SpecSnapshot;
use crate::error::{Error, Result};
use crate::pki::{identity_from_der, Identity, IdentityKind};

/// The caller's identity. TLS has already verified the chain to the cluster CA;
/// [`identity_from_der`] checks that the kind agrees with the certificate's
/// extended key usage.
pub fn peer_identity<T>(request: &Request<T>) -> Result<Identity> {
    let certs = request
        .peer_certs()
        .ok_or_else(|| Error::Unauthenticated("a client certificate is required".into()))?;
    let leaf = certs
        .first()
        .ok_or_else(|| Error::Unauthenticated("a client certificate is required".into()))?;
    Ok(identity_from_der(leaf)?)
}

/// Only admin certificates may use the admin API, and only those no
/// revocation covers.
pub fn require_admin<T>(request: &Request<T>, specs: &SpecSnapshot) -> Result<Identity> {
    let identity = peer_identity(request)?;
    if identity.kind != IdentityKind::Admin {
        return Err(Error::WrongCertificateKind {
            identity: identity.to_string(),
            may: "use the admin API",
            only: "admin",
        });
    }
    check_not_revoked(&identity, RevocableKind::Admin, specs)?;
    Ok(identity)
}

/// Only coordinator certificates may use the peer API, and only those no
/// revocation covers.
pub fn require_coordinator<T>(request: &Request<T>, specs: &SpecSnapshot) -> Result<Identity> {
    let identity = peer_identity(request)?;
    if identity.kind != IdentityKind::Coordinator {
        return Err(Error::WrongCertificateKind {
            identity: identity.to_string(),
            may: "use the peer API",
            only: "coordinator",
        });
    }
    check_not_revoked(&identity, RevocableKind::Coordinator, specs)?;
    Ok(identity)
}

/// Refuses `identity` (of `kind`) if a revocation covers it; fails closed
/// until this replica has read the revocations from etcd.
pub fn check_not_revoked(
    identity: &Identity,
    kind: RevocableKind,
    specs: &SpecSnapshot,
) -> Result<()> {
    if !specs.synced {
        return Err(Error::Busy {
            reason: "this replica has not read the certificate revocations from etcd yet".into(),
            retry_after: std::time::Duration::from_secs(1),
        });
    }
    specs.check_cert_revoked(kind, &identity.name, identity.issued_unix_s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryBackend;
    use crate::testing::{identity, revoke_certificate, TestReplica};

    #[tokio::test]
    async fn revoked_certificates_are_refused_from_the_cache() {
        let replica = TestReplica::start(MemoryBackend::new(), "c-1").await;
        let ops = identity("ops", IdentityKind::Admin);
        let peer = identity("c-2", IdentityKind::Coordinator);
        let specs = replica.ctx.specs.borrow().clone();
        check_not_revoked(&ops, RevocableKind::Admin, &specs).expect("not revoked yet");

        let specs = revoke_certificate(&replica, RevocableKind::Admin, "ops", "root").await;
        let record = specs
            .cert_revoked
            .values()
            .next()
            .map(|r| r.value.clone())
            .expect("the revocation");
        let error = check_not_revoked(&ops, RevocableKind::Admin, &specs).unwrap_err();
        assert!(
            matches!(&error, Error::CertificateRevoked(m) if m.contains("revoked") && m.contains("by root")),
            "{error}"
        );
        // The same name of the other kind, and a certificate issued after
        // the cut-off, are not covered.
        let ops_coordinator = Identity {
            kind: IdentityKind::Coordinator,
            ..ops.clone()
        };
        check_not_revoked(&ops_coordinator, RevocableKind::Coordinator, &specs)
            .expect("another kind");
        check_not_revoked(&peer, RevocableKind::Coordinator, &specs).expect("another name");
        let reissued = Identity {
            issued_unix_s: record.revoked_unix_s + 1,
            ..ops.clone()
        };
        check_not_revoked(&reissued, RevocableKind::Admin, &specs).expect("issued after");

        // Before the cache has read etcd, nothing is let through.
        let unsynced = SpecSnapshot::default();
        let error = check_not_revoked(&reissued, RevocableKind::Admin, &unsynced).unwrap_err();
        assert!(matches!(error, Error::Busy { .. }), "{error}");
    }
}
