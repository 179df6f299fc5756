//! Test hosts that boot real systemd: `systemd-nspawn` containers on a
//! [`TestNet`]'s bridge, for end-to-end tests where the agent installs and
//! runs real packages (HAProxy, GlusterFS) with a real `apt-get` and no
//! network beyond the test's wire.
//!
//! ```text
//!   $STEWARD_TEST_CACHE (default /var/cache/steward-tests), built once:
//!     base-bookworm-<key>/   debootstrap minbase + systemd, made for tests
//!     repo-<key>/            the .debs some packages need beyond the base, + Packages
//!   $TMPDIR/stn-<pid>-<k>-<name>/, one per machine, removed on drop:
//!     upper/ work/ root/     overlayfs: the base (read-only) + this machine's changes
//!     console.log            nspawn's output: the machine's console
//! ```
//!
//! - [`BaseImage::ensure`] and [`LocalRepo::ensure`] build into a temporary
//!   directory and rename it into place while holding an exclusive `flock`
//!   on `<cache>/.lock`, so parallel tests (threads or processes) build each
//!   once. Directory names carry a hash of everything their content depends
//!   on (suite, packages, the customization script): change one and the
//!   next run builds anew. `rm -rf` the cache to clear it.
//! - The base is made for tests: apt knows only the local repository
//!   (`deb [trusted=yes] file:/srv/repo ./`, bound in at boot; no
//!   recommends; dpkg and debconf non-interactive), timers and units that
//!   would reach a network are masked, `/etc/machine-id` is empty (each
//!   boot takes nspawn's random container UUID), there is no DNS.
//! - [`Machine::boot`] runs `systemd-nspawn --boot` in the [`TestNet`]'s
//!   switch namespace with `--network-bridge`, so the machine's `host0` is a
//!   port of the same bridge as the net's hosts and its gateway `.1`. A
//!   oneshot unit gives `host0` its address: machines count down from
//!   `.199` while [`TestNet::add_host`] counts up from `.10`. No default
//!   route.
//! - Commands run inside through `nsenter --target <container PID 1> --all`
//!   (no `machinectl` without a host systemd). They keep the test's
//!   privileges, not the container's capability set: run what must meet the
//!   container's limits as a systemd unit inside.
//! - Machine names, directories, cgroups and nspawn's veth (a hash of the
//!   name) carry the test's pid (`stn-<pid>-<k>-<name>`); [`Machine::boot`]
//!   first removes what test processes that no longer exist left behind:
//!   their nspawn processes (found by their `--machine=` argument), overlay
//!   mounts, directories and cgroups. Dropping a [`Machine`] halts it,
//!   unmounts and removes its directory and cgroup, also when the test
//!   panics. No process is signalled that this harness did not start.
//!
//! - A machine whose systemd reboots ends its nspawn with status 133
//!   ([`NSPAWN_REBOOTED`]); [`Machine::restart_if_rebooted`] then boots
//!   it again from the same command line (name, root overlay, binds,
//!   bridge, address), as `systemd-nspawn@.service` would restart it.
//!   Tests poll it while they expect reboots.
//!
//! Pitfalls met without a host systemd: `ip netns exec` remounts `/sys`,
//! which hides the cgroup mounts nspawn needs ("Failed to determine whether
//! the unified cgroups hierarchy is used"), so nspawn enters the switch
//! namespace with `nsenter --net` instead; `--register=no --keep-unit` are
//! required; with `--keep-unit` nspawn runs the container in its caller's
//! cgroup, so each machine gets a cgroup of its own first (see
//! `MachineCgroup`); SIGKILL to nspawn does not stop its container (PID 1
//! is reparented and runs on), so a crash is a SIGKILL of the container's
//! PID 1.
//!
//! Needs root, `systemd-nspawn` (systemd-container), `debootstrap`,
//! `dpkg-dev`, `nsenter` (util-linux), and the Debian mirror the first time
//! (`scripts/deps.sh` installs the tools).

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use nix::mount::MntFlags;
use nix::sys::signal::Signal;

use crate::netns::{command_line, TestNet, FIRST_HOST_OCTET, LAST_HOST_OCTET};

