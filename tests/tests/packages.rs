//! Steward's packages, as `scripts/package.sh` builds them (into
//! `target/packages`, or `$STEWARD_PACKAGES_DIR`): `steward-agent`,
//! `steward-coordinator` and `stewardctl`, each a .deb and an .rpm.
//! `scripts/test.sh` builds them before `cargo test`; these tests fail,
//! saying so, when they are missing.
//!
//! - `debs_pass_lintian`: lintian finds no error and no warning (what is
//!   left is overridden, with the reason, in the lintian overrides each
//!   package ships), and each .deb holds what it should.
//! - `rpms_hold_their_files_and_scripts`: `rpm -qp --list` / `--scripts`
//!   of each .rpm, every scriptlet valid `sh`, then the .rpms installed
//!   into a scratch root with `rpm --root DIR -i --nodeps --noscripts`
//!   (their scriptlets need a running systemd; this is not an RPM
//!   distribution), verified, and erased keeping a modified config.
//! - `debs_install_upgrade_remove_purge_on_systemd_hosts`: on two nspawn
//!   machines booting real systemd, next to a real etcd on the test net's
//!   gateway:
//!   1. `dpkg -i` of steward-coordinator and stewardctl on `coord`, of
//!      steward-agent on `node1` (and on `coord` too, to test the CA
//!      certificate both share): units enabled, not running (no
//!      certificates yet: "condition failed", not a crash loop); the
//!      `steward` system user exists.
//!   2. The coordinator's certificates and CA key made on this host with
//!      `stewardctl pki`, copied in, its packaged config edited: it runs
//!      under systemd as `steward`, with no capabilities, against etcd; the
//!      packaged stewardctl on `coord` sees it lead and creates a join
//!      token; `node1` runs the printed `steward-agent join` command, which
//!      writes its certificate and config and starts the unit; the agent
//!      connects and is listed healthy by `stewardctl nodes`; the same
//!      token used again (from `coord`) is refused and writes nothing.
//!   3. Upgrade to a newer version (the same .debs repacked with a bumped
//!      Version: the binaries are the same): the locally modified conffile
//!      and the agent's state are kept, both services restarted by the
//!      package (new MainPID, active), the node connected again.
//!   4. `dpkg -r`: services stopped (the node shows disconnected), config
//!      and state kept; `dpkg -P`: nothing left of what `dpkg -L` listed,
//!      no `/etc/steward`, no state, no unit, no enablement symlinks, no
//!      file whose name mentions steward beyond what the machine had before
//!      (the `steward` user stays, see the coordinator's postrm).
//!
//! The last one also rates both units with `systemd-analyze security` (the
//! coordinator's must stay at or below 2.0).
//!
//! Needs root, systemd-nspawn, etcd, lintian, rpm, and `scripts/package.sh`
//! and `cargo build --workspace --bins` first (`scripts/test.sh` does both).

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use steward_tests::converge_bed::{poll, Clock};
use steward_tests::netns::TestNet;
use steward_tests::nspawn::{Machine, MachineOptions};
use steward_tests::{bin, repo_root, Etcd};

const AGENT: &str = "steward-agent";
const COORDINATOR: &str = "steward-coordinator";
const CTL: &str = "stewardctl";
const AGENT_UNIT: &str = "steward-agent.service";
const COORDINATOR_UNIT: &str = "steward-coordinator.service";
/// Where the machines see the package folder (read-only).
const PACKAGES_IN_MACHINE: &str = "/srv/steward-packages";
/// Where the repacked, newer .debs go in a machine.
const UPGRADE_IN_MACHINE: &str = "/root/upgrade";
/// The admin certificate for the packaged stewardctl on `coord`.
const ADMIN_IN_MACHINE: &str = "/root/admin";
const COORDINATOR_PORT: u16 = 7443;
/// `systemd-analyze security` exposure the coordinator's unit must not
/// exceed (0 = locked down, 10 = nothing).
const COORDINATOR_MAX_EXPOSURE: f64 = 2.0;

// ---- the packages ----

/// The folder the packages are in, and each package in it.
struct Packages {
    dir: PathBuf,
}

impl Packages {
    /// The package folder; panics, saying how to make them, if a package is
    /// missing.
    fn find() -> Packages {
        let dir = std::env::var_os("STEWARD_PACKAGES_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join("target/packages"));
        let p = Packages { dir };
        for name in [AGENT, COORDINATOR, CTL] {
            p.deb(name);
            p.rpm(name);
        }
        p
    }

    /// The one file in the folder named `PREFIX<digit>...SUFFIX` (a
    /// version follows the prefix, so `steward-agent-` never matches
    /// another package's `steward-agent-foo-1.0...`).
    fn one(&self, prefix: &str, suffix: &str) -> PathBuf {
        let found: Vec<PathBuf> = fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_prefix(prefix))
                    .is_some_and(|rest| {
                        rest.starts_with(|c: char| c.is_ascii_digit()) && rest.ends_with(suffix)
                    })
            })
            .collect();
        assert!(
            found.len() == 1,
            "expected exactly one {prefix}<version>*{suffix} in {}, found {found:?}: \
             run scripts/package.sh first (scripts/test.sh does), or point \
             STEWARD_PACKAGES_DIR at its output",
            self.dir.display()
        );
        found.into_iter().next().expect("one")
    }

    /// `NAME_VERSION_ARCH.deb`.
    fn deb(&self, name: &str) -> PathBuf {
        self.one(&format!("{name}_"), ".deb")
    }

    /// `NAME-VERSION-RELEASE.ARCH.rpm`.
    fn rpm(&self, name: &str) -> PathBuf {
        self.one(&format!("{name}-"), ".rpm")
    }

    /// The .deb as the machines see it.
    fn deb_in_machine(&self, name: &str) -> String {
        let file = self.deb(name);
        format!(
            "{PACKAGES_IN_MACHINE}/{}",
            file.file_name().expect("file name").to_string_lossy()
        )
    }
}

