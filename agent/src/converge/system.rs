//! The real host: files through std, kernel settings through `/proc/sys`,
//! packages through apt or dnf, units through `systemctl` (checking every
//! result), one-shot steps as child processes.

use std::fs;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::unistd::{chown, Gid, Group, Uid, User};

use super::host::{
    tail, CommandOutput, Commands, Files, Host, HostError, HostResult, Kernel, Meta, MountProbe,
    Packages, Services, UnitState, Validator,
};
use super::resource::{NotifyAction, PackageSpec, Repository};

/// Which package manager the host has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackageManager {
    Apt,
    Dnf,
}

impl PackageManager {
    pub fn detect() -> Option<Self> {
        let on_path = |p: &str| {
            std::env::var_os("PATH")
                .map(|path| std::env::split_paths(&path).any(|d| d.join(p).is_file()))
                .unwrap_or(false)
        };
        if on_path("apt-get") {
            Some(PackageManager::Apt)
        } else if on_path("dnf") {
            Some(PackageManager::Dnf)
        } else {
            None
        }
    }
}

pub struct System {
    packages: Option<PackageManager>,
    container: Option<String>,
}

impl System {
    pub fn detect() -> Self {
        System {
            packages: PackageManager::detect(),
            container: detect_container(),
        }
    }
}

/// `Some(kind)` inside a container: systemd writes `/run/systemd/container`
/// there, and container managers set `container=` for PID 1.
fn detect_container() -> Option<String> {
    if let Ok(kind) = fs::read_to_string("/run/systemd/container") {
        let kind = kind.trim();
        if !kind.is_empty() {
            return Some(kind.to_owned());
        }
    }
    let environ = fs::read("/proc/1/environ").ok()?;
    environ
        .split(|b| *b == 0)
        .filter_map(|kv| std::str::from_utf8(kv).ok())
        .find_map(|kv| kv.strip_prefix("container="))
        .filter(|k| !k.is_empty())
        .map(str::to_owned)
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> HostError {
    match e.kind() {
        ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem => {
            HostError::NotPermittedHere(format!("{what} {}: {e}", path.display()))
        }
        _ => HostError::Failed(format!("{what} {}: {e}", path.display())),
    }
}

/// The longest any one command may run (a package install over a slow
/// mirror, `kubeadm init`). One that runs longer is hung — on a lock, a
/// prompt, a dead mount — and is killed with its process group, so that a
/// converge run always ends and reports.
pub const COMMAND_DEADLINE: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// Runs a program to completion (at most [`COMMAND_DEADLINE`]); `Err` if it
/// could not be started or had to be killed.
fn exec(argv: &[&str], env: &[(&str, &str)]) -> HostResult<CommandOutput> {
    exec_within(argv, env, COMMAND_DEADLINE)
}

/// Runs a program until it ends or `deadline` passed; `Err` if it could not
/// be started or had to be killed (with its process group).
pub fn exec_within(
    argv: &[&str],
    env: &[(&str, &str)],
    deadline: std::time::Duration,
) -> HostResult<CommandOutput> {
    let (out, killed) = exec_until(argv, env, deadline)?;
    if killed {
        return Err(HostError::CommandKilled {
            command: argv.join(" "),
            after: deadline,
            stdout: out.stdout,
            stderr: out.stderr,
        });
    }
    Ok(out)
}

fn cannot_run(program: &str, e: std::io::Error) -> HostError {
    HostError::CannotRun {
        program: program.to_owned(),
        reason: e.to_string(),
    }
}

/// Runs a program until it ends or `deadline` passed; true if it had to be
/// killed (with its process group).
fn exec_until(
    argv: &[&str],
    env: &[(&str, &str)],
    deadline: std::time::Duration,
) -> HostResult<(CommandOutput, bool)> {
    use std::os::unix::process::CommandExt;
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| HostError::Failed("empty command".into()))?;
    let child = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        // Its own process group, so that a kill reaches what it started.
        .process_group(0)
        .spawn()
        .map_err(|e| cannot_run(program, e))?;
    let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (done, finished) = std::sync::mpsc::channel::<()>();
    let killer = std::thread::spawn(move || {
        // Woken at once when the command ends (`done` sent or dropped).
        if finished.recv_timeout(deadline) == Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
            return true;
        }
        false
    });
    let out = child.wait_with_output();
    let _ = done.send(());
    let killed = killer.join().unwrap_or(false);
    let out = out.map_err(|e| cannot_run(program, e))?;
    Ok((
        CommandOutput {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        },
        killed,
    ))
}

