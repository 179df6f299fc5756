//! `stewardctl ... --wait`: follow the nodes a change reached until each
//! has converged the revision it was given, the way `kubectl rollout
//! status` and `terraform apply` let their users know that a change is
//! done, not just accepted.
//!
//! A node is *affected* when its desired revision grew past what it was
//! before the change. Each affected node is then followed through
//! [`Progress`]: it receives the revision (its applied revision reaches the
//! target), converges it (its converge report for that revision settles),
//! or fails (that report has a failed resource: the wait ends at once,
//! non-zero, naming the node and its first error). Nothing here writes.
//!
//! The reading of a node ([`progress`]) and the drawing ([`Board`]) are
//! pure; only [`wait`] talks to the coordinator.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use steward_proto::domain::{NodeHealth, NodeId, NodeView};
use steward_proto::pb;
use steward_proto::pb::admin_service_client::AdminServiceClient;
use tonic::transport::Channel;

use crate::ctl::CtlError;

/// How often the nodes are read while waiting.
const POLL: Duration = Duration::from_millis(500);
/// How long a change that wrote something may take to show in the nodes'
/// desired revisions before the wait concludes that it reached no node.
const SETTLE: Duration = Duration::from_secs(5);

/// Each node's desired revision before the change.
#[derive(Debug, Clone, Default)]
pub struct Baseline(BTreeMap<NodeId, u64>);

impl Baseline {
    pub fn of(nodes: &[NodeView]) -> Baseline {
        Baseline(
            nodes
                .iter()
                .map(|n| (n.id.clone(), n.desired_revision))
                .collect(),
        )
    }

    fn grew(&self, node: &NodeView) -> bool {
        node.desired_revision > self.0.get(&node.id).copied().unwrap_or(0)
    }
}

/// Where one affected node stands with the revision it was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Not connected: it gets the revision when it reconnects.
    Disconnected,
    /// Connected, not yet holding the revision.
    Receiving,
    /// Holding it; no converge report for it yet.
    Converging,
    /// Its converge run for the revision settled.
    Converged,
    /// It holds the revision and does not converge (`[converge] enabled =
    /// false`): nothing more will happen.
    Received,
    /// Its converge run for the revision failed: the first failed resource
    /// and its error.
    Failed(String),
}

impl Progress {
    pub fn done(&self) -> bool {
        matches!(self, Progress::Converged | Progress::Received)
    }

    fn describe(&self, target: u64) -> String {
        match self {
            Progress::Disconnected => format!("disconnected (revision {target} waits for it)"),
            Progress::Receiving => format!("receiving revision {target}"),
            Progress::Converging => format!("converging revision {target}"),
            Progress::Converged => format!("converged revision {target}"),
            Progress::Received => {
                format!("has revision {target} (convergence is off on this node)")
            }
            Progress::Failed(error) => format!("FAILED revision {target}: {error}"),
        }
    }
}

/// Where `node` stands with revision `target`.
pub fn progress(node: &NodeView, target: u64) -> Progress {
    if node.applied_revision < target {
        return if node.health == NodeHealth::Unreachable || node.replica.is_none() {
            Progress::Disconnected
        } else {
            Progress::Receiving
        };
    }
    match &node.converge {
        // The agent reports its converge runs with the state it applied;
        // one that holds the revision and never reported a run does not
        // converge.
        None => Progress::Received,
        Some(report) if report.revision < target => Progress::Converging,
        Some(report) => match report.failed().next() {
            Some(failed) => {
                Progress::Failed(printable(&format!("{}: {}", failed.id, failed.detail)))
            }
            None if report.converged() => Progress::Converged,
            None => Progress::Converging,
        },
    }
}

/// `text` on one line, terminal-safe ([`crate::logs::harmless`]), at most
/// 300 characters.
pub fn printable(text: &str) -> String {
    let one_line = crate::logs::harmless(&text.replace(['\n', '\r'], " "));
    let mut out: String = one_line.chars().take(300).collect();
    if one_line.chars().count() > 300 {
        out.push('…');
    }
    out
}

/// The affected nodes, their targets and where they stand; draws itself.
#[derive(Debug, Default)]
pub struct Board {
    /// Node → (target revision, progress).
    nodes: BTreeMap<NodeId, (u64, Progress)>,
}

/// What the board says after an update.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Waiting,
    AllDone,
    /// Nodes whose run failed, with the error.
    Failed(Vec<(NodeId, String)>),
}

