//! The few runtime helpers the binaries share: dialing a replica over mutual
//! TLS, waiting for a stop signal, reporting config problems, logging, and
//! the metrics endpoint (`GET /metrics` on hyper's HTTP/1.1 server, behind
//! a connection cap). This is the only module of the crate that does IO.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// An https:// endpoint with mutual TLS: the server must have a certificate
/// from `ca` valid for the URL's host; we present `identity`.
pub fn mtls_endpoint(url: &str, ca: Certificate, identity: Identity) -> Result<Endpoint, String> {
    let endpoint = Endpoint::from_shared(url.to_owned()).map_err(|e| e.to_string())?;
    let host = endpoint
        .uri()
        .host()
        .ok_or("URL has no host")?
        .trim_matches(['[', ']'])
        .to_owned();
    endpoint
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(ca)
                .identity(identity)
                .domain_name(host),
        )
        .map_err(|e| e.to_string())
}

/// Connects to `url` over mutual TLS; the error names every cause in the chain.
pub async fn dial_mtls(
    url: &str,
    ca: Certificate,
    identity: Identity,
    connect_timeout: Duration,
) -> Result<Channel, String> {
    mtls_endpoint(url, ca, identity)?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| error_chain(&e))
}

pub use steward_proto::domain::format_unix_ms;

/// `error: cause: cause ...` in one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg = format!("{msg}: {s}");
        source = s.source();
    }
    msg
}

/// Cancels `shutdown` on SIGTERM or SIGINT.
pub async fn cancel_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("signal received; shutting down");
    shutdown.cancel();
}

/// Logs to stderr, `RUST_LOG` filtering (default `info`), colours on a TTY
/// only. Under systemd with stderr going to the journal (`JOURNAL_STREAM`
/// names stderr), lines carry no timestamp: journald stamps each one.
pub fn init_tracing() {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if stderr_is_journal() {
        builder.without_time().init();
    } else {
        builder.init();
    }
}

/// Whether stderr is the journal stream systemd connected
/// (`JOURNAL_STREAM=<device>:<inode>` of that stream, see systemd.exec(5)).
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    // stat(2) of the fd's /proc link is the open file itself (a socket here).
    match std::fs::metadata("/proc/self/fd/2") {
        Ok(m) => names_stream(stream.to_str().unwrap_or_default(), m.dev(), m.ino()),
        Err(_) => false,
    }
}

/// Whether a `JOURNAL_STREAM` value names the file `dev`:`ino`.
fn names_stream(journal_stream: &str, dev: u64, ino: u64) -> bool {
    journal_stream
        .split_once(':')
        .is_some_and(|(d, i)| d.parse() == Ok(dev) && i.parse() == Ok(ino))
}

/// Limits of the metrics endpoint: what a slow or hostile client may cost.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Largest request head (request line and headers) read.
    pub max_head_bytes: usize,
    /// Time a client has to send its whole request head.
    pub read_timeout: Duration,
    /// Time a client has to take the response.
    pub write_timeout: Duration,
    /// Connections served at once; more are closed unanswered (and logged
    /// at most every [`crate::listener::WARN_EVERY`], with the count).
    pub max_connections: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_head_bytes: 8 * 1024,
            read_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(5),
            max_connections: 16,
        }
    }
}