/// Runs a program that must succeed.
fn check(argv: &[&str], env: &[(&str, &str)]) -> HostResult<String> {
    let out = exec(argv, env)?;
    if out.success {
        Ok(out.stdout)
    } else {
        Err(HostError::CommandFailed {
            command: argv.join(" "),
            stdout: out.stdout,
            stderr: out.stderr,
        })
    }
}

fn ids(meta: &Meta) -> HostResult<(Uid, Gid)> {
    let user = User::from_name(&meta.owner)
        .ok()
        .flatten()
        .ok_or_else(|| HostError::Failed(format!("no such user {}", meta.owner)))?;
    let group = Group::from_name(&meta.group)
        .ok()
        .flatten()
        .ok_or_else(|| HostError::Failed(format!("no such group {}", meta.group)))?;
    Ok((user.uid, group.gid))
}

fn name_of_uid(uid: u32) -> String {
    User::from_uid(Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| uid.to_string())
}

fn name_of_gid(gid: u32) -> String {
    Group::from_gid(Gid::from_raw(gid))
        .ok()
        .flatten()
        .map(|g| g.name)
        .unwrap_or_else(|| gid.to_string())
}

impl Files for System {
    fn read(&self, path: &Path) -> HostResult<Option<Vec<u8>>> {
        match fs::read(path) {
            Ok(c) => Ok(Some(c)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error("read", path, e)),
        }
    }

    fn meta(&self, path: &Path) -> HostResult<Option<Meta>> {
        match fs::metadata(path) {
            Ok(m) => Ok(Some(Meta {
                is_dir: m.is_dir(),
                mode: m.mode() & 0o7777,
                owner: name_of_uid(m.uid()),
                group: name_of_gid(m.gid()),
            })),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error("stat", path, e)),
        }
    }

    fn write(
        &self,
        path: &Path,
        content: &[u8],
        meta: &Meta,
        validate: Option<Validator<'_>>,
    ) -> HostResult<()> {
        let (uid, gid) = ids(meta)?;
        let name = path
            .file_name()
            .ok_or_else(|| HostError::Failed(format!("{}: not a file path", path.display())))?;
        // A fixed name: a run killed half-way leaves one stale file that the
        // next run overwrites, never a growing pile.
        let staged = path.with_file_name(format!(".{}.steward-new", name.to_string_lossy()));
        let result = (|| {
            // Created afresh with the final mode (never wider, even for a
            // moment: secrets are written through here).
            match fs::remove_file(&staged) {
                Err(e) if e.kind() != ErrorKind::NotFound => {
                    return Err(io_error("remove", &staged, e))
                }
                _ => {}
            }
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(meta.mode & 0o777)
                .open(&staged)
                .map_err(|e| io_error("create", &staged, e))?;
            f.write_all(content)
                .and_then(|()| f.sync_all())
                .map_err(|e| io_error("write", &staged, e))?;
            fs::set_permissions(&staged, fs::Permissions::from_mode(meta.mode))
                .map_err(|e| io_error("chmod", &staged, e))?;
            chown(&staged, Some(uid), Some(gid))
                .map_err(|e| HostError::Failed(format!("chown {}: {e}", staged.display())))?;
            if let Some(validate) = validate {
                validate(&staged)?;
            }
            fs::rename(&staged, path).map_err(|e| io_error("rename onto", path, e))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&staged);
        }
        result
    }

    fn set_meta(&self, path: &Path, meta: &Meta) -> HostResult<()> {
        let (uid, gid) = ids(meta)?;
        fs::set_permissions(path, fs::Permissions::from_mode(meta.mode))
            .map_err(|e| io_error("chmod", path, e))?;
        chown(path, Some(uid), Some(gid))
            .map_err(|e| HostError::Failed(format!("chown {}: {e}", path.display())))
    }

    fn create_dir(&self, path: &Path, meta: &Meta) -> HostResult<()> {
        fs::create_dir_all(path).map_err(|e| io_error("mkdir", path, e))?;
        self.set_meta(path, meta)
    }

    fn list(&self, dir: &Path) -> HostResult<Vec<String>> {
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_error("list", dir, e)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| io_error("list", dir, e))?;
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        Ok(names)
    }

    fn remove(&self, path: &Path) -> HostResult<()> {
        match fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error("remove", path, e)),
        }
    }
}