impl Board {
    /// Takes the nodes as they are now; returns the lines for nodes whose
    /// progress changed (for plain output).
    pub fn update(&mut self, baseline: &Baseline, nodes: &[NodeView]) -> Vec<String> {
        let mut lines = Vec::new();
        for node in nodes {
            let known = self.nodes.get(&node.id).map(|(target, _)| *target);
            // A node is followed from the moment its revision grew; its
            // target is the revision it had then.
            let target = match known {
                Some(t) => t,
                None if baseline.grew(node) => node.desired_revision,
                None => continue,
            };
            let now = progress(node, target);
            let changed = self.nodes.get(&node.id).map(|(_, p)| p) != Some(&now);
            if changed {
                lines.push(format!("{}: {}", node.id, now.describe(target)));
                self.nodes.insert(node.id.clone(), (target, now));
            }
        }
        lines
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn verdict(&self) -> Verdict {
        let failed: Vec<(NodeId, String)> = self
            .nodes
            .iter()
            .filter_map(|(id, (_, p))| match p {
                Progress::Failed(e) => Some((id.clone(), e.clone())),
                _ => None,
            })
            .collect();
        if !failed.is_empty() {
            Verdict::Failed(failed)
        } else if self.nodes.values().all(|(_, p)| p.done()) {
            Verdict::AllDone
        } else {
            Verdict::Waiting
        }
    }

    /// One line for a terminal: a bar, the count, and who is still waited
    /// for.
    pub fn bar(&self, elapsed: Duration) -> String {
        const WIDTH: usize = 20;
        let total = self.nodes.len().max(1);
        let done = self.nodes.values().filter(|(_, p)| p.done()).count();
        let filled = done * WIDTH / total;
        let waiting: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, (_, p))| !p.done())
            .take(3)
            .map(|(id, (_, p))| {
                let state = match p {
                    Progress::Disconnected => "disconnected",
                    Progress::Receiving => "receiving",
                    Progress::Converging => "converging",
                    Progress::Failed(_) => "failed",
                    Progress::Converged | Progress::Received => "done",
                };
                format!("{id} {state}")
            })
            .collect();
        let more = self.nodes.values().filter(|(_, p)| !p.done()).count();
        let more = more.saturating_sub(waiting.len());
        format!(
            "[{}{}] {done}/{} converged  {:>4.0}s  {}{}",
            "#".repeat(filled),
            ".".repeat(WIDTH - filled),
            self.nodes.len(),
            elapsed.as_secs_f64(),
            waiting.join(", "),
            if more > 0 {
                format!(" (+{more} more)")
            } else {
                String::new()
            }
        )
    }

    /// The nodes not done, with where they stand (for a timeout).
    pub fn pending(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|(_, (_, p))| !p.done())
            .map(|(id, (target, p))| format!("{id}: {}", p.describe(*target)))
            .collect()
    }
}

/// Every node as the admin API lists it.
pub(crate) async fn nodes(
    client: &mut AdminServiceClient<Channel>,
) -> Result<Vec<NodeView>, CtlError> {
    list_nodes(client, pb::ListNodesRequest::default()).await
}

/// Nodes in pages of this many: small enough that a page of nodes with
/// large converge reports stays far below the response limit.
const NODES_PAGE: u32 = 250;

/// Every node `filter` selects, following the pages to the end.
pub(crate) async fn list_nodes(
    client: &mut AdminServiceClient<Channel>,
    filter: pb::ListNodesRequest,
) -> Result<Vec<NodeView>, CtlError> {
    let mut all = Vec::new();
    let mut request = pb::ListNodesRequest {
        page_size: NODES_PAGE,
        ..filter
    };
    loop {
        let page = client.list_nodes(request.clone()).await?.into_inner();
        for node in page.nodes {
            all.push(NodeView::try_from(node)?);
        }
        if page.next_page_token.is_empty() {
            return Ok(all);
        }
        request.page_token = page.next_page_token;
    }
}

/// The baseline to take before a change.
pub async fn baseline(client: &mut AdminServiceClient<Channel>) -> Result<Baseline, CtlError> {
    Ok(Baseline::of(&nodes(client).await?))
}

