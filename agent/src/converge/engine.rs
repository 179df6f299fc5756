//! One converge run: every planned resource is observed, compared with what
//! it should be, and changed only where it differs. The run reports each
//! resource as ok, changed, failed (with the error), not applicable here
//! (with the reason) or skipped (a resource it needs failed).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use steward_proto::converge::{ConvergeReport, ResourceState, ResourceStatus};

use super::host::{tail, Host, HostError, HostResult, Meta, MountProbe};
use super::resource::{
    CommandSpec, FileSpec, NotifyAction, PackageSpec, Planned, Repository, Resource, UnitSpec,
};
use crate::unix_ms;

/// Where persisted kernel settings and module lists go.
const SYSCTL_DIR: &str = "/etc/sysctl.d";
const MODULES_DIR: &str = "/etc/modules-load.d";
const UNIT_DIR: &str = "/etc/systemd/system";
const FSTAB: &str = "/etc/fstab";

struct Outcome {
    status: ResourceStatus,
    detail: String,
}

impl Outcome {
    fn ok() -> Self {
        Outcome {
            status: ResourceStatus::Ok,
            detail: String::new(),
        }
    }
    fn changed(what: Vec<String>) -> Self {
        if what.is_empty() {
            return Outcome::ok();
        }
        Outcome {
            status: ResourceStatus::Changed,
            detail: what.join(", "),
        }
    }
    fn not_applicable(why: String) -> Self {
        Outcome {
            status: ResourceStatus::NotApplicable,
            detail: why,
        }
    }
}

impl From<HostError> for Outcome {
    fn from(e: HostError) -> Self {
        Outcome {
            status: ResourceStatus::Failed,
            detail: e.to_string(),
        }
    }
}

/// What one run carries from resource to resource.
#[derive(Default)]
struct Run {
    /// Units to reload or restart because a file they read changed
    /// (restart wins over reload), with what changed.
    notify: BTreeMap<String, (NotifyAction, String)>,
    /// A repository changed: package indexes must be re-read first.
    refresh: bool,
    /// Mounts whose last probe got no answer (see [`mount_check`]).
    unanswered: BTreeSet<PathBuf>,
}

/// The converge engine. Keeps, between runs, when each resource entered
/// its status, and the reloads and restarts still owed: a file that changed
/// while its unit's reload failed is already right on the next run, so the
/// debt must outlive the run that made it, until a reload succeeds.
#[derive(Default)]
pub struct Engine {
    previous: HashMap<String, ResourceState>,
    owed: BTreeMap<String, (NotifyAction, String)>,
    unanswered: BTreeSet<PathBuf>,
}

impl Engine {
    /// Converges `plan` on `host` once.
    pub fn run(&mut self, host: &dyn Host, plan: &[Planned], revision: u64) -> ConvergeReport {
        let started = Instant::now();
        let mut run = Run {
            notify: std::mem::take(&mut self.owed),
            unanswered: std::mem::take(&mut self.unanswered),
            ..Run::default()
        };
        let mut statuses: HashMap<String, ResourceStatus> = HashMap::new();
        let mut states = Vec::with_capacity(plan.len());
        for planned in plan {
            let id = planned.resource.id();
            let blocked = planned
                .requires
                .iter()
                .find(|r| !statuses.get(*r).is_some_and(|s| s.settled()));
            let outcome = match blocked {
                Some(r) if !statuses.contains_key(r) => Outcome::from(HostError::Failed(format!(
                    "requires {r}, which is not planned before it"
                ))),
                Some(r) => Outcome {
                    status: ResourceStatus::Skipped,
                    detail: format!("waiting for {r}"),
                },
                None => apply(host, &planned.resource, &mut run).unwrap_or_else(Outcome::from),
            };
            statuses.insert(id.clone(), outcome.status);
            states.push(self.state(id, outcome));
        }
        // Units no resource here manages: notify them directly. What a
        // failed or skipped unit resource still owes stays for the next run.
        let managed: Vec<String> = plan
            .iter()
            .filter_map(|p| match &p.resource {
                Resource::Unit(u) => Some(u.name.clone()),
                _ => None,
            })
            .collect();
        for (unit, (action, why)) in std::mem::take(&mut run.notify) {
            if !managed.contains(&unit) {
                if let Err(error) = host.notify(&unit, action) {
                    tracing::warn!(%unit, %error, "cannot notify unit; will retry");
                } else {
                    continue;
                }
            }
            self.owed.insert(unit, (action, why));
        }
        // Only mounts still planned and checked keep their count.
        self.unanswered = std::mem::take(&mut run.unanswered);
        ConvergeReport {
            revision,
            finished_unix_ms: unix_ms(),
            duration_ms: started.elapsed().as_millis().min(u32::MAX as u128) as u32,
            resources: states,
        }
    }

