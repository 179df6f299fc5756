//! A scripted, in-process `AgentService` for agent tests, the way
//! linkerd2-proxy tests its proxy against scripted controllers: real mTLS
//! and real HTTP/2 (tonic), no etcd, and a per-session [`Script`] that says
//! how this "coordinator" behaves — serve well, or stall the way a broken
//! peer does.
//!
//! Every session and heartbeat is counted in [`FakeLog`], so a test can wait
//! for "the agent opened a session elsewhere and heartbeats flow there".

use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use steward_proto::pb;
use steward_proto::pb::agent_service_server::{AgentService, AgentServiceServer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

/// How one session is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Script {
    /// Read every message, ack every heartbeat with its seq.
    Serve,
    /// As `Serve`, each ack asking for heartbeats this many ms apart (a
    /// busy replica's cadence, `HeartbeatAck.heartbeat_interval_ms`).
    Paced(u32),
    /// A peer whose HTTP/2 stream stopped moving: read the hello, then never
    /// read again (the stream's flow-control window fills and stays full),
    /// while acking on a timer for `acking` as if all were well; then fall
    /// silent, keeping the stream and the connection open — or, with
    /// `then_close`, end the session from this side as a replica that hit a
    /// stream error does.
    Stall { acking: Duration, then_close: bool },
}

/// What the fake saw.
#[derive(Debug, Default, Clone)]
pub struct FakeLog {
    /// Every session opened, in order: (the script it got, when).
    pub sessions: Vec<(Script, Instant)>,
    /// Heartbeats read on `Serve` and `Paced` sessions...
    pub served_heartbeats: u64,
    /// ...and when each arrived (the first 1,000).
    pub heartbeat_times: Vec<Instant>,
}

#[derive(Clone)]
struct Fake {
    /// The script for the n-th session on any replica of this fake; the
    /// last one repeats.
    scripts: Arc<Vec<Script>>,
    log: Arc<Mutex<FakeLog>>,
    /// How long a stalled session is held open at most (the test's bound).
    hold: Duration,
}

impl Fake {
    fn record(&self, f: impl FnOnce(&mut FakeLog)) {
        f(&mut self.log.lock().unwrap_or_else(|p| p.into_inner()));
    }

    fn next_script(&self) -> Script {
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let n = log.sessions.len();
        let script = *self
            .scripts
            .get(n)
            .or(self.scripts.last())
            .unwrap_or(&Script::Serve);
        log.sessions.push((script, Instant::now()));
        script
    }
}

fn ack(seq: u64) -> pb::CoordinatorMessage {
    paced_ack(seq, 0)
}

fn paced_ack(seq: u64, interval_ms: u32) -> pb::CoordinatorMessage {
    pb::CoordinatorMessage {
        kind: Some(pb::coordinator_message::Kind::HeartbeatAck(
            pb::HeartbeatAck {
                seq,
                replica_id: "fake".into(),
                heartbeat_interval_ms: interval_ms,
            },
        )),
    }
}