/// Binds the metrics endpoint (so a bad address fails at start).
pub async fn bind_metrics(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// Serves `registry` on `listener` (from [`bind_metrics`]) with the default
/// limits, in a task of its own, until `shutdown`.
pub fn spawn_metrics_endpoint(
    listener: tokio::net::TcpListener,
    registry: std::sync::Arc<crate::metrics::Registry>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    use tracing::Instrument;
    tracing::info!(metrics_listen = ?listener.local_addr().ok(), "serving metrics");
    tokio::spawn(
        serve_metrics(listener, registry, HttpLimits::default(), shutdown)
            .instrument(tracing::info_span!("metrics_endpoint")),
    )
}

/// Serves `GET /metrics` (the registry in the Prometheus text format 0.0.4)
/// over plain HTTP/1.1 (hyper's server) on `listener` until `shutdown`: one
/// request per connection, 404 for other paths, 405 for other methods, 400
/// for what is not HTTP, 431 for a head over the limit; a client that has
/// not sent its head within `read_timeout` is disconnected unanswered. At
/// most `max_connections` at once: more are closed at accept.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    registry: std::sync::Arc<crate::metrics::Registry>,
    limits: HttpLimits,
    shutdown: CancellationToken,
) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let full = crate::listener::RateLimitedWarning::default();
    let accept_failed = crate::listener::RateLimitedWarning::default();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(error) => {
                // Out of file descriptors and the like: do not spin.
                if let Some(count) = accept_failed.note() {
                    tracing::warn!(%error, count, "metrics endpoint: accept failed");
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            if let Some(refused) = full.note() {
                tracing::warn!(
                    %peer,
                    max_connections = limits.max_connections,
                    refused,
                    "metrics endpoint: connection limit reached: closing new connections"
                );
            }
            continue;
        };
        let registry = registry.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = serve_one(stream, registry, limits) => {}
            }
        });
    }
}

/// What a request earns: the metrics, or an error status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HttpAnswer {
    Metrics { head_only: bool },
    Status(hyper::StatusCode),
}

/// Routes a parsed request (hyper has already refused what is not HTTP/1.x
/// with 400, and heads over the limit with 431).
fn answer_for(method: &hyper::Method, path: &str) -> HttpAnswer {
    use hyper::{Method, StatusCode};
    if path != "/metrics" {
        return HttpAnswer::Status(StatusCode::NOT_FOUND);
    }
    match *method {
        Method::GET => HttpAnswer::Metrics { head_only: false },
        Method::HEAD => HttpAnswer::Metrics { head_only: true },
        _ => HttpAnswer::Status(StatusCode::METHOD_NOT_ALLOWED),
    }
}

fn respond(
    registry: &crate::metrics::Registry,
    request: &hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
    let (status, content_type, body) = match answer_for(request.method(), request.uri().path()) {
        HttpAnswer::Metrics { .. } => (
            hyper::StatusCode::OK,
            crate::metrics::CONTENT_TYPE,
            // hyper leaves the body out of a HEAD answer (and keeps its
            // Content-Length).
            registry.render(),
        ),
        HttpAnswer::Status(status) => (
            status,
            "text/plain; charset=utf-8",
            format!("{}\n", status.canonical_reason().unwrap_or_default()),
        ),
    };
    let mut response = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    if status == hyper::StatusCode::METHOD_NOT_ALLOWED {
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
    }
    response
}

