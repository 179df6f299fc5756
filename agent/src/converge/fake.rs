//! An in-memory host for tests of the engine and the planners: files,
//! packages, units, kernel settings and commands as plain data, and a log of
//! every change made, so a test can assert what a run did and that a second
//! run does nothing.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::host::{
    CommandOutput, Commands, Files, Host, HostError, HostResult, Kernel, Meta, MountProbe,
    Packages, Services, UnitState, Validator,
};
use super::resource::{NotifyAction, PackageSpec, Repository};

#[derive(Debug, Default)]
pub struct FakeState {
    pub files: BTreeMap<PathBuf, (Vec<u8>, Meta)>,
    pub dirs: BTreeMap<PathBuf, Meta>,
    /// What the package manager can install: name → version.
    pub available: BTreeMap<String, String>,
    pub installed: BTreeMap<String, String>,
    pub held: BTreeSet<String>,
    /// Units a package ships (package → units), loaded once installed.
    pub ships_units: BTreeMap<String, Vec<String>>,
    pub units: BTreeMap<String, UnitState>,
    pub sysctls: BTreeMap<String, String>,
    /// Keys that refuse writes (as in a container).
    pub read_only_sysctls: BTreeSet<String>,
    pub modules: BTreeSet<String>,
    pub swaps: Vec<String>,
    /// Mounted file systems; a `.mount` unit started or restarted mounts
    /// its `Where=`, stopped unmounts it.
    pub mounted: BTreeSet<PathBuf>,
    /// Mounts whose probe hangs until they are remounted.
    pub hung_mounts: BTreeSet<PathBuf>,
    /// What has files open under a path (as `Kernel::open_files_under`).
    pub open_files: BTreeMap<PathBuf, Vec<String>>,
    /// Programs (argv[0]) that fail, with their stderr.
    pub failing_commands: BTreeMap<String, String>,
    /// Units whose reload or restart fails.
    pub failing_notify: BTreeSet<String>,
    /// Every change, in order, e.g. `install haproxy`, `reload haproxy.service`.
    pub changes: Vec<String>,
}

#[derive(Debug, Default)]
pub struct FakeHost {
    pub state: RefCell<FakeState>,
    /// As `Host::container`.
    pub container: Option<String>,
}

impl FakeHost {
    /// A bare host whose package manager offers `available` (name, version).
    pub fn new(available: &[(&str, &str)]) -> Self {
        let host = FakeHost::default();
        {
            let mut s = host.state.borrow_mut();
            for (name, version) in available {
                s.available.insert((*name).into(), (*version).into());
            }
            s.dirs.insert("/".into(), dir_meta());
        }
        host
    }

    /// Changes made since the last call.
    pub fn take_changes(&self) -> Vec<String> {
        std::mem::take(&mut self.state.borrow_mut().changes)
    }

    pub fn file(&self, path: &str) -> Option<String> {
        self.state
            .borrow()
            .files
            .get(Path::new(path))
            .map(|(c, _)| String::from_utf8_lossy(c).into_owned())
    }

    fn change(&self, what: String) {
        self.state.borrow_mut().changes.push(what);
    }
}

fn dir_meta() -> Meta {
    Meta {
        is_dir: true,
        mode: 0o755,
        owner: "root".into(),
        group: "root".into(),
    }
}

impl Files for FakeHost {
    fn read(&self, path: &Path) -> HostResult<Option<Vec<u8>>> {
        Ok(self.state.borrow().files.get(path).map(|(c, _)| c.clone()))
    }

    fn meta(&self, path: &Path) -> HostResult<Option<Meta>> {
        let s = self.state.borrow();
        Ok(s.files
            .get(path)
            .map(|(_, m)| m.clone())
            .or_else(|| s.dirs.get(path).cloned()))
    }

    fn write(
        &self,
        path: &Path,
        content: &[u8],
        meta: &Meta,
        validate: Option<Validator<'_>>,
    ) -> HostResult<()> {
        let parent = path.parent().unwrap_or(Path::new("/"));
        if !self.state.borrow().dirs.contains_key(parent) {
            return Err(HostError::Failed(format!(
                "{}: no such directory",
                parent.display()
            )));
        }
        if let Some(validate) = validate {
            let staged = path.with_extension("steward-new");
            self.state
                .borrow_mut()
                .files
                .insert(staged.clone(), (content.to_vec(), meta.clone()));
            let verdict = validate(&staged);
            self.state.borrow_mut().files.remove(&staged);
            verdict?;
        }
        self.state
            .borrow_mut()
            .files
            .insert(path.to_owned(), (content.to_vec(), meta.clone()));
        self.change(format!("write {}", path.display()));
        Ok(())
    }

