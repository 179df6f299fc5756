//! TLS listeners a reachable port cannot exhaust. TCP is accepted here, not
//! by tonic, so that every connection is counted before it costs anything:
//!
//! - at most `max_connections` connections per listener, handshaking or
//!   served; one more is closed at once;
//! - at most `max_pending_handshakes` of them still in the TLS handshake.
//!   At the cap, a new connection waits (and the ones after it wait in the
//!   kernel's backlog) until a handshake ends, or until the **oldest
//!   stalled** pending one is `evict_after` old: that one is dropped to
//!   make room. Stalled means waiting for its client: nothing of it unread
//!   in the socket. So a flood of silent connections cannot keep a real
//!   client, whose handshake takes milliseconds, from getting through, and a
//!   crowd of real clients (a fleet reconnecting at once) is served in turn
//!   instead of evicting one another's handshakes half-way, which would only
//!   make them all retry: a handshake whose client has sent what it owes
//!   waits for this process, not for its client, however late it is;
//! - each handshake has `handshake_timeout` to finish;
//! - caps hit are logged as a warning at most once per [`WARN_EVERY`], with
//!   the count since the last line, and counted in [`ListenerStats`].
//!
//! The served stream ([`LimitedTls`]) gives tonic the same connect info as
//! its own TLS acceptor (`TlsConnectInfo` with the peer's certificates), so
//! `Request::peer_certs` works unchanged.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;

use crate::metrics::{Counter, Family};

/// How often a listener logs that it hit a cap (the lines in between are
/// counted and reported with the next one).
pub const WARN_EVERY: Duration = Duration::from_secs(10);

/// What one listener lets unauthenticated clients cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Time a client has to finish the TLS handshake.
    pub handshake_timeout: Duration,
    /// Connections still in the TLS handshake at once.
    pub max_pending_handshakes: usize,
    /// At `max_pending_handshakes`, the age from which the oldest pending
    /// handshake is dropped to make room (younger ones are waited for).
    pub evict_after: Duration,
    /// Connections open at once (handshaking or served); more are closed.
    pub max_connections: usize,
}

/// Counts of what a listener dropped (for metrics and tests).
#[derive(Debug, Default)]
pub struct ListenerStats {
    /// Closed at accept: `max_connections` were open.
    pub refused: Arc<Counter>,
    /// Pending handshakes dropped (at least `evict_after` old) to make room
    /// for a newer one.
    pub evicted: Arc<Counter>,
    /// Handshakes that did not finish within the timeout.
    pub timed_out: Arc<Counter>,
    /// Handshakes that failed (bad certificate, not TLS, closed early).
    pub failed: Arc<Counter>,
    /// Connections whose client had given up (closed or reset) by the time
    /// their handshake turn came: dropped without a handshake.
    pub abandoned: Arc<Counter>,
}

impl ListenerStats {
    /// The counters of `listener` in a family labelled `listener, reason`.
    pub fn in_family(family: &Family<Counter>, listener: &str) -> Self {
        Self {
            refused: family.with(&[listener, "connection_limit"]),
            evicted: family.with(&[listener, "handshake_evicted"]),
            timed_out: family.with(&[listener, "handshake_timeout"]),
            failed: family.with(&[listener, "handshake_failed"]),
            abandoned: family.with(&[listener, "abandoned_before_handshake"]),
        }
    }
}