// ---- small helpers ----

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `program args` here; panics with its output unless it succeeds.
fn run_ok(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e} (scripts/deps.sh installs it)"));
    assert!(
        out.status.success(),
        "`{program} {}` failed ({}):\n{}",
        args.join(" "),
        out.status,
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn tempdir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("tempdir")
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

// ---- lintian and .deb contents ----

#[test]
fn debs_pass_lintian() {
    let packages = Packages::find();
    let debs: Vec<PathBuf> = [AGENT, COORDINATOR, CTL]
        .iter()
        .map(|n| packages.deb(n))
        .collect();
    let mut lintian = Command::new("lintian");
    // Info tags shown too, for the log; errors and warnings fail (the
    // exit status) and are listed below.
    lintian
        .args(["--display-info", "--fail-on", "error,warning"])
        .args(&debs)
        .stdin(Stdio::null());
    let out = lintian
        .output()
        .expect("run lintian (scripts/deps.sh installs it)");
    let report = text(&out);
    eprintln!("lintian:\n{report}");
    let bad: Vec<&str> = report
        .lines()
        .filter(|l| l.starts_with("E: ") || l.starts_with("W: "))
        .collect();
    assert!(
        bad.is_empty() && out.status.success(),
        "lintian reports {} error(s)/warning(s) ({}); fix them or override one \
         with its reason in packaging/deb/<package>/lintian-overrides:\n{}",
        bad.len(),
        out.status,
        bad.join("\n")
    );

    // What each .deb holds.
    let contents = |name: &str| run_ok("dpkg-deb", &["-c", &packages.deb(name).to_string_lossy()]);
    let has =
        |listing: &str, path: &str| listing.lines().any(|l| l.ends_with(&format!(" ./{path}")));
    let agent = contents(AGENT);
    for path in [
        "usr/bin/steward-agent",
        "usr/lib/systemd/system/steward-agent.service",
        "etc/steward/agent.toml",
        "usr/share/man/man8/steward-agent.8.gz",
        "usr/share/lintian/overrides/steward-agent",
    ] {
        assert!(has(&agent, path), "{AGENT} .deb lacks {path}:\n{agent}");
    }
    let coordinator = contents(COORDINATOR);
    for path in [
        "usr/bin/steward-coordinator",
        "usr/lib/systemd/system/steward-coordinator.service",
        "usr/lib/sysusers.d/steward-coordinator.conf",
        "etc/steward/coordinator.toml",
        "usr/share/man/man8/steward-coordinator.8.gz",
        "usr/share/steward-coordinator/prometheus/steward-alerts.yml",
    ] {
        assert!(
            has(&coordinator, path),
            "{COORDINATOR} .deb lacks {path}:\n{coordinator}"
        );
    }
    assert!(
        !has(&coordinator, "usr/bin/stewardctl"),
        "stewardctl is its own package, not in {COORDINATOR}"
    );
    let ctl = contents(CTL);
    for path in [
        "usr/bin/stewardctl",
        "usr/share/bash-completion/completions/stewardctl",
        "usr/share/zsh/vendor-completions/_stewardctl",
        "usr/share/fish/vendor_completions.d/stewardctl.fish",
    ] {
        assert!(has(&ctl, path), "{CTL} .deb lacks {path}:\n{ctl}");
    }
    assert!(
        !ctl.contains("systemd") && !ctl.contains("./etc/") && !ctl.contains("steward-coordinator"),
        "stewardctl (for workstations) must hold no unit, config or daemon:\n{ctl}"
    );
    // stewardctl has no maintainer scripts; the daemons' conffiles are
    // their configs.
    let control = |name: &str, field: &str| {
        let dir = tempdir("steward-deb-control-");
        run_ok(
            "dpkg-deb",
            &[
                "-e",
                &packages.deb(name).to_string_lossy(),
                &dir.path().to_string_lossy(),
            ],
        );
        fs::read_to_string(dir.path().join(field)).ok()
    };
    assert_eq!(control(CTL, "postinst"), None, "stewardctl runs no scripts");
    assert_eq!(
        control(AGENT, "conffiles").as_deref(),
        Some("/etc/steward/agent.toml\n")
    );
    assert_eq!(
        control(COORDINATOR, "conffiles").as_deref(),
        Some("/etc/steward/coordinator.toml\n")
    );
}

// ---- rpm ----

/// `rpm -qp --qf FORMAT FILE`.
fn rpm_query(rpm: &Path, format: &str) -> String {
    run_ok("rpm", &["-qp", "--qf", format, &rpm.to_string_lossy()])
}

#[test]
fn rpms_hold_their_files_and_scripts() {
    let packages = Packages::find();
    let repo = repo_root();

    // Files as rpm lists them: mode, flags (c config, n noreplace, d doc),
    // path.
    let expect: [(&str, &[&str]); 3] = [
        (
            AGENT,
            &[
                "-rwxr-xr-x /usr/bin/steward-agent",
                "-rw-r--r-- /usr/lib/systemd/system/steward-agent.service",
                "-rw-r--r-- cn /etc/steward/agent.toml",
                "-rw-r--r-- d /usr/share/man/man8/steward-agent.8.gz",
            ],
        ),
        (
            COORDINATOR,
            &[
                "-rwxr-xr-x /usr/bin/steward-coordinator",
                "-rw-r--r-- /usr/lib/systemd/system/steward-coordinator.service",
                "-rw-r--r-- /usr/lib/sysusers.d/steward-coordinator.conf",
                "-rw-r--r-- cn /etc/steward/coordinator.toml",
                "-rw-r--r-- d /usr/share/man/man8/steward-coordinator.8.gz",
                "-rw-r--r-- /usr/share/steward-coordinator/prometheus/steward-alerts.yml",
            ],
        ),
        (
            CTL,
            &[
                "-rwxr-xr-x /usr/bin/stewardctl",
                "-rw-r--r-- d /usr/share/man/man1/stewardctl.1.gz",
                "-rw-r--r-- d /usr/share/doc/stewardctl/examples/cluster.example.toml",
                "-rw-r--r-- /usr/share/bash-completion/completions/stewardctl",
                "-rw-r--r-- /usr/share/zsh/site-functions/_stewardctl",
                "-rw-r--r-- /usr/share/fish/vendor_completions.d/stewardctl.fish",
            ],
        ),
    ];
    for (name, files) in expect {
        let rpm = packages.rpm(name);
        let listing = run_ok("rpm", &["-qp", "--list", &rpm.to_string_lossy()]);
        eprintln!("rpm -qp --list {name}:\n{listing}");
        let table = rpm_query(
            &rpm,
            "[%{FILEMODES:perms} %{FILEFLAGS:fflags} %{FILENAMES}\n]",
        );
        let rows: BTreeSet<String> = table
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        let want: BTreeSet<String> = files.iter().map(|f| (*f).to_owned()).collect();
        assert_eq!(rows, want, "{name}.rpm: files (mode, flags, path)");
        assert_eq!(
            rpm_query(&rpm, "%{NAME}"),
            name,
            "{}: package name",
            rpm.display()
        );
    }

    // Scriptlets: valid sh, doing what the .debs do.
    let scripts_of = |name: &str| {
        let rpm = packages.rpm(name);
        let all = run_ok("rpm", &["-qp", "--scripts", &rpm.to_string_lossy()]);
        eprintln!("rpm -qp --scripts {name}:\n{all}");
        ["%{POSTIN}", "%{PREUN}", "%{POSTUN}", "%{PREIN}"].map(|tag| {
            let body = rpm_query(&rpm, tag);
            (body != "(none)").then_some(body)
        })
    };
    let sh_ok = |name: &str, body: &str| {
        let mut sh = Command::new("sh")
            .arg("-n")
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("sh");
        use std::io::Write;
        sh.stdin
            .take()
            .expect("stdin")
            .write_all(body.as_bytes())
            .expect("write script");
        let out = sh.wait_with_output().expect("sh -n");
        assert!(
            out.status.success(),
            "{name}: a scriptlet is not valid sh: {}\n{body}",
            text(&out)
        );
    };
    let contains_in_order = |name: &str, body: &str, needles: &[&str]| {
        let mut at = 0;
        for n in needles {
            match body[at..].find(n) {
                Some(i) => at += i + n.len(),
                None => panic!("{name}: scriptlet lacks {n:?} (after the previous ones):\n{body}"),
            }
        }
    };
    for (name, unit) in [(AGENT, AGENT_UNIT), (COORDINATOR, COORDINATOR_UNIT)] {
        let [post, preun, postun, pre] = scripts_of(name);
        assert_eq!(pre, None, "{name}: no %pre");
        let (post, preun, postun) = (
            post.unwrap_or_else(|| panic!("{name}: no %post")),
            preun.unwrap_or_else(|| panic!("{name}: no %preun")),
            postun.unwrap_or_else(|| panic!("{name}: no %postun")),
        );
        for body in [&post, &preun, &postun] {
            sh_ok(name, body);
        }
        let mut post_steps = vec![];
        if name == COORDINATOR {
            // The user before anything may start the unit.
            post_steps.push("systemd-sysusers steward-coordinator.conf");
        }
        let enable = format!("systemctl enable {unit}");
        let start = format!("systemctl start {unit}");
        post_steps.extend(["install -d -m 0755 /etc/steward/pki", "[ \"$1\" -eq 1 ]"]);
        post_steps.extend([enable.as_str(), start.as_str()]);
        contains_in_order(name, &post, &post_steps);
        contains_in_order(
            name,
            &preun,
            &["[ \"$1\" -eq 0 ]", &format!("disable --now {unit}")],
        );
        contains_in_order(
            name,
            &postun,
            &["[ \"$1\" -ge 1 ]", &format!("try-restart {unit}")],
        );
    }
    let [post, preun, postun, pre] = scripts_of(CTL);
    assert!(
        post.is_none() && preun.is_none() && postun.is_none() && pre.is_none(),
        "stewardctl runs no scriptlets"
    );

    // Into a scratch root: files where they belong, as built, verified by
    // rpm itself; an erase keeps a modified config as .rpmsave.
    let root = tempdir("steward-rpm-root-");
    let r = root.path().to_string_lossy().into_owned();
    let rpm_root = |args: &[&str]| {
        let mut all = vec!["--root", r.as_str(), "--dbpath", "/var/lib/rpm"];
        all.extend_from_slice(args);
        run_ok("rpm", &all)
    };
    rpm_root(&["--initdb"]);
    let files: Vec<String> = [AGENT, COORDINATOR, CTL]
        .iter()
        .map(|n| packages.rpm(n).to_string_lossy().into_owned())
        .collect();
    let mut install = vec!["-i", "--nodeps", "--noscripts"];
    install.extend(files.iter().map(String::as_str));
    rpm_root(&install);
    let installed = rpm_root(&["-qa", "--qf", "%{NAME}\n"]);
    let installed: BTreeSet<&str> = installed.lines().collect();
    assert_eq!(installed, BTreeSet::from([AGENT, COORDINATOR, CTL]));
    for name in [AGENT, COORDINATOR, CTL] {
        // Sizes, digests, modes, owners of every file.
        rpm_root(&["-V", "--nodeps", "--noscripts", name]);
    }
    let at = |path: &str| root.path().join(path.trim_start_matches('/'));
    for (path, source) in [
        ("/etc/steward/agent.toml", "packaging/agent.example.toml"),
        (
            "/etc/steward/coordinator.toml",
            "packaging/coordinator.example.toml",
        ),
        (
            "/usr/lib/systemd/system/steward-agent.service",
            "packaging/systemd/steward-agent.service",
        ),
        (
            "/usr/lib/systemd/system/steward-coordinator.service",
            "packaging/systemd/steward-coordinator.service",
        ),
        (
            "/usr/lib/sysusers.d/steward-coordinator.conf",
            "packaging/systemd/steward-coordinator.sysusers",
        ),
    ] {
        assert_eq!(
            read(&at(path)),
            read(&repo.join(source)),
            "{path} is not {source} (packages older than the tree? run scripts/package.sh)"
        );
    }
    for b in ["steward-agent", "steward-coordinator", "stewardctl"] {
        let path = at(&format!("/usr/bin/{b}"));
        assert_eq!(mode(&path), 0o755, "{}", path.display());
        let version = Command::new(&path)
            .arg("--version")
            .output()
            .expect("run the packaged binary");
        assert!(
            version.status.success() && text(&version).starts_with(b),
            "the packaged {b} does not run: {}",
            text(&version)
        );
    }
    let config = at("/etc/steward/agent.toml");
    fs::write(&config, read(&config) + "# edited here\n").expect("edit config");
    rpm_root(&["-e", "--nodeps", "--noscripts", AGENT]);
    assert!(!at("/usr/bin/steward-agent").exists(), "erased");
    assert!(!config.exists(), "agent.toml left in place");
    let saved = at("/etc/steward/agent.toml.rpmsave");
    assert!(
        read(&saved).ends_with("# edited here\n"),
        "a modified config is kept as .rpmsave on erase"
    );
}

// ---- on systemd hosts ----

/// `stewardctl ARGS` run inside `coord` (the packaged one) with the admin
/// certificate copied there.
fn ctl_in(coord: &Machine, endpoint: &str, args: &[&str]) -> Output {
    let endpoints = format!("STEWARD_ENDPOINTS={endpoint}");
    let ca = format!("STEWARD_CA={ADMIN_IN_MACHINE}/ca.crt");
    let cert = format!("STEWARD_CERT={ADMIN_IN_MACHINE}/admin.crt");
    let key = format!("STEWARD_KEY={ADMIN_IN_MACHINE}/admin.key");
    let mut argv = vec![
        "env",
        endpoints.as_str(),
        ca.as_str(),
        cert.as_str(),
        key.as_str(),
        "stewardctl",
    ];
    argv.extend_from_slice(args);
    coord.exec(&argv)
}

/// `systemctl show UNIT -p P1 -p P2 ...` as (name, value) pairs in order.
fn unit_props(m: &Machine, unit: &str, props: &[&str]) -> Vec<String> {
    let mut argv = vec!["systemctl", "show", unit];
    for p in props {
        argv.extend(["-p", *p]);
    }
    let out = m.sh(&argv.join(" "));
    props
        .iter()
        .map(|p| {
            out.lines()
                .find_map(|l| l.strip_prefix(&format!("{p}=")))
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

/// Enabled and started at install, and inactive because its conditions
/// failed (no certificates yet), not failed.
fn assert_enabled_but_waiting_for_certificates(m: &Machine, unit: &str) {
    let enabled = m.exec(&["systemctl", "is-enabled", unit]);
    assert_eq!(
        String::from_utf8_lossy(&enabled.stdout).trim(),
        "enabled",
        "{}: {unit} not enabled at install",
        m.name()
    );
    let [active, result, checked]: [String; 3] = unit_props(
        m,
        unit,
        &["ActiveState", "ConditionResult", "ConditionTimestamp"],
    )
    .try_into()
    .expect("three properties");
    assert_eq!(
        (active.as_str(), result.as_str()),
        ("inactive", "no"),
        "{}: {unit} right after install:\n{}",
        m.name(),
        m.sh(&format!("systemctl status --no-pager {unit} || true"))
    );
    assert!(
        !checked.is_empty(),
        "{}: {unit}'s conditions were never checked: the package did not try to start it",
        m.name()
    );
}

/// Waits until `unit` is active with a main process other than `not_pid`;
/// returns its MainPID.
fn wait_active(m: &Machine, unit: &str, not_pid: Option<&str>) -> String {
    poll(
        Duration::from_secs(30),
        Duration::from_millis(100),
        &format!("{unit} active on {}", m.name()),
        || {
            let [state, pid]: [String; 2] = unit_props(m, unit, &["ActiveState", "MainPID"])
                .try_into()
                .expect("two properties");
            if state != "active" || pid == "0" {
                return Err(format!("{state}, MainPID {pid}\n{}", m.journal(unit)));
            }
            if not_pid == Some(pid.as_str()) {
                return Err(format!("still the old process (MainPID {pid})"));
            }
            Ok(pid)
        },
    )
}

/// The lines of `/proc/PID/status` inside `m` for the given fields.
fn proc_status(m: &Machine, pid: &str, fields: &[&str]) -> Vec<String> {
    let status = m.sh(&format!("cat /proc/{pid}/status"));
    fields
        .iter()
        .map(|f| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{f}:")))
                .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
                .unwrap_or_else(|| panic!("no {f} in /proc/{pid}/status"))
        })
        .collect()
}

/// `systemd-analyze security UNIT`'s overall exposure, and its last line.
fn exposure(m: &Machine, unit: &str) -> (f64, String) {
    let out = m.exec(&["systemd-analyze", "security", "--no-pager", unit]);
    let report = text(&out);
    let last = report
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("systemd-analyze security {unit}:\n{report}"))
        .trim()
        .to_owned();
    let score = last
        .rsplit_once(": ")
        .and_then(|(_, s)| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the exposure in {last:?}"));
    (score, last)
}

/// The node as `stewardctl nodes -o json` shows it, if listed.
fn node_entry(coord: &Machine, endpoint: &str, node: &str) -> Result<serde_json::Value, String> {
    let out = ctl_in(coord, endpoint, &["nodes", "-o", "json"]);
    if !out.status.success() {
        return Err(format!("stewardctl nodes: {}", text(&out)));
    }
    let all: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("stewardctl nodes -o json: {e}: {}", text(&out)))?;
    all.as_array()
        .into_iter()
        .flatten()
        .find(|n| n["id"] == node)
        .cloned()
        .ok_or_else(|| format!("{node} not listed: {all}"))
}

fn wait_node_health(coord: &Machine, endpoint: &str, node: &str, want: &str) {
    poll(
        Duration::from_secs(30),
        Duration::from_millis(200),
        &format!("{node} {want} in stewardctl nodes"),
        || {
            let n = node_entry(coord, endpoint, node)?;
            if n["health"] == want {
                Ok(())
            } else {
                Err(format!("health {}", n["health"]))
            }
        },
    );
}

/// Paths (relative to `/`) of every file, directory or link in `m`'s
/// persistent file system whose name mentions "steward". Read from here
/// through its root, which shows neither /proc, /sys, /dev nor /run nor the
/// folders bound in.
fn steward_paths(m: &Machine) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut stack = vec![m.root().to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if entry
                .file_name()
                .to_string_lossy()
                .to_lowercase()
                .contains("steward")
            {
                let rel = path.strip_prefix(m.root()).expect("under root");
                found.insert(format!("/{}", rel.display()));
            }
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path);
            }
        }
    }
    found
}

