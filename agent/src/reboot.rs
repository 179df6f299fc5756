//! Reboots: whether the host needs one, and the one reboot a coordinator
//! asks for (a reboot rollout, DESIGN.md §7).
//!
//! - [`run_reboot_check`] looks every `reboot_check_interval_s` at
//!   `/run/reboot-required` (Debian; the packages from
//!   `/run/reboot-required.pkgs`) and, only where it is installed, at
//!   `needs-restarting -r` (exit 1: a reboot is needed; RPM hosts). The
//!   session sends the facts again when the answer changes.
//! - [`run_reboots`] acts on the desired state's [`RebootRequest`]: once
//!   per generation, and only while the host still runs the boot the
//!   request names. What it did is written to `reboot.json` in the state
//!   directory *before* `systemctl reboot`, so the agent that starts after
//!   the reboot, seeing the same request, does nothing ([`decide`]).
//!
//! **Architecture invariant:** the agent reboots only for a request whose
//! generation is newer than the one it recorded and whose boot id is the
//! one it runs: neither a replayed desired state nor a fresh state
//! directory can make a host reboot twice for one request.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use steward_proto::domain::{RebootRequest, RebootRequired};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::state::RecordedState;

/// Debian's marker: a reboot is needed while it exists.
pub const REBOOT_REQUIRED: &str = "/run/reboot-required";
/// The packages that asked for it, one a line.
pub const REBOOT_REQUIRED_PKGS: &str = "/run/reboot-required.pkgs";
/// Where RPM hosts have `needs-restarting` (yum-utils, dnf-utils).
const NEEDS_RESTARTING: [&str; 2] = ["/usr/bin/needs-restarting", "/usr/sbin/needs-restarting"];
/// `needs-restarting -r` gets this long.
const NEEDS_RESTARTING_TIMEOUT: Duration = Duration::from_secs(30);
/// At most this many packages are reported, each cut to this length.
pub const MAX_PACKAGES: usize = 64;
const MAX_PACKAGE_LEN: usize = 128;
/// This boot's id, from the kernel (systemd-nspawn gives each container
/// boot its own).
pub const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// This boot's id ("" if it cannot be read).
pub fn boot_id() -> String {
    std::fs::read_to_string(BOOT_ID)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// The packages of a `reboot-required.pkgs` text: one a line, each once,
/// in order, bounded.
pub fn packages(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let name: String = line.chars().take(MAX_PACKAGE_LEN).collect();
        if !out.contains(&name) {
            out.push(name);
        }
        if out.len() == MAX_PACKAGES {
            break;
        }
    }
    out
}

/// What the host's signs say: the Debian marker (its mtime, the package
/// list) wins; else `needs-restarting -r` exiting 1, seen first at
/// `first_seen_unix_ms`.
pub fn reboot_required(
    marker_mtime_unix_ms: Option<u64>,
    pkgs: Option<&str>,
    needs_restarting_exit: Option<i32>,
    first_seen_unix_ms: u64,
) -> Option<RebootRequired> {
    if let Some(since) = marker_mtime_unix_ms {
        return Some(RebootRequired {
            since_unix_ms: since,
            source: "reboot-required".into(),
            packages: pkgs.map(packages).unwrap_or_default(),
        });
    }
    (needs_restarting_exit == Some(1)).then(|| RebootRequired {
        since_unix_ms: first_seen_unix_ms,
        source: "needs-restarting".into(),
        packages: Vec::new(),
    })
}

/// Where [`check`] looks (tests point it elsewhere).
#[derive(Debug, Clone)]
pub struct RebootSigns {
    pub marker: PathBuf,
    pub pkgs: PathBuf,
    pub needs_restarting: Vec<PathBuf>,
}

impl Default for RebootSigns {
    fn default() -> Self {
        Self {
            marker: REBOOT_REQUIRED.into(),
            pkgs: REBOOT_REQUIRED_PKGS.into(),
            needs_restarting: NEEDS_RESTARTING.iter().map(PathBuf::from).collect(),
        }
    }
}

fn mtime_unix_ms(path: &Path) -> Option<u64> {
    let modified = std::fs::metadata(path).ok()?.modified().ok()?;
    Some(
        modified
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    )
}

/// One look at the host; `previous` keeps the `since` of a need that
/// `needs-restarting` still reports.
pub async fn check(
    signs: &RebootSigns,
    previous: Option<&RebootRequired>,
) -> Option<RebootRequired> {
    let marker = mtime_unix_ms(&signs.marker);
    let pkgs = std::fs::read_to_string(&signs.pkgs).ok();
    let mut exit = None;
    if marker.is_none() {
        if let Some(binary) = signs.needs_restarting.iter().find(|p| p.exists()) {
            let mut cmd = tokio::process::Command::new(binary);
            cmd.arg("-r")
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true);
            match tokio::time::timeout(NEEDS_RESTARTING_TIMEOUT, cmd.status()).await {
                Ok(Ok(status)) => exit = status.code(),
                Ok(Err(error)) => {
                    warn!(%error, binary = %binary.display(), "needs-restarting failed")
                }
                Err(_) => warn!(binary = %binary.display(), "needs-restarting -r timed out"),
            }
        }
    }
    let first_seen = previous
        .filter(|p| p.source == "needs-restarting")
        .map_or_else(crate::unix_ms, |p| p.since_unix_ms);
    reboot_required(marker, pkgs.as_deref(), exit, first_seen)
}