/// A server `rustls` config from PEM: our chain and key, and, if given, the
/// CA every client must present a certificate from. ALPN `h2` (gRPC).
pub fn server_tls_config(
    chain_pem: &[u8],
    key_pem: &[u8],
    client_ca_pem: Option<&[u8]>,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match client_ca_pem {
        None => builder.with_no_client_auth(),
        Some(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| format!("client CA: {e}"))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("client CA certificate: {e}"))?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .map_err(|e| format!("client CA: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let chain = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("certificate: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("key: {e}"))?;
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A served TLS connection; its slot in `max_connections` is freed on drop.
pub struct LimitedTls {
    inner: TlsStream<TcpStream>,
    _slot: OwnedSemaphorePermit,
}

impl Connected for LimitedTls {
    type ConnectInfo = <TlsStream<TcpStream> as Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for LimitedTls {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedTls {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A warning that is logged at most once per [`WARN_EVERY`], with how many
/// times it happened since the last line.
#[derive(Debug)]
pub struct RateLimitedWarning {
    state: Mutex<(Option<Instant>, u64)>,
}

impl Default for RateLimitedWarning {
    fn default() -> Self {
        Self {
            state: Mutex::new((None, 0)),
        }
    }
}

impl RateLimitedWarning {
    /// Counts one occurrence; `Some(count)` when a line is due now (the
    /// occurrences since the last line, this one included).
    pub fn note(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.1 += 1;
        let due = state.0.is_none_or(|at| at.elapsed() >= WARN_EVERY);
        if !due {
            return None;
        }
        let count = state.1;
        *state = (Some(Instant::now()), 0);
        Some(count)
    }
}

/// Connections the kernel holds for a listener before it accepts them (it
/// caps this at `net.core.somaxconn`). A fleet reconnecting at once waits
/// there while handshakes take their turns; tokio's default (1,024)
/// overflowed at 10,000 agents, and an overflowing backlog drops SYNs,
/// which clients only retry after a second or more.
pub const LISTEN_BACKLOG: u32 = 8192;

/// A TCP listener on `addr` with [`LISTEN_BACKLOG`] (and `SO_REUSEADDR`,
/// as `TcpListener::bind` sets it).
pub fn bind(addr: std::net::SocketAddr) -> io::Result<TcpListener> {
    let socket = match addr {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// The handshakes in progress, oldest first: id, start, cancellation.
#[derive(Default)]
struct Pending {
    next: u64,
    /// In the order they started.
    queue: std::collections::VecDeque<PendingHandshake>,
}

struct PendingHandshake {
    id: u64,
    started: Instant,
    cancel: CancellationToken,
    /// Its socket: open while the entry is queued (the handshake task
    /// leaves the queue before its connection can close).
    fd: std::os::fd::RawFd,
}

impl Pending {
    /// Takes the oldest handshake at least `evict_after` old that waits
    /// for its client, and says when to look again.
    fn take_stalled(
        &mut self,
        now: Instant,
        evict_after: Duration,
    ) -> (Option<CancellationToken>, Instant) {
        for (i, h) in self.queue.iter().enumerate() {
            let due = h.started + evict_after;
            if due > now {
                return (None, due);
            }
            if unread_bytes(h.fd) == 0 {
                let cancel = self.queue.remove(i).map(|h| h.cancel);
                return (cancel, now + evict_after);
            }
        }
        (None, now + evict_after)
    }
}

/// Accepts on `listener` within `limits`, handshakes with `tls`, and yields
/// the connections that completed it, for `Server::serve_with_incoming*`.
/// Stops accepting when `shutdown` is cancelled.
pub fn limited_tls_incoming(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    limits: ConnectionLimits,
    name: &'static str,
    stats: Arc<ListenerStats>,
    shutdown: CancellationToken,
) -> ReceiverStream<io::Result<LimitedTls>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let pending = Arc::new(Mutex::new(Pending::default()));
    let full = Arc::new(RateLimitedWarning::default());
    let evicting = Arc::new(RateLimitedWarning::default());
    let accept_failed = RateLimitedWarning::default();
    let handshakes = Arc::new(Semaphore::new(limits.max_pending_handshakes));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => return,
                a = listener.accept() => a,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(error) => {
                    // Out of file descriptors and the like: do not spin.
                    if let Some(count) = accept_failed.note() {
                        tracing::warn!(listener = name, %error, count, "accept failed");
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
                    }
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                stats.refused.inc();
                if let Some(refused) = full.note() {
                    tracing::warn!(
                        listener = name,
                        max_connections = limits.max_connections,
                        refused,
                        %peer,
                        "connection limit reached: closing new connections"
                    );
                }
                continue;
            };
            // A handshake turn: until one is free, this connection waits
            // and the next ones wait in the kernel's backlog.
            let turn = loop {
                if let Ok(turn) = handshakes.clone().try_acquire_owned() {
                    break turn;
                }
                // A stalled one old enough goes; its turn comes back as
                // soon as its task sees the cancellation. Handshakes whose
                // bytes wait for this process are never dropped: under a
                // load that makes them late, dropping them would waste
                // the work done and make their clients come back.
                let (evicted, wake) = {
                    let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
                    p.take_stalled(Instant::now(), limits.evict_after)
                };
                if let Some(stalled) = evicted {
                    stalled.cancel();
                    stats.evicted.inc();
                    if let Some(evicted) = evicting.note() {
                        tracing::warn!(
                            listener = name,
                            max_pending_handshakes = limits.max_pending_handshakes,
                            evicted,
                            "too many TLS handshakes in progress: dropping the oldest stalled one"
                        );
                    }
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    turn = handshakes.clone().acquire_owned() => match turn {
                        Ok(turn) => break turn,
                        Err(_) => return,
                    },
                    _ = tokio::time::sleep_until(wake.into()) => {}
                }
            };
            // A client that gave up while this connection waited (in the
            // kernel's backlog or for its turn) has closed it. Its hello
            // may still be buffered: handshaking it would spend a full
            // key exchange and signature on nobody, which under a
            // reconnecting fleet is what keeps the live ones waiting past
            // their deadline (and they give up too).
            if peer_gone(&tcp) {
                stats.abandoned.inc();
                continue;
            }
            let _ = tcp.set_nodelay(true);
            let cancel = shutdown.child_token();
            let id = {
                use std::os::fd::AsRawFd;
                let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
                let id = p.next;
                p.next += 1;
                p.queue.push_back(PendingHandshake {
                    id,
                    started: Instant::now(),
                    cancel: cancel.clone(),
                    fd: tcp.as_raw_fd(),
                });
                id
            };
            let acceptor = acceptor.clone();
            let pending = pending.clone();
            let stats = stats.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let accept = tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp));
                tokio::pin!(accept);
                let outcome = tokio::select! {
                    _ = cancel.cancelled() => None,
                    r = &mut accept => Some(r),
                };
                // Out of the queue while the socket is open (`accept`, and
                // the connection in it, is dropped at the end of this task).
                {
                    let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
                    p.queue.retain(|h| h.id != id);
                }
                drop(turn);
                match outcome {
                    None => {}
                    Some(Err(_)) => {
                        stats.timed_out.inc();
                        tracing::debug!(listener = name, %peer, "TLS handshake timed out");
                    }
                    Some(Ok(Err(error))) => {
                        stats.failed.inc();
                        tracing::debug!(listener = name, %peer, %error, "TLS handshake failed");
                    }
                    Some(Ok(Ok(inner))) => {
                        // The server is gone when this fails: nothing to do.
                        let _ = tx.send(Ok(LimitedTls { inner, _slot: slot })).await;
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Bytes received on socket `fd` and not read yet (0 when it cannot be
/// told). The descriptor must be open.
#[allow(unsafe_code)]
fn unread_bytes(fd: std::os::fd::RawFd) -> usize {
    let mut unread: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer, which points to
    // `unread`; the caller keeps the descriptor open during the call.
    let rc = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut unread as *mut libc::c_int) };
    if rc == 0 {
        usize::try_from(unread).unwrap_or(0)
    } else {
        0
    }
}

/// Whether the client of an accepted connection has closed or reset it
/// (its TCP state is no longer ESTABLISHED: CLOSE-WAIT after its FIN).
#[allow(unsafe_code)]
fn peer_gone(tcp: &tokio::net::TcpStream) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: `tcp_info` is plain integers, valid when zeroed; the kernel
    // writes at most `len` bytes into it, and the descriptor is open for
    // the duration of the call (borrowed from `tcp`).
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            tcp.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    // TCP_ESTABLISHED is 1 in the kernel's numbering (include/net/tcp_states.h).
    rc == 0 && info.tcpi_state != 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio_stream::StreamExt;

    /// A connection its client closed while it waited is known as gone
    /// before any handshake (and one still open is not).
    #[tokio::test]
    async fn a_connection_its_client_closed_is_seen_as_gone() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (server_side, _) = listener.accept().await.expect("accept");
        assert!(!peer_gone(&server_side), "the client is still there");
        // Its hello is buffered, then it gives up.
        tokio::io::AsyncWriteExt::write_all(&mut client, b"\x16\x03\x01 hello")
            .await
            .expect("write");
        drop(client);
        let deadline = Instant::now() + Duration::from_secs(2);
        while !peer_gone(&server_side) {
            assert!(
                Instant::now() < deadline,
                "the closed connection still looks open"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    struct Served {
        addr: std::net::SocketAddr,
        incoming: ReceiverStream<io::Result<LimitedTls>>,
        stats: Arc<ListenerStats>,
        client: tokio_rustls::TlsConnector,
        _shutdown: tokio_util::sync::DropGuard,
    }

    async fn serve(limits: ConnectionLimits) -> Served {
        let key = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
        let cert_pem = key.cert.pem();
        let tls = server_tls_config(
            cert_pem.as_bytes(),
            key.signing_key.serialize_pem().as_bytes(),
            None,
        )
        .expect("server config");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stats = Arc::new(ListenerStats::default());
        let shutdown = CancellationToken::new();
        let incoming = limited_tls_incoming(
            listener,
            tls,
            limits,
            "test",
            stats.clone(),
            shutdown.clone(),
        );
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(cert_pem.as_bytes()).expect("der"))
            .expect("root");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Served {
            addr,
            incoming,
            stats,
            client: tokio_rustls::TlsConnector::from(Arc::new(config)),
            _shutdown: shutdown.drop_guard(),
        }
    }

    impl Served {
        async fn handshake(&mut self) -> (tokio_rustls::client::TlsStream<TcpStream>, LimitedTls) {
            let tcp = TcpStream::connect(self.addr).await.expect("connect");
            let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
            let client = self.client.connect(name, tcp).await.expect("handshake");
            let served = tokio::time::timeout(Duration::from_secs(2), self.incoming.next())
                .await
                .expect("served in time")
                .expect("a connection")
                .expect("ok");
            (client, served)
        }
    }

    /// Whether the server closed `s` within `within`.
    async fn closed(s: &mut TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 16];
        matches!(
            tokio::time::timeout(within, s.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test]
    async fn silent_clients_are_evicted_oldest_first_then_timed_out() {
        let mut served = serve(ConnectionLimits {
            handshake_timeout: Duration::from_millis(500),
            max_pending_handshakes: 2,
            evict_after: Duration::from_millis(40),
            max_connections: 100,
        })
        .await;
        let mut first = TcpStream::connect(served.addr).await.expect("connect");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut second = TcpStream::connect(served.addr).await.expect("connect");
        tokio::time::sleep(Duration::from_millis(50)).await;
        // A real client still gets through: the oldest silent one goes.
        let _ = served.handshake().await;
        assert!(closed(&mut first, Duration::from_millis(300)).await);
        assert_eq!(served.stats.evicted.get(), 1);
        // The other silent one runs out of time.
        assert!(closed(&mut second, Duration::from_secs(2)).await);
        assert_eq!(served.stats.timed_out.get(), 1);
    }

    /// Of two old pending handshakes, the one whose client sent bytes this
    /// process has not read yet (it is late because this process is busy)
    /// is spared; the one waiting for its client is taken.
    #[tokio::test]
    async fn handshakes_waiting_for_this_process_are_spared() {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut talker = std::net::TcpStream::connect(addr).expect("connect");
        let (busy, _) = listener.accept().expect("accept");
        let _silent_client = std::net::TcpStream::connect(addr).expect("connect");
        let (silent, _) = listener.accept().expect("accept");
        talker.write_all(b"a client hello").expect("write");
        // Until the kernel has it queued on the server side.
        for _ in 0..100 {
            if unread_bytes(busy.as_raw_fd()) > 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(unread_bytes(busy.as_raw_fd()), 14);
        assert_eq!(unread_bytes(silent.as_raw_fd()), 0);

        let now = Instant::now();
        let evict_after = Duration::from_millis(100);
        let old = now - Duration::from_millis(500);
        let entry = |id: u64, started: Instant, fd| PendingHandshake {
            id,
            started,
            cancel: CancellationToken::new(),
            fd,
        };
        let mut pending = Pending {
            next: 3,
            queue: [
                entry(0, old, busy.as_raw_fd()),
                entry(1, old, silent.as_raw_fd()),
                entry(2, now, silent.as_raw_fd()),
            ]
            .into(),
        };
        let (taken, _) = pending.take_stalled(now, evict_after);
        assert!(taken.is_some(), "the stalled one was not taken");
        let left: Vec<u64> = pending.queue.iter().map(|h| h.id).collect();
        assert_eq!(left, [0, 2], "the busy one must stay, the stalled one go");
        // Nothing else is old and stalled: look again when the young one
        // is old enough.
        let (taken, wake) = pending.take_stalled(now, evict_after);
        assert!(taken.is_none());
        assert_eq!(wake, now + evict_after);
    }

    #[tokio::test]
    async fn young_handshakes_are_waited_for_not_evicted() {
        let mut served = serve(ConnectionLimits {
            handshake_timeout: Duration::from_secs(5),
            max_pending_handshakes: 1,
            evict_after: Duration::from_secs(3),
            max_connections: 100,
        })
        .await;
        // A client that has not finished its handshake yet (it is 0.3 s
        // old) holds the only turn: the next one waits for it.
        let mut slow = TcpStream::connect(served.addr).await.expect("connect");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let waiting = tokio::time::timeout(Duration::from_millis(500), served.handshake()).await;
        assert!(waiting.is_err(), "a handshake ran past the cap");
        assert_eq!(served.stats.evicted.get(), 0);
        assert!(!closed(&mut slow, Duration::from_millis(10)).await);
        // Once it is `evict_after` old, it goes and the next one is served.
        let _ = tokio::time::timeout(Duration::from_secs(4), served.handshake())
            .await
            .expect("served after the eviction");
        assert_eq!(served.stats.evicted.get(), 1);
        assert!(closed(&mut slow, Duration::from_millis(300)).await);
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_closed_until_one_ends() {
        let mut served = serve(ConnectionLimits {
            handshake_timeout: Duration::from_secs(5),
            max_pending_handshakes: 8,
            evict_after: Duration::from_secs(1),
            max_connections: 2,
        })
        .await;
        let a = served.handshake().await;
        let _b = served.handshake().await;
        let mut third = TcpStream::connect(served.addr).await.expect("connect");
        assert!(closed(&mut third, Duration::from_secs(1)).await);
        assert_eq!(served.stats.refused.get(), 1);
        // A served connection that ends gives its slot back.
        drop(a);
        let _c = served.handshake().await;
    }
}
