//! Who is calling: the identity in the peer's verified client certificate.

use tonic::Request;

use crate::error::{Error, Result};
use crate::pki::{identity_from_der, Identity, IdentityKind};

/// The caller's identity. TLS has already verified the chain to the cluster CA.
pub fn peer_identity<T>(request: &Request<T>) -> Result<Identity> {
    let certs = request
        .peer_certs()
        .ok_or_else(|| Error::Unauthenticated("a client certificate is required".into()))?;
    let leaf = certs
        .first()
        .ok_or_else(|| Error::Unauthenticated("a client certificate is required".into()))?;
    Ok(identity_from_der(leaf)?)
}

/// Only admin certificates may use the admin API.
pub fn require_admin<T>(request: &Request<T>) -> Result<Identity> {
    let identity = peer_identity(request)?;
    if identity.kind != IdentityKind::Admin {
        return Err(Error::WrongCertificateKind {
            identity: identity.to_string(),
            may: "use the admin API",
            only: "admin",
        });
    }
    Ok(identity)
}
