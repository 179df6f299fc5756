//! `stewardctl rollout list|status|pause|resume|abort` and the rollout
//! part of `stewardctl apply --rollout`: reads and prints what the leader
//! records; `status --watch` follows it (a bar and an ETA on a terminal,
//! a line per node step otherwise). The drawing is pure; only [`watch`]
//! talks to the coordinator.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use serde_json::json;
use steward_proto::pb;
use steward_proto::pb::admin_service_client::AdminServiceClient;
use tonic::transport::Channel;

use crate::ctl::{CtlError, Output};

/// How often `status --watch` reads the rollout.
const POLL: Duration = Duration::from_millis(500);

/// Phases after which nothing more happens.
pub fn finished(phase: &str) -> bool {
    matches!(phase, "done" | "aborted")
}

fn ms(from: u64, to: u64) -> Option<u64> {
    (from > 0 && to >= from).then(|| to - from)
}

fn secs(ms: Option<u64>) -> String {
    ms.map_or_else(|| "-".into(), |ms| format!("{:.1}s", ms as f64 / 1000.0))
}

/// A node's time per step: drain, change, converge, health, undrain, total.
pub fn breakdown(n: &pb::RolloutNode) -> [Option<u64>; 6] {
    [
        ms(n.started_unix_ms, n.drained_unix_ms),
        ms(n.drained_unix_ms, n.changed_unix_ms),
        ms(n.changed_unix_ms, n.converged_unix_ms),
        ms(n.converged_unix_ms, n.healthy_unix_ms),
        ms(n.healthy_unix_ms, n.finished_unix_ms),
        ms(n.started_unix_ms, n.finished_unix_ms),
    ]
}

/// The per-role limits a rollout was created with.
fn per_role(options: &pb::RolloutOptions) -> Vec<(steward_proto::domain::Role, u32)> {
    steward_proto::admin::RolloutOptions::from(*options)
        .per_role
        .entries()
}

pub fn rollout_json(r: &pb::Rollout) -> serde_json::Value {
    let options = r.options.unwrap_or_default();
    json!({
        "id": r.id,
        "phase": r.phase,
        "reason": r.reason,
        "created_by": r.created_by,
        "created_at_unix_ms": r.created_at_unix_ms,
        "changes": r.changes,
        "max_unavailable": options.max_unavailable,
        "max_unavailable_per_role": per_role(&options)
            .into_iter()
            .map(|(role, n)| (role.as_str().to_owned(), json!(n)))
            .collect::<serde_json::Map<_, _>>(),
        "canary": options.canary,
        "pause_after_canary": options.pause_after_canary,
        "batches": r.batches,
        "canary_batches": r.canary_batches,
        "nodes_total": r.nodes_total,
        "nodes_done": r.nodes_done,
        "nodes": r.nodes.iter().map(|n| {
            let [drain, change, converge, health, undrain, total] = breakdown(n);
            json!({
                "node": n.node_id, "batch": n.batch, "step": n.step, "reason": n.reason,
                "changed_revision": n.changed_revision,
                "boot_id_before": n.boot_id_before, "boot_id_after": n.boot_id_after,
                "at": {"started": n.started_unix_ms, "drained": n.drained_unix_ms,
                       "changed": n.changed_unix_ms, "converged": n.converged_unix_ms,
                       "healthy": n.healthy_unix_ms, "finished": n.finished_unix_ms},
                "ms": {"drain": drain, "change": change, "converge": converge,
                       "health": health, "undrain": undrain, "total": total},
            })
        }).collect::<Vec<_>>(),
    })
}