    fn state(&mut self, id: String, outcome: Outcome) -> ResourceState {
        let since_unix_ms = match self.previous.get(&id) {
            Some(p) if p.status == outcome.status && p.detail == outcome.detail => p.since_unix_ms,
            _ => unix_ms(),
        };
        let state = ResourceState {
            id: id.clone(),
            status: outcome.status,
            detail: outcome.detail,
            since_unix_ms,
        };
        self.previous.insert(id, state.clone());
        state
    }
}

fn apply(host: &dyn Host, resource: &Resource, run: &mut Run) -> HostResult<Outcome> {
    match resource {
        Resource::Packages { packages, hold, .. } => packages_(host, packages, *hold, run),
        Resource::Repository(repo) => repository(host, repo, run),
        Resource::File(spec) => file(host, spec, run).map(Outcome::changed),
        Resource::Directory { path, mode } => directory(host, path, *mode).map(Outcome::changed),
        Resource::Sysctl { key, value } => sysctl(host, key, value),
        Resource::KernelModule { name } => kernel_module(host, name),
        Resource::Unit(spec) => unit(host, spec, run).map(Outcome::changed),
        Resource::Mount {
            what,
            target,
            fstype,
            options,
        } => mount(host, what, target, fstype, options).map(Outcome::changed),
        Resource::SwapOff => swap_off(host),
        Resource::MountCheck { unit, target } => mount_check(host, unit, target, run),
        Resource::StaleMounts {
            unit_prefix, keep, ..
        } => stale_mounts(host, unit_prefix, keep).map(Outcome::changed),
        Resource::GlusterCapacity { volume, replica } => gluster_capacity(host, volume, *replica),
        Resource::Command(spec) => command(host, spec),
        Resource::Blocked { reason, .. } => Err(HostError::Failed(reason.clone())),
    }
}

fn root_meta(is_dir: bool, mode: u32) -> Meta {
    Meta {
        is_dir,
        mode,
        owner: "root".into(),
        group: "root".into(),
    }
}

fn packages_(
    host: &dyn Host,
    packages: &[PackageSpec],
    hold: bool,
    run: &mut Run,
) -> HostResult<Outcome> {
    let mut missing = Vec::new();
    for p in packages {
        let installed = host.installed(&p.name)?;
        let right = match (&installed, &p.version) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(have), Some(want)) => have == want,
        };
        if !right {
            missing.push(p.clone());
        }
    }
    let mut changed = Vec::new();
    if !missing.is_empty() {
        if run.refresh {
            host.refresh()?;
            run.refresh = false;
        }
        host.install(&missing)?;
        let names: Vec<String> = missing
            .iter()
            .map(|p| match &p.version {
                Some(v) => format!("{}={v}", p.name),
                None => p.name.clone(),
            })
            .collect();
        changed.push(format!("installed {}", names.join(" ")));
    }
    if hold {
        let mut unheld = Vec::new();
        for p in packages {
            if !host.held(&p.name)? {
                unheld.push(p.name.clone());
            }
        }
        if !unheld.is_empty() {
            host.hold(&unheld)?;
            changed.push(format!("held {}", unheld.join(" ")));
        }
    }
    Ok(Outcome::changed(changed))
}

fn repository(host: &dyn Host, repo: &Repository, run: &mut Run) -> HostResult<Outcome> {
    let mut changed = Vec::new();
    for (path, content) in host.repository_files(repo) {
        if ensure_content(host, &path, &content, 0o644)? {
            changed.push(format!("wrote {}", path.display()));
        }
    }
    if !changed.is_empty() {
        run.refresh = true;
    }
    Ok(Outcome::changed(changed))
}

