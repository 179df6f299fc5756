//! `steward-coordinator`: the replicated service that keeps the cluster's
//! desired and observed state in etcd, serves agent sessions and the admin
//! API, and (on the elected leader) does the cluster-wide work. Also the
//! library behind `stewardctl`.
//!
//! **Architecture invariants:**
//! - etcd is the only durable state; a replica can be killed at any moment
//!   and restarted (or replaced) with nothing lost.
//! - Heartbeats never become etcd writes: node status is written only when
//!   what an operator sees changes.
//! - Every leader write is a txn fenced on the leader epoch ([`replica::Fence`]).
//! - Callers are authorized from their verified certificate ([`auth`]), never
//!   from what a message claims.

pub mod admin_service;
pub mod agent_service;
pub mod auth;
pub mod bootstrap;
pub mod cache;
pub mod cluster_spec;
pub mod config;
pub mod desired;
pub mod error;
pub mod fanout;
pub mod leader;
pub mod logs;
pub mod maintenance;
pub mod metrics;
pub mod orchestrate;
pub mod peers;
/// The cluster's CA and the identities in certificates (`steward-pki`).
pub use steward_pki as pki;
pub mod replica;
pub mod rollout;
pub mod sessions;
pub mod store;
pub mod tokens;
pub mod vip;

#[cfg(test)]
mod testing;

use std::sync::Arc;
use std::time::Duration;

use steward_proto::pb;
use steward_runtime::listener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tracing::{info, warn, Instrument};