/// `rollout status` as a table.
pub fn status_text(r: &pb::Rollout) -> String {
    let mut out = String::new();
    let options = r.options.unwrap_or_default();
    out.push_str(&format!(
        "rollout {}: {} ({} of {} nodes done, {} batches, max unavailable {}{}{})\n",
        r.id,
        r.phase,
        r.nodes_done,
        r.nodes_total,
        r.batches,
        options.max_unavailable,
        per_role(&options)
            .iter()
            .map(|(role, n)| format!(", {role} {n}"))
            .collect::<String>(),
        if options.canary > 0 {
            format!(
                ", canary {}{}",
                options.canary,
                if options.pause_after_canary {
                    " then pause"
                } else {
                    ""
                }
            )
        } else {
            String::new()
        }
    ));
    if !r.reason.is_empty() {
        out.push_str(&format!("  {}\n", crate::wait::printable(&r.reason)));
    }
    if r.phase == "aborted" || r.phase == "aborting" {
        out.push_str(
            "  nodes changed before the abort keep the new settings; the others keep the old \
             ones (the next apply that changes the settings sets every node)\n",
        );
    }
    for change in &r.changes {
        out.push_str(&format!("  change: {change}\n"));
    }
    if !r.nodes.is_empty() {
        out.push_str(&format!(
            "{:<20} {:>5} {:<10} {:>8} {:>8} {:>9} {:>8} {:>8}  {}\n",
            "NODE", "BATCH", "STEP", "DRAIN", "CHANGE", "CONVERGE", "HEALTH", "TOTAL", "REASON"
        ));
    }
    for n in &r.nodes {
        let [drain, change, converge, health, _, total] = breakdown(n);
        out.push_str(&format!(
            "{:<20} {:>5} {:<10} {:>8} {:>8} {:>9} {:>8} {:>8}  {}\n",
            n.node_id,
            n.batch,
            n.step,
            secs(drain),
            secs(change),
            secs(converge),
            secs(health),
            secs(total),
            crate::wait::printable(&n.reason)
        ));
    }
    out
}

pub fn print(output: Output, r: &pb::Rollout) {
    match output {
        Output::Json => println!("{}", rollout_json(r)),
        Output::Table => print!("{}", status_text(r)),
    }
}

pub fn print_list(output: Output, list: &pb::ListRolloutsResponse) {
    if output == Output::Json {
        let all: Vec<_> = list.rollouts.iter().map(rollout_json).collect();
        println!("{}", serde_json::Value::Array(all));
        return;
    }
    if list.rollouts.is_empty() {
        println!("no rollouts");
        return;
    }
    println!(
        "{:<16} {:<9} {:>11} {:<24} {:<12} CHANGES",
        "ID", "PHASE", "NODES DONE", "CREATED", "BY"
    );
    for r in &list.rollouts {
        println!(
            "{:<16} {:<9} {:>11} {:<24} {:<12} {}",
            r.id,
            r.phase,
            format!("{}/{}", r.nodes_done, r.nodes_total),
            steward_proto::domain::format_unix_ms(r.created_at_unix_ms),
            r.created_by,
            r.changes.join("; ")
        );
    }
}

/// A bar, the count and an ETA from the mean time per finished node.
pub fn bar(r: &pb::Rollout, elapsed: Duration) -> String {
    const WIDTH: usize = 20;
    let total = (r.nodes_total as usize).max(1);
    let done = r.nodes_done as usize;
    let filled = done * WIDTH / total;
    let eta = if done > 0 && done < total {
        let per = elapsed.as_secs_f64() / done as f64;
        format!(", ETA {:.0}s", per * (total - done) as f64)
    } else {
        String::new()
    };
    let current: Vec<String> = r
        .nodes
        .iter()
        .filter(|n| !matches!(n.step.as_str(), "pending" | "done"))
        .take(3)
        .map(|n| format!("{} {}", n.node_id, n.step))
        .collect();
    format!(
        "[{}{}] {done}/{total} nodes, {} {:.0}s{eta}{}",
        "#".repeat(filled),
        "-".repeat(WIDTH - filled),
        r.phase,
        elapsed.as_secs_f64(),
        if current.is_empty() {
            String::new()
        } else {
            format!(": {}", current.join(", "))
        }
    )
}

/// Lines for the steps that changed since `seen` (plain output).
pub fn changed_lines(seen: &mut BTreeMap<String, String>, r: &pb::Rollout) -> Vec<String> {
    let mut lines = Vec::new();
    let phase_key = format!("\u{0}phase {}", r.phase);
    if seen.insert("\u{0}phase".into(), phase_key.clone()) != Some(phase_key) {
        lines.push(format!("rollout {}: {}", r.id, r.phase));
    }
    for n in &r.nodes {
        let now = format!("{} {}", n.step, n.reason);
        if seen.insert(n.node_id.clone(), now.clone()) != Some(now) && n.step != "pending" {
            let reason = if n.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", crate::wait::printable(&n.reason))
            };
            lines.push(format!("{}: {}{reason}", n.node_id, n.step));
        }
    }
    lines
}