/// `dpkg -L PACKAGE` inside `m`.
fn dpkg_list(m: &Machine, package: &str) -> Vec<String> {
    m.sh(&format!("dpkg -L {package}"))
        .lines()
        .map(str::to_owned)
        .filter(|l| l.starts_with('/') && l != "/.")
        .collect()
}

/// After `dpkg -P`: every path `listed` for the purged package is gone,
/// but for directories another installed package owns too.
fn assert_listed_paths_gone(m: &Machine, package: &str, listed: &[String]) {
    for path in listed {
        let here = m.root().join(path.trim_start_matches('/'));
        if fs::symlink_metadata(&here).is_err() {
            continue;
        }
        let owners = m.exec(&["dpkg-query", "-S", path]);
        assert!(
            here.is_dir() && owners.status.success(),
            "{}: {path} (listed by dpkg -L {package}) is still there after purge \
             and no other package owns it ({})",
            m.name(),
            text(&owners).trim()
        );
    }
    let status = m.exec(&["dpkg-query", "-W", package]);
    assert!(
        !status.status.success(),
        "{}: dpkg still knows {package} after purge: {}",
        m.name(),
        text(&status)
    );
}

/// Copies `from` (on this host) to `to` in `m`, with `mode`.
fn put(m: &Machine, from: &Path, to: &str, mode: u32) {
    let dest = m.root().join(to.trim_start_matches('/'));
    fs::create_dir_all(dest.parent().expect("parent")).expect("mkdir in machine");
    fs::copy(from, &dest)
        .unwrap_or_else(|e| panic!("copy {} -> {}: {e}", from.display(), dest.display()));
    fs::set_permissions(&dest, fs::Permissions::from_mode(mode)).expect("chmod");
}