use crate::agent_service::SessionContext;
use crate::cache::SpecSnapshot;
use crate::config::CoordinatorConfig;
use crate::error::Error;
use crate::replica::{LeaderSettings, Leadership};
use crate::store::{Keys, MemberRecord, Store};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// How long shutdown waits for sessions and streams to drain.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest a join request may take.
pub const JOIN_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a connection to the join listener stays open.
pub const JOIN_CONNECTION_AGE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{what} {path}: {source}")]
    ReadFile {
        what: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC server on {addr}: {source}")]
    Serve {
        addr: std::net::SocketAddr,
        source: tonic::transport::Error,
    },
    #[error("metrics endpoint on {addr}: {source}")]
    Metrics {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Coordinator(#[from] Error),
}

fn read(what: &'static str, path: &std::path::Path) -> Result<Vec<u8>, RunError> {
    std::fs::read(path).map_err(|source| RunError::ReadFile {
        what,
        path: path.to_owned(),
        source,
    })
}

/// Runs a replica until `shutdown` is cancelled, then drains and resigns.
pub async fn run(config: CoordinatorConfig, shutdown: CancellationToken) -> Result<(), RunError> {
    let ca_pem = read("tls.ca", &config.tls.ca)?;
    let ca_hash = steward_proto::pki::CaHash::of_pem(&String::from_utf8_lossy(&ca_pem))
        .map_err(|e| Error::Config(format!("tls.ca: {e}")))?;
    let cert_pem = read("tls.cert", &config.tls.cert)?;
    let key_pem = read("tls.key", &config.tls.key)?;
    // The join listener presents the chain up to the CA: a joining node
    // knows only the CA's hash. No client certificate there.
    let bootstrap_tls = listener::server_tls_config(
        &[cert_pem.clone(), b"\n".to_vec(), ca_pem.clone()].concat(),
        &key_pem,
        None,
    )
    .map_err(RunError::Tls)?;
    // The main listener refuses every connection without a client
    // certificate from the cluster CA, in the handshake.
    let tls =
        listener::server_tls_config(&cert_pem, &key_pem, Some(&ca_pem)).map_err(RunError::Tls)?;
    // Our own certificate must be a coordinator's, with the usages that
    // agrees with (serverAuth and clientAuth): a wrong one fails the start.
    let own = steward_proto::pki::pem_certificates(&String::from_utf8_lossy(&cert_pem))
        .map_err(RunError::Tls)?
        .first()
        .map(|der| pki::identity_from_der(der))
        .transpose()
        .map_err(|e| RunError::Tls(format!("tls.cert: {e}")))?
        .ok_or_else(|| RunError::Tls("tls.cert: no certificate in the file".into()))?;
    if own.kind != pki::IdentityKind::Coordinator {
        return Err(RunError::Tls(format!(
            "tls.cert: {own} is not a coordinator certificate"
        )));
    }
    let peer_tls = steward_runtime::MtlsPem {
        ca: ca_pem,
        cert: cert_pem,
        key: key_pem,
    };
    let signer = match &config.pki {
        Some(pki) => Some(Arc::new(
            pki::Signer::from_files(
                &config.tls.ca,
                &pki.ca_key,
                Duration::from_secs(pki.agent_cert_validity_s),
            )
            .map_err(Error::from)?,
        )),
        None => None,
    };

    // Bound first: a bad address fails the start, not a connection.
    let bind = |addr| async move {
        listener::bind(addr).map_err(|source| RunError::Bind { addr, source })
    };
    let grpc_listener = bind(config.listen).await?;
    let bootstrap_listen = config.pki.as_ref().and_then(|p| p.bootstrap_listen);
    let bootstrap_listener = match bootstrap_listen {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(
            steward_runtime::bind_metrics(addr)
                .await
                .map_err(|source| RunError::Metrics { addr, source })?,
        ),
        None => None,
    };

    let keys = Keys::new(&config.cluster);
    let store = Store::connect(&config.etcd, keys.clone(), config.id.clone()).await?;

    // Background tasks stop on `tasks`, cancelled only after the server has
    // drained, so sessions can still record their disconnects.
    let tasks = CancellationToken::new();
    let (specs_tx, specs_rx) = watch::channel(Arc::new(SpecSnapshot::default()));
    let (vips_tx, vips_rx) = watch::channel(Arc::new(vip::VipSnapshot::default()));
    let (orch_tx, orch_rx) = watch::channel(Arc::new(
        orchestrate::state::OrchestrationSnapshot::default(),
    ));
    let (cut_tx, cut_rx) = watch::channel(Arc::new(cache::Cut::default()));
    let (seen_tx, seen_rx) = watch::channel(0);
    let peers = peers::Peers::new(peer_tls, specs_rx.clone());
    let senders = cache::CutSenders {
        cut: cut_tx,
        specs: specs_tx,
        vips: vips_tx,
        orchestration: orch_tx,
    };
    let cache = tokio::spawn(
        cache::run_caches(store.clone(), senders, seen_tx, tasks.clone())
            .instrument(tracing::info_span!("caches")),
    );
    // Validated with the config; a key that stopped opening is an error here.
    let sealer = match &config.secrets {
        Some(s) => Some(Arc::new(
            orchestrate::secrets::SecretBox::from_file(&s.key_file)
                .map_err(|e| Error::Config(format!("secrets.key_file: {e}")))?,
        )),
        None => {
            warn!("no [secrets] key_file: this replica hands out no Kubernetes bootstrap steps");
            None
        }
    };
    let lease_hub = vip::lease_api::LeaseHub::new(config.id.clone(), config.lease_params());
    let (lead_tx, lead_rx) = watch::channel(Leadership::Follower);
    let member = MemberRecord {
        id: config.id.clone(),
        address: config.advertise.clone(),
        version: VERSION.to_owned(),
        started_unix_ms: store::unix_ms(),
        bootstrap: config.bootstrap_advertise(),
    };
    let membership = tokio::spawn(
        replica::run_membership(
            store.clone(),
            member,
            LeaderSettings {
                lease_ttl: config.member_lease_ttl(),
                events_retained: leader::EventsRetained {
                    audit: config.timing.events_retained,
                    sessions: config.timing.session_events_retained,
                },
            },
            lead_tx,
            tasks.clone(),
        )
        .instrument(tracing::info_span!("membership", replica.id = %config.id)),
    );

    let ctx = SessionContext {
        store,
        sessions: sessions::Sessions::default(),
        specs: specs_rx.clone(),
        specs_seen: seen_rx,
        cut: cut_rx,
        vips: vips_rx.clone(),
        orchestration: orch_rx.clone(),
        sealer: sealer.clone(),
        lease: lease_hub.clone(),
        unreachable_after: config.agent_unreachable_after(),
        shutdown: shutdown.clone(),
        cluster: config.cluster.clone(),
        logs: Arc::default(),
        views: Arc::default(),
        admission: Arc::new(agent_service::Admission::new(&config.sessions)),
        status_writes: Arc::new(tokio::sync::Semaphore::new(
            config.sessions.max_concurrent_status_writes,
        )),
        fanout: Arc::default(),
        limits: config.sessions.clone(),
    };
    let sweep = tokio::spawn(
        agent_service::release_stale_sessions(ctx.clone())
            .instrument(tracing::info_span!("release_stale_sessions")),
    );
    let takeovers = tokio::spawn(
        agent_service::follow_takeovers(ctx.clone())
            .instrument(tracing::info_span!("follow_takeovers")),
    );
    let fanout = tokio::spawn(fanout::run(ctx.clone()).instrument(tracing::info_span!("fanout")));
    let marker = tokio::spawn(
        vip::marker::run_marker(
            ctx.store.clone(),
            lease_hub.clone(),
            vips_rx.clone(),
            tasks.clone(),
        )
        .instrument(tracing::info_span!("vip_marker", replica.id = %config.id)),
    );
    let orchestrator = tokio::spawn(
        orchestrate::leader::run_orchestrator(
            ctx.store.clone(),
            orchestrate::leader::OrchestratorInputs {
                leadership: lead_rx.clone(),
                specs: specs_rx.clone(),
                vips: vips_rx.clone(),
                orchestration: orch_rx,
            },
            sealer,
            tasks.clone(),
        )
        .instrument(tracing::info_span!("orchestrator", replica.id = %config.id)),
    );
    let rollouts = tokio::spawn(
        rollout::driver::run_rollouts(
            ctx.clone(),
            lead_rx.clone(),
            config.rollout.step_timeouts(),
            tasks.clone(),
        )
        .instrument(tracing::info_span!("rollouts", replica.id = %config.id)),
    );
    let placement = tokio::spawn(
        vip::placement::run_placement(
            ctx.store.clone(),
            lease_hub,
            vip::placement::PlacementInputs {
                vips: vips_rx,
                specs: specs_rx,
                leadership: lead_rx.clone(),
            },
            tasks.clone(),
        )
        .instrument(tracing::info_span!("vip_placement", replica.id = %config.id)),
    );
    metrics::register_views(ctx.sessions.clone(), ctx.vips.clone(), ctx.lease.clone());
    let leadership_metrics = tokio::spawn(metrics::metrics().follow_leadership(lead_rx.clone()));
    let metrics_endpoint = metrics_listener.map(|listener| {
        steward_runtime::spawn_metrics_endpoint(
            listener,
            metrics::metrics().registry.clone(),
            tasks.clone(),
        )
    });
    let bootstrap_api = signer.clone().map(|signer| {
        bootstrap::BootstrapApi::new(
            ctx.store.clone(),
            signer,
            u32::try_from(config.lease_params().replicas).unwrap_or(u32::MAX),
        )
    });
    let agent_api = agent_service::AgentApi::new(ctx.clone()).with_signer(signer);
    let peer_api = peers::PeerApi::new(ctx.clone());
    let admin_api = admin_service::AdminApi::new(ctx, lead_rx, VERSION.to_owned(), peers)
        .with_ca_hash(ca_hash.to_string())
        .with_own_certificate(own.name);

    info!(listen = %config.listen, replica.id = %config.id, cluster = %config.cluster, "serving");
    let grpc_incoming = listener::limited_tls_incoming(
        grpc_listener,
        tls,
        config.limits.grpc(),
        "grpc",
        metrics::metrics().grpc_listener.clone(),
        shutdown.clone(),
    );
    let served = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(pb::agent_service_server::AgentServiceServer::new(agent_api))
        .add_service(pb::admin_service_server::AdminServiceServer::new(admin_api))
        .add_service(pb::peer_service_server::PeerServiceServer::new(peer_api))
        .serve_with_incoming_shutdown(grpc_incoming, shutdown.clone().cancelled_owned());
    let bootstrap_served = async {
        let (Some(addr), Some(listener), Some(api)) =
            (bootstrap_listen, bootstrap_listener, bootstrap_api)
        else {
            return Ok(());
        };
        info!(listen = %addr, "serving joins");
        let incoming = listener::limited_tls_incoming(
            listener,
            bootstrap_tls,
            config.limits.join(),
            "join",
            metrics::metrics().join_listener.clone(),
            shutdown.clone(),
        );
        Server::builder()
            .timeout(JOIN_REQUEST_TIMEOUT)
            // A client that finished the handshake holds a slot at most this
            // long (a join takes one request).
            .max_connection_age(JOIN_CONNECTION_AGE)
            .max_connection_age_grace(Duration::from_secs(5))
            .add_service(pb::bootstrap_service_server::BootstrapServiceServer::new(
                api,
            ))
            .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned())
            .await
            .map_err(|source| RunError::Serve { addr, source })
    };
    let (served, bootstrap_served) = tokio::join!(served, bootstrap_served);
    let result = served
        .map_err(|source| RunError::Serve {
            addr: config.listen,
            source,
        })
        .and(bootstrap_served);

    tasks.cancel();
    sweep.abort();
    takeovers.abort();
    fanout.abort();
    leadership_metrics.abort();
    if let Some(endpoint) = metrics_endpoint {
        endpoint.abort();
    }
    for (name, task) in [
        ("membership", membership),
        ("caches", cache),
        ("vip marker", marker),
        ("vip placement", placement),
        ("orchestrator", orchestrator),
        ("rollouts", rollouts),
    ] {
        if tokio::time::timeout(DRAIN_TIMEOUT, task).await.is_err() {
            warn!(task = name, "did not stop in time");
        }
    }
    info!("stopped");
    result
}