/// `rollout status ID --watch`: follows the rollout until it is done,
/// aborted or failed (exit non-zero for the last two).
pub async fn watch(
    client: &mut AdminServiceClient<Channel>,
    output: Output,
    id: &str,
) -> Result<(), CtlError> {
    let terminal = std::io::stderr().is_terminal() && output == Output::Table;
    let started = Instant::now();
    let mut seen = BTreeMap::new();
    loop {
        let r = client
            .get_rollout(pb::GetRolloutRequest { id: id.to_owned() })
            .await?
            .into_inner();
        if terminal {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K{}", bar(&r, started.elapsed()));
            let _ = err.flush();
        } else if output == Output::Table {
            for line in changed_lines(&mut seen, &r) {
                println!("{line}");
            }
        }
        let stop = finished(&r.phase) || r.phase == "failed";
        if stop {
            if terminal {
                eprintln!();
            }
            print(output, &r);
            return match r.phase.as_str() {
                "done" => Ok(()),
                _ => Err(CtlError::Wait(format!(
                    "rollout {id} {}: {}",
                    r.phase,
                    crate::wait::printable(&r.reason)
                ))),
            };
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, step: &str, t: [u64; 6]) -> pb::RolloutNode {
        pb::RolloutNode {
            node_id: id.into(),
            step: step.into(),
            started_unix_ms: t[0],
            drained_unix_ms: t[1],
            changed_unix_ms: t[2],
            converged_unix_ms: t[3],
            healthy_unix_ms: t[4],
            finished_unix_ms: t[5],
            ..Default::default()
        }
    }

    #[test]
    fn status_shows_steps_times_and_why_it_stopped() {
        let r = pb::Rollout {
            id: "r1".into(),
            phase: "failed".into(),
            reason: "node lb-2 failed: converge of revision 7 failed: service:haproxy: bad".into(),
            nodes_total: 2,
            nodes_done: 1,
            batches: 2,
            nodes: vec![
                node("lb-1", "done", [1_000, 3_000, 3_100, 5_100, 6_100, 6_200]),
                node("lb-2", "failed", [7_000, 8_000, 8_100, 0, 0, 9_000]),
            ],
            ..Default::default()
        };
        let text = status_text(&r);
        assert!(
            text.contains("rollout r1: failed (1 of 2 nodes done"),
            "{text}"
        );
        assert!(text.contains("service:haproxy: bad"), "{text}");
        let lb1 = text.lines().find(|l| l.starts_with("lb-1")).unwrap();
        for figure in ["2.0s", "0.1s", "1.0s", "5.2s"] {
            assert!(lb1.contains(figure), "{lb1}");
        }
        assert_eq!(breakdown(&r.nodes[1])[3], None);
        let mut seen = BTreeMap::new();
        assert_eq!(changed_lines(&mut seen, &r).len(), 3);
        assert!(changed_lines(&mut seen, &r).is_empty());
        assert!(bar(&r, Duration::from_secs(10)).contains("1/2 nodes, failed 10s, ETA 10s"));
    }

    #[test]
    fn status_shows_the_per_role_limits() {
        let options = steward_proto::admin::RolloutOptions {
            max_unavailable: 2,
            per_role: "k8s-worker=3,gluster-brick=1".parse().unwrap(),
            ..Default::default()
        };
        let r = pb::Rollout {
            id: "r1".into(),
            phase: "running".into(),
            nodes_total: 6,
            batches: 4,
            options: Some(options.into()),
            ..Default::default()
        };
        let text = status_text(&r);
        assert!(
            text.starts_with(
                "rollout r1: running (0 of 6 nodes done, 4 batches, max unavailable 2, \
                 k8s-worker 3, gluster-brick 1)"
            ),
            "{text}"
        );
        let json = rollout_json(&r);
        assert_eq!(
            json["max_unavailable_per_role"],
            serde_json::json!({"k8s-worker": 3, "gluster-brick": 1})
        );
    }
}
