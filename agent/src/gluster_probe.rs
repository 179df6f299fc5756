//! On a gluster-brick node: what `gluster volume heal VOL info summary`
//! says of the replicated volumes with a brick here — each brick reached
//! (online) or not, and the entries pending heal on each — for the
//! coordinator's heal gate and the rollout's health step (DESIGN.md §7).
//!
//! Only the heal info, never `gluster volume status`: the heal info is a
//! client of the bricks (`glfsheal`) and takes no glusterd lock, where a
//! status on every brick node every few seconds would contend with the
//! operator node's `volume create`/`replace-brick` ("Another transaction
//! is in progress").
//!
//! Cheap and bounded: nothing runs on a node without the gluster-brick
//! role, nor for a volume without replicas (nothing to heal); a probe at
//! most every [`PROBE_EVERY`] (and soon after a converge run finished, so
//! that a report newer than a change exists soon); each command killed
//! after [`COMMAND_DEADLINE`]; at most [`MAX_GLUSTER_VOLUMES`] volumes and
//! [`MAX_GLUSTER_BRICKS`] bricks each; the session sends the report only
//! when it changed.

use std::net::IpAddr;
use std::time::Duration;

use steward_proto::converge::ConvergeReport;
use steward_proto::domain::{
    DesiredState, GlusterBrickReport, GlusterReport, GlusterVolumeReport, NodeId, Role,
    MAX_GLUSTER_BRICKS, MAX_GLUSTER_VOLUMES,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::converge::gluster::heal_summary;
use crate::converge::host::{tail, CommandOutput};
use crate::state::RecordedState;

/// How often a brick node looks.
pub const PROBE_EVERY: Duration = Duration::from_secs(10);
/// The shortest time between two probes (a converge run finishing right
/// after a probe does not start another at once).
const PROBE_GAP: Duration = Duration::from_secs(2);
/// How long one `gluster` command may run before it is killed.
pub const COMMAND_DEADLINE: Duration = Duration::from_secs(8);
/// Longest error text kept per volume.
const MAX_ERROR: usize = 512;

/// Runs one command: its output, or why it could not run.
pub type Run<'a> = &'a dyn Fn(&[&str]) -> Result<CommandOutput, String>;

/// This node's address as the cluster knows it (the brick host glusterd
/// names), if the desired state lists it.
fn own_address(node: &NodeId, desired: &DesiredState) -> Option<IpAddr> {
    desired
        .cluster
        .members
        .iter()
        .find(|m| &m.node == node)
        .and_then(|m| m.address)
}

fn cut(text: String) -> String {
    if text.len() <= MAX_ERROR {
        return text;
    }
    let mut end = MAX_ERROR;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

fn failure(out: &CommandOutput) -> String {
    tail(&format!("{}\n{}", out.stdout, out.stderr))
}

/// One look at the volumes of `desired` with a brick here; `None` on a
/// node without the gluster-brick role.
pub fn probe(
    node: &NodeId,
    desired: &DesiredState,
    after_converge_revision: u64,
    run: Run<'_>,
) -> Option<GlusterReport> {
    if !desired.roles.contains(&Role::GlusterBrick) {
        return None;
    }
    let here = own_address(node, desired);
    let mut volumes = Vec::new();
    for volume in desired
        .cluster
        .settings
        .gluster_volumes
        .iter()
        .filter(|v| v.replica > 1)
        .take(MAX_GLUSTER_VOLUMES)
    {
        let name = volume.name.as_str();
        let mut report = GlusterVolumeReport {
            volume: name.to_owned(),
            ..Default::default()
        };
        let bricks = match run(&["gluster", "volume", "heal", name, "info", "summary"]) {
            Ok(out) if out.success => heal_summary(&out.stdout),
            Ok(out) => {
                report.error = Some(cut(format!("heal info: {}", failure(&out))));
                volumes.push(report);
                continue;
            }
            Err(e) => {
                report.error = Some(cut(format!("heal info: {e}")));
                volumes.push(report);
                continue;
            }
        };
        report.bricks = bricks
            .into_iter()
            .take(MAX_GLUSTER_BRICKS)
            .map(|b| GlusterBrickReport {
                brick: cut(b.name),
                online: b.connected,
                pending_heals: b.entries,
            })
            .collect();
        // A volume with no brick here is the other brick nodes' to report.
        if here.is_some_and(|here| !report.bricks.iter().any(|b| b.address() == Some(here))) {
            continue;
        }
        volumes.push(report);
    }
    Some(GlusterReport {
        after_converge_revision,
        volumes,
    })
}

/// Probes until `shutdown`, handing each changed report to the session.
pub async fn run_gluster_probe(
    node: NodeId,
    in_force: watch::Receiver<RecordedState>,
    mut converged: watch::Receiver<Option<ConvergeReport>>,
    out: watch::Sender<Option<GlusterReport>>,
    shutdown: CancellationToken,
) {
    let mut converge_open = true;
    loop {
        let desired = in_force.borrow().desired.clone();
        let revision = converged
            .borrow_and_update()
            .as_ref()
            .map_or(0, |r| r.revision);
        let report = if desired.roles.contains(&Role::GlusterBrick) {
            let id = node.clone();
            let joined = tokio::task::spawn_blocking(move || {
                let run = |argv: &[&str]| {
                    crate::converge::system::exec_within(argv, &[], COMMAND_DEADLINE)
                        .map_err(|e| e.to_string())
                };
                probe(&id, &desired, revision, &run)
            })
            .await;
            match joined {
                Ok(report) => report,
                Err(error) => {
                    warn!(%error, "gluster probe panicked");
                    out.borrow().clone()
                }
            }
        } else {
            // No longer a brick node: an empty report, once, if it was one.
            out.borrow().as_ref().map(|_| GlusterReport::default())
        };
        out.send_if_modified(|last| {
            let changed = *last != report;
            if changed {
                *last = report;
            }
            changed
        });
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(PROBE_GAP) => {}
        }
        // The next look: at the tick, or sooner once a converge run of a
        // newer revision finished (a change to speak for).
        let tick = tokio::time::sleep(PROBE_EVERY - PROBE_GAP);
        tokio::pin!(tick);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = &mut tick => break,
                r = converged.changed(), if converge_open => {
                    if r.is_err() {
                        // Converge off: the tick alone.
                        converge_open = false;
                    } else if converged.borrow().as_ref().map_or(0, |r| r.revision) != revision {
                        break;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use steward_proto::converge::{GlusterVolume, Member};

    use super::*;

    fn node(id: &str) -> NodeId {
        NodeId::new(id).unwrap()
    }

    fn desired(roles: &[Role]) -> DesiredState {
        let mut d = DesiredState {
            roles: roles.iter().copied().collect(),
            ..Default::default()
        };
        d.cluster.members = vec![Member {
            node: node("b1"),
            roles: d.roles.clone(),
            address: Some("198.18.0.2".parse().unwrap()),
        }];
        for name in ["data", "other"] {
            d.cluster.settings.gluster_volumes.push(GlusterVolume {
                name: name.into(),
                replica: 2,
                mount_on: Default::default(),
            });
        }
        d
    }

    fn ok(stdout: &str) -> Result<CommandOutput, String> {
        Ok(CommandOutput {
            success: true,
            stdout: stdout.into(),
            stderr: String::new(),
        })
    }

    const DATA_HEAL: &str = "Brick 198.18.0.2:/b/data\nStatus: Connected\n\
                             Total Number of entries: 4\n\n\
                             Brick 198.18.0.3:/b/data\n\
                             Status: Transport endpoint is not connected\n\
                             Total Number of entries: -\n";
    /// Bricks elsewhere only: not reported from here.
    const OTHER_HEAL: &str = "Brick 198.18.0.7:/b/other\nStatus: Connected\n\
                              Total Number of entries: 0\n";

    #[test]
    fn a_brick_node_reports_its_volumes_bricks_and_pending_heals() {
        let calls = RefCell::new(Vec::new());
        let run = |argv: &[&str]| {
            calls.borrow_mut().push(argv.join(" "));
            match argv {
                [_, _, "heal", "data", "info", "summary"] => ok(DATA_HEAL),
                [_, _, "heal", "other", "info", "summary"] => ok(OTHER_HEAL),
                _ => Err(format!("unexpected {argv:?}")),
            }
        };
        let report = probe(&node("b1"), &desired(&[Role::GlusterBrick]), 7, &run)
            .expect("a brick node reports");
        assert_eq!(report.after_converge_revision, 7);
        assert_eq!(report.volumes.len(), 1, "{report:?}");
        let data = report.volume("data").unwrap();
        assert_eq!(data.error, None);
        assert_eq!(
            data.bricks,
            [
                GlusterBrickReport {
                    brick: "198.18.0.2:/b/data".into(),
                    online: true,
                    pending_heals: Some(4),
                },
                GlusterBrickReport {
                    brick: "198.18.0.3:/b/data".into(),
                    online: false,
                    pending_heals: None,
                },
            ]
        );
        assert_eq!(data.pending_heals(), Some(4));
        assert_eq!(
            *calls.borrow(),
            [
                "gluster volume heal data info summary",
                "gluster volume heal other info summary",
            ]
        );
    }

    #[test]
    fn failures_are_reported_and_other_nodes_run_nothing() {
        let run = |argv: &[&str]| match argv {
            [_, _, _, "data", ..] => Ok(CommandOutput {
                success: false,
                stdout: String::new(),
                stderr: "Volume data does not exist".into(),
            }),
            _ => Err("killed after 8 s".into()),
        };
        let report = probe(&node("b1"), &desired(&[Role::GlusterBrick]), 0, &run).unwrap();
        assert_eq!(
            report.volume("data").unwrap().error.as_deref(),
            Some("heal info: Volume data does not exist")
        );
        assert_eq!(report.volume("data").unwrap().pending_heals(), None);
        assert_eq!(
            report.volume("other").unwrap().error.as_deref(),
            Some("heal info: killed after 8 s")
        );
        // A volume without replicas has nothing to heal: nothing is run.
        let mut single = desired(&[Role::GlusterBrick]);
        for v in &mut single.cluster.settings.gluster_volumes {
            v.replica = 1;
        }
        let never = |_: &[&str]| -> Result<CommandOutput, String> { panic!("ran a command") };
        assert_eq!(probe(&node("b1"), &single, 0, &never).unwrap().volumes, []);
        assert_eq!(probe(&node("b1"), &desired(&[Role::Lb]), 0, &never), None);
    }
}