/// Looks at the host every `every` until `shutdown`, publishing the answer
/// on `tx` when it changes.
pub async fn run_reboot_check(
    signs: RebootSigns,
    every: Duration,
    tx: watch::Sender<Option<RebootRequired>>,
    shutdown: CancellationToken,
) {
    loop {
        let previous = tx.borrow().clone();
        let now = check(&signs, previous.as_ref()).await;
        if now != previous {
            match &now {
                Some(r) => info!(source = %r.source, packages = ?r.packages, "host needs a reboot"),
                None => info!("host needs no reboot"),
            }
            tx.send_replace(now);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// `reboot.json` in the state directory: the last reboot request acted on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebootDone {
    pub generation: u64,
    /// The boot it was asked of (and rebooted from).
    pub boot_id: String,
    pub at_unix_ms: u64,
}

/// What to do with a desired state's reboot request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Nothing asked.
    Nothing,
    /// Done already for this generation (or a newer one).
    Done,
    /// Asked of another boot: the host rebooted since it was asked.
    OtherBoot,
    Reboot,
}

/// Whether to reboot for `request`, having done `done`, running boot
/// `boot_id`.
pub fn decide(
    request: Option<&RebootRequest>,
    done: Option<&RebootDone>,
    boot_id: &str,
) -> Decision {
    let Some(request) = request else {
        return Decision::Nothing;
    };
    if done.is_some_and(|d| d.generation >= request.generation) {
        return Decision::Done;
    }
    if boot_id.is_empty() || request.boot_id != boot_id {
        return Decision::OtherBoot;
    }
    Decision::Reboot
}

/// `reboot.json` under `state_dir`.
#[derive(Debug, Clone)]
pub struct RebootLog {
    path: PathBuf,
}

impl RebootLog {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join("reboot.json"),
        }
    }

    /// The last reboot done (`None`: never, or unreadable: logged).
    pub fn load(&self) -> Option<RebootDone> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(error) => {
                warn!(%error, path = %self.path.display(), "cannot read the reboot record");
                return None;
            }
        };
        serde_json::from_slice(&bytes)
            .map_err(|error| warn!(%error, path = %self.path.display(), "corrupt reboot record"))
            .ok()
    }

    pub fn save(&self, done: &RebootDone) -> std::io::Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let bytes = serde_json::to_vec_pretty(done).map_err(std::io::Error::other)?;
        crate::certs::write_atomic(&self.path, &bytes, 0o644)
    }
}

/// How the host is rebooted (a fake in tests).
pub trait Rebooter: Send + Sync {
    fn reboot(&self) -> std::io::Result<()>;
}

/// `systemctl reboot`.
pub struct SystemdReboot;

impl Rebooter for SystemdReboot {
    fn reboot(&self) -> std::io::Result<()> {
        let status = std::process::Command::new("systemctl")
            .arg("reboot")
            .stdin(std::process::Stdio::null())
            .status()?;
        if status.success() {
            Ok(())
        } else {
            Err(std::io::Error::other(format!("systemctl reboot: {status}")))
        }
    }
}

/// One look at the request in force: records and reboots if [`decide`]
/// says so. Returns the decision.
pub fn act(
    request: Option<&RebootRequest>,
    log: &RebootLog,
    boot_id: &str,
    rebooter: &dyn Rebooter,
) -> Decision {
    let decision = decide(request, log.load().as_ref(), boot_id);
    let Some(request) = request.filter(|_| decision == Decision::Reboot) else {
        return decision;
    };
    let done = RebootDone {
        generation: request.generation,
        boot_id: boot_id.to_owned(),
        at_unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    };
    // Recorded first: if the record cannot be written, no reboot (never
    // twice beats once).
    if let Err(error) = log.save(&done) {
        error!(%error, generation = request.generation, "cannot record the reboot; not rebooting");
        return Decision::Nothing;
    }
    info!(generation = request.generation, boot.id = %boot_id, "rebooting as asked");
    if let Err(error) = rebooter.reboot() {
        error!(%error, generation = request.generation, "reboot failed");
    }
    decision
}

