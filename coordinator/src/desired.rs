//! Per-node desired states: each node is told only what its roles consume,
//! at a revision that moves only when that part moves.
//!
//! A node's desired state holds its roles, the slice of the cluster view
//! its roles plan from ([`Interest`]), and the orchestration steps given
//! to it. Its revision is the newest etcd mod revision among exactly those
//! inputs, so a change pushes to the nodes that consume it and to no other
//! (adding a worker does not wake the other 9,999 workers). Each distinct
//! slice is computed once per cache change and shared by every session
//! with the same interest ([`ViewCache`]).
//!
//! Deterministic across replicas and never moving backwards, like the
//! cluster-wide revision it replaces: inputs are overwritten, never
//! deleted, and the changes that take something out of a slice touch a
//! marker whose mod revision counts: a node losing role R touches
//! `cluster/departed/<R>`, a VIP removal `vips/.removed`, and a change to a
//! section of the cluster settings `cluster/changed/<section>`.
//!
//! Every node also consumes the coordinator revocations
//! ([`coordinator_revocations`]): its agent refuses replicas whose
//! certificate they cover, so a revocation moves every node's revision.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use steward_proto::converge::{ClusterSettings, ClusterView, Member};
use steward_proto::domain::{
    CoordinatorRevocation, NodeId, RevocableKind, Role, MAX_COORDINATOR_REVOCATIONS,
};

use crate::cache::SpecSnapshot;
use crate::vip::VipSnapshot;

/// A section of the cluster settings, as its change marker names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Section {
    Kubernetes,
    Gluster,
    Frontends,
}

impl Section {
    pub const ALL: [Section; 3] = [Section::Kubernetes, Section::Gluster, Section::Frontends];

    pub fn as_str(self) -> &'static str {
        match self {
            Section::Kubernetes => "kubernetes",
            Section::Gluster => "gluster",
            Section::Frontends => "frontends",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }

    /// The sections that differ between `a` and `b`.
    pub fn changed(a: &ClusterSettings, b: &ClusterSettings) -> Vec<Section> {
        let mut out = Vec::new();
        if a.kubernetes != b.kubernetes {
            out.push(Section::Kubernetes);
        }
        if a.gluster_volumes != b.gluster_volumes {
            out.push(Section::Gluster);
        }
        if a.frontends != b.frontends {
            out.push(Section::Frontends);
        }
        out
    }
}

/// What part of the cluster a set of roles plans from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Interest {
    /// Members with any of these roles are in the view (and the node
    /// itself, whatever its roles).
    pub member_roles: BTreeSet<Role>,
    pub vips: bool,
    pub sections: BTreeSet<Section>,
}

impl Interest {
    /// What a node with `roles` consumes:
    /// - lb: every member (HAProxy backends may name any role), the VIPs,
    ///   the frontends;
    /// - k8s-control-plane: the Kubernetes members (it drains and removes
    ///   leaving ones), the VIPs (the API endpoint), the Kubernetes settings;
    /// - k8s-worker: the control planes (its join endpoint), the VIPs, the
    ///   Kubernetes settings, and the bricks and volumes (it mounts them);
    /// - gluster-brick: the other bricks and the volumes;
    /// - no role: nothing.
    pub fn of(roles: &BTreeSet<Role>) -> Self {
        let mut i = Interest::default();
        for role in roles {
            match role {
                Role::Lb => {
                    i.member_roles.extend(Role::ALL);
                    i.vips = true;
                    i.sections.insert(Section::Frontends);
                }
                Role::K8sControlPlane => {
                    i.member_roles
                        .extend([Role::K8sControlPlane, Role::K8sWorker]);
                    i.vips = true;
                    i.sections.insert(Section::Kubernetes);
                }
                Role::K8sWorker => {
                    i.member_roles
                        .extend([Role::K8sControlPlane, Role::GlusterBrick]);
                    i.vips = true;
                    i.sections.extend([Section::Kubernetes, Section::Gluster]);
                }
                Role::GlusterBrick => {
                    i.member_roles.insert(Role::GlusterBrick);
                    i.sections.insert(Section::Gluster);
                }
            }
        }
        i
    }

    /// [`Interest::of`], plus what the cluster's Gluster volumes add: a
    /// node whose roles mount a volume (`mount_on`) consumes the volumes
    /// and the bricks (its mount unit names them), and a control plane the
    /// volumes and their mounting nodes (it applies their
    /// PersistentVolumes).
    pub fn for_node(roles: &BTreeSet<Role>, settings: Option<&ClusterSettings>) -> Self {
        let mut i = Self::of(roles);
        for volume in settings.map_or(&[][..], |s| &s.gluster_volumes[..]) {
            if volume.mount_on.iter().any(|r| roles.contains(r)) {
                i.sections.insert(Section::Gluster);
                i.member_roles.insert(Role::GlusterBrick);
            }
            if roles.contains(&Role::K8sControlPlane) {
                i.sections.insert(Section::Gluster);
                i.member_roles.extend(volume.mount_on.iter().copied());
            }
        }
        i
    }