/// The package's name for the host's package manager. Planners name
/// packages as Debian does; the few that RPM distributions name otherwise
/// are mapped here.
pub fn package_name(manager: PackageManager, name: &str) -> &str {
    match (manager, name) {
        (PackageManager::Dnf, "glusterfs-client") => "glusterfs-fuse",
        (_, name) => name,
    }
}

const APT_ENV: &[(&str, &str)] = &[("DEBIAN_FRONTEND", "noninteractive")];

impl System {
    fn manager(&self) -> HostResult<PackageManager> {
        self.packages
            .ok_or_else(|| HostError::Failed("no package manager found (apt-get or dnf)".into()))
    }

    fn apt_install(&self, packages: &[PackageSpec]) -> HostResult<()> {
        // An agent killed during a dpkg run leaves it half-configured; finish
        // that first or every later install fails.
        if !exec(&["dpkg", "--audit"], &[])?.stdout.trim().is_empty() {
            check(&["dpkg", "--configure", "-a"], APT_ENV)?;
        }
        let names: Vec<String> = packages
            .iter()
            .map(|p| match &p.version {
                Some(v) => format!("{}={v}", p.name),
                None => p.name.clone(),
            })
            .collect();
        let mut argv = vec![
            "apt-get",
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "--allow-downgrades",
            // A held package named with a new version is a hold moving on
            // purpose (a Kubernetes upgrade reaching this node).
            "--allow-change-held-packages",
            "-o",
            "DPkg::Lock::Timeout=120",
            "-o",
            "Dpkg::Options::=--force-confdef",
            "-o",
            "Dpkg::Options::=--force-confold",
        ];
        argv.extend(names.iter().map(String::as_str));
        match check(&argv, APT_ENV) {
            Ok(_) => Ok(()),
            // Stale or missing indexes: read them and try once more.
            Err(_) => {
                self.refresh()?;
                check(&argv, APT_ENV).map(|_| ())
            }
        }
    }
}

impl Packages for System {
    fn installed(&self, name: &str) -> HostResult<Option<String>> {
        match self.manager()? {
            PackageManager::Apt => {
                let out = exec(
                    &[
                        "dpkg-query",
                        "-W",
                        "-f=${db:Status-Abbrev} ${Version}",
                        name,
                    ],
                    &[],
                )?;
                let text = out.stdout.trim();
                Ok(text
                    .strip_prefix("ii ")
                    .or_else(|| text.strip_prefix("hi "))
                    .map(|v| v.trim().to_owned()))
            }
            PackageManager::Dnf => {
                let name = package_name(PackageManager::Dnf, name);
                let out = exec(&["rpm", "-q", "--qf", "%{VERSION}-%{RELEASE}", name], &[])?;
                Ok(out.success.then(|| out.stdout.trim().to_owned()))
            }
        }
    }

    fn install(&self, packages: &[PackageSpec]) -> HostResult<()> {
        match self.manager()? {
            PackageManager::Apt => self.apt_install(packages),
            PackageManager::Dnf => {
                let names: Vec<String> = packages
                    .iter()
                    .map(|p| {
                        let name = package_name(PackageManager::Dnf, &p.name);
                        match &p.version {
                            Some(v) => format!("{name}-{v}"),
                            None => name.to_owned(),
                        }
                    })
                    .collect();
                // A versionlock pins the installed version: a package named
                // with another one moves on purpose (a Kubernetes upgrade
                // reaching this node); the hold is added back after. A
                // package with no lock makes `delete` fail: not an error.
                let moving: Vec<&str> = packages
                    .iter()
                    .filter(|p| p.version.is_some())
                    .map(|p| package_name(PackageManager::Dnf, &p.name))
                    .collect();
                if !moving.is_empty() {
                    let mut unlock = vec!["dnf", "versionlock", "delete"];
                    unlock.extend(moving);
                    exec(&unlock, &[])?;
                }
                let mut argv = vec!["dnf", "install", "-y", "-q"];
                argv.extend(names.iter().map(String::as_str));
                check(&argv, &[]).map(|_| ())
            }
        }
    }