/// Makes a root-owned file hold `content`; true if it changed.
fn ensure_content(host: &dyn Host, path: &Path, content: &[u8], mode: u32) -> HostResult<bool> {
    let spec = FileSpec::new(&path.to_string_lossy(), content, mode);
    Ok(!file(host, &spec, &mut Run::default())?.is_empty())
}

fn file(host: &dyn Host, spec: &FileSpec, run: &mut Run) -> HostResult<Vec<String>> {
    let meta = Meta {
        is_dir: false,
        mode: spec.mode,
        owner: spec.owner.clone(),
        group: spec.group.clone(),
    };
    let mut changed = Vec::new();
    if let Some(parent) = spec.path.parent() {
        if host.meta(parent)?.is_none() {
            host.create_dir(parent, &root_meta(true, 0o755))?;
        }
    }
    if host.read(&spec.path)?.as_deref() != Some(&spec.content[..]) {
        let validate = spec.validate.as_ref().map(|argv| {
            move |staged: &Path| -> HostResult<()> {
                let staged = staged.to_string_lossy();
                let argv: Vec<String> = argv.iter().map(|a| a.replace("{}", &staged)).collect();
                let out = host.run(&argv)?;
                if out.success {
                    Ok(())
                } else {
                    Err(HostError::ContentRejected {
                        command: argv.join(" "),
                        stdout: out.stdout,
                        stderr: out.stderr,
                    })
                }
            }
        });
        host.write(
            &spec.path,
            &spec.content,
            &meta,
            validate
                .as_ref()
                .map(|v| v as &dyn Fn(&Path) -> HostResult<()>),
        )?;
        changed.push("content".to_owned());
        if let Some(n) = &spec.notify {
            owe(run, &n.unit, n.action, &spec.path.to_string_lossy());
        }
    } else if host.meta(&spec.path)?.as_ref() != Some(&meta) {
        host.set_meta(&spec.path, &meta)?;
        changed.push(format!(
            "mode {:o} {}:{}",
            spec.mode, spec.owner, spec.group
        ));
    }
    Ok(changed)
}

fn directory(host: &dyn Host, path: &Path, mode: u32) -> HostResult<Vec<String>> {
    let want = root_meta(true, mode);
    match host.meta(path)? {
        None => {
            host.create_dir(path, &want)?;
            Ok(vec!["created".into()])
        }
        Some(m) if !m.is_dir => Err(HostError::Failed(format!(
            "{} exists and is not a directory",
            path.display()
        ))),
        Some(m) if m != want => {
            host.set_meta(path, &want)?;
            Ok(vec![format!("mode {mode:o}")])
        }
        Some(_) => Ok(Vec::new()),
    }
}

fn in_container(host: &dyn Host) -> Option<String> {
    host.container().map(|c| format!("in a container ({c})"))
}

fn sysctl(host: &dyn Host, key: &str, value: &str) -> HostResult<Outcome> {
    let persisted = PathBuf::from(format!("{SYSCTL_DIR}/90-steward-{key}.conf"));
    let mut changed = Vec::new();
    if ensure_content(
        host,
        &persisted,
        format!("{key} = {value}\n").as_bytes(),
        0o644,
    )? {
        changed.push(format!("persisted in {}", persisted.display()));
    }
    let normal = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    let current = host.sysctl(key);
    if current.as_deref().map(normal).ok() == Some(normal(value)) {
        return Ok(Outcome::changed(changed));
    }
    match current.and_then(|_| host.set_sysctl(key, value)) {
        Ok(()) => {
            changed.push(format!("set to {value}"));
            Ok(Outcome::changed(changed))
        }
        Err(HostError::NotPermittedHere(why)) if host.container().is_some() => {
            Ok(Outcome::not_applicable(format!(
                "{}: {key} is the host's to set ({why})",
                in_container(host).unwrap_or_default()
            )))
        }
        Err(e) => Err(e),
    }
}

fn kernel_module(host: &dyn Host, name: &str) -> HostResult<Outcome> {
    let persisted = PathBuf::from(format!("{MODULES_DIR}/steward-{name}.conf"));
    let mut changed = Vec::new();
    if ensure_content(host, &persisted, format!("{name}\n").as_bytes(), 0o644)? {
        changed.push(format!("persisted in {}", persisted.display()));
    }
    if !host.module_loaded(name)? {
        if let Some(here) = in_container(host) {
            return Ok(Outcome::not_applicable(format!(
                "{here}: kernel modules are loaded by the host; load {name} there"
            )));
        }
        host.load_module(name)?;
        changed.push("loaded".into());
    }
    Ok(Outcome::changed(changed))
}