    fn wants(&self, roles: &BTreeSet<Role>) -> bool {
        roles.iter().any(|r| self.member_roles.contains(r))
    }
}

/// One slice of the cluster view and the revision it is current at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    /// Members of interest only; the node itself is added per node.
    pub view: ClusterView,
    pub revision: u64,
}

/// The slice of `specs` and `vips` that `interest` consumes.
pub fn project(specs: &SpecSnapshot, vips: &VipSnapshot, interest: &Interest) -> View {
    project_with(specs, vips, interest, None)
}

/// [`project`] with `settings` in place of the cluster's (a rollout's
/// target, for the nodes it changed: their own change marker is added to
/// the revision per node).
pub fn project_with(
    specs: &SpecSnapshot,
    vips: &VipSnapshot,
    interest: &Interest,
    settings: Option<&ClusterSettings>,
) -> View {
    let mut revision = 0i64;
    let mut members = Vec::new();
    for (id, spec) in specs.specs.iter() {
        if spec.value.roles.is_empty() || !interest.wants(&spec.value.roles) {
            continue;
        }
        let address = specs.addresses.get(id);
        revision = revision
            .max(spec.mod_revision)
            .max(address.map_or(0, |a| a.mod_revision));
        members.push(Member {
            node: id.clone(),
            roles: spec.value.roles.clone(),
            address: address.map(|a| a.value),
        });
    }
    if interest.sections.contains(&Section::Kubernetes) {
        // Control planes cordon and drain Kubernetes members out of service.
        let k8s = [Role::K8sControlPlane, Role::K8sWorker];
        for m in &members {
            if m.roles.iter().any(|r| k8s.contains(r)) {
                let rev = specs.maintenance.get(&m.node).map_or(0, |r| r.mod_revision);
                revision = revision.max(rev);
            }
        }
    }
    for role in &interest.member_roles {
        revision = revision.max(specs.departed.get(role).copied().unwrap_or(0));
    }
    let mut view = ClusterView {
        members,
        ..Default::default()
    };
    if interest.vips {
        view.vips = vips.views();
        revision = revision.max(vips.views_revision());
    }
    let settings = settings.or(specs.settings.as_ref().map(|s| &s.value));
    if let Some(s) = settings {
        for section in &interest.sections {
            // Every apply that changes a section touches its marker. (A
            // cluster last applied by an older coordinator has none yet:
            // its slices start at their other inputs until the next change.)
            revision = revision.max(specs.sections.get(section).copied().unwrap_or(0));
            match section {
                Section::Kubernetes => view.settings.kubernetes = s.kubernetes.clone(),
                Section::Gluster => view.settings.gluster_volumes = s.gluster_volumes.clone(),
                Section::Frontends => view.settings.frontends = s.frontends.clone(),
            }
        }
    }
    View {
        view,
        revision: revision.max(0) as u64,
    }
}

/// The slices of one pair of snapshots, each computed once and shared by
/// every session that consumes it.
#[derive(Default)]
pub struct ViewCache {
    inner: Mutex<Cached>,
}

#[derive(Default)]
struct Cached {
    /// The snapshots the views were computed from (held, so that their
    /// addresses are not reused while they key the cache).
    from: Option<(Arc<SpecSnapshot>, Arc<VipSnapshot>)>,
    /// By interest and the rollout whose target the slice carries.
    views: HashMap<(Interest, Option<String>), Arc<View>>,
}

impl ViewCache {
    /// The slice `interest` consumes, with the target settings of rollout
    /// `target` (`SpecSnapshot::rollout_target`) or the cluster's.
    pub fn get(
        &self,
        specs: &Arc<SpecSnapshot>,
        vips: &Arc<VipSnapshot>,
        interest: &Interest,
        target: Option<&str>,
    ) -> Arc<View> {
        let mut cached = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let current = cached
            .from
            .as_ref()
            .is_some_and(|(s, v)| Arc::ptr_eq(s, specs) && Arc::ptr_eq(v, vips));
        if !current {
            cached.from = Some((specs.clone(), vips.clone()));
            cached.views.clear();
        }
        let settings = target.and_then(|id| {
            let spec = specs.rollouts.get(id)?.spec.as_ref()?;
            Some(&spec.value.target)
        });
        cached
            .views
            .entry((interest.clone(), target.map(str::to_owned)))
            .or_insert_with(|| Arc::new(project_with(specs, vips, interest, settings)))
            .clone()
    }
}