    fn held(&self, name: &str) -> HostResult<bool> {
        match self.manager()? {
            PackageManager::Apt => Ok(check(&["apt-mark", "showhold", name], &[])?
                .lines()
                .any(|l| l.trim() == name)),
            PackageManager::Dnf => Ok(exec(&["dnf", "versionlock", "list"], &[])?
                .stdout
                .lines()
                .any(|l| l.starts_with(&format!("{name}-")) || l.contains(&format!(":{name}-")))),
        }
    }

    fn hold(&self, names: &[String]) -> HostResult<()> {
        let mut argv = match self.manager()? {
            PackageManager::Apt => vec!["apt-mark", "hold"],
            PackageManager::Dnf => vec!["dnf", "versionlock", "add"],
        };
        argv.extend(names.iter().map(String::as_str));
        check(&argv, &[]).map(|_| ())
    }

    fn repository_files(&self, repo: &Repository) -> Vec<(PathBuf, Vec<u8>)> {
        match self.packages.unwrap_or(PackageManager::Apt) {
            PackageManager::Apt => apt_repository_files(repo),
            PackageManager::Dnf => dnf_repository_files(repo),
        }
    }

    fn refresh(&self) -> HostResult<()> {
        match self.manager()? {
            PackageManager::Apt => check(
                &["apt-get", "update", "-q", "-o", "DPkg::Lock::Timeout=120"],
                APT_ENV,
            )
            .map(|_| ()),
            PackageManager::Dnf => check(&["dnf", "makecache", "-q"], &[]).map(|_| ()),
        }
    }
}

/// `/etc/apt/sources.list.d/<name>.list`, and the key under
/// `/etc/apt/keyrings/` that only this source trusts.
pub fn apt_repository_files(repo: &Repository) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    let option = match &repo.key {
        Some(key) => {
            let key_path = format!("/etc/apt/keyrings/steward-{}.asc", repo.name);
            files.push((PathBuf::from(&key_path), key.clone().into_bytes()));
            format!("signed-by={key_path}")
        }
        None => "trusted=yes".to_owned(),
    };
    let line = format!("deb [{option}] {} {}\n", repo.url, repo.suite);
    files.push((
        PathBuf::from(format!(
            "/etc/apt/sources.list.d/steward-{}.list",
            repo.name
        )),
        line.into_bytes(),
    ));
    files
}

/// `/etc/yum.repos.d/<name>.repo`, with its key beside it.
pub fn dnf_repository_files(repo: &Repository) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    let mut text = format!(
        "[steward-{name}]\nname={name} (managed by steward)\nbaseurl={url}\nenabled=1\n",
        name = repo.name,
        url = repo.url
    );
    match &repo.key {
        Some(key) => {
            let key_path = format!("/etc/pki/rpm-gpg/steward-{}.asc", repo.name);
            files.push((PathBuf::from(&key_path), key.clone().into_bytes()));
            text.push_str(&format!("gpgcheck=1\ngpgkey=file://{key_path}\n"));
        }
        None => text.push_str("gpgcheck=0\n"),
    }
    files.push((
        PathBuf::from(format!("/etc/yum.repos.d/steward-{}.repo", repo.name)),
        text.into_bytes(),
    ));
    files
}

fn systemd_running() -> HostResult<()> {
    if Path::new("/run/systemd/system").is_dir() {
        Ok(())
    } else {
        Err(HostError::Failed(
            "systemd is not running on this host (no /run/systemd/system)".into(),
        ))
    }
}