fn unit(host: &dyn Host, spec: &UnitSpec, run: &mut Run) -> HostResult<Vec<String>> {
    let mut changed = Vec::new();
    if let Some(content) = &spec.content {
        let path = PathBuf::from(format!("{UNIT_DIR}/{}", spec.name));
        if ensure_content(host, &path, content.as_bytes(), 0o644)? {
            host.daemon_reload()?;
            changed.push("unit file".into());
            if spec.restart_on_change {
                owe(
                    run,
                    &spec.name,
                    NotifyAction::Restart,
                    &path.to_string_lossy(),
                );
            }
        }
    }
    let state = host.state(&spec.name)?;
    if !state.loaded {
        return Err(HostError::Failed(format!(
            "systemd has no unit {} (is the package that ships it installed?)",
            spec.name
        )));
    }
    if state.enabled != spec.enabled {
        host.set_enabled(&spec.name, spec.enabled)?;
        changed.push(if spec.enabled { "enabled" } else { "disabled" }.into());
    }
    // A debt is settled only once what settles it succeeded: an error
    // returns early and leaves it owed.
    match (state.active, spec.active.unwrap_or(state.active)) {
        (false, true) => {
            host.start(&spec.name)?;
            // Started now: it read everything as it is.
            run.notify.remove(&spec.name);
            changed.push("started".into());
        }
        (true, false) => {
            host.stop(&spec.name)?;
            run.notify.remove(&spec.name);
            changed.push("stopped".into());
        }
        (true, true) => {
            if let Some((action, why)) = run.notify.get(&spec.name).cloned() {
                host.notify(&spec.name, action)?;
                run.notify.remove(&spec.name);
                let verb = match action {
                    NotifyAction::Reload => "reloaded",
                    NotifyAction::Restart => "restarted",
                };
                changed.push(format!("{verb} ({why} changed)"));
            }
        }
        // Stopped and meant to stay so: it reads the files when it starts.
        (false, false) => {
            run.notify.remove(&spec.name);
        }
    }
    Ok(changed)
}

/// Records that `unit` must `action` because `why` changed (restart wins).
fn owe(run: &mut Run, unit: &str, action: NotifyAction, why: &str) {
    let entry = run
        .notify
        .entry(unit.to_owned())
        .or_insert((action, String::new()));
    if action == NotifyAction::Restart {
        entry.0 = NotifyAction::Restart;
    }
    if !entry.1.split(", ").any(|w| w == why) {
        if !entry.1.is_empty() {
            entry.1.push_str(", ");
        }
        entry.1.push_str(why);
    }
}

fn mount(
    host: &dyn Host,
    what: &str,
    target: &Path,
    fstype: &str,
    options: &str,
) -> HostResult<Vec<String>> {
    let mut changed = Vec::new();
    let target_str = target.to_string_lossy();
    let line = format!("{what} {target_str} {fstype} {options} 0 0");
    let fstab =
        String::from_utf8_lossy(&host.read(Path::new(FSTAB))?.unwrap_or_default()).into_owned();
    let mut lines: Vec<String> = Vec::new();
    let mut found = false;
    for l in fstab.lines() {
        if l.split_whitespace().nth(1) == Some(&target_str) && !l.trim_start().starts_with('#') {
            if !found {
                lines.push(line.clone());
            }
            found = true;
        } else {
            lines.push(l.to_owned());
        }
    }
    if !found {
        lines.push(line);
    }
    let next = format!("{}\n", lines.join("\n"));
    if ensure_content(host, Path::new(FSTAB), next.as_bytes(), 0o644)? {
        changed.push("fstab entry".into());
    }
    changed.extend(directory(host, target, 0o755)?);
    if !host.is_mounted(target)? {
        host.mount(target)?;
        changed.push("mounted".into());
    }
    Ok(changed)
}

/// How long a mount has to answer a `statfs` in one probe. Longer than
/// GlusterFS's `network.ping-timeout` (42 s by default), for which a brick
/// that went silent holds the client's calls.
pub const MOUNT_PROBE_DEADLINE: Duration = Duration::from_secs(60);

