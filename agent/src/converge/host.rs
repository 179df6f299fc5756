//! Every way the converge engine looks at or changes the host. The engine
//! and the planners are tested against [`super::fake::FakeHost`]; the real
//! implementation ([`super::system::System`]) is tested on real test hosts.

use std::path::Path;
use std::time::Duration;

use super::resource::{NotifyAction, PackageSpec, Repository};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("{0}")]
    Failed(String),
    /// The host does not allow this here (e.g. a read-only `/proc/sys` key
    /// in a container).
    #[error("{0}")]
    NotPermittedHere(String),
    /// A command ran and exited unsuccessfully. Its whole output is kept;
    /// the message shows the last lines.
    #[error("`{command}` failed: {}", tail_of(.stdout, .stderr))]
    CommandFailed {
        command: String,
        stdout: String,
        stderr: String,
    },
    /// A validator command refused staged content (which was not installed).
    #[error("new content rejected by `{command}`: {}", tail_of(.stdout, .stderr))]
    ContentRejected {
        command: String,
        stdout: String,
        stderr: String,
    },
    /// A command ran past its deadline and was killed with its process group.
    #[error(
        "`{command}` did not finish within {after:?} and was killed; its last output: {}",
        tail_of(.stdout, .stderr)
    )]
    CommandKilled {
        command: String,
        after: Duration,
        stdout: String,
        stderr: String,
    },
    /// A command could not be started (no such program, a fork failure).
    #[error("cannot run {program}: {reason}")]
    CannotRun { program: String, reason: String },
}

/// The last lines of a command's output, stdout then stderr.
fn tail_of(stdout: &str, stderr: &str) -> String {
    tail(&format!("{stdout}\n{stderr}"))
}

pub type HostResult<T> = Result<T, HostError>;

/// Mode and owner of a file or directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub is_dir: bool,
    /// Permission bits only (`0o7777`).
    pub mode: u32,
    pub owner: String,
    pub group: String,
}

/// Accepts or rejects a staged file before it replaces the real one.
pub type Validator<'a> = &'a dyn Fn(&Path) -> HostResult<()>;

pub trait Files {
    fn read(&self, path: &Path) -> HostResult<Option<Vec<u8>>>;
    fn meta(&self, path: &Path) -> HostResult<Option<Meta>>;
    /// Replaces `path` atomically (a staged file beside it, renamed over
    /// it). With `validate`, the staged file must pass it first; on failure
    /// the old file stays.
    fn write(
        &self,
        path: &Path,
        content: &[u8],
        meta: &Meta,
        validate: Option<Validator<'_>>,
    ) -> HostResult<()>;
    fn set_meta(&self, path: &Path, meta: &Meta) -> HostResult<()>;
    /// Creates the directory and its parents.
    fn create_dir(&self, path: &Path, meta: &Meta) -> HostResult<()>;
    /// Names of the entries in `dir` (none if it does not exist).
    fn list(&self, dir: &Path) -> HostResult<Vec<String>>;
    /// Removes a file; a missing one is not an error.
    fn remove(&self, path: &Path) -> HostResult<()>;
}

pub trait Packages {
    /// Installed version, if the package is installed.
    fn installed(&self, name: &str) -> HostResult<Option<String>>;
    /// Installs (or up/downgrades to the pinned versions) in one go.
    fn install(&self, packages: &[PackageSpec]) -> HostResult<()>;
    fn held(&self, name: &str) -> HostResult<bool>;
    fn hold(&self, names: &[String]) -> HostResult<()>;
    /// The files that make up `repo` for this package manager.
    fn repository_files(&self, repo: &Repository) -> Vec<(std::path::PathBuf, Vec<u8>)>;
    /// Re-reads the package indexes (after a repository changed).
    fn refresh(&self) -> HostResult<()>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnitState {
    /// The unit file exists (systemd knows it).
    pub loaded: bool,
    pub enabled: bool,
    pub active: bool,
}

pub trait Services {
    fn state(&self, unit: &str) -> HostResult<UnitState>;
    fn daemon_reload(&self) -> HostResult<()>;
    fn set_enabled(&self, unit: &str, enabled: bool) -> HostResult<()>;
    fn start(&self, unit: &str) -> HostResult<()>;
    fn stop(&self, unit: &str) -> HostResult<()>;
    fn notify(&self, unit: &str, action: NotifyAction) -> HostResult<()>;
}

pub trait Kernel {
    /// Current value of a `/proc/sys` key (dotted name).
    fn sysctl(&self, key: &str) -> HostResult<String>;
    fn set_sysctl(&self, key: &str, value: &str) -> HostResult<()>;
    fn module_loaded(&self, name: &str) -> HostResult<bool>;
    fn load_module(&self, name: &str) -> HostResult<()>;
    /// Active swap devices and files.
    fn active_swaps(&self) -> HostResult<Vec<String>>;
    fn swap_off(&self) -> HostResult<()>;
    fn is_mounted(&self, target: &Path) -> HostResult<bool>;
    /// Mounts `target` as `/etc/fstab` says.
    fn mount(&self, target: &Path) -> HostResult<()>;
    /// Whether the file system mounted at `target` answers within
    /// `deadline`. Must not block longer than about `deadline` whatever the
    /// mount does.
    fn probe_mount(&self, target: &Path, deadline: Duration) -> HostResult<MountProbe>;
    /// Detaches `target` at once, even while it is busy or hung (`umount -l`).
    fn detach_mount(&self, target: &Path) -> HostResult<()>;
    /// Processes that have a file, their working directory or their root
    /// at or under `target`, one line each (`pid 123 (name): path`).
    /// Reads only `/proc` links, never the mount itself.
    fn open_files_under(&self, target: &Path) -> HostResult<Vec<String>>;
}

/// How a mount answered [`Kernel::probe_mount`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountProbe {
    Answers,
    NotMounted,
    /// No answer within the deadline: the probe was killed.
    Hung,
    /// It answered with an error (e.g. `Transport endpoint is not connected`).
    Error(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

pub trait Commands {
    fn run(&self, argv: &[String]) -> HostResult<CommandOutput>;
}

/// The host as the engine sees it.
pub trait Host: Files + Packages + Services + Kernel + Commands {
    /// The container technology when running inside one (e.g.
    /// `systemd-nspawn`), where kernel-wide settings are not ours to change.
    fn container(&self) -> Option<&str>;
}

/// The last lines of command output, for one-line error reports.
pub fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.trim().lines().collect();
    lines[lines.len().saturating_sub(3)..].join(" | ")
}