/// Serves one connection with hyper's HTTP/1.1 server: one request, its
/// head read within `read_timeout` and at most `max_head_bytes` (hyper
/// closes a slow connection unanswered and answers 431 to a head over the
/// limit, 400 to what is not HTTP/1.x), the whole exchange within
/// `read_timeout + write_timeout`.
async fn serve_one(
    stream: tokio::net::TcpStream,
    registry: std::sync::Arc<crate::metrics::Registry>,
    limits: HttpLimits,
) {
    // A second handle on the socket, to close it gently once hyper is done
    // with its own (below).
    let spare = stream
        .into_std()
        .and_then(|s| Ok((s.try_clone()?, s)))
        .and_then(|(spare, s)| Ok((tokio::net::TcpStream::from_std(s)?, spare)));
    let (stream, spare) = match spare {
        Ok((stream, spare)) => (stream, spare),
        Err(error) => {
            tracing::debug!(%error, "metrics endpoint: cannot take the connection");
            return;
        }
    };
    let service = hyper::service::service_fn(move |request| {
        let response = respond(&registry, &request);
        async move { Ok::<_, std::convert::Infallible>(response) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.read_timeout)
        .max_header_size(limits.max_head_bytes)
        .max_buf_size(limits.max_head_bytes.max(MIN_HYPER_BUF))
        .keep_alive(false)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    let within = limits.read_timeout + limits.write_timeout;
    match tokio::time::timeout(within, connection).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::debug!(%error, "metrics endpoint: request refused"),
        Err(_) => {
            tracing::debug!(?within, "metrics endpoint: exchange too slow; closing");
            return;
        }
    }
    // hyper has answered (or refused) and dropped its handle. Closing with
    // unread input would reset the connection and the client could lose
    // the answer: end our side, take what the client still sends (bounded),
    // then close.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut spare) = spare
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpStream::from_std(spare))
    else {
        return;
    };
    let _ = spare.shutdown().await;
    let mut sink = [0u8; 1024];
    let mut left = 64 * 1024usize;
    let drain = async {
        while left > 0 {
            match spare.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

/// The smallest read buffer hyper accepts.
const MIN_HYPER_BUF: usize = 8192;

/// PEM files for mutual TLS: the cluster CA, our certificate and its key.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Every problem found in a config file, reported together.
#[derive(Debug)]
pub struct ConfigError {
    pub path: PathBuf,
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid config {}:", self.path.display())?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Reads and parses a TOML config, mapping every failure to a [`ConfigError`].
pub fn read_toml<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T, ConfigError> {
    let fail = |problem: String| ConfigError {
        path: path.to_owned(),
        problems: vec![problem],
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    toml::from_str(&text).map_err(|e| fail(e.to_string()))
}

/// A verifier for a node that has no CA yet, only the CA's hash (from the
/// join command): the replica presents its chain up to the CA; the CA in the
/// chain whose public key has the pinned hash becomes the only root, and the
/// replica's certificate must verify against it as usual (chain, validity,
/// host name).
#[derive(Debug)]
struct PinnedCaVerifier {
    pin: crate::pki::CaHash,
    provider: std::sync::Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| crate::pki::CaHash::of_der(c).is_ok_and(|h| h == self.pin))
            .ok_or_else(|| {
                rustls::Error::General(format!(
                    "the coordinator presented no CA with the pinned hash {} \
                     (wrong --ca-hash, or not this cluster's coordinator)",
                    self.pin
                ))
            })?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A check of a server's certificate (DER), run after webpki verified it
/// (chain to the CA, validity, host name, serverAuth): the caller's own
/// rules, such as the kind and revocations.
pub type ServerCheck = std::sync::Arc<dyn Fn(&[u8]) -> Result<(), String> + Send + Sync>;

/// webpki's verification, then a [`ServerCheck`].
struct CheckedVerifier {
    webpki: std::sync::Arc<rustls::client::WebPkiServerVerifier>,
    check: ServerCheck,
}

impl fmt::Debug for CheckedVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckedVerifier").finish_non_exhaustive()
    }
}

impl rustls::client::danger::ServerCertVerifier for CheckedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let verified = self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        (self.check)(end_entity.as_ref()).map_err(rustls::Error::General)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// PEM credentials for mutual TLS: the CA a server must chain to, and our
/// certificate chain and key.
#[derive(Clone, Default)]
pub struct MtlsPem {
    pub ca: Vec<u8>,
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

impl fmt::Debug for MtlsPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MtlsPem").finish_non_exhaustive()
    }
}

/// A lazily connected mutual-TLS channel to `url` (`https://host:port`):
/// the server must have a certificate from `pem.ca` valid for the host,
/// with serverAuth, that passes `check`; we present `pem.cert`. Every
/// (re)connection runs the check again.
pub fn mtls_channel_checked(
    url: &str,
    pem: &MtlsPem,
    check: ServerCheck,
    connect_timeout: Duration,
) -> Result<Channel, String> {
    let (endpoint, connect) = checked_connector(url, pem, check, connect_timeout)?;
    Ok(endpoint.connect_with_connector_lazy(connect))
}

/// [`mtls_channel_checked`], connected now: the error says why the
/// connection or the handshake failed (a refused certificate included).
pub async fn dial_mtls_checked(
    url: &str,
    pem: &MtlsPem,
    check: ServerCheck,
    connect_timeout: Duration,
) -> Result<Channel, String> {
    let (endpoint, connect) = checked_connector(url, pem, check, connect_timeout)?;
    endpoint
        .connect_with_connector(connect)
        .await
        .map_err(|e| error_chain(&e))
}

/// A TLS connection made by [`checked_connector`].
type CheckedIo = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// The plain endpoint tonic sees and the connector that does TCP and TLS
/// (with `check`) under it.
fn checked_connector(
    url: &str,
    pem: &MtlsPem,
    check: ServerCheck,
    connect_timeout: Duration,
) -> Result<
    (
        Endpoint,
        impl tower::Service<
                tonic::transport::Uri,
                Response = CheckedIo,
                Error = std::io::Error,
                Future = impl std::future::Future<Output = std::io::Result<CheckedIo>> + Send,
            > + Clone
            + Send
            + 'static,
    ),
    String,
> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use std::sync::Arc;
    let endpoint = Endpoint::from_shared(url.to_owned()).map_err(|e| e.to_string())?;
    let uri = endpoint.uri().clone();
    if uri.scheme_str() != Some("https") {
        return Err(format!("{url}: the URL must start with https://"));
    }
    let host = uri
        .host()
        .ok_or("URL has no host")?
        .trim_matches(['[', ']'])
        .to_owned();
    let port = uri.port_u16().unwrap_or(443);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem.ca) {
        roots
            .add(cert.map_err(|e| format!("CA: {e}"))?)
            .map_err(|e| format!("CA certificate: {e}"))?;
    }
    let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| format!("CA: {e}"))?;
    let chain = CertificateDer::pem_slice_iter(&pem.cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("certificate: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(&pem.key).map_err(|e| format!("key: {e}"))?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(CheckedVerifier { webpki, check }))
        .with_client_auth_cert(chain, key)
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from(host.clone())
        .map_err(|e| format!("{host}: {e}"))?;
    let connect = tower::service_fn(move |_: tonic::transport::Uri| {
        let (connector, name, host) = (connector.clone(), name.clone(), host.clone());
        async move {
            let tcp = tokio::time::timeout(
                connect_timeout,
                tokio::net::TcpStream::connect((host.as_str(), port)),
            )
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
            })??;
            tcp.set_nodelay(true)?;
            let tls = tokio::time::timeout(connect_timeout, connector.connect(name, tcp))
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
                })??;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    // TLS is ours (the connector), so tonic sees a plain http:// endpoint.
    let endpoint = Endpoint::from_shared(format!(
        "http://{}",
        uri.authority().map(|a| a.as_str()).unwrap_or_default()
    ))
    .map_err(|e| e.to_string())?;
    Ok((endpoint, connect))
}