/// Reads the TOML file `path` in `m`, lets `edit` change it, writes it back
/// (comments are lost: a locally modified conffile, as an operator's
/// would be).
fn edit_toml(m: &Machine, path: &str, edit: impl FnOnce(&mut toml::Table)) {
    let file = m.root().join(path.trim_start_matches('/'));
    let mut table: toml::Table = read(&file)
        .parse()
        .unwrap_or_else(|e| panic!("{path} in {}: {e}", m.name()));
    edit(&mut table);
    fs::write(&file, toml::to_string(&table).expect("toml")).expect("write config");
}

fn table<'a>(t: &'a mut toml::Table, key: &str) -> &'a mut toml::Table {
    t.get_mut(key)
        .and_then(|v| v.as_table_mut())
        .unwrap_or_else(|| panic!("no [{key}] in the packaged config"))
}

/// The same .deb with `Version:` set to `version` (file contents and
/// scripts unchanged), written into `out`.
fn repack_with_version(deb: &Path, version: &str, out: &Path) -> PathBuf {
    let work = tempdir("steward-repack-");
    let tree = work.path().join("tree");
    run_ok(
        "dpkg-deb",
        &["-R", &deb.to_string_lossy(), &tree.to_string_lossy()],
    );
    let control = tree.join("DEBIAN/control");
    let old = read(&control);
    let new: String = old
        .lines()
        .map(|l| {
            if l.starts_with("Version: ") {
                format!("Version: {version}\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    assert_ne!(old, new, "no Version field in {}", deb.display());
    fs::write(&control, new).expect("write control");
    let name = run_ok("dpkg-deb", &["-f", &deb.to_string_lossy(), "Package"]);
    let arch = run_ok("dpkg-deb", &["-f", &deb.to_string_lossy(), "Architecture"]);
    let file = out.join(format!("{}_{version}_{}.deb", name.trim(), arch.trim()));
    run_ok(
        "dpkg-deb",
        &[
            "--root-owner-group",
            // Fast: a test's throwaway package.
            "-Zgzip",
            "-z1",
            "-b",
            &tree.to_string_lossy(),
            &file.to_string_lossy(),
        ],
    );
    file
}

#[test]
fn debs_install_upgrade_remove_purge_on_systemd_hosts() {
    let packages = Packages::find();
    let clock = Clock::start();
    // Dropped last to first: machines, etcd, the net, the directories.
    let dir = tempdir("steward-packages-test-");
    let host_pki = dir.path().join("pki");
    let net = TestNet::new("pkgs");
    let etcd = Etcd::start_on(dir.path(), net.gateway().into());
    clock.say(format!("etcd on {}", etcd.client_url));

    let opts = MachineOptions::default().bind_ro(&packages.dir, PACKAGES_IN_MACHINE);
    let (coord, node) = std::thread::scope(|s| {
        let a = s.spawn(|| Machine::boot(&net, "coord", opts.clone()));
        let b = s.spawn(|| Machine::boot(&net, "node1", opts.clone()));
        let join = |h: std::thread::ScopedJoinHandle<'_, Machine>| {
            h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))
        };
        (join(a), join(b))
    });
    let endpoint = format!("https://{}:{COORDINATOR_PORT}", coord.ip());
    clock.say(format!(
        "machines booted: coord {}, node1 {}",
        coord.ip(),
        node.ip()
    ));
    let baseline_coord = steward_paths(&coord);
    let baseline_node = steward_paths(&node);

    // 1. Install: enabled, waiting for certificates.
    coord.sh(&format!(
        "dpkg -i {} {} {}",
        packages.deb_in_machine(COORDINATOR),
        packages.deb_in_machine(CTL),
        packages.deb_in_machine(AGENT)
    ));
    node.sh(&format!("dpkg -i {}", packages.deb_in_machine(AGENT)));
    assert_enabled_but_waiting_for_certificates(&coord, COORDINATOR_UNIT);
    assert_enabled_but_waiting_for_certificates(&coord, AGENT_UNIT);
    assert_enabled_but_waiting_for_certificates(&node, AGENT_UNIT);
    let passwd = coord.sh("getent passwd steward");
    let fields: Vec<&str> = passwd.trim().split(':').collect();
    let uid: u32 = fields
        .get(2)
        .and_then(|u| u.parse().ok())
        .unwrap_or(u32::MAX);
    assert!(
        uid < 1000 && fields.get(6) == Some(&"/usr/sbin/nologin"),
        "steward must be a system user without a login: {passwd}"
    );
    let state = node.root().join("var/lib/steward-agent");
    assert_eq!(mode(&state), 0o700, "the agent's state directory");
    let agent_files = dpkg_list(&node, AGENT);
    let coord_files: Vec<(&str, Vec<String>)> = [COORDINATOR, CTL, AGENT]
        .iter()
        .map(|p| (*p, dpkg_list(&coord, p)))
        .collect();
    clock.say("installed: units enabled, inactive until configured (condition failed)");

    // Certificates, made here as an operator would on a workstation.
    let ctl_here = |args: &[&str]| run_ok(&bin("stewardctl").to_string_lossy(), args);
    let pki = host_pki.to_string_lossy().into_owned();
    ctl_here(&["pki", "init", &pki, "--cluster", "pkgtest"]);
    ctl_here(&["pki", "issue", &pki, "admin", "--kind", "admin"]);
    ctl_here(&[
        "pki",
        "issue",
        &pki,
        "coord-1",
        "--kind",
        "coordinator",
        "--san",
        &coord.ip().to_string(),
    ]);

    // 2. The coordinator: certificates, the packaged config edited.
    put(
        &coord,
        &host_pki.join("ca.crt"),
        "/etc/steward/pki/ca.crt",
        0o644,
    );
    put(
        &coord,
        &host_pki.join("coord-1.crt"),
        "/etc/steward/pki/coordinator.crt",
        0o644,
    );
    put(
        &coord,
        &host_pki.join("coord-1.key"),
        "/etc/steward/pki/coordinator.key",
        0o640,
    );
    for key in ["secrets.key", "ca.key"] {
        put(
            &coord,
            &host_pki.join(key),
            &format!("/etc/steward/pki/{key}"),
            0o640,
        );
    }
    coord.sh(
        "chgrp steward /etc/steward/pki/coordinator.key /etc/steward/pki/secrets.key \
         /etc/steward/pki/ca.key",
    );
    let listen = format!("{}:{COORDINATOR_PORT}", coord.ip());
    edit_toml(&coord, "/etc/steward/coordinator.toml", |t| {
        t.insert("id".into(), "coord-1".into());
        t.insert("cluster".into(), "pkgtest".into());
        t.insert("listen".into(), listen.clone().into());
        t.insert("advertise".into(), endpoint.clone().into());
        let tls = table(t, "tls");
        assert_eq!(
            tls["cert"].as_str(),
            Some("/etc/steward/pki/coordinator.crt")
        );
        assert_eq!(
            tls["key"].as_str(),
            Some("/etc/steward/pki/coordinator.key")
        );
        table(t, "etcd").insert(
            "endpoints".into(),
            toml::Value::Array(vec![etcd.client_url.clone().into()]),
        );
        table(t, "vip").insert("replicas".into(), 1.into());
    });
    // As the service's user: it can read what it needs.
    coord.sh(
        "runuser -u steward -- steward-coordinator --config /etc/steward/coordinator.toml --check",
    );
    coord.sh("systemctl start steward-coordinator");
    let coord_pid = wait_active(&coord, COORDINATOR_UNIT, None);
    for file in ["ca.crt", "admin.crt", "admin.key"] {
        put(
            &coord,
            &host_pki.join(file),
            &format!("{ADMIN_IN_MACHINE}/{file}"),
            0o600,
        );
    }
    let status = poll(
        Duration::from_secs(30),
        Duration::from_millis(200),
        "the packaged stewardctl to see coord-1 lead",
        || {
            let out = ctl_in(&coord, &endpoint, &["status", "-o", "json"]);
            let v: serde_json::Value =
                serde_json::from_slice(&out.stdout).map_err(|e| format!("{e}: {}", text(&out)))?;
            if v["leader"] == "coord-1" && v["etcd_reachable"] == true {
                Ok(v)
            } else {
                Err(v.to_string())
            }
        },
    );
    eprintln!("stewardctl status: {status}");
    let [uid_line, cap_eff, cap_bnd, no_new_privs, seccomp]: [String; 5] = proc_status(
        &coord,
        &coord_pid,
        &["Uid", "CapEff", "CapBnd", "NoNewPrivs", "Seccomp"],
    )
    .try_into()
    .expect("five fields");
    assert_eq!(
        uid_line,
        vec![uid.to_string(); 4].join(" "),
        "the coordinator runs as steward (uid {uid})"
    );
    assert_eq!(
        (
            cap_eff.as_str(),
            cap_bnd.as_str(),
            no_new_privs.as_str(),
            seccomp.as_str()
        ),
        ("0000000000000000", "0000000000000000", "1", "2"),
        "the coordinator: no capabilities, no new privileges, a seccomp filter"
    );
    let (coord_exposure, coord_line) = exposure(&coord, COORDINATOR_UNIT);
    clock.say(format!(
        "coordinator active as steward (uid {uid}), leads; systemd-analyze security: {coord_line}"
    ));
    assert!(
        coord_exposure <= COORDINATOR_MAX_EXPOSURE,
        "{COORDINATOR_UNIT} hardening weakened: {coord_line} (at most {COORDINATOR_MAX_EXPOSURE}):\n{}",
        text(&coord.exec(&["systemd-analyze", "security", "--no-pager", COORDINATOR_UNIT]))
    );

    // The agent on node1 joins with a token: the command `token create`
    // prints, run as printed (plus the node id: the machine's host name is
    // the test's), which writes the certificate and config and starts the
    // unit.
    let created = ctl_in(
        &coord,
        &endpoint,
        &["token", "create", "--ttl", "10m", "-o", "json"],
    );
    assert!(created.status.success(), "token create: {}", text(&created));
    let created: serde_json::Value =
        serde_json::from_slice(&created.stdout).expect("token create -o json");
    let join = created["join_command"].as_str().expect("join_command");
    assert!(
        join.contains(&format!("--coordinator https://{}:7444", coord.ip())),
        "{join}"
    );
    let joined = node.sh(&format!("{join} --node-id node1"));
    clock.say(format!("node1 joined: {}", joined.trim()));
    let agent_pid = wait_active(&node, AGENT_UNIT, None);
    let config = read(&node.root().join("etc/steward/agent.toml"));
    assert!(
        config.contains("node_id = \"node1\"") && config.contains(&endpoint),
        "the joined config:\n{config}"
    );
    assert_eq!(mode(&node.root().join("etc/steward/pki/node.key")), 0o600);
    // The same token again (from the coordinator's host, which has the
    // agent package too): refused, nothing written there.
    let again = coord.exec(&["sh", "-c", &format!("{join} --node-id node2")]);
    assert!(!again.status.success(), "a used token was accepted");
    assert!(
        text(&again).contains("already used (by node1)"),
        "{}",
        text(&again)
    );
    assert!(
        !coord.root().join("etc/steward/pki/node.crt").exists(),
        "a refused join wrote a certificate"
    );
    wait_node_health(&coord, &endpoint, "node1", "healthy");
    let nodes = ctl_in(&coord, &endpoint, &["nodes"]);
    eprintln!("stewardctl nodes:\n{}", text(&nodes));
    let (_, agent_line) = exposure(&node, AGENT_UNIT);
    clock.say(format!(
        "node1's agent active and listed healthy; systemd-analyze security: {agent_line}"
    ));

    // 3. Upgrade: the same files under a newer version.
    let desired = state.join("desired.json");
    poll(
        Duration::from_secs(10),
        Duration::from_millis(100),
        "the agent to record its desired state",
        || {
            desired
                .exists()
                .then_some(())
                .ok_or("no desired.json yet".to_owned())
        },
    );
    clock.say("node1's agent recorded its desired state");
    let marker = state.join("kept-across-upgrade");
    fs::write(&marker, "operator's note\n").expect("write marker");
    let config_path = node.root().join("etc/steward/agent.toml");
    let config_before = read(&config_path);
    let coord_config_before = read(&coord.root().join("etc/steward/coordinator.toml"));
    let old_version = run_ok(
        "dpkg-deb",
        &["-f", &packages.deb(AGENT).to_string_lossy(), "Version"],
    );
    let new_version = format!("{}+upgrade1", old_version.trim());
    let upgrades = tempdir("steward-upgrade-debs-");
    for (m, name) in [(&node, AGENT), (&coord, COORDINATOR)] {
        let deb = repack_with_version(&packages.deb(name), &new_version, upgrades.path());
        let inside = format!(
            "{UPGRADE_IN_MACHINE}/{}",
            deb.file_name().expect("name").to_string_lossy()
        );
        put(m, &deb, &inside, 0o644);
        // No --force-conf*: dpkg would ask if it had to (and fail with no
        // terminal); the conffile shipped is unchanged, the local one kept.
        m.sh(&format!("dpkg -i {inside} && rm {inside}"));
        clock.say(format!("{}: dpkg -i {name} {new_version} done", m.name()));
        let version = m.sh(&format!("dpkg-query -W -f '${{Version}}' {name}"));
        assert_eq!(version, new_version, "{}: {name} upgraded", m.name());
    }
    let agent_pid_after = wait_active(&node, AGENT_UNIT, Some(&agent_pid));
    let coord_pid_after = wait_active(&coord, COORDINATOR_UNIT, Some(&coord_pid));
    assert_eq!(
        read(&config_path),
        config_before,
        "the locally modified agent.toml was not kept"
    );
    assert_eq!(
        read(&coord.root().join("etc/steward/coordinator.toml")),
        coord_config_before,
        "the locally modified coordinator.toml was not kept"
    );
    for leftover in [".dpkg-dist", ".dpkg-new", ".dpkg-old"] {
        let path = node
            .root()
            .join(format!("etc/steward/agent.toml{leftover}"));
        assert!(!path.exists(), "{} after the upgrade", path.display());
    }
    assert_eq!(
        read(&marker),
        "operator's note\n",
        "the state directory was not kept"
    );
    assert!(desired.exists(), "desired.json gone after the upgrade");
    wait_node_health(&coord, &endpoint, "node1", "healthy");
    clock.say(format!(
        "upgraded to {new_version}: agent MainPID {agent_pid} -> {agent_pid_after}, \
         coordinator {coord_pid} -> {coord_pid_after}; configs and state kept; node1 healthy"
    ));

    // 4. Remove: stopped, config and state kept.
    node.sh(&format!("dpkg -r {AGENT}"));
    let [active] = unit_props(&node, AGENT_UNIT, &["ActiveState"])
        .try_into()
        .expect("one property");
    assert_eq!(active, "inactive", "node1: {AGENT_UNIT} after dpkg -r");
    let running = node.sh("cat /proc/[0-9]*/comm 2>/dev/null || true");
    assert!(
        !running.lines().any(|c| c.trim() == "steward-agent"),
        "node1: a steward-agent process is left after dpkg -r"
    );
    wait_node_health(&coord, &endpoint, "node1", "disconnected");
    assert!(
        config_path.exists() && marker.exists(),
        "dpkg -r keeps config and state"
    );

    // Purge: nothing left.
    node.sh(&format!("dpkg -P {AGENT}"));
    assert_listed_paths_gone(&node, AGENT, &agent_files);
    for gone in [
        "/etc/steward",
        "/var/lib/steward-agent",
        "/usr/lib/systemd/system/steward-agent.service",
        "/etc/systemd/system/steward-agent.service",
        "/etc/systemd/system/multi-user.target.wants/steward-agent.service",
    ] {
        assert!(
            fs::symlink_metadata(node.root().join(gone.trim_start_matches('/'))).is_err(),
            "node1: {gone} is left after dpkg -P"
        );
    }
    assert_eq!(
        steward_paths(&node),
        baseline_node,
        "node1: files named after steward left after dpkg -P (compared with before install)"
    );
    clock.say("node1: dpkg -r stopped the agent (disconnected); dpkg -P left nothing");

    coord.sh(&format!("dpkg -r {COORDINATOR}"));
    let [active] = unit_props(&coord, COORDINATOR_UNIT, &["ActiveState"])
        .try_into()
        .expect("one property");
    assert_eq!(
        active, "inactive",
        "coord: {COORDINATOR_UNIT} after dpkg -r"
    );
    let refused = ctl_in(&coord, &endpoint, &["status"]);
    assert!(
        !refused.status.success(),
        "stewardctl status still answered after dpkg -r {COORDINATOR}: {}",
        text(&refused)
    );
    coord.sh(&format!("dpkg -P {COORDINATOR}"));
    // The CA certificate stays for the agent still installed here.
    assert!(
        coord.root().join("etc/steward/pki/ca.crt").exists(),
        "coord: purging {COORDINATOR} removed ca.crt, which {AGENT} still uses"
    );
    assert!(
        !coord
            .root()
            .join("etc/steward/pki/coordinator.key")
            .exists(),
        "coord: coordinator.key left after dpkg -P {COORDINATOR}"
    );
    coord.sh(&format!("dpkg -P {AGENT} {CTL}"));
    for (package, listed) in &coord_files {
        assert_listed_paths_gone(&coord, package, listed);
    }
    assert!(
        fs::symlink_metadata(coord.root().join("etc/steward")).is_err(),
        "coord: /etc/steward is left after purging every package"
    );
    assert_eq!(
        steward_paths(&coord),
        baseline_coord,
        "coord: files named after steward left after dpkg -P (compared with before install)"
    );
    // Kept on purpose (see packaging/deb/steward-coordinator/postrm).
    assert!(
        coord
            .exec(&["getent", "passwd", "steward"])
            .status
            .success(),
        "the steward system user is meant to stay after purge"
    );
    clock.say("coord: dpkg -r stopped the coordinator; dpkg -P left nothing but the steward user");
}
