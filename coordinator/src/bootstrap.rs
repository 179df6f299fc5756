//! Node bootstrap: `BootstrapService.Join` (a token and a CSR in, a
//! certificate for the node out) and `AgentService.RenewCertificate`.
//!
//! The join listener has server TLS only: a joining node has no certificate
//! yet. Its token authenticates it ([`crate::tokens`]), and it authenticates
//! this replica by the CA hash in its join command (the listener presents
//! the chain up to the CA). Renewal runs on the mutual-TLS listener and
//! names the caller's own node, taken from its certificate.

use std::sync::Arc;
use std::time::Duration;

use steward_proto::admin::{
    CreatedToken, IssuedCertificate, JoinAnswer, JoinRequest, TokenInfo, TokenRequest,
};
use steward_proto::domain::{Event, EventKind, NodeId};
use steward_proto::pb;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::auth::peer_identity;
use crate::error::{Error, Result};
use crate::pki::{IdentityKind, Issued, Signer};
use crate::store::{unix_ms, NodeRevokedRecord, Store};
use crate::tokens::{self, Refusal, Token, TokenUse};

/// A refused join waits this long before it answers, which slows guessing.
const REFUSAL_DELAY: Duration = Duration::from_millis(300);

/// Concurrent uses of one token retry their compare-and-set this often.
const CONSUME_ATTEMPTS: usize = 5;

fn issued(i: Issued, ca_pem: &str) -> IssuedCertificate {
    IssuedCertificate {
        certificate_pem: i.certificate_pem,
        ca_pem: ca_pem.to_owned(),
        not_after_unix_ms: i.not_after_unix_ms,
    }
}

#[derive(Clone)]
pub struct BootstrapApi {
    store: Store,
    signer: Arc<Signer>,
    /// Coordinator replicas in the cluster (the agents' `[vip] replicas`).
    replicas: u32,
    refusal_log: Arc<RefusalLog>,
}

impl BootstrapApi {
    pub fn new(store: Store, signer: Arc<Signer>, replicas: u32) -> Self {
        Self {
            store,
            signer,
            replicas,
            refusal_log: Arc::default(),
        }
    }

    async fn join(&self, request: JoinRequest) -> Result<JoinAnswer> {
        let token: Token = request.token.parse()?;
        let node = request.node;
        for _ in 0..CONSUME_ATTEMPTS {
            let Some(record) = self.store.token(&token.id).await? else {
                return Err(Refusal::Unknown.into());
            };
            let known = self.store.node_known(&node).await?;
            tokens::check(&record.value, &token, &node, known, unix_ms())?;
            // Signed before the token is used up, so a bad CSR costs no use;
            // a certificate is handed out only once the use is recorded.
            let after = start_after(self.store.revocation(&node).await?.as_ref()).await;
            let certificate = self.signer.issue_agent(&node, &request.csr_pem, after)?;
            let mut used = record.value.clone();
            used.used_by.push(TokenUse {
                node: node.clone(),
                at_unix_ms: unix_ms(),
            });
            let event = Event {
                revision: 0,
                at_unix_ms: unix_ms(),
                kind: EventKind::NodeJoined,
                node: Some(node.clone()),
                replica: self.store.replica().to_owned(),
                message: format!("{node} joined with token {}", token.id),
            };
            if self
                .store
                .consume_token(&used, record.mod_revision, &node, !known, &event)
                .await?
            {
                let members = self.store.members().await?;
                info!(node = %node, token = %token.id, "node joined");
                return Ok(JoinAnswer {
                    certificate: issued(certificate, self.signer.ca_pem()),
                    coordinators: members.into_iter().map(|m| m.address).collect(),
                    replicas: self.replicas,
                });
            }
        }
        Err(Error::Conflict {
            key: self.store.keys().token(&token.id),
        })
    }
}

/// How often one source's refused joins are logged at most.
const REFUSAL_LOG_WINDOW: Duration = Duration::from_secs(60);
/// Sources remembered at once; beyond it the stalest is forgotten.
const REFUSAL_LOG_SOURCES: usize = 1024;