/// Probes the mount at `target`; remounts it through `unit` when it is not
/// mounted, when its client fails (a dead FUSE daemon), or when two probes
/// in a row got no answer. One unanswered probe is only a failure: a
/// silent brick can hold calls past the deadline (80 s seen with one brick
/// node's cable pulled), and a remount then would cut off the files open
/// on the mount for nothing (`tests/gluster_mounts.rs` saw a write lost
/// that way). A mount that is still silent at the next probe is hung.
fn mount_check(host: &dyn Host, unit: &str, target: &Path, run: &mut Run) -> HostResult<Outcome> {
    let probe = host.probe_mount(target, MOUNT_PROBE_DEADLINE)?;
    let deadline = MOUNT_PROBE_DEADLINE.as_secs();
    let why = match &probe {
        MountProbe::Answers => {
            run.unanswered.remove(target);
            return Ok(Outcome::ok());
        }
        MountProbe::NotMounted => "it was not mounted".to_owned(),
        MountProbe::Hung if run.unanswered.insert(target.to_owned()) => {
            return Err(HostError::Failed(format!(
                "{}: no answer to statfs within {deadline} s (a silent brick holds calls that \
                 long); remounted if the next check gets none either",
                target.display()
            )));
        }
        MountProbe::Hung => {
            format!("it was hung: no answer to statfs in two checks of {deadline} s")
        }
        MountProbe::Error(e) => format!("it failed: {e}"),
    };
    run.unanswered.remove(target);
    tracing::warn!(mount.target = %target.display(), mount.problem = %why, "remounting");
    if probe != MountProbe::NotMounted {
        // A plain unmount of a hung FUSE mount can block; a lazy one never
        // does, and the restart then mounts afresh. The wedged client stays
        // in the unit's cgroup after the detach (systemd leaves it): end it.
        host.detach_mount(target)?;
        let kill = ["systemctl", "kill", "--signal=SIGKILL", unit].map(String::from);
        match host.run(&kill) {
            Ok(out) if out.success => {}
            Ok(out) => {
                tracing::warn!(unit, error = %tail(&out.stderr), "cannot end the old client")
            }
            Err(error) => tracing::warn!(unit, %error, "cannot end the old client"),
        }
    }
    host.notify(unit, NotifyAction::Restart)?;
    match host.probe_mount(target, MOUNT_PROBE_DEADLINE)? {
        MountProbe::Answers => Ok(Outcome::changed(vec![format!("remounted: {why}")])),
        after => Err(HostError::Failed(format!(
            "{}: {why}; after a remount: {}",
            target.display(),
            match after {
                MountProbe::NotMounted => "not mounted".to_owned(),
                MountProbe::Hung => "still hung".to_owned(),
                MountProbe::Error(e) => e,
                MountProbe::Answers => unreachable!("matched above"),
            }
        ))),
    }
}

fn gluster_capacity(host: &dyn Host, volume: &str, replica: u32) -> HostResult<Outcome> {
    let argv: Vec<String> = ["gluster", "volume", "status", volume, "detail"]
        .map(String::from)
        .to_vec();
    let out = host.run(&argv)?;
    let unknown = |why: String| Outcome::not_applicable(format!("capacity unknown: {why}"));
    if !out.success {
        return Ok(unknown(tail(&format!("{}\n{}", out.stdout, out.stderr))));
    }
    Ok(
        match super::gluster::volume_capacity(&out.stdout, replica) {
            Some(bytes) => Outcome {
                status: ResourceStatus::Ok,
                detail: steward_proto::converge::gluster_capacity_detail(bytes),
            },
            None => unknown("a replica set has no online brick that states its size".into()),
        },
    )
}

/// `Where=` of a mount unit file.
fn mount_unit_target(content: &[u8]) -> Option<PathBuf> {
    String::from_utf8_lossy(content)
        .lines()
        .find_map(|l| l.trim().strip_prefix("Where="))
        .map(|w| PathBuf::from(w.trim()))
}