    fn set_meta(&self, path: &Path, meta: &Meta) -> HostResult<()> {
        let mut s = self.state.borrow_mut();
        if let Some((_, m)) = s.files.get_mut(path) {
            *m = meta.clone();
        } else if let Some(m) = s.dirs.get_mut(path) {
            *m = meta.clone();
        } else {
            return Err(HostError::Failed(format!("{}: not found", path.display())));
        }
        s.changes.push(format!("chmod {}", path.display()));
        Ok(())
    }

    fn list(&self, dir: &Path) -> HostResult<Vec<String>> {
        let s = self.state.borrow();
        let names = s
            .files
            .keys()
            .chain(s.dirs.keys())
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned());
        Ok(names.collect::<BTreeSet<_>>().into_iter().collect())
    }

    fn remove(&self, path: &Path) -> HostResult<()> {
        if self.state.borrow_mut().files.remove(path).is_some() {
            self.change(format!("rm {}", path.display()));
        }
        Ok(())
    }

    fn create_dir(&self, path: &Path, meta: &Meta) -> HostResult<()> {
        for ancestor in path.ancestors().collect::<Vec<_>>().into_iter().rev() {
            let mut s = self.state.borrow_mut();
            if !s.dirs.contains_key(ancestor) {
                s.dirs.insert(ancestor.to_owned(), meta.clone());
                s.changes.push(format!("mkdir {}", ancestor.display()));
            }
        }
        Ok(())
    }
}

impl Packages for FakeHost {
    fn installed(&self, name: &str) -> HostResult<Option<String>> {
        Ok(self.state.borrow().installed.get(name).cloned())
    }

    fn install(&self, packages: &[PackageSpec]) -> HostResult<()> {
        let mut s = self.state.borrow_mut();
        for p in packages {
            let Some(version) = s.available.get(&p.name).cloned() else {
                return Err(HostError::Failed(format!(
                    "E: Unable to locate package {}",
                    p.name
                )));
            };
            let version = p.version.clone().unwrap_or(version);
            s.installed.insert(p.name.clone(), version);
            for unit in s.ships_units.get(&p.name).cloned().unwrap_or_default() {
                s.units.entry(unit).or_insert(UnitState {
                    loaded: true,
                    enabled: true,
                    active: true,
                });
            }
            s.changes.push(format!("install {}", p.name));
        }
        Ok(())
    }

    fn held(&self, name: &str) -> HostResult<bool> {
        Ok(self.state.borrow().held.contains(name))
    }

    fn hold(&self, names: &[String]) -> HostResult<()> {
        let mut s = self.state.borrow_mut();
        s.held.extend(names.iter().cloned());
        s.changes.push(format!("hold {}", names.join(" ")));
        Ok(())
    }

    fn repository_files(&self, repo: &Repository) -> Vec<(PathBuf, Vec<u8>)> {
        vec![(
            format!("/etc/apt/sources.list.d/{}.list", repo.name).into(),
            format!("deb {} {}\n", repo.url, repo.suite).into_bytes(),
        )]
    }

    fn refresh(&self) -> HostResult<()> {
        self.change("refresh".into());
        Ok(())
    }
}

impl FakeHost {
    fn unit_mut<T>(&self, unit: &str, f: impl FnOnce(&mut UnitState) -> T) -> HostResult<T> {
        let mut s = self.state.borrow_mut();
        match s.units.get_mut(unit) {
            Some(u) if u.loaded => Ok(f(u)),
            _ => Err(HostError::Failed(format!("Unit {unit} not found."))),
        }
    }
}

impl Services for FakeHost {
    fn state(&self, unit: &str) -> HostResult<UnitState> {
        let s = self.state.borrow();
        let from_file = s
            .files
            .contains_key(&PathBuf::from(format!("/etc/systemd/system/{unit}")));
        Ok(s.units.get(unit).copied().unwrap_or(UnitState {
            loaded: from_file,
            enabled: false,
            active: false,
        }))
    }

    fn daemon_reload(&self) -> HostResult<()> {
        self.change("daemon-reload".into());
        Ok(())
    }

    fn set_enabled(&self, unit: &str, enabled: bool) -> HostResult<()> {
        self.ensure_unit(unit);
        self.unit_mut(unit, |u| u.enabled = enabled)?;
        self.change(format!(
            "{} {unit}",
            if enabled { "enable" } else { "disable" }
        ));
        Ok(())
    }

    fn start(&self, unit: &str) -> HostResult<()> {
        self.ensure_unit(unit);
        self.unit_mut(unit, |u| u.active = true)?;
        self.mount_unit(unit, true);
        self.change(format!("start {unit}"));
        Ok(())
    }

    fn stop(&self, unit: &str) -> HostResult<()> {
        self.unit_mut(unit, |u| u.active = false)?;
        self.mount_unit(unit, false);
        self.change(format!("stop {unit}"));
        Ok(())
    }