/// Which refused joins to log: the first from each source per
/// [`REFUSAL_LOG_WINDOW`], saying how many were refused quietly since.
#[derive(Debug, Default)]
pub struct RefusalLog {
    /// Source → (when its last line was logged, refusals since).
    sources: std::sync::Mutex<
        std::collections::HashMap<Option<std::net::IpAddr>, (std::time::Instant, u64)>,
    >,
}

impl RefusalLog {
    /// `Some(n)`: log this refusal, `n` earlier ones from the source went
    /// unlogged; `None`: stay quiet.
    pub fn admit(&self, source: Option<std::net::IpAddr>, now: std::time::Instant) -> Option<u64> {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((logged_at, quiet)) = sources.get_mut(&source) {
            if now.duration_since(*logged_at) < REFUSAL_LOG_WINDOW {
                *quiet += 1;
                return None;
            }
            let n = *quiet;
            *logged_at = now;
            *quiet = 0;
            return Some(n);
        }
        if sources.len() >= REFUSAL_LOG_SOURCES {
            let stalest = sources
                .iter()
                .min_by_key(|(_, (at, _))| *at)
                .map(|(k, _)| *k);
            if let Some(k) = stalest {
                sources.remove(&k);
            }
        }
        sources.insert(source, (now, 0));
        Some(0)
    }
}

#[tonic::async_trait]
impl pb::bootstrap_service_server::BootstrapService for BootstrapApi {
    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> std::result::Result<Response<pb::JoinResponse>, Status> {
        let peer = request.remote_addr();
        let request = request.into_inner();
        let node = request.node_id.clone();
        let metrics = crate::metrics::metrics();
        let joined = match JoinRequest::try_from(request) {
            Ok(request) => BootstrapApi::join(self, request).await,
            Err(invalid) => Err(Error::from(invalid)),
        };
        match joined {
            Ok(answer) => {
                metrics.joins.with(&["joined"]).inc();
                metrics.certificates_issued.with(&["join"]).inc();
                Ok(Response::new(answer.into()))
            }
            Err(error) => {
                metrics.joins.with(&["refused"]).inc();
                // Logged once per source per window: a flood of bad joins
                // must not flood the journal (the metric counts them all).
                let source = peer.map(|p| p.ip());
                if let Some(quieted) = self.refusal_log.admit(source, std::time::Instant::now()) {
                    warn!(
                        ?peer,
                        node = %node.escape_debug(),
                        %error,
                        refused_since_last_line = quieted,
                        "join refused"
                    );
                }
                tokio::time::sleep(REFUSAL_DELAY).await;
                Err(error.into())
            }
        }
    }
}

/// The second a node's new certificate must start after (its last
/// revocation), once that second has passed: a certificate is never
/// issued that would start in the future.
async fn start_after(revoked: Option<&NodeRevokedRecord>) -> Option<i64> {
    let revoked = revoked?;
    let next_ms = u64::try_from(revoked.revoked_unix_s.saturating_add(1))
        .unwrap_or(0)
        .saturating_mul(1000);
    let wait = next_ms.saturating_sub(unix_ms()).min(1000);
    tokio::time::sleep(Duration::from_millis(wait)).await;
    Some(revoked.revoked_unix_s)
}

/// `AgentService.RenewCertificate`: a new certificate for the caller's own
/// node, unless the caller's certificate is revoked. `None`: this replica
/// has no `[pki]`. Answers on the wire already: its caller, the agent
/// service, is an edge itself.
pub async fn renew(
    signer: Option<&Signer>,
    store: &Store,
    request: &Request<pb::RenewCertificateRequest>,
) -> Result<pb::IssuedCertificate> {
    let identity = peer_identity(request)?;
    if identity.kind != IdentityKind::Agent {
        return Err(Error::NotAnAgent(identity.to_string()));
    }
    let node = NodeId::new(&identity.name).map_err(|e| Error::AgentNameInvalid {
        identity: identity.to_string(),
        reason: e.reason,
    })?;
    let signer = signer.ok_or(Error::NoPki)?;
    let revoked = store.revocation(&node).await?;
    if let Some(r) = &revoked {
        r.check(&node, identity.issued_unix_s)?;
    }
    let after = start_after(revoked.as_ref()).await;
    let certificate = signer.issue_agent(&node, &request.get_ref().csr_pem, after)?;
    info!(node = %node, "certificate renewed");
    crate::metrics::metrics()
        .certificates_issued
        .with(&["renewal"])
        .inc();
    Ok(issued(certificate, signer.ca_pem()).into())
}