fn stale_mounts(host: &dyn Host, unit_prefix: &str, keep: &[String]) -> HostResult<Vec<String>> {
    let mut changed = Vec::new();
    let mut refused = Vec::new();
    for name in host.list(Path::new(UNIT_DIR))? {
        if !name.starts_with(unit_prefix) || !name.ends_with(".mount") || keep.contains(&name) {
            continue;
        }
        let path = PathBuf::from(format!("{UNIT_DIR}/{name}"));
        let target = host.read(&path)?.as_deref().and_then(mount_unit_target);
        if let Some(target) = &target {
            if host.is_mounted(target)? {
                let open = host.open_files_under(target)?;
                if !open.is_empty() {
                    refused.push(format!(
                        "{} stays mounted: files are open on it ({})",
                        target.display(),
                        open.join("; ")
                    ));
                    continue;
                }
            }
        }
        let state = host.state(&name)?;
        if state.active {
            // Fails (and is reported) if something opened a file since.
            host.stop(&name)?;
        }
        if state.enabled {
            host.set_enabled(&name, false)?;
        }
        host.remove(&path)?;
        host.daemon_reload()?;
        changed.push(match &target {
            Some(t) => format!("unmounted {} and removed {name}", t.display()),
            None => format!("removed {name}"),
        });
    }
    if !refused.is_empty() {
        let mut why = refused.join("; ");
        if !changed.is_empty() {
            why.push_str(&format!(" (done: {})", changed.join(", ")));
        }
        return Err(HostError::Failed(why));
    }
    Ok(changed)
}

fn swap_off(host: &dyn Host) -> HostResult<Outcome> {
    let mut changed = Vec::new();
    let fstab =
        String::from_utf8_lossy(&host.read(Path::new(FSTAB))?.unwrap_or_default()).into_owned();
    let is_swap =
        |l: &str| !l.trim_start().starts_with('#') && l.split_whitespace().nth(2) == Some("swap");
    if fstab.lines().any(is_swap) {
        let next: Vec<String> = fstab
            .lines()
            .map(|l| {
                if is_swap(l) {
                    format!("# {l}  # swap off: steward")
                } else {
                    l.to_owned()
                }
            })
            .collect();
        ensure_content(
            host,
            Path::new(FSTAB),
            format!("{}\n", next.join("\n")).as_bytes(),
            0o644,
        )?;
        changed.push("swap commented out in /etc/fstab".into());
    }
    let active = host.active_swaps()?;
    if !active.is_empty() {
        if let Some(here) = in_container(host) {
            return Ok(Outcome::not_applicable(format!(
                "{here}: swap belongs to the host ({}); turn it off there",
                active.join(", ")
            )));
        }
        host.swap_off()?;
        changed.push(format!("swapoff {}", active.join(" ")));
    }
    Ok(Outcome::changed(changed))
}

/// Runs the command with its input files in place: each written (its
/// directory created 0700 first) just before, and removed right after,
/// whatever the outcome.
fn run_with_inputs(host: &dyn Host, spec: &CommandSpec) -> HostResult<super::host::CommandOutput> {
    let root = |mode: u32, is_dir: bool| Meta {
        is_dir,
        mode,
        owner: "root".into(),
        group: "root".into(),
    };
    let mut written = Vec::new();
    let mut prepared = Ok(());
    for input in &spec.inputs {
        let path = Path::new(&input.path);
        prepared = path
            .parent()
            .map_or(Ok(()), |dir| host.create_dir(dir, &root(0o700, true)))
            .and_then(|()| host.write(path, &input.content, &root(input.mode, false), None));
        if prepared.is_err() {
            break;
        }
        written.push(path);
    }
    let out = prepared.and_then(|()| host.run(&spec.argv));
    let mut removed = Ok(());
    for path in written {
        if let Err(e) = host.remove(path) {
            removed = Err(e);
        }
    }
    let out = out?;
    removed?;
    Ok(out)
}

fn command(host: &dyn Host, spec: &CommandSpec) -> HostResult<Outcome> {
    if let Some(path) = &spec.creates {
        if host.meta(path)?.is_some() {
            return Ok(Outcome::ok());
        }
    }
    if let Some(guard) = &spec.unless {
        if host.run(guard)?.success {
            return Ok(Outcome::ok());
        }
    }
    let out = run_with_inputs(host, spec)?;
    if !out.success {
        return Err(HostError::CommandFailed {
            command: spec.summary.clone(),
            stdout: out.stdout,
            stderr: out.stderr,
        });
    }
    Ok(Outcome::changed(vec![format!("ran `{}`", spec.summary)]))
}