/// Connects to a replica's bootstrap endpoint (`https://host:port`) trusting
/// only a CA whose public key has the hash `pin`, without a client
/// certificate (a join token authenticates the caller).
pub async fn dial_pinned(
    url: &str,
    pin: crate::pki::CaHash,
    connect_timeout: Duration,
) -> Result<Channel, String> {
    use std::sync::Arc;
    let endpoint = Endpoint::from_shared(url.to_owned()).map_err(|e| e.to_string())?;
    let uri = endpoint.uri().clone();
    if uri.scheme_str() != Some("https") {
        return Err(format!(
            "{url}: the coordinator URL must start with https://"
        ));
    }
    let host = uri
        .host()
        .ok_or("URL has no host")?
        .trim_matches(['[', ']'])
        .to_owned();
    let port = uri.port_u16().unwrap_or(443);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCaVerifier { pin, provider }))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from(host.clone())
        .map_err(|e| format!("{host}: {e}"))?;
    let connect = tower::service_fn(move |_: tonic::transport::Uri| {
        let (connector, name, host) = (connector.clone(), name.clone(), host.clone());
        async move {
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    // TLS is ours (the connector), so tonic sees a plain http:// endpoint.
    Endpoint::from_shared(format!(
        "http://{}",
        uri.authority().map(|a| a.as_str()).unwrap_or_default()
    ))
    .map_err(|e| e.to_string())?
    .connect_timeout(connect_timeout)
    .connect_with_connector(connect)
    .await
    .map_err(|e| error_chain(&e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn start(
        limits: HttpLimits,
    ) -> (
        std::net::SocketAddr,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let registry = Arc::new(crate::metrics::Registry::new());
        registry.counter("steward_test_total", "A test.").add(3);
        let listener = bind_metrics(([127, 0, 0, 1], 0).into())
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve_metrics(listener, registry, limits, shutdown.clone()));
        (addr, shutdown, server)
    }

    /// Sends `request`, returns everything the server answers until it closes.
    async fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(request).await.expect("write");
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
            .await
            .expect("the server answers and closes")
            .expect("read");
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn get_metrics_answers_the_registry_in_text_format() {
        let (addr, shutdown, server) = start(HttpLimits::default()).await;
        let r = exchange(
            addr,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n",
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        // Header names are case-insensitive; hyper writes them in lower case.
        let lower = r.to_ascii_lowercase();
        assert!(
            lower.contains("\r\ncontent-type: text/plain; version=0.0.4; charset=utf-8\r\n"),
            "{r}"
        );
        let (head, body) = lower.split_once("\r\n\r\n").expect("head and body");
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{r}"
        );
        assert!(body.contains("\nsteward_test_total 3\n"), "{body}");
        // HEAD: the same head, no body; a query string is ignored.
        let r = exchange(addr, b"HEAD /metrics?x=1 HTTP/1.0\r\n\r\n").await;
        assert!(
            (r.starts_with("HTTP/1.1 200 OK\r\n") || r.starts_with("HTTP/1.0 200 OK\r\n"))
                && r.ends_with("\r\n\r\n"),
            "{r}"
        );
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(2), server)
            .await
            .expect("stops on cancel")
            .expect("no panic");
    }

    #[tokio::test]
    async fn bad_requests_get_errors_and_the_endpoint_keeps_serving() {
        let limits = HttpLimits {
            read_timeout: Duration::from_millis(300),
            ..HttpLimits::default()
        };
        let (addr, _shutdown, _server) = start(limits).await;
        let status = |r: &str| r.lines().next().unwrap_or_default().to_owned();
        let r = exchange(addr, b"GET /nope HTTP/1.1\r\n\r\n").await;
        assert_eq!(status(&r), "HTTP/1.1 404 Not Found");
        let r = exchange(addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
        assert_eq!(status(&r), "HTTP/1.1 405 Method Not Allowed");
        assert!(
            r.to_ascii_lowercase().contains("\r\nallow: get, head\r\n"),
            "{r}"
        );
        let r = exchange(addr, b"\x16\x03\x01\x02\x00garbage\r\n\r\n").await;
        assert_eq!(status(&r), "HTTP/1.1 400 Bad Request");
        let r = exchange(addr, b"GET /metrics SPDY/9\r\n\r\n").await;
        assert_eq!(status(&r), "HTTP/1.1 400 Bad Request");
        let mut huge = b"GET /metrics HTTP/1.1\r\n".to_vec();
        for i in 0..2000 {
            huge.extend_from_slice(format!("X-Filler-{i}: yes\r\n").as_bytes());
        }
        huge.extend_from_slice(b"\r\n");
        let r = exchange(addr, &huge).await;
        assert_eq!(status(&r), "HTTP/1.1 431 Request Header Fields Too Large");
        // Half a request, then silence: disconnected unanswered at the read
        // timeout (hyper sends no 408), not held forever.
        let started = std::time::Instant::now();
        let r = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n").await;
        assert_eq!(r, "", "a slow client gets no answer");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_secs(2),
            "cut off after {took:?}, the read timeout is 300 ms"
        );
        // So is one that connects and sends nothing at all.
        let started = std::time::Instant::now();
        assert_eq!(exchange(addr, b"").await, "");
        assert!(started.elapsed() < Duration::from_secs(2));
        // A client that never sends anything does not block others.
        let _idle = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let r = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert_eq!(status(&r), "HTTP/1.1 200 OK");
    }

    #[test]
    fn journal_stream_must_name_stderr() {
        assert!(names_stream("64770:123456", 64770, 123456));
        assert!(!names_stream("64770:123456", 64770, 123457));
        assert!(!names_stream("64770", 64770, 0));
        assert!(!names_stream("", 0, 0));
        assert!(!names_stream("x:y", 0, 0));
    }

    #[tokio::test]
    async fn connections_over_the_limit_are_closed_unanswered() {
        let limits = HttpLimits {
            max_connections: 1,
            read_timeout: Duration::from_millis(300),
            ..HttpLimits::default()
        };
        let (addr, _shutdown, _server) = start(limits).await;
        let idle = tokio::net::TcpStream::connect(addr).await.expect("connect");
        // Let the server take the idle connection first.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut out))
            .await
            .expect("closed at once, not held");
        // Closed with the request unread: an end of stream or a reset.
        assert!(read.is_err() || out.is_empty(), "over the limit: no answer");
        // The idle one goes and frees its slot; until the server has seen it
        // go, new connections are still refused (closed, maybe reset).
        drop(idle);
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        loop {
            let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let mut out = Vec::new();
            if s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").await.is_ok() {
                let read = s.read_to_end(&mut out);
                let _ = tokio::time::timeout(Duration::from_secs(2), read).await;
            }
            if out.starts_with(b"HTTP/1.1 200 OK") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the slot never came back"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[test]
    fn requests_are_routed() {
        use hyper::{Method, StatusCode};
        use HttpAnswer::*;
        assert_eq!(
            answer_for(&Method::GET, "/metrics"),
            Metrics { head_only: false }
        );
        assert_eq!(
            answer_for(&Method::HEAD, "/metrics"),
            Metrics { head_only: true }
        );
        assert_eq!(answer_for(&Method::GET, "/"), Status(StatusCode::NOT_FOUND));
        assert_eq!(
            answer_for(&Method::GET, "/metrics/x"),
            Status(StatusCode::NOT_FOUND)
        );
        assert_eq!(
            answer_for(&Method::DELETE, "/metrics"),
            Status(StatusCode::METHOD_NOT_ALLOWED)
        );
    }

    /// A client that reads nothing of the answer is cut off once the
    /// exchange has taken its read and write time, freeing its slot.
    #[tokio::test]
    async fn a_client_that_reads_nothing_is_cut_off() {
        let registry = Arc::new(crate::metrics::Registry::new());
        // An answer larger than the socket buffers can take (the sender's
        // grows to 4 MiB at most; the stuck client's is small).
        let big = registry.counter_vec("steward_test_big_total", "Big.", &["n"]);
        for i in 0..80_000 {
            big.with(&[&format!("{i:0>40}")]).inc();
        }
        let limits = HttpLimits {
            read_timeout: Duration::from_millis(200),
            write_timeout: Duration::from_millis(300),
            max_connections: 1,
            ..HttpLimits::default()
        };
        let listener = bind_metrics(([127, 0, 0, 1], 0).into())
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        tokio::spawn(serve_metrics(listener, registry, limits, shutdown.clone()));
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .set_recv_buffer_size(4096)
            .expect("small receive buffer");
        let mut stuck = socket.connect(addr).await.expect("connect");
        stuck
            .write_all(b"GET /metrics HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        // The one slot is taken by the stuck reader until it is cut off.
        let started = std::time::Instant::now();
        loop {
            let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            s.write_all(b"HEAD /metrics HTTP/1.1\r\n\r\n")
                .await
                .expect("write");
            let mut out = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut out)).await;
            if out.starts_with(b"HTTP/1.1 200 OK") {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "the stuck reader kept its slot"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(stuck);
        shutdown.cancel();
    }
}