fn token_info(r: tokens::TokenRecord) -> TokenInfo {
    TokenInfo {
        id: r.id,
        created_unix_ms: r.created_unix_ms,
        expires_unix_ms: r.expires_unix_ms,
        uses: r.uses,
        used_by: r.used_by.into_iter().map(|u| u.node).collect(),
        node: r.node,
        description: r.description,
        created_by: r.created_by,
    }
}

/// `AdminService.CreateToken` for the admin `created_by`.
pub async fn create_token(
    store: &Store,
    created_by: &str,
    request: TokenRequest,
    ca_hash: &str,
) -> Result<CreatedToken> {
    if !(tokens::MIN_TTL_S..=tokens::MAX_TTL_S).contains(&request.ttl_s) {
        return Err(Error::TokenTtlOutOfRange {
            ttl_s: request.ttl_s,
        });
    }
    let members = store.members().await?;
    let join_urls: Vec<String> = members.into_iter().filter_map(|m| m.bootstrap).collect();
    if join_urls.is_empty() {
        return Err(Error::NoJoinListener);
    }
    let node = request.node;
    let now = unix_ms();
    for _ in 0..CONSUME_ATTEMPTS {
        let token = Token::generate().map_err(Error::TokenGeneration)?;
        let record = tokens::TokenRecord {
            id: token.id.clone(),
            secret_sha256: token.secret_hash(),
            created_unix_ms: now,
            expires_unix_ms: now + request.ttl_s * 1000,
            uses: request.uses,
            used_by: Vec::new(),
            node: node.clone(),
            description: request.description.clone(),
            created_by: created_by.to_owned(),
        };
        if store.create_token(&record).await? {
            info!(token = %token.id, by = created_by, "join token created");
            return Ok(CreatedToken {
                token: token.to_string(),
                info: token_info(record),
                ca_hash: ca_hash.to_owned(),
                join_urls,
            });
        }
    }
    Err(Error::Conflict {
        key: store.keys().tokens(),
    })
}

/// Every join token, oldest first.
pub async fn list_tokens(store: &Store) -> Result<Vec<TokenInfo>> {
    let mut tokens = store.tokens().await?;
    tokens.sort_by_key(|t| t.created_unix_ms);
    Ok(tokens.into_iter().map(token_info).collect())
}