const SUITE: &str = "bookworm";
/// Used when the host's apt configuration names no plain-http mirror for
/// [`SUITE`].
const FALLBACK_MIRROR: &str = "http://deb.debian.org/debian";
/// Beyond minbase: systemd as PID 1, `ip` for `host0`, `ping` for tests.
const BASE_INCLUDE: &str = "systemd,systemd-sysv,dbus,iproute2,iputils-ping";
/// Run in the fresh debootstrap root (chroot) before it becomes the base.
const CUSTOMIZE: &str = r#"set -eu
# Each boot takes nspawn's random container UUID as its machine id; the
# D-Bus copy would give every machine debootstrap's.
: > /etc/machine-id
ln -sf /etc/machine-id /var/lib/dbus/machine-id
# No way out: no DNS server, and the hostname is set per machine.
: > /etc/resolv.conf
: > /etc/hostname
# apt: only the local repository (bound at /srv/repo at boot). It holds no
# recommends, so none are asked for; nothing may prompt.
rm -f /etc/apt/sources.list.d/*
echo 'deb [trusted=yes] file:/srv/repo ./' > /etc/apt/sources.list
cat > /etc/apt/apt.conf.d/90steward-tests <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
APT::Periodic::Enable "0";
Dpkg::Options { "--force-confdef"; "--force-confold"; };
EOF
echo 'debconf debconf/frontend select Noninteractive' | debconf-set-selections
apt-get clean
rm -rf /var/lib/apt/lists/*
# Nothing periodic, nothing that waits for or configures a network, nothing
# a container cannot do.
for unit in apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer \
    e2scrub_all.timer e2scrub_reap.service fstrim.timer systemd-pstore.service \
    systemd-networkd.service systemd-networkd.socket \
    systemd-networkd-wait-online.service; do
  ln -sf /dev/null "/etc/systemd/system/$unit"
done
cat > /etc/systemd/system/steward-test-network.service <<'EOF'
[Unit]
Description=Test network: host0's address (steward-tests)
Before=network.target
Wants=network.target

[Service]
Type=oneshot
RemainAfterExit=yes
EnvironmentFile=/etc/steward-test/network.env
ExecStart=/usr/bin/ip link set host0 up
ExecStart=/usr/bin/ip address add ${ADDRESS} dev host0

[Install]
WantedBy=multi-user.target
EOF
ln -sf /etc/systemd/system/steward-test-network.service \
    /etc/systemd/system/multi-user.target.wants/
"#;
const NETWORK_UNIT: &str = "steward-test-network.service";
/// Where the local repository is bound in a machine.
const REPO_IN_MACHINE: &str = "/srv/repo";
/// Machine names, machine directories: `stn-<pid>-<k>-<name>`.
const MACHINE_PREFIX: &str = "stn-";
/// nspawn's per-machine directory on the host; it stays behind when nspawn
/// is killed.
const NSPAWN_PROPAGATE: &str = "/run/systemd/nspawn/propagate";
/// The environment of commands run inside (the test's own is not passed).
const MACHINE_ENV: &[(&str, &str)] = &[
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("LANG", "C.UTF-8"),
    ("HOME", "/root"),
    ("DEBIAN_FRONTEND", "noninteractive"),
];
/// Lines of the console shown when boot fails or a test panics.
const CONSOLE_TAIL: usize = 40;

/// Per-process counter: the `<k>` in machine names.
static NEXT_MACHINE: AtomicU32 = AtomicU32::new(0);
/// Host octets and names of this process's live machines, per [`TestNet`]
/// (keyed by its switch namespace).
static MACHINES: Mutex<BTreeMap<String, BTreeMap<u8, String>>> = Mutex::new(BTreeMap::new());
/// Serializes the sweep of leftovers within this process.
static SWEEP: Mutex<()> = Mutex::new(());

/// Runs `cmd` (stdin null); panics with its command line and output if it
/// cannot start or fails.
fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{}`: {e}", command_line(cmd)));
    assert!(
        out.status.success(),
        "`{}` failed ({}):\n{}{}",
        command_line(cmd),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `cmd` with stdout and stderr appended to `log`; panics with the
/// log's last lines if it fails.
fn run_logged(cmd: &mut Command, log: &Path) {
    let file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", log.display()));
    let err = file.try_clone().expect("clone log file handle");
    let status = cmd
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .status()
        .unwrap_or_else(|e| panic!("cannot run `{}`: {e}", command_line(cmd)));
    assert!(
        status.success(),
        "`{}` failed ({status}); last lines of {}:\n{}",
        command_line(cmd),
        log.display(),
        tail(log, CONSOLE_TAIL)
    );
}

/// The last `lines` lines of a file (of its last 64 KiB).
fn tail(path: &Path, lines: usize) -> String {
    let mut text = String::new();
    if let Ok(mut f) = fs::File::open(path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
        let mut bytes = Vec::new();
        let _ = f.read_to_end(&mut bytes);
        text = String::from_utf8_lossy(&bytes).into_owned();
    }
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false)
}

/// Panics unless we are root and `programs` ((program, Debian package))
/// are installed.
fn require(programs: &[(&str, &str)]) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "nspawn test machines need root"
    );
    let missing: Vec<&str> = programs
        .iter()
        .filter(|(program, _)| !on_path(program))
        .map(|(_, package)| *package)
        .collect();
    assert!(
        missing.is_empty(),
        "nspawn test machines need {}: run scripts/deps.sh (or apt-get install {})",
        missing.join(", "),
        missing.join(" ")
    );
}

/// Whether `pid` has exited (gone, or a zombie nobody reaped yet).
fn pid_exited(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}

/// The process's start time (clock ticks after boot): with the pid, it
/// names one process, even if the pid is reused later.
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after "pid (comm)": state is the 3rd field, starttime the 22nd.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

fn signal(pid: u32, signal: Signal) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX));
    let _ = nix::sys::signal::kill(pid, signal);
}

fn pids() -> impl Iterator<Item = u32> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// 64-bit FNV-1a: a hash that stays the same across Rust releases, for
/// cache keys.
fn fnv1a(parts: &[&str]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.bytes().chain(std::iter::once(0)) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    hash
}

// ---- mounts ----

/// `/proc/self/mountinfo` escapes space, tab, newline and `\` as `\ooo`.
fn unescape_mountinfo(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from(
        <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&out),
    ))
}

/// Mount points at or beneath `dir` in this mount namespace, in mount
/// order.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|p| p.starts_with(dir))
        .collect()
}

/// Unmounts everything at or beneath `dir`, the latest mounts first, and
/// removes `dir` unless something stays mounted there (never deletes
/// through a mount). Failures are reported, never fatal.
fn remove_tree(dir: &Path) {
    for mount in mounts_under(dir).iter().rev() {
        if let Err(e) = nix::mount::umount2(mount, MntFlags::MNT_DETACH) {
            eprintln!("nspawn cleanup: cannot unmount {}: {e}", mount.display());
        }
    }
    let left = mounts_under(dir);
    if !left.is_empty() {
        eprintln!(
            "nspawn cleanup: {} still has mounts ({left:?}); not removed",
            dir.display()
        );
        return;
    }
    if let Err(e) = fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            eprintln!("nspawn cleanup: cannot remove {}: {e}", dir.display());
        }
    }
}

/// A directory removed on drop with whatever is mounted beneath it.
struct ScratchDir(PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        remove_tree(&self.0);
    }
}

/// Mounts an overlay of `lower` (read-only) at `dir/root`, with its changes
/// in `dir/upper`; returns the root.
fn mount_overlay(lower: &Path, dir: &Path) -> PathBuf {
    let (upper, work, root) = (dir.join("upper"), dir.join("work"), dir.join("root"));
    for d in [&upper, &work, &root] {
        fs::create_dir_all(d).unwrap_or_else(|e| panic!("cannot create {}: {e}", d.display()));
    }
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    assert!(
        !options.contains(['\n', ' ']) && options.matches(',').count() == 2,
        "overlay paths must not contain ',', ' ' or newlines: {options}"
    );
    nix::mount::mount(
        Some("overlay"),
        &root,
        Some("overlay"),
        nix::mount::MsFlags::empty(),
        Some(options.as_str()),
    )
    .unwrap_or_else(|e| {
        panic!(
            "cannot mount an overlay at {} ({options}): {e}",
            root.display()
        )
    });
    root
}

// ---- cgroups ----

/// This process's cgroup in every mounted hierarchy: from
/// `/proc/self/cgroup` (`ID:controllers:path`) and the mounts of type
/// `cgroup` (super options name the controllers) and `cgroup2`.
fn own_cgroups() -> Vec<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    // (mount point, mount root, fs type, super options)
    let mounts: Vec<(PathBuf, String, &str, Vec<&str>)> = mountinfo
        .lines()
        .filter_map(|line| {
            let (head, tail) = line.split_once(" - ")?;
            let head: Vec<&str> = head.split(' ').collect();
            let tail: Vec<&str> = tail.split(' ').collect();
            let fstype = *tail.first()?;
            (fstype == "cgroup" || fstype == "cgroup2").then(|| {
                (
                    unescape_mountinfo(head.get(4).copied().unwrap_or_default()),
                    head.get(3).copied().unwrap_or("/").to_owned(),
                    fstype,
                    tail.get(2)
                        .copied()
                        .unwrap_or_default()
                        .split(',')
                        .collect(),
                )
            })
        })
        .collect();
    let cgroups = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    cgroups
        .lines()
        .filter_map(|line| {
            let mut fields = line.splitn(3, ':');
            let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
            let (point, root, _, _) = mounts.iter().find(|(_, _, fstype, options)| {
                if controllers.is_empty() {
                    *fstype == "cgroup2"
                } else {
                    *fstype == "cgroup" && controllers.split(',').all(|c| options.contains(&c))
                }
            })?;
            let relative = Path::new(path).strip_prefix(root.as_str()).ok()?;
            Some(point.join(relative))
        })
        .collect()
}

/// Removes the cgroup `dir` and the cgroups beneath it, deepest first (a
/// cgroup goes with `rmdir` once no process is left in it: killed
/// processes get up to 10 s to finish exiting).
fn remove_cgroup(dir: &Path) {
    let mut dirs = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < dirs.len() {
        let children: Vec<PathBuf> = fs::read_dir(&dirs[i])
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect();
        dirs.extend(children);
        i += 1;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let occupied = |d: &PathBuf| {
        fs::read_to_string(d.join("cgroup.procs")).is_ok_and(|p| !p.trim().is_empty())
    };
    while dirs.iter().any(occupied) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    for d in dirs.iter().rev() {
        if let Err(e) = fs::remove_dir(d) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("nspawn cleanup: cannot remove cgroup {}: {e}", d.display());
            }
        }
    }
}

/// A machine's own cgroup, `<our cgroup>/stn-<pid>-<k>-<name>` in every
/// hierarchy. Without a host systemd, nspawn (`--keep-unit`) would run the
/// container in the test's own cgroup, split into `payload` and
/// `supervisor`, which every machine would share: their systemds then
/// create and remove each other's unit cgroups and services fail at random
/// (`status=219/CGROUP`). Removed on drop, once the machine has stopped.
struct MachineCgroup(Vec<PathBuf>);

impl MachineCgroup {
    fn create(name: &str) -> MachineCgroup {
        let mut created = MachineCgroup(Vec::new());
        for parent in own_cgroups() {
            let dir = parent.join(name);
            fs::create_dir(&dir)
                .unwrap_or_else(|e| panic!("cannot create cgroup {}: {e}", dir.display()));
            created.0.push(dir.clone());
            // A v1 cpuset starts with no CPUs and memory nodes: no process
            // could join it.
            for file in ["cpuset.cpus", "cpuset.mems"] {
                if let Ok(value) = fs::read_to_string(parent.join(file)) {
                    fs::write(dir.join(file), value.trim())
                        .unwrap_or_else(|e| panic!("cannot set {}/{file}: {e}", dir.display()));
                }
            }
        }
        created
    }

    /// The `cgroup.procs` files a process writes its pid to, to join.
    fn procs_files(&self) -> Vec<PathBuf> {
        self.0.iter().map(|d| d.join("cgroup.procs")).collect()
    }
}

impl Drop for MachineCgroup {
    fn drop(&mut self) {
        for dir in &self.0 {
            remove_cgroup(dir);
        }
    }
}

/// Joins the cgroups named by the first `$1` arguments, then execs the
/// rest: nspawn and everything it starts are in the machine's cgroup from
/// their first instruction.
const JOIN_CGROUPS_AND_EXEC: &str = r#"n=$1; shift
while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 1; shift; n=$((n - 1)); done
exec "$@""#;

// ---- the cache: base image and local repository ----

/// The cache directory: `$STEWARD_TEST_CACHE`, default
/// `/var/cache/steward-tests`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("STEWARD_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/steward-tests"))
}

/// Builds `target` once (see the module docs): under the cache lock,
/// `build(tmp, log)` fills a temporary directory that is then renamed to
/// `target`.
fn ensure_built(target: &Path, what: &str, build: impl FnOnce(&Path, &Path)) {
    if target.is_dir() {
        return;
    }
    let cache = target.parent().expect("cache entries have a parent");
    fs::create_dir_all(cache).unwrap_or_else(|e| {
        panic!(
            "cannot create the test cache {} ({e}); set STEWARD_TEST_CACHE to a writable directory",
            cache.display()
        )
    });
    let lock_path = cache.join(".lock");
    let lock_file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", lock_path.display()));
    let _lock = match Flock::lock(lock_file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err((file, nix::errno::Errno::EWOULDBLOCK)) => {
            progress(&format!(
                "waiting for another test building in {}",
                cache.display()
            ));
            Flock::lock(file, FlockArg::LockExclusive)
                .unwrap_or_else(|(_, e)| panic!("cannot lock {}: {e}", lock_path.display()))
        }
        Err((_, e)) => panic!("cannot lock {}: {e}", lock_path.display()),
    };
    if target.is_dir() {
        return; // built by another test while we waited
    }
    // Only a builder holding the lock creates `.tmp-*`: any found now was
    // left by one that failed or died.
    for entry in fs::read_dir(cache).into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().starts_with(".tmp-") {
            remove_tree(&entry.path());
        }
    }
    let name = target
        .file_name()
        .expect("cache entries have a name")
        .to_string_lossy();
    let tmp = cache.join(format!(".tmp-{name}"));
    let log = cache.join(format!("{name}.log"));
    let _ = fs::remove_file(&log);
    fs::create_dir(&tmp).unwrap_or_else(|e| panic!("cannot create {}: {e}", tmp.display()));
    progress(&format!(
        "building {what} (once, a few minutes); log: {}",
        log.display()
    ));
    let started = Instant::now();
    build(&tmp, &log);
    fs::rename(&tmp, target).unwrap_or_else(|e| {
        panic!(
            "cannot rename {} to {}: {e}",
            tmp.display(),
            target.display()
        )
    });
    progress(&format!(
        "built {what} in {:.1} s",
        started.elapsed().as_secs_f64()
    ));
}

/// A line on the test's stderr even when libtest captures output (it
/// captures `eprintln!`, not writes to the stream): a build takes minutes
/// and the reason for the wait should show.
fn progress(line: &str) {
    let _ = writeln!(std::io::stderr(), "steward-tests: {line}");
}

/// `chroot ROOT ARGS` with the machine environment (plus the test's proxy
/// settings, for downloads).
fn chroot(root: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new("chroot");
    cmd.arg(root)
        .args(args)
        .env_clear()
        .envs(MACHINE_ENV.iter().copied());
    for (key, value) in std::env::vars() {
        if key.to_ascii_lowercase().ends_with("_proxy") {
            cmd.env(key, value);
        }
    }
    cmd
}

/// The mirror of the first `deb` entry for exactly `suite` with a plain
/// `http://` URI, in apt's order: `files` are (name, content) of
/// `sources.list` and `sources.list.d/*.list` (one-line format) and
/// `sources.list.d/*.sources` (deb822). Plain http because the base has no
/// CA certificates to fetch over https with.
fn mirror_from(files: &[(String, String)], suite: &str) -> Option<String> {
    files.iter().find_map(|(name, text)| {
        if name.ends_with(".sources") {
            deb822_mirror(text, suite)
        } else {
            one_line_mirror(text, suite)
        }
    })
}

fn one_line_mirror(text: &str, suite: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let line = line.split('#').next().unwrap_or_default();
        let mut tokens = line.split_whitespace();
        if tokens.next()? != "deb" {
            return None;
        }
        let mut uri = tokens.next()?;
        if uri.starts_with('[') {
            // Options: "[arch=amd64 signed-by=...]", maybe spread over tokens.
            while !uri.ends_with(']') {
                uri = tokens.next()?;
            }
            uri = tokens.next()?;
        }
        (uri.starts_with("http://") && tokens.next()? == suite)
            .then(|| uri.trim_end_matches('/').to_owned())
    })
}

fn deb822_mirror(text: &str, suite: &str) -> Option<String> {
    let mut stanzas: Vec<BTreeMap<String, String>> = vec![BTreeMap::new()];
    let mut last_key = None;
    for line in text.lines() {
        if line.trim().is_empty() {
            stanzas.push(BTreeMap::new());
            last_key = None;
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let stanza = stanzas.last_mut().expect("never empty");
        if line.starts_with([' ', '\t']) {
            if let Some(value) = last_key.as_ref().and_then(|k| stanza.get_mut(k)) {
                value.push(' ');
                value.push_str(line.trim());
            }
        } else if let Some((key, value)) = line.split_once(':') {
            let key = key.trim().to_ascii_lowercase();
            stanza.insert(key.clone(), value.trim().to_owned());
            last_key = Some(key);
        }
    }
    stanzas.iter().find_map(|s| {
        let field = |k: &str| s.get(k).map(String::as_str).unwrap_or_default();
        let enabled = !field("enabled").eq_ignore_ascii_case("no");
        let is_deb = field("types").split_whitespace().any(|t| t == "deb");
        let has_suite = field("suites").split_whitespace().any(|t| t == suite);
        if !(enabled && is_deb && has_suite) {
            return None;
        }
        field("uris")
            .split_whitespace()
            .find(|u| u.starts_with("http://"))
            .map(|u| u.trim_end_matches('/').to_owned())
    })
}

/// The host's Debian mirror for [`SUITE`] (see [`mirror_from`]), or
/// [`FALLBACK_MIRROR`].
fn host_mirror() -> String {
    let mut files = Vec::new();
    let list = Path::new("/etc/apt/sources.list");
    if let Ok(text) = fs::read_to_string(list) {
        files.push((list.display().to_string(), text));
    }
    let mut parts: Vec<PathBuf> = fs::read_dir("/etc/apt/sources.list.d")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "list" || e == "sources"))
        .collect();
    parts.sort();
    for path in parts {
        if let Ok(text) = fs::read_to_string(&path) {
            files.push((path.display().to_string(), text));
        }
    }
    mirror_from(&files, SUITE).unwrap_or_else(|| FALLBACK_MIRROR.to_owned())
}

/// The shared root filesystem of every [`Machine`]: Debian minbase with
/// systemd, made for tests (see the module docs). Never changed once built;
/// machines see it through overlayfs.
#[derive(Clone, Debug)]
pub struct BaseImage {
    dir: PathBuf,
}

impl BaseImage {
    /// The cached base, built first if missing (about a minute with a fast
    /// mirror; the mirror is the host's apt source for bookworm).
    pub fn ensure() -> BaseImage {
        require(&[("debootstrap", "debootstrap"), ("chroot", "coreutils")]);
        let key = fnv1a(&[SUITE, BASE_INCLUDE, CUSTOMIZE]);
        let dir = cache_dir().join(format!("base-{SUITE}-{key:016x}"));
        ensure_built(&dir, "the base image with debootstrap", |tmp, log| {
            let mirror = host_mirror();
            let mut debootstrap = Command::new("debootstrap");
            debootstrap
                .arg("--variant=minbase")
                .arg(format!("--include={BASE_INCLUDE}"))
                .arg(SUITE)
                .arg(tmp)
                .arg(&mirror);
            run_logged(&mut debootstrap, log);
            run_logged(&mut chroot(tmp, &["/bin/sh", "-c", CUSTOMIZE]), log);
        });
        BaseImage { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// A flat apt repository (`deb [trusted=yes] file:DIR ./`) of the packages
/// some Debian packages need beyond the [`BaseImage`], so that a machine
/// runs a real `apt-get install` with no network.
#[derive(Clone, Debug)]
pub struct LocalRepo {
    dir: PathBuf,
}

impl LocalRepo {
    /// What [`MachineOptions::default`] asks for: the lb and gluster-brick
    /// roles' packages (procps: the lb role installs it for HAProxy's reload).
    pub const DEFAULT_PACKAGES: &'static [&'static str] =
        &["haproxy", "procps", "glusterfs-server", "glusterfs-client"];

    /// The cached repository for `packages` (in any order), built first if
    /// missing: in a throwaway overlay of the base, with the host's network
    /// and mirror, `apt-get install --download-only --no-install-recommends`
    /// collects exactly the .debs they need beyond the base.
    pub fn ensure(packages: &[&str]) -> LocalRepo {
        require(&[("dpkg-scanpackages", "dpkg-dev"), ("chroot", "coreutils")]);
        let mut packages = packages.to_vec();
        packages.sort_unstable();
        packages.dedup();
        for p in &packages {
            assert!(
                !p.is_empty()
                    && p.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c)),
                "{p:?} is not a Debian package name"
            );
        }
        let base = BaseImage::ensure();
        let base_name = base.dir.file_name().expect("named").to_string_lossy();
        let list = packages.join(" ");
        let key = fnv1a(&[&base_name, &list]);
        let dir = cache_dir().join(format!("repo-{key:016x}"));
        let what = format!("the local apt repository ({list})");
        ensure_built(&dir, &what, |tmp, log| {
            download_packages(&base, &packages, tmp, log)
        });
        LocalRepo { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Fills `out` with the .debs `packages` need beyond the base, and indexes
/// it.
fn download_packages(base: &BaseImage, packages: &[&str], out: &Path, log: &Path) {
    let cache = out.parent().expect("cache entries have a parent");
    // Named `.tmp-*`: removed with the build's leftovers if we die.
    let scratch = ScratchDir(cache.join(format!(".tmp-chroot-{}", std::process::id())));
    let root = mount_overlay(&base.dir, &scratch.0);
    let sources = format!("deb {} {SUITE} main\n", host_mirror());
    fs::write(root.join("etc/apt/sources.list"), sources).expect("write sources.list");
    // The download needs the host's name service; the base has none.
    for file in ["etc/resolv.conf", "etc/hosts"] {
        fs::copy(Path::new("/").join(file), root.join(file))
            .unwrap_or_else(|e| panic!("cannot copy /{file} into the download root: {e}"));
    }
    // A snapshot mirror's Release files may be past their Valid-Until.
    run_logged(
        &mut chroot(
            &root,
            &[
                "apt-get",
                "-o",
                "Acquire::Check-Valid-Until=false",
                "update",
            ],
        ),
        log,
    );
    let mut install = vec![
        "apt-get",
        "install",
        "--download-only",
        "--no-install-recommends",
        "-y",
    ];
    install.extend_from_slice(packages);
    run_logged(&mut chroot(&root, &install), log);
    let archives = root.join("var/cache/apt/archives");
    for entry in fs::read_dir(&archives)
        .expect("read apt archives")
        .flatten()
    {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "deb") {
            fs::copy(&path, out.join(entry.file_name()))
                .unwrap_or_else(|e| panic!("cannot copy {}: {e}", path.display()));
        }
    }
    fs::write(out.join("PACKAGES"), packages.join("\n") + "\n").expect("write PACKAGES");
    index_repo(out);
}

/// Writes the index (`Packages`) of the .debs in `dir`, a flat repository
/// (`deb [trusted=yes] file:DIR ./`). Call it again after adding packages;
/// a machine sees them at its next `apt-get update`.
pub fn index_repo(dir: &Path) {
    require(&[("dpkg-scanpackages", "dpkg-dev")]);
    let out = run(Command::new("dpkg-scanpackages")
        .args(["--multiversion", ".", "/dev/null"])
        .current_dir(dir));
    // Atomically: a machine may be reading the old index.
    let tmp = dir.join(".Packages.tmp");
    fs::write(&tmp, &out.stdout).unwrap_or_else(|e| panic!("cannot write {}: {e}", tmp.display()));
    fs::rename(&tmp, dir.join("Packages")).expect("rename Packages");
}

/// A file in a package made by [`build_deb`]: path inside the package
/// (`usr/bin/x`; `DEBIAN/postinst` for a maintainer script), contents,
/// mode.
pub type DebFile<'a> = (&'a str, &'a [u8], u32);

/// Builds `dir/NAME_VERSION_all.deb` with `dpkg-deb --build` (files owned
/// by root) and returns its path. `control_extra` adds control fields, e.g.
/// `"Depends: haproxy\n"`; Package, Version, Architecture (`all`),
/// Maintainer and Description are set here.
pub fn build_deb(
    dir: &Path,
    name: &str,
    version: &str,
    files: &[DebFile<'_>],
    control_extra: &str,
) -> PathBuf {
    require_tool("dpkg-deb", "dpkg");
    let staging = tempfile::Builder::new()
        .prefix("steward-deb-")
        .tempdir()
        .expect("tempdir");
    let root = staging.path();
    let dir_mode = fs::Permissions::from_mode(0o755);
    fs::set_permissions(root, dir_mode.clone()).expect("chmod staging");
    let debian = root.join("DEBIAN");
    fs::create_dir(&debian).expect("mkdir DEBIAN");
    for (path, contents, mode) in files {
        assert!(
            !path.is_empty()
                && !path.starts_with('/')
                && path
                    .split('/')
                    .all(|c| !c.is_empty() && c != ".." && c != "."),
            "package file path {path:?}: give a relative path such as usr/bin/x"
        );
        let target = root.join(path);
        let parent = target.parent().expect("relative path has a parent");
        fs::create_dir_all(parent).expect("mkdir in staging");
        // Directories the package creates must be 0755 whatever the umask.
        for d in parent.ancestors().take_while(|d| d.starts_with(root)) {
            fs::set_permissions(d, dir_mode.clone()).expect("chmod staging dir");
        }
        fs::write(&target, contents).expect("write package file");
        fs::set_permissions(&target, fs::Permissions::from_mode(*mode)).expect("chmod");
    }
    let mut control = format!(
        "Package: {name}\nVersion: {version}\nArchitecture: all\n\
         Maintainer: steward-tests <steward-tests@example.invalid>\n\
         Description: {name}, built by steward-tests\n{control_extra}"
    );
    if !control.ends_with('\n') {
        control.push('\n');
    }
    fs::write(debian.join("control"), control).expect("write control");
    let deb = dir.join(format!("{name}_{version}_all.deb"));
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "--build"])
        .arg(root)
        .arg(&deb));
    deb
}

fn require_tool(program: &str, package: &str) {
    assert!(
        on_path(program),
        "{program} not found: run scripts/deps.sh (or apt-get install {package})"
    );
}

// ---- machines ----

/// How to boot a [`Machine`]; `MachineOptions::default()` gives the
/// default repository and nothing else.
#[derive(Clone, Debug)]
pub struct MachineOptions {
    packages: Vec<String>,
    extra_repos: Vec<PathBuf>,
    /// (host path, path inside, read-only)
    binds: Vec<(PathBuf, String, bool)>,
    env: Vec<(String, String)>,
    boot_timeout: Duration,
}

impl Default for MachineOptions {
    fn default() -> Self {
        MachineOptions {
            packages: LocalRepo::DEFAULT_PACKAGES
                .iter()
                .map(|p| (*p).to_owned())
                .collect(),
            extra_repos: Vec::new(),
            binds: Vec::new(),
            env: Vec::new(),
            boot_timeout: Duration::from_secs(60),
        }
    }
}

impl MachineOptions {
    /// The packages the local repository (`/srv/repo`) is built for,
    /// instead of [`LocalRepo::DEFAULT_PACKAGES`].
    pub fn packages(mut self, packages: &[&str]) -> Self {
        self.packages = packages.iter().map(|p| (*p).to_owned()).collect();
        self
    }

    /// A directory of .debs made available as a second apt source
    /// (`/srv/extra-repo-<i>`, read-only): indexed at boot with
    /// [`index_repo`] (which writes `Packages` into it).
    pub fn extra_repo(mut self, dir: impl Into<PathBuf>) -> Self {
        self.extra_repos.push(dir.into());
        self
    }

    /// Binds host path `host` read-only at `inside`.
    pub fn bind_ro(mut self, host: impl Into<PathBuf>, inside: &str) -> Self {
        self.binds.push((host.into(), inside.to_owned(), true));
        self
    }

    /// Binds host path `host` read-write at `inside` (e.g. `/dev/fuse`).
    pub fn bind(mut self, host: impl Into<PathBuf>, inside: &str) -> Self {
        self.binds.push((host.into(), inside.to_owned(), false));
        self
    }

    /// An environment variable for the machine's services (systemd's
    /// `DefaultEnvironment=`) and for commands run with
    /// [`Machine::command`].
    pub fn env(mut self, key: &str, value: &str) -> Self {
        assert!(
            key.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !value.contains('\n'),
            "environment variable {key:?}={value:?}: use a [A-Za-z_][A-Za-z0-9_]* name and a one-line value"
        );
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// How long boot may take before [`Machine::boot`] gives up (60 s).
    pub fn boot_timeout(mut self, timeout: Duration) -> Self {
        self.boot_timeout = timeout;
        self
    }
}

/// The container's PID 1, named so that a reused pid is never signalled.
#[derive(Clone, Copy, Debug)]
struct Leader {
    pid: u32,
    start_time: u64,
}

/// A host running systemd as PID 1 on a [`TestNet`]'s wire (see the
/// module docs). Dropping it halts it and removes everything it created.
pub struct Machine {
    name: String,
    /// nspawn's machine name: `stn-<pid>-<k>-<name>`.
    machine: String,
    /// The [`TestNet`]'s switch namespace: the key of its addresses in
    /// [`MACHINES`].
    net_key: String,
    octet: u8,
    ip: Ipv4Addr,
    prefix_len: u8,
    root: PathBuf,
    console: PathBuf,
    env: Vec<(String, String)>,
    nspawn: Option<Child>,
    leader: Option<Leader>,
    /// nspawn's command line (`sh` joining the cgroup, `nsenter`, nspawn),
    /// kept to boot the machine again after it reboots.
    spawn_argv: Vec<std::ffi::OsString>,
    boot_timeout: Duration,
    /// Boots after the first (see [`Machine::restart_if_rebooted`]).
    reboots: u32,
    /// These two go after `Drop::drop` stopped the container: the cgroup,
    /// then the directory (unmounted first).
    cgroup: MachineCgroup,
    _dir: ScratchDir,
}

impl Machine {
    /// Boots a machine named `name` (its hostname; 1..=32 of `[a-z0-9-]`,
    /// unique on `net`) on `net`'s bridge and waits until systemd reports
    /// the boot finished (`running` or `degraded`).
    ///
    /// The first call builds the base image and the repository (see
    /// [`BaseImage::ensure`], [`LocalRepo::ensure`]). Panics with the
    /// failed units and the console if boot does not finish in time.
    pub fn boot(net: &TestNet, name: &str, opts: MachineOptions) -> Machine {
        require(&[
            ("systemd-nspawn", "systemd-container"),
            ("nsenter", "util-linux"),
        ]);
        crate::netns::check_name("machine", name);
        let packages: Vec<&str> = opts.packages.iter().map(String::as_str).collect();
        let repo = LocalRepo::ensure(&packages);
        let base = BaseImage::ensure();
        remove_stale_machines();

        let octet = claim_octet(net, name);
        let k = NEXT_MACHINE.fetch_add(1, Ordering::Relaxed);
        let machine = format!("{MACHINE_PREFIX}{}-{k}-{name}", std::process::id());
        let dir = std::env::temp_dir().join(&machine);
        let mut m = Machine {
            name: name.to_owned(),
            net_key: net.switch_ns().to_owned(),
            octet,
            ip: net.addr(octet),
            prefix_len: net.prefix_len(),
            root: dir.join("root"),
            console: dir.join("console.log"),
            env: opts.env.clone(),
            nspawn: None,
            leader: None,
            spawn_argv: Vec::new(),
            boot_timeout: opts.boot_timeout,
            reboots: 0,
            cgroup: MachineCgroup(Vec::new()),
            _dir: ScratchDir(dir.clone()),
            machine,
        };
        // From here on, Drop releases the address and removes the dir.
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        m.cgroup = MachineCgroup::create(&m.machine);
        mount_overlay(&base.dir, &dir);
        m.write_identity(&opts);
        m.spawn(net, &repo, &opts);
        m.wait_booted(opts.boot_timeout);
        m
    }

    /// The hostname given to [`Machine::boot`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address of `host0`, on the [`TestNet`]'s subnet.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The machine's interface on the wire.
    pub fn iface(&self) -> &str {
        "host0"
    }

    /// The machine's root filesystem as seen from the host (the overlay):
    /// files written here appear inside at once, and stay readable after
    /// [`Machine::poweroff`] or [`Machine::kill`].
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// nspawn's machine name (`stn-<pid>-<k>-<name>`), unique on the host.
    pub fn machine_name(&self) -> &str {
        &self.machine
    }

    /// The pid of `systemd-nspawn`, while it runs.
    pub fn nspawn_pid(&self) -> Option<u32> {
        self.nspawn.as_ref().map(Child::id)
    }

    /// The host pid of the container's PID 1 (systemd), while it runs.
    pub fn leader_pid(&self) -> Option<u32> {
        self.leader.map(|l| l.pid)
    }

    /// The file nspawn's output (the machine's console) goes to.
    pub fn console_log(&self) -> &Path {
        &self.console
    }

    /// The console output so far.
    pub fn console(&self) -> String {
        fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// `program` to run inside the machine: all its namespaces, its root,
    /// a clean environment (PATH, LANG, HOME, `DEBIAN_FRONTEND=
    /// noninteractive`, the options' `env`). Note that it runs with the
    /// test's privileges, not the container's capability set. Panics if
    /// the machine is not running.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let leader = self
            .leader
            .unwrap_or_else(|| panic!("machine {} is not running", self.name));
        let mut cmd = Command::new("nsenter");
        cmd.env_clear()
            .envs(MACHINE_ENV.iter().copied())
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .arg(format!("--target={}", leader.pid))
            .arg("--all")
            .arg("--")
            .arg(program);
        cmd
    }

    /// Runs `argv` inside and waits; never panics on failure (see
    /// [`Machine::sh`] for that).
    pub fn exec<S: AsRef<OsStr>>(&self, argv: &[S]) -> Output {
        let (program, args) = argv.split_first().expect("exec: empty argv");
        let mut cmd = self.command(program);
        cmd.args(args).stdin(Stdio::null());
        cmd.output()
            .unwrap_or_else(|e| panic!("cannot run `{}`: {e}", command_line(&cmd)))
    }

    /// Runs `sh -c script` inside; returns stdout, panics with stdout and
    /// stderr if it fails.
    pub fn sh(&self, script: &str) -> String {
        let out = self.exec(&["sh", "-c", script]);
        assert!(
            out.status.success(),
            "in machine {}: `{script}` failed ({}):\n--- stdout\n{}--- stderr\n{}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The journal of `unit` (stdout and stderr of `journalctl -u`), for
    /// failure messages.
    pub fn journal(&self, unit: &str) -> String {
        let out = self.exec(&[
            "journalctl",
            "--no-pager",
            "-o",
            "short-precise",
            "-u",
            unit,
        ]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// The machine's network namespace, for an
    /// [`AddressWatch`](crate::netns::AddressWatch). Panics if the machine
    /// is not running.
    pub fn watched_ns(&self) -> crate::netns::WatchedNs {
        let leader = self
            .leader
            .unwrap_or_else(|| panic!("machine {} is not running", self.name));
        crate::netns::WatchedNs {
            name: self.name.clone(),
            net: PathBuf::from(format!("/proc/{}/ns/net", leader.pid)),
        }
    }

    /// Pulls the cable: the bridge-side end of `host0`'s veth (nspawn's
    /// `vb-*`, in the net's switch namespace) goes down, so the machine
    /// vanishes from the wire while everything in it keeps running
    /// (`host0` loses carrier; addresses stay), as
    /// [`Host::link_down`](crate::netns::Host::link_down) does for a host.
    pub fn link_down(&self) {
        self.set_bridge_port("down");
    }

    /// Plugs the cable back in.
    pub fn link_up(&self) {
        self.set_bridge_port("up");
    }

    fn set_bridge_port(&self, state: &str) {
        let port = self.bridge_port();
        let out = Command::new("ip")
            .args(["-n", &self.net_key, "link", "set", &port, state])
            .output()
            .expect("run ip");
        assert!(
            out.status.success(),
            "machine {}: ip link set {port} {state}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The name of `host0`'s peer in the switch namespace: the interface
    /// whose index is `host0`'s `iflink`.
    fn bridge_port(&self) -> String {
        let index = self.sh("cat /sys/class/net/host0/iflink");
        let index = index.trim();
        let out = Command::new("ip")
            .args(["-n", &self.net_key, "-o", "link", "show"])
            .output()
            .expect("run ip");
        // "7: vb-stn-1-0-lb1@if2: <BROADCAST,...> ..."
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| {
                let (i, rest) = l.split_once(": ")?;
                let name = rest.split([':', '@']).next()?;
                (i == index).then(|| name.to_owned())
            })
            .unwrap_or_else(|| {
                panic!(
                    "machine {}: no interface {index} (host0's peer) in {}",
                    self.name, self.net_key
                )
            })
    }

    /// A clean shutdown: SIGTERM to nspawn, which has systemd halt the
    /// container. Returns nspawn's exit status; panics if the machine is
    /// not running or does not halt within 30 s (it is then killed).
    pub fn poweroff(&mut self) -> ExitStatus {
        let grace = Duration::from_secs(30);
        match self.halt(grace) {
            Some((status, true)) => status,
            Some((_, false)) => panic!(
                "machine {} did not halt within {grace:?} of SIGTERM and was killed; console:\n{}",
                self.name,
                tail(&self.console, CONSOLE_TAIL)
            ),
            None => panic!("machine {} is not running", self.name),
        }
    }

    /// A crash: SIGKILL to the container's PID 1, which takes every process
    /// inside with it (the kernel ends a PID namespace with its init);
    /// waits until nspawn has cleaned up. Panics if not running.
    pub fn kill(&mut self) {
        let mut child = self
            .nspawn
            .take()
            .unwrap_or_else(|| panic!("machine {} is not running", self.name));
        self.kill_leader();
        if wait_timeout(&mut child, Duration::from_secs(10)).is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Writes what makes this machine itself into its root before boot.
    fn write_identity(&self, opts: &MachineOptions) {
        let etc = self.root.join("etc");
        let write = |path: PathBuf, text: String| {
            fs::write(&path, text)
                .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()))
        };
        write(etc.join("hostname"), format!("{}\n", self.name));
        write(
            etc.join("hosts"),
            format!(
                "127.0.0.1\tlocalhost\n{}\t{}\n::1\tlocalhost ip6-localhost ip6-loopback\n",
                self.ip, self.name
            ),
        );
        fs::create_dir_all(etc.join("steward-test")).expect("mkdir /etc/steward-test");
        write(
            etc.join("steward-test/network.env"),
            format!("ADDRESS={}/{}\n", self.ip, self.prefix_len),
        );
        if !self.env.is_empty() {
            // systemd gives services its manager environment, not its own
            // process environment (which nspawn's --setenv would set).
            let quoted: Vec<String> = self
                .env
                .iter()
                .map(|(k, v)| {
                    let kv = format!("{k}={v}")
                        .replace('\\', "\\\\")
                        .replace('"', "\\\"");
                    format!("\"{kv}\"")
                })
                .collect();
            let dir = etc.join("systemd/system.conf.d");
            fs::create_dir_all(&dir).expect("mkdir system.conf.d");
            write(
                dir.join("steward-test-env.conf"),
                format!("[Manager]\nDefaultEnvironment={}\n", quoted.join(" ")),
            );
        }
        if !opts.extra_repos.is_empty() {
            let lines: String = (0..opts.extra_repos.len())
                .map(|i| format!("deb [trusted=yes] file:{} ./\n", extra_repo_path(i)))
                .collect();
            write(
                etc.join("apt/sources.list.d/steward-test-extra.list"),
                lines,
            );
        }
    }

    /// Starts nspawn in the machine's cgroup and the net's switch
    /// namespace (see the module docs for why `nsenter --net`, not `ip
    /// netns exec`). `sh` and `nsenter` exec: the child's pid is nspawn's.
    fn spawn(&mut self, net: &TestNet, repo: &LocalRepo, opts: &MachineOptions) {
        let mut binds = vec![(repo.dir.clone(), REPO_IN_MACHINE.to_owned(), true)];
        for (i, dir) in opts.extra_repos.iter().enumerate() {
            index_repo(dir);
            binds.push((dir.clone(), extra_repo_path(i), true));
        }
        binds.extend(opts.binds.iter().cloned());

        let procs = self.cgroup.procs_files();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", JOIN_CGROUPS_AND_EXEC, "sh"])
            .arg(procs.len().to_string())
            .args(&procs)
            .arg("nsenter")
            .arg(format!("--net=/run/netns/{}", net.switch_ns()))
            .arg("--")
            .arg("systemd-nspawn")
            .arg(format!("--directory={}", self.root.display()))
            .arg(format!("--machine={}", self.machine))
            .arg(format!("--hostname={}", self.name))
            .args(["--boot", "--register=no", "--keep-unit"])
            .arg(format!("--network-bridge={}", net.bridge()))
            // Output only (no input): the console ends up in console.log.
            .args(["--console=read-only", "--link-journal=no"])
            .arg("--resolv-conf=off")
            .arg("--setenv=SYSTEMD_COLORS=0");
        for (host, inside, read_only) in &binds {
            let host = host.display().to_string();
            assert!(
                !host.contains(':') && !inside.contains(':'),
                "bind {host} -> {inside}: nspawn cannot bind paths containing ':'"
            );
            let flag = if *read_only { "--bind-ro" } else { "--bind" };
            cmd.arg(format!("{flag}={host}:{inside}"));
        }
        self.spawn_argv = std::iter::once(cmd.get_program())
            .chain(cmd.get_args())
            .map(OsStr::to_owned)
            .collect();
        self.start_nspawn();
    }

    /// Runs nspawn's command line, its output appended to the console log
    /// (a boot after a reboot follows the one before).
    fn start_nspawn(&mut self) {
        let mut cmd = Command::new(&self.spawn_argv[0]);
        cmd.args(&self.spawn_argv[1..]);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.console)
            .expect("open console.log");
        let err = log.try_clone().expect("clone console.log handle");
        cmd.stdin(Stdio::null()).stdout(log).stderr(err);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{}`: {e}", command_line(&cmd)));
        self.nspawn = Some(child);
    }

    /// If the machine rebooted (`systemd-nspawn --boot` exits with
    /// [`NSPAWN_REBOOTED`] when the container's systemd reboots, as
    /// `systemd-nspawn@.service` restarts on), boots it again with the
    /// same name, root, binds and network, waits until systemd finished
    /// booting, and returns true. False while nspawn runs; panics if it
    /// exited for another reason or is not running.
    pub fn restart_if_rebooted(&mut self) -> bool {
        let child = self
            .nspawn
            .as_mut()
            .unwrap_or_else(|| panic!("machine {} is not running", self.name));
        let status = match child.try_wait() {
            Ok(None) => return false,
            Ok(Some(status)) => status,
            Err(e) => panic!("machine {}: wait for systemd-nspawn: {e}", self.name),
        };
        self.nspawn = None;
        self.leader = None;
        assert_eq!(
            status.code(),
            Some(NSPAWN_REBOOTED),
            "machine {}: systemd-nspawn exited ({status}), not for a reboot; console:\n{}",
            self.name,
            tail(&self.console, CONSOLE_TAIL)
        );
        self.reboots += 1;
        self.start_nspawn();
        self.wait_booted(self.boot_timeout);
        true
    }

    /// How many times the machine rebooted (and was booted again).
    pub fn reboots(&self) -> u32 {
        self.reboots
    }

    /// Waits for the container's systemd, then for the end of its boot.
    fn wait_booted(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.leader.is_none() {
            let child = self.nspawn.as_mut().expect("spawned");
            if let Ok(Some(status)) = child.try_wait() {
                self.nspawn = None;
                panic!(
                    "systemd-nspawn for machine {} exited during boot ({status}); console:\n{}",
                    self.name,
                    tail(&self.console, CONSOLE_TAIL)
                );
            }
            self.leader = find_leader(child.id());
            if self.leader.is_none() {
                assert!(
                    Instant::now() < deadline,
                    "machine {}: no systemd in the container within {timeout:?}; console:\n{}",
                    self.name,
                    tail(&self.console, CONSOLE_TAIL)
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let mut state = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now()).as_secs();
            if left == 0 {
                panic!(
                    "machine {} did not finish booting within {timeout:?} (state {state:?})\n{}",
                    self.name,
                    self.diagnostics()
                );
            }
            // Fails until PID 1 listens; `--wait` then returns once boot is over.
            let out = self.exec(&[
                "timeout",
                &left.to_string(),
                "systemctl",
                "is-system-running",
                "--wait",
            ]);
            state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            match state.as_str() {
                "running" | "degraded" => break,
                "" | "offline" | "initializing" | "starting" => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => panic!(
                    "machine {}: system state {state:?} after boot\n{}",
                    self.name,
                    self.diagnostics()
                ),
            }
        }
        let network = self.exec(&["systemctl", "is-active", NETWORK_UNIT]);
        assert!(
            network.status.success(),
            "machine {}: {NETWORK_UNIT} failed, host0 has no address:\n{}\n{}",
            self.name,
            self.exec_text(&["systemctl", "status", "--no-pager", "-l", NETWORK_UNIT]),
            self.exec_text(&["journalctl", "--no-pager", "-b", "-o", "short-precise"])
        );
        if state == "degraded" {
            eprintln!(
                "machine {} booted degraded:\n{}",
                self.name,
                self.exec_text(&["systemctl", "--failed", "--no-pager"])
            );
        }
    }

    fn exec_text(&self, argv: &[&str]) -> String {
        let out = self.exec(argv);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// Failed units, pending jobs and the console's last lines.
    fn diagnostics(&self) -> String {
        format!(
            "--- systemctl --failed\n{}--- systemctl list-jobs\n{}--- console ({}), last {CONSOLE_TAIL} lines\n{}",
            self.exec_text(&["systemctl", "--failed", "--no-pager"]),
            self.exec_text(&["systemctl", "list-jobs", "--no-pager"]),
            self.console.display(),
            tail(&self.console, CONSOLE_TAIL)
        )
    }

    fn kill_leader(&mut self) {
        if let Some(leader) = self.leader.take() {
            if start_time(leader.pid) == Some(leader.start_time) {
                signal(leader.pid, Signal::SIGKILL);
            }
        }
    }

    /// SIGTERM to nspawn and up to `grace` for the container to halt, then
    /// a kill. `None` if not running; else nspawn's exit status and whether
    /// it halted in time.
    fn halt(&mut self, grace: Duration) -> Option<(ExitStatus, bool)> {
        let mut child = self.nspawn.take()?;
        signal(child.id(), Signal::SIGTERM);
        if let Some(status) = wait_timeout(&mut child, grace) {
            self.leader = None;
            return Some((status, true));
        }
        self.kill_leader();
        let status = wait_timeout(&mut child, Duration::from_secs(10)).unwrap_or_else(|| {
            let _ = child.kill();
            child.wait().expect("wait for systemd-nspawn")
        });
        Some((status, false))
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.halt(Duration::from_secs(20));
        if std::thread::panicking() {
            eprintln!(
                "---- machine {}: last lines of its console ----\n{}",
                self.name,
                tail(&self.console, CONSOLE_TAIL)
            );
        }
        let mut machines = MACHINES.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(taken) = machines.get_mut(&self.net_key) {
            taken.remove(&self.octet);
            if taken.is_empty() {
                machines.remove(&self.net_key);
            }
        }
        // `self._dir` drops next: unmounts the overlay, removes the files.
    }
}

/// systemd-nspawn's exit status when the container rebooted.
pub const NSPAWN_REBOOTED: i32 = 133;

fn extra_repo_path(i: usize) -> String {
    format!("/srv/extra-repo-{i}")
}

/// Takes the highest free host octet of `net` for machine `name`: machines
/// count down from `.199`, [`TestNet::add_host`] counts up from `.10`.
fn claim_octet(net: &TestNet, name: &str) -> u8 {
    let mut machines = MACHINES.lock().unwrap_or_else(|e| e.into_inner());
    let taken = machines.entry(net.switch_ns().to_owned()).or_default();
    assert!(
        taken.values().all(|n| n != name),
        "machine {name} exists already on this TestNet"
    );
    let hosts = net.hosts().len();
    let next_host = usize::from(FIRST_HOST_OCTET) + hosts;
    let octet = (FIRST_HOST_OCTET..=LAST_HOST_OCTET)
        .rev()
        .find(|o| !taken.contains_key(o))
        .filter(|o| usize::from(*o) > next_host)
        .unwrap_or_else(|| panic!("too many hosts and machines on one TestNet"));
    taken.insert(octet, name.to_owned());
    octet
}

/// nspawn's child that is the init of a new PID namespace, once it runs
/// systemd (before that it is nspawn's own code, setting up).
fn find_leader(nspawn_pid: u32) -> Option<Leader> {
    pids().find_map(|pid| {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
        };
        let is_child = field("PPid:")? == nspawn_pid.to_string();
        let is_init = field("NSpid:")?.split_whitespace().last()? == "1";
        let is_systemd = field("Name:")? == "systemd";
        (is_child && is_init && is_systemd).then_some(Leader {
            pid,
            start_time: start_time(pid)?,
        })
    })
}

/// The test pid in a name `stn-<pid>-...` if that test process has exited
/// (a zombie counts: whoever inherits it may reap it late).
fn dead_owner(name: &str) -> Option<u32> {
    let pid: u32 = name
        .strip_prefix(MACHINE_PREFIX)?
        .split('-')
        .next()?
        .parse()
        .ok()?;
    (pid != std::process::id() && pid_exited(pid)).then_some(pid)
}

/// Removes what test processes that no longer exist left behind: their
/// nspawn processes (found by `--machine=stn-<pid>-...`; the container
/// first, by its PID 1), then mounts, directories and cgroups named after
/// them.
fn remove_stale_machines() {
    let _guard = SWEEP.lock().unwrap_or_else(|e| e.into_inner());
    let mut stopped = Vec::new();
    for pid in pids() {
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_nspawn = args
            .first()
            .is_some_and(|a| Path::new(a).ends_with("systemd-nspawn"));
        let stale = args
            .iter()
            .any(|a| a.strip_prefix("--machine=").and_then(dead_owner).is_some());
        if is_nspawn && stale {
            if let Some(leader) = find_leader(pid) {
                signal(leader.pid, Signal::SIGKILL);
            }
            signal(pid, Signal::SIGKILL);
            stopped.push(pid);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !stopped.iter().all(|p| pid_exited(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    for parent in [std::env::temp_dir(), PathBuf::from(NSPAWN_PROPAGATE)] {
        for entry in fs::read_dir(&parent).into_iter().flatten().flatten() {
            if dead_owner(&entry.file_name().to_string_lossy()).is_some() {
                remove_tree(&entry.path());
            }
        }
    }
    for parent in own_cgroups() {
        for entry in fs::read_dir(&parent).into_iter().flatten().flatten() {
            if dead_owner(&entry.file_name().to_string_lossy()).is_some() {
                remove_cgroup(&entry.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, t)| ((*n).to_owned(), (*t).to_owned()))
            .collect()
    }

    #[test]
    fn mirror_from_one_line_sources() {
        let list = "# deb http://old.example/debian bookworm main\n\
                    deb-src http://src.example/debian bookworm main\n\
                    deb http://security.debian.org/debian-security bookworm-security main\n\
                    deb [ arch=amd64 signed-by=/k.gpg ] http://mirror.example/debian/ bookworm main contrib\n";
        assert_eq!(
            mirror_from(&files(&[("/etc/apt/sources.list", list)]), "bookworm").as_deref(),
            Some("http://mirror.example/debian")
        );
    }

    #[test]
    fn mirror_from_deb822_sources() {
        let sources = "Types: deb\n\
                       URIs: http://deb.debian.org/debian-security\n\
                       Suites: bookworm-security\n\n\
                       Types: deb deb-src\n\
                       # a comment\n\
                       URIs: https://tls.example/debian\n \
                       http://plain.example/debian\n\
                       Suites: bookworm bookworm-updates\n\
                       Components: main\n";
        let disabled =
            "Types: deb\nURIs: http://off.example/debian\nSuites: bookworm\nEnabled: no\n";
        assert_eq!(
            mirror_from(
                &files(&[("a.sources", disabled), ("debian.sources", sources)]),
                "bookworm"
            )
            .as_deref(),
            Some("http://plain.example/debian")
        );
    }

    #[test]
    fn no_mirror_for_other_suites() {
        let list = "deb http://deb.debian.org/debian trixie main\n";
        assert_eq!(mirror_from(&files(&[("x.list", list)]), "bookworm"), None);
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(
            unescape_mountinfo(r"/tmp/a\040b\134c"),
            PathBuf::from("/tmp/a b\\c")
        );
    }

    #[test]
    fn cache_keys_are_stable_and_separate_parts() {
        // A different value means every cache is rebuilt: only on purpose.
        assert_eq!(fnv1a(&["a", "b"]), 0xab40_d782_0d40_8076);
        assert_ne!(fnv1a(&["ab", ""]), fnv1a(&["a", "b"]));
    }
}