/// Waits until every node the change reached converged it, one failed, or
/// `timeout` passed. Progress goes to stderr (a bar on a terminal, a line
/// per change otherwise); the outcome is returned.
pub async fn wait(
    client: &mut AdminServiceClient<Channel>,
    baseline: &Baseline,
    wrote: bool,
    timeout: Duration,
) -> Result<String, CtlError> {
    let started = Instant::now();
    let terminal = std::io::stderr().is_terminal();
    let mut board = Board::default();
    let mut stderr = std::io::stderr();
    loop {
        let current = nodes(client).await?;
        for line in board.update(baseline, &current) {
            if !terminal {
                let _ = writeln!(stderr, "[{:>5.1}s] {line}", started.elapsed().as_secs_f64());
            }
        }
        if terminal && !board.is_empty() {
            let _ = write!(stderr, "\r\x1b[2K{}", board.bar(started.elapsed()));
            let _ = stderr.flush();
        }
        let end_line = |stderr: &mut std::io::Stderr| {
            if terminal && !board.is_empty() {
                let _ = writeln!(stderr);
            }
        };
        if board.is_empty() && (!wrote || started.elapsed() >= SETTLE) {
            return Ok("the change reached no node's desired state: nothing to wait for".into());
        }
        match board.verdict() {
            Verdict::AllDone if !board.is_empty() => {
                end_line(&mut stderr);
                return Ok(format!(
                    "{} node(s) converged in {:.1}s",
                    board.nodes.len(),
                    started.elapsed().as_secs_f64()
                ));
            }
            Verdict::Failed(failed) => {
                end_line(&mut stderr);
                let list: Vec<String> = failed.iter().map(|(id, e)| format!("{id}: {e}")).collect();
                return Err(CtlError::Wait(format!(
                    "{} node(s) failed to converge:\n  {}",
                    failed.len(),
                    list.join("\n  ")
                )));
            }
            _ => {}
        }
        if started.elapsed() >= timeout {
            end_line(&mut stderr);
            return Err(CtlError::Wait(format!(
                "timed out after {timeout:?}; not done:\n  {}",
                board.pending().join("\n  ")
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use steward_proto::converge::{ConvergeReport, ResourceState, ResourceStatus};

    fn node(id: &str, desired: u64, applied: u64, converge: Option<ConvergeReport>) -> NodeView {
        NodeView {
            id: NodeId::new(id).expect("id"),
            roles: Default::default(),
            health: NodeHealth::Healthy,
            last_seen_unix_ms: 1,
            replica: Some("coord-1".into()),
            facts: Default::default(),
            last_health: Default::default(),
            desired_revision: desired,
            applied_revision: applied,
            address: None,
            converge,
            revoked_unix_ms: None,
            maintenance: None,
            gluster: None,
        }
    }

    fn report(revision: u64, statuses: &[(&str, ResourceStatus, Option<&str>)]) -> ConvergeReport {
        ConvergeReport {
            revision,
            finished_unix_ms: 1,
            duration_ms: 1,
            resources: statuses
                .iter()
                .map(|(id, status, error)| ResourceState {
                    id: (*id).into(),
                    status: *status,
                    detail: error.unwrap_or_default().into(),
                    since_unix_ms: 1,
                })
                .collect(),
        }
    }

    #[test]
    fn a_node_is_read_through_its_revisions_and_report() {
        let ok = report(7, &[("packages:haproxy", ResourceStatus::Ok, None)]);
        assert_eq!(progress(&node("a", 7, 6, None), 7), Progress::Receiving);
        let mut gone = node("a", 7, 6, None);
        gone.replica = None;
        assert_eq!(progress(&gone, 7), Progress::Disconnected);
        assert_eq!(progress(&node("a", 7, 7, None), 7), Progress::Received);
        let old = report(6, &[("x", ResourceStatus::Ok, None)]);
        assert_eq!(
            progress(&node("a", 7, 7, Some(old)), 7),
            Progress::Converging
        );
        assert_eq!(progress(&node("a", 7, 7, Some(ok)), 7), Progress::Converged);
        let failed = report(
            7,
            &[
                ("packages:haproxy", ResourceStatus::Ok, None),
                (
                    "file:/etc/x",
                    ResourceStatus::Failed,
                    Some("no space\x1b]52;c;evil\x07"),
                ),
            ],
        );
        match progress(&node("a", 7, 7, Some(failed)), 7) {
            Progress::Failed(e) => {
                assert!(e.starts_with("file:/etc/x: no space"), "{e}");
                assert!(!e.contains('\x1b') && !e.contains('\x07'), "{e:?}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn only_nodes_whose_revision_grew_are_followed() {
        let before = Baseline::of(&[node("a", 5, 5, None), node("b", 5, 5, None)]);
        let mut board = Board::default();
        let lines = board.update(&before, &[node("a", 9, 5, None), node("b", 5, 5, None)]);
        assert_eq!(lines, vec!["a: receiving revision 9".to_owned()]);
        assert_eq!(board.verdict(), Verdict::Waiting);
        // Unchanged progress prints nothing; b stays unfollowed.
        assert!(board
            .update(&before, &[node("a", 9, 5, None), node("b", 5, 5, None)])
            .is_empty());
        let converged = report(9, &[("x", ResourceStatus::Changed, None)]);
        let lines = board.update(&before, &[node("a", 9, 9, Some(converged))]);
        assert_eq!(lines, vec!["a: converged revision 9".to_owned()]);
        assert_eq!(board.verdict(), Verdict::AllDone);
        assert!(board
            .bar(Duration::from_secs(3))
            .starts_with("[####################] 1/1"));
    }

    #[test]
    fn one_failure_fails_the_wait_with_the_node_and_its_error() {
        let before = Baseline::of(&[node("a", 1, 1, None), node("b", 1, 1, None)]);
        let mut board = Board::default();
        let failed = report(
            2,
            &[("unit:haproxy.service", ResourceStatus::Failed, Some("boom"))],
        );
        board.update(
            &before,
            &[node("a", 2, 2, Some(failed)), node("b", 2, 1, None)],
        );
        assert_eq!(
            board.verdict(),
            Verdict::Failed(vec![(
                NodeId::new("a").expect("id"),
                "unit:haproxy.service: boom".into()
            )])
        );
        assert_eq!(
            board.pending(),
            vec![
                "a: FAILED revision 2: unit:haproxy.service: boom".to_owned(),
                "b: receiving revision 2".to_owned()
            ]
        );
    }
}
