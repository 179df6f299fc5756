//! Liveness: every long-running loop of the agent proves that it still
//! turns, and systemd's watchdog restarts an agent whose loops stopped.
//!
//! A node agent that hangs for good is the worst failure it can have: the
//! node looks alive (the process runs, its TCP connections are open) while
//! nobody hears from it, and a VIP candidate is gone. Two layers keep that
//! from lasting:
//!
//! 1. **No await without a deadline** in the agent's loops (sends that can
//!    block are `try_send` or bounded; netlink calls carry
//!    [`crate::address::NETLINK_DEADLINE`]; dials and stream opens have
//!    timeouts). That is the rule; this module is the net under it.
//! 2. Each loop owns a [`Beat`] and marks it every time its `select!` wakes
//!    (every loop has a [`KEEPALIVE`] tick, so an idle loop still wakes).
//!    [`run_watchdog`] sends systemd `WATCHDOG=1` only while **every** beat
//!    is younger than the stall limit. A loop stuck in an await stops its
//!    beat, the pings stop, systemd kills the agent (`WatchdogSec=` in the
//!    packaged unit) and restarts it, and `ExecStopPost=` releases its VIPs
//!    first.
//!
//! The notification protocol is sd_notify(3): datagrams to the socket in
//! `$NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace), with
//! `$WATCHDOG_USEC` (and `$WATCHDOG_PID`, which must be ours) saying that
//! the watchdog is on and how long systemd waits between pings.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// How often an otherwise idle loop wakes just to beat.
pub const KEEPALIVE: Duration = Duration::from_secs(1);

/// A loop's proof of life: the time of its last wake-up.
#[derive(Debug, Clone)]
pub struct Beat {
    name: &'static str,
    origin: Instant,
    /// Milliseconds since `origin` of the last beat.
    last_ms: Arc<AtomicU64>,
}

impl Beat {
    /// Marks the loop alive now.
    pub fn beat(&self) {
        let now = self.origin.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(now, Ordering::Relaxed);
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// How long ago the loop last beat.
    pub fn age(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.origin.elapsed().saturating_sub(last)
    }

    /// Sleeps for `d`, still beating: a loop waiting on its own timer is
    /// alive.
    pub async fn sleep(&self, d: Duration) {
        let until = tokio::time::Instant::now() + d;
        loop {
            self.beat();
            let next = (tokio::time::Instant::now() + KEEPALIVE).min(until);
            tokio::time::sleep_until(next).await;
            if next >= until {
                self.beat();
                return;
            }
        }
    }
}

/// The beats of every loop that must keep turning.
#[derive(Debug, Clone)]
pub struct Liveness {
    origin: Instant,
    beats: Arc<std::sync::Mutex<Vec<Beat>>>,
}

impl Default for Liveness {
    fn default() -> Self {
        Self::new()
    }
}

impl Liveness {
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
            beats: Arc::default(),
        }
    }

    /// A new beat named after its loop, alive now.
    pub fn register(&self, name: &'static str) -> Beat {
        let beat = Beat {
            name,
            origin: self.origin,
            last_ms: Arc::default(),
        };
        beat.beat();
        // A poisoned lock only means another registration panicked; the
        // list itself is always whole.
        let mut beats = self.beats.lock().unwrap_or_else(|p| p.into_inner());
        beats.push(beat.clone());
        beat
    }

    /// The first loop that has not beaten within `limit`, with its age.
    pub fn stalled(&self, limit: Duration) -> Option<(&'static str, Duration)> {
        let beats = self.beats.lock().unwrap_or_else(|p| p.into_inner());
        beats
            .iter()
            .map(|b| (b.name, b.age()))
            .find(|(_, age)| *age > limit)
    }
}

/// Where and how often to tell systemd we are alive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watchdog {
    pub socket: NotifySocket,
    /// systemd's `WatchdogSec=`: it kills us this long after the last ping.
    pub timeout: Duration,
}

/// The sd_notify socket: a file system path or an abstract name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifySocket {
    Path(PathBuf),
    Abstract(Vec<u8>),
}

impl NotifySocket {
    /// `$NOTIFY_SOCKET`, if systemd gave us one.
    pub fn from_env() -> Option<NotifySocket> {
        let value = std::env::var_os("NOTIFY_SOCKET")?;
        Self::parse(&value.to_string_lossy())
    }

    fn parse(value: &str) -> Option<NotifySocket> {
        match value.strip_prefix('@') {
            Some(name) if !name.is_empty() => Some(NotifySocket::Abstract(name.as_bytes().into())),
            Some(_) => None,
            None if value.starts_with('/') => Some(NotifySocket::Path(value.into())),
            None => None,
        }
    }

    /// Sends one sd_notify message ("READY=1", "WATCHDOG=1", ...).
    pub fn notify(&self, message: &str) -> std::io::Result<()> {
        let socket = UnixDatagram::unbound()?;
        socket.set_nonblocking(true)?;
        match self {
            NotifySocket::Path(path) => socket.send_to(message.as_bytes(), path)?,
            NotifySocket::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                socket.send_to_addr(message.as_bytes(), &addr)?
            }
        };
        Ok(())
    }
}

impl Watchdog {
    /// The watchdog systemd asked for through the environment, if any.
    pub fn from_env() -> Option<Watchdog> {
        let socket = NotifySocket::from_env()?;
        let usec = std::env::var("WATCHDOG_USEC").ok()?;
        let pid = std::env::var("WATCHDOG_PID").ok();
        Self::parse(socket, &usec, pid.as_deref(), std::process::id())
    }