type Outbound<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for Fake {
    type SessionStream = Outbound<pb::CoordinatorMessage>;
    type LeaseStream = Outbound<pb::LeaseReply>;

    async fn session(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut inbound = request.into_inner();
        // The hello.
        inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("no hello"))?;
        let script = self.next_script();
        let (tx, rx) = mpsc::channel(16);
        let fake = self.clone();
        tokio::spawn(async move {
            match script {
                Script::Serve | Script::Paced(_) => {
                    let interval_ms = match script {
                        Script::Paced(ms) => ms,
                        _ => 0,
                    };
                    while let Ok(Some(message)) = inbound.message().await {
                        if let Some(pb::agent_message::Kind::Heartbeat(hb)) = message.kind {
                            fake.record(|l| {
                                l.served_heartbeats += 1;
                                if l.heartbeat_times.len() < 1000 {
                                    l.heartbeat_times.push(Instant::now());
                                }
                            });
                            if tx.send(Ok(paced_ack(hb.seq, interval_ms))).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                Script::Stall { acking, then_close } => {
                    let until = Instant::now() + acking;
                    let mut seq = 0;
                    while Instant::now() < until {
                        seq += 1;
                        if tx.send(Ok(ack(seq))).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(25)).await;
                    }
                    if !then_close {
                        // Silent, with the stream and `inbound` held (never
                        // read), for as long as the test may run.
                        tokio::time::sleep(fake.hold).await;
                    }
                    drop((inbound, tx));
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn lease(
        &self,
        _request: Request<Streaming<pb::LeaseHeartbeat>>,
    ) -> Result<Response<Self::LeaseStream>, Status> {
        Err(Status::unimplemented("the fake coordinator has no leases"))
    }

    async fn renew_certificate(
        &self,
        _request: Request<pb::RenewCertificateRequest>,
    ) -> Result<Response<pb::IssuedCertificate>, Status> {
        Err(Status::unimplemented("the fake coordinator renews nothing"))
    }
}

/// Replicas of one scripted fake coordinator, serving until dropped.
pub struct FakeCoordinator {
    pub urls: Vec<String>,
    log: Arc<Mutex<FakeLog>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl FakeCoordinator {
    /// [`FakeCoordinator::start`] with a new CA in `pki_dir` that issues the
    /// fake's coordinator certificate and one for the agent `agent`
    /// (`pki_dir/<agent>.crt`, `.key`; the CA at `pki_dir/ca.crt`).
    pub async fn start_with_new_pki(
        pki_dir: &Path,
        agent: &str,
        replicas: usize,
        scripts: Vec<Script>,
        window: u32,
        hold: Duration,
    ) -> FakeCoordinator {
        use steward_coordinator::pki::{self, IdentityKind};
        pki::init_ca(pki_dir, "test").expect("ca");
        let (crt, key) =
            pki::issue(pki_dir, "coord-fake", IdentityKind::Coordinator, &[]).expect("cert");
        pki::issue(pki_dir, agent, IdentityKind::Agent, &[]).expect("agent cert");
        Self::start(
            replicas,
            &pki_dir.join("ca.crt"),
            &crt,
            &key,
            scripts,
            window,
            hold,
        )
        .await
    }

    /// `replicas` listeners on loopback with the coordinator identity
    /// `cert`/`key` (clients must present a certificate of `ca`); the n-th
    /// session opened on any of them gets `scripts[n]` (the last repeats).
    /// Each replica advertises an HTTP/2 stream window of `window` bytes,
    /// so that a stream nobody reads fills up after a few messages.
    pub async fn start(
        replicas: usize,
        ca: &Path,
        cert: &Path,
        key: &Path,
        scripts: Vec<Script>,
        window: u32,
        hold: Duration,
    ) -> FakeCoordinator {
        let read = |p: &Path| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(read(cert), read(key)))
            .client_ca_root(Certificate::from_pem(read(ca)));
        let log = Arc::new(Mutex::new(FakeLog::default()));
        let fake = Fake {
            scripts: Arc::new(scripts),
            log: log.clone(),
            hold,
        };
        let mut urls = Vec::new();
        let mut tasks = Vec::new();
        for _ in 0..replicas {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr: SocketAddr = listener.local_addr().expect("addr");
            urls.push(format!("https://{addr}"));
            let server = Server::builder()
                .tls_config(tls.clone())
                .expect("tls")
                .initial_stream_window_size(Some(window))
                .initial_connection_window_size(Some(window.max(65_535)))
                .add_service(AgentServiceServer::new(fake.clone()));
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            tasks.push(tokio::spawn(async move {
                let _ = server.serve_with_incoming(incoming).await;
            }));
        }
        FakeCoordinator { urls, log, tasks }
    }

    pub fn log(&self) -> FakeLog {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for FakeCoordinator {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}