/// Acts on every desired state in force until `shutdown`.
pub async fn run_reboots(
    state_dir: PathBuf,
    mut desired: watch::Receiver<RecordedState>,
    rebooter: std::sync::Arc<dyn Rebooter>,
    shutdown: CancellationToken,
) {
    let log = RebootLog::new(&state_dir);
    let boot = boot_id();
    loop {
        let request = desired.borrow_and_update().desired.reboot.clone();
        if request.is_some() {
            let (log, boot, rebooter) = (log.clone(), boot.clone(), rebooter.clone());
            // Blocking (a file write, systemctl), rare and short.
            let acted = tokio::task::spawn_blocking(move || {
                act(request.as_ref(), &log, &boot, rebooter.as_ref())
            });
            if let Err(error) = acted.await {
                error!(%error, "the reboot task failed");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = desired.changed() => if r.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[derive(Default)]
    struct CountingReboot(AtomicU32);

    impl Rebooter for CountingReboot {
        fn reboot(&self) -> std::io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn request(generation: u64, boot_id: &str) -> RebootRequest {
        RebootRequest {
            generation,
            boot_id: boot_id.into(),
        }
    }

    #[test]
    fn a_request_reboots_once_even_when_the_same_state_comes_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = RebootLog::new(&dir.path().join("state"));
        let host = CountingReboot::default();
        let asked = request(42, "boot-a");
        assert_eq!(act(None, &log, "boot-a", &host), Decision::Nothing);
        assert_eq!(act(Some(&asked), &log, "boot-a", &host), Decision::Reboot);
        assert_eq!(host.0.load(Ordering::SeqCst), 1);
        // The record was written before the reboot.
        assert_eq!(
            log.load().map(|d| (d.generation, d.boot_id)),
            Some((42, "boot-a".to_owned()))
        );
        // Back after the reboot (a new boot), the same request: nothing.
        assert_eq!(act(Some(&asked), &log, "boot-b", &host), Decision::Done);
        // Even if the reboot had not happened (same boot): nothing.
        assert_eq!(act(Some(&asked), &log, "boot-a", &host), Decision::Done);
        assert_eq!(host.0.load(Ordering::SeqCst), 1);
        // A newer request of the boot it runs: once more.
        assert_eq!(
            act(Some(&request(50, "boot-b")), &log, "boot-b", &host),
            Decision::Reboot
        );
        assert_eq!(host.0.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_request_of_another_boot_never_reboots() {
        // A fresh state directory (reinstalled agent) or a host that
        // rebooted since it was asked: the boot ids differ.
        let dir = tempfile::tempdir().expect("tempdir");
        let log = RebootLog::new(dir.path());
        let host = CountingReboot::default();
        assert_eq!(
            act(Some(&request(7, "boot-a")), &log, "boot-b", &host),
            Decision::OtherBoot
        );
        assert_eq!(
            act(Some(&request(7, "boot-a")), &log, "", &host),
            Decision::OtherBoot
        );
        assert_eq!(host.0.load(Ordering::SeqCst), 0);
        assert_eq!(log.load(), None);
    }

    #[test]
    fn no_reboot_when_the_record_cannot_be_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        // The state directory is a file: nothing can be written under it.
        let blocked = dir.path().join("file");
        std::fs::write(&blocked, b"x").expect("write");
        let log = RebootLog::new(&blocked);
        let host = CountingReboot::default();
        assert_eq!(
            act(Some(&request(1, "boot-a")), &log, "boot-a", &host),
            Decision::Nothing
        );
        assert_eq!(host.0.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn the_host_signs_are_read() {
        let pkgs = "linux-image-6.1.0-18-amd64\n\nlibc6\nlinux-image-6.1.0-18-amd64\n";
        assert_eq!(
            reboot_required(Some(5), Some(pkgs), None, 9),
            Some(RebootRequired {
                since_unix_ms: 5,
                source: "reboot-required".into(),
                packages: vec!["linux-image-6.1.0-18-amd64".into(), "libc6".into()],
            })
        );
        assert_eq!(reboot_required(None, Some(pkgs), None, 9), None);
        assert_eq!(reboot_required(None, None, Some(0), 9), None);
        assert_eq!(
            reboot_required(None, None, Some(1), 9).map(|r| (r.source, r.since_unix_ms)),
            Some(("needs-restarting".to_owned(), 9))
        );
        let many: String = (0..200).map(|i| format!("p{i}\n")).collect();
        assert_eq!(packages(&many).len(), MAX_PACKAGES);
    }

    #[tokio::test]
    async fn the_marker_files_are_looked_at() {
        let dir = tempfile::tempdir().expect("tempdir");
        let signs = RebootSigns {
            marker: dir.path().join("reboot-required"),
            pkgs: dir.path().join("reboot-required.pkgs"),
            needs_restarting: vec![dir.path().join("no-such-binary")],
        };
        assert_eq!(check(&signs, None).await, None);
        std::fs::write(&signs.marker, b"*** System restart required ***\n").expect("marker");
        std::fs::write(&signs.pkgs, b"linux-base\n").expect("pkgs");
        let seen = check(&signs, None).await.expect("a reboot is needed");
        assert_eq!(seen.packages, ["linux-base"]);
        assert!(seen.since_unix_ms > 0);
    }
}