    fn parse(socket: NotifySocket, usec: &str, pid: Option<&str>, me: u32) -> Option<Watchdog> {
        // WATCHDOG_PID names the process meant; a child that inherited the
        // environment must not ping for its parent.
        if pid.is_some_and(|p| p.parse::<u32>().ok() != Some(me)) {
            return None;
        }
        let usec: u64 = usec.parse().ok().filter(|u| *u > 0)?;
        Some(Watchdog {
            socket,
            timeout: Duration::from_micros(usec),
        })
    }

    /// A loop that has not beaten for this long is stuck: half of systemd's
    /// timeout, so that the pings stop well before systemd would give up on
    /// a healthy agent, and never less than a few keepalives.
    pub fn stall_limit(&self) -> Duration {
        (self.timeout / 2).max(KEEPALIVE * 3)
    }

    /// How often to check and ping: four times per systemd timeout.
    pub fn ping_every(&self) -> Duration {
        (self.timeout / 4).max(Duration::from_millis(100))
    }
}

/// Tells systemd (if it runs us under `Type=notify`) that start-up is done.
pub fn notify_ready() {
    if let Some(socket) = NotifySocket::from_env() {
        if let Err(error) = socket.notify("READY=1") {
            warn!(%error, "cannot tell systemd the agent is ready");
        }
    }
}

/// Pings systemd's watchdog while every loop in `liveness` turns; stops
/// pinging (and says which loop and since when) as soon as one does not.
/// Returns at `shutdown`; does nothing without a watchdog.
pub async fn run_watchdog(
    watchdog: Option<Watchdog>,
    liveness: Liveness,
    shutdown: CancellationToken,
) {
    let Some(watchdog) = watchdog else {
        debug!("no systemd watchdog");
        return;
    };
    let limit = watchdog.stall_limit();
    let mut tick = tokio::time::interval(watchdog.ping_every());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stalled_before = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match liveness.stalled(limit) {
            None => {
                stalled_before = false;
                if let Err(error) = watchdog.socket.notify("WATCHDOG=1") {
                    warn!(%error, "cannot ping systemd's watchdog");
                }
            }
            Some((name, age)) => {
                if !stalled_before {
                    warn!(
                        loop.name = name,
                        stalled_for = ?age,
                        watchdog = ?watchdog.timeout,
                        "a loop stopped turning: no more watchdog pings, systemd will restart the agent"
                    );
                }
                stalled_before = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_socket_forms() {
        assert_eq!(
            NotifySocket::parse("/run/systemd/notify"),
            Some(NotifySocket::Path("/run/systemd/notify".into()))
        );
        assert_eq!(
            NotifySocket::parse("@/org/freedesktop/systemd1/notify/1"),
            Some(NotifySocket::Abstract(
                b"/org/freedesktop/systemd1/notify/1".to_vec()
            ))
        );
        assert_eq!(NotifySocket::parse("@"), None);
        assert_eq!(NotifySocket::parse("relative"), None);
    }

    #[test]
    fn watchdog_only_for_our_pid() {
        let socket = NotifySocket::Path("/x".into());
        let w = Watchdog::parse(socket.clone(), "20000000", Some("42"), 42).expect("ours");
        assert_eq!(w.timeout, Duration::from_secs(20));
        assert_eq!(w.stall_limit(), Duration::from_secs(10));
        assert_eq!(w.ping_every(), Duration::from_secs(5));
        assert_eq!(
            Watchdog::parse(socket.clone(), "20000000", Some("7"), 42),
            None
        );
        assert_eq!(Watchdog::parse(socket.clone(), "0", None, 42), None);
        assert_eq!(Watchdog::parse(socket, "soon", None, 42), None);
    }

    #[test]
    fn a_loop_that_stops_beating_is_named() {
        let liveness = Liveness::new();
        let session = liveness.register("session");
        let _vips = liveness.register("vips");
        assert_eq!(liveness.stalled(Duration::from_secs(1)), None);
        std::thread::sleep(Duration::from_millis(120));
        session.beat();
        let (name, age) = liveness
            .stalled(Duration::from_millis(100))
            .expect("vips did not beat");
        assert_eq!(name, "vips");
        assert!(age >= Duration::from_millis(120), "{age:?}");
    }

    /// The pings reach a real datagram socket while both loops beat, and
    /// stop once one of them is stuck.
    #[tokio::test]
    async fn pings_stop_when_a_loop_stalls() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).expect("bind");
        server.set_nonblocking(true).expect("nonblocking");
        let watchdog = Watchdog {
            socket: NotifySocket::Path(path),
            timeout: Duration::from_millis(400),
        };
        let liveness = Liveness::new();
        let alive = liveness.register("session");
        let stuck = liveness.register("vips");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run_watchdog(Some(watchdog), liveness, shutdown.clone()));
        let count = |server: &UnixDatagram| {
            let mut buf = [0u8; 64];
            let mut n = 0;
            while let Ok(len) = server.recv(&mut buf) {
                assert_eq!(&buf[..len], b"WATCHDOG=1");
                n += 1;
            }
            n
        };
        // Both beat: pings flow.
        for _ in 0..10 {
            alive.beat();
            stuck.beat();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(count(&server) >= 3, "no pings while every loop turned");
        // `vips` stops; `session` goes on. The stall limit is
        // max(200 ms, 3 s keepalives): after it, no ping may follow.
        let stop_at = Instant::now();
        while stop_at.elapsed() < KEEPALIVE * 3 + Duration::from_millis(300) {
            alive.beat();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        count(&server);
        for _ in 0..10 {
            alive.beat();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(count(&server), 0, "pinged although `vips` was stuck");
        shutdown.cancel();
        task.await.expect("watchdog task");
    }
}