impl Services for System {
    fn state(&self, unit: &str) -> HostResult<UnitState> {
        systemd_running()?;
        let out = check(
            &[
                "systemctl",
                "show",
                unit,
                "--property=LoadState,ActiveState,UnitFileState",
            ],
            &[],
        )?;
        let prop = |name: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
                .unwrap_or("")
                .to_owned()
        };
        Ok(UnitState {
            loaded: prop("LoadState") == "loaded",
            enabled: matches!(
                prop("UnitFileState").as_str(),
                "enabled" | "enabled-runtime" | "static" | "alias"
            ),
            active: matches!(prop("ActiveState").as_str(), "active" | "reloading"),
        })
    }

    fn daemon_reload(&self) -> HostResult<()> {
        systemd_running()?;
        check(&["systemctl", "daemon-reload"], &[]).map(|_| ())
    }

    fn set_enabled(&self, unit: &str, enabled: bool) -> HostResult<()> {
        let verb = if enabled { "enable" } else { "disable" };
        check(&["systemctl", verb, "--quiet", unit], &[]).map(|_| ())
    }

    fn start(&self, unit: &str) -> HostResult<()> {
        check(&["systemctl", "start", unit], &[])?;
        self.confirm_active(unit)
    }

    fn stop(&self, unit: &str) -> HostResult<()> {
        check(&["systemctl", "stop", unit], &[]).map(|_| ())
    }

    fn notify(&self, unit: &str, action: NotifyAction) -> HostResult<()> {
        let verb = match action {
            NotifyAction::Reload => "reload",
            NotifyAction::Restart => "restart",
        };
        check(&["systemctl", verb, unit], &[])?;
        self.confirm_active(unit)
    }
}

impl System {
    /// `systemctl start` can return before a unit fails; ask again.
    fn confirm_active(&self, unit: &str) -> HostResult<()> {
        if self.state(unit)?.active {
            return Ok(());
        }
        let status = exec(
            &["systemctl", "status", "--no-pager", "--lines=3", unit],
            &[],
        )?;
        Err(HostError::Failed(format!(
            "{unit} is not active after start: {}",
            tail(&status.stdout)
        )))
    }
}

fn proc_sys(key: &str) -> PathBuf {
    Path::new("/proc/sys").join(key.replace('.', "/"))
}

impl Kernel for System {
    fn sysctl(&self, key: &str) -> HostResult<String> {
        let path = proc_sys(key);
        fs::read_to_string(&path)
            .map(|v| v.trim().to_owned())
            .map_err(|e| io_error("read", &path, e))
    }

    fn set_sysctl(&self, key: &str, value: &str) -> HostResult<()> {
        let path = proc_sys(key);
        fs::write(&path, value).map_err(|e| io_error("write", &path, e))
    }

    fn module_loaded(&self, name: &str) -> HostResult<bool> {
        Ok(Path::new("/sys/module").join(name).exists())
    }

    fn load_module(&self, name: &str) -> HostResult<()> {
        check(&["modprobe", name], &[]).map(|_| ())
    }

    fn active_swaps(&self) -> HostResult<Vec<String>> {
        let text = fs::read_to_string("/proc/swaps")
            .map_err(|e| io_error("read", Path::new("/proc/swaps"), e))?;
        Ok(text
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_owned)
            .collect())
    }

    fn swap_off(&self) -> HostResult<()> {
        check(&["swapoff", "-a"], &[]).map(|_| ())
    }

    fn is_mounted(&self, target: &Path) -> HostResult<bool> {
        let text = fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| io_error("read", Path::new("/proc/self/mountinfo"), e))?;
        let target = target.to_string_lossy();
        Ok(text
            .lines()
            .any(|l| l.split_whitespace().nth(4) == Some(&target)))
    }

    /// Under systemd, through the mount unit its fstab generator makes, so
    /// that a FUSE helper (GlusterFS) runs in the mount unit's cgroup: run
    /// by `mount` here, it would live in the agent's and die with every
    /// agent restart (an upgrade restarts it). Elsewhere, `mount` itself.
    fn mount(&self, target: &Path) -> HostResult<()> {
        let target = target.to_string_lossy();
        if systemd_running().is_err() {
            return check(&["mount", &target], &[]).map(|_| ());
        }
        let unit = check(
            &["systemd-escape", "--path", "--suffix=mount", &target],
            &[],
        )?;
        // The generator reads fstab only on a reload.
        check(&["systemctl", "daemon-reload"], &[])?;
        check(&["systemctl", "start", unit.trim()], &[]).map(|_| ())
    }

    /// `stat -f` (statfs, which FUSE always asks its daemon: no cache
    /// answers it) in a child killed at the deadline. A process waiting on
    /// a FUSE request dies of SIGKILL, so the wait for it ends too.
    fn probe_mount(&self, target: &Path, deadline: Duration) -> HostResult<MountProbe> {
        if !self.is_mounted(target)? {
            return Ok(MountProbe::NotMounted);
        }
        let path = target.to_string_lossy();
        Ok(
            match exec_until(&["stat", "-f", "-c", "%b", &path], &[], deadline)? {
                (_, true) => MountProbe::Hung,
                (out, false) if out.success => MountProbe::Answers,
                (out, false) => MountProbe::Error(tail(&out.stderr)),
            },
        )
    }

    fn detach_mount(&self, target: &Path) -> HostResult<()> {
        check(&["umount", "-l", &target.to_string_lossy()], &[]).map(|_| ())
    }

    fn open_files_under(&self, target: &Path) -> HostResult<Vec<String>> {
        let procs = fs::read_dir("/proc").map_err(|e| io_error("list", Path::new("/proc"), e))?;
        let me = std::process::id().to_string();
        let mut found = Vec::new();
        for entry in procs.flatten() {
            let pid = entry.file_name().to_string_lossy().into_owned();
            if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == me {
                continue;
            }
            let dir = entry.path();
            let mut links = vec![dir.join("cwd"), dir.join("root")];
            // A process may end while we look: what cannot be read is gone.
            if let Ok(fds) = fs::read_dir(dir.join("fd")) {
                links.extend(fds.flatten().map(|fd| fd.path()));
            }
            let under: Vec<PathBuf> = links
                .iter()
                .filter_map(|l| fs::read_link(l).ok())
                .filter(|p| p.starts_with(target))
                .collect();
            if let Some(first) = under.first() {
                let name = fs::read_to_string(dir.join("comm")).unwrap_or_default();
                found.push(format!(
                    "pid {pid} ({}): {}{}",
                    name.trim(),
                    first.display(),
                    match under.len() {
                        1 => String::new(),
                        n => format!(" and {} more", n - 1),
                    }
                ));
            }
        }
        Ok(found)
    }
}