pub async fn delete_token(store: &Store, id: &str) -> Result<()> {
    if !store.delete_token(id).await? {
        return Err(Error::UnknownToken(id.to_owned()));
    }
    info!(token = id, "join token deleted");
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rcgen::{CertificateParams, KeyPair};

    use super::*;
    use crate::store::MemoryBackend;
    use crate::testing::{node, put_roles, TestReplica};
    use steward_proto::domain::Role;

    struct Fixture {
        replica: TestReplica,
        api: BootstrapApi,
        _ca: tempfile::TempDir,
    }

    async fn fixture() -> Fixture {
        let replica = TestReplica::start(MemoryBackend::new(), "c-1").await;
        let ca = tempfile::tempdir().unwrap();
        let (crt, key) = crate::pki::init_ca(ca.path(), "test").unwrap();
        let signer = Signer::from_files(&crt, &key, Duration::from_secs(3600)).unwrap();
        let api = BootstrapApi::new(replica.store().clone(), Arc::new(signer), 3);
        Fixture {
            replica,
            api,
            _ca: ca,
        }
    }

    fn csr() -> String {
        let key = KeyPair::generate().unwrap();
        CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap()
    }

    async fn token(f: &Fixture, uses: u32, bound_to: &str) -> String {
        let request = TokenRequest {
            ttl_s: 600,
            uses,
            node: (!bound_to.is_empty()).then(|| node(bound_to)),
            description: String::new(),
        };
        let created = create_token(f.replica.store(), "ops", request, "sha256:test")
            .await
            .expect("token");
        assert_eq!(created.join_urls, ["https://c-1.invalid:7401"]);
        created.token
    }

    fn join(token: &str, id: &str) -> JoinRequest {
        JoinRequest {
            token: token.into(),
            node: node(id),
            csr_pem: csr(),
        }
    }

    #[tokio::test]
    async fn a_single_use_token_admits_exactly_one_node_and_records_it() {
        let f = fixture().await;
        let token = token(&f, 1, "").await;
        let joined = f.api.join(join(&token, "n1")).await.expect("joined");
        assert!(joined
            .certificate
            .certificate_pem
            .contains("BEGIN CERTIFICATE"));
        assert_eq!(joined.coordinators, ["https://c-1.invalid:7400"]);
        assert_eq!(joined.replicas, 3);
        let store = f.replica.store();
        let (events, _) = store.recent_events(10).await.unwrap();
        assert_eq!(events.last().map(|e| e.kind), Some(EventKind::NodeJoined));
        // n1 is known now (a token use), so it can be revoked.
        assert!(store
            .revoke_node(&node("n1"), "ops")
            .await
            .unwrap()
            .is_some());

        let error = f.api.join(join(&token, "n2")).await.expect_err("used up");
        assert!(
            matches!(error, Error::JoinRefused(Refusal::UsedUp { .. })),
            "{error}"
        );
        assert!(error.to_string().contains("already used"), "{error}");
        let listed = list_tokens(store).await.unwrap();
        assert_eq!(listed[0].used_by, [node("n1")]);
    }

    #[tokio::test]
    async fn tokens_are_refused_for_the_wrong_node_unknown_ids_and_garbage() {
        let f = fixture().await;
        let bound = token(&f, 0, "n1").await;
        let error = f.api.join(join(&bound, "n2")).await.expect_err("bound");
        assert!(
            matches!(error, Error::JoinRefused(Refusal::WrongNode { .. })),
            "{error}"
        );
        f.api
            .join(join(&bound, "n1"))
            .await
            .expect("the bound node joins");

        // An unbound token cannot claim a node the cluster knows (one that
        // connected, or has a spec).
        put_roles(f.replica.store(), "n1", &[Role::Lb]).await;
        let unbound = token(&f, 0, "").await;
        let error = f.api.join(join(&unbound, "n1")).await.expect_err("known");
        assert!(
            matches!(error, Error::JoinRefused(Refusal::NodeExists { .. })),
            "{error}"
        );

        let error = f.api.join(join("nonsense", "n3")).await.expect_err("bad");
        assert!(
            matches!(error, Error::JoinRefused(Refusal::Malformed)),
            "{error}"
        );
        assert_eq!(
            tonic::Status::from(error).code(),
            tonic::Code::InvalidArgument
        );
        delete_token(f.replica.store(), unbound.split('.').next().unwrap())
            .await
            .expect("deleted");
        let error = f.api.join(join(&unbound, "n3")).await.expect_err("gone");
        assert!(
            matches!(error, Error::JoinRefused(Refusal::Unknown)),
            "{error}"
        );
        assert_eq!(
            tonic::Status::from(error).code(),
            tonic::Code::PermissionDenied
        );
    }

    #[tokio::test]
    async fn token_terms_are_checked_and_unknown_tokens_named() {
        let f = fixture().await;
        let store = f.replica.store();
        for ttl_s in [tokens::MIN_TTL_S - 1, tokens::MAX_TTL_S + 1] {
            let request = TokenRequest {
                ttl_s,
                uses: 1,
                node: None,
                description: String::new(),
            };
            let error = create_token(store, "ops", request, "sha256:test")
                .await
                .expect_err("ttl out of range");
            assert!(
                matches!(error, Error::TokenTtlOutOfRange { ttl_s: t } if t == ttl_s),
                "{error}"
            );
        }
        assert!(list_tokens(store).await.expect("tokens").is_empty());
        let error = delete_token(store, "nosuch").await.expect_err("unknown");
        assert!(
            matches!(error, Error::UnknownToken(ref id) if id == "nosuch"),
            "{error}"
        );
        let created = create_token(
            store,
            "ops",
            TokenRequest {
                ttl_s: 600,
                uses: 2,
                node: Some(node("n1")),
                description: "rack 4".into(),
            },
            "sha256:test",
        )
        .await
        .expect("created");
        assert_eq!(created.ca_hash, "sha256:test");
        assert_eq!(
            (
                created.info.uses,
                created.info.node,
                created.info.created_by.as_str()
            ),
            (2, Some(node("n1")), "ops")
        );
        assert!(created.token.starts_with(&format!("{}.", created.info.id)));
    }

    /// Issue 14, item 9: refused joins are logged once per source per
    /// window, with how many were refused quietly in between.
    #[test]
    fn refused_joins_are_logged_once_per_source_per_window() {
        let log = RefusalLog::default();
        let t0 = std::time::Instant::now();
        let a = Some("198.18.0.7".parse().unwrap());
        let b = Some("198.18.0.8".parse().unwrap());
        assert_eq!(log.admit(a, t0), Some(0));
        for i in 1..=400u64 {
            assert_eq!(log.admit(a, t0 + Duration::from_millis(i * 20)), None);
        }
        // Another source is logged at once.
        assert_eq!(log.admit(b, t0 + Duration::from_secs(1)), Some(0));
        assert_eq!(
            log.admit(a, t0 + REFUSAL_LOG_WINDOW + Duration::from_secs(1)),
            Some(400)
        );
        // Memory is bounded: many sources, no more than the limit kept.
        for i in 0..(REFUSAL_LOG_SOURCES as u32 + 10) {
            log.admit(Some(std::net::IpAddr::from(i.to_be_bytes())), t0);
        }
        assert!(log.sources.lock().unwrap().len() <= REFUSAL_LOG_SOURCES);
    }

    /// Issue 14, item 7: two unbound tokens joining the same new id at the
    /// same time both got certificates. Both joins judged the id unknown;
    /// the claim in the token's transaction lets exactly one through.
    #[tokio::test]
    async fn two_tokens_cannot_both_admit_one_new_node_id() {
        let f = fixture().await;
        let store = f.replica.store();
        let (a, b) = (token(&f, 1, "").await, token(&f, 1, "").await);
        let id = |t: &str| t.split('.').next().unwrap().to_owned();
        let (ra, rb) = (
            store.token(&id(&a)).await.unwrap().unwrap(),
            store.token(&id(&b)).await.unwrap().unwrap(),
        );
        assert!(!store.node_known(&node("n9")).await.unwrap());
        let event = store.event(EventKind::NodeJoined, Some(node("n9")), "test".into());
        let first = store
            .consume_token(&ra.value, ra.mod_revision, &node("n9"), true, &event)
            .await
            .unwrap();
        let second = store
            .consume_token(&rb.value, rb.mod_revision, &node("n9"), true, &event)
            .await
            .unwrap();
        assert_eq!((first, second), (true, false));
        // Retried, the second join sees a known id and is refused.
        assert!(store.node_known(&node("n9")).await.unwrap());
        let error = f.api.join(join(&b, "n9")).await.expect_err("claimed");
        assert!(
            matches!(error, Error::JoinRefused(Refusal::NodeExists { .. })),
            "{error}"
        );
        // A joined id stays claimed for unbound tokens, also one after the
        // other, before the node ever connects.
        let c = token(&f, 1, "").await;
        f.api.join(join(&c, "n10")).await.expect("joined");
        let d = token(&f, 1, "").await;
        assert!(f.api.join(join(&d, "n10")).await.is_err());
    }
}