    fn notify(&self, unit: &str, action: NotifyAction) -> HostResult<()> {
        self.unit_mut(unit, |_| ())?;
        if self.state.borrow().failing_notify.contains(unit) {
            return Err(HostError::Failed(format!("Job for {unit} failed.")));
        }
        let verb = match action {
            NotifyAction::Reload => "reload",
            NotifyAction::Restart => "restart",
        };
        if action == NotifyAction::Restart {
            self.mount_unit(unit, true);
        }
        self.change(format!("{verb} {unit}"));
        Ok(())
    }
}

impl FakeHost {
    /// A `.mount` unit's file system comes (fresh, answering) or goes.
    fn mount_unit(&self, unit: &str, mounted: bool) {
        if !unit.ends_with(".mount") {
            return;
        }
        let Some(content) = self.file(&format!("/etc/systemd/system/{unit}")) else {
            return;
        };
        let Some(target) = content.lines().find_map(|l| l.strip_prefix("Where=")) else {
            return;
        };
        let target = PathBuf::from(target.trim());
        let mut s = self.state.borrow_mut();
        s.hung_mounts.remove(&target);
        if mounted {
            s.mounted.insert(target);
        } else {
            s.mounted.remove(&target);
        }
    }

    /// A unit defined by a file under /etc/systemd/system becomes known.
    fn ensure_unit(&self, unit: &str) {
        let loaded = self.state(unit).map(|s| s.loaded).unwrap_or(false);
        let mut s = self.state.borrow_mut();
        if loaded && !s.units.contains_key(unit) {
            s.units.insert(
                unit.to_owned(),
                UnitState {
                    loaded: true,
                    enabled: false,
                    active: false,
                },
            );
        }
    }
}

impl Kernel for FakeHost {
    fn sysctl(&self, key: &str) -> HostResult<String> {
        self.state
            .borrow()
            .sysctls
            .get(key)
            .cloned()
            .ok_or_else(|| HostError::Failed(format!("no such kernel setting {key}")))
    }

    fn set_sysctl(&self, key: &str, value: &str) -> HostResult<()> {
        let mut s = self.state.borrow_mut();
        if s.read_only_sysctls.contains(key) {
            return Err(HostError::NotPermittedHere("read-only file system".into()));
        }
        s.sysctls.insert(key.into(), value.into());
        s.changes.push(format!("sysctl {key}={value}"));
        Ok(())
    }

    fn module_loaded(&self, name: &str) -> HostResult<bool> {
        Ok(self.state.borrow().modules.contains(name))
    }

    fn load_module(&self, name: &str) -> HostResult<()> {
        let mut s = self.state.borrow_mut();
        s.modules.insert(name.into());
        s.changes.push(format!("modprobe {name}"));
        Ok(())
    }

    fn active_swaps(&self) -> HostResult<Vec<String>> {
        Ok(self.state.borrow().swaps.clone())
    }

    fn swap_off(&self) -> HostResult<()> {
        let mut s = self.state.borrow_mut();
        s.swaps.clear();
        s.changes.push("swapoff".into());
        Ok(())
    }

    fn is_mounted(&self, target: &Path) -> HostResult<bool> {
        Ok(self.state.borrow().mounted.contains(target))
    }

    fn mount(&self, target: &Path) -> HostResult<()> {
        let mut s = self.state.borrow_mut();
        s.mounted.insert(target.to_owned());
        s.changes.push(format!("mount {}", target.display()));
        Ok(())
    }

    fn probe_mount(&self, target: &Path, _deadline: Duration) -> HostResult<MountProbe> {
        let s = self.state.borrow();
        Ok(if !s.mounted.contains(target) {
            MountProbe::NotMounted
        } else if s.hung_mounts.contains(target) {
            MountProbe::Hung
        } else {
            MountProbe::Answers
        })
    }

    fn detach_mount(&self, target: &Path) -> HostResult<()> {
        let mut s = self.state.borrow_mut();
        s.mounted.remove(target);
        s.changes.push(format!("umount -l {}", target.display()));
        Ok(())
    }

    fn open_files_under(&self, target: &Path) -> HostResult<Vec<String>> {
        let s = self.state.borrow();
        Ok(s.open_files
            .iter()
            .filter(|(p, _)| p.starts_with(target))
            .flat_map(|(_, who)| who.iter().cloned())
            .collect())
    }
}

impl Commands for FakeHost {
    fn run(&self, argv: &[String]) -> HostResult<CommandOutput> {
        let program = argv.first().cloned().unwrap_or_default();
        let failure = self.state.borrow().failing_commands.get(&program).cloned();
        self.change(format!("run {}", argv.join(" ")));
        Ok(CommandOutput {
            success: failure.is_none(),
            stdout: String::new(),
            stderr: failure.unwrap_or_default(),
        })
    }
}

impl Host for FakeHost {
    fn container(&self) -> Option<&str> {
        self.container.as_deref()
    }
}