impl Commands for System {
    fn run(&self, argv: &[String]) -> HostResult<CommandOutput> {
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        exec(&argv, &[])
    }
}

impl Host for System {
    fn container(&self) -> Option<&str> {
        self.container.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_command_gets_its_output() {
        let out = exec_within(
            &["sh", "-c", "echo out; echo err >&2; exit 3"],
            &[],
            Duration::from_secs(10),
        )
        .expect("runs");
        assert!(!out.success);
        assert_eq!(out.stdout, "out\n");
        assert_eq!(out.stderr, "err\n");
    }

    /// A hung command (and what it started, holding its output open) is
    /// killed at the deadline and reported, instead of blocking the
    /// converge run forever.
    #[test]
    fn a_hung_command_is_killed_at_its_deadline() {
        let started = Instant::now();
        let error = exec_within(
            &["sh", "-c", "echo waiting; sleep 30 & sleep 30"],
            &[],
            Duration::from_millis(300),
        )
        .expect_err("killed");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        let text = error.to_string();
        assert!(text.contains("did not finish within 300ms"), "{text}");
        assert!(text.contains("waiting"), "{text}");
        assert!(
            matches!(&error, HostError::CommandKilled { command, stdout, .. }
                if command.starts_with("sh -c echo waiting") && stdout == "waiting\n"),
            "{error:?}"
        );
    }

    /// A failed command's error keeps the command and its whole stderr;
    /// the message shows the last lines, as it always did.
    #[test]
    fn a_failed_command_keeps_its_command_and_stderr() {
        let error = check(
            &["sh", "-c", "echo out; echo e1 >&2; echo e2 >&2; exit 3"],
            &[],
        )
        .expect_err("exit 3");
        let HostError::CommandFailed {
            command,
            stdout,
            stderr,
        } = &error
        else {
            panic!("not CommandFailed: {error:?}");
        };
        assert_eq!(command, "sh -c echo out; echo e1 >&2; echo e2 >&2; exit 3");
        assert_eq!((stdout.as_str(), stderr.as_str()), ("out\n", "e1\ne2\n"));
        assert_eq!(
            error.to_string(),
            // The last three lines of stdout, a blank, then stderr (as before).
            "`sh -c echo out; echo e1 >&2; echo e2 >&2; exit 3` failed:  | e1 | e2"
        );
        let error = check(&["/nonexistent/steward-test-program"], &[]).expect_err("no program");
        assert!(
            matches!(&error, HostError::CannotRun { program, .. } if program == "/nonexistent/steward-test-program"),
            "{error:?}"
        );
    }
}