/// `node`'s roles and its slice of the cluster (itself included as a
/// member when it has roles), at the slice's revision or its own spec's,
/// whichever is newer. Orchestration steps are added by the caller.
pub fn desired_base(
    specs: &SpecSnapshot,
    view: &View,
    node: &NodeId,
) -> steward_proto::domain::DesiredState {
    let spec = specs.specs.get(node);
    let roles = spec.map(|s| s.value.roles.clone()).unwrap_or_default();
    let mut cluster = view.view.clone();
    if !roles.is_empty() && !cluster.members.iter().any(|m| &m.node == node) {
        let address = specs.addresses.get(node);
        let at = cluster.members.partition_point(|m| m.node < *node);
        cluster.members.insert(
            at,
            Member {
                node: node.clone(),
                roles: roles.clone(),
                address: address.map(|a| a.value),
            },
        );
    }
    let own = own_revision(specs, node);
    let (coordinator_revocations, revoked) = coordinator_revocations(specs);
    steward_proto::domain::DesiredState {
        revision: view.revision.max(own).max(revoked),
        roles,
        cluster,
        tasks: Vec::new(),
        files: Vec::new(),
        coordinator_revocations,
        reboot: specs
            .reboots
            .get(node)
            .map(|r| steward_proto::domain::RebootRequest {
                generation: r.mod_revision.max(0) as u64,
                boot_id: r.value.boot_id.clone(),
            }),
    }
}

/// The coordinator revocations every node is told of (its agent refuses a
/// replica presenting a covered certificate): the newest
/// [`MAX_COORDINATOR_REVOCATIONS`] by etcd revision, newest first, and the
/// revision they count at (the newest of all of them, so a new revocation
/// moves every node's desired state).
pub fn coordinator_revocations(specs: &SpecSnapshot) -> (Vec<CoordinatorRevocation>, u64) {
    let mut all: Vec<_> = specs
        .cert_revoked
        .iter()
        .filter(|((kind, _), _)| *kind == RevocableKind::Coordinator)
        .map(|((_, name), r)| (r.mod_revision, name, r.value.revoked_unix_s))
        .collect();
    all.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    let revision = all.first().map_or(0, |r| r.0).max(0) as u64;
    let list = all
        .into_iter()
        .take(MAX_COORDINATOR_REVOCATIONS)
        .map(|(_, name, revoked_unix_s)| CoordinatorRevocation {
            name: name.clone(),
            revoked_unix_s,
        })
        .collect();
    (list, revision)
}

/// The revision [`coordinator_revocations`] counts at, without the list.
pub fn coordinator_revocations_revision(specs: &SpecSnapshot) -> u64 {
    specs
        .cert_revoked
        .iter()
        .filter(|((kind, _), _)| *kind == RevocableKind::Coordinator)
        .map(|(_, r)| r.mod_revision)
        .max()
        .unwrap_or(0)
        .max(0) as u64
}

/// The newest of `node`'s own inputs: its spec, and its address while it
/// has roles (it is then a member of its own view).
pub fn own_revision(specs: &SpecSnapshot, node: &NodeId) -> u64 {
    let spec = specs.specs.get(node);
    let member = spec.is_some_and(|s| !s.value.roles.is_empty());
    let address = specs
        .addresses
        .get(node)
        .filter(|_| member)
        .map_or(0, |a| a.mod_revision);
    // A reboot asked of it (`nodes/<id>/reboot`) is its own too.
    let reboot = specs.reboots.get(node).map_or(0, |r| r.mod_revision);
    spec.map_or(0, |s| s.mod_revision)
        .max(address)
        .max(reboot)
        .max(0) as u64
}

#[cfg(test)]
mod tests {
    use steward_proto::domain::CertName;

    use super::*;
    use crate::store::{CertRevokedRecord, Versioned};

    fn revoke(specs: &mut SpecSnapshot, kind: RevocableKind, name: &str, rev: i64) {
        Arc::make_mut(&mut specs.cert_revoked).insert(
            (kind, CertName::new(name).expect("name")),
            Versioned {
                value: CertRevokedRecord {
                    revoked_unix_s: 1_000 + rev,
                    at_unix_ms: 0,
                    by: "admin".into(),
                },
                mod_revision: rev,
            },
        );
    }

    #[test]
    fn coordinator_revocations_are_capped_newest_first_and_count_for_every_node() {
        let mut specs = SpecSnapshot::default();
        assert_eq!(coordinator_revocations(&specs), (Vec::new(), 0));
        let over = MAX_COORDINATOR_REVOCATIONS as i64 + 10;
        for rev in 1..=over {
            revoke(
                &mut specs,
                RevocableKind::Coordinator,
                &format!("c-{rev}"),
                rev,
            );
        }
        // Admin revocations are not the agents' business.
        revoke(&mut specs, RevocableKind::Admin, "ops", over + 5);
        let (list, revision) = coordinator_revocations(&specs);
        assert_eq!(revision, over as u64);
        assert_eq!(coordinator_revocations_revision(&specs), over as u64);
        assert_eq!(list.len(), MAX_COORDINATOR_REVOCATIONS);
        assert_eq!(list[0].name.as_str(), format!("c-{over}"));
        assert_eq!(list[0].revoked_unix_s, 1_000 + over);
        let oldest = over - MAX_COORDINATOR_REVOCATIONS as i64 + 1;
        assert_eq!(
            list.last().expect("full").name.as_str(),
            format!("c-{oldest}")
        );

        // A node without any other input still gets them, at their revision.
        let desired = desired_base(&specs, &View::default(), &NodeId::new("n-1").expect("id"));
        assert_eq!(desired.revision, over as u64);
        assert_eq!(desired.coordinator_revocations, list);
    }
}
