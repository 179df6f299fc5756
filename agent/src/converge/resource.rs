//! What a role wants of the host, as data. Planners produce these; the
//! engine ([`super::engine`]) observes, diffs and applies them.

use std::path::PathBuf;

/// A package, optionally at an exact version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageSpec {
    pub name: String,
    pub version: Option<String>,
}

impl PackageSpec {
    pub fn any(name: &str) -> Self {
        PackageSpec {
            name: name.to_owned(),
            version: None,
        }
    }
}

/// A package repository: an apt source or a yum repo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repository {
    /// File-name-safe name, e.g. `kubernetes`.
    pub name: String,
    pub url: String,
    /// apt: suite and components, e.g. `/` or `bookworm main`; unused by dnf.
    pub suite: String,
    /// ASCII-armoured signing key; `None` only for a local repository the
    /// operator trusts as it is.
    pub key: Option<String>,
}

/// What a changed file asks of a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotifyAction {
    Reload,
    Restart,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notify {
    pub unit: String,
    pub action: NotifyAction,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSpec {
    pub path: PathBuf,
    pub content: Vec<u8>,
    pub mode: u32,
    pub owner: String,
    pub group: String,
    /// Unit to reload or restart when the file changed.
    pub notify: Option<Notify>,
    /// Command that must accept the new content before it replaces the old;
    /// `{}` stands for the path of the staged new file.
    pub validate: Option<Vec<String>>,
}

impl FileSpec {
    /// A root-owned file.
    pub fn new(path: &str, content: impl Into<Vec<u8>>, mode: u32) -> Self {
        FileSpec {
            path: path.into(),
            content: content.into(),
            mode,
            owner: "root".into(),
            group: "root".into(),
            notify: None,
            validate: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitSpec {
    /// Full unit name, e.g. `haproxy.service`.
    pub name: String,
    /// Unit file content for `/etc/systemd/system/<name>`; `None` for a
    /// unit a package ships.
    pub content: Option<String>,
    pub enabled: bool,
    /// `None`: left as it is (e.g. the kubelet, which kubeadm starts).
    pub active: Option<bool>,
    /// Restart the running unit when `content` changed. Off for mount
    /// units: a remount would cut off every open file on it; new options
    /// take effect at the next mount.
    pub restart_on_change: bool,
}

impl UnitSpec {
    /// A unit a package ships, enabled and running.
    pub fn running(name: &str) -> Self {
        UnitSpec {
            name: name.into(),
            content: None,
            enabled: true,
            active: Some(true),
            restart_on_change: true,
        }
    }
}

/// A one-shot step, run only while its guard says it is still needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandSpec {
    /// Stable name for reports, e.g. `kubeadm-init`.
    pub name: String,
    pub argv: Vec<String>,
    /// Done when this path exists.
    pub creates: Option<PathBuf>,
    /// Done when this command succeeds.
    pub unless: Option<Vec<String>>,
    /// How reports show the step (argv may carry secrets).
    pub summary: String,
    /// Written just before argv runs (their parent 0700) and removed right
    /// after, whatever the outcome; their content is never shown.
    pub inputs: Vec<steward_proto::converge::SecretFile>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resource {
    /// Installed together (one transaction), optionally held at their
    /// versions.
    Packages {
        name: String,
        packages: Vec<PackageSpec>,
        hold: bool,
    },
    Repository(Repository),
    File(FileSpec),
    Directory {
        path: PathBuf,
        mode: u32,
    },
    /// Applied through `/proc/sys` and persisted in `/etc/sysctl.d/`.
    Sysctl {
        key: String,
        value: String,
    },
    /// Loaded and persisted in `/etc/modules-load.d/`.
    KernelModule {
        name: String,
    },
    Unit(UnitSpec),
    /// Mounted and persisted in `/etc/fstab`.
    Mount {
        what: String,
        target: PathBuf,
        fstype: String,
        options: String,
    },
    /// No active swap, and none configured in `/etc/fstab`.
    SwapOff,
    /// A mounted network file system answers: a `statfs` on `target` within
    /// a deadline, in a child process (a hung FUSE mount blocks it, never
    /// the agent). A hung or missing mount is remounted through `unit`.
    MountCheck {
        unit: String,
        target: PathBuf,
    },
    /// Reads a Gluster volume's capacity (`gluster volume status VOLUME
    /// detail`) into the report, for the coordinator's PersistentVolume.
    /// Changes nothing; never fails (an unknown capacity is not applicable,
    /// with the reason).
    GlusterCapacity {
        volume: String,
        replica: u32,
    },
    /// Mount units Steward wrote (`/etc/systemd/system/<prefix>*.mount`)
    /// that the plan no longer has: stopped, disabled and removed, but
    /// never while a process has a file open under the mount point.
    StaleMounts {
        name: String,
        unit_prefix: String,
        keep: Vec<String>,
    },
    Command(CommandSpec),
    /// A role that cannot be planned (e.g. Kubernetes roles before any
    /// Kubernetes settings were applied): always fails with `reason`.
    Blocked {
        name: String,
        reason: String,
    },
}

impl Resource {
    /// Kind and name, unique within a plan: how reports and `requires`
    /// refer to it.
    pub fn id(&self) -> String {
        match self {
            Resource::Packages { name, .. } => format!("packages:{name}"),
            Resource::Repository(r) => format!("repository:{}", r.name),
            Resource::File(f) => format!("file:{}", f.path.display()),
            Resource::Directory { path, .. } => format!("directory:{}", path.display()),
            Resource::Sysctl { key, .. } => format!("sysctl:{key}"),
            Resource::KernelModule { name } => format!("kernel-module:{name}"),
            Resource::Unit(u) => format!("unit:{}", u.name),
            Resource::Mount { target, .. } => format!("mount:{}", target.display()),
            Resource::SwapOff => "swap:off".to_owned(),
            Resource::MountCheck { target, .. } => format!("mount-check:{}", target.display()),
            Resource::StaleMounts { name, .. } => format!("stale-mounts:{name}"),
            Resource::GlusterCapacity { volume, .. } => {
                steward_proto::converge::gluster_capacity_resource_id(volume)
            }
            Resource::Command(c) => steward_proto::converge::command_resource_id(&c.name),
            Resource::Blocked { name, .. } => format!("plan:{name}"),
        }
    }
}

/// A resource in a plan, with the resources it needs applied first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub resource: Resource,
    pub requires: Vec<String>,
}

impl Planned {
    pub fn new(resource: Resource) -> Self {
        Planned {
            resource,
            requires: Vec::new(),
        }
    }

    pub fn after(mut self, id: impl Into<String>) -> Self {
        self.requires.push(id.into());
        self
    }
}
